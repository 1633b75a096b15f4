"""GPU benchmark of the training methods' per-step cost: full training steps of ``tak.methods.Objective``
(forward, loss, backward, AdamW step) for non-linear, linear, TAK and DELTA fine-tuning, CLIP ViT-B/16 (or T5-base).

    python benchmarks/bench_methods.py [--out DIR] [--only SECTION] [--backbone {clip,t5}] [--smoke]

Writes ``bench_methods.md`` (the markdown table that goes into benchmarks/RESULTS.md) and
``bench_methods.json`` (every number) to DIR: ``--out``, else ``$OUT``, else benchmarks/ (``bench_methods_t5.*``
with ``--backbone t5``).
Targets (the issue): the TAK penalty adds ≤ 5% to a linearized step (published code: about 35%); a
DELTA step costs ≤ 3× a non-linear step (DELTA paper: 3.9×); peak memory of both next to the plain step.

Model: ``tak.backbones.load_backbone("clip:ViT-B-16")`` (open_clip, random weights: ``pretrained=None``; the text
tower is released once loaded), its image tower fine-tuned; a ``tak.backbones.base.Head`` with random
weights (10 classes, cosine logits, scale 100); random images (batch 128, 224²) and random labels. With
``--backbone t5``: T5-base (``T5ForConditionalGeneration`` of T5-base's config, random weights) as
``tak.backbones.t5.T5Backbone``, all of it trained (the papers' text setup: its shared embedding and relative
position buckets are in the penalty, as embeddings), random token ids (batch 32 × 128 tokens), a random
3-class head. No data loading: what is timed is exactly the per-step cost. Objectives are built with
``tak.methods.Objective`` and each method's paper hyperparameters (``tak.methods.get_method(...).defaults``)
the way ``tak.training.loop.build_objective`` builds them, and a step is the loop's step:
``loss, terms = objective(x, y, step)``, ``zero_grad(set_to_none=True)``, ``loss.backward()``, the loop's one host
sync (the loss, its terms and the gradients' norm as numbers, their finiteness check), ``AdamW(lr, weight_decay).step()``
and the decay of θ = θ0 + τ (``decay_to="zero"``: ``pull_to_anchors``, a linearized model's τ pulled to −θ0).

Sections (each guarded: a failure is recorded and the run goes on; so is each configuration):

- steps: one training step of
  * nonlinear: fine-tuning of θ (``NonlinearTrainee``);
  * linear: the linearized model in τ (``LinearTrainee``: ``tak.linearize`` fast path);
  * tak: linear + ``CurvaturePenalty`` (β = 100, ``layer_weights(last_layer_weight=0.1)``, which puts the
    0.1 on the last linear layer the features reach: the tower's output projection proj) on KFAC factors merged over two
    "tasks" (``tak.fit_kfac`` on 16 random images each, ``dense=True`` as the loop fits them: LayerNorm
    and class-token blocks included, then ``tak.merge_kfac``, TAK Eq. 8): the factors of the right
    shapes, fp32, as the loop holds them;
  * tak, published-code penalty: the same step with the penalty written as the published code does it,
    β Σ_l w_l trace(B_l @ T_l @ A_l @ T_lᵀ) with autograd, T_l = [W | b] blocks cast to fp32;
  * delta: DELTA (Alg. 1): linearized teacher + non-linear student, each with an EK-FAC penalty
    (β^T = β^S = 500; ``EKFAC`` factors built from random orthogonal bases and random positive
    eigenvalues of the layers' shapes: timing does not depend on their values) and the along-path
    distillation (γ = 1);
  * linear, timed again: its ratio to the first linear step is the run-to-run spread, the noise in tak's 1.05;
  * tak, factors offloaded (last: it has no target): the same step with ``offload_factors`` (the factors on the CPU
    in pinned memory, copied to the GPU on a side stream at every step: the worst case, ``penalty_every=1``), vs tak.
  Ratios: tak / linear (target ≤ 1.05), tak published / linear (published code: about 1.35), delta /
  nonlinear (target ≤ 3), linear / nonlinear; peak memory each / its plain reference.
- penalty: the TAK penalty alone, forward + backward in τ over all the model's parameters:
  ``CurvaturePenalty(KFAC)`` (``kfac_kernels.quadratic_forms``) with bf16 τ (as in the tak step) and
  fp32 τ, vs the published-code form (per layer ``trace(B @ T @ A @ T.T)`` with autograd, fp32, at
  'highest' matmul precision: what published code runs); the EK-FAC penalty alone (DELTA's) for scale.

Precision: bf16 weights, images, τ and AdamW states (``load_backbone(..., dtype=torch.bfloat16)``), no
autocast: the linearized fast path's fused dual kernels multiply in the narrowest input dtype, so under
autocast with fp32 weights they would run fp32 GEMMs (see bench_linearized.py); every method runs in
the same precision. Curvature factors fp32 (as ``fit_kfac`` returns them); fp32 matmul precision
'highest'.

Timing: wall time of whole steps between ``torch.cuda.synchronize()`` calls (the step's own host
syncs, e.g. ``Objective`` turning its terms into floats, are part of what a training step costs),
median over warm steps (3 warm-up steps, the first one with compilation / autotuning, then 5 to 20
timed steps, about 1.5 s of them). Penalty rows: the same, 10 to 50 calls. Peak memory:
``torch.cuda.max_memory_allocated`` from building the configuration (trainees' copies, τ, factors moved
to the GPU) through its last step, reset before each configuration, above what was allocated before it
(the backbone's model and the batch stay resident and are not counted): the whole footprint of
training with that method (θ / θ0 copies, τ, gradients, AdamW states, activations, factors).

``--smoke`` runs both sections on the CPU with the torch backend, one thread, a tiny open_clip CLIP (built
offline from a ``clip:local-dir:`` config), batch 4, 1 warm-up and 2 timed steps, in about 15 s (it writes
bench_methods_smoke.md/.json instead).
"""
import argparse
import gc
import json
import math
import os
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # bench_gpu, whatever the working directory
import bench_gpu as bg  # noqa: E402  (puts this checkout first on sys.path, imports kfac_kernels)

