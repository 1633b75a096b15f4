"""tak.nn dual layers against torch.func.jvp of the PyTorch reference layers in float64 (odd shapes),
and their τ-gradients against autograd of that jvp."""
import importlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jvp
from torch.nn.attention import SDPBackend, sdpa_kernel

import tak.nn as tnn

from .conftest import KERNEL_BACKENDS
from .util import TOL, rel_err

TOL64 = 1e-10


def randomize_tau(layer, dtype=torch.float64):
    """Fresh random τ for every tangent of ``layer``; returns {name: τ} detached, in ``dtype``."""
    with torch.no_grad():
        for t in layer.parameters():
            t.normal_()
    return {n: t.detach().to(dtype) for n, t in layer.named_parameters()}


def reference_jvp(ref, taus, x, dx, *, prefix="tau."):
    """(y, dy) = jvp of ``ref`` (an nn.Module) at its parameters and x, along τ (keys prefixed) and dx;
    the τ leaves require grad so that dy is differentiable in them."""
    params = dict(ref.named_parameters())
    leaves = {n.removeprefix(prefix): t.clone().requires_grad_() for n, t in taus.items()}
    tangents = {n: leaves.get(n, torch.zeros_like(p)) for n, p in params.items()}
    dx = torch.zeros_like(x) if dx is None else dx
    y, dy = jvp(lambda p, x: functional_call(ref, p, (x,)), (params, x), (tangents, dx))
    return y, dy, leaves


def check(layer, ref, x, dx=None, tol=TOL64):
    """Dual layer vs jvp of ``ref``: primal, tangent, and the τ-gradients of ⟨dy, u⟩."""
    taus = randomize_tau(layer)
    layer.zero_grad(set_to_none=True)
    y, dy = layer(x, dx)
    y_ref, dy_ref, leaves = reference_jvp(ref, taus, x.double(), None if dx is None else dx.double())
    assert not y.requires_grad, "the primal of a linearized layer is a constant"
    assert rel_err(y, y_ref) <= tol and rel_err(dy, dy_ref) <= tol, (rel_err(y, y_ref), rel_err(dy, dy_ref))
    u = torch.randn_like(dy_ref)
    (dy * u.to(dy.dtype)).sum().backward()
    (dy_ref * u).sum().backward()
    for name, t in layer.tau.items():
        assert t.grad is not None and rel_err(t.grad, leaves[name].grad) <= tol, name
    for name, b in layer.named_buffers():
        assert b is not None and not b.requires_grad, name


def rand(*shape, dtype=torch.float64):
    return torch.randn(*shape, dtype=dtype)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("with_dx", [True, False])
def test_linear(bias, with_dx):
    ref = nn.Linear(13, 7, bias=bias).double()
    layer = tnn.DualLinear(ref.weight, ref.bias)
    check(layer, ref, rand(2, 5, 13), rand(2, 5, 13) if with_dx else None)


@pytest.mark.parametrize("frozen", ["weight", "bias"])
def test_linear_frozen_parameter(frozen):
    ref = nn.Linear(9, 4).double()
    layer = tnn.DualLinear(ref.weight, ref.bias)
    layer.freeze(frozen)
    assert [n for n, _ in layer.named_parameters()] == [f"tau.{'bias' if frozen == 'weight' else 'weight'}"]
    check(layer, ref, rand(3, 9), rand(3, 9))
    check(layer, ref, rand(1, 9))


@pytest.mark.parametrize("with_dx", [True, False])
def test_conv1d_is_hugging_faces(with_dx):
    """Hugging Face's Conv1D (x W + b, W (d_in, d_out)): τ in the weight's own shape."""
    conv1d = pytest.importorskip("transformers.pytorch_utils").Conv1D
    ref = conv1d(7, 13).double()  # (nf = d_out, nx = d_in)
    nn.init.normal_(ref.bias)
    layer = tnn.DualConv1D(ref.weight, ref.bias)
    assert layer.tau["weight"].shape == (13, 7)
    check(layer, ref, rand(2, 5, 13), rand(2, 5, 13) if with_dx else None)


