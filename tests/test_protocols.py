"""The protocols' arithmetic: normalized accuracy, α chosen on validation, negation's constraint."""
import pytest
import torch

from tak.arithmetic.compose import apply
from tak.arithmetic.protocols import normalized_accuracy, task_addition, task_negation
from tak.data import Task, joint_task, partition_classes
from tak.evaluation import accuracy
from tak.task_vector import TaskVector

from .test_methods import ToyBackbone, toy_task


def test_normalized_accuracy_is_the_mean_ratio_in_percent():
    assert normalized_accuracy({"a": 40.0, "b": 90.0}, {"a": 80.0, "b": 90.0}) == pytest.approx(75.0)
    with pytest.raises(ValueError, match="no individual accuracy for"):
        normalized_accuracy({"a": 1.0, "c": 2.0}, {"a": 1.0})
    with pytest.warns(UserWarning, match=r"individual accuracy of \['a'\] is 0, so the normalized accuracy has no value"):
        assert normalized_accuracy({"a": 1.0, "b": 2.0}, {"a": 0.0, "b": 4.0}) is None


def _task_vector(bb, scale, seed, regime="nonlinear", task=None):
    g = torch.Generator().manual_seed(seed)
    tensors = {n: scale * torch.randn(p.shape, generator=g, dtype=p.dtype) for n, p in bb.model.named_parameters()}
    return TaskVector(tensors, {**bb.meta(), "regime": regime, "task": task, "method": "test"})


def _stub_sweeps(monkeypatch, accuracies):
    """Evaluator.sweep gives ``accuracies[split][key][task]``, key: "own" for a task's τ alone (one task), else α."""
    from tak.arithmetic.compose import Evaluator

    def sweep(self, tv, alphas, tasks=None):
        tasks = self.tasks if tasks is None else tasks
        key = (lambda a: "own") if len(tasks) == 1 and tv is not None and "+" not in str(tv.task) else float
        return {float(a): {t.name: accuracies[self.split][key(a)][t.name] for t in tasks} for a in alphas}
    monkeypatch.setattr(Evaluator, "sweep", sweep)


def test_addition_picks_alpha_by_the_mean_normalized_validation_accuracy(monkeypatch):
    """Ortiz-Jiménez et al. 2023 (followed by TAK and DELTA) pick α by merged / individual accuracy on validation:
    here α = 1 (normalized 80 against 75), where the mean absolute accuracy would pick 0.5 (60 against 57.5)."""
    bb = ToyBackbone()
    tasks = [toy_task("A", n=40, seed=1), toy_task("B", n=40, classes=4, seed=2)]
    tvs = [_task_vector(bb, 0.1, 3, task="A"), _task_vector(bb, 0.1, 4, task="B")]
    val = {0.5: {"A": 90.0, "B": 30.0}, 1.0: {"A": 70.0, "B": 45.0}, "own": {"A": 100.0, "B": 50.0}}
    test = {0.5: {"A": 80.0, "B": 20.0}, 1.0: {"A": 60.0, "B": 40.0}, "own": {"A": 90.0, "B": 0.0}}
    _stub_sweeps(monkeypatch, {"val": val, "test": test})
    with pytest.warns(UserWarning, match=r"individual accuracy of \['B'\] is 0"):
        result = task_addition(bb, tvs, tasks, alphas=[0.5, 1.0])
    assert result.individual_val == val["own"] and result.val_curve == {0.5: 75.0, 1.0: 80.0}
    assert result.best["alpha"] == 1.0 and result.best["abs"] == 50.0
    assert result.best["norm"] is None  # B's own τ scores 0 on test: no ratio, the absolute accuracy stands

    val["own"]["B"] = 0.0  # B has no ratio on validation either: α by A's alone
    with pytest.warns(UserWarning, match=r"\['B'\] is 0, so it is left out of the mean normalized accuracy"):
        assert task_addition(bb, tvs, tasks, alphas=[0.5, 1.0]).val_curve == {0.5: 90.0, 1.0: 70.0}
    val["own"]["A"] = 0.0
    with pytest.warns(UserWarning, match="α is chosen by the mean accuracy instead"):
        assert task_addition(bb, tvs, tasks, alphas=[0.5, 1.0]).val_curve == {0.5: 60.0, 1.0: 57.5}
    with pytest.raises(ValueError, match=r"paired by position, and these pairs differ: τ of 'B' with task 'A', τ of "
                                         r"'A' with task 'B'"):
        task_addition(bb, tvs[::-1], tasks, alphas=[0.5, 1.0])


