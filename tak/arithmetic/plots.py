"""Plots of the task-vector analyses (``tak.arithmetic.analyses``) as PNG files.

Every function takes data and an output path, draws on a ``matplotlib.figure.Figure`` with the
Agg canvas (no pyplot, no global state, no display needed), writes the PNG atomically (a temporary
file in the same folder, then ``os.replace``), closes the figure and returns the ``Path``.
Parent folders are created. Data may be torch tensors, numpy arrays or lists.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..io import atomic_file

__all__ = ["disentanglement_heatmap", "histograms", "alpha_sweeps", "bar_table"]


def _array(x: Any, what: str) -> np.ndarray:
    try:
        import torch

        if isinstance(x, torch.Tensor):
            x = x.detach().cpu().double().numpy()
    except ImportError:  # pragma: no cover - torch is a dependency of the package
        pass
    arr = np.asarray(x, dtype=np.float64)
    if arr.size == 0:
        raise ValueError(f"{what}: empty data")
    return arr


def _figure(width: float = 6.4, height: float = 4.8):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path) -> Path:
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"plots write PNG files; got {path}")
    try:
        with atomic_file(path) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        fig.clear()
    return path


def _edges(values: np.ndarray) -> np.ndarray:
    """Cell edges around (sorted or not) grid points: midpoints, extrapolated at the ends."""
    if values.size == 1:
        return np.array([values[0] - 0.5, values[0] + 0.5])
    mid = (values[1:] + values[:-1]) / 2
    return np.concatenate([[2 * values[0] - mid[0]], mid, [2 * values[-1] - mid[-1]]])


def disentanglement_heatmap(xi, alphas1, alphas2, path, title: str = "Disentanglement error ξ(α1, α2)",
                            *, vmax: float | None = 2.0, label1: str = "α1", label2: str = "α2",
                            annotate: bool | None = None) -> Path:
    """Heat map of ξ (``xi[i, j]`` at α1 = ``alphas1[i]``, α2 = ``alphas2[j]``), as in TAK Fig. 9.

    α1 runs along x, α2 along y; dark is 0 (no interference). The colour scale is fixed to [0, 2]
    (ξ's range) by default so maps of different methods compare; ``vmax=None`` fits the data.
    The diagonal α1 = α2 (the usual operating point) is dashed. ``annotate`` writes each cell's
    value; by default only for grids up to 12 × 12.
    """
    xi = _array(xi, "disentanglement_heatmap")
    a1 = _array(alphas1, "disentanglement_heatmap (alphas1)").reshape(-1)
    a2 = _array(alphas2, "disentanglement_heatmap (alphas2)").reshape(-1)
    if xi.shape != (a1.size, a2.size):
        raise ValueError(f"disentanglement_heatmap: xi has shape {xi.shape}, expected "
                         f"(len(alphas1), len(alphas2)) = ({a1.size}, {a2.size})")
    fig = _figure(5.6, 4.8)
    ax = fig.add_subplot()
    mesh = ax.pcolormesh(_edges(a1), _edges(a2), xi.T, cmap="magma", vmin=0.0, vmax=vmax, shading="flat")
    fig.colorbar(mesh, ax=ax, label="ξ (fraction of predictions changed, summed over tasks)")
    lo, hi = max(a1.min(), a2.min()), min(a1.max(), a2.max())
    if lo < hi:
        ax.plot([lo, hi], [lo, hi], ls="--", lw=1, color="white", alpha=0.7)
    if annotate is None:
        annotate = a1.size <= 12 and a2.size <= 12
    if annotate:
        top = vmax if vmax is not None else (np.nanmax(xi) or 1.0)
        for i in range(a1.size):
            for j in range(a2.size):
                ax.text(a1[i], a2[j], f"{xi[i, j]:.2f}", ha="center", va="center", fontsize=7,
                        color="black" if xi[i, j] > 0.6 * top else "white")
    ax.set_xlabel(label1)
    ax.set_ylabel(label2)
    ax.set_title(title)
    return _save(fig, path)


def histograms(groups: Mapping[str, Any], path, title: str, xlabel: str, log: bool = False,
               *, bins: int = 50, density: bool = True, ylabel: str | None = None) -> Path:
    """Overlaid histograms, one per group (e.g. normalcy scores in-task vs out-of-task, or the
    linearization error per dataset), on shared bin edges so the groups compare.

    ``log=True`` uses a logarithmic x axis with log-spaced bins (scores spanning decades); values
    ≤ 0 cannot be drawn there and are counted in the legend as "k ≤ 0 not shown". ``density``
    (default) plots each group's fraction of examples per bin (bars of a group sum to 1, on linear
    and log axes alike), so groups of different sizes compare; ``density=False`` plots counts.
    """
    if not groups:
        raise ValueError("histograms: no groups given")
    data = {str(name): _array(v, f"histograms ({name})").reshape(-1) for name, v in groups.items()}
    finite = {name: v[np.isfinite(v)] for name, v in data.items()}
    values = np.concatenate(list(finite.values()))
    if values.size == 0:
        raise ValueError("histograms: no finite values")
    dropped = {name: 0 for name in data}
    if log:
        positive = values[values > 0]
        if positive.size == 0:
            raise ValueError("histograms: log=True needs positive values")
        lo, hi = positive.min(), positive.max()
        if lo == hi:
            lo, hi = lo / 2, hi * 2
        edges = np.geomspace(lo, hi, bins + 1)
        for name, v in finite.items():
            dropped[name] = int((v <= 0).sum())
            finite[name] = v[v > 0]
    else:
        lo, hi = values.min(), values.max()
        if lo == hi:
            lo, hi = lo - 0.5, hi + 0.5
        edges = np.linspace(lo, hi, bins + 1)
    fig = _figure()
    ax = fig.add_subplot()
    for name, v in finite.items():
        label = f"{name} (n={data[name].size}"
        label += f", {dropped[name]} ≤ 0 not shown)" if dropped[name] else ")"
        if v.size == 0:
            ax.plot([], [], label=label)
            continue
        weights = np.full(v.size, 1.0 / data[name].size) if density else None
        _, _, patches = ax.hist(v, bins=edges, weights=weights, alpha=0.45, label=label)
        color = patches[0].get_facecolor()[:3] if len(patches) else None
        ax.hist(v, bins=edges, weights=weights, histtype="step", lw=1.2, color=color)
    if log:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel or ("fraction of examples" if density else "count"))
    ax.set_title(title)
    ax.legend()
    return _save(fig, path)


def alpha_sweeps(curves: Mapping[str, tuple[Sequence[float], Sequence[float]]], path, title: str,
                 ylabel: str = "accuracy (%)", *, xlabel: str = "α", marks: Mapping[str, float] | None = None) -> Path:
    """One line per method of a score against the scaling coefficient α (TAK Fig. 4a, 11, 12).

    ``curves = {method: (alphas, values)}``; ``marks = {method: α}`` stars the point of that α (the one chosen).
    """
    if not curves:
        raise ValueError("alpha_sweeps: no curves given")
    fig = _figure()
    ax = fig.add_subplot()
    for name, pair in curves.items():
        if len(pair) != 2:
            raise ValueError(f"alpha_sweeps: curve {name!r} must be (alphas, values)")
        x = _array(pair[0], f"alpha_sweeps ({name}, alphas)").reshape(-1)
        y = _array(pair[1], f"alpha_sweeps ({name}, values)").reshape(-1)
        if x.size != y.size:
            raise ValueError(f"alpha_sweeps: curve {name!r} has {x.size} alphas but {y.size} values")
        order = np.argsort(x, kind="stable")
        (line,) = ax.plot(x[order], y[order], marker="o", ms=3, label=str(name))
        if marks and name in marks:
            at = np.flatnonzero(x == marks[name])
            if not at.size:
                raise ValueError(f"alpha_sweeps: marks[{name!r}] = {marks[name]} is not among the curve's alphas")
            ax.plot([x[at[0]]], [y[at[0]]], marker="*", ms=12, color=line.get_color(), mec="black", mew=0.5)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def bar_table(table: Mapping[str, Mapping[str, float]], path, title: str, ylabel: str = "accuracy (%)",
              *, tasks: Sequence[str] | None = None, average: bool = False) -> Path:
    """Grouped bars of per-task values for several methods (DELTA Fig. 6).

    ``table = {method: {task: value}}``; tasks along x (``tasks`` fixes their order, by default the
    order of first appearance), one bar per method in each group. Missing cells are left out.
    ``average=True`` appends an "average" group, the mean over each method's tasks.
    """
    if not table:
        raise ValueError("bar_table: no methods given")
    if tasks is None:
        tasks = []
        for row in table.values():
            tasks.extend(t for t in row if t not in tasks)
    tasks = [str(t) for t in tasks]
    if not tasks:
        raise ValueError("bar_table: no tasks given")
    methods = list(table)
    values = np.full((len(methods), len(tasks)), np.nan)
    for m, name in enumerate(methods):
        for t, task in enumerate(tasks):
            v = table[name].get(task)
            if v is not None:
                values[m, t] = float(_array(v, f"bar_table ({name}, {task})").reshape(-1)[0])
    if average:
        with np.errstate(invalid="ignore"):
            means = np.array([np.nanmean(r) if np.isfinite(r).any() else np.nan for r in values])
        values = np.concatenate([values, means[:, None]], axis=1)
        tasks = tasks + ["average"]
    fig = _figure(max(6.4, 0.35 * len(tasks) * max(len(methods), 2) + 2), 4.8)
    ax = fig.add_subplot()
    width = 0.8 / len(methods)
    x = np.arange(len(tasks))
    for m, name in enumerate(methods):
        ok = np.isfinite(values[m])
        ax.bar(x[ok] - 0.4 + width * (m + 0.5), values[m][ok], width, label=str(name))
    ax.set_xticks(x, tasks, rotation=30 if len(tasks) > 6 else 0, ha="right" if len(tasks) > 6 else "center")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize="small")
    finite = values[np.isfinite(values)]
    if finite.size and math.isfinite(finite.min()) and finite.min() >= 0:
        ax.set_ylim(bottom=0)
    return _save(fig, path)
