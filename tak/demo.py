"""``tak demo``: the whole pipeline on the shipped MiniLM and embedded text tasks, on a CPU in minutes.

Per method (non-linear, linear, TAK, DELTA) it trains one task vector per task (TAK's factors: the
other demo tasks' KFAC, merged; DELTA's: EK-FAC of a reference set of other embedded corpora), merges
them by task addition at α = 1 and at the α best on validation, and reports absolute and normalized
test accuracy (and each task's individual accuracy), and the merged model's accuracy on the joint
problem of the two 20 Newsgroups parts (10 topics together: the class-partition protocol of TAK
Sec. F.7). Writes ``results.json``, plots and ``report.md`` to ``--out``.

The profiles trade fidelity for time: the task-arithmetic setup the papers build on (Ilharco et al. 2023)
fine-tunes every layer for 2,000 steps of batch 128; the demo fine-tunes the top encoder layers (the rest of the network still runs forward, and the
penalties and linearization act on the trained layers) for tens of steps at one learning rate for
all methods (3e-4, TAK's). The other hyperparameters are the papers' text settings (T5: weight
decay 0.01, β = 20, γ = 0.01).
"""
import json
import time
from pathlib import Path

import torch

from .arithmetic.compose import Evaluator
from .arithmetic.plots import alpha_sweeps, bar_table
from .arithmetic.protocols import task_addition
from .arithmetic.report import Report, markdown_table
from .curvature.distributed import on_main_rank
from .data import get_task
from .io import write_text
from .task_vector import TaskVector
from .training import TrainConfig, train
from .training.loop import _backbone, _device

TASKS = ["rotten_tomatoes", "20news-part0", "20news-part1", "reuters_r8"]
REFERENCE = ["subjectivity", "20news-part3"]
METHODS = ["nonlinear", "linear", "tak", "delta"]
PLOTS = ("alpha_sweep.png", "merged_per_task.png")  # written by the demo next to results.json

PROFILES = {
    "quick": dict(steps=12, batch_size=16, max_length=32, max_train=300, max_test=64, factor_examples=32,
                  trainable=["encoder.layer.4.*", "encoder.layer.5.*"], alphas=[round(0.25 * i, 2) for i in range(9)]),
    "default": dict(steps=30, batch_size=32, max_length=40, max_train=1000, max_test=300, factor_examples=128,
                    trainable=["encoder.layer.4.*", "encoder.layer.5.*"], alphas=[round(0.2 * i, 2) for i in range(11)]),
}


def config_for(method: str, task: str, profile: dict, out: Path, device=None, progress=True) -> TrainConfig:
    return TrainConfig(
        method=method, task=task, tasks=TASKS, reference=REFERENCE, backbone="minilm", out=str(out / "runs"),
        steps=profile["steps"], batch_size=profile["batch_size"], max_length=profile["max_length"],
        max_train=profile["max_train"], max_test=profile["max_test"], factor_examples=profile["factor_examples"],
        trainable=profile["trainable"], checkpoint_every=profile["steps"], device=device,
        progress=progress)  # hyperparameters: the papers' text settings (tak.methods.hyperparameter_defaults)


