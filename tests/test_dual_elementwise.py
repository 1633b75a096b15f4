"""dual_layer_norm, dual_rms_norm and dual_activation against torch.func.jvp of their definitions in
float64 (odd widths, fresh random inputs), and their tangent gradients against autograd of that jvp."""
import pytest
import torch
import torch.nn.functional as F
from torch.func import jvp

import kfac_kernels as kk
from kfac_kernels import norm

from .conftest import DEVICE
from .util import TOL, check_hvp, rel_err

ELEMENTWISE_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float64: 1e-12}


def rand(*shape, dtype=torch.float32, scale=1.0, shift=0.0):
    return (scale * torch.randn(*shape, device=DEVICE, dtype=torch.float64) + shift).to(dtype)


def layer_norm_def(x, w, b, eps):
    """y = (x − mean) / sqrt(var + eps) ⊙ w + b, written out (w, b (d,))."""
    xc = x - x.mean(-1, keepdim=True)
    return xc / torch.sqrt(xc.square().mean(-1, keepdim=True) + eps) * w + b


def rms_norm_def(x, w, b, eps):
    """y = x / sqrt(mean(x²) + eps) ⊙ w (no bias: b is ignored)."""
    return x / torch.sqrt(x.square().mean(-1, keepdim=True) + eps) * w


def check_norm(rms, x, dx, w, dw, b, db, *, eps=1e-5, tol=None):
    """(y, dy) and the gradients of ⟨dy, u⟩ in dx, dw, db against jvp of the float64 definition."""
    tol = tol or ELEMENTWISE_TOL[x.dtype]
    tangents = [t if t is None else t.detach().requires_grad_() for t in (dx, dw, db)]
    dx, dw, db = tangents
    if rms:
        y, dy = kk.dual_rms_norm(x, dx, w, dw, eps=eps)
    else:
        y, dy = kk.dual_layer_norm(x, dx, w, dw, b, db, eps=eps)
    assert y.dtype == dy.dtype == x.dtype and y.shape == dy.shape == x.shape and not y.requires_grad

    d = x.shape[-1]
    primals = (x.double(), torch.ones(d, dtype=torch.float64, device=x.device) if w is None else w.double(),
               torch.zeros(d, dtype=torch.float64, device=x.device) if b is None else b.double())
    d64 = [None if t is None else t.detach().double().requires_grad_() for t in tangents]
    definition = rms_norm_def if rms else layer_norm_def
    y_ref, dy_ref = jvp(lambda x, w, b: definition(x, w, b, eps), primals,
                        tuple(torch.zeros_like(p) if t is None else t for p, t in zip(primals, d64)))
    assert rel_err(y, y_ref) <= tol and rel_err(dy, dy_ref) <= tol, (rel_err(y, y_ref), rel_err(dy, dy_ref))
    u = torch.randn_like(dy_ref)
    (dy.double() * u).sum().backward()
    (dy_ref * u).sum().backward()
    for name, t, ref in zip(("dx", "dweight", "dbias"), tangents, d64):
        if t is not None:
            assert t.grad is not None and t.grad.dtype == t.dtype, name
            assert rel_err(t.grad, ref.grad) <= tol, (name, rel_err(t.grad, ref.grad))


AFFINE = ["trained", "frozen", "none", "tangent_only"]


def norm_inputs(lead, d, affine, dtype=torch.float32):
    """(x, dx, w, dw, b, db): 'trained' all; 'frozen' γ, β without tangents; 'none' no affine part;
    'tangent_only' no dx, tangents of γ and β only."""
    x, dx = rand(*lead, d, dtype=torch.float64, scale=2.0, shift=0.5), rand(*lead, d, dtype=dtype)
    # LayerNorm's Jacobian scales with 1/σ of a row: at d = 3 a random row is nearly constant often enough
    # for fp32 rounding to exceed the tolerance, so rows are spread to σ ≥ 0.5 (fresh values otherwise)
    mean = x.mean(-1, keepdim=True)
    sigma = (x - mean).square().mean(-1, keepdim=True).sqrt().clamp_min(1e-12)
    x = (mean + (x - mean) * (0.5 / sigma).clamp_min(1.0)).to(dtype)
    w, b = rand(d, dtype=dtype, shift=1.0), rand(d, dtype=dtype)
    dw, db = rand(d, dtype=dtype), rand(d, dtype=dtype)
    return {"trained": (x, dx, w, dw, b, db), "frozen": (x, dx, w, None, b, None),
            "none": (x, dx, None, None, None, None), "tangent_only": (x, None, w, dw, b, db)}[affine]


