"""tak.train end to end: every method on MiniLM (2 steps, a tiny config), checkpoints and resume,
config changes and NaN refused, task-vector files checked, batches per (seed, step), and a 2-process
gloo run equal to a 1-process one (a deterministic toy backbone registered by name)."""
import copy
import dataclasses
import json
import os
import re
import signal
import socket
import time
import warnings
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

import tak
from tak.arithmetic.compose import apply, check_backbone, combine
from tak.backbones import GenericBackbone, Head, list_backbones, register_backbone
from tak.data import Task, list_tasks, register_task
from tak.io import read, write
from tak.methods import METHODS, Objective
from tak.task_vector import TaskVector, check_compatible
from tak.training import TrainConfig, checkpoint, loop
from tak.training.loop import batch_indices

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

TRAINABLE = "encoder.layer.5.attention.*"
LINEAR_METHODS = {"linear", "tak", "diag_ggn", "tau_jp"}
TEACHER_METHODS = {"delta", "delta_no_ekfac", "delta_lora"}


def tiny(out, method="nonlinear", **overrides) -> TrainConfig:
    """MiniLM, 40 training examples of 16 tokens, the last layer trained: about a second per run."""
    values = dict(method=method, task="rotten_tomatoes", tasks=["rotten_tomatoes", "20news-part0"],
                  reference=["subjectivity"], out=str(out), steps=2, batch_size=4, max_length=16, max_train=40,
                  max_test=8, factor_examples=4, trainable=TRAINABLE, progress=False, lr=1e-4, eval_batch_size=64)
    return TrainConfig(**{**values, **overrides})


@pytest.fixture(scope="module")
def shared_out(tmp_path_factory):
    """One output folder, so one factor cache, for the module's MiniLM runs (the factors are fitted for
    the trained layers only: those of layer 5's attention here)."""
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def trained(shared_out):
    """{regime: TrainResult} of a nonlinear and a linear run."""
    return {"nonlinear": tak.train(tiny(shared_out, "nonlinear")), "linear": tak.train(tiny(shared_out, "linear"))}


def minilm(config):
    """The backbone ``train`` used for ``config`` (its per-process cache)."""
    return loop._backbone(config, torch.device("cpu"))


# --- every method ------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_writes_a_loadable_task_vector(method, shared_out):
    config = tiny(shared_out, method)
    result = tak.train(config)
    run_dir = Path(shared_out) / method / "rotten_tomatoes"
    assert result.path == run_dir / "task_vector.safetensors"
    fingerprint = minilm(config).fingerprint
    tv = TaskVector.load(result.path, fingerprint=fingerprint)

    meta = tv.meta
    assert meta["base_model"] == "minilm" and meta["fingerprint"] == fingerprint
    assert meta["method"] == method and meta["task"] == "rotten_tomatoes" and meta["seed"] == 0
    assert meta["regime"] == ("linear" if method in LINEAR_METHODS else "nonlinear")
    assert meta["trainable"] == TRAINABLE and meta["data_root"] is None  # tak eval reads the data from there
    assert meta["hparams"] == {**METHODS[method].defaults, **METHODS[method].text_defaults, "lr": 1e-4}  # MiniLM: text
    assert set(meta["metrics"]) >= {"val", "test"} and all(0 <= meta["metrics"][k] <= 100 for k in ("val", "test"))
    assert meta["metrics"] == json.loads((run_dir / "metrics.json").read_text())
    assert TrainConfig.from_yaml(run_dir / "config.yaml") == config

    assert meta["unpenalized"] == []  # layer 5's attention: linear layers and a LayerNorm, all with curvature
    assert tv.tensors and set(tv.tensors) == set(result.task_vector.tensors)
    assert all(k.startswith("encoder.layer.5.attention.") for k in tv.tensors)
    assert all(torch.equal(v, result.task_vector.tensors[k]) for k, v in tv.tensors.items())
    assert any(v.abs().sum() > 0 for v in tv.tensors.values()), "two steps of AdamW moved nothing"
    if METHODS[method].student == "lora":
        assert all(k.endswith(".weight") for k in tv.tensors)

    teacher_path = run_dir / "teacher_task_vector.safetensors"
    if method in TEACHER_METHODS:
        assert "teacher_test" in meta["metrics"]
        teacher = TaskVector.load(teacher_path, fingerprint=fingerprint)
        assert teacher.regime == "linear" and teacher.meta["role"] == "teacher" and teacher.task == "rotten_tomatoes"
        assert any(v.abs().sum() > 0 for v in teacher.tensors.values())
    else:
        assert not teacher_path.exists()


# --- checkpoints --------------------------------------------------------------------------------------

class Killed(Exception):
    """Stands for the process being killed."""


@pytest.mark.parametrize("method", ["nonlinear", "tak", "delta", "delta_lora"])
def test_killed_run_resumes_from_its_checkpoint_to_the_same_task_vector(tmp_path, monkeypatch, method):
    """Bit-equal to an unbroken run; the curvature methods' resumed run reads the factors the killed one cached,
    the unbroken run uses the factors it fitted."""
    assert minilm(tiny(tmp_path)).model.config.hidden_dropout_prob > 0  # train mode is random: the RNG must resume
    reference = tak.train(tiny(tmp_path / "whole", method, steps=4, checkpoint_every=2))

    config = tiny(tmp_path / "killed", method, steps=4, checkpoint_every=2)
    ckpt = config.run_dir() / "checkpoint.safetensors"

    def dies_at_step_2(n, batch_size, seed, step, rank=0, world=1):
        if step == 2:
            raise Killed
        return batch_indices(n, batch_size, seed, step, rank, world)

    monkeypatch.setattr(loop, "batch_indices", dies_at_step_2)
    with pytest.raises(Killed):
        tak.train(config)
    assert read(ckpt)[1]["step"] == 2
    assert not (config.run_dir() / "task_vector.safetensors").exists()

    # "a new process": a fresh backbone (the per-process cache emptied), another global RNG state,
    # and nothing of the first run but its files
    monkeypatch.setattr(loop, "_CACHE", {})
    torch.manual_seed(1234)
    steps = []

    def records(n, batch_size, seed, step, rank=0, world=1):
        steps.append(step)
        return batch_indices(n, batch_size, seed, step, rank, world)

    monkeypatch.setattr(loop, "batch_indices", records)
    resumed = tak.train(config)
    assert steps == [2, 3], "the second run must start from the checkpoint's step"
    assert read(ckpt)[1]["step"] == 4
    ref, got = reference.task_vector.tensors, TaskVector.load(resumed.path).tensors
    assert set(ref) == set(got)
    for k in ref:
        assert torch.equal(ref[k], got[k]), k


@pytest.fixture
def sigterm_raises():
    """SIGTERM raises ``Killed`` here (its default would end pytest); put back afterwards."""
    def killed(signum, frame):
        raise Killed
    previous = signal.signal(signal.SIGTERM, killed)
    yield killed
    signal.signal(signal.SIGTERM, previous)


def _signals_at_step(monkeypatch, at: int, signals: list) -> None:
    """The process receives ``signals`` while step ``at`` is under way (as its batch is drawn)."""
    def signalled(n, batch_size, seed, step, rank=0, world=1):
        if step == at:
            for sig in signals:
                signal.raise_signal(sig)
        return batch_indices(n, batch_size, seed, step, rank, world)
    monkeypatch.setattr(loop, "batch_indices", signalled)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_the_run_after_its_step_with_a_checkpoint_it_resumes_from(tmp_path, monkeypatch, sig, capsys,
                                                                                 sigterm_raises):
    reference = tak.train(tiny(tmp_path / "whole", steps=4))
    config = tiny(tmp_path / "stopped", steps=4, checkpoint_every=100, progress=True)
    ckpt = config.run_dir() / "checkpoint.safetensors"
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    _signals_at_step(monkeypatch, 1, [sig])
    with pytest.raises(tak.training.TrainingInterrupted, match=f"stopped by a signal at step 2 of 4; its checkpoint "
                                                               f"is {re.escape(str(ckpt))}: start the same run again"):
        tak.train(config)
    assert f"{signal.Signals(sig).name}: stopping once this step is done" in capsys.readouterr().err
    assert {s: signal.getsignal(s) for s in handlers} == handlers, "the handlers must be put back"
    assert read(ckpt)[1]["step"] == 2  # the step under way was done, and its state written
    assert not (config.run_dir() / "task_vector.safetensors").exists()

    monkeypatch.setattr(loop, "batch_indices", batch_indices)
    resumed = tak.train(config)
    ref, got = reference.task_vector.tensors, resumed.task_vector.tensors
    assert set(ref) == set(got) and all(torch.equal(ref[k], got[k]) for k in ref)


