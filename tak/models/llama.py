"""Hugging Face decoder-only language models of Llama's layout (LlamaModel, MistralModel, Qwen2Model, Qwen3Model and
their *ForCausalLM) as dual models.

The token embedding, then pre-norm layers

    x = x + W_o attn(norm_a(x)),   x = x + W_down (silu(W_gate y) ⊙ W_up y) with y = norm_m(x)

(the configured activation in place of silu), a final RMSNorm (statistics in fp32) and, for *ForCausalLM, the LM head
(tied to the embedding or not). Attention: Q, K, V projections (with biases where the model has them: Qwen2), Qwen3's
RMSNorm of each head's Q and K, rotary positions on Q and K, t ↦ t cos θ + rotate_half(t) sin θ with θ = position ·
inv_freq of the model's rotary embedding (× its attention_scaling; static rope types), linear in t so the tangent turns
alike; K and V shared by groups of query heads (grouped-query attention); causal, and padding from attention_mask.
Positions are ``position_ids`` where given, else 0, ..., L − 1 (as the source). In training, dropout on the attention
weights (config.attention_dropout). A query no key may attend (the first positions of a left-padded row) gets the
average of V, as ``tak.nn.attention.dual_attention`` does; the source's output there depends on its attention
implementation, and no real token reads it.
"""
import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from ..nn import linear
from ..nn.attention import dual_attention, merge_heads
from ..nn.base import add, apply, chain
from .base import (CAUSAL_LM_OPTIONS, Builder, DualModel, activation, causal_mask, hf_options, rotary_angles,
                   rotate)


def _rms_norm(b: Builder, m: nn.Module):
    return b.rms_norm(m.weight, m.variance_epsilon)


class DualDecoderLayer(nn.Module):
    """LlamaDecoderLayer and its copies: forward(x (B, L, d), dx, *, mask, cos, sin)."""

    def __init__(self, b: Builder, layer: nn.Module, config, where: str):
        super().__init__()
        a, mlp = layer.self_attn, layer.mlp
        self.norm_attn = _rms_norm(b, layer.input_layernorm)
        self.norm_mlp = _rms_norm(b, layer.post_attention_layernorm)
        self.q, self.k, self.v, self.o = (b.linear(getattr(a, f"{n}_proj")) for n in "qkvo")
        self.q_norm = _rms_norm(b, a.q_norm) if hasattr(a, "q_norm") else None  # Qwen3
        self.k_norm = _rms_norm(b, a.k_norm) if hasattr(a, "k_norm") else None
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = a.q_proj.out_features // self.heads
        self.dropout = float(config.attention_dropout)
        self.gate, self.up, self.down = b.linear(mlp.gate_proj), b.linear(mlp.up_proj), b.linear(mlp.down_proj)
        self.act = activation(config.hidden_act, f"{where}.mlp")
        self.train(a.training)

    def attention(self, x, dx, mask, cos, sin):
        B, L, _ = x.shape
        groups = self.heads // self.kv_heads

        def prepared(pair, n, norm, turned):  # (B, L, n·D) -> (B, H, L, D): normed, rotated, shared by groups
            t, dt = pair
            split = lambda u: u.view(B, L, n, self.head_dim).transpose(1, 2)  # noqa: E731
            t, dt = chain((split(t), apply(split, dt)), norm)
            if turned:
                t, dt = rotate(t, cos, sin), apply(lambda u: rotate(u, cos, sin), dt)
            if n != self.heads:
                t, dt = t.repeat_interleave(groups, 1), apply(lambda u: u.repeat_interleave(groups, 1), dt)
            return t, dt
        q, dq = prepared(self.q(x, dx), self.heads, self.q_norm, True)
        k, dk = prepared(self.k(x, dx), self.kv_heads, self.k_norm, True)
        v, dv = prepared(self.v(x, dx), self.kv_heads, None, False)
        o, do = dual_attention(q, k, v, dq, dk, dv, mask, scale=self.head_dim ** -0.5,
                               dropout=self.dropout if self.training else 0.0)
        return self.o(merge_heads(o), apply(merge_heads, do))

    def forward(self, x, dx, *, mask, cos, sin):
        h, dh = self.attention(*self.norm_attn(x, dx), mask, cos, sin)
        x, dx = x + h, add(dx, dh)
        y, dy = self.norm_mlp(x, dx)
        h, dh = self.down(*self.act(*self.gate(y, dy), *self.up(y, dy)))
        return x + h, add(dx, dh)


