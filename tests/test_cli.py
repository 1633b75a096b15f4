"""The ``tak`` command line end to end, in process (``tak.cli.main``): train two tasks with two methods,
merge, evaluate (addition with analyses, negation), report, list; wrong names exit non-zero naming the
valid ones; ``--config`` YAML with flag overrides."""
import contextlib
import io
import json
import os
import re
import signal
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from tak.arithmetic import analyses
from tak.arithmetic.compose import apply
from tak.arithmetic.merges import MERGES
from tak.backbones import GenericBackbone, Head, list_backbones, load_backbone, register_backbone
from tak.cli import main
from tak.data import Task, list_tasks, register_task
from tak.methods import METHODS
from tak.task_vector import TaskVector
from tak.training.loop import batch_indices

from .util import legacy_fingerprint

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

TASKS = ["rotten_tomatoes", "subjectivity"]
SMALL = ["--steps", "2", "--batch-size", "4", "--max-length", "16", "--max-train", "40", "--max-test", "8",
         "--trainable", "encoder.layer.5.attention.*", "--progress", "false", "--lr", "1e-4",
         "--eval-batch-size", "64"]
EVAL_SMALL = ["--max-train", "40", "--max-test", "8", "--alphas", "0,0.5,1"]
PNG = b"\x89PNG\r\n\x1a\n"


def tak_cli(*argv) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of ``tak argv...``; argparse's exits become statuses."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in argv])
        except SystemExit as e:
            code = e.code
    return code, out.getvalue(), err.getvalue()


