"""Post-hoc merges of task vectors: Task Arithmetic, TIES, TSV-M, Iso-C and Iso-CTS.

A *task vector* is a mapping ``{model parameter name: tensor}`` (``τ_t = θ_t − θ0``); objects with a
``.tensors`` mapping (``tak.task_vector.TaskVector``) are accepted as well. Every merge has the form
``merge(taus, ...) -> dict[str, Tensor]`` and returns a task vector ``τ_merged``; the caller builds the
merged model as ``θ0 + α · τ_merged`` (α is tuned outside, as in all five papers).

Conventions
-----------
- All task vectors must have the same keys and, key by key, the same shapes; the result has the
  keys of ``taus[0]`` in its order. Tensors must be real floating point.
- Arithmetic runs in float64 for float64 inputs and in float32 otherwise (bf16/fp16 are upcast);
  each result tensor has the dtype and device of ``taus[0][key]`` (other tasks are moved there).
- Merges run under ``torch.no_grad()`` and never alias or modify their inputs.
- "Matrix" means a 2-D tensor (``matrix_filter`` can narrow this, e.g. the papers' CLIP code
  leaves ``text_projection`` out of the SVD treatment). Let ``m × n`` be its shape,
  ``d = min(m, n)`` and ``T`` the number of tasks. SVDs are thin: ``X = U diag(σ) Vᵀ`` with
  ``U`` m×d, ``V`` n×d, σ descending.
- The *polar factor* of a matrix ``A = P S Qᵀ`` (thin SVD) is ``P Qᵀ``: the closest matrix with
  orthonormal columns (rows, when ``A`` is wide). It is invariant to the sign/rotation ambiguity of
  the SVD when ``A`` has full rank; for a rank-deficient ``A`` it is not unique: the SVD's arbitrary
  completion of the null space decides it. TSV-M meets this when a task's matrix has fewer nonzero
  singular values than the directions it keeps (a zero task among others, low-rank or duplicate
  tasks), Iso-CTS when a projected task does; those arbitrary directions then enter the merge with
  nonzero weight, so on such inputs it depends on round-off (Iso-CTS also on the task order), as
  the authors' code does. All-zero task vectors merge to 0.

Merges (``MERGES``; ``merge(name, taus, **options)`` dispatches by name)
-----------------------------------------------------------------------
``task_arithmetic`` (Ilharco et al. 2023): ``Σ_t τ_t``.

``ties`` (Yadav et al. 2023, TIES-Merging), per tensor:
  1. trim: for each task keep the entries whose magnitude is ``≥`` the ``n_keep``-th largest
     magnitude of that task's tensor, ``n_keep = ceil(k · numel)`` (at least 1), zero the rest.
     Entries tied in magnitude with the threshold are all kept, so a task can keep more than
     ``n_keep`` entries (this is also what the authors' code does);
  2. elect: ``γ = sign(Σ_t trimmed_t)`` per entry (total mass). An entry whose trimmed values sum to
     exactly zero takes the tensor's majority sign ``sign(Σ γ)`` (the authors' "majority" rule for
     zero signs); if that is zero too the entry stays 0;
  3. disjoint mean: per entry the mean over the tasks whose trimmed value is nonzero and has sign
     ``γ``; 0 where there is none.
  The authors trim over the whole flattened model; here the top-k is per tensor.

``tsv_m`` (Gargiulo et al. 2025, Task Singular Vectors, TSV-Merge). For each matrix:
  each task keeps its top ``r = max(1, ⌊d/T⌋)`` singular triplets; ``U_cat = [U_1[:, :r] … U_T[:, :r]]``
  (m × Tr), ``V_cat`` likewise, ``σ_cat`` the concatenated singular values;
  ``U_⊥ = polar(U_cat)``, ``V_⊥ = polar(V_cat)``; result ``U_⊥ diag(σ_cat) V_⊥ᵀ``.
  With ``d < T`` every task keeps one direction and ``Tr > d``: ``U_cat`` is then wide and its polar
  factor has orthonormal rows instead of columns (the authors' ``int(d/T)`` would keep none).
  Non-matrix tensors: the mean over tasks, as in the authors' released code.
  With a single task all ``d`` directions are kept and the result is ``τ`` (up to round-off).

``iso_c`` (Marczak et al. 2025, "No Task Left Behind", Iso-C). For each matrix:
  ``M = Σ_t τ_t = U diag(σ) Vᵀ``; result ``σ̄ U Vᵀ`` with ``σ̄ = (1/d) Σ_i σ_i``, i.e. the spectrum is
  flattened over all ``d`` thin-SVD directions keeping its sum (the nuclear norm of ``M``). As in the
  authors' code this counts all ``d`` directions even when ``M`` has rank < d: the null directions
  then get weight ``σ̄`` too (their choice among null-space bases is the SVD backend's).
  Non-matrix tensors: the mean over tasks. This follows the authors' code (sum for matrices, mean
  for everything else) rather than a plain sum.

``iso_cts`` (same paper, Iso-CTS). For each matrix, with ``M = Σ_t τ_t = U diag(σ) Vᵀ``:
  sizes: ``k0 = ⌊common_fraction · d⌋``; per task ``s = round((d − k0)/T)`` (ties to even, as the
  authors' ``round``), reduced to ``⌊d/T⌋`` if ``sT > d``; common size ``k = d − sT``. So the
  common and task-specific directions always number exactly ``d`` (the authors adjust ``k`` the same
  way so that the task-specific budget divides evenly among the tasks);
  common subspace ``U_c = U[:, :k]``, ``V_c = V[:, :k]``, ``σ_c = σ[:k]``;
  task-specific: ``τ̂_t = (I − U_c U_cᵀ) τ_t = Û_t diag(σ̂_t) V̂_tᵀ``, keep the top ``s`` triplets;
  ``U* = [U_c, Û_1[:, :s], …, Û_T[:, :s]]``, ``V*`` likewise; ``U_⊥ = polar(U*)``, ``V_⊥ = polar(V*)``;
  result ``σ̄ U_⊥ V_⊥ᵀ`` where, by default (``sigma="combined"``, the authors' code), ``σ̄`` is the mean
  of the ``d`` retained singular values ``[σ_c, σ̂_1[:s], …, σ̂_T[:s]]``; ``sigma="sum"`` uses the
  mean singular value of ``M`` instead (Iso-C's ``σ̄``). With ``common_fraction=1`` (or whenever
  ``s = 0``, e.g. ``d < T/2``) Iso-CTS equals Iso-C. Non-matrix tensors: the mean over tasks.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from fractions import Fraction
from numbers import Real

import torch
from torch import Tensor

__all__ = ["task_arithmetic", "ties", "tsv_m", "iso_c", "iso_cts", "MERGES", "merge"]

MatrixFilter = Callable[[str, Tensor], bool]

_MAX_NAMES = 10  # parameter names listed in an error message


# ----------------------------------------------------------------------------------------------
# input handling


def _names(keys) -> str:
    keys = sorted(keys, key=str)
    shown = ", ".join(repr(k) for k in keys[:_MAX_NAMES])
    return f"[{shown}{f', ... ({len(keys) - _MAX_NAMES} more)' if len(keys) > _MAX_NAMES else ''}]"


def _as_mapping(tau, i: int) -> Mapping[str, Tensor]:
    if isinstance(tau, Mapping):
        return tau
    tensors = getattr(tau, "tensors", None)
    if isinstance(tensors, Mapping):
        return tensors
    raise TypeError(f"taus[{i}] must be a mapping from parameter name to tensor (or have a .tensors "
                    f"mapping), got {type(tau).__name__}")


def _check_taus(taus) -> list[Mapping[str, Tensor]]:
    """The task vectors as a list of mappings, after checking keys, shapes and dtypes."""
    if isinstance(taus, (Mapping, Tensor)) or hasattr(taus, "tensors") or isinstance(taus, (str, bytes)):
        raise TypeError(f"taus must be a sequence of task vectors (one mapping per task), got a single "
                        f"{type(taus).__name__}; wrap it in a list")
    try:
        items = list(taus)
    except TypeError:
        raise TypeError(f"taus must be a sequence of task vectors, got {type(taus).__name__}") from None
    if not items:
        raise ValueError("taus is empty: a merge needs at least one task vector")
    maps = [_as_mapping(tau, i) for i, tau in enumerate(items)]
    keys0 = set(maps[0])
    for i, tau in enumerate(maps[1:], 1):
        keys = set(tau)
        if keys != keys0:
            missing, extra = keys0 - keys, keys - keys0
            parts = []
            if missing:
                parts.append(f"missing {_names(missing)}")
            if extra:
                parts.append(f"extra {_names(extra)}")
            raise ValueError(f"taus[{i}] has different keys than taus[0]: {'; '.join(parts)}")
    for key in maps[0]:
        ref = maps[0][key]
        for i, tau in enumerate(maps):
            t = tau[key]
            if not isinstance(t, Tensor):
                raise TypeError(f"taus[{i}][{key!r}] must be a torch.Tensor, got {type(t).__name__}")
            if not t.is_floating_point():
                raise TypeError(f"taus[{i}][{key!r}] has dtype {t.dtype}; task vectors must be real floating point")
            if t.shape != ref.shape:
                raise ValueError(f"taus[{i}][{key!r}] has shape {tuple(t.shape)} but taus[0][{key!r}] has shape "
                                 f"{tuple(ref.shape)}")
    return maps


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _stack(maps: Sequence[Mapping[str, Tensor]], key: str) -> Tensor:
    """(T, *shape) in the compute dtype, on the device of taus[0][key]."""
    ref = maps[0][key]
    dtype = _compute_dtype(ref.dtype)
    return torch.stack([tau[key].detach().to(device=ref.device, dtype=dtype) for tau in maps])


def _out(x: Tensor, ref: Tensor) -> Tensor:
    return x.to(device=ref.device, dtype=ref.dtype)


def _default_filter(name: str, t: Tensor) -> bool:
    return t.ndim == 2


def _matrix_filter(matrix_filter: MatrixFilter | None) -> MatrixFilter:
    if matrix_filter is None:
        return _default_filter
    if not callable(matrix_filter):
        raise TypeError(f"matrix_filter must be a callable (name, tensor) -> bool, got {type(matrix_filter).__name__}")

    def checked(name: str, t: Tensor) -> bool:
        return t.ndim == 2 and bool(matrix_filter(name, t))

    return checked


def _fraction(value, name: str, *, low_open: bool) -> Fraction:
    """``value`` as an exact fraction (of its shortest decimal repr in its own precision: a numpy float32 0.2 is
    1/5, not the double nearest it) after a range check."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    v = float(value)
    ok = (0.0 < v <= 1.0) if low_open else (0.0 <= v <= 1.0)
    if not ok:
        raise ValueError(f"{name} must be in {'(0, 1]' if low_open else '[0, 1]'}, got {value!r}")
    try:
        return Fraction(str(value))
    except ValueError:  # a Real whose str is no decimal
        return Fraction(repr(v))


