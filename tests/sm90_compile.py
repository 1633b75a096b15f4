"""Compile every Triton kernel of ``kfac_kernels`` for an H100 (sm_90) as the ops launch it, with no GPU.

    python tests/sm90_compile.py            # one line per compiled kernel, then a JSON summary
    python tests/sm90_compile.py dual_linear  # only the cases whose label contains "dual_linear"

A stand-in Triton driver answers "CUDA device 0, sm_90" and turns each launch into a no-op after the
real compiler (Triton's own ptxas included) has built the kernel; the ops run on CPU tensors with
their GPU tile sizes and launch options (``_backend.interpreting()`` stays False). Results are
meaningless, compilation is real: what fails here fails on the GPU, whatever the Triton version.
Checked per kernel: it compiles, and its shared memory fits one H100 SM (227 KiB); reported: whether its
PTX uses warpgroup MMAs (wgmma), how many 16-byte asynchronous copies (cp.async) feed them, how many
16-byte vector loads and stores to global memory it has (what memory-bound kernels live on), and from its
SASS the registers per thread and the register spills, in loops and in all. fp32 cases compile twice:
at 'highest' (IEEE, FMA units) and at 'high' (TF32 tensor cores).
"""
import json
import os
import re
import subprocess
import sys
import tempfile

os.environ["TRITON_INTERPRET"] = "0"
os.environ.pop("KFAC_KERNELS_BACKEND", None)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402

import kfac_kernels as kk  # noqa: E402
from kfac_kernels import _backend  # noqa: E402

H100_SHARED = 227 * 1024
COMPILED = []


