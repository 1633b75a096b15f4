"""TrainConfig: everything a training run depends on (a dataclass, or YAML with the same keys).

Hyperparameters left as None take the method's paper defaults (``tak.methods.registry``).
"""
import dataclasses
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..data.registry import expand_parts
from ..methods.trainees import DECAY_TARGETS

_FACTOR_MODES = ("merged", "per_task")
MATMUL_PRECISIONS = ("highest", "high", "medium")
HYPERPARAMETERS = ("lr", "lora_lr", "weight_decay", "beta", "beta_teacher", "gamma", "last_layer_weight",
                   "lora_rank")  # the keys whose None is the method's default


def _kinds(annotation) -> tuple:
    """The types a field annotated ``annotation`` takes: (int,), (str, NoneType), (dict[str, float],), ..."""
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    return typing.get_args(annotation) if union else (annotation,)


def _boolean(name: str, value) -> bool:
    """A bool, or the words a YAML file or the command line may give for one ("false", "no", "1", ...)."""
    if isinstance(value, bool):
        return value
    words = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}
    if isinstance(value, (str, int)) and str(value).strip().lower() in words:
        return words[str(value).strip().lower()]
    raise ValueError(f"TrainConfig.{name} must be true or false, got {value!r}")


def _text(name: str, value, optional: bool):
    """A string (a path given as a ``Path`` becomes its string); None where the field allows it."""
    if value is None and optional:
        return None
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if not isinstance(value, str):
        raise ValueError(f"TrainConfig.{name} must be a string{' or None' if optional else ''}, got {value!r}")
    return value


def parse_compression(spec: str | None) -> dict | None:
    """"int8", "eigen:<rank>", "eigen:<fraction>", "blockdiag:<k>", "prune:<keep>" -> ``tak.compress`` arguments
    (TAK Sec. F.6: truncated eigendecompositions keeping a fraction of the rank, magnitude pruning)."""
    if spec is None:
        return None
    method, _, arg = spec.partition(":")
    if method == "int8" and not arg:
        return {"method": "int8"}
    if method in ("eigen", "blockdiag") and arg.isdigit() and int(arg) >= 1:
        return {"method": method, ("rank" if method == "eigen" else "k"): int(arg)}
    share = _fraction(arg)
    if method in ("eigen", "prune") and share is not None:
        return {"method": method, ("fraction" if method == "eigen" else "keep"): share}
    raise ValueError(f"TrainConfig.compress={spec!r}: expected 'int8', 'eigen:<rank>' (rank ≥ 1), 'eigen:<fraction>' "
                     "(of each factor's rank), 'blockdiag:<k>' (k ≥ 1) or 'prune:<keep>' (the share of entries kept); "
                     "fractions in (0, 1)")


def _fraction(text: str) -> float | None:
    """``text`` as a number in (0, 1), else None."""
    try:
        value = float(text)
    except ValueError:
        return None
    return value if 0 < value < 1 else None


def read_yaml(path) -> dict:
    """The mapping of TrainConfig keys in the YAML file ``path`` (unchecked; ``TrainConfig.from_dict`` checks)."""
    import yaml

    if Path(path).is_dir():
        raise ValueError(f"{path}: a folder; expected a YAML file of TrainConfig keys (a run's config.yaml)")
    try:
        values = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(values, dict):
        raise ValueError(f"{path}: a YAML mapping of TrainConfig keys expected, got {type(values).__name__}")
    return values


def _exact_int(x: float) -> int:
    if not float(x).is_integer():
        raise ValueError
    return int(x)


def _number(name: str, value, kind):
    """``value`` as a ``kind`` (float, or int holding an integer value: YAML reads 1e-4 as a string); None
    stays None; ValueError naming the key otherwise."""
    if value is None:
        return None
    try:
        if isinstance(value, bool):
            raise TypeError
        if kind is float:
            if not math.isfinite(float(value)):
                raise ValueError
            return float(value)
        try:
            return int(value) if isinstance(value, (int, str)) else _exact_int(value)
        except ValueError:
            return _exact_int(float(value))  # "1e3": YAML reads it as a string
    except (TypeError, ValueError):
        what = "a finite number" if kind is float else "an integer"
        raise ValueError(f"TrainConfig.{name} must be {what}, got {value!r}") from None


def _json_options(options: dict) -> dict:
    """``backbone_options`` as the task vector and checkpoints record them: JSON values, a ``torch.dtype`` by its
    name (``load_backbone`` reads "bfloat16" back); anything else JSON cannot hold is refused, naming its key."""
    def plain(value):
        if isinstance(value, torch.dtype):
            return str(value).removeprefix("torch.")
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return [plain(v) for v in value] if isinstance(value, (list, tuple)) else value

    options = {k: plain(v) for k, v in options.items()}
    for key, value in options.items():
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise ValueError(f"TrainConfig.backbone_options[{key!r}]={value!r} cannot be recorded as JSON ({e}); "
                             "give the loader's option as a string, number, list or mapping") from None
    return options