CFG = bg.CFG
BATCH = 128
CLASSES = 10
BACKBONE = "clip:ViT-B-16"
T5_BASE = dict(vocab_size=32128, d_model=768, d_kv=64, d_ff=3072, num_layers=12, num_heads=12, decoder_start_token_id=0)
T5_TINY = dict(vocab_size=500, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, decoder_start_token_id=0)
T5_BATCH, T5_TOKENS, T5_CLASSES = 32, 128, 3
TARGETS = {"tak": 1.05, "delta": 3.0}  # upper bounds on step time / its plain reference
PUBLISHED = {"tak": "published code: about 1.35×", "delta": "DELTA paper: 3.9×"}

RESULTS = []  # every Measured, in order
FAILED_SECTIONS = {}
INFO = {}  # what ran: backbone, batch, precision (filled in by setup)


@dataclass
class Measured:
    section: str
    name: str
    reference: str | None = None  # name of the plain reference (ratio = ms / its ms)
    ms: float | None = None
    peak_gib: float | None = None
    first_call_s: float | None = None  # first step: compilation / autotuning included
    build_s: float | None = None
    iterations: int = 0
    terms: dict | None = None  # the loss terms of the last step
    note: str = ""
    error: str | None = None


def find(name) -> Measured | None:
    return next((r for r in RESULTS if r.name == name), None)


# ---------------------------------------------------------------- setup (once, shared by the sections)

class Setup:
    which = "clip"  # or "t5" (--backbone)
    backbone = None
    head = None
    x = None  # images, or a T5 batch (token ids, attention mask, decoder start tokens)
    y = None
    kfac = None  # merged KFAC, on the CPU
    ekfac = None  # EK-FAC of random bases, on the CPU


def dtype() -> torch.dtype:
    """The dtype of the model, images, τ and AdamW states (see the module docstring)."""
    return torch.bfloat16


