"""Hugging Face T5 and mT5 (T5EncoderModel, T5Model, T5ForConditionalGeneration and their MT5 twins) as dual models.

Pre-norm blocks with RMSNorm: x + attn(norm(x)) (self-attention, unscaled scores plus the relative
position bias of the stack's first block, shared by all blocks, with its tangent), in the decoder
causal, then x + cross-attn(norm(x), encoder output); then x + W_o act(W_i x) or, gated (T5 v1.1),
x + W_o (act(W_i0 x) ⊙ W_i1 x); a final RMSNorm. The LM head (tied to the shared embedding, or not)
reads the decoder output scaled by d_model^(-1/2) when config.scale_decoder_outputs. RMSNorm takes its
statistics in at least fp32 (T5LayerNorm takes them in fp32 even for fp64 inputs). In training, dropout
(config.dropout_rate) as in Hugging Face's T5: on the embedded tokens, the attention weights, the
feed-forward's hidden activations, each sublayer's output before its residual, and the final norm's output.
"""
import torch
import transformers
from torch import nn
from transformers.modeling_outputs import BaseModelOutput, Seq2SeqLMOutput, Seq2SeqModelOutput
from transformers.models.t5.modeling_t5 import T5Attention

from ..nn import DualAttention, linear
from ..nn.base import add, apply, cast
from .base import Builder, DualModel, activation, hf_options, padding_mask, position_bias


def _attention(b: Builder, a: T5Attention) -> DualAttention:
    return DualAttention(a.n_heads, b.linear(a.o), q=b.linear(a.q), k=b.linear(a.k), v=b.linear(a.v), scale=1.0,
                         dropout=a.dropout).train(a.training)


def _norm(b: Builder, layer: nn.Module):
    return b.rms_norm(layer.layer_norm.weight, layer.layer_norm.variance_epsilon)


class DualT5Block(nn.Module):
    """Self-attention, cross-attention (decoder), feed-forward; each pre-norm and residual, on (B, L, d)."""

    def __init__(self, b: Builder, block: nn.Module, config, decoder: bool):
        super().__init__()
        self.norm_self, self.self_attn = _norm(b, block.layer[0]), _attention(b, block.layer[0].SelfAttention)
        self.drop_self = b.dropout(block.layer[0].dropout)
        self.norm_cross = self.cross_attn = self.drop_cross = None
        if decoder:
            self.norm_cross, self.cross_attn = _norm(b, block.layer[1]), _attention(b, block.layer[1].EncDecAttention)
            self.drop_cross = b.dropout(block.layer[1].dropout)
        ff = block.layer[-1]
        dense = ff.DenseReluDense
        self.norm_ff = _norm(b, ff)
        self.gated = config.is_gated_act
        self.wi = b.linear(dense.wi_0 if self.gated else dense.wi)
        self.wi_gate = b.linear(dense.wi_1) if self.gated else None
        self.act = activation(config.dense_act_fn, "DenseReluDense")
        self.drop_hidden = b.dropout(dense.dropout)
        self.wo = b.linear(dense.wo)
        self.drop_ff = b.dropout(ff.dropout)

    def feed_forward(self, x, dx):
        gate = self.wi_gate(x, dx) if self.gated else (None, None)
        h, dh = self.drop_hidden(*self.act(*self.wi(x, dx), *gate))
        dtype = self.wo.weight.dtype  # a 16-bit T5 keeps wo in fp32 (_keep_in_fp32_modules): HF casts to it
        return self.wo(cast(h, dtype), cast(dh, dtype))

    def forward(self, x, dx, mask, bias, dbias, enc=None, denc=None, enc_mask=None):
        h, dh = self.drop_self(*self.self_attn(*self.norm_self(x, dx), mask=mask, bias=bias, dbias=dbias))
        x, dx = _clamped(x + h, add(dx, dh))
        if self.cross_attn is not None:
            h, dh = self.drop_cross(*self.cross_attn(*self.norm_cross(x, dx), enc, denc, mask=enc_mask))
            x, dx = _clamped(x + h, add(dx, dh))
        h, dh = self.drop_ff(*self.feed_forward(*self.norm_ff(x, dx)))
        return _clamped(x + h, add(dx, dh))


def _clamped(x, dx):
    """Hugging Face T5's clamp of float16 hidden states after each sublayer (to ± the largest float16, less 1000
    where one is infinite), the tangent zero where it clamps; other dtypes as they are."""
    if x.dtype != torch.float16:
        return x, dx
    top = torch.finfo(x.dtype).max
    limit = torch.where(torch.isinf(x).any(), top - 1000, top)
    return torch.clamp(x, min=-limit, max=limit), apply(lambda d: torch.where(x.abs() <= limit, d, 0), dx)


