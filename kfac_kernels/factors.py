"""Compressed Kronecker factors that the kernels consume directly (never expanded to dense).

A factor F is a symmetric n × n matrix standing for A (input side) or B (output side). Besides a
dense tensor, it can be a diagonal diag(f) given as the 1-D tensor f (``is_diagonal``), or:

- ``BlockDiagonalFactor``: F = blockdiag(F_1, …, F_k), blocks (k, b, b) with b = ceil(n / k); the
  last block is cut to n − (k−1)·b rows and columns (its padding is ignored).
- ``LowRankFactor``: F ≈ U diag(λ) Uᵀ with U (n, r), λ (r,): the top-r eigenpairs.
- ``Int8Factor``: F ≈ diag(s) Q diag(s) with Q (n, n) int8 symmetric and s (n,) fp32 per-row
  scales; s_i = sqrt(F_ii / 127), so Q_ii = 127 and, as |F_ij| ≤ sqrt(F_ii F_jj) for a positive
  semi-definite F (a covariance), |Q_ij| ≤ 127: Q is F's correlation matrix × 127, rounded, whose
  entries all keep the same absolute precision (scales of the row's peak would round a small-variance row
  that is correlated with a large one coarsely, enough to make F indefinite). A row whose diagonal is not
  positive, or that holds a NaN / Inf (which then propagates), is scaled by its peak, and entries beyond 127
  (F not PSD) are clamped. ``to_dense`` gives an
  exactly symmetric matrix.
"""
from dataclasses import dataclass

import torch

from . import _validate


def _dense(op: str, name: str, F) -> torch.Tensor:
    _validate.tensor(op, name, F, ndim=2)
    _validate.square(op, name, F)
    return F


def _compressible(op: str, F) -> torch.Tensor:
    """F, a dense square factor with at least one row, for ``from_dense``."""
    if _dense(op, "F", F).shape[0] == 0:
        raise ValueError(f"{op}: F is empty (shape {tuple(F.shape)}): nothing to compress")
    return F


