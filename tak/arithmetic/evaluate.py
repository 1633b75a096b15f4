"""``tak eval`` and ``tak report``: protocols and analyses of saved task vectors, and their report.

``evaluate_files`` loads task vectors (refusing mixed base models, architectures or regimes),
rebuilds their backbone and tasks from the metadata, runs the addition or negation protocol and,
with ``analyses``, the disentanglement, normalcy, linearization-error and support-localization
analyses; it writes ``results.json`` and PNG plots to ``out``. ``render_report`` turns result
folders (of ``tak eval`` or ``tak demo``) into one markdown report with its images beside it.
"""
import json
import shutil
from pathlib import Path

import torch

from ..backbones import load_backbone
from ..curvature.outputs import to_device
from ..data import get_task
from ..evaluation import loader
from ..io import atomic_file, write_text
from ..task_vector import TaskVector, check_compatible, check_same_backbone
from . import analyses, plots
from .compose import apply, check_backbone, combine
from .merges import MERGES
from .protocols import DEFAULT_ALPHAS, task_addition, task_negation
from .report import Report

_ANALYSIS_EXAMPLES = 64
ADDITION_SWEEP_TITLE = "task addition on validation: mean normalized accuracy (joint problems: accuracy) vs α"
_PAIR_ALPHAS = [0.0, 0.5, 1.0, 1.5, 2.0]


def evaluate_files(paths, *, protocol="addition", target=None, control=None, alphas=None, run_analyses=False,
                   data_root=None, max_train=None, max_test=None, pretrained=None, device=None, out,
                   merge="task_arithmetic", merge_options=None) -> dict:
    """Run ``protocol`` ("addition" or "negation") on the task vectors in ``paths``; write to ``out``.
    Addition merges them with ``merge`` (a name of ``tak.arithmetic.merges.MERGES``, ``merge_options``)."""
    if Path(out).exists() and not Path(out).is_dir():
        raise ValueError(f"--out {out}: a file; name a folder for results.json and the plots")
    tvs = [TaskVector.load(p) for p in paths]
    merged = [str(p) for p, tv in zip(paths, tvs) if "merged_from" in tv.meta]
    if merged:
        raise ValueError(f"{merged}: merged task vectors (tak merge); evaluate the task vectors they were merged from "
                         "(tak eval <files> --merge <method> merges and evaluates them on each of their tasks)")
    if protocol not in ("addition", "negation"):
        raise ValueError(f"protocol must be 'addition' or 'negation', got {protocol!r}")
    if protocol == "negation" and (merge != "task_arithmetic" or merge_options):
        raise ValueError(f"merge={merge!r} applies to the addition protocol only")
    if protocol == "addition" and (target is not None or control is not None):
        raise ValueError("--target and --control apply to the negation protocol only")
    if run_analyses and (protocol != "addition" or len(tvs) < 2):
        raise ValueError("the analyses compare task vectors: they need the addition protocol and at least two")
    if merge not in MERGES:
        raise ValueError(f"unknown merge {merge!r}; valid names: {', '.join(MERGES)}")
    if protocol == "negation":  # the arguments are checked before a backbone is loaded
        if control is None:
            raise ValueError("negation needs --control (the task whose accuracy must be kept)")
        if target is None and len(tvs) > 1:
            raise ValueError(f"negation negates one task vector, got {len(tvs)} ({[t.task for t in tvs]}): give one "
                             "file, or --target <task> to pick one")
        tv = tvs[0] if target is None else next((t for t in tvs if t.task == target), None)
        if tv is None:
            raise ValueError(f"--target {target!r}: none of the task vectors is of that task "
                             f"({[t.task for t in tvs]})")
        if control == tv.task:
            raise ValueError(f"--control {control!r} is the task negated; name another task to keep")
    meta = tvs[0].meta
    check_same_backbone(tvs)  # one backbone serves them all
    if "base_model" not in meta:
        raise ValueError(f"{paths[0]}: its metadata names no base_model; it was not written by tak.train")
    source = meta.get("source") or {}
    if "pretrained" in source:  # recorded (None: the spec's default weights): the flag may only agree
        if pretrained is not None and pretrained != source["pretrained"]:
            raise ValueError(f"--pretrained {pretrained!r}: the task vectors were trained on {meta['base_model']!r} "
                             f"with pretrained={source['pretrained']!r}; adding them to other weights is refused")
        pretrained = source["pretrained"]
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    backbone = load_backbone(meta["base_model"], pretrained=pretrained, device=device,
                             **({"max_length": meta["max_length"]} if "max_length" in meta else {}),
                             **meta.get("backbone_options", {}))  # as the training loaded it
    check_backbone(backbone, tvs)  # (files of an earlier tak get today's fingerprint)
    check_compatible(tvs)
    roots = {tv.task: tv.meta.get("data_root") if data_root is None else data_root for tv in tvs}  # as trained

    def get(name):  # a task no task vector is of (negation's control): the first one's root
        return get_task(name, root=roots.get(name, roots[tvs[0].task]), max_train=max_train, max_test=max_test)
    if protocol == "negation":
        target_task, control_task = get(tv.task), get(control)
        datasets = {t.parent or t.name for t in (target_task, control_task)}  # parts of one dataset share files
        if control_task.source is not None and control_task.source == target_task.source and len(datasets) == 2:
            raise ValueError(f"--control {control!r} would be read from {tv.task}'s own files ({target_task.source}, a "
                             f"dataset's folder, which any task name finds); pass --data-root with the folder that "
                             f"holds {control}/")
    alphas = list(DEFAULT_ALPHAS if alphas is None else alphas)
    if not alphas:
        raise ValueError("alphas is empty")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    kw = dict(device=device)
    used = [(p, t) for p, t in zip(paths, tvs) if protocol == "addition" or t is tv]  # negation: the negated one
    results = {"task_vectors": [str(p) for p, _ in used], "regime": tvs[0].regime, "base_model": meta["base_model"],
               "methods": sorted({str(t.meta.get("method")) for _, t in used}), "protocol": protocol, "alphas": alphas}
    if protocol == "negation":
        result = task_negation(backbone, tv, target_task, control_task, alphas=alphas, **kw)
        # "target" / "control" are the accuracies (NegationResult); the task names get keys of their own
        results["negation"] = {**result.to_dict(), "target_task": tv.task, "control_task": control}
        curves = {"target": (list(result.val_curve), [v["target"] for v in result.val_curve.values()]),
                  "control": (list(result.val_curve), [v["control"] for v in result.val_curve.values()])}
        written = [plots.alpha_sweeps(curves, out / "negation_sweep.png", marks=dict.fromkeys(curves, result.alpha)
                                      if result.constraint_met else None,
                                      title=f"negating {tv.task}: validation accuracy vs α")]
    else:
        tasks = [get(tv.task) for tv in tvs]
        result = task_addition(backbone, tvs, tasks, alphas=alphas, merge=merge, merge_options=merge_options, **kw)
        results.update(result.to_dict(), merge={"method": merge, **(merge_options or {})})
        name = "+".join(results["methods"])
        curves = {name: (list(result.val_curve), list(result.val_curve.values())),
                  **{f"{joint} (joint)": (list(j["val_curve"]), list(j["val_curve"].values()))
                     for joint, j in result.joint.items()}}
        marks = {name: result.best["alpha"], **{f"{joint} (joint)": j["best"]["alpha"] for joint, j in result.joint.items()}}
        written = [plots.alpha_sweeps(curves, out / "alpha_sweep.png", marks=marks, title=ADDITION_SWEEP_TITLE)]
        if run_analyses:
            results["analyses"], figures = _analyses(backbone, tvs, tasks, out, device)
            written += figures
    results["plots"] = [p.name for p in written]  # this run's, whatever else the folder holds
    write_text(out / "results.json", json.dumps(results, indent=2, default=float))
    return results


