"""Triton kernels of ``dual_attention``: FlashAttention-style O, Ȯ and the τ-path backward.

Per (batch, head), with S = Q Kᵀ·scale + bias (masked entries −∞), P = softmax(S) and
Ṡ = (Q̇ Kᵀ + Q K̇ᵀ)·scale + ḃias:

    O = P V,    Ȯ = (P⊙Ṡ) V − rowsum(P⊙Ṡ) ⊙ O + P V̇.

With SOFTCAP (c = softcap > 0), S = c·tanh(Q Kᵀ·scale / c) + bias and Ṡ = (1 − t²) ⊙ (Q̇ Kᵀ + Q K̇ᵀ)·scale + ḃias
with t = tanh(Q Kᵀ·scale / c) (Gemma 2's capped scores); in the backward below, grad Q̇ and grad K̇ take
(1 − t²) ⊙ grad Ṡ in place of grad Ṡ.

``_forward_kernel``: one program per BLOCK_M query rows runs once over the key blocks with an
online softmax (running max m, in log2 units). With e = exp(S − m), rounded as the tile product
sees it, and c per row the e-weighted mean of Ṡ over the row's first key block:
l = Σ e, acc_o = Σ e V, r = Σ e⊙(Ṡ − c), acc_do = Σ (e⊙(Ṡ − c)) V + e V̇, each rescaled by
exp(m_old − m_new) when m grows; then O = acc_o / l, Ȯ = (acc_do − r ⊙ O) / l (the same for any c,
as rows of P sum to 1) and the log-sum-exp L = m + log l (stored, fp32). P is never held beyond
one (BLOCK_M, BLOCK_N) tile. Rows without any key get O = Ȯ = 0, L = +∞.

Backward of Ȯ only (O is a constant: the primal point is frozen). With G = ∂loss/∂Ȯ,
Δ = rowsum(G ⊙ O) and P = exp(S − L) recomputed per tile, Ȯ is linear in Ṡ and V̇, so

    grad Ṡ = P ⊙ (G Vᵀ − Δ),  grad V̇ = Pᵀ G,  grad Q̇ = grad Ṡ K·scale,
    grad K̇ = grad Ṡᵀ Q·scale,  grad ḃias = grad Ṡ (summed over broadcast dims).

``_dq_kernel`` (per query block, over key blocks) stores Δ, grad Q̇ and grad ḃias;
``_dkdv_kernel`` (per key block, over query blocks, after it: it reads Δ) stores grad K̇ and grad V̇.
No atomics, except for grad ḃias when ḃias is shared across batches or heads.

Rounding (bf16/fp16 tiles): c takes per-row offsets of Ṡ (invisible to softmax) out of the rounded
operand, and l and r sum the rounded operands, so a common mean of V cancels exactly from Ȯ; rows
of grad Ṡ sum to 0, so grad Q̇ subtracts rowsum(grad Ṡ, rounded) k̄ (k̄ the key mean) and a common
mean of K cancels too. Δ is formed from the stored (rounded) O, as in FlashAttention, so a large
mean of V still costs accuracy in the gradients. With SOFTCAP the rows of (1 − t²) ⊙ grad Ṡ do not sum to
0, and grad Q̇ keeps K as it is.

All tensors are (B, H, L, ·) views with any strides; mask and bias are broadcast views of
(B, H, Lq, Lk). Tiles are multiplied as ``common.dot_mode`` says; accumulation is fp32.
"""
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import _autograd
from .._backend import interpreting
from .common import dot_acc, dot_mode, launch_fitting, on_input_device, or_empty

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _tile(ptr, rows, cols, s_r, s_c, n_r, n_c):
    """Load the (rows, cols) tile of a strided 2-D view of extent (n_r, n_c); 0 outside."""
    return tl.load(ptr + rows[:, None] * s_r + cols[None, :] * s_c,
                   mask=(rows[:, None] < n_r) & (cols[None, :] < n_c), other=0.0)


