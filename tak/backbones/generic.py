"""Any ``nn.Module`` with heads of its own as a backbone (``GenericBackbone``)."""
from collections.abc import Callable, Mapping

import torch
from torch import nn

from ..curvature.outputs import call
from ..data.task import MODALITIES
from .base import Backbone, Head


class GenericBackbone(Backbone):
    """``model`` with user functions: ``inputs(list of raw inputs) -> batch``, ``features(model, batch) -> f``
    (default: ``model(batch)``, dicts as keyword arguments, tuples as positional ones) and ``heads``, a
    ``{task name: Head}`` or a function ``task -> Head``. ``features`` must work for ``model``, for
    ``tak.linearize(model)`` and for copies (it gets the module to use as its first argument)."""

    def __init__(self, model: nn.Module, *, inputs: Callable[[list], object],
                 features: Callable[[nn.Module, object], torch.Tensor] | None = None,
                 heads: Mapping[str, Head] | Callable[[object], Head], name: str = "generic",
                 modalities: tuple[str, ...] = MODALITIES, source: dict | None = None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"GenericBackbone: model must be an nn.Module, got {type(model).__name__}")
        if not callable(inputs):
            raise TypeError("GenericBackbone: inputs must be a function list -> batch")
        if not (callable(heads) or isinstance(heads, Mapping)):
            raise TypeError("GenericBackbone: heads must be a {task name: Head} mapping or a function task -> Head")
        modalities = (modalities,) if isinstance(modalities, str) else modalities
        unknown = [m for m in modalities if m not in MODALITIES]
        if unknown:
            raise ValueError(f"GenericBackbone: unknown modalities {unknown}; valid: {MODALITIES}")
        self.name, self.model, self.modalities = name, model, tuple(modalities)
        self._inputs, self._features = inputs, features or call
        self._heads_source = dict(heads) if isinstance(heads, Mapping) else heads
        self.source = source or {"spec": name, "pretrained": None}

    def inputs(self, examples: list):
        return self._inputs(list(examples))

    def features(self, model, batch) -> torch.Tensor:
        return self._features(model, batch)

    def _build_head(self, task) -> Head:
        if isinstance(self._heads_source, dict):
            if task.name not in self._heads_source:
                raise ValueError(f"backbone {self.name!r} has no head for task {task.name!r}; heads: "
                                 f"{sorted(self._heads_source)}")
            head = self._heads_source[task.name]
        else:
            head = self._heads_source(task)
        if not isinstance(head, Head):
            raise TypeError(f"backbone {self.name!r}: the head of task {task.name!r} is a {type(head).__name__}, "
                            "not a tak.backbones.Head")
        if head.weight.shape[0] != len(task.classes):
            raise ValueError(f"backbone {self.name!r}: the head of task {task.name!r} has {head.weight.shape[0]} "
                             f"rows for {len(task.classes)} classes")
        return head

    def to(self, *args, **kwargs):
        super().to(*args, **kwargs)
        device = torch._C._nn._parse_to(*args, **kwargs)[0]
        if device is not None and isinstance(self._heads_source, dict):
            for head in self._heads_source.values():
                head.weight = head.weight.to(device)
        return self