def test_a_second_signal_stops_at_once_and_an_ignored_one_is_ignored(tmp_path, monkeypatch, sigterm_raises):
    config = tiny(tmp_path, steps=4, checkpoint_every=100)
    _signals_at_step(monkeypatch, 1, [signal.SIGINT, signal.SIGINT])
    with pytest.raises(KeyboardInterrupt) as e:
        tak.train(config)
    assert not isinstance(e.value, tak.training.TrainingInterrupted)
    assert not (config.run_dir() / "checkpoint.safetensors").exists()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler

    _signals_at_step(monkeypatch, 1, [signal.SIGTERM, signal.SIGTERM])
    with pytest.raises(Killed):  # the handler the process had gets the second
        tak.train(config)
    assert signal.getsignal(signal.SIGTERM) is sigterm_raises

    _signals_at_step(monkeypatch, 1, [signal.SIGTERM])
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # as under nohup: a signal the process ignores changes nothing
    result = tak.train(config)
    assert result.path.exists() and read(config.run_dir() / "checkpoint.safetensors")[1]["step"] == 4


def test_resuming_with_another_config_is_refused_naming_the_key(tmp_path, monkeypatch):
    first = tak.train(tiny(tmp_path, steps=1))
    with pytest.raises(ValueError, match=r"another config \(lr: checkpoint 0\.0001, now 0\.0002\)"):
        tak.train(tiny(tmp_path, steps=1, lr=2e-4))
    with pytest.raises(ValueError, match=r"max_train: checkpoint 40, now 32"):
        tak.train(tiny(tmp_path, steps=1, max_train=32))
    monkeypatch.setattr(loop, "build_objective", lambda *a: pytest.fail("fitted factors for a run it refuses"))
    with pytest.raises(ValueError, match=r"factor_examples: checkpoint 4, now 8"):
        tak.train(tiny(tmp_path, steps=1, factor_examples=8))
    monkeypatch.undo()
    # the keys that do not change the result may differ, and the run folder and the pattern may be spelled otherwise
    monkeypatch.chdir(tmp_path)
    again = tak.train(tiny(".", steps=1, eval_batch_size=3, checkpoint_every=7, trainable=[TRAINABLE]))
    # resumed at the end, no step left to run: it reports what the training did, not an empty run
    assert first.metrics["final_loss_terms"] and again.metrics["final_loss_terms"] == first.metrics["final_loss_terms"]
    assert again.metrics["train_seconds"] >= first.metrics["train_seconds"] > 0


def test_config_values_are_numbers_of_their_kind_or_refused_by_name(tmp_path):
    """YAML reads 1e-4 as a string: numbers become their field's kind; what is not one is refused by key;
    a tuple of patterns is a list (as a checkpoint stores it)."""
    (tmp_path / "c.yaml").write_text("lr: 1e-4\nsteps: '3'\nbeta: 20\ncheckpoint_every: 1e3\n")
    config = TrainConfig.from_yaml(tmp_path / "c.yaml")
    assert (config.lr, config.steps, config.beta) == (1e-4, 3, 20.0) and isinstance(config.beta, float)
    assert config.checkpoint_every == 1000 and TrainConfig(seed=2**32 - 1).seed == 2**32 - 1
    assert TrainConfig(trainable=("a.*", "b.*")).trainable == ["a.*", "b.*"]
    (tmp_path / "b.yaml").write_text("tensorboard: 'false'\nuniversal: 'no'\nprogress: 1\n")
    config = TrainConfig.from_yaml(tmp_path / "b.yaml")
    assert (config.tensorboard, config.universal, config.progress) == (False, False, True)
    assert TrainConfig(out=tmp_path, data_root=tmp_path).out == str(tmp_path)  # a Path is its string (JSON)
    assert TrainConfig(layer_weights={"enc.*": "0.5"}).layer_weights == {"enc.*": 0.5}
    for values, match in [({"lr": "fast"}, "lr must be a finite number, got 'fast'"),
                          ({"steps": 2.5}, "steps must be an integer, got 2.5"),
                          ({"seed": True}, "seed must be an integer, got True"),
                          ({"seed": 2**32}, r"seed must be in \[0, 2\*\*32\), got 4294967296"),
                          ({"seed": -1}, r"seed must be in \[0, 2\*\*32\), got -1"),
                          ({"seed": None}, "seed must be an integer, got None"),
                          ({"warmup_steps": None}, "warmup_steps must be an integer, got None"),
                          ({"warmup_steps": 11, "steps": 10}, "warmup_steps=11 exceeds steps=10: the learning rate "
                                                              "would never reach lr"),
                          ({"layer_weights": {"*": -1}}, r"layer_weights must be ≥ 0, got \{'\*': -1.0\}"),
                          ({"backbone_options": {"cache": object()}}, r"backbone_options\['cache'\]=<object .* cannot be "
                                                                     "recorded as JSON"),
                          ({"lora_rank": 0}, "lora_rank must be ≥ 1, got 0"),
                          ({"beta": -1}, "beta must be ≥ 0, got -1.0"),
                          ({"lr": float("nan")}, "lr must be a finite number, got nan"),
                          ({"beta": "inf"}, "beta must be a finite number, got 'inf'"),
                          ({"max_test": 0}, "max_test must be ≥ 1, got 0"),
                          ({"eval_batch_size": 0}, "eval_batch_size must be ≥ 1, got 0"),
                          ({"tensorboard": "maybe"}, "tensorboard must be true or false, got 'maybe'"),
                          ({"method": 5}, "method must be a string, got 5"),
                          ({"trainable": 5}, "trainable must be None, 'all', 'attention' or a list"),
                          ({"layer_weights": 3}, r"layer_weights must be a mapping \{layer pattern: weight\}, got 3"),
                          ({"layer_weights": {"a": "x"}}, r"layer_weights\['a'\] must be a finite number, got 'x'"),
                          ({"compress": "blockdiag:0"}, r"compress='blockdiag:0': expected 'int8', 'eigen:<rank>'"),
                          ({"device": "gpu0"}, "TrainConfig.device='gpu0': ")]:
        with pytest.raises(ValueError, match=match):
            TrainConfig(**values)


def test_every_compression_of_tak_sec_f6_is_a_config_value():
    """int8, truncated eigendecompositions by rank or by the fraction of the rank kept, block-diagonal, magnitude
    pruning: each spelling gives tak.compress's arguments; fractions outside (0, 1) are refused."""
    from tak.training.config import parse_compression
    assert [parse_compression(s) for s in ("int8", "eigen:3", "eigen:0.25", "blockdiag:4", "prune:0.3")] == [
        {"method": "int8"}, {"method": "eigen", "rank": 3}, {"method": "eigen", "fraction": 0.25},
        {"method": "blockdiag", "k": 4}, {"method": "prune", "keep": 0.3}]
    for spec in ("prune:1", "prune:0", "eigen:1.5", "eigen:-0.5", "prune:x", "blockdiag:0.5", "int8:2"):
        with pytest.raises(ValueError, match=f"compress={spec!r}: expected"):
            parse_compression(spec)


@pytest.mark.parametrize("spec", ["eigen:0.5", "prune:0.3"])
def test_tak_trains_with_pruned_or_fraction_truncated_factors(shared_out, spec):
    result = tak.train(tiny(shared_out / spec.replace(":", "-"), "tak", compress=spec))
    assert result.task_vector.meta["config"]["compress"] == spec and result.metrics["test"] >= 0


def test_paper_defaults_by_modality():
    """TAK App. E / DELTA App. B: language task vectors at lr 3e-4, weight decay 0.01, KFAC β 20, DELTA γ 0.01."""
    from tak.methods import hyperparameter_defaults
    assert hyperparameter_defaults(METHODS["tak"], ("image",)) == METHODS["tak"].defaults
    assert hyperparameter_defaults(METHODS["tak"], ("text",)) == {"lr": 3e-4, "weight_decay": 0.01, "beta": 20.0,
                                                                   "last_layer_weight": 1.0}
    delta = hyperparameter_defaults(METHODS["delta"], ("text", "text-pair"))
    assert (delta["beta"], delta["beta_teacher"], delta["gamma"], delta["lr"]) == (20.0, 20.0, 0.01, 3e-4)
    assert hyperparameter_defaults(METHODS["diag_ggn"], ("text-pair",))["beta"] == 0.1
    lora = hyperparameter_defaults(METHODS["delta_lora"], ("image",))  # the fully fine-tuned teacher at DELTA's lr
    assert (lora["lr"], lora["lora_lr"], lora["weight_decay"]) == (1e-5, 3e-4, 0.1)


def test_delta_lora_trains_its_teacher_at_lr_and_its_lora_student_at_lora_lr(tmp_path):
    """lr = 0 leaves a τ at its zero start, weight decay included (AdamW decays by lr · wd)."""
    def taus(**lrs):
        result = tak.train(tiny(tmp_path / "-".join(lrs), "delta_lora", **lrs))
        teacher = TaskVector.load(result.path.with_name("teacher_task_vector.safetensors"))
        return [any(v.any() for v in tv.tensors.values()) for tv in (result.task_vector, teacher)]
    assert taus(lora_lr=0.0) == [False, True]  # student still, teacher moved
    assert taus(lr=0.0) == [True, False]


