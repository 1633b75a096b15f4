"""Dual dropout: in training, y = x ⊙ m and dy = dx ⊙ m with one mask m (entries 0, or 1/(1 − p) with
probability 1 − p), as ``torch.func.jvp`` through ``nn.Dropout`` gives; the identity in eval mode."""
import torch
from torch import nn

from .base import apply


def dropout_mask(like: torch.Tensor, p: float) -> torch.Tensor:
    """m of ``like``'s shape, dtype and device: 0 with probability p, else 1/(1 − p) (all 0 for p = 1)."""
    keep = torch.empty_like(like).bernoulli_(1.0 - p)
    return keep.div_(1.0 - p) if p < 1.0 else keep


class DualDropout(nn.Module):
    """Dropout of probability ``p`` on x (...) and its tangent, sharing one mask."""

    def __init__(self, p: float):
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"{type(self).__name__}: p must be in [0, 1], got {p}")
        self.p = float(p)

    def forward(self, x, dx=None):
        if not self.training or self.p == 0.0:
            return x, dx
        m = dropout_mask(x, self.p)
        return x * m, apply(lambda t: t * m, dx)

    def extra_repr(self):
        return f"p={self.p}"
