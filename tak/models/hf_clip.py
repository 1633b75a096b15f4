"""Hugging Face's CLIP and SigLIP vision towers as dual models: CLIPVisionModel, CLIPVisionModelWithProjection
(and CLIPModel.vision_model, a CLIPVisionTransformer before transformers 5), SiglipVisionModel (and SiglipModel's,
a SiglipVisionTransformer before transformers 5).

CLIP: tokens as open_clip's (``clip_vit``), [class; patches] + position embedding, then pre_layrnorm and pre-norm
CLIPEncoderLayers (q, k, v projections, the configured activation); pooled = post_layernorm(x[:, 0]);
last_hidden_state = x (not normalized); with a projection, image_embeds = visual_projection(pooled).
SigLIP: patches + position embedding (no class token, no pre-norm), the same layers, last_hidden_state =
post_layernorm(x); pooled (where config.vision_use_head) by the attention pooling head: a learned probe attends
over the tokens (nn.MultiheadAttention), h + mlp(layernorm(h)).
"""
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.clip.modeling_clip import CLIPVisionModelOutput

from ..nn import DualLinear, DualPatchEmbedding, linear
from ..nn.attention import dual_attention, merge_heads, split_heads
from ..nn.base import add, apply, chain
from .base import Builder, DualModel, activation, hf_options
from .bert import HF_OPTIONS
from .clip_vit import DualResidualAttentionBlock, PatchTokens


def _checked_images(dual: DualModel, pixel_values, interpolate_pos_encoding, options):
    """``pixel_values`` in the patch embedding's dtype, once the options and the image size are checked."""
    hf_options(type(dual).__name__, options, HF_OPTIONS)
    H, W = pixel_values.shape[-2:]
    if interpolate_pos_encoding or (H, W) != (dual.image_size, dual.image_size):
        raise ValueError(f"{type(dual).__name__}: images of {dual.image_size}×{dual.image_size} only, got {H}×{W} "
                         f"(interpolate_pos_encoding={interpolate_pos_encoding}); tak.linearize(model, fast=False) "
                         "interpolates the position embedding")
    return pixel_values.to(dual.patch_embed.weight.dtype)


def _vision_core(model: nn.Module) -> nn.Module:
    """The module holding embeddings, pre_layrnorm, encoder and post_layernorm: ``model`` itself (transformers 5's
    CLIPVisionModel) or the one under ``vision_model`` (4.x, and with a projection)."""
    while not hasattr(model, "embeddings"):
        model = model.vision_model
    return model


def _patches_and_layers(dual: DualModel, model: nn.Module) -> tuple[nn.Module, Builder]:
    """Give ``dual`` the image size, patch embedding, position embedding (θ0 ``positional_embedding``) and encoder
    layers of the vision tower ``model``; returns the module holding them (``_vision_core``) and the Builder."""
    core, b = _vision_core(model), Builder(model)
    e = core.embeddings
    dual.image_size = e.image_size
    dual.patch_embed = b.record(DualPatchEmbedding(e.patch_embedding.weight, e.patch_embedding.bias),
                                weight=e.patch_embedding.weight, bias=e.patch_embedding.bias)
    b.own(dual, positional_embedding=e.position_embedding.weight)
    act = model.config.hidden_act
    dual.blocks = nn.ModuleList(DualResidualAttentionBlock.of_hf_clip(b, layer, act, f"encoder.layers.{i}")
                                for i, layer in enumerate(core.encoder.layers))
    return core, b


class DualCLIPVisionModel(DualModel, PatchTokens):
    """forward(pixel_values (B, C, H, W)) -> (y, dy): BaseModelOutputWithPooling (last_hidden_state (B, 1 + N, d),
    pooler_output (B, d)), or for CLIPVisionModelWithProjection its CLIPVisionModelOutput (image_embeds (B, p),
    last_hidden_state); dy is None outside the "linearized" mode."""

    def __init__(self, model: nn.Module, trainable=None):
        super().__init__()
        core, b = _patches_and_layers(self, model)
        b.own(self, class_embedding=core.embeddings.class_embedding)
        self.ln_pre = b.layer_norm(core.pre_layrnorm)
        self.ln_post = b.layer_norm(core.post_layernorm)
        projection = getattr(model, "visual_projection", None)
        self.projection = None if projection is None else b.linear(projection)
        self.bind(b, model, trainable)

    def forward(self, pixel_values, interpolate_pos_encoding=False, **options):
        """``options`` as ``DualBertModel.forward`` accepts them; images of the model's size only."""
        x, dx = self.embed(_checked_images(self, pixel_values, interpolate_pos_encoding, options))
        x, dx = self.ln_pre(x, dx)
        for block in self.blocks:
            x, dx = block(x, dx)
        first = lambda t: t[:, 0]  # noqa: E731
        p, dp = self.ln_post(first(x), apply(first, dx))
        if self.projection is None:
            y = BaseModelOutputWithPooling(last_hidden_state=x, pooler_output=p)
            dy = None if dx is None and dp is None else BaseModelOutputWithPooling(last_hidden_state=dx,
                                                                                   pooler_output=dp)
            return y, dy
        e, de = self.projection(p, dp)
        return (CLIPVisionModelOutput(image_embeds=e, last_hidden_state=x),
                None if dx is None and de is None else CLIPVisionModelOutput(image_embeds=de, last_hidden_state=dx))


