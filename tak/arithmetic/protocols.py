"""The evaluation protocols of task arithmetic, α always chosen on validation data only.

- ``task_addition``: θ0 + α Σ_t τ_t at α = 1 and at the α of the grid with the best mean normalized
  validation accuracy (merged / individual accuracy per task, both on validation: the choice of
  Ortiz-Jiménez et al. 2023, whose setup TAK and DELTA follow); absolute accuracy (mean over tasks) and
  normalized accuracy (mean over tasks of merged accuracy / the task's individual accuracy, θ0 + τ_t alone,
  in the same regime), on test. Tasks that are parts of one task of disjoint classes (the class-partition
  protocol, TAK Sec. F.7) are also scored on their joint problem, all their classes together, its α chosen
  by its accuracy on the joint validation split.
- ``task_negation``: θ0 − α τ_target at the α minimizing the target's validation accuracy subject to
  the control task keeping ≥ ``keep`` (95%) of the pretrained model's control validation accuracy.
"""
import warnings
from dataclasses import asdict, dataclass, field

from ..task_vector import TaskVector
from . import merges
from .compose import Evaluator, check_backbone, combine

DEFAULT_ALPHAS = tuple(round(0.05 * i, 2) for i in range(41))  # 0, 0.05, ..., 2


def normalized_accuracy(merged: dict[str, float], individual: dict[str, float]) -> float | None:
    """Mean over tasks of merged / individual accuracy, in percent; None, with a warning, when a task's individual
    accuracy is 0 (its ratio has no value)."""
    missing = sorted(set(merged) - set(individual))
    if missing:
        raise ValueError(f"normalized accuracy: no individual accuracy for {missing}")
    zero = [t for t in merged if individual[t] == 0]
    if zero:
        warnings.warn(f"normalized accuracy: the individual accuracy of {zero} is 0, so the normalized accuracy has "
                      "no value (reported as None); the absolute accuracies stand", stacklevel=2)
        return None
    return 100.0 * sum(merged[t] / individual[t] for t in merged) / len(merged)


def selection_curve(val: dict[float, dict[str, float]], individual_val: dict[str, float]) -> dict[float, float]:
    """α -> mean over tasks of merged / individual validation accuracy (percent), what picks α. A task whose own τ
    scores 0 on validation has no ratio and is left out (warned); without any task left, α -> mean accuracy."""
    kept = [t for t, acc in individual_val.items() if acc > 0]
    if len(kept) < len(individual_val):
        left = sorted(set(individual_val) - set(kept))
        warnings.warn(f"choosing α: the individual validation accuracy of {left} is 0, so "
                      f"{'they are' if len(left) > 1 else 'it is'} left out of the mean normalized accuracy"
                      + ("" if kept else "; α is chosen by the mean accuracy instead"), stacklevel=3)
    if not kept:
        return {a: mean(accs[t] for t in individual_val) for a, accs in val.items()}
    return {a: 100.0 * mean(accs[t] / individual_val[t] for t in kept) for a, accs in val.items()}


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


