"""How a layer's input holds the batch's examples is measured, not guessed from shapes: sequence-first
layers (T, N, d) give the factors of their batch-first twins even when T = N, and 2-D inputs of flattened
tokens, (N·T, d) or (T·N, d), are grouped by example (which per-example sums, EK-FAC and tokens="reduce"
need). Fits with exact probes in float64 on both layouts must agree to rounding. Inputs the batch shares
(DeBERTa's relative embeddings) give the fits of the examples one at a time."""
import warnings

import pytest
import torch
from torch import nn

from tak.curvature import fit_diagonal, fit_ekfac, fit_kfac
from tests.util import rel_err

D = 8


class Encoder(nn.Module):
    """A transformer encoder layer (sequence-first when not ``batch_first``, as PyTorch's default) and a
    mean-pooled head; the input is batch-first either way."""

    def __init__(self, batch_first: bool):
        super().__init__()
        self.enc = nn.TransformerEncoderLayer(D, 2, 16, dropout=0.0, batch_first=batch_first)
        self.head = nn.Linear(D, 3)
        self.batch_first = batch_first

    def forward(self, x):
        h = self.enc(x) if self.batch_first else self.enc(x.transpose(0, 1)).transpose(0, 1)
        return self.head(h).mean(1)


class TokenMLP(nn.Module):
    """A token-wise MLP on (N, T, 4) inputs, run on the tokens as they come or flattened to 2-D rows
    example by example ("example": (N·T, 4)) or token by token ("token": (T·N, 4))."""

    def __init__(self, flatten: str | None):
        super().__init__()
        self.a, self.b, self.flatten = nn.Linear(4, 6), nn.Linear(6, 3), flatten

    def forward(self, x):
        n, t, d = x.shape
        if self.flatten is None:
            return self.b(torch.tanh(self.a(x))).mean(1)
        rows = x.reshape(n * t, d) if self.flatten == "example" else x.transpose(0, 1).reshape(t * n, d)
        y = self.b(torch.tanh(self.a(rows)))
        y = y.reshape(n, t, 3) if self.flatten == "example" else y.reshape(t, n, 3).transpose(0, 1)
        return y.mean(1)


def twins(make, *variants):
    torch.manual_seed(0)
    models = [make(v).double() for v in variants]
    for m in models[1:]:
        m.load_state_dict(models[0].state_dict())
    return models


def assert_same_factors(f, g, *attrs):
    assert list(f) == list(g)
    for name in f:
        for attr in attrs:
            if hasattr(f[name], attr):
                assert rel_err(getattr(f[name], attr), getattr(g[name], attr)) < 1e-6, (name, attr)


@pytest.mark.parametrize("tokens", [4, 5])
def test_sequence_first_layers_give_the_factors_of_their_batch_first_twins(tokens):
    """N = 4 examples of T = 5 tokens, and T = N = 4, where a (4, 4, d) input looks the same both ways."""
    seq, batch = twins(Encoder, False, True)
    x = [torch.randn(4, tokens, D, dtype=torch.float64), torch.randn(3, tokens, D, dtype=torch.float64)]
    for how in ("expand", "reduce"):  # expand: with the LayerNorms' exact blocks
        assert_same_factors(fit_kfac(seq, x, exact=True, tokens=how, progress=False),
                            fit_kfac(batch, x, exact=True, tokens=how, progress=False), "A", "B")
    assert_same_factors(fit_ekfac(seq, x, exact=True, progress=False),
                        fit_ekfac(batch, x, exact=True, progress=False), "S", "B")


def test_layouts_are_measured_on_the_first_batch_of_two_examples_or_more():
    """A first batch of one example cannot show where the examples are: the layouts come from the next one, and
    the measuring forwards feed no factor."""
    seq, batch = twins(Encoder, False, True)
    x = [torch.randn(1, 4, D, dtype=torch.float64), torch.randn(4, 4, D, dtype=torch.float64)]  # then T = N = 4
    for how in ("expand", "reduce"):
        f, g = (fit_kfac(m, x, exact=True, tokens=how, progress=False) for m in (seq, batch))
        assert_same_factors(f, g, "A", "B")
        assert f.meta["n_examples"] == 5 and f.meta["n_rows"]["head"] == (5 * 4 if how == "expand" else 5)
    assert_same_factors(fit_ekfac(seq, x, exact=True, progress=False),
                        fit_ekfac(batch, x, exact=True, progress=False), "S", "B")


