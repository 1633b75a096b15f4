"""Dual elementwise activations: y = f(x), dy = f'(x) ⊙ dx.

With a tangent, y and f'(x) are constants computed without autograd; only f'(x) is kept for the
backward of dy.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn


class DualActivation(nn.Module):
    """Base class: subclasses define ``f(x)`` (differentiable) and ``derivative(x, y)`` = f'(x)."""

    def f(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def derivative(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x, dx=None):
        if dx is None:
            return self.f(x), None
        with torch.no_grad():
            y = self.f(x)
            d = self.derivative(x, y)
        return y, d * dx


class DualGELU(DualActivation):
    """GELU. Exact: f = x Φ(x), f' = Φ(x) + x φ(x). ``approximate='tanh'``: f = ½x(1 + tanh u),
    u = c(x + 0.044715 x³), c = √(2/π); f' = ½(1 + tanh u) + ½x(1 − tanh² u) c (1 + 3·0.044715 x²)."""

    def __init__(self, approximate: str = "none"):
        super().__init__()
        if approximate not in ("none", "tanh"):
            raise ValueError(f"DualGELU: approximate must be 'none' or 'tanh', got {approximate!r}")
        self.approximate = approximate

    def f(self, x):
        return F.gelu(x, approximate=self.approximate)

    def derivative(self, x, y):
        if self.approximate == "none":
            cdf = 0.5 * (1 + torch.erf(x * math.sqrt(0.5)))
            return cdf + x * torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)
        c = math.sqrt(2 / math.pi)
        t = torch.tanh(c * (x + 0.044715 * x ** 3))
        return 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * c * (1 + 3 * 0.044715 * x * x)

    def extra_repr(self):
        return f"approximate={self.approximate!r}"


class DualQuickGELU(DualActivation):
    """QuickGELU (CLIP): f = x σ(1.702 x), f' = σ + 1.702 x σ (1 − σ)."""

    def f(self, x):
        return x * torch.sigmoid(1.702 * x)

    def derivative(self, x, y):
        s = torch.sigmoid(1.702 * x)
        return s + 1.702 * x * s * (1 - s)


class DualReLU(DualActivation):
    """ReLU: f = max(x, 0), f' = [x > 0]."""

    def f(self, x):
        return F.relu(x)

    def derivative(self, x, y):
        return (x > 0).to(x.dtype)


class DualTanh(DualActivation):
    """tanh: f' = 1 − f²."""

    def f(self, x):
        return torch.tanh(x)

    def derivative(self, x, y):
        return 1 - y * y