def _canonical_backbone(spec: str) -> str:
    """``clip:ViT-B/16`` as open_clip names the architecture, ``clip:ViT-B-16`` (``load_clip`` loads either): one
    spelling for the paper defaults that depend on it and for the task vectors' ``base_model``."""
    prefix, _, rest = spec.partition(":")
    if prefix == "clip" and not rest.startswith(("local-dir:", "hf-hub:")):
        return f"clip:{rest.replace('/', '-')}"
    return spec


def _key(default, help: str):
    """A TrainConfig field with its help line (``tak train --help`` prints it); an empty list or dict default is a
    new one for each config."""
    if isinstance(default, (list, dict)) and not default:
        return field(default_factory=type(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


_PAPER = "None: the method's paper default (tak list methods)"


@dataclass
class TrainConfig:
    """Everything a run depends on; each key's help line is its field's ``metadata["help"]``.

    factors: "merged" (TAK Eq. 8: (Σ_t B_t) ⊗ (Σ_t λ_t A_t)) or "per_task" (Eq. 7: Σ_t λ_t B_t ⊗ A_t, λ summing
    to 1), both as the paper writes them, so at one β the merged penalty is about K times the per-task one for K
    other tasks (scale β by 1/K to compare)."""

    method: str = _key("tak", "the method (tak list methods)")
    task: str = _key("rotten_tomatoes", "the task trained (tak list tasks; <name>-part<k>of<n>: part k of a task cut "
                     "into n tasks of disjoint classes)")
    tasks: list[str] = _key([], "all tasks that will be merged: the others give tak its factors and tau_jp its data "
                            "('resisc45-part*of9' stands for the 9 parts)")
    reference: list[str] = _key([], "tasks whose training inputs are the reference set of EK-FAC (delta) and of "
                                "universal factors")
    backbone: str = _key("minilm", "the pretrained model (tak list backbones): minilm, hf:<name-or-path>, "
                         "t5:<name-or-path>, lm:<name-or-path>, clip:<arch>, hf-clip:<name-or-path>")
    pretrained: str | None = _key(None, "the backbone's pretrained weights (open_clip tag, or a local path; hub "
                                  "revision for hf:, t5:, lm:, hf-clip:)")
    backbone_options: dict[str, object] = _key({}, "the backbone loader's other options as a JSON object (T5: prefix, "
                                               "label_words, pair_format, ...), recorded in the task vector")
    data_root: str | None = _key(None, "where datasets are looked up (None: $TAK_DATA_ROOT, else ./data); embedded "
                                 "tasks need none")
    out: str = _key("runs", "output folder; the run writes to {out}/{method}/{task}, factors are cached in "
                    "{out}/factors")
    steps: int = _key(2000, "optimizer steps (2,000 at batch 128: the task arithmetic setup of Ilharco et al. 2023)")
    batch_size: int = _key(128, "examples per step (all processes together)")
    lr: float | None = _key(None, f"AdamW learning rate, cosine schedule to 0; {_PAPER}")
    weight_decay: float | None = _key(None, f"AdamW weight decay; {_PAPER}")
    decay_to: str = _key("zero", "what the weight decay pulls the weights towards: 'zero' (θ = θ0 + τ → 0, as the "
                         "papers' code in both regimes) or 'pretrained' (τ → 0); a LoRA student's factors decay to 0")
    warmup_steps: int = _key(0, "steps of linear learning-rate warm-up before the cosine schedule (the TAK and DELTA "
                             "papers state none; the task arithmetic code they build on warms up for 500 of 2,000)")
    beta: float | None = _key(None, f"weight β of the drift penalty on τ (for delta, on the student; alone it sets "
                              f"beta_teacher too); {_PAPER}")
    beta_teacher: float | None = _key(None, f"delta: weight β^T of the teacher's EK-FAC penalty; {_PAPER}")
    gamma: float | None = _key(None, f"delta: weight γ of the along-path distillation; {_PAPER}")
    last_layer_weight: float | None = _key(None, f"penalty weight of the model's last layer (TAK Sec. E: 0.1 on "
                                           f"CLIP's proj; none where it is not trained); {_PAPER}")
    layer_weights: dict[str, float] = _key({}, "penalty weights of layers by name pattern, PATTERN=WEIGHT,...")
    lora_rank: int | None = _key(None, f"delta_lora: rank of the LoRA student; {_PAPER}")
    lora_lr: float | None = _key(None, f"delta_lora: AdamW learning rate of the LoRA student (lr is the teacher's); "
                                 f"{_PAPER}")
    trainable: str | list[str] | None = _key(None, "what is trained: 'all', 'attention', or parameter name patterns "
                                             "(None: the method's)")
    factor_files: list[str] = _key([], "factor files of other tasks (tak fit), shared in place of their data: KFAC "
                                   "files join the tasks' factors of tak, diagonal ones diag_ggn's; one EK-FAC file "
                                   "is delta's reference set")
    universal: bool = _key(False, "the KFAC / diagonal penalty from the reference set's factors (TAK Sec. F.4: its "
                           "tasks' pooled, one fit's scale) instead of the other tasks'")
    factors: str = _key("merged", "tak: 'merged' (TAK Eq. 8) or 'per_task' (Eq. 7) factors of the other tasks")
    factor_examples: int = _key(256, "training examples per task that the factors are fitted on")
    mc_samples: int = _key(1, "Monte-Carlo probes per example when fitting the factors")
    compress: str | None = _key(None, "compressed factors: 'int8', 'eigen:<rank>', 'eigen:<fraction>', "
                                "'blockdiag:<k>' or 'prune:<keep>' (fractions in (0, 1))")
    penalty_every: int = _key(1, "apply the penalty at every N-th step only (TAK Fig. 8)")
    offload_factors: bool = _key(False, "keep the factors on the CPU between penalty steps (pinned, copied to the "
                                  "GPU beside the step's forward)")
    max_train: int | None = _key(None, "training examples per task, a class-stratified subsample (validation keeps "
                                 "max_train // 9)")
    max_test: int | None = _key(None, "test examples per task, a class-stratified subsample")
    max_length: int = _key(128, "text backbones: tokens per example")
    seed: int = _key(0, "seed (0 to 2³²−1) of the training batches, the dropout masks and the factors' Monte-Carlo probes")
    device: str | None = _key(None, "cpu, cuda, cuda:1, ... (None: the process's GPU when there is one, else cpu)")
    matmul_precision: str | None = _key(None, "fp32 matrix products, in PyTorch and in the kernels: 'highest' (IEEE "
                                        "fp32), 'high' (TF32 on a GPU) or 'medium' (bf16 on a GPU) for the run "
                                        "(torch.set_float32_matmul_precision; None: the process's, by default 'highest')")
    checkpoint_every: int = _key(200, "steps between checkpoints (a killed run resumes from the last one)")
    eval_batch_size: int = _key(256, "examples per batch when evaluating")
    tensorboard: bool = _key(False, "write TensorBoard logs to {out}/{method}/{task}/tensorboard")
    progress: bool = _key(True, "show progress bars")

    def __post_init__(self):
        for name, valid in (("factors", _FACTOR_MODES), ("decay_to", DECAY_TARGETS)):
            if getattr(self, name) not in valid:
                raise ValueError(f"TrainConfig.{name} must be one of {valid}, got {getattr(self, name)!r}")
        if self.matmul_precision not in (None, *MATMUL_PRECISIONS):
            raise ValueError(f"TrainConfig.matmul_precision must be None or one of {MATMUL_PRECISIONS}, got "
                             f"{self.matmul_precision!r}")
        for name, annotation in typing.get_type_hints(type(self)).items():
            kinds, value = _kinds(annotation), getattr(self, name)
            if (kind := next((k for k in kinds if k in (int, float)), None)) is not None:
                if value is None and type(None) not in kinds:
                    raise ValueError(f"TrainConfig.{name} must be {'an integer' if kind is int else 'a number'}, "
                                     "got None")
                setattr(self, name, _number(name, value, kind))
            elif bool in kinds:
                setattr(self, name, _boolean(name, value))
            elif str in kinds and len(kinds) <= 2:  # str or str | None (trainable, a list too, is checked below)
                setattr(self, name, _text(name, value, optional=type(None) in kinds))
        for name in ("steps", "batch_size", "factor_examples", "penalty_every", "checkpoint_every", "mc_samples",
                     "lora_rank", "max_train", "max_test", "max_length", "eval_batch_size"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be ≥ 1, got {getattr(self, name)}")
        if self.warmup_steps > self.steps:
            raise ValueError(f"TrainConfig.warmup_steps={self.warmup_steps} exceeds steps={self.steps}: the learning "
                             "rate would never reach lr")
        if not 0 <= self.seed < 2**32:  # the step, epoch and probe seeds derived from it stay within int64
            raise ValueError(f"TrainConfig.seed must be in [0, 2**32), got {self.seed}")
        for name in ("lr", "lora_lr", "weight_decay", "beta", "beta_teacher", "gamma", "last_layer_weight",
                     "warmup_steps"):
            if getattr(self, name) is not None and not getattr(self, name) >= 0:
                raise ValueError(f"TrainConfig.{name} must be ≥ 0, got {getattr(self, name)}")
        if isinstance(self.trainable, tuple):
            self.trainable = list(self.trainable)
        if not (self.trainable is None or isinstance(self.trainable, str)
                or isinstance(self.trainable, list) and all(isinstance(t, str) for t in self.trainable)):
            raise ValueError(f"TrainConfig.trainable must be None, 'all', 'attention' or a list of parameter name "
                             f"patterns, got {self.trainable!r}")
        if not isinstance(self.layer_weights, dict):
            raise ValueError(f"TrainConfig.layer_weights must be a mapping {{layer pattern: weight}}, got "
                             f"{self.layer_weights!r}")
        self.layer_weights = {str(k): _number(f"layer_weights[{k!r}]", w, float) for k, w in self.layer_weights.items()}
        negative = {k: w for k, w in self.layer_weights.items() if w < 0}
        if negative:  # a negative weight rewards drift: the penalty would have no minimum
            raise ValueError(f"TrainConfig.layer_weights must be ≥ 0, got {negative}")
        parse_compression(self.compress)
        if self.device is not None:
            try:
                torch.device(self.device)
            except RuntimeError as e:
                raise ValueError(f"TrainConfig.device={self.device!r}: {e}") from None
        for name in ("tasks", "reference"):
            value = getattr(self, name)
            if isinstance(value, str):  # list("a,b") would be its characters
                raise ValueError(f"TrainConfig.{name} must be a list of task names, got the string {value!r}")
            if not isinstance(value, (list, tuple)) or not all(isinstance(t, str) for t in value):
                raise ValueError(f"TrainConfig.{name} must be a list of task names, got {value!r}")
        if not isinstance(self.factor_files, (list, tuple)):  # a string too: "a,b" is no list
            raise ValueError(f"TrainConfig.factor_files must be a list of paths, got {self.factor_files!r}")
        self.factor_files = [_text(f"factor_files[{i}]", f, optional=False) for i, f in enumerate(self.factor_files)]
        if "" in self.factor_files:
            raise ValueError(f"TrainConfig.factor_files: an empty path in {self.factor_files!r}")
        self.tasks = expand_parts(self.tasks)
        self.reference = expand_parts(self.reference)
        for name in ("tasks", "reference"):  # twice would count a task's factors twice in the merge
            twice = sorted({t for t in getattr(self, name) if getattr(self, name).count(t) > 1})
            if twice:
                raise ValueError(f"TrainConfig.{name}: {twice} listed more than once")
        if not isinstance(self.backbone_options, dict):
            raise ValueError(f"TrainConfig.backbone_options must be a mapping of option names, got {self.backbone_options!r}")
        taken = sorted({"pretrained", "max_length", "device"} & set(self.backbone_options))
        if taken:
            raise ValueError(f"TrainConfig.backbone_options: {taken} are TrainConfig keys of their own; set them there")
        self.backbone_options = _json_options(self.backbone_options)
        self.backbone = _canonical_backbone(self.backbone)

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig keys {unknown}; valid keys: {sorted(known)}")
        return cls(**values)

    @classmethod
    def from_yaml(cls, path) -> "TrainConfig":
        return cls.from_dict(read_yaml(path))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def run_dir(self) -> Path:
        """Where this run writes: {out}/{method}/{task}."""
        return Path(self.out) / self.method / self.task

    def hyperparameters(self, defaults: dict) -> dict:
        """The method's ``defaults`` overridden by the values set here; a value set for a hyperparameter the
        method does not have (β of ``nonlinear``, ``lora_rank`` of ``tak``, ...) is refused. A ``beta`` set
        without ``beta_teacher`` sets both (DELTA's β^T = β^S) for a method with a teacher."""
        unused = [k for k in HYPERPARAMETERS if getattr(self, k) is not None and k not in defaults]
        if unused:
            given = ", ".join(f"{k}={getattr(self, k)!r}" for k in unused)
            raise ValueError(f"TrainConfig {given}: method {self.method!r} does not use "
                             f"{'it' if len(unused) == 1 else 'them'} (its hyperparameters: {sorted(defaults)})")
        hp = {**defaults, **{k: getattr(self, k) for k in HYPERPARAMETERS if getattr(self, k) is not None}}
        if "beta_teacher" in defaults and self.beta is not None and self.beta_teacher is None:
            hp["beta_teacher"] = self.beta
        return hp
