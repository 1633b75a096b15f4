"""Hugging Face ModernBERT encoders (ModernBertModel, e.g. answerdotai/ModernBERT-base) as dual models.

Embeddings: word (or inputs_embeds), LayerNorm, dropout; no absolute positions, no token types. Pre-norm layers

    x = x + drop(W_o attn(LN_a(x))),  x = x + W_o' drop(act(U) ⊙ G),  [U | G] = W_i LN_m(x)  (a gated GLU)

(the first layer has no LN_a), then a final LayerNorm. Attention: one fused W_qkv = [Q | K | V], rotary positions on
Q and K per head, t ↦ t cos θ + rotate_half(t) sin θ with θ = position · inv_freq of the layer's rotary embedding
(× its attention_scaling): linear in t, so the tangent turns the same way. Keys are those kept by attention_mask and,
in a local layer (config.layer_types "sliding_attention"; before transformers 5, every layer but each
global_attn_every_n_layers-th), those within |i − j| ≤ local_attention // 2 of the query. In training, dropout as the
source: after the embeddings, on the attention weights and after W_o (attention_dropout), in the GLU (mlp_dropout).

The outputs are those of the source's eager and SDPA attention, padding positions included (flash-attention-2's
unpadded path gives the same at real tokens). cos θ, sin θ are the source's (fp32, in the model's dtype); the
rotation runs in fp32 for 16-bit models, as transformers 5 does it, and in float64 for float64 ones (transformers 5
rounds those to fp32 there).
"""
import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutput

from ..nn import DualAttention, DualDropout
from ..nn.attention import dual_attention, merge_heads
from ..nn.base import add, apply
from .base import Builder, DualModel, activation, hf_options, padding_mask, rotary_angles, rotary_table, rotate
from .bert import HF_OPTIONS


def _rotary(model: nn.Module, layer: nn.Module, where: str) -> tuple[torch.Tensor, float]:
    """(inv_freq (D/2,), attention_scaling) of ``layer``'s rotary table (``rotary_table``: transformers 5 keeps them on
    the model per layer type, 4.x on each attention module). Rope types that change them at each call (dynamic) and
    longrope (whose position limit this model does not keep) are refused."""
    inv_freq, scaling, limit = rotary_table(model, layer.attn, getattr(layer, "attention_type", None),
                                            f"ModernBertModel {where}")
    if limit is not None:
        raise NotImplementedError(f"ModernBertModel {where}: rope type 'longrope' has no dual layer here; static rope "
                                  "types are supported")
    return inv_freq, scaling


def _is_local(layer: nn.Module) -> bool:
    """Whether ``layer`` attends within a sliding window (5.x: its attention_type; 4.x: its attention's window)."""
    if hasattr(layer, "attention_type"):
        return layer.attention_type == "sliding_attention"
    return layer.attn.local_attention[0] >= 0


class DualRotaryAttention(DualAttention):
    """ModernBertAttention: forward(x (B, L, d), dx, *, mask, cos, sin) with rotary Q and K (module docstring); its
    ``inv_freq`` is the source's buffer, and ``rope_scaling`` its attention_scaling."""

    def __init__(self, b: Builder, a: nn.Module, heads: int, inv_freq: torch.Tensor, scaling: float):
        super().__init__(heads, b.linear(a.Wo), qkv=b.linear(a.Wqkv), scale=a.head_dim ** -0.5,
                         dropout=a.attention_dropout)
        self.train(a.training)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.rope_scaling = scaling

    def angles(self, position_ids, dtype):
        """(cos θ, sin θ) (B or 1, L, D) in ``dtype`` (``rotary_angles``)."""
        return rotary_angles(self.inv_freq, self.rope_scaling, position_ids, dtype)

    def forward(self, x, dx=None, *, mask=None, cos=None, sin=None):
        (q, k, v), (dq, dk, dv) = self.project(x, dx, None, None)
        turn = lambda t: rotate(t, cos, sin, torch.promote_types(t.dtype, torch.float32))  # noqa: E731  (16-bit: fp32)
        o, do = dual_attention(turn(q), turn(k), v, apply(turn, dq), apply(turn, dk), dv, mask, scale=self.scale,
                               dropout=self.dropout if self.training else 0.0)
        return self.out(merge_heads(o), apply(merge_heads, do))