def test_the_kfac_penalty_weight_follows_the_clip_architecture():
    """TAK Sec. E.1: β = 100 for ViT-B/32, 500 for ViT-B/16, 2000 for ViT-L/14; DELTA keeps 500 on every ViT."""
    from tak.methods import hyperparameter_defaults
    betas = {arch: hyperparameter_defaults(METHODS[m], ("image",), f"clip:{arch}")["beta"]
             for m in ("tak", "attn_only_tak") for arch in ("ViT-B-32", "ViT-B-16-quickgelu", "ViT-L-14-336")}
    assert betas == {"ViT-B-32": 100.0, "ViT-B-16-quickgelu": 500.0, "ViT-L-14-336": 2000.0}
    assert hyperparameter_defaults(METHODS["delta"], ("image",), "clip:ViT-L-14")["beta"] == 500.0
    assert hyperparameter_defaults(METHODS["diag_ggn"], ("image",), "clip:ViT-L-14")["beta"] == 0.1
    assert hyperparameter_defaults(METHODS["tak"], ("text",), "clip:ViT-L-14")["beta"] == 20.0
    config = TrainConfig(method="tak", backbone="clip:ViT-L/14")  # open_clip's name, as load_clip spells it too
    assert config.backbone == "clip:ViT-L-14" and hyperparameter_defaults(
        METHODS["tak"], ("image",), config.backbone)["beta"] == 2000.0
    assert TrainConfig(backbone="clip:hf-hub:org/ViT-B/16").backbone == "clip:hf-hub:org/ViT-B/16"  # a repository
    named = {spec: hyperparameter_defaults(METHODS["tak"], ("image",), spec)["beta"] for spec in (
        "hf-clip:openai/clip-vit-base-patch32", "hf-clip:openai/clip-vit-base-patch16",
        "hf-clip:openai/clip-vit-large-patch14-336", "clip:hf-hub:laion/CLIP-ViT-B-16-laion2B-s34B-b88K",
        "hf-clip:google/siglip-base-patch16-224", "hf-clip:/models/mine")}
    assert list(named.values()) == [100.0, 500.0, 2000.0, 500.0, 100.0, 100.0]  # the last two: B/32's, with a warning


def test_values_a_method_does_not_use_are_refused_before_anything_loads(tmp_path, monkeypatch):
    monkeypatch.setattr(loop, "_backbone", lambda *a: pytest.fail("loaded a backbone"))
    for method, values, match in [
            ("nonlinear", {"beta": 5.0, "gamma": 2.0}, r"beta=5.0, gamma=2.0: method 'nonlinear' does not use them"),
            ("tak", {"lora_rank": 4}, r"lora_rank=4: method 'tak' does not use it \(its hyperparameters: \['beta', "),
            ("delta", {"lora_rank": 4}, "lora_rank=4: method 'delta' does not use it"),
            ("delta", {"lora_lr": 1e-3}, "lora_lr=0.001: method 'delta' does not use it"),
            ("delta_no_ekfac", {"beta": 50.0}, "beta=50.0: method 'delta_no_ekfac' does not use it"),
            ("delta_no_teacher", {"gamma": 3.0}, "gamma=3.0: method 'delta_no_teacher' does not use it")]:
        with pytest.raises(ValueError, match=match):
            tak.train(tiny(tmp_path, method, **values))
    assert TrainConfig(method="delta", last_layer_weight=0.5).hyperparameters(METHODS["delta"].defaults)[
        "last_layer_weight"] == 0.5  # DELTA's EK-FAC penalty weighs its layers too, so a resume compares it


def test_curvature_options_of_a_method_without_curvature_are_refused(tmp_path):
    for method, values in [("nonlinear", {"compress": "int8"}), ("tau_jp", {"factors": "per_task", "universal": True}),
                           ("tau_jp", {"mc_samples": 4})]:
        with pytest.raises(ValueError, match=f"method '{method}' has no curvature penalty, so .* would do nothing"):
            tak.train(tiny(tmp_path, method, **values))
    for method in ("nonlinear", "delta_no_ekfac"):
        with pytest.raises(ValueError, match=f"method '{method}' has no penalty, so penalty_every=5 would do nothing"):
            tak.train(tiny(tmp_path, method, penalty_every=5))


def test_tasks_a_method_does_not_read_need_no_data(tmp_path, monkeypatch):
    """nonlinear reads neither the other tasks nor the reference set, tak (not universal) not the reference set:
    their data need not be on this machine."""
    loaded = []
    task = loop._task
    monkeypatch.setattr(loop, "_task", lambda name, config: loaded.append(name) or task(name, config))
    tak.train(tiny(tmp_path / "n", "nonlinear", steps=1))
    tak.train(tiny(tmp_path / "t", "tak", steps=1))
    assert loaded == ["rotten_tomatoes", "rotten_tomatoes", "20news-part0"]
    with pytest.raises(ValueError, match=r"TrainConfig.tasks: \['20news-part0of4'\] is the trained task '20news-part0' "
                                         "under another name"):
        tak.train(tiny(tmp_path / "a", "tak", task="20news-part0", tasks=["20news-part0", "20news-part0of4"]))


def test_tasks_whose_inputs_the_backbone_does_not_take_are_refused(tmp_path):
    for key, method in (("tasks", "tak"), ("reference", "delta")):
        with pytest.raises(ValueError, match=rf"TrainConfig.{key}: backbone 'minilm' takes .* not those of "
                                             r"\['digits \(image\)'\]"):
            tak.train(tiny(tmp_path, method, **{key: ["rotten_tomatoes", "digits"]}))


def test_a_task_listed_twice_and_fields_set_after_the_config_was_made_are_refused(tmp_path):
    for key in ("tasks", "reference"):
        with pytest.raises(ValueError, match=rf"TrainConfig.{key}: \['a'\] listed more than once"):
            TrainConfig(**{key: ["a", "b", "a"]})
    config = tiny(tmp_path)
    config.steps = 0  # tak.train checks the fields again
    with pytest.raises(ValueError, match="steps must be ≥ 1, got 0"):
        tak.train(config)


def test_a_beta_set_alone_sets_the_teachers_too_and_the_paper_defaults_fill_the_rest():
    delta = METHODS["delta"].defaults
    assert TrainConfig().hyperparameters(delta) == delta
    assert TrainConfig(beta=7).hyperparameters(delta) == {**delta, "beta": 7.0, "beta_teacher": 7.0}
    assert TrainConfig(beta=7, beta_teacher=3).hyperparameters(delta) == {**delta, "beta": 7.0, "beta_teacher": 3.0}
    assert "beta_teacher" not in TrainConfig(beta=7).hyperparameters(METHODS["tak"].defaults)


def test_nan_loss_stops_naming_the_step_and_the_last_good_checkpoint(tmp_path, monkeypatch):
    forward, nan_steps = Objective.forward, {3}

    def nan_at(self, batch, labels, step):
        loss, terms = forward(self, batch, labels, step)
        return (loss * float("nan") if step in nan_steps else loss), terms

    monkeypatch.setattr(Objective, "forward", nan_at)
    config = tiny(tmp_path, steps=5, checkpoint_every=2)
    ckpt = config.run_dir() / "checkpoint.safetensors"
    with pytest.raises(FloatingPointError, match="loss is nan at step 3") as e:
        tak.train(config)
    assert f"the last good checkpoint is {ckpt}" in str(e.value)
    assert read(ckpt)[1]["step"] == 2
    assert not (config.run_dir() / "task_vector.safetensors").exists()

    nan_steps.add(0)
    with pytest.raises(FloatingPointError, match="at step 0 .*no checkpoint was written yet"):
        tak.train(tiny(tmp_path / "other", steps=5, checkpoint_every=2))

    class NanGradient(torch.autograd.Function):
        """The loss as it is, its gradient NaN (as an overflow in a half-precision backward gives)."""
        forward = staticmethod(lambda ctx, x: x.clone())
        backward = staticmethod(lambda ctx, g: g * float("nan"))

    def nan_gradient_at(self, batch, labels, step):
        loss, terms = forward(self, batch, labels, step)
        return (NanGradient.apply(loss) if step == 3 else loss), terms

    monkeypatch.setattr(Objective, "forward", nan_gradient_at)
    config = tiny(tmp_path / "gradient", steps=5, checkpoint_every=2)
    with pytest.raises(FloatingPointError, match=r"the gradients' norm is nan at step 3 \(terms \{'task': [0-9.]+\}\)"):
        tak.train(config)
    assert read(config.run_dir() / "checkpoint.safetensors")[1]["step"] == 2


# --- task-vector files and their checks ---------------------------------------------------------------

def test_task_vector_of_another_architecture_is_refused(trained):
    path = trained["nonlinear"].path
    with pytest.raises(ValueError, match=r"task vector of architecture '[0-9a-f]{16}' \(base model 'minilm'\); "
                                         r"the model here is '0000000000000000'"):
        TaskVector.load(path, fingerprint="0" * 16)
    tv = TaskVector.load(path)
    check_backbone(minilm(tiny(path)), [tv])  # its own backbone: accepted
    toy = toy_backbone()
    with pytest.raises(ValueError, match=r"task vector 'rotten_tomatoes' \(base model 'minilm'.*does not belong to "
                                         r"backbone 'toy-mlp'"):
        check_backbone(toy, [tv])
    with pytest.raises(ValueError, match="does not belong to backbone 'toy-mlp'"):
        apply(toy, tv)
    other_weights = TaskVector(tv.tensors, {**tv.meta, "source": {**tv.meta["source"], "pretrained": "other-tag"}})
    with pytest.raises(ValueError, match="trained on 'minilm' with pretrained='other-tag'"):
        check_backbone(minilm(tiny(path)), [other_weights])
    renamed = TaskVector(tv.tensors, {**tv.meta, "base_model": "hf:elsewhere"})  # same architecture, other model
    with pytest.raises(ValueError, match="trained on 'hf:elsewhere'"):
        check_backbone(minilm(tiny(path)), [renamed])


