"""squared_products_update_: S += scale · Σ_n (g_nᵀ a_n)² against a float64 per-example loop, on every backend."""
import zlib

import pytest
import torch

from kfac_kernels import _backend
from kfac_kernels.correction import squared_products_update_
from tests.conftest import DEVICE, KERNEL_BACKENDS
from tests.util import TOL, rel_err

needs_triton = pytest.mark.skipif(not KERNEL_BACKENDS, reason="needs Triton")


@pytest.fixture
def gen(request):
    """A generator seeded differently for each test (reproducibly, from its id)."""
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))


def randn(*shape, gen, dtype=torch.float32):
    return torch.randn(*shape, generator=gen).to(dtype).to(DEVICE)


def reference(S0, g, a, scale=1.0):
    """S0 + scale · Σ_n (g_nᵀ a_n)², one explicit float64 product per example (2-D: one row each)."""
    g, a = g.double().cpu(), a.double().cpu()
    if g.dim() == 2:
        g, a = g[:, None], a[:, None]
    S = S0.double().cpu().clone()
    for n in range(g.shape[0]):
        S += scale * (g[n].T @ a[n]) ** 2
    return S


CASES = [  # N, T, r_B, r_A: every N in (1, 3, 7), T in (1, 5, 33), r in (1, 7, 33, 130) on both sides
    (1, 1, 1, 1),
    (3, 5, 7, 33),
    (7, 33, 33, 7),
    (1, 33, 130, 1),
    (3, 1, 1, 130),
    (7, 5, 130, 33),
    (3, 33, 33, 130),
]


@pytest.mark.parametrize("N,T,r_B,r_A", CASES)
def test_matches_per_example_reference(backend, gen, N, T, r_B, r_A):
    g, a = randn(N, T, r_B, gen=gen), randn(N, T, r_A, gen=gen)
    S = torch.zeros(r_B, r_A, device=DEVICE)
    out = squared_products_update_(S, g, a)
    assert out is S and S.dtype == torch.float32
    assert rel_err(S, reference(torch.zeros(r_B, r_A), g, a)) <= TOL[torch.float32]


@pytest.mark.parametrize("dtype_g,dtype_a", [
    (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16), (torch.bfloat16, torch.float32),
    (torch.float32, torch.float16),
])
@pytest.mark.parametrize("shape", [(3, 33, 33, 7), (7, 5, 7, 130)])
def test_dtypes_multiply_in_the_narrowest(backend, gen, dtype_g, dtype_a, shape):
    """16-bit operands (the fp32 one rounded to the other's dtype): exact products, fp32 sums."""
    N, T, r_B, r_A = shape
    g, a = randn(N, T, r_B, gen=gen, dtype=dtype_g), randn(N, T, r_A, gen=gen, dtype=dtype_a)
    half = dtype_g if dtype_g != torch.float32 else dtype_a
    S = squared_products_update_(torch.zeros(r_B, r_A, device=DEVICE), g, a)
    if not (backend == "triton" and _backend.interpreting() and torch.float32 in (dtype_g, dtype_a)):
        # (the interpreter truncates fp32 -> bf16 instead of rounding)
        assert rel_err(S, reference(torch.zeros(r_B, r_A), g.to(half), a.to(half))) <= TOL[torch.float32]
    assert rel_err(S, reference(torch.zeros(r_B, r_A), g, a)) <= TOL[half]


@pytest.mark.parametrize("scale", [0.25, -3])
def test_scale_and_accumulation_into_nonzero_S(backend, gen, scale):
    g, a = randn(3, 33, 33, gen=gen, dtype=torch.bfloat16), randn(3, 33, 7, gen=gen, dtype=torch.bfloat16)
    S0 = randn(33, 7, gen=gen) * 100
    S = squared_products_update_(S0.clone(), g, a, scale=scale)
    assert rel_err(S, reference(S0, g, a, scale)) <= TOL[torch.float32]
    g2, a2 = randn(7, 5, 33, gen=gen), randn(7, 5, 7, gen=gen)
    squared_products_update_(S, g2, a2, scale=1)
    assert rel_err(S, reference(reference(S0, g, a, scale), g2, a2)) <= TOL[torch.float32]


def test_autocast_keeps_fp32_products(backend, gen):
    """Under torch.autocast (bf16) fp32 g and a still multiply in fp32, in the 3-D and the 2-D form."""
    g, a = randn(4, 7, 3, gen=gen) * 5 + 2, randn(4, 7, 5, gen=gen) * 5 + 2
    S, S2 = torch.zeros(3, 5, device=DEVICE), torch.zeros(3, 5, device=DEVICE)
    with torch.autocast(torch.device(DEVICE).type, dtype=torch.bfloat16):
        squared_products_update_(S, g, a)
        squared_products_update_(S2, g[:, 0], a[:, 0])
    assert rel_err(S, reference(torch.zeros(3, 5), g, a)) <= TOL[torch.float32]
    assert rel_err(S2, reference(torch.zeros(3, 5), g[:, 0], a[:, 0])) <= TOL[torch.float32]


