"""CPU benchmarks: each op of kfac_kernels (torch backend, what a CPU user gets) next to the plain
PyTorch a user would write, at small shapes. Each benchmark first asserts the two agree.

    python -m pytest benchmarks/test_bench_cpu.py            # a few seconds
    python -m pytest benchmarks/test_bench_cpu.py --benchmark-group-by=group --benchmark-columns=median,iqr,ops

Not collected by the default test run (pyproject's testpaths is tests/).
"""
import pytest
import torch
import torch.nn.functional as F

import kfac_kernels as kk

pytest.importorskip("pytest_benchmark")


@pytest.fixture(autouse=True)
def _torch_backend_highest(monkeypatch):
    monkeypatch.setenv("KFAC_KERNELS_BACKEND", "torch")
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(before)


def randn(*shape, seed, scale=1.0, dtype=torch.float32):
    return (scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed))).to(dtype)


def spd(n, seed):
    x = randn(n, 2 * n, seed=seed)
    S = x @ x.T / (2 * n)
    return (S + S.T) / 2


def tensors(x):
    return [x] if isinstance(x, torch.Tensor) else [t for part in x for t in tensors(part)]


def rel_err(x, ref) -> float:
    """‖x − ref‖ / ‖ref‖ over all the tensors of x and ref, in float64."""
    pairs = [(a.detach(), b.detach()) for a, b in zip(tensors(x), tensors(ref), strict=True)]
    num = sum(float((a.double() - b.double()).norm()) ** 2 for a, b in pairs)
    den = sum(float(b.double().norm()) ** 2 for _, b in pairs)
    return (num / den) ** 0.5


def with_grad(form, taus):
    """A callable returning (q, ∂q/∂taus) of q = form()."""
    def run():
        q = form()
        return q, torch.autograd.grad(q, taus)
    return run


def expr(T, B, A):
    return ((B @ T @ A) * T).sum()


# Each case returns (ours, plain, tolerance on their rel. difference): zero-argument callables.

def quadratic_form():
    T, B, A = randn(192, 64, seed=0, scale=0.1).requires_grad_(), spd(192, 1), spd(64, 2)
    return with_grad(lambda: kk.quadratic_form(T, B, A), [T]), with_grad(lambda: expr(T, B, A), [T]), 1e-5


def quadratic_forms():
    shapes = [(192, 64), (64, 64), (256, 64), (64, 256)] * 2
    Ts = [randn(o, i, seed=3 * l, scale=0.1).requires_grad_() for l, (o, i) in enumerate(shapes)]
    Bs = [spd(o, 3 * l + 1) for l, (o, i) in enumerate(shapes)]
    As = [spd(i, 3 * l + 2) for l, (o, i) in enumerate(shapes)]
    w = [1.0] * (len(shapes) - 1) + [0.1]
    return (with_grad(lambda: kk.quadratic_forms(Ts, Bs, As, weights=w), Ts),
            with_grad(lambda: sum(wl * expr(T, B, A) for wl, T, B, A in zip(w, Ts, Bs, As)), Ts), 1e-5)


def compressed(compress):
    """kk.quadratic_form on compressed factors vs the expression on the same factors made dense."""
    def case():
        T, B, A = randn(256, 128, seed=0, scale=0.1).requires_grad_(), compress(spd(256, 1)), compress(spd(128, 2))
        Bd, Ad = B.to_dense(), A.to_dense()
        return with_grad(lambda: kk.quadratic_form(T, B, A), [T]), with_grad(lambda: expr(T, Bd, Ad), [T]), 1e-4
    return case


def embedding_quadratic_form():
    """An embedding's penalty: A = diag(a) over MiniLM's 30522 × 384 table, 3000 tokens seen (the other columns
    skipped), vs the expression over every column."""
    T, B = randn(384, 30522, seed=0, scale=0.1).requires_grad_(), spd(384, 1)
    a = torch.zeros(30522).index_fill_(0, torch.randperm(30522, generator=torch.Generator().manual_seed(2))[:3000], 1.0)
    a = a * torch.rand(30522, generator=torch.Generator().manual_seed(3))
    return (with_grad(lambda: kk.quadratic_form(T, B, a), [T]), with_grad(lambda: ((B @ T) * T * a).sum(), [T]),
            1e-5)


def eigen_quadratic_form():
    T = randn(192, 64, seed=0, scale=0.1).requires_grad_()
    U_B, U_A = torch.linalg.qr(randn(192, 192, seed=1))[0], torch.linalg.qr(randn(64, 64, seed=2))[0]
    S = torch.rand(192, 64, generator=torch.Generator().manual_seed(3))
    return (with_grad(lambda: kk.eigen_quadratic_form(T, U_B, U_A, S), [T]),
            with_grad(lambda: (S * (U_B.T @ T @ U_A) ** 2).sum(), [T]), 1e-5)