def test_check_compatible_refuses_mixed_regimes_base_models_and_layers(trained):
    nonlinear, linear = (TaskVector.load(trained[r].path) for r in ("nonlinear", "linear"))
    check_compatible([nonlinear, nonlinear.scaled(2.0)])
    with pytest.raises(ValueError, match=r"differ in regime \(rotten_tomatoes: 'nonlinear', rotten_tomatoes: "
                                         r"'linear'\); to merge them on purpose: allow_mixed_regimes=True"):
        check_compatible([nonlinear, linear])
    check_compatible([nonlinear, linear], allow_mixed_regimes=True)
    with pytest.raises(ValueError, match="differ in regime"):
        combine([nonlinear, linear])

    other_model = TaskVector(dict(nonlinear.tensors), {**nonlinear.meta, "base_model": "hf:bert-base-uncased"})
    with pytest.raises(ValueError, match=r"differ in base_model \(rotten_tomatoes: 'minilm', rotten_tomatoes: "
                                         r"'hf:bert-base-uncased'\)"):
        check_compatible([nonlinear, other_model])
    other_arch = TaskVector(dict(nonlinear.tensors), {**nonlinear.meta, "fingerprint": "f" * 16})
    with pytest.raises(ValueError, match="differ in fingerprint"):
        check_compatible([nonlinear, other_arch])
    # one architecture, but other weights or inputs: the sum belongs to no backbone
    other_weights = TaskVector(dict(nonlinear.tensors), {**nonlinear.meta, "source": {"pretrained": "/other/minilm"}})
    with pytest.raises(ValueError, match=r"differ in pretrained \(rotten_tomatoes: None, rotten_tomatoes: "
                                         r"'/other/minilm'\): they were trained on different backbones"):
        combine([nonlinear, other_weights])
    other_theta0 = TaskVector(dict(nonlinear.tensors), {**nonlinear.meta, "weights": {
        **nonlinear.meta["weights"], "digest": "0" * 16}})
    with pytest.raises(ValueError, match=r"differ in weights \(rotten_tomatoes: \{'digest': '[0-9a-f]{16}'.*"
                                         r"rotten_tomatoes: \{'digest': '0000000000000000'"):
        combine([nonlinear, other_theta0])
    with pytest.raises(ValueError, match=r"differ in max_length \(rotten_tomatoes: 16, rotten_tomatoes: 64\)"):
        check_compatible([nonlinear, TaskVector(dict(nonlinear.tensors), {**nonlinear.meta, "max_length": 64})])
    unrecorded = TaskVector(dict(nonlinear.tensors), {k: v for k, v in nonlinear.meta.items() if k != "max_length"})
    summed = combine([nonlinear, unrecorded])  # a file of an earlier tak, without the key, is taken as it is
    assert (summed.meta["max_length"], summed.meta["backbone_options"]) == (16, {})

    name = next(k for k, v in sorted(nonlinear.tensors.items()) if v.dim() == 2)
    fewer = TaskVector({k: v for k, v in nonlinear.tensors.items() if k != name}, dict(nonlinear.meta))
    with pytest.raises(ValueError, match=rf"hold different layers; in one only: \['{name}'\]"):
        check_compatible([nonlinear, fewer])
    reshaped = TaskVector({**nonlinear.tensors, name: nonlinear.tensors[name].reshape(-1)}, dict(nonlinear.meta))
    with pytest.raises(ValueError, match=rf"differ in shape at \['{name}'\]"):
        check_compatible([nonlinear, reshaped])


def test_check_compatible_refuses_a_base_model_recorded_in_one_file_only():
    """base_model must agree even where a file lacks it; max_length and the like only where both record them."""
    tau = {"w": torch.zeros(2, 3)}
    meta = {"base_model": "minilm", "fingerprint": "a" * 16, "regime": "nonlinear", "task": "a", "max_length": 16}
    recorded = TaskVector(dict(tau), meta)
    no_base = TaskVector(dict(tau), {**{k: v for k, v in meta.items() if k != "base_model"}, "task": "b"})
    with pytest.raises(ValueError, match=r"differ in base_model \(a: 'minilm', b: None\)"):
        check_compatible([recorded, no_base])
    check_compatible([recorded, TaskVector(dict(tau), {k: v for k, v in meta.items() if k != "max_length"})])


def test_corrupted_truncated_and_foreign_files_are_refused(trained, tmp_path):
    data = trained["linear"].path.read_bytes()
    flipped = bytearray(data)
    flipped[-3] ^= 0xFF  # a byte of the last tensor
    (tmp_path / "flipped.safetensors").write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match="do not match its checksum"):
        TaskVector.load(tmp_path / "flipped.safetensors")
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupted"):
        TaskVector.load(tmp_path / "cut.safetensors")
    checkpoint = trained["linear"].path.with_name("checkpoint.safetensors")
    with pytest.raises(ValueError, match="not a task vector file"):
        TaskVector.load(checkpoint)
    with pytest.raises(FileNotFoundError):
        TaskVector.load(tmp_path / "missing.safetensors")
    assert set(TaskVector.load(trained["linear"].path).tensors) == set(trained["linear"].task_vector.tensors)
    tv = trained["linear"].task_vector
    name = sorted(tv.tensors)[-1]
    TaskVector({**tv.tensors, name: tv.tensors[name].clone().fill_(float("nan"))}, tv.meta).save(tmp_path / "nan.safetensors")
    with pytest.raises(ValueError, match=rf"NaN or Inf entries in \['{name}'\]"):
        TaskVector.load(tmp_path / "nan.safetensors")


# --- batches ------------------------------------------------------------------------------------------