def _inputs(backbone, task, device, n=_ANALYSIS_EXAMPLES) -> list:
    examples = task.split("val")[:n]
    return [to_device(x, device) for x, _ in loader(backbone, examples, 32)]


def _analyses(backbone, tvs, tasks, out: Path, device) -> tuple[dict, list[Path]]:
    """Disentanglement (first pair), normalcy AUROC, linearization error and support localization, in float32 at
    least: a bf16 / fp16 backbone is cast (in place: the analyses come last), and so are bf16 / fp16 task vectors,
    since the analyses take differences of features (J τ = f_lin − f0, feature edits, the linearization error)
    and means of τ that bf16 rounding would swamp. Returns (the results, the plots written)."""
    if any(p.is_floating_point() and torch.finfo(p.dtype).bits < 32 for p in backbone.model.parameters()):
        backbone.to(torch.float32)
    tvs = [TaskVector({k: v.to(torch.promote_types(v.dtype, torch.float32)) for k, v in tv.tensors.items()}, tv.meta)
           for tv in tvs]
    inputs = {t.name: _inputs(backbone, t, device) for t in tasks}
    built = {}  # one network θ0 + τ at a time: its τ's tensors (kept, so that `is` is exact) and itself

    def model(tau):
        if tau is None:
            return backbone.model.eval()
        # not id(): a freed τ's id is reused by the next one; the regime picks plain vs linearized network
        if built.get("tensors") is not tau.tensors or built.get("regime") != tau.regime:
            built.clear()
            built["net"], built["tensors"], built["regime"] = apply(backbone, tau), tau.tensors, tau.regime
        return built["net"]

    def feats_of(net, batch):
        with torch.no_grad():
            return backbone.features(net, batch)

    def feats(tau, batch):
        return feats_of(model(tau), batch)

    found, written = {}, []
    as_tv = lambda tensors: None if tensors is None else TaskVector(tensors, dict(tvs[0].meta))  # noqa: E731
    if len(tvs) >= 2:
        t1, t2 = tasks[0], tasks[1]
        heads = {t1.name: backbone.head(t1), t2.name: backbone.head(t2)}
        tagged1 = [(t1.name, b) for b in inputs[t1.name]]
        tagged2 = [(t2.name, b) for b in inputs[t2.name]]

        def predict(tau, tagged):
            name, batch = tagged
            return heads[name](feats(as_tv(analyses._tensors(tau)) if tau is not None else None, batch))
        xi = analyses.disentanglement_error(predict, tvs[0].tensors, tvs[1].tensors, tagged1, tagged2,
                                            _PAIR_ALPHAS, _PAIR_ALPHAS)
        written.append(plots.disentanglement_heatmap(xi, _PAIR_ALPHAS, _PAIR_ALPHAS, out / "disentanglement.png",
                                                     title=f"ξ(α1, α2): {t1.name} × {t2.name}"))
        found["disentanglement"] = {"tasks": [t1.name, t2.name], "alphas": _PAIR_ALPHAS, "xi": xi.tolist()}
    normalcy, localization, scores, edits = {}, {}, {}, {}
    for tv, t in zip(tvs, tasks):
        others = [b for o in tasks if o.name != t.name for b in inputs[o.name]]
        if not others:
            break
        tangent = TaskVector(tv.tensors, {**tv.meta, "regime": "linear"})  # f0 + J τ: J τ exactly, any regime

        def jvp(tau, batch):  # f_lin − f0 with f0 from the same forward (one precision: cuDNN's TF32 convs aside)
            with model(tangent).keeping_primal() as at_theta0:
                return feats(tangent, batch) - feats_of(at_theta0, batch)
        inside = analyses.normalcy_scores(jvp, tv.tensors, inputs[t.name])
        outside = analyses.normalcy_scores(jvp, tv.tensors, others)
        normalcy[t.name] = analyses.auroc(inside, outside)
        scores[f"{t.name} (in)"], scores[f"{t.name} (out)"] = inside, outside
        mse_in, mse_out = analyses.support_localization(lambda tau, b: feats(None if tau is None else tv, b),
                                                        tv.tensors, inputs[t.name], others)
        localization[t.name] = {"in": mse_in.mean().item(), "out": mse_out.mean().item()}
        edits[f"{t.name} (in)"], edits[f"{t.name} (out)"] = mse_in, mse_out
    if normalcy:
        written.append(plots.histograms(scores, out / "normalcy.png", xlabel="‖J f(x; θ0) τ_t‖²", log=True,
                                        title="normalcy ‖J τ_t x‖²: in-task vs other tasks"))
        written.append(plots.histograms(edits, out / "support_localization.png", log=True,
                                        title="support localization: feature edit distance, in-task vs other tasks",
                                        xlabel="(1/d) ‖f(x; θ0 + τ_t) − f(x; θ0)‖²"))
        found["normalcy_auroc"], found["support_localization"] = normalcy, localization
    if len(tvs) >= 2:
        batches = [(t.name, b) for t in tasks for b in inputs[t.name]]
        outputs = [[feats(tv, b) for _, b in batches] for tv in (*tvs, combine(tvs, 1.0 / len(tvs)))]  # a net each
        errors = {}
        for i, (name, _) in enumerate(batches):
            each = torch.stack([per_tv[i] for per_tv in outputs[:-1]]).mean(0)
            errors.setdefault(name, []).append((each - outputs[-1][i]).abs().sum(-1).cpu())
        errors = {name: torch.cat(err) for name, err in errors.items()}
        written.append(plots.histograms(errors, out / "linearization_error.png", title="linearization error per task",
                                        xlabel="‖mean_t f(x; θ_t) − f(x; mean θ)‖₁"))
        found["linearization_error"] = {k: v.mean().item() for k, v in errors.items()}
    return found, written


