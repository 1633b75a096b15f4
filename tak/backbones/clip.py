"""open_clip CLIP models as backbones: the image tower is fine-tuned, the text tower builds zero-shot heads
(``ImageTextBackbone``, which ``hf_clip`` shares).

- ``model``: ``clip.visual`` (an open_clip ``VisionTransformer`` for the ViT models, which
  ``tak.linearize`` / ``tak.models.to_dual`` convert), fine-tuned alone.
- ``inputs``: open_clip's eval preprocess of each image (PIL; a tensor is taken as already
  preprocessed), stacked (N, 3, H, W), in the model's dtype.
- ``features``: ``model(images)``, the unnormalized image embedding (N, D) (= ``clip.encode_image``).
- ``head``: zero-shot (Radford et al. 2021): the row of class c is
  ``normalize(mean_t normalize(encode_text(tokenize(template_t(c)))))``; ``Head(W, normalize=True,
  scale=exp(clip.logit_scale))`` (100 for the OpenAI models).

The text tower is kept (in ``clip``, moving with ``to()``) so heads of later tasks can be built at
any time; ``release_text_tower()`` drops it once the heads needed are built (their cache stays).
"""
import difflib
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from .base import Backbone, Head, require


class ImageTextBackbone(Backbone):
    """An image tower ``model``, fine-tuned alone, with its eval ``preprocess`` (PIL image -> (3, H, W)); the
    image-text model it belongs to (``clip``, moving with ``to()``) embeds texts for the zero-shot heads, whose
    logits are scaled by ``logit_scale``. Subclasses implement ``features`` and ``_embed_texts``."""

    modalities = ("image",)

    def __init__(self, clip: nn.Module, model: nn.Module, preprocess, *, name: str, logit_scale: float,
                 source: dict | None = None, last_layer: str | None = None):
        self.name, self.clip, self.model, self.preprocess = name, clip, model, preprocess
        self.logit_scale, self.last_layer = float(logit_scale), last_layer
        self.source = source or {"spec": name}

    @property
    def dtype(self) -> torch.dtype:
        return next((p.dtype for p in self.model.parameters()), torch.float32)

    def inputs(self, examples: list) -> torch.Tensor:
        if len(examples) == 0:
            raise ValueError(f"{self.name}: no examples")
        images = [x if isinstance(x, torch.Tensor) else self.preprocess(x) for x in examples]
        return torch.stack(images).to(self.dtype)

    def _embed_texts(self, texts: list[str]) -> torch.Tensor:
        """The text tower's embeddings (N, D) of ``texts``."""
        raise NotImplementedError

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """Unit-norm text embeddings (N, D) of the text tower in eval mode, no grad."""
        if self.clip is None:
            raise RuntimeError(f"backbone {self.name!r}: the text tower was released (release_text_tower); "
                               "build every head needed before releasing it")
        was_training = self.clip.training
        self.clip.eval()
        try:
            with torch.no_grad():
                return F.normalize(self._embed_texts(texts), dim=-1)
        finally:
            self.clip.train(was_training)

    def _build_head(self, task) -> Head:
        if not task.templates:
            raise ValueError(f"task {task.name!r} has no templates: the zero-shot head needs at least one")
        rows = [F.normalize(self.encode_text([t.format(c) for t in task.templates]).mean(0), dim=-1)
                for c in task.classes]
        return Head(torch.stack(rows), normalize=True, scale=self.logit_scale)

    def release_text_tower(self) -> None:
        """Drops the text tower (and the rest of the image-text model except ``model``); heads built so far stay."""
        self.clip = None

    def to(self, *args, **kwargs):
        if self.clip is not None:
            self.clip.to(*args, **kwargs)  # model is (made of) its modules
        return super().to(*args, **kwargs)


class CLIPBackbone(ImageTextBackbone):
    """An open_clip CLIP model's image tower (``model`` = ``clip.visual``) with its eval preprocess and text tower;
    heads scale their logits by ``logit_scale`` (default exp(clip.logit_scale))."""

    def __init__(self, clip: nn.Module, preprocess, tokenizer, *, name: str, source: dict | None = None,
                 logit_scale: float | None = None):
        last_layer = "proj" if isinstance(getattr(clip.visual, "proj", None), nn.Parameter) else None
        super().__init__(clip, clip.visual, preprocess, name=name, source=source, last_layer=last_layer,
                         logit_scale=clip.logit_scale.exp().item() if logit_scale is None else logit_scale)
        self.tokenizer = tokenizer

    def features(self, model, batch) -> torch.Tensor:
        out = model(batch)
        return out[0] if isinstance(out, (tuple, list)) else out

    def _embed_texts(self, texts: list[str]) -> torch.Tensor:
        return self.clip.encode_text(self.tokenizer(texts).to(self.device))


def load_clip(spec: str, architecture: str, *, pretrained: str | None = None, dtype=None,
              model_kwargs: dict | None = None, max_length: int | None = None) -> CLIPBackbone:
    """``clip:<architecture>``: ``open_clip.create_model_and_transforms(architecture, pretrained=pretrained)``
    (an architecture name of ``open_clip.list_models()``, or ``local-dir:<folder>`` / ``hf-hub:<repo>``,
    which bring their own weights). ``pretrained=None`` with a plain architecture name gives random
    weights (with a warning). ``dtype`` converts the model; ``model_kwargs`` go to
    ``create_model_and_transforms`` (``precision``, ``cache_dir``, ``force_quick_gelu``, ...).
    ``max_length`` (a text option) is accepted and ignored, so callers can pass one set of options."""
    open_clip = require("open_clip", f"backbone {spec!r}")
    if not architecture:
        raise ValueError(f"backbone spec {spec!r}: no architecture after 'clip:'")
    schema = next((s for s in ("local-dir:", "hf-hub:") if architecture.startswith(s)), None)
    if schema is None:
        known = open_clip.list_models()
        architecture = architecture.replace("/", "-")  # "ViT-B/32" as open_clip names it, for model and tokenizer
        if architecture not in known:
            close = difflib.get_close_matches(architecture, known, n=5)
            raise ValueError(f"backbone spec {spec!r}: unknown open_clip architecture {architecture!r}"
                             f"{f'; close: {close}' if close else ''} (all: open_clip.list_models())")
        if pretrained is None:
            warnings.warn(f"backbone {spec!r}: pretrained=None, the CLIP model has random weights "
                          f"(tags: open_clip.list_pretrained_tags_by_model({architecture!r}))", stacklevel=3)
    elif pretrained is not None:
        raise ValueError(f"backbone spec {spec!r}: a {schema} model brings its own weights; pretrained must be None")
    try:
        clip, _, preprocess = open_clip.create_model_and_transforms(architecture, pretrained=pretrained,
                                                                    **(model_kwargs or {}))
    except RuntimeError as e:
        if "failed to download" not in str(e).lower():
            raise
        raise OSError(f"backbone {spec!r}: open_clip could not download the {pretrained!r} weights ({e}); offline, "
                      "use clip:local-dir:<folder> with open_clip_config.json and the weights") from e
    tokenizer = open_clip.get_tokenizer(architecture)
    logit_scale = float(clip.logit_scale.exp().item())  # before a cast to bf16 rounds it (100 -> 99)
    if dtype is not None:
        clip.to(dtype)
    source = {"spec": spec, "pretrained": pretrained, "library": "open_clip", "version": open_clip.__version__}
    return CLIPBackbone(clip.eval(), preprocess, tokenizer, name=spec, source=source, logit_scale=logit_scale)
