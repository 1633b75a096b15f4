"""dual_linear against torch.func.jvp of F.linear in float64, and its gradients against autograd of that."""
import pytest
import torch
import torch.nn.functional as F

import kfac_kernels as kk
from kfac_kernels import dual
from kfac_kernels.dual import dual_linear

from .conftest import DEVICE
from .util import TOL, rel_err

BIAS_MODES = ["none", "bias", "frozen"]  # no bias; bias and dbias; bias without dbias (db = 0)


def make_inputs(lead, d_in, d_out, bias="bias", dtype=torch.float32, device="cpu"):
    """Fresh random (x, dx, weight, dweight, bias, dbias)."""
    def rand(*shape):
        return torch.randn(*shape, device=device).to(dtype)

    return (rand(*lead, d_in), rand(*lead, d_in), rand(d_out, d_in), rand(d_out, d_in),
            None if bias == "none" else rand(d_out), rand(d_out) if bias == "bias" else None)


def reference(x, dx, weight, dweight, bias=None, dbias=None):
    """(y, dy) = torch.func.jvp of F.linear at (x, W, b) along (dx, dW, db), in float64."""
    x, dx, weight, dweight = (t.double() for t in (x, dx, weight, dweight))
    if bias is None:
        return torch.func.jvp(F.linear, (x, weight), (dx, dweight))
    bias = bias.double()
    dbias = torch.zeros_like(bias) if dbias is None else dbias.double()
    return torch.func.jvp(F.linear, (x, weight, bias), (dx, dweight, dbias))


def loss_of(y, dy, kind, u, v):
    """A scalar of (y, dy): 'both' weights both; 'y' (sum: an expanded gy, gdy = None); 'dy' (gy = None)."""
    if kind == "y":
        return y.sum()
    if kind == "dy":
        return (dy * v).sum()
    return (y * u).sum() + (dy * v).sum()


def check_gradients(inputs, tol, kind="both"):
    """Grads of a scalar loss of dual_linear(*inputs) vs autograd of the float64 reference."""
    leaves = [None if t is None else t.detach().double().requires_grad_(t.requires_grad) for t in inputs]
    y_ref, dy_ref = reference(*leaves)
    u, v = torch.randn_like(y_ref), torch.randn_like(dy_ref)
    y, dy = dual_linear(*inputs)
    loss_of(y, dy, kind, u.to(y.dtype), v.to(dy.dtype)).backward()
    loss_of(y_ref, dy_ref, kind, u, v).backward()
    for name, t, ref in zip(["x", "dx", "weight", "dweight", "bias", "dbias"], inputs, leaves):
        if t is None or not t.requires_grad:
            continue
        if ref.grad is None:  # the loss does not depend on this input
            assert t.grad is None or not t.grad.any(), name
        else:
            assert t.grad is not None and t.grad.dtype == t.dtype, name
            assert rel_err(t.grad, ref.grad) <= tol, name


@pytest.mark.parametrize("lead, d_in, d_out", [
    ((1,), 1, 1), ((7,), 1, 130), ((7,), 130, 1), ((0,), 7, 33), ((1,), 33, 7),
    ((3, 5), 33, 130), ((3, 5), 130, 33), ((7,), 7, 7), ((), 7, 33), ((130,), 7, 130),
])
@pytest.mark.parametrize("bias", BIAS_MODES)
def test_forward_matches_jvp(backend, lead, d_in, d_out, bias):
    inputs = make_inputs(lead, d_in, d_out, bias, device=DEVICE)
    y, dy = dual_linear(*inputs)
    y_ref, dy_ref = reference(*inputs)
    # fp32 accumulation is accurate relative to the summands' size, not the sum's: a 1×1 dy = dx·W + x·dW + db
    # can cancel to ~1e-3 of its terms. So the error is measured against Σ|terms| (the reference on |inputs|).
    y_abs, dy_abs = reference(*(None if t is None else t.abs() for t in inputs))
    assert y.shape == dy.shape == (*lead, d_out) and y.dtype == dy.dtype == torch.float32
    for out, ref, size in ((y, y_ref, y_abs), (dy, dy_ref, dy_abs)):
        assert (out.double().cpu() - ref.double().cpu()).norm() <= TOL[torch.float32] * size.double().cpu().norm()