class DualT5Stack(nn.Module):
    """T5Stack without its embedding: dropout, blocks over embedded tokens (B, L, d), the final RMSNorm, dropout."""

    def __init__(self, b: Builder, stack: nn.Module):
        super().__init__()
        c = stack.config
        self.decoder = stack.is_decoder
        self.blocks = nn.ModuleList(DualT5Block(b, block, c, self.decoder) for block in stack.block)
        self.relative_bias = b.embedding(stack.block[0].layer[0].SelfAttention.relative_attention_bias)
        self.num_buckets, self.max_distance = c.relative_attention_num_buckets, c.relative_attention_max_distance
        self.final_norm = b.rms_norm(stack.final_layer_norm.weight, stack.final_layer_norm.variance_epsilon)
        self.drop = b.dropout(stack.dropout)

    def position_bias(self, length, device):
        """Relative position bias (1, H, L, L) of the buckets of key − query positions, and its tangent."""
        pos = torch.arange(length, device=device)
        buckets = T5Attention._relative_position_bucket(pos[None, :] - pos[:, None], bidirectional=not self.decoder,
                                                        num_buckets=self.num_buckets, max_distance=self.max_distance)
        return position_bias(self.relative_bias, buckets)

    def forward(self, x, dx, mask=None, enc=None, denc=None, enc_mask=None):
        """(states, dstates): Hugging Face's ``hidden_states``, each block's input then the stack's output (the last
        hidden state, states[-1]), and their tangents (None before the first trained block; dstates None when no
        tangent reaches the output)."""
        bias, dbias = self.position_bias(x.shape[1], x.device)
        bias = bias.to(x.dtype)
        states = [self.drop(x, dx)]
        for block in self.blocks:
            states.append(block(*states[-1], mask, bias, dbias, enc, denc, enc_mask))
        states[-1] = self.drop(*self.final_norm(*states[-1]))
        return tuple(x for x, _ in states), None if states[-1][1] is None else tuple(dx for _, dx in states)


def _embed(table, input_ids, inputs_embeds, what):
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError(f"pass exactly one of {what}input_ids and {what}inputs_embeds")
    return table(input_ids) if inputs_embeds is None else (inputs_embeds, None)


_OPTIONS = {"return_dict": (None, True), "output_hidden_states": (None, False, True),
            "output_attentions": (None, False), "head_mask": (None,)}
# An encoder-decoder's: teacher forcing, no cache, nothing precomputed (Hugging Face's task heads pass them as None)
_SEQ2SEQ_OPTIONS = {**_OPTIONS, "use_cache": (None, False), "encoder_outputs": (None,), "past_key_values": (None,),
                    "cache": (None,), "cache_position": (None,), "decoder_head_mask": (None,),
                    "cross_attn_head_mask": (None,)}


def _hidden_states(states, wanted, primals=None):
    """``states`` when ``output_hidden_states`` asks for them, else None (nothing made). Tangent states (with their
    ``primals``) get zeros where no tangent reaches: before the first trained block, or a stack with none."""
    if not wanted or primals is None:
        return states if wanted else None
    return tuple(torch.zeros_like(x) if d is None else d for x, d in zip(primals, states or (None,) * len(primals)))


class DualT5EncoderModel(DualModel):
    """forward(input_ids | inputs_embeds, attention_mask=None, output_hidden_states=None) -> (y, dy), each a
    BaseModelOutput with last_hidden_state (B, L, d) and, when asked for, hidden_states as Hugging Face's; dy is
    None outside the "linearized" mode."""

    def __init__(self, model: nn.Module, trainable=None):
        super().__init__()
        b = Builder(model)
        self.embed = b.embedding(model.encoder.embed_tokens)
        self.encoder = DualT5Stack(b, model.encoder)
        self.bind(b, model, trainable)

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, **options):
        wanted = hf_options("DualT5EncoderModel", options, _OPTIONS).get("output_hidden_states")
        mask = padding_mask("DualT5EncoderModel", "attention_mask", attention_mask)
        states, dstates = self.encoder(*_embed(self.embed, input_ids, inputs_embeds, ""), mask)
        y = BaseModelOutput(last_hidden_state=states[-1], hidden_states=_hidden_states(states, wanted))
        return y, apply(lambda d: BaseModelOutput(last_hidden_state=d[-1],
                                                  hidden_states=_hidden_states(d, wanted, states)), dstates)


