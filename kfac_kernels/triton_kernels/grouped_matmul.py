"""Grouped, stride-generic factor products with a fused reduction epilogue, in one launch.

Every quadratic form is a chain of products ``Y = ((X · diag(kscale)) F) · diag(nscale)`` where X
(M × K) and F (K × N) are strided views (a transpose is a stride swap), F is floating or int8
(dequantized in the kernel by the two scales), and the epilogue optionally reduces against a
strided T (M × N) into one fp32 partial per tile:

    reduce='dot':   partial = r · Σ T ⊙ Y        (quadratic forms:   ⟨τ, B τ A⟩)
    reduce='sqdot': partial = r · Σ T ⊙ Y²       (eigen forms:       Σ S ⊙ M²)

and optionally writes ``y · Y`` (or ``y · T ⊙ Y`` with ``times_t``). A launch runs many jobs of one
kind (same dtypes and flags): each program looks up its job and tile in small tables, so all layers
of a model take one launch per stage instead of a Python loop of small launches.
"""
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .. import _backend
from .common import TL_DTYPES, dot_acc, launch_fitting, layout

# Columns of the per-job int64 table.
(M, N, K, X_PTR, X_SM, X_SK, F_PTR, F_SK, F_SN, Y_PTR, Y_SM, Y_SN, T_PTR, T_SM, T_SN,
 KSCALE_PTR, NSCALE_PTR, TILES_N, NFIELDS) = range(19)