@pytest.mark.parametrize("affine", AFFINE)
@pytest.mark.parametrize("lead, d", [((3, 7), 33), ((5,), 3), ((2, 3, 1), 130), ((1,), 7)])
def test_layer_norm(backend, lead, d, affine):
    check_norm(False, *norm_inputs(lead, d, affine))


def test_bias_tangent_alone_gives_a_fresh_tangent(backend):
    """dy = dβ on every row: its own tensor, not a view of dβ that later changes of dβ would change."""
    x, _, w, _, b, db = norm_inputs((4,), 6, "trained")
    y, dy = kk.dual_layer_norm(x, None, w, None, b, db)
    want = db.expand(4, 6).clone()
    db.add_(1.0)
    assert torch.equal(dy, want)


def test_layer_norm_width_one(backend):
    """d = 1: x̂ = 0, so y = β and dy = dβ; J = 0 up to rounding amplified by r = eps^(-1/2). (At d = 2,
    J is of the order of eps: also too small for a relative comparison; d = 3 is tested above.)"""
    x, dx, w, dw, b, db = norm_inputs((5,), 1, "trained")
    y, dy = kk.dual_layer_norm(x, dx, w, dw, b, db)
    torch.testing.assert_close(y, b.expand(5, 1))
    torch.testing.assert_close(dy, db.expand(5, 1), atol=1e-3, rtol=0)


