"""Dual multi-head attention: O = softmax(S) V, S = Q Kᵀ·scale + bias (masked entries removed), and its tangent

    Ȯ = (P ⊙ Ṡ) V − rowsum(P ⊙ Ṡ) ⊙ O + P V̇,  Ṡ = (Q̇ Kᵀ + Q K̇ᵀ)·scale + ḃias,  P = softmax(S).

``dual_attention`` runs the fused Triton kernel of ``kfac_kernels.dual_attention`` on CUDA and, elsewhere, an
online (FlashAttention-style) PyTorch formulation, chunked over keys with a running max and log-sum-exp, so P is
never held for all keys. Its backward is the VJP of Ȯ at the frozen primal point, from the saved O and
log-sum-exp L (kept as its max and log-sum, which a masked row's dtype minimum would otherwise swallow):
with G the gradient of Ȯ, P = exp(S − L) recomputed per chunk and Δ = rowsum(G ⊙ O),

    grad Ṡ = P ⊙ (G Vᵀ − Δ),  grad V̇ = Pᵀ G,  grad Q̇ = grad Ṡ K·scale,
    grad K̇ = grad Ṡᵀ Q·scale,  grad ḃias = grad Ṡ summed to ḃias's shape

(the softmax-backward form of FlashAttention, applied to Ṡ). No primal backward is taken.

Capped scores (``softcap`` c, Gemma 2's): S = c·tanh(Q Kᵀ·scale / c) + bias, Ṡ = (1 − t²) ⊙ (Q̇ Kᵀ + Q K̇ᵀ)·scale + ḃias
with t = tanh(Q Kᵀ·scale / c), and grad Q̇, grad K̇ take (1 − t²) ⊙ grad Ṡ in place of grad Ṡ.

Attention dropout (training) drops entries of P with one mask M for both: O = (P ⊙ M) V and
Ȯ = ((P ⊙ Ṡ − rowsum(P ⊙ Ṡ) ⊙ P) ⊙ M) V + (P ⊙ M) V̇, computed with P held for all keys (as math attention does).
"""
import torch
import torch.nn.functional as F
from torch import nn

import kfac_kernels as kk

from .base import add, apply, cast
from .dropout import dropout_mask
from .linear import DualLinear

BLOCK_SIZE = 256  # keys per chunk of the online softmax


def _chunk(t, j0, j1):
    """Keys j0:j1 of a tensor broadcastable to (..., Lk) along its last dim; None stays None."""
    return t if t is None or t.shape[-1] == 1 else t[..., j0:j1]


def _scores(q, k, bias, mask, scale, softcap=None):
    """(S, slope): S = Q Kᵀ·scale + bias in q's dtype, with masked-out entries set to the dtype's minimum; for a
    ``softcap`` c, S = c·tanh(Q Kᵀ·scale / c) + bias and slope = 1 − tanh² (the cap's derivative), else None."""
    s, slope = (q @ k.transpose(-1, -2)) * scale, None
    if softcap is not None:
        t = torch.tanh(s / softcap)
        s, slope = softcap * t, 1 - t.square()
    if bias is not None:
        s = s + bias
    if mask is not None:
        s = s.masked_fill(~mask, torch.finfo(s.dtype).min)
    return s, slope