@triton.jit
def _grouped_matmul_kernel(
    table, tile_job, tile_first, scales, partials,
    X_DTYPE: tl.constexpr, F_DTYPE: tl.constexpr, Y_DTYPE: tl.constexpr, T_DTYPE: tl.constexpr,
    X_LAYOUT: tl.constexpr, F_LAYOUT: tl.constexpr, Y_LAYOUT: tl.constexpr, T_LAYOUT: tl.constexpr,
    NFIELDS: tl.constexpr, HAS_KSCALE: tl.constexpr, HAS_NSCALE: tl.constexpr,
    WRITE_Y: tl.constexpr, TIMES_T: tl.constexpr, REDUCE: tl.constexpr, DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    job = tl.load(tile_job + pid)
    row = table + job.to(tl.int64) * NFIELDS
    m_size = tl.load(row + 0)
    n_size = tl.load(row + 1)
    k_size = tl.load(row + 2)
    tiles_n = tl.load(row + 17)
    # The layouts promise that extents along unit strides are multiples of 16: say so, for vector loads.
    if X_LAYOUT == 1 or F_LAYOUT == 2:
        k_size = tl.multiple_of(k_size, 16)
    if X_LAYOUT == 2 or Y_LAYOUT == 2 or T_LAYOUT == 2:
        m_size = tl.multiple_of(m_size, 16)
    if F_LAYOUT == 1 or Y_LAYOUT == 1 or T_LAYOUT == 1:
        n_size = tl.multiple_of(n_size, 16)
    local = pid - tl.load(tile_first + job)
    rm = (local // tiles_n) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = (local % tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < m_size
    n_ok = rn < n_size

    # Each operand's LAYOUT (see ``layout``) is spelled out inline: the compiler's alignment hints
    # do not survive a call into a helper function.
    x_ptr = tl.load(row + 3).to(tl.pointer_type(X_DTYPE))
    x_sm = tl.load(row + 4)
    x_sk = tl.load(row + 5)
    if X_LAYOUT == 1:
        x_ptr, x_sm, x_sk = tl.multiple_of(x_ptr, 16), tl.multiple_of(x_sm, 16), 1
    elif X_LAYOUT == 2:
        x_ptr, x_sm, x_sk = tl.multiple_of(x_ptr, 16), 1, tl.multiple_of(x_sk, 16)
    f_ptr = tl.load(row + 6).to(tl.pointer_type(F_DTYPE))
    f_sk = tl.load(row + 7)
    f_sn = tl.load(row + 8)
    if F_LAYOUT == 1:
        f_ptr, f_sk, f_sn = tl.multiple_of(f_ptr, 16), tl.multiple_of(f_sk, 16), 1
    elif F_LAYOUT == 2:
        f_ptr, f_sk, f_sn = tl.multiple_of(f_ptr, 16), 1, tl.multiple_of(f_sn, 16)
    kscale_ptr = tl.load(row + 15).to(tl.pointer_type(tl.float32))
    x_ptrs = x_ptr + rm[:, None] * x_sm + rk[None, :] * x_sk
    f_ptrs = f_ptr + rk[:, None] * f_sk + rn[None, :] * f_sn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, k_size, BLOCK_K):
        k_ok = rk < k_size - k0
        x = tl.load(x_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        f = tl.load(f_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0)
        if F_DTYPE == tl.int8:  # int8 -> fp32 is exact, and the dot's own cast of it to bf16 then too
            f = f.to(tl.float32)
        if HAS_KSCALE:
            ks = tl.load(kscale_ptr + k0 + rk, mask=k_ok, other=0.0)
            x = x.to(tl.float32) * ks[None, :]
        acc = dot_acc(x, f, acc, DOT)
        x_ptrs += BLOCK_K * x_sk
        f_ptrs += BLOCK_K * f_sk

    if HAS_NSCALE:
        nscale_ptr = tl.load(row + 16).to(tl.pointer_type(tl.float32))
        acc = acc * tl.load(nscale_ptr + rn, mask=n_ok, other=0.0)[None, :]
    out_ok = m_ok[:, None] & n_ok[None, :]
    if REDUCE != "none" or TIMES_T:
        t_ptr = tl.load(row + 12).to(tl.pointer_type(T_DTYPE))
        t_sm = tl.load(row + 13)
        t_sn = tl.load(row + 14)
        if T_LAYOUT == 1:
            t_ptr, t_sm, t_sn = tl.multiple_of(t_ptr, 16), tl.multiple_of(t_sm, 16), 1
        elif T_LAYOUT == 2:
            t_ptr, t_sm, t_sn = tl.multiple_of(t_ptr, 16), 1, tl.multiple_of(t_sn, 16)
        t = tl.load(t_ptr + rm[:, None] * t_sm + rn[None, :] * t_sn, mask=out_ok, other=0.0).to(tl.float32)
    if REDUCE == "dot":  # (outside the job, acc can be 0·Inf = NaN where T is 0: left out, not multiplied)
        tl.store(partials + pid, tl.load(scales + 2 * job) * tl.sum(tl.where(out_ok, t * acc, 0.0)))
    elif REDUCE == "sqdot":
        tl.store(partials + pid, tl.load(scales + 2 * job) * tl.sum(tl.where(out_ok, t * acc * acc, 0.0)))
    if WRITE_Y:
        y = acc * tl.load(scales + 2 * job + 1)
        if TIMES_T:
            y = y * t
        y_ptr = tl.load(row + 9).to(tl.pointer_type(Y_DTYPE))
        y_sm = tl.load(row + 10)
        y_sn = tl.load(row + 11)
        if Y_LAYOUT == 1:
            y_ptr, y_sm, y_sn = tl.multiple_of(y_ptr, 16), tl.multiple_of(y_sm, 16), 1
        elif Y_LAYOUT == 2:
            y_ptr, y_sm, y_sn = tl.multiple_of(y_ptr, 16), 1, tl.multiple_of(y_sn, 16)
        tl.store(y_ptr + rm[:, None] * y_sm + rn[None, :] * y_sn, y.to(Y_DTYPE), mask=out_ok)


@dataclass
class Job:
    """Y[M×N] = ((X · diag(kscale)) F) · diag(nscale), then the epilogue (see module docstring).

    X, F, Y, T are any-stride views; the scales (fp32 vectors) are made contiguous here.
    ``reduce_scale`` (r) weights the reduction, ``y_scale`` (y) the written output."""

    X: torch.Tensor
    F: torch.Tensor
    Y: torch.Tensor | None = None
    T: torch.Tensor | None = None
    kscale: torch.Tensor | None = None
    nscale: torch.Tensor | None = None
    reduce: str = "none"
    times_t: bool = False
    reduce_scale: float = 1.0
    y_scale: float = 1.0
    dot: str = "ieee"

    def __post_init__(self):
        # The kernel reads the scales at ptr + index (no stride): make strided views (λ = M.diagonal()) dense.
        self.kscale = None if self.kscale is None else self.kscale.contiguous()
        self.nscale = None if self.nscale is None else self.nscale.contiguous()

    def kind(self) -> tuple:
        return (self.dot, *(layout(t) for t in (self.X, self.F, self.Y, self.T)), self.X.dtype, self.F.dtype, None if self.Y is None else self.Y.dtype,
                None if self.T is None else self.T.dtype, self.kscale is not None, self.nscale is not None,
                self.Y is not None, self.times_t, self.reduce)


def _tiles(dot: str) -> tuple[int, int, int, int, int]:
    """BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages."""
    if _backend.interpreting():
        return 32, 32, 32, 1, 1
    if dot in ("bf16", "fp16", "bf16_rounded"):
        return 128, 128, 64, 8, 3
    return 128, 128, 32, 8, 3


def run(jobs: list[Job]) -> torch.Tensor:
    """Run ``jobs`` (launch per kind, one stage: no job reads another's output); returns the sum of
    all reduction partials (0-dim fp32; 0 when no job reduces)."""
    device = jobs[0].X.device
    total = torch.zeros((), dtype=torch.float32, device=device)
    kinds: dict[tuple, list[Job]] = {}
    for job in jobs:
        if job.X.shape[0] and job.F.shape[1]:
            kinds.setdefault(job.kind(), []).append(job)
    for group in kinds.values():
        total = total + _launch(group, device)
    return total


def _launch(group: list[Job], device) -> torch.Tensor:
    j = group[0]
    bm, bn, bk, warps, stages = _tiles(j.dot)
    rows, scales, tiles = [], [], []
    for job in group:
        m, k = job.X.shape
        n = job.F.shape[1]
        tiles_n = triton.cdiv(n, bn)
        row = [0] * NFIELDS
        row[M], row[N], row[K], row[TILES_N] = m, n, k, tiles_n
        row[X_PTR], (row[X_SM], row[X_SK]) = job.X.data_ptr(), job.X.stride()
        row[F_PTR], (row[F_SK], row[F_SN]) = job.F.data_ptr(), job.F.stride()
        if job.Y is not None:
            row[Y_PTR], (row[Y_SM], row[Y_SN]) = job.Y.data_ptr(), job.Y.stride()
        if job.T is not None:
            row[T_PTR], (row[T_SM], row[T_SN]) = job.T.data_ptr(), job.T.stride()
        if job.kscale is not None:
            row[KSCALE_PTR] = job.kscale.data_ptr()
        if job.nscale is not None:
            row[NSCALE_PTR] = job.nscale.data_ptr()
        rows.append(row)
        scales += [job.reduce_scale, job.y_scale]
        tiles.append(triton.cdiv(m, bm) * tiles_n)
    counts = torch.tensor(tiles, dtype=torch.int32)
    first = torch.cumsum(counts, 0, dtype=torch.int32) - counts
    tile_job = torch.repeat_interleave(torch.arange(len(group), dtype=torch.int32), counts)
    n_tiles = int(counts.sum())
    table = torch.tensor(rows, dtype=torch.int64).to(device, non_blocking=True)
    partials = torch.empty(n_tiles if group[0].reduce != "none" else 1, dtype=torch.float32, device=device)
    launch_fitting(
        _grouped_matmul_kernel, (n_tiles,), table, tile_job.to(device, non_blocking=True), first.to(device, non_blocking=True),
        torch.tensor(scales, dtype=torch.float32).to(device, non_blocking=True), partials,
        X_DTYPE=TL_DTYPES[j.X.dtype], F_DTYPE=TL_DTYPES[j.F.dtype],
        Y_DTYPE=TL_DTYPES[j.Y.dtype] if j.Y is not None else tl.float32,
        T_DTYPE=TL_DTYPES[j.T.dtype] if j.T is not None else tl.float32,
        X_LAYOUT=layout(j.X), F_LAYOUT=layout(j.F), Y_LAYOUT=layout(j.Y), T_LAYOUT=layout(j.T),
        NFIELDS=NFIELDS, HAS_KSCALE=j.kscale is not None, HAS_NSCALE=j.nscale is not None,
        WRITE_Y=j.Y is not None, TIMES_T=j.times_t, REDUCE=j.reduce, DOT=j.dot,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages,
    )
    return partials.sum() if j.reduce != "none" else partials.new_zeros(())
