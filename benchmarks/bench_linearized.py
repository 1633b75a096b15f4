"""GPU benchmark of linearized models (issue 4): ``tak.linearize`` (fast path) against the plain model
and against ``torch.func.jvp`` (the generic path), CLIP ViT-B/32 and ViT-B/16 shapes, batch 128, bf16.

    python benchmarks/bench_linearized.py [--out DIR] [--only SECTION] [--smoke]

Writes ``bench_linearized.md`` (the markdown table that goes into benchmarks/RESULTS.md) and
``bench_linearized.json`` (every number) to DIR: ``--out``, else ``$OUT``, else benchmarks/.
Sections (each guarded: a failure is recorded and the run goes on; so is each single measurement):

- forward: f(x; θ0) + J τ with random τ (1e-3 · N(0, 1)), no grad: ``tak.linearize(model)`` (fast
  path, ``tak.models.to_dual``) vs the plain model's forward with fused attention (target ≤ 3.5×) and
  vs ``tak.linearize(model, fast=False)`` (``torch.func.jvp``, math attention); the plain model with
  math attention for scale. Rel. error: primal and tangent of the fast path (``lin.dual``) and of
  ``torch.func.jvp`` in bf16, against ``torch.func.jvp`` of the float64 model, on 4 of the images.
- train: one training step, loss = mean(out²) in fp32, backward, ``torch.optim.AdamW`` step (default
  settings), ``zero_grad(set_to_none=True)``: linearized in τ (fast path) vs the plain model
  (target ≤ 2×, peak memory ≤ 1.3×); also vs the generic path, and the plain model the way
  DESIGN.md's reference figures ran it (fp32 weights under bf16 autocast).
- encoders: ``tak.linearize`` (fast path) against the plain model, forward and training step, for Hugging Face
  text encoders of BERT-base, DeBERTa-v3-base and ModernBERT-base shapes and the decoders of Qwen2.5-0.5B and GPT-2
  small (random weights), 32 padded sequences of 256 tokens, bf16, eval mode (no dropout). No targets; run last
  (``--only encoders`` alone).
- attention: dual attention alone, (O, Ȯ) for random bf16 q, k, v and tangents, 12 heads of 64:
  ``kfac_kernels.dual_attention`` (what ``tak.nn.attention.dual_attention`` calls on CUDA,
  ``(q, k, v, dq, dk, dv) -> (O, Ȯ)``) vs ``torch.func.jvp`` of math attention, forward and
  forward+backward through the tangent (gradients of ⟨G, Ȯ⟩ in dq, dk, dv), at sequence lengths
  50 and 197 (batch 128) and 1024 (batch 32: about as many tokens); fused SDPA of the primal alone
  for scale. Rel. error against float64 ``torch.func.jvp`` on the same inputs.

Precision: bf16 weights and inputs (``model.to(torch.bfloat16)``, τ and AdamW states bf16 too), not
autocast: the fused dual kernels multiply in the narrowest input dtype, so under autocast with fp32
weights they would run fp32 GEMMs. Models: open_clip ``VisionTransformer`` with random weights (the
fast path needs open_clip; without it the model is bench_curvature's torch-module ViT and the
fast-path rows record the failure).

Timing and memory: as bench_curvature (model rows: median of CUDA-event times over ≥ 3 calls after
an untimed first call) and bench_gpu (attention rows: ``triton.testing.do_bench`` medians).
Peak memory — forward and attention: above what was resident before the call (model, inputs);
train: above what was allocated before the model was built, i.e. the whole footprint of the step
(θ or θ0, τ, gradients, optimizer states, activations), each configuration built and freed alone.

``--smoke`` runs every section at tiny shapes on the CPU with the torch backend and a plain timer
(it writes bench_linearized_smoke.md/.json instead).
"""
import copy

import torch
import torch.nn.functional as F
from torch.func import functional_call, jvp

import bench_curvature as bc
from bench_curvature import CFG, bg, images, make_vit, measure, row
from tak.linearize import math_attention  # noqa: E402

import kfac_kernels as kk  # noqa: E402  (this checkout's: bench_gpu put it first on sys.path)

BATCH = 128
MODELS = {"ViT-B/32": 32, "ViT-B/16": 16}


def batch():
    return 4 if CFG.smoke else BATCH