def test_batch_indices_depend_on_seed_and_step_only_and_ranks_partition_the_batch():
    n, batch = 23, 6  # 3 full batches per epoch, 5 examples never in an epoch's batches
    for seed in (0, 1):
        epoch = [batch_indices(n, batch, seed, step) for step in range(3)]
        flat = [i for b in epoch for i in b]
        assert all(len(b) == batch for b in epoch) and len(set(flat)) == 3 * batch and set(flat) <= set(range(n))
        assert batch_indices(n, batch, seed, 1) == epoch[1]  # a function of (seed, step): the same again
        assert batch_indices(n, batch, seed, 3) != epoch[0]  # next epoch: another permutation
        for world in (2, 3):
            for step in (0, 4):
                shards = [batch_indices(n, batch, seed, step, rank, world) for rank in range(world)]
                assert sorted(i for s in shards for i in s) == sorted(batch_indices(n, batch, seed, step))
                assert all(len(s) == batch // world for s in shards)
    assert batch_indices(n, batch, 0, 0) != batch_indices(n, batch, 1, 0)
    assert sorted(batch_indices(4, 10, 0, 5)) == [0, 1, 2, 3]  # batch larger than the data: all of it


def test_cosine_schedule_warms_up_from_its_first_step_and_anneals_to_zero(tmp_path, monkeypatch, toys):
    """Warm-up (step + 1) / warmup, so step 0 already trains, then 0.5 (1 + cos(π (step − warmup) / (total −
    warmup))); a run applies it to each step's learning rate."""
    import math
    want = {0: 0.25, 1: 0.5, 3: 1.0, 4: 1.0, 7: 0.5, 9: 0.5 * (1 + math.cos(5 * math.pi / 6)), 10: 0.0}
    for step, factor in want.items():
        assert loop.cosine_schedule(step, 10, 4) == pytest.approx(factor, abs=1e-15)
    assert loop.cosine_schedule(0, 10, 0) == 1.0
    factors, step = [], torch.optim.AdamW.step

    def spy(self, *args, **kwargs):
        factors.append([g["lr"] / g["base_lr"] for g in self.param_groups])
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", spy)
    tak.train(dataclasses.replace(toy_config(tmp_path, "nonlinear"), steps=3, warmup_steps=2))
    assert factors == [[0.5], [1.0], [1.0]]


def test_config_defaults_are_the_documented_ones():
    """TrainConfig's defaults: TAK on MiniLM, 2,000 steps at batch 128, factors merged from 256 examples with one probe
    each, checkpoints every 200 steps, 128 tokens, evaluation batches of 256, seed 0, paper hyperparameters (None),
    weight decay towards zero."""
    c = TrainConfig()
    assert (c.method, c.task, c.backbone, c.out) == ("tak", "rotten_tomatoes", "minilm", "runs")
    assert (c.steps, c.batch_size, c.warmup_steps, c.checkpoint_every, c.eval_batch_size) == (2000, 128, 0, 200, 256)
    assert (c.factors, c.factor_examples, c.mc_samples, c.penalty_every, c.compress) == ("merged", 256, 1, 1, None)
    assert (c.max_length, c.seed, c.max_train, c.max_test, c.device) == (128, 0, None, None, None)
    assert all(getattr(c, k) is None for k in ("lr", "weight_decay", "beta", "beta_teacher", "gamma",
                                               "last_layer_weight", "lora_rank", "lora_lr"))
    assert (c.tasks, c.reference, c.factor_files, c.layer_weights, c.backbone_options) == ([], [], [], {}, {})
    assert not (c.universal or c.offload_factors or c.tensorboard) and c.progress and c.trainable is None
    assert c.decay_to == "zero"


def test_adamw_takes_the_runs_weight_decay(tmp_path, monkeypatch, toys):
    """The optimizer decays with the run's weight_decay: the method's paper default (0.1), or the value the config sets."""
    decays, step = [], torch.optim.AdamW.step

    def spy(self, *args, **kwargs):
        decays.append([g["weight_decay"] for g in self.param_groups])
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", spy)
    tak.train(dataclasses.replace(toy_config(tmp_path / "default", "nonlinear"), steps=1))
    tak.train(dataclasses.replace(toy_config(tmp_path / "set", "nonlinear"), steps=1, weight_decay=0.37))
    assert decays == [[0.1], [0.37]]


@pytest.mark.parametrize("method, decay_to", [("linear", "zero"), ("linear", "pretrained"), ("nonlinear", "zero"),
                                             ("nonlinear", "pretrained")])
def test_weight_decay_pulls_theta_or_tau_to_zero_as_adamw_over_those_parameters(tmp_path, toys, method, decay_to):
    """decay_to="zero": τ of AdamW over θ (the papers' code, whose linearized model f(θ0) + J (θ − θ0) trains θ from
    θ0); "pretrained": of AdamW over τ, in both regimes. The toy's ``unused`` parameter gets no gradient: AdamW
    leaves it at θ0 (τ = 0) either way."""
    config = dataclasses.replace(toy_config(tmp_path, method), steps=4, weight_decay=0.3, decay_to=decay_to)
    got = tak.train(config).task_vector.tensors
    backbone, task = toy_backbone(), toy_task(None)
    theta0 = {n: p.detach().clone() for n, p in backbone.model.named_parameters()}
    trained = {n: nn.Parameter(t.clone() if decay_to == "zero" else torch.zeros_like(t)) for n, t in theta0.items()}

    def theta():
        return trained if decay_to == "zero" else {n: theta0[n] + t for n, t in trained.items()}

    def f(params, x):
        return torch.func.functional_call(backbone.model, params, (x,))

    def outputs(x):
        if method == "nonlinear":
            return f(theta(), x)
        out, jvp = torch.func.jvp(lambda params: f(params, x), (theta0,), ({n: t - theta0[n] for n, t in theta().items()},))
        return out + jvp

    optimizer = torch.optim.AdamW(trained.values(), lr=config.lr, weight_decay=config.weight_decay)
    examples = task.split("train")
    for step in range(config.steps):
        optimizer.param_groups[0]["lr"] = config.lr * loop.cosine_schedule(step, config.steps, 0)
        x, y = zip(*(examples[i] for i in batch_indices(len(examples), config.batch_size, config.seed, step)))
        loss = nn.functional.cross_entropy(backbone.head(task)(outputs(torch.stack(x))), torch.tensor(y))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    want = {n: (t - theta0[n]).detach() for n, t in theta().items()}
    assert got.keys() == want.keys() and not want["unused"].any()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-9, atol=1e-12)
    moved = dataclasses.replace(config, out=str(tmp_path / "other"),
                                decay_to="pretrained" if decay_to == "zero" else "zero")
    assert not torch.equal(tak.train(moved).task_vector.tensors["0.weight"], got["0.weight"])  # the setting matters


def test_16_bit_weights_whose_adamw_steps_round_away_are_warned_of(recwarn):
    """In bfloat16 an AdamW step of lr = 1e-5 (its first moves each weight by exactly lr) leaves unchanged every
    weight the warning counts: the share it names is the share that did not move. τ (zeros) rounds nothing."""
    backbone, task = toy_backbone(), toy_task(None)
    backbone.model.to(torch.bfloat16)

    def optimizer(method, lr):
        objective = Objective(tak.methods.get_method(method), backbone, backbone.head(task), {"lr": lr})
        return torch.optim.AdamW(objective.param_groups(), lr=lr, weight_decay=0.0)

    nonlinear = optimizer("nonlinear", 1e-5)
    with pytest.warns(UserWarning, match=r"(\d+)% of the trained weights \(bfloat16\) are so large that an AdamW step "
                      r"of the learning rate \(1e-05\) is under half their spacing") as caught:
        loop.warn_if_steps_round_away(nonlinear)
    share = int(re.search(r"(\d+)%", str(caught[0].message)).group(1))
    trained = nonlinear.param_groups[0]["params"]
    before = [w.detach().clone() for w in trained]
    for w in trained:
        w.grad = torch.randn_like(w)
    nonlinear.step()
    unchanged = sum((w == b).sum().item() for w, b in zip(trained, before)) / sum(w.numel() for w in trained)
    assert share > 50 and abs(100 * unchanged - share) <= 1
    recwarn.clear()
    loop.warn_if_steps_round_away(optimizer("nonlinear", 1e-2))  # steps large enough to land
    loop.warn_if_steps_round_away(optimizer("linear", 1e-5))  # τ = 0
    backbone.model.double()
    loop.warn_if_steps_round_away(optimizer("nonlinear", 1e-5))
    assert not [w for w in recwarn if "rounds back to the weight" in str(w.message)]


def test_a_run_warns_once_when_its_16_bit_tau_grows_into_sizes_whose_steps_round_away(tmp_path, monkeypatch, toys):
    """τ starts at 0, where every step lands; a bfloat16 linearized run asks again at every checkpoint, warns at the
    first where τ has grown (here: every step also scales τ by 10³) and not again; a run resumed with such τ warns at
    its start, a finished run started again does not."""
    config = dataclasses.replace(toy_config(tmp_path, "linear"), steps=5, backbone_options={"dtype": "bfloat16"})
    step = torch.optim.AdamW.step

    def growing(self, *args, **kwargs):
        step(self, *args, **kwargs)
        with torch.no_grad():
            for group in self.param_groups:
                for p in group["params"]:
                    p.mul_(1e3)

    def rounding_warnings(run):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            run()
        return [w for w in caught if "rounds back to the weight" in str(w.message)]

    monkeypatch.setattr(torch.optim.AdamW, "step", growing)
    checks = []
    monkeypatch.setattr(loop, "warn_if_steps_round_away", lambda o, check=loop.warn_if_steps_round_away:
                        checks.append(None) or check(o))
    assert len(rounding_warnings(lambda: tak.train(config))) == 1 and len(checks) == 2  # at step 0, at step 2
    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    assert not rounding_warnings(lambda: tak.train(config))  # finished
    ckpt = config.run_dir() / "checkpoint.safetensors"
    tensors, meta = read(ckpt)
    write(ckpt, tensors, {**meta, "step": 4})
    assert len(rounding_warnings(lambda: tak.train(config))) == 1


def test_the_matmul_precision_holds_for_the_run_and_the_processs_comes_back(tmp_path, monkeypatch, toys):
    """A run's steps and a factor fit see ``matmul_precision``; the process's setting is back afterwards, after a
    failure too; None leaves it alone; an unknown value is refused, naming the valid ones."""
    before, seen, step = torch.get_float32_matmul_precision(), [], torch.optim.AdamW.step

    def spy(self, *args, **kwargs):
        seen.append(torch.get_float32_matmul_precision())
        return step(self, *args, **kwargs)

    def failing_fit(*args, **kwargs):
        seen.append(torch.get_float32_matmul_precision())
        raise RuntimeError("fit failed")

    monkeypatch.setattr(torch.optim.AdamW, "step", spy)
    monkeypatch.setattr(loop, "drift_factors", failing_fit)
    tak.train(dataclasses.replace(toy_config(tmp_path / "set", "nonlinear"), steps=2, matmul_precision="medium"))
    assert seen == ["medium", "medium"] and torch.get_float32_matmul_precision() == before
    tak.train(dataclasses.replace(toy_config(tmp_path / "unset", "nonlinear"), steps=1))
    assert seen[-1] == before
    with pytest.raises(RuntimeError, match="fit failed"):
        loop.fit(dataclasses.replace(toy_config(tmp_path, "tak"), matmul_precision="high"), "kfac", tmp_path / "f.safetensors")
    assert seen[-1] == "high" != before and torch.get_float32_matmul_precision() == before
    with pytest.raises(ValueError, match=r"matmul_precision must be None or one of \('highest', 'high', 'medium'\), "
                                         r"got 'tf32'"):
        TrainConfig(matmul_precision="tf32")


def test_an_unknown_decay_target_is_refused_naming_the_valid_ones():
    with pytest.raises(ValueError, match=r"decay_to must be one of \('zero', 'pretrained'\), got 'theta'"):
        TrainConfig(decay_to="theta")