def ok(*argv) -> str:
    code, out, err = tak_cli(*argv)
    assert code == 0, f"tak {' '.join(map(str, argv))} exited {code}: {err}"
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{(method, task): task vector path} of `tak train` for 2 tasks x (nonlinear, linear)."""
    out = tmp_path_factory.mktemp("cli")
    paths = {}
    for method in ("nonlinear", "linear"):
        for task in TASKS:
            printed = json.loads(ok("train", "--method", method, "--task", task, "--tasks", ",".join(TASKS),
                                    "--out", out / "runs", *SMALL))
            paths[method, task] = Path(printed["task_vector"])
            assert 0 <= printed["test"] <= 100 and 0 <= printed["val"] <= 100
    return out, paths


def test_train_writes_task_vectors_with_their_metadata(runs):
    out, paths = runs
    for (method, task), path in paths.items():
        assert path == out / "runs" / method / task / "task_vector.safetensors"
        tv = TaskVector.load(path)
        assert (tv.meta["method"], tv.task, tv.regime, tv.meta["base_model"]) == (method, task, method, "minilm")
        assert tv.meta["steps"] == 2 and tv.meta["hparams"]["lr"] == 1e-4
        assert tv.meta["trainable"] == "encoder.layer.5.attention.*"
        saved = yaml.safe_load((path.parent / "config.yaml").read_text())
        assert saved["tasks"] == TASKS and saved["max_length"] == 16 and saved["progress"] is False


def test_merge_ties_and_task_arithmetic(runs):
    out, paths = runs
    inputs = [paths["nonlinear", t] for t in TASKS]
    taus = [TaskVector.load(p).tensors for p in inputs]

    assert "wrote" in ok("merge", *inputs, "--method", "task_arithmetic", "--alpha", "0.5",
                         "--out", out / "ta.safetensors")
    ta = TaskVector.load(out / "ta.safetensors")
    assert ta.regime == "nonlinear" and ta.meta["base_model"] == "minilm"
    assert ta.meta["method"] == "merge:task_arithmetic" and ta.meta["merge_options"] == {"alpha": 0.5}
    assert ta.meta["trainable"] == TaskVector.load(inputs[0]).meta["trainable"]
    assert ta.task == "+".join(TASKS) and ta.meta["merged_from"] == [str(p) for p in inputs]
    assert set(ta.tensors) == set(taus[0])
    for k in ta.tensors:
        torch.testing.assert_close(ta.tensors[k], 0.5 * (taus[0][k] + taus[1][k]))

    ok("merge", *inputs, "--method", "ties", "--k", "0.2", "--out", out / "ties.safetensors")
    ties = TaskVector.load(out / "ties.safetensors")
    assert ties.meta["method"] == "merge:ties" and ties.meta["merge_options"] == {"k": 0.2, "alpha": 1.0}
    assert set(ties.tensors) == set(taus[0])
    kept = sum(int((v != 0).sum()) for v in ties.tensors.values()) / sum(v.numel() for v in ties.tensors.values())
    assert 0 < kept <= 0.4 + 1e-3  # top 20% of each of two task vectors
    assert any(not torch.allclose(ties.tensors[k], ta.tensors[k] * 2) for k in ties.tensors)
    code, _, err = tak_cli("eval", out / "ta.safetensors", "--out", out / "eval-merged")
    assert code == 2 and "merged task vectors (tak merge)" in err and "--merge" in err


def test_merge_refuses_mixed_regimes_and_unknown_merges(runs):
    out, paths = runs
    code, _, err = tak_cli("merge", paths["nonlinear", TASKS[0]], paths["linear", TASKS[1]], "--out", out / "x.st")
    assert code == 2 and "differ in regime" in err and "--allow-mixed-regimes" in err
    ok("merge", paths["nonlinear", TASKS[0]], paths["linear", TASKS[1]], "--allow-mixed-regimes", "--out", out / "mixed.st")
    mixed = TaskVector.load(out / "mixed.st")
    assert mixed.regime is None and mixed.meta["mixed_regimes"] == ["linear", "nonlinear"]
    code, _, err = tak_cli("merge", paths["nonlinear", TASKS[0]], paths["nonlinear", TASKS[0]], "--out", out / "x.st")
    assert code == 2 and "given more than once" in err
    spelled = Path(os.path.relpath(paths["nonlinear", TASKS[0]]))  # the same file, another spelling
    code, _, err = tak_cli("merge", paths["nonlinear", TASKS[0]].resolve(), spelled, "--out", out / "x.st")
    assert code == 2 and "given more than once" in err
    code, _, err = tak_cli("merge", paths["nonlinear", TASKS[0]], paths["nonlinear", TASKS[1]], "--out", out)
    assert code == 2 and "a folder; name the merged task vector's file" in err
    code, _, err = tak_cli("merge", paths["nonlinear", TASKS[0]], "--method", "tiez", "--out", out / "x.st")
    assert code == 2 and "unknown merge 'tiez'" in err and all(name in err for name in MERGES)
    assert not (out / "x.st").exists()


def test_eval_refuses_a_control_read_from_the_targets_own_files(runs, monkeypatch, tmp_path):
    """A data root that is one dataset's folder serves any task name: the control would be scored on the target's
    data."""
    out, paths = runs
    from tak.arithmetic import evaluate
    real = evaluate.get_task

    def from_one_folder(name, **kwargs):
        task = real(name, **kwargs)
        task.source = str(tmp_path / "eurosat")
        return task
    monkeypatch.setattr(evaluate, "get_task", from_one_folder)
    code, _, err = tak_cli("eval", paths["linear", TASKS[0]], "--protocol", "negation", "--control", TASKS[1],
                           *EVAL_SMALL, "--out", tmp_path / "negation")
    assert code == 2 and f"--control '{TASKS[1]}' would be read from {TASKS[0]}'s own files" in err
    assert "--data-root" in err and not (tmp_path / "negation").exists()


def test_eval_runs_in_the_matmul_precision_asked_for_and_gives_the_process_its_own_back(monkeypatch, tmp_path):
    from tak.arithmetic import evaluate

    seen, before = [], torch.get_float32_matmul_precision()
    monkeypatch.setattr(evaluate, "evaluate_files", lambda *a, **k: seen.append(torch.get_float32_matmul_precision())
                        or {})
    for flags in (["--matmul-precision", "medium"], []):
        ok("eval", tmp_path / "tv.safetensors", *flags, "--out", tmp_path / "eval")
    assert seen == ["medium", before] and torch.get_float32_matmul_precision() == before
    code, _, err = tak_cli("eval", tmp_path / "tv.safetensors", "--matmul-precision", "low", "--out", tmp_path)
    assert code == 2 and "invalid choice: 'low'" in err and "'highest', 'high', 'medium'" in err


def test_eval_addition_with_analyses_negation_and_report(runs):
    out, paths = runs
    added = out / "addition"
    printed = json.loads(ok("eval", *[paths["nonlinear", t] for t in TASKS], "--analyses", *EVAL_SMALL, "--out", added))
    results = json.loads((added / "results.json").read_text())
    assert printed == {k: results[k] for k in ("alpha1", "best")}
    assert (results["regime"], results["methods"], results["protocol"]) == ("nonlinear", ["nonlinear"], "addition")
    assert set(results["individual"]) == set(TASKS)
    assert set(results["alpha1"]) == {"abs", "norm", "per_task"} and set(results["alpha1"]["per_task"]) == set(TASKS)
    assert results["best"]["alpha"] in (0.0, 0.5, 1.0) and set(results["val_curve"]) == {"0.0", "0.5", "1.0"}
    assert set(results["analyses"]) == {"disentanglement", "normalcy_auroc", "support_localization",
                                        "linearization_error"}
    assert results["analyses"]["disentanglement"]["tasks"] == TASKS
    pngs = {"alpha_sweep.png", "disentanglement.png", "normalcy.png", "linearization_error.png",
            "support_localization.png"}
    assert {p.name for p in added.glob("*.png")} == set(results["plots"]) == pngs
    assert all((added / p).read_bytes().startswith(PNG) for p in pngs)
    assert results["alphas"] == [0.0, 0.5, 1.0] and set(results["individual_val"]) == set(TASKS)

    tied = out / "ties"  # a post-hoc merge instead of the sum, then the same α sweep
    ok("eval", *[paths["nonlinear", t] for t in TASKS], "--merge", "ties", "--k", "0.2", *EVAL_SMALL, "--out", tied)
    ties = json.loads((tied / "results.json").read_text())
    assert ties["merge"] == {"method": "ties", "k": 0.2} and ties["individual"] == results["individual"]
    assert ties["val_curve"]["0.0"] == results["val_curve"]["0.0"] and ties["val_curve"] != results["val_curve"]
    for args, message in ((["--merge", "tiez"], "unknown merge 'tiez'"), (["--k", "0.2"], "--k applies to --merge ties"),
                          (["--control", TASKS[1]], "--target and --control apply to the negation protocol only"),
                          (["--analyses", "--protocol", "negation", "--control", TASKS[1]], "need the addition protocol"),
                          (["--protocol", "negation", "--target", TASKS[0], "--control", TASKS[0]],
                           f"--control '{TASKS[0]}' is the task negated")):
        code, _, err = tak_cli("eval", *[paths["nonlinear", t] for t in TASKS], *args, *EVAL_SMALL, "--out", out / "x")
        assert code == 2 and message in err, err
    code, _, err = tak_cli("eval", paths["nonlinear", TASKS[0]], "--analyses", *EVAL_SMALL, "--out", out / "x")
    assert code == 2 and "at least two" in err

    negated = out / "negation"
    code, _, err = tak_cli("eval", paths["linear", TASKS[0]], "--protocol", "negation", *EVAL_SMALL, "--out", negated)
    assert code == 2 and "negation needs --control" in err
    code, _, err = tak_cli("eval", paths["linear", TASKS[0]], paths["linear", TASKS[1]], "--protocol", "negation",
                           "--control", "20news-part0", *EVAL_SMALL, "--out", negated)
    assert code == 2 and "negation negates one task vector, got 2" in err and "--target" in err
    code, _, err = tak_cli("eval", paths["linear", TASKS[0]], "--protocol", "negation", "--target", TASKS[1],
                           "--control", TASKS[1], *EVAL_SMALL, "--out", negated)
    assert code == 2 and f"--target '{TASKS[1]}': none of the task vectors is of that task" in err
    assert not negated.exists()  # refused before anything was loaded or written
    ok("eval", paths["linear", TASKS[0]], "--protocol", "negation", "--control", TASKS[1], *EVAL_SMALL,
       "--out", negated)
    negation = json.loads((negated / "results.json").read_text())["negation"]
    assert (negation["target_task"], negation["control_task"]) == tuple(TASKS) and negation["alpha"] in (0.0, 0.5, 1.0)
    assert all(0 <= negation[k] <= 100 for k in ("target", "control", "pretrained_target", "pretrained_control"))
    assert set(negation["val_curve"]) == {"0.0", "0.5", "1.0"}
    assert (negated / "negation_sweep.png").read_bytes().startswith(PNG)

    report_dir = out / "report"
    assert "wrote" in ok("report", added, negated / "results.json", "--out", report_dir)  # a folder or its results.json
    report = (report_dir / "report.md").read_text()
    copied = sorted(p.name for p in report_dir.glob("*.png"))
    assert copied == sorted([f"0-{p}" for p in pngs] + ["1-negation_sweep.png"])
    for name in copied:
        assert f"]({name})" in report
    assert "absolute" in report and "normalized" in report
    negation_table = report[report.index("|  | rotten_tomatoes | subjectivity |"):].splitlines()
    assert negation_table[2].startswith("| pretrained | ")
    assert negation_table[3].startswith(f"| θ0 − {negation['alpha']} τ | ")
    assert negation_table[3].split("|")[2:4] == [f" {negation['target']:.1f} ", f" {negation['control']:.1f} "]

    assert "addition of 2 task vector(s) of nonlinear (nonlinear) on minilm; merged by task_arithmetic; α grid 0 to 1 " \
           "(3 values)." in report

    code, _, err = tak_cli("report", out / "nowhere", "--out", report_dir)
    assert code == 2 and "no results.json" in err

    # the addition's folder reused by a negation of one of two files: its results and report are the negation's
    ok("eval", paths["linear", TASKS[0]], paths["linear", TASKS[1]], "--protocol", "negation", "--target", TASKS[1],
       "--control", TASKS[0], *EVAL_SMALL, "--out", added)
    again = json.loads((added / "results.json").read_text())
    assert again["task_vectors"] == [str(paths["linear", TASKS[1]])] and again["plots"] == ["negation_sweep.png"]
    for _ in range(2):  # in place: nothing copied, the analyses' plots left there are not this run's
        ok("report", added, "--out", added)
        report = (added / "report.md").read_text()
        assert re.findall(r"\]\(([^)]+\.png)\)", report) == ["negation_sweep.png"]
        assert not list(added.glob("0-*")) and "negation of 1 task vector(s) of linear (linear)" in report


def test_eval_of_class_partition_parts_reports_their_joint_problem(tmp_path):
    """Parts of one task (``<task>-part*of<n>``) merged: tak eval scores their joint problem too, prints it and
    reports it; a file of an earlier tak (its fingerprint hashed dtypes) is evaluated with today's."""
    paths = [json.loads(ok("train", "--method", "nonlinear", "--task", f"reuters_r8-part{k}of2", "--tasks",
                           "reuters_r8-part*of2", "--out", tmp_path / "runs", *SMALL))["task_vector"] for k in (0, 1)]
    old = TaskVector.load(paths[1])
    legacy = legacy_fingerprint(load_backbone("minilm", max_length=16).model)
    TaskVector(old.tensors, {**old.meta, "fingerprint": legacy}).save(paths[1])
    printed = json.loads(ok("eval", *paths, *EVAL_SMALL, "--out", tmp_path / "eval"))
    joint = json.loads((tmp_path / "eval" / "results.json").read_text())["joint"]
    assert list(joint) == ["reuters_r8-joint"] and printed["joint"] == {
        "reuters_r8-joint": {k: v for k, v in joint["reuters_r8-joint"].items() if k != "val_curve"}}
    found = joint["reuters_r8-joint"]
    assert found["parts"] == ["reuters_r8-part0of2", "reuters_r8-part1of2"] and found["classes"] == 8
    curve = {float(a): acc for a, acc in found["val_curve"].items()}
    assert found["best"]["alpha"] == max(curve, key=lambda a: (curve[a], -abs(a - 1)))
    ok("report", tmp_path / "eval", "--out", tmp_path / "report")
    report = (tmp_path / "report" / "report.md").read_text()
    assert f"| reuters_r8-joint = reuters_r8-part0of2 + reuters_r8-part1of2 | 8 | {found['alpha1']:.1f} |" in report