# ----------------------------------------------------------------------------------------------
# linear algebra


def _svd(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD ``x = U diag(S) Vh`` (batched over leading dims)."""
    return torch.linalg.svd(x, full_matrices=False)


def _polar(a: Tensor) -> Tensor:
    """Polar factor ``P Qᵀ`` of ``a = P S Qᵀ``: orthonormal columns (rows if ``a`` is wide)."""
    p, _, qh = _svd(a)
    return p @ qh


# ----------------------------------------------------------------------------------------------
# merges


@torch.no_grad()
def task_arithmetic(taus) -> dict[str, Tensor]:
    """Task Arithmetic (Ilharco et al. 2023): ``Σ_t τ_t``."""
    maps = _check_taus(taus)
    return {key: _out(_stack(maps, key).sum(0), maps[0][key]) for key in maps[0]}


@torch.no_grad()
def ties(taus, k: float = 0.2) -> dict[str, Tensor]:
    """TIES-Merging (Yadav et al. 2023): per tensor, each task keeps its top-``k`` fraction of entries by magnitude
    (default 0.2), each entry's sign is elected by total mass, and the tasks that agree are averaged.

    ``k`` in (0, 1]: the kept entries have magnitude ``≥`` the ``ceil(k·numel)``-th largest magnitude (ties at the
    threshold are all kept). One task gives its trimmed ``τ``.
    """
    frac = _fraction(k, "k", low_open=True)
    maps = _check_taus(taus)
    out: dict[str, Tensor] = {}
    for key in maps[0]:
        ref = maps[0][key]
        x = _stack(maps, key).reshape(len(maps), -1)  # (T, n)
        n = x.shape[1]
        if n == 0:
            out[key] = torch.zeros_like(ref)
            continue
        n_keep = min(n, max(1, math.ceil(frac * n)))
        mag = x.abs()
        # n_keep-th largest magnitude per task = (n - n_keep + 1)-th smallest
        thresh = mag.kthvalue(n - n_keep + 1, dim=1, keepdim=True).values
        trimmed = torch.where(mag >= thresh, x, torch.zeros((), dtype=x.dtype, device=x.device))
        elected = torch.sign(trimmed.sum(0))
        elected = torch.where(elected == 0, torch.sign(elected.sum()), elected)
        agree = (trimmed != 0) & (torch.sign(trimmed) == elected)
        count = agree.sum(0).clamp(min=1).to(x.dtype)
        merged = torch.where(agree, trimmed, torch.zeros((), dtype=x.dtype, device=x.device)).sum(0) / count
        out[key] = _out(merged.reshape(ref.shape), ref)
    return out


def _spectral(taus, matrix_filter: MatrixFilter | None, merge_matrix) -> dict[str, Tensor]:
    """The per-tensor frame of the SVD-based merges: ``merge_matrix(x)`` for each matrix (``x``: the
    (T, m, n) stack of the tasks' blocks, m, n > 0); the mean over tasks for other tensors (and for
    matrices ``matrix_filter(name, tensor)`` rejects); zeros for empty matrices."""
    maps = _check_taus(taus)
    is_matrix = _matrix_filter(matrix_filter)
    out: dict[str, Tensor] = {}
    for key in maps[0]:
        ref = maps[0][key]
        x = _stack(maps, key)
        if not is_matrix(key, ref):
            out[key] = _out(x.mean(0), ref)
        elif min(ref.shape) == 0:
            out[key] = torch.zeros_like(ref)
        else:
            out[key] = _out(merge_matrix(x), ref)
    return out


@torch.no_grad()
def tsv_m(taus, *, matrix_filter: MatrixFilter | None = None) -> dict[str, Tensor]:
    """TSV-Merge (Gargiulo et al. 2025): per matrix, each task keeps its top ``max(1, ⌊d/T⌋)`` singular triplets;
    the polar factors of the concatenated left and right singular vectors are recombined with the concatenated
    singular values. Other tensors: mean over tasks.

    Matrices rejected by ``matrix_filter(name, tensor)`` count as other tensors.
    """
    def merge_matrix(x):
        T, m, n = x.shape
        r = max(1, min(m, n) // T)
        u, s, vh = _svd(x)  # (T, m, d), (T, d), (T, d, n)
        u_cat = u[:, :, :r].transpose(0, 1).reshape(m, T * r)  # task-major column blocks
        s_cat = s[:, :r].reshape(T * r)
        vh_cat = vh[:, :r, :].reshape(T * r, n)
        return (_polar(u_cat) * s_cat) @ _polar(vh_cat)  # polar(V_cat)ᵀ = polar(V_catᵀ)
    return _spectral(taus, matrix_filter, merge_matrix)


@torch.no_grad()
def iso_c(taus, *, matrix_filter: MatrixFilter | None = None) -> dict[str, Tensor]:
    """Iso-C (Marczak et al. 2025): ``σ̄ U Vᵀ`` of ``M = Σ_t τ_t = U diag(σ) Vᵀ``, ``σ̄ = mean(σ)`` over
    the ``d = min(m, n)`` thin-SVD directions. Other tensors: mean over tasks (the authors' code)."""
    def merge_matrix(x):
        u, s, vh = _svd(x.sum(0))
        return s.mean() * (u @ vh)
    return _spectral(taus, matrix_filter, merge_matrix)


def _cts_sizes(d: int, T: int, frac: Fraction) -> tuple[int, int]:
    """(common size k, directions per task s) with k + s·T = d (see the module docstring)."""
    k0 = math.floor(frac * d)
    s = round(Fraction(d - k0, T))
    if s * T > d:
        s = d // T
    return d - s * T, s


@torch.no_grad()
def iso_cts(taus, common_fraction: float = 0.8, *, sigma: str = "combined",
            matrix_filter: MatrixFilter | None = None) -> dict[str, Tensor]:
    """Iso-CTS (Marczak et al. 2025): Iso-C over a common subspace (the top singular directions of
    ``Σ_t τ_t``) and each task's top directions off it, with a flat spectrum. Other tensors: mean over tasks.

    ``common_fraction`` in [0, 1]: nominal share of the ``d`` directions taken by the common subspace.
    ``sigma``: ``"combined"`` (default, the authors' code) sets every singular value to the mean of
    the retained spectrum (common σ of the sum and task-specific σ of the projections);
    ``"sum"`` to the mean singular value of ``Σ_t τ_t`` (Iso-C's σ̄). Other tensors: mean over tasks.
    """
    frac = _fraction(common_fraction, "common_fraction", low_open=False)
    if sigma not in ("combined", "sum"):
        raise ValueError(f"sigma must be 'combined' or 'sum', got {sigma!r}")
    def merge_matrix(x):
        T, m, n = x.shape
        k, s = _cts_sizes(min(m, n), T, frac)
        u, sv, vh = _svd(x.sum(0))
        u_parts, s_parts, vh_parts = [u[:, :k]], [sv[:k]], [vh[:k]]
        if s > 0:
            uc = u[:, :k]
            resid = x - uc @ (uc.transpose(0, 1) @ x)  # (I − U_c U_cᵀ) τ_t, batched over tasks
            ut, st, vht = _svd(resid)
            u_parts.append(ut[:, :, :s].transpose(0, 1).reshape(m, T * s))
            s_parts.append(st[:, :s].reshape(T * s))
            vh_parts.append(vht[:, :s, :].reshape(T * s, n))
        sbar = torch.cat(s_parts).mean() if sigma == "combined" else sv.mean()
        return sbar * (_polar(torch.cat(u_parts, 1)) @ _polar(torch.cat(vh_parts, 0)))
    return _spectral(taus, matrix_filter, merge_matrix)


MERGES: dict[str, Callable[..., dict[str, Tensor]]] = {
    "task_arithmetic": task_arithmetic,
    "ties": ties,
    "tsv_m": tsv_m,
    "iso_c": iso_c,
    "iso_cts": iso_cts,
}


def merge(name: str, taus, **options) -> dict[str, Tensor]:
    """``MERGES[name](taus, **options)``; ValueError listing the valid names for an unknown ``name``."""
    if not isinstance(name, str) or name not in MERGES:
        raise ValueError(f"unknown merge {name!r}; valid names: {', '.join(MERGES)}")
    return MERGES[name](taus, **options)