def tiny_clip_spec(folder: Path) -> str:
    """A tiny open_clip CLIP config (as tests/test_backbones.py builds one), offline: clip:local-dir:."""
    vision = {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 8}
    text = {"context_length": 16, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1}  # open_clip's BPE
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": {"embed_dim": 16, "vision_cfg": vision,
                                                                            "text_cfg": text}}))
    return f"clip:local-dir:{folder}"


def t5_inputs(n: int, tokens: int, vocab: int, seed: int) -> dict:
    """A T5 batch: random token ids (n, tokens), all real, and the decoder start token."""
    g = bg.gen(seed)
    return {"input_ids": torch.randint(1, vocab, (n, tokens), generator=g, device=CFG.dev),
            "attention_mask": torch.ones(n, tokens, dtype=torch.long, device=CFG.dev),
            "decoder_input_ids": torch.zeros(n, 1, dtype=torch.long, device=CFG.dev)}


def setup_t5() -> Setup:
    """T5-base (tiny with --smoke), random weights, all of it trained; random token batches and head."""
    from tak._compat import ensure_torchvision_importable
    ensure_torchvision_importable()  # before transformers (tak's loaders do the same)
    import transformers
    from tak.backbones.base import Head
    from tak.backbones.t5 import T5Backbone
    torch.manual_seed(0)
    t = time.time()
    config = transformers.T5Config(**(T5_TINY if CFG.smoke else T5_BASE))
    model = transformers.T5ForConditionalGeneration(config).to(device=CFG.dev, dtype=dtype())
    backbone = T5Backbone(model, None, name="t5-base (random weights)")  # no tokenizer: the batches are token ids
    n, tokens = (4, 16) if CFG.smoke else (T5_BATCH, T5_TOKENS)
    Setup.x = t5_inputs(n, tokens, config.vocab_size, 0)
    Setup.y = torch.randint(0, T5_CLASSES, (n,), generator=bg.gen(1), device=CFG.dev)
    Setup.head = Head(torch.randn(T5_CLASSES, config.d_model, generator=bg.gen(2), device=CFG.dev), normalize=False,
                      scale=1.0)
    Setup.backbone = backbone
    INFO.update({
        "backbone": f"T5ForConditionalGeneration, {'a tiny config' if CFG.smoke else 'T5-base'}'s shapes "
                    f"(transformers {transformers.__version__}, random weights), "
                    f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, all trained",
        "batch": f"{n} × {tokens} random token ids, decoder start token; {T5_CLASSES} classes, random labels",
        "precision": "bf16 weights, τ and AdamW states (no autocast); factors fp32; fp32 matmuls 'highest'",
    })
    print(f"  backbone built in {time.time() - t:.1f} s: {INFO['backbone']}", flush=True)
    fit_n = 2 if CFG.smoke else 16
    return _factors([[t5_inputs(fit_n, tokens, config.vocab_size, 10 + i)] for i in range(2)], f"{fit_n} sequences")


def setup() -> Setup:
    if Setup.backbone is not None:
        return Setup
    if Setup.which == "t5":
        return setup_t5()
    from tak.backbones import load_backbone
    from tak.backbones.base import Head
    torch.manual_seed(0)
    t = time.time()
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*pretrained=None.*random weights")
        spec = tiny_clip_spec(Path(tmp)) if CFG.smoke else BACKBONE
        backbone = load_backbone(spec, pretrained=None, dtype=dtype())
    backbone.release_text_tower()  # only the image tower trains; heads are random here
    backbone.to(CFG.dev)
    model = backbone.model
    n = 4 if CFG.smoke else BATCH
    size = model.image_size[0] if isinstance(model.image_size, tuple) else model.image_size
    g = bg.gen(0)
    Setup.x = torch.randn(n, 3, size, size, generator=g, device=CFG.dev).to(dtype())
    Setup.y = torch.randint(0, CLASSES, (n,), generator=g, device=CFG.dev)
    with torch.no_grad():
        dim = backbone.features(model, Setup.x[:1]).shape[-1]
    Setup.head = Head(torch.randn(CLASSES, dim, generator=g, device=CFG.dev), normalize=True, scale=100.0)
    Setup.backbone = backbone
    n_params = sum(p.numel() for p in model.parameters())
    INFO.update({
        "backbone": f"{spec if CFG.smoke else BACKBONE} image tower (open_clip {_open_clip_version()}, random weights), "
                    f"{n_params / 1e6:.1f}M parameters",
        "batch": f"{n} images {size}², {CLASSES} classes, random labels",
        "precision": "bf16 weights, images, τ and AdamW states (no autocast); factors fp32; fp32 matmuls 'highest'",
    })
    print(f"  backbone loaded in {time.time() - t:.1f} s: {INFO['backbone']}", flush=True)
    fit_n = 2 if CFG.smoke else 16
    return _factors([[torch.randn(fit_n, 3, size, size, generator=bg.gen(10 + i), device=CFG.dev).to(dtype())]
                     for i in range(2)], f"{fit_n} images")