def test_eval_refuses_repeated_tasks_other_weights_and_bad_grids(runs):
    out, paths = runs
    tv = paths["nonlinear", TASKS[0]]
    code, _, err = tak_cli("eval", tv, tv, *EVAL_SMALL, "--out", out / "twice")
    assert code == 2 and "one task vector per task; tasks repeat" in err
    loaded = TaskVector.load(tv)
    tagged = out / "tagged.safetensors"
    TaskVector(loaded.tensors, {**loaded.meta, "source": {**loaded.meta["source"], "pretrained": "tag-a"}}).save(tagged)
    code, _, err = tak_cli("eval", tagged, *EVAL_SMALL, "--pretrained", "tag-b", "--out", out / "other")
    assert code == 2 and "trained on 'minilm' with pretrained='tag-a'; adding them to other weights is refused" in err
    for grid in ("0:1:0", "2:0:0.5", "0:1:x", "nan,1", "0,inf", "0:inf:1"):
        code, _, err = tak_cli("eval", tv, "--alphas", grid, "--out", out / "grid")
        assert code == 2 and f"'{grid}': expected start:stop:step" in err, grid
    from tak.cli import _alphas
    assert _alphas("0:1:0.6") == [0.0, 0.6] and _alphas("0:1:0.25") == [0.0, 0.25, 0.5, 0.75, 1.0]


