"""tak.linearize picks the fast path (tak.models dual layers) for the supported models, and it computes
the same function, gradients and task vectors as the generic torch.func.jvp path."""
import copy

import pytest
import torch
from torch import nn

import tak
from tak.linearize import DualLinearizedModel, LinearizedModel
from tests.test_linearize import CASES
from tests.util import rel_err

# transformers computes in fp32 even for float64 inputs (~1e-7 relative) T5's and the decoders' RMSNorm, DeBERTa (v1)'s
# LayerNorm and (transformers 5) the rotation of ModernBERT's Q and K.
TOLERANCE = {"vit": 1e-10, "timm_siglip": 1e-10, "hf_clip": 1e-10, "hf_siglip": 1e-10, "dinov2": 1e-10,
             "dinov2_registers": 1e-10, "llama": 1e-5, "gpt2": 1e-10, "minilm": 1e-10, "t5": 1e-5, "roberta": 1e-10,
             "roberta_classifier": 1e-10, "t5_classifier": 1e-5,
             "deberta": 1e-10, "deberta_v1": 1e-5, "mpnet": 1e-10, "modernbert": 1e-5,
             "gemma2": 1e-5, "gemma3": 1e-5, "phi3": 1e-5,
             "gpt_neox": 1e-10}


def grad(tau):
    """τ's gradient, zeros for one the forward never reads (DINOv2's mask_token)."""
    return torch.zeros_like(tau) if tau.grad is None else tau.grad


@pytest.mark.parametrize("case", list(TOLERANCE))
def test_fast_path_equals_generic_path(case):
    model, inputs, outputs = CASES[case]()
    fast, generic = tak.linearize(model), tak.linearize(model, fast=False)
    assert isinstance(fast, DualLinearizedModel) and isinstance(generic, LinearizedModel)
    taus = {name: 0.05 * torch.randn_like(t) for name, t in generic.task_vector().items()}
    fast.load_task_vector(taus)
    generic.load_task_vector(fast.task_vector())  # task vectors are interchangeable
    args, kwargs = inputs()
    got, want = outputs(fast(*args, **kwargs)), outputs(generic(*args, **kwargs))
    for g, w in zip(got, want):
        assert rel_err(g, w) < TOLERANCE[case]
    sum((g**2).sum() for g in got).backward()
    sum((w**2).sum() for w in want).backward()
    fast_grads = {n: grad(p) for n, p in fast.dual.named_taus().items()}
    names = [name for name, _ in generic._taus()]
    # one vector: some gradients are exactly 0 in exact arithmetic (attention key biases), rounding noise here
    assert rel_err(torch.cat([fast_grads[n].reshape(-1) for n in names]),
                   torch.cat([grad(tau).reshape(-1) for _, tau in generic._taus()])) < TOLERANCE[case] * 10
    with fast.scaled(0.5), generic.scaled(0.5):
        assert rel_err(outputs(fast(*args, **kwargs))[0], outputs(generic(*args, **kwargs))[0]) < TOLERANCE[case]
    base = fast.base_parameters()
    for name, p in model.named_parameters():
        assert torch.equal(base[name], p)  # θ0 is the model's, held in a private copy


@pytest.mark.parametrize("case, trainable", [("minilm", "pooler.*"), ("t5", "decoder.block.*")])
def test_outputs_no_tau_reaches_pair_with_their_own_primal(case, trainable):
    """τ of the pooler alone leaves the hidden states without a tangent (the encoder's output, for τ of the
    decoder): each output is still its own primal (+ its tangent), as on the generic path."""
    model, inputs, outputs = CASES[case]()
    fast, generic = tak.linearize(model, trainable=trainable), tak.linearize(model, trainable=trainable, fast=False)
    taus = {name: 0.05 * torch.randn_like(t) for name, t in generic.task_vector().items()}
    fast.load_task_vector(taus)
    generic.load_task_vector(taus)
    args, kwargs = inputs()
    got, want = fast(*args, **kwargs), generic(*args, **kwargs)
    keys = ["last_hidden_state", "pooler_output"] if case == "minilm" else ["logits", "encoder_last_hidden_state"]
    for k in keys:
        assert rel_err(got[k], want[k]) < TOLERANCE[case], k


@pytest.mark.parametrize("fast", [True, False])
def test_each_module_keeps_its_train_or_eval_mode(fast):
    """model.train() with its dropout modules in eval (and no attention dropout): the linearization at τ = 0 is
    the model's deterministic function, on both paths."""
    model, inputs, outputs = CASES["minilm"]()
    model.config.attention_probs_dropout_prob = 0.0
    for layer in model.encoder.layer:
        layer.attention.self.dropout.p = 0.0
        if hasattr(layer.attention.self, "dropout_prob"):  # transformers 4.x's SDPA attention reads this instead
            layer.attention.self.dropout_prob = 0.0
    model.train()
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.eval()
    lin = tak.linearize(model, fast=fast)
    assert lin.training and isinstance(lin, DualLinearizedModel) == fast
    args, kwargs = inputs()
    with torch.no_grad():
        assert rel_err(outputs(lin(*args, **kwargs))[0], outputs(model(*args, **kwargs))[0]) < TOLERANCE["minilm"]


def test_fast_path_keeps_theta0_when_the_model_changes():
    model, inputs, outputs = CASES["vit"]()
    lin = tak.linearize(model)
    args, kwargs = inputs()
    before = outputs(lin(*args, **kwargs))[0]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    assert torch.equal(outputs(lin(*args, **kwargs))[0], before)