@pytest.mark.parametrize("order", ["example", "token"])
def test_flattened_tokens_are_grouped_by_example(order):
    flat, tokens = twins(TokenMLP, order, None)
    x = [torch.randn(3, 5, 4, dtype=torch.float64), torch.randn(2, 5, 4, dtype=torch.float64)]
    for how in ("expand", "reduce"):
        f = fit_kfac(flat, x, exact=True, tokens=how, progress=False)
        g = fit_kfac(tokens, x, exact=True, tokens=how, progress=False)
        assert_same_factors(f, g, "A", "B")
        assert f.meta["n_rows"] == g.meta["n_rows"] == ({"a": 25, "b": 25} if how == "expand" else {"a": 5, "b": 5})
    assert_same_factors(fit_ekfac(flat, x, exact=True, progress=False),
                        fit_ekfac(tokens, x, exact=True, progress=False), "S")
    assert_same_factors(fit_diagonal(flat, x, exact=True, progress=False),
                        fit_diagonal(tokens, x, exact=True, progress=False), "D")


def test_rows_that_are_not_whole_examples_are_refused():
    class ExtraRow(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 2)

        def forward(self, x):  # (N, 4) plus one learned-looking row: N + 1 rows
            return self.lin(torch.cat([x, x.mean(0, keepdim=True)]))[:-1]

    with pytest.raises(ValueError, match=r"layer 'lin': a 2-D input of 4 rows for a batch of 3 examples"):
        fit_kfac(ExtraRow(), [torch.randn(3, 4)], exact=True, progress=False)


def test_a_model_that_needs_whole_batches_falls_back_to_the_shapes():
    """An output_fn that cannot run on the first examples alone: a warning, and the shapes decide (here
    unambiguously, T = 5 tokens for N = 4 examples)."""
    seq, batch = twins(Encoder, False, True)
    x = [torch.randn(4, 5, D, dtype=torch.float64)]

    def whole_batches(model, x):
        if x.shape[0] != 4:
            raise RuntimeError("this output_fn takes batches of 4")
        return model(x)

    with pytest.warns(UserWarning, match="could not run the model on the first example.*takes batches of 4"):
        f = fit_kfac(seq, x, exact=True, output_fn=whole_batches, progress=False)
    assert_same_factors(f, fit_kfac(batch, x, exact=True, progress=False), "A", "B")



def test_a_batch_the_model_cannot_run_gets_the_models_error_alone():
    """No warning that the layouts could not be measured before the model's own error: only a batch that runs
    whole, where the fallback to the shapes is real, warns."""
    def broken(model, x):
        raise RuntimeError("this model cannot run")

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(RuntimeError, match="this model cannot run"):
            fit_kfac(nn.Linear(4, 2), [torch.randn(3, 4)], output_fn=broken, progress=False)

def deberta_and_examples(L=8):
    """A DeBERTa-v3-like encoder (its 2k = 8 relative embeddings are normalized and projected by the layers' query
    and key projections once per batch, as tensors (8, d) and (1, 8, d) all examples share) and a padded batch of
    3 examples of length L = 8 = 2k, with each example alone at its own length."""
    transformers = pytest.importorskip("transformers")
    config = transformers.DebertaV2Config(vocab_size=41, hidden_size=12, num_hidden_layers=1, num_attention_heads=2,
                                          intermediate_size=10, max_position_embeddings=16, type_vocab_size=0,
                                          relative_attention=True, position_buckets=4, pos_att_type=["p2c", "c2p"],
                                          norm_rel_ebd="layer_norm", share_att_key=True, position_biased_input=False)
    model = transformers.DebertaV2Model(config).eval()
    lengths = torch.tensor([L, 5, 2])
    mask = (torch.arange(L)[None] < lengths[:, None]).long()
    batch = {"input_ids": torch.randint(1, 41, (3, L)), "attention_mask": mask}
    alone = [{k: v[i:i + 1, :n] for k, v in batch.items()} for i, n in enumerate(lengths.tolist())]
    return model, batch, alone


