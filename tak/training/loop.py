"""``train(config)``: one task vector by one method, resumable, reproducible, data-parallel under torchrun.

The batch of step s is a function of (seed, s) alone (an epoch-seeded permutation of the training
split), the DELTA α too, its random draws (dropout masks) of (seed, s, rank) (``step_seed``), and a
checkpoint holds the trained parameters and the optimizer state: a killed run started again (by as many
processes) continues where it stopped and ends with the same τ. Ctrl-C or SIGTERM stops a run once the step under way
is done, with a checkpoint of that step (``tak.training.signals``). Under ``torchrun`` each of W processes takes
every W-th example of the global batch, with dropout masks of its own, and the gradients are averaged, so the task
vector equals the one-process one (up to summation order) for the methods without fitted factors and a
model without dropout; KFAC / EK-FAC / diagonal factors are Monte-Carlo estimates whose probes depend on
the rank (``tak.curvature.fit_kfac``), so those runs agree with one process only statistically.

Outputs in ``config.run_dir()``: ``task_vector.safetensors`` (``tak.TaskVector``), DELTA's
``teacher_task_vector.safetensors``, ``metrics.json``, ``checkpoint.safetensors``, ``config.yaml``.
"""
import atexit
import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from ..backbones import load_backbone
from ..curvature.distributed import is_distributed, is_main_rank, on_every_rank, on_main_rank
from ..curvature.outputs import to_device
from ..data import get_task
from ..evaluation import accuracy
from ..methods import (CurvaturePenalty, Objective, TauJpPenalty, clip_architecture, get_method,
                       hyperparameter_defaults, layer_weights, penalized_parameters, trainable_names)
from ..io import write_text
from ..task_vector import TaskVector
from . import checkpoint
from .config import TrainConfig
from .factors import FACTOR_KINDS, drift_factors, file_digests, fit_inputs, load_factor_files
from .signals import HeldSignals, TrainingInterrupted

_CACHE = {}


@dataclass
class TrainResult:
    task_vector: TaskVector
    path: Path
    metrics: dict


def _world(device: torch.device) -> tuple[int, int]:
    """(rank, world size), starting torch.distributed when launched by torchrun (NCCL on this process's
    GPU ``device``, made the current one, gloo on CPUs)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        atexit.register(_leave_process_group)
    return (dist.get_rank(), dist.get_world_size()) if is_distributed() else (0, 1)


def _leave_process_group() -> None:
    """At exit: a process that leaves without tearing its group down can abort (gloo: 8 of 30 two-process runs
    ended in SIGABRT; none with this)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def step_seed(seed: int, step: int, rank: int = 0) -> int:
    """The seed of step ``step``'s random draws (dropout masks) on rank ``rank``: a function of these alone,
    so a resumed run draws what the uninterrupted one did, and ranks draw masks of their own."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{step}/{rank}".encode()).digest()[:8], "little") >> 1


def batch_indices(n: int, batch_size: int, seed: int, step: int, rank: int = 0, world: int = 1) -> list[int]:
    """Indices of this rank's share of step ``step``'s batch: epochs are fixed-seed permutations of
    range(n) cut into ⌊n / batch_size⌋ full batches; rank r takes every ``world``-th of them."""
    batch_size = min(batch_size, n)
    per_epoch = n // batch_size
    epoch, position = divmod(step, per_epoch)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
    return order[position * batch_size:(position + 1) * batch_size][rank::world].tolist()


def cosine_schedule(step: int, total: int, warmup: int) -> float:
    """Learning-rate factor: linear warm-up, then cosine annealing to 0."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def _device(config: TrainConfig) -> torch.device:
    """``config.device``, or a GPU when there is one, else the CPU; a GPU named without an index is this process's
    (``cuda:$LOCAL_RANK`` under torchrun, or cuda:0 where each process sees one GPU; else the current one), so one
    device has one spelling. Two processes of a node on one GPU are refused: more processes than GPUs, or a GPU
    named with another process's index."""
    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type != "cuda" or not torch.cuda.is_available():
        return device
    local, count = os.environ.get("LOCAL_RANK"), torch.cuda.device_count()
    if local is not None and int(local) >= count > 1:
        raise ValueError(f"LOCAL_RANK={local}, but this node's processes see {count} GPUs: two processes would train "
                         f"on one GPU; start at most {count} processes per node (torchrun --nproc-per-node {count})")
    mine = torch.cuda.current_device() if local is None else int(local) if count > 1 else 0
    if device.index is None:
        return torch.device("cuda", mine)
    if local is not None and int(os.environ.get("WORLD_SIZE", "1")) > 1 and device.index != mine:
        raise ValueError(f"device={config.device!r}: under torchrun each process trains on its own GPU, and this one "
                         f"(LOCAL_RANK={local}, {count} GPUs visible) has cuda:{mine}; "
                         "give device='cuda' (or leave it unset)")
    return device


