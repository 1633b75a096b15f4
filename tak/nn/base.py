"""Dual modules: frozen base parameters θ0 and trainable tangent directions τ, and (primal, tangent) pairs.

A dual layer maps (x, dx) ↦ (y, dy) = (f(x; θ), J_x f · dx + J_θ f · dθ). Its ``mode`` says what
(θ, dθ) are:

- ``"linearized"``: (θ0, τ), so y = f(x; θ0) and dy is the JVP of f at (x, θ0) along (dx, τ). The
  primal y is a constant (no autograd graph); gradients reach τ through dy only.
- ``"primal"``: (θ0, 0): the plain model at θ0; dy is None for dx None.
- ``"merged"``: (θ0 + τ, 0): the plain model with τ (say a merged task vector Σ α_t τ_t) added to its
  weights, differentiable in τ; dy is None for dx None.

A tangent None means zero: dx=None is a zero input tangent, and a parameter without τ (frozen) adds
none; dy is None when all are. The helpers below do tangent arithmetic with that convention.
"""
import torch
from torch import nn

MODES = ("linearized", "primal", "merged")


class DualModule(nn.Module):
    """Holds each base parameter θ0 as a buffer (shared with its source tensor, never trained) and its
    tangent direction τ, of the same shape and zeros at start, as the parameter ``self.tau[name]``;
    τ is absent for a frozen parameter. τ are the module's only parameters."""

    def __init__(self):
        super().__init__()
        self._mode = "linearized"
        self.tau = nn.ParameterDict()

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, mode: str) -> None:
        """Sets the mode of this module and of every DualModule inside it."""
        set_mode(self, mode)

    def register_dual(self, name: str, value: torch.Tensor | None) -> None:
        """Register θ0 = ``value`` (detached, same storage) as buffer ``name`` (not in ``state_dict()``, which
        holds τ alone: θ0 is the source model's) and τ = 0 as ``tau[name]``."""
        self.register_buffer(name, None if value is None else value.detach(), persistent=False)
        if value is not None:
            self.tau[name] = nn.Parameter(torch.zeros_like(value))

    def freeze(self, name: str) -> None:
        """Drop τ of ``name``: θ0 stays as it is in every mode."""
        del self.tau[name]

    def dual(self, name: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(θ, dθ) of parameter ``name`` in the current mode: (θ0, τ) linearized, (θ0, None) primal,
        (θ0 + τ, None) merged; τ None when frozen, θ None when the layer lacks the parameter."""
        theta = getattr(self, name)
        tau = self.tau[name] if name in self.tau else None
        if self._mode == "linearized":
            return theta, tau
        if self._mode == "primal" or tau is None:
            return theta, None
        return theta + tau, None


def set_mode(module: nn.Module, mode: str) -> None:
    """Set ``mode`` (one of MODES) on every DualModule in ``module``, itself included."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    for m in module.modules():
        if isinstance(m, DualModule):
            m._mode = mode


def add(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    """a + b for tangents, None being zero."""
    if a is None:
        return b
    return a if b is None else a + b


def apply(fn, t: torch.Tensor | None) -> torch.Tensor | None:
    """fn(t) for a linear map fn (reshape, slice, ...) of a tangent; None stays None."""
    return None if t is None else fn(t)


def cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """``t`` in ``dtype``; ``t`` itself where it has it (no ``.to`` that torch 2.11's compile could drop
    gradients through, see ``kfac_kernels._autograd.output``), None for None."""
    return t if t is None or t.dtype == dtype else t.to(dtype)


def chain(pair, *layers):
    """``pair`` (x, dx) through each of the dual ``layers`` that is not None, in order."""
    for layer in layers:
        if layer is not None:
            pair = layer(*pair)
    return pair
