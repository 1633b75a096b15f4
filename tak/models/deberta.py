"""Hugging Face DeBERTa encoders as dual models: DeBERTa-v2 and -v3 (DebertaV2Model), and DeBERTa (v1, DebertaModel).

Embeddings: word (or inputs_embeds) + absolute position (where config.position_biased_input) + token type (where
config.type_vocab_size > 0), projected to the hidden size (``embed_proj``, where embedding_size ≠ hidden_size),
LayerNorm, zeroed at padding (× attention_mask), dropout. Post-norm layers as BERT's, with disentangled
self-attention: per head, over pairs of real tokens (a padding query averages V, as the source's equal scores give),

    S = (Q Kᵀ + c2p + p2c) / s,  c2p[i, j] = Q_i · Kr_{c(i, j)},  p2c[i, j] = K_j · Qr_{p(j, i)},

c(i, j) = clamp(k + r(i, j), 0, 2k − 1), p(j, i) = clamp(k − r(j, i), 0, 2k − 1), with r(i, j) the (log-)bucketed
i − j and Kr = R W_kᵀ + b_k, Qr = R W_qᵀ + b_q on the 2k relative embeddings R (the encoder's table, LayerNorm-ed
where config.norm_rel_ebd has "layer_norm", dropped out in training by each layer); W_k, W_q are the attention's own
where config.share_att_key (DeBERTa-v3), else ``pos_key_proj`` / ``pos_query_proj``. s = √(D·(1 + #terms)), rounded
to float32 as Hugging Face computes it. c2p + p2c and its tangent are the dual attention's bias and ḃias.

DeBERTa (v1) differs in: one bias-free ``in_proj`` whose output is [q | k | v] per head, then ``q_bias`` and ``v_bias``
added; position projections of its own (``pos_proj`` without bias for c2p, ``pos_q_proj`` for p2c); unbucketed
r(i, j) = i − j over the rows m − k, ..., m + k − 1 of the table (m = max_relative_positions, k = min(L, m)); no
LayerNorm of the table; DebertaLayerNorm, a LayerNorm that Hugging Face computes in fp32 (here: in the input's
precision, fp32 for 16-bit inputs). Talking heads are not supported.
"""
import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutput
from transformers.models.deberta_v2.modeling_deberta_v2 import make_log_bucket_position

from ..nn import DualAttention
from ..nn.attention import dual_attention, merge_heads
from ..nn.base import DualModule, add, apply
from .base import Builder, DualModel, hf_options, padding_mask, plus_rows
from .bert import HF_OPTIONS, DualBertLayer

_TERMS = ("c2p", "p2c")


def _bilinear(a, da, b, db):
    """(a bᵀ, ȧ bᵀ + a ḃᵀ) over the last two dims; None tangents are zeros."""
    tangent = add(apply(lambda t: t @ b.transpose(-1, -2), da), apply(lambda t: a @ t.transpose(-1, -2), db))
    return a @ b.transpose(-1, -2), tangent


def _pick(scores, index, transposed: bool):
    """scores (B, H, L, 2k) at ``index`` (L, L) along the last dim (B, H, L, L), transposed for p2c."""
    picked = scores.gather(-1, index.expand(*scores.shape[:-1], index.shape[-1]))
    return picked.transpose(-1, -2) if transposed else picked


def _scale(a: nn.Module) -> float:
    """1/s, s = √(D·(1 + #terms)) rounded to float32 as Hugging Face computes it."""
    terms = [t for t in _TERMS if t in (a.pos_att_type or ())]
    return 1.0 / torch.tensor(a.attention_head_size * (1 + len(terms)), dtype=torch.float32).sqrt().item()


