"""kfac_kernels under torch.compile: every op is a torch.library op (the Triton kernels behind opaque
ops), so a training step with the penalty, the covariance updates and a linearized model compile with
fullgraph=True on every backend and compute what eager mode computes. On a GPU machine everything runs on
CUDA (the real Triton compiler), elsewhere on the CPU (Triton's interpreter)."""
import pytest
import torch

import kfac_kernels as kk
import tak
from kfac_kernels.factors import flatten
from tests.conftest import DEVICE
from tests.test_linearize import CASES
from tests.util import rel_err

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _factor(n, seed):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(2 * n + 1, n, generator=g)
    return (X.T @ X / n).to(DEVICE)


def _triton_cases():
    from kfac_kernels.triton_kernels import activation, dual_attention, dual_linear, norm

    def r(*shape):
        return torch.randn(*shape, device=DEVICE)
    x, dx, w, dw, b = r(7, 5), r(7, 5), r(3, 5), r(3, 5), r(3)
    q, k, v = r(2, 3, 5, 4), r(2, 3, 6, 4), r(2, 3, 6, 4)
    mask, bias = r(2, 1, 1, 6) > -0.5, r(1, 3, 5, 6)
    o, _, lse = dual_attention.forward(q, k, v, r(2, 3, 5, 4), None, None, mask, bias, None, 0.5, 0.0, torch.float32)
    f32 = torch.float32
    return {
        "triton_dual_linear": (dual_linear.forward, (x, dx, w, dw, b, None, f32)),
        "triton_matmul": (dual_linear.matmul, ([r(7, 3).T, r(7, 5).T], [dx, x], f32, torch.bfloat16)),
        "triton_dual_activation": (activation.forward, (x, dx, r(7, 5), None, "gelu")),
        "triton_dual_activation_backward": (activation.backward, (r(7, 5), x, None, "quick_gelu", f32, None)),
        "triton_dual_norm": (norm.forward, (x, dx, r(5), r(5), r(5), None, 1e-5, False)),
        "triton_dual_norm_backward": (norm.backward, (r(7, 5), x, r(7), r(7).abs() + 1, r(5), True, True, False,
                                                      True, torch.bfloat16)),
        "triton_dual_attention": (dual_attention.forward, (q, k, v, r(2, 3, 5, 4), None, r(2, 3, 6, 4), mask, bias,
                                                           r(1, 3, 5, 6), 0.5, 0.0, f32)),
        "triton_dual_attention_backward": (dual_attention.backward, (r(2, 3, 5, 4), q, k, v, mask, bias, o, lse, 0.5,
                                                                     0.0, f32, f32, None, f32, f32, [3, 5, 6])),
    }


def _front_cases():
    from kfac_kernels import correction, covariance, quadratic

    def r(*shape):
        return torch.randn(*shape, device=DEVICE)

    taus = [r(5, 3).requires_grad_(), r(4, 2).requires_grad_()]
    factors, codes = flatten([_factor(5, 0), kk.BlockDiagonalFactor.from_dense(_factor(4, 1), 2),
                              kk.LowRankFactor.from_dense(_factor(3, 2), rank=2),
                              kk.Int8Factor.from_dense(_factor(2, 3))])
    U_Bs, U_As = [torch.linalg.qr(r(5, 5))[0], torch.linalg.qr(r(4, 3))[0]], [torch.linalg.qr(r(3, 2))[0], r(2, 2)]
    Ss = [r(2, 5).abs().T, r(3, 2).abs()]  # a transposed S: G comes out contiguous, as its fake says
    f32 = torch.float32
    return {
        "quadratic_forms": (quadratic._forms, (taus, factors, codes, [1.0, 0.5], True, f32, "quadratic_forms")),
        "eigen_quadratic_forms": (quadratic._eigen_forms, (taus, U_Bs, U_As, Ss, [1.0, 2.0], True, f32, "eigen")),
        "eigen_gradients": (quadratic._eigen_gradients, ([r(5, 2), r(3, 2)], U_Bs, U_As, [r(5, 3), r(4, 2)], "eigen")),
        "covariance_update": (covariance._update, (r(6, 6), r(9, 5), r(9) > 0, True, 0.5)),
        "squared_products_update": (correction._update, (r(3, 4), r(5, 2, 3), r(5, 2, 4), 2.0, f32)),
    }


def test_every_op_passes_opcheck(backend):
    """Schema, fake (meta) implementation, autograd registration and AOT dispatch of every kfac_kernels
    op, against the op itself (``torch.library.opcheck``); the front ends' ops on each backend."""
    cases = _front_cases()
    if backend == "triton":
        cases |= _triton_cases()
    for name, (op, args) in cases.items():
        torch.library.opcheck(op, args)
    registered = {n for n in dir(torch.ops.kfac_kernels) if not n.startswith("_") and n not in ("name", "op")}
    if backend == "triton":
        assert registered == set(cases), f"ops without an opcheck case: {registered - set(cases)}"