class DualLlamaModel(DualModel):
    """forward(input_ids | inputs_embeds, attention_mask=None, position_ids=None) -> (y, dy), each a
    BaseModelOutputWithPast (last_hidden_state (B, L, d)) or, for *ForCausalLM, a CausalLMOutputWithPast (logits
    (B, L, vocab)); dy is None outside the "linearized" mode. Full sequences only: no cache, no generation, no
    labels (take the loss of the logits)."""

    def __init__(self, model: nn.Module, trainable=None):
        super().__init__()
        self.owner, core, b = type(model).__name__, getattr(model, "model", model), Builder(model)
        config = core.config
        # one per model; transformers 4.47's Mistral keeps one per attention module, all alike
        rotary = core.rotary_emb if hasattr(core, "rotary_emb") else core.layers[0].self_attn.rotary_emb
        kind = str(getattr(rotary, "rope_type", "default"))
        if "dynamic" in kind or kind == "longrope":
            raise NotImplementedError(f"{self.owner}: rope type {kind!r} (updated at each call) has no dual layer; "
                                      "static rope types are supported")
        self.register_buffer("inv_freq", rotary.inv_freq, persistent=False)
        self.rope_scaling = float(getattr(rotary, "attention_scaling", 1.0))
        window = getattr(config, "sliding_window", None)
        used = config.model_type == "mistral" or getattr(config, "use_sliding_window", False)
        self.window = window if window is not None and used else None
        self.embed = b.embedding(core.embed_tokens)
        self.layers = nn.ModuleList(DualDecoderLayer(b, layer, config, f"layers.{i}")
                                    for i, layer in enumerate(core.layers))
        self.norm = _rms_norm(b, core.norm)
        head = getattr(model, "lm_head", None)
        self.causal_lm = head is not None
        self.lm_head = None if head is None or head.weight is core.embed_tokens.weight else b.linear(head)
        self.bind(b, model, trainable)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, **options):
        hf_options(self.owner, options, CAUSAL_LM_OPTIONS)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError(f"{self.owner}: pass exactly one of input_ids and inputs_embeds")
        x, dx = self.embed(input_ids) if inputs_embeds is None else (inputs_embeds, None)
        L = x.shape[1]
        if self.window is not None and L > self.window:
            raise NotImplementedError(f"{self.owner}: sequences of {L} tokens exceed sliding_window={self.window}, "
                                      "whose banded attention has no dual layer; tak.linearize(model, fast=False)")
        mask = causal_mask(self.owner, L, attention_mask, x.device)
        if position_ids is None:
            position_ids = torch.arange(L, device=x.device)[None]
        cos, sin = rotary_angles(self.inv_freq, self.rope_scaling, position_ids, x.dtype)
        for layer in self.layers:
            x, dx = layer(x, dx, mask=mask, cos=cos, sin=sin)
        x, dx = self.norm(x, dx)
        if not self.causal_lm:
            y = BaseModelOutputWithPast(last_hidden_state=x)
            return y, None if dx is None else BaseModelOutputWithPast(last_hidden_state=dx)
        logits, dlogits = self.lm_head(x, dx) if self.lm_head is not None else linear(x, dx, *self.embed.dual("weight"))
        y = CausalLMOutputWithPast(logits=logits)
        return y, None if dlogits is None else CausalLMOutputWithPast(logits=dlogits)