@pytest.mark.parametrize("what, names", [("methods", list(METHODS)), ("tasks", list(list_tasks())),
                                         ("backbones", list(list_backbones())), ("merges", list(MERGES))])
def test_list_prints_the_valid_names(what, names):
    printed = ok("list", what).splitlines()
    assert [line.split()[0] for line in printed if not line.startswith(" ")] == names
    if what == "methods":  # each method's paper defaults on the line below it
        shown = {line.split()[0]: below for line, below in zip(printed[::2], printed[1::2])}
        assert "lr=1e-05 weight_decay=0.1; text: lr=0.0003 weight_decay=0.01" in shown["nonlinear"]
        assert "beta=100" in shown["tak"] and "clip:ViT-B-16: beta=500" in shown["tak"]
        assert "text: lr=0.0003 weight_decay=0.01 beta=20 beta_teacher=20 gamma=0.01" in shown["delta"]
    if what == "merges":  # each merge said in its own words, without docstring markup
        assert all("docstring" not in line and "``" not in line for line in printed)
        assert "(default 0.2)" in printed[1]


def test_every_command_option_has_a_help_line():
    """``tak train --help`` gives each TrainConfig key its field's help line and the default it has."""
    import dataclasses

    from tak.training import TrainConfig

    code, text, _ = tak_cli("train", "--help")
    assert code == 0
    text = " ".join(text.split())
    for f in dataclasses.fields(TrainConfig):
        flag, help_line = f"--{f.name.replace('_', '-')} VALUE", " ".join(f.metadata["help"].split())
        assert help_line and f"{flag} {help_line}" in text, f.name
    assert "--steps VALUE optimizer steps (2,000 at batch 128" in text and "[default: 2000]" in text and "(validation keeps max_train // 9)" in text
    assert "--tasks VALUE all tasks that will be merged" in text and "[default: []]" not in text
    for command in ("demo", "fit", "merge", "eval", "report"):
        code, text, _ = tak_cli(command, "--help")
        listed = [line for line in text.split("\n\n", 1)[1].splitlines() if line.startswith("  ")]  # past the usage
        entries = re.split(r"\n  (?=\S)", "\n" + "\n".join(listed))[1:]  # one per argument
        assert code == 0 and len(entries) >= 3, command
        for entry in entries:
            signature, *described = re.split(r"\s{2,}", entry.strip(), maxsplit=1)
            assert described, (command, signature)


