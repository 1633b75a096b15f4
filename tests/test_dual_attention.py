"""dual_attention against torch.func.jvp of float64 math attention, and its tangent-path gradients
against autograd of that jvp; both backends (Triton under the interpreter on CPU)."""
import os
import subprocess
import sys

import pytest
import torch

from kfac_kernels.attention import dual_attention

from .conftest import DEVICE
from .util import TOL, check_hvp, rel_err

TANGENTS = ("dq", "dk", "dv", "dbias")


def math_attention(q, k, v, bias, mask, scale, softcap=None):
    """softmax(S, masked) V with S = Q Kᵀ·scale + bias, or c·tanh(Q Kᵀ·scale / c) + bias for ``softcap`` c; rows
    with no key give 0 (and no NaN in derivatives)."""
    s = (q @ k.mT) * scale
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    s = s + bias
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    dead = torch.isneginf(s).all(-1, keepdim=True)
    return torch.softmax(s.masked_fill(dead, 0.0), -1).masked_fill(dead, 0.0) @ v


def reference(q, k, v, dq, dk, dv, mask, bias, dbias, scale, softcap=None):
    """(O, Ȯ) in float64 by torch.func.jvp of ``math_attention``; differentiable in the tangents given."""
    Lq, Lk = q.shape[2], k.shape[2]
    bias = torch.zeros(Lq, Lk, dtype=torch.float64) if bias is None else bias.double()
    primals = [t.double() for t in (q, k, v)] + [bias]
    tangents = [torch.zeros_like(p) if t is None else t for p, t in zip(primals, (dq, dk, dv, dbias))]
    return torch.func.jvp(lambda q, k, v, b: math_attention(q, k, v, b, mask, scale, softcap), tuple(primals),
                          tuple(tangents))


def make_inputs(B, H, Lq, Lk, D, Dv, *, mask="none", bias="none", tangents=TANGENTS, dtype=torch.float32):
    """Fresh random inputs as a dict of dual_attention's arguments (q, k, v laid out like split heads)."""
    def rand(*shape):
        return torch.randn(*shape, device=DEVICE).to(dtype)

    x = dict(q=rand(B, Lq, H, D).transpose(1, 2), k=rand(B, Lk, H, D).transpose(1, 2),
             v=rand(B, Lk, H, Dv).transpose(1, 2))
    x.update(dq=rand(B, H, Lq, D), dk=rand(B, H, Lk, D), dv=rand(B, H, Lk, Dv))
    if mask == "padding":
        m = torch.rand(B, 1, 1, Lk, device=DEVICE) < 0.7
        m[..., 0] = True
    elif mask == "causal":
        m = torch.ones(Lq, Lk, dtype=torch.bool, device=DEVICE).tril(Lk - Lq)
    elif mask == "full":
        m = torch.rand(B, H, Lq, Lk, device=DEVICE) < 0.7
        m[..., 0] = True
    x["mask"] = None if mask == "none" else m
    shape = {"none": None, "frozen": (1, H, Lq, Lk), "shared": (1, H, Lq, Lk), "full": (B, H, Lq, Lk),
             "pairs": (Lq, Lk)}[bias]
    x["bias"] = None if shape is None else rand(*shape)
    x["dbias"] = rand(*shape) if bias in ("shared", "full", "pairs") else None
    for name in TANGENTS:
        if name not in tangents:
            x[name] = None
    return x


