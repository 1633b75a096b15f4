"""``python -m kfac_kernels``: check every op against its float64 definition on each backend here,
then time the main ops against the PyTorch a user would write. Exits 1 if a check fails.

Without a GPU the Triton kernels are checked through Triton's interpreter (small shapes).
"""
import argparse
import os
import sys
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports Triton

import kfac_kernels as kk  # noqa: E402
from kfac_kernels import _backend  # noqa: E402


def _spd(n, device, dtype=torch.float32):
    x = torch.randn(n, n + 8, device=device, dtype=torch.float64)
    return (x @ x.T / (n + 8)).to(dtype)


def _rel(x, ref):
    ref = ref.double().cpu()
    return ((x.double().cpu() - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def _checks(device):
    """(name, relative error, tolerance) of each op at odd shapes, fresh random inputs."""
    tau = torch.randn(33, 70, device=device, requires_grad=True)
    B, A = _spd(33, device), _spd(70, device)
    q = kk.quadratic_form(tau, B, A)
    q.backward()
    t, B64, A64 = tau.detach().double(), B.double(), A.double()
    yield "quadratic_form", _rel(q, (t * (B64 @ t @ A64)).sum()), 1e-5
    yield "quadratic_form grad", _rel(tau.grad, 2 * B64 @ t @ A64), 1e-5
    Bc = kk.BlockDiagonalFactor.from_dense(B, 4)
    yield "quadratic_form block-diagonal", _rel(kk.quadratic_form(tau, Bc, A), (t * (Bc.to_dense().double() @ t @ A64)).sum()), 1e-5
    Ac = kk.Int8Factor.from_dense(A)
    yield "quadratic_form int8", _rel(kk.quadratic_form(tau, B, Ac), (t * (B64 @ t @ Ac.to_dense().double())).sum()), 1e-5
    U_B, U_A, S = torch.linalg.qr(torch.randn(33, 33, device=device))[0], torch.linalg.qr(torch.randn(70, 20, device=device))[0], torch.rand(33, 20, device=device)
    M = U_B.double().T @ t @ U_A.double()
    yield "eigen_quadratic_form", _rel(kk.eigen_quadratic_form(tau.detach(), U_B, U_A, S), (S.double() * M**2).sum()), 1e-5
    X = torch.randn(5, 19, 65, device=device, dtype=torch.bfloat16)
    mask = torch.rand(5, 19, device=device) < 0.7
    C = torch.zeros(66, 66, device=device)
    kk.covariance_update_(C, X, mask=mask, append_ones=True, scale=0.5)
    Xt = torch.cat([X[mask].double(), torch.ones(int(mask.sum()), 1, dtype=torch.float64, device=device)], 1)
    yield "covariance_update_ (bf16, mask, ones)", _rel(C, 0.5 * Xt.T @ Xt), 1e-5
    yield "covariance_update_ exact symmetry", float(not torch.equal(C, C.T)), 0.0
    x, dx = torch.randn(2, 7, 33, device=device), torch.randn(2, 7, 33, device=device)
    W, dW, b, db = torch.randn(17, 33, device=device), torch.randn(17, 33, device=device), torch.randn(17, device=device), torch.randn(17, device=device)
    y, dy = kk.dual_linear(x, dx, W, dW, b, db)
    y_ref, dy_ref = torch.func.jvp(torch.nn.functional.linear, (x.double(), W.double(), b.double()), (dx.double(), dW.double(), db.double()))
    yield "dual_linear primal", _rel(y, y_ref), 1e-5
    yield "dual_linear tangent", _rel(dy, dy_ref), 1e-5
    yield from _more_checks(device, tau, t, B64, A64, x, dx)


def _more_checks(device, tau, t, B64, A64, x, dx):
    """The other ops: low-rank factors, the EK-FAC correction, the dual norms, activations and attention
    (the error of a dual op is the larger of its primal's and its tangent's)."""
    F = kk.LowRankFactor.from_dense(A64.float(), rank=9)
    ref = (t * (B64 @ t @ F.to_dense().double())).sum()
    yield "quadratic_form low-rank", _rel(kk.quadratic_form(tau.detach(), B64.float(), F), ref), 1e-5
    g, a = torch.randn(6, 5, 13, device=device), torch.randn(6, 5, 11, device=device)
    S = kk.squared_products_update_(torch.zeros(13, 11, device=device), g, a)
    yield "squared_products_update_", _rel(S, (torch.einsum("ntb,nta->nba", g.double(), a.double()) ** 2).sum(0)), 1e-5
    w, dw, b, db = (torch.randn(33, device=device) for _ in range(4))
    x64, dx64 = x.double(), dx.double()
    f = torch.nn.functional
    y, dy = kk.dual_layer_norm(x, dx, w, dw, b, db)
    ref = torch.func.jvp(lambda x, w, b: f.layer_norm(x, (33,), w, b), (x64, w.double(), b.double()),
                         (dx64, dw.double(), db.double()))
    yield "dual_layer_norm", max(_rel(y, ref[0]), _rel(dy, ref[1])), 1e-5
    y, dy = kk.dual_rms_norm(x, dx, w, dw)
    ref = torch.func.jvp(lambda x, w: w * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6),
                         (x64, w.double()), (dx64, dw.double()))
    yield "dual_rms_norm", max(_rel(y, ref[0]), _rel(dy, ref[1])), 1e-5
    h, dh = torch.randn_like(x), torch.randn_like(x)
    y, dy = kk.dual_activation(x, dx, "gelu", gate=h, dgate=dh)
    ref = torch.func.jvp(lambda x, h: f.gelu(x) * h, (x64, h.double()), (dx64, dh.double()))
    yield "dual_activation (gated gelu)", max(_rel(y, ref[0]), _rel(dy, ref[1])), 1e-5
    q, k, v, dq, dk, dv = (torch.randn(2, 3, 19, 16, device=device) for _ in range(6))
    mask = (torch.arange(19, device=device)[None] < torch.tensor([[19], [7]], device=device))[:, None, None, :]
    o, do = kk.dual_attention(q, k, v, dq, dk, dv, mask=mask)
    ref = torch.func.jvp(lambda q, k, v: torch.softmax((q @ k.mT / 4).masked_fill(~mask, -torch.inf), -1) @ v,
                         (q.double(), k.double(), v.double()), (dq.double(), dk.double(), dv.double()))
    yield "dual_attention (padding mask)", max(_rel(o, ref[0]), _rel(do, ref[1])), 1e-5


def _time(fn, device, reps):
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    best = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        best.append(time.perf_counter() - start)
    return 1e3 * sorted(best)[len(best) // 2]


def _timings(device, reps):
    """(what, ours ms, reference ms) at ViT shapes (B/16 on a GPU, S/16 on a CPU)."""
    d = 768 if device == "cuda" else 384
    shapes = [(3 * d, d), (d, d), (4 * d, d), (d, 4 * d)] * (12 if device == "cuda" else 2)
    taus = [(0.01 * torch.randn(s, device=device)).requires_grad_() for s in shapes]
    Bs, As = [_spd(o, device) for o, _ in shapes], [_spd(i, device) for _, i in shapes]

    def ours():
        kk.quadratic_forms(taus, Bs, As).backward()

    def reference():
        sum(((B @ T @ A) * T).sum() for B, T, A in zip(Bs, taus, As)).backward()

    yield f"quadratic_forms fwd+bwd, {len(shapes)} ViT layers (d={d}), fp32", _time(ours, device, reps), _time(reference, device, reps)
    X = torch.randn(128 * 197 if device == "cuda" else 4096, d, device=device, dtype=torch.bfloat16)
    C = torch.zeros(d, d, device=device)
    yield f"covariance_update_ X {tuple(X.shape)} bf16", _time(lambda: kk.covariance_update_(C, X), device, reps), \
        _time(lambda: C.addmm_(X.float().T, X.float()), device, reps)
    x, dx = torch.randn(2 * X.shape[0] // 8, d, device=device), torch.randn(2 * X.shape[0] // 8, d, device=device)
    W, dW = torch.randn(4 * d, d, device=device), torch.randn(4 * d, d, device=device)
    yield f"dual_linear x {tuple(x.shape)} -> {4 * d}, fp32", _time(lambda: kk.dual_linear(x, dx, W, dW), device, reps), \
        _time(lambda: torch.func.jvp(torch.nn.functional.linear, (x, W), (dx, dW)), device, reps)


def main(argv=None) -> int:
    summary = __doc__.split("\n\n")[0].replace("\n", " ")  # the docstring's first paragraph
    parser = argparse.ArgumentParser(prog="python -m kfac_kernels", description=summary)
    parser.add_argument("--reps", type=int, default=10, help="timed repetitions per op (median reported)")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.set_float32_matmul_precision("highest")
    backends = ["torch"] + (["triton"] if _backend.triton_available() else [])
    print(f"kfac_kernels {kk.__version__} | torch {torch.__version__} | device {device}"
          + (f" ({torch.cuda.get_device_name()})" if device == "cuda" else " (Triton through its interpreter)"))
    print(f"\n{'check':42s} {'backend':8s} {'rel. error':>11s} {'tolerance':>10s}")
    failed = 0
    for backend in backends:
        os.environ["KFAC_KERNELS_BACKEND"] = backend
        for name, err, tol in _checks(device):
            ok = err <= tol
            failed += not ok
            print(f"{name:42s} {backend:8s} {err:11.2e} {tol:10.0e} {'ok' if ok else 'FAILED'}")
    os.environ.pop("KFAC_KERNELS_BACKEND")
    auto = "triton" if device == "cuda" and _backend.triton_available() else "torch"
    print(f"\n{'timing (median ms; ours: ' + auto + ' backend)':58s} {'ours':>9s} {'PyTorch':>9s} {'speedup':>8s}")
    for name, ours, ref in _timings(device, args.reps):
        print(f"{name:58s} {ours:9.2f} {ref:9.2f} {ref / ours:7.2f}x")
    print("\nall checks passed" if not failed else f"\n{failed} checks FAILED")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