def test_list_of_something_else_is_a_usage_error():
    code, _, err = tak_cli("list", "models")
    assert code == 2 and "invalid choice: 'models'" in err and "methods" in err


@pytest.mark.parametrize("flag, value, expected", [
    ("--method", "takk", "unknown method 'takk'; valid methods: nonlinear, linear, attn_only, tak"),
    ("--task", "rotten_tomato", "unknown task 'rotten_tomato'; valid names: "),
    ("--backbone", "minilm-l12", "unknown backbone 'minilm-l12'; valid: 'minilm'"),
])
def test_unknown_names_exit_non_zero_listing_the_valid_ones(tmp_path, flag, value, expected):
    code, out, err = tak_cli("train", "--method", "nonlinear", "--out", tmp_path, *SMALL, flag, value)
    assert code == 2 and out == ""
    error = err.splitlines()[-1]  # after transformers' "Loading weights" bar when the backbone loads here first
    assert error.startswith("tak train: error: ") and expected in error
    if flag == "--task":
        assert "rotten_tomatoes" in error and "subjectivity" in error
    assert not (tmp_path / "nonlinear").exists()


def test_unknown_train_flag_and_bad_values_are_usage_errors(tmp_path):
    code, _, err = tak_cli("train", "--out", tmp_path, "--stepz", "2")
    assert code == 2 and "unrecognized arguments: --stepz 2" in err and err.startswith("usage: tak train ")
    code, _, err = tak_cli("train", "--out", tmp_path, "--steps", "two")
    assert code == 2 and "argument --steps: expected an integer, got 'two'" in err
    code, _, err = tak_cli("train", "--out", tmp_path, "--layer-weights", "*.query=half")
    assert code == 2 and "expected PATTERN=NUMBER" in err
    (tmp_path / "broken.yaml").write_text("steps: [2\n")
    (tmp_path / "tasks.yaml").write_text("tasks: 5\n")
    for name, message in (("broken", "broken.yaml: not valid YAML"), ("tasks", "tasks must be a list of task names, got 5")):
        code, _, err = tak_cli("train", "--config", tmp_path / f"{name}.yaml")
        assert code == 2 and message in err and "Traceback" not in err, err
    for args, message in ((("eval", "x.safetensors", "--max-test", "-3"), "--max-test: expected an integer ≥ 1"),
                          (("merge", "x.safetensors", "--alpha", "nan"), "--alpha: expected a finite number")):
        code, _, err = tak_cli(*args, "--out", tmp_path / "never")
        assert code == 2 and message in err, err
    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "results.json").write_text('{"something": 1}')
    code, _, err = tak_cli("report", tmp_path / "report", "--out", tmp_path / "r")
    assert code == 2 and "not the results of `tak demo` or `tak eval`" in err and not (tmp_path / "r").exists()
    for results, message in (('{"alpha1": {"abs": 1}}', "not as `tak demo` or `tak eval` writes results.json "
                                                       "(KeyError: 'individual')"),
                             ('{"analyses": {}, "plots": ["../x.png"]}', r"plots ['../x.png'] must name files of its folder")):
        (tmp_path / "report" / "results.json").write_text(results)
        code, _, err = tak_cli("report", tmp_path / "report", "--out", tmp_path / "r")
        assert code == 2 and message in err and "Traceback" not in err, err
        assert not (tmp_path / "r").exists()  # a failed report leaves no folder behind
    code, _, err = tak_cli("train", "--out", tmp_path, "--progress", "maybe")
    assert code == 2 and "expected true/false" in err
    (tmp_path / "afolder").mkdir()
    (tmp_path / "afile.txt").write_text("")
    for args, message in ((("train", "--config", tmp_path / "afolder"), "afolder: a folder; expected a YAML file"),
                          (("train", "--factor-files", tmp_path / "afolder", "--out", tmp_path),
                           "factor_files: {}: a folder; expected a factor file".format(tmp_path / "afolder")),
                          (("eval", "x.safetensors", "--out", tmp_path / "afile.txt"), "afile.txt: a file; name a folder"),
                          (("fit", "--task", "rotten_tomatoes", "--out", f"{tmp_path}/fitdir/"),
                           "fitdir/: a folder; name the factor file")):
        code, _, err = tak_cli(*args)
        assert code == 2 and message in err and "Errno" not in err and "Traceback" not in err, err
    assert not (tmp_path / "fitdir").exists()
    (tmp_path / "afile").write_text("")
    code, _, err = tak_cli("train", "--method", "nonlinear", *SMALL, "--out", tmp_path / "afile")
    assert code == 2 and "afile/nonlinear" in err and "Traceback" not in err, err  # before training
    code, _, err = tak_cli("train", "--method", "nonlinear", *SMALL, "--out", tmp_path, "--max-test", "0")
    assert code == 2 and "TrainConfig.max_test must be ≥ 1, got 0" in err, err