def _factors(fits: list, what: str) -> Setup:
    """The merged KFAC of the backbone's fits on two "tasks" (their batches ``fits``, of ``what`` each; TAK Eq. 8) and
    EK-FAC factors of random bases, on the CPU."""
    import tak
    t = time.time()
    parts = [tak.fit_kfac(Setup.backbone.model, batches, output_fn=Setup.backbone.features, progress=False)
             for batches in fits]
    Setup.kfac = tak.merge_kfac(parts, [1000, 3000]).to("cpu")
    Setup.ekfac = random_ekfac(parts[0]).to("cpu")
    del parts
    free()
    n_dense = sum(1 for f in Setup.kfac.values() if not hasattr(f, "weight"))
    n_embeddings = sum(1 for f in Setup.kfac.values() if getattr(f, "layout", None) == "embedding")
    INFO["factors"] = (f"KFAC: {len(Setup.kfac) - n_dense} layers ({n_embeddings} embeddings) + {n_dense} exact "
                       f"blocks, merged over 2 fits of {what} ({kfac_mib(Setup.kfac):.0f} MiB); EK-FAC: "
                       f"{len(Setup.ekfac) - n_dense} layers with random bases + the exact blocks "
                       f"({kfac_mib(Setup.ekfac):.0f} MiB)")
    print(f"  factors in {time.time() - t:.1f} s: {INFO['factors']}", flush=True)
    return Setup


def _open_clip_version() -> str:
    import open_clip
    return open_clip.__version__


def kfac_mib(factors) -> float:
    return sum(t.numel() * t.element_size() for f in factors.values() for t in vars(f).values()
               if isinstance(t, torch.Tensor)) / 2**20


def random_ekfac(kfac):
    """EK-FAC factors of ``kfac``'s linear layers (random orthogonal bases, one per size, random positive S)
    and its exact blocks."""
    from tak.curvature import EKFAC, EigenFactors
    bases = {}

    def basis(n):
        if n not in bases:
            bases[n] = torch.linalg.qr(torch.randn(n, n, generator=bg.gen(n), device=CFG.dev))[0]
        return bases[n]

    factors = {}
    for name, lf in kfac.items():
        if not hasattr(lf, "weight"):  # an exact block, kept as fit_ekfac keeps it
            factors[name] = lf
            continue
        d_out, d_in = lf.B.shape[0], lf.A.shape[0]
        S = torch.rand(d_out, d_in, generator=bg.gen(d_out * d_in), device=CFG.dev) + 0.1
        U_A = None if lf.A.dim() == 1 else basis(d_in).clone()  # the identity of a diagonal A, as fit_ekfac's
        factors[name] = EigenFactors(U_B=basis(d_out).clone(), U_A=U_A, S=S, weight=lf.weight, bias=lf.bias,
                                     layout=lf.layout)
    return EKFAC(factors, {"kind": "ekfac", "tokens": "expand", "note": "random bases and eigenvalues (timing)"})


# ---------------------------------------------------------------- penalties

