"""Curvature of several tasks at once, from per-task KFAC factors (no refitting).

With λ_t = |D_t| / Σ_s |D_s| (``sizes`` = |D_t|, the tasks' data set sizes):

- TAK Eq. 8 (``merge_kfac``): one KFAC with B = Σ_t B_t, A = Σ_t λ_t A_t per layer;
- pooled (``pool_kfac``): B = Σ_t λ_t B_t, A = Σ_t λ_t A_t, the KFAC of the tasks' data taken together (what one fit
  over their union estimates): a reference set of several tasks (universal factors, TAK Sec. F.4), at one fit's scale;
- TAK Eq. 7 (``TaskFactors``): the per-task factors kept apart, q(τ) = Σ_t λ_t vec(τ)ᵀ(B_t ⊗ A_t)vec(τ),
  T times the cost of one quadratic form, still one ``kfac_kernels.quadratic_forms`` call.

"All tasks but t" (leave-one-out): ``merge_kfac_except(factors, sizes, t)`` and
``TaskFactors(factors, sizes).without(t)``, both with λ renormalized over the remaining tasks.
"""
import dataclasses
import math
import numbers

import torch

import kfac_kernels as kk

from .kfac import KFAC

# meta entries that belong to one task; a merge keeps them per task under meta["merge"]["parts"].
_PER_TASK = ("task", "n_examples", "n_rows", "mc_samples", "seed", "merge")


def merge_kfac(factors: list[KFAC], sizes: list) -> KFAC:
    """TAK Eq. 8: per layer B = Σ_t B_t and A = Σ_t λ_t A_t (summed in float64, returned in the tasks'
    dtype), λ_t = sizes[t] / Σ sizes. The factors must be dense KFACs of one architecture, fitted
    with the same ``tokens`` and ``exact`` conventions. Exact blocks (``DenseFactors``, A = [[1]])
    merge by the same rule to B = Σ_t G_t: the scale Eq. 8 gives every block, (Σ_t B_t) ⊗ (Σ_t λ_t A_t)
    ≈ Σ_t B_t ⊗ A_t (TAK App. C)."""
    return _combine("merge_kfac", factors, sizes, pooled=False)


def pool_kfac(factors: list[KFAC], sizes: list) -> KFAC:
    """The KFAC of the tasks' data pooled: per layer B = Σ_t λ_t B_t and A = Σ_t λ_t A_t, λ_t = sizes[t] / Σ sizes
    (exact blocks: G = Σ_t λ_t G_t). Factors are means over examples, so with ``sizes`` the examples each was fitted
    on this is the fit over all of them at once; with data set sizes, its estimate. Universal factors of a
    reference set of several tasks are this: one fit's scale however the set is cut into tasks (Eq. 8's B grows
    with their number). Same requirements as ``merge_kfac``."""
    return _combine("pool_kfac", factors, sizes, pooled=True)


def _combine(op: str, factors, sizes, pooled: bool) -> KFAC:
    sizes, lambdas = _check(op, factors, sizes, dense=True)
    merged = {}
    for name, lf in factors[0].items():
        B = sum((lam if pooled else 1.0) * f[name].B.double() for lam, f in zip(lambdas, factors))
        A = sum(lam * f[name].A.double() for lam, f in zip(lambdas, factors))
        merged[name] = dataclasses.replace(lf, A=A.to(lf.A.dtype), B=B.to(lf.B.dtype))
    parts = [f.meta for f in factors]
    meta = {k: v for k, v in parts[0].items() if k not in _PER_TASK}
    rule = "pooled: B = sum_t lambda_t B_t" if pooled else "TAK Eq. 8 merge: B = sum_t B_t"
    meta["scale"] = (f"{rule}, A = sum_t lambda_t A_t, lambda_t = sizes[t] / sum(sizes); "
                     f"per task: {parts[0].get('scale')}")
    if all("n_examples" in p for p in parts):
        meta["n_examples"] = sum(p["n_examples"] for p in parts)
    meta["merge"] = {"sizes": sizes, "lambdas": lambdas,
                     "parts": [{k: p[k] for k in _PER_TASK if k in p} for p in parts]}
    if any("task" in p for p in parts):
        meta["merge"]["tasks"] = [p.get("task") for p in parts]
    return KFAC(merged, meta)


def merge_kfac_except(factors: list[KFAC], sizes: list, t: int) -> KFAC:
    """``merge_kfac`` of all tasks but ``factors[t]`` (λ over the others)."""
    return merge_kfac(*_leave_out("merge_kfac_except", factors, sizes, t))


