"""``dual_linear``: a linear layer and its forward-mode tangent (JVP) in one fused op.

For x, dx (..., d_in), W, dW (d_out, d_in) and b, db (d_out,):
y = x Wᵀ + b and dy = dx Wᵀ + x dWᵀ + db, the JVP of (x, W, b) ↦ x Wᵀ + b along (dx, dW, db).
"""
import math

import torch
import torch.nn.functional as F

from . import _autograd, _backend, _precision, _validate

OP = "dual_linear"


def dual_linear(x, dx, weight, dweight, bias=None, dbias=None):
    """Primal and tangent outputs of a linear layer: ``(y, dy)``, both of shape (..., d_out).

    y = x Wᵀ + b,  dy = dx Wᵀ + x dWᵀ + db.
    x, dx: (..., d_in), same shape (leading dims flattened); weight, dweight: (d_out, d_in);
    bias, dbias: (d_out,) or None. ``bias`` without ``dbias`` is a frozen bias (db = 0); ``dbias``
    needs ``bias``. Operands are multiplied in ``_precision.compute_dtype`` of all inputs with fp32
    accumulation, and y, dy come out in that dtype. Differentiable in every input: for output
    gradients gy, gdy, grad x = gy W + gdy dW, grad dx = gdy W, grad W = gyᵀ x + gdyᵀ dx,
    grad dW = gdyᵀ x, grad b = Σ gy, grad db = Σ gdy (only the ones needed are computed).
    """
    ct, backend = _check(x, dx, weight, dweight, bias, dbias)
    lead, (d_out, d_in) = x.shape[:-1], weight.shape
    rows = math.prod(lead)
    y, dy = _DualLinear.apply(x.reshape(rows, d_in), dx.reshape(rows, d_in), weight, dweight, bias, dbias,
                              backend, ct)
    return y.reshape(*lead, d_out), dy.reshape(*lead, d_out)


def _check(x, dx, weight, dweight, bias, dbias):
    """Validate the arguments; return the compute dtype and the backend."""
    for name, t in (("x", x), ("dx", dx), ("weight", weight), ("dweight", dweight)):
        _validate.tensor(OP, name, t)
    if x.dim() < 1:
        raise ValueError(f"{OP}: x must have shape (..., d_in), got a 0-D tensor")
    if dx.shape != x.shape:
        raise ValueError(f"{OP}: dx must have the shape of x, got dx {tuple(dx.shape)} and x {tuple(x.shape)}")
    _validate.tensor(OP, "weight", weight, ndim=2)
    if dweight.shape != weight.shape:
        raise ValueError(f"{OP}: dweight must have the shape of weight, got dweight {tuple(dweight.shape)} "
                         f"and weight {tuple(weight.shape)}")
    d_out, d_in = weight.shape
    if x.shape[-1] != d_in:
        raise ValueError(f"{OP}: x of shape {tuple(x.shape)} has d_in={x.shape[-1]}, but weight of shape "
                         f"{tuple(weight.shape)} (d_out, d_in) takes d_in={d_in}")
    if dbias is not None and bias is None:
        raise ValueError(f"{OP}: dbias needs bias (a frozen bias is bias without dbias), got bias=None")
    for name, t in (("bias", bias), ("dbias", dbias)):
        if t is not None and _validate.tensor(OP, name, t).shape != (d_out,):
            raise ValueError(f"{OP}: {name} must have shape (d_out,) = ({d_out},), got {tuple(t.shape)}")
    named = {"x": x, "dx": dx, "weight": weight, "dweight": dweight, "bias": bias, "dbias": dbias}
    device = _validate.same_device(OP, **named)
    ct = _precision.compute_dtype(OP, **{n: t.dtype for n, t in named.items() if t is not None})
    return ct, _backend.select(OP, device, [ct])


def _torch_forward(x, dx, w, dw, b, db, ct):
    """Reference backend of the forward: (y, dy) in ``ct`` for x, dx (M, K), w, dw (N, K); autocast off,
    so y, dy have the dtype of the Triton backend under ``torch.autocast`` too."""
    with _precision.no_autocast(x.device):
        x, dx, w, dw = (t.to(ct) for t in (x, dx, w, dw))
        b, db = (None if t is None else t.to(ct) for t in (b, db))
        return F.linear(x, w, b), F.linear(dx, w, db) + F.linear(x, dw)


def _torch_matmul(a, b, ct, out_dtype):
    """Reference backend of the backward GEMMs: Σ_i a[i] @ b[i], multiplied in ``ct`` (autocast off)."""
    with _precision.no_autocast(a[0].device):
        return sum(x.to(ct) @ y.to(ct) for x, y in zip(a, b)).to(out_dtype)


def _kernels(backend):
    """(forward, matmul) of ``backend``; Triton is imported only when it is used."""
    if backend == "torch":
        return _torch_forward, _torch_matmul
    from .triton_kernels import dual_linear as tk
    return tk.forward, tk.matmul


class _DualLinear(torch.autograd.Function):
    """(y, dy) of 2-D x, dx; saves only the operands that the needed gradients use."""

    @staticmethod
    def forward(ctx, x, dx, w, dw, b, db, backend, ct):
        need_x, need_dx, need_w, need_dw = ctx.needs_input_grad[:4]
        ctx.set_materialize_grads(False)
        ctx.backend, ctx.ct = backend, ct
        ctx.dtypes = tuple(None if t is None else t.dtype for t in (x, dx, w, dw, b, db))
        ctx.save_for_backward(w if need_x or need_dx else None, dw if need_x else None,
                              x if need_w or need_dw else None, dx if need_w else None)
        y, dy = _kernels(backend)[0](x, dx, w, dw, b, db, ct)
        if not (need_x or need_w or ctx.needs_input_grad[4]):  # a constant primal: the next dual op takes y as it is
            ctx.mark_non_differentiable(y)
        return y, dy

    @staticmethod
    def backward(ctx, gy, gdy):
        # The reference backward is PyTorch ops of the saved inputs, so autograd differentiates it again
        # (create_graph); the kernels' is not: there, a second derivative raises instead of coming out wrong.
        return (_backward if ctx.backend == "torch" else _backward_once)(ctx, gy, gdy)


def _backward(ctx, gy, gdy):
    """Gradients of the inputs for output gradients gy, gdy (see ``dual_linear``)."""
    w, dw, x, dx = ctx.saved_tensors
    need = ctx.needs_input_grad[:6]
    matmul = _kernels(ctx.backend)[1]
    acc = torch.float64 if ctx.ct == torch.float64 else torch.float32

    def gemm(i, *pairs):  # Σ g @ m over the pairs whose output gradient g exists
        pairs = [(g, m) for g, m in pairs if g is not None]
        return matmul(*map(list, zip(*pairs)), ctx.ct, ctx.dtypes[i]) if need[i] and pairs else None

    def rowsum(i, g):
        return g.sum(0, dtype=acc).to(ctx.dtypes[i]) if need[i] and g is not None else None

    return (gemm(0, (gy, w), (gdy, dw)),
            gemm(1, (gdy, w)),
            gemm(2, (None if gy is None else gy.T, x), (None if gdy is None else gdy.T, dx)),
            gemm(3, (None if gdy is None else gdy.T, x)),
            rowsum(4, gy), rowsum(5, gdy), None, None)


_backward_once = _autograd.once_differentiable(OP)(_backward)
