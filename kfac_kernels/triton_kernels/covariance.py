"""Triton kernel for ``covariance_update_``: C += scale · X̃ᵀ X̃ as a symmetric rank-k update.

X is (N, D) with any strides, C is (E, E) fp32 contiguous, E = D + append_ones. X̃ keeps the rows
whose mask is True and gets a ones column (index D) when append_ones. C is cut into BLOCK × BLOCK
tiles; only the lower-triangle tiles (i ≥ j) are computed, pair p ↦ (i, j) with p = i(i+1)/2 + j.

Split-K over rows fills the GPU when there are few tiles (D = 768: 21 tiles for 132 SMs). Each split
writes its partial tile to a workspace (split, pair, BLOCK, BLOCK), and a second kernel sums the
splits in a fixed order before updating C. We chose this over fp32 atomics into C because it is
deterministic (same bits on every run) and C is touched once, by the same epilogue as the unsplit
path. The workspace is bounded (64 MB); splitting also evens out the last wave at D = 3072
(300 tiles: 2.3 waves unsplit, 6.8 with 3 splits).

Exact symmetry: every lower-triangle value of C is computed once, from the lower-triangle tile,
and stored at both (r, c) and (c, r); on diagonal tiles the upper part is the mirror of the lower.
"""
import torch
import triton
import triton.language as tl

from .. import _backend
from .common import dot_acc, dot_mode, on_input_device


