"""``dual_activation``: an elementwise activation and its tangent (JVP) in one op.

y = f(x), dy = f'(x) ⊙ dx, and for the gradient g of dy, grad dx = f'(x) ⊙ g (x is the constant
primal point: y carries no gradient). ``ACTIVATIONS`` maps each name to f as plain PyTorch:

    gelu        f = x Φ(x),                  f' = Φ(x) + x φ(x)
    gelu_tanh   f = ½x(1 + tanh u),          u = √(2/π)(x + 0.044715 x³)
    quick_gelu  f = x σ(1.702 x)             (CLIP),  f' = σ + 1.702 x σ(1 − σ)
    relu        f = max(x, 0),               f' = [x > 0]
    tanh        f = tanh x,                  f' = 1 − f²
"""
import functools

import torch
import torch.nn.functional as F

from . import _backend, _validate

OP = "dual_activation"

ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_tanh": functools.partial(F.gelu, approximate="tanh"),
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "relu": F.relu,
    "tanh": torch.tanh,
}


def dual_activation(x, dx, kind: str):
    """(y, dy) = (f(x), f'(x) ⊙ dx) for f = ``ACTIVATIONS[kind]``; x, dx of one shape (any float
    dtypes), y and dy in x's dtype. Differentiable in dx (its gradient in dx's dtype); x must not
    require grad. f and f' are evaluated in fp32 (float64 when x or dx is)."""
    if kind not in ACTIVATIONS:
        raise ValueError(f"{OP}: unknown kind {kind!r}; expected one of {', '.join(ACTIVATIONS)}")
    _validate.tensor(OP, "x", x)
    _validate.tensor(OP, "dx", dx)
    if dx.shape != x.shape:
        raise ValueError(f"{OP}: dx must have the shape of x, got dx {tuple(dx.shape)} and x {tuple(x.shape)}")
    _validate.constant_primal(OP, x=x)
    device = _validate.same_device(OP, x=x, dx=dx)
    backend = _backend.select(OP, device, [x.dtype, dx.dtype])
    return _DualActivation.apply(x, dx, kind, backend)


def _torch_slope_times(t, x, kind):
    """f'(x) ⊙ t through PyTorch's fused backward kernels of f (each is exactly that product); tanh's
    f' = 1 − tanh² x as 4 σ(2x) σ(−2x), which keeps its relative precision for large |x|."""
    if kind == "gelu":
        return torch.ops.aten.gelu_backward(t, x)
    if kind == "gelu_tanh":
        return torch.ops.aten.gelu_backward(t, x, approximate="tanh")
    if kind == "quick_gelu":  # f(x) = silu(1.702 x) / 1.702, so f'(x) = silu'(1.702 x)
        return torch.ops.aten.silu_backward(t, 1.702 * x)
    if kind == "relu":
        return torch.ops.aten.threshold_backward(t, x, 0)
    return 4 * torch.sigmoid(2 * x) * torch.sigmoid(-2 * x) * t


def _kernels(backend):
    """(forward, backward) of ``backend``: (x, dx, kind) -> (y, dy) and (g, x, kind, dtype) -> f'(x) ⊙ g."""
    if backend == "torch":
        def forward(x, dx, kind):
            acc = _acc(x, dx)
            x, dx = x.to(acc), dx.to(acc)
            return ACTIVATIONS[kind](x), _torch_slope_times(dx, x, kind)

        def backward(g, x, kind, dtype):
            acc = _acc(x, g)
            return _torch_slope_times(g.to(acc), x.to(acc), kind).to(dtype)
        return forward, backward
    from .triton_kernels import activation as tk
    return tk.forward, tk.backward


def _acc(*tensors) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


class _DualActivation(torch.autograd.Function):
    """(y, dy); saves x, from which the backward recomputes f'(x)."""

    @staticmethod
    def forward(ctx, x, dx, kind, backend):
        y, dy = (t.to(x.dtype) for t in _kernels(backend)[0](x, dx, kind))
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(y)
        ctx.kind, ctx.backend, ctx.dx_dtype = kind, backend, dx.dtype
        ctx.save_for_backward(x)
        return y, dy

    @staticmethod
    def backward(ctx, gy, gdy):
        if gdy is None or not ctx.needs_input_grad[1]:
            return None, None, None, None
        x, = ctx.saved_tensors
        return None, _kernels(ctx.backend)[1](gdy, x, ctx.kind, ctx.dx_dtype), None, None
