"""``dual_activation``: an elementwise activation, optionally gated, and its tangent (JVP) in one op.

y = f(x) ⊙ h and dy = f'(x) ⊙ dx ⊙ h + f(x) ⊙ dh, with the gate h = 1, dh = 0 when absent (the gated
form is T5 v1.1's feed-forward, act(x W₀ᵀ) ⊙ (x W₁ᵀ)). For the gradient g of dy: grad dx = f'(x) ⊙ h ⊙ g,
grad dh = f(x) ⊙ g. x and h are the constant primal point: y carries no gradient. ``ACTIVATIONS`` maps
each name to f as plain PyTorch:

    gelu        f = x Φ(x),                  f' = Φ(x) + x φ(x)
    gelu_tanh   f = ½x(1 + tanh u),          u = √(2/π)(x + 0.044715 x³)
    quick_gelu  f = x σ(1.702 x)             (CLIP),  f' = σ + 1.702 x σ(1 − σ)
    relu        f = max(x, 0),               f' = [x > 0]
    silu        f = x σ(x)                   (SwiGLU: Llama, Qwen, Mistral),  f' = σ + x σ(1 − σ)
    tanh        f = tanh x,                  f' = 1 − f²
"""
import functools

import torch
import torch.nn.functional as F

from . import _autograd, _backend, _validate

OP = "dual_activation"

ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_tanh": functools.partial(F.gelu, approximate="tanh"),
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "relu": F.relu,
    "silu": F.silu,
    "tanh": torch.tanh,
}


def dual_activation(x, dx, kind: str, *, gate=None, dgate=None):
    """(y, dy) = (f(x) ⊙ h, f'(x) ⊙ dx ⊙ h + f(x) ⊙ dh) for f = ``ACTIVATIONS[kind]``, h = ``gate``
    (None: 1) and dh = ``dgate`` (None: 0; needs a gate). x, dx, gate, dgate of one shape, any float
    dtypes; dx None is a zero tangent (then dgate is needed). y, dy come in x's dtype, and the
    gradients of dx, dgate in their own. x and gate must not require grad. Evaluated in fp32 (float64
    when any input is)."""
    if kind not in ACTIVATIONS:
        raise ValueError(f"{OP}: unknown kind {kind!r}; expected one of {', '.join(ACTIVATIONS)}")
    named = {"x": x, "dx": dx, "gate": gate, "dgate": dgate}
    for name, t in named.items():
        if t is not None or name == "x":
            _validate.tensor(OP, name, t)
            if t.shape != x.shape:
                raise ValueError(f"{OP}: {name} must have the shape of x, got {name} {tuple(t.shape)} and x "
                                 f"{tuple(x.shape)}")
    if dgate is not None and gate is None:
        raise ValueError(f"{OP}: dgate needs gate (the tangent of a gate that is not there)")
    if dx is None and dgate is None:
        raise ValueError(f"{OP}: needs a tangent: dx and dgate are both None")
    _validate.constant_primal(OP, x=x, gate=gate)
    device = _validate.same_device(OP, **named)
    backend = _backend.select(OP, device, [t.dtype for t in named.values() if t is not None])
    return _DualActivation.apply(x, dx, gate, dgate, kind, backend)


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
    if kind == "silu":
        return torch.ops.aten.silu_backward(t, x)
    return 4 * torch.sigmoid(2 * x) * torch.sigmoid(-2 * x) * t


def _torch_forward(x, dx, h, dh, kind):
    """Reference backend: (y, dy) in the accumulation dtype."""
    x, dx, h, dh = (None if t is None else t.to(_acc(x, dx, h, dh)) for t in (x, dx, h, dh))
    fx = ACTIVATIONS[kind](x)
    dy = None if dx is None else _torch_slope_times(dx if h is None else dx * h, x, kind)
    if dh is not None:
        dy = fx * dh if dy is None else dy + fx * dh
    return fx if h is None else fx * h, dy


def _torch_backward(g, x, h, kind, need_dx, need_dh):
    """Reference backend: (grad dx, grad dh) in the accumulation dtype; None where not needed."""
    acc = _acc(g, x, h)
    g, x, h = (None if t is None else t.to(acc) for t in (g, x, h))
    return (_torch_slope_times(g if h is None else g * h, x, kind) if need_dx else None,
            ACTIVATIONS[kind](x) * g if need_dh else None)


def _acc(*tensors) -> torch.dtype:
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


class _DualActivation(torch.autograd.Function):
    """(y, dy); saves x and the gate, from which the backward recomputes f(x) and f'(x)."""

    @staticmethod
    def forward(ctx, x, dx, h, dh, kind, backend):
        if backend == "torch":
            y, dy = (_autograd.output(t, x.dtype) for t in _torch_forward(x, dx, h, dh, kind))
        else:
            from .triton_kernels import activation as tk
            y, dy = tk.forward(x, dx, h, dh, kind)
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(y)
        ctx.kind, ctx.backend = kind, backend
        ctx.dtypes = (None if dx is None else dx.dtype, None if dh is None else dh.dtype)
        ctx.save_for_backward(x, h)
        return y, dy

    @staticmethod
    def backward(ctx, gy, gdy):
        # The reference backward is PyTorch ops, which autograd differentiates again (create_graph; except
        # silu's and quick_gelu's silu_backward, which raises); the kernels' is not: there, a second derivative raises.
        return (_backward if ctx.backend == "torch" else _backward_once)(ctx, gy, gdy)


def _backward(ctx, gy, gdy):
    """Gradients of dx and dgate for the output gradient gdy (see the module docstring)."""
    need_dx, need_dh = ctx.needs_input_grad[1], ctx.needs_input_grad[3]
    if gdy is None or not (need_dx or need_dh):
        return (None,) * 6
    x, h = ctx.saved_tensors
    if ctx.backend == "torch":
        grads = _torch_backward(gdy, x, h, ctx.kind, need_dx, need_dh)
    else:
        from .triton_kernels import activation as tk
        wanted = (dt if need else None for dt, need in zip(ctx.dtypes, (need_dx, need_dh)))
        grads = tk.backward(gdy, x, h, ctx.kind, *wanted)
    gdx, gdh = (t.to(dtype) if need else None for t, dtype, need in zip(grads, ctx.dtypes, (need_dx, need_dh)))
    return None, gdx, None, gdh, None, None


_backward_once = _autograd.once_differentiable(OP)(_backward)
