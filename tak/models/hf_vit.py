"""Hugging Face's ViT and DINOv2 image encoders (ViTModel, Dinov2Model, Dinov2WithRegistersModel) as dual models.

Tokens: patches through the patch embedding (a convolution with stride = kernel), [cls; patches] + position
embeddings (``clip_vit.PatchTokens``), DINOv2 with registers' register tokens inserted after the class token (no
position embedding), dropout. DINOv2 resizes the patches' position embeddings to the image's patch grid (bicubic, in
fp32; antialiased with registers) unless the grid is the checkpoint's and square; ViT does so with
``interpolate_pos_encoding=True`` (bicubic, in the model's dtype) and otherwise takes images of its size only. The
resizing is linear in the embeddings, so their tangent is resized alike. Then pre-norm layers
x + ls_1(drop(attn(norm_1(x)))), x + ls_2(drop(fc_2(act(fc_1(norm_2(x)))))) (DINOv2's LayerScales; the dropouts
where each transformers version has them; DINOv2's SwiGLU feed-forward fc_2(silu(x W_gᵀ + b_g) ⊙ (x W_uᵀ + b_u))),
a final LayerNorm, and the pooled output: ViT's pooler act(W x[:, 0] + b) where the model has one, DINOv2's x[:, 0].

Layouts: transformers 5 (attention.q_proj, k_proj, v_proj, o_proj; mlp.fc1, fc2; SwiGLU's mlp.gate_proj, up_proj,
down_proj) and 4.x (attention.attention.query, key, value; attention.output.dense; ViT's intermediate.dense and
output.dense; SwiGLU's mlp.weights_in = [W_g; W_u], weights_out).
"""
import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling

from ..nn import DualActivation, DualAttention, DualPatchEmbedding
from ..nn.base import apply, chain
from .base import Builder, DualModel, activation, hf_options, resized_positions
from .bert import HF_OPTIONS
from .clip_vit import DualResidualAttentionBlock, PatchTokens


def _refuse(model: str, where: str, what: str):
    return NotImplementedError(f"{model}: {where} ({what}) is not supported by tak.models; tak.linearize(model, "
                               "fast=False) takes it")


