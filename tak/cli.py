"""The ``tak`` command line: demo, train, fit, merge, eval, report, list.

    tak demo [--quick] [--out DIR]                     the main job (see tak.demo)
    tak train --method tak --task 20news-part0 --tasks 20news-part0,20news-part1,... [--config run.yaml] [--KEY VALUE ...]
    tak fit --kind kfac --task 20news-part1 --out 20news-part1.kfac.safetensors   (then: tak train --factor-files ...)
    tak merge TV.safetensors ... --method ties --out merged.safetensors
    tak eval TV.safetensors ... [--merge ties] [--protocol addition|negation --target T --control C] [--analyses] --out DIR
    tak report DIR [DIR ...] --out report_dir
    tak list methods|tasks|backbones|merges
"""
import argparse
import dataclasses
import functools
import json
import math
import os
import sys
import textwrap
import types
import typing
from pathlib import Path


class _Formatter(argparse.HelpFormatter):
    """Help lines wrapped at spaces only, so names with hyphens (``hf-clip:<name-or-path>``) stay whole."""

    def _split_lines(self, text, width):
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


def _parse_value(text: str, annotation):
    """A command-line string as the TrainConfig field type."""
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    kinds = set(typing.get_args(annotation)) if union else {annotation}  # list[str]: itself, not its str
    if text.lower() in ("none", "null") and type(None) in kinds:
        return None
    if list in {typing.get_origin(k) or k for k in kinds}:
        items = [t.strip() for t in text.split(",") if t.strip()]
        return text if str in kinds and len(items) == 1 else items  # trainable: "all" stays a name
    mapping = next((k for k in kinds if typing.get_origin(k) is dict), None)
    if mapping is not None and typing.get_args(mapping)[1] is not float:  # backbone_options: a JSON object
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = None
        if not isinstance(value, dict):
            raise argparse.ArgumentTypeError(f"expected a JSON object, e.g. '{{\"prefix\": \"mnli\"}}', got {text!r}")
        return value
    if mapping is not None:
        try:
            return {k: float(v) for k, v in (item.split("=") for item in text.split(",") if item)}
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected PATTERN=NUMBER,..., got {text!r}") from None
    if bool in kinds:
        if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")
        return text.lower() in ("true", "1", "yes")
    for kind, what in ((int, "an integer"), (float, "a number")):
        if kind in kinds:
            try:
                return kind(text)
            except ValueError:
                raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    return text


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer ≥ 1, got {text!r}")
    return value


def _finite(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


# The TrainConfig keys `tak fit` takes (what the factors of a task depend on), with what they mean there.
_FIT_KEYS = {"task": "the task whose training inputs the factors are fitted on (required, but with --reference)",
             "reference": "the reference set: what --kind ekfac fits (as one set), and kfac / diagonal with "
                          "--universal true (each task's, pooled as in training)",
             "universal": "true: fit kfac / diagonal factors on the reference set (universal factors) in place of "
                          "--task (default: false)",
             "trainable": "the layers fitted: those holding these parameters ('all', 'attention' or name patterns; "
                          "None: all layers)",
             **dict.fromkeys(("backbone", "pretrained", "backbone_options", "data_root", "factor_examples",
                              "mc_samples", "max_train", "max_length", "seed", "device", "matmul_precision",
                              "progress"))}


def _config_flags(p, keys: dict | None = None):
    """``--key VALUE`` for the TrainConfig keys ``keys`` (None: all), each with its help line (``keys[key]`` or the
    field's) and default."""
    from .training import TrainConfig

    p.add_argument("--config", type=Path, help="YAML file of TrainConfig keys")
    hints, defaults = typing.get_type_hints(TrainConfig), TrainConfig().to_dict()
    for f in dataclasses.fields(TrainConfig):
        if keys is not None and f.name not in keys:
            continue
        own = (keys or {}).get(f.name)  # a help line of this command's own, which says the default if there is one
        default = f" [default: {defaults[f.name]}]" if defaults[f.name] not in (None, [], {}) and not own else ""
        text = ((own or f.metadata["help"]) + default).replace("%", "%%")
        p.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, default=argparse.SUPPRESS, metavar="VALUE",
                       type=lambda text, a=hints[f.name]: _parse_value(text, a), help=text)