def test_negation_keeps_the_control_and_minimizes_the_target_on_validation():
    bb = ToyBackbone()
    target, control = toy_task("target", n=40, seed=1), toy_task("control", n=40, classes=4, seed=2)
    tv = _task_vector(bb, 0.8, seed=3)
    alphas = [0.0, 0.5, 1.0, 1.5, 2.0]
    result = task_negation(bb, tv, target, control, alphas=alphas)
    base = accuracy(bb, bb.model, control, "val")
    allowed = [a for a in alphas if result.val_curve[a]["control"] >= 0.95 * base]
    assert result.alpha in allowed
    assert result.val_curve[result.alpha]["target"] == min(result.val_curve[a]["target"] for a in allowed)
    negated = apply(bb, TaskVector({k: -v for k, v in tv.tensors.items()}, tv.meta), result.alpha)
    assert result.target == pytest.approx(accuracy(bb, negated, target, "test"))
    assert result.control == pytest.approx(accuracy(bb, negated, control, "test"))
    assert result.constraint_met


def test_negation_says_when_no_alpha_keeps_the_control(monkeypatch):
    bb = ToyBackbone()
    target, control = toy_task("target", n=40, seed=1), toy_task("control", n=40, classes=4, seed=2)
    val = {0.0: {"target": 60.0, "control": 50.0}, 0.5: {"target": 40.0, "control": 30.0}}
    _stub_sweeps(monkeypatch, {"val": val, "test": val})
    with pytest.warns(UserWarning, match=r"no α of the grid keeps control's validation accuracy ≥ 95% of θ0's "
                                         r"\(50.0%\), so α = 0 \(θ0 itself\) is reported"):
        result = task_negation(bb, _task_vector(bb, 0.8, seed=3), target, control, alphas=[0.5])
    assert (result.alpha, result.constraint_met, result.target, result.control) == (0.0, False, 60.0, 50.0)


def test_negation_limits_the_control_by_thetas_accuracy_and_breaks_ties_toward_the_smaller_alpha(monkeypatch):
    """The control must keep ≥ 95% of its θ0 validation accuracy (50 → 47.5): α = 1 (target 20, control 30) is
    out, α = 0.5 (target 40, control 48) in; among allowed α of equal target accuracy, the smaller one."""
    bb = ToyBackbone()
    target, control = toy_task("target", n=40, seed=1), toy_task("control", n=40, classes=4, seed=2)
    tv = _task_vector(bb, 0.8, seed=3)
    val = {0.0: {"target": 60.0, "control": 50.0}, 0.5: {"target": 40.0, "control": 48.0},
           1.0: {"target": 20.0, "control": 30.0}}
    test = {0.0: {"target": 61.0, "control": 51.0}, 0.5: {"target": 41.0, "control": 49.0},
            1.0: {"target": 21.0, "control": 31.0}}
    _stub_sweeps(monkeypatch, {"val": val, "test": test})
    result = task_negation(bb, tv, target, control, alphas=[0.5, 1.0])
    assert (result.alpha, result.constraint_met, result.target, result.control) == (0.5, True, 41.0, 49.0)
    assert (result.pretrained_target, result.pretrained_control) == (61.0, 51.0)
    val[1.0] = {"target": 40.0, "control": 49.0}  # both allowed, the same target accuracy
    assert task_negation(bb, tv, target, control, alphas=[1.0, 0.5]).alpha == 0.5


