"""Backbone: a pretrained network, how raw examples become its inputs, its feature output f, and the
frozen zero-shot classification head of a task.

Classification follows the task-arithmetic literature: only ``model`` (the encoder: CLIP's image
tower, a BERT-like encoder, T5) is fine-tuned; each task's head is frozen, built once from its class
names and prompt templates (``Head``). ``features(model, batch)`` accepts ``self.model``, its
linearization (``tak.linearize``) or a copy with other weights: everything that trains, fits factors
or evaluates goes through it.
"""
import importlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .._compat import ensure_torchvision_importable
from ..io import architecture_fingerprint, weights_record

INSTALL_HINT = "pip install 'kfac_kernels[models]'"


def require(module: str, what: str):
    """``import module`` (after ``tak._compat.ensure_torchvision_importable``); ImportError naming the pip
    extra that provides it when it is missing."""
    ensure_torchvision_importable()
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"{what} needs the {module.split('.')[0]!r} package ({e}); install it with "
                          f"{INSTALL_HINT}") from e


@dataclass
class Head:
    """Frozen classifier on features f (N, D): ``scale · normalize(f) normalize(W)ᵀ`` when ``normalize``
    (CLIP-style cosine logits) else ``scale · f Wᵀ``; W (C, D). A ``softcap`` c caps those logits z to c·tanh(z / c)
    (Gemma 2's LM head)."""

    weight: torch.Tensor
    normalize: bool = True
    scale: float = 100.0
    softcap: float | None = None

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        w = self.weight.to(device=features.device, dtype=features.dtype)
        if self.normalize:
            features, w = F.normalize(features, dim=-1), F.normalize(w, dim=-1)
        logits = self.scale * features @ w.T
        return logits if self.softcap is None else self.softcap * torch.tanh(logits / self.softcap)


class Backbone:
    """Subclasses set ``name`` (what ``load_backbone`` accepts), ``model`` and ``modalities`` and implement
    ``inputs``, ``features`` and ``_build_head``; ``source`` says where the weights came from (``meta()``)."""

    name: str
    model: nn.Module
    modalities: tuple[str, ...]
    source: dict | None = None
    last_layer: str | None = None  # the model's last layer (TAK's last-layer weight), None: see methods.layer_weights

    def inputs(self, examples: list):
        """Model inputs (a tensor or a dict of tensors) for a list of raw inputs (str, (str, str), PIL)."""
        raise NotImplementedError

    def features(self, model: nn.Module, batch) -> torch.Tensor:
        """f (N, D): the output whose Jacobian Gramian the curvature factors approximate."""
        raise NotImplementedError

    def _build_head(self, task) -> Head:
        raise NotImplementedError

    def head(self, task) -> Head:
        """The frozen zero-shot head of ``task`` (``tak.data.Task``), built once per (name, classes, templates)."""
        if task.modality not in self.modalities:
            raise ValueError(f"backbone {self.name!r} takes {self.modalities} inputs; task {task.name!r} is "
                             f"{task.modality!r}")
        heads = self.__dict__.setdefault("_heads", {})
        key = (task.name, tuple(task.classes), tuple(task.templates))
        if key not in heads:
            with torch.no_grad():
                heads[key] = self._build_head(task)
        return heads[key]

    def collate(self, examples: list[tuple]) -> tuple:
        """(model inputs, labels (N,) int64) for a list of (input, label) examples: a DataLoader collate_fn."""
        inputs, labels = zip(*examples)
        return self.inputs(list(inputs)), torch.as_tensor(labels, dtype=torch.long)

    def logits(self, model: nn.Module, batch, head: Head) -> torch.Tensor:
        return head(self.features(model, batch))

    @property
    def device(self) -> torch.device:
        """The device of ``model``'s first parameter (CPU for a model without parameters)."""
        return next((p.device for p in self.model.parameters()), torch.device("cpu"))

    def to(self, *args, **kwargs):
        """``model.to(*args, **kwargs)``; the heads built so far follow to the device (keeping their dtype:
        ``Head`` casts its weight to the features' dtype). Returns self."""
        self.model.to(*args, **kwargs)
        self.__dict__.pop("_weights_of", None)  # a dtype rounds them (and memory may be reused)
        device = torch._C._nn._parse_to(*args, **kwargs)[0]
        if device is not None:
            for head in self.__dict__.get("_heads", {}).values():
                head.weight = head.weight.to(device)
        return self

    @property
    def fingerprint(self) -> str:
        return architecture_fingerprint(self.model)

    @property
    def weights(self) -> dict:
        """``tak.io.weights_record`` of ``model``, θ0: computed again only once a tensor of its state has been
        replaced or changed in place (torch's version counters) or ``to`` has moved it."""
        state = [(t.data_ptr(), None if t.is_inference() else t._version) for t in self.model.state_dict().values()]
        if self.__dict__.get("_weights_of") != state:
            self._weights, self._weights_of = weights_record(self.model), state
        return self._weights

    def holds_weights(self, recorded: dict | None) -> bool:
        """Whether ``model`` may hold the θ0 of a file's ``weights`` record: the same digest, or other dtypes (the
        same weights in another precision, which no digest can tell), or no record (a file of an earlier tak)."""
        mine = self.weights
        return not recorded or recorded.get("dtypes") != mine["dtypes"] or recorded.get("digest") == mine["digest"]

    def meta(self) -> dict:
        """What task vector and factor files record about the backbone."""
        return {"base_model": self.name, "fingerprint": self.fingerprint, "weights": self.weights,
                "source": dict(self.source or {"spec": self.name})}
