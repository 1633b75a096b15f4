"""covariance_update_: C += scale · X̃ᵀX̃ against a float64 sum over the kept rows, on every backend."""
import zlib

import pytest
import torch

from kfac_kernels import _backend
from kfac_kernels.covariance import covariance_update_
from tests.conftest import DEVICE, KERNEL_BACKENDS
from tests.util import TOL, rel_err

needs_triton = pytest.mark.skipif(not KERNEL_BACKENDS, reason="needs Triton")


@pytest.fixture
def gen(request):
    """A generator seeded differently for each test (reproducibly, from its id)."""
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))


def reference(C0, X, mask=None, append_ones=False, scale=1.0):
    """C0 + scale · Σ_n x̃_n x̃_nᵀ over the kept rows, in float64."""
    rows = X.reshape(-1, X.shape[-1]).double().cpu()
    if mask is not None:
        rows = rows[mask.reshape(-1).cpu()]
    if append_ones:
        rows = torch.cat([rows, rows.new_ones(rows.shape[0], 1)], dim=1)
    return C0.double().cpu() + scale * torch.einsum("ni,nj->ij", rows, rows)


def sym(n, gen, dtype=torch.float32):
    S = torch.randn(n, n, generator=gen, dtype=torch.float64)
    return (S + S.T).to(dtype).to(DEVICE)


def randn(*shape, gen, dtype=torch.float32):
    return torch.randn(*shape, generator=gen).to(dtype).to(DEVICE)


def ragged_mask(shape, gen):
    """1-D: random rows; (..., T): each sequence keeps a random prefix of 0..T tokens."""
    if len(shape) == 1:
        return (torch.rand(shape, generator=gen) < 0.6).to(DEVICE)
    lengths = torch.randint(0, shape[-1] + 1, shape[:-1], generator=gen)
    return (torch.arange(shape[-1]) < lengths[..., None]).to(DEVICE)


CASES = [  # shape of X, dtype, append_ones, masked, scale
    ((1, 1), torch.float32, False, False, 1.0),
    ((100, 7), torch.float32, False, False, -2.0),
    ((7, 33), torch.bfloat16, True, True, 1.0),
    ((3, 5, 33), torch.bfloat16, False, True, 0.5),
    ((100, 130), torch.float16, True, True, 0.25),
    ((2, 50, 18), torch.float32, True, False, 3),
    ((3, 5, 32), torch.float16, True, True, 1.0),  # D = 2 interpreter tiles: a ones-only tile row
]


@pytest.mark.parametrize("shape,dtype,append_ones,masked,scale", CASES)
def test_matches_reference(backend, gen, shape, dtype, append_ones, masked, scale):
    X = randn(*shape, gen=gen, dtype=dtype)
    mask = ragged_mask(shape[:-1], gen) if masked else None
    C0 = sym(shape[-1] + append_ones, gen)
    C = C0.clone()
    out = covariance_update_(C, X, scale=scale, mask=mask, append_ones=append_ones)
    assert out is C
    assert rel_err(C, reference(C0, X, mask, append_ones, scale)) <= 1e-5
    assert torch.equal(C, C.T)


@pytest.mark.parametrize("layout", ["transposed", "sliced", "permuted", "broadcast"])
def test_non_contiguous(backend, gen, layout):
    N, D = 40, 21
    X = {
        "transposed": lambda: randn(D, N, gen=gen, dtype=torch.bfloat16).T,
        "sliced": lambda: randn(N, 2 * D + 1, gen=gen)[:, 1::2],
        "permuted": lambda: randn(5, D, 8, gen=gen, dtype=torch.float16).permute(2, 0, 1),
        "broadcast": lambda: randn(1, D, gen=gen).expand(N, D),
    }[layout]()
    assert not X.is_contiguous()
    mask = ragged_mask(X.shape[:-1], gen)
    C0 = sym(D + 1, gen)
    C = covariance_update_(C0.clone(), X, mask=mask, append_ones=True)
    assert rel_err(C, reference(C0, X, mask, True)) <= 1e-5
    assert torch.equal(C, C.T)


def test_autocast_keeps_fp32_accumulation(backend, gen):
    """Under torch.autocast (bf16) fp32 rows still multiply in fp32 (autocast would round X to bf16 for XᵀX)."""
    X = randn(5, 13, 9, gen=gen) * 10 + 3
    mask = ragged_mask((5, 13), gen)
    C = torch.zeros(10, 10, device=DEVICE)
    with torch.autocast(torch.device(DEVICE).type, dtype=torch.bfloat16):
        covariance_update_(C, X, mask=mask, append_ones=True, scale=0.5)
    assert C.dtype == torch.float32 and torch.equal(C, C.T)
    assert rel_err(C, reference(torch.zeros(10, 10), X, mask, True, 0.5)) <= 1e-5