def test_ctrl_c_exits_130_saying_where_the_checkpoint_is(tmp_path, monkeypatch):
    from tak.training import loop

    def ctrl_c(*args):
        signal.raise_signal(signal.SIGINT)
        return batch_indices(*args)
    monkeypatch.setattr(loop, "batch_indices", ctrl_c)
    code, out, err = tak_cli("train", "--method", "nonlinear", *SMALL, "--out", tmp_path)
    ckpt = tmp_path / "nonlinear" / "rotten_tomatoes" / "checkpoint.safetensors"
    assert code == 130 and out == "" and "Traceback" not in err, err
    assert err.splitlines()[-1] == (f"tak train: nonlinear/rotten_tomatoes: stopped by a signal at step 1 of 2; its "
                                    f"checkpoint is {ckpt}: start the same run again to continue")

    monkeypatch.setattr(loop, "_backbone", lambda *args: signal.raise_signal(signal.SIGINT))  # before training
    code, out, err = tak_cli("train", "--method", "nonlinear", *SMALL, "--out", tmp_path / "other")
    assert (code, out, err.splitlines()[-1]) == (130, "", "tak train: interrupted")


def test_train_config_file_with_flag_overrides(tmp_path):
    config = {"method": "nonlinear", "task": "subjectivity", "tasks": TASKS, "steps": 5, "batch_size": 4,
              "max_length": 16, "max_train": 40, "max_test": 8, "trainable": "encoder.layer.5.attention.*",
              "progress": False, "lr": 3e-5, "seed": 4, "eval_batch_size": 64, "out": str(tmp_path / "from-yaml")}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    printed = json.loads(ok("train", "--config", path, "--steps", "2", "--out", tmp_path / "flags"))
    tv_path = tmp_path / "flags" / "nonlinear" / "subjectivity" / "task_vector.safetensors"
    assert Path(printed["task_vector"]) == tv_path and not (tmp_path / "from-yaml").exists()
    tv = TaskVector.load(tv_path)
    assert tv.meta["steps"] == 2 and tv.meta["seed"] == 4 and tv.meta["hparams"]["lr"] == 3e-5  # flag > YAML
    assert tv.meta["trainable"] == "encoder.layer.5.attention.*" and tv.task == "subjectivity"
    saved = yaml.safe_load((tv_path.parent / "config.yaml").read_text())
    assert saved == {**saved, **config, "steps": 2, "out": str(tmp_path / "flags")}

    path.write_text(yaml.safe_dump({**config, "stepz": 3}))
    code, _, err = tak_cli("train", "--config", path)
    assert code == 2 and "unknown TrainConfig keys ['stepz']" in err