def _resources(cubin: bytes) -> tuple[int, int, int]:
    """(registers per thread, local-memory accesses, those inside loops) of a kernel's cubin, read from
    its SASS by the cuobjdump Triton ships. Local memory is where ptxas spills the registers it runs out
    of: once in an epilogue it costs little, inside the main loop it costs every iteration. A loop is
    the span from a backward branch's target to the branch."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        tool = triton.knobs.nvidia.cuobjdump.path
        usage = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True, check=True).stdout
    code = [(int(m[1], 16), m[2]) for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
    loops = [(int(m[1], 16), at) for at, op in code if (m := re.search(r"\bBRA\b.*?0x([0-9a-f]+)", op))
             and int(m[1], 16) < at]
    local = [at for at, op in code if re.search(r"\b(?:LDL|STL)\b", op)]
    in_loops = [at for at in local if any(start <= at <= end for start, end in loops)]
    return int(re.search(r"REG:(\d+)", usage)[1]), len(local), len(in_loops)


def _recording(compile_fn):
    """``triton.compiler.compile`` that also records each kernel it builds and what its PTX uses."""
    def compile(src, *args, **kwargs):
        kernel = compile_fn(src, *args, **kwargs)
        ptx, meta = kernel.asm["ptx"], kernel.metadata
        registers, spills, loop_spills = _resources(kernel.asm["cubin"])
        COMPILED.append({"name": meta.name, "shared": meta.shared, "num_warps": meta.num_warps,
                         "num_stages": meta.num_stages, "registers": registers, "spills": spills,
                         "loop_spills": loop_spills, "wgmma": "wgmma.mma_async" in ptx,
                         "cp_async_16B": len(re.findall(r"cp\.async\.c[ag]\.shared\.global[^;]*\], 0x10\b", ptx)),
                         "vector_16B": len(re.findall(r"\b(?:ld|st)\.global[.\w]*\.v4\.[bfu]32\b", ptx))})
        return kernel
    return compile


class _Launcher:
    """A launch that runs nothing."""

    def __init__(self, src, metadata):
        pass

    def __call__(self, *args, **kwargs):
        pass


class _Utils:
    def load_binary(self, name, kernel, shared, device):
        return None, None, 0, 0, 1024  # module, function, registers, spills, max threads

    def get_device_properties(self, device):
        return {"max_shared_mem": H100_SHARED, "multiprocessor_count": 132, "max_num_regs": 65536,
                "warpSize": 32, "sm_clock_rate": 1980000, "mem_clock_rate": 2619000, "mem_bus_width": 5120}


class CompileOnlyDriver:
    """The parts of a Triton GPU driver that ``JITFunction.run`` and ``CompiledKernel`` touch."""

    launcher_cls = _Launcher
    utils = _Utils()

    def is_active(self):
        return True

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")


def cases():
    """(label, thunk) for every op, dtype, factor kind and layout the kernels specialize on."""
    g = torch.Generator().manual_seed(0)

    def rand(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=g).to(dtype)

    def backward(y):  # a dense gradient, as a loss gives (that of y.sum() would be a stride-0 view)
        y.backward(rand(*y.shape, dtype=y.dtype))

    def spd(n):
        x = rand(n, n)
        return x @ x.T / n + torch.eye(n)

    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for d_out, d_in in ((768, 3072), (130, 33)):  # aligned (vector copies) and any-stride layouts
            tau = rand(d_out, d_in, dtype=dtype).requires_grad_()
            B, A = spd(d_out).to(dtype), spd(d_in).to(dtype)
            yield f"quadratic_form {dtype} {d_out}x{d_in}", lambda: kk.quadratic_form(tau, B, A).backward()
    tau = rand(768, 768).requires_grad_()
    dense = spd(768)
    factors = {"blockdiag": kk.BlockDiagonalFactor.from_dense(dense, 8),
               "lowrank": kk.LowRankFactor.from_dense(dense, 64), "int8": kk.Int8Factor.from_dense(dense)}
    for name, F in factors.items():
        yield f"quadratic_form {name} factors", lambda F=F: kk.quadratic_form(tau, F, F).backward()
    for dtype in (torch.float32, torch.bfloat16):
        t = rand(768, 3072, dtype=dtype).requires_grad_()
        U_B, U_A = torch.linalg.qr(rand(768, 768))[0].to(dtype), torch.linalg.qr(rand(3072, 3072))[0].to(dtype)
        S = rand(768, 3072).abs()
        yield f"eigen_quadratic_form {dtype}", lambda t=t, U_B=U_B, U_A=U_A, S=S: (
            kk.eigen_quadratic_form(t, U_B, U_A, S).backward())
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for d in (768, 33):
            X = rand(4096, d, dtype=dtype)
            for ones, mask in ((False, None), (True, torch.rand(4096, generator=g) > 0.3)):
                C = torch.zeros(d + ones, d + ones)
                yield (f"covariance_update_ {dtype} d={d} ones={ones} mask={mask is not None}",
                       lambda X=X, C=C, ones=ones, mask=mask: kk.covariance_update_(C, X, mask=mask, append_ones=ones))
    for dtype in (torch.bfloat16, torch.float32):
        for d_in, d_out in ((768, 2304), (33, 7)):
            x, dx = rand(8, 197, d_in, dtype=dtype), rand(8, 197, d_in, dtype=dtype).requires_grad_()
            w, b = rand(d_out, d_in, dtype=dtype), rand(d_out, dtype=dtype)
            dw, db = rand(d_out, d_in, dtype=dtype).requires_grad_(), rand(d_out, dtype=dtype).requires_grad_()

            def dual_linear(x=x, dx=dx, w=w, dw=dw, b=b, db=db):
                y, dy = kk.dual_linear(x, dx, w, dw, b, db)
                backward(dy)
            yield f"dual_linear {dtype} {d_in}->{d_out}", dual_linear
    for dtype in (torch.bfloat16, torch.float32):
        for L, D, bias, softcap in ((197, 64, False, None), (50, 64, False, None), (23, 64, True, None),
                                    (197, 64, True, None), (257, 80, False, None), (197, 128, True, None),
                                    (77, 256, True, None), (197, 256, False, 50.0)):
            # ViT, T5 (bias), ViT-H/14 (d = 80), T5-3B (d = 128), the largest head dim the kernels take, Gemma 2
            # (capped scores, d = 256)
            q, k, v = (rand(2, 12, L, D, dtype=dtype) for _ in range(3))
            dq, dk, dv = (rand(2, 12, L, D, dtype=dtype).requires_grad_() for _ in range(3))
            mask = torch.rand(2, 1, 1, L, generator=g) > 0.2
            extra = dict(bias=rand(1, 12, L, L, dtype=dtype), dbias=rand(1, 12, L, L, dtype=dtype).requires_grad_()) \
                if bias else {}

            def attention(q=q, k=k, v=v, dq=dq, dk=dk, dv=dv, mask=mask, extra=extra, softcap=softcap):
                o, do = kk.dual_attention(q, k, v, dq, dk, dv, mask=mask, softcap=softcap, **extra)
                backward(do)
                kk.dual_attention(q, k, v, None, None, None, mask=mask, softcap=softcap)  # the primal-only forward
            yield f"dual_attention {dtype} L={L} D={D} bias={bias}" + (f" softcap={softcap:g}" if softcap else ""), \
                attention
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for d in (768, 33, 4096):
            x, dx = rand(8, 197, d, dtype=dtype), rand(8, 197, d, dtype=dtype).requires_grad_()
            w, b = rand(d, dtype=dtype), rand(d, dtype=dtype)
            dw, db = rand(d, dtype=dtype).requires_grad_(), rand(d, dtype=dtype).requires_grad_()

            def norms(x=x, dx=dx, w=w, b=b, dw=dw, db=db):
                backward(kk.dual_layer_norm(x, dx, w, dw, b, db)[1])
                backward(kk.dual_layer_norm(x, dx, w, None, b, None)[1])  # frozen γ, β: dx only
                backward(kk.dual_layer_norm(x, None, w, dw, b, db)[1])  # tangents of γ, β only
                backward(kk.dual_rms_norm(x, dx, w, dw)[1])
            yield f"dual_layer_norm/dual_rms_norm {dtype} d={d}", norms
    for dtype in (torch.bfloat16, torch.float32):
        x, dx = rand(8, 197, 3072, dtype=dtype), rand(8, 197, 3072, dtype=dtype).requires_grad_()
        for kind in kk.activation.ACTIVATIONS:
            yield (f"dual_activation {kind} {dtype}",
                   lambda x=x, dx=dx, kind=kind: backward(kk.dual_activation(x, dx, kind)[1]))
        h, dh = rand(8, 197, 3072, dtype=dtype), rand(8, 197, 3072, dtype=dtype).requires_grad_()
        yield (f"dual_activation gated gelu_tanh {dtype}", lambda x=x, dx=dx, h=h, dh=dh: (
            backward(kk.dual_activation(x, dx, "gelu_tanh", gate=h, dgate=dh)[1])))
    for dtype in (torch.bfloat16, torch.float32):
        for N, T, r_B, r_A in ((8, 197, 768, 3072), (7, 33, 130, 33), (50, 1, 768, 3072)):  # tokens, odd, rows
            gs, xs = rand(N, T, r_B, dtype=dtype), rand(N, T, r_A, dtype=dtype)
            S = torch.zeros(r_B, r_A)
            yield (f"squared_products_update_ {dtype} N={N} T={T} {r_B}x{r_A}",
                   lambda S=S, gs=gs, xs=xs: kk.squared_products_update_(S, gs, xs))


def _with_tf32(labelled):
    """(label, thunk, fp32 matmul precision): each case at 'highest', fp32 cases also at 'high' (TF32)."""
    for label, run in labelled:
        yield label, run, "highest"
        if "float32" in label:
            yield label + " tf32", run, "high"


def main() -> int:
    driver.set_active(CompileOnlyDriver())
    triton.compiler.compile = _recording(triton.compiler.compile)  # JITFunction looks it up when it first runs
    _backend.select = lambda op, device, dtypes, **kw: "triton"
    failures = []
    for label, run, precision in _with_tf32(cases()):
        if not all(word in label for word in sys.argv[1:]):
            continue
        before = len(COMPILED)
        try:
            torch.set_float32_matmul_precision(precision)
            run()
        except Exception as e:  # report every case, then fail
            failures.append(f"{label}: {type(e).__name__}: {e}")
            print(f"FAIL {label}: {type(e).__name__}: {str(e)[:2000]}", flush=True)
            continue
        for k in COMPILED[before:]:
            k["case"] = label
            print(f"ok   {label}: {k['name']} warps={k['num_warps']} stages={k['num_stages']} "
                  f"shared={k['shared']} registers={k['registers']} spills={k['spills']} (in loops {k['loop_spills']}) "
                  f"wgmma={k['wgmma']} cp.async(16 B)={k['cp_async_16B']} "
                  f"ld/st.global(16 B)={k['vector_16B']}", flush=True)
    over = [k for k in COMPILED if k["shared"] > H100_SHARED]
    failures += [f"{k['name']}: {k['shared']} bytes of shared memory > {H100_SHARED}" for k in over]
    print(json.dumps({"triton": triton.__version__, "kernels": COMPILED, "failures": failures}))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
