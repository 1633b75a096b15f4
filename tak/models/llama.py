"""Hugging Face decoder-only language models of Llama's layout and its relatives (LlamaModel, MistralModel, Qwen2Model,
Qwen3Model, GemmaModel, Gemma2Model, Gemma3TextModel, Phi3Model, Olmo2Model, Olmo3Model, SmolLM3Model, GraniteModel and
their *ForCausalLM) as dual models.

The token embedding (× √d rounded to its dtype in Gemma's, × embedding_multiplier in Granite's), then layers

    x = x + r·post_a(W_o attn(norm_a(x))),   x = x + r·post_m(W_down (act(W_gate y) ⊙ W_up y)) with y = norm_m(x)

(norm_a, norm_m: the pre-norms, which OLMo 2/3 do without; post_a, post_m: Gemma 2/3's and OLMo's norms of each branch's
output, Phi-3's dropout on it in training; r: Granite's residual_multiplier, else 1), a final norm and, for
*ForCausalLM, the LM head (tied to the embedding or not; its logits divided by Granite's logits_scaling, capped to
c·tanh(z / c) where Gemma 2/3's config says so). The norms are RMSNorms, γ ⊙ x̂ with x̂ = x (mean(x²) + ε)^(-1/2) in
fp32, or Gemma's (1 + γ) ⊙ x̂ in fp32. Attention: Q, K, V projections (with biases where the model has them: Qwen2; one
fused [Q | K | V] in Phi-3), an RMSNorm of Q and K (each head's in Qwen3 and Gemma 3, all heads' at once in OLMo 2/3),
rotary positions on Q and K (but in SmolLM3's layers without them), t ↦ t cos θ + rotate_half(t) sin θ on each head's
first dims (all but in Phi-3 with a partial_rotary_factor) with θ = position · inv_freq of the layer's rotary table
(Gemma 3's and OLMo 3's sliding layers have their own; × its attention_scaling; static rope types, and longrope's short
table for positions below its original_max_position_embeddings), linear in t so the tangent turns alike; K and V shared
by groups of query heads (grouped-query attention); scores scaled by the source's ``scaling`` (Gemma 2/3:
query_pre_attn_scalar^(-1/2); Granite: attention_multiplier), Gemma 2's capped to c·tanh(s / c) (attn_logit_softcapping,
``dual_attention``'s softcap); causal, and padding from attention_mask. The feed-forward's gate and up projections are
one fused [gate | up] in Phi-3. Positions are ``position_ids`` where given, else 0, ..., L − 1 (as the source). In
training, dropout on the attention weights (config.attention_dropout). A query no key may attend (the first positions of
a left-padded row) gets the average of V, as ``tak.nn.attention.dual_attention`` does; the source's output there depends
on its attention implementation, and no real token reads it.

Sliding-window layers (Mistral, Phi-3, Qwen2's, Gemma 2/3's, OLMo 3's and SmolLM3's where used) take sequences up to
their window, where the window is the causal mask.
"""
import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from ..nn import linear
from ..nn.attention import dual_attention, merge_heads
from ..nn.base import add, apply, chain
from .base import (CAUSAL_LM_OPTIONS, Builder, DualModel, activation, causal_mask, hf_options, lm_outputs,
                   rotary_angles, rotary_table, rotate, split_pair)


def _rms_norm(b: Builder, m: nn.Module):
    """Llama's RMSNorm (ε ``variance_epsilon``) or Gemma's ((1 + γ) ⊙ x̂, ε ``eps``)."""
    if type(m).__name__.startswith("Gemma"):
        return b.rms_norm(m.weight, m.eps, offset=1.0)
    return b.rms_norm(m.weight, m.variance_epsilon)


