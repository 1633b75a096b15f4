"""``dual_layer_norm`` and ``dual_rms_norm``: a normalization over the last dim and its tangent (JVP) in one op.

For x, dx (..., d) and weight γ, dweight dγ, bias β, dbias dβ (d,):

    LayerNorm:       x̂ = (x − μ) r,  r = (var(x) + eps)^(-1/2),  y = x̂ ⊙ γ + β
    RMSNorm (T5):    x̂ = x r,        r = (mean(x²) + eps)^(-1/2), y = x̂ ⊙ γ
    tangent:         dy = γ ⊙ J dx + x̂ ⊙ dγ + dβ,  J dx = r (dx − mean(dx) − x̂ mean(x̂ ⊙ dx))

(RMSNorm has no mean(dx) term). J = r (I − 11ᵀ/d − x̂x̂ᵀ/d) is symmetric, so the backward of dy is
the normalization's own backward at x, from the saved statistics μ, r: for the gradient g of dy,
grad dx = J (γ ⊙ g), grad dγ = Σ_rows g ⊙ x̂, grad dβ = Σ_rows g. x, γ, β are the constant primal
point: y carries no gradient and they must not require one. Statistics are taken in fp32 (float64
for float64 x); y and dy come out in x's dtype.
"""
import torch

from . import _autograd, _backend, _validate

MAX_TRITON_WIDTH = 16384  # wider rows run the reference backend: a Triton program holds a whole row


def dual_layer_norm(x, dx, weight=None, dweight=None, bias=None, dbias=None, *, eps=1e-5):
    """(y, dy) of LayerNorm over the last dim (see the module docstring), both (..., d) in x's dtype.

    x (..., d); dx (x's shape, any float dtype; its gradient comes in that dtype) or None (zero); weight, bias (d,) or None (no affine part);
    dweight, dbias (d,) or None (frozen), each needing its parameter. At least one tangent is given.
    Differentiable in dx, dweight, dbias."""
    return _dual_norm("dual_layer_norm", x, dx, weight, dweight, bias, dbias, eps, rms=False)


def dual_rms_norm(x, dx, weight=None, dweight=None, *, eps=1e-6):
    """(y, dy) of RMSNorm (T5's LayerNorm: no mean, no bias) over the last dim, as ``dual_layer_norm``."""
    return _dual_norm("dual_rms_norm", x, dx, weight, dweight, None, None, eps, rms=True)


def _dual_norm(op, x, dx, weight, dweight, bias, dbias, eps, *, rms):
    backend = _check(op, x, dx, weight, dweight, bias, dbias, eps)
    d = x.shape[-1]
    rows, drows = (None if t is None else t.reshape(-1, d) for t in (x, dx))
    if backend == "triton":  # the kernels take any row stride but unit column stride; parameters: unit stride
        rows, drows = (t if t is None or t.stride(-1) == 1 else t.contiguous() for t in (rows, drows))
        weight, dweight, bias, dbias = (None if t is None else t.contiguous() for t in (weight, dweight, bias, dbias))
    y, dy = _DualNorm.apply(rows, drows, weight, dweight, bias, dbias, float(eps), rms, backend)
    return y.reshape(x.shape), dy.reshape(x.shape)


def _check(op, x, dx, weight, dweight, bias, dbias, eps):
    """Validate the arguments; return the backend."""
    _validate.tensor(op, "x", x)
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"{op}: x must have shape (..., d) with d ≥ 1, got {tuple(x.shape)}")
    d = x.shape[-1]
    if dx is not None:
        _validate.tensor(op, "dx", dx)
        if dx.shape != x.shape:
            raise ValueError(f"{op}: dx must have the shape of x, got dx {tuple(dx.shape)} and x {tuple(x.shape)}")
    params = {"weight": weight, "dweight": dweight, "bias": bias, "dbias": dbias}
    for name, t in params.items():
        if t is not None and _validate.tensor(op, name, t).shape != (d,):
            raise ValueError(f"{op}: {name} must have shape (d,) = ({d},) for x of shape {tuple(x.shape)}, "
                             f"got {tuple(t.shape)}")
    for tangent, primal in (("dweight", "weight"), ("dbias", "bias")):
        if params[tangent] is not None and params[primal] is None:
            raise ValueError(f"{op}: {tangent} needs {primal} (a tangent of a parameter the norm does not have)")
    if dx is None and dweight is None and dbias is None:
        raise ValueError(f"{op}: needs a tangent: dx, dweight and dbias are all None")
    if not eps >= 0:
        raise ValueError(f"{op}: eps must be ≥ 0, got {eps}")
    _validate.constant_primal(op, x=x, weight=weight, bias=bias)
    named = {"x": x, "dx": dx, **params}
    device = _validate.same_device(op, **named)
    backend = _backend.select(op, device, [t.dtype for t in named.values() if t is not None])
    return "torch" if d > MAX_TRITON_WIDTH else backend


