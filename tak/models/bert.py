"""Hugging Face BERT-like encoders as dual models: BertModel (e.g. MiniLM), the RoBERTa family (RobertaModel,
XLMRobertaModel, CamembertModel), ElectraModel, MPNetModel (e.g. all-mpnet-base-v2) and DistilBertModel.

Embeddings: word (or inputs_embeds) + token type (not MPNet, DistilBERT) + absolute position, then LayerNorm; ELECTRA
then projects them to the hidden size (``embeddings_project``, where embedding_size ≠ hidden_size). Positions count
from 0, or, where the position table has a ``padding_idx`` p (RoBERTa, MPNet), from p + 1 over the non-padding tokens
(padding at p). Post-norm layers: x = LN(x + attn(x)), x = LN(x + W_out act(W_in x)), attention over the keys kept by
attention_mask (B, L); MPNet adds to every layer's scores the relative position bias of its encoder, T5's bucketing
of key − query positions (32 buckets, max distance 128) into a table (buckets, heads). Pooler (if any):
tanh(dense(x[:, 0])). In training, dropout as in Hugging Face's models: after the embeddings, on the attention
weights, and on each sublayer's output before its residual (DistilBERT: the feed-forward's only).
"""
import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutput, BaseModelOutputWithPooling

from ..nn import DualActivation, DualAttention, DualDropout
from ..nn.base import add, apply
from .base import Builder, DualModel, activation, hf_options, padding_mask, plus_rows, position_bias


# The options Hugging Face callers pass, at the values the dual models take (the model's defaults).
HF_OPTIONS = {"return_dict": (None, True), "output_attentions": (None, False), "output_hidden_states": (None, False),
              "head_mask": (None,), "encoder_hidden_states": (None,), "encoder_attention_mask": (None,)}