def _penalty_step(W, taus, x, Bs, As, U_B, U_A, S):
    """A training step's loss: a task loss plus the KFAC (with compressed factors) and EK-FAC penalties."""
    loss = torch.nn.functional.linear(x, W + taus[0]).square().mean()
    return (loss + 0.1 * kk.quadratic_forms(taus, Bs, As, weights=[1.0, 0.5])
            + 0.01 * kk.eigen_quadratic_form(taus[1], U_B, U_A, S))


def test_penalty_compiles_with_fullgraph(backend):
    """The penalty in a compiled step (one graph: fullgraph=True) equals the eager step, value and gradients,
    and its no-grad evaluation too."""
    torch.manual_seed(0)
    W, x = torch.randn(7, 5, device=DEVICE), torch.randn(4, 5, device=DEVICE)
    taus = [torch.zeros(7, 5, device=DEVICE).normal_(std=0.1).requires_grad_(),
            torch.randn(6, 3, device=DEVICE).requires_grad_()]
    Bs = [_factor(7, 1), kk.BlockDiagonalFactor.from_dense(_factor(6, 2), 2)]
    As = [kk.Int8Factor.from_dense(_factor(5, 3)), kk.LowRankFactor.from_dense(_factor(3, 4), rank=2)]
    U_B, U_A = (torch.linalg.qr(torch.randn(n, n, device=DEVICE))[0] for n in (6, 3))
    S = torch.rand(6, 3, device=DEVICE)
    args = (W, taus, x, Bs, As, U_B, U_A, S)
    want = _penalty_step(*args)
    want_grads = torch.autograd.grad(want, taus)
    step = torch.compile(_penalty_step, fullgraph=True)
    got = step(*args)
    got_grads = torch.autograd.grad(got, taus)
    assert rel_err(got, want) < 1e-6
    for g, w in zip(got_grads, want_grads):
        assert rel_err(g, w) < 1e-6
    with torch.no_grad():
        assert rel_err(step(*args), want) < 1e-6
    tensor_weights = torch.compile(lambda t: kk.quadratic_forms(t, Bs, As, weights=torch.ones(2)), fullgraph=True)
    with pytest.raises(Exception, match="under torch.compile, weights must be a list of numbers"):
        tensor_weights(taus)


def test_curvature_updates_compile_with_fullgraph(backend):
    """covariance_update_ (mask, ones column) and squared_products_update_ in one compiled function update
    their accumulators in place as eagerly."""
    torch.manual_seed(0)
    X, mask = torch.randn(3, 7, 5, device=DEVICE), torch.rand(3, 7, device=DEVICE) > 0.3
    g, a = torch.randn(4, 3, 6, device=DEVICE), torch.randn(4, 3, 5, device=DEVICE)

    def update(C, S):
        kk.covariance_update_(C, X, scale=0.5, mask=mask, append_ones=True)
        kk.squared_products_update_(S, g, a, scale=0.25)
        return C.trace() + S.sum()

    C, S = torch.eye(6, device=DEVICE), torch.ones(6, 5, device=DEVICE)
    C2, S2 = C.clone(), S.clone()
    want = update(C, S)
    got = torch.compile(update, fullgraph=True)(C2, S2)
    assert rel_err(got, want) < 1e-6 and rel_err(C2, C) < 1e-6 and rel_err(S2, S) < 1e-6
    assert torch.equal(C2, C2.T)


def test_linearized_model_compiles_with_fullgraph(backend):
    """A linearized open_clip ViT on the fast path (every dual layer a kfac_kernels op) compiled as one
    graph: outputs and τ-gradients equal eager mode's."""
    model, inputs, outputs = CASES["vit"]()
    lin = tak.linearize(model.float().to(DEVICE))
    lin.load_task_vector({name: 0.05 * torch.randn_like(t) for name, t in lin.task_vector().items()})
    args, kwargs = inputs()
    args = [a.float().to(DEVICE) for a in args]
    want = outputs(lin(*args, **kwargs))[0]
    taus = list(lin.dual.named_taus().values())
    want_grads = torch.autograd.grad(want.square().sum(), taus)
    got = outputs(torch.compile(lin, fullgraph=True)(*args, **kwargs))[0]
    got_grads = torch.autograd.grad(got.square().sum(), taus)
    assert rel_err(got, want) < 1e-5
    assert rel_err(torch.cat([t.reshape(-1) for t in got_grads]), torch.cat([t.reshape(-1) for t in want_grads])) < 1e-5