def render_report(folders, out) -> Path:
    """``out/report.md`` from the ``results.json`` (and PNGs) of each folder in ``folders``. Every results.json is
    read before ``out`` is made, and an ``out`` this call made is removed again when rendering fails."""
    out = Path(out)
    runs = [_read_results(Path(folder)) for folder in folders]
    made = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    report = Report("Task arithmetic report")
    try:
        for i, (folder, path, results) in enumerate(runs):
            try:
                _render(report, results, folder, path, out, f"{i}-")
            except (KeyError, TypeError, IndexError, AttributeError) as e:
                raise ValueError(f"{path}: not as `tak demo` or `tak eval` writes results.json "
                                 f"({type(e).__name__}: {e})") from None
        return report.write(out / "report.md")
    except BaseException:
        if made:
            shutil.rmtree(out, ignore_errors=True)
        raise


def _read_results(folder: Path) -> tuple[Path, Path, dict]:
    """(folder, its results.json, the results) of a ``tak demo`` / ``tak eval`` folder (or its results.json)."""
    folder = folder.parent if folder.name == "results.json" else folder
    path = folder / "results.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no results.json (run `tak demo` or `tak eval --out {folder}` first)")
    try:
        results = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON ({e})") from None
    if not isinstance(results, dict) or not {"zero_shot", "alpha1", "negation", "analyses"} & results.keys():
        raise ValueError(f"{path}: not the results of `tak demo` or `tak eval` (no zero_shot, alpha1, negation "
                         "or analyses entry)")
    return folder, path, results