@triton.jit
def _program(L, H, BLOCK: tl.constexpr):
    """(b, h, b·H + h) as int64 and the first of the BLOCK rows (of L) of this program: the grid is one axis
    (axes 1 and 2 stop at 65,535), blocks of one (batch, head) in consecutive programs, which share its K, V."""
    blocks = tl.cdiv(L, BLOCK)
    pid = tl.program_id(0)
    bh = (pid // blocks).to(tl.int64)
    return bh // H, bh % H, bh, (pid % blocks) * BLOCK


@triton.jit
def _operand(x, DOT: tl.constexpr):
    """x (fp32) with the values a tile product in mode DOT multiplies: rounded to bf16 or fp16 (tf32 and
    IEEE as is). Row sums of it make the sums of rounding errors cancel against the means of V and K."""
    if DOT == "bf16" or DOT == "bf16_rounded":
        return x.to(tl.bfloat16).to(tl.float32)
    elif DOT == "fp16":
        return x.to(tl.float16).to(tl.float32)
    else:
        return x


@triton.jit
def _scores(q, k, bias, mask, rm, rn, s_bq, s_bk, s_mq, s_mk, Lq, Lk, qk_scale, cap2,
            HAS_BIAS: tl.constexpr, MASK: tl.constexpr, TRANS: tl.constexpr, DOT: tl.constexpr,
            SOFTCAP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(S·log2(e), slope) on the tile (queries rm, keys rn), S −∞ where masked or out of range; (BLOCK_M,
    BLOCK_N), or the transposes (BLOCK_N, BLOCK_M) from k q ᵀ when TRANS. MASK: 0 none, 1 one key row for all
    queries, 2 a full (Lq, Lk) mask. SOFTCAP (cap2 = c·log2(e)): the products capped, slope = 1 − t² (else
    unused)."""
    if TRANS:
        s = dot_acc(k, tl.trans(q), tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32), DOT) * qk_scale
        s, slope = _cap(s, cap2, SOFTCAP)
        if HAS_BIAS:
            s += _tile(bias, rn, rm, s_bk, s_bq, Lk, Lq).to(tl.float32) * LOG2E
        ok = rn[:, None] < Lk
        if MASK == 1:
            ok &= (tl.load(mask + rn * s_mk, mask=rn < Lk, other=0) != 0)[:, None]
        elif MASK == 2:
            ok &= tl.load(mask + rn[:, None] * s_mk + rm[None, :] * s_mq,
                          mask=(rn[:, None] < Lk) & (rm[None, :] < Lq), other=0) != 0
    else:
        s = dot_acc(q, tl.trans(k), tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), DOT) * qk_scale
        s, slope = _cap(s, cap2, SOFTCAP)
        if HAS_BIAS:
            s += _tile(bias, rm, rn, s_bq, s_bk, Lq, Lk).to(tl.float32) * LOG2E
        ok = rn[None, :] < Lk
        if MASK == 1:
            ok &= (tl.load(mask + rn * s_mk, mask=rn < Lk, other=0) != 0)[None, :]
        elif MASK == 2:
            ok &= tl.load(mask + rm[:, None] * s_mq + rn[None, :] * s_mk,
                          mask=(rm[:, None] < Lq) & (rn[None, :] < Lk), other=0) != 0
    return tl.where(ok, s, float("-inf")), slope


@triton.jit
def _cap(s, cap2, SOFTCAP: tl.constexpr):
    """(c·tanh(x / c), 1 − tanh²(x / c)) of products s = x·log2(e) in those units, tanh(y) = 1 − 2 / (exp(2y) + 1);
    (s, s) without SOFTCAP."""
    if SOFTCAP:
        t = 1.0 - 2.0 / (tl.exp2(s * (2.0 * LOG2E / cap2)) + 1.0)
        return cap2 * t, 1.0 - t * t
    else:
        return s, s


@triton.jit
def _forward_kernel(
    q, k, v, dq, dk, dv, mask, bias, dbias, o, do, lse,
    s_qb, s_qh, s_ql, s_qd, s_kb, s_kh, s_kl, s_kd, s_vb, s_vh, s_vl, s_vd,
    s_dqb, s_dqh, s_dql, s_dqd, s_dkb, s_dkh, s_dkl, s_dkd, s_dvb, s_dvh, s_dvl, s_dvd,
    s_mb, s_mh, s_mq, s_mk, s_bb, s_bh, s_bq, s_bk, s_dbb, s_dbh, s_dbq, s_dbk,
    s_ob, s_oh, s_ol, s_od, s_dob, s_doh, s_dol, s_dod,
    H, Lq, Lk, D, DV, scale, cap2,
    HAS_DQ: tl.constexpr, HAS_DK: tl.constexpr, HAS_DV: tl.constexpr, HAS_DBIAS: tl.constexpr,
    HAS_BIAS: tl.constexpr, MASK: tl.constexpr, DOT: tl.constexpr, SOFTCAP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    b, h, bh, first = _program(Lq, H, BLOCK_M)
    rm = first + tl.arange(0, BLOCK_M)
    rd = tl.arange(0, BLOCK_D)
    rdv = tl.arange(0, BLOCK_DV)
    k += b * s_kb + h * s_kh
    v += b * s_vb + h * s_vh
    dk += b * s_dkb + h * s_dkh
    dv += b * s_dvb + h * s_dvh
    mask += b * s_mb + h * s_mh
    bias += b * s_bb + h * s_bh
    dbias += b * s_dbb + h * s_dbh
    q_t = _tile(q + b * s_qb + h * s_qh, rm, rd, s_ql, s_qd, Lq, D)
    if HAS_DQ:
        dq_t = _tile(dq + b * s_dqb + h * s_dqh, rm, rd, s_dql, s_dqd, Lq, D)
    TANGENT_S: tl.constexpr = HAS_DQ or HAS_DK or HAS_DBIAS
    # Triton 3.9's LLVM (SLP vectorizer) crashes compiling three FMA dots of e into one accumulator:
    # on the 'ieee' path, e V̇ gets its own.
    SPLIT_DV: tl.constexpr = DOT == "ieee" and TANGENT_S
    qk_scale = scale * LOG2E

    m = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l = tl.zeros((BLOCK_M,), dtype=tl.float32)
    r = tl.zeros((BLOCK_M,), dtype=tl.float32)
    c = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc_o = tl.zeros((BLOCK_M, BLOCK_DV), dtype=tl.float32)
    acc_do = tl.zeros((BLOCK_M, BLOCK_DV), dtype=tl.float32)
    acc_dv = tl.zeros((BLOCK_M, BLOCK_DV), dtype=tl.float32)
    for n0 in range(0, Lk, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        k_t = _tile(k, rn, rd, s_kl, s_kd, Lk, D)
        v_t = _tile(v, rn, rdv, s_vl, s_vd, Lk, DV)
        s, slope = _scores(q_t, k_t, bias, mask, rm, rn, s_bq, s_bk, s_mq, s_mk, Lq, Lk, qk_scale, cap2,
                           HAS_BIAS, MASK, False, DOT, SOFTCAP, BLOCK_M, BLOCK_N)
        m_new = tl.maximum(m, tl.max(s, 1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no key yet: e = 0, no NaN
        alpha = tl.exp2(m - m_ref)
        e = _operand(tl.exp2(s - m_ref[:, None]), DOT)  # l sums what the products see: O is a convex combination
        l_old, l_blk = l, tl.sum(e, 1)
        l = l * alpha + l_blk
        acc_o = dot_acc(e, v_t, acc_o * alpha[:, None], DOT)
        if TANGENT_S or (HAS_DV and not SPLIT_DV):
            acc_do = acc_do * alpha[:, None]
        if HAS_DV:
            dv_t = _tile(dv, rn, rdv, s_dvl, s_dvd, Lk, DV)
            if SPLIT_DV:
                acc_dv = dot_acc(e, dv_t, acc_dv * alpha[:, None], DOT)
            else:
                acc_do = dot_acc(e, dv_t, acc_do, DOT)
        if TANGENT_S:
            sd = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            if HAS_DQ:
                sd = dot_acc(dq_t, tl.trans(k_t), sd, DOT)
            if HAS_DK:
                sd = dot_acc(q_t, tl.trans(_tile(dk, rn, rd, s_dkl, s_dkd, Lk, D)), sd, DOT)
            sd = sd * scale
            if SOFTCAP:
                sd = sd * slope
            if HAS_DBIAS:
                sd += _tile(dbias, rm, rn, s_dbq, s_dbk, Lq, Lk).to(tl.float32)
            esd = e * sd
            c = tl.where(l_old == 0, tl.sum(esd, 1) / tl.where(l_blk > 0, l_blk, 1.0), c)
            esd = _operand(esd - e * c[:, None], DOT)
            r = r * alpha + tl.sum(esd, 1)
            acc_do = dot_acc(esd, v_t, acc_do, DOT)
        m = m_new

    has_key = l > 0
    l = tl.where(has_key, l, 1.0)
    inv_l = 1.0 / l
    o_t = acc_o * inv_l[:, None]
    out = (rm[:, None] < Lq) & (rdv[None, :] < DV)
    tl.store(o + b * s_ob + h * s_oh + rm[:, None] * s_ol + rdv[None, :] * s_od,
             o_t.to(o.dtype.element_ty), mask=out)
    if TANGENT_S or HAS_DV:
        do_t = (acc_do + acc_dv - r[:, None] * o_t) * inv_l[:, None]
        tl.store(do + b * s_dob + h * s_doh + rm[:, None] * s_dol + rdv[None, :] * s_dod,
                 do_t.to(do.dtype.element_ty), mask=out)
    tl.store(lse + bh * Lq + rm, tl.where(has_key, (m + tl.log2(l)) * LN2, float("inf")),
             mask=rm < Lq)


@triton.jit
def _dq_kernel(
    q, k, v, mask, bias, o, g, lse, delta, kmean, gdq, gdb,
    s_qb, s_qh, s_ql, s_qd, s_kb, s_kh, s_kl, s_kd, s_vb, s_vh, s_vl, s_vd,
    s_mb, s_mh, s_mq, s_mk, s_bb, s_bh, s_bq, s_bk,
    s_ob, s_oh, s_ol, s_od, s_gb, s_gh, s_gl, s_gd,
    s_gqb, s_gqh, s_gql, s_gqd, s_gbb, s_gbh, s_gbq, s_gbk,
    H, Lq, Lk, D, DV, scale, cap2,
    NEED_DQ: tl.constexpr, NEED_DB: tl.constexpr, ATOMIC_DB: tl.constexpr,
    HAS_BIAS: tl.constexpr, MASK: tl.constexpr, DOT: tl.constexpr, SOFTCAP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    b, h, bh, first = _program(Lq, H, BLOCK_M)
    rm = first + tl.arange(0, BLOCK_M)
    rd = tl.arange(0, BLOCK_D)
    rdv = tl.arange(0, BLOCK_DV)
    g_t = _tile(g + b * s_gb + h * s_gh, rm, rdv, s_gl, s_gd, Lq, DV)
    o_t = _tile(o + b * s_ob + h * s_oh, rm, rdv, s_ol, s_od, Lq, DV)
    dlt = tl.sum(g_t.to(tl.float32) * o_t.to(tl.float32), 1)
    row = bh * Lq + rm
    tl.store(delta + row, dlt, mask=rm < Lq)
    if NEED_DQ or NEED_DB:
        k += b * s_kb + h * s_kh
        v += b * s_vb + h * s_vh
        mask += b * s_mb + h * s_mh
        bias += b * s_bb + h * s_bh
        gdb += b * s_gbb + h * s_gbh
        q_t = _tile(q + b * s_qb + h * s_qh, rm, rd, s_ql, s_qd, Lq, D)
        lse2 = tl.load(lse + row, mask=rm < Lq, other=float("inf")) * LOG2E
        qk_scale = scale * LOG2E
        acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        gs_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for n0 in range(0, Lk, BLOCK_N):
            rn = n0 + tl.arange(0, BLOCK_N)
            k_t = _tile(k, rn, rd, s_kl, s_kd, Lk, D)
            v_t = _tile(v, rn, rdv, s_vl, s_vd, Lk, DV)
            s, slope = _scores(q_t, k_t, bias, mask, rm, rn, s_bq, s_bk, s_mq, s_mk, Lq, Lk, qk_scale, cap2,
                               HAS_BIAS, MASK, False, DOT, SOFTCAP, BLOCK_M, BLOCK_N)
            p = tl.exp2(s - lse2[:, None])
            gp = dot_acc(g_t, tl.trans(v_t), tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), DOT)
            gs = p * (gp - dlt[:, None])
            if NEED_DQ:
                gs_k = gs
                if SOFTCAP:
                    gs_k = gs * slope
                gs_k = _operand(gs_k, DOT)
                gs_sum += tl.sum(gs_k, 1)
                acc = dot_acc(gs_k, k_t, acc, DOT)
            if NEED_DB:
                ptrs = gdb + rm.to(tl.int64)[:, None] * s_gbq + rn[None, :] * s_gbk  # Lq·Lk may pass 2³¹
                inside = (rm[:, None] < Lq) & (rn[None, :] < Lk)
                if ATOMIC_DB:
                    tl.atomic_add(ptrs, gs, mask=inside, sem="relaxed")
                else:
                    tl.store(ptrs, gs.to(gdb.dtype.element_ty), mask=inside)
        if NEED_DQ:
            if not SOFTCAP:  # rows of grad Ṡ sum to 0: Σ_j grad Ṡ_ij k̄ is rounding error (k̄: the key mean)
                acc -= gs_sum[:, None] * tl.load(kmean + bh * D + rd, mask=rd < D, other=0.0)[None, :]
            tl.store(gdq + b * s_gqb + h * s_gqh + rm[:, None] * s_gql + rd[None, :] * s_gqd,
                     (acc * scale).to(gdq.dtype.element_ty), mask=(rm[:, None] < Lq) & (rd[None, :] < D))


@triton.jit
def _dkdv_kernel(
    q, k, v, mask, bias, g, lse, delta, gdk, gdv,
    s_qb, s_qh, s_ql, s_qd, s_kb, s_kh, s_kl, s_kd, s_vb, s_vh, s_vl, s_vd,
    s_mb, s_mh, s_mq, s_mk, s_bb, s_bh, s_bq, s_bk, s_gb, s_gh, s_gl, s_gd,
    s_gkb, s_gkh, s_gkl, s_gkd, s_gvb, s_gvh, s_gvl, s_gvd,
    H, Lq, Lk, D, DV, scale, cap2,
    NEED_DK: tl.constexpr, NEED_DV: tl.constexpr, HAS_BIAS: tl.constexpr, MASK: tl.constexpr,
    DOT: tl.constexpr, SOFTCAP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    b, h, bh, first = _program(Lk, H, BLOCK_N)
    rn = first + tl.arange(0, BLOCK_N)
    rd = tl.arange(0, BLOCK_D)
    rdv = tl.arange(0, BLOCK_DV)
    q += b * s_qb + h * s_qh
    g += b * s_gb + h * s_gh
    mask += b * s_mb + h * s_mh
    bias += b * s_bb + h * s_bh
    lse += bh * Lq
    delta += bh * Lq
    k_t = _tile(k + b * s_kb + h * s_kh, rn, rd, s_kl, s_kd, Lk, D)
    v_t = _tile(v + b * s_vb + h * s_vh, rn, rdv, s_vl, s_vd, Lk, DV)
    qk_scale = scale * LOG2E
    acc_dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    acc_dv = tl.zeros((BLOCK_N, BLOCK_DV), dtype=tl.float32)
    for m0 in range(0, Lq, BLOCK_M):
        rm = m0 + tl.arange(0, BLOCK_M)
        q_t = _tile(q, rm, rd, s_ql, s_qd, Lq, D)
        g_t = _tile(g, rm, rdv, s_gl, s_gd, Lq, DV)
        lse2 = tl.load(lse + rm, mask=rm < Lq, other=float("inf")) * LOG2E
        sT, slopeT = _scores(q_t, k_t, bias, mask, rm, rn, s_bq, s_bk, s_mq, s_mk, Lq, Lk, qk_scale, cap2,
                             HAS_BIAS, MASK, True, DOT, SOFTCAP, BLOCK_M, BLOCK_N)
        pT = tl.exp2(sT - lse2[None, :])
        if NEED_DV:
            acc_dv = dot_acc(pT, g_t, acc_dv, DOT)
        if NEED_DK:
            gpT = dot_acc(v_t, tl.trans(g_t), tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32), DOT)
            gsT = pT * (gpT - tl.load(delta + rm, mask=rm < Lq, other=0.0)[None, :])
            if SOFTCAP:
                gsT = gsT * slopeT
            acc_dk = dot_acc(gsT, q_t, acc_dk, DOT)
    if NEED_DK:
        tl.store(gdk + b * s_gkb + h * s_gkh + rn[:, None] * s_gkl + rd[None, :] * s_gkd,
                 (acc_dk * scale).to(gdk.dtype.element_ty), mask=(rn[:, None] < Lk) & (rd[None, :] < D))
    if NEED_DV:
        tl.store(gdv + b * s_gvb + h * s_gvh + rn[:, None] * s_gvl + rdv[None, :] * s_gvd,
                 acc_dv.to(gdv.dtype.element_ty), mask=(rn[:, None] < Lk) & (rdv[None, :] < DV))


def _config(kernel: str, rows: int, d: int, size: int, pairwise: bool, dot: str) -> dict:
    """Tile sizes and launch options of ``kernel`` ('forward', 'dq' or 'dkdv'), chosen offline for sm_90
    so that ptxas spills no register inside a loop and the tiles arrive by asynchronous copies
    (``tests/sm90_compile.py`` reports both).

    Under the interpreter: 16 × 16. On a GPU a program owns 128 rows of its sequence (``rows`` long;
    64 when rows ≤ 64, or for 32-bit operands (``size`` bytes) with head dims ``d`` (padded) over 64)
    and steps 64 along the other (32 for d > 64 or 32-bit operands; 16 for 32-bit operands with
    d > 64). A forward with a bias or dbias tile (``pairwise``) holds two more score-sized tiles: it
    owns 64 rows, stepping 64 with 8 warps for 16-bit operands at d ≤ 64, else 16 with 4 warps.
    IEEE fp32 ('ieee') multiplies on FMA units, which hold whole operand rows in registers: 16 × 16
    tiles, and 8 warps in the forward. Still spilling in their loops: the 'ieee' forward at d > 64,
    and the pairwise forward at d = 128 (T5-3B/11B), about 10 values per step; 16-bit operands, or
    TF32 ('high' precision: spill-free with Triton 3.9, ~10 values per step with 3.6), avoid the first.
    Head dims over 128 (up to 256): 8 warps on 64 × 16 tiles in the backward and 32 × 16 in the forward (halved
    for 32-bit operands), so that the tangents' tiles fit in shared memory; that forward spills about 100 values
    per step. fp64 inputs with 32-bit or 16-bit tangents (``size`` 8) tile as 32-bit ones. Two stages; one
    where the GPU has less shared memory than an H100 or A100 (``launch_fitting``)."""
    if interpreting():
        return dict(BLOCK_M=16, BLOCK_N=16, num_stages=1)
    if dot == "ieee":
        return dict(BLOCK_M=16, BLOCK_N=16, num_warps=8 if kernel == "forward" else 4, num_stages=2)
    if d > 128:
        own = (64 if size == 2 else 32) // (2 if kernel == "forward" else 1)
        tiles = dict(BLOCK_M=16, BLOCK_N=own) if kernel == "dkdv" else dict(BLOCK_M=own, BLOCK_N=16)
        return dict(**tiles, num_warps=8, num_stages=2)
    if kernel == "forward" and pairwise:
        narrow = size == 2 and d <= 64
        return dict(BLOCK_M=64, BLOCK_N=64 if narrow else 16, num_warps=8 if narrow else 4, num_stages=2)
    wide = size >= 4 and d > 64
    own = 64 if rows <= 64 or wide else 128
    step = 16 if wide else 32 if d > 64 or size >= 4 else 64
    warps = 8 if own == 128 else 4
    if kernel == "dkdv":
        return dict(BLOCK_M=step, BLOCK_N=own, num_warps=warps, num_stages=2)
    return dict(BLOCK_M=own, BLOCK_N=step, num_warps=warps, num_stages=2)


def _smaller(kernel: str, cfg: dict) -> tuple[dict, ...]:
    """Half, a quarter, ... of the rows a program of ``kernel`` owns in ``cfg``, down to 16: its tiles where
    ``cfg``'s do not fit the GPU's shared memory even at one stage (``launch_fitting``: fp32 at head dim 256 on a
    99 KiB GPU, head dims over 64 on a T4's 64 KiB)."""
    owned = "BLOCK_N" if kernel == "dkdv" else "BLOCK_M"
    return tuple({owned: rows} for rows in (cfg[owned] // 2**i for i in range(1, 4)) if rows >= 16)


def _pad(d: int) -> int:
    """A head dim padded to a power of two, at least 16 (the smallest tile a product takes)."""
    return max(16, triton.next_power_of_2(d))


def _strides(t, n: int = 4):
    """Strides of ``t`` (n of them), or zeros for an absent tensor."""
    return (0,) * n if t is None else t.stride()


def _heads_like(shape, dtype, device) -> torch.Tensor:
    """An empty (B, H, L, d) tensor laid out as (B, L, H, d), so that merging heads is a view."""
    B, H, L, d = shape
    return torch.empty(B, L, H, d, dtype=dtype, device=device).transpose(1, 2)


def _pairwise(q, k, mask, bias, dbias):
    """mask (as uint8), bias and dbias broadcast to (B, H, Lq, Lk) views (None stays None), and the MASK
    kind: 0 none, 1 the same key row for every query, 2 a full mask."""
    full = (*q.shape[:3], k.shape[2])
    if mask is not None:
        mask = torch.broadcast_to(mask.view(torch.uint8), full)
    bias, dbias = (None if t is None else torch.broadcast_to(t, full) for t in (bias, dbias))
    kind = 0 if mask is None else 1 if mask.stride(2) == 0 else 2
    return mask, bias, dbias, kind


@torch.library.custom_op("kfac_kernels::triton_dual_attention", mutates_args=())
@on_input_device
def forward(q: Tensor, k: Tensor, v: Tensor, dq: Optional[Tensor], dk: Optional[Tensor], dv: Optional[Tensor],
            mask: Optional[Tensor], bias: Optional[Tensor], dbias: Optional[Tensor], scale: float, softcap: float,
            ct: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """O (B, H, Lq, Dv), Ȯ (same; empty when there is no tangent) in ``ct`` and L (B, H, Lq) fp32.

    q (B, H, Lq, D), k (B, H, Lk, D), v (B, H, Lk, Dv), tangents of the same shapes or None; mask bool,
    bias and dbias broadcastable to (B, H, Lq, Lk) or None; ``softcap`` c > 0 caps the scores, 0 does not."""
    B, H, Lq, D = q.shape
    Lk, Dv = v.shape[2:]
    tangent = any(t is not None for t in (dq, dk, dv, dbias))
    o, do, lse = _forward_fake(q, k, v, dq, dk, dv, mask, bias, dbias, scale, softcap, ct)
    if B * H * Lq == 0:
        return o, do, lse
    mask4, bias4, dbias4, mask_kind = _pairwise(q, k, mask, bias, dbias)
    size = max(t.element_size() for t in (q, k, v, dq, dk, dv) if t is not None)
    dot = dot_mode(ct)
    cfg = _config("forward", Lq, max(_pad(D), _pad(Dv)), size, bias is not None or dbias is not None, dot)
    launch_fitting(
        _forward_kernel, lambda meta: (triton.cdiv(Lq, meta["BLOCK_M"]) * H * B,), q, k, v, *(q if t is None else t for t in (dq, dk, dv, mask4, bias4, dbias4)), o, do, lse,
        *q.stride(), *k.stride(), *v.stride(), *_strides(dq), *_strides(dk), *_strides(dv),
        *_strides(mask4), *_strides(bias4), *_strides(dbias4), *o.stride(), *_strides(do if tangent else None),
        H, Lq, Lk, D, Dv, scale, softcap * LOG2E.value,
        HAS_DQ=dq is not None, HAS_DK=dk is not None, HAS_DV=dv is not None, HAS_DBIAS=dbias is not None,
        HAS_BIAS=bias is not None, MASK=mask_kind, DOT=dot, SOFTCAP=softcap > 0,
        BLOCK_D=_pad(D), BLOCK_DV=_pad(Dv), smaller=_smaller("forward", cfg), **cfg,
    )
    return o, do, lse


@forward.register_fake
def _forward_fake(q, k, v, dq, dk, dv, mask, bias, dbias, scale, softcap, ct):
    shape = (*q.shape[:3], v.shape[3])
    tangent = any(t is not None for t in (dq, dk, dv, dbias))
    return (_heads_like(shape, ct, q.device), _heads_like(shape, ct, q.device) if tangent else q.new_empty(0, dtype=ct),
            q.new_empty(q.shape[:3], dtype=torch.float32))


@torch.library.custom_op("kfac_kernels::triton_dual_attention_backward", mutates_args=())
@on_input_device
def backward(g: Tensor, q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], bias: Optional[Tensor], o: Tensor,
             lse: Tensor, scale: float, softcap: float, ct: torch.dtype, dq_dtype: Optional[torch.dtype],
             dk_dtype: Optional[torch.dtype], dv_dtype: Optional[torch.dtype], dbias_dtype: Optional[torch.dtype],
             dbias_shape: list[int]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients (grad Q̇, grad K̇, grad V̇, grad ḃias) of Ȯ for its output gradient g (B, H, Lq, Dv), the
    tangents' shapes being q's, k's, v's and ``dbias_shape``; a dtype of None: that gradient is not
    needed, and an empty tensor stands for it."""
    B, H, Lq, D = q.shape
    Lk, Dv = v.shape[2:]
    gdq, gdk, gdv = (None if dt is None else _heads_like(t.shape, dt, q.device)
                     for t, dt in ((q, dq_dtype), (k, dk_dtype), (v, dv_dtype)))
    gdb, atomic = None, False
    if dbias_dtype is not None:  # fp32 over every (query, key) pair, with dbias's batch and head dims
        db_shape = (1,) * (4 - len(dbias_shape)) + tuple(dbias_shape)
        atomic = db_shape[0] < B or db_shape[1] < H
        gdb = (torch.zeros if atomic else torch.empty)(*db_shape[:2], Lq, Lk, dtype=torch.float32, device=q.device)
    mask4, bias4, _, mask_kind = _pairwise(q, k, mask, bias, None)
    delta = torch.empty(B, H, Lq, dtype=torch.float32, device=q.device)
    dot = dot_mode(ct)
    common = dict(HAS_BIAS=bias is not None, MASK=mask_kind, DOT=dot, SOFTCAP=softcap > 0, BLOCK_D=_pad(D),
                  BLOCK_DV=_pad(Dv))
    pads, size = max(_pad(D), _pad(Dv)), max(t.element_size() for t in (q, k, v, g))
    pair_args = (q if mask4 is None else mask4, q if bias4 is None else bias4)
    pair_strides = (*_strides(mask4), *_strides(bias4))
    if B * H * Lq:
        cfg = _config("dq", Lq, pads, size, bias is not None, dot)
        gdb_strides = _strides(None) if gdb is None else [s if n > 1 else 0 for s, n in zip(gdb.stride(), gdb.shape)]
        launch_fitting(
            _dq_kernel, lambda meta: (triton.cdiv(Lq, meta["BLOCK_M"]) * H * B,), q, k, v, *pair_args, o, g, lse, delta, lse if gdq is None else k.sum(2, dtype=torch.float32) / max(Lk, 1),
            q if gdq is None else gdq, lse if gdb is None else gdb,
            *q.stride(), *k.stride(), *v.stride(), *pair_strides, *o.stride(), *g.stride(),
            *_strides(gdq), *gdb_strides, H, Lq, Lk, D, Dv, scale, softcap * LOG2E.value,
            NEED_DQ=gdq is not None, NEED_DB=gdb is not None, ATOMIC_DB=atomic, smaller=_smaller("dq", cfg), **common,
            **cfg,
        )
    if B * H * Lk and (gdk is not None or gdv is not None):
        cfg = _config("dkdv", Lk, pads, size, bias is not None, dot)
        launch_fitting(
            _dkdv_kernel, lambda meta: (triton.cdiv(Lk, meta["BLOCK_N"]) * H * B,), q, k, v, *pair_args, g, lse, delta, q if gdk is None else gdk, q if gdv is None else gdv,
            *q.stride(), *k.stride(), *v.stride(), *pair_strides, *g.stride(), *_strides(gdk), *_strides(gdv),
            H, Lq, Lk, D, Dv, scale, softcap * LOG2E.value, NEED_DK=gdk is not None, NEED_DV=gdv is not None,
            smaller=_smaller("dkdv", cfg),
            **common, **cfg,
        )
    if gdb is not None:
        gdb = gdb.sum_to_size(db_shape).reshape(dbias_shape).to(dbias_dtype, copy=True)
    return or_empty(q, gdq, gdk, gdv, gdb)


@backward.register_fake
def _(g, q, k, v, mask, bias, o, lse, scale, softcap, ct, dq_dtype, dk_dtype, dv_dtype, dbias_dtype, dbias_shape):
    return or_empty(q, *(None if dt is None else _heads_like(t.shape, dt, q.device)
                         for t, dt in ((q, dq_dtype), (k, dk_dtype), (v, dv_dtype))),
                    None if dbias_dtype is None else q.new_empty(dbias_shape, dtype=dbias_dtype))


class DualAttention(torch.autograd.Function):
    """(O, Ȯ) = apply(q, k, v, dq, dk, dv, mask, bias, dbias, scale, softcap, ct); O is a constant, Ȯ's backward
    reaches dq, dk, dv and dbias only (see the module docstring). Saves q, k, v, mask, bias (the
    caller's tensors), O and L."""

    @staticmethod
    def forward(ctx, q, k, v, dq, dk, dv, mask, bias, dbias, scale, softcap, ct):
        o, do, lse = forward(q, k, v, dq, dk, dv, mask, bias, dbias, scale, softcap, ct)
        ctx.save_for_backward(q, k, v, mask, bias, o, lse)
        ctx.scale, ctx.softcap, ctx.ct = scale, softcap, ct
        needs = ctx.needs_input_grad[3:6] + ctx.needs_input_grad[8:9]
        ctx.dtypes = tuple(t.dtype if t is not None and need else None for t, need in zip((dq, dk, dv, dbias), needs))
        ctx.dbias_shape = [] if dbias is None else list(dbias.shape)
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(o)
        return o, do

    @staticmethod
    @_autograd.once_differentiable("dual_attention")
    def backward(ctx, _, g):
        if g is None or all(dt is None for dt in ctx.dtypes):
            return (None,) * 12
        q, k, v, mask, bias, o, lse = ctx.saved_tensors
        grads = backward(g, q, k, v, mask, bias, o, lse, ctx.scale, ctx.softcap, ctx.ct, *ctx.dtypes, ctx.dbias_shape)
        gdq, gdk, gdv, gdb = (None if dt is None else t for t, dt in zip(grads, ctx.dtypes))
        return None, None, None, gdq, gdk, gdv, None, None, gdb, None, None, None
