"""GPU benchmark of curvature fitting (issue 3): ``tak.fit_kfac`` and ``tak.fit_ekfac`` on a CLIP
ViT-B/16-shaped vision tower, against one plain forward+backward and the published-code reference.

    python benchmarks/bench_curvature.py [--out DIR] [--only SECTION] [--smoke]

Writes ``bench_curvature.md`` (the markdown table that goes into benchmarks/RESULTS.md) and
``bench_curvature.json`` (every number) to DIR: ``--out``, else ``$OUT``, else benchmarks/.
Sections (each guarded: a failure is recorded and the run goes on; so is each single measurement):

- kfac: A and B (MC=1, tokens "expand") for all 48 linear layers (q/k/v in_proj, out_proj, c_fc,
  c_proj of 12 blocks) of open_clip ``VisionTransformer(image_size=224, patch_size=16, width=768,
  layers=12, heads=12, mlp_ratio=4, output_dim=512)``, random weights, over 128 images in one batch:
  ``tak.fit_kfac(..., dense=False)`` (also with the default ``dense=True``: exact LayerNorm and class
  token blocks) vs one plain forward+backward over the same images (weight gradients, fused attention;
  target ≤ 1.5×) and vs the reference written the way published code does it: a forward hook per
  ``nn.Linear`` storing its input, a full backward hook for its output gradient, fp32 ``A += a.T @ a``
  and ``B += g.T @ g`` from ``.float()`` copies (ones column for the bias), one full
  ``loss.backward()`` of ½‖f − y‖² with y ~ N(f, I) that computes every weight gradient. open_clip's
  attention keeps q/k/v in ``in_proj_weight`` and calls ``out_proj`` functionally, so in the
  reference (a copy of the model) each ``nn.MultiheadAttention`` is replaced by the same computation
  with ``in_proj`` and ``out_proj`` called as ``nn.Linear`` modules (fused SDPA in between): hooks then
  see the same 48 layers.
- ekfac: the EK-FAC correction pass ``tak.fit_ekfac(model, batches, kfac=K)`` with the fp64
  eigendecompositions of K's factors done once and cached (the pass itself: target ≤ 2× the KFAC
  pass), and one call of the whole of it, eigendecompositions included.

Precision: bf16 weights and bf16 images (``model.to(torch.bfloat16)``, not autocast: under autocast
the LayerNorm outputs that feed most linear layers are fp32, so activations would reach the
covariance kernel in fp32). The reference's covariances are fp32 at the default matmul precision
('highest'), as published code runs. Falls back to an equivalent ViT built from torch modules
(``nn.MultiheadAttention``, ``nn.Linear`` MLP, ``nn.LayerNorm``) when open_clip cannot be imported;
the table header says which model ran.

Timing: median of CUDA-event times over ≥ 3 calls (about 1 s of calls) after an untimed first call
that compiles and autotunes. Peak memory: ``torch.cuda.max_memory_allocated`` during one call above
what was allocated before it (the model and the images are resident, not counted).

``--smoke`` runs every section at tiny shapes on the CPU with the torch backend and a plain timer,
so the script can be checked without a GPU (it writes bench_curvature_smoke.md/.json instead).
This file also holds the helpers that ``bench_linearized.py`` shares (model builders, timing, table).
"""
import argparse
import contextlib
import copy
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # bench_gpu, whatever the working directory
import bench_gpu as bg  # noqa: E402  (puts this checkout first on sys.path, imports kfac_kernels)

CFG = bg.CFG  # one configuration shared with bench_gpu's helpers (smoke, dev, backend)
ROWS = {}  # section -> [ModelRow]
FAILED_SECTIONS = {}
MODEL_INFO = {}  # what ran: the model class, the precision (filled in by the sections)


# ---------------------------------------------------------------- models