def test_longrope_on_both_paths():
    """Phi-3's longrope, whose forward swaps its rotary table in place in transformers 5: the generic path runs it (on
    copies of the buffers), equal to the fast path below the original context and past it where the fast path
    refuses; θ0's own table stays as it was."""
    import transformers
    if tuple(int(n) for n in transformers.__version__.split(".")[:2]) < (4, 48):
        pytest.skip("transformers < 4.48: Phi-3's own longrope classes, refused on the fast path")
    from tests.test_linearize import decoder_case
    longrope = {"type": "longrope", "short_factor": [1.5], "long_factor": [3.0]}  # rotary on 2 of 4 dims
    model, inputs, outputs = decoder_case("Phi3", "Phi3ForCausalLM", partial_rotary_factor=0.5, rope_scaling=longrope,
                                          original_max_position_embeddings=8, max_position_embeddings=32)
    fast, generic = tak.linearize(model), tak.linearize(model, fast=False)
    generic.load_task_vector({name: 0.05 * torch.randn_like(t) for name, t in generic.task_vector().items()})
    fast.load_task_vector(generic.task_vector())
    args, kwargs = inputs()
    assert rel_err(outputs(fast(*args, **kwargs))[0], outputs(generic(*args, **kwargs))[0]) < TOLERANCE["phi3"]
    table = generic._base.model.rotary_emb.inv_freq.clone()
    far = {**kwargs, "position_ids": torch.arange(8, 14)[None]}  # 6 tokens past the original context of 8
    with pytest.raises(NotImplementedError, match="positions up to 14 pass original_max_position_embeddings=8"):
        fast(*args, **far)
    assert torch.isfinite(outputs(generic(*args, **far))[0]).all()
    assert torch.equal(generic._base.model.rotary_emb.inv_freq, table)


def test_unsupported_models_fall_back_with_a_warning():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    with pytest.warns(UserWarning, match="generic torch.func.jvp path.*Sequential"):
        lin = tak.linearize(model)
    assert isinstance(lin, LinearizedModel)
    with pytest.raises(NotImplementedError, match="Sequential"):
        tak.linearize(model, fast=True)


def test_fast_path_module_methods():
    model, inputs, outputs = CASES["vit"]()
    lin = tak.linearize(model).eval()
    assert not lin.training and not lin._base.training
    lin.train()
    assert lin._base.training and lin.dual.training
    lin.load_task_vector({n: 0.1 * torch.randn_like(t) for n, t in lin.task_vector().items()})
    args, kwargs = inputs()
    want = outputs(lin.eval()(*args, **kwargs))[0]
    got = outputs(lin.to(torch.float32)(*(a.float() for a in args), **kwargs))[0]
    assert got.dtype == torch.float32 and lin.base_parameters()["proj"].dtype == torch.float32
    assert rel_err(got, want) < 1e-5
    for held in (lin, copy.deepcopy(lin)):  # θ0 once: the dual layers' θ0 are views of the private copy's parameters
        base = {p.untyped_storage().data_ptr() for p in held._base.parameters()}
        assert all(b.untyped_storage().data_ptr() in base for b in held.dual.buffers())
    assert list(lin.state_dict()) == [f"dual.{n}" for n, _ in lin.dual.named_parameters()]  # τ alone
    with pytest.raises(ValueError, match=r"differentiates in τ only, and an input requires grad.*fast=False"):
        lin(args[0].float().requires_grad_())


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("case", list(TOLERANCE))
def test_fast_path_on_the_kernels_in_float32(case, device, use_backend):
    """The fast path in float32 with every kfac_kernels op on its Triton kernel (interpreted on a CPU,
    compiled on a GPU) against the generic path in float64 on the CPU: outputs and τ-gradients. (MiniLM
    cut to one layer: interpreted GEMMs are slow.)"""
    use_backend("triton")
    model64, inputs, outputs = CASES[case]()
    if case == "minilm":
        model64 = copy.deepcopy(model64)
        model64.encoder.layer = model64.encoder.layer[:1]
        model64.config.num_hidden_layers = 1
    fast, generic = tak.linearize(copy.deepcopy(model64).float().to(device)), tak.linearize(model64, fast=False)
    taus = {name: 0.05 * torch.randn_like(t) for name, t in generic.task_vector().items()}
    generic.load_task_vector(taus)
    fast.load_task_vector({name: t.float() for name, t in taus.items()})
    args, kwargs = inputs()
    args32 = [a.to(device, torch.float32) if a.is_floating_point() else a.to(device) for a in args]
    kwargs32 = {k: v.to(device) for k, v in kwargs.items()}
    got, want = outputs(fast(*args32, **kwargs32)), outputs(generic(*args, **kwargs))
    for g, w in zip(got, want):
        assert g.dtype == torch.float32 and rel_err(g, w) < 1e-4
    sum((g.double() ** 2).sum() for g in got).backward()
    sum((w ** 2).sum() for w in want).backward()
    fast_grads = {n: grad(p) for n, p in fast.dual.named_taus().items()}
    names = [name for name, _ in generic._taus()]
    assert rel_err(torch.cat([fast_grads[n].reshape(-1) for n in names]),
                   torch.cat([grad(tau).reshape(-1) for _, tau in generic._taus()])) < 1e-3