class DualModernBertLayer(nn.Module):
    """x = x + drop(attn(LN_a(x))); x = x + out(drop(act(U) ⊙ G)), [U | G] = fc(LN_m(x)), on (B, L, d)."""

    def __init__(self, b: Builder, model: nn.Module, layer: nn.Module, where: str):
        super().__init__()
        c, a, mlp = model.config, layer.attn, layer.mlp
        self.ln_attn = None if isinstance(layer.attn_norm, nn.Identity) else b.layer_norm(layer.attn_norm)
        self.attn = DualRotaryAttention(b, a, c.num_attention_heads, *_rotary(model, layer, where))
        self.drop_attn = b.dropout(a.out_drop) if isinstance(a.out_drop, nn.Dropout) else DualDropout(0.0)
        self.local = _is_local(layer)
        self.ln_mlp = b.layer_norm(layer.mlp_norm)
        self.fc, self.act = b.linear(mlp.Wi), activation(c.hidden_activation, f"{where}.mlp")
        self.drop_mlp, self.out = b.dropout(mlp.drop), b.linear(mlp.Wo)

    def forward(self, x, dx, mask, cos, sin):
        h, dh = (x, dx) if self.ln_attn is None else self.ln_attn(x, dx)
        h, dh = self.drop_attn(*self.attn(h, dh, mask=mask, cos=cos, sin=sin))
        x, dx = x + h, add(dx, dh)
        h, dh = self.fc(*self.ln_mlp(x, dx))
        (u, g), (du, dg) = h.chunk(2, -1), ((None, None) if dh is None else dh.chunk(2, -1))
        h, dh = self.out(*self.drop_mlp(*self.act(u, du, g, dg)))
        return x + h, add(dx, dh)


class DualModernBertModel(DualModel):
    """forward(input_ids | inputs_embeds, attention_mask=None, position_ids=None) -> (y, dy), each a BaseModelOutput
    (last_hidden_state (B, L, d)); dy is None outside the "linearized" mode."""

    def __init__(self, model: nn.Module, trainable=None):
        super().__init__()
        b, e = Builder(model), model.embeddings
        self.word = b.embedding(e.tok_embeddings)
        self.ln_embed = b.layer_norm(e.norm)
        self.drop_embed = b.dropout(e.drop)
        self.layers = nn.ModuleList(DualModernBertLayer(b, model, layer, f"layers.{i}")
                                    for i, layer in enumerate(model.layers))
        self.ln_final = b.layer_norm(model.final_norm)
        self.window = model.config.local_attention // 2
        self.bind(b, model, trainable)

    def masks(self, attention_mask, L: int, device):
        """(global, local) boolean masks, True = attend: the kept keys (B, 1, 1, L) or None, and those within the
        window too (B or 1, 1, L, L)."""
        keep = padding_mask("DualModernBertModel", "attention_mask", attention_mask)
        positions = torch.arange(L, device=device)
        near = ((positions[:, None] - positions[None, :]).abs() <= self.window)[None, None]
        return keep, near if keep is None else near & keep

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, **options):
        """``options`` as ``DualBertModel.forward`` accepts them."""
        hf_options("DualModernBertModel", options, HF_OPTIONS)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("DualModernBertModel: pass exactly one of input_ids and inputs_embeds")
        x, dx = self.word(input_ids) if inputs_embeds is None else (inputs_embeds, None)
        x, dx = self.drop_embed(*self.ln_embed(x, dx))
        L = x.shape[1]
        full, local = self.masks(attention_mask, L, x.device)
        positions = torch.arange(L, device=x.device)[None] if position_ids is None else position_ids
        angles = {}  # per rotary table: layers of one type share it
        for layer in self.layers:
            table = layer.attn.inv_freq
            if id(table) not in angles:
                angles[id(table)] = layer.attn.angles(positions, x.dtype)
            x, dx = layer(x, dx, local if layer.local else full, *angles[id(table)])
        x, dx = self.ln_final(x, dx)
        return BaseModelOutput(last_hidden_state=x), None if dx is None else BaseModelOutput(last_hidden_state=dx)