@pytest.mark.parametrize("affine", ["trained", "frozen", "none", "tangent_only"])
@pytest.mark.parametrize("lead, d", [((3, 7), 33), ((5,), 3), ((2, 3), 130)])
def test_rms_norm(backend, lead, d, affine):
    x, dx, w, dw, _, _ = norm_inputs(lead, d, affine)
    check_norm(True, x, dx, w, dw, None, None, eps=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rms", [False, True])
def test_norm_half_precision(backend, dtype, rms):
    x, dx, w, dw, b, db = norm_inputs((4, 9), 65, "trained", dtype)
    check_norm(rms, x, dx, w, dw, None if rms else b, None if rms else db, tol=TOL[dtype])


def test_norm_float64_and_strided_rows(backend):
    base = rand(6, 2, 40)
    x = base[:, 1, 3:36]  # rows 80 elements apart, unit column stride
    dx = rand(33, 6).T  # column stride 6: made contiguous where a kernel needs it
    _, _, w, dw, b, db = norm_inputs((6,), 33, "trained")
    check_norm(False, x, dx, w, dw, b, db)
    w, dw, b, db = (rand(33, 2)[:, 1] for _ in range(4))  # parameters with stride 2
    check_norm(False, x, dx, w + 1.0, dw, b, db)
    check_norm(True, x, dx, w + 1.0, dw, None, None, eps=1e-6)
    if backend == "torch":
        check_norm(False, *norm_inputs((3, 5), 17, "trained", torch.float64))
        check_norm(True, *norm_inputs((3, 5), 17, "trained", torch.float64)[:4], None, None)


@pytest.mark.parametrize("eps", [1e-2, 0.0])
@pytest.mark.parametrize("rms", [False, True])
def test_norm_uses_the_eps_it_is_given(backend, rms, eps):
    """Rows of scale 1e-3 (variance ~1e-6): eps = 1e-2 dominates the variance and eps = 0 leaves it alone,
    so a kernel with another eps misses the float64 definition by far."""
    torch.manual_seed(11)
    x, dx, w, dw, b, db = norm_inputs((3, 5), 33, "trained")
    check_norm(rms, 1e-3 * x, dx, w, dw, None if rms else b, None if rms else db, eps=eps)


@pytest.mark.parametrize("rms", [False, True])
def test_norm_tangent_in_another_dtype(backend, rms):
    """fp32 x with a bf16 tangent (say τ kept in bf16): y and dy in x's dtype, the gradient in dx's."""
    x, _, w, dw, b, db = norm_inputs((4, 5), 33, "trained")
    dx = rand(4, 5, 33, dtype=torch.bfloat16)
    check_norm(rms, x, dx, w, dw, None if rms else b, None if rms else db, tol=TOL[torch.bfloat16])


def test_norm_zero_rows(backend):
    x, dx, w, dw, b, db = (t.requires_grad_(i in (1, 3, 5)) for i, t in enumerate(norm_inputs((0,), 9, "trained")))
    y, dy = kk.dual_layer_norm(x, dx, w, dw, b, db)
    assert y.shape == dy.shape == (0, 9)
    gdx, gdw, gdb = torch.autograd.grad(dy.sum(), (dx, dw, db))
    assert gdx.shape == (0, 9) and torch.equal(gdw, torch.zeros_like(w)) and torch.equal(gdb, torch.zeros_like(b))


def test_norm_nan_stays_in_its_row(backend):
    x, dx, w, dw, b, db = norm_inputs((3,), 7, "trained")
    x[1, 2] = float("nan")
    y, dy = kk.dual_layer_norm(x, dx, w, dw, b, db)
    assert y[1].isnan().all() and dy[1].isnan().all()
    assert y[[0, 2]].isfinite().all() and dy[[0, 2]].isfinite().all()


def test_wide_rows_run_the_reference(backend, monkeypatch):
    monkeypatch.setattr(norm, "MAX_TRITON_WIDTH", 16)
    check_norm(False, *norm_inputs((3,), 21, "trained"))


def test_norm_bad_inputs():
    x, dx, w, dw, b, db = norm_inputs((3,), 5, "trained")
    cases = [
        (dict(x=x, dx=dx[:, :4]), ValueError, r"dx must have the shape of x, got dx \(3, 4\) and x \(3, 5\)"),
        (dict(x=x, dx=dx, weight=w[:4]), ValueError, r"weight must have shape \(d,\) = \(5,\).*\(4,\)"),
        (dict(x=x, dx=dx, dweight=dw), ValueError, "dweight needs weight"),
        (dict(x=x, dx=None, weight=w, bias=b), ValueError, "needs a tangent"),
        (dict(x=x.requires_grad_(), dx=dx), ValueError, "x requires grad"),
        (dict(x=x.detach(), dx=dx, eps=-1.0), ValueError, "eps must be"),
        (dict(x=x.detach().long(), dx=dx), TypeError, "x must have dtype"),
        (dict(x=x.detach()[:, :0], dx=dx[:, :0]), ValueError, "d ≥ 1"),
    ]
    for kwargs, error, match in cases:
        with pytest.raises(error, match=match):
            kk.dual_layer_norm(**kwargs)


# ---------------------------------------------------------------- activations

DEFINITIONS = {
    "gelu": lambda x: 0.5 * x * (1 + torch.erf(x / 2 ** 0.5)),
    "gelu_tanh": lambda x: 0.5 * x * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (x + 0.044715 * x ** 3))),
    "quick_gelu": lambda x: x / (1 + torch.exp(-1.702 * x)),
    "relu": lambda x: torch.where(x > 0, x, 0.0),
    "silu": lambda x: x / (1 + torch.exp(-x)),
    "tanh": torch.tanh,
}