class DualT5Model(DualModel):
    """forward(input_ids | inputs_embeds, attention_mask=None, decoder_input_ids | decoder_inputs_embeds,
    decoder_attention_mask=None, output_hidden_states=None) -> (y, dy), each a Seq2SeqModelOutput with
    last_hidden_state (B, L_dec, d), the decoder's output after its final RMSNorm, encoder_last_hidden_state (B, L, d)
    and, when asked for, encoder_hidden_states and decoder_hidden_states as Hugging Face's. dy is None outside the
    "linearized" mode. Teacher forcing only: no cache (``use_cache`` None or False), no precomputed
    ``encoder_outputs``."""

    def __init__(self, model: nn.Module, trainable=None):
        super().__init__()
        b = Builder(model)
        self.embed = b.embedding(model.encoder.embed_tokens)
        self.encoder = DualT5Stack(b, model.encoder)
        self.decoder_embed = b.embedding(model.decoder.embed_tokens)  # T5's shared table: the encoder's θ0 and τ
        self.decoder = DualT5Stack(b, model.decoder)
        self.build_head(b, model)
        self.bind(b, model, trainable)

    def build_head(self, b: Builder, model: nn.Module) -> None:
        """The layers after the decoder: none here."""

    def forward(self, input_ids=None, attention_mask=None, decoder_input_ids=None, decoder_attention_mask=None,
                inputs_embeds=None, decoder_inputs_embeds=None, **options):
        owner = type(self).__name__
        wanted = hf_options(owner, options, _SEQ2SEQ_OPTIONS).get("output_hidden_states")
        enc_mask = padding_mask(owner, "attention_mask", attention_mask)
        encoded, dencoded = self.encoder(*_embed(self.embed, input_ids, inputs_embeds, ""), enc_mask)
        x, dx = _embed(self.decoder_embed, decoder_input_ids, decoder_inputs_embeds, "decoder_")
        L = x.shape[1]
        mask = torch.ones(L, L, dtype=torch.bool, device=x.device).tril()
        if decoder_attention_mask is not None:
            mask = mask & padding_mask(owner, "decoder_attention_mask", decoder_attention_mask)
        decoded = self.decoder(x, dx, mask, encoded[-1], apply(lambda d: d[-1], dencoded), enc_mask)
        return self.outputs((encoded, dencoded), decoded, wanted)

    def outputs(self, encoder, decoder, wanted):
        """(y, dy) from each stack's (states, tangents) (see ``DualT5Stack``; the decoder's teacher-forced under a
        causal mask) and whether ``output_hidden_states``: here the decoder's last hidden state."""
        decoded, ddecoded = decoder
        return _seq2seq_output(Seq2SeqModelOutput, "last_hidden_state", decoded[-1], apply(lambda d: d[-1], ddecoded),
                               encoder, decoder, wanted)


def _seq2seq_output(cls, field: str, y, dy, encoder, decoder, wanted):
    """(y, dy) as Hugging Face's ``cls`` with ``field`` (its first) = ``y`` / ``dy`` and the stacks' states (see
    ``DualT5Model.outputs``); dy None where no tangent reaches."""
    (encoded, dencoded), (decoded, ddecoded) = encoder, decoder
    out = cls(**{field: y}, encoder_last_hidden_state=encoded[-1],
              encoder_hidden_states=_hidden_states(encoded, wanted),
              decoder_hidden_states=_hidden_states(decoded, wanted))
    if dy is None and dencoded is None:
        return out, None
    return out, cls(**{field: dy}, encoder_last_hidden_state=apply(lambda d: d[-1], dencoded),
                    encoder_hidden_states=_hidden_states(dencoded, wanted, encoded),
                    decoder_hidden_states=_hidden_states(ddecoded, wanted, decoded))


def decoder_output_scale(model: nn.Module) -> float:
    """d_model^-0.5 where Hugging Face scales the decoder's output before the head, else 1: T5 with tied embeddings
    (``config.scale_decoder_outputs`` from transformers 5 on, ``config.tie_word_embeddings`` before); mT5 likewise
    before transformers 5, never from 5 on (whose MT5Config always says tied)."""
    c = model.config
    if type(model).__name__ == "MT5ForConditionalGeneration":
        scaled = c.tie_word_embeddings and int(transformers.__version__.split(".")[0]) < 5
    else:
        scaled = getattr(c, "scale_decoder_outputs", c.tie_word_embeddings)
    return c.d_model ** -0.5 if scaled else 1.0


class DualT5ForConditionalGeneration(DualT5Model):
    """forward(input_ids | inputs_embeds, attention_mask=None, decoder_input_ids | decoder_inputs_embeds,
    decoder_attention_mask=None, output_hidden_states=None) -> (y, dy), each a Seq2SeqLMOutput with logits
    (B, L_dec, vocab), encoder_last_hidden_state (B, L, d) and, when asked for, encoder_hidden_states and
    decoder_hidden_states as Hugging Face's (the decoder's last hidden state, after its final RMSNorm, is
    decoder_hidden_states[-1]). dy is None outside the "linearized" mode. Teacher forcing only: no cache
    (``use_cache`` None or False), no generation, no labels (shift them right yourself)."""

    def build_head(self, b: Builder, model: nn.Module) -> None:
        """The LM head (None: tied to the decoder's token embedding) and the scale of the decoder's output before it."""
        tied = model.lm_head.weight is model.decoder.embed_tokens.weight
        self.lm_head = None if tied else b.linear(model.lm_head)
        self.output_scale = decoder_output_scale(model)

    def outputs(self, encoder, decoder, wanted):
        """The LM head's logits of the decoder's (scaled) last hidden state."""
        decoded, ddecoded = decoder
        h, dh = decoded[-1] * self.output_scale, apply(lambda d: d[-1] * self.output_scale, ddecoded)
        if self.lm_head is not None:
            logits, dlogits = self.lm_head(h, dh)
        else:
            logits, dlogits = linear(h, dh, *self.decoder_embed.dual("weight"))
        return _seq2seq_output(Seq2SeqLMOutput, "logits", logits, dlogits, encoder, decoder, wanted)