def _backbone(config: TrainConfig, device):
    """One backbone per (spec, pretrained, max_length, device, options) per process: runs of one demo share it."""
    key = (config.backbone, config.pretrained, config.max_length, str(device),
           json.dumps(config.backbone_options, sort_keys=True, default=str))
    if key not in _CACHE:
        try:
            with _library_bars(config.progress):
                _CACHE[key] = load_backbone(config.backbone, pretrained=config.pretrained, device=device,
                                            max_length=config.max_length, **config.backbone_options)
        except TypeError as e:
            if "unexpected keyword argument" not in str(e):
                raise
            raise ValueError(f"TrainConfig.backbone_options {config.backbone_options}: {e}") from None
    return _CACHE[key]


@contextlib.contextmanager
def matmul_precision(value: str | None):
    """Torch's fp32 matmul precision (which the kernels follow too) set to ``value`` in the block (None: left as it
    is), and the process's setting restored afterwards."""
    before = torch.get_float32_matmul_precision()
    if value is not None:
        torch.set_float32_matmul_precision(value)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def _in_matmul_precision(run):
    """``run(config, ...)``, its ``config`` read as a TrainConfig (``_as_config``), in ``matmul_precision(config.
    matmul_precision)``."""
    @functools.wraps(run)
    def wrapped(config, *args, **kwargs):
        config = _as_config(config)
        with matmul_precision(config.matmul_precision):
            return run(config, *args, **kwargs)

    return wrapped


