"""Hugging Face's CLIP vision towers (CLIPVisionModel, CLIPVisionModelWithProjection; CLIPModel.vision_model, a
CLIPVisionTransformer before transformers 5) as dual models.

Tokens as open_clip's (``clip_vit``): [class; patches] + position embedding, then pre_layrnorm and pre-norm
CLIPEncoderLayers (q, k, v projections, the configured activation); pooled = post_layernorm(x[:, 0]);
last_hidden_state = x (not normalized); with a projection, image_embeds = visual_projection(pooled).
"""
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.clip.modeling_clip import CLIPVisionModelOutput

from ..nn import DualPatchEmbedding
from ..nn.base import apply
from .base import Builder, DualModel, hf_options
from .bert import HF_OPTIONS
from .clip_vit import DualResidualAttentionBlock, PatchTokens


def _vision_core(model: nn.Module) -> nn.Module:
    """The module holding embeddings, pre_layrnorm, encoder and post_layernorm: ``model`` itself (transformers 5's
    CLIPVisionModel) or the one under ``vision_model`` (4.x, and with a projection)."""
    while not hasattr(model, "embeddings"):
        model = model.vision_model
    return model


class DualCLIPVisionModel(DualModel, PatchTokens):
    """forward(pixel_values (B, C, H, W)) -> (y, dy): BaseModelOutputWithPooling (last_hidden_state (B, 1 + N, d),
    pooler_output (B, d)), or for CLIPVisionModelWithProjection its CLIPVisionModelOutput (image_embeds (B, p),
    last_hidden_state); dy is None outside the "linearized" mode."""

    def __init__(self, model: nn.Module, trainable=None):
        super().__init__()
        core, b = _vision_core(model), Builder(model)
        e = core.embeddings
        self.image_size = e.image_size
        self.patch_embed = b.record(DualPatchEmbedding(e.patch_embedding.weight, e.patch_embedding.bias),
                                    weight=e.patch_embedding.weight, bias=e.patch_embedding.bias)
        b.own(self, class_embedding=e.class_embedding, positional_embedding=e.position_embedding.weight)
        self.ln_pre = b.layer_norm(core.pre_layrnorm)
        act = model.config.hidden_act
        self.blocks = nn.ModuleList(DualResidualAttentionBlock.of_hf_clip(b, layer, act, f"encoder.layers.{i}")
                                    for i, layer in enumerate(core.encoder.layers))
        self.ln_post = b.layer_norm(core.post_layernorm)
        projection = getattr(model, "visual_projection", None)
        self.projection = None if projection is None else b.linear(projection)
        self.bind(b, model, trainable)

    def forward(self, pixel_values, interpolate_pos_encoding=False, **options):
        """``options`` as ``DualBertModel.forward`` accepts them; images of the model's size only."""
        hf_options(type(self).__name__, options, HF_OPTIONS)
        H, W = pixel_values.shape[-2:]
        if interpolate_pos_encoding or (H, W) != (self.image_size, self.image_size):
            raise ValueError(f"DualCLIPVisionModel: images of {self.image_size}×{self.image_size} only, got {H}×{W} "
                             f"(interpolate_pos_encoding={interpolate_pos_encoding}); tak.linearize(model, "
                             "fast=False) interpolates the position embedding")
        x, dx = self.embed(pixel_values.to(self.patch_embed.weight.dtype))
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