class DualDisentangledAttention(DualAttention):
    """DisentangledSelfAttention with its output projection: forward(x (B, L, d), dx, *, mask, rel, drel, c2p, p2c,
    rows) with rel, drel the relative embeddings, ``rows`` (None: all) the 2k of them that c2p, p2c (L, L) index
    (module docstring). ``projections``: DualAttention's (qkv, or q, k, v); ``pos_k``, ``pos_q``: the source's
    position projections (None: the attention's own k, q)."""

    def __init__(self, b: Builder, a: nn.Module, out: nn.Module, *, pos_k=None, pos_q=None, **projections):
        super().__init__(a.num_attention_heads, b.linear(out), scale=_scale(a), dropout=a.dropout.p, **projections)
        self.train(a.training)
        self.terms = [t for t in _TERMS if t in (a.pos_att_type or ())] if a.relative_attention else []
        self.pos_drop = b.dropout(a.pos_dropout) if a.relative_attention else None
        self.pos_k = b.linear(pos_k) if pos_k is not None and "c2p" in self.terms else None
        self.pos_q = b.linear(pos_q) if pos_q is not None and "p2c" in self.terms else None

    @classmethod
    def of_v2(cls, b: Builder, a: nn.Module, out: nn.Module) -> "DualDisentangledAttention":
        """DeBERTa-v2/v3's: q, k, v projections, and position projections of its own unless config.share_att_key."""
        own = a.relative_attention and not a.share_att_key
        return cls(b, a, out, q=b.linear(a.query_proj), k=b.linear(a.key_proj), v=b.linear(a.value_proj),
                   pos_k=getattr(a, "pos_key_proj", None) if own else None,
                   pos_q=getattr(a, "pos_query_proj", None) if own else None)

    def relative_scores(self, q, k, dq, dk, rel, drel, c2p, p2c, rows=None):
        """(c2p + p2c)·scale (B, H, L, L) and its tangent, from Q, K (B, H, L, D) and the relative embeddings: their
        ``rows`` (a slice; None: all), taken after the dropout of the whole table, as the source does."""
        rel, drel = self.pos_drop(rel, drel)
        if rows is not None:
            rel, drel = rel[rows], apply(lambda t: t[rows], drel)
        heads = lambda t: t.view(t.shape[0], self.heads, -1).transpose(0, 1)  # noqa: E731 (2k, H·D) -> (H, 2k, D)
        bias = dbias = None
        for term, index in (("c2p", c2p), ("p2c", p2c)):
            if term not in self.terms:
                continue
            own, shared = (self.pos_k, self.k) if term == "c2p" else (self.pos_q, self.q)
            r, dr = (shared if own is None else own)(rel, drel)
            content, dcontent = (q, dq) if term == "c2p" else (k, dk)
            s, ds = _bilinear(content, dcontent, heads(r), apply(heads, dr))  # (B, H, L, 2k)
            bias = add(bias, _pick(s, index, term == "p2c"))
            dbias = add(dbias, apply(lambda t: _pick(t, index, term == "p2c"), ds))  # noqa: B023 (called at once)
        return bias * self.scale, apply(lambda t: t * self.scale, dbias)

    def forward(self, x, dx=None, *, mask=None, rel=None, drel=None, c2p=None, p2c=None, rows=None):
        (q, k, v), (dq, dk, dv) = self.project(x, dx, None, None)
        bias = dbias = None
        if self.terms:
            bias, dbias = self.relative_scores(q, k, dq, dk, rel, drel, c2p, p2c, rows)
        o, do = dual_attention(q, k, v, dq, dk, dv, mask, bias, dbias, scale=self.scale,
                               dropout=self.dropout if self.training else 0.0)
        return self.out(merge_heads(o), apply(merge_heads, do))


class DualHeadBiases(DualModule):
    """DeBERTa (v1)'s q_bias and v_bias (H·D,), added to Q and V after its bias-free in_proj."""

    def __init__(self, q_bias: torch.Tensor, v_bias: torch.Tensor):
        super().__init__()
        self.register_dual("q_bias", q_bias)
        self.register_dual("v_bias", v_bias)


