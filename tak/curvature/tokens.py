"""Token handling shared by the fitting passes: layer tensors as (N, T, d) with their real-token
masks, token means and sums, and the probe cotangents of the feature output."""
import torch

from .outputs import batch_size, token_masks


class BatchTokens:
    """What a pass knows of the current batch: N and the (N, T) real-token masks by length T."""

    def __init__(self, batch):
        self.n = batch_size(batch)
        self.masks = token_masks(batch)

    def view(self, x: torch.Tensor):
        """(x as (N, T, d), its real-token mask or None), or (x, None) for a 2-D x (N, d).

        Sequence-first layouts (T, N, d) are recognized by N and transposed."""
        if x.dim() == 2:
            return x, None
        if x.dim() != 3:
            x = x.reshape(x.shape[0], -1, x.shape[-1])
        if x.shape[0] != self.n and x.shape[1] == self.n:
            x = x.transpose(0, 1)
        return x, self.masks.get(x.shape[1])

    def first_mask(self):
        return next(iter(self.masks.values()), None)


def token_mean(x: torch.Tensor, mask) -> torch.Tensor:
    """Mean over the real tokens: (N, T, d) -> (N, d)."""
    if mask is None:
        return x.mean(1)
    w = mask.to(x.dtype).unsqueeze(-1)
    return (x * w).sum(1) / w.sum(1).clamp_min(1)


def token_sum(x: torch.Tensor, mask) -> torch.Tensor:
    """Sum over the real tokens: (N, T, d) -> (N, d)."""
    return x.sum(1) if mask is None else (x * mask.to(x.dtype).unsqueeze(-1)).sum(1)


def probes(f: torch.Tensor, mc_samples: int, exact: bool, generator: torch.Generator, mask=None) -> torch.Tensor:
    """Cotangents s for the feature output f: M Gaussian samples (M, *f.shape), zero on padding
    tokens of a sequence output; or, when ``exact``, the C unit vectors (C, N, C) of f (N, C)."""
    if exact:
        if f.dim() != 2:
            raise ValueError(f"exact=True needs a feature output f of shape (N, C), got {tuple(f.shape)}; "
                             "use Monte-Carlo probes (mc_samples) for sequence outputs")
        C = f.shape[1]
        return torch.eye(C, dtype=f.dtype, device=f.device).unsqueeze(1).expand(C, f.shape[0], C)
    S = torch.randn((mc_samples, *f.shape), generator=generator, dtype=torch.float32).to(device=f.device, dtype=f.dtype)
    if mask is not None and f.dim() == 3 and mask.shape[1] == f.shape[1]:
        S = S * mask.unsqueeze(-1).to(S.dtype)
    return S