def check_activation(kind, x, dx, tol=None):
    """Errors relative to the larger of the reference's and the input's norm: f is evaluated to fp32
    rounding of its argument (|f'| ≤ 1.13), so a lone value deep in a tail (gelu(−6) ≈ 1e-8, from
    1 + erf(−4.2)) is exact only up to about 1e-7 · |x|, in PyTorch's kernels as in ours."""
    tol = tol or ELEMENTWISE_TOL[x.dtype]

    def err(a, ref, scale):
        return float((a.double() - ref).norm() / max(ref.norm(), scale.double().norm()))
    dx = dx.detach().requires_grad_()
    y, dy = kk.dual_activation(x, dx, kind)
    assert y.dtype == dy.dtype == x.dtype and y.shape == dy.shape == x.shape and not y.requires_grad
    dx64 = dx.detach().double().requires_grad_()
    y_ref, dy_ref = jvp(DEFINITIONS[kind], (x.double(),), (dx64,))
    assert err(y, y_ref, x) <= tol and err(dy, dy_ref, dx) <= tol, (err(y, y_ref, x), err(dy, dy_ref, dx))
    u = torch.randn_like(dy_ref)
    g, = torch.autograd.grad((dy.double() * u).sum(), dx)
    g_ref, = torch.autograd.grad((dy_ref * u).sum(), dx64)
    assert g.dtype == dx.dtype and err(g, g_ref, u) <= tol


@pytest.mark.parametrize("kind", list(DEFINITIONS))
@pytest.mark.parametrize("shape", [(3, 7, 33), (1,), (1030,)])
def test_activation(backend, kind, shape):
    check_activation(kind, rand(*shape, scale=3.0), rand(*shape))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_activation_half_precision(backend, dtype):
    for kind in DEFINITIONS:
        check_activation(kind, rand(5, 130, dtype=dtype, scale=3.0), rand(5, 130, dtype=dtype), TOL[dtype])


def test_activation_strided_empty_and_float64(backend):
    check_activation("gelu", rand(33, 7, scale=3.0).T, rand(33, 7).T)
    check_activation("quick_gelu", rand(4, 10, scale=3.0)[:, ::3], rand(4, 10)[:, ::3])
    y, dy = kk.dual_activation(rand(0, 5), rand(0, 5), "gelu")
    assert y.shape == dy.shape == (0, 5)
    if backend == "torch":
        check_activation("gelu_tanh", rand(3, 9, dtype=torch.float64, scale=3.0), rand(3, 9, dtype=torch.float64))


@pytest.mark.parametrize("kind", list(DEFINITIONS))
@pytest.mark.parametrize("tangents", ["both", "dx", "dgate"])
def test_gated_activation(backend, kind, tangents):
    """y = f(x) ⊙ h (T5 v1.1's gated feed-forward) against jvp of its definition along (dx, dh), and the
    gradients in dx and dh."""
    x, h = rand(3, 7, 33, scale=3.0), rand(3, 7, 33)
    dx = rand(3, 7, 33).requires_grad_() if tangents != "dgate" else None
    dh = rand(3, 7, 33).requires_grad_() if tangents != "dx" else None
    y, dy = kk.dual_activation(x, dx, kind, gate=h, dgate=dh)
    assert not y.requires_grad
    zero = torch.zeros_like(x, dtype=torch.float64)
    t64 = [zero if t is None else t.detach().double().requires_grad_() for t in (dx, dh)]
    y_ref, dy_ref = jvp(lambda x, h: DEFINITIONS[kind](x) * h, (x.double(), h.double()), tuple(t64))
    assert rel_err(y, y_ref) <= 1e-5 and rel_err(dy, dy_ref) <= 1e-5
    u = torch.randn_like(dy_ref)
    (dy.double() * u).sum().backward()
    (dy_ref * u).sum().backward()
    for t, ref in zip((dx, dh), t64):
        if t is not None:
            assert rel_err(t.grad, ref.grad) <= 1e-5


def test_activation_tangent_in_another_dtype(backend):
    check_activation("gelu", rand(6, 33, scale=3.0), rand(6, 33, dtype=torch.bfloat16), TOL[torch.bfloat16])