@pytest.mark.parametrize("N,r_B,r_A,dtype", [
    (1, 1, 1, torch.float32), (7, 130, 33, torch.float32), (50, 7, 130, torch.bfloat16), (33, 33, 33, torch.float16),
])
def test_2d_inputs_are_one_row_per_example(backend, gen, N, r_B, r_A, dtype):
    g, a = randn(N, r_B, gen=gen, dtype=dtype), randn(N, r_A, gen=gen, dtype=dtype)
    S0 = randn(r_B, r_A, gen=gen)
    S = squared_products_update_(S0.clone(), g, a, scale=0.5)
    assert rel_err(S, reference(S0, g, a, 0.5)) <= TOL[torch.float32]
    S3 = squared_products_update_(S0.clone(), g[:, None], a[:, None], scale=0.5)  # T = 1, same numbers
    assert rel_err(S3, S) <= TOL[torch.float32]


@pytest.mark.parametrize("layout", ["transposed", "sliced", "permuted", "broadcast"])
def test_non_contiguous(backend, gen, layout):
    N, T, r_B, r_A = 3, 17, 33, 7
    g, a = {
        "transposed": lambda: (randn(N, r_B, T, gen=gen).transpose(1, 2),
                               randn(r_A, T, N, gen=gen, dtype=torch.bfloat16).permute(2, 1, 0).float()),
        "sliced": lambda: (randn(N, T, 2 * r_B + 1, gen=gen)[..., 1::2], randn(N, 2 * T, r_A, gen=gen)[:, ::2]),
        "permuted": lambda: (randn(T, N, r_B, gen=gen, dtype=torch.float16).transpose(0, 1),
                             randn(r_A, N, T, gen=gen, dtype=torch.float16).permute(1, 2, 0)),
        "broadcast": lambda: (randn(1, T, r_B, gen=gen).expand(N, T, r_B), randn(N, 1, r_A, gen=gen).expand(N, T, r_A)),
    }[layout]()
    assert not (g.is_contiguous() and a.is_contiguous())
    S = squared_products_update_(torch.zeros(r_B, r_A, device=DEVICE), g, a)
    assert rel_err(S, reference(torch.zeros(r_B, r_A), g, a)) <= TOL[torch.float32]
    gt, at = randn(r_B, 20, gen=gen).T, randn(r_A, 20, gen=gen).T  # 2-D transposed views
    S = squared_products_update_(torch.zeros(r_B, r_A, device=DEVICE), gt, at)
    assert rel_err(S, reference(torch.zeros(r_B, r_A), gt, at)) <= TOL[torch.float32]


@pytest.mark.parametrize("g_shape,a_shape", [
    ((0, 5, 7), (0, 5, 3)), ((3, 0, 7), (3, 0, 3)), ((0, 7), (0, 3)), ((3, 5, 0), (3, 5, 0)),
])
def test_empty_is_noop(backend, gen, g_shape, a_shape):
    g, a = randn(*g_shape, gen=gen), randn(*a_shape, gen=gen)
    S0 = randn(g_shape[-1], a_shape[-1], gen=gen)
    S = squared_products_update_(S0.clone(), g, a, scale=2.0)
    assert torch.equal(S, S0)


def test_float64_on_torch_backend(use_backend, gen):
    use_backend("torch")
    g, a = randn(3, 33, 7, gen=gen, dtype=torch.float64), randn(3, 33, 130, gen=gen, dtype=torch.float64)
    S0 = randn(7, 130, gen=gen, dtype=torch.float64)
    S = squared_products_update_(S0.clone(), g, a, scale=0.1)
    assert rel_err(S, reference(S0, g, a, 0.1)) <= TOL[torch.float64]
    S = squared_products_update_(S0.float(), g, a, scale=0.1)  # fp32 S, float64 products
    assert rel_err(S, reference(S0.float(), g, a, 0.1)) <= 1e-6
    S = squared_products_update_(S0.clone(), g[:, 0], a[:, 0], scale=0.1)
    assert rel_err(S, reference(S0, g[:, 0], a[:, 0], 0.1)) <= TOL[torch.float64]


def test_torch_backend_chunks_examples(use_backend, gen, monkeypatch):
    """Products built a few examples at a time give the same sum."""
    from kfac_kernels import correction

    use_backend("torch")
    monkeypatch.setattr(correction, "_CHUNK_ELEMENTS", 2 * 33 * 7)
    g, a = randn(7, 5, 33, gen=gen), randn(7, 5, 7, gen=gen)
    S = squared_products_update_(torch.zeros(33, 7, device=DEVICE), g, a)
    assert rel_err(S, reference(torch.zeros(33, 7), g, a)) <= TOL[torch.float32]