def vit_config(patch: int) -> dict:
    """Arguments of open_clip's VisionTransformer: CLIP ViT-B/<patch> shapes, tiny under --smoke."""
    if CFG.smoke:
        return dict(image_size=32, patch_size=patch // 2, width=32, layers=2, heads=2, mlp_ratio=4, output_dim=16)
    return dict(image_size=224, patch_size=patch, width=768, layers=12, heads=12, mlp_ratio=4, output_dim=512)


def open_clip_vit():
    """open_clip's VisionTransformer class, or None when open_clip cannot be imported."""
    try:
        from tak._compat import ensure_torchvision_importable
        ensure_torchvision_importable()  # a CPU torch next to PyPI's CUDA torchvision (see tak._compat)
        from open_clip.transformer import VisionTransformer
        return VisionTransformer
    except Exception as e:  # ImportError, or a broken torchvision: fall back, and say so in the table
        MODEL_INFO["open_clip"] = f"not importable ({type(e).__name__}: {bg.one_line(e, 120)})"
        return None


class TorchViTBlock(nn.Module):
    """x + attn(ln_1(x)), x + c_proj(gelu(c_fc(ln_2(x)))), as open_clip's ResidualAttentionBlock."""

    def __init__(self, width, heads, mlp_ratio):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, int(width * mlp_ratio)))
        self.mlp.add_module("gelu", nn.GELU())
        self.mlp.add_module("c_proj", nn.Linear(int(width * mlp_ratio), width))

    def forward(self, x):
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class TorchViT(nn.Module):
    """The fallback when open_clip is missing: open_clip's VisionTransformer (class token pooling,
    ln_pre, pre-norm blocks, ln_post, proj) built from torch modules, same shapes and parameter names."""

    def __init__(self, image_size, patch_size, width, layers, heads, mlp_ratio, output_dim):
        super().__init__()
        grid = image_size // patch_size
        self.conv1 = nn.Conv2d(3, width, patch_size, stride=patch_size, bias=False)
        self.class_embedding = nn.Parameter(width ** -0.5 * torch.randn(width))
        self.positional_embedding = nn.Parameter(width ** -0.5 * torch.randn(grid * grid + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.ModuleList(TorchViTBlock(width, heads, mlp_ratio) for _ in range(layers))
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(width ** -0.5 * torch.randn(width, output_dim))

    def forward(self, x):
        x = self.conv1(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1), x], 1)
        x = self.ln_pre(x + self.positional_embedding.to(x.dtype))
        for block in self.transformer.resblocks:
            x = block(x)
        return self.ln_post(x[:, 0]) @ self.proj


def make_vit(patch: int, dtype=torch.bfloat16) -> nn.Module:
    """A CLIP ViT-B/<patch>-shaped vision tower with random weights on CFG.dev, in ``dtype``."""
    torch.manual_seed(0)
    cls = open_clip_vit()
    if cls is None:
        MODEL_INFO["model"] = "TorchViT (open_clip missing: nn.MultiheadAttention + nn.Linear MLP + nn.LayerNorm)"
        cls = TorchViT
    else:
        import open_clip
        MODEL_INFO["model"] = f"open_clip {open_clip.__version__} VisionTransformer, random weights"
    with torch.device(CFG.dev):  # initialized where it runs: seconds less on a GPU
        model = cls(**vit_config(patch))
    return model.to(dtype)


def images(n: int, dtype=torch.bfloat16, seed=0) -> torch.Tensor:
    size = vit_config(16)["image_size"]
    return torch.randn(n, 3, size, size, generator=bg.gen(seed), device=CFG.dev).to(dtype)


# ---------------------------------------------------------------- measuring

def time_ms(fn, budget_ms: float = 1000.0) -> float:
    """Median ms of fn() over ≥ 3 calls (about ``budget_ms`` of them); fn has run once before.
    Smoke: bench_gpu's plain timer."""
    if CFG.smoke:
        return bg.timer(fn)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def once():
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)

    first = once()
    times = [first] + [once() for _ in range(max(2, min(30, int(budget_ms / max(first, 1e-3)))))]
    return statistics.median(times)


def peak_mib(fn, base: int | None = None):
    """MiB allocated at the peak of one fn() call above ``base`` bytes (default: allocated before it)."""
    if base is None or CFG.dev != "cuda":
        return bg.peak_mib(fn)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def allocated() -> int | None:
    if CFG.dev != "cuda":
        return None
    bg.free()
    torch.cuda.synchronize()
    return torch.cuda.memory_allocated()