def test_train_flags_parse_as_their_config_types(tmp_path):
    """One name stays a name ("attention" is a selection, not a pattern); commas make lists."""
    ok("train", "--method", "nonlinear", "--out", tmp_path, *SMALL, "--steps", "1", "--trainable", "attention",
       "--tasks", "rotten_tomatoes", "--compress", "none", "--warmup-steps", "1")
    saved = yaml.safe_load((tmp_path / "nonlinear" / "rotten_tomatoes" / "config.yaml").read_text())
    assert saved["trainable"] == "attention" and saved["tasks"] == ["rotten_tomatoes"]
    assert saved["compress"] is None and saved["warmup_steps"] == 1
    code, _, err = tak_cli("train", "--method", "nonlinear", "--out", tmp_path / "w", *SMALL, "--layer-weights", "*.query=0.5")
    assert code == 2 and "layer_weights={'*.query': 0.5} would do nothing" in err  # parsed, then refused: no penalty
    tv = TaskVector.load(tmp_path / "nonlinear" / "rotten_tomatoes" / "task_vector.safetensors")
    assert len({k.split(".")[2] for k in tv.tensors}) == 6 and all("attention" in k for k in tv.tensors)

    patterns = "encoder.layer.5.attention.self.query.*, encoder.layer.5.attention.self.key.*"  # spaces are dropped
    ok("train", "--method", "linear", "--out", tmp_path, *SMALL, "--steps", "1", "--trainable", patterns)
    tv = TaskVector.load(tmp_path / "linear" / "rotten_tomatoes" / "task_vector.safetensors")
    assert tv.meta["trainable"] == patterns.replace(" ", "").split(",")
    assert sorted(tv.tensors) == [f"encoder.layer.5.attention.self.{m}.{p}" for m in ("key", "query")
                                  for p in ("bias", "weight")]


# --- tak eval of a backbone registered by name ---------------------------------------------------------

TOY, TOY_TASKS = "toy-eval-mlp", ["toy-eval-a", "toy-eval-b"]


def toy_backbone(pretrained=None, dtype=torch.float64, bf16_weights=False):
    """A float64 MLP, or one in ``dtype``; ``bf16_weights``: its weights rounded to bf16 (kept in ``dtype``)."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 6)).double()
    model.to(torch.bfloat16 if bf16_weights else dtype).to(dtype)
    heads = {name: Head(torch.randn(3, 6, generator=torch.Generator().manual_seed(i), dtype=torch.float64),
                        normalize=False, scale=1.0) for i, name in enumerate(TOY_TASKS)}
    inputs = lambda xs: torch.stack(xs).to(next(model.parameters()).dtype)  # noqa: E731  (as CLIP's do)
    return GenericBackbone(model, inputs=inputs, heads=heads, name=TOY, modalities=("image",))


def toy_task(name, root, seed=0, **options):
    g = torch.Generator().manual_seed(TOY_TASKS.index(name))
    xs = torch.randn(40, 5, generator=g, dtype=torch.float64)
    examples = [(x, int(torch.randint(3, (), generator=g))) for x in xs]
    return Task(name, ["a", "b", "c"], "image", ["{}"],
                {"train": lambda: examples[:20], "val": lambda: examples[20:30], "test": lambda: examples[30:]})


@pytest.fixture
def toy_registered():
    from tak.backbones import _REGISTERED
    from tak.data.registry import _TASKS

    register_backbone(TOY, toy_backbone, "test: a float64 MLP")
    for name in TOY_TASKS:
        register_task(name, lambda root, name=name, **kw: toy_task(name, root, **kw), "test: 3 random classes")
    yield
    _REGISTERED.pop(TOY)
    for name in TOY_TASKS:
        _TASKS.pop(name)


def _handmade_task_vectors(folder, backbone, regime, seed) -> list:
    """The paths of one random τ (entries ~ 0.8 N(0, 1)) per toy task, for ``backbone``'s parameters, in ``folder``."""
    g = torch.Generator().manual_seed(seed)
    paths = []
    for name in TOY_TASKS:
        tensors = {k: 0.8 * torch.randn(p.shape, generator=g, dtype=p.dtype)
                   for k, p in backbone.model.named_parameters()}
        meta = {"base_model": TOY, "fingerprint": backbone.fingerprint, "regime": regime, "task": name,
                "method": "handmade"}
        paths.append(folder / f"{name}.safetensors")
        TaskVector(tensors, meta).save(paths[-1])
    return paths