class PublishedPenalty:
    """The TAK penalty as published code computes it: β Σ_l w_l trace(B_l @ T_l @ A_l @ T_lᵀ) with autograd,
    T_l the layer's [W | b] block of τ cast to fp32 (fp32 factors); an embedding's, whose A is a diagonal a,
    ((B_l @ T_l) * T_l * a).sum(). Same call as ``CurvaturePenalty``."""

    def __init__(self, factors, beta, weights=None):
        self.factors, self.beta, self.weights = factors, float(beta), weights or {}

    def __call__(self, taus, step=0):
        names, blocks = self.factors.blocks(taus)
        total = 0.0
        for name, T in zip(names, blocks):
            f, T = self.factors[name], T.float()
            # an embedding's diagonal A (published code has none) as one would write it, over every column
            q = ((f.B @ T) * T * f.A).sum() if f.A.dim() == 1 else torch.trace(f.B @ T @ f.A @ T.T)
            total = total + self.weights.get(name, 1.0) * q
        return self.beta * total


def penalties(kind: str, beta: float, *, teacher: bool = False, offload: bool = False):
    """(penalty, teacher_penalty) of ``kind`` ("kfac", "published" or "ekfac"), their factors moved to the
    device once and shared, as ``build_objective`` does (the move is counted in the configuration's memory);
    ``offload``: kept on the CPU (pinned) and copied to the device at every step instead."""
    from tak.methods import CurvaturePenalty, layer_weights
    factors = Setup.ekfac if kind == "ekfac" else Setup.kfac
    factors = factors if offload else factors.to(CFG.dev)
    weights = layer_weights(factors, last_layer_weight=0.1 if kind != "ekfac" else 1.0)
    if kind == "published":
        return PublishedPenalty(factors, beta, weights), None

    def make(b):
        return CurvaturePenalty(factors, b, weights=weights, device=CFG.dev, offload=offload)
    return make(beta), (make(beta) if teacher else None)


# ---------------------------------------------------------------- measuring

def free():
    gc.collect()
    if CFG.dev == "cuda":
        torch.cuda.empty_cache()


def sync():
    if CFG.dev == "cuda":
        torch.cuda.synchronize()


def allocated() -> int:
    return torch.cuda.memory_allocated() if CFG.dev == "cuda" else 0


def run_timed(r: Measured, fn, *, warmup: int, lo: int, hi: int, budget_s: float):
    """fn() ``warmup`` times (the first one's wall time is ``first_call_s``), then ``lo``..``hi`` timed calls
    (about ``budget_s`` of them); r.ms = median; smoke: 2 timed calls."""
    times = []
    for i in range(warmup):
        sync()
        t = time.perf_counter()
        fn(i)
        sync()
        times.append(time.perf_counter() - t)
    r.first_call_s = times[0]
    warm = statistics.median(times[1:]) if len(times) > 1 else times[0]
    n = 2 if CFG.smoke else max(lo, min(hi, int(budget_s / max(warm, 1e-4))))
    times = []
    for i in range(n):
        sync()
        t = time.perf_counter()
        fn(warmup + i)
        sync()
        times.append(time.perf_counter() - t)
    r.ms, r.iterations = 1e3 * statistics.median(times), n


def measure(section, name, build, *, reference=None, note="", warmup=3, lo=5, hi=20, budget_s=1.5) -> Measured:
    """Builds ``build() -> (fn(i), on_done)`` and times fn; peak memory from before the build."""
    r = Measured(section, name, reference=reference, note=note)
    free()
    sync()
    base = allocated()
    if CFG.dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    try:
        t = time.perf_counter()
        fn, done = build()
        sync()
        r.build_s = time.perf_counter() - t
        run_timed(r, fn, warmup=1 if CFG.smoke else warmup, lo=lo, hi=hi, budget_s=budget_s)
        sync()
        if CFG.dev == "cuda":
            r.peak_gib = (torch.cuda.max_memory_allocated() - base) / 2**30
        if done is not None:
            r.terms = done()
    except Exception as e:  # record and go on: the table shows the failure
        r.error = f"{type(e).__name__}: {e}"[:4000]
    fn = done = None
    free()
    RESULTS.append(r)
    CFG.save()  # after every measurement: a run stopped by a timeout keeps the ones it finished
    shown = f"{r.ms:10.2f} ms" if r.ms is not None else "    FAILED  " + bg.one_line(r.error, 200)
    mem = "" if r.peak_gib is None else f"  peak {r.peak_gib:6.2f} GiB"
    print(f"  {name:55s} {shown}{mem}", flush=True)
    return r


