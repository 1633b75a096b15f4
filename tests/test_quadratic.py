"""Quadratic forms against their float64 definitions: vec(τ)ᵀ(B⊗A)vec(τ) and Σ S ⊙ (U_Bᵀ τ U_A)²."""
import math
import os
import subprocess
import sys

import pytest
import torch

import kfac_kernels as kk
from tests.conftest import DEVICE, KERNEL_BACKENDS
from tests.util import TOL, rel_err

SHAPES = [(1, 1), (1, 7), (7, 1), (7, 33), (33, 7), (130, 33), (33, 130), (32, 48), (48, 96)]


@pytest.fixture(autouse=True)
def _on_the_kernels_device():
    """Tensors are made on the GPU where there is one (the Triton kernels take CUDA tensors), else on the CPU,
    where Triton runs through its interpreter."""
    with torch.device(DEVICE):
        yield


def spd(n, dtype=torch.float32):
    x = torch.randn(n, n + 5, dtype=torch.float64)
    return (x @ x.T / (n + 5)).to(dtype)


def dense(F):
    if isinstance(F, torch.Tensor):
        return torch.diag(F.double()) if F.dim() == 1 else F.double()  # a 1-D factor is its diagonal
    return F.to_dense().double()


def definition(tau, B, A):
    """q and ∇q in float64: torch.kron for small layers, the explicit sum Σ τ ⊙ (B τ A) otherwise."""
    t, B, A = tau.detach().double(), dense(B), dense(A)
    if t.numel() <= 33 * 33:
        v = t.reshape(-1)
        q = v @ torch.kron(B, A) @ v
    else:
        q = (t * (B @ t @ A)).sum()
    return q, 2 * B @ t @ A


@pytest.mark.parametrize("shape", SHAPES)
def test_quadratic_form_matches_kron(backend, shape):
    tau = torch.randn(shape, requires_grad=True)
    B, A = spd(shape[0]), spd(shape[1])
    q = kk.quadratic_form(tau, B, A)
    q.backward()
    q_ref, g_ref = definition(tau, B, A)
    assert q.dtype == torch.float32 and q.dim() == 0
    assert rel_err(q, q_ref) <= TOL[torch.float32]
    assert rel_err(tau.grad, g_ref) <= TOL[torch.float32]


def test_gradient_matches_autograd_of_dense_form(backend):
    tau = torch.randn(7, 13, dtype=torch.float32, requires_grad=True)
    B, A = spd(7), spd(13)
    kk.quadratic_form(tau, B, A).backward()
    t64 = tau.detach().double().requires_grad_()
    (t64.reshape(-1) @ torch.kron(B.double(), A.double()) @ t64.reshape(-1)).backward()
    assert rel_err(tau.grad, t64.grad) <= TOL[torch.float32]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(backend, dtype):
    tau = torch.randn(33, 130, dtype=dtype, requires_grad=True)
    B, A = spd(33, dtype), spd(130, dtype)
    q = kk.quadratic_form(tau, B, A)
    q.backward()
    q_ref, g_ref = definition(tau, B, A)  # float64 of the same rounded inputs
    assert q.dtype == torch.float32 and tau.grad.dtype == dtype
    assert rel_err(q, q_ref) <= TOL[dtype]
    assert rel_err(tau.grad, g_ref) <= TOL[dtype]


def test_mixed_dtypes_multiply_in_the_narrowest(backend):
    tau = torch.randn(33, 7, requires_grad=True)
    B, A = spd(33, torch.bfloat16), spd(7)
    q = kk.quadratic_form(tau, B, A)
    q.backward()
    q_ref, g_ref = definition(tau.bfloat16(), B, A.bfloat16())
    assert tau.grad.dtype == torch.float32
    assert rel_err(q, q_ref) <= TOL[torch.bfloat16]
    assert rel_err(tau.grad, g_ref) <= TOL[torch.bfloat16]


def test_tf32_precision(backend):
    torch.set_float32_matmul_precision("high")
    tau = torch.randn(130, 33)
    B, A = spd(130), spd(33)
    assert rel_err(kk.quadratic_form(tau, B, A), definition(tau, B, A)[0]) <= TOL["tf32"]


def test_float64_is_exact(backend):
    if backend != "torch":
        with pytest.raises(TypeError, match="float64"):
            kk.quadratic_form(torch.randn(3, 4, dtype=torch.float64), spd(3, torch.float64), spd(4, torch.float64))
        return
    tau = torch.randn(7, 33, dtype=torch.float64, requires_grad=True)
    B, A = spd(7, torch.float64), spd(33, torch.float64)
    q = kk.quadratic_form(tau, B, A)
    assert q.dtype == torch.float64
    assert rel_err(q, definition(tau, B, A)[0]) <= TOL[torch.float64]


def test_non_contiguous_and_transposed_inputs(backend):
    base = torch.randn(40, 70)
    tau = base[3:36, ::2].detach().requires_grad_()  # (33, 35), strided
    B = spd(33).T  # transposed view of a symmetric matrix
    A = torch.zeros(35, 70)
    A[:, ::2] = spd(35)
    A = A[:, ::2]  # (35, 35) with column stride 2
    q = kk.quadratic_form(tau, B, A)
    q.backward()
    q_ref, g_ref = definition(tau, B, A)
    assert rel_err(q, q_ref) <= TOL[torch.float32]
    assert rel_err(tau.grad, g_ref) <= TOL[torch.float32]


def test_many_layers_weighted(backend):
    shapes = [(7, 33), (33, 7), (1, 130), (130, 1), (5, 5)]
    taus = [torch.randn(s, requires_grad=True) for s in shapes]
    Bs, As = [spd(o) for o, _ in shapes], [spd(i) for _, i in shapes]
    w = torch.rand(len(shapes)).tolist()
    q = kk.quadratic_forms(taus, Bs, As, weights=w)
    q.backward()
    refs = [definition(t, B, A) for t, B, A in zip(taus, Bs, As)]
    assert rel_err(q, sum(wi * r[0] for wi, r in zip(w, refs))) <= TOL[torch.float32]
    for t, wi, (_, g) in zip(taus, w, refs):
        assert rel_err(t.grad, wi * g) <= TOL[torch.float32]


