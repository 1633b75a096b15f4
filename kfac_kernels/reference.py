"""PyTorch backend of the quadratic forms: the CPU path and the oracle for the kernels.

Factors act as linear operators: ``right(X, F) = X F`` and ``left(F, X) = F X = (Xᵀ F)ᵀ`` (F
symmetric). Compressed factors are applied in their compressed form; a block-diagonal factor's
padding (the last block beyond n) is never read. Autocast is disabled here: the products are in the
dtype asked for (fp32 or fp64), whatever ``torch.autocast`` encloses the call.
"""
import torch

from ._precision import no_autocast
from .factors import BlockDiagonalFactor, Int8Factor, LowRankFactor, is_diagonal


def right(X: torch.Tensor, F) -> torch.Tensor:
    """X F for X (m, n) and an n × n factor F, in X's dtype."""
    if isinstance(F, BlockDiagonalFactor):
        k, b, _ = F.blocks.shape
        m, n = X.shape
        full = (k - 1) * b  # columns of the k − 1 full blocks; the last block keeps n − full of its b rows
        blocks = F.blocks.to(X.dtype)
        head = torch.bmm(X[:, :full].reshape(m, k - 1, b).transpose(0, 1), blocks[:-1])
        tail = X[:, full:] @ blocks[-1, : n - full, : n - full]
        return torch.cat([head.transpose(0, 1).reshape(m, full), tail], dim=1)
    if isinstance(F, LowRankFactor):
        U = F.U.to(X.dtype)
        return ((X @ U) * F.eigenvalues.to(X.dtype)) @ U.T
    if isinstance(F, Int8Factor):
        s = F.scale.to(X.dtype)
        return ((X * s) @ F.q.to(X.dtype)) * s
    if is_diagonal(F):
        return X * F.to(X.dtype)
    return X @ F.to(X.dtype)


def left(F, X: torch.Tensor) -> torch.Tensor:
    """F X for an m × m symmetric factor F and X (m, n)."""
    return right(X.T, F).T


def quadratic_forms(taus, Bs, As, weights, want_grad, dtype):
    """(Σ_l w_l ⟨τ_l, B_l τ_l A_l⟩, [2 w_l B_l τ_l A_l] or None), multiplied in ``dtype`` (fp32 or fp64)."""
    total = torch.zeros((), dtype=dtype, device=taus[0].device)
    grads = []
    with no_autocast(taus[0].device):
        for tau, B, A, w in zip(taus, Bs, As, weights):
            t = tau.to(dtype)
            P = left(B, right(t, A))
            total = total + w * torch.sum(t * P)
            if want_grad:
                grads.append((2 * w * P).to(tau.dtype))
    return total, (grads if want_grad else None)


def eigen_quadratic_forms(taus, U_Bs, U_As, Ss, weights, want_grad, dtype):
    """(Σ_l w_l Σ S_l ⊙ M_l², [G_l = 2 w_l S_l ⊙ M_l] or None) with M_l = U_B,lᵀ τ_l U_A,l (r_B × r_A; U_A
    None: the identity), multiplied in ``dtype``; ``eigen_gradients`` turns G_l into the gradient."""
    total = torch.zeros((), dtype=dtype, device=taus[0].device)
    Gs = []
    with no_autocast(taus[0].device):
        for tau, U_B, U_A, S, w in zip(taus, U_Bs, U_As, Ss, weights):
            M = U_B.to(dtype).T @ tau.to(dtype)
            M = M if U_A is None else M @ U_A.to(dtype)
            SM = S.to(dtype) * M
            total = total + w * torch.sum(SM * M)
            if want_grad:
                Gs.append((2 * w * SM).contiguous())  # in S's layout otherwise
    return total, (Gs if want_grad else None)


def eigen_gradients(Gs, U_Bs, U_As, dtypes):
    """[U_B,l G_l U_A,lᵀ] per layer (d_out, d_in), in ``dtypes[l]``; products in G_l's dtype."""
    with no_autocast(Gs[0].device):
        return [(U_B.to(G.dtype) @ G @ U_A.to(G.dtype).T).to(dt) for G, U_B, U_A, dt in zip(Gs, U_Bs, U_As, dtypes)]
