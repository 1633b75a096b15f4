"""Triton kernels of ``dual_linear``: the fused primal + tangent forward and the backward GEMMs.

``forward``: y = x Wᵀ + b, dy = dx Wᵀ + x dWᵀ + db for x, dx (M, K) and W, dW (N, K). Each program
owns one (BLOCK_M, BLOCK_N) tile of both outputs: per K step it loads the tiles of x, dx, W, dW once
and feeds two fp32 accumulators; the epilogue adds the biases and stores y and dy.
``matmul``: C = Σ_i A_i B_i over one or two products (A_i (M, K), B_i (K, N)) in one fp32 accumulator.
Both are stride-generic (transposed views cost nothing) and multiply tiles as ``common.dot_mode``
says for the compute dtype. Both are ``torch.library`` ops, opaque to ``torch.compile``.
"""
from typing import Optional

import torch
from torch import Tensor
import triton
import triton.language as tl

from .._backend import interpreting
from .common import dot_acc, dot_mode, grouped_tile, launch_fitting, layout, on_input_device


def _launch_config(dot: str, *operands):
    """Tile sizes and launch options: GPU-sized, or small ones for the CPU interpreter.

    On tensor cores, 128 × 128 tiles; four operand tiles are staged per K step, 32 KiB per stage and
    operand byte: 3 stages of 16-bit tiles (96 KiB of shared memory), 2 of 32-bit ones (128 KiB, within
    an A100's 164 KiB; ``launch_fitting`` takes fewer where the GPU has less), 1 of 64-bit. Operands with any strides pass through registers on their way to
    shared memory, and IEEE fp32 ('ieee') multiplies on FMA units with operand rows in registers: both
    take 64 × 64 tiles (K steps of 16 for 'ieee'), the sizes at which ptxas needs no spills (sm_90).
    """
    if interpreting():
        return dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=2, num_stages=1)
    size = max(t.element_size() for t in operands)
    stages = 3 if size <= 2 else 2 if size == 4 else 1
    block = 128 if dot != "ieee" and all(layout(t) for t in operands) else 64
    return dict(BLOCK_M=block, BLOCK_N=block, BLOCK_K=16 if dot == "ieee" else 32, GROUP_M=8,
                num_warps=8, num_stages=stages)