# ---------------------------------------------------------------- steps

def training_step(method_name: str, *, penalty=None, teacher_penalty=None):
    """A builder for ``measure``: the method's Objective and AdamW, and a step as tak.training.loop does it."""
    def build():
        from tak.methods import Objective, get_method
        from tak.training.loop import pull_to_anchors
        s = setup()
        method = get_method(method_name)
        hp = dict(method.defaults)
        p, tp = penalty() if penalty is not None else (None, None)
        objective = Objective(method, s.backbone, s.head, hp, penalty=p, teacher_penalty=tp, seed=0).to(CFG.dev)
        objective.train()
        params = [q for q in objective.parameters() if q.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=hp["lr"], weight_decay=hp["weight_decay"])
        anchors = objective.decay_anchors("zero")
        last = {}

        def step(i):
            loss, terms = objective(s.x, s.y, i)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.get_total_norm([q.grad for q in params if q.grad is not None]).float()
            value, *values, norm = torch.stack([loss.detach().float(), *terms.values(), grad_norm]).tolist()  # one sync
            if not math.isfinite(value + norm):
                raise FloatingPointError(f"{method_name}: loss {value} at step {i} ({dict(zip(terms, values))})")
            optimizer.step()
            pull_to_anchors(optimizer, anchors)
            last.update(zip(terms, values))

        def done():
            paths = {who: type(getattr(t, "lin", t)).__name__ for who, t in
                     (("student", objective.student), ("teacher", objective.teacher)) if t is not None}
            return {**{f"last {k}": round(v, 4) for k, v in last.items()},
                    "trained parameters": sum(q.numel() for q in params), **paths}
        return step, done
    return build


def section_steps():
    setup()
    steps = "steps"
    measure(steps, "nonlinear", training_step("nonlinear"))
    measure(steps, "linear", training_step("linear"), reference="nonlinear")
    measure(steps, "tak", training_step("tak", penalty=lambda: penalties("kfac", 100.0)), reference="linear",
            note="CurvaturePenalty(merged KFAC), kfac_kernels.quadratic_forms, bf16 τ")
    measure(steps, "tak, published-code penalty", training_step("tak", penalty=lambda: penalties("published", 100.0)),
            reference="linear", note="Σ_l trace(B @ T @ A @ T.T), autograd, fp32")
    measure(steps, "linear, timed again", training_step("linear"), reference="linear",
            note="the run-to-run spread of a step: the noise in tak's ≤ 1.05× of linear")
    measure(steps, "delta", training_step("delta", penalty=lambda: penalties("ekfac", 500.0, teacher=True)),
            reference="nonlinear", note="teacher + student, EK-FAC penalties (kfac_kernels.eigen_quadratic_forms), "
                                        "along-path distillation; matrix-work floor ≈ 11/3 of nonlinear "
                                        "(student: 2 × (forward + backward) = 6 GEMMs per layer; teacher: dual "
                                        "forward 3 + tangent backward 2; nonlinear: 3)")
    measure(steps, "tak, factors offloaded",
            training_step("tak", penalty=lambda: penalties("kfac", 100.0, offload=True)), reference="tak",
            note="offload_factors: the factors copied from pinned CPU memory at every step (the worst case; "
                 "penalty_every=N copies every N-th), on a side stream beside the forward")


# ---------------------------------------------------------------- penalty alone