class DualDebertaAttention(DualDisentangledAttention):
    """DeBERTa (v1)'s DisentangledSelfAttention (module docstring)."""

    def __init__(self, b: Builder, a: nn.Module, out: nn.Module):
        if a.talking_head:
            raise NotImplementedError("DebertaModel with config.talking_head=True has no dual layer")
        super().__init__(b, a, out, qkv=b.linear(a.in_proj), pos_k=getattr(a, "pos_proj", None),
                         pos_q=getattr(a, "pos_q_proj", None))
        self.biases = b.record(DualHeadBiases(a.q_bias, a.v_bias), q_bias=a.q_bias, v_bias=a.v_bias)

    def project(self, x, dx, kv, dkv):
        """Q, K, V (B, H, L, D) and their tangents: in_proj's output per head [q | k | v], q_bias and v_bias added."""
        y, dy = self.qkv(x, dx)
        split = lambda t: t.view(*t.shape[:-1], self.heads, -1).transpose(1, 2).chunk(3, -1)  # noqa: E731
        (q, k, v), (dq, dk, dv) = split(y), ((None,) * 3 if dy is None else split(dy))
        (bq, dbq), (bv, dbv) = self.biases.dual("q_bias"), self.biases.dual("v_bias")
        per_head = lambda t, like: t.view(self.heads, 1, -1).to(like.dtype).expand_as(like)  # noqa: E731
        q, v = q + per_head(bq, q), v + per_head(bv, v)
        return [q, k, v], [add(dq, apply(lambda t: per_head(t, q), dbq)), dk,
                           add(dv, apply(lambda t: per_head(t, v), dbv))]


def _refuse_unsupported(model: nn.Module) -> None:
    c, enc, kind = model.config, model.encoder, type(model).__name__
    if getattr(enc, "conv", None) is not None:
        raise NotImplementedError(f"{kind} with config.conv_kernel_size={c.conv_kernel_size} (the ConvLayer "
                                  "after the first layer) has no dual layer")
    if getattr(model, "z_steps", 0) > 1:
        raise NotImplementedError(f"{kind} with z_steps={model.z_steps} has no dual model")
    unknown = set(c.pos_att_type or ()) - set(_TERMS)
    if enc.relative_attention and unknown:
        raise NotImplementedError(f"{kind}: pos_att_type {sorted(unknown)} (supported: {list(_TERMS)})")