def _alphas(text: str) -> list[float]:
    """"0:2:0.05" (start:stop:step, stop included when on the grid) or "0.5,1,1.5"."""
    try:
        numbers = [float(a) for a in text.split(":" if ":" in text else ",")]
        if not all(math.isfinite(a) for a in numbers):
            raise ValueError
        if ":" not in text:
            return numbers
        start, stop, step = numbers
        if step == 0 or (stop - start) * step < 0:
            raise ValueError
        n = math.floor((stop - start) / step + 1e-9)
        return [round(start + i * step, 10) for i in range(n + 1)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected start:stop:step (a step towards stop) or a comma-separated "
                                         "list of finite numbers") from None


def main(argv=None) -> int:
    from .training.config import MATMUL_PRECISIONS

    parser = argparse.ArgumentParser(prog="tak", description=__doc__.split("\n")[0], formatter_class=_Formatter)
    sub = parser.add_subparsers(dest="command", required=True)
    add_parser = functools.partial(sub.add_parser, formatter_class=_Formatter)

    p = add_parser("demo", help="the main job: train, merge and evaluate on MiniLM + embedded text tasks")
    p.add_argument("--quick", action="store_true", help="the ≤ 3 minute profile (2 CPU cores)")
    p.add_argument("--out", type=Path, default=Path("tak-demo"),
                   help="folder of results.json, report.md, plots and the runs (default: tak-demo)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: a GPU when there is one)")
    p.add_argument("--methods", default=None, help="comma-separated subset of the demo's methods")

    p = add_parser("train", help="train one task vector (tak.train)",
                   description="Keys of TrainConfig as --key value (lists comma-separated); --config YAML "
                               "sets defaults that the flags override.")
    _config_flags(p)

    p = add_parser("fit", help="fit a task's curvature factors into a file others train with (factor_files)",
                   description="The factors a tak / diag_ggn / delta run would fit on this task's data (or on a "
                               "reference set), written to one file that is shared in place of the data: "
                               "tak train --factor-files FILE,... Keys of TrainConfig as --key value.")
    p.add_argument("--kind", choices=["kfac", "ekfac", "diagonal"], default="kfac",
                   help="kfac (tak, attn_only_tak), diagonal (diag_ggn) or ekfac (delta) (default: kfac)")
    p.add_argument("--out", required=True, help="the factor file (.safetensors)")
    _config_flags(p, _FIT_KEYS)

    p = add_parser("merge", help="merge task vectors into one (task arithmetic, TIES, TSV-M, Iso-C, Iso-CTS)")
    p.add_argument("task_vectors", nargs="+", type=Path, help="task vector files (.safetensors) of one base model")
    p.add_argument("--method", default="task_arithmetic", help="tak list merges (default: task_arithmetic)")
    p.add_argument("--k", type=float, default=None, help="TIES: fraction of entries kept per tensor (default: 0.2)")
    p.add_argument("--alpha", type=_finite, default=1.0, help="scale of the merged task vector (default: 1.0)")
    p.add_argument("--allow-mixed-regimes", action="store_true",
                   help="merge linear (linearized) and non-linear task vectors together")
    p.add_argument("--out", type=Path, required=True, help="the merged task vector's file")

    p = add_parser("eval", help="task addition / negation protocols and analyses of saved task vectors")
    p.add_argument("task_vectors", nargs="+", type=Path, help="task vector files (.safetensors) of one base model")
    p.add_argument("--protocol", choices=["addition", "negation"], default="addition",
                   help="addition: merged accuracy over α (default); negation: forget --target, keep --control")
    p.add_argument("--target", help="negation: the task to forget (default: the task vector's task)")
    p.add_argument("--control", help="negation: the task whose accuracy must be kept")
    p.add_argument("--alphas", type=_alphas, default=None, help="grid, e.g. 0:2:0.05 (the default)")
    p.add_argument("--merge", default="task_arithmetic", help="addition: how the task vectors are merged before "
                   "scaling by α (tak list merges)")
    p.add_argument("--k", type=float, default=None, help="--merge ties: fraction of entries kept per tensor (default: 0.2)")
    p.add_argument("--analyses", action="store_true", help="also disentanglement, normalcy and localization plots")
    p.add_argument("--data-root", default=None, help="where datasets are looked up (default: $TAK_DATA_ROOT, else ./data)")
    p.add_argument("--max-test", type=_positive_int, default=None, help="test examples per task (a subsample)")
    p.add_argument("--max-train", type=_positive_int, default=None,
                   help="training examples per task, a subsample the analyses use (the validation split that "
                        "picks α keeps max_train // 9)")
    p.add_argument("--pretrained", default=None, help="the backbone's pretrained tag, if not in the metadata")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: a GPU when there is one)")
    p.add_argument("--matmul-precision", choices=MATMUL_PRECISIONS, default=None,
                   help="fp32 matrix products: highest (IEEE), high (tf32), medium (bf16) (default: the process's, "
                        "'highest')")
    p.add_argument("--out", type=Path, required=True, help="folder of results.json and plots")

    p = add_parser("report", help="a markdown report (tables and plots) of demo / eval results")
    p.add_argument("results", nargs="+", type=Path, help="folders holding results.json")
    p.add_argument("--out", type=Path, required=True, help="folder of report.md and its images")

    p = add_parser("list", help="list the valid names")
    p.add_argument("what", choices=["methods", "tasks", "backbones", "merges"])

    args, unknown = parser.parse_known_args(argv)
    if unknown:  # the command's own usage, not tak's
        sub.choices[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        return _COMMANDS[args.command](args)
    except (ValueError, OSError, ImportError, FloatingPointError) as e:  # bad input, missing files, no hub, NaN loss
        print(f"tak {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # Ctrl-C; a training run says where its checkpoint is (TrainingInterrupted)
        print(f"tak {args.command}: {str(e) or 'interrupted'}", file=sys.stderr)
        return 130


def _demo(args) -> int:
    from . import demo

    methods = args.methods.split(",") if args.methods else None
    if methods:
        unknown = sorted(set(methods) - set(demo.METHODS))
        if unknown:
            raise ValueError(f"--methods: {unknown} not in the demo's methods {demo.METHODS}")
    results = demo.run(args.out, quick=args.quick, device=args.device, methods=methods)
    from .curvature.distributed import is_main_rank
    if not is_main_rank():  # under torchrun: one table, not one per process
        return 0
    print(demo.table(results))
    print(f"\nwrote {args.out / 'results.json'}, {args.out / 'report.md'} and plots ({results['seconds']} s)")
    return 0


def _config(args, skip=()) -> tuple:
    """(the TrainConfig of ``--config`` (YAML) overridden by the ``--key`` flags given, the keys given)."""
    from .training import TrainConfig
    from .training.config import read_yaml

    values = {k: v for k, v in vars(args).items() if k not in ("command", "config", *skip)}
    given = {**(read_yaml(args.config) if args.config else {}), **values}
    return TrainConfig.from_dict(given), set(given)


def _train(args) -> int:
    from .training import train

    result = train(_config(args)[0])
    from .curvature.distributed import is_main_rank
    if is_main_rank():  # under torchrun: one line, not one per process
        print(json.dumps({"task_vector": str(result.path), **{k: result.metrics[k] for k in ("val", "test")}}))
    return 0


def _fit(args) -> int:
    from .curvature.distributed import is_main_rank
    from .training import fit

    if args.out.endswith(("/", os.sep)):  # Path would drop the slash and write a file of that name
        raise ValueError(f"--out {args.out}: a folder; name the factor file (e.g. task.{args.kind}.safetensors)")
    config, given = _config(args, skip=("kind", "out"))
    if not (config.universal or args.kind == "ekfac") and "task" not in given:
        raise ValueError("--task: name the task whose factors are fitted (tak list tasks)")
    path = fit(config, args.kind, Path(args.out))
    if is_main_rank():
        print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB): {_factors_summary(path)}")
    return 0


def _factors_summary(path: Path) -> str:
    """What a factor file holds: its layers (embeddings among them), exact blocks, and the layers the features do
    not depend on, which have no factors."""
    from .curvature import storage

    meta = storage.load(path).meta
    layers, dense, off = meta.get("layers", {}), meta.get("dense", {}), meta.get("off_path", [])
    embeddings = sum(info.get("layout") in ("embedding", "resized") for info in layers.values())
    summary = f"{len(layers)} layers ({embeddings} embeddings), {len(dense)} exact blocks"
    return summary + (f"; none for the {len(off)} the features do not depend on: {off[:4]}"
                      f"{' ...' if len(off) > 4 else ''}" if off else "")


def _merge(args) -> int:
    from .arithmetic.merges import merge
    from .task_vector import TaskVector, check_compatible

    resolved = [p.resolve() for p in args.task_vectors]  # one file however it is spelled
    repeated = sorted({str(p) for p, r in zip(args.task_vectors, resolved) if resolved.count(r) > 1})
    if repeated:
        raise ValueError(f"task vectors given more than once: {repeated}")
    if args.out.is_dir():
        raise ValueError(f"--out {args.out}: a folder; name the merged task vector's file (e.g. merged.safetensors)")
    tvs = [TaskVector.load(p) for p in args.task_vectors]
    check_compatible(tvs, allow_mixed_regimes=args.allow_mixed_regimes)
    options = _merge_options("--method", args.method, args.k)
    tensors = merge(args.method, [tv.tensors for tv in tvs], **options)
    first = tvs[0].meta
    shared = [k for k in ("base_model", "fingerprint", "regime", "source", "trainable", "max_length", "backbone_options")
              if k in first and all(tv.meta.get(k) == first[k] for tv in tvs)]
    regimes = sorted({str(tv.regime) for tv in tvs})
    meta = {**{k: first[k] for k in shared}, **({"mixed_regimes": regimes} if len(regimes) > 1 else {}),
            "task": "+".join(str(tv.task) for tv in tvs),
            "method": f"merge:{args.method}", "merged_from": [str(p) for p in args.task_vectors],
            "merge_options": {**options, "alpha": args.alpha}}
    TaskVector({k: args.alpha * v for k, v in tensors.items()}, meta).save(args.out)
    print(f"wrote {args.out}")
    return 0


def _merge_options(flag: str, method: str, k: float | None) -> dict:
    """The merge's options from the flags: ``--k`` is TIES's alone."""
    if k is not None and method != "ties":
        raise ValueError(f"--k applies to {flag} ties only, not {method!r}")
    return {} if k is None else {"k": k}


def _eval(args) -> int:
    from .arithmetic.evaluate import evaluate_files
    from .training.loop import matmul_precision

    options = _merge_options("--merge", args.merge, args.k)
    with matmul_precision(args.matmul_precision):
        results = evaluate_files(args.task_vectors, protocol=args.protocol, target=args.target, control=args.control,
                                 alphas=args.alphas, run_analyses=args.analyses, data_root=args.data_root,
                                 max_train=args.max_train, max_test=args.max_test, pretrained=args.pretrained,
                                 device=args.device, out=args.out, merge=args.merge,
                                 merge_options=options)
    shown = {k: v for k, v in results.items() if k in ("alpha1", "best", "negation")}
    if results.get("joint"):  # the joint problems of class-partition tasks, without their α curves
        shown["joint"] = {name: {k: v for k, v in j.items() if k != "val_curve"} for name, j in results["joint"].items()}
    print(json.dumps(shown, indent=2))
    return 0


def _report(args) -> int:
    from .arithmetic.evaluate import render_report

    path = render_report(args.results, args.out)
    print(f"wrote {path}")
    return 0


def _list(args) -> int:
    if args.what == "methods":
        from .methods import METHODS
        names = {n: f"{m.description}\n{_method_defaults(m)}" for n, m in METHODS.items()}
    elif args.what == "tasks":
        from .data import list_tasks
        names = list_tasks()
    elif args.what == "backbones":
        from .backbones import list_backbones
        names = list_backbones()
    else:
        from .arithmetic.merges import MERGES
        names = {n: " ".join((f.__doc__ or "").split("\n\n")[0].replace("``", "").split()) for n, f in MERGES.items()}
    for name, text in names.items():
        print(f"{name:20s} " + text.replace("\n", "\n" + " " * 21))
    return 0


def _method_defaults(method) -> str:
    """The paper defaults of ``method`` as ``tak list methods`` shows them: vision, then what differs for text and
    for the larger CLIP towers."""
    from .methods.registry import hyperparameter_defaults

    def shown(values: dict) -> str:
        return " ".join(f"{k}={v:g}" for k, v in values.items())

    vision = hyperparameter_defaults(method, ["image"])
    line = f"defaults [{method.source}]: {shown(vision)}"
    for what, modality, backbone in (("text", "text", ""), ("clip:ViT-B-16", "image", "clip:ViT-B-16"),
                                     ("clip:ViT-L-14", "image", "clip:ViT-L-14")):
        differs = {k: v for k, v in hyperparameter_defaults(method, [modality], backbone).items() if vision.get(k) != v}
        line += f"; {what}: {shown(differs)}" if differs else ""
    return line


_COMMANDS = {"demo": _demo, "train": _train, "fit": _fit, "merge": _merge, "eval": _eval, "report": _report, "list": _list}

if __name__ == "__main__":
    sys.exit(main())