def attention(q, k, v, mask=None, bias=None, *, scale=None, dropout=0.0, softcap=None):
    """O = softmax(Q Kᵀ·scale + bias) V with masked-out keys removed (plain, differentiable; fused SDPA),
    the weights dropped out with probability ``dropout``; capped scores (``softcap``) with P formed.

    q (B, H, Lq, D), k (B, H, Lk, D), v (B, H, Lk, Dv); mask bool, True = attend, and bias float, both
    broadcastable to (B, H, Lq, Lk). A row with every key masked gets uniform weights."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if softcap is not None:
        weights = torch.softmax(_scores(q, k, bias, mask, scale, softcap)[0], -1)
        return F.dropout(weights, dropout) @ v
    if bias is not None:
        bias = bias.to(q.dtype)
        mask = bias if mask is None else bias.masked_fill(~mask, torch.finfo(q.dtype).min)
    elif mask is not None:
        mask = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(~mask, torch.finfo(q.dtype).min)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, dropout_p=dropout)


def dual_attention(q, k, v, dq, dk, dv, mask=None, bias=None, dbias=None, *, scale=None, dropout=0.0,
                   softcap=None, block_size=BLOCK_SIZE):
    """(O, Ȯ) of attention (see ``attention`` for shapes) along tangents dq, dk, dv (shapes of q, k, v)
    and dbias (broadcastable to (B, H, Lq, Lk)); None tangents are zeros, and Ȯ is None when all are.
    ``dropout`` > 0 drops attention weights with one mask for O and Ȯ, ``softcap`` caps the scores (see the module
    docstring).

    With a tangent, q, k, v, bias are the constant primal point and must not require grad; O is a
    constant, Ȯ is differentiable in dq, dk, dv, dbias. Keys are processed ``block_size`` at a time.
    On CUDA this is ``kfac_kernels.dual_attention``'s fused Triton kernel. A query row that ``mask`` leaves no
    key to attend (BERT's all-zero ``attention_mask`` row, a left-padded T5 decoder's causal rows) gets the
    average of V (and Ȯ that of V̇), as the original models' additive masks (equal scores) give it."""
    if dq is None and dk is None and dv is None and dbias is None:
        return attention(q, k, v, mask, bias, scale=scale, dropout=dropout, softcap=softcap), None
    if _fused(q, dropout):
        o, do = kk.dual_attention(q, k, v, dq, dk, dv, mask=mask, bias=bias, dbias=dbias, scale=scale, softcap=softcap)
        return _averaged_where_no_key(o, do, v, dv, mask)
    for name, t in (("q", q), ("k", k), ("v", v), ("bias", bias)):
        if t is not None and t.requires_grad and torch.is_grad_enabled():
            raise ValueError(f"dual_attention: {name} requires grad, but the primal point is a constant; "
                             f"gradients flow to the tangents only (pass {name}.detach())")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if dropout:
        return _dropped_dual_attention(q, k, v, dq, dk, dv, mask, bias, dbias, scale, softcap, dropout)
    return _DualAttention.apply(q, k, v, dq, dk, dv, mask, bias, dbias, scale, softcap, block_size)


def _fused(q, dropout) -> bool:
    """Whether ``dual_attention`` runs the fused kernel (CUDA, no dropout)."""
    return q.is_cuda and not dropout


def _averaged_where_no_key(o, do, v, dv, mask):
    """(O, Ȯ) of the fused kernel, which gives 0 to a row with no key, with such rows the average of V (V̇)."""
    if mask is None:
        return o, do
    none = ~mask.any(-1, keepdim=True)
    o = torch.where(none, v.mean(-2, keepdim=True).to(o.dtype), o)
    if do is not None and dv is not None:
        do = torch.where(none, dv.mean(-2, keepdim=True).to(do.dtype), do)
    return o, do


def _dropped_dual_attention(q, k, v, dq, dk, dv, mask, bias, dbias, scale, softcap, p):
    """(O, Ȯ) with the attention weights dropped out (probability p, one mask M), P held for all keys and Ȯ
    differentiated by autograd: O = (P ⊙ M) V, Ȯ = ((P ⊙ Ṡ − rowsum(P ⊙ Ṡ) ⊙ P) ⊙ M) V + (P ⊙ M) V̇."""
    dtype = q.dtype
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    q, k, v, dq, dk, dv, bias, dbias = (None if t is None else t.to(acc) for t in (q, k, v, dq, dk, dv, bias, dbias))
    s, slope = _scores(q, k, bias, mask, scale, softcap)
    weights = torch.softmax(s, -1)
    m = dropout_mask(weights, p)
    o = (weights * m) @ v
    do = None
    ds = _score_tangent(q, k, dq, dk, dbias, scale, slope)
    if ds is not None:
        pds = weights * (ds if mask is None else ds.masked_fill(~mask, 0))
        do = ((pds - pds.sum(-1, keepdim=True) * weights) * m) @ v
    if dv is not None:
        do = add(do, (weights * m) @ dv)
    return o.to(dtype), do.to(dtype)