def measure(name, fn, *, check=None, base=None, once=False) -> bg.Result:
    """Time fn() and its peak memory (see ``time_ms``, ``peak_mib``); ``check(out)`` of the first
    call's output gives the rel. error. ``once``: only the first call, timed and its peak taken
    (for calls too slow to repeat)."""
    r = bg.Result(name)
    try:
        if once and CFG.dev == "cuda":
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated() if base is None else base
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        out = fn()
        bg.sync()
        r.first_call_s = time.perf_counter() - t
        if once and CFG.dev == "cuda":
            r.peak_mib = (torch.cuda.max_memory_allocated() - base) / 2**20
        if check is not None:
            try:
                r.rel_err = check(out)
            except Exception as e:  # e.g. the reference failed: the timing stands, without its rel. error
                print(f"  {name}: no rel. error: {bg.one_line(f'{type(e).__name__}: {e}', 200)}", flush=True)
        del out
        if once:
            r.ms = 1e3 * r.first_call_s
        else:
            r.ms = time_ms(fn)
            r.peak_mib = peak_mib(fn, base)
    except Exception as e:  # record and go on: the table shows the failure
        r.error = f"{type(e).__name__}: {e}"[:4000]
        bg.free()
    bg.RESULTS.append(r)
    shown = f"{r.ms:10.3f} ms" if r.ms is not None else "    FAILED  " + bg.one_line(r.error, 160)
    print(f"  {name:75s} {shown}", flush=True)
    return r


@dataclass
class ModelRow(bg.Row):
    images: int | None = None  # images per call: images/s columns
    mem_target: float | None = None  # upper bound on ours.peak_mib / ref.peak_mib

    @property
    def mem_ratio(self):
        return self.ours.peak_mib / self.ref.peak_mib if self.ours.peak_mib and self.ref.peak_mib else None


def row(section, case, reference, ours, ref, target=None, *, note="", images=None, mem_target=None):
    ROWS.setdefault(section, []).append(ModelRow(case, reference, ours, ref, target, note, images, mem_target))


# ---------------------------------------------------------------- the published-code reference

class LinearMHA(nn.Module):
    """Self-attention of an ``nn.MultiheadAttention`` (batch first, fused q/k/v weight) with its
    projections called as ``nn.Linear`` modules, sharing the original parameters; fused SDPA."""

    def __init__(self, mha: nn.MultiheadAttention):
        super().__init__()
        self.heads, self.batch_first = mha.num_heads, mha.batch_first
        d = mha.embed_dim
        self.in_proj = nn.Linear(d, 3 * d, bias=mha.in_proj_bias is not None, device=mha.in_proj_weight.device,
                                 dtype=mha.in_proj_weight.dtype)
        self.in_proj.weight = mha.in_proj_weight
        if mha.in_proj_bias is not None:
            self.in_proj.bias = mha.in_proj_bias
        self.out_proj = mha.out_proj

    def forward(self, query, key=None, value=None, need_weights=False, attn_mask=None, **_):
        x = query if self.batch_first else query.transpose(0, 1)
        n, t, d = x.shape
        q, k, v = (u.reshape(n, t, self.heads, -1).transpose(1, 2) for u in self.in_proj(x).chunk(3, -1))
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        o = self.out_proj(o.transpose(1, 2).reshape(n, t, d))
        return (o if self.batch_first else o.transpose(0, 1)), None