def random_taus(lin, scale=1e-3, seed=2):
    g = torch.Generator(CFG.dev).manual_seed(seed)
    return {n: (scale * torch.randn(t.shape, generator=g, device=CFG.dev)).to(t.dtype)
            for n, t in lin.task_vector().items()}


def jvp_model(model, x, taus):
    """(f, J τ) of ``model`` at x by torch.func.jvp (math attention); τ missing from ``taus`` are zero."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    tangents = {n: taus[n] if n in taus else torch.zeros_like(p) for n, p in params.items()}
    with math_attention(), torch.no_grad():
        return jvp(lambda p: functional_call(model, p, (x,)), (params,), (tangents,))


# ---------------------------------------------------------------- sections

def section_forward():
    for label, patch in MODELS.items():
        forward_case(label, patch)
        bg.free()


def forward_case(label, patch):
    import tak
    n = batch()
    model, x = make_vit(patch).eval(), images(n)
    tag = f"{label}, batch {n}"

    def no_grad(fn):
        def run():
            with torch.no_grad():
                return fn(x)
        return run

    def plain_math(x):
        with math_attention():
            return model(x)

    plain = measure(f"forward {tag} plain model, fused attention", no_grad(model))
    math = measure(f"forward {tag} plain model, math attention", no_grad(plain_math))
    fast = bg.Result(f"forward {tag} tak.linearize fast path")
    try:
        lin = tak.linearize(model, fast=True)
        lin.load_task_vector(random_taus(lin))
        fast = measure(fast.name, no_grad(lin))
    except Exception as e:  # e.g. no open_clip: no fast path
        fast.error = f"{type(e).__name__}: {e}"[:4000]
        bg.RESULTS.append(fast)
        lin = None
    generic = tak.linearize(model, fast=False)
    taus = lin.task_vector() if lin is not None else random_taus(generic)
    generic.load_task_vector(taus)
    jvp_ = measure(f"forward {tag} tak.linearize(fast=False): torch.func.jvp", no_grad(generic))
    try:  # correctness at full size: primal and tangent against float64 jvp, 4 images
        x4 = x[:4]
        exact = jvp_model(copy.deepcopy(model).double(), x4.double(), {k: t.double() for k, t in taus.items()})
        jvp_.rel_err = bg.rel_err(jvp_model(model, x4, taus), exact)
        if lin is not None:
            with torch.no_grad():
                fast.rel_err = bg.rel_err(tuple(lin.dual(x4)), exact)
    except Exception as e:
        print(f"  rel. error check failed: {bg.one_line(e, 200)}", flush=True)
    row("forward", f"{tag}: linearized forward", "plain model forward, fused attention", fast, plain, 3.5,
        note="rel. err: max of primal and tangent vs float64 jvp (4 images)", images=n)
    row("forward", f"{tag}: linearized forward", "torch.func.jvp (generic path, math attention)", fast, jvp_, images=n)
    row("forward", f"{tag}: torch.func.jvp (generic path)", "plain model forward, fused attention", jvp_, plain,
        note="today's way (DESIGN.md: 9.4× at ViT-B/32)", images=n)
    row("forward", f"{tag}: plain model, math attention", "plain model forward, fused attention", math, plain,
        images=n)


def section_train():
    for label, patch in MODELS.items():
        train_case(label, patch)
        bg.free()


def train_case(label, patch):
    import tak
    n = batch()
    x = images(n)
    tag = f"{label}, batch {n}"

    def step_of(module, autocast=False):
        opt = torch.optim.AdamW(module.parameters(), lr=1e-5)

        def step():
            with torch.autocast(CFG.dev, torch.bfloat16, enabled=autocast):
                out = module(x)
            out.float().square().mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step

    def plain(autocast):
        return lambda: step_of(make_vit(patch, torch.float32 if autocast else torch.bfloat16).train(), autocast)

    def linearized(fast):
        # make_vit's model is in training mode, and so is its linearization (no .train() call: on the
        # fast path DualLinearizedModel.train is LinearizedModel.train, whose super() fails there)
        return lambda: step_of(tak.linearize(make_vit(patch), fast=fast))

    p = isolated(f"train {tag} plain model, bf16 weights, fused attention", plain(False))
    p_ac = isolated(f"train {tag} plain model, fp32 weights + bf16 autocast, fused attention", plain(True))
    fast = isolated(f"train {tag} tak.linearize fast path", linearized(True))
    generic = isolated(f"train {tag} tak.linearize(fast=False): torch.func.jvp", linearized(False))
    row("train", f"{tag}: linearized step (fwd, bwd in τ, AdamW)", "plain step (bf16 weights, fused attention)",
        fast, p, 2.0, images=n, mem_target=1.3)
    row("train", f"{tag}: linearized step", "plain step, fp32 weights + bf16 autocast (DESIGN.md's reference)",
        fast, p_ac, images=n)
    row("train", f"{tag}: linearized step", "torch.func.jvp step (generic path, math attention)", fast, generic,
        images=n)
    row("train", f"{tag}: torch.func.jvp step (generic path)", "plain step (bf16 weights, fused attention)",
        generic, p, note="today's way (DESIGN.md: 3.4×, 1.5× memory of the math-attention step at ViT-B/32)", images=n)


def isolated(name, build):
    """measure(name, build()) with memory counted from before build(): the step's whole footprint."""
    base = bc.allocated()
    try:
        fn = build()
    except Exception as e:  # record and go on
        r = bg.Result(name, error=f"{type(e).__name__}: {e}"[:4000])
        bg.RESULTS.append(r)
        print(f"  {name:75s}     FAILED  {bg.one_line(r.error, 160)}", flush=True)
        return r
    r = measure(name, fn, base=base)
    del fn
    bg.free()
    return r


