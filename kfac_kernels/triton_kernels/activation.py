"""Triton kernels of ``dual_activation`` (math in ``kfac_kernels.activation``): elementwise over the
flattened tensors, f and f' in fp32. ``forward`` reads x, dx (and the gate h, dh) and writes y, dy;
``backward`` reads x, g (and h) and writes f'(x) ⊙ h ⊙ g (and f(x) ⊙ g)."""
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._backend import interpreting
from .common import on_input_device, or_empty

@triton.jit
def _tanh(x):
    """tanh x to fp32 rounding: its Taylor series to x⁹ for |x| < 1/4 (truncation < 1e-8 relative),
    else 2σ(2x) − 1, whose rounding error is then below 1e-6 relative."""
    x2 = x * x
    series = x * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0 + x2 * (62.0 / 2835.0)))))
    return tl.where(tl.abs(x) < 0.25, series, 2.0 * tl.sigmoid(2.0 * x) - 1.0)


@triton.jit
def _value_and_slope(x, KIND: tl.constexpr):
    """(f(x), f'(x)) in fp32 for the activation named KIND, in forms without cancellation (1 − σ(z) as
    σ(−z); 1 − tanh² z = 4 σ(2z) σ(−2z)). Constants: 1/√2, 1/√(2π), √(2/π)."""
    if KIND == "gelu":
        cdf = 0.5 * (1.0 + tl.erf(x * 0.7071067811865476))
        return x * cdf, cdf + x * tl.exp(-0.5 * x * x) * 0.3989422804014327
    elif KIND == "gelu_tanh":  # ½(1 + tanh u) = σ(2u)
        u2 = 2.0 * 0.7978845608028654 * (x + 0.044715 * x * x * x)
        s = tl.sigmoid(u2)
        return x * s, s + x * s * tl.sigmoid(-u2) * 2.0 * 0.7978845608028654 * (1.0 + 0.134145 * x * x)
    elif KIND == "quick_gelu":
        s = tl.sigmoid(1.702 * x)
        return x * s, s + 1.702 * x * s * tl.sigmoid(-1.702 * x)
    elif KIND == "relu":
        return tl.where(x <= 0.0, 0.0, x), tl.where(x <= 0.0, 0.0, 1.0)  # NaN: y NaN, slope 1 (as torch)
    elif KIND == "silu":
        s = tl.sigmoid(x)
        return x * s, s + x * s * tl.sigmoid(-x)
    else:  # tanh
        return _tanh(x), 4.0 * tl.sigmoid(2.0 * x) * tl.sigmoid(-2.0 * x)


@triton.jit
def _forward_kernel(x_ptr, dx_ptr, h_ptr, dh_ptr, y_ptr, dy_ptr, n, KIND: tl.constexpr, HAS_DX: tl.constexpr,
                    HAS_H: tl.constexpr, HAS_DH: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    x = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    f, slope = _value_and_slope(x, KIND)
    dy = tl.zeros((BLOCK,), dtype=tl.float32)
    if HAS_DX:
        dy = slope * tl.load(dx_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    if HAS_H:
        h = tl.load(h_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        dy = dy * h
        if HAS_DH:
            dy += f * tl.load(dh_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        f = f * h
    tl.store(y_ptr + offs, f.to(y_ptr.dtype.element_ty), mask=ok)
    tl.store(dy_ptr + offs, dy.to(dy_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _backward_kernel(g_ptr, x_ptr, h_ptr, gdx_ptr, gdh_ptr, n, KIND: tl.constexpr, HAS_H: tl.constexpr,
                     NEED_DX: tl.constexpr, NEED_DH: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    x = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    f, slope = _value_and_slope(x, KIND)
    if NEED_DX:
        gx = slope * g
        if HAS_H:
            gx = gx * tl.load(h_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        tl.store(gdx_ptr + offs, gx.to(gdx_ptr.dtype.element_ty), mask=ok)
    if NEED_DH:
        tl.store(gdh_ptr + offs, (f * g).to(gdh_ptr.dtype.element_ty), mask=ok)


def _flat(t):
    return None if t is None else t.contiguous()


def _launch(kernel, n, *args, **constexprs):
    if n:
        block = 1024
        kernel[(triton.cdiv(n, block),)](*args, n, BLOCK=block, **constexprs,
                                         **({} if interpreting() else dict(num_warps=4)))


@torch.library.custom_op("kfac_kernels::triton_dual_activation", mutates_args=())
@on_input_device
def forward(x: Tensor, dx: Optional[Tensor], h: Optional[Tensor], dh: Optional[Tensor],
            kind: str) -> tuple[Tensor, Tensor]:
    """(f(x) ⊙ h, f'(x) ⊙ dx ⊙ h + f(x) ⊙ dh), shaped like x, in x's dtype; dx, h, dh may be None."""
    x, dx, h, dh = map(_flat, (x, dx, h, dh))
    y, dy = torch.empty_like(x), torch.empty_like(x)
    _launch(_forward_kernel, x.numel(), x, *(x if t is None else t for t in (dx, h, dh)), y, dy, KIND=kind,
            HAS_DX=dx is not None, HAS_H=h is not None, HAS_DH=dh is not None)
    return y, dy


@forward.register_fake
def _(x, dx, h, dh, kind):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device), torch.empty(x.shape, dtype=x.dtype, device=x.device)


@torch.library.custom_op("kfac_kernels::triton_dual_activation_backward", mutates_args=())
@on_input_device
def backward(g: Tensor, x: Tensor, h: Optional[Tensor], kind: str, dx_dtype: Optional[torch.dtype],
             dh_dtype: Optional[torch.dtype]) -> tuple[Tensor, Tensor]:
    """(f'(x) ⊙ h ⊙ g in ``dx_dtype``, f(x) ⊙ g in ``dh_dtype``), shaped like x; a dtype of None: that gradient
    is not needed, and an empty tensor stands for it."""
    g, x, h = map(_flat, (g, x, h))
    gdx, gdh = _gradients(x, dx_dtype, dh_dtype)
    _launch(_backward_kernel, x.numel(), g, x, *(x if t is None else t for t in (h, gdx, gdh)), KIND=kind,
            HAS_H=h is not None, NEED_DX=dx_dtype is not None, NEED_DH=dh_dtype is not None)
    return or_empty(x, gdx, gdh)


@backward.register_fake
def _(g, x, h, kind, dx_dtype, dh_dtype):
    return or_empty(x, *_gradients(x, dx_dtype, dh_dtype))


def _gradients(x, *dtypes):
    return (None if dtype is None else torch.empty(x.shape, dtype=dtype, device=x.device) for dtype in dtypes)