@pytest.mark.parametrize("bias", BIAS_MODES)
@pytest.mark.parametrize("kind", ["both", "y", "dy"])
def test_gradients_every_input(backend, bias, kind):
    inputs = [None if t is None else t.requires_grad_() for t in make_inputs((3, 5), 33, 7, bias, device=DEVICE)]
    check_gradients(inputs, TOL[torch.float32], kind)


@pytest.mark.parametrize("rows", [0, 7])
def test_linearized_training_case(backend, monkeypatch, rows):
    """θ0 = W and b frozen, x primal: only dx, dW, db get gradients, from two GEMMs, saving W and x."""
    x, dx, w, dw, b, db = make_inputs((rows,), 33, 130, device=DEVICE)
    for t in (dx, dw, db):
        t.requires_grad_()
    products = []
    kernels = dual._kernels

    def spy(backend):
        forward, matmul = kernels(backend)
        return forward, lambda pairs, *args: products.append(len(pairs)) or matmul(pairs, *args)

    monkeypatch.setattr(dual, "_kernels", spy)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        dual_linear(x, dx, w, dw, b, db)
    check_gradients([x, dx, w, dw, b, db], TOL[torch.float32])
    assert products == [1, 1]  # grad_dx = gdy W and grad_dW = gdyᵀ x, nothing of the primal
    assert sorted(t.data_ptr() for t in saved) == sorted([x.data_ptr(), w.data_ptr()])
    assert x.grad is None and w.grad is None and b.grad is None


def test_a_constant_primal_output_feeds_the_next_dual_op(backend):
    """Only the tangents require grad: y is a constant (as the other dual ops' primal outputs), so a linearized
    chain passes it on as it is; the chain's gradient in dW is that of the float64 jvp."""
    x, dx, w, dw, b, db = make_inputs((5,), 33, 7, device=DEVICE)
    dw.requires_grad_()
    y, dy = dual_linear(x, dx, w, dw, b, db)
    assert not y.requires_grad and dy.requires_grad
    h, dh = kk.dual_activation(y, dy, "gelu")
    leaf = dw.detach().double().requires_grad_()
    ref = torch.func.jvp(lambda x, w, b: F.gelu(F.linear(x, w, b)), (x.double(), w.double(), b.double()),
                         (dx.double(), leaf, db.double()))
    assert rel_err(h, ref[0]) <= TOL[torch.float32] and rel_err(dh, ref[1]) <= TOL[torch.float32]
    dh.square().sum().backward()
    ref[1].square().sum().backward()
    assert rel_err(dw.grad, leaf.grad) <= TOL[torch.float32]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dtypes(backend, dtype):
    inputs = [t.requires_grad_() for t in make_inputs((3, 5), 33, 130, dtype=dtype, device=DEVICE)]
    y, dy = dual_linear(*inputs)
    y_ref, dy_ref = reference(*inputs)
    assert y.dtype == dy.dtype == dtype
    assert rel_err(y, y_ref) <= TOL[dtype] and rel_err(dy, dy_ref) <= TOL[dtype]
    check_gradients(inputs, TOL[dtype])


@pytest.mark.parametrize("x_dtype, ct", [(torch.bfloat16, torch.bfloat16), (torch.float64, torch.float32)])
def test_mixed_dtypes_compute_in_narrowest(backend, x_dtype, ct):
    """x, dx in x_dtype with fp32 weights multiply in ct; gradients come back in each input's dtype."""
    x, dx, w, dw, b, db = make_inputs((7,), 33, 7, device=DEVICE)
    inputs = [x.to(x_dtype), dx.to(x_dtype), w, dw, b, db]
    for t in inputs:
        t.requires_grad_()
    y, dy = dual_linear(*inputs)
    assert y.dtype == dy.dtype == ct
    assert rel_err(dy, reference(*inputs)[1]) <= TOL[ct]
    check_gradients(inputs, TOL[ct])


@pytest.mark.parametrize("precision, tol", [("high", TOL["tf32"]), ("medium", TOL[torch.bfloat16])])
def test_fp32_matmul_precision(backend, precision, tol):
    torch.set_float32_matmul_precision(precision)
    inputs = [t.requires_grad_() for t in make_inputs((7,), 130, 33, device=DEVICE)]
    y, dy = dual_linear(*inputs)
    y_ref, dy_ref = reference(*inputs)
    assert y.dtype == torch.float32
    assert rel_err(y, y_ref) <= tol and rel_err(dy, dy_ref) <= tol
    check_gradients(inputs, tol)


