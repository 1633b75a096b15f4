"""Triton kernels of ``squared_products_update_``: S += scale · Σ_n (g_nᵀ a_n)², no product materialized.

Tokens (g (N, T, r_B), a (N, T, r_A), any strides): each program owns one (BLOCK_B, BLOCK_A) tile of S
and walks the examples of its split. Per example it accumulates P = g_n[:, tile]ᵀ a_n[:, tile] over T in
BLOCK_T steps (fp32, ``common.dot_acc``), then adds P² (fp32) into a second accumulator. The example
and token loops are flattened into one loop, with the P² epilogue under a scalar ``if`` on an example's
last token step, so the software pipeline keeps loading across examples (the pattern of Triton's
persistent-matmul tutorial); a nested token loop would drain the pipeline once per example.

Rows (g (N, r_B), a (N, r_A), or T = 1): (g_nᵀ a_n)² = (g_n²)ᵀ (a_n²), so this is one GEMM over n of the
squares, formed in fp32 from the loaded tiles and multiplied as fp32 tiles (``common.dot_mode(float32)``,
i.e. as ``torch.get_float32_matmul_precision()`` says).

Split over examples fills the GPU when S has few tiles (r_B = r_A = 768: 36 tiles of 128 × 128 for
132 SMs) and evens out the last wave. As in ``covariance``: each split stores its partial tile to a
workspace (split, r_B, r_A), and a second kernel sums the splits in a fixed order and updates S, so
results are deterministic. Unsplit, the tile kernel updates S itself (load, add scale · acc, store).
"""
import torch
import triton
import triton.language as tl

from .._backend import interpreting
from .common import dot_acc, dot_mode, grouped_tile, on_input_device

_WORKSPACE_BYTES = 64 << 20  # bound on the split partials


def _launch_config(length: int, size: int, dot: str) -> dict:
    """Tile sizes and launch options: GPU-sized, or small ones for the CPU interpreter.

    ``length``: what the BLOCK_T loop walks (T tokens of an example, or the N rows); ``size``: bytes of
    an operand element as the tiles are staged (4 for the fp32 squares of the rows kernel); ``dot``:
    the ``dot_mode``. GPU: 128 × 128 tiles of S and 8 warps (two fp32 accumulators: 128 registers a
    thread). BLOCK_T is the largest of 64, 32, 16 (32 at most for 32-bit tiles) whose padding of
    ``length`` is within 10% of the least padding (T = 197: 32, where 64 would compute 256 tokens).
    Shared memory per stage is (BLOCK_B + BLOCK_A) · BLOCK_T elements, at most 32 KiB: 3 stages take
    at most 96 KiB of an H100's 227 KiB (2 for IEEE fp32, which gains nothing from deeper pipelines).
    """
    if interpreting():
        return dict(BLOCK_B=32, BLOCK_A=32, BLOCK_T=16, GROUP_B=2, num_warps=1, num_stages=1)
    sizes = (64, 32, 16) if size <= 2 else (32, 16)
    padded = {bt: triton.cdiv(max(length, 1), bt) * bt for bt in sizes}
    block_t = next(bt for bt in sizes if padded[bt] <= 1.1 * min(padded.values()))
    return dict(BLOCK_B=128, BLOCK_A=128, BLOCK_T=block_t, GROUP_B=8, num_warps=8,
                num_stages=2 if dot == "ieee" else 3)


@triton.jit
def _epilogue(S, W, RB, RA, rb, ra, acc, scale, SPLIT: tl.constexpr):
    """Split: store the partial tile to W[split]. Else S[tile] += scale · acc (S contiguous)."""
    mask = (rb[:, None] < RB) & (ra[None, :] < RA)
    offs = rb[:, None] * RA + ra[None, :]
    if SPLIT:
        part = W + tl.program_id(1).to(tl.int64) * RB * RA
        tl.store(part + offs, acc, mask=mask)
    else:
        s = tl.load(S + offs, mask=mask, other=0.0)
        tl.store(S + offs, s + scale * acc, mask=mask)