class DualDebertaV2Model(DualModel):
    """forward(input_ids | inputs_embeds, attention_mask=None, token_type_ids=None, position_ids=None) -> (y, dy), each
    a BaseModelOutput (last_hidden_state (B, L, d)); dy is None outside the "linearized" mode."""

    def __init__(self, model: nn.Module, trainable=None):
        super().__init__()
        _refuse_unsupported(model)
        b, e, enc = Builder(model), model.embeddings, model.encoder
        self.word = b.embedding(e.word_embeddings)
        self.position = None if e.position_embeddings is None else b.embedding(e.position_embeddings)
        self.token_type = None if e.token_type_embeddings is None else b.embedding(e.token_type_embeddings)
        self.project = None if e.embed_proj is None else b.linear(e.embed_proj)
        self.ln_embed = b.layer_norm(e.LayerNorm)
        self.drop_embed = b.dropout(e.dropout)
        self.relative = None
        if enc.relative_attention:
            self.relative = b.embedding(enc.rel_embeddings)
            self.relative_positions(enc)
        self.ln_relative = b.layer_norm(enc.LayerNorm) if "layer_norm" in getattr(enc, "norm_rel_ebd", ()) else None
        self.layers = nn.ModuleList(
            DualBertLayer.of_bert(b, layer, model.config.hidden_act, f"encoder.layer.{i}",
                                  self_attention=self.self_attention)
            for i, layer in enumerate(enc.layer))
        self.bind(b, model, trainable)

    @staticmethod
    def self_attention(b: Builder, a: nn.Module, out: nn.Module) -> DualDisentangledAttention:
        """The dual of the source's self-attention ``a`` with its output projection ``out``."""
        return DualDisentangledAttention.of_v2(b, a, out)

    def relative_positions(self, enc: nn.Module) -> None:
        """Keep what ``relative_context`` needs of the source's encoder ``enc``."""
        self.buckets, self.max_relative = enc.position_buckets, enc.max_relative_positions
        self.span = enc.layer[0].attention.self.pos_ebd_size

    def embed(self, input_ids, token_type_ids, position_ids, inputs_embeds, attention_mask):
        """drop(LN(word + position + token type embeddings, projected) × attention_mask) (B, L, d) and its tangent."""
        x, dx = self.word(input_ids) if inputs_embeds is None else (inputs_embeds, None)
        B, L, _ = x.shape
        if self.position is not None:
            positions = torch.arange(L, device=x.device)[None] if position_ids is None else position_ids
            x, dx = plus_rows(x, dx, self.position, positions)
        if self.token_type is not None:
            types = torch.zeros(B, L, dtype=torch.long, device=x.device) if token_type_ids is None else token_type_ids
            x, dx = plus_rows(x, dx, self.token_type, types)
        if self.project is not None:
            x, dx = self.project(x, dx)
        x, dx = self.ln_embed(x, dx)
        if attention_mask is not None:
            keep = attention_mask[..., None].to(x.dtype)
            x, dx = x * keep, apply(lambda t: t * keep, dx)
        return self.drop_embed(x, dx)

    def relative_context(self, x) -> dict:
        """What each layer's attention takes besides x: the relative embeddings and their tangent, and the c2p and
        p2c indices (L, L) of the token pairs into them."""
        if self.relative is None:
            return {}
        rel, drel = self.relative.dual("weight")
        if self.ln_relative is not None:
            rel, drel = self.ln_relative(rel, drel)
        positions = torch.arange(x.shape[1], device=x.device)
        r = positions[:, None] - positions[None, :]  # i − j, log-bucketed as the source does
        if self.buckets > 0 and self.max_relative > 0:
            r = make_log_bucket_position(r, self.buckets, self.max_relative).long()
        top = 2 * self.span - 1  # the table's last row
        return {"rel": rel, "drel": drel, "c2p": (r + self.span).clamp(0, top), "p2c": (self.span - r).clamp(0, top)}

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                inputs_embeds=None, **options):
        """``options`` as ``DualBertModel.forward`` accepts them."""
        name = type(self).__name__
        hf_options(name, options, HF_OPTIONS)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError(f"{name}: pass exactly one of input_ids and inputs_embeds")
        keep = padding_mask(name, "attention_mask", attention_mask)
        x, dx = self.embed(input_ids, token_type_ids, position_ids, inputs_embeds, attention_mask)
        pairs = None if keep is None else keep & keep.transpose(-1, -2)  # (B, 1, L, L): both tokens real
        context = self.relative_context(x)
        for layer in self.layers:
            x, dx = layer(x, dx, pairs, **context)
        return BaseModelOutput(last_hidden_state=x), None if dx is None else BaseModelOutput(last_hidden_state=dx)


class DualDebertaModel(DualDebertaV2Model):
    """DeBERTa (v1), DebertaModel: forward as ``DualDebertaV2Model``'s (the module docstring says how they differ)."""

    self_attention = staticmethod(DualDebertaAttention)

    def relative_positions(self, enc: nn.Module) -> None:
        self.max_relative = enc.max_relative_positions

    def relative_context(self, x) -> dict:
        """As DeBERTa-v2's, over the rows m − k, ..., m + k − 1 of the table, k = min(L, m), with r(i, j) = i − j."""
        if self.relative is None:
            return {}
        rel, drel = self.relative.dual("weight")
        m, L = self.max_relative, x.shape[1]
        span = min(L, m)
        positions = torch.arange(L, device=x.device)
        r = positions[:, None] - positions[None, :]
        top = 2 * span - 1
        return {"rel": rel, "drel": drel, "rows": slice(m - span, m + span), "c2p": (r + span).clamp(0, top),
                "p2c": (span - r).clamp(0, top)}
