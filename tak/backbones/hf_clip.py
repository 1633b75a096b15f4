"""Hugging Face CLIP and SigLIP models (transformers' CLIPModel, SiglipModel) as backbones: the vision tower is
fine-tuned, the text tower builds zero-shot heads (``ImageTextBackbone``, as for open_clip's CLIP).

- ``model``: CLIP: a ``CLIPVisionModelWithProjection`` made of the CLIPModel's ``vision_model`` and
  ``visual_projection`` (the modules themselves, no copy); SigLIP: the SiglipModel's ``vision_model``, whose
  attention pooling head gives the embedding. Both have ``tak.linearize`` fast paths (``tak.models.hf_clip``).
- ``inputs``: the model's image processor (``AutoImageProcessor``) on each image (PIL, made RGB; a tensor is
  taken as already processed), stacked (N, 3, H, W), in the model's dtype.
- ``features``: the image embedding (N, D), unnormalized: ``image_embeds`` (CLIP) or ``pooler_output`` (SigLIP),
  as ``get_image_features`` gives it.
- ``head``: zero-shot, the row of class c is ``normalize(mean_t normalize(text embedding(template_t(c))))``, texts
  tokenized as the models were trained, padded to the text tower's length (SigLIP needs ``padding="max_length"``);
  ``Head(W, normalize=True, scale=exp(logit_scale))``. SigLIP's ``logit_bias`` shifts every class's logit alike,
  so it changes no prediction nor softmax cross-entropy and is left out.
"""
import copy

import torch
from torch import nn

from ..curvature.outputs import image_embedding
from .base import require
from .clip import ImageTextBackbone
from .text import from_pretrained, load_hf

MODELS = ("CLIPModel", "SiglipModel")


class HFCLIPBackbone(ImageTextBackbone):
    """A CLIPModel or SiglipModel (``clip``) with its vision tower (``model``), image processor and tokenizer."""

    def __init__(self, clip: nn.Module, model: nn.Module, image_processor, tokenizer, *, name: str,
                 logit_scale: float, source: dict | None = None, last_layer: str | None = None):
        super().__init__(clip, model, self._processed, name=name, logit_scale=logit_scale, source=source,
                         last_layer=last_layer)
        self.image_processor, self.tokenizer = image_processor, tokenizer
        self.text_length = clip.config.text_config.max_position_embeddings

    def _processed(self, image) -> torch.Tensor:
        """(3, H, W) of a PIL image made RGB first (as open_clip's preprocess does; not every processor does)."""
        image = image.convert("RGB") if callable(getattr(image, "convert", None)) else image
        return self.image_processor(images=image, return_tensors="pt")["pixel_values"][0]

    def features(self, model, batch) -> torch.Tensor:
        return image_embedding(model, batch)

    def _embed_texts(self, texts: list[str]) -> torch.Tensor:
        enc = self.tokenizer(texts, padding="max_length", truncation=True, max_length=self.text_length,
                             return_tensors="pt")
        inputs = {k: enc[k].to(self.device) for k in ("input_ids", "attention_mask") if k in enc}
        pooled = self.clip.text_model(**inputs).pooler_output
        projection = getattr(self.clip, "text_projection", None)  # CLIP's; SigLIP's text tower projects itself
        return pooled if projection is None else projection(pooled)


def _vision_tower(transformers, clip: nn.Module, spec: str) -> tuple[nn.Module, str]:
    """(the image tower of ``clip``, its last layer's name): CLIP's as a CLIPVisionModelWithProjection holding the
    model's own vision_model and visual_projection; SigLIP's vision_model, which must have its pooling head."""
    if isinstance(clip, transformers.SiglipModel):
        tower = clip.vision_model
        if not getattr(tower, "use_head", False):
            raise ValueError(f"backbone {spec!r}: the SigLIP vision tower has no attention pooling head "
                             "(vision_config.vision_use_head=False), so no image embedding to classify")
        return tower, "head.mlp.fc2"
    config = copy.deepcopy(clip.config.vision_config)
    config.projection_dim = clip.config.projection_dim
    with torch.device("meta"):  # no weights of its own: it takes the model's modules
        tower = transformers.CLIPVisionModelWithProjection(config)
    tower.vision_model, tower.visual_projection = clip.vision_model, clip.visual_projection
    return tower.train(clip.training), "visual_projection"


def load_hf_clip(spec: str, name: str, *, pretrained: str | None = None, tokenizer=None, image_processor=None,
                 dtype=None, model_kwargs: dict | None = None, max_length: int | None = None) -> HFCLIPBackbone:
    """``hf-clip:<name-or-path>``: ``AutoModel`` (a CLIPModel or SiglipModel), ``AutoTokenizer`` and
    ``AutoImageProcessor.from_pretrained(name)``; ``pretrained`` is the hub revision; ``tokenizer`` and
    ``image_processor`` replace the model's own; ``dtype`` converts the model; ``model_kwargs`` go to the model's
    ``from_pretrained``. ``max_length`` (a text option) is accepted and ignored: texts take the text tower's length."""
    transformers = require("transformers", f"backbone {spec!r}")
    clip, tokenizer, source = load_hf("AutoModel", spec, name, pretrained=pretrained, tokenizer=tokenizer,
                                      dtype=None, model_kwargs=model_kwargs)
    models = tuple(getattr(transformers, m) for m in MODELS)
    if not isinstance(clip, models):
        raise ValueError(f"backbone spec {spec!r}: {type(clip).__name__} is not one of {', '.join(MODELS)} (an "
                         "image-text model with a vision and a text tower); open_clip models load as 'clip:<arch>' "
                         "(SigLIP 2 too: 'clip:hf-hub:timm/ViT-B-16-SigLIP2')")
    if image_processor is None:
        revision = {"revision": pretrained} if pretrained is not None else {}
        image_processor = from_pretrained(transformers.AutoImageProcessor, source["path"], spec, **revision)
    logit_scale = clip.logit_scale.exp().item()  # before a cast to bf16 rounds it
    if dtype is not None:
        clip.to(dtype)
    tower, last_layer = _vision_tower(transformers, clip, spec)
    return HFCLIPBackbone(clip, tower, image_processor, tokenizer, name=spec, logit_scale=logit_scale,
                          source=source, last_layer=last_layer)