def _forward(q, k, v, dq, dk, dv, mask, bias, dbias, scale, softcap, block):
    """Online pass over key chunks: returns O, Ȯ and the log-sum-exp as (m, log l) (B, H, Lq, 1 each; m + log l
    would round log l away where m is the dtype's minimum: a row with no key), in the accumulation dtype.

    Running per row: max m, l = Σ exp(S − m), o = Σ exp(S − m) V, r = Σ exp(S − m) Ṡ and
    do = Σ exp(S − m)(Ṡ V + V̇); each chunk rescales them by exp(m_old − m_new). While a row has seen only
    −∞ scores (a chunk of keys all biased −∞), its reference max is 0 instead of −∞, so its sums stay 0
    rather than exp(−∞ − (−∞)) = NaN (as the Triton kernel does)."""
    lead, Lk = q.shape[:-1], k.shape[-2]
    m = torch.full((*lead, 1), float("-inf"), dtype=q.dtype, device=q.device)
    l, r = torch.zeros_like(m), torch.zeros_like(m)
    o = q.new_zeros(*lead, v.shape[-1])
    do = torch.zeros_like(o)
    for j0 in range(0, Lk, block):
        j1 = min(j0 + block, Lk)
        kj, vj, maskj = k[..., j0:j1, :], v[..., j0:j1, :], _chunk(mask, j0, j1)
        s, slope = _scores(q, kj, _chunk(bias, j0, j1), maskj, scale, softcap)
        m_new = torch.maximum(m, s.amax(-1, keepdim=True))
        m_ref = torch.where(torch.isneginf(m_new), 0.0, m_new)  # rows with no key yet (−∞ bias): p = 0, no NaN
        alpha = torch.exp(m - m_ref)
        p = torch.exp(s - m_ref)
        l = alpha * l + p.sum(-1, keepdim=True)
        o = alpha * o + p @ vj
        do = alpha * do
        ds = _score_tangent(q, kj, dq, dk[..., j0:j1, :] if dk is not None else None, _chunk(dbias, j0, j1), scale,
                            slope)
        if ds is not None:
            pds = p * (ds if maskj is None else ds.masked_fill(~maskj, 0))
            r = alpha * r + pds.sum(-1, keepdim=True)
            do = do + pds @ vj
        if dv is not None:
            do = do + p @ dv[..., j0:j1, :]
        m = m_new
    o = o / l
    return o, do / l - (r / l) * o, (m, torch.log(l))


def _score_tangent(q, kj, dq, dkj, dbiasj, scale, slope=None):
    """Ṡ on a key chunk: (Q̇ Kᵀ + Q K̇ᵀ)·scale (× the cap's ``slope`` where capped) + ḃias; None when all three
    tangents are None."""
    ds = None
    if dq is not None:
        ds = dq @ kj.transpose(-1, -2)
    if dkj is not None:
        ds = q @ dkj.transpose(-1, -2) if ds is None else ds + q @ dkj.transpose(-1, -2)
    if ds is not None:
        ds = ds * scale if slope is None else ds * scale * slope
    if dbiasj is not None:
        ds = dbiasj if ds is None else ds + dbiasj
    return ds


class _DualAttention(torch.autograd.Function):
    """(O, Ȯ); O is a constant, Ȯ's backward reaches dq, dk, dv, dbias only (see module docstring)."""

    @staticmethod
    def forward(ctx, q, k, v, dq, dk, dv, mask, bias, dbias, scale, softcap, block):
        dtype = q.dtype
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        q, k, v, dq, dk, dv, bias, dbias = (None if t is None else t.to(acc)
                                            for t in (q, k, v, dq, dk, dv, bias, dbias))
        o, do, (m, log_l) = _forward(q, k, v, dq, dk, dv, mask, bias, dbias, scale, softcap, block)
        ctx.save_for_backward(q, k, v, o, m, log_l, mask, bias)
        ctx.scale, ctx.softcap, ctx.block = scale, softcap, block
        ctx.dtypes = [None if t is None else t.dtype for t in (dq, dk, dv, dbias)]
        ctx.dbias_shape = None if dbias is None else dbias.shape
        o, do = cast(o, dtype), cast(do, dtype)
        ctx.mark_non_differentiable(o)
        return o, do

    @staticmethod
    def backward(ctx, _, g):
        q, k, v, o, m, log_l, mask, bias = ctx.saved_tensors
        need_dq, need_dk, need_dv = ctx.needs_input_grad[3:6]
        need_dbias = ctx.needs_input_grad[8]
        g = g.to(o.dtype)
        delta = (g * o).sum(-1, keepdim=True)
        gdq = torch.zeros_like(q) if need_dq else None
        gdk = torch.zeros_like(k) if need_dk else None
        gdv = torch.zeros_like(v) if need_dv else None
        gdbias = q.new_zeros(ctx.dbias_shape) if need_dbias else None
        Lk = k.shape[-2]
        for j0 in range(0, Lk, ctx.block):
            j1 = min(j0 + ctx.block, Lk)
            kj, vj, maskj = k[..., j0:j1, :], v[..., j0:j1, :], _chunk(mask, j0, j1)
            s, slope = _scores(q, kj, _chunk(bias, j0, j1), maskj, ctx.scale, ctx.softcap)
            p = torch.exp(s - m - log_l)
            if need_dv:
                gdv[..., j0:j1, :] = p.transpose(-1, -2) @ g
            gds = p * (g @ vj.transpose(-1, -2) - delta)
            if maskj is not None:
                gds = gds.masked_fill(~maskj, 0)
            gqk = gds if slope is None else gds * slope  # grad of Q Kᵀ·scale
            if need_dq:
                gdq += (gqk @ kj) * ctx.scale
            if need_dk:
                gdk[..., j0:j1, :] = (gqk.transpose(-1, -2) @ q) * ctx.scale
            if need_dbias:
                target = _chunk(gdbias, j0, j1)
                target += gds.sum_to_size(target.shape)
        grads = [None if t is None else t.to(dt) for t, dt in zip((gdq, gdk, gdv, gdbias), ctx.dtypes)]
        return None, None, None, *grads[:3], None, None, grads[3], None, None, None