def check(x, tol, scale=None, grads=True, softcap=None):
    """o, do and (if ``grads``) the gradients of ⟨G, do⟩ in each tangent against the float64 jvp reference."""
    leaves = {n: None if x[n] is None else x[n].detach().double().cpu().requires_grad_() for n in TANGENTS}
    primal = {n: None if x[n] is None else x[n].cpu() for n in ("q", "k", "v", "mask", "bias")}
    scale_ = x["q"].shape[-1] ** -0.5 if scale is None else scale
    o_ref, do_ref = reference(primal["q"], primal["k"], primal["v"], leaves["dq"], leaves["dk"], leaves["dv"],
                              primal["mask"], primal["bias"], leaves["dbias"], scale_, softcap)
    for n in TANGENTS:
        if x[n] is not None:
            x[n].requires_grad_()
    o, do = dual_attention(**x, scale=scale, softcap=softcap)
    assert o.shape == o_ref.shape and not o.requires_grad
    assert rel_err(o, o_ref) <= tol
    if all(x[n] is None for n in TANGENTS):
        assert do is None
        return
    assert do.shape == o_ref.shape and do.dtype == o.dtype
    assert rel_err(do, do_ref) <= tol
    if not grads:
        return
    G = torch.randn_like(do_ref)
    wanted = [n for n in TANGENTS if x[n] is not None]
    grads = torch.autograd.grad((do * G.to(do.device, do.dtype)).sum(), [x[n] for n in wanted])
    refs = torch.autograd.grad((do_ref * G).sum(), [leaves[n] for n in wanted])
    for n, g, ref in zip(wanted, grads, refs):
        assert g.shape == x[n].shape and g.dtype == x[n].dtype, n
        assert rel_err(g, ref) <= tol, n


CASES = {  # (B, H, Lq, Lk, D, Dv), mask, bias, tangents
    "padding": ((2, 2, 33, 33, 16, 16), "padding", "none", TANGENTS),
    "causal-shared-bias": ((2, 2, 70, 70, 32, 32), "causal", "shared", TANGENTS),
    "full-mask-full-bias": ((2, 2, 7, 33, 16, 32), "full", "full", TANGENTS),
    "cross-pairs-dbias": ((2, 1, 33, 7, 32, 16), "padding", "pairs", ("dbias",)),
    "one-query-dq": ((1, 2, 1, 33, 32, 32), "none", "frozen", ("dq",)),
    "dk": ((2, 1, 33, 7, 16, 16), "padding", "none", ("dk",)),
    "one-key-dv": ((2, 2, 7, 1, 16, 16), "none", "frozen", ("dv",)),
    "primal-only": ((2, 2, 33, 70, 16, 16), "padding", "frozen", ()),
}


@pytest.mark.parametrize("case", CASES)
def test_matches_jvp_fp32(backend, case):
    shape, mask, bias, tangents = CASES[case]
    check(make_inputs(*shape, mask=mask, bias=bias, tangents=tangents), TOL[torch.float32])


@pytest.mark.parametrize("case", ["padding", "causal-shared-bias", "full-mask-full-bias", "cross-pairs-dbias",
                                  "one-query-dq", "dk", "one-key-dv"])
def test_capped_scores(backend, case):
    """Products capped to c·tanh(Q Kᵀ·scale / c) (Gemma 2), c small enough that many reach the flat part of tanh;
    the bias added after the cap."""
    shape, mask, bias, tangents = CASES[case]
    x = make_inputs(*shape, mask=mask, bias=bias, tangents=tangents)
    x["q"] = 4 * x["q"]
    check(x, TOL[torch.float32], softcap=1.5)


