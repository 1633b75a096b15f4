"""Task addition and negation of saved task vectors: θ0 + Σ_t α_t τ_t and θ0 − α τ.

A non-linear task vector is added to the plain model's parameters; a linear one acts through the
linearized model, f(x; θ0) + J (Σ_t α_t τ_t) (``tak.linearize``). ``Evaluator`` scores a merged
task vector for a whole α grid: for linear task vectors from two feature passes per task
(f_lin(θ0 + α τ) = f0 + α (f_lin(θ0 + τ) − f0)), for non-linear ones from one pass per α; the layers
below the first one τ changes run once per batch and are replayed after that (``tak.replay``).
"""
import copy
import itertools
import numbers

import torch

from ..data.splits import class_partitions, joint_task
from ..evaluation import accuracy_of_features, features, linear_path_features
from ..io import architecture_fingerprints
from ..linearize import linearize
from ..replay import DEFAULT_MAX_BYTES, ByteBudget, FrozenPrefix
from ..task_vector import TaskVector, check_compatible


def combine(task_vectors: list[TaskVector], alphas=1.0, *, allow_mixed_regimes: bool = False) -> TaskVector:
    """Σ_t α_t τ_t as a TaskVector (``alphas``: one value or one per task vector), after checking that
    the task vectors share base model, architecture and regime."""
    check_compatible(task_vectors, allow_mixed_regimes=allow_mixed_regimes)
    scalar = isinstance(alphas, numbers.Real) or isinstance(alphas, torch.Tensor) and alphas.dim() == 0
    alphas = [float(alphas)] * len(task_vectors) if scalar else [float(a) for a in alphas]
    if len(alphas) != len(task_vectors):
        raise ValueError(f"alphas: {len(alphas)} values for {len(task_vectors)} task vectors")
    first = task_vectors[0]

    def weighted_sum(k, dtype):  # in fp32, or float64 when the task vectors are
        acc = torch.promote_types(dtype, torch.float32)
        return sum(a * tv.tensors[k].to(acc) for a, tv in zip(alphas, task_vectors)).to(dtype)
    tensors = {k: weighted_sum(k, v.dtype) for k, v in first.tensors.items()}
    meta = {k: first.meta.get(k) for k in ("base_model", "fingerprint", "regime", "source", "max_length",
                                           "backbone_options") if k in first.meta}  # one backbone's: checked
    regimes = sorted({str(tv.regime) for tv in task_vectors})
    if len(regimes) > 1:
        meta.pop("regime", None)
        meta["mixed_regimes"] = regimes
    meta.update(task="+".join(str(tv.task) for tv in task_vectors), method="+".join(
        sorted({str(tv.meta.get("method")) for tv in task_vectors})), alphas=alphas)
    return TaskVector(tensors, meta)


def negate(task_vector: TaskVector, alpha: float = 1.0) -> TaskVector:
    """−α τ (task negation), with the metadata kept."""
    return TaskVector({k: -alpha * v for k, v in task_vector.tensors.items()},
                      {**task_vector.meta, "negated": alpha})


def check_backbone(backbone, task_vectors: list[TaskVector]) -> None:
    """ValueError unless the task vectors were trained on ``backbone``: its architecture (in any dtype), and its
    name, pretrained weights and their digest (``Backbone.holds_weights``) where the task vector records them. A
    fingerprint of an earlier tak's file (``tak.io.architecture_fingerprints``) is accepted and replaced by today's,
    so the task vectors compare equal."""
    have = (backbone.meta().get("source") or {}).get("pretrained")
    known = architecture_fingerprints(backbone.model)
    for tv in task_vectors:
        fp, base, source = tv.meta.get("fingerprint"), tv.meta.get("base_model"), tv.meta.get("source") or {}
        want = source.get("pretrained")
        if fp in known:
            tv.meta["fingerprint"] = backbone.fingerprint
        elif fp is not None:
            raise ValueError(f"task vector {tv.task!r} (base model {base!r}, architecture "
                             f"{fp}) does not belong to backbone {backbone.name!r} (architecture {backbone.fingerprint})")
        if base is not None and base != backbone.name or "pretrained" in source and want != have:
            raise ValueError(f"task vector {tv.task!r} was trained on {base!r} with pretrained={want!r}; the backbone "
                             f"is {backbone.name!r} with pretrained={have!r}")
        if not backbone.holds_weights(tv.meta.get("weights")):
            raise ValueError(f"task vector {tv.task!r} was trained from base weights {tv.meta['weights']}; backbone "
                             f"{backbone.name!r} (pretrained={have!r}) as loaded here has {backbone.weights}: other "
                             "values in the same dtypes are another θ0 (changed files, another checkpoint), and "
                             "θ0 + τ would be meaningless")