# ---------------------------------------------------------------- text encoders

ENCODERS = ("BERT-base", "DeBERTa-v3-base", "ModernBERT-base", "Qwen2.5-0.5B", "GPT-2")
TEXT_BATCH, TEXT_LENGTH = 32, 256


def _transformers():
    from tak._compat import ensure_torchvision_importable
    ensure_torchvision_importable()  # transformers imports torchvision (see tak._compat)
    import transformers
    return transformers


def encoder(name: str, dtype=torch.bfloat16):
    """A Hugging Face encoder of ``name``'s shapes with random weights on CFG.dev, in ``dtype``, in eval mode
    (no dropout); tiny under --smoke. Attention: the model's default (SDPA where it has one; DeBERTa has none)."""
    transformers = _transformers()
    small = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48) if CFG.smoke else {}
    if name == "BERT-base":
        config = transformers.BertConfig(**small)  # the defaults are bert-base's
    elif name == "DeBERTa-v3-base":
        config = transformers.DebertaV2Config(
            vocab_size=128100, relative_attention=True, position_buckets=256, max_relative_positions=-1,
            pos_att_type=["p2c", "c2p"], norm_rel_ebd="layer_norm", share_att_key=True, position_biased_input=False,
            type_vocab_size=0, **small)
    elif name == "ModernBERT-base":  # the defaults (22 layers, 768 wide, a global layer every 3, local windows of 128)
        config = transformers.ModernBertConfig(pad_token_id=0, bos_token_id=1, cls_token_id=1, sep_token_id=2,
                                               eos_token_id=2, reference_compile=False, **small)
    elif name == "GPT-2":  # the defaults are GPT-2 small's (124M): causal, Conv1D maps, no LM head
        config = transformers.GPT2Config(use_cache=False, **(dict(n_embd=32, n_layer=2, n_head=2, n_inner=48)
                                                             if CFG.smoke else {}))
    else:  # Qwen2.5-0.5B's decoder (Qwen2Model: no LM head), causal with grouped-query attention
        shapes = dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, intermediate_size=4864)
        config = transformers.Qwen2Config(vocab_size=151936, num_key_value_heads=2, rope_theta=1e6, use_cache=False,
                                          **(small or shapes))
    torch.manual_seed(0)
    with torch.device(CFG.dev):
        model = transformers.AutoModel.from_config(config)
    return model.to(dtype).eval()


