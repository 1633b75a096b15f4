"""The evaluation protocols of task arithmetic, α always chosen on validation data only.

- ``task_addition``: θ0 + α Σ_t τ_t at α = 1 and at the α of the grid with the best mean validation
  accuracy; absolute accuracy (mean over tasks) and normalized accuracy (mean over tasks of merged
  accuracy / the task's individual accuracy, θ0 + τ_t alone, in the same regime), on test.
- ``task_negation``: θ0 − α τ_target at the α minimizing the target's validation accuracy subject to
  the control task keeping ≥ ``keep`` (95%) of the pretrained model's control validation accuracy.
"""
from dataclasses import asdict, dataclass

from ..task_vector import TaskVector
from . import merges
from .compose import Evaluator, check_backbone, combine

DEFAULT_ALPHAS = tuple(round(0.05 * i, 2) for i in range(41))  # 0, 0.05, ..., 2


def normalized_accuracy(merged: dict[str, float], individual: dict[str, float]) -> float:
    """Mean over tasks of merged / individual accuracy, in percent."""
    missing = sorted(set(merged) - set(individual))
    if missing:
        raise ValueError(f"normalized accuracy: no individual accuracy for {missing}")
    zero = [t for t in merged if individual[t] == 0]
    if zero:
        raise ValueError(f"normalized accuracy: individual accuracy of {zero} is 0")
    return 100.0 * sum(merged[t] / individual[t] for t in merged) / len(merged)


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


@dataclass
class AdditionResult:
    """Accuracies in percent. ``alpha1`` / ``best``: {"abs", "norm", "per_task"} on test (``best`` also
    has "alpha"); ``individual``: task -> test accuracy of its own τ; ``val_curve``: α -> mean
    validation accuracy over tasks (what chose α)."""

    individual: dict
    alpha1: dict
    best: dict
    val_curve: dict

    def to_dict(self) -> dict:
        return asdict(self)


def individual_accuracies(backbone, task_vectors, tasks, split: str = "test", **kw) -> dict[str, float]:
    """Each task's accuracy with its own task vector alone (θ0 + τ_t), on ``split``."""
    evaluator = Evaluator(backbone, tasks, split, **kw)
    return {t.name: evaluator.sweep(tv, [1.0], tasks=[t])[1.0][t.name] for tv, t in zip(task_vectors, tasks)}


def task_addition(backbone, task_vectors, tasks, *, alphas=DEFAULT_ALPHAS, individual=None,
                  merge: str = "task_arithmetic", merge_options: dict | None = None, **kw) -> AdditionResult:
    """The addition protocol for ``task_vectors`` (one per task of ``tasks``, same order): θ0 + α τ_merged
    with τ_merged = Σ_t τ_t, or ``tak.arithmetic.merges.merge(merge, τs, **merge_options)`` (TIES, TSV-M,
    Iso-C, Iso-CTS), α chosen on validation."""
    if len(task_vectors) != len(tasks):
        raise ValueError(f"{len(task_vectors)} task vectors for {len(tasks)} tasks")
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):  # accuracies are kept by task: a repeated one would count once
        raise ValueError(f"task addition takes one task vector per task; tasks repeat: {names}")
    check_backbone(backbone, task_vectors)
    kw.setdefault("cache", {})  # θ0's features and recorded prefixes, shared by the evaluators below
    merged = combine(task_vectors)
    if merge != "task_arithmetic" or merge_options:
        merged = TaskVector(merges.merge(merge, [tv.tensors for tv in task_vectors], **(merge_options or {})),
                            {**merged.meta, "method": f"merge:{merge}"})
    val = Evaluator(backbone, tasks, "val", **kw).sweep(merged, alphas)
    val_curve = {a: mean(accs.values()) for a, accs in val.items()}
    best_alpha = max(val_curve, key=lambda a: (val_curve[a], -abs(a - 1)))  # ties: the α nearest 1
    test = Evaluator(backbone, tasks, "test", **kw).sweep(merged, sorted({1.0, best_alpha}))
    if individual is None:
        individual = individual_accuracies(backbone, task_vectors, tasks, **kw)

    def summary(a):
        return {"abs": mean(test[a].values()), "norm": normalized_accuracy(test[a], individual), "per_task": test[a]}
    return AdditionResult(individual=individual, alpha1=summary(1.0), best={"alpha": best_alpha, **summary(best_alpha)},
                          val_curve=val_curve)


@dataclass
class NegationResult:
    """``alpha`` chosen on validation; test accuracies (%) of target and control at that α and at θ0."""

    alpha: float
    target: float
    control: float
    pretrained_target: float
    pretrained_control: float
    val_curve: dict

    def to_dict(self) -> dict:
        return asdict(self)


def task_negation(backbone, task_vector, target, control, *, alphas=DEFAULT_ALPHAS, keep: float = 0.95,
                  **kw) -> NegationResult:
    """The negation protocol: minimize the target's accuracy, keep ≥ ``keep`` of the control's."""
    check_backbone(backbone, [task_vector])
    kw.setdefault("cache", {})
    negated = combine([task_vector], -1.0)
    val = Evaluator(backbone, [target, control], "val", **kw)
    base = val.sweep(None, [0.0])[0.0]
    curve = val.sweep(negated, alphas)
    allowed = [a for a in curve if curve[a][control.name] >= keep * base[control.name]]
    alpha = min(allowed, key=lambda a: (curve[a][target.name], a)) if allowed else 0.0
    test = Evaluator(backbone, [target, control], "test", **kw)
    at, pre = test.sweep(negated, [alpha])[alpha], test.sweep(None, [0.0])[0.0]
    return NegationResult(alpha=alpha, target=at[target.name], control=at[control.name],
                          pretrained_target=pre[target.name], pretrained_control=pre[control.name],
                          val_curve={a: {"target": v[target.name], "control": v[control.name]} for a, v in curve.items()})