def covariance(dtype, *, masked=False, append_ones=False):
    """kk.covariance_update_ vs C.addmm_ on the float32 copy of X (masked rows gathered, ones appended)."""
    def case():
        X = randn(2000, 96, seed=0, dtype=dtype)
        mask = torch.rand(2000, generator=torch.Generator().manual_seed(1)) < 0.9 if masked else None
        d = 97 if append_ones else 96
        C, C_ref = torch.zeros(d, d), torch.zeros(d, d)

        def ours():
            kk.covariance_update_(C, X, mask=mask, append_ones=append_ones)
            return C

        def plain():
            Xf = (X if mask is None else X[mask]).float()
            if append_ones:
                Xf = torch.cat([Xf, Xf.new_ones(Xf.shape[0], 1)], dim=1)
            return C_ref.addmm_(Xf.T, Xf)
        return ours, plain, 1e-5
    return case


def dual_inputs():
    x, dx = randn(512, 96, seed=0), randn(512, 96, seed=1).requires_grad_()
    W, dW = randn(192, 96, seed=2, scale=0.1), randn(192, 96, seed=3, scale=0.01).requires_grad_()
    b, db = randn(192, seed=4), randn(192, seed=5, scale=0.01).requires_grad_()
    return x, dx, W, dW, b, db


def dual_linear():
    x, dx, W, dW, b, db = dual_inputs()
    return (lambda: kk.dual_linear(x, dx, W, dW, b, db),
            lambda: torch.func.jvp(F.linear, (x, W, b), (dx, dW, db)), 1e-5)


def dual_linear_tangent_backward():
    x, dx, W, dW, b, db = dual_inputs()
    g = randn(512, 192, seed=6)

    def backward_of(dual):
        def run():
            y, dy = dual()
            return y, dy, torch.autograd.grad(dy, (dx, dW, db), g)
        return run
    return (backward_of(lambda: kk.dual_linear(x, dx, W, dW, b, db)),
            backward_of(lambda: torch.func.jvp(F.linear, (x, W, b), (dx, dW, db))), 1e-5)


def tangent_backward(dual, tangents, g):
    """A callable returning (y, dy, gradients of ⟨g, dy⟩ in the tangents) of dual() -> (y, dy)."""
    def run():
        y, dy = dual()
        return y, dy, torch.autograd.grad(dy, tangents, g)
    return run


def dual_layer_norm():
    x, dx = randn(2048, 384, seed=0, scale=2.0), randn(2048, 384, seed=1).requires_grad_()
    w, b = randn(384, seed=2), randn(384, seed=3)
    dw, db = randn(384, seed=4, scale=0.01).requires_grad_(), randn(384, seed=5, scale=0.01).requires_grad_()
    g = randn(2048, 384, seed=6)
    return (tangent_backward(lambda: kk.dual_layer_norm(x, dx, w, dw, b, db), (dx, dw, db), g),
            tangent_backward(lambda: torch.func.jvp(lambda x, w, b: F.layer_norm(x, (384,), w, b), (x, w, b),
                                                    (dx, dw, db)), (dx, dw, db), g), 1e-5)


def dual_gelu():
    x, dx, g = randn(2048, 1536, seed=0, scale=2.0), randn(2048, 1536, seed=1).requires_grad_(), randn(2048, 1536, seed=2)
    return (tangent_backward(lambda: kk.dual_activation(x, dx, "gelu"), (dx,), g),
            tangent_backward(lambda: torch.func.jvp(F.gelu, (x,), (dx,)), (dx,), g), 1e-5)


def squared_products():
    g, a = randn(64, 50, 96, seed=0), randn(64, 50, 128, seed=1)
    S, S_ref = torch.zeros(96, 128), torch.zeros(96, 128)
    return (lambda: kk.squared_products_update_(S.zero_(), g, a),
            lambda: S_ref.zero_().add_(torch.bmm(g.transpose(1, 2), a).square().sum(0)), 1e-5)


CASES = {
    "quadratic_form fwd+bwd": quadratic_form,
    "quadratic_forms fwd+bwd, 8 layers": quadratic_forms,
    "quadratic_form BlockDiagonalFactor(k=4)": compressed(lambda F: kk.BlockDiagonalFactor.from_dense(F, 4)),
    "quadratic_form LowRankFactor(rank=16)": compressed(lambda F: kk.LowRankFactor.from_dense(F, 16)),
    "quadratic_form Int8Factor": compressed(kk.Int8Factor.from_dense),
    "quadratic_form diagonal A (embedding) fwd+bwd": embedding_quadratic_form,
    "eigen_quadratic_form fwd+bwd": eigen_quadratic_form,
    "covariance_update_ fp32": covariance(torch.float32),
    "covariance_update_ bf16": covariance(torch.bfloat16),
    "covariance_update_ mask": covariance(torch.float32, masked=True),
    "covariance_update_ append_ones": covariance(torch.float32, append_ones=True),
    "dual_linear fwd": dual_linear,
    "dual_linear fwd+bwd (tangent)": dual_linear_tangent_backward,
    "dual_layer_norm fwd+bwd (tangent)": dual_layer_norm,
    "dual_activation gelu fwd+bwd (tangent)": dual_gelu,
    "squared_products_update_": squared_products,
}


@pytest.mark.benchmark(max_time=0.1, min_rounds=5)
@pytest.mark.parametrize("impl", ["kfac_kernels", "pytorch"])
@pytest.mark.parametrize("case", list(CASES))
def test_op(benchmark, case, impl):
    ours, plain, tol = CASES[case]()
    assert rel_err(ours(), plain()) < tol
    benchmark.group = case
    benchmark(ours if impl == "kfac_kernels" else plain)
