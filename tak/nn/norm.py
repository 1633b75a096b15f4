"""Dual normalizations over the last dimension: LayerNorm and RMSNorm (T5).

With a tangent they are ``kfac_kernels.dual_layer_norm`` / ``dual_rms_norm`` (one fused op on CUDA):
the primal is a constant, and the backward of the tangent reuses the saved statistics (μ, r).
"""
import torch
import torch.nn.functional as F

import kfac_kernels as kk

from .base import DualModule, cast


def layer_norm(x, dx, weight, dweight, bias, dbias, eps):
    """(y, dy) of y = x̂ γ + β, x̂ = (x − μ) r, r = (var(x) + eps)^(-1/2), over the last dim of x (..., d):
    dy = dx̂ γ + x̂ dγ + dβ with dx̂ = r (dx − mean(dx) − x̂ mean(x̂ ⊙ dx)). γ, β (d,) or None; None
    tangents are zeros, and dy is None when all are."""
    if dx is None and dweight is None and dbias is None:
        return F.layer_norm(x, (x.shape[-1],), weight, bias, eps), None
    return kk.dual_layer_norm(x, dx, weight, dweight, bias, dbias, eps=eps)


def rms_norm(x, dx, weight, dweight, eps):
    """(y, dy) of y = γ x̂, x̂ = x r, r = (mean(x²) + eps)^(-1/2), over the last dim of x (..., d):
    dy = γ r (dx − x̂ mean(x̂ ⊙ dx)) + dγ x̂. γ (d,) or None. Statistics in fp32 for 16-bit x; y, dy in
    T5LayerNorm's dtype: a 16-bit γ's, else x's promoted with γ's (a 16-bit T5 keeps ``wo`` in fp32, so its
    residual stream turns fp32 and its norms bring it back to 16 bits)."""
    half = (torch.float16, torch.bfloat16)
    if weight is None:
        out = x.dtype
    else:
        out = weight.dtype if weight.dtype in half else torch.promote_types(x.dtype, weight.dtype)
    if dx is None and dweight is None:
        xa = x.float() if x.dtype in half else x
        y = xa * torch.rsqrt(xa.pow(2).mean(-1, keepdim=True) + eps)
        return (y if weight is None else y * weight).to(out), None
    y, dy = kk.dual_rms_norm(x, dx, weight, dweight, eps=eps)
    return cast(y, out), cast(dy, out)


class DualLayerNorm(DualModule):
    """LayerNorm over the last dim with weight γ and bias β (d,), either None: x (..., d) -> y (..., d)."""

    def __init__(self, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float = 1e-5):
        super().__init__()
        self.register_dual("weight", weight)
        self.register_dual("bias", bias)
        self.eps = eps

    def forward(self, x, dx=None):
        return layer_norm(x, dx, *self.dual("weight"), *self.dual("bias"), self.eps)


class DualRMSNorm(DualModule):
    """RMSNorm (T5's LayerNorm: no mean, no bias) over the last dim with weight γ (d,): x (..., d) -> y. With an
    ``offset`` c ≠ 0, Gemma's: y = x̂ ⊙ (c + γ), computed in at least fp32 and returned in x's dtype."""

    def __init__(self, weight: torch.Tensor | None, eps: float = 1e-6, offset: float = 0.0):
        super().__init__()
        self.register_dual("weight", weight)
        self.eps, self.offset = eps, offset

    def forward(self, x, dx=None):
        weight, dweight = self.dual("weight")
        if not self.offset:
            return rms_norm(x, dx, weight, dweight, self.eps)
        y, dy = rms_norm(x, dx, self.offset + weight.to(torch.promote_types(weight.dtype, torch.float32)), dweight,
                         self.eps)
        return cast(y, x.dtype), cast(dy, x.dtype)

    def extra_repr(self):
        return f"eps={self.eps}" + (f", offset={self.offset}" if self.offset else "")
