"""Hugging Face GPT-NeoX (GPTNeoXModel, GPTNeoXForCausalLM: Pythia, ...) as dual models.

The token embedding (dropout in training), then layers with LayerNorms LN_a, LN_m and the feed-forward
MLP(y) = W_2 act(W_1 y + b_1) + b_2,

    parallel residual (use_parallel_residual):  x = x + drop(attn(LN_a(x))) + drop(MLP(LN_m(x)))
    sequential:                                  h = x + drop(attn(LN_a(x))),  x = h + drop(MLP(LN_m(h)))

(drop: dropout in training), a final LayerNorm and, for GPTNeoXForCausalLM, the LM head (tied or not). Attention: one
fused projection giving each head's [q_h | k_h | v_h], rotary positions on the first rotary_pct of each head's dims of
Q and K (as in ``tak.models.llama``: linear in them, so their tangents turn alike), scores × head_size^(-1/2), causal
and padding from attention_mask, dropout on the weights in training. Positions are ``position_ids`` where given, else
0, ..., L − 1.
"""
import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from ..nn import linear
from ..nn.attention import dual_attention, merge_heads
from ..nn.base import add, apply
from .base import (CAUSAL_LM_OPTIONS, Builder, DualModel, activation, causal_mask, hf_options, lm_outputs,
                   rotary_angles, rotary_table, rotate, split_pair)


_OPTIONS = {**CAUSAL_LM_OPTIONS, "head_mask": (None,)}  # transformers 4's task heads pass head_mask=None


class DualGPTNeoXLayer(nn.Module):
    """GPTNeoXLayer: forward(x (B, L, d), dx, *, mask, cos, sin)."""

    def __init__(self, b: Builder, layer: nn.Module, config, where: str):
        super().__init__()
        a, mlp = layer.attention, layer.mlp
        self.ln_a, self.ln_m = b.layer_norm(layer.input_layernorm), b.layer_norm(layer.post_attention_layernorm)
        self.qkv, self.o = b.linear(a.query_key_value), b.linear(a.dense)
        self.fc1, self.fc2 = b.linear(mlp.dense_h_to_4h), b.linear(mlp.dense_4h_to_h)
        self.act = activation(config.hidden_act, f"{where}.mlp")
        self.drop_attn, self.drop_mlp = b.dropout(layer.post_attention_dropout), b.dropout(layer.post_mlp_dropout)
        self.heads, self.head_size = config.num_attention_heads, a.head_size
        self.dropout, self.parallel = float(config.attention_dropout), bool(config.use_parallel_residual)
        self.train(a.training)

    def attention(self, x, dx, mask, cos, sin):
        B, L, _ = x.shape
        heads = lambda t: t.view(B, L, self.heads, 3 * self.head_size).transpose(1, 2)  # noqa: E731
        t, dt = self.qkv(x, dx)
        (q, dq), (k, dk), (v, dv) = split_pair((heads(t), apply(heads, dt)), 3 * [self.head_size])
        turn = lambda u: rotate(u, cos, sin)  # noqa: E731
        q, dq, k, dk = turn(q), apply(turn, dq), turn(k), apply(turn, dk)
        o, do = dual_attention(q, k, v, dq, dk, dv, mask, scale=self.head_size ** -0.5,
                               dropout=self.dropout if self.training else 0.0)
        return self.o(merge_heads(o), apply(merge_heads, do))

    def forward(self, x, dx, *, mask, cos, sin):
        a, da = self.drop_attn(*self.attention(*self.ln_a(x, dx), mask, cos, sin))
        if not self.parallel:
            x, dx = x + a, add(dx, da)
        m, dm = self.drop_mlp(*self.fc2(*self.act(*self.fc1(*self.ln_m(x, dx)))))
        return (x + a + m, add(add(dx, da), dm)) if self.parallel else (x + m, add(dx, dm))


class DualGPTNeoXModel(DualModel):
    """forward(input_ids | inputs_embeds, attention_mask=None, position_ids=None) -> (y, dy), each a
    BaseModelOutputWithPast (last_hidden_state (B, L, d)) or, for GPTNeoXForCausalLM, a CausalLMOutputWithPast
    (logits (B, L, vocab)); dy is None outside the "linearized" mode. Full sequences only: no cache, no generation, no
    labels (take the loss of the logits)."""

    def __init__(self, model: nn.Module, trainable=None):
        super().__init__()
        self.owner, core, b = type(model).__name__, getattr(model, "gpt_neox", model), Builder(model)
        config = core.config
        self.embed, self.drop_embed = b.embedding(core.embed_in), b.dropout(core.emb_dropout)
        inv_freq, self.rope_scaling, _ = rotary_table(core, core.layers[0].attention, None, "layers.0")  # one per model
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.layers = nn.ModuleList(DualGPTNeoXLayer(b, layer, config, f"layers.{i}")
                                    for i, layer in enumerate(core.layers))
        self.norm = b.layer_norm(core.final_layer_norm)
        head = getattr(model, "lm_head", getattr(model, "embed_out", None))  # its name in transformers 5, in 4
        self.causal_lm = head is not None
        self.lm_head = None if head is None or head.weight is core.embed_in.weight else b.linear(head)
        self.bind(b, model, trainable)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, **options):
        hf_options(self.owner, options, _OPTIONS)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError(f"{self.owner}: pass exactly one of input_ids and inputs_embeds")
        x, dx = self.drop_embed(*(self.embed(input_ids) if inputs_embeds is None else (inputs_embeds, None)))
        L = x.shape[1]
        mask = causal_mask(self.owner, L, attention_mask, x.device)
        if position_ids is None:
            position_ids = torch.arange(L, device=x.device)[None]
        cos, sin = rotary_angles(self.inv_freq, self.rope_scaling, position_ids, x.dtype)
        for layer in self.layers:
            x, dx = layer(x, dx, mask=mask, cos=cos, sin=sin)
        return lm_outputs(*self.norm(x, dx), self.logits if self.causal_lm else None, BaseModelOutputWithPast,
                          CausalLMOutputWithPast)

    def logits(self, x, dx):
        """The LM head's logits (B, L, vocab) and their tangent."""
        return self.lm_head(x, dx) if self.lm_head is not None else linear(x, dx, *self.embed.dual("weight"))