@pytest.mark.parametrize("regime", ["nonlinear", "linear"])
@pytest.mark.filterwarnings("ignore:tak.linearize. generic torch.func.jvp path")
def test_eval_analyses_evaluate_each_task_vector_combination(tmp_path, toy_registered, regime):
    """ξ(α1, α2) of `tak eval --analyses` equals ξ computed with a network built afresh for every τ."""
    backbone = toy_backbone()
    paths = _handmade_task_vectors(tmp_path, backbone, regime, seed=5)
    ok("eval", *paths, "--analyses", "--alphas", "0,1", "--device", "cpu", "--out", tmp_path / "eval")
    found = json.loads((tmp_path / "eval" / "results.json").read_text())["analyses"]["disentanglement"]

    tvs = [TaskVector.load(p) for p in paths]
    tasks = [toy_task(name, None) for name in TOY_TASKS]

    def predict(tensors, tagged):
        name, x = tagged
        net = backbone.model if tensors is None else apply(backbone, TaskVector(dict(tensors), dict(tvs[0].meta)))
        with torch.no_grad():
            return backbone.head(tasks[TOY_TASKS.index(name)])(net(x))
    batches = [[(t.name, torch.stack([x for x, _ in t.split("val")]))] for t in tasks]
    xi = analyses.disentanglement_error(predict, tvs[0].tensors, tvs[1].tensors, *batches, found["alphas"],
                                        found["alphas"])
    assert xi.max() > 0  # the task vectors interfere: ξ tells the combinations apart
    assert found["xi"] == xi.tolist()


@pytest.mark.filterwarnings("ignore:tak.linearize. generic torch.func.jvp path")
def test_eval_analyses_linearization_error_is_against_the_mean_task_vector(tmp_path, toy_registered):
    """`tak eval --analyses`' linearization error of a task: the mean over its inputs of
    ‖mean_t f(x; θ0 + τ_t) − f(x; θ0 + mean_t τ_t)‖₁, networks built afresh."""
    backbone = toy_backbone()
    paths = _handmade_task_vectors(tmp_path, backbone, "nonlinear", seed=11)
    ok("eval", *paths, "--analyses", "--alphas", "0,1", "--device", "cpu", "--out", tmp_path / "eval")
    found = json.loads((tmp_path / "eval" / "results.json").read_text())["analyses"]["linearization_error"]

    tvs = [TaskVector.load(p) for p in paths]

    def outputs(tensors, x):
        with torch.no_grad():
            return backbone.model(x) if tensors is None else apply(
                backbone, TaskVector(dict(tensors), dict(tvs[0].meta)))(x)
    for name in TOY_TASKS:
        x = torch.stack([x for x, _ in toy_task(name, None).split("val")])
        errors = analyses.linearization_error(outputs, [tv.tensors for tv in tvs], [x])
        assert errors.min() > 0 and found[name] == pytest.approx(errors.mean().item(), rel=1e-9)


@pytest.mark.filterwarnings("ignore:tak.linearize. generic torch.func.jvp path")
def test_eval_analyses_of_a_bf16_backbone_are_those_of_its_weights_in_float(tmp_path, toy_registered):
    """A bf16 backbone's analyses run in float32: its J τ, edits and linearization error are those of the same
    (bf16-rounded) weights in float64, not bf16 rounding noise (τ is small against the features)."""
    backbone = toy_backbone()
    g = torch.Generator().manual_seed(7)
    found = {}
    for dtype, rounded in (("bfloat16", False), ("float64", True)):
        paths = []
        for name in TOY_TASKS:
            tensors = {k: (1e-3 * torch.randn(p.shape, generator=g, dtype=p.dtype)).bfloat16().to(getattr(torch, dtype))
                       for k, p in backbone.model.named_parameters()}  # bf16 τ, as a bf16 run trains them
            meta = {"base_model": TOY, "fingerprint": backbone.fingerprint, "regime": "linear", "task": name,
                    "method": "handmade", "backbone_options": {"dtype": dtype, "bf16_weights": rounded}}
            paths.append(tmp_path / dtype / f"{name}.safetensors")
            TaskVector(tensors, meta).save(paths[-1])
        g = torch.Generator().manual_seed(7)  # the same τ for both
        ok("eval", *paths, "--analyses", "--alphas", "0,1", "--device", "cpu", "--out", tmp_path / dtype / "eval")
        found[dtype] = json.loads((tmp_path / dtype / "eval" / "results.json").read_text())["analyses"]
    bf16, exact = found["bfloat16"], found["float64"]
    for name in TOY_TASKS:
        for where in ("in", "out"):
            assert bf16["support_localization"][name][where] == pytest.approx(
                exact["support_localization"][name][where], rel=1e-3)
        assert bf16["linearization_error"][name] == pytest.approx(exact["linearization_error"][name], rel=1e-3, abs=1e-6)
    assert bf16["normalcy_auroc"] == exact["normalcy_auroc"]