def test_patch_embedding_is_the_strided_convolution():
    conv = nn.Conv2d(3, 10, kernel_size=(4, 3), stride=(4, 3), bias=True).double()
    layer = tnn.DualPatchEmbedding(conv.weight, conv.bias)

    class Ref(nn.Module):  # the convolution's output as tokens (B, N, d)
        def __init__(self):
            super().__init__()
            self.c = conv

        def forward(self, x):
            return self.c(x).flatten(2).transpose(1, 2)

    ref = Ref()
    taus = {f"tau.c.{n.removeprefix('tau.')}": t for n, t in randomize_tau(layer).items()}
    x = rand(2, 3, 13, 11)  # 3 × 3 patches, remainders dropped
    y, dy = layer(x)
    y_ref, dy_ref, _ = reference_jvp(ref, taus, x, None, prefix="tau.")
    assert y.shape == (2, 9, 10)
    assert rel_err(y, y_ref) <= TOL64 and rel_err(dy, dy_ref) <= TOL64


def test_embedding():
    ref = nn.Embedding(11, 6).double()
    layer = tnn.DualEmbedding(ref.weight)
    taus = randomize_tau(layer)
    ids = torch.randint(0, 11, (3, 5))
    y, dy = layer(ids)
    assert torch.equal(y, ref(ids)) and torch.equal(dy, F.embedding(ids, taus["tau.weight"]))


class Scale(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.gamma = nn.Parameter(torch.randn(d, dtype=torch.float64))

    def forward(self, x):
        return x * self.gamma


@pytest.mark.parametrize("with_dx", [True, False])
def test_layer_scale(with_dx):
    ref = Scale(13)
    check(tnn.DualLayerScale(ref.gamma), ref, rand(2, 7, 13), rand(2, 7, 13) if with_dx else None)


@pytest.mark.parametrize("affine", [True, False])
def test_layer_norm(affine):
    ref = nn.LayerNorm(13, eps=1e-5, elementwise_affine=affine).double()
    if affine:
        with torch.no_grad():
            ref.weight.normal_(), ref.bias.normal_()
    layer = tnn.DualLayerNorm(ref.weight, ref.bias, ref.eps)
    x = 3 * rand(2, 7, 13) + 1
    if affine:
        check(layer, ref, x, rand(2, 7, 13))
        check(layer, ref, x)
    else:
        y, dy = layer(x, dx := rand(2, 7, 13))
        y_ref, dy_ref = jvp(ref, (x,), (dx,))
        assert rel_err(y, y_ref) <= TOL64 and rel_err(dy, dy_ref) <= TOL64


class RMSNorm(nn.Module):
    """Reference: y = γ x (mean(x²) + eps)^(-1/2)."""

    def __init__(self, d, eps):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.randn(d, dtype=torch.float64)), eps

    def forward(self, x):
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)


def test_rms_norm():
    ref = RMSNorm(11, 1e-6)
    layer = tnn.DualRMSNorm(ref.weight, ref.eps)
    check(layer, ref, rand(3, 5, 11), rand(3, 5, 11))
    check(layer, ref, rand(1, 11))


@pytest.mark.parametrize("eps", [1e-6, 0.3])
def test_rms_norm_without_tangents_uses_its_eps(eps):
    """The primal-only path (no dx, no dγ) of rms_norm normalizes with the eps it is given, with and without γ."""
    from tak.nn.norm import rms_norm
    torch.manual_seed(0)
    x, weight = rand(3, 4, 9) * 0.2, rand(9)
    ref = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    y, dy = rms_norm(x, None, weight, None, eps)
    assert dy is None and rel_err(y, weight * ref) <= TOL64
    y, _ = rms_norm(x, None, None, None, eps)
    assert rel_err(y, ref) <= TOL64