def test_metrics_are_the_trained_models_accuracies_on_val_and_test(tmp_path, toys):
    """metrics["val"] / ["test"] (returned and in metrics.json) are the accuracies of θ0 + τ on those splits."""
    result = tak.train(toy_config(tmp_path, "nonlinear"))
    backbone, task = toy_backbone(), toy_task(None)
    with torch.no_grad():
        for name, p in backbone.model.named_parameters():
            p.add_(result.task_vector.tensors[name].to(p.dtype))

    def percent(split):
        x = torch.stack([x for x, _ in task.split(split)])
        y = torch.tensor([y for _, y in task.split(split)])
        with torch.no_grad():
            return 100.0 * (backbone.head(task)(backbone.model(x)).argmax(-1) == y).double().mean().item()

    want = {"val": percent("val"), "test": percent("test")}
    assert want["val"] != want["test"]  # the splits tell apart which one was evaluated
    written = json.loads((result.path.parent / "metrics.json").read_text())
    for metrics in (result.metrics, written):
        assert {k: metrics[k] for k in want} == pytest.approx(want, abs=1e-9)


# --- data parallel --------------------------------------------------------------------------------

TOY_BACKBONE, TOY_TASK = "toy-mlp", "toy-blobs"
DDP_METHODS = ["nonlinear", "linear", "delta_no_ekfac"]


def toy_backbone(pretrained=None, dtype=torch.float64, **options) -> GenericBackbone:
    """An MLP without dropout (its training is deterministic), fixed weights and head, in float64 by default."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4)).double().to(dtype)
    model.register_parameter("unused", nn.Parameter(torch.ones(2, dtype=torch.float64)))  # the loss never reaches it
    head = Head(torch.randn(3, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64),
                normalize=False, scale=1.0)
    return GenericBackbone(model, inputs=lambda xs: torch.stack(xs).to(dtype), heads={TOY_TASK: head},
                           name=TOY_BACKBONE, modalities=("image",))


def toy_task(root, seed=0, **options) -> Task:
    """48 points in R^6, 3 classes by a fixed linear rule: 32 train, 8 val, 8 test."""
    g = torch.Generator().manual_seed(7)
    xs = torch.randn(48, 6, generator=g, dtype=torch.float64)
    labels = (xs @ torch.randn(6, 3, generator=g, dtype=torch.float64)).argmax(1)
    examples = [(x, int(y)) for x, y in zip(xs, labels)]
    return Task(TOY_TASK, ["a", "b", "c"], "image", ["{}"],
                {"train": lambda: examples[:32], "val": lambda: examples[32:40], "test": lambda: examples[40:]})


def register_toys() -> None:
    if TOY_BACKBONE not in list_backbones():
        register_backbone(TOY_BACKBONE, toy_backbone, "test: a float64 MLP without dropout")
    if TOY_TASK not in list_tasks():
        register_task(TOY_TASK, toy_task, "test: 3 Gaussian classes in R^6")


def toy_config(out, method) -> TrainConfig:
    return TrainConfig(method=method, task=TOY_TASK, backbone=TOY_BACKBONE, out=str(out), steps=3, batch_size=8,
                       lr=0.05, checkpoint_every=2, eval_batch_size=16, progress=False)


@pytest.fixture
def toys():
    """The toy backbone and task registered by name in this process, unregistered afterwards."""
    from tak.backbones import _REGISTERED
    from tak.data.registry import _TASKS

    register_toys()
    yield
    _REGISTERED.pop(TOY_BACKBONE, None)
    _TASKS.pop(TOY_TASK, None)
    for key in [k for k in loop._CACHE if k[0] == TOY_BACKBONE]:
        del loop._CACHE[key]


def _as_torchrun_process(rank, world, port) -> None:
    """The environment torchrun sets, one thread (two processes on 2 cores), the toys registered."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    register_toys()


def _ddp_worker(rank, world, port, out, methods, overrides=None):
    """One torchrun-like process: ``tak.train`` as a user calls it; it leaves at once when done (see below)."""
    _as_torchrun_process(rank, world, port)
    for method in methods:
        config = {**toy_config(out, method).to_dict(), "device": "cpu", **(overrides or {})}
        tak.train(TrainConfig.from_dict(config))
    Path(out, f"rank{rank}.json").write_text(json.dumps(list(loop._world(torch.device("cpu")))))
    os._exit(0)  # no process-group teardown: gloo's, with both ranks tearing down at once, can abort (SIGABRT)


def _stopping_worker(rank, world, port, out, case):
    """A torchrun-like process of a run that must stop on every rank: "nan" poisons rank 1's loss at step 1; "resume"
    gives each rank an --out of its own (storage the nodes do not share); "disk full" fails rank 0's first
    checkpoint; "signal": rank 1 alone gets a Ctrl-C during step 1. Each rank writes what stopped it, then leaves at once (after its last collective; see _ddp_worker)."""
    _as_torchrun_process(rank, world, port)
    if case == "nan" and rank == 1:
        forward = Objective.forward

        def poisoned(self, batch, labels, step):
            loss, terms = forward(self, batch, labels, step)
            return (loss * float("nan") if step == 1 else loss), terms
        Objective.forward = poisoned
    if case == "disk full" and rank == 0:
        def full(*args, **kwargs):
            raise OSError(28, "No space left on device")
        checkpoint.save = full
    if case == "signal" and rank == 1:
        def signalled(n, batch_size, seed, step, rank=0, world=1):
            if step == 1:
                signal.raise_signal(signal.SIGINT)
            return batch_indices(n, batch_size, seed, step, rank, world)
        loop.batch_indices = signalled
    config = toy_config(Path(out, f"rank{rank}") if case == "resume" else out, "linear")
    try:
        tak.train(dataclasses.replace(config, device="cpu"))
    except (FloatingPointError, ValueError, OSError, tak.training.TrainingInterrupted) as e:
        Path(out, f"rank{rank}.txt").write_text(f"{type(e).__name__}: {e}")
        os._exit(0)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(fn, args, nprocs, timeout):
    context = mp.start_processes(fn, args=args, nprocs=nprocs, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    try:
        while not context.join(timeout=1):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{nprocs} spawned processes still running after {timeout} s")
    finally:
        for p in context.processes:
            if p.is_alive():
                p.kill()


@pytest.mark.filterwarnings("ignore:tak.linearize. generic torch.func.jvp path")
def test_two_gloo_processes_train_the_task_vector_of_one(tmp_path, toys):
    spawn(_ddp_worker, (2, free_port(), str(tmp_path / "ddp"), DDP_METHODS), nprocs=2, timeout=240)
    assert [json.loads((tmp_path / "ddp" / f"rank{r}.json").read_text()) for r in range(2)] == [[0, 2], [1, 2]]
    for method in DDP_METHODS:
        one = tak.train(dataclasses.replace(toy_config(tmp_path / "one", method), device="cpu"))
        run_dir = toy_config(tmp_path / "ddp", method).run_dir()
        files = ["task_vector.safetensors"] + (["teacher_task_vector.safetensors"] if method in TEACHER_METHODS else [])
        for name in files:
            single = TaskVector.load(one.path.with_name(name))
            ddp = TaskVector.load(run_dir / name, fingerprint=toy_backbone().fingerprint)
            assert ddp.meta["base_model"] == TOY_BACKBONE and ddp.regime == single.regime
            assert set(ddp.tensors) == set(single.tensors) == {"0.weight", "0.bias", "2.weight", "2.bias", "unused"}
            assert max(v.abs().max() for v in single.tensors.values()) > 1e-2  # τ moved
            assert not single.tensors["unused"].any()  # no gradient, no weight decay: as with one process
            for k, v in single.tensors.items():
                torch.testing.assert_close(ddp.tensors[k], v, rtol=1e-9, atol=1e-12, msg=f"{method} {name} {k}")
        # the last step's loss terms are averaged over the processes: those of the whole batch, as with one process
        terms = json.loads((run_dir / "metrics.json").read_text())["final_loss_terms"]
        assert terms.keys() == one.metrics["final_loss_terms"].keys()
        for k, v in one.metrics["final_loss_terms"].items():
            assert terms[k] == pytest.approx(v, rel=1e-5, abs=1e-7), (method, k)


@pytest.mark.parametrize("case", ["nan", "resume", "disk full", "signal"])
def test_a_run_that_stops_on_one_process_stops_on_every_process(tmp_path, toys, case):
    if case == "resume":  # rank 0's --out holds a finished run's checkpoint, rank 1's none
        with pytest.warns(UserWarning, match="generic torch.func.jvp path"):
            tak.train(dataclasses.replace(toy_config(tmp_path / "rank0", "linear"), device="cpu"))
    spawn(_stopping_worker, (2, free_port(), str(tmp_path), case), nprocs=2, timeout=120)
    stopped = [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)]
    expected = {"nan": ["FloatingPointError: linear/toy-blobs: loss is nan at step 1"] * 2,
                "resume": ["ValueError: .*checkpoint.safetensors: the processes resume at steps 0 to 3"] * 2,
                "disk full": [r"OSError: \[Errno 28\] No space left on device",
                              r"OSError: rank 0 failed to write its files"],
                "signal": ["TrainingInterrupted: linear/toy-blobs: stopped by a signal at step 2 of"] * 2}[case]
    for rank, (pattern, text) in enumerate(zip(expected, stopped)):
        assert re.match(pattern, text), (rank, text)
    if case == "signal":  # rank 0 wrote the checkpoint of the step both stopped after
        assert read(toy_config(tmp_path, "linear").run_dir() / "checkpoint.safetensors")[1]["step"] == 2