def test_activation_bad_inputs():
    x, dx = rand(3, 5), rand(3, 5)
    with pytest.raises(ValueError, match="unknown kind 'swish'.*gelu, gelu_tanh, quick_gelu, relu, silu, tanh"):
        kk.dual_activation(x, dx, "swish")
    with pytest.raises(ValueError, match=r"dx must have the shape of x, got dx \(5, 3\)"):
        kk.dual_activation(x, dx.T, "gelu")
    with pytest.raises(ValueError, match="x requires grad"):
        kk.dual_activation(x.requires_grad_(), dx, "relu")
    with pytest.raises(ValueError, match="needs a tangent"):
        kk.dual_activation(x.detach(), None, "relu", gate=dx)
    with pytest.raises(TypeError, match="dgate must be a torch.Tensor"):
        kk.dual_activation(x.detach(), dx, "relu", gate=dx, dgate=[1.0])
    with pytest.raises(ValueError, match="dgate needs gate"):
        kk.dual_activation(x.detach(), dx, "relu", dgate=dx)
    with pytest.raises(ValueError, match=r"gate must have the shape of x, got gate \(3, 4\)"):
        kk.dual_activation(x.detach(), dx, "relu", gate=dx[:, :4])
    with pytest.raises(ValueError, match="gate requires grad"):
        kk.dual_activation(x.detach(), dx, "relu", gate=dx.clone().requires_grad_())


def test_kernel_backend_refuses_float64(use_backend):
    use_backend("triton")
    x = rand(3, 5, dtype=torch.float64)
    with pytest.raises(TypeError, match="float16/bfloat16/float32"):
        kk.dual_activation(x, x, "gelu")
    with pytest.raises(TypeError, match="float16/bfloat16/float32"):
        kk.dual_layer_norm(x, x)


def test_relu_matches_pytorch_exactly(backend):
    x, dx = rand(4, 11, scale=3.0), rand(4, 11)
    x[0, :2] = float("nan")
    y, dy = kk.dual_activation(x, dx, "relu")
    assert torch.allclose(y, F.relu(x), rtol=0, atol=0, equal_nan=True)
    assert torch.equal(dy, torch.ops.aten.threshold_backward(dx, x, 0))  # NaN: y NaN, slope 1


@pytest.mark.parametrize("op", ["layer_norm", "rms_norm", "gelu", "tanh"])
def test_second_derivatives(backend, op):
    """Hessian-vector products of a loss quadratic in dy, in the tangents: the reference backward is
    differentiated again and matches torch.func (forward-over-reverse) of the float64 definitions; the kernels'
    backward raises instead of dropping the terms."""
    x, w, b, h, u = rand(3, 9, scale=2.0), rand(9), rand(9), rand(3, 9), rand(3, 9)
    tangents = [rand(3, 9), rand(9) if "norm" in op else rand(3, 9)]  # (dx, dweight) or (dx, dgate)
    vs = [torch.randn_like(t) for t in tangents]
    if op == "layer_norm":
        dual, definition, second_primal = (lambda dx, dw: kk.dual_layer_norm(x, dx, w, dw, b, None)[1],
                                           lambda x, w: layer_norm_def(x, w, b.double().cpu(), 1e-5), w)
    elif op == "rms_norm":
        dual, definition, second_primal = (lambda dx, dw: kk.dual_rms_norm(x, dx, w, dw)[1],
                                           lambda x, w: rms_norm_def(x, w, None, 1e-6), w)
    else:  # gated activation
        dual, definition, second_primal = (lambda dx, dh: kk.dual_activation(x, dx, op, gate=h, dgate=dh)[1],
                                           lambda x, h: DEFINITIONS[op](x) * h, h)

    def loss64(*ts):  # on the CPU, as check_hvp's float64 leaves
        primals = (x.double().cpu(), second_primal.double().cpu())
        return (jvp(definition, primals, ts)[1] ** 2 * u.double().cpu()).sum()

    leaves = [t.requires_grad_() for t in tangents]
    check_hvp((dual(*leaves) ** 2 * u).sum(), leaves, vs, loss64, backend, 1e-5,
              "its Triton backward cannot be differentiated again")
