"""tak.replay.FrozenPrefix: what it replays, and that replayed passes equal full ones exactly."""
import copy

import pytest
import torch
from torch import nn
from torch.utils import _pytree as pytree

import tak
from tak.arithmetic.compose import Evaluator, apply
from tak.replay import ByteBudget, FrozenPrefix
from tak.task_vector import TaskVector

from .test_methods import ToyBackbone, toy_task
from .test_tak_models import text_batch

transformers = pytest.importorskip("transformers")


def leaves(out) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def run(model, batches, prefix=None):
    """The outputs' tensors of ``model`` on each batch (dict batches as keyword arguments)."""
    outs = []
    with torch.no_grad():
        for i, batch in enumerate(batches):
            call = (lambda: model(**batch)) if isinstance(batch, dict) else (lambda: model(batch))
            if prefix is None:
                outs.append(leaves(call()))
            else:
                with prefix.batch(model, i, batch):
                    outs.append(leaves(call()))
    return outs


def assert_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert len(x) == len(y)
        for s, t in zip(x, y):
            assert torch.equal(s, t)


def change(model, pattern: str, seed=0) -> nn.Module:
    """A copy of ``model`` whose parameters with ``pattern`` in their name are perturbed and are the only
    ones with requires_grad (as ``tak.arithmetic.compose.apply`` returns it)."""
    model = copy.deepcopy(model).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.requires_grad_(pattern in name)
            if pattern in name:
                p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def check_replay(model, batches, expected_paths, left_out):
    """Three passes with one prefix (find and record, then replay) equal full passes; the prefix is
    ``expected_paths`` (all of them, or at least them when ``left_out`` is not None, in which case no
    path starts with it); returns the prefix."""
    reference = run(model, batches)
    prefix = FrozenPrefix()
    for _ in range(3):
        assert_equal(run(model, batches, prefix), reference)
    if left_out is None:
        assert prefix.paths == expected_paths
    else:
        assert set(expected_paths) <= set(prefix.paths)
        assert not any(p.startswith(left_out) for p in prefix.paths)
    assert sorted(prefix.records) == (list(range(len(batches))) if prefix.paths else [])
    return prefix


def bert(layers=3):
    config = transformers.BertConfig(vocab_size=41, hidden_size=20, num_hidden_layers=layers, num_attention_heads=4,
                                     intermediate_size=26, max_position_embeddings=16, type_vocab_size=2)
    torch.manual_seed(0)
    return transformers.BertModel(config).eval()


def text_batches(vocab, n=2):
    return [text_batch(vocab, token_types=False) for _ in range(n)]


def test_bert_top_layer_replays_the_embeddings_and_the_layers_below():
    model = change(bert(), "encoder.layer.2.")
    batches = text_batches(41)
    prefix = check_replay(model, batches, ["embeddings", "encoder.layer.0", "encoder.layer.1"], None)
    # what is replayed does not run: new weights below the cut change nothing, above it they do
    reference = run(model, batches)
    with torch.no_grad():
        model.encoder.layer[1].output.dense.weight.mul_(3)
    assert_equal(run(model, batches, prefix), reference)
    with torch.no_grad():
        model.encoder.layer[2].output.dense.weight.mul_(3)
    assert not torch.equal(run(model, batches, prefix)[0][0], reference[0][0])


def test_linearized_bert_replays_the_frozen_dual_layers():
    lin = tak.linearize(bert(), trainable="encoder.layer.2.*")
    g = torch.Generator().manual_seed(1)
    lin.load_task_vector({k: 0.1 * torch.randn(v.shape, generator=g) for k, v in lin.task_vector().items()})
    check_replay(lin.eval(), text_batches(41), ["dual.ln_embed", "dual.layers.0", "dual.layers.1"], "dual.layers.2")


def test_bert_with_changed_embeddings_has_no_prefix():
    model = change(bert(), "embeddings.word_embeddings")
    check_replay(model, text_batches(41), [], None)


open_clip_transformer = pytest.importorskip("open_clip.transformer")