def test_only_some_taus_need_grad(backend):
    taus = [torch.randn(7, 5, requires_grad=True), torch.randn(6, 3)]
    Bs, As = [spd(7), spd(6)], [spd(5), spd(3)]
    kk.quadratic_forms(taus, Bs, As).backward()
    assert taus[1].grad is None
    assert rel_err(taus[0].grad, definition(taus[0], Bs[0], As[0])[1]) <= TOL[torch.float32]


def test_grouped_launches(use_backend, monkeypatch):
    """All layers of a model take one launch per stage, not one per layer."""
    pytest.importorskip("triton")
    use_backend("triton")
    from kfac_kernels.triton_kernels import grouped_matmul

    launches = []
    real = grouped_matmul._launch
    monkeypatch.setattr(grouped_matmul, "_launch", lambda group, device: launches.append(len(group)) or real(group, device))
    shapes = [(9, 7), (7, 9), (9, 7), (11, 3), (3, 11), (6, 6)] * 2
    taus = [torch.randn(s) for s in shapes]
    kk.quadratic_forms(taus, [spd(o) for o, _ in shapes], [spd(i) for _, i in shapes])
    assert launches == [len(shapes), len(shapes)]


def test_empty_and_no_grad(backend):
    tau = torch.randn(0, 5, requires_grad=True)
    q = kk.quadratic_form(tau, torch.zeros(0, 0), spd(5))
    q.backward()
    assert q.item() == 0.0 and tau.grad.shape == (0, 5)
    t, B, A = torch.randn(4, 3, requires_grad=True), spd(4), spd(3)
    with torch.no_grad():
        q = kk.quadratic_form(t, B, A)
    assert not q.requires_grad
    assert rel_err(q, definition(t, B, A)[0]) <= TOL[torch.float32]


def test_nan_propagates(backend):
    tau = torch.randn(7, 5)
    B = spd(7)
    B[2, 3] = B[3, 2] = float("nan")
    assert math.isnan(kk.quadratic_form(tau, B, spd(5)).item())
    tau[0, 0] = float("inf")
    assert not math.isfinite(kk.quadratic_form(tau, spd(7), spd(5)).item())
    assert math.isnan(kk.quadratic_form(torch.randn(7, 5), spd(7), kk.Int8Factor.from_dense(B[:5, :5])).item())