def test_non_contiguous_inputs(backend):
    """Strided views: sliced rows, transposed matrices, leading dims that cannot be flattened as views."""
    d_in, d_out = 33, 7
    x = torch.randn(5, 3, 2 * d_in, device=DEVICE).transpose(0, 1)[..., ::2]  # (3, 5, d_in), not flattenable
    dx = torch.randn(3, d_in, 5, device=DEVICE).transpose(1, 2)
    w = torch.randn(d_in, d_out, device=DEVICE).T
    dw = torch.randn(d_out, 3 * d_in, device=DEVICE)[:, 1::3]
    b = torch.randn(2 * d_out, device=DEVICE)[::2]
    db = torch.randn(d_out, 3, device=DEVICE)[:, 0]
    inputs = [x, dx, w, dw, b, db]
    assert not any(t.is_contiguous() for t in inputs)
    y, dy = dual_linear(*inputs)
    y_ref, dy_ref = reference(*inputs)
    assert rel_err(y, y_ref) <= TOL[torch.float32] and rel_err(dy, dy_ref) <= TOL[torch.float32]
    for kind in ("both", "y"):
        check_gradients([t.detach().requires_grad_() for t in inputs], TOL[torch.float32], kind)


def test_backward_with_differently_strided_output_gradients(backend):
    """gy row-major and gdy a transposed view: the backward's two-product GEMMs (grad x = gy W + gdy dW,
    grad W = gyᵀ x + gdyᵀ dx) step each product along K by its own strides, over several K tiles."""
    torch.manual_seed(3)
    rows, d_in, d_out = 37, 7, 35
    inputs = [t.requires_grad_() for t in make_inputs((rows,), d_in, d_out, device=DEVICE)]
    gy = torch.randn(rows, d_out, device=DEVICE)
    gdy = torch.randn(d_out, rows, device=DEVICE).T
    assert gy.stride() != gdy.stride()
    y, dy = dual_linear(*inputs)
    grads = torch.autograd.grad((y, dy), inputs, (gy, gdy))
    leaves = [t.detach().double().requires_grad_() for t in inputs]
    refs = torch.autograd.grad(reference(*leaves), leaves, (gy.double(), gdy.double()))
    for name, g, ref in zip(["x", "dx", "weight", "dweight", "bias", "dbias"], grads, refs):
        assert rel_err(g, ref) <= TOL[torch.float32], name


def test_float64_runs_the_reference(monkeypatch):
    monkeypatch.delenv("KFAC_KERNELS_BACKEND", raising=False)
    inputs = [t.requires_grad_() for t in make_inputs((3, 5), 7, 33, dtype=torch.float64, device=DEVICE)]
    y, dy = dual_linear(*inputs)
    y_ref, dy_ref = reference(*inputs)
    assert y.dtype == torch.float64
    assert rel_err(y, y_ref) <= TOL[torch.float64] and rel_err(dy, dy_ref) <= TOL[torch.float64]
    check_gradients(inputs, TOL[torch.float64])


def test_autocast_keeps_the_compute_dtype(backend):
    """Under torch.autocast (bf16) fp32 inputs still multiply in fp32 and come out fp32 on every backend."""
    inputs = [t.requires_grad_() for t in make_inputs((3, 5), 33, 7, device=DEVICE)]
    with torch.autocast(torch.device(DEVICE).type, dtype=torch.bfloat16):
        y, dy = dual_linear(*inputs)
        check_gradients(inputs, TOL[torch.float32])  # the backward under autocast too
    y_ref, dy_ref = reference(*inputs)
    assert y.dtype == dy.dtype == torch.float32
    assert rel_err(y, y_ref) <= TOL[torch.float32] and rel_err(dy, dy_ref) <= TOL[torch.float32]


