"""Triton backend of the quadratic forms: each layer is a short chain of grouped factor products.

q_l = ⟨τ, B (τ A)⟩: stage 1 computes X = τ A, stage 2 computes Pᵀ = Xᵀ B (so P = B τ A, B
symmetric) with the reduction against τᵀ fused into its epilogue, and writes 2·w·P, the gradient,
only when it is wanted. Compressed factors add jobs, not kernels: block-diagonal factors are one job
per block, low-rank ones two stages (X U, then (· λ) Uᵀ), int8 ones dequantize in the kernel.
Stage s of every layer runs in the same launches.
"""
from collections import defaultdict

import torch

from .. import _precision
from ..factors import BlockDiagonalFactor, Int8Factor, LowRankFactor
from .common import dot_mode, on_input_device
from .grouped_matmul import Job, run


def _cols(x, s):
    return None if x is None else x[:, s]


def _product(X, F, Y, dot, **epilogue) -> list[list[Job]]:
    """Stages computing Y = X F for a factor F (Y is None when only the epilogue's reduction is wanted)."""
    T = epilogue.pop("T", None)
    if isinstance(F, BlockDiagonalFactor):
        b = F.blocks.shape[1]
        jobs = []
        for j in range(F.blocks.shape[0]):
            s = slice(j * b, min((j + 1) * b, F.size))
            w = s.stop - s.start
            jobs.append(Job(X[:, s], F.blocks[j, :w, :w], _cols(Y, s), _cols(T, s), dot=dot, **epilogue))
        return [jobs]
    if isinstance(F, LowRankFactor):
        Z = torch.empty(X.shape[0], F.rank, dtype=_intermediate(X.dtype, F.dtype), device=X.device)
        return [[Job(X, F.U, Z, dot=dot)],
                [Job(Z, F.U.T, Y, T, kscale=F.eigenvalues.float(), dot=dot, **epilogue)]]
    if isinstance(F, Int8Factor):
        return [[Job(X, F.q, Y, T, kscale=F.scale, nscale=F.scale, dot=dot, **epilogue)]]
    return [[Job(X, F, Y, T, dot=dot, **epilogue)]]


def _intermediate(*dtypes) -> torch.dtype:
    """The dtype operands of ``dtypes`` are multiplied in and products between stages are stored in: bfloat16
    where ``_precision.compute_dtype`` gives it, else fp32 (see ``kfac_kernels.quadratic``: float16 products of
    second-moment factors leave its range). The front end has refused bf16 with fp16 within a layer."""
    dtype = _precision.compute_dtype("quadratic_forms", float16_in_fp32=True, **{f"x{i}": d for i, d in enumerate(dtypes)})
    return dtype if dtype == torch.bfloat16 else torch.float32  # (fp64 layers: the PyTorch backend)


def _dot(*dtypes) -> str:
    """How a layer whose operands have ``dtypes`` is multiplied: float16 alone as tf32 (which holds every float16
    value exactly, and float32's range: the tensor cores without the overflow), else ``dot_mode`` of its
    ``_intermediate`` dtype."""
    return "tf32" if set(dtypes) == {torch.float16} else dot_mode(_intermediate(*dtypes))


def _run_stages(chains) -> torch.Tensor:
    stages = defaultdict(list)
    for chain in chains:
        for s, jobs in enumerate(chain):
            stages[s].extend(jobs)
    total = None
    for s in sorted(stages):
        part = run(stages[s])
        total = part if total is None else total + part
    return total


@on_input_device
def quadratic_forms(taus, Bs, As, weights, want_grad):
    """(Σ_l w_l ⟨τ_l, B_l τ_l A_l⟩ as 0-dim fp32, [2 w_l B_l τ_l A_l] in τ's dtype or None)."""
    chains, grads = [], []
    for tau, B, A, w in zip(taus, Bs, As, weights):
        dot = _dot(tau.dtype, B.dtype, A.dtype)
        X = torch.empty(tau.shape, dtype=_intermediate(tau.dtype, B.dtype, A.dtype), device=tau.device)
        P = torch.empty_like(tau) if want_grad else None
        chains.append(_product(tau, A, X, dot)
                      + _product(X.T, B, None if P is None else P.T, dot,
                                 T=tau.T, reduce="dot", reduce_scale=w, y_scale=2.0 * w))
        grads.append(P)
    return _run_stages(chains), (grads if want_grad else None)


@on_input_device
def eigen_quadratic_forms(taus, U_Bs, U_As, Ss, weights, want_grad):
    """(Σ_l w_l Σ S_l ⊙ M_l², [G_l = 2 w_l S_l ⊙ M_l] or None) with M_l = U_Bᵀ τ_l U_A (r_B × r_A)."""
    chains, Gs = [], []
    for tau, U_B, U_A, S, w in zip(taus, U_Bs, U_As, Ss, weights):
        dot = _dot(tau.dtype, U_B.dtype, U_A.dtype)
        X = torch.empty(tau.shape[0], U_A.shape[1], dtype=_intermediate(tau.dtype, U_A.dtype), device=tau.device)
        G = torch.empty(S.shape, dtype=torch.float32, device=tau.device) if want_grad else None
        chains.append([[Job(tau, U_A, X, dot=dot)],
                       [Job(X.T, U_B, None if G is None else G.T, S.T, reduce="sqdot", times_t=True,
                            reduce_scale=w, y_scale=2.0 * w, dot=dot)]])
        Gs.append(G)
    return _run_stages(chains), (Gs if want_grad else None)


@on_input_device
def eigen_gradients(Gs, U_Bs, U_As, outs):
    """outs[l] = U_B,l G_l U_A,lᵀ, written in place in outs[l]'s dtype."""
    chains = []
    for G, U_B, U_A, out in zip(Gs, U_Bs, U_As, outs):
        dot = _dot(G.dtype, U_B.dtype, U_A.dtype)
        Z = torch.empty(G.shape[0], U_A.shape[0], dtype=torch.float32, device=G.device)
        chains.append([[Job(G, U_A.T, Z, dot=dot)], [Job(U_B, Z, out, dot=dot)]])
    _run_stages(chains)