COMPRESSIONS = {
    "blockdiag": lambda F: kk.BlockDiagonalFactor.from_dense(F, 4),
    "lowrank": lambda F: kk.LowRankFactor.from_dense(F, rank=max(1, F.shape[0] // 3)),
    "int8": kk.Int8Factor.from_dense,
    "dense": lambda F: F,
    "diagonal": lambda F: F.diagonal().clone(),
}


@pytest.mark.parametrize("b_kind", list(COMPRESSIONS))
@pytest.mark.parametrize("a_kind", list(COMPRESSIONS))
def test_compressed_factors(backend, b_kind, a_kind):
    tau = torch.randn(33, 13, requires_grad=True)
    B, A = COMPRESSIONS[b_kind](spd(33)), COMPRESSIONS[a_kind](spd(13))
    q = kk.quadratic_form(tau, B, A)
    q.backward()
    q_ref, g_ref = definition(tau, B, A)  # the dense matrix the compressed factor stands for
    assert rel_err(q, q_ref) <= TOL[torch.float32]
    assert rel_err(tau.grad, g_ref) <= TOL[torch.float32]


@pytest.mark.parametrize("precision,dtype", [("highest", torch.bfloat16), ("medium", torch.float32)])
def test_int8_factor_in_bf16_products(backend, precision, dtype):
    """An int8 factor's tiles multiplied as bf16 (bf16 operands, or fp32 at 'medium'), against the dense
    matrix it stands for."""
    torch.set_float32_matmul_precision(precision)
    tau, B = torch.randn(33, 13).to(dtype), spd(33).to(dtype)
    A = kk.Int8Factor.from_dense(spd(13))
    assert rel_err(kk.quadratic_form(tau, B, A), definition(tau, B, A)[0]) <= TOL[torch.bfloat16]


def test_int8_factor_of_a_covariance_stays_positive_semidefinite():
    """A small-variance input correlated 0.98 with a large one (TAK F.6's per-row scales): its variance and the
    factor's smallest eigenvalue survive quantization, where scales of the rows' peaks make the factor indefinite."""
    g = torch.Generator().manual_seed(0)  # a CPU generator: CPU tensors, moved
    z, w = torch.randn(2, 4000, generator=g, dtype=torch.float64, device="cpu")
    X = torch.stack([60 * z, 0.98 * z + 0.2 * w, *torch.randn(5, 4000, generator=g, dtype=torch.float64, device="cpu")], 1)
    F = (X.T @ X / X.shape[0]).float().to(DEVICE)
    q8 = kk.Int8Factor.from_dense(F)
    assert torch.all(q8.q.diagonal() == 127) and q8.q.abs().max() <= 127
    assert rel_err(q8.to_dense().diagonal(), F.diagonal()) < 1e-6
    smallest = torch.linalg.eigvalsh(F.double())[0]
    assert torch.linalg.eigvalsh(q8.to_dense().double())[0] > 0.5 * smallest > 0
    tau = torch.randn(3, 7, generator=g, device="cpu").to(DEVICE)
    assert kk.quadratic_form(tau, torch.eye(3), q8) > 0


def test_compressed_factors_approximate_the_dense_ones():
    F = spd(130)
    assert torch.equal(kk.BlockDiagonalFactor.from_dense(F, 1).to_dense(), F)
    assert rel_err(kk.LowRankFactor.from_dense(F, rank=130).to_dense(), F) < 1e-5
    assert rel_err(kk.Int8Factor.from_dense(F).to_dense(), F) < 2e-2
    q8 = kk.Int8Factor.from_dense(F)
    assert torch.equal(q8.q, q8.q.T) and q8.q.abs().max() <= 127 and torch.equal(q8.to_dense(), q8.to_dense().T)
    bd = kk.BlockDiagonalFactor.from_dense(F, 8)
    assert bd.nbytes < F.nbytes / 4 and torch.equal(bd.to_dense(), bd.to_dense().T)


def test_compute_dtype_is_the_narrowest_operand_with_float16_as_float32_in_the_forms():
    """_precision.compute_dtype: bf16/fp16 if any operand has it, float64 only when all are, fp32 otherwise;
    float16_in_fp32 turns float16 (alone or with float32) into float32 but leaves bfloat16 as is."""
    from kfac_kernels._precision import compute_dtype
    h, b, f, d = torch.float16, torch.bfloat16, torch.float32, torch.float64
    cases = {(h, f): (h, f), (b, f): (b, b), (h, h): (h, f), (f, d): (f, f), (d, d): (d, d), (b, d): (b, b),
             (f, f): (f, f), (h, d): (h, f)}
    for (x, y), (plain, forms) in cases.items():
        assert compute_dtype("op", x=x, y=y) == plain, (x, y)
        assert compute_dtype("op", float16_in_fp32=True, x=x, y=y) == forms, (x, y)
    with pytest.raises(TypeError, match="cannot mix bfloat16 and float16"):
        compute_dtype("op", float16_in_fp32=True, x=h, y=b)


@pytest.mark.parametrize("n,k,blocks", [(7, 2, (2, 4)), (10, 3, (3, 4)), (9, 4, (3, 3)), (5, 5, (5, 1))])
def test_block_diagonal_from_dense_keeps_ceil_sized_diagonal_blocks(n, k, blocks):
    """BlockDiagonalFactor.from_dense(F, k): blocks of b = ⌈n / k⌉ rows (⌈n / b⌉ of them), F's entries inside, 0 outside."""
    F = spd(n, torch.float64)
    bd = kk.BlockDiagonalFactor.from_dense(F, k)
    count, b = blocks
    assert tuple(bd.blocks.shape) == (count, b, b) and bd.shape == (n, n)
    i = torch.arange(n, device=F.device)
    assert torch.equal(bd.to_dense(), torch.where(i[:, None] // b == i[None, :] // b, F, torch.zeros_like(F)))


@pytest.mark.parametrize("k,b,size", [(3, 2, 4), (2, 3, 7), (2, 3, 3), (1, 2, 0)])
def test_block_diagonal_factor_refuses_sizes_its_blocks_do_not_make(k, b, size):
    """BlockDiagonalFactor needs (k − 1)·b < size ≤ k·b: no block wholly padding, no rows beyond the blocks."""
    with pytest.raises(ValueError, match=rf"cannot make a {size} × {size} factor"):
        kk.BlockDiagonalFactor(torch.zeros(k, b, b), size)
    assert kk.BlockDiagonalFactor(torch.zeros(k, b, b), (k - 1) * b + 1).shape == ((k - 1) * b + 1,) * 2


def test_compressed_factors_refuse_tensors_with_extra_dimensions():
    """LowRankFactor / Int8Factor / BlockDiagonalFactor check the number of dimensions of each tensor, not a lower bound."""
    with pytest.raises(ValueError, match=r"eigenvalues must be 1-D, got shape \(2, 1\)"):
        kk.LowRankFactor(torch.randn(3, 2), torch.rand(2, 1))
    with pytest.raises(ValueError, match=r"scale must be 1-D, got shape \(3, 1\)"):
        kk.Int8Factor(torch.zeros(3, 3, dtype=torch.int8), torch.ones(3, 1))
    with pytest.raises(ValueError, match=r"blocks must be 3-D, got shape \(1, 2, 2, 2\)"):
        kk.BlockDiagonalFactor(torch.zeros(1, 2, 2, 2), 2)


@pytest.mark.parametrize("n,fraction,rank", [(7, 0.5, 4), (9, 0.3, 3), (11, 0.95, 10), (5, 0.05, 1)])
def test_low_rank_fraction_rounds_to_the_nearest_rank_and_keeps_the_top_eigenpairs(n, fraction, rank):
    """LowRankFactor.from_dense(fraction=f) keeps round(f · n) (at least 1) of the largest eigenpairs, in float64."""
    F = spd(n, torch.float64)
    low = kk.LowRankFactor.from_dense(F, fraction=fraction)
    assert low.rank == rank
    lam, U = torch.linalg.eigh(F)
    top = lam.flip(0)[:rank]
    assert torch.allclose(low.eigenvalues.double(), top, rtol=1e-6)
    reference = (U[:, -rank:] * lam[-rank:]) @ U[:, -rank:].T
    assert rel_err(low.to_dense(), reference) < 1e-6  # λ is kept in float32


@pytest.mark.parametrize("shape,ranks", [((1, 1), (1, 1)), ((7, 33), (7, 33)), ((33, 7), (5, 3)), ((130, 33), (17, 33))])
def test_eigen_quadratic_form(backend, shape, ranks):
    o, i = shape
    tau = torch.randn(shape, requires_grad=True)
    U_B = torch.linalg.qr(torch.randn(o, o))[0][:, : ranks[0]]
    U_A = torch.linalg.qr(torch.randn(i, i))[0][:, : ranks[1]]
    S = torch.rand(ranks)
    q = kk.eigen_quadratic_form(tau, U_B, U_A, S)
    q.backward()
    t64 = tau.detach().double().requires_grad_()
    M = U_B.double().T @ t64 @ U_A.double()
    ref = (S.double() * M**2).sum()
    ref.backward()
    assert rel_err(q, ref) <= TOL[torch.float32]
    assert rel_err(tau.grad, t64.grad) <= TOL[torch.float32]


def test_eigen_form_with_full_basis_equals_kfac_form(backend):
    """With S = λ_B λ_Aᵀ and full eigenbases, EK-FAC reduces to KFAC: Σ S ⊙ (U_Bᵀ τ U_A)² = vec τᵀ (B⊗A) vec τ."""
    B, A, tau = spd(7), spd(33), torch.randn(7, 33)
    lb, UB = torch.linalg.eigh(B)
    la, UA = torch.linalg.eigh(A)
    q = kk.eigen_quadratic_form(tau, UB, UA, lb[:, None] * la[None, :])
    assert rel_err(q, definition(tau, B, A)[0]) <= 1e-4


def test_diagonal_factors_and_identity_bases_beside_grouped_layers(backend):
    """Layers with a diagonal factor (1-D) or the identity eigenbasis (None) are computed apart from the grouped
    call of the others; sums, gradients and second derivatives are the float64 definitions'."""
    shapes = [(7, 33), (5, 9), (4, 6)]
    taus = [torch.randn(s, requires_grad=True) for s in shapes]
    Bs = [spd(7), spd(5), torch.rand(4)]
    As = [torch.rand(33) * (torch.rand(33) < 0.5), spd(9), torch.rand(6)]  # columns of a zero skipped, as unseen tokens
    w = [0.5, 2.0, 1.5]
    U_Bs = [torch.linalg.qr(torch.randn(o, o))[0] for o, _ in shapes]
    U_As = [None, torch.linalg.qr(torch.randn(9, 9))[0][:, :4], None]
    Ss = [torch.rand(7, 33), torch.rand(5, 4), torch.rand(4, 6)]

    def kfac64(ts):
        return sum(wi * (t * (dense(B) @ t @ dense(A))).sum() for wi, t, B, A in zip(w, ts, Bs, As))

    def eigen64(ts):
        return sum(wi * (S.double() * (U_B.double().T @ t @ (torch.eye(t.shape[1], dtype=t.dtype) if U_A is None
                                                             else U_A.double())) ** 2).sum()
                   for wi, t, U_B, U_A, S in zip(w, ts, U_Bs, U_As, Ss))
    vs = [torch.randn(s) for s in shapes]
    t64, v64 = [t.detach().double() for t in taus], [v.double() for v in vs]
    for form, form64 in [(lambda ts: kk.quadratic_forms(ts, Bs, As, weights=w), kfac64),
                         (lambda ts: kk.eigen_quadratic_forms(ts, U_Bs, U_As, Ss, weights=w), eigen64)]:
        q = form(taus)
        grads = torch.autograd.grad(q, taus, create_graph=True)
        hvps = torch.autograd.grad(sum((g * v).sum() for g, v in zip(grads, vs)), taus)
        g_ref, hvp_ref = torch.func.jvp(torch.func.grad(form64), (t64,), (v64,))
        assert q.dtype == torch.float32 and rel_err(q, form64(t64)) <= TOL[torch.float32]
        for g, h, gr, hr in zip(grads, hvps, g_ref, hvp_ref):
            assert rel_err(g, gr) <= TOL[torch.float32] and rel_err(h, hr) <= TOL[torch.float32]
    tau64 = t64[0].requires_grad_()  # float64 throughout: a float64 result
    q = kk.quadratic_form(tau64, Bs[0].double(), As[0].double())
    assert q.dtype == torch.float64 and rel_err(q, (tau64 * (dense(Bs[0]) @ tau64 * As[0].double())).sum()) < 1e-12
    with pytest.raises(ValueError, match=r"tau of shape \(7, 33\) needs B of size 7 and A of size 33, got B \(7, 7\) "
                                         r"and A \(32,\)"):
        kk.quadratic_form(taus[0], Bs[0], torch.rand(32))
    with pytest.raises(ValueError, match=r"U_A None and S \(7, 32\) do not fit"):
        kk.eigen_quadratic_form(taus[0], U_Bs[0], None, torch.rand(7, 32))


def test_eigen_forms_many_layers(backend):
    shapes = [(7, 5), (4, 9), (1, 1)]
    taus = [torch.randn(s, requires_grad=True) for s in shapes]
    UBs = [torch.linalg.qr(torch.randn(o, o))[0] for o, _ in shapes]
    UAs = [torch.linalg.qr(torch.randn(i, i))[0] for _, i in shapes]
    Ss = [torch.rand(s) for s in shapes]
    q = kk.eigen_quadratic_forms(taus, UBs, UAs, Ss, weights=[1.0, 0.5, 2.0])
    ref = sum(w * (S.double() * (UB.double().T @ t.detach().double() @ UA.double()) ** 2).sum()
              for w, t, UB, UA, S in zip([1.0, 0.5, 2.0], taus, UBs, UAs, Ss))
    assert rel_err(q, ref) <= TOL[torch.float32]


def test_strided_eigenvalues_and_scales(backend):
    """A low-rank factor's eigenvalues and an int8 factor's scales as strided views (λ = diagonal of Uᵀ F U)."""
    F = spd(13)
    U = torch.linalg.eigh(F)[1][:, -4:].contiguous()
    lowrank = kk.LowRankFactor(U, (U.T @ F @ U).diagonal())
    i8 = kk.Int8Factor.from_dense(F)
    i8 = kk.Int8Factor(i8.q, torch.stack([i8.scale, torch.full_like(i8.scale, 1e3)], 1)[:, 0])
    assert not lowrank.eigenvalues.is_contiguous() and not i8.scale.is_contiguous()
    for A in (lowrank, i8):
        tau = torch.randn(5, 13, requires_grad=True)
        B = spd(5)
        q = kk.quadratic_form(tau, B, A)
        q.backward()
        q_ref, g_ref = definition(tau, B, A)
        assert rel_err(q, q_ref) <= TOL[torch.float32]
        assert rel_err(tau.grad, g_ref) <= TOL[torch.float32]
        tau = torch.randn(13, 5, requires_grad=True)  # the factor as B
        q = kk.quadratic_form(tau, A, B)
        assert rel_err(q, definition(tau, A, B)[0]) <= TOL[torch.float32]


@pytest.mark.parametrize("kind", ["dense", "lowrank", "int8"])
def test_float16_tau_never_rounds_float32_factors(backend, kind):
    """fp16 τ with fp32 factors beyond fp16's range (A ~ x² of an outlier feature) multiplies in fp32."""
    X = torch.randn(64, 8, dtype=torch.float64)
    X[:, 0] *= 400.0
    A = (X.T @ X / 64).float()
    assert A.max() > 65504
    A = {"dense": lambda F: F, "lowrank": lambda F: kk.LowRankFactor.from_dense(F, rank=8),
         "int8": kk.Int8Factor.from_dense}[kind](A)
    tau = (1e-3 * torch.randn(6, 8)).half().requires_grad_()
    B = spd(6)
    q = kk.quadratic_form(tau, B, A)
    q.backward()
    q_ref, g_ref = definition(tau, B, A)
    assert q.dtype == torch.float32 and tau.grad.dtype == torch.float16
    assert rel_err(q, q_ref) <= TOL[torch.float32]
    assert rel_err(tau.grad, g_ref) <= TOL[torch.float16]


@pytest.mark.parametrize("kind", ["dense", "lowrank"])
def test_float16_layers_whose_products_leave_float16s_range(backend, kind):
    """All-fp16 operands within float16's range whose products are not: τ A ~ 1e5 (dense A with entries ~ 2000,
    or a low-rank A of eigenvalue 2e5): the forms multiply float16 as float32, so q and ∇q are finite and right."""
    A = 1500.0 + 500.0 * torch.rand(40, 40, dtype=torch.float64)
    A = (A + A.T) / 2 if kind == "dense" else kk.LowRankFactor.from_dense(torch.ones(40, 40, dtype=torch.float64) * 5e3, rank=1)
    A = A.half() if kind == "dense" else kk.LowRankFactor(A.U.half(), A.eigenvalues)
    tau = (1 + torch.rand(6, 40)).half().requires_grad_()
    B = (1e-4 * torch.eye(6)).half()
    q = kk.quadratic_form(tau, B, A)
    q.backward()
    q_ref, g_ref = definition(tau, B, A)
    assert (tau.detach().double() @ dense(A)).max() > 65504 and (kind == "dense" or A.eigenvalues.max() > 65504)
    assert rel_err(q, q_ref) <= TOL[torch.float16] and rel_err(tau.grad, g_ref) <= TOL[torch.float16]


def test_float16_eigen_form_whose_gradient_factor_leaves_float16s_range(backend):
    """G = 2 S ⊙ M beyond float16's range in one entry, the gradient U_B G U_Aᵀ within it (bases whose first
    vectors are flat spread that entry over the gradient): finite and right."""
    def basis(n):
        X = torch.randn(n, n, dtype=torch.float64)
        X[:, 0] = 1.0
        return torch.linalg.qr(X)[0]  # first column ±1/√n
    U_B, U_A = basis(5), basis(9)
    t = 0.01 * torch.randn(5, 9, dtype=torch.float64) + 0.1 * U_B[:, :1] @ U_A[:, :1].T
    tau = t.half().requires_grad_()
    M = U_B.T @ tau.detach().double() @ U_A
    S = torch.ones(5, 9, dtype=torch.float64)
    S[0, 0] = 6e4 / M[0, 0].abs()
    kk.eigen_quadratic_form(tau, U_B.half(), U_A.half(), S.float()).backward()
    G = 2 * S * M
    assert G.abs().max() > 65504 and (U_B @ G @ U_A.T).abs().max() < 3e4
    assert rel_err(tau.grad, U_B @ G @ U_A.T) <= TOL[torch.float16]


def test_an_infinite_entry_gives_an_infinite_form_not_nan(backend):
    """τ, B, A positive and A[0, 0] = Inf: every term of q is positive, so q = Inf (tile padding must add nothing)."""
    tau, B, A = torch.rand(7, 5) + 0.1, spd(7).abs() + 0.1, spd(5).abs() + 0.1
    A[0, 0] = float("inf")
    assert kk.quadratic_form(tau, B, A).item() == float("inf")


def test_each_layer_in_its_own_half_dtype(backend):
    """Layers are multiplied independently: a float16 layer next to a bfloat16 one is fine; the mix within
    one layer is refused, naming that layer's arguments."""
    taus = [torch.randn(7, 5).half().requires_grad_(), torch.randn(4, 9).bfloat16().requires_grad_()]
    Bs, As = [spd(7, torch.float16), spd(4, torch.bfloat16)], [spd(5, torch.float16), spd(9, torch.bfloat16)]
    q = kk.quadratic_forms(taus, Bs, As, weights=[0.5, 2.0])
    q.backward()
    refs = [definition(t, B, A) for t, B, A in zip(taus, Bs, As)]
    assert rel_err(q, 0.5 * refs[0][0] + 2.0 * refs[1][0]) <= TOL[torch.bfloat16]
    assert taus[0].grad.dtype == torch.float16 and taus[1].grad.dtype == torch.bfloat16
    assert rel_err(taus[0].grad, 0.5 * refs[0][1]) <= TOL[torch.float16]
    assert rel_err(taus[1].grad, 2.0 * refs[1][1]) <= TOL[torch.bfloat16]
    with pytest.raises(TypeError, match=r"^quadratic_forms: cannot mix bfloat16 and float16 operands "
                                        r"\(tau\[1\]=torch.float16, B\[1\]=torch.bfloat16, A\[1\]=torch.float32\)"):
        kk.quadratic_forms([taus[0], taus[0].detach()[:4, :4]], [Bs[0], Bs[1][:4, :4]], [As[0], spd(4)])


def test_block_diagonal_padding_is_never_read(backend):
    """NaN in the unused padding of the last block (7 = 3 + 3 + 1 of b = 3) does not reach q or its gradient."""
    F = spd(7)
    clean = kk.BlockDiagonalFactor.from_dense(F, 3)
    blocks = clean.blocks.clone()
    blocks[-1, 1:, :] = float("nan")
    blocks[-1, :, 1:] = float("nan")
    padded = kk.BlockDiagonalFactor(blocks, 7)
    for tau, B, A in [(torch.randn(4, 7), spd(4), padded), (torch.randn(7, 4), padded, spd(4))]:
        tau.requires_grad_()
        q = kk.quadratic_form(tau, B, A)
        q.backward()
        q_ref, g_ref = definition(tau, *((B, clean) if A is padded else (clean, A)))
        assert rel_err(q, q_ref) <= TOL[torch.float32]
        assert rel_err(tau.grad, g_ref) <= TOL[torch.float32]


def test_second_derivatives(backend):
    """create_graph=True gives a gradient that autograd differentiates again: Hessian-vector products of the
    forms match torch.func (forward-over-reverse) of the float64 definitions."""
    shapes = [(7, 5), (4, 9)]
    taus = [torch.randn(s, requires_grad=True) for s in shapes]
    vs = [torch.randn(s) for s in shapes]
    Bs = [spd(7), kk.BlockDiagonalFactor.from_dense(spd(4), 2)]
    As = [kk.LowRankFactor.from_dense(spd(5), rank=3), spd(9)]
    U_B, U_A, S = torch.linalg.qr(torch.randn(7, 7))[0], torch.linalg.qr(torch.randn(5, 5))[0][:, :3], torch.rand(7, 3)
    w = [0.5, 2.0]

    def forms(kfac, eigen):
        return lambda ts: kfac(ts, Bs, As, w) + eigen(ts[0], U_B, U_A, S)

    def kfac64(ts, Bs, As, w):
        return sum(wi * (t * (dense(B) @ t @ dense(A))).sum() for wi, t, B, A in zip(w, ts, Bs, As))

    def eigen64(t, U_B, U_A, S):
        return (S.double() * (U_B.double().T @ t @ U_A.double()) ** 2).sum()

    grads = torch.autograd.grad(forms(kk.quadratic_forms, kk.eigen_quadratic_form)(taus), taus, create_graph=True)
    hvps = torch.autograd.grad(sum((g * v).sum() for g, v in zip(grads, vs)), taus)
    t64, v64 = [t.detach().double() for t in taus], [v.double() for v in vs]
    g_ref, hvp_ref = torch.func.jvp(torch.func.grad(forms(kfac64, eigen64)), (t64,), (v64,))
    for g, h, gr, hr in zip(grads, hvps, g_ref, hvp_ref):
        assert rel_err(g, gr) <= TOL[torch.float32]
        assert rel_err(h, hr) <= TOL[torch.float32]
    column, G = taus[1].reshape(-1, 1), spd(36)  # a view of a leaf (an exact block's column): kept
    g, = torch.autograd.grad(kk.quadratic_form(column, G, torch.ones(1, 1)), taus[1], create_graph=True)
    h, = torch.autograd.grad((g * vs[1]).sum(), taus[1])
    assert rel_err(h, (2 * G.double() @ vs[1].double().reshape(-1, 1)).reshape(4, 9)) <= TOL[torch.float32]
    computed = taus[0] * 1.0  # not a leaf: not kept by the forward (no copy held until the backward)
    with pytest.raises(RuntimeError, match="second derivatives .* need every τ to be a leaf tensor"):
        torch.autograd.grad(kk.quadratic_form(computed, Bs[0], As[0]), taus[0], create_graph=True)
    first, = torch.autograd.grad(kk.quadratic_form(computed, Bs[0], As[0]), taus[0])  # first order: as before
    assert rel_err(first, 2 * dense(Bs[0]) @ taus[0].detach().double() @ dense(As[0])) <= TOL[torch.float32]


def test_second_derivatives_of_a_scaled_weighted_sum(backend):
    """Under create_graph the backward multiplies by the incoming gradient (2.5) and by each layer's weight, for
    both forms over two weighted layers: gradients and Hessian-vector products vs torch.func of float64."""
    torch.manual_seed(7)
    shapes, w = [(7, 5), (4, 9)], [0.5, 2.0]
    taus = [torch.randn(s, requires_grad=True) for s in shapes]
    vs = [torch.randn(s) for s in shapes]
    Bs, As = [spd(7), spd(4)], [spd(5), spd(9)]
    U_Bs = [torch.linalg.qr(torch.randn(o, o))[0][:, :r] for (o, _), r in zip(shapes, (6, 3))]
    U_As = [torch.linalg.qr(torch.randn(i, i))[0][:, :r] for (_, i), r in zip(shapes, (3, 9))]
    Ss = [torch.rand(U_B.shape[1], U_A.shape[1]) for U_B, U_A in zip(U_Bs, U_As)]

    def kfac64(ts):
        return 2.5 * sum(wi * (t * (B.double() @ t @ A.double())).sum() for wi, t, B, A in zip(w, ts, Bs, As))

    def eigen64(ts):
        return 2.5 * sum(wi * (S.double() * (U_B.double().T @ t @ U_A.double()) ** 2).sum()
                         for wi, t, U_B, U_A, S in zip(w, ts, U_Bs, U_As, Ss))

    for q, f64 in ((kk.quadratic_forms(taus, Bs, As, weights=w), kfac64),
                   (kk.eigen_quadratic_forms(taus, U_Bs, U_As, Ss, weights=w), eigen64)):
        grads = torch.autograd.grad(2.5 * q, taus, create_graph=True)
        hvps = torch.autograd.grad(sum((g * v).sum() for g, v in zip(grads, vs)), taus)
        g_ref, hvp_ref = torch.func.jvp(torch.func.grad(f64), ([t.detach().double() for t in taus],),
                                        ([v.double() for v in vs],))
        for g, h, gr, hr in zip(grads, hvps, g_ref, hvp_ref):
            assert rel_err(g, gr) <= TOL[torch.float32] and rel_err(h, hr) <= TOL[torch.float32]


def test_weight_tensors_requiring_grad_are_refused(backend):
    """A weight given as a tensor that requires grad would silently get no gradient: refused, by its index."""
    layers = ([torch.randn(2, 3)] * 2, [spd(2)] * 2, [spd(3)] * 2)
    with pytest.raises(ValueError, match=r"^quadratic_forms: .*weights\[1\] is a tensor that requires grad"):
        kk.quadratic_forms(*layers, weights=[1.0, torch.tensor(0.5, requires_grad=True)])
    q = kk.quadratic_forms(*layers, weights=[torch.tensor(2.0), 0.5])  # constant 0-d tensors are numbers
    assert rel_err(q, 2.5 * definition(layers[0][0], layers[1][0], layers[2][0])[0]) <= TOL[torch.float32]


def test_autocast_does_not_lower_the_precision(backend):
    """Under torch.autocast the forms still multiply fp32 inputs in fp32 (autocast would use bf16)."""
    tau, B, A = torch.randn(5, 7), spd(5), spd(7)
    U_B, U_A, S = torch.linalg.qr(torch.randn(5, 5))[0], torch.linalg.qr(torch.randn(7, 7))[0], torch.rand(5, 7)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        q = kk.quadratic_form(tau, B, A)
        e = kk.eigen_quadratic_form(tau, U_B, U_A, S)
    assert q.dtype == e.dtype == torch.float32
    assert rel_err(q, definition(tau, B, A)[0]) <= TOL[torch.float32]
    assert rel_err(e, (S.double() * (U_B.double().T @ tau.double() @ U_A.double()) ** 2).sum()) <= TOL[torch.float32]


@pytest.mark.parametrize("args,match", [
    (lambda: (torch.randn(3, 4), spd(4), spd(4)), r"tau of shape \(3, 4\) needs B of size 3"),
    (lambda: (torch.randn(3, 4), spd(3), torch.randn(4, 5)), r"A must be a square matrix, got shape \(4, 5\)"),
    (lambda: (torch.randn(3), spd(3), spd(3)), r"tau must be 2-D, got shape \(3,\)"),
    (lambda: (torch.ones(3, 4, dtype=torch.int64), spd(3), spd(4)), r"tau must have dtype"),
    (lambda: ([[1.0]], spd(1), spd(1)), r"tau must be a torch.Tensor, got list"),
    (lambda: (torch.randn(3, 4), spd(3).requires_grad_(), spd(4)), r"B requires grad"),
    (lambda: (torch.randn(3, 4), spd(3).to(torch.float16), spd(4).bfloat16()),
     r"cannot mix bfloat16 and float16 operands \(tau=torch.float32, B=torch.float16, A=torch.bfloat16\)"),
    (lambda: (torch.randn(3, 4), spd(3).to("meta"), spd(4)), r"one device, got tau on (cpu|cuda:0), B on meta, A on (cpu|cuda:0)"),
    (lambda: (torch.randn(3, 4), kk.LowRankFactor(torch.randn(3, 2), torch.rand(3)), spd(4)), r"needs 2 eigenvalues"),
    (lambda: (torch.randn(3, 4), kk.LowRankFactor.from_dense(spd(3), rank=2), kk.BlockDiagonalFactor(
        torch.randn(2, 2, 2, requires_grad=True), 4)), r"A requires grad"),
])
def test_bad_input(backend, args, match):
    with pytest.raises((ValueError, TypeError), match=match) as e:
        kk.quadratic_form(*args())
    assert str(e.value).startswith(("quadratic_form: ", "LowRankFactor: "))  # the op, or the factor built


def test_bad_lists():
    with pytest.raises(ValueError, match="lengths"):
        kk.quadratic_forms([torch.randn(2, 2)], [spd(2)], [])
    with pytest.raises(ValueError, match="at least one layer"):
        kk.quadratic_forms([], [], [])
    with pytest.raises(ValueError, match=r"weights has 1 entries for 2 layers"):
        kk.quadratic_forms([torch.randn(2, 2)] * 2, [spd(2)] * 2, [spd(2)] * 2, weights=[1.0])
    with pytest.raises(ValueError, match=r"tau\[1\] of shape \(2, 3\) needs B\[1\] of size 2"):
        kk.quadratic_forms([torch.randn(2, 2), torch.randn(2, 3)], [spd(2)] * 2, [spd(2)] * 2)
    with pytest.raises(ValueError, match=r"^eigen_quadratic_form: .*S \(5, 5\) do not fit"):
        kk.eigen_quadratic_form(torch.randn(3, 4), torch.eye(3), torch.eye(4), torch.rand(5, 5))
    for taus in ({"w": torch.randn(2, 2)}, (t for t in [torch.randn(2, 2)]), torch.randn(1, 2, 2)):
        with pytest.raises(TypeError, match=rf"quadratic_forms: taus must be a list or tuple with one tensor per layer, "
                                            rf"got {type(taus).__name__}"):
            kk.quadratic_forms(taus, [spd(2)], [spd(2)])
    layers = ([torch.randn(2, 2)] * 2, [spd(2)] * 2, [spd(2)] * 2)
    with pytest.raises(TypeError, match="weights must be a sequence of numbers, one per layer, got float"):
        kk.quadratic_forms(*layers, weights=2.0)
    for bad in (torch.tensor(2.0), torch.ones(2, requires_grad=True)):
        with pytest.raises(ValueError, match="weights must be constants, one per layer"):
            kk.quadratic_forms(*layers, weights=bad)
    for F, args, match in [(torch.zeros(0, 0), {"k": 1}, "F is empty"), (spd(4), {"rank": None, "fraction": -3.0},
                                                                        r"fraction must be in \(0, 1\]")]:
        factor = kk.BlockDiagonalFactor if "k" in args else kk.LowRankFactor
        with pytest.raises(ValueError, match=match):
            factor.from_dense(F, **args)
    with pytest.raises(ValueError, match="F is empty"):
        kk.Int8Factor.from_dense(torch.zeros(0, 0))
    with pytest.raises(ValueError, match=r"blocks of shape \(0, 3, 3\) cannot make a 0 × 0 factor \(need k ≥ 1"):
        kk.BlockDiagonalFactor(torch.zeros(0, 3, 3), 0)


def test_eigen_form_with_float64_eigenvalues(use_backend):
    """S in float64 with fp32 τ and bases: the automatic choice runs the PyTorch backend (as for any
    float64 input); a forced kernel backend refuses it by dtype."""
    tau, U_B, U_A = torch.randn(5, 3), torch.linalg.qr(torch.randn(5, 5))[0], torch.linalg.qr(torch.randn(3, 3))[0]
    S = torch.rand(5, 3, dtype=torch.float64)
    want = (S * (U_B.double().T @ tau.double() @ U_A.double()) ** 2).sum()
    assert rel_err(kk.eigen_quadratic_form(tau, U_B, U_A, S), want) <= TOL[torch.float32]
    for name in KERNEL_BACKENDS:
        use_backend(name)
        with pytest.raises(TypeError, match="float16/bfloat16/float32 tensors, got .*float64"):
            kk.eigen_quadratic_form(tau, U_B, U_A, S)


def test_bad_backend_name(monkeypatch):
    monkeypatch.setenv("KFAC_KERNELS_BACKEND", "cudnn")
    with pytest.raises(ValueError, match="KFAC_KERNELS_BACKEND='cudnn'"):
        kk.quadratic_form(torch.randn(2, 2), spd(2), spd(2))


_PTX_PROBE = """
import sys, triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from kfac_kernels.triton_kernels import grouped_matmul as gm
consts = dict(X_DTYPE=tl.bfloat16, F_DTYPE=tl.bfloat16, Y_DTYPE=tl.bfloat16, T_DTYPE=tl.float32,
              X_LAYOUT=int(sys.argv[1]), F_LAYOUT=int(sys.argv[1]), Y_LAYOUT=int(sys.argv[1]), T_LAYOUT=int(sys.argv[1]),
              NFIELDS=gm.NFIELDS, HAS_KSCALE=False, HAS_NSCALE=False, WRITE_Y=True, TIMES_T=False, REDUCE="dot",
              DOT="bf16", BLOCK_M=128, BLOCK_N=128, BLOCK_K=64)
sig = {"table": "*i64", "tile_job": "*i32", "tile_first": "*i32", "scales": "*fp32", "partials": "*fp32"}
src = ASTSource(fn=gm._grouped_matmul_kernel, signature={**sig, **dict.fromkeys(consts, "constexpr")}, constexprs=consts)
print(triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=8, num_stages=3)).asm["ptx"])
"""


def test_aligned_layouts_compile_to_vector_copies():
    """Aligned, unit-stride operands are specialized so the sm_90 code uses 16-byte asynchronous copies
    and vector stores (PTX compiled offline in a process without the interpreter: no GPU needed)."""
    pytest.importorskip("triton")
    from kfac_kernels.triton_kernels import grouped_matmul as gm

    assert gm.layout(torch.empty(64, 48)) == 1 and gm.layout(torch.empty(48, 64).T) == 2
    assert gm.layout(torch.empty(64, 47)) == 0 and gm.layout(torch.empty(64, 48)[:, 1:17]) == 0

    def ptx(layout):
        env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
        return subprocess.run([sys.executable, "-c", _PTX_PROBE, str(layout)], env=env, check=True,
                              capture_output=True, text=True).stdout

    aligned, general = ptx(1), ptx(0)
    assert "cp.async" in aligned and "st.global.v4" in aligned
    assert "cp.async" not in general  # any-stride operands: element-wise loads, the case the layouts avoid


@pytest.mark.gpu
@pytest.mark.parametrize("precision,dtype,tol", [("highest", torch.float32, TOL[torch.float32]),
                                                  ("high", torch.float32, TOL["tf32"]),
                                                  ("highest", torch.bfloat16, TOL[torch.bfloat16])])
def test_gpu_vit_layer_shapes(precision, dtype, tol):
    """The Triton kernels on a GPU at real layer shapes, all four ViT-B linear shapes in one call."""
    torch.set_float32_matmul_precision(precision)
    shapes = [(2304, 768), (768, 768), (3072, 768), (768, 3072)]
    taus = [(0.01 * torch.randn(s, device="cuda")).to(dtype).requires_grad_() for s in shapes]
    Bs = [spd(o).to(dtype).cuda() for o, _ in shapes]
    As = [spd(i).to(dtype).cuda() for _, i in shapes]
    q = kk.quadratic_forms(taus, Bs, As)
    q.backward()
    refs = [definition(t.cpu(), B.cpu(), A.cpu()) for t, B, A in zip(taus, Bs, As)]
    assert rel_err(q, sum(r[0] for r in refs)) <= tol
    for t, (_, g) in zip(taus, refs):
        assert rel_err(t.grad, g) <= tol