@triton.jit
def _pair(p):
    """Lower-triangle tile pair (i, j), i ≥ j, of the linear index p = i(i+1)/2 + j."""
    i = ((tl.sqrt(8.0 * p + 1.0) - 1.0) * 0.5).to(tl.int32)
    i = tl.where(i * (i + 1) // 2 > p, i - 1, i)
    i = tl.where((i + 1) * (i + 2) // 2 <= p, i + 1, i)
    return i, p - i * (i + 1) // 2


@triton.jit
def _load_x(X, rows, cols, keep, D, stride_n, stride_d, ONES: tl.constexpr):
    """Tile X̃[rows, cols] in X's dtype: dropped rows are zero, column D is ones if ONES."""
    ptrs = X + rows[:, None].to(tl.int64) * stride_n + cols[None, :].to(tl.int64) * stride_d
    x = tl.load(ptrs, mask=keep[:, None] & (cols[None, :] < D), other=0.0)
    if ONES:
        x = tl.where(keep[:, None] & (cols[None, :] == D), 1.0, x).to(X.dtype.element_ty)
    return x


@triton.jit
def _add_mirrored(C, E, rows, cols, part, scale):
    """C[r, c] = C[r, c] + scale·part for r ≥ c, and C[c, r] = that same value for r > c."""
    rows64 = rows.to(tl.int64)
    cols64 = cols.to(tl.int64)
    lower = (rows[:, None] < E) & (rows[:, None] >= cols[None, :])
    ptrs = C + rows64[:, None] * E + cols64[None, :]
    v = tl.load(ptrs, mask=lower, other=0.0) + scale * part
    tl.store(ptrs, v, mask=lower)
    strict_t = (rows[None, :] < E) & (rows[None, :] > cols[:, None])
    tl.store(C + cols64[:, None] * E + rows64[None, :], tl.trans(v), mask=strict_t)


@triton.jit
def _kept(M, rk, stop, stride_m, HAS_MASK: tl.constexpr):
    """Which rows rk (< stop, and True in the mask M when HAS_MASK) enter X̃."""
    keep = rk < stop
    if HAS_MASK:
        keep = keep & (tl.load(M + rk.to(tl.int64) * stride_m, mask=keep, other=0) != 0)
    return keep


@triton.jit
def _accumulate(
    acc, X, M, ri, rj, start, stop, D, stride_n, stride_d, stride_m,
    HAS_MASK: tl.constexpr, ONES_I: tl.constexpr, ONES_J: tl.constexpr,
    DOT: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """acc + X̃[start:stop, ri]ᵀ X̃[start:stop, rj]; ONES_*: that column block holds the ones column."""
    for k in range(start, stop, BLOCK_K):
        rk = k + tl.arange(0, BLOCK_K)
        keep = _kept(M, rk, stop, stride_m, HAS_MASK)
        a = _load_x(X, rk, ri, keep, D, stride_n, stride_d, ONES_I)
        b = _load_x(X, rk, rj, keep, D, stride_n, stride_d, ONES_J)
        acc = dot_acc(tl.trans(a), b, acc, DOT)
    return acc


@triton.jit
def _ones_row(
    X, M, rj, start, stop, D, stride_n, stride_d, stride_m,
    HAS_MASK: tl.constexpr, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Tile whose row block holds only the ones column (D % BLOCK == 0): row 0 is the column sums
    Σ_n X̃[n, rj] over the kept rows (the row count at column D), the other rows are zero."""
    sums = tl.zeros((BLOCK,), dtype=tl.float32)
    for k in range(start, stop, BLOCK_K):
        rk = k + tl.arange(0, BLOCK_K)
        keep = _kept(M, rk, stop, stride_m, HAS_MASK)
        b = _load_x(X, rk, rj, keep, D, stride_n, stride_d, True)
        sums += tl.sum(b.to(tl.float32), axis=0)
    return tl.where(tl.arange(0, BLOCK)[:, None] == 0, sums[None, :], 0.0)


@triton.jit
def _syrk_kernel(
    X, M, C, W, N, D, E, stride_n, stride_d, stride_m, n_pairs, rows_per_split, scale,
    HAS_MASK: tl.constexpr, APPEND_ONES: tl.constexpr, SPLIT: tl.constexpr,
    DOT: tl.constexpr, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Program pid = split·n_pairs + pair: X̃ᵀX̃ of one lower tile over one split's rows."""
    pid = tl.program_id(0)
    p = pid % n_pairs
    i, j = _pair(p)
    ri = i * BLOCK + tl.arange(0, BLOCK)
    rj = j * BLOCK + tl.arange(0, BLOCK)
    start = (pid // n_pairs) * rows_per_split
    stop = tl.minimum(start + rows_per_split, N)
    acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    args = (X, M, ri, rj, start, stop, D, stride_n, stride_d, stride_m, HAS_MASK)
    # Only the last tile row holds the ones column: the other tiles keep a loop whose loads go
    # straight to shared memory (the in-register fill would make every tile round-trip), and a
    # last row holding nothing else needs column sums, not a matrix product.
    if APPEND_ONES:
        ones_i = (i + 1) * BLOCK > D
    else:
        ones_i = False
    if ones_i:
        if i * BLOCK == D:
            acc = _ones_row(X, M, rj, start, stop, D, stride_n, stride_d, stride_m, HAS_MASK, BLOCK, BLOCK_K)
        elif i == j:
            acc = _accumulate(acc, *args, True, True, DOT, BLOCK_K)
        else:
            acc = _accumulate(acc, *args, True, False, DOT, BLOCK_K)
    else:
        acc = _accumulate(acc, *args, False, False, DOT, BLOCK_K)
    if SPLIT:
        local = tl.arange(0, BLOCK)
        tile = W + pid.to(tl.int64) * BLOCK * BLOCK
        tl.store(tile + local[:, None] * BLOCK + local[None, :], acc)
    else:
        _add_mirrored(C, E, ri, rj, acc, scale)


@triton.jit
def _reduce_kernel(W, C, E, n_pairs, n_splits, scale, BLOCK: tl.constexpr, STRIP: tl.constexpr):
    """Program (pair, strip): sums a STRIP × BLOCK strip of the split partials in split order."""
    p = tl.program_id(0)
    i, j = _pair(p)
    lr = tl.program_id(1) * STRIP + tl.arange(0, STRIP)
    lc = tl.arange(0, BLOCK)
    offs = lr[:, None] * BLOCK + lc[None, :]
    part = tl.zeros((STRIP, BLOCK), dtype=tl.float32)
    for s in range(n_splits):
        part += tl.load(W + (s * n_pairs + p).to(tl.int64) * BLOCK * BLOCK + offs)
    _add_mirrored(C, E, i * BLOCK + lr, j * BLOCK + lc, part, scale)


_WORKSPACE_BYTES = 64 << 20  # bound on the split-K partial tiles


def _config(dtype: torch.dtype, dot: str) -> dict:
    """Tile sizes: 128-wide tiles on a GPU (shared memory ≤ 128 KB), small ones for the interpreter."""
    if _backend.interpreting():
        return dict(BLOCK=16, BLOCK_K=16, STRIP=16, num_warps=1, num_stages=1)
    block_k = 64 if dtype in (torch.float16, torch.bfloat16) else 32
    return dict(BLOCK=128, BLOCK_K=block_k, STRIP=32, num_warps=8, num_stages=2 if dot == "ieee" else 3)


def num_splits(n_pairs: int, n_chunks: int, n_sm: int, max_tiles: int) -> int:
    """Split-K factor minimizing a rough H100 cost model, in units of one BLOCK_K chunk of a tile:
    waves · (chunks per split + 8 to write the partial tile) + s · n_pairs / 16 to reduce them.
    At most ``max_tiles`` partial tiles (the workspace bound)."""
    best, best_cost = 1, None
    for s in range(1, min(n_chunks, max(1, max_tiles // n_pairs)) + 1):
        waves = -(-n_pairs * s // n_sm)
        cost = waves * -(-n_chunks // s) + (waves * 8 + s * n_pairs / 16 if s > 1 else 0)
        if best_cost is None or cost < best_cost:
            best, best_cost = s, cost
    return best


@on_input_device
def covariance_update_(C, X, mask, append_ones: bool, scale: float, splits: int | None = None):
    """C += scale · X̃ᵀX̃ in place (see the module docstring); X (N, D), mask (N,) bool or None.

    ``splits`` forces the split-K factor (tests); by default it is chosen from the SM count.
    """
    N, D = X.shape
    E = C.shape[0]
    dot = dot_mode(X.dtype)
    cfg = _config(X.dtype, dot)
    block, block_k = cfg["BLOCK"], cfg["BLOCK_K"]
    n_tiles = triton.cdiv(E, block)
    n_pairs = n_tiles * (n_tiles + 1) // 2
    n_chunks = triton.cdiv(N, block_k)
    if splits is None:
        n_sm = torch.cuda.get_device_properties(C.device).multi_processor_count if C.is_cuda else 8
        splits = num_splits(n_pairs, n_chunks, n_sm, _WORKSPACE_BYTES // (4 * block * block))
    rows_per_split = triton.cdiv(n_chunks, splits) * block_k
    splits = triton.cdiv(N, rows_per_split)
    W = C.new_empty((splits, n_pairs, block, block)) if splits > 1 else C
    M = mask.view(torch.uint8) if mask is not None else X
    stride_m = mask.stride(0) if mask is not None else 0
    _syrk_kernel[(splits * n_pairs,)](
        X, M, C, W, N, D, E, X.stride(0), X.stride(1), stride_m, n_pairs, rows_per_split, scale,
        HAS_MASK=mask is not None, APPEND_ONES=append_ones, SPLIT=splits > 1,
        DOT=dot, BLOCK=block, BLOCK_K=block_k,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    if splits > 1:
        _reduce_kernel[(n_pairs, block // cfg["STRIP"])](
            W, C, E, n_pairs, splits, scale, BLOCK=block, STRIP=cfg["STRIP"], num_warps=4,
        )
    return C
