"""Triton kernels of ``dual_layer_norm`` / ``dual_rms_norm`` (math in ``kfac_kernels.norm``).

``forward``: each program normalizes BLOCK_M whole rows (BLOCK_D ≥ d columns) in fp32: one read of
x and dx, one write of y and dy, and the statistics μ, r (fp32, one per row) for the backward.
``backward``: grad dx = J (γ ⊙ g) per row from x, μ, r; grad dγ = Σ g ⊙ x̂ and grad dβ = Σ g as
fp32 partial sums, one row of partials per program (programs stride over the row tiles), summed after.
Rows may have any stride; columns must be unit-stride.
"""
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._backend import interpreting
from .common import on_input_device, or_empty


def _launch_config(d: int) -> dict:
    """A whole row per program, BLOCK_M rows at a time: about 4096 elements per program on a GPU."""
    block_d = triton.next_power_of_2(d)
    block_m = max(1, min(16, 4096 // block_d))
    if interpreting():
        return dict(BLOCK_M=block_m, BLOCK_D=block_d)
    return dict(BLOCK_M=block_m, BLOCK_D=block_d, num_warps=min(16, max(4, block_m * block_d // 512)))


@triton.jit
def _weight(w_ptr, cols, col_ok, HAS: tl.constexpr, BLOCK_D: tl.constexpr):
    """The (BLOCK_D,) fp32 vector at w_ptr, or ones when absent."""
    if HAS:
        return tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    else:
        return tl.full((BLOCK_D,), 1.0, tl.float32)


@triton.jit
def _forward_kernel(
    x_ptr, dx_ptr, w_ptr, dw_ptr, b_ptr, db_ptr, y_ptr, dy_ptr, mean_ptr, rstd_ptr,
    M, D, s_x, s_dx, s_y, s_dy, eps,
    RMS: tl.constexpr, HAS_DX: tl.constexpr, HAS_W: tl.constexpr, HAS_DW: tl.constexpr,
    HAS_B: tl.constexpr, HAS_DB: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    row_ok, col_ok = rows < M, cols < D
    mask = row_ok[:, None] & col_ok[None, :]
    x = tl.load(x_ptr + rows[:, None] * s_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if RMS:
        xc = x
    else:
        mean = tl.sum(x, axis=1) / D
        tl.store(mean_ptr + rows, mean, mask=row_ok)
        xc = tl.where(mask, x - mean[:, None], 0.0)
    rstd = tl.rsqrt(tl.sum(xc * xc, axis=1) / D + eps)
    tl.store(rstd_ptr + rows, rstd, mask=row_ok)
    xhat = xc * rstd[:, None]
    w = _weight(w_ptr, cols, col_ok, HAS_W, BLOCK_D)
    y = xhat * w[None, :]
    if HAS_B:
        y += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rows[:, None] * s_y + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)
    dy = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    if HAS_DX:
        dx = tl.load(dx_ptr + rows[:, None] * s_dx + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        t = dx - xhat * (tl.sum(xhat * dx, axis=1) / D)[:, None]
        if not RMS:
            t -= (tl.sum(dx, axis=1) / D)[:, None]
        dy = t * rstd[:, None] * w[None, :]
    if HAS_DW:
        dy += xhat * tl.load(dw_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_DB:
        dy += tl.load(db_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(dy_ptr + rows[:, None] * s_dy + cols[None, :], dy.to(dy_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _backward_kernel(
    g_ptr, x_ptr, mean_ptr, rstd_ptr, w_ptr, gdx_ptr, pw_ptr, pb_ptr, M, D, s_g, s_x, s_gdx,
    RMS: tl.constexpr, HAS_W: tl.constexpr, NEED_DX: tl.constexpr, NEED_DW: tl.constexpr,
    NEED_DB: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < D
    w = _weight(w_ptr, cols, col_ok, HAS_W, BLOCK_D)
    acc_w = tl.zeros((BLOCK_D,), dtype=tl.float32)
    acc_b = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for tile in range(pid, tl.cdiv(M, BLOCK_M), tl.num_programs(0)):
        rows = tile * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)  # tile · BLOCK_M ≤ M fits int32
        row_ok = rows < M
        mask = row_ok[:, None] & col_ok[None, :]
        g = tl.load(g_ptr + rows[:, None] * s_g + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + rows[:, None] * s_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)
        if RMS:
            xhat = x * rstd[:, None]
        else:
            mean = tl.load(mean_ptr + rows, mask=row_ok, other=0.0)
            xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        if NEED_DX:
            gw = g * w[None, :]
            t = gw - xhat * (tl.sum(xhat * gw, axis=1) / D)[:, None]
            if not RMS:
                t -= (tl.sum(gw, axis=1) / D)[:, None]
            gdx = t * rstd[:, None]
            tl.store(gdx_ptr + rows[:, None] * s_gdx + cols[None, :], gdx.to(gdx_ptr.dtype.element_ty), mask=mask)
        if NEED_DW:
            acc_w += tl.sum(g * xhat, axis=0)
        if NEED_DB:
            acc_b += tl.sum(g, axis=0)
    if NEED_DW:
        tl.store(pw_ptr + pid * D + cols, acc_w, mask=col_ok)
    if NEED_DB:
        tl.store(pb_ptr + pid * D + cols, acc_b, mask=col_ok)


@torch.library.custom_op("kfac_kernels::triton_dual_norm", mutates_args=())
@on_input_device
def forward(x: Tensor, dx: Optional[Tensor], w: Optional[Tensor], dw: Optional[Tensor], b: Optional[Tensor],
            db: Optional[Tensor], eps: float, rms: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(y, dy, mean, rstd): y, dy (M, d) in x's dtype; mean (M,) fp32 (empty for RMS), rstd (M,) fp32."""
    M, d = x.shape
    y, dy, mean, rstd = _forward_fake(x, dx, w, dw, b, db, eps, rms)
    if M == 0:
        return y, dy, mean, rstd
    cfg = _launch_config(d)
    _forward_kernel[(triton.cdiv(M, cfg["BLOCK_M"]),)](
        x, x if dx is None else dx, *(y if t is None else t for t in (w, dw, b, db)), y, dy,
        rstd if mean is None else mean, rstd, M, d, x.stride(0), 0 if dx is None else dx.stride(0),
        y.stride(0), dy.stride(0), eps,
        RMS=rms, HAS_DX=dx is not None, HAS_W=w is not None, HAS_DW=dw is not None, HAS_B=b is not None,
        HAS_DB=db is not None, **cfg,
    )
    return y, dy, mean, rstd


@forward.register_fake
def _forward_fake(x, dx, w, dw, b, db, eps, rms):
    M = x.shape[0]
    y, dy = torch.empty(x.shape, dtype=x.dtype, device=x.device), torch.empty(x.shape, dtype=x.dtype, device=x.device)
    return y, dy, x.new_empty(0 if rms else M, dtype=torch.float32), x.new_empty(M, dtype=torch.float32)


def _programs(tiles: int, device: torch.device) -> int:
    """Programs for a backward that sums over rows: a few per SM, each striding over the row tiles."""
    if interpreting() or device.type != "cuda":
        return min(tiles, 8)
    return min(tiles, 4 * torch.cuda.get_device_properties(device).multi_processor_count)


@torch.library.custom_op("kfac_kernels::triton_dual_norm_backward", mutates_args=())
@on_input_device
def backward(g: Tensor, x: Tensor, mean: Tensor, rstd: Tensor, w: Optional[Tensor], need_dx: bool, need_dw: bool,
             need_db: bool, rms: bool, dx_dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """(grad dx in ``dx_dtype``, grad dγ fp32, grad dβ fp32) for g, x (M, d); an empty tensor where not needed.
    ``mean`` is not read for RMS."""
    M, d = x.shape
    if g.stride(-1) != 1:
        g = g.contiguous()
    gdx = x.new_empty((M, d), dtype=dx_dtype) if need_dx else None
    cfg = _launch_config(d)
    tiles = triton.cdiv(M, cfg["BLOCK_M"])
    programs = _programs(tiles, x.device) if need_dw or need_db else tiles
    pw, pb = (x.new_zeros((max(programs, 1), d), dtype=torch.float32) if need else None for need in (need_dw, need_db))
    if M > 0:
        _backward_kernel[(programs,)](
            g, x, *(rstd if t is None else t for t in (None if rms else mean, rstd, w, gdx, pw, pb)),
            M, d, g.stride(0), x.stride(0), 0 if gdx is None else gdx.stride(0),
            RMS=rms, HAS_W=w is not None, NEED_DX=need_dx, NEED_DW=need_dw, NEED_DB=need_db, **cfg,
        )
    return or_empty(x, gdx, *(None if t is None else t.sum(0) for t in (pw, pb)))


@backward.register_fake
def _(g, x, mean, rstd, w, need_dx, need_dw, need_db, rms, dx_dtype):
    M, d = x.shape
    return (x.new_empty((M, d) if need_dx else 0, dtype=dx_dtype if need_dx else x.dtype),
            *(x.new_empty(d if need else 0, dtype=torch.float32 if need else x.dtype) for need in (need_dw, need_db)))