def test_negate_scales_every_tensor_by_minus_alpha_and_keeps_the_metadata():
    """negate(τ, α) = −α τ key by key, its metadata τ's plus ``negated: α``."""
    from tak.arithmetic.compose import negate
    bb = ToyBackbone()
    tv = _task_vector(bb, 0.8, seed=3, task="target")
    negated = negate(tv, 0.3)
    assert negated.tensors.keys() == tv.tensors.keys()
    for k, v in tv.tensors.items():
        assert negated.tensors[k].dtype == v.dtype
        torch.testing.assert_close(negated.tensors[k], -0.3 * v, rtol=0, atol=0)
    assert negated.meta == {**tv.meta, "negated": 0.3}


def test_addition_picks_alpha_on_validation_and_reports_test():
    bb = ToyBackbone()
    tasks = [toy_task("t1", n=40, seed=4), toy_task("t2", n=40, classes=4, seed=5)]
    tvs = [_task_vector(bb, 0.5, seed=6, task="t1"), _task_vector(bb, 0.5, seed=7, task="t2")]
    alphas = [0.0, 0.5, 1.0]
    result = task_addition(bb, tvs, tasks, alphas=alphas)
    assert result.val_curve[result.best["alpha"]] == max(result.val_curve.values())
    merged = apply(bb, TaskVector({k: tvs[0].tensors[k] + tvs[1].tensors[k] for k in tvs[0].tensors},
                                  tvs[0].meta), result.best["alpha"])
    for t in tasks:
        assert result.best["per_task"][t.name] == pytest.approx(accuracy(bb, merged, t, "test"))
    assert result.best["abs"] == pytest.approx(sum(result.best["per_task"].values()) / 2)
    assert result.alpha1["norm"] == pytest.approx(normalized_accuracy(result.alpha1["per_task"], result.individual))
    empty = toy_task("empty", n=40, seed=8)
    empty.loaders["val"] = lambda: []
    with pytest.raises(ValueError, match="empty"):
        task_addition(bb, tvs, [tasks[0], empty], alphas=alphas)


@pytest.mark.parametrize("regime", ["nonlinear", "linear"])
def test_addition_scores_the_joint_problem_of_class_partition_tasks(regime):
    """Parts of one task (TAK Sec. F.7) are also scored together, all their classes at once, with the
    joint problem's own α chosen on its validation split: as evaluating the joint task directly."""
    bb = ToyBackbone()
    g = torch.Generator().manual_seed(11)
    xs, ys = torch.randn(150, 7, generator=g, dtype=torch.float64), torch.randint(7, (150,), generator=g)
    examples = [(x, int(y)) for x, y in zip(xs, ys)]
    parent = Task("parent", [f"c{i}" for i in range(7)], "image", ["{}"],
                  {"train": lambda: examples[:50], "val": lambda: examples[50:100], "test": lambda: examples[100:]})
    parts = partition_classes(parent, 3)
    tasks = [parts[2], toy_task("other", n=40, seed=4), parts[0]]  # a task of its own between two parts
    tvs = [_task_vector(bb, 0.5, seed=s, regime=regime) for s in (6, 7, 8)]
    alphas = [0.0, 0.5, 1.0, 1.5]
    result = task_addition(bb, tvs, tasks, alphas=alphas)
    joint = joint_task([parts[2], parts[0]])
    assert set(result.joint) == {"parent-joint"} and set(result.alpha1["per_task"]) == {t.name for t in tasks}
    found = result.joint["parent-joint"]
    assert found["parts"] == ["parent-part2of3", "parent-part0of3"] and found["classes"] == len(joint.classes) == 5
    summed = TaskVector({k: sum(tv.tensors[k] for tv in tvs) for k in tvs[0].tensors}, tvs[0].meta)
    for a in alphas:
        assert found["val_curve"][a] == pytest.approx(accuracy(bb, apply(bb, summed, a), joint, "val"))
    best = max(alphas, key=lambda a: (found["val_curve"][a], -abs(a - 1)))
    assert found["best"]["alpha"] == best
    assert found["best"]["acc"] == pytest.approx(accuracy(bb, apply(bb, summed, best), joint, "test"))
    assert found["alpha1"] == pytest.approx(accuracy(bb, apply(bb, summed, 1.0), joint, "test"))
    assert task_addition(bb, tvs[:2], tasks[:2], alphas=alphas).joint == {}  # one part: no joint problem