@contextlib.contextmanager
def _library_bars(show: bool):
    """Hugging Face's loading bars off in the block unless ``show`` (``progress=False``: no bars at all)."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # a registered backbone, without transformers installed: no such bars
        show = True
    if show:
        yield
        return
    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def _task(name: str, config: TrainConfig):
    return get_task(name, root=config.data_root, max_train=config.max_train, max_test=config.max_test)


def _inputs_of(backbone, tasks: list, key: str) -> list:
    """``tasks``, whose inputs the factors or τJp read, once the backbone is known to take their modality."""
    wrong = [f"{t.name} ({t.modality})" for t in tasks if t.modality not in backbone.modalities]
    if wrong:
        raise ValueError(f"TrainConfig.{key}: backbone {backbone.name!r} takes {backbone.modalities} inputs, not "
                         f"those of {wrong}")
    return tasks


def trained_layers(model, trained: list[str]) -> list[str]:
    """The linear layers and dense groups (``tak.curvature``) holding a trained parameter: the only ones
    whose factors a penalty on these τ reads."""
    from ..curvature.dense import find_dense_groups
    from ..curvature.layers import find_layers

    params = {name: {layer.weight, layer.bias} for name, layer in find_layers(model).items()}
    params |= {name: set(group.params) for name, group in find_dense_groups(model).items()}
    trained = set(trained)
    return sorted(name for name, owned in params.items() if owned & trained)


def hyperparameters(config: TrainConfig, task) -> dict:
    """The run's hyperparameters: its method's paper defaults for ``task``'s modality and the backbone, under the
    values ``config`` sets."""
    return config.hyperparameters(hyperparameter_defaults(get_method(config.method), [task.modality], config.backbone))


def build_objective(config: TrainConfig, backbone, task, device) -> Objective:
    """The method's objective with its penalties (factors fitted or loaded from ``{out}/factors``)."""
    method = get_method(config.method)
    hp = hyperparameters(config, task)
    if method.penalty == "kfac" and config.beta is None and config.backbone.startswith(("clip:", "hf-clip:")) and \
            clip_architecture(config.backbone) is None:
        warnings.warn(f"backbone {config.backbone!r} names no CLIP architecture, so the KFAC penalty takes "
                      f"beta={hp['beta']:g} (TAK Sec. E.1's for ViT-B/32; 500 for ViT-B/16, 2000 for ViT-L/14): set "
                      "beta for this architecture", stacklevel=2)
    selection = config.trainable if config.trainable is not None else method.trainable
    trained = trainable_names(backbone.model, selection)
    fit = _fit_options(config, device, trained_layers(backbone.model, trained), cache=Path(config.out) / "factors")
    with torch.random.fork_rng(devices=[]):  # fitted or loaded, the factors leave the training RNG as it was
        penalty, teacher_penalty, tau_jp = _penalties(config, method, hp, backbone, task, device, fit)
    objective = Objective(method, backbone, backbone.head(task), hp, penalty=penalty, teacher_penalty=teacher_penalty,
                          tau_jp=tau_jp, trainable=config.trainable, seed=config.seed).to(device)
    objective.unpenalized = [] if penalty is None else unpenalized(backbone.model, trained, penalty.factors,
                                                                  method.name)
    return objective


def unpenalized(model, trained: list[str], factors, method: str) -> list[str]:
    """The trained parameters without curvature in ``factors`` (a layer the features do not depend on, one left out
    of the fit, a module with no factors, ...), with a warning that says how much of τ the drift penalty leaves
    free."""
    missing = sorted(set(trained) - penalized_parameters(factors))
    if missing:
        params = dict(model.named_parameters())
        free, total = sum(params[n].numel() for n in missing), sum(params[n].numel() for n in trained)
        shown = f"{missing[:6]}{' ...' if len(missing) > 6 else ''}"
        warnings.warn(f"method {method!r}: {len(missing)} trained parameters ({free:,} of the {total:,} trained "
                      f"values, {100 * free / total:.1f}%) have no curvature block, so its drift penalty leaves them "
                      f"free: {shown}; select what to train with --trainable PATTERNS (trainable=[...]) to exclude them", stacklevel=2)
    return missing


def _fit_options(config: TrainConfig, device, layers: list[str] | None, cache: Path | None) -> dict:
    """``task_factors``' options for this run: its examples, probes and their seed, the ``layers`` it penalizes."""
    return dict(n_examples=config.factor_examples, mc_samples=config.mc_samples, seed=config.seed, cache=cache,
                cache_key=factor_key(config), device=device, layers=layers, progress=config.progress and is_main_rank())


def factor_key(config: TrainConfig) -> str:
    """8 hex digits of what the cached factors depend on beyond their file name's fields: the backbone and
    the data the tasks' training inputs come from."""
    what = [config.backbone, config.pretrained, config.max_length, config.max_train, config.data_root, config.seed,
            config.backbone_options]
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:8]