class Fn(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


@pytest.mark.parametrize("kind, ref", [
    ("gelu", lambda x: F.gelu(x)),
    ("gelu_tanh", lambda x: F.gelu(x, approximate="tanh")),
    ("quick_gelu", lambda x: x * torch.sigmoid(1.702 * x)),
    ("relu", F.relu),
    ("tanh", torch.tanh),
])
def test_activation(kind, ref):
    dual = tnn.DualActivation(kind)
    x, dx = 3 * rand(4, 9, 7), rand(4, 9, 7).requires_grad_()
    y, dy = dual(x, dx)
    y_ref, dy_ref = jvp(ref, (x,), (dx,))
    assert not y.requires_grad
    assert rel_err(y, y_ref) <= TOL64 and rel_err(dy, dy_ref) <= TOL64
    u = torch.randn_like(dy)
    g, = torch.autograd.grad((dy * u).sum(), dx)
    g_ref, = torch.autograd.grad((dy_ref * u).sum(), dx)
    assert rel_err(g, g_ref) <= TOL64
    assert dual(x)[1] is None and torch.equal(dual(x)[0], y)


def test_modes():
    ref = nn.Linear(6, 5).double()
    layer = tnn.DualLinear(ref.weight, ref.bias)
    taus = randomize_tau(layer)
    x = rand(4, 6)
    tnn.set_mode(layer, "primal")
    y, dy = layer(x)
    assert dy is None and rel_err(y, ref(x)) <= TOL64
    dx = rand(4, 6)
    assert rel_err(layer(x, dx)[1], dx @ ref.weight.T) <= TOL64  # the JVP in x alone
    tnn.set_mode(layer, "merged")
    y, dy = layer(x)
    assert dy is None and y.requires_grad
    assert rel_err(y, F.linear(x, ref.weight + taus["tau.weight"], ref.bias + taus["tau.bias"])) <= TOL64
    y.sum().backward()
    assert layer.tau["weight"].grad is not None
    with pytest.raises(ValueError, match="mode"):
        tnn.set_mode(layer, "nonlinear")
    assert [n for n, _ in layer.named_parameters()] == ["tau.weight", "tau.bias"]


def math_attention(q, k, v, mask, bias, scale, softcap=None):
    """softmax(Q Kᵀ·scale + bias, masked by −inf) V, materialized; the products capped to c·tanh(x / c) for a
    ``softcap`` c."""
    s = q @ k.transpose(-1, -2) * scale
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    if bias is not None:
        s = s + bias
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return torch.softmax(s, -1) @ v


def padding_mask(B, Lk, lengths):
    """(B, 1, 1, Lk) bool, True for the first lengths[b] keys."""
    return (torch.arange(Lk)[None, :] < torch.tensor(lengths)[:, None])[:, None, None, :]


@pytest.mark.parametrize("softcap", [None, 0.8])
@pytest.mark.parametrize("block_size", [4, 256])
@pytest.mark.parametrize("case", ["full", "mask_bias", "causal", "only_dv", "only_dbias"])
def test_dual_attention(case, block_size, softcap):
    B, H, Lq, Lk, D, Dv = 2, 3, 5, 11, 4, 6
    q, k, v = rand(B, H, Lq, D), rand(B, H, Lk, D), rand(B, H, Lk, Dv)
    dq, dk, dv = (t.clone().requires_grad_() for t in (rand(B, H, Lq, D), rand(B, H, Lk, D), rand(B, H, Lk, Dv)))
    mask = bias = dbias = None
    if case in ("mask_bias", "only_dbias"):
        mask = padding_mask(B, Lk, [Lk, 3])
        bias, dbias = rand(1, H, Lq, Lk), rand(1, H, Lq, Lk).requires_grad_()
    if case == "causal":
        mask = torch.ones(Lq, Lk, dtype=torch.bool).tril(Lk - Lq)
    if case == "only_dv":
        dq = dk = None
    if case == "only_dbias":
        dq = dk = dv = None
    scale = 0.37
    o, do = tnn.dual_attention(q, k, v, dq, dk, dv, mask, bias, dbias, scale=scale, softcap=softcap,
                               block_size=block_size)
    b = torch.zeros((), dtype=q.dtype) if bias is None else bias  # a zero bias for the reference
    tangents = tuple(torch.zeros_like(p) if t is None else t for t, p in ((dq, q), (dk, k), (dv, v), (dbias, b)))
    o_ref, do_ref = jvp(lambda q, k, v, b: math_attention(q, k, v, mask, b, scale, softcap), (q, k, v, b), tangents)
    with torch.no_grad():
        plain, none = tnn.dual_attention(q, k, v, None, None, None, mask, bias, scale=scale, softcap=softcap)
    assert none is None and rel_err(plain, o_ref) <= TOL64
    assert not o.requires_grad
    assert rel_err(o, o_ref) <= TOL64 and rel_err(do, do_ref) <= TOL64
    u = torch.randn_like(do)
    leaves = [t for t in (dq, dk, dv, dbias) if t is not None]
    grads = torch.autograd.grad((do * u).sum(), leaves)
    grads_ref = torch.autograd.grad((do_ref * u).sum(), leaves)
    for g, g_ref in zip(grads, grads_ref):
        assert g.shape == g_ref.shape and rel_err(g, g_ref) <= TOL64


@pytest.mark.parametrize("block_size", [2, 256])
def test_dual_attention_left_padding_as_minus_inf_bias(block_size):
    """Left padding as an additive −∞ bias: with 2-key chunks a row's first chunks hold only −∞ scores, which
    must give no NaN (exp(−∞ − (−∞))); O, Ȯ and the tangents' gradients match float64 math attention's jvp."""
    B, H, Lq, Lk, D = 2, 2, 5, 7, 4
    q, k, v = rand(B, H, Lq, D), rand(B, H, Lk, D), rand(B, H, Lk, D)
    dq, dk, dv = (rand(*t.shape).requires_grad_() for t in (q, k, v))
    bias = torch.zeros(B, 1, 1, Lk, dtype=torch.float64)
    bias[0, ..., :3] = float("-inf")  # example 0: three padding keys on the left
    dbias = rand(B, 1, 1, Lk).requires_grad_()
    o, do = tnn.dual_attention(q, k, v, dq, dk, dv, None, bias, dbias, scale=0.37, block_size=block_size)
    o_ref, do_ref = jvp(lambda q, k, v, b: math_attention(q, k, v, None, b, 0.37), (q, k, v, bias), (dq, dk, dv, dbias))
    assert torch.isfinite(o).all() and torch.isfinite(do).all()
    assert rel_err(o, o_ref) <= TOL64 and rel_err(do, do_ref) <= TOL64
    u = torch.randn_like(do)
    leaves = [dq, dk, dv, dbias]
    for g, g_ref in zip(torch.autograd.grad((do * u).sum(), leaves), torch.autograd.grad((do_ref * u).sum(), leaves)):
        assert rel_err(g, g_ref) <= TOL64


@pytest.mark.parametrize("fused", [False, *(["kernel"] if KERNEL_BACKENDS else [])])
def test_a_query_row_with_no_key_attends_to_all_as_the_models_additive_masks_do(fused, use_backend, monkeypatch):
    """A row that the mask leaves no key (an all-zero attention_mask row; a left-padded decoder's causal rows): O is
    the average of V and Ȯ that of V̇, as the original models' finfo.min masks give it (equal scores, whatever Q and
    K), on the online path and the fused kernel's (its 0 for such rows replaced); other rows as math attention."""
    if fused:
        use_backend("triton")
        monkeypatch.setattr(importlib.import_module("tak.nn.attention"), "_fused", lambda q, dropout: True)
    dtype = torch.float32 if fused else torch.float64
    B, H, Lq, Lk, D = 2, 2, 5, 7, 4
    q, k, v = (rand(B, H, n, D, dtype=dtype) for n in (Lq, Lk, Lk))
    dq, dk, dv = (rand(*t.shape, dtype=dtype).requires_grad_() for t in (q, k, v))
    mask = padding_mask(B, Lk, [Lk, 0]) & torch.ones(Lq, Lk, dtype=torch.bool).tril(Lk - Lq)  # example 1: no key
    o, do = tnn.dual_attention(q, k, v, dq, dk, dv, mask, scale=0.37)
    none = ~mask.any(-1, keepdim=True)
    o_ref, do_ref = jvp(lambda q, k, v: torch.where(none, v.mean(-2, keepdim=True),
                                                    math_attention(q, k, v, mask | none, None, 0.37)),
                        tuple(t.double() for t in (q, k, v)), tuple(t.double() for t in (dq, dk, dv)))
    tol = TOL64 if dtype == torch.float64 else 1e-5
    assert rel_err(o[1], v[1].mean(-2, keepdim=True).expand_as(o[1])) <= tol
    assert rel_err(o, o_ref) <= tol and rel_err(do, do_ref) <= tol
    u = torch.randn_like(do_ref)
    for g, g_ref in zip(torch.autograd.grad((do * u.to(dtype)).sum(), [dq, dk, dv]),
                        torch.autograd.grad((do_ref * u).sum(), [dq, dk, dv])):
        assert rel_err(g, g_ref) <= tol


@pytest.mark.parametrize("softcap", [None, 0.8])
@pytest.mark.parametrize("case", ["full", "mask_bias"])
def test_dual_attention_dropout_is_one_mask_on_the_weights_of_primal_and_tangent(case, softcap, replayed_dropout):
    B, H, Lq, Lk, D = 2, 3, 5, 7, 4
    q, k, v = rand(B, H, Lq, D), rand(B, H, Lk, D), rand(B, H, Lk, D)
    dq, dk, dv = (rand(*t.shape).requires_grad_() for t in (q, k, v))
    mask, bias, dbias = None, torch.zeros((), dtype=q.dtype), None
    if case == "mask_bias":
        mask, bias, dbias = padding_mask(B, Lk, [Lk, 3]), rand(1, H, Lq, Lk), rand(1, H, Lq, Lk).requires_grad_()
    o, do = tnn.dual_attention(q, k, v, dq, dk, dv, mask, bias, dbias, scale=0.37, dropout=0.3, softcap=softcap)
    assert len(replayed_dropout.masks) == 1 and not replayed_dropout.masks[0].all()
    replayed_dropout()

    def dropped(q, k, v, b):
        s = q @ k.transpose(-1, -2) * 0.37
        s = (s if softcap is None else softcap * torch.tanh(s / softcap)) + b
        s = s if mask is None else s.masked_fill(~mask, float("-inf"))
        return F.dropout(torch.softmax(s, -1), 0.3) @ v

    zero = torch.zeros_like(bias)
    o_ref, do_ref = jvp(dropped, (q, k, v, bias), (dq, dk, dv, zero if dbias is None else dbias))
    assert not o.requires_grad and rel_err(o, o_ref) <= TOL64 and rel_err(do, do_ref) <= TOL64
    u = torch.randn_like(do)
    leaves = [t for t in (dq, dk, dv, dbias) if t is not None]
    for g, g_ref in zip(torch.autograd.grad((do * u).sum(), leaves), torch.autograd.grad((do_ref * u).sum(), leaves)):
        assert rel_err(g, g_ref) <= TOL64
    layer = tnn.DualAttention(H, tnn.DualLinear(rand(6, 12)), qkv=tnn.DualLinear(rand(36, 6)), dropout=0.3)
    x = rand(B, Lq, 6)
    replayed_dropout()
    layer(x, rand(B, Lq, 6))
    assert len(replayed_dropout.masks) == 1  # a DualAttention drops out in training only
    layer.eval()(x, rand(B, Lq, 6))
    assert len(replayed_dropout.masks) == 1


def test_dual_dropout_shares_its_mask_in_training_and_is_the_identity_in_eval():
    x, dx = rand(200, 7), rand(200, 7).requires_grad_()
    drop = tnn.DualDropout(0.25)
    y, dy = drop(x, dx)
    kept = y != 0
    assert torch.equal(kept, dy != 0) and 0.6 < kept.double().mean() < 0.9
    assert torch.allclose(y[kept], x[kept] / 0.75) and torch.allclose(dy[kept], dx[kept] / 0.75)
    dy.sum().backward()
    assert torch.equal(dx.grad, kept.double() / 0.75)
    assert drop.eval()(x, dx) == (x, dx) and tnn.DualDropout(0.0)(x, dx) == (x, dx)
    assert not tnn.DualDropout(1.0)(x, dx)[1].any()
    with pytest.raises(ValueError, match=r"DualDropout: p must be in \[0, 1\], got 1.5"):
        tnn.DualDropout(1.5)


def test_dual_attention_fp32_and_primal_path():
    B, H, L, D = 3, 2, 19, 8
    q, k, v, dq, dk, dv = (rand(B, H, L, D) for _ in range(6))
    mask = padding_mask(B, L, [19, 7, 1])
    o, do = tnn.dual_attention(*(t.float() for t in (q, k, v, dq, dk, dv)), mask, block_size=8)
    o_ref, do_ref = jvp(lambda q, k, v: math_attention(q, k, v, mask, None, D ** -0.5), (q, k, v), (dq, dk, dv))
    assert o.dtype == do.dtype == torch.float32
    assert rel_err(o, o_ref) <= TOL[torch.float32] and rel_err(do, do_ref) <= TOL[torch.float32]
    plain, none = tnn.dual_attention(q, k, v, None, None, None, mask)
    assert none is None and rel_err(plain, o_ref) <= TOL64


def test_dual_attention_refuses_a_primal_that_requires_grad():
    q = rand(1, 1, 3, 2).requires_grad_()
    with pytest.raises(ValueError, match="q requires grad"):
        tnn.dual_attention(q, rand(1, 1, 3, 2), rand(1, 1, 3, 2), rand(1, 1, 3, 2), None, None)


class MHA(nn.Module):
    """nn.MultiheadAttention (fused in_proj, batch first) as self-attention with a key padding mask."""

    def __init__(self, d, heads):
        super().__init__()
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True).double()
        self.key_padding_mask = None

    def forward(self, x):
        return self.attn(x, x, x, need_weights=False, key_padding_mask=self.key_padding_mask)[0]