def vit():
    torch.manual_seed(0)
    return open_clip_transformer.VisionTransformer(image_size=14, patch_size=7, width=16, layers=3, heads=2,
                                                   mlp_ratio=2.0, output_dim=6).eval()


def test_open_clip_vit_top_block_and_class_token():
    images = [torch.randn(2, 3, 14, 14) for _ in range(2)]
    check_replay(change(vit(), "resblocks.2."), images,
                 ["conv1", "ln_pre", "transformer.resblocks.0", "transformer.resblocks.1"], "transformer.resblocks.2")
    # the class token is the VisionTransformer's own parameter: its call starts first, nothing is replayed
    check_replay(change(vit(), "class_embedding"), images, [], None)


def test_t5_decoder_block_replays_the_whole_encoder():
    config = transformers.T5Config(vocab_size=37, d_model=16, d_kv=5, d_ff=22, num_layers=2, num_decoder_layers=3,
                                   num_heads=3, relative_attention_num_buckets=8, relative_attention_max_distance=20,
                                   use_cache=False)
    torch.manual_seed(0)
    model = change(transformers.T5ForConditionalGeneration(config), "decoder.block.2.")
    batches = text_batches(37)
    for b in batches:
        b["decoder_input_ids"] = torch.randint(0, 37, (3, 4))
    # the shared embedding is called again by the decoder after the cut: replayed only inside the encoder
    prefix = check_replay(model, batches, ["encoder"], "shared")
    assert "decoder.block.0" in prefix.paths


class Counted(nn.Module):
    """A linear map that counts its real calls."""

    def __init__(self, d):
        super().__init__()
        self.lin, self.calls = nn.Linear(d, d).double(), 0

    def forward(self, x):
        self.calls += 1
        return self.lin(x)


class Toy(nn.Module):
    """a, a shared tanh, b (called ``repeat`` times), c, the tanh again."""

    def __init__(self, d=5):
        super().__init__()
        self.a, self.b, self.c, self.act, self.repeat = Counted(d), Counted(d), Counted(d), nn.Tanh(), 1

    def forward(self, x):
        x = self.act(self.a(x))
        for _ in range(self.repeat):
            x = self.b(x)
        return self.act(self.c(x))


def toy(changed="c"):
    torch.manual_seed(0)
    model = Toy().eval()
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(changed))
    return model


def test_a_module_called_after_the_cut_is_not_replayed_and_replayed_modules_do_not_run():
    model = toy()
    batches = [torch.randn(4, 5, dtype=torch.float64) for _ in range(3)]
    prefix = check_replay(model, batches, ["a", "b"], None)  # not act: it runs again after the cut
    before = model.a.calls, model.b.calls, model.c.calls
    run(model, batches, prefix)
    assert (model.a.calls, model.b.calls, model.c.calls) == (before[0], before[1], before[2] + 3)


class ReadsChild(nn.Module):
    """Uses its child's weight without calling the child (as nn.MultiheadAttention does with out_proj)."""

    def __init__(self, d=5):
        super().__init__()
        self.inner = nn.Linear(d, d, bias=False).double()

    def forward(self, x):
        return torch.nn.functional.linear(x, self.inner.weight)


def test_an_owner_never_called_stands_for_its_called_ancestor():
    torch.manual_seed(0)
    model = nn.Sequential(Counted(5), nn.Tanh(), ReadsChild(), Counted(5)).eval()
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("2."))
    check_replay(model, [torch.randn(4, 5, dtype=torch.float64)], ["0", "1"], None)


