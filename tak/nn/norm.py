"""Dual normalizations over the last dimension: LayerNorm and RMSNorm (T5).

Statistics are taken in at least fp32; outputs come back in x's dtype. With a tangent, the primal
and its statistics (mean, rstd, x̂) are constants computed once without autograd, and the tangent is
formed from them.
"""
import torch
import torch.nn.functional as F

from .base import DualModule, add


def _acc(x: torch.Tensor) -> torch.Tensor:
    """x in its accumulation dtype: fp32 for 16-bit floats, else its own."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _affine(xhat, dxhat, weight, dweight, dbias):
    """dy = dx̂ γ + x̂ dγ + dβ (None being zero; γ None means 1)."""
    if dxhat is not None and weight is not None:
        dxhat = dxhat * weight
    dy = add(add(dxhat, None if dweight is None else xhat * dweight), dbias)
    return None if dy is None else dy.expand(xhat.shape)


def layer_norm(x, dx, weight, dweight, bias, dbias, eps):
    """(y, dy) of y = x̂ γ + β, x̂ = (x − μ) r, r = (var(x) + eps)^(-1/2), over the last dim of x (..., d):
    dy = dx̂ γ + x̂ dγ + dβ with dx̂ = r (dx − mean(dx) − x̂ mean(x̂ ⊙ dx)). γ, β (d,) or None."""
    shape = (x.shape[-1],)
    if dx is None and dweight is None and dbias is None:
        return F.layer_norm(x, shape, weight, bias, eps), None
    with torch.no_grad():
        y, mean, rstd = torch.native_layer_norm(x, shape, weight, bias, eps)
        xhat = (_acc(x) - mean) * rstd
    dxhat = None
    if dx is not None:
        dxa = _acc(dx)
        dxhat = rstd * (dxa - dxa.mean(-1, keepdim=True) - xhat * (xhat * dxa).mean(-1, keepdim=True))
    return y, _affine(xhat, dxhat, weight, dweight, dbias).to(x.dtype)


def rms_norm(x, dx, weight, dweight, eps):
    """(y, dy) of y = γ x̂, x̂ = x r, r = (mean(x²) + eps)^(-1/2), over the last dim of x (..., d):
    dy = γ r (dx − x̂ mean(x̂ ⊙ dx)) + dγ x̂. γ (d,) or None."""
    if dx is None and dweight is None:
        xa = _acc(x)
        y = xa * torch.rsqrt(xa.pow(2).mean(-1, keepdim=True) + eps)
        return (y if weight is None else y * weight).to(x.dtype), None
    with torch.no_grad():
        xa = _acc(x)
        rstd = torch.rsqrt(xa.pow(2).mean(-1, keepdim=True) + eps)
        xhat = xa * rstd
        y = (xhat if weight is None else xhat * weight).to(x.dtype)
    dxhat = None
    if dx is not None:
        dxa = _acc(dx)
        dxhat = rstd * (dxa - xhat * (xhat * dxa).mean(-1, keepdim=True))
    return y, _affine(xhat, dxhat, weight, dweight, None).to(x.dtype)


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
    """RMSNorm (T5's LayerNorm: no mean, no bias) over the last dim with weight γ (d,): x (..., d) -> y."""

    def __init__(self, weight: torch.Tensor | None, eps: float = 1e-6):
        super().__init__()
        self.register_dual("weight", weight)
        self.eps = eps

    def forward(self, x, dx=None):
        return rms_norm(x, dx, *self.dual("weight"), self.eps)