def test_addition_with_a_post_hoc_merge_evaluates_that_merge():
    from tak.arithmetic.merges import ties
    bb = ToyBackbone()
    tasks = [toy_task("t1", n=40, seed=4), toy_task("t2", n=40, classes=4, seed=5)]
    tvs = [_task_vector(bb, 0.5, seed=6, task="t1"), _task_vector(bb, 0.5, seed=7, task="t2")]
    result = task_addition(bb, tvs, tasks, alphas=[0.5, 1.0], merge="ties", merge_options={"k": 0.3})
    merged = apply(bb, TaskVector(ties([tv.tensors for tv in tvs], k=0.3), tvs[0].meta), 1.0)
    for t in tasks:
        assert result.alpha1["per_task"][t.name] == pytest.approx(accuracy(bb, merged, t, "test"))


def test_a_merge_of_linear_and_nonlinear_task_vectors_is_not_evaluated():
    from tak.arithmetic.compose import combine
    bb = ToyBackbone()
    linear = _task_vector(bb, 0.5, seed=6)
    linear = TaskVector(linear.tensors, {**linear.meta, "regime": "linear", "task": "other"})
    mixed = combine([_task_vector(bb, 0.5, seed=7), linear], allow_mixed_regimes=True)
    assert mixed.regime is None and mixed.meta["mixed_regimes"] == ["linear", "nonlinear"]
    with pytest.raises(ValueError, match="neither the model nor its linearization evaluates it"):
        apply(bb, mixed)


def test_combine_adds_in_the_task_vectors_precision_with_any_real_alpha():
    """Σ α_t τ_t: float64 task vectors are added in float64 (fp32 would lose a 1e-9 difference), lower
    precisions in fp32 and returned in their own dtype; α may be any real scalar (numpy, 0-d tensor)."""
    import numpy as np
    from tak.arithmetic.compose import combine
    meta = {"regime": "linear", "base_model": "m", "fingerprint": "f"}
    a = TaskVector({"w": torch.tensor([1 + 1e-9], dtype=torch.float64), "h": torch.tensor([0.5], dtype=torch.bfloat16)},
                   {**meta, "task": "a"})
    b = TaskVector({"w": torch.tensor([1.0], dtype=torch.float64), "h": torch.tensor([0.25], dtype=torch.bfloat16)},
                   {**meta, "task": "b"})
    diff = combine([a, b], [1, -1])
    assert diff.tensors["w"].dtype == torch.float64 and diff.tensors["w"].item() == pytest.approx(1e-9, rel=1e-6)
    assert diff.tensors["h"].dtype == torch.bfloat16 and diff.tensors["h"].item() == 0.25
    for alpha in (np.float32(0.5), torch.tensor(0.5), 0.5):
        merged = combine([a, b], alpha)
        assert merged.tensors["h"].item() == 0.375 and merged.meta["alphas"] == [0.5] * 2


def test_features_run_the_model_in_eval_mode_and_give_its_train_mode_back():
    """``evaluation.features`` evaluates a model in train mode without dropout, in batches, then leaves it training."""
    from torch import nn
    from tak.evaluation import features
    bb = ToyBackbone()
    model = nn.Sequential(nn.Dropout(0.5), bb.model).train()
    examples = toy_task(n=13).split("train")
    feats, labels = features(bb, model, examples, batch_size=5)
    with torch.no_grad():
        expected = bb.model(torch.stack([x for x, _ in examples]))
    assert model.training and model[0].training
    assert feats.dtype == torch.float32 and torch.allclose(feats, expected.float(), rtol=1e-6, atol=1e-6)
    assert labels.tolist() == [y for _, y in examples]