def _penalties(config: TrainConfig, method, hp: dict, backbone, trained, device, fit: dict) -> tuple:
    """(penalty, teacher_penalty, tau_jp) of ``method`` training the task ``trained``; None where it has none. The
    other tasks and the reference set are loaded only where the penalty reads them (a machine may hold the trained
    task's data alone)."""
    def others():
        tasks = [_task(t, config) for t in config.tasks if t != config.task]
        alias = [t.name for t in tasks if t.parent is not None and (t.parent, t.classes) == (trained.parent, trained.classes)]
        if alias:  # its own factors would join the penalty on its τ
            raise ValueError(f"TrainConfig.tasks: {alias} is the trained task {config.task!r} under another name")
        return _inputs_of(backbone, tasks, "tasks")

    def reference():
        return _inputs_of(backbone, [_task(t, config) for t in config.reference], "reference")

    penalty = teacher_penalty = tau_jp = None
    factor_options = {"universal": config.universal, "factors": config.factors != "merged",
                      "compress": config.compress is not None, "layer_weights": bool(config.layer_weights),
                      "offload_factors": config.offload_factors, "factor_files": bool(config.factor_files),
                      "mc_samples": config.mc_samples != 1}
    if method.penalty not in ("kfac", "diagonal", "ekfac") and any(factor_options.values()):
        given = ", ".join(f"{k}={getattr(config, k)!r}" for k, on in factor_options.items() if on)
        raise ValueError(f"method {method.name!r} has no curvature penalty, so {given} would do nothing")
    if method.penalty == "ekfac" and config.universal:
        raise ValueError(f"method {method.name!r} penalizes with the reference set's EK-FAC already, so universal=True "
                         "would do nothing")
    if method.penalty is None and config.penalty_every != 1:
        raise ValueError(f"method {method.name!r} has no penalty, so penalty_every={config.penalty_every} would do "
                         "nothing")
    if method.penalty in ("kfac", "diagonal", "ekfac"):
        of_reference = config.universal or method.penalty == "ekfac"
        sources = reference() if of_reference else others()
        if method.penalty == "ekfac" and not sources and not config.factor_files:
            raise ValueError(f"method {method.name!r} needs a reference set: set reference=[task names], or "
                             "factor_files=[an EK-FAC file of one (tak fit --kind ekfac)]")
        home = torch.device("cpu") if config.offload_factors else device  # offloaded: never all on the GPU at once
        shared = load_factor_files(method.penalty, config.factor_files, backbone, fit["layers"], home,
                                   trained=None if of_reference else config.task, fitted=[t.name for t in sources],
                                   features={k: getattr(config, k) for k in ("max_length", "backbone_options")})
        factors = drift_factors(method.penalty, backbone, sources, mode=config.factors, pooled=of_reference,
                                compression=config.compress, shared=shared, home=home, **fit)
        weights = layer_weights(factors, last_layer_weight=hp.get("last_layer_weight", 1.0),
                                patterns=config.layer_weights, last_layer=backbone.last_layer)
        penalty = CurvaturePenalty(factors, hp["beta"], weights=weights, every=config.penalty_every,
                                   offload=config.offload_factors, device=device)
        teacher_penalty = penalty.with_beta(hp.get("beta_teacher", hp["beta"])) if method.teacher else None
    elif method.penalty == "tau_jp":
        data = others()
        if not data:
            raise ValueError("method 'tau_jp' needs the other tasks' data: --tasks A,B,... (tasks=[...]) with more than the trained task")
        batches = fit_inputs(backbone, [t.split("train") for t in data], config.factor_examples, device,
                             batch_size=config.batch_size)
        tau_jp = TauJpPenalty(batches, hp["beta"], backbone.features, every=config.penalty_every)
    return penalty, teacher_penalty, tau_jp


def _average_gradients(params: list[torch.Tensor], world: int) -> None:
    """Each parameter's gradient averaged over the processes; None where no process has one (as with one
    process, AdamW then leaves the parameter alone: no weight decay on what the loss does not reach)."""
    if world == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    present = torch.tensor([float(p.grad is not None) for p in params], device=grads[0].device)
    dist.all_reduce(present)
    present = present.tolist()
    for dtype in dict.fromkeys(g.dtype for g in grads):  # one all-reduce per dtype (T5 keeps its wo in fp32)
        group = [i for i, g in enumerate(grads) if g.dtype == dtype]
        flat = torch.cat([grads[i].reshape(-1) for i in group])
        dist.all_reduce(flat)
        flat /= world
        offset = 0
        for i in group:
            g = grads[i]
            params[i].grad = g.copy_(flat[offset:offset + g.numel()].view_as(g)) if present[i] else None
            offset += g.numel()