def test_capped_scores_half(backend):
    x = make_inputs(2, 2, 33, 70, 32, 32, mask="causal", bias="shared", dtype=torch.bfloat16)
    check(x, TOL[torch.bfloat16], softcap=3.0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_matches_jvp_half(backend, dtype):
    x = make_inputs(2, 2, 33, 70, 32, 32, mask="padding", bias="shared", dtype=dtype)
    x["dbias"] = x["dbias"].float()  # mixed: the tangent of the bias in fp32, multiplied in `dtype`
    check(x, TOL[dtype])


def test_half_with_large_means(backend):
    """bf16 stays accurate when keys and key tangents share a large mean (a per-row offset of Ṡ that
    softmax ignores, and a part of K that grad Q̇ = grad Ṡ K cancels) and, for O and Ȯ, so do the values."""
    x = make_inputs(2, 2, 33, 70, 32, 32, mask="padding", dtype=torch.bfloat16)
    for name, size in (("k", 4.0), ("dk", 20.0)):
        x[name] = (x[name].float() + size * torch.randn(2, 2, 1, 32, device=DEVICE)).to(torch.bfloat16)
    check(x, TOL[torch.bfloat16])
    x["v"] = (x["v"].float() + 20.0 * torch.randn(2, 2, 1, 32, device=DEVICE)).to(torch.bfloat16)
    check(x, TOL[torch.bfloat16], grads=False)  # the gradients use Δ = rowsum(G ⊙ O) of the rounded O


def test_float64(backend):
    """The PyTorch reference is exact in float64; the Triton kernels refuse it."""
    x = make_inputs(2, 2, 7, 33, 16, 16, mask="padding", bias="shared", dtype=torch.float64)
    if backend == "triton":
        with pytest.raises(TypeError, match="float16/bfloat16/float32"):
            dual_attention(**x)
    else:
        check(x, TOL[torch.float64])


def test_tf32(backend):
    torch.set_float32_matmul_precision("high")
    check(make_inputs(2, 2, 33, 33, 32, 32, mask="causal"), TOL["tf32"], scale=0.3)


def test_rows_without_keys_give_zero(backend):
    """Fully masked query rows, a batch with every key padded and a −∞ bias row: O = Ȯ = 0 there,
    no NaN anywhere, gradients as the reference (where those rows contribute nothing)."""
    x = make_inputs(2, 2, 33, 33, 16, 16, mask="full", bias="shared")
    x["mask"][:, :, 5] = False
    x["mask"][1] = False
    x["bias"][:, 1, 9] = float("-inf")
    check(x, TOL[torch.float32])
    o, do = dual_attention(**x)
    dead = torch.zeros(2, 2, 33, dtype=torch.bool, device=DEVICE)
    dead[:, :, 5], dead[1], dead[:, 1, 9] = True, True, True
    assert (o[dead] == 0).all() and (do[dead] == 0).all()
    assert torch.isfinite(o).all() and torch.isfinite(do).all()
    do.sum().backward()
    assert all(torch.isfinite(x[n].grad).all() for n in TANGENTS)


def test_no_keys(backend):
    x = make_inputs(2, 1, 5, 0, 16, 16)
    x["dq"].requires_grad_()
    o, do = dual_attention(**x)
    assert o.shape == (2, 1, 5, 16) and not o.any() and not do.any()
    do.sum().backward()
    assert not x["dq"].grad.any()


def test_no_head_dim(backend):
    """D = 0 (default scale): every score is 0, so each query weighs the keys equally."""
    x = make_inputs(2, 1, 5, 7, 0, 16)
    o, do = dual_attention(**x)
    mean = {n: x[n].mean(-2, keepdim=True).expand_as(o) for n in ("v", "dv")}
    assert rel_err(o, mean["v"]) <= TOL[torch.float32] and rel_err(do, mean["dv"]) <= TOL[torch.float32]


def test_autocast_keeps_the_compute_dtype(backend):
    """Under torch.autocast (bf16) fp32 inputs still multiply in fp32 (the reference's products would be bf16)."""
    x = make_inputs(2, 2, 7, 33, 16, 16, mask="padding", bias="shared")
    x["dq"].requires_grad_()
    with torch.autocast(torch.device(DEVICE).type, dtype=torch.bfloat16):
        o, do = dual_attention(**x)
    leaves = {n: None if x[n] is None else x[n].detach().double().cpu().requires_grad_() for n in TANGENTS}
    o_ref, do_ref = reference(*(x[n].cpu() for n in ("q", "k", "v")), *(leaves[n] for n in ("dq", "dk", "dv")),
                              x["mask"].cpu(), x["bias"].cpu(), leaves["dbias"], 16 ** -0.5)
    assert o.dtype == do.dtype == torch.float32
    assert rel_err(o, o_ref) <= TOL[torch.float32] and rel_err(do, do_ref) <= TOL[torch.float32]
    G = torch.randn_like(do_ref)  # the backward outside autocast, as PyTorch recommends
    g, = torch.autograd.grad((do * G.to(do)).sum(), x["dq"])
    assert rel_err(g, torch.autograd.grad((do_ref * G).sum(), leaves["dq"])[0]) <= TOL[torch.float32]


def test_second_derivatives(backend):
    """A loss quadratic in Ȯ, differentiated twice in the tangents: the reference (plain autograd) matches
    torch.func (forward-over-reverse) of the float64 jvp; the kernels' backward raises instead of dropping terms."""
    x = make_inputs(1, 2, 5, 7, 8, 8, mask="padding", bias="shared")
    primal = [x[n].double().cpu() for n in ("q", "k", "v")]
    G = torch.randn(1, 2, 5, 8, dtype=torch.float64)
    vs = [torch.randn_like(x[n]) for n in TANGENTS]

    def loss64(*tangents):
        do = reference(*primal, *tangents[:3], x["mask"].cpu(), x["bias"].double().cpu(), tangents[3], 0.5)[1]
        return (do ** 2 * G).sum()

    leaves = [x[n].requires_grad_() for n in TANGENTS]
    do = dual_attention(x["q"], x["k"], x["v"], *leaves[:3], mask=x["mask"], bias=x["bias"], dbias=leaves[3], scale=0.5)[1]
    check_hvp((do ** 2 * G.to(do)).sum(), leaves, vs, loss64, backend, TOL[torch.float32],
              "dual_attention: its Triton backward cannot be differentiated again")


@pytest.mark.parametrize("change, message", [
    (dict(k=torch.zeros(2, 2, 7, 8)), "k must have shape"),
    (dict(v=torch.zeros(2, 2, 6, 16)), "v must have shape"),
    (dict(dq=torch.zeros(2, 2, 5, 8)), "dq must have the shape of q"),
    (dict(mask=torch.ones(2, 1, 1, 7)), "mask must have dtype"),
    (dict(mask=torch.ones(3, 1, 1, 7, dtype=torch.bool)), "mask must be broadcastable"),
    (dict(dbias=torch.zeros(1, 1, 1, 5, 7)), "dbias must be broadcastable"),
    (dict(q=torch.zeros(2, 2, 5, 16, requires_grad=True)), "q requires grad"),
    (dict(dv=torch.zeros(2, 2, 7, 16, device="meta")), "one device"),
    (dict(softcap=0.0), r"softcap must be a finite number > 0 or None, got 0\.0"),
    (dict(softcap=float("inf")), "softcap must be a finite number > 0"),
    (dict(softcap="50"), "softcap must be a finite number > 0 or None, got '50'"),
])
def test_bad_input(change, message):
    x = dict(q=torch.zeros(2, 2, 5, 16), k=torch.zeros(2, 2, 7, 16), v=torch.zeros(2, 2, 7, 16),
             dq=None, dk=None, dv=torch.zeros(2, 2, 7, 16))
    kwargs = {n: t for n, t in change.items() if n in ("mask", "bias", "dbias", "softcap")}
    x.update({n: t for n, t in change.items() if n not in kwargs})
    with pytest.raises((ValueError, TypeError), match=message):
        dual_attention(**x, **kwargs)


def test_slices_beyond_the_kernels_int32_offsets_are_refused(use_backend):
    use_backend("triton")
    L = 46_341  # L² > 2^31
    q = torch.randn(1, 1, L, 16, device=DEVICE)
    mask = torch.empty(L, L, dtype=torch.bool, device=DEVICE)  # never touched: refused before any launch
    with pytest.raises(ValueError, match=f"one .batch, head. slice of mask spans {L * L} elements, beyond the 2"):
        dual_attention(q, q, q, q, None, None, mask=mask)
    dual_attention(q[:, :, :5], q[:, :, :5], q[:, :, :5], None, None, None, mask=mask[:5, :5])  # a view of it


_PTX_PROBE = """
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from kfac_kernels.triton_kernels import dual_attention as da
fn = da._forward_kernel
consts = dict(HAS_DQ=True, HAS_DK=True, HAS_DV=True, HAS_DBIAS=False, HAS_BIAS=False, MASK=1, DOT="bf16", SOFTCAP=False,
              BLOCK_M=128, BLOCK_N=64, BLOCK_D=64, BLOCK_DV=64)
sig = {n: "constexpr" if n in consts else "fp32" if n in ("scale", "cap2") else "*u8" if n == "mask"
       else "*fp32" if n == "lse"
       else "i32" if n.startswith("s_") or n in ("H", "Lq", "Lk", "D", "DV") else "*bf16" for n in fn.arg_names}
for n in fn.arg_names:  # unit strides along the head dim and the keys, as the JIT specializes them
    if n.startswith("s_") and n[-1] in "dk":
        sig[n], consts[n] = "constexpr", 1
attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n, t in sig.items()
         if t.startswith("*") or (t == "i32" and n not in ("H", "Lq", "Lk"))}
src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=8, num_stages=2))
print(k.metadata.shared, k.asm["ptx"])
"""


def test_forward_compiles_to_wgmma_with_async_copies():
    """The bf16 forward at the H100 tile sizes compiles for sm_90 (offline, no GPU) to warpgroup MMAs fed by
    asynchronous copies, within the shared memory of one SM."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    out = subprocess.run([sys.executable, "-c", _PTX_PROBE], env=env, check=True, capture_output=True, text=True).stdout
    shared, ptx = out.split(" ", 1)
    assert "wgmma.mma_async" in ptx and "cp.async" in ptx
    assert int(shared) <= 227 * 1024


@pytest.mark.gpu
@pytest.mark.parametrize("L, bias", [(197, "none"), (50, "none"), (100, "shared")])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_vit_shapes(L, bias, dtype, use_backend):
    """The Triton kernels at ViT-B / T5 shapes against the PyTorch reference backend on the GPU."""
    x = make_inputs(8, 12, L, L, 64, 64, mask="padding", bias=bias, dtype=dtype)
    for n in TANGENTS:
        if x[n] is not None:
            x[n].requires_grad_()
    o, do = dual_attention(**x)
    G = torch.randn_like(do)
    grads = torch.autograd.grad((do * G).sum(), [x[n] for n in TANGENTS if x[n] is not None])
    use_backend("torch")
    o_ref, do_ref = dual_attention(**x)
    refs = torch.autograd.grad((do_ref * G).sum(), [x[n] for n in TANGENTS if x[n] is not None])
    tol = TOL[dtype]
    assert rel_err(o, o_ref) <= tol and rel_err(do, do_ref) <= tol
    assert all(rel_err(g, r) <= tol for g, r in zip(grads, refs))


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["batch x heads over 65,535", "head dim 256 bf16", "head dim 256 tf32",
                                  "fp64 primal, fp32 tangents"])
def test_gpu_shapes_at_the_kernels_limits(case):
    """One grid axis for B·H (CUDA's second and third stop at 65,535), the largest head dim (tiles that fit in
    shared memory) and fp64 primal inputs with fp32 tangents (tiled as fp32), against the float64 jvp."""
    if case.startswith("batch"):
        x, tol = make_inputs(70_000, 1, 5, 5, 16, 16, mask="padding"), TOL[torch.float32]
    elif case.startswith("head dim"):
        dtype = torch.bfloat16 if case.endswith("bf16") else torch.float32
        torch.set_float32_matmul_precision("high")
        x = make_inputs(2, 4, 77, 77, 256, 256, mask="padding", bias="shared", dtype=dtype)
        tol = TOL[torch.bfloat16] if dtype == torch.bfloat16 else TOL["tf32"]
    else:
        torch.set_float32_matmul_precision("high")
        x, tol = make_inputs(2, 12, 197, 197, 128, 128, mask="padding"), TOL["tf32"]
        x.update({n: x[n].double() for n in ("q", "k", "v")})
    check(x, tol)