def _block(b: Builder, layer: nn.Module, config, owner: str, where: str) -> DualResidualAttentionBlock:
    """A ViTLayer or Dinov2Layer in either layout (module docstring)."""
    a = layer.attention
    if hasattr(a, "q_proj"):  # transformers 5: ViT drops out after attention and MLP with one module, DINOv2 never
        q, k, v, out, drop_attn = a.q_proj, a.k_proj, a.v_proj, a.o_proj, getattr(layer, "dropout", None)
        drop_out = drop_attn
    else:
        s = a.attention
        q, k, v, out, drop_attn = s.query, s.key, s.value, a.output.dense, a.output.dropout
        drop_out = getattr(getattr(layer, "output", None), "dropout", None)
    mlp = getattr(layer, "mlp", None)
    if mlp is None:  # ViT
        fc1, act, fc2 = b.linear(layer.intermediate.dense), activation(config.hidden_act, f"{where}.mlp"), \
            b.linear(layer.output.dense)
    elif hasattr(mlp, "fc1"):
        fc1, act, fc2 = b.linear(mlp.fc1), activation(config.hidden_act, f"{where}.mlp"), b.linear(mlp.fc2)
    elif hasattr(mlp, "gate_proj"):  # SwiGLU, transformers 5
        fc1, act, fc2 = _SwiGLU(b.linear(mlp.gate_proj), b.linear(mlp.up_proj)), None, b.linear(mlp.down_proj)
    else:  # SwiGLU, 4.x
        fc1, act, fc2 = _SwiGLU(b.linear(mlp.weights_in)), None, b.linear(mlp.weights_out)
    if not isinstance(getattr(layer, "drop_path", nn.Identity()), nn.Identity):
        raise _refuse(owner, f"{where}.drop_path", "stochastic depth (drop_path_rate > 0)")
    heads = config.num_attention_heads
    attn = DualAttention(heads, b.linear(out), q=b.linear(q), k=b.linear(k), v=b.linear(v),
                         scale=(q.out_features // heads) ** -0.5, dropout=config.attention_probs_dropout_prob)
    norms = (layer.norm1, layer.norm2) if hasattr(layer, "norm1") else (layer.layernorm_before, layer.layernorm_after)
    scales = [b.layer_scale(getattr(layer, n)) if hasattr(layer, n) else None for n in ("layer_scale1", "layer_scale2")]
    dropout = lambda m: None if m is None else b.dropout(m)  # noqa: E731
    return DualResidualAttentionBlock(
        b.layer_norm(norms[0]), attn.train(a.training), b.layer_norm(norms[1]), fc1, act, fc2, ls_1=scales[0],
        ls_2=scales[1], drop_attn=dropout(drop_attn), drop_out=dropout(drop_out))


class _SwiGLU(nn.Module):
    """DINOv2's gated feed-forward input silu(x W_gᵀ + b_g) ⊙ (x W_uᵀ + b_u) and its tangent, from the gate and up
    projections, or from one projection [W_g; W_u] (``up`` None)."""

    def __init__(self, gate, up=None):
        super().__init__()
        self.gate, self.up, self.act = gate, up, DualActivation("silu")

    def forward(self, x, dx=None):
        g, dg = self.gate(x, dx)
        if self.up is None:
            (g, u), (dg, du) = g.chunk(2, -1), (None, None) if dg is None else dg.chunk(2, -1)
        else:
            u, du = self.up(x, dx)
        return self.act(g, dg, u, du)


class DualHFViTModel(DualModel, PatchTokens):
    """forward(pixel_values (B, C, H, W)) -> (y, dy), each a BaseModelOutputWithPooling (last_hidden_state
    (B, 1 [+ R] + N, d), pooler_output (B, d), or None for a ViT without pooler); dy is None outside the "linearized"
    mode."""

    def __init__(self, model: nn.Module, trainable=None):
        super().__init__()
        self.owner, config, b = type(model).__name__, model.config, Builder(model)
        self.dinov2 = config.model_type in ("dinov2", "dinov2_with_registers")
        self.registers = config.model_type == "dinov2_with_registers"
        e = model.embeddings
        conv = e.patch_embeddings.projection
        self.patch, self.image_size = conv.kernel_size, tuple(e.patch_embeddings.image_size)
        self.patch_embed = b.record(DualPatchEmbedding(conv.weight, conv.bias), weight=conv.weight, bias=conv.bias)
        b.own(self, class_embedding=e.cls_token, positional_embedding=e.position_embeddings)
        if getattr(e, "mask_token", None) is not None:  # for masked patches only, which forward refuses: never read
            b.own(self, mask_token=e.mask_token)
        if self.registers:
            b.own(self, register_tokens=e.register_tokens)
        self.drop = b.dropout(e.dropout)
        layers = model.layers if hasattr(model, "layers") else model.encoder.layer
        where = "layers" if hasattr(model, "layers") else "encoder.layer"
        self.blocks = nn.ModuleList(_block(b, layer, config, self.owner, f"{where}.{i}")
                                    for i, layer in enumerate(layers))
        self.norm = b.layer_norm(model.layernorm)
        pooler = getattr(model, "pooler", None)
        self.pooler = None if pooler is None else nn.ModuleList(
            [b.linear(pooler.dense), activation(pooler.activation, "pooler")])
        self.bind(b, model, trainable)

    def forward(self, pixel_values, bool_masked_pos=None, interpolate_pos_encoding=None, **options):
        """``options`` as ``DualBertModel.forward`` accepts them; no masked patches (``bool_masked_pos``)."""
        hf_options(self.owner, options, HF_OPTIONS)
        if bool_masked_pos is not None:
            raise _refuse(self.owner, "bool_masked_pos", "masked image modelling")
        H, W = pixel_values.shape[-2:]
        resize = self.dinov2 or interpolate_pos_encoding
        if not resize and (H, W) != self.image_size:
            raise ValueError(f"{self.owner}: images of {self.image_size[0]}×{self.image_size[1]} only, got {H}×{W} "
                             "(interpolate_pos_encoding=True resizes the position embeddings)")
        grid = (H // self.patch[0], W // self.patch[1])

        def positions(p):  # DINOv2's in fp32, antialiased with registers
            return resized_positions(p, grid, H == W, self.dinov2, antialias=self.registers)
        x, dx = self.embed(pixel_values.to(self.patch_embed.weight.dtype), positions if resize else None)
        if self.registers:
            x, dx = self.with_registers(x, dx)
        x, dx = self.drop(x, dx)
        for block in self.blocks:
            x, dx = block(x, dx)
        x, dx = self.norm(x, dx)
        first = lambda t: t[:, 0]  # noqa: E731
        p, dp = first(x), apply(first, dx)
        if self.pooler is not None:
            p, dp = chain((p, dp), *self.pooler)
        elif not self.dinov2:
            p, dp = None, None
        y = BaseModelOutputWithPooling(last_hidden_state=x, pooler_output=p)
        return y, None if dx is None else BaseModelOutputWithPooling(last_hidden_state=dx, pooler_output=dp)

    def with_registers(self, x, dx):
        """Tokens [cls; registers; patches] (B, 1 + R + N, d) from [cls; patches], and their tangent."""
        r, dr = self.dual("register_tokens")

        def insert(t, registers):
            return torch.cat([t[:, :1], registers.to(t.dtype).expand(t.shape[0], -1, -1), t[:, 1:]], 1)
        if dx is None and dr is None:
            return insert(x, r), None
        dx, dr = torch.zeros_like(x) if dx is None else dx, torch.zeros_like(r) if dr is None else dr
        return insert(x, r), insert(dx, dr)