@torch.no_grad()
def warn_if_steps_round_away(optimizer: torch.optim.Optimizer) -> bool:
    """Warns (and returns True) where many trained weights are 16-bit and so large that an AdamW step (at most about
    the group's peak lr, ``base_lr``, per weight) is under half their spacing 2^(e−1)·eps (|w| in [2^(e−1), 2^e)):
    w + step rounds back to w, so those weights do not train (lr 1e-5 in bfloat16 stops every |w| ≥ 2⁻⁸ ≈ 0.004). A
    linearized model's τ and a LoRA student's B start at 0, where every step lands, and may grow into such sizes:
    ``train`` asks again at every checkpoint until it has warned."""
    stuck, total, kinds = 0, 0, set()
    for group in optimizer.param_groups:
        for w in group["params"]:
            total += w.numel()
            if w.dtype in (torch.bfloat16, torch.float16):
                _, exponent = torch.frexp(w.float())
                half_spacing = torch.exp2(exponent.float()) * (torch.finfo(w.dtype).eps / 4)
                stuck = stuck + ((w != 0) & (half_spacing > group["base_lr"])).sum()
                kinds.add(str(w.dtype).removeprefix("torch."))
    stuck = int(stuck)  # one host sync
    if not total or stuck < 0.01 * total:
        return False
    rates = ", ".join(f"{g['base_lr']:g}" for g in optimizer.param_groups)
    warnings.warn(f"{100 * stuck / total:.0f}% of the trained weights ({', '.join(sorted(kinds))}) are so large that "
                  f"an AdamW step of the learning rate ({rates}) is under half their spacing and rounds back to the "
                  "weight: they do not train; train in float32 (the backbones' default) or with a larger lr",
                  stacklevel=3)
    return True


@torch.no_grad()
def pull_to_anchors(optimizer: torch.optim.Optimizer, anchors: dict) -> None:
    """AdamW's decoupled decay p ← p − lr·wd·p made p ← p − lr·wd·(p − s θ0) for each parameter p of ``anchors``
    ({id(p): (θ0, s)}, ``Objective.decay_anchors``): after its step, p += s·lr·wd·θ0 (a parameter without a gradient
    was not stepped, so it is not pulled either)."""
    for group in optimizer.param_groups:
        rate = group["lr"] * group["weight_decay"]
        for p in group["params"]:
            if rate and id(p) in anchors and p.grad is not None:
                theta0, sign = anchors[id(p)]
                p.add_(theta0, alpha=sign * rate)


def _check_resumed(ckpt: Path, step: int, saved_world: int, rank: int, world: int, device) -> None:
    """Every process resumes at one step (a checkpoint folder shared by the nodes), else all of them stop; a run
    resumed with another number of processes is warned that its τ will differ from an unbroken run's."""
    if world > 1:
        steps = torch.tensor([step, -step], device=device)
        dist.all_reduce(steps, op=dist.ReduceOp.MIN)
        first, last = steps[0].item(), -steps[1].item()
        if first != last:
            raise ValueError(f"{ckpt}: the processes resume at steps {first} to {last} (this one, rank {rank}, at "
                             f"{step}); all must read the same checkpoint: put --out on storage every node shares")
    if step and saved_world != world:
        warnings.warn(f"{ckpt}: resumed at step {step} by {world} processes, saved by {saved_world}: the batches' "
                      "split and dropout masks change, so τ will differ from an unbroken run's", stacklevel=3)


