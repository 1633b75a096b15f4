"""Smaller KFAC factors that ``KFAC.quadratic_form`` (through ``kfac_kernels``) uses as they are.

For each n × n factor F (A and/or B of every layer; an embedding's diagonal A, n numbers, is kept as it is):

- ``"blockdiag"``, ``k=``: the k diagonal blocks of size b = ceil(n / k) (``kk.BlockDiagonalFactor``;
  fewer blocks when n is not divisible, one per row when n < k), zero elsewhere;
- ``"eigen"``, ``rank=`` or ``fraction=``: the top-r eigenpairs, r = min(rank, n) or round(fraction·n)
  (``kk.LowRankFactor``);
- ``"prune"``, ``keep=``: magnitude pruning to n + 2·⌊(round(keep·n²) − n) / 2⌋ entries (at least n; pairs
  keep the count's parity): the diagonal, then the off-diagonal pairs (F_ij, F_ji) of largest |F_ij|; a
  dense, symmetric F with zeros elsewhere (no fewer bytes in memory; ``nonzeros`` in the report says what a
  sparse format would hold);
- ``"int8"``: F ≈ diag(s) Q diag(s) with int8 Q and per-row scales s (``kk.Int8Factor``).
"""
from dataclasses import replace

import torch

import kfac_kernels as kk

from .kfac import KFAC

_PARAMS = {"blockdiag": ("k",), "eigen": ("rank", "fraction"), "prune": ("keep",), "int8": ()}


def compress(kfac: KFAC, *, method: str, which: str = "both", k: int | None = None, rank: int | None = None,
             fraction: float | None = None, keep: float | None = None) -> tuple[KFAC, dict]:
    """(compressed KFAC, report). ``which``: "both", "A" or "B" (the others stay as they are).

    report: ``bytes_before``, ``bytes_after`` (all factors), ``ratio`` = bytes_before / bytes_after,
    ``layers`` {name: {bytes_before, bytes_after[, nonzeros]}}, and the method and its arguments
    (also appended to ``meta["compression"]`` of the result: one entry per compress call, in order)."""
    if method not in _PARAMS:
        raise ValueError(f"compress: method must be one of {list(_PARAMS)}, got {method!r}")
    given = {n: v for n, v in {"k": k, "rank": rank, "fraction": fraction, "keep": keep}.items() if v is not None}
    wrong = sorted(set(given) - set(_PARAMS[method]))
    if wrong:
        raise ValueError(f"compress: method={method!r} takes {list(_PARAMS[method]) or 'no arguments'}, got {wrong}")
    if which not in ("both", "A", "B"):
        raise ValueError(f"compress: which must be 'both', 'A' or 'B', got {which!r}")
    if not isinstance(kfac, KFAC) or kfac.meta.get("kind") != "kfac":
        raise ValueError(f"compress: needs KFAC factors (kind 'kfac'), got {type(kfac).__name__}")
    fn = _method(method, k=k, rank=rank, fraction=fraction, keep=keep)
    sides = ("A", "B") if which == "both" else (which,)
    factors, layers = {}, {}
    for name, lf in kfac.items():
        new, entry = {}, {}
        for side in sides:
            F = getattr(lf, side)
            if not isinstance(F, torch.Tensor):
                raise ValueError(f"compress: {name}.{side} is already a {type(F).__name__}; compress dense factors")
            new[side] = F if F.dim() == 1 else fn(F)
            if method == "prune":
                entry.setdefault("nonzeros", {})[side] = int(torch.count_nonzero(new[side]))
        factors[name] = replace(lf, **new)
        layers[name] = {"bytes_before": lf.A.nbytes + lf.B.nbytes,
                        "bytes_after": factors[name].A.nbytes + factors[name].B.nbytes, **entry}
    info = {"method": method, "which": which, **given}
    before = sum(e["bytes_before"] for e in layers.values())
    after = sum(e["bytes_after"] for e in layers.values())
    report = {**info, "bytes_before": before, "bytes_after": after, "ratio": before / after, "layers": layers}
    return KFAC(factors, {**kfac.meta, "compression": [*kfac.meta.get("compression", []), info]}), report


def prune(F: torch.Tensor, keep: float) -> torch.Tensor:
    """F (n × n, symmetric) with about round(keep·n²) entries kept (at least the diagonal): the diagonal and
    the ⌊(round(keep·n²) − n) / 2⌋ off-diagonal pairs of largest magnitude; zeros elsewhere."""
    n = F.shape[0]
    pairs = min(max(round(keep * n * n) - n, 0) // 2, n * (n - 1) // 2)
    i, j = torch.triu_indices(n, n, offset=1, device=F.device)
    top = F[i, j].abs().topk(pairs).indices
    mask = torch.eye(n, dtype=torch.bool, device=F.device)
    mask[i[top], j[top]] = True
    mask |= mask.T.clone()
    return torch.where(mask, F, torch.zeros((), dtype=F.dtype, device=F.device))


def _method(method: str, *, k, rank, fraction, keep):
    """The function F -> compressed F of ``method``, after checking its arguments."""
    if method == "blockdiag":
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"compress: method='blockdiag' needs k= a positive int (number of blocks), got {k!r}")
        return lambda F: kk.BlockDiagonalFactor.from_dense(F, min(k, F.shape[0]))
    if method == "eigen":
        if (rank is None) == (fraction is None):
            raise ValueError("compress: method='eigen' needs exactly one of rank= or fraction=")
        if rank is not None:
            if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
                raise ValueError(f"compress: rank must be a positive int, got {rank!r}")
            return lambda F: kk.LowRankFactor.from_dense(F, rank=min(rank, F.shape[0]))
        if not 0 < fraction <= 1:
            raise ValueError(f"compress: fraction must be in (0, 1], got {fraction!r}")
        return lambda F: kk.LowRankFactor.from_dense(F, fraction=fraction)
    if method == "prune":
        if keep is None or not 0 < keep <= 1:
            raise ValueError(f"compress: method='prune' needs keep= in (0, 1] (fraction of entries kept), got {keep!r}")
        return lambda F: prune(F, keep)
    return kk.Int8Factor.from_dense
