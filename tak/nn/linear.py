"""Dual affine layers: linear (and Hugging Face's Conv1D, its transpose), patch embedding (a convolution with
stride = kernel), embedding lookup and layer scale (a learned per-channel factor)."""
import torch
import torch.nn.functional as F

import kfac_kernels as kk

from .base import DualModule, add, apply


def linear(x, dx, weight, dweight=None, bias=None, dbias=None):
    """(y, dy) of y = x Wᵀ + b: dy = dx Wᵀ + x dWᵀ + db, for x, dx (..., d_in), W, dW (d_out, d_in) and
    b, db (d_out,). None tangents are zeros; dy is None when all are. With both dx and dW this is
    ``kfac_kernels.dual_linear`` (one fused op on CUDA)."""
    if dx is None and dweight is None and dbias is None:
        return F.linear(x, weight, bias), None
    if dx is not None and dweight is not None:
        y, dy = kk.dual_linear(x, dx, weight, dweight, bias, dbias)
        return y.detach(), dy
    with torch.no_grad():
        y = F.linear(x, weight, bias)
    if dx is not None:
        return y, F.linear(dx, weight, dbias)
    if dweight is not None:
        return y, F.linear(x, dweight, dbias)
    return y, dbias.expand(y.shape)


class DualLinear(DualModule):
    """y = x Wᵀ + b with W (d_out, d_in), b (d_out,) or None; x (..., d_in) -> y (..., d_out)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.register_dual("weight", weight)
        self.register_dual("bias", bias)

    def forward(self, x, dx=None):
        return linear(x, dx, *self.dual("weight"), *self.dual("bias"))


class DualConv1D(DualModule):
    """y = x W + b with W (d_in, d_out), b (d_out,) or None: Hugging Face's ``Conv1D`` (GPT-2's linear maps), the
    linear map of Wᵀ; x (..., d_in) -> y (..., d_out)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.register_dual("weight", weight)
        self.register_dual("bias", bias)

    def forward(self, x, dx=None):
        w, dw = self.dual("weight")
        return linear(x, dx, w.T, apply(lambda t: t.T, dw), *self.dual("bias"))


class DualPatchEmbedding(DualModule):
    """A convolution with stride = kernel as the linear map of flattened patches.

    Weight (d, C, p_h, p_w), bias (d,) or None; images x (B, C, H, W) -> tokens (B, (H//p_h)·(W//p_w), d),
    patches in row-major grid order, each flattened as (C, p_h, p_w) like the weight; a remainder of
    H or W that fills no whole patch is dropped, as the convolution does."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.register_dual("weight", weight)
        self.register_dual("bias", bias)

    def patches(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, N, C·p_h·p_w)."""
        B, C, H, W = x.shape
        ph, pw = self.weight.shape[2:]
        gh, gw = H // ph, W // pw
        x = x[:, :, :gh * ph, :gw * pw].reshape(B, C, gh, ph, gw, pw)
        return x.permute(0, 2, 4, 1, 3, 5).reshape(B, gh * gw, C * ph * pw)

    def forward(self, x, dx=None):
        (w, dw), (b, db) = self.dual("weight"), self.dual("bias")
        flat = w.shape[0], -1
        return linear(self.patches(x), None if dx is None else self.patches(dx), w.reshape(flat),
                      None if dw is None else dw.reshape(flat), b, db)


class DualEmbedding(DualModule):
    """y = W[ids], dy = τ[ids] for a table W (n, d) and integer ids (...) -> (..., d). As in
    ``nn.Embedding``, the row ``padding_idx`` gets no gradient (it is not trained)."""

    def __init__(self, weight: torch.Tensor, padding_idx: int | None = None):
        super().__init__()
        self.register_dual("weight", weight)
        self.padding_idx = padding_idx

    def forward(self, ids):
        w, dw = self.dual("weight")
        y = F.embedding(ids, w, self.padding_idx)
        return y, None if dw is None else F.embedding(ids, dw, self.padding_idx)


class DualLayerScale(DualModule):
    """y = x ⊙ γ, dy = dx ⊙ γ + x ⊙ dγ for γ (d,) (LayerScale, Touvron et al. 2021): x (..., d) -> y (..., d)."""

    def __init__(self, gamma: torch.Tensor):
        super().__init__()
        self.register_dual("gamma", gamma)

    def forward(self, x, dx=None):
        g, dg = self.dual("gamma")
        return x * g, add(apply(lambda t: t * g, dx), apply(lambda t: x * t, dg))