def _embedding_scale(table: nn.Embedding, config) -> tuple[float | None, bool]:
    """(the factor that multiplies the token embeddings, None for none; whether ``inputs_embeds`` get it too): Gemma's
    √d in the table's dtype, at the lookup (its scaled embedding) or, in transformers 4, after it; Granite's
    embedding_multiplier, after it."""
    if config.model_type.startswith("gemma"):
        if hasattr(table, "embed_scale"):
            return table.embed_scale.to(table.weight.dtype).item(), False
        return torch.tensor(config.hidden_size ** 0.5, dtype=table.weight.dtype).item(), True
    return getattr(config, "embedding_multiplier", None), True


def _window(config, attention: nn.Module) -> int | None:
    """The sliding window of ``attention``'s keys, None for plain causal attention: its own where it keeps one (Qwen2,
    Gemma 3, OLMo 3, SmolLM3 per layer), else the model's where used (Mistral's, Phi-3's; Qwen2's in transformers
    4)."""
    if hasattr(attention, "sliding_window"):
        return attention.sliding_window
    used = config.model_type in ("mistral", "phi3") or getattr(config, "use_sliding_window", False)
    return getattr(config, "sliding_window", None) if used else None


class DualDecoderLayer(nn.Module):
    """LlamaDecoderLayer and its relatives' (module docstring): forward(x (B, L, d), dx, *, mask, cos, sin) with the
    angles of its rotary table, the model's ``rope``-th."""

    def __init__(self, b: Builder, layer: nn.Module, config, where: str, rope: int):
        super().__init__()
        a, mlp = layer.self_attn, layer.mlp
        # Gemma 2/3 and OLMo 2/3 norm each branch's output, post_attention_layernorm the attention's; OLMo not its input
        post = hasattr(layer, "post_feedforward_layernorm")
        norm = lambda name: _rms_norm(b, getattr(layer, name)) if hasattr(layer, name) else None  # noqa: E731
        self.norm_attn = norm("input_layernorm")
        self.norm_mlp = norm("pre_feedforward_layernorm" if post else "post_attention_layernorm")
        self.post_attn, self.post_mlp = (norm("post_attention_layernorm"), norm("post_feedforward_layernorm")) if post \
            else (None, None)
        self.residual_scale = float(getattr(config, "residual_multiplier", 1.0))  # Granite's
        dropouts = [b.dropout(getattr(layer, n)) if hasattr(layer, n) else None
                    for n in ("resid_attn_dropout", "resid_mlp_dropout")]  # Phi-3's
        self.drop_attn, self.drop_mlp = dropouts
        self.heads, self.kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, a.head_dim
        self.fused = hasattr(a, "qkv_proj")  # Phi-3
        self.qkv = nn.ModuleList([b.linear(a.qkv_proj)] if self.fused else [b.linear(getattr(a, f"{n}_proj"))
                                                                              for n in "qkv"])
        self.o = b.linear(a.o_proj)
        self.q_norm = _rms_norm(b, a.q_norm) if hasattr(a, "q_norm") else None  # Qwen3, Gemma 3; OLMo 2/3: over all
        self.k_norm = _rms_norm(b, a.k_norm) if hasattr(a, "k_norm") else None  # heads at once
        self.qk_norms_whole = self.q_norm is not None and a.q_norm.weight.numel() != self.head_dim
        self.turned = bool(getattr(a, "use_rope", True))  # SmolLM3's layers without positions
        self.scale = float(getattr(a, "scaling", self.head_dim ** -0.5))
        self.softcap = getattr(config, "attn_logit_softcapping", None)  # Gemma 2's
        self.dropout = float(config.attention_dropout)
        self.rope, self.window = rope, _window(config, a)
        self.gate_up = b.linear(mlp.gate_up_proj) if hasattr(mlp, "gate_up_proj") else None  # Phi-3
        self.gate, self.up = (None, None) if self.gate_up else (b.linear(mlp.gate_proj), b.linear(mlp.up_proj))
        self.down = b.linear(mlp.down_proj)
        self.act = activation(getattr(config, "hidden_activation", None) or config.hidden_act, f"{where}.mlp")
        self.train(a.training)

    def attention(self, x, dx, mask, cos, sin):
        B, L, _ = x.shape
        groups, sizes = self.heads // self.kv_heads, [n * self.head_dim for n in (self.heads,) + 2 * (self.kv_heads,)]
        projected = split_pair(self.qkv[0](x, dx), sizes) if self.fused else [p(x, dx) for p in self.qkv]
        norms = (None, None) if self.qk_norms_whole else (self.q_norm, self.k_norm)
        if self.qk_norms_whole:  # OLMo's: all heads at once, before they are split
            projected[:2] = [chain(pair, norm) for pair, norm in zip(projected, (self.q_norm, self.k_norm))]

        def prepared(pair, n, norm, turned):  # (B, L, n·D) -> (B, H, L, D): normed, rotated, shared by groups
            t, dt = pair
            split = lambda u: u.view(B, L, n, self.head_dim).transpose(1, 2)  # noqa: E731
            t, dt = chain((split(t), apply(split, dt)), norm)
            if turned:
                t, dt = rotate(t, cos, sin), apply(lambda u: rotate(u, cos, sin), dt)
            if n != self.heads:
                t, dt = t.repeat_interleave(groups, 1), apply(lambda u: u.repeat_interleave(groups, 1), dt)
            return t, dt
        q, dq = prepared(projected[0], self.heads, norms[0], self.turned)
        k, dk = prepared(projected[1], self.kv_heads, norms[1], self.turned)
        v, dv = prepared(projected[2], self.kv_heads, None, False)
        o, do = dual_attention(q, k, v, dq, dk, dv, mask, scale=self.scale, softcap=self.softcap,
                               dropout=self.dropout if self.training else 0.0)
        return self.o(merge_heads(o), apply(merge_heads, do))

    def mlp(self, y, dy):
        gate, up = split_pair(self.gate_up(y, dy), 2 * [self.down.weight.shape[1]]) if self.gate_up else \
            (self.gate(y, dy), self.up(y, dy))
        return self.down(*self.act(*gate, *up))

    def residual(self, x, dx, h, dh):
        """x + r·h (r: Granite's residual_multiplier, else 1) and its tangent."""
        if self.residual_scale != 1.0:
            h, dh = h * self.residual_scale, apply(lambda t: t * self.residual_scale, dh)
        return x + h, add(dx, dh)

    def forward(self, x, dx, *, mask, cos, sin):
        h, dh = chain(self.attention(*chain((x, dx), self.norm_attn), mask, cos, sin), self.post_attn, self.drop_attn)
        x, dx = self.residual(x, dx, h, dh)
        return self.residual(x, dx, *chain(self.mlp(*chain((x, dx), self.norm_mlp)), self.post_mlp, self.drop_mlp))