def test_registered_backbones_load_by_name_and_are_listed(toys):
    from tak.backbones import load_backbone

    assert list_backbones()[TOY_BACKBONE] == "test: a float64 MLP without dropout"
    backbone = load_backbone(TOY_BACKBONE, device="cpu", max_length=16)
    assert backbone.name == TOY_BACKBONE and backbone.fingerprint == toy_backbone().fingerprint
    with pytest.raises(ValueError, match="backbone 'toy-mlp' is already registered"):
        register_backbone(TOY_BACKBONE, toy_backbone, "again")
    with pytest.raises(ValueError, match="already registered"):
        register_backbone("minilm", toy_backbone, "shadowing a built-in")
    with pytest.raises(ValueError, match="without ':'"):
        register_backbone("hf:mine", toy_backbone, "a prefix of the built-in specs")
    with pytest.raises(ValueError, match=r"unknown backbone 'toy-mpl'; valid: 'minilm' .*'toy-mlp' \(test: "):
        load_backbone("toy-mpl")


def test_task_lists_given_as_a_string_are_refused():
    with pytest.raises(ValueError, match="TrainConfig.tasks must be a list of task names, got the string 'a,b'"):
        TrainConfig(tasks="a,b")
    with pytest.raises(ValueError, match="TrainConfig.reference must be a list"):
        TrainConfig.from_dict({"reference": "subjectivity"})
    assert TrainConfig(tasks=("a", "b")).tasks == ["a", "b"]


def test_cached_factors_are_reused_for_the_same_weights_and_data_only(tmp_path, toys, monkeypatch):
    from tak.training import factors
    backbone, task = toy_backbone(), toy_task(None)
    fit = dict(n_examples=16, mc_samples=1, cache=tmp_path, device="cpu", progress=False)
    first = factors.task_factors("kfac", backbone, [task], **fit)
    [path] = tmp_path.glob("kfac-*.safetensors")
    monkeypatch.setattr(factors, "fit_kfac", lambda *a, **k: pytest.fail("fitted again, not loaded"))
    again = factors.task_factors("kfac", backbone, [task], **fit)
    assert all(torch.equal(again[n].B, first[n].B) for n in first)
    monkeypatch.undo()
    with torch.no_grad():
        backbone.model[0].weight.add_(0.5)  # other weights: other factors, not the cached ones
    changed = factors.task_factors("kfac", backbone, [task], **fit)
    assert len(list(tmp_path.glob("kfac-*.safetensors"))) == 2 and not torch.equal(changed["0"].B, first["0"].B)
    examples = task.split("train")
    other_data = Task(task.name, task.classes, task.modality, task.templates,
                      {**task.loaders, "train": lambda: [(2 * x, y) for x, y in examples]})
    factors.task_factors("kfac", backbone, [other_data], **fit)
    assert len(list(tmp_path.glob("kfac-*.safetensors"))) == 3


def test_a_task_without_training_examples_or_too_few_for_the_processes_is_refused(tmp_path, toys, monkeypatch):
    empty = Task(TOY_TASK, ["a", "b", "c"], "image", ["{}"], {s: list for s in ("train", "val", "test")})
    monkeypatch.setattr(loop, "_task", lambda name, config: empty)
    with pytest.raises(ValueError, match="has 0 labelled training examples and 0 for validation"):
        tak.train(toy_config(tmp_path, "nonlinear"))
    few = toy_task(None)
    seven = Task(TOY_TASK, few.classes, "image", ["{}"], {**few.loaders, "train": lambda: few.split("train")[:7]})
    monkeypatch.setattr(loop, "_task", lambda name, config: seven)
    monkeypatch.setattr(loop, "_world", lambda device: (0, 2))
    with pytest.raises(ValueError, match="has 7 training examples, fewer than batch_size=8: the batch of 7 must be "
                                         "divisible by the 2 processes"):
        tak.train(toy_config(tmp_path, "nonlinear"))
    monkeypatch.setattr(loop, "_world", lambda device: (0, 1))
    with pytest.warns(UserWarning, match="has 7 training examples, fewer than batch_size=8: every step takes all of "
                                         "them"):
        result = tak.train(toy_config(tmp_path, "nonlinear"))
    assert result.task_vector.meta["batch_size"] == 7 and result.task_vector.meta["config"]["batch_size"] == 8