def penalty_alone(kind: str, dtype: torch.dtype):
    def build():
        s = setup()
        p, _ = penalties(kind, 100.0)
        g = bg.gen(3)
        taus = {n: (1e-3 * torch.randn(q.shape, generator=g, device=CFG.dev)).to(dtype).requires_grad_()
                for n, q in s.backbone.model.named_parameters()}
        params = list(taus.values())

        value = []

        def call(i):
            for t in params:
                t.grad = None
            q = p(taus, i)
            q.backward()
            value[:] = [q]
        return call, lambda: {"value β·q(τ)": f"{float(value[0]):.6g}"}
    return build


def section_penalty():
    setup()
    sec = "penalty"
    n_layers = len(Setup.kfac)
    ref = f"published form (fp32 trace, autograd), {n_layers} blocks"
    measure(sec, ref, penalty_alone("published", torch.float32), lo=10, hi=50, budget_s=1.0)
    measure(sec, "CurvaturePenalty(KFAC), bf16 τ", penalty_alone("kfac", torch.bfloat16), reference=ref,
            lo=10, hi=50, budget_s=1.0, note="as in the tak step")
    measure(sec, "CurvaturePenalty(KFAC), fp32 τ", penalty_alone("kfac", torch.float32), reference=ref,
            lo=10, hi=50, budget_s=1.0)
    measure(sec, "CurvaturePenalty(EK-FAC), bf16 τ", penalty_alone("ekfac", torch.bfloat16), reference=ref,
            lo=10, hi=50, budget_s=1.0, note="DELTA's penalty (one of its two per step)")


SECTIONS = {
    "steps": ("Training steps: forward, loss, backward, AdamW (tak.methods.Objective)", section_steps),
    "penalty": ("The penalty alone: forward + backward in τ", section_penalty),
}


# ---------------------------------------------------------------- report

def fmt(x, spec):
    return "—" if x is None else format(x, spec)


def table(info) -> str:
    lines = ["# tak training methods: per-step cost (bench_methods.py)", "",
             " · ".join(f"{k}: {v}" for k, v in info.items()), ""]
    for key, (title, _) in SECTIONS.items():
        rows = [r for r in RESULTS if r.section == key]
        if not rows:
            continue
        lines += [f"## {title}", "",
                  f"| method | {'step' if key == 'steps' else 'call'} ms | ratio | vs | target | peak GiB | mem ratio "
                  f"| first {'step' if key == 'steps' else 'call'} s | timed | note |",
                  "|---|---:|---:|---|---|---:|---:|---:|---:|---|"]
        for r in rows:
            ref = find(r.reference) if r.reference else None
            ratio = r.ms / ref.ms if ref is not None and r.ms and ref.ms else None
            mem = r.peak_gib / ref.peak_gib if ref is not None and r.peak_gib and ref.peak_gib else None
            target = TARGETS.get(r.name) if key == "steps" else None
            cell = "—"
            if target is not None and CFG.smoke:
                cell = f"≤ {target:g}× (not judged under --smoke)"
            elif target is not None:
                cell = f"≤ {target:g}× " + ("—" if ratio is None else "PASS" if ratio <= target else "MISS")
                cell += f" ({PUBLISHED[r.name]})"
            elif r.name.startswith("tak, published"):
                cell = f"({PUBLISHED['tak']})"
            note = "; ".join(x for x in [r.note, f"FAILED: {bg.one_line(r.error, 300)}" if r.error else ""] if x)
            if r.terms:
                note += ("; " if note else "") + ", ".join(f"{k} {v}" for k, v in r.terms.items())
            lines.append(" | ".join([f"| {r.name}", fmt(r.ms, ".2f"), fmt(ratio, ".3f") + ("×" if ratio else ""),
                                     r.reference or "—", cell, fmt(r.peak_gib, ".2f"),
                                     fmt(mem, ".2f") + ("×" if mem else ""), fmt(r.first_call_s, ".1f"),
                                     str(r.iterations or "—"), note]) + " |")
        lines.append("")
    for key, error in FAILED_SECTIONS.items():
        lines.append(f"**Section {key} failed**: {bg.one_line(error, 300)}")
    lines += ["", "Notes:",
              "- ratio: step ms / step ms of the row named in `vs` (its plain reference); target: an upper bound on "
              "it (PASS / MISS). mem ratio: peak GiB / the reference's peak GiB.",
              "- step ms: median wall time of whole steps between CUDA synchronizations, after 3 warm-up steps "
              "(first step s: the first of them, compilation and autotuning included).",
              "- peak GiB: torch.cuda.max_memory_allocated from building the configuration through its last step, "
              "above the resident backbone model and batch: θ / θ0 copies, τ, gradients, AdamW states, activations, "
              "factors on the GPU.",
              "- tak's layer weights: `tak.methods.layer_weights(K, last_layer_weight=0.1)` as the loop builds them: "
              "0.1 on the last linear layer the features reach (CLIP: the tower's output projection proj), 1 "
              "elsewhere, the exact LayerNorm / class-token blocks included.",
              "- The published-code penalty: β Σ_l w_l trace(B_l @ T_l @ A_l @ T_lᵀ), autograd, T_l = [W | b] in fp32, "
              "fp32 factors at 'highest' matmul precision.",
              ""]
    return "\n".join(lines)


