"""Dual dropout: in training, y = x ⊙ m and dy = dx ⊙ m with one mask m (entries 0, or 1/(1 − p) with
probability 1 − p), as ``torch.func.jvp`` through ``nn.Dropout`` gives; and patch dropout (open_clip's
``PatchDropout``: a random subset of the tokens kept, the same for x and dx). The identity in eval mode."""
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


class DualPatchDropout(nn.Module):
    """open_clip's ``PatchDropout`` on tokens x (B, L, d) and their tangent: in training, each example keeps
    max(1, ⌊n·(1 − prob)⌋) of its n tokens (the first, the class token, always when ``exclude_first_token``),
    chosen as the top-k of ``torch.randn(B, n)`` (the source's draw, so both keep the same tokens)."""

    def __init__(self, prob: float, exclude_first_token: bool = True):
        super().__init__()
        self.prob, self.exclude_first_token = float(prob), bool(exclude_first_token)

    def forward(self, x, dx=None):
        if not self.training or self.prob == 0.0:
            return x, dx
        first = 1 if self.exclude_first_token else 0
        B, n = x.shape[0], x.shape[1] - first
        keep = torch.randn(B, n).topk(max(1, int(n * (1 - self.prob))), dim=-1).indices.to(x.device) + first
        if first:
            keep = torch.cat([keep.new_zeros(B, 1), keep], 1)
        rows = torch.arange(B, device=x.device)[:, None]
        return x[rows, keep], apply(lambda t: t[rows, keep], dx)

    def extra_repr(self):
        return f"prob={self.prob}, exclude_first_token={self.exclude_first_token}"