def apply(backbone, task_vector: TaskVector, alpha: float = 1.0):
    """The network at θ0 + α τ, in eval mode: a copy of ``backbone.model`` for a non-linear task vector,
    its linearization for a linear one (``regime`` from the metadata). The parameters that τ changes
    are the ones with ``requires_grad`` (a linearization's parameters are τ alone)."""
    check_backbone(backbone, [task_vector])
    if task_vector.meta.get("mixed_regimes"):
        raise ValueError(f"task vector {task_vector.task!r} adds task vectors of the regimes "
                         f"{task_vector.meta['mixed_regimes']}: neither the model nor its linearization evaluates it")
    params = dict(backbone.model.named_parameters())
    unknown = sorted(set(task_vector.tensors) - set(params))
    if unknown:
        raise ValueError(f"task vector {task_vector.task!r} has entries the model lacks: {unknown[:5]}")
    wrong = [f"{k} {tuple(v.shape)} != {tuple(params[k].shape)}" for k, v in task_vector.tensors.items()
             if v.shape != params[k].shape]
    if wrong:
        raise ValueError(f"task vector {task_vector.task!r} has entries of other shapes than the model's: {wrong[:5]}")
    if task_vector.regime == "linear":
        lin = linearize(backbone.model, trainable=list(task_vector.tensors))
        lin.load_task_vector({k: alpha * v for k, v in task_vector.tensors.items()})
        return lin.eval()
    model = copy.deepcopy(backbone.model)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for k, v in task_vector.tensors.items():
            params[k].add_(v.to(params[k].device, params[k].dtype), alpha=alpha)
    for k, p in params.items():
        p.requires_grad_(k in task_vector.tensors)
    return model.eval()


class Evaluator:
    """Accuracies of merged task vectors on ``tasks`` (their ``split``), α grids included; θ0's
    features are computed once per task, and the layers a task vector leaves unchanged once per
    batch for all the networks that share its changed parameters (``tak.replay.FrozenPrefix``)."""

    def __init__(self, backbone, tasks: list, split: str, *, batch_size: int = 256, device=None,
                 progress: bool = False, cache: dict | None = None, prefix_bytes: int = DEFAULT_MAX_BYTES,
                 joint: bool = False):
        """``device``: where the inputs go (None: the backbone's).
        ``cache``: a dict shared by evaluators of one backbone to keep θ0's features and the recorded
        prefixes across them; ``prefix_bytes``: the most the recorded prefixes of the cache may hold together
        (0: none; set by the first evaluator of the cache that records one);
        ``joint``: also score the joint problem of each group of class-partition tasks among ``tasks``
        (``tak.data.class_partitions``; TAK Sec. F.7), from the features of its parts."""
        self.backbone, self.tasks, self.split = backbone, list(tasks), split
        self.joints = [(joint_task(parts), parts) for parts in class_partitions(self.tasks)] if joint else []
        self.prefix_bytes = prefix_bytes
        self.kw = dict(batch_size=batch_size, device=device, progress=progress)
        for t in self.tasks:
            if len(t.split(split)) == 0:
                raise ValueError(f"task {t.name!r}: its {split!r} split is empty; cannot evaluate on it")
        self._cache = {} if cache is None else cache

    def _features(self, model, task) -> tuple[torch.Tensor, torch.Tensor]:
        prefix = None
        if self.prefix_bytes > 0 and model is not self.backbone.model:
            changed = tuple(n for n, p in model.named_parameters() if p.requires_grad)
            key = ("prefix", task.name, self.split, self.kw["batch_size"], type(model).__qualname__, changed)
            budget = self._cache.setdefault("prefix budget", ByteBudget(self.prefix_bytes))  # all prefixes together
            prefix = self._cache.setdefault(key, FrozenPrefix(budget))
        return features(self.backbone, model, task.split(self.split), desc=task.name, prefix=prefix, **self.kw)

    def pretrained(self, task) -> tuple[torch.Tensor, torch.Tensor]:
        key = (task.name, self.split)
        if key not in self._cache:
            self._cache[key] = self._features(self.backbone.model.eval(), task)
        return self._cache[key]

    def sweep(self, task_vector: TaskVector | None, alphas, tasks=None) -> dict[float, dict[str, float]]:
        """{α: {task: accuracy (%)}} of θ0 + α τ (τ = None: the pretrained model at every α); with ``joint``
        and the evaluator's own tasks, also {joint task: accuracy} for each joint problem, from the same features."""
        joints = self.joints if tasks is None else []
        tasks = self.tasks if tasks is None else tasks
        alphas = [float(a) for a in alphas]
        if not alphas:
            raise ValueError("alphas: empty grid")
        linear = task_vector is not None and task_vector.regime == "linear"
        if linear:
            model = apply(self.backbone, task_vector, 1.0)
            ends = {t.name: (self.pretrained(t), self._features(model, t)[0]) for t in tasks}
        out = {}
        for a in alphas:
            if linear:
                found = {name: (linear_path_features(f0, f1, a), labels) for name, ((f0, labels), f1) in ends.items()}
            else:
                model = None if task_vector is None or a == 0 else apply(self.backbone, task_vector, a)
                found = {t.name: self.pretrained(t) if model is None else self._features(model, t) for t in tasks}
            out[a] = {t.name: accuracy_of_features(self.backbone.head(t), *found[t.name]) for t in tasks}
            for joint, parts in joints:  # part i's labels follow the classes of the parts before it
                offsets = itertools.accumulate([0] + [len(p.classes) for p in parts[:-1]])
                feats = torch.cat([found[p.name][0] for p in parts])
                labels = torch.cat([found[p.name][1] + o for p, o in zip(parts, offsets)])
                out[a][joint.name] = accuracy_of_features(self.backbone.head(joint), feats, labels)
        return out