def test_repeated_updates_stay_symmetric(backend, gen):
    C = torch.zeros(34, 34, device=DEVICE)
    expected = C.double().cpu()
    for n in (1, 17, 64):
        X = randn(n, 33, gen=gen, dtype=torch.bfloat16)
        covariance_update_(C, X, scale=1 / n, append_ones=True)
        expected = reference(expected, X, append_ones=True, scale=1 / n)
        assert torch.equal(C, C.T)
    assert rel_err(C, expected) <= 1e-5


@pytest.mark.parametrize("shape", [(0, 7), (3, 0, 7)])
def test_no_rows_is_noop(backend, gen, shape):
    C0 = sym(8, gen)
    C = covariance_update_(C0.clone(), randn(*shape, gen=gen), append_ones=True)
    assert torch.equal(C, C0)


def test_no_features_counts_kept_rows(backend, gen):
    mask = ragged_mask((6, 9), gen)
    C = covariance_update_(torch.ones(1, 1, device=DEVICE), randn(6, 9, 0, gen=gen), mask=mask, append_ones=True)
    assert C.item() == 1 + mask.sum().item()


def test_all_false_mask_is_noop(backend, gen):
    X = randn(4, 6, 9, gen=gen, dtype=torch.bfloat16)
    C0 = sym(10, gen)
    mask = torch.zeros(4, 6, dtype=torch.bool, device=DEVICE)
    C = covariance_update_(C0.clone(), X, mask=mask, append_ones=True, scale=2.0)
    assert torch.equal(C, C0)


def test_nan_propagates_only_from_kept_rows(backend, gen):
    X = randn(20, 9, gen=gen)
    X[3, 2] = float("nan")
    X[5, 4] = float("inf")
    mask = torch.ones(20, dtype=torch.bool, device=DEVICE)
    mask[5] = False
    C = covariance_update_(torch.zeros(10, 10, device=DEVICE), X, mask=mask, append_ones=True)
    nan = torch.zeros(10, 10, dtype=torch.bool)
    nan[2, :] = nan[:, 2] = True
    assert torch.equal(C.isnan().cpu(), nan)
    assert C[~nan].isfinite().all()


def test_float64_on_torch_backend(use_backend, gen):
    use_backend("torch")
    X = randn(30, 12, gen=gen, dtype=torch.float64)
    mask = ragged_mask((30,), gen)
    C0 = sym(12, gen, torch.float64)
    C = covariance_update_(C0.clone(), X, mask=mask, scale=0.1)
    assert rel_err(C, reference(C0, X, mask, scale=0.1)) <= 1e-12
    assert torch.equal(C, C.T)
    C = covariance_update_(C0.float(), X, mask=mask, scale=0.1)
    assert rel_err(C, reference(C0.float(), X, mask, scale=0.1)) <= 1e-6
    assert torch.equal(C, C.T)


@needs_triton
def test_triton_split_k_is_deterministic(use_backend, gen):
    """Partial tiles of 3 row splits, reduced in a fixed order: same bits twice, exact symmetry."""
    from kfac_kernels.triton_kernels.covariance import covariance_update_ as launch

    use_backend("triton")
    X = randn(300, 40, gen=gen, dtype=torch.float16)
    mask = ragged_mask((300,), gen)
    C0 = sym(41, gen)
    C1 = launch(C0.clone(), X, mask, True, 0.5, splits=3)
    C2 = launch(C0.clone(), X, mask, True, 0.5, splits=3)
    assert torch.equal(C1, C2)
    assert torch.equal(C1, C1.T)
    assert rel_err(C1, reference(C0, X, mask, True, 0.5)) <= 1e-5


@needs_triton
def test_triton_follows_medium_precision(use_backend, gen):
    """'medium' multiplies fp32 X in bf16: visibly off from IEEE, exact for bf16-rounded X."""
    use_backend("triton")
    torch.set_float32_matmul_precision("medium")
    X = randn(50, 20, gen=gen)
    C0 = torch.zeros(20, 20, device=DEVICE)
    C = covariance_update_(C0.clone(), X)
    assert 1e-4 < rel_err(C, reference(C0, X)) <= TOL[torch.bfloat16]
    if not _backend.interpreting():  # the interpreter truncates fp32 -> bf16 instead of rounding
        assert rel_err(C, reference(C0, X.bfloat16())) <= 1e-5