def run(out="tak-demo", *, quick: bool = False, device=None, progress: bool = True, methods=None) -> dict:
    """Train, merge and evaluate; returns the results written to ``{out}/results.json``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)  # an out that is a file fails before any work
    profile = PROFILES["quick" if quick else "default"]
    methods = methods or METHODS
    started = time.time()
    torch.manual_seed(0)
    first = config_for(methods[0], TASKS[0], profile, out, device, progress)
    backbone = _backbone(first, _device(first))  # the backbone the runs use: one load
    tasks = [get_task(t, max_train=profile["max_train"], max_test=profile["max_test"]) for t in TASKS]
    kw = dict(batch_size=256, device=backbone.device, cache={})
    zero_shot = Evaluator(backbone, tasks, "test", joint=True, **kw).sweep(None, [0.0])[0.0]
    results = {"profile": "quick" if quick else "default", "tasks": TASKS, "reference": REFERENCE,
               "zero_shot": {t: zero_shot.pop(t) for t in TASKS}, "zero_shot_joint": zero_shot, "methods": {}}
    for method in methods:
        tvs = []
        for task in TASKS:
            result = train(config_for(method, task, profile, out, device, progress))
            tvs.append(result.task_vector)
        addition = task_addition(backbone, tvs, tasks, alphas=profile["alphas"], **kw)
        results["methods"][method] = {
            "individual": addition.individual,
            "alpha1": {"abs": addition.alpha1["abs"], "norm": addition.alpha1["norm"]},
            "best": {"abs": addition.best["abs"], "norm": addition.best["norm"], "alpha": addition.best["alpha"]},
            "per_task": {"alpha1": addition.alpha1["per_task"], "best": addition.best["per_task"]},
            "val_curve": addition.val_curve,
            "joint": addition.joint,
        }
    results["seconds"] = round(time.time() - started, 1)
    results["plots"] = list(PLOTS)  # for tak report: this run's, whatever else the folder holds
    on_main_rank(lambda: _write(out, results), backbone.device)  # under torchrun: one writer, the others wait
    return results


def table(results: dict) -> str:
    """The demo's table (markdown): merged absolute / normalized accuracy at α = 1 and best α."""
    lines = ["| method | abs. acc. (α=1) | norm. acc. (α=1) | abs. acc. (best α) | norm. acc. (best α) | best α | "
             + " | ".join(f"{t} (indiv.)" for t in results["tasks"]) + " |",
             "|---" * (6 + len(results["tasks"])) + "|"]
    zs = results["zero_shot"]
    lines.append(f"| zero-shot | {sum(zs.values()) / len(zs):.1f} | | | | | "
                 + " | ".join(f"{zs[t]:.1f}" for t in results["tasks"]) + " |")
    def pct(value):  # a normalized accuracy is None where an individual accuracy is 0
        return "–" if value is None else f"{value:.1f}"
    for name, r in results["methods"].items():
        lines.append(f"| {name} | {r['alpha1']['abs']:.1f} | {pct(r['alpha1']['norm'])} | {r['best']['abs']:.1f} | "
                     f"{pct(r['best']['norm'])} | {r['best']['alpha']:.2f} | "
                     + " | ".join(f"{r['individual'][t]:.1f}" for t in results["tasks"]) + " |")
    joint = [{"method": "zero-shot (θ0)", "joint problem": name, "acc. (α=1)": acc}
             for name, acc in results.get("zero_shot_joint", {}).items()]
    joint += [{"method": method, "joint problem": f"{name} = {' + '.join(j['parts'])} ({j['classes']} classes)",
               "acc. (α=1)": j["alpha1"], "acc. (best α)": j["best"]["acc"], "best α": f"{j['best']['alpha']:g}"}
              for method, r in results["methods"].items() for name, j in r.get("joint", {}).items()]
    return "\n".join(lines) + (f"\n\nJoint problem (test, %):\n\n{markdown_table(joint)}" if joint else "")


def _write(out: Path, results: dict) -> None:
    curves = {m: (list(r["val_curve"]), list(r["val_curve"].values())) for m, r in results["methods"].items()}
    sweep = alpha_sweeps(curves, out / PLOTS[0], marks={m: r["best"]["alpha"] for m, r in results["methods"].items()},
                         title="task addition on validation: mean normalized accuracy vs α")
    bars = bar_table({m: r["per_task"]["alpha1"] for m, r in results["methods"].items()}, out / PLOTS[1],
                     title="merged model (α = 1): test accuracy per task")
    write_text(out / "results.json", json.dumps(results, indent=2))
    report = Report("tak demo: task addition on MiniLM")
    report.section("Setup", f"Tasks: {', '.join(results['tasks'])}; DELTA reference set: "
                   f"{', '.join(results['reference'])}; profile {results['profile']}; {results['seconds']} s.")
    report.section("Merged accuracy (test, %)", table(results))
    report.image(sweep, "Mean normalized validation accuracy of θ0 + α Σ τ_t (α picked here, never on test).")
    report.image(bars, "Test accuracy per task of the merged model at α = 1.")
    report.write(out / "report.md")


def load_task_vectors(out, method: str) -> list[TaskVector]:
    """The demo's task vectors of ``method``, in task order."""
    return [TaskVector.load(Path(out) / "runs" / method / t / "task_vector.safetensors") for t in TASKS]