def test_new_inputs_at_an_index_are_recorded_again_and_control_flow_changes_are_refused():
    model = toy()
    prefix = FrozenPrefix()
    first, other = [torch.randn(4, 5, dtype=torch.float64)], [torch.randn(4, 5, dtype=torch.float64)]
    run(model, first, prefix)
    assert_equal(run(model, other, prefix), run(model, other))  # recorded anew, not replayed
    assert torch.equal(prefix.records[0][0], other[0])
    model.repeat = 2  # b is called twice now, once when recorded
    with pytest.raises(RuntimeError, match="'b' was called more often"):
        run(model, other, prefix)
    model.repeat = 1
    assert_equal(run(model, other, prefix), run(model, other))  # the recording is intact


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Linear(5, 5), nn.Linear(5, 5), nn.Linear(5, 3)

    def forward(self, x, y):
        return self.head(torch.tanh(self.b(self.a(x) - y)))


def test_inputs_with_the_same_tensors_in_another_structure_are_recorded_again():
    """A batch whose tensors equal the recorded ones leaf by leaf but sit under other keys is not replayed."""
    torch.manual_seed(0)
    model = change(TwoInputs().double(), "head")
    t, u = torch.randn(4, 5, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
    prefix = FrozenPrefix()
    run(model, [{"x": t, "y": u}], prefix)
    assert prefix.paths == ["a", "b"]
    swapped = [{"y": t, "x": u}]  # the same leaves in the same order, other keys
    assert_equal(run(model, swapped, prefix), run(model, swapped))


def test_budget_training_mode_and_unowned_parameters_run_in_full():
    batches = [torch.randn(4, 5, dtype=torch.float64) for _ in range(2)]
    small = FrozenPrefix(max_bytes=8 * 4 * 5)  # one recorded output's worth
    model = toy()
    for _ in range(2):
        assert_equal(run(model, batches, small), run(model, batches))
    assert small.paths == [] and small.records == {} and small.bytes == 0
    training = FrozenPrefix()
    run(model.train(), batches, training)
    assert training.paths is None
    model = toy("a").eval()  # the first module changes: nothing before it
    check_replay(model, batches, [], None)
    model = toy(changed="none").eval()  # nothing changes: the whole forward is replayed
    check_replay(model, batches, [""], None)


def test_prefixes_sharing_a_budget_hold_their_recordings_together():
    """Recorded inputs and outputs count; the prefix whose recording passes the shared budget is dropped (its bytes
    back to the budget), the others keep theirs."""
    batches = [torch.randn(4, 5, dtype=torch.float64) for _ in range(2)]
    one = 3 * 8 * 4 * 5  # a batch's inputs and the outputs of a and b recorded for it
    budget = ByteBudget(3 * one)
    first, second = FrozenPrefix(budget), FrozenPrefix(budget)
    model = toy()
    assert_equal(run(model, batches, first), run(model, batches))
    assert first.bytes == budget.used == 2 * one and sorted(first.records) == [0, 1]
    assert_equal(run(model, batches, second), run(model, batches))  # its second record passes 3 batches' worth
    assert second.paths == [] and second.bytes == 0 and budget.used == 2 * one and sorted(first.records) == [0, 1]
    assert_equal(run(model, batches, first), run(model, batches))  # still replayed


def test_evaluator_replays_the_frozen_layers_with_the_same_accuracies():
    bb = ToyBackbone()
    task = toy_task(n=60)
    task.loaders["val"] = task.loaders["train"]  # 60 examples: 4 batches of 16
    g = torch.Generator().manual_seed(2)
    tv = TaskVector({n: torch.randn(p.shape, generator=g, dtype=p.dtype) for n, p in bb.model.named_parameters()
                     if n.startswith("2.")}, {**bb.meta(), "regime": "nonlinear", "task": "toy", "method": "test"})
    model = apply(bb, tv, 0.5)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["2.weight", "2.bias"]
    alphas = [0.0, 0.5, 1.0, 1.5]
    cache = {}
    replayed = Evaluator(bb, [task], "val", batch_size=16, cache=cache).sweep(tv, alphas)
    assert replayed == Evaluator(bb, [task], "val", batch_size=16, prefix_bytes=0).sweep(tv, alphas)
    (prefix,) = [v for k, v in cache.items() if k[0] == "prefix"]
    assert prefix.paths == ["0", "1"] and sorted(prefix.records) == [0, 1, 2, 3]