@triton.jit
def _forward_kernel(
    x_ptr, dx_ptr, w_ptr, dw_ptr, b_ptr, db_ptr, y_ptr, dy_ptr, M, N, K,
    s_xm, s_xk, s_dxm, s_dxk, s_wn, s_wk, s_dwn, s_dwk, s_b, s_db, s_ym, s_yn, s_dym, s_dyn,
    HAS_B: tl.constexpr, HAS_DB: tl.constexpr, DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    rm, rn = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rk = tl.arange(0, BLOCK_K).to(tl.int64)  # offsets in int64, as rm and rn: a K stride may be ≥ 2³¹ / BLOCK_K
    k_step = tl.full((), BLOCK_K, tl.int64)
    x_ptrs = x_ptr + rm[:, None] * s_xm + rk[None, :] * s_xk
    dx_ptrs = dx_ptr + rm[:, None] * s_dxm + rk[None, :] * s_dxk
    w_ptrs = w_ptr + rk[:, None] * s_wk + rn[None, :] * s_wn  # a (BLOCK_K, BLOCK_N) tile of Wᵀ
    dw_ptrs = dw_ptr + rk[:, None] * s_dwk + rn[None, :] * s_dwn
    acc_y = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_dy = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        a_mask = (rm[:, None] < M) & (rk[None, :] < k_left)
        b_mask = (rk[:, None] < k_left) & (rn[None, :] < N)
        x = tl.load(x_ptrs, mask=a_mask, other=0.0)
        dx = tl.load(dx_ptrs, mask=a_mask, other=0.0)
        w = tl.load(w_ptrs, mask=b_mask, other=0.0)
        dw = tl.load(dw_ptrs, mask=b_mask, other=0.0)
        acc_y = dot_acc(x, w, acc_y, DOT)
        acc_dy = dot_acc(dx, w, acc_dy, DOT)
        acc_dy = dot_acc(x, dw, acc_dy, DOT)
        x_ptrs += k_step * s_xk
        dx_ptrs += k_step * s_dxk
        w_ptrs += k_step * s_wk
        dw_ptrs += k_step * s_dwk
    if HAS_B:
        acc_y += tl.load(b_ptr + rn * s_b, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    if HAS_DB:
        acc_dy += tl.load(db_ptr + rn * s_db, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    tl.store(y_ptr + rm[:, None] * s_ym + rn[None, :] * s_yn, acc_y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(dy_ptr + rm[:, None] * s_dym + rn[None, :] * s_dyn, acc_dy.to(dy_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _matmul_kernel(
    a1_ptr, b1_ptr, a2_ptr, b2_ptr, c_ptr, M, N, K,
    s_a1m, s_a1k, s_b1k, s_b1n, s_a2m, s_a2k, s_b2k, s_b2n, s_cm, s_cn,
    TWO: tl.constexpr, DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    rm, rn = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rk = tl.arange(0, BLOCK_K).to(tl.int64)  # offsets in int64, as rm and rn: a K stride may be ≥ 2³¹ / BLOCK_K
    k_step = tl.full((), BLOCK_K, tl.int64)
    a1_ptrs = a1_ptr + rm[:, None] * s_a1m + rk[None, :] * s_a1k
    b1_ptrs = b1_ptr + rk[:, None] * s_b1k + rn[None, :] * s_b1n
    a2_ptrs = a2_ptr + rm[:, None] * s_a2m + rk[None, :] * s_a2k
    b2_ptrs = b2_ptr + rk[:, None] * s_b2k + rn[None, :] * s_b2n
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        a_mask = (rm[:, None] < M) & (rk[None, :] < k_left)
        b_mask = (rk[:, None] < k_left) & (rn[None, :] < N)
        a1 = tl.load(a1_ptrs, mask=a_mask, other=0.0)
        b1 = tl.load(b1_ptrs, mask=b_mask, other=0.0)
        acc = dot_acc(a1, b1, acc, DOT)
        a1_ptrs += k_step * s_a1k
        b1_ptrs += k_step * s_b1k
        if TWO:
            a2 = tl.load(a2_ptrs, mask=a_mask, other=0.0)
            b2 = tl.load(b2_ptrs, mask=b_mask, other=0.0)
            acc = dot_acc(a2, b2, acc, DOT)
            a2_ptrs += k_step * s_a2k
            b2_ptrs += k_step * s_b2k
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    tl.store(c_ptr + rm[:, None] * s_cm + rn[None, :] * s_cn, acc.to(c_ptr.dtype.element_ty), mask=mask)


def _grid(M, N, cfg):
    return (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)


@torch.library.custom_op("kfac_kernels::triton_dual_linear", mutates_args=())
@on_input_device
def forward(x: Tensor, dx: Tensor, w: Tensor, dw: Tensor, b: Optional[Tensor], db: Optional[Tensor],
            ct: torch.dtype) -> tuple[Tensor, Tensor]:
    """(y, dy) in ``ct``: x, dx (M, K); w, dw (N, K); b, db (N,) or None."""
    M, K = x.shape
    N = w.shape[0]
    y = x.new_empty((M, N), dtype=ct)
    dy = x.new_empty((M, N), dtype=ct)
    if y.numel() == 0:
        return y, dy
    dot = dot_mode(ct)
    cfg = _launch_config(dot, x, dx, w, dw)
    launch_fitting(
        _forward_kernel, _grid(M, N, cfg), x, dx, w, dw, y if b is None else b, y if db is None else db, y, dy, M, N, K,
        *x.stride(), *dx.stride(), *w.stride(), *dw.stride(),
        0 if b is None else b.stride(0), 0 if db is None else db.stride(0), *y.stride(), *dy.stride(),
        HAS_B=b is not None, HAS_DB=db is not None, DOT=dot, **cfg,
    )
    return y, dy


@forward.register_fake
def _(x, dx, w, dw, b, db, ct):
    return x.new_empty((x.shape[0], w.shape[0]), dtype=ct), x.new_empty((x.shape[0], w.shape[0]), dtype=ct)


@torch.library.custom_op("kfac_kernels::triton_matmul", mutates_args=())
@on_input_device
def matmul(a: list[Tensor], b: list[Tensor], ct: torch.dtype, out_dtype: torch.dtype) -> Tensor:
    """Σ_i a[i] @ b[i] over one or two products (a[i] (M, K), b[i] (K, N)), multiplied in ``ct``."""
    (a1, *rest_a), (b1, *rest_b) = a, b
    a2, b2 = (rest_a[0], rest_b[0]) if rest_a else (a1, b1)
    M, K = a1.shape
    N = b1.shape[1]
    c = a1.new_empty((M, N), dtype=out_dtype)
    if c.numel() == 0:
        return c
    dot = dot_mode(ct)
    cfg = _launch_config(dot, a1, b1, a2, b2)
    launch_fitting(
        _matmul_kernel, _grid(M, N, cfg), a1, b1, a2, b2, c, M, N, K,
        *a1.stride(), *b1.stride(), *a2.stride(), *b2.stride(), *c.stride(),
        TWO=bool(rest_a), DOT=dot, **cfg,
    )
    return c


@matmul.register_fake
def _(a, b, ct, out_dtype):
    return a[0].new_empty((a[0].shape[0], b[0].shape[1]), dtype=out_dtype)