class DualLlamaModel(DualModel):
    """forward(input_ids | inputs_embeds, attention_mask=None, position_ids=None) -> (y, dy), each a
    BaseModelOutputWithPast (last_hidden_state (B, L, d)) or, for *ForCausalLM, a CausalLMOutputWithPast (logits
    (B, L, vocab)); dy is None outside the "linearized" mode. Full sequences only: no cache, no generation, no
    labels (take the loss of the logits)."""

    def __init__(self, model: nn.Module, trainable=None):
        super().__init__()
        self.owner, core, b = type(model).__name__, getattr(model, "model", model), Builder(model)
        config = core.config
        if getattr(config, "use_bidirectional_attention", False):
            raise NotImplementedError(f"{self.owner}: use_bidirectional_attention=True has no dual layer; causal "
                                      "attention is supported")
        self.embed = b.embedding(core.embed_tokens)
        self.embed_scale, self.scales_inputs_embeds = _embedding_scale(core.embed_tokens, config)
        tables, self.rope_scalings, layers, limits = {}, [], [], []  # the distinct rotary tables: f"inv_freq_{i}"
        types = getattr(config, "layer_types", None)
        for i, layer in enumerate(core.layers):
            inv_freq, scaling, limit = rotary_table(core, layer.self_attn, types and types[i], f"layers.{i}")
            limits += [limit] if limit else []
            if id(inv_freq) not in tables:
                self.register_buffer(f"inv_freq_{len(tables)}", inv_freq, persistent=False)
                tables[id(inv_freq)] = len(tables)
                self.rope_scalings.append(scaling)
            layers.append(DualDecoderLayer(b, layer, config, f"layers.{i}", tables[id(inv_freq)]))
        self.layers = nn.ModuleList(layers)
        self.window = min((layer.window for layer in self.layers if layer.window), default=None)
        self.position_limit = min(limits, default=None)  # longrope's short table holds for positions below it
        self.norm = _rms_norm(b, core.norm)
        head = getattr(model, "lm_head", None)
        self.causal_lm = head is not None
        self.lm_head = None if head is None or head.weight is core.embed_tokens.weight else b.linear(head)
        self.logit_cap = getattr(config, "final_logit_softcapping", None)  # Gemma 2/3's
        self.logit_divisor = float(getattr(config, "logits_scaling", 1.0))  # Granite's
        self.bind(b, model, trainable)

    def embedded(self, input_ids, inputs_embeds):
        """(x, dx) (B, L, d) of the tokens: their embeddings, or ``inputs_embeds``, × the model's embedding scale
        where it has one and applies it there (Gemma's √d, Granite's embedding_multiplier)."""
        x, dx = self.embed(input_ids) if inputs_embeds is None else (inputs_embeds, None)
        if self.embed_scale is not None and (inputs_embeds is None or self.scales_inputs_embeds):
            x, dx = x * self.embed_scale, apply(lambda t: t * self.embed_scale, dx)
        return x, dx

    def logits(self, x, dx):
        """The LM head's logits (B, L, vocab) and their tangent: z / Granite's logits_scaling, c·tanh(z / c) where
        capped."""
        z, dz = self.lm_head(x, dx) if self.lm_head is not None else linear(x, dx, *self.embed.dual("weight"))
        if self.logit_divisor != 1.0:
            z, dz = z / self.logit_divisor, apply(lambda t: t / self.logit_divisor, dz)
        if self.logit_cap is None:
            return z, dz
        capped = torch.tanh(z / self.logit_cap)
        return capped * self.logit_cap, apply(lambda t: t * (1 - capped * capped), dz)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, **options):
        hf_options(self.owner, options, CAUSAL_LM_OPTIONS)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError(f"{self.owner}: pass exactly one of input_ids and inputs_embeds")
        x, dx = self.embedded(input_ids, inputs_embeds)
        L = x.shape[1]
        if self.window is not None and L > self.window:
            raise NotImplementedError(f"{self.owner}: sequences of {L} tokens exceed sliding_window={self.window}, "
                                      "whose banded attention has no dual layer; tak.linearize(model, fast=False)")
        mask = causal_mask(self.owner, L, attention_mask, x.device)
        if position_ids is None:
            position_ids = torch.arange(L, device=x.device)[None]
        if self.position_limit is not None and (n := int(position_ids.max()) + 1) > self.position_limit:
            raise NotImplementedError(f"{self.owner}: positions up to {n} pass original_max_position_embeddings="
                                      f"{self.position_limit}, where longrope turns to its long table; the dual model "
                                      "holds the short one: tak.linearize(model, fast=False)")
        angles = [rotary_angles(getattr(self, f"inv_freq_{i}"), scaling, position_ids, x.dtype)
                  for i, scaling in enumerate(self.rope_scalings)]
        for layer in self.layers:
            x, dx = layer(x, dx, mask=mask, cos=angles[layer.rope][0], sin=angles[layer.rope][1])
        return lm_outputs(*self.norm(x, dx), self.logits if self.causal_lm else None, BaseModelOutputWithPast,
                          CausalLMOutputWithPast)