def _attention(b: Builder, a: nn.Module, heads: int, q, k, v, out) -> DualAttention:
    """DualAttention of a Hugging Face self-attention ``a`` with projections q, k, v, out (source modules), across
    transformers versions: the score scale is ``a.scaling`` (5.x), else 1/√head size (4.x and MPNet divide by
    it); the attention dropout is ``a.dropout_prob`` (4.x's SDPA classes), else ``a.dropout.p``."""
    scale = getattr(a, "scaling", (q.out_features // heads) ** -0.5)
    attn = DualAttention(heads, b.linear(out), q=b.linear(q), k=b.linear(k), v=b.linear(v), scale=scale,
                         dropout=getattr(a, "dropout_prob", a.dropout.p))
    return attn.train(a.training)


def bert_self_attention(b: Builder, a: nn.Module, out: nn.Module) -> DualAttention:
    """The dual of BertSelfAttention ``a`` (and its copies') with the output projection ``out``."""
    return _attention(b, a, a.num_attention_heads, a.query, a.key, a.value, out)


class DualBertLayer(nn.Module):
    """x = LN_a(x + drop(attn(x))); x = LN_o(x + drop(out(act(fc(x))))) on (B, L, d)."""

    def __init__(self, attn: DualAttention, drop_attn, ln_attn, fc, act, out, drop_out, ln_out):
        super().__init__()
        self.attn, self.drop_attn, self.ln_attn = attn, drop_attn, ln_attn
        self.fc, self.act, self.out, self.drop_out, self.ln_out = fc, act, out, drop_out, ln_out

    @classmethod
    def of_bert(cls, b: Builder, layer: nn.Module, act: str, where: str,
                self_attention=bert_self_attention) -> "DualBertLayer":
        """BertLayer and its copies (RoBERTa, ELECTRA, ...), and those of BERT's layout with another self-attention
        (DeBERTa's), built by ``self_attention(b, layer.attention.self, out)`` -> DualAttention."""
        a = layer.attention
        return cls._with_feed_forward(b, layer, act, where, self_attention(b, a.self, a.output.dense),
                                      a.output.dropout, a.output.LayerNorm)

    @classmethod
    def of_mpnet(cls, b: Builder, layer: nn.Module, act: str, where: str) -> "DualBertLayer":
        """MPNetLayer: BERT's layout, the projections q, k, v, o on ``attention.attn``."""
        a, s = layer.attention, layer.attention.attn
        attn = _attention(b, s, s.num_attention_heads, s.q, s.k, s.v, s.o)
        return cls._with_feed_forward(b, layer, act, where, attn, a.dropout, a.LayerNorm)

    @classmethod
    def _with_feed_forward(cls, b: Builder, layer: nn.Module, act: str, where: str, attn: DualAttention,
                           drop_attn: nn.Module, ln_attn: nn.Module) -> "DualBertLayer":
        """The layer of ``attn`` with BERT's feed-forward (``layer.intermediate``, ``layer.output``)."""
        return cls(attn, b.dropout(drop_attn), b.layer_norm(ln_attn), b.linear(layer.intermediate.dense),
                   activation(act, f"{where}.intermediate"), b.linear(layer.output.dense),
                   b.dropout(layer.output.dropout), b.layer_norm(layer.output.LayerNorm))

    @classmethod
    def of_distilbert(cls, b: Builder, layer: nn.Module, act: str, where: str) -> "DualBertLayer":
        """DistilBERT's TransformerBlock: no dropout between the attention and its residual."""
        a, ffn = layer.attention, layer.ffn
        return cls(_attention(b, a, a.n_heads, a.q_lin, a.k_lin, a.v_lin, a.out_lin),
                   DualDropout(0.0), b.layer_norm(layer.sa_layer_norm), b.linear(ffn.lin1),
                   activation(act, f"{where}.ffn"), b.linear(ffn.lin2), b.dropout(ffn.dropout),
                   b.layer_norm(layer.output_layer_norm))

    def forward(self, x, dx, mask, **context):
        """``context``: what the attention takes besides its input and mask (MPNet's position bias, DeBERTa's relative
        embeddings)."""
        h, dh = self.drop_attn(*self.attn(x, dx, mask=mask, **context))
        x, dx = self.ln_attn(x + h, add(dx, dh))
        h, dh = self.drop_out(*self.out(*self.act(*self.fc(x, dx))))
        return self.ln_out(x + h, add(dx, dh))


def _encoder_only(kind: str, config) -> None:
    for flag in ("is_decoder", "add_cross_attention"):
        if getattr(config, flag, False):
            raise NotImplementedError(f"{kind} with config.{flag}=True: only encoders are supported")


class DualBertModel(DualModel):
    """forward(input_ids | inputs_embeds, attention_mask=None, token_type_ids=None, position_ids=None) ->
    (y, dy), each a BaseModelOutputWithPooling (last_hidden_state (B, L, d); pooler_output (B, d) or
    None without a pooler); dy is None outside the "linearized" mode."""

    def __init__(self, model: nn.Module, trainable=None):
        super().__init__()
        c, kind = model.config, type(model).__name__
        _encoder_only(kind, c)
        if getattr(c, "position_embedding_type", "absolute") != "absolute":
            raise NotImplementedError(f"{kind}: position_embedding_type={c.position_embedding_type!r} "
                                      "(only 'absolute' is supported)")
        b = Builder(model)
        e = model.embeddings
        self.word = b.embedding(e.word_embeddings)
        types = getattr(e, "token_type_embeddings", None)  # MPNet has none
        self.token_type = None if types is None else b.embedding(types)
        self.position = b.embedding(e.position_embeddings)
        self.position_padding = e.position_embeddings.padding_idx  # RoBERTa's positions start after it
        self.ln_embed = b.layer_norm(e.LayerNorm)
        self.drop_embed = b.dropout(e.dropout)
        project = getattr(model, "embeddings_project", None)  # ELECTRA's, where embedding_size ≠ hidden_size
        self.project = None if project is None else b.linear(project)
        relative = getattr(model.encoder, "relative_attention_bias", None)  # MPNet's, shared by its layers
        self.relative_bias = None if relative is None else b.embedding(relative)
        self.bucket = None if relative is None else type(model.encoder).relative_position_bucket
        layer_of = DualBertLayer.of_bert if relative is None else DualBertLayer.of_mpnet
        self.layers = nn.ModuleList(layer_of(b, layer, c.hidden_act, f"encoder.layer.{i}")
                                    for i, layer in enumerate(model.encoder.layer))
        pooler = getattr(model, "pooler", None)  # ELECTRA has none
        self.pooler = None if pooler is None else b.linear(pooler.dense)
        self.pooler_act = DualActivation("tanh")
        self.bind(b, model, trainable)

    def positions(self, input_ids, L: int, device) -> torch.Tensor:
        """The default position ids: 0, ..., L − 1 (1, L); with a position padding index p (RoBERTa), p + 1, p + 2, ...
        over the non-padding tokens of ``input_ids`` (B, L) and p at padding (p + 1, ..., p + L without ids)."""
        p = self.position_padding
        if p is None:
            return torch.arange(L, device=device)[None]
        if input_ids is None:
            return torch.arange(p + 1, p + 1 + L, device=device)[None]
        tokens = input_ids.ne(p).long()
        return tokens.cumsum(1) * tokens + p

    def embed(self, input_ids, token_type_ids, position_ids, inputs_embeds):
        """drop(LN(word + token type + position embeddings)) (B, L, d), projected where the model does, and its
        tangent. Without a token type table (MPNet) ``token_type_ids`` are ignored, as the source ignores them."""
        x, dx = self.word(input_ids) if inputs_embeds is None else (inputs_embeds, None)
        B, L, _ = x.shape
        if self.token_type is not None:
            types = torch.zeros(B, L, dtype=torch.long, device=x.device) if token_type_ids is None else token_type_ids
            x, dx = plus_rows(x, dx, self.token_type, types)
        if position_ids is None:
            position_ids = self.positions(input_ids, L, x.device)
        x, dx = self.drop_embed(*self.ln_embed(*plus_rows(x, dx, self.position, position_ids)))
        return (x, dx) if self.project is None else self.project(x, dx)

    def position_bias(self, L: int, device) -> dict:
        """MPNet's relative position bias (1, H, L, L) of the buckets of key − query positions, as the attention's
        ``bias`` and ``dbias``; {} for the others."""
        if self.relative_bias is None:
            return {}
        positions = torch.arange(L, device=device)
        bias, dbias = position_bias(self.relative_bias, self.bucket(positions[None, :] - positions[:, None]))
        return {"bias": bias, "dbias": dbias}

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                inputs_embeds=None, **options):
        """``options`` Hugging Face callers pass are accepted at their defaults (return_dict True or None,
        output_attentions / output_hidden_states False or None, head_mask None); other values are refused."""
        hf_options("DualBertModel", options, HF_OPTIONS)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("DualBertModel: pass exactly one of input_ids and inputs_embeds")
        mask = padding_mask("DualBertModel", "attention_mask", attention_mask)
        x, dx = self.embed(input_ids, token_type_ids, position_ids, inputs_embeds)
        context = self.position_bias(x.shape[1], x.device)
        for layer in self.layers:
            x, dx = layer(x, dx, mask, **context)
        p = dp = None
        if self.pooler is not None:
            p, dp = self.pooler_act(*self.pooler(x[:, 0], apply(lambda t: t[:, 0], dx)))
        y = BaseModelOutputWithPooling(last_hidden_state=x, pooler_output=p)
        return y, None if dx is None and dp is None else BaseModelOutputWithPooling(last_hidden_state=dx, pooler_output=dp)


class DualDistilBertModel(DualModel):
    """DistilBertModel: forward(input_ids | inputs_embeds, attention_mask=None, position_ids=None) -> (y, dy), each a
    BaseModelOutput (last_hidden_state (B, L, d)); dy is None outside the "linearized" mode. Embeddings: word +
    position, LayerNorm, dropout; no token types, no pooler."""

    def __init__(self, model: nn.Module, trainable=None):
        super().__init__()
        _encoder_only("DistilBertModel", model.config)
        b = Builder(model)
        e = model.embeddings
        self.word = b.embedding(e.word_embeddings)
        self.position = b.embedding(e.position_embeddings)
        self.ln_embed = b.layer_norm(e.LayerNorm)
        self.drop_embed = b.dropout(e.dropout)
        self.layers = nn.ModuleList(DualBertLayer.of_distilbert(b, layer, model.config.activation,
                                                                f"transformer.layer.{i}")
                                    for i, layer in enumerate(model.transformer.layer))
        self.bind(b, model, trainable)

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, position_ids=None, **options):
        """``options`` as ``DualBertModel.forward`` accepts them."""
        hf_options("DualDistilBertModel", options, HF_OPTIONS)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("DualDistilBertModel: pass exactly one of input_ids and inputs_embeds")
        mask = padding_mask("DualDistilBertModel", "attention_mask", attention_mask)
        x, dx = self.word(input_ids) if inputs_embeds is None else (inputs_embeds, None)
        positions = torch.arange(x.shape[1], device=x.device)[None] if position_ids is None else position_ids
        x, dx = self.drop_embed(*self.ln_embed(*plus_rows(x, dx, self.position, positions)))
        for layer in self.layers:
            x, dx = layer(x, dx, mask)
        return BaseModelOutput(last_hidden_state=x), None if dx is None else BaseModelOutput(last_hidden_state=dx)