@triton.jit
def _tokens_kernel(
    G, A, S, W, N, T, RB, RA, s_gn, s_gt, s_gb, s_an, s_at, s_aa, per_split, scale,
    SPLIT: tl.constexpr, DOT: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_T: tl.constexpr, GROUP_B: tl.constexpr,
):
    """Program (tile, split): Σ_n (g_n[:, rb]ᵀ a_n[:, ra])² over the split's examples."""
    rb, ra = grouped_tile(RB, RA, BLOCK_B, BLOCK_A, GROUP_B)
    rt = tl.arange(0, BLOCK_T)
    g_rows = rb[:, None] * s_gb  # the tile of g_n is loaded as (BLOCK_B, BLOCK_T), g_nᵀ
    a_cols = ra[None, :] * s_aa
    b_ok = rb[:, None] < RB
    a_ok = ra[None, :] < RA
    steps = tl.cdiv(T, BLOCK_T)  # token steps per example
    first = tl.program_id(1) * per_split
    last = tl.minimum(first + per_split, N)
    acc = tl.zeros((BLOCK_B, BLOCK_A), dtype=tl.float32)
    P = tl.zeros((BLOCK_B, BLOCK_A), dtype=tl.float32)
    for k in range(first * steps, last * steps):
        n = (k // steps).to(tl.int64)
        step = k % steps
        t = step * BLOCK_T + rt
        t64 = t.to(tl.int64)
        g = tl.load(G + n * s_gn + t64[None, :] * s_gt + g_rows, mask=(t[None, :] < T) & b_ok, other=0.0)
        a = tl.load(A + n * s_an + t64[:, None] * s_at + a_cols, mask=(t[:, None] < T) & a_ok, other=0.0)
        P = dot_acc(g, a, P, DOT)
        if step == steps - 1:  # example n done: add its squared product, start the next one
            acc += P * P
            P = tl.zeros((BLOCK_B, BLOCK_A), dtype=tl.float32)
    _epilogue(S, W, RB, RA, rb, ra, acc, scale, SPLIT)


@triton.jit
def _rows_kernel(
    G, A, S, W, N, RB, RA, s_gn, s_gb, s_an, s_aa, per_split, scale,
    SPLIT: tl.constexpr, DOT: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_T: tl.constexpr, GROUP_B: tl.constexpr,
):
    """Program (tile, split): Σ_n g_n[rb]² a_n[ra]²ᵀ over the split's rows, BLOCK_T rows a step."""
    rb, ra = grouped_tile(RB, RA, BLOCK_B, BLOCK_A, GROUP_B)
    rn = tl.arange(0, BLOCK_T)
    g_rows = rb[:, None] * s_gb  # the tile of g is loaded as (BLOCK_B, BLOCK_T), gᵀ
    a_cols = ra[None, :] * s_aa
    b_ok = rb[:, None] < RB
    a_ok = ra[None, :] < RA
    first = tl.program_id(1) * per_split
    last = tl.minimum(first + per_split, N)
    acc = tl.zeros((BLOCK_B, BLOCK_A), dtype=tl.float32)
    for n0 in range(first, last, BLOCK_T):
        n = n0 + rn
        n64 = n.to(tl.int64)
        g = tl.load(G + n64[None, :] * s_gn + g_rows, mask=(n[None, :] < last) & b_ok, other=0.0).to(tl.float32)
        a = tl.load(A + n64[:, None] * s_an + a_cols, mask=(n[:, None] < last) & a_ok, other=0.0).to(tl.float32)
        acc = dot_acc(g * g, a * a, acc, DOT)
    _epilogue(S, W, RB, RA, rb, ra, acc, scale, SPLIT)


@triton.jit
def _reduce_kernel(W, S, numel, n_splits, scale, BLOCK: tl.constexpr):
    """S[i] += scale · Σ_s W[s, i], summed in split order (S and W contiguous)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    part = tl.zeros((BLOCK,), dtype=tl.float32)
    ptrs = W + offs
    for _ in range(n_splits):
        part += tl.load(ptrs, mask=mask, other=0.0)
        ptrs += numel
    tl.store(S + offs, tl.load(S + offs, mask=mask, other=0.0) + scale * part, mask=mask)


def num_splits(n_tiles: int, n_units: int, unit_steps: int, n_sm: int, max_splits: int) -> int:
    """Splits of the ``n_units`` examples (or row blocks) minimizing a rough H100 cost model, in units of
    one BLOCK_T step of a tile: waves · (units per split · ``unit_steps``) + 8 a wave to store the
    partial tiles + splits · tiles / 16 to reduce them. At most ``max_splits`` (the workspace bound)."""
    best, best_cost = 1, None
    for s in range(1, max(1, min(n_units, max_splits)) + 1):
        waves = -(-n_tiles * s // n_sm)
        cost = waves * -(-n_units // s) * unit_steps + (waves * 8 + s * n_tiles / 16 if s > 1 else 0)
        if best_cost is None or cost < best_cost:
            best, best_cost = s, cost
    return best


@on_input_device
def squared_products_update_(S, g, a, scale: float, ct: torch.dtype, splits: int | None = None):
    """S += scale · Σ_n (g_nᵀ a_n)² in place (module docstring). g (N, T, r_B), a (N, T, r_A) with T > 1,
    or g (N, r_B), a (N, r_A); S (r_B, r_A) fp32 contiguous; tiles multiplied as ``dot_mode(ct)``.
    ``splits`` forces the number of example splits (tests); by default it comes from the SM count."""
    rows = g.dim() == 2
    N, RB, RA = g.shape[0], g.shape[-1], a.shape[-1]
    T = 1 if rows else g.shape[1]
    dot = dot_mode(torch.float32 if rows else ct)
    size = 4 if rows else max(g.element_size(), a.element_size())
    cfg = _launch_config(N if rows else T, size, dot)
    block_t = cfg["BLOCK_T"]
    n_tiles = triton.cdiv(RB, cfg["BLOCK_B"]) * triton.cdiv(RA, cfg["BLOCK_A"])
    # a split works on whole examples (tokens) or on whole BLOCK_T row blocks (rows)
    n_units, unit_steps = (triton.cdiv(N, block_t), 1) if rows else (N, triton.cdiv(T, block_t))
    if splits is None:
        n_sm = torch.cuda.get_device_properties(S.device).multi_processor_count if S.is_cuda else 8
        splits = num_splits(n_tiles, n_units, unit_steps, n_sm, _WORKSPACE_BYTES // (4 * S.numel()))
    per_split = triton.cdiv(n_units, max(1, min(splits, n_units)))
    splits = triton.cdiv(n_units, per_split)
    if rows:
        per_split *= block_t  # in rows
    W = S.new_empty((splits, RB, RA)) if splits > 1 else S
    common = dict(SPLIT=splits > 1, **cfg)
    if rows:
        _rows_kernel[(n_tiles, splits)](
            g, a, S, W, N, RB, RA, *g.stride(), *a.stride(), per_split, scale,
            DOT=dot, **common,
        )
    else:
        _tokens_kernel[(n_tiles, splits)](
            g, a, S, W, N, T, RB, RA, *g.stride(), *a.stride(), per_split, scale,
            DOT=dot, **common,
        )
    if splits > 1:
        block = 1024
        _reduce_kernel[(triton.cdiv(S.numel(), block),)](W, S, S.numel(), splits, scale, BLOCK=block, num_warps=4)
    return S