@dataclass(frozen=True)
class BlockDiagonalFactor:
    blocks: torch.Tensor  # (k, b, b)
    size: int  # n

    def __post_init__(self):
        _validate.tensor("BlockDiagonalFactor", "blocks", self.blocks, ndim=3)
        k, b, b2 = self.blocks.shape
        if b != b2 or k < 1 or not (k - 1) * b < self.size <= k * b:
            raise ValueError(f"BlockDiagonalFactor: blocks of shape {tuple(self.blocks.shape)} cannot make a "
                             f"{self.size} × {self.size} factor (need k ≥ 1 square blocks with (k−1)·b < size ≤ k·b)")

    @classmethod
    def from_dense(cls, F: torch.Tensor, k: int) -> "BlockDiagonalFactor":
        """Keep the k diagonal blocks of F (n × n), zero elsewhere."""
        n = _compressible("BlockDiagonalFactor.from_dense", F).shape[0]
        if not 1 <= k <= max(n, 1):
            raise ValueError(f"BlockDiagonalFactor.from_dense: k={k} must be in [1, {n}] for F of shape {tuple(F.shape)}")
        b = -(-n // k)
        k = -(-n // b)  # fewer blocks when n is not divisible: every block keeps b rows
        blocks = F.new_zeros(k, b, b)
        for j in range(k):
            s = slice(j * b, min((j + 1) * b, n))
            blocks[j, : s.stop - s.start, : s.stop - s.start] = F[s, s]
        return cls(blocks, n)

    @property
    def shape(self):
        return (self.size, self.size)

    @property
    def dtype(self):
        return self.blocks.dtype

    @property
    def device(self):
        return self.blocks.device

    @property
    def nbytes(self) -> int:
        return self.blocks.nbytes

    def to(self, *args, **kwargs) -> "BlockDiagonalFactor":
        return BlockDiagonalFactor(self.blocks.to(*args, **kwargs), self.size)

    def to_dense(self) -> torch.Tensor:
        """The n × n matrix (for tests and inspection; the kernels never call this)."""
        return torch.block_diag(*self.blocks)[: self.size, : self.size]


@dataclass(frozen=True)
class LowRankFactor:
    U: torch.Tensor  # (n, r), orthonormal columns
    eigenvalues: torch.Tensor  # (r,)

    def __post_init__(self):
        _validate.tensor("LowRankFactor", "U", self.U, ndim=2)
        _validate.tensor("LowRankFactor", "eigenvalues", self.eigenvalues, ndim=1)
        if self.eigenvalues.shape[0] != self.U.shape[1]:
            raise ValueError(f"LowRankFactor: U of shape {tuple(self.U.shape)} needs {self.U.shape[1]} eigenvalues, "
                             f"got shape {tuple(self.eigenvalues.shape)}")
        _validate.same_device("LowRankFactor", U=self.U, eigenvalues=self.eigenvalues)

    @classmethod
    def from_dense(cls, F: torch.Tensor, rank: int | None = None, *, fraction: float | None = None) -> "LowRankFactor":
        """Top eigenpairs of symmetric F (float64 eigh): ``rank`` of them, or a ``fraction`` of n."""
        n = _compressible("LowRankFactor.from_dense", F).shape[0]
        if (rank is None) == (fraction is None):
            raise ValueError("LowRankFactor.from_dense: give exactly one of rank= or fraction=")
        if fraction is not None and not 0 < fraction <= 1:
            raise ValueError(f"LowRankFactor.from_dense: fraction must be in (0, 1], got {fraction!r}")
        r = rank if rank is not None else max(1, round(fraction * n))
        if not 1 <= r <= n:
            raise ValueError(f"LowRankFactor.from_dense: rank {r} must be in [1, {n}] for F of shape {tuple(F.shape)}")
        lam, U = torch.linalg.eigh(F.double())
        return cls(U[:, -r:].flip(1).to(F.dtype).contiguous(), lam[-r:].flip(0).to(torch.float32).contiguous())

    @property
    def shape(self):
        return (self.U.shape[0], self.U.shape[0])

    @property
    def rank(self) -> int:
        return self.U.shape[1]

    @property
    def dtype(self):
        return self.U.dtype

    @property
    def device(self):
        return self.U.device

    @property
    def nbytes(self) -> int:
        return self.U.nbytes + self.eigenvalues.nbytes

    def to(self, *args, **kwargs) -> "LowRankFactor":
        U = self.U.to(*args, **kwargs)  # once: U is the factor's bulk
        return LowRankFactor(U, self.eigenvalues.to(device=U.device))

    def to_dense(self) -> torch.Tensor:
        """U diag(λ) Uᵀ in the promoted dtype of U and λ (fp32 for fp16 U: λ may exceed fp16's range)."""
        U = self.U.to(torch.promote_types(self.U.dtype, self.eigenvalues.dtype))
        return (U * self.eigenvalues.to(U.dtype)) @ U.T


@dataclass(frozen=True)
class Int8Factor:
    q: torch.Tensor  # (n, n) int8, symmetric
    scale: torch.Tensor  # (n,) float32

    def __post_init__(self):
        _validate.tensor("Int8Factor", "q", self.q, ndim=2, dtypes=(torch.int8,))
        _validate.square("Int8Factor", "q", self.q)
        _validate.tensor("Int8Factor", "scale", self.scale, ndim=1, dtypes=(torch.float32,))
        if self.scale.shape[0] != self.q.shape[0]:
            raise ValueError(f"Int8Factor: q of shape {tuple(self.q.shape)} needs scale of shape ({self.q.shape[0]},), "
                             f"got {tuple(self.scale.shape)}")
        _validate.same_device("Int8Factor", q=self.q, scale=self.scale)

    @classmethod
    def from_dense(cls, F: torch.Tensor) -> "Int8Factor":
        """Symmetric per-row quantization F ≈ diag(s) Q diag(s) (see module docstring)."""
        _compressible("Int8Factor.from_dense", F)
        F = F.float()
        diagonal, peak = F.diagonal(), F.abs().amax(dim=1)  # a row's peak is NaN / Inf where it holds one
        s = torch.sqrt(torch.where((diagonal > 0) & peak.isfinite(), diagonal, peak) / 127.0)
        s = torch.where(s == 0, torch.ones_like(s), s)  # all-zero rows; NaN / Inf stay and propagate
        q = torch.round(F / s[:, None] / s[None, :]).clamp_(-127, 127).to(torch.int8)
        return cls(q, s.contiguous())

    @property
    def shape(self):
        return tuple(self.q.shape)

    @property
    def dtype(self):
        return torch.float32

    @property
    def device(self):
        return self.q.device

    @property
    def nbytes(self) -> int:
        return self.q.nbytes + self.scale.nbytes

    def to(self, device) -> "Int8Factor":
        return Int8Factor(self.q.to(device), self.scale.to(device))

    def to_dense(self) -> torch.Tensor:
        return (self.scale[:, None] * self.scale[None, :]) * self.q.float()  # s_i s_j = s_j s_i: exactly symmetric


COMPRESSED = (BlockDiagonalFactor, LowRankFactor, Int8Factor)
_KIND = {torch.Tensor: 0, BlockDiagonalFactor: 1, LowRankFactor: 2, Int8Factor: 3}


def flatten(factors) -> tuple[list[torch.Tensor], list[int]]:
    """The tensors of ``factors`` (dense or compressed) and two codes per factor, its kind and its size n:
    the form a ``torch.library`` op takes them in. ``unflatten`` inverts it."""
    tensors, codes = [], []
    for F in factors:
        if isinstance(F, torch.Tensor):
            tensors.append(F)
        elif isinstance(F, BlockDiagonalFactor):
            tensors.append(F.blocks)
        elif isinstance(F, LowRankFactor):
            tensors += [F.U, F.eigenvalues]
        else:
            tensors += [F.q, F.scale]
        codes += [_KIND[torch.Tensor if isinstance(F, torch.Tensor) else type(F)], F.shape[0]]
    return tensors, codes


def unflatten(tensors, codes) -> list:
    """The factors that ``flatten`` gave ``tensors`` and ``codes`` for."""
    parts, factors = iter(tensors), []
    for kind, n in zip(codes[::2], codes[1::2]):
        if kind == _KIND[torch.Tensor]:
            factors.append(next(parts))
        elif kind == _KIND[BlockDiagonalFactor]:
            factors.append(BlockDiagonalFactor(next(parts), n))
        elif kind == _KIND[LowRankFactor]:
            factors.append(LowRankFactor(next(parts), next(parts)))
        else:
            factors.append(Int8Factor(next(parts), next(parts)))
    return factors


def factor_size(op: str, name: str, F) -> int:
    """n for an n × n factor (dense, diagonal or compressed), after checking a dense one is square and floating."""
    if isinstance(F, COMPRESSED):
        return F.shape[0]
    if is_diagonal(F):
        return _validate.tensor(op, name, F).shape[0]
    return _dense(op, name, F).shape[0]


def is_diagonal(F) -> bool:
    """Whether F is a diagonal factor diag(f), given as its diagonal f: a 1-D tensor (an embedding's A, whose
    inputs are one-hot)."""
    return isinstance(F, torch.Tensor) and F.dim() == 1