@needs_triton
@pytest.mark.parametrize("rows", [False, True])
def test_triton_example_splits_are_deterministic(use_backend, gen, rows):
    """Partial tiles of 3 example splits, summed in a fixed order: same bits twice, and the reference."""
    from kfac_kernels.triton_kernels.correction import squared_products_update_ as launch

    use_backend("triton")
    shape = (70,) if rows else (7, 33)
    g, a = randn(*shape, 40, gen=gen, dtype=torch.bfloat16), randn(*shape, 33, gen=gen, dtype=torch.bfloat16)
    S0 = randn(40, 33, gen=gen)
    S1 = launch(S0.clone(), g, a, 0.5, torch.bfloat16, splits=3)
    S2 = launch(S0.clone(), g, a, 0.5, torch.bfloat16, splits=3)
    assert torch.equal(S1, S2)
    assert rel_err(S1, reference(S0, g, a, 0.5)) <= TOL[torch.float32]


@needs_triton
def test_triton_follows_medium_precision(use_backend, gen):
    """'medium' multiplies fp32 g and a in bf16: visibly off from IEEE, within bf16 tolerance."""
    use_backend("triton")
    torch.set_float32_matmul_precision("medium")
    g, a = randn(3, 33, 20, gen=gen), randn(3, 33, 18, gen=gen)
    S = squared_products_update_(torch.zeros(20, 18, device=DEVICE), g, a)
    assert 1e-4 < rel_err(S, reference(torch.zeros(20, 18), g, a)) <= TOL[torch.bfloat16]
    if not _backend.interpreting():  # the interpreter truncates fp32 -> bf16 instead of rounding
        assert rel_err(S, reference(torch.zeros(20, 18), g.bfloat16(), a.bfloat16())) <= 1e-5


def test_not_differentiable_S_gets_no_history(backend, gen):
    g, a = randn(3, 5, 7, gen=gen).requires_grad_(), randn(3, 5, 4, gen=gen).requires_grad_()
    S = squared_products_update_(torch.zeros(7, 4, device=DEVICE), g, a)
    assert S.grad_fn is None and not S.requires_grad


def test_errors(use_backend):
    use_backend("torch")
    g, a, S = torch.randn(3, 5, 7), torch.randn(3, 5, 4), torch.zeros(7, 4)
    with pytest.raises(ValueError, match=r"g and a must have the same N and T.*\(3, 5, 7\).*\(2, 5, 4\)"):
        squared_products_update_(S, g, torch.randn(2, 5, 4))
    with pytest.raises(ValueError, match=r"g and a must have the same N and T.*\(3, 5, 7\).*\(3, 6, 4\)"):
        squared_products_update_(S, g, torch.randn(3, 6, 4))
    with pytest.raises(ValueError, match=r"g and a must have the same N, .*\(3, 7\).*\(4, 4\)"):
        squared_products_update_(S, g[:, 0], torch.randn(4, 4))
    with pytest.raises(ValueError, match=r"S must have shape \(r_B, r_A\) = \(7, 4\).*got \(4, 7\)"):
        squared_products_update_(S.T.contiguous(), g, a)
    with pytest.raises(ValueError, match="S must be 2-D"):
        squared_products_update_(torch.zeros(28), g, a)
    with pytest.raises(TypeError, match="S must have dtype"):
        squared_products_update_(S.bfloat16(), g, a)
    with pytest.raises(ValueError, match="S must be contiguous"):
        squared_products_update_(torch.zeros(4, 7).T, g, a)
    with pytest.raises(ValueError, match="S requires grad, but it is updated in place outside autograd"):
        squared_products_update_(S.clone().requires_grad_(), g, a)
    with pytest.raises(ValueError, match=r"g must be 3-D \(N, T, r_B\) or 2-D \(N, r_B\), got shape \(7,\)"):
        squared_products_update_(S, g[0, 0], a[0, 0])
    with pytest.raises(ValueError, match=r"a must be 3-D like g.*\(3, 4\)"):
        squared_products_update_(S, g, a[:, 0])
    with pytest.raises(TypeError, match="g must be a torch.Tensor"):
        squared_products_update_(S, g.numpy(), a)
    with pytest.raises(TypeError, match="a must have dtype"):
        squared_products_update_(S, g, a.int())
    with pytest.raises(TypeError, match="cannot mix bfloat16 and float16.*g=torch.bfloat16, a=torch.float16"):
        squared_products_update_(S, g.bfloat16(), a.half())
    with pytest.raises(TypeError, match="scale must be a Python number"):
        squared_products_update_(S, g, a, scale=torch.tensor(2.0))
    with pytest.raises(TypeError, match="positional"):
        squared_products_update_(S, g, a, 2.0)
    use_backend("triton")
    with pytest.raises(TypeError, match="backend 'triton' takes float16/bfloat16/float32"):
        squared_products_update_(S.double(), g, a)


@pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA device to mix devices")
def test_device_mix():
    g, a = torch.randn(3, 5, 7, device="cuda"), torch.randn(3, 5, 4)
    with pytest.raises(ValueError, match="one device.*g on cuda.*a on cpu"):
        squared_products_update_(torch.zeros(7, 4, device="cuda"), g, a)


def test_device_mix_meta():
    """Checked before anything runs: a meta tensor next to CPU ones is refused, naming both."""
    with pytest.raises(ValueError, match="one device.*S on cpu.*a on meta"):
        squared_products_update_(torch.zeros(7, 4), torch.randn(3, 5, 7), torch.empty(3, 5, 4, device="meta"))