def with_linear_attention(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose nn.MultiheadAttention modules are ``LinearMHA``."""
    model = copy.deepcopy(model)
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.MultiheadAttention):
                setattr(module, child_name, LinearMHA(child))
    return model


class HookKFAC:
    """KFAC the way published code computes it: hooks on every nn.Linear, fp32 copies, full backward."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.layers = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
        self.inputs = {}
        for m in self.layers.values():
            m.register_forward_hook(self.save_input)
            m.register_full_backward_hook(self.accumulate)

    def save_input(self, module, inputs, output):
        self.inputs[module] = inputs[0].detach()

    def accumulate(self, module, grad_input, grad_output):
        a = self.inputs.pop(module).reshape(-1, module.in_features).float()
        if module.bias is not None:
            a = torch.cat([a, torch.ones(a.shape[0], 1, device=a.device)], 1)
        g = grad_output[0].reshape(-1, module.out_features).float()
        self.A[module] += a.T @ a
        self.B[module] += g.T @ g
        self.rows[module] += a.shape[0]

    def fit(self, batches) -> dict:
        """{layer name: (A, B)}, normalized as tak.fit_kfac's tokens="expand" (A per token, B per example)."""
        dev = next(self.model.parameters()).device
        width = {m: m.in_features + (m.bias is not None) for m in self.layers.values()}
        self.A = {m: torch.zeros(d, d, device=dev) for m, d in width.items()}
        self.B = {m: torch.zeros(m.out_features, m.out_features, device=dev) for m in self.layers.values()}
        self.rows = {m: 0 for m in self.layers.values()}
        n = 0
        self.model.eval()
        for x in batches:
            f = self.model(x)
            y = (f.detach() + torch.randn_like(f)).float()  # y ~ N(f, I): ∂loss/∂f = f − y, a N(0, I) probe
            loss = 0.5 * (f.float() - y).square().sum()
            loss.backward()  # every weight gradient too, as published code does
            self.model.zero_grad(set_to_none=True)
            n += x.shape[0]
        return {name: (self.A[m] / self.rows[m], self.B[m] / n) for name, m in self.layers.items()}


# ---------------------------------------------------------------- sections

def section_kfac():
    """tak.fit_kfac vs one plain forward+backward and vs the published-code reference."""
    import tak
    n = 8 if CFG.smoke else 128
    model, x = make_vit(16), images(n)
    MODEL_INFO["precision"] = "bf16 weights and images (no autocast)"
    with torch.no_grad():
        width = model(x[:1]).shape[-1]
    s = torch.randn(n, width, generator=bg.gen(1), device=CFG.dev).to(x.dtype)  # the cotangent of the backward

    def plain():
        model(x).backward(s)
        for p in model.parameters():
            p.grad = None

    def ours(dense):  # the layers the reference hooks: the patch convolution and output projection left out
        return lambda: tak.fit_kfac(model, [x], mc_samples=1, dense=dense, progress=False,
                                    layers=lambda name: name not in ("conv1", "positional_embedding", "proj"))

    reference = HookKFAC(with_linear_attention(model))
    ref_factors = {}

    def ref():
        ref_factors.update(reference.fit([x]))
        return ref_factors

    def check_ours(K):  # A is deterministic: ours against the reference's fp32 products of the same inputs
        if not ref_factors:
            ref()
        common = [n for n in K if n in ref_factors]
        if len(common) != len(ref_factors):
            raise AssertionError(f"layers differ: ours {sorted(K)[:4]}…, reference {sorted(ref_factors)[:4]}…")
        return bg.rel_err([K[n].A for n in common], [ref_factors[n][0].double() for n in common])

    tag = f"ViT-B/16, {n} images"
    fwd_bwd = measure(f"kfac {tag} plain forward+backward", plain)
    fit = measure(f"kfac {tag} tak.fit_kfac(dense=False)", ours(False), check=check_ours)
    fit_dense = measure(f"kfac {tag} tak.fit_kfac(dense=True)", ours(True))
    hooks = measure(f"kfac {tag} reference: hooks, fp32 a.T@a, full loss.backward()", ref)
    n_layers = len(reference.layers)
    row("kfac", f"{tag}: A, B of {n_layers} linear layers, MC=1", "one plain forward+backward (weight grads)",
        fit, fwd_bwd, 1.5, note="rel. err: A vs the reference's fp32 products", images=n)
    row("kfac", f"{tag}: A, B of {n_layers} linear layers, MC=1",
        "published-code reference (hooks, fp32 a.T@a, full loss.backward())", fit, hooks, images=n)
    row("kfac", f"{tag}: + exact LayerNorm / class-token blocks (dense=True, the default)",
        "one plain forward+backward (weight grads)", fit_dense, fwd_bwd, images=n)
    row("kfac", f"{tag}: published-code reference", "one plain forward+backward (weight grads)", hooks, fwd_bwd,
        images=n)


@contextlib.contextmanager
def cached_eigenvectors():
    """tak.fit_ekfac's fp64 eigendecompositions done once per factor tensor (yields False when the
    helper it calls is not there: then timings include them)."""
    from tak.curvature import ekfac
    original = getattr(ekfac, "_eigenvectors", None)
    if original is None:
        yield False
        return
    cache = {}

    def cached(F):
        if id(F) not in cache:
            cache[id(F)] = (F, original(F))  # F kept alive: its id stays unique
        return cache[id(F)][1]

    ekfac._eigenvectors = cached
    try:
        yield True
    finally:
        ekfac._eigenvectors = original


def section_ekfac():
    """The EK-FAC correction pass vs the KFAC pass (same model, images, MC=1)."""
    import tak
    n = 8 if CFG.smoke else 128
    model, x = make_vit(16), images(n)
    tag = f"ViT-B/16, {n} images"
    kfac_pass = measure(f"ekfac {tag} tak.fit_kfac(dense=False) (the KFAC pass)",
                        lambda: tak.fit_kfac(model, [x], dense=False, progress=False))
    K = tak.fit_kfac(model, [x], dense=False, progress=False)
    n_factors = 2 * len(K)

    def ekfac():
        return tak.fit_ekfac(model, [x], kfac=K, progress=False)

    with cached_eigenvectors() as cached:
        # after the kernels were compiled above: the eigendecompositions and one pass, which fills the cache
        whole = measure(f"ekfac {tag} tak.fit_ekfac(kfac=K) incl. fp64 eigh, one call", ekfac, once=True)
        corr = measure(f"ekfac {tag} tak.fit_ekfac(kfac=K), eigenbases cached", ekfac)
    note = "" if cached else "tak.curvature.ekfac._eigenvectors not found: eigendecompositions included"
    row("ekfac", f"{tag}: EK-FAC correction pass (eigenbases given)", "the KFAC pass (tak.fit_kfac, MC=1)",
        corr, kfac_pass, 2.0, note=note, images=n)
    row("ekfac", f"{tag}: fit_ekfac(kfac=K) incl. fp64 eigendecompositions of {n_factors} factors (one call)",
        "the KFAC pass (tak.fit_kfac, MC=1)", whole, kfac_pass,
        note="one call (kernels already compiled); the eigendecompositions are a one-off cost per KFAC, not per image",
        images=n)


SECTIONS = {
    "kfac": ("KFAC factors: tak.fit_kfac, CLIP ViT-B/16 shapes, bf16", section_kfac),
    "ekfac": ("EK-FAC correction pass: tak.fit_ekfac, CLIP ViT-B/16 shapes, bf16", section_ekfac),
}

NOTES_CURVATURE = [
    "- ours/ref < 1: ours is faster; target: an upper bound on ours/ref. images/s = images per call / median time.",
    "- peak MiB: allocated at the peak of one call above what was resident before it (model, images, KFAC).",
    "- The plain forward+backward is `model(x).backward(s)` with every weight gradient, fused attention "
    "(nn.MultiheadAttention → SDPA), bf16 weights.",
    "- The reference replaces each nn.MultiheadAttention by the same computation with in_proj / out_proj as "
    "nn.Linear modules (so that per-module hooks see them); its covariances are fp32 at 'highest' precision.",
]


# ---------------------------------------------------------------- report

def table(title, info, sections, notes) -> str:
    lines = [f"# {title}", "", " · ".join(f"{k}: {v}" for k, v in info.items()), ""]
    for key, rows in ROWS.items():
        lines += [f"## {sections[key][0]}", "",
                  "| case | reference | ours ms | ref ms | ours/ref | target | images/s ours / ref "
                  "| peak MiB ours / ref | mem ours/ref | rel. err ours / ref | note |",
                  "|---|---|---:|---:|---:|---|---:|---:|---:|---:|---|"]
        for r in rows:
            ratio, mem = r.ratio, r.mem_ratio
            target = "—" if r.target is None else f"≤ {r.target:.2g}×"
            if r.target is not None and ratio is not None:
                target += " ✓" if ratio <= r.target else " ✗"
            mem_cell = bg.fmt(mem, ".2f")
            if r.mem_target is not None:
                mem_cell += f" (≤ {r.mem_target:.2g}×" + ("" if mem is None else " ✓" if mem <= r.mem_target else " ✗") + ")"
            ips = [None if x.ms is None or r.images is None else 1e3 * r.images / x.ms for x in (r.ours, r.ref)]
            notes_ = [r.note] + [f"{who} failed: {bg.one_line(x.error, 200)}" for who, x in (("ours", r.ours), ("ref", r.ref))
                                 if x.error]
            lines.append(" | ".join([
                f"| {r.case}", r.reference, bg.fmt(r.ours.ms, ".3f"), bg.fmt(r.ref.ms, ".3f"), bg.fmt(ratio, ".2f"),
                target, "—" if r.images is None else bg.pair(*ips, ".0f"),
                bg.pair(r.ours.peak_mib, r.ref.peak_mib, ".0f"), mem_cell,
                bg.pair(r.ours.rel_err, r.ref.rel_err, ".1e"), "; ".join(n for n in notes_ if n)]) + " |")
        lines.append("")
    for key, error in FAILED_SECTIONS.items():
        lines.append(f"**Section {key} failed**: {bg.one_line(error, 300)}")
    return "\n".join(lines + ["", "Notes:", *notes, ""])


def main(*, stem, title, sections, notes, doc):
    """The command line shared with bench_linearized.py: --out, --only, --smoke; runs ``sections``
    (each guarded) and writes <stem>.md and <stem>.json (<stem>_smoke.* under --smoke) after each
    section, so that a run stopped by a timeout keeps the sections it finished."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT", str(HERE)), help="output folder (default: $OUT, else benchmarks/)")
    p.add_argument("--only", choices=list(sections), help="run one section")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU, torch backend, plain timer")
    args = p.parse_args()

    CFG.smoke = args.smoke
    if not args.smoke and not torch.cuda.is_available():
        sys.exit(f"{stem}.py needs a CUDA device (use --smoke to check the script on a CPU)")
    CFG.dev = "cpu" if args.smoke else "cuda"
    CFG.backend = "torch" if args.smoke else "auto"  # auto: Triton for CUDA tensors, what a user gets
    os.environ["KFAC_KERNELS_BACKEND"] = CFG.backend
    torch.set_float32_matmul_precision("highest")

    info = bg.header()
    print(" · ".join(f"{k}: {v}" for k, v in info.items()), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{stem}_smoke" if args.smoke else stem
    start = time.time()
    keys = [args.only] if args.only else list(sections)
    for i, key in enumerate(keys):
        t = time.time()
        print(f"== {key}", flush=True)
        try:
            sections[key][1]()
        except Exception as e:  # record and go on with the next section
            FAILED_SECTIONS[key] = f"{type(e).__name__}: {e}"[:4000]
            print(f"  SECTION FAILED {bg.one_line(FAILED_SECTIONS[key], 300)}", flush=True)
        bg.free()
        print(f"-- {key} took {time.time() - t:.0f} s", flush=True)
        info.update(MODEL_INFO)
        info["total seconds"] = round(time.time() - start)
        if i + 1 < len(keys):
            info["sections done"] = ", ".join(keys[:i + 1]) + f" (of {', '.join(keys)})"
        else:
            info.pop("sections done", None)
        text = table(title, info, sections, notes)
        write(out, stem, text, info)
    print("\n" + text)
    print(f"wrote {out / stem}.md and .json")


def write(out: Path, stem: str, text: str, info: dict) -> None:
    (out / f"{stem}.md").write_text(text)
    rows = [dict(section=key, case=r.case, reference=r.reference, ours=r.ours.name, ref=r.ref.name, ratio=r.ratio,
                 target=r.target, mem_ratio=r.mem_ratio, mem_target=r.mem_target, images=r.images, note=r.note)
            for key, rs in ROWS.items() for r in rs]
    data = dict(header=info, results=[asdict(r) for r in bg.RESULTS], rows=rows, failed_sections=FAILED_SECTIONS)
    (out / f"{stem}.json").write_text(json.dumps(data, indent=1))


if __name__ == "__main__":
    main(stem="bench_curvature", title="tak curvature GPU benchmarks (issue 3)", sections=SECTIONS,
         notes=NOTES_CURVATURE, doc=__doc__)