def test_errors(use_backend):
    use_backend("torch")
    X = torch.randn(4, 5, 7)
    C = torch.zeros(8, 8)
    with pytest.raises(ValueError, match=r"C must have shape \(7, 7\)"):
        covariance_update_(C, X)
    with pytest.raises(ValueError, match=r"C must have shape \(8, 8\).*append_ones"):
        covariance_update_(torch.zeros(7, 7), X, append_ones=True)
    with pytest.raises(ValueError, match="C must be 2-D"):
        covariance_update_(torch.zeros(64), X)
    with pytest.raises(TypeError, match="C must have dtype"):
        covariance_update_(C.half(), X, append_ones=True)
    with pytest.raises(ValueError, match="C must be contiguous"):
        covariance_update_(torch.zeros(8, 16)[:, ::2], X, append_ones=True)
    with pytest.raises(TypeError, match="X must be a torch.Tensor"):
        covariance_update_(C, X.numpy(), append_ones=True)
    with pytest.raises(ValueError, match="X must have at least 1 dimension"):
        covariance_update_(C, torch.tensor(1.0))
    with pytest.raises(TypeError, match="X must have dtype"):
        covariance_update_(C, X.int(), append_ones=True)
    with pytest.raises(ValueError, match=r"mask must have shape X.shape\[:-1\] = \(4, 5\), got \(20,\)"):
        covariance_update_(C, X, mask=torch.ones(20, dtype=torch.bool), append_ones=True)
    with pytest.raises(TypeError, match="mask must have dtype"):
        covariance_update_(C, X, mask=torch.ones(4, 5), append_ones=True)
    for scale in (torch.tensor(2.0), True):
        with pytest.raises(TypeError, match="scale must be a Python number"):
            covariance_update_(C, X, scale=scale, append_ones=True)
    with pytest.raises(ValueError, match="one device.*X on meta"):
        covariance_update_(C, X.to("meta"), append_ones=True)
    with pytest.raises(ValueError, match="C requires grad, but it is updated in place outside autograd"):
        covariance_update_(C.clone().requires_grad_(), X, append_ones=True)
    assert torch.equal(C, torch.zeros(8, 8))
    with torch.no_grad():  # as an optimizer's state: no autograd anyway
        covariance_update_(torch.zeros(8, 8, requires_grad=True), X, append_ones=True)


@needs_triton
def test_kernel_backends_refuse_float64(use_backend):
    use_backend("triton")
    with pytest.raises(TypeError, match="float16/bfloat16/float32"):
        covariance_update_(torch.zeros(3, 3, dtype=torch.float64, device=DEVICE), torch.randn(4, 3, device=DEVICE))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,precision,tol", [
    (torch.bfloat16, "highest", 1e-5), (torch.float16, "highest", 1e-5), (torch.float32, "highest", 1e-5),
    (torch.float32, "high", TOL["tf32"]), (torch.float32, "medium", 2e-2),
])
@pytest.mark.parametrize("shape", [(2, 333, 77), (4100, 300), (6000, 768),
                                   (40, 5900)])  # 1,128 tile pairs: over the workspace's 1,024, in batches
def test_cuda_matches_triton_and_reference(use_backend, gen, dtype, precision, tol, shape):
    torch.set_float32_matmul_precision(precision)
    X = randn(*shape, gen=gen, dtype=dtype)
    mask = ragged_mask(shape[:-1], gen)
    C0 = sym(shape[-1] + 1, gen)
    ref = reference(C0, X, mask, True, 0.5)
    results = {}
    for name in ("cuda", "triton"):
        use_backend(name)
        C = covariance_update_(C0.clone(), X, mask=mask, append_ones=True, scale=0.5)
        assert torch.equal(C, C.T), name
        assert rel_err(C, ref) <= tol, name
        results[name] = C
    assert rel_err(results["cuda"], results["triton"]) <= 2 * tol


@pytest.mark.gpu
def test_cuda_nan_mask_and_noop(use_backend, gen):
    use_backend("cuda")
    X = randn(300, 130, gen=gen, dtype=torch.bfloat16)
    X[7, 100] = float("nan")
    X[9, 3] = float("inf")
    mask = torch.ones(300, dtype=torch.bool, device="cuda")
    mask[9] = False
    C = covariance_update_(torch.zeros(131, 131, device="cuda"), X, mask=mask, append_ones=True)
    nan = torch.zeros(131, 131, dtype=torch.bool)
    nan[100, :] = nan[:, 100] = True
    assert torch.equal(C.isnan().cpu(), nan)
    C0 = sym(131, gen)
    C = covariance_update_(C0.clone(), X, mask=torch.zeros_like(mask), append_ones=True)
    assert torch.equal(C, C0)


@pytest.mark.gpu
def test_cuda_non_contiguous(use_backend, gen):
    use_backend("cuda")
    X = randn(300, 1000, gen=gen, dtype=torch.bfloat16).T[:, 1::2]
    mask = ragged_mask((1000,), gen)
    C0 = sym(151, gen)
    C = covariance_update_(C0.clone(), X, mask=mask, append_ones=True, scale=2.0)
    assert torch.equal(C, C.T)
    assert rel_err(C, reference(C0, X, mask, True, 2.0)) <= 1e-5


def test_a_failed_cuda_build_is_not_tried_again(monkeypatch):
    """Each try would cost a compile: the first failure is raised to every later caller."""
    from kfac_kernels import cuda_ext
    builds = []

    def failing_build():
        builds.append(1)
        raise RuntimeError("nvcc: error")
    monkeypatch.setattr(cuda_ext, "_OUTCOME", {})
    monkeypatch.setattr(cuda_ext, "_build", failing_build)
    for _ in range(3):
        with pytest.raises(RuntimeError, match="nvcc: error"):
            cuda_ext.load()
    assert builds == [1]