def _acc(*tensors) -> torch.dtype:
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def _torch_forward(x, dx, w, dw, b, db, eps, rms):
    """Reference backend: (y, dy, mean, rstd) for x, dx (M, d); mean (M, 1) or None (RMS), rstd (M, 1)."""
    acc = _acc(x, dx)
    xa, w, dw, b, db = (None if t is None else t.to(acc) for t in (x, w, dw, b, db))
    d = x.shape[-1]
    if rms:
        mean, rstd = None, torch.rsqrt(xa.square().mean(-1, keepdim=True) + eps)
        xhat = xa * rstd
        y = xhat if w is None else xhat * w
    else:
        y, mean, rstd = torch.native_layer_norm(xa, (d,), w, b, eps)
    dy = None
    if dx is not None:
        dxa = dx.to(acc)
        if rms:
            dy = rstd * (dxa - xhat * (xhat * dxa).mean(-1, keepdim=True))
        else:
            dy = torch.ops.aten.native_layer_norm_backward(dxa, xa, (d,), mean, rstd, None, None, [True, False, False])[0]
        if w is not None:
            dy = dy * w
    if dw is not None:  # x̂ ⊙ dγ (+ dβ): the normalization with weight dγ and bias dβ
        part = xhat * dw if rms else torch.native_layer_norm(xa, (d,), dw, db, eps)[0]
        dy, db = part if dy is None else dy + part, None
    if db is not None:
        dy = db.expand_as(xa).contiguous() if dy is None else dy + db  # its own tensor, not a view of dβ
    return _autograd.output(y, x.dtype), _autograd.output(dy, x.dtype), mean, rstd


def _torch_backward(g, x, mean, rstd, w, need_dx, need_dw, need_db, rms):
    """Reference backend: (grad dx, grad dγ, grad dβ) in the accumulation dtype; None where not needed."""
    acc = rstd.dtype  # the forward's
    ga, xa, w = g.to(acc), x.to(acc), None if w is None else w.to(acc)
    gdx = gdw = gdb = None
    if rms:
        xhat = xa * rstd
        if need_dx:
            gw = ga if w is None else ga * w
            gdx = rstd * (gw - xhat * (xhat * gw).mean(-1, keepdim=True))
        if need_dw:
            gdw = (ga * xhat).sum(0)
    elif need_dx or need_dw:
        gdx, gdw, _ = torch.ops.aten.native_layer_norm_backward(ga, xa, (x.shape[-1],), mean, rstd, w, None,
                                                                 [need_dx, need_dw, False])
    if need_db:
        gdb = ga.sum(0)
    return gdx, gdw, gdb


class _DualNorm(torch.autograd.Function):
    """(y, dy) of 2-D x, dx (M, d); saves x and its statistics for the backward of dy."""

    @staticmethod
    def forward(ctx, x, dx, w, dw, b, db, eps, rms, backend):
        if backend == "torch":
            y, dy, mean, rstd = _torch_forward(x, dx, w, dw, b, db, eps, rms)
        else:
            from .triton_kernels import norm as tk
            y, dy, mean, rstd = tk.forward(x, dx, w, dw, b, db, eps, rms)
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(y)
        ctx.rms, ctx.backend = rms, backend
        ctx.dtypes = tuple(None if t is None else t.dtype for t in (dx, dw, db))
        ctx.save_for_backward(x, mean, rstd, w)
        return y, dy

    @staticmethod
    def backward(ctx, gy, gdy):
        # The reference backward is PyTorch ops, which autograd differentiates again (create_graph); the
        # kernels' is not: there, a second derivative raises instead of coming out wrong.
        return (_backward if ctx.backend == "torch" else _backward_once)(ctx, gy, gdy)


def _backward(ctx, gy, gdy):
    """Gradients of dx, dγ, dβ for the output gradient gdy (see the module docstring)."""
    need_dx, need_dw, need_db = (ctx.needs_input_grad[i] for i in (1, 3, 5))
    if gdy is None or not (need_dx or need_dw or need_db):
        return (None,) * 9
    x, mean, rstd, w = ctx.saved_tensors
    if ctx.backend == "torch":
        grads = _torch_backward(gdy, x, mean, rstd, w, need_dx, need_dw, need_db, ctx.rms)
    else:
        from .triton_kernels import norm as tk
        grads = tk.backward(gdy, x, mean, rstd, w, need_dx, need_dw, need_db, ctx.rms, ctx.dtypes[0] or x.dtype)
    gdx, gdw, gdb = (t.to(dtype) if need else None
                     for t, dtype, need in zip(grads, ctx.dtypes, (need_dx, need_dw, need_db)))
    return None, gdx, None, gdw, None, gdb, None, None, None


_backward_once = _autograd.once_differentiable("dual_layer_norm / dual_rms_norm")(_backward)