def _render(report: Report, results: dict, folder: Path, path: Path, out: Path, prefix: str) -> None:
    """The section of the results ``path`` of ``folder``; its plots are copied to ``out/{prefix}{name}`` (unless
    ``out`` is ``folder``)."""
    report.section(str(folder), _setup(results))
    if "zero_shot" in results:  # a tak demo folder
        from ..demo import table
        report.text(table(results))
    if "alpha1" in results:
        report.table([{"task": t, "individual": results["individual"][t],
                       "merged (α=1)": results["alpha1"]["per_task"][t],
                       f"merged (best α = {results['best']['alpha']:g})": results["best"]["per_task"][t]}
                      for t in results["individual"]])
        report.table([{"": name, "absolute": results[key]["abs"], "normalized": results[key]["norm"]}
                      for name, key in (("α = 1", "alpha1"), (f"best α = {results['best']['alpha']:g}", "best"))])
    if results.get("joint"):
        report.table([{"joint problem (class partition)": f"{name} = {' + '.join(j['parts'])}",
                       "classes": j["classes"], "merged (α = 1)": j["alpha1"], "merged (best α)": j["best"]["acc"],
                       "best α": f"{j['best']['alpha']:g}"} for name, j in results["joint"].items()])
    if "negation" in results:
        n = results["negation"]
        target, control = n["target_task"], n["control_task"]
        report.table([{"": "pretrained", target: n["pretrained_target"], control: n["pretrained_control"]},
                      {"": f"θ0 − {n['alpha']} τ", target: n["target"], control: n["control"]}])
    found = results.get("analyses", {})
    if "normalcy_auroc" in found:
        report.table([{"task": t, "normalcy AUROC": found["normalcy_auroc"][t],
                       "edit distance in-domain": found["support_localization"][t]["in"],
                       "edit distance out-of-domain": found["support_localization"][t]["out"]}
                      for t in found["normalcy_auroc"]], floatfmt=".4g")
    listed = results.get("plots")  # None: results of an earlier tak, which did not list them
    if listed is not None and any(Path(name).name != name for name in listed):
        raise ValueError(f"{path}: plots {listed} must name files of its folder")
    for png in sorted(folder.glob("*.png")) if listed is None else [folder / name for name in listed]:
        if not png.is_file():
            raise FileNotFoundError(f"{png}: a plot {path} lists is missing")
        target = png if folder.resolve() == out.resolve() else out / f"{prefix}{png.name}"
        if target != png:
            with atomic_file(target) as tmp:
                shutil.copyfile(png, tmp)
        report.image(target, png.stem.replace("_", " "))


def _setup(results: dict) -> str:
    """What a ``tak eval`` folder evaluated, in a line ("" for a demo's, whose table says it)."""
    if "protocol" not in results:
        return ""
    merge = results.get("merge") or {}
    merged = ", ".join([merge.get("method", "task_arithmetic")] + [f"{k}={v}" for k, v in merge.items() if k != "method"])
    alphas = results.get("alphas")
    grid = f"; α grid {min(alphas):g} to {max(alphas):g} ({len(alphas)} values)" if alphas else ""
    return (f"{results['protocol']} of {len(results['task_vectors'])} task vector(s) of {', '.join(results['methods'])} "
            f"({results['regime']}) on {results['base_model']}"
            + (f"; merged by {merged}" if results["protocol"] == "addition" else "") + grid + ".")