def write(out: Path, stem: str, info: dict) -> str:
    text = table(info)
    (out / f"{stem}.md").write_text(text)
    rows = []
    for r in RESULTS:
        ref = find(r.reference) if r.reference else None
        rows.append({**asdict(r), "ratio": r.ms / ref.ms if ref is not None and r.ms and ref.ms else None,
                     "mem_ratio": r.peak_gib / ref.peak_gib if ref is not None and r.peak_gib and ref.peak_gib else None,
                     "target": TARGETS.get(r.name) if r.section == "steps" else None})
    (out / f"{stem}.json").write_text(json.dumps(dict(header=info, results=rows, failed_sections=FAILED_SECTIONS),
                                                 indent=1))
    return text


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT", str(HERE)), help="output folder (default: $OUT, else benchmarks/)")
    p.add_argument("--only", choices=list(SECTIONS), help="run one section")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU, torch backend, 2 timed steps")
    p.add_argument("--backbone", choices=["clip", "t5"], default="clip",
                   help="CLIP ViT-B/16's image tower (default) or all of T5-base")
    args = p.parse_args()
    Setup.which = args.backbone

    CFG.smoke = args.smoke
    if not args.smoke and not torch.cuda.is_available():
        sys.exit("bench_methods.py needs a CUDA device (use --smoke to check the script on a CPU)")
    CFG.dev = "cpu" if args.smoke else "cuda"
    CFG.backend = "torch" if args.smoke else "auto"  # auto: Triton for CUDA tensors, what a user gets
    os.environ["KFAC_KERNELS_BACKEND"] = CFG.backend
    torch.set_float32_matmul_precision("highest")
    if args.smoke:  # tiny shapes: one thread (on a shared CPU, OpenMP's spinning threads make steps 10-100× slower)
        torch.set_num_threads(1)

    info = bg.header()
    print(" · ".join(f"{k}: {v}" for k, v in info.items()), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "bench_methods" + ("_t5" if args.backbone == "t5" else "") + ("_smoke" if args.smoke else "")
    start = time.time()
    keys = [args.only] if args.only else list(SECTIONS)
    CFG.save = lambda: write(out, stem, info)
    text = ""
    for i, key in enumerate(keys):
        t = time.time()
        print(f"== {key}", flush=True)
        try:
            SECTIONS[key][1]()
        except Exception as e:  # record and go on with the next section
            FAILED_SECTIONS[key] = f"{type(e).__name__}: {e}"[:4000]
            print(f"  SECTION FAILED {bg.one_line(FAILED_SECTIONS[key], 300)}", flush=True)
        free()
        print(f"-- {key} took {time.time() - t:.0f} s", flush=True)
        info.update(INFO)
        info["total seconds"] = round(time.time() - start)
        if i + 1 < len(keys):
            info["sections done"] = ", ".join(keys[:i + 1]) + f" (of {', '.join(keys)})"
        else:
            info.pop("sections done", None)
        text = write(out, stem, info)
    print("\n" + text)
    print(f"wrote {out / stem}.md and .json")


if __name__ == "__main__":
    main()
