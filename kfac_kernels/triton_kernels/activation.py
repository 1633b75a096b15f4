"""Triton kernels of ``dual_activation`` (math in ``kfac_kernels.activation``): elementwise over the
flattened tensors, f and f' in fp32. ``forward`` reads x, dx and writes y, dy; ``backward`` reads x, g
and writes f'(x) ⊙ g."""
import torch
import triton
import triton.language as tl

from .._backend import interpreting

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
        return tl.maximum(x, 0.0), tl.where(x > 0.0, 1.0, 0.0)
    else:  # tanh
        return _tanh(x), 4.0 * tl.sigmoid(2.0 * x) * tl.sigmoid(-2.0 * x)


@triton.jit
def _forward_kernel(x_ptr, dx_ptr, y_ptr, dy_ptr, n, KIND: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    x = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    dx = tl.load(dx_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    f, slope = _value_and_slope(x, KIND)
    tl.store(y_ptr + offs, f.to(y_ptr.dtype.element_ty), mask=ok)
    tl.store(dy_ptr + offs, (slope * dx).to(dy_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _backward_kernel(g_ptr, x_ptr, gdx_ptr, n, KIND: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    x = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    _, slope = _value_and_slope(x, KIND)
    tl.store(gdx_ptr + offs, (slope * g).to(gdx_ptr.dtype.element_ty), mask=ok)


def _launch(kernel, a, b, outs, kind):
    """Run ``kernel`` over the flattened a, b (made contiguous) into ``outs`` (new, shaped like a)."""
    a, b = a.contiguous(), b.contiguous()
    n = a.numel()
    if n:
        block = 1024
        kernel[(triton.cdiv(n, block),)](a, b, *outs, n, KIND=kind, BLOCK=block,
                                         **({} if interpreting() else dict(num_warps=4)))
    return outs


def forward(x, dx, kind: str):
    """(f(x), f'(x) ⊙ dx), both shaped like x, in x's dtype."""
    return _launch(_forward_kernel, x, dx, (torch.empty_like(x, memory_format=torch.contiguous_format),
                                           torch.empty_like(x, memory_format=torch.contiguous_format)), kind)


def backward(g, x, kind: str, dtype: torch.dtype):
    """f'(x) ⊙ g, shaped like x, in ``dtype``."""
    out = torch.empty_like(x, dtype=dtype, memory_format=torch.contiguous_format)
    return _launch(_backward_kernel, g, x, (out,), kind)[0]