def tokens(vocab: int, n: int, length: int, seed=0) -> dict:
    """``n`` sequences of random token ids, padded (id 0) after a length drawn from [length/2, length]."""
    g = bg.gen(seed)
    real = torch.randint(length // 2, length + 1, (n,), generator=g, device=CFG.dev)
    mask = (torch.arange(length, device=CFG.dev)[None] < real[:, None]).long()
    ids = torch.randint(5, vocab, (n, length), generator=g, device=CFG.dev)
    return {"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask}


def section_encoders():
    transformers = _transformers()
    for name in ENCODERS:
        if name == "ModernBERT-base" and not hasattr(transformers, "ModernBertConfig"):
            print(f"  {name}: skipped, transformers {transformers.__version__} has no ModernBERT (from 4.48)")
            continue
        encoder_case(name)
        bg.free()


def encoder_case(name):
    import tak
    n, length = (2, 16) if CFG.smoke else (TEXT_BATCH, TEXT_LENGTH)
    model = encoder(name)
    batch = tokens(model.config.vocab_size, n, length)
    tag = f"{name}, {n} × {length} tokens, padded"

    def no_grad(fn):
        def run():
            with torch.no_grad():
                return fn(**batch)
        return run

    def step_of(module):
        opt = torch.optim.AdamW(module.parameters(), lr=1e-5)

        def step():
            module(**batch).last_hidden_state.float().square().mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step

    plain = measure(f"encoders {tag} plain forward", no_grad(model))
    lin = tak.linearize(model, fast=True)
    lin.load_task_vector(random_taus(lin))
    fast = measure(f"encoders {tag} tak.linearize fast path forward", no_grad(lin))
    del lin
    row("encoders", f"{tag}: linearized forward", "plain model forward", fast, plain)
    p = isolated(f"encoders {tag} plain step", lambda: step_of(encoder(name)))
    f = isolated(f"encoders {tag} tak.linearize fast path step", lambda: step_of(tak.linearize(encoder(name), fast=True)))
    row("encoders", f"{tag}: linearized step (fwd, bwd in τ, AdamW)", "plain step", f, p)


# ---------------------------------------------------------------- attention

SOFTCAP = 50.0  # Gemma 2's attn_logit_softcapping


def attention_shapes():
    """(sequence length, batch, heads, head dim)."""
    if CFG.smoke:
        return [(5, 2, 2, 8), (20, 2, 2, 8), (64, 1, 2, 8)]
    return [(50, 128, 12, 64), (197, 128, 12, 64), (1024, 32, 12, 64)]


def kk_dual(q, k, v, dq, dk, dv):
    """kfac_kernels.dual_attention: what tak.nn.attention.dual_attention calls on CUDA (on the CPU it runs the
    op's PyTorch backend)."""
    return kk.dual_attention(q, k, v, dq, dk, dv)


def kk_capped(q, k, v, dq, dk, dv):
    """kfac_kernels.dual_attention with Gemma 2's capped scores (its attn_logit_softcapping)."""
    return kk.dual_attention(q, k, v, dq, dk, dv, softcap=SOFTCAP)


def jvp_math(q, k, v, dq, dk, dv):
    with math_attention():
        return jvp(F.scaled_dot_product_attention, (q, k, v), (dq, dk, dv))


def capped_math(q, k, v):
    """softmax(c·tanh(Q Kᵀ / (c √D))) V, P formed."""
    s = q @ k.mT * q.shape[-1] ** -0.5
    return torch.softmax(SOFTCAP * torch.tanh(s / SOFTCAP), -1) @ v


def jvp_capped(q, k, v, dq, dk, dv):
    return jvp(capped_math, (q, k, v), (dq, dk, dv))


def forward_of(dual):
    def run(q, k, v, dq, dk, dv, g):
        with torch.no_grad():
            return tuple(dual(q, k, v, dq, dk, dv))
    return run


def fwd_bwd_of(dual):
    """(O, Ȯ, ∂/∂dq, ∂/∂dk, ∂/∂dv) of ⟨g, Ȯ⟩."""
    def run(q, k, v, dq, dk, dv, g):
        o, do = dual(q, k, v, dq, dk, dv)
        return (o, do, *torch.autograd.grad(do, (dq, dk, dv), g))
    return run


def fused_primal(q, k, v, dq, dk, dv, g):
    with torch.no_grad():
        return F.scaled_dot_product_attention(q, k, v)


def exact_attention(q, k, v, dq, dk, dv, g, chunk=4, of=jvp_math):
    """(O, Ȯ, ∂/∂dq, ∂/∂dk, ∂/∂dv) in float64 by ``of`` (jvp of math attention), ``chunk`` batch entries at a
    time."""
    parts = []
    for i in range(0, q.shape[0], chunk):
        primal = [t[i:i + chunk].double() for t in (q, k, v)]
        tangent = [t[i:i + chunk].detach().double().requires_grad_() for t in (dq, dk, dv)]
        o, do = of(*primal, *tangent)
        parts.append((o.detach(), do.detach(), *torch.autograd.grad(do, tangent, g[i:i + chunk].double())))
    return tuple(torch.cat(p) for p in zip(*parts))


def section_attention():
    for L, b, h, d in attention_shapes():
        attention_case(L, b, h, d)
        bg.free()


def attention_case(L, b, h, d):
    bf16 = torch.bfloat16
    shape = (b, h, L, d)
    q, k, v = (bg.randn(*shape, seed=s, dtype=bf16) for s in (0, 1, 2))
    dq, dk, dv = (bg.randn(*shape, seed=s, dtype=bf16, scale=0.1).requires_grad_() for s in (3, 4, 5))
    g = bg.randn(*shape, seed=6, dtype=bf16)
    sets = [(q, k, v, dq, dk, dv, g)]
    exact = exact_attention(*sets[0])
    tag = f"L={L}, batch {b}, {h}×{d}"

    def m(what, fn, ex):
        return bg.measure(f"attention {tag} {what}", fn, sets, exact=ex)

    jvp_fwd = m("fwd torch.func.jvp, math attention", forward_of(jvp_math), exact[:2])
    jvp_bwd = m("fwd+bwd torch.func.jvp, math attention", fwd_bwd_of(jvp_math), exact)
    primal = m("fwd fused SDPA, primal only", fused_primal, exact[0])
    label = "kfac_kernels.dual_attention"
    fwd = m(f"fwd {label}", forward_of(kk_dual), exact[:2])
    bwd = m(f"fwd+bwd {label}", fwd_bwd_of(kk_dual), exact)
    row("attention", f"{tag}: (O, Ȯ) fwd, {label}", "torch.func.jvp of math attention", fwd, jvp_fwd)
    row("attention", f"{tag}: fwd + bwd through Ȯ, {label}", "torch.func.jvp of math attention + autograd",
        bwd, jvp_bwd)
    row("attention", f"{tag}: (O, Ȯ) fwd, {label}", "fused SDPA, primal O only", fwd, primal)
    del exact
    capped = m(f"fwd+bwd {label}, softcap {SOFTCAP:g}", fwd_bwd_of(kk_capped), exact_attention(*sets[0], of=jvp_capped))
    row("attention", f"{tag}: fwd + bwd through Ȯ, capped scores (softcap {SOFTCAP:g}: Gemma 2's)",
        f"{label} uncapped", capped, bwd)


SECTIONS = {
    "forward": ("Linearized forward: tak.linearize, CLIP ViT shapes, bf16", section_forward),
    "train": ("Linearized training step: fwd + bwd in τ + AdamW, CLIP ViT shapes, bf16", section_train),
    "attention": ("Dual attention alone, bf16: (O, Ȯ) and the backward through Ȯ", section_attention),
    "encoders": ("Text models on the fast path: BERT, DeBERTa-v3, ModernBERT, Qwen2.5-0.5B and GPT-2 shapes, bf16",
                 section_encoders),
}

NOTES = [
    "- ours/ref < 1: ours is faster; target: an upper bound on ours/ref (mem: on peak memory ours/ref).",
    "- forward / attention peak MiB: allocated at the peak of one call above what was resident before it; "
    "train peak MiB: the step's whole footprint (weights or θ0 and τ, gradients, AdamW states, activations), "
    "each configuration built and freed alone.",
    "- Plain model: open_clip VisionTransformer; nn.MultiheadAttention runs fused SDPA (its native fast path "
    "in eval without grad). Math attention: `sdpa_kernel(SDPBackend.MATH)` and the MHA fast path off, which "
    "is what torch.func.jvp needs (forward-mode AD has no formula for the fused kernels).",
    "- rel. err: max over the outputs of ‖out − exact‖ / ‖exact‖, exact = float64 torch.func.jvp (math attention) "
    "of the same inputs; model rows on 4 images (primal and tangent).",
    "- encoders: random weights at the base models' shapes (Qwen2.5-0.5B, GPT-2: the decoder, no LM head), loss "
    "mean(last_hidden_state²); eval mode in both "
    "(no dropout: in training, attention dropout takes the dual attention off its fused kernel). No targets: "
    "the issue's are on the ViT shapes.",
]


if __name__ == "__main__":
    bc.main(stem="bench_linearized", title="tak linearized models GPU benchmarks (issue 4)", sections=SECTIONS,
            notes=NOTES, doc=__doc__)