def test_attention_module_matches_multihead_attention():
    d, heads = 12, 3
    ref = MHA(d, heads)
    with torch.no_grad():
        ref.attn.in_proj_bias.normal_(), ref.attn.out_proj.bias.normal_()
    ref.key_padding_mask = ~padding_mask(2, 7, [7, 4])[:, 0, 0]  # True = ignore
    a = ref.attn
    layer = tnn.DualAttention(heads, tnn.DualLinear(a.out_proj.weight, a.out_proj.bias),
                              qkv=tnn.DualLinear(a.in_proj_weight, a.in_proj_bias))
    names = {"attn.in_proj_weight": "qkv.tau.weight", "attn.in_proj_bias": "qkv.tau.bias",
             "attn.out_proj.weight": "out.tau.weight", "attn.out_proj.bias": "out.tau.bias"}
    dual_taus = randomize_tau(layer)
    taus = {n: dual_taus[dual_name] for n, dual_name in names.items()}
    x, dx = rand(2, 7, d), rand(2, 7, d)
    y, dy = layer(x, dx, mask=padding_mask(2, 7, [7, 4]))
    with sdpa_kernel(SDPBackend.MATH):  # jvp has no rule for the fused kernels
        y_ref, dy_ref, leaves = reference_jvp(ref, taus, x, dx, prefix="")
    assert rel_err(y, y_ref) <= TOL64 and rel_err(dy, dy_ref) <= TOL64
    u = torch.randn_like(dy)
    (dy * u).sum().backward()
    (dy_ref * u).sum().backward()
    for n, dual_name in names.items():
        assert rel_err(layer.get_parameter(dual_name).grad, leaves[n].grad) <= TOL64, n