def split_heads(x, heads):
    """(B, L, H·D) -> (B, H, L, D)."""
    B, L, _ = x.shape
    return x.view(B, L, heads, -1).transpose(1, 2)


def merge_heads(x):
    """(B, H, L, D) -> (B, L, H·D)."""
    B, H, L, D = x.shape
    return x.transpose(1, 2).reshape(B, L, H * D)


class DualAttention(nn.Module):
    """Multi-head attention with its projections, on x (B, Lq, d) and keys/values from kv (B, Lk, d_kv)
    (kv = x for self-attention): Q = x W_qᵀ + b_q, K = kv W_kᵀ + b_k, V = kv W_vᵀ + b_v, split into
    ``heads`` heads; O = softmax(Q Kᵀ·scale + bias | mask) V per head; output O W_oᵀ + b_o (B, Lq, d_out).

    Projections: ``qkv``, one DualLinear whose output is [Q | K | V] (self-attention only), or
    ``q``, ``k``, ``v``. ``scale`` defaults to head_dim^(-1/2); ``dropout``: of the attention weights,
    in training."""

    def __init__(self, heads: int, out: DualLinear, *, qkv: DualLinear | None = None, q: DualLinear | None = None,
                 k: DualLinear | None = None, v: DualLinear | None = None, scale: float | None = None,
                 dropout: float = 0.0):
        super().__init__()
        if (qkv is None) == (q is None or k is None or v is None):
            raise ValueError("DualAttention: pass either qkv, or all of q, k and v")
        self.heads, self.scale, self.out, self.dropout = heads, scale, out, float(dropout)
        self.qkv, self.q, self.k, self.v = qkv, q, k, v

    def project(self, x, dx, kv, dkv):
        """Q, K, V and their tangents, each (B, H, L, D)."""
        if self.qkv is not None:
            if kv is not None:
                raise ValueError("DualAttention: a fused qkv projection serves self-attention only, got kv")
            y, dy = self.qkv(x, dx)
            primal, tangent = y.chunk(3, -1), ((None,) * 3 if dy is None else dy.chunk(3, -1))
        else:
            kv, dkv = (x, dx) if kv is None else (kv, dkv)
            (q, dq), (k, dk), (v, dv) = self.q(x, dx), self.k(kv, dkv), self.v(kv, dkv)
            primal, tangent = (q, k, v), (dq, dk, dv)
        return ([split_heads(t, self.heads) for t in primal],
                [apply(lambda t: split_heads(t, self.heads), t) for t in tangent])

    def forward(self, x, dx=None, kv=None, dkv=None, *, mask=None, bias=None, dbias=None):
        """(y, dy); mask (bool, True = attend), bias and dbias broadcastable to (B, H, Lq, Lk)."""
        (q, k, v), (dq, dk, dv) = self.project(x, dx, kv, dkv)
        o, do = dual_attention(q, k, v, dq, dk, dv, mask, bias, dbias, scale=self.scale,
                               dropout=self.dropout if self.training else 0.0)
        return self.out(merge_heads(o), apply(merge_heads, do))