@dataclass
class AdditionResult:
    """Accuracies in percent. ``alpha1`` / ``best``: {"abs", "norm", "per_task"} on test (``best`` also
    has "alpha"; "norm" is None where an individual accuracy is 0); ``individual`` / ``individual_val``: task ->
    test / validation accuracy of its own τ; ``val_curve``: α -> mean normalized validation accuracy
    (``selection_curve``, what chose α); ``joint``: joint task -> {"parts", "classes", "alpha1",
    "best": {"alpha", "acc"}, "val_curve": α -> its validation accuracy} for each class-partition group."""

    individual: dict
    individual_val: dict
    alpha1: dict
    best: dict
    val_curve: dict
    joint: dict = field(default_factory=dict)

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
    mismatched = [(tv.task, t) for tv, t in zip(task_vectors, names) if tv.task is not None and tv.task != t]
    if mismatched:  # each τ is scored alone on its task: the order must pair them
        raise ValueError(f"task vectors and tasks are paired by position, and these pairs differ: "
                         f"{', '.join(f'τ of {a!r} with task {b!r}' for a, b in mismatched)}")
    if len(set(names)) != len(names):  # accuracies are kept by task: a repeated one would count once
        raise ValueError(f"task addition takes one task vector per task; tasks repeat: {names}")
    check_backbone(backbone, task_vectors)
    kw.setdefault("cache", {})  # θ0's features and recorded prefixes, shared by the evaluators below
    merged = combine(task_vectors)
    if merge != "task_arithmetic" or merge_options:
        merged = TaskVector(merges.merge(merge, [tv.tensors for tv in task_vectors], **(merge_options or {})),
                            {**merged.meta, "method": f"merge:{merge}"})
    val_evaluator = Evaluator(backbone, tasks, "val", joint=True, **kw)
    val = val_evaluator.sweep(merged, alphas)
    individual_val = individual_accuracies(backbone, task_vectors, tasks, "val", **kw)
    val_curve = selection_curve({a: {t: accs[t] for t in names} for a, accs in val.items()}, individual_val)
    best_alpha = best_of(val_curve)
    joints = {j.name: (parts, {a: accs[j.name] for a, accs in val.items()}) for j, parts in val_evaluator.joints}
    joint_alphas = {name: best_of(curve) for name, (_, curve) in joints.items()}
    test = Evaluator(backbone, tasks, "test", joint=True, **kw).sweep(
        merged, sorted({1.0, best_alpha, *joint_alphas.values()}))
    if individual is None:
        individual = individual_accuracies(backbone, task_vectors, tasks, **kw)

    def summary(a):
        per_task = {t: test[a][t] for t in names}
        return {"abs": mean(per_task.values()), "norm": normalized_accuracy(per_task, individual), "per_task": per_task}
    joint = {name: {"parts": [p.name for p in parts], "classes": sum(len(p.classes) for p in parts),
                    "alpha1": test[1.0][name], "best": {"alpha": joint_alphas[name], "acc": test[joint_alphas[name]][name]},
                    "val_curve": curve} for name, (parts, curve) in joints.items()}
    return AdditionResult(individual=individual, individual_val=individual_val, alpha1=summary(1.0),
                          best={"alpha": best_alpha, **summary(best_alpha)}, val_curve=val_curve, joint=joint)


def best_of(val_curve: dict[float, float]) -> float:
    """The α of the best validation accuracy; ties: the α nearest 1."""
    return max(val_curve, key=lambda a: (val_curve[a], -abs(a - 1)))


@dataclass
class NegationResult:
    """``alpha`` chosen on validation; test accuracies (%) of target and control at that α and at θ0;
    ``constraint_met``: whether an α of the grid kept the control (else α = 0: θ0 itself)."""

    alpha: float
    target: float
    control: float
    pretrained_target: float
    pretrained_control: float
    val_curve: dict
    constraint_met: bool = True

    def to_dict(self) -> dict:
        return asdict(self)


def task_negation(backbone, task_vector, target, control, *, alphas=DEFAULT_ALPHAS, keep: float = 0.95,
                  **kw) -> NegationResult:
    """The negation protocol: the α of θ0 − α τ with the lowest target validation accuracy (the smaller α on ties)
    among those that keep the control's ≥ ``keep`` of its θ0 validation accuracy; test accuracies at that α."""
    check_backbone(backbone, [task_vector])
    kw.setdefault("cache", {})
    negated = combine([task_vector], -1.0)
    val = Evaluator(backbone, [target, control], "val", **kw)
    base = val.sweep(None, [0.0])[0.0]
    curve = val.sweep(negated, alphas)
    allowed = [a for a in curve if curve[a][control.name] >= keep * base[control.name]]
    alpha = min(allowed, key=lambda a: (curve[a][target.name], a)) if allowed else 0.0
    if not allowed:
        warnings.warn(f"task negation: no α of the grid keeps {control.name}'s validation accuracy ≥ {keep:.0%} of "
                      f"θ0's ({base[control.name]:.1f}%), so α = 0 (θ0 itself) is reported; try smaller α",
                      stacklevel=2)
    test = Evaluator(backbone, [target, control], "test", **kw)
    at, pre = test.sweep(negated, [alpha])[alpha], test.sweep(None, [0.0])[0.0]
    return NegationResult(alpha=alpha, target=at[target.name], control=at[control.name],
                          pretrained_target=pre[target.name], pretrained_control=pre[control.name],
                          val_curve={a: {"target": v[target.name], "control": v[control.name]} for a, v in curve.items()},
                          constraint_met=bool(allowed))