class DualProbePool(nn.Module):
    """SigLIP's SiglipMultiheadAttentionPoolingHead: Q = probe W_qᵀ + b_q, [K | V] = x [W_k | W_v]ᵀ + [b_k | b_v] from
    the rows of nn.MultiheadAttention's in_proj, O = attention per head, h = out_proj(O), h + mlp(layernorm(h)), the
    probe's row: x (B, N, d) -> (B, d)."""

    def __init__(self, b: Builder, head: nn.Module, act: str, where: str):
        super().__init__()
        mha = head.attention
        if not (mha._qkv_same_embed_dim and mha.batch_first and mha.bias_k is None and not mha.add_zero_attn):
            raise NotImplementedError(f"{where}.attention: nn.MultiheadAttention other than batch-first with a fused "
                                      "in_proj has no dual layer")
        self.probe = b.parameter(head.probe)
        self.in_proj = b.record(DualLinear(mha.in_proj_weight, mha.in_proj_bias), weight=mha.in_proj_weight,
                                bias=mha.in_proj_bias)
        self.heads, self.dropout = mha.num_heads, mha.dropout
        self.out, self.norm = b.linear(mha.out_proj), b.layer_norm(head.layernorm)
        self.mlp = nn.ModuleList([b.linear(head.mlp.fc1), activation(act, f"{where}.mlp"), b.linear(head.mlp.fc2)])

    def rows(self, x, dx, part: slice):
        """x, dx through the in_proj rows ``part`` (W_q, or W_k and W_v)."""
        (w, dw), (bias, dbias) = self.in_proj.dual("weight"), self.in_proj.dual("bias")
        pick = lambda t: None if t is None else t[part]  # noqa: E731
        return linear(x, dx, w[part], pick(dw), pick(bias), pick(dbias))

    def forward(self, x, dx=None):
        B, _, d = x.shape
        p, dp = self.probe.dual("value")
        wide = lambda t: t.to(x.dtype).expand(B, -1, -1)  # noqa: E731
        q, dq = self.rows(wide(p), apply(wide, dp), slice(0, d))
        kv, dkv = self.rows(x, dx, slice(d, 3 * d))
        heads = lambda t: split_heads(t, self.heads)  # noqa: E731
        (k, v), (dk, dv) = kv.chunk(2, -1), ((None, None) if dkv is None else dkv.chunk(2, -1))
        o, do = dual_attention(heads(q), heads(k), heads(v), apply(heads, dq), apply(heads, dk), apply(heads, dv),
                               dropout=self.dropout if self.training else 0.0)
        h, dh = self.out(merge_heads(o), apply(merge_heads, do))
        m, dm = chain(self.norm(h, dh), *self.mlp)
        first = lambda t: t[:, 0]  # noqa: E731
        return first(h + m), apply(first, add(dh, dm))


class DualSiglipVisionModel(DualModel):
    """forward(pixel_values (B, C, H, W)) -> (y, dy), each a BaseModelOutputWithPooling (last_hidden_state
    (B, N, d), pooler_output (B, d) or None without the head); dy is None outside the "linearized" mode."""

    def __init__(self, model: nn.Module, trainable=None):
        super().__init__()
        core, b = _patches_and_layers(self, model)
        self.ln_post = b.layer_norm(core.post_layernorm)
        use_head = getattr(core, "use_head", False)
        self.head = DualProbePool(b, core.head, model.config.hidden_act, "head") if use_head else None
        self.bind(b, model, trainable)

    def forward(self, pixel_values, interpolate_pos_encoding=False, **options):
        """``options`` as ``DualBertModel.forward`` accepts them; images of the model's size only."""
        t, dt = self.patch_embed(_checked_images(self, pixel_values, interpolate_pos_encoding, options))
        pos, dpos = self.dual("positional_embedding")
        x, dx = t + pos.to(t.dtype), add(dt, apply(lambda p: p.to(t.dtype).expand(t.shape), dpos))
        for block in self.blocks:
            x, dx = block(x, dx)
        x, dx = self.ln_post(x, dx)
        p, dp = (None, None) if self.head is None else self.head(x, dx)
        y = BaseModelOutputWithPooling(last_hidden_state=x, pooler_output=p)
        return y, None if dx is None and dp is None else BaseModelOutputWithPooling(last_hidden_state=dx,
                                                                                    pooler_output=dp)
