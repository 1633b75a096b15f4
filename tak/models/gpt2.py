"""Hugging Face GPT-2 (GPT2Model, GPT2LMHeadModel) as a dual model.

Token embedding (or inputs_embeds) + position embedding at ``position_ids`` (default 0, ..., L − 1), plus, where
``token_type_ids`` are given, their rows of the token table (as the source does), then dropout; pre-norm blocks

    x = x + drop(attn(ln_1(x))),   x = x + drop(W_proj act(W_fc ln_2(x)))

whose linear maps are Conv1D (x W + b, W (d_in, d_out)): the attention projects [Q | K | V] in one map (c_attn) and
its heads' output by c_proj; causal, with padding from attention_mask; scores scaled by 1/√head_dim (1 without
scale_attn_weights) and by 1/(layer + 1) with scale_attn_by_inverse_layer_idx, as the source's eager attention
computes them (transformers 4's SDPA attention ignores both flags); dropout on the attention weights in training. A
final LayerNorm and, for GPT2LMHeadModel, the LM head (tied to the token table, or not). A query no key may attend
(the first positions of a left-padded row) gets the average of V, as ``tak.nn.attention.dual_attention`` does; no
real token reads it.
"""
import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPastAndCrossAttentions, CausalLMOutputWithCrossAttentions

from ..nn import DualAttention, linear
from ..nn.base import add
from .base import CAUSAL_LM_OPTIONS, Builder, DualModel, activation, causal_mask, hf_options, lm_outputs, plus_rows

_OPTIONS = {**CAUSAL_LM_OPTIONS, "head_mask": (None,), "encoder_hidden_states": (None,),
            "encoder_attention_mask": (None,)}


class DualGPT2Block(nn.Module):
    """GPT2Block: forward(x (B, L, d), dx, mask)."""

    def __init__(self, b: Builder, block: nn.Module, config, index: int):
        super().__init__()
        a, mlp = block.attn, block.mlp
        scale = (a.head_dim ** -0.5 if config.scale_attn_weights else 1.0)
        if config.scale_attn_by_inverse_layer_idx:
            scale /= index + 1
        self.ln_1, self.ln_2 = b.layer_norm(block.ln_1), b.layer_norm(block.ln_2)
        self.attn = DualAttention(a.num_heads, b.conv1d(a.c_proj), qkv=b.conv1d(a.c_attn), scale=scale,
                                  dropout=a.attn_dropout.p).train(a.training)
        self.drop_attn = b.dropout(a.resid_dropout)
        self.fc, self.proj = b.conv1d(mlp.c_fc), b.conv1d(mlp.c_proj)
        self.act = activation(config.activation_function, f"h.{index}.mlp")
        self.drop_mlp = b.dropout(mlp.dropout)

    def forward(self, x, dx, mask):
        h, dh = self.drop_attn(*self.attn(*self.ln_1(x, dx), mask=mask))
        x, dx = x + h, add(dx, dh)
        h, dh = self.drop_mlp(*self.proj(*self.act(*self.fc(*self.ln_2(x, dx)))))
        return x + h, add(dx, dh)


class DualGPT2Model(DualModel):
    """forward(input_ids | inputs_embeds, attention_mask=None, token_type_ids=None, position_ids=None) -> (y, dy),
    each a BaseModelOutputWithPastAndCrossAttentions (last_hidden_state (B, L, d)) or, for GPT2LMHeadModel, a
    CausalLMOutputWithCrossAttentions (logits (B, L, vocab)); dy is None outside the "linearized" mode. Full sequences
    only: no cache, no generation, no labels (take the loss of the logits), no cross-attention."""

    def __init__(self, model: nn.Module, trainable=None):
        super().__init__()
        self.owner, core, b = type(model).__name__, getattr(model, "transformer", model), Builder(model)
        if getattr(core.config, "add_cross_attention", False):
            raise NotImplementedError(f"{self.owner} with config.add_cross_attention=True: its cross-attention has "
                                      "no dual layer; decoder-only GPT-2 is supported")
        self.wte, self.wpe = b.embedding(core.wte), b.embedding(core.wpe)
        self.drop = b.dropout(core.drop)
        self.blocks = nn.ModuleList(DualGPT2Block(b, block, core.config, i) for i, block in enumerate(core.h))
        self.ln_f = b.layer_norm(core.ln_f)
        head = getattr(model, "lm_head", None)
        self.causal_lm = head is not None
        self.lm_head = None if head is None or head.weight is core.wte.weight else b.linear(head)
        self.bind(b, model, trainable)

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None, inputs_embeds=None,
                **options):
        hf_options(self.owner, options, _OPTIONS)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError(f"{self.owner}: pass exactly one of input_ids and inputs_embeds")
        x, dx = self.wte(input_ids) if inputs_embeds is None else (inputs_embeds, None)
        L = x.shape[1]
        if position_ids is None:
            position_ids = torch.arange(L, device=x.device)[None]
        x, dx = plus_rows(x, dx, self.wpe, position_ids)
        if token_type_ids is not None:
            x, dx = plus_rows(x, dx, self.wte, token_type_ids)
        x, dx = self.drop(x, dx)
        mask = causal_mask(self.owner, L, attention_mask, x.device)
        for block in self.blocks:
            x, dx = block(x, dx, mask)
        return lm_outputs(*self.ln_f(x, dx), self.logits if self.causal_lm else None,
                          BaseModelOutputWithPastAndCrossAttentions, CausalLMOutputWithCrossAttentions)

    def logits(self, x, dx):
        """The LM head's logits (B, L, vocab) and their tangent."""
        return self.lm_head(x, dx) if self.lm_head is not None else linear(x, dx, *self.wte.dual("weight"))
