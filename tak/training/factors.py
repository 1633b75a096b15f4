"""The curvature a training run penalizes with: factors per task, fitted once and cached as files.

``task_factors(kind, backbone, task, ...)`` fits (or loads from ``cache``) the KFAC / EK-FAC /
diagonal GGN of ``backbone.features`` on the first ``n_examples`` of a fixed shuffle of the task's
training inputs. ``drift_factors`` combines them as the method asks: the other tasks merged (TAK
Eq. 8) or kept per task (Eq. 7), or the reference set's (DELTA; universal factors: its tasks pooled).
"""
import hashlib
import json
import warnings
from dataclasses import replace
from pathlib import Path

import torch
from torch.utils import _pytree as pytree

from ..curvature import (EKFAC, KFAC, DiagonalGGN, TaskFactors, compress, fit_diagonal, fit_ekfac, fit_kfac, merge_kfac,
                         pool_kfac)
from ..curvature import storage
from ..curvature.distributed import on_every_rank, on_main_rank, rank, world_size
from ..curvature.outputs import to_device
from ..evaluation import loader
from .config import parse_compression

_CLASSES = {"kfac": KFAC, "ekfac": EKFAC, "diagonal": DiagonalGGN}
FACTOR_KINDS = tuple(_CLASSES)


def fit_inputs(backbone, examples_by_task: list, n_examples: int, device, batch_size: int = 32) -> list:
    """Model-input batches (on ``device``) of the first ``n_examples`` of each example list, fixed shuffle."""
    batches = []
    for examples in examples_by_task:
        order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(0))[:n_examples]
        chosen = [examples[i] for i in order.tolist()]
        batches += [to_device(inputs, device) for inputs, _ in loader(backbone, chosen, batch_size)]
    return batches


def task_factors(kind: str, backbone, tasks: list, *, n_examples: int, mc_samples: int, cache: Path | None,
                 device, layers: list[str] | None = None, cache_key: str = "", seed: int = 0, progress: bool = True,
                 home=None):
    """Factors of ``kind`` on the training inputs of ``tasks`` (one task, or a reference set of several),
    for the modules named in ``layers`` (None: all), Monte-Carlo probes seeded by ``seed``, fitted on ``device`` and
    kept on ``home`` (None: ``device``); under torchrun each rank fits every world-th batch. The cached file's name
    holds kind, tasks, n, M, a hash of ``layers``, ``content_digest`` of θ0 and the inputs, and ``cache_key`` (what
    else the factors depend on, the seed among them; see the loop)."""
    name = "+".join(t.name for t in tasks)
    which = "all" if layers is None else hashlib.sha256("|".join(sorted(layers)).encode()).hexdigest()[:8]
    batches = fit_inputs(backbone, [t.split("train") for t in tasks], n_examples, device)
    content = content_digest(backbone.weights["digest"], batches)
    stem = f"{kind}-{name}-n{n_examples}-mc{mc_samples}-{which}-{content}" + (f"-{cache_key}" if cache_key else "")
    path = None if cache is None else Path(cache) / f"{stem}.safetensors"
    if path is not None and on_every_rank(path.exists(), device):  # a rank that lacks the file fits with the others
        return _CLASSES[kind].load(path, model=backbone.model, device=home or device)
    fit = {"kfac": fit_kfac, "ekfac": fit_ekfac, "diagonal": fit_diagonal}[kind]
    shard = batches[rank()::world_size()]  # under torchrun each rank fits its shard; the fit adds them up
    factors = fit(backbone.model, shard, output_fn=backbone.features, mc_samples=mc_samples, layers=layers,
                  seed=seed, progress=progress)
    factors.meta.update(task=name, base_model=backbone.name)  # the base model, for the message if a model is refused
    if path is not None:  # every rank holds the same factors: rank 0 writes them
        on_main_rank(lambda: factors.save(path), device)
    return factors if home is None else factors.to(home)