@pytest.mark.parametrize("loss", ["square", "linear"])
def test_second_derivatives(backend, loss):
    """Hessian-vector products in (x, dW): the reference backward is differentiated again and matches
    torch.func (forward-over-reverse) of the float64 jvp; the kernels' backward raises instead of dropping
    terms, also when the output gradient is a constant (the linear loss: only the saved x, dW carry them)."""
    x, dx, w, dw, b, db = make_inputs((7,), 5, 3, device=DEVICE)
    u = torch.randn(7, 3, device=DEVICE)
    vx, vdw = torch.randn_like(x), torch.randn_like(dw)

    def objective(dual):
        def f(x, dw):
            y, dy = dual(x, dx, w, dw, b, db)
            return (dy ** 2).sum() + (y * u).sum() if loss == "square" else (dy * u).sum()
        return f

    x, dw = x.requires_grad_(), dw.requires_grad_()
    grads = torch.autograd.grad(objective(dual_linear)(x, dw), (x, dw), create_graph=True)
    second = (grads[0] * vx).sum() + (grads[1] * vdw).sum()
    if backend != "torch":
        with pytest.raises(RuntimeError, match="dual_linear: its Triton backward cannot be differentiated again"):
            torch.autograd.grad(second, (x, dw))
        return
    hvp = torch.autograd.grad(second, (x, dw))
    f64 = objective(lambda *args: reference(*(None if t is None else t.double() for t in args)))
    _, hvp_ref = torch.func.jvp(torch.func.grad(f64, argnums=(0, 1)), (x.detach().double(), dw.detach().double()),
                                (vx.double(), vdw.double()))
    for h, ref in zip(hvp, hvp_ref):
        assert rel_err(h, ref) <= TOL[torch.float32]


def _bad(**changes):
    x, dx, w, dw, b, db = make_inputs((7,), 5, 3)
    args = dict(x=x, dx=dx, weight=w, dweight=dw, bias=b, dbias=db)
    args.update(changes)
    return args


@pytest.mark.parametrize("args, error, match", [
    (_bad(x=[[1.0]]), TypeError, "x must be a torch.Tensor"),
    (_bad(x=torch.ones(7, 5, dtype=torch.int64)), TypeError, "x must have dtype"),
    (_bad(dweight=torch.ones(3, 5, dtype=torch.int32)), TypeError, "dweight must have dtype"),
    (_bad(x=torch.tensor(1.0), dx=torch.tensor(1.0)), ValueError, "x must have shape"),
    (_bad(dx=torch.randn(7, 6)), ValueError, r"dx must have the shape of x, got dx \(7, 6\) and x \(7, 5\)"),
    (_bad(weight=torch.randn(3, 5, 1)), ValueError, r"weight must be 2-D, got shape \(3, 5, 1\)"),
    (_bad(dweight=torch.randn(5, 3)), ValueError, r"dweight must have the shape of weight, got dweight \(5, 3\)"),
    (_bad(weight=torch.randn(3, 4), dweight=torch.randn(3, 4)), ValueError, "has d_in=5, but weight of shape"),
    (_bad(bias=None), ValueError, "dbias needs bias"),
    (_bad(bias=torch.randn(4)), ValueError, r"bias must have shape \(d_out,\) = \(3,\), got \(4,\)"),
    (_bad(dbias=torch.randn(3, 1)), ValueError, r"dbias must have shape \(d_out,\) = \(3,\), got \(3, 1\)"),
    (_bad(bias=torch.randn(3, device="meta")), ValueError, "one device.*bias on meta"),
    (_bad(x=torch.randn(7, 5, dtype=torch.bfloat16), bias=torch.randn(3, dtype=torch.float16)), TypeError,
     "cannot mix bfloat16 and float16"),
])
def test_bad_inputs(args, error, match):
    with pytest.raises(error, match=match):
        dual_linear(**args)


def test_kernel_backend_refuses_float64(use_backend):
    use_backend("triton")
    with pytest.raises(TypeError, match="float16/bfloat16/float32"):
        dual_linear(*make_inputs((7,), 5, 3, dtype=torch.float64))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_large(dtype):
    """The GPU tile sizes (masked edges on every side) at a transformer-like shape."""
    inputs = [t.requires_grad_() for t in make_inputs((3, 333), 777, 1030, dtype=dtype, device="cuda")]
    y, dy = dual_linear(*inputs)
    y_ref, dy_ref = reference(*inputs)
    assert rel_err(y, y_ref) <= TOL[dtype] and rel_err(dy, dy_ref) <= TOL[dtype]
    check_gradients(inputs, TOL[dtype])
