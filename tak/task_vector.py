"""Task vectors τ = θ_t − θ0 as files: {model parameter name: tensor} plus JSON metadata.

Metadata (``TaskVector.meta``): ``base_model`` (backbone name), ``fingerprint``
(``tak.io.architecture_fingerprint`` of the trained module: class, parameter names and shapes; files of earlier
versions hold a legacy one that hashed dtypes too, see ``TaskVector.load``), ``method``, ``task``, ``regime``
("linear": τ is a direction of the linearized model f(θ0) + Jτ; "nonlinear": of the model itself),
``trainable`` (the selection), ``hparams``, ``seed``, ``metrics``. Files go through ``tak.io``: atomic
writes, checksummed reads, no pickles.
"""
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from .io import architecture_fingerprint, architecture_fingerprints, read, write

FORMAT_VERSION = 1
REGIMES = ("linear", "nonlinear")
_KIND = "task_vector"


@dataclass
class TaskVector:
    """τ by model parameter name, and its metadata (see the module docstring)."""

    tensors: dict[str, torch.Tensor]
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        regime = self.meta.get("regime")
        if regime is not None and regime not in REGIMES:
            raise ValueError(f"TaskVector: meta['regime'] must be one of {REGIMES}, got {regime!r}")

    @property
    def regime(self) -> str | None:
        return self.meta.get("regime")

    @property
    def task(self) -> str | None:
        return self.meta.get("task")

    def save(self, path) -> None:
        """Write to ``path`` (safetensors + metadata) atomically."""
        write(path, self.tensors, {**self.meta, "kind": _KIND, "format_version": FORMAT_VERSION})

    @classmethod
    def load(cls, path, *, fingerprint: str | None = None, model: nn.Module | None = None,
             device="cpu") -> "TaskVector":
        """The task vector in ``path``; refuses non-finite entries and one trained on another architecture than
        ``fingerprint`` (``architecture_fingerprint``) or ``model`` (in any dtype). With ``model`` a file of an
        earlier tak (legacy fingerprint, ``tak.io.architecture_fingerprints``) is accepted too, and its meta then
        holds today's fingerprint, so it compares equal to newer files in ``check_compatible``."""
        if fingerprint is not None and model is not None:
            raise TypeError("TaskVector.load: pass fingerprint= or model=, not both")
        tensors, meta = read(path, device=device)
        kind = meta.pop("kind", None)
        if kind != _KIND:
            raise ValueError(f"{path}: not a task vector file (kind {kind!r})")
        version = meta.pop("format_version", None)
        if version != FORMAT_VERSION:
            raise ValueError(f"{path}: task vector format_version {version!r}; this tak reads {FORMAT_VERSION}")
        bad = sorted(name for name, t in tensors.items() if not torch.isfinite(t).all())
        if bad:
            raise ValueError(f"{path}: task vector with NaN or Inf entries in {bad[:8]}{' ...' if len(bad) > 8 else ''}")
        if fingerprint is not None or model is not None:
            here = fingerprint if model is None else architecture_fingerprint(model)
            stored, base = meta.get("fingerprint"), meta.get("base_model")
            if stored not in ({fingerprint} if model is None else architecture_fingerprints(model)):
                raise ValueError(f"{path}: task vector of architecture {stored!r} (base model {base!r}); the model "
                                 f"here is {here!r}: check that it is the base model {base!r}, unmodified (parameter "
                                 "names and shapes as in training)" + ("" if model is not None else
                                 "; a file of an earlier tak, whose fingerprint hashed dtypes too, loads with model="))
            meta["fingerprint"] = here
        return cls(tensors, meta)

    def scaled(self, alpha: float) -> "TaskVector":
        """α τ, with the same metadata."""
        return TaskVector({k: alpha * v for k, v in self.tensors.items()}, dict(self.meta))


BACKBONE_KEYS = ("base_model", "pretrained", "max_length", "backbone_options", "weights")


def backbone_setting(tv: TaskVector, key: str):
    """One of ``BACKBONE_KEYS`` as ``tak.train`` recorded it (the pretrained weights under ``source``); ``...`` where
    the file does not record it."""
    return (tv.meta.get("source") or {}).get(key, ...) if key == "pretrained" else tv.meta.get(key, ...)


def check_same_backbone(task_vectors: Iterable[TaskVector]) -> None:
    """ValueError unless all task vectors were trained on one backbone as loaded: the same base model, and the same
    pretrained weights (source and digest), ``max_length`` and loader options where their files record them."""
    tvs = list(task_vectors)
    for key in BACKBONE_KEYS:
        values = [backbone_setting(tv, key) for tv in tvs]
        recorded = {json.dumps(v, sort_keys=True, default=str) for v in values if v is not ... or key == "base_model"}
        if len(recorded) > 1:
            named = ", ".join(f"{tv.task or i}: {None if v is ... else v!r}" for i, (tv, v) in enumerate(zip(tvs, values)))
            raise ValueError(f"task vectors differ in {key} ({named}): they were trained on different backbones; "
                             "merge or evaluate them separately")


def check_compatible(task_vectors: Iterable[TaskVector], *, allow_mixed_regimes: bool = False) -> None:
    """ValueError unless all task vectors share a backbone (``check_same_backbone``), an architecture, a regime
    (unless ``allow_mixed_regimes``) and the same parameter names and shapes. Fingerprints must be equal: load files
    of an earlier tak (legacy fingerprints, which hashed dtypes too) with ``TaskVector.load(path, model=...)`` to
    compare."""
    tvs = list(task_vectors)
    if not tvs:
        raise ValueError("no task vectors given")
    check_same_backbone(tvs)
    for key in ("fingerprint",) + (() if allow_mixed_regimes else ("regime",)):
        values = {tv.meta.get(key) for tv in tvs}
        if len(values) > 1:
            named = ", ".join(f"{tv.task or i}: {tv.meta.get(key)!r}" for i, tv in enumerate(tvs))
            raise ValueError(f"task vectors differ in {key} ({named})"
                             + ("; to merge them on purpose: allow_mixed_regimes=True (tak merge "
                                "--allow-mixed-regimes), though neither model evaluates the result"
                                if key == "regime" else "")
                             + ("; check that all were trained on one base model, unmodified (a file of an earlier tak "
                                "has a legacy fingerprint: TaskVector.load(path, model=base model) gives today's)"
                                if key == "fingerprint" else ""))
    first = tvs[0]
    for i, tv in enumerate(tvs[1:], 1):
        if set(tv.tensors) != set(first.tensors):
            only = sorted(set(tv.tensors) ^ set(first.tensors))
            raise ValueError(f"task vectors {first.task or 0!r} and {tv.task or i!r} hold different layers; "
                             f"in one only: {only[:8]}{' ...' if len(only) > 8 else ''}")
        wrong = [k for k, v in tv.tensors.items() if v.shape != first.tensors[k].shape]
        if wrong:
            raise ValueError(f"task vectors {first.task or 0!r} and {tv.task or i!r} differ in shape at {wrong[:8]}")


def as_tensors(taus: "TaskVector | Mapping[str, torch.Tensor]") -> dict[str, torch.Tensor]:
    """The tensors of a TaskVector, or the mapping itself as a dict."""
    return dict(taus.tensors if isinstance(taus, TaskVector) else taus)