def content_digest(weights_digest: str, batches) -> str:
    """8 hex digits of θ0 (its ``tak.io.weights_record`` digest: every value, in its dtype) and of the inputs the
    factors are fitted on: a cached file is reused only for the same θ0 and the same data."""
    h = hashlib.sha256(weights_digest.encode())
    for t in [t for batch in batches for t in pytree.tree_leaves(batch) if isinstance(t, torch.Tensor)]:
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.detach().reshape(-1).contiguous().view(torch.uint8).cpu().numpy().tobytes())
    return h.hexdigest()[:8]


def load_factor_files(kind: str, paths: list, backbone, layers: list[str], device, *, trained: str | None,
                      fitted: list[str], features: dict | None = None) -> list:
    """[(factors, training-set size)] of the factor files ``paths`` (``tak fit``: factors shared in place of the
    data) for a run on ``backbone`` that trains ``layers`` and fits factors of the tasks ``fitted`` from their data:
    ``kind`` files of its architecture and, where a file records them, its base model, pretrained tag and weights
    (``Backbone.holds_weights``); cut to ``layers``; of tasks other than ``trained`` (None: any) and ``fitted``, each
    task once. A file whose fit recorded other ``features`` settings ({"max_length": ..., "backbone_options": ...}:
    how inputs become the features whose curvature it holds) is used with a warning that names them."""
    loaded, seen = [], {}
    for path in paths:
        try:
            factors = storage.load(path, model=backbone.model, kind=kind)  # on the CPU until cut to ``layers``
        except (ValueError, OSError) as e:
            hint = f" (this run's method penalizes with {kind!r} factors: tak fit --kind {kind})" if (
                "factors, not" in str(e)) else ""
            raise ValueError(f"factor_files: {e}{hint}") from None
        meta, mine = factors.meta, backbone.meta()
        for key, theirs, value in (("base_model", meta.get("base_model"), mine["base_model"]),
                                   ("pretrained", (meta.get("source") or {}).get("pretrained"),
                                    mine["source"].get("pretrained"))):
            if theirs is not None and theirs != value:
                raise ValueError(f"factor file {path}: fitted on {key} {theirs!r}, this run's is {value!r}")
        if not backbone.holds_weights(meta.get("weights")):
            raise ValueError(f"factor file {path}: fitted on base weights {meta['weights']}; this run's are "
                             f"{backbone.weights}: another θ0 in the same dtypes")
        tasks = [t for t in str(meta.get("task") or "").split("+") if t]  # none named: a file of one's own making
        if trained in tasks:
            raise ValueError(f"factor file {path}: holds the factors of {trained!r}, the task this run trains; the "
                             "drift penalty takes the other tasks' factors")
        for t in tasks:
            if t in fitted or t in seen:
                raise ValueError(f"factor file {path}: holds the factors of {t!r}, which "
                                 + (f"{seen[t]} holds too" if t in seen else "this run fits from its data")
                                 + "; a task's factors count once")
            seen[t] = str(path)
        size = meta.get("train_examples")
        if kind != "ekfac" and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
            raise ValueError(f"factor file {path}: train_examples={size!r} in its metadata; expected the size of the "
                             "training set the factors come from, a positive integer (their weight λ in the merge, "
                             "TAK Eq. 7/8): write it with `tak fit`, or set factors.meta['train_examples'] before "
                             "factors.save(path)")
        missing = sorted(set(layers) - set(factors) - set(meta.get("off_path", ())))
        if missing:
            raise ValueError(f"factor file {path}: has no factors for {len(missing)} layers this run trains: "
                             f"{missing[:5]}{' ...' if len(missing) > 5 else ''}; fit it for them (tak fit --trainable "
                             "as this run's, or all layers)")
        _warn_other_features(path, meta.get("fit") or {}, features or {})
        kept = type(factors)({n: lf for n, lf in factors.items() if n in layers}, meta)
        loaded.append((kept.to(device), size))
    return loaded