def cls_output(model, batch):
    return model(**batch).last_hidden_state[:, 0]


def test_an_input_the_batch_shares_counts_once_per_example():
    """A: exactly the fits of the examples one at a time (A needs no probe), the shared rows counted once per
    example. B, the shared LayerNorm's exact block and the GGN diagonal (EK-FAC's pass in the identity basis): the
    batch's summed gradient of a shared call has the per-example fits' second moments in expectation over the
    Monte-Carlo probes (cross terms between examples vanish), here to the probes' noise (about 6% at 500 probes; the
    shared rows counted N times, or not at all, miss the LayerNorm's block by 200% or 100%)."""
    model, batch, alone = deberta_and_examples()
    fit = dict(output_fn=cls_output, mc_samples=500, probe_chunk=500, progress=False)
    together = fit_kfac(model, [batch], seed=1, **fit)
    one_by_one = fit_kfac(model, alone, seed=2, **fit)
    for name, f in together.items():
        if hasattr(f, "A"):
            assert rel_err(f.A, one_by_one[name].A) < 1e-5, name
    assert together.meta["n_rows"] == one_by_one.meta["n_rows"]
    projection, table_norm = "encoder.layer.0.attention.self.query_proj", "encoder.LayerNorm"
    for name in (projection, table_norm):
        assert rel_err(together[name].B, one_by_one[name].B) < 0.25, name
    diagonal_together = fit_diagonal(model, [batch], seed=1, **fit)
    diagonal_alone = fit_diagonal(model, alone, seed=2, **fit)
    for name in (projection, table_norm):
        assert rel_err(diagonal_together[name].D, diagonal_alone[name].D) < 0.25, name
    ekfac = fit_ekfac(model, [batch], kfac=together, seed=3, **fit)
    assert ekfac[projection].S.shape == (12, 13) and ekfac[projection].S.min() >= 0


def test_a_one_example_batch_padded_to_the_length_of_a_shared_input_keeps_them_apart():
    """One example padded to L = 2k, the shared relative embeddings' length: whether an input holds the example's
    tokens or is shared is measured on the example twice over (nothing grows with one example), so the shared rows
    are not masked by the example's padding. A equals that of the example alone at its own length."""
    model, batch, alone = deberta_and_examples()
    padded = {k: v[1:2] for k, v in batch.items()}  # length 5 of 8
    fit = dict(output_fn=cls_output, progress=False)
    together, one = fit_kfac(model, [padded], **fit), fit_kfac(model, [alone[1]], **fit)
    for name, f in together.items():
        if hasattr(f, "A"):
            assert rel_err(f.A, one[name].A) < 1e-5, name
    assert together.meta["n_rows"] == one.meta["n_rows"]


def test_learned_queries_the_batch_shares_count_once_per_example():
    """open_clip's attentional pooler (CoCa's vision tower) normalizes its learned queries (4, d) once per batch:
    A exactly, and the queries' LayerNorm block to the probes' noise, are the examples' fits one at a time."""
    open_clip_transformer = pytest.importorskip("open_clip.transformer")
    model = open_clip_transformer.VisionTransformer(image_size=(20, 17), patch_size=(7, 5), width=24, layers=1, heads=3,
                                                    mlp_ratio=2.0, output_dim=10, attentional_pool=True,
                                                    attn_pooler_queries=4, attn_pooler_heads=2).eval()
    x = torch.randn(3, 3, 20, 17)
    fit = dict(output_fn=lambda m, images: m(images), mc_samples=500, probe_chunk=500, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the pooler's own attention has separate q/k/v weights: no factors
        together, one_by_one = fit_kfac(model, [x], seed=1, **fit), fit_kfac(model, list(x.split(1)), seed=2, **fit)
    for name, f in together.items():
        if f.A.shape[0] > 1:
            assert rel_err(f.A, one_by_one[name].A) < 1e-5, name
    assert together.meta["n_rows"] == one_by_one.meta["n_rows"]
    assert rel_err(together["attn_pool.ln_q"].B, one_by_one["attn_pool.ln_q"].B) < 0.25