def test_trained_parameters_without_curvature_are_named_in_a_warning():
    from tak.curvature import fit_kfac
    model = toy_backbone().model
    factors = fit_kfac(model, [torch.randn(4, 6, dtype=torch.float64)], progress=False, layers="0")
    trained = [n for n, _ in model.named_parameters()]
    with pytest.warns(UserWarning, match=r"method 'tak': 3 trained parameters \(38 of the 94 trained values, 40.4%\) "
                                         r"have no curvature block.*\['2.bias', '2.weight', 'unused'\]"):
        assert loop.unpenalized(model, trained, factors, "tak") == ["2.bias", "2.weight", "unused"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert loop.unpenalized(model, ["0.weight", "0.bias"], factors, "tak") == []


def test_trained_layers_are_those_holding_a_trained_parameter():
    """open_clip's fused q/k/v (``attn.in_proj``, parameters ``in_proj_weight`` / ``in_proj_bias``) included."""
    open_clip_transformer = pytest.importorskip("open_clip.transformer")
    vit = open_clip_transformer.VisionTransformer(image_size=16, patch_size=8, width=8, layers=2, heads=2, mlp_ratio=2.0,
                                                  output_dim=4)
    attention = [n for n, _ in vit.named_parameters() if ".attn." in n]
    assert loop.trained_layers(vit, attention) == [f"transformer.resblocks.{i}.attn.{p}" for i in (0, 1)
                                                   for p in ("in_proj", "out_proj")]
    assert loop.trained_layers(vit, ["ln_post.weight", "class_embedding", "transformer.resblocks.1.mlp.c_fc.bias"]) == \
        ["class_embedding", "ln_post", "transformer.resblocks.1.mlp.c_fc"]


@pytest.mark.parametrize("method, options", [("delta", {"compress": "int8"}), ("diag_ggn", {"factors": "per_task"})])
def test_kfac_only_factor_options_are_refused_for_other_penalties(tmp_path, toys, method, options):
    config = toy_config(tmp_path, method)
    config = TrainConfig.from_dict({**config.to_dict(), **options, "reference": [TOY_TASK],
                                    "universal": method != "delta"})  # delta's EK-FAC is the reference set's already
    given = " and ".join(f"{k}={v!r}" for k, v in options.items())
    with pytest.raises(ValueError, match=rf"^{given}: for KFAC penalties only \(tak, attn_only_tak\)"):
        tak.train(config)
    with pytest.raises(ValueError, match="method 'delta' penalizes with the reference set's EK-FAC already, so "
                                         "universal=True would do nothing"):
        tak.train(TrainConfig.from_dict({**toy_config(tmp_path, "delta").to_dict(), "reference": [TOY_TASK],
                                         "universal": True}))


def test_backbone_options_reach_the_loader_and_the_task_vector_for_tak_eval(tmp_path, toys, monkeypatch):
    from tak.arithmetic import evaluate
    from tak.cli import _parse_value
    seen = []
    monkeypatch.setattr(loop, "load_backbone", lambda spec, **kw: seen.append(kw) or toy_backbone())
    config = TrainConfig.from_dict({**toy_config(tmp_path, "nonlinear").to_dict(), "backbone_options": {"width": 3}})
    result = tak.train(config)
    assert seen[0]["width"] == 3 and result.task_vector.meta["backbone_options"] == {"width": 3}
    monkeypatch.setattr(evaluate, "load_backbone", lambda spec, **kw: seen.append(kw) or toy_backbone())
    class Reached(Exception):
        """The protocol was reached: the backbone was loaded."""

    def protocol(*args, **kwargs):
        raise Reached
    monkeypatch.setattr(evaluate, "task_addition", protocol)
    with pytest.raises(Reached):
        evaluate.evaluate_files([result.path], out=tmp_path / "eval")
    assert seen[1]["width"] == 3
    other = result.task_vector
    TaskVector(other.tensors, {**other.meta, "task": "other", "backbone_options": {"width": 4}}).save(tmp_path / "o.st")
    with pytest.raises(ValueError, match=r"differ in backbone_options \(toy-blobs: \{'width': 3\}, other: "
                                         r"\{'width': 4\}\): they were trained on different backbones"):
        evaluate.evaluate_files([result.path, tmp_path / "o.st"], out=tmp_path / "eval")
    assert _parse_value('{"prefix": "mnli"}', dict[str, object]) == {"prefix": "mnli"}
    given = TrainConfig(backbone_options={"dtype": torch.bfloat16, "model_kwargs": {"torch_dtype": torch.float16}})
    assert given.backbone_options == {"dtype": "bfloat16", "model_kwargs": {"torch_dtype": "float16"}}  # JSON, loadable
    with pytest.raises(ValueError, match=r"\['max_length'\] are TrainConfig keys of their own"):
        TrainConfig(backbone_options={"max_length": 3})


def test_two_gloo_processes_fit_the_factors_of_one_and_rank_0_caches_them(tmp_path, toys):
    """One batch of factor inputs: rank 0 fits it (its probes are the one process's), rank 1 an empty shard;
    the sums are added, the file is written once, and the task vector equals one process's."""
    universal = {"universal": True, "reference": [TOY_TASK]}
    spawn(_ddp_worker, (2, free_port(), str(tmp_path / "ddp"), ["tak"], universal), nprocs=2, timeout=240)
    one = tak.train(TrainConfig.from_dict({**toy_config(tmp_path / "one", "tak").to_dict(), "device": "cpu",
                                           **universal}))
    [ddp_file] = (tmp_path / "ddp" / "factors").glob("kfac-*.safetensors")
    [one_file] = (tmp_path / "one" / "factors").glob("kfac-*.safetensors")
    ddp_factors, one_factors = tak.KFAC.load(ddp_file), tak.KFAC.load(one_file)
    assert ddp_factors.meta["n_examples"] == one_factors.meta["n_examples"] == 32
    assert all(torch.equal(ddp_factors[n].B, one_factors[n].B) for n in one_factors)
    ddp = TaskVector.load(toy_config(tmp_path / "ddp", "tak").run_dir() / "task_vector.safetensors")
    for k, v in one.task_vector.tensors.items():
        torch.testing.assert_close(ddp.tensors[k], v, rtol=1e-9, atol=1e-12)


def test_each_step_and_rank_draws_its_own_dropout_masks():
    """The seed of a step's draws depends on (seed, step, rank) alone: resumable, independent across ranks."""
    seeds = [loop.step_seed(seed, step, rank) for seed in (0, 1) for step in (0, 1, 2) for rank in (0, 1)]
    assert len(set(seeds)) == len(seeds) and all(0 <= s < 2**63 for s in seeds)
    assert loop.step_seed(1, 2, 1) == loop.step_seed(1, 2, 1) == seeds[-1]


def test_config_expands_all_parts_of_a_class_partition():
    config = TrainConfig(task="digits-part1of3", tasks=["digits-part*of3", "rotten_tomatoes"],
                         reference=["20news-part*of2"])
    assert config.tasks == ["digits-part0of3", "digits-part1of3", "digits-part2of3", "rotten_tomatoes"]
    assert config.reference == ["20news-part0of2", "20news-part1of2"]
    assert TrainConfig.from_dict(config.to_dict()) == config


def test_defaults_follow_the_trained_tasks_modality(tmp_path, toys, monkeypatch):
    """A backbone that takes every modality (GenericBackbone's default) training an image task: vision defaults."""
    backbone = toy_backbone()
    backbone.modalities = ("text", "text-pair", "image")
    monkeypatch.setattr(loop, "load_backbone", lambda spec, **kw: backbone)
    config = TrainConfig.from_dict({**toy_config(tmp_path, "tak").to_dict(), "universal": True, "reference": [TOY_TASK]})
    hp = tak.train(config).task_vector.meta["hparams"]
    assert (hp["beta"], hp["last_layer_weight"], hp["weight_decay"]) == (100.0, 0.1, 0.1)


@pytest.mark.parametrize("spec", ["clip:local-dir:weights", "hf-clip:google/siglip-base-patch16-224"])
def test_a_clip_model_that_names_no_architecture_is_warned_of_its_default_beta(tmp_path, toys, monkeypatch, spec):
    monkeypatch.setattr(loop, "load_backbone", lambda spec, **kw: toy_backbone())
    values = {**toy_config(tmp_path, "tak").to_dict(), "universal": True, "reference": [TOY_TASK], "backbone": spec}
    with pytest.warns(UserWarning, match=r"names no CLIP architecture, so the KFAC penalty takes beta=100 "):
        tak.train(TrainConfig.from_dict(values))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*names no CLIP architecture")
        tak.train(TrainConfig.from_dict({**values, "beta": 500.0, "out": str(tmp_path / "set")}))
        tak.train(TrainConfig.from_dict({**values, "backbone": "hf-clip:openai/clip-vit-base-patch16",
                                         "out": str(tmp_path / "named")}))


def test_a_run_resumes_only_from_the_base_weights_it_started_from(tmp_path, monkeypatch):
    config = tiny(tmp_path, steps=1)
    first = tak.train(config)
    backbone = loop._backbone(config, loop._device(config))
    assert first.task_vector.meta["weights"] == backbone.weights
    other = copy.deepcopy(backbone)  # the same spec, other values: a local folder whose files changed
    with torch.no_grad():
        other.model.embeddings.word_embeddings.weight[5, 0] += 1e-3
    monkeypatch.setitem(loop._CACHE, next(k for k, b in loop._CACHE.items() if b is backbone), other)
    with pytest.raises(ValueError, match=r"another config \(weights: checkpoint \{'digest': '[0-9a-f]{16}', 'dtypes': "
                                         r"\['float32'\]\}, now"):
        tak.train(config)
    path = config.run_dir() / "checkpoint.safetensors"
    tensors, meta = read(path)  # a checkpoint of an earlier tak records no weights: it resumes
    write(path, tensors, {**meta, "config": {k: v for k, v in meta["config"].items() if k != "weights"}})
    assert tak.train(config).task_vector.meta["weights"] == other.weights


def test_a_checkpoint_resumes_across_new_config_keys_but_not_other_hyperparameters(tmp_path):
    module = nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(module.parameters())
    config = {**TrainConfig(lr=None).to_dict(), "hparams": {"lr": 3e-4, "weight_decay": 0.01}}
    older = {k: v for k, v in config.items() if k not in ("backbone_options", "hparams")}  # an older tak wrote it
    older["lr"] = 3e-4  # set explicitly then, the default now: the same run
    path = tmp_path / "c.safetensors"

    def load(config):
        return checkpoint.restore(path, checkpoint.read_matching(path, config), module, optimizer)
    checkpoint.save(path, module, optimizer, 5, older, {"terms": {"task": 0.5}, "seconds": 3.0})
    assert load(config) == (5, {"terms": {"task": 0.5}, "seconds": 3.0})
    tensors, meta = read(path)
    write(path, tensors, {k: v for k, v in meta.items() if k != "progress"})  # no progress kept
    assert load(config) == (5, {"terms": {}, "seconds": 0.0})
    changed = {**config, "hparams": {"lr": 1e-5, "weight_decay": 0.01}}  # a default that moved
    with pytest.raises(ValueError, match=r"another config \(lr: checkpoint 0.0003, now 1e-05\)"):
        load(changed)


def test_each_torchrun_process_takes_its_own_gpu_and_two_on_one_are_refused(monkeypatch):
    count = 4
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setenv("WORLD_SIZE", "8")  # two nodes of 4 processes
    monkeypatch.setenv("LOCAL_RANK", "2")

    def device(name):
        return loop._device(TrainConfig(task="t", device=name))

    assert device("cuda") == torch.device("cuda", 2) == device("cuda:2") == device(None)
    assert device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match=r"device='cuda:0'.*LOCAL_RANK=2.*cuda:2"):
        device("cuda:0")
    monkeypatch.setenv("LOCAL_RANK", "5")  # 6 processes on a node of 4 GPUs
    with pytest.raises(ValueError, match=r"LOCAL_RANK=5.*4 GPUs.*at most 4 processes"):
        device("cuda")
    count = 1  # CUDA_VISIBLE_DEVICES gave each process its GPU
    assert device("cuda") == torch.device("cuda", 0) == device("cuda:0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    count = 4  # one process: any GPU it names
    assert device("cuda:3") == torch.device("cuda", 3)


def test_gradients_of_parameters_of_several_dtypes_are_averaged_each_in_its_dtype(tmp_path):
    import torch.distributed as dist

    g = torch.Generator().manual_seed(3)
    params = [nn.Parameter(torch.randn(3, 5, generator=g).to(dtype)) for dtype in (torch.bfloat16, torch.float32,
                                                                                     torch.float64, torch.float32)]
    for p in params[:3]:
        p.grad = torch.randn(p.shape, generator=g).to(p.dtype)
    expected = [p.grad / 2 for p in params[:3]]
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:  # a group of one process reduces to itself: the average over "2" halves each gradient
        loop._average_gradients(params, world=2)
    finally:
        dist.destroy_process_group()
    for p, e in zip(params, expected):
        assert p.grad.dtype == p.dtype
        assert torch.equal(p.grad, e)
    assert params[3].grad is None  # no process has its gradient


def test_a_run_resumed_by_another_number_of_processes_is_warned(tmp_path):
    with pytest.warns(UserWarning, match=r"resumed at step 4 by 1 processes, saved by 2.*τ will differ"):
        loop._check_resumed(tmp_path / "checkpoint.safetensors", 4, 2, 0, 1, torch.device("cpu"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loop._check_resumed(tmp_path / "checkpoint.safetensors", 4, 1, 0, 1, torch.device("cpu"))
        loop._check_resumed(tmp_path / "checkpoint.safetensors", 0, 2, 0, 1, torch.device("cpu"))  # a fresh start