def _warn_other_features(path, fit: dict, features: dict) -> None:
    def same(a, b):
        return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)
    differ = [f"{k}={fit[k]!r} (this run: {v!r})" for k, v in features.items() if k in fit and not same(fit[k], v)]
    if differ:
        warnings.warn(f"factor file {path}: fitted with {', '.join(differ)}; its curvature is of features computed "
                      "otherwise than this run's (fit it again with the run's settings to match them)", stacklevel=4)


def file_digests(paths: list) -> list[str]:
    """The SHA-256 of each file's bytes (ValueError naming ``factor_files`` for one that cannot be read)."""
    digests = []
    for path in paths:
        h = hashlib.sha256()
        try:
            with open(path, "rb") as f:
                while chunk := f.read(1 << 24):
                    h.update(chunk)
        except OSError as e:
            why = {FileNotFoundError: "no such file", IsADirectoryError: "a folder; expected a factor file (tak fit "
                   "--out FILE.safetensors)"}.get(type(e), e)
            raise ValueError(f"factor_files: {path}: {why}") from None
        digests.append(h.hexdigest())
    return digests


def merge_diagonal(parts: list[DiagonalGGN], sizes: list[int]) -> DiagonalGGN:
    """Σ_t λ_t D_t, λ_t = |D_t| / Σ |D_s| (the diagonal analogue of TAK Eq. 7)."""
    total = float(sum(sizes))
    first = parts[0]
    merged = {n: replace(lf, D=sum(s / total * p[n].D for p, s in zip(parts, sizes))) for n, lf in first.items()}
    return DiagonalGGN(merged, {**first.meta, "task": "+".join(p.meta.get("task", "?") for p in parts)})


def drift_factors(kind: str, backbone, others: list, *, mode: str = "merged", pooled: bool = False,
                  compression: str | None = None, shared: list = (), **fit):
    """The penalty's factors from the tasks ``others`` (each a ``tak.data.Task``) and the ``shared`` (factors, size)
    of ``load_factor_files``: KFAC merged (Eq. 8; ``pooled``, the tasks of one reference set: ``pool_kfac``, one
    fit's scale) or per task (Eq. 7), optionally compressed; diagonal GGN λ-averaged; EK-FAC of one set: the tasks
    ``others`` together, or one shared file (compression and per-task factors are refused for those two)."""
    if not others and not shared:
        raise ValueError(f"a {kind} penalty needs factors of other tasks or a reference set; none given "
                         "(--tasks A,B,... with more than the trained task, --reference, or --factor-files; in Python tasks=[...], "
                         "reference=[...], factor_files=[...])")
    if kind != "kfac" and (compression is not None or mode != "merged"):
        given = [f"{k}={v!r}" for k, v, on in (("compress", compression, compression is not None),
                                               ("factors", mode, mode != "merged")) if on]
        raise ValueError(f"{' and '.join(given)}: for KFAC penalties only (tak, attn_only_tak); the {kind} penalty "
                         "takes neither compressed nor per-task factors")
    if kind == "ekfac":
        if len(shared) + bool(others) > 1:
            raise ValueError("EK-FAC factors of several sets do not merge (each has its own eigenbasis): give one "
                             "factor file or a reference set, fitted on all its tasks together")
        return shared[0][0] if shared else task_factors("ekfac", backbone, others, **fit)
    parts = [task_factors(kind, backbone, [t], **fit) for t in others] + [f for f, _ in shared]
    sizes = [len(t.split("train")) for t in others] + [n for _, n in shared]
    if kind == "diagonal":
        return merge_diagonal(parts, sizes)
    options = parse_compression(compression)
    device, home = fit["device"], fit.get("home") or fit["device"]  # compressed where fitted, kept at home
    shrink = (lambda f: compress(f.to(device), **options)[0].to(home)) if options else (lambda f: f)
    if mode == "per_task":
        return TaskFactors([shrink(p) for p in parts], sizes)
    return shrink((pool_kfac if pooled else merge_kfac)(parts, sizes))