def _as_config(config: TrainConfig | dict | str) -> TrainConfig:
    """A TrainConfig, from itself, a dict of its keys or the path of a YAML file."""
    if isinstance(config, (str, Path)):
        return TrainConfig.from_yaml(config)
    if isinstance(config, dict):
        return TrainConfig.from_dict(config)
    return dataclasses.replace(config)  # checked again: fields may have been set after it was made


@_in_matmul_precision
def train(config: TrainConfig | dict | str) -> TrainResult:
    """Train ``config.task``'s task vector with ``config.method``; returns it with its path and metrics.

    ``config``: a ``TrainConfig``, a dict of its keys, or the path of a YAML file (``_in_matmul_precision`` reads
    it)."""
    config.hyperparameters(get_method(config.method).defaults)  # an unknown method or unused value fails before loading
    device = _device(config)
    rank, world = _world(device)
    if config.batch_size % world:
        raise ValueError(f"batch_size={config.batch_size} must be divisible by the {world} processes")
    writer = _tensorboard(config, config.run_dir(), write=is_main_rank())  # a missing package fails early, everywhere
    torch.manual_seed(config.seed)
    backbone = _backbone(config, device)
    task = _task(config.task, config)
    config.run_dir().mkdir(parents=True, exist_ok=True)  # an --out that is a file fails now (every rank), not later
    examples = task.split("train")
    if not examples or not task.split("val"):
        raise ValueError(f"task {task.name!r} has {len(examples)} labelled training examples and "
                         f"{len(task.split('val'))} for validation (drawn from train: 10%); both are needed")
    if min(config.batch_size, len(examples)) % world:
        raise ValueError(f"task {task.name!r} has {len(examples)} training examples, fewer than batch_size="
                         f"{config.batch_size}: the batch of {len(examples)} must be divisible by the {world} processes")
    if config.batch_size > len(examples):
        warnings.warn(f"task {task.name!r} has {len(examples)} training examples, fewer than batch_size="
                      f"{config.batch_size}: every step takes all of them (the task vector records batch_size="
                      f"{len(examples)})", stacklevel=2)
    hp = hyperparameters(config, task)
    ckpt = config.run_dir() / "checkpoint.safetensors"
    digests = file_digests(config.factor_files)  # once: what the run was given, as it read them
    saved = {**config.to_dict(), "hparams": hp, "weights": backbone.weights,  # the same θ0
             **({"factor_digests": digests} if digests else {})}  # and the same factor files only
    resumed = checkpoint.read_matching(ckpt, saved) if ckpt.exists() else None  # another run's: refused before fitting
    objective = build_objective(config, backbone, task, device)
    params = [p for p in objective.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(objective.param_groups(), weight_decay=hp["weight_decay"])
    anchors = objective.decay_anchors(config.decay_to)
    step, progress = checkpoint.restore(ckpt, resumed, objective, optimizer) if resumed else (0, {})

    def rounding_checked(step):  # asked until it has warned (τ grows), on the main process, while steps remain
        return step == config.steps or not is_main_rank() or warn_if_steps_round_away(optimizer)

    warned = rounding_checked(step)  # of the weights this run goes on from
    _check_resumed(ckpt, step, progress.get("world", world), rank, world, device)
    objective.train()
    bar = tqdm(total=config.steps, initial=step, desc=f"{config.method}/{config.task}",
               disable=not (config.progress and is_main_rank()))
    terms, seconds = progress.get("terms", {}), progress.get("seconds", 0.0)  # as the last run left them
    started = time.time() - seconds

    def save(step, terms, seconds):
        on_main_rank(lambda: checkpoint.save(ckpt, objective, optimizer, step, saved,
                                             {"terms": terms, "seconds": seconds, "world": world}), device)

    def notice(name):
        if is_main_rank():
            tqdm.write(f"tak: {name}: stopping once this step is done and its checkpoint is written "
                       "(a second signal stops at once)", file=sys.stderr)

    with HeldSignals(notice) as held:
        while step < config.steps:
            torch.manual_seed(step_seed(config.seed, step, rank))
            for group in optimizer.param_groups:
                group["lr"] = group["base_lr"] * cosine_schedule(step, config.steps, config.warmup_steps)
            chosen = [examples[i] for i in batch_indices(len(examples), config.batch_size, config.seed, step, rank,
                                                         world)]
            inputs, labels = backbone.collate(chosen)
            loss, terms = objective(to_device(inputs, device), labels.to(device), step)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            # the step's one host sync, once the backward is queued: the loss, its terms and the gradients' norm as
            # numbers, averaged over the processes (every one sees a NaN of any and stops with it: a finite loss can
            # have non-finite gradients, which the step would write into τ and the next checkpoint), and whether a
            # signal asks any process to stop (every one stops after this step)
            grads = [p.grad for p in params if p.grad is not None]
            numbers = torch.stack([loss.detach().float(), *terms.values(),
                                   torch.nn.utils.get_total_norm(grads).float().to(device) if grads
                                   else torch.zeros((), device=device),
                                   torch.tensor(float(held.requested is not None), device=device)])
            if world > 1:
                dist.all_reduce(numbers)
                numbers /= world
            value, *values, grad_norm, stopping = numbers.tolist()
            terms = dict(zip(terms, values))
            if not math.isfinite(value + grad_norm):
                last = f"the last good checkpoint is {ckpt}" if ckpt.exists() else "no checkpoint was written yet"
                what = f"loss is {value}" if not math.isfinite(value) else f"the gradients' norm is {grad_norm}"
                raise FloatingPointError(f"{config.method}/{config.task}: {what} at step {step} (terms {terms}); "
                                         f"{last}")
            _average_gradients(params, world)
            optimizer.step()
            pull_to_anchors(optimizer, anchors)
            step += 1
            seconds = time.time() - started  # training time, over every run that reached this step
            bar.update(1)
            bar.set_postfix({k: f"{v:.3g}" for k, v in terms.items()})
            if writer is not None:
                for k, v in terms.items():
                    writer.add_scalar(f"loss/{k}", v, step)
            if step % config.checkpoint_every == 0 or step == config.steps or stopping:
                save(step, terms, seconds)
                warned = warned or rounding_checked(step)
            if stopping:
                break
    bar.close()
    if not on_every_rank(held.requested is None, device):  # a signal during the last step stops before evaluating
        raise TrainingInterrupted(f"{config.method}/{config.task}: stopped by a signal at step {step} of "
                                  f"{config.steps}; its checkpoint is {ckpt}: start the same run again to continue")
    return _finish(config, backbone, task, objective, terms, seconds, writer, digests)


@_in_matmul_precision
def fit(config: TrainConfig | dict | str, kind: str, path) -> Path:
    """Fit ``kind`` factors ("kfac", "ekfac" or "diagonal") of ``config.backbone`` as a training run fits a penalty's:
    of ``config.task``, or of the reference set ``config.reference`` for EK-FAC and universal factors
    (``config.universal``: the tasks' KFACs pooled, ``pool_kfac``), for the layers ``config.trainable`` trains
    (None: all); write them to ``path``: the file another run's ``factor_files`` takes in place of this data. Its
    metadata records the base model, ``train_examples`` (the training set's size: the factors' λ in a merge) and
    the fit's settings."""
    if kind not in FACTOR_KINDS:
        raise ValueError(f"unknown factor kind {kind!r}; valid kinds: {', '.join(FACTOR_KINDS)}")
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path}: a folder; name the factor file (e.g. {config.task}.{kind}.safetensors)")
    of_reference = config.universal or kind == "ekfac"
    if of_reference and not config.reference:
        raise ValueError(f"{'universal' if config.universal else 'EK-FAC'} factors are fitted on a reference set: set "
                         "reference=[task names] (tak fit --reference)")
    device = _device(config)
    _world(device)
    backbone = _backbone(config, device)
    tasks = _inputs_of(backbone, [_task(t, config) for t in (config.reference if of_reference else [config.task])],
                       "reference" if of_reference else "task")
    layers = None if config.trainable is None else trained_layers(backbone.model, trainable_names(
        backbone.model, config.trainable))
    factors = drift_factors(kind, backbone, tasks, pooled=of_reference,
                            **_fit_options(config, device, layers, cache=None))
    source = {k: v for k, v in backbone.meta()["source"].items() if k != "path"}  # no local paths in a shared file
    factors.meta.update(task="+".join(t.name for t in tasks), base_model=backbone.name, source=source,
                        weights=backbone.weights,
                        train_examples=sum(len(t.split("train")) for t in tasks),
                        fit={k: getattr(config, k) for k in ("factor_examples", "mc_samples", "seed", "max_train",
                                                              "max_length", "backbone_options")})
    on_main_rank(lambda: factors.save(path), device)  # every process may read the file once this returns
    return path