class TaskFactors:
    """TAK Eq. 7: per-task KFACs ``tasks`` with weights ``lambdas`` (λ_t = sizes[t] / Σ sizes), used
    through ``quadratic_form`` like a ``KFAC``. Factors may be compressed."""

    def __init__(self, factors: list[KFAC], sizes: list):
        self.sizes, self.lambdas = _check("TaskFactors", factors, sizes, dense=False)
        self.tasks = list(factors)

    def __len__(self) -> int:
        return len(self.tasks)

    def __repr__(self) -> str:
        return f"TaskFactors({len(self)} tasks, λ={[round(lam, 4) for lam in self.lambdas]})"

    def quadratic_form(self, taus: dict, weights=None) -> torch.Tensor:
        """Σ_t λ_t Σ_l w_l vec(τ_l)ᵀ (B_{t,l} ⊗ A_{t,l}) vec(τ_l) over the layers found in ``taus`` (same
        keys as ``KFAC.quadratic_form``), in one ``kfac_kernels.quadratic_forms`` call over tasks ×
        layers; differentiable in τ. ``weights``: {layer: w}."""
        names, blocks = self.tasks[0].blocks(taus)
        w = self.tasks[0].layer_weights(weights, names)
        all_taus, Bs, As, ws = [], [], [], []
        for lam, f in zip(self.lambdas, self.tasks):
            for name, block, wl in zip(names, blocks, w):
                all_taus.append(block)
                Bs.append(f[name].B)
                As.append(f[name].A)
                ws.append(lam * wl)
        return kk.quadratic_forms(all_taus, Bs, As, weights=ws)

    def without(self, t: int) -> "TaskFactors":
        """The same for all tasks but ``tasks[t]`` (λ over the others)."""
        return TaskFactors(*_leave_out("TaskFactors.without", self.tasks, self.sizes, t))


def _leave_out(op: str, factors, sizes, t):
    n = len(factors)
    if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < n:
        raise ValueError(f"{op}: t must be a task index in [0, {n}), got {t!r}")
    if n < 2:
        raise ValueError(f"{op}: leaving out task {t} of {n} leaves no task")
    if len(sizes) != n:
        raise ValueError(f"{op}: {n} factors but {len(sizes)} sizes (one data set size per task)")
    return [f for i, f in enumerate(factors) if i != t], [s for i, s in enumerate(sizes) if i != t]


def _check(op: str, factors, sizes, dense: bool) -> tuple[list, list[float]]:
    """(sizes as Python numbers, λ_t = sizes[t] / Σ sizes) after checking the factors can be combined
    (ValueError naming what differs)."""
    factors, sizes = list(factors), list(sizes)
    if not factors:
        raise ValueError(f"{op}: factors is empty")
    if len(sizes) != len(factors):
        raise ValueError(f"{op}: {len(factors)} factors but {len(sizes)} sizes (one data set size per task)")
    for i, s in enumerate(sizes):
        if isinstance(s, bool) or not isinstance(s, numbers.Real) or not math.isfinite(s) or s <= 0:
            raise ValueError(f"{op}: sizes[{i}] must be a positive number (the task's data set size), got {s!r}")
    sizes = [int(s) if isinstance(s, numbers.Integral) else float(s) for s in sizes]
    first = factors[0]
    for i, f in enumerate(factors):
        if not isinstance(f, KFAC) or f.meta.get("kind") != "kfac":
            kind = getattr(f, "meta", {}).get("kind")
            raise ValueError(f"{op}: factors[{i}] is a {type(f).__name__} of kind {kind!r}, "
                             "need KFAC factors (kind 'kfac')")
        if list(f) != list(first):
            missing, extra = sorted(set(first) - set(f)), sorted(set(f) - set(first))
            raise ValueError(f"{op}: factors[{i}] has other layers than factors[0]: missing {missing[:8]}, "
                             f"extra {extra[:8]}" + ("" if missing or extra else " (same names, other order)"))
        for key in ("tokens", "exact", "fingerprint"):
            if f.meta.get(key) != first.meta.get(key):
                raise ValueError(f"{op}: factors[{i}] has {key}={f.meta.get(key)!r}, factors[0] has "
                                 f"{key}={first.meta.get(key)!r}")
        for name, lf in f.items():
            ref = first[name]
            if _params(lf) != _params(ref):
                raise ValueError(f"{op}: layer {name!r} is {_params(lf)} in factors[{i}], {_params(ref)} in factors[0]")
            for side in ("A", "B"):
                F = getattr(lf, side)
                if tuple(F.shape) != tuple(getattr(ref, side).shape):
                    raise ValueError(f"{op}: {name}.{side} has shape {tuple(F.shape)} in factors[{i}], "
                                     f"{tuple(getattr(ref, side).shape)} in factors[0]")
                if dense and not isinstance(F, torch.Tensor):
                    raise ValueError(f"{op}: {name}.{side} of factors[{i}] is a {type(F).__name__}; merge dense "
                                     "factors, then compress the merge")
    total = float(sum(sizes))
    return sizes, [s / total for s in sizes]


def _params(lf) -> tuple:
    """A layer's class and its fields other than the factors (the parameters it belongs to)."""
    return (type(lf).__name__, *(getattr(lf, f.name) for f in dataclasses.fields(lf) if f.name not in ("A", "B")))