def _tensorboard(config: TrainConfig, run_dir: Path, write: bool):
    """The run's TensorBoard writer where ``write`` (rank 0), else None; a missing package is refused everywhere."""
    if not config.tensorboard:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise ImportError("tensorboard=True needs the tensorboard package: pip install tensorboard") from e
    return SummaryWriter(str(run_dir / "tensorboard")) if write else None


def _finish(config, backbone, task, objective, terms, seconds, writer, digests) -> TrainResult:
    """Evaluate the trained τ on the task's val and test splits and write the outputs (rank 0)."""
    objective.eval()
    method = objective.method
    kw = dict(batch_size=config.eval_batch_size, device=next(objective.parameters()).device)
    metrics = {"val": accuracy(backbone, objective.student.at(1.0), task, "val", **kw),
               "test": accuracy(backbone, objective.student.at(1.0), task, "test", **kw),
               "final_loss_terms": terms, "train_seconds": round(seconds, 2)}
    if objective.teacher is not None:
        metrics["teacher_test"] = accuracy(backbone, objective.teacher.at(1.0), task, "test", **kw)
    meta = {**backbone.meta(), "method": method.name, "task": task.name, "regime": objective.student.regime,
            "trainable": config.trainable or method.trainable, "hparams": objective.hp, "seed": config.seed,
            "steps": config.steps, "batch_size": min(config.batch_size, len(task.split("train"))),  # as trained
            "max_length": config.max_length,
            "data_root": None if config.data_root is None else str(Path(config.data_root).resolve()),
            "backbone_options": config.backbone_options, "unpenalized": objective.unpenalized, "metrics": metrics,
            "config": config.to_dict()}  # the whole run (penalty options, tasks, compression, ...): config.yaml
    if digests:
        meta["factor_files"] = [{"path": str(Path(f).resolve()), "sha256": d} for f, d in zip(config.factor_files, digests)]
    tv = TaskVector({k: v.cpu() for k, v in objective.task_vector().items()}, meta)  # not kept on the GPU
    run_dir = config.run_dir()
    path = run_dir / "task_vector.safetensors"

    def write():
        tv.save(path)
        if objective.teacher is not None:
            TaskVector({k: v.cpu() for k, v in objective.teacher.task_vector().items()},
                       {**meta, "regime": "linear", "role": "teacher"}).save(
                run_dir / "teacher_task_vector.safetensors")
        write_text(run_dir / "metrics.json", json.dumps(metrics, indent=2))
        import yaml
        write_text(run_dir / "config.yaml", yaml.safe_dump(meta["config"], sort_keys=False))
        if writer is not None:
            for k in ("val", "test"):
                writer.add_scalar(f"accuracy/{k}", metrics[k], config.steps)
            writer.close()
    on_main_rank(write, kw["device"])
    return TrainResult(tv, path, metrics)
