"""Analyses of task vectors: weight disentanglement, linearization error, task localization.

These functions know nothing about models. They take callables that evaluate a model at
``θ0 + τ`` for a task vector ``τ`` and return per-example outputs, so the same code serves a
plain network, a linearized one (``f(θ0) + J τ``) or a toy function in a test.

Conventions
-----------
- A *task vector* is ``dict[str, Tensor]`` (parameter name -> τ block), or ``None`` meaning θ0
  (τ = 0). Objects with a ``.tensors`` dict (``tak.task_vector.TaskVector``) are accepted too;
  the callables always receive a plain mapping or ``None``.
- ``batches`` is an iterable of model inputs (tensors, dicts, ...). It is materialized once with
  ``list(...)``, so a one-shot iterator works as well. An empty collection of batches, a batch
  with zero examples overall, an empty α grid, ... raise ``ValueError``: an analysis of nothing is
  an error, never a silent 0.
- Everything runs under ``torch.no_grad()``; results are CPU tensors (float64 for rates and
  probabilities; per-example values keep the callable's dtype, upcast to at least float32).

Definitions (the papers in ``/work/shared/papers``)
---------------------------------------------------
- Disentanglement error (Ortiz-Jiménez et al. 2023; TAK paper Eq. 19, Fig. 9)::

      ξ(α1, α2) = Σ_{t=1,2} E_{x∈D_t} 1[argmax f(x; θ0 + α_t τ_t) ≠ argmax f(x; θ0 + α1 τ1 + α2 τ2)]

  0 means the two task vectors combine without changing any prediction on either task; the
  maximum is 2.
- Linearization error (DELTA paper Eq. 9, Fig. 4), per example::

      ‖ (1/T) Σ_t f(x; θ0 + τ_t) − f(x; θ0 + (1/T) Σ_t τ_t) ‖₁

  exactly zero when f is affine in θ.
- Normalcy score of input x for task t (TAK paper Sec. 5, Fig. 5): ``‖J_θ f(x; θ0) τ_t‖²``. With
  curvature regularization it is pushed to zero on inputs *not* of task t, so a *high* score says
  "x belongs to task t"; :func:`auroc` measures that separation with in-task inputs as the
  positives.
- Support localization (DELTA paper Fig. 5), per example: the edit distance
  ``(1/d) ‖f(x; θ0 + τ_t) − f(x; θ0)‖²`` on in-domain and on out-of-domain inputs.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Optional

import torch

TaskVectorLike = Optional[Mapping[str, torch.Tensor]]

__all__ = [
    "combine",
    "disentanglement_error",
    "linearization_error",
    "normalcy_scores",
    "auroc",
    "support_localization",
    "alpha_sweep",
]


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------

def _tensors(tau: Any) -> Optional[Mapping[str, torch.Tensor]]:
    """The {name: tensor} mapping of a task vector (None stays None)."""
    if tau is None:
        return None
    if isinstance(tau, Mapping):
        return tau
    inner = getattr(tau, "tensors", None)
    if isinstance(inner, Mapping):
        return inner
    raise TypeError(f"a task vector is a dict[str, Tensor], an object with .tensors, or None; got {type(tau).__name__}")


def combine(taus: Sequence[TaskVectorLike], alphas: Sequence[float]) -> Optional[dict[str, torch.Tensor]]:
    """``Σ_t α_t τ_t`` as a new ``dict[str, Tensor]``.

    ``None`` entries are θ0 (τ = 0) and contribute nothing. A name missing from some task vectors
    counts as zero there (the union of names is returned); the same name must have the same shape
    everywhere. Returns ``None`` when every τ is ``None`` (the combination is θ0 itself). The
    inputs are never modified; sums run in float32 at least (float64 for float64), and each result has its
    name's dtype in the first task vector holding it.
    """
    taus = list(taus)
    alphas = [float(a) for a in alphas]
    if len(taus) != len(alphas):
        raise ValueError(f"combine: {len(taus)} task vectors but {len(alphas)} coefficients")
    if not taus:
        raise ValueError("combine: no task vectors given")
    out: dict[str, torch.Tensor] = {}
    dtypes: dict[str, torch.dtype] = {}
    any_tau = False
    for i, (tau, alpha) in enumerate(zip(taus, alphas)):
        tensors = _tensors(tau)
        if tensors is None:
            continue
        any_tau = True
        for name, value in tensors.items():
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"combine: task vector {i}, {name!r} is a {type(value).__name__}, not a Tensor")
            if name in out:
                if out[name].shape != value.shape:
                    raise ValueError(f"combine: {name!r} has shape {tuple(out[name].shape)} in an earlier task "
                                     f"vector but {tuple(value.shape)} in task vector {i}")
                out[name] = out[name] + alpha * value.to(out[name].dtype)
            else:
                dtypes[name] = value.dtype
                out[name] = alpha * value.to(torch.promote_types(value.dtype, torch.float32))
    return {k: v.to(dtypes[k]) for k, v in out.items()} if any_tau else None


def _batch_list(batches: Iterable, what: str) -> list:
    if batches is None:
        raise ValueError(f"{what}: batches is None")
    if isinstance(batches, torch.Tensor):
        raise TypeError(f"{what}: batches must be an iterable of batches (e.g. a list of tensors), "
                        "not a single tensor; wrap it as [x]")
    out = list(batches)
    if not out:
        raise ValueError(f"{what}: no batches given (an empty batch list is an error, not a zero)")
    return out


def _alpha_list(alphas: Iterable[float], what: str) -> list[float]:
    out = [float(a) for a in alphas]
    if not out:
        raise ValueError(f"{what}: empty α grid")
    bad = [a for a in out if not math.isfinite(a)]
    if bad:
        raise ValueError(f"{what}: α values must be finite, got {bad}")
    return out


def _per_example(value: Any, what: str, *, name: str) -> torch.Tensor:
    """A callable's output as a CPU tensor of shape (N, D), float32 or wider."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{what}: {name} must return a Tensor, got {type(value).__name__}")
    if value.dim() == 0:
        raise ValueError(f"{what}: {name} returned a 0-dim tensor; expected per-example outputs (N, D)")
    value = value.detach()
    if value.dim() == 1:
        value = value.unsqueeze(1)
    elif value.dim() > 2:
        value = value.reshape(value.shape[0], -1)
    if not value.is_floating_point():
        value = value.to(torch.float32)
    elif torch.finfo(value.dtype).bits < 32:
        value = value.float()
    return value.cpu()


def _cat(parts: list[torch.Tensor], what: str) -> torch.Tensor:
    out = torch.cat(parts) if parts else torch.empty(0)
    if out.numel() == 0:
        raise ValueError(f"{what}: the batches hold no examples")
    return out


# ----------------------------------------------------------------------------------------------
# disentanglement error
# ----------------------------------------------------------------------------------------------

def _labels(predict: Callable, tau: Any, batches: list, what: str) -> list[torch.Tensor]:
    labels = []
    for batch in batches:
        logits = predict(tau, batch)
        if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
            shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            raise ValueError(f"{what}: predict must return logits of shape (N, C), got {shape}")
        labels.append(logits.detach().argmax(dim=1).cpu())
    return labels


def disentanglement_error(
    predict: Callable[[TaskVectorLike, Any], torch.Tensor],
    tau1: TaskVectorLike,
    tau2: TaskVectorLike,
    batches1: Iterable,
    batches2: Iterable,
    alphas1: Iterable[float],
    alphas2: Iterable[float],
) -> torch.Tensor:
    """The disentanglement error ξ(α1, α2) on a grid (TAK Eq. 19; Ortiz-Jiménez et al. 2023).

    ``ξ(α1, α2) = Σ_{t=1,2} E_{x∈D_t} 1[argmax f(x; θ0+α_t τ_t) ≠ argmax f(x; θ0+α1 τ1+α2 τ2)]``,
    the fraction of task-t inputs whose prediction changes when the other task vector is added,
    summed over both tasks (each expectation over all examples of ``batches_t``).

    ``predict(task_vector_or_None, batch) -> logits (N, C)`` evaluates the model at θ0 + τ.
    ``batches1`` / ``batches2`` hold inputs of task 1 / task 2. The single-task predictions
    ``f(x; θ0 + α_t τ_t)`` are computed once per α_t and reused across the grid, so the cost is
    ``len(alphas1)·len(alphas2)·(n1 + n2) + len(alphas1)·n1 + len(alphas2)·n2`` example forwards.

    Returns a float64 CPU tensor of shape ``(len(alphas1), len(alphas2))``, values in [0, 2];
    row i is α1 = alphas1[i], column j is α2 = alphas2[j].
    """
    what = "disentanglement_error"
    b1 = _batch_list(batches1, f"{what} (task 1)")
    b2 = _batch_list(batches2, f"{what} (task 2)")
    a1 = _alpha_list(alphas1, f"{what} (alphas1)")
    a2 = _alpha_list(alphas2, f"{what} (alphas2)")
    if _tensors(tau1) is None or _tensors(tau2) is None:
        raise ValueError(f"{what}: tau1 and tau2 must be task vectors, not None")

    with torch.no_grad():
        # f(x; θ0 + α_t τ_t) on D_t, once per α_t
        single1 = [_labels(predict, combine([tau1], [a]), b1, what) for a in a1]
        single2 = [_labels(predict, combine([tau2], [a]), b2, what) for a in a2]
        n1 = sum(lab.numel() for lab in single1[0])
        n2 = sum(lab.numel() for lab in single2[0])
        if n1 == 0 or n2 == 0:
            raise ValueError(f"{what}: the batches of task {1 if n1 == 0 else 2} hold no examples")

        xi = torch.zeros(len(a1), len(a2), dtype=torch.float64)
        for i, alpha1 in enumerate(a1):
            for j, alpha2 in enumerate(a2):
                tau = combine([tau1, tau2], [alpha1, alpha2])
                error = 0.0
                for batches, single, n, t in ((b1, single1[i], n1, 1), (b2, single2[j], n2, 2)):
                    both = _labels(predict, tau, batches, what)
                    changed = 0
                    for k, (ref, lab) in enumerate(zip(single, both)):
                        if ref.shape != lab.shape:
                            raise ValueError(f"{what}: batch {k} of task {t} gave {ref.numel()} predictions "
                                             f"for the single task vector but {lab.numel()} for the sum")
                        changed += int((ref != lab).sum())
                    error += changed / n
                xi[i, j] = error
    return xi


# ----------------------------------------------------------------------------------------------
# linearization error
# ----------------------------------------------------------------------------------------------

def linearization_error(
    outputs: Callable[[TaskVectorLike, Any], torch.Tensor],
    taus: Sequence[TaskVectorLike],
    batches: Iterable,
) -> torch.Tensor:
    """Per-example linearization error (DELTA Eq. 9).

    ``‖ (1/T) Σ_t f(x; θ0 + τ_t) − f(x; θ0 + (1/T) Σ_t τ_t) ‖₁`` for every example of every
    batch, in order. ``outputs(task_vector, batch) -> (N, D)`` (or (N,), or (N, ...) flattened)
    are the activations compared, e.g. the features or logits. Zero for f affine in θ.

    Returns a CPU tensor of shape ``(n_examples,)``.
    """
    what = "linearization_error"
    taus = list(taus)
    if not taus:
        raise ValueError(f"{what}: no task vectors given")
    batches = _batch_list(batches, what)
    T = len(taus)
    mean_tau = combine(taus, [1.0 / T] * T)
    errors = []
    with torch.no_grad():
        for k, batch in enumerate(batches):
            at_mean = _per_example(outputs(mean_tau, batch), what, name="outputs")
            total = None
            for tau in taus:
                out = _per_example(outputs(_tensors(tau), batch), what, name="outputs")
                if out.shape != at_mean.shape:
                    raise ValueError(f"{what}: batch {k}: outputs of shape {tuple(out.shape)} for a task "
                                     f"vector but {tuple(at_mean.shape)} at the mean task vector")
                total = out if total is None else total + out
            mean_out = total / T
            errors.append((mean_out - at_mean).abs().sum(dim=1))
    return _cat(errors, what)


# ----------------------------------------------------------------------------------------------
# task localization: normalcy scores, AUROC, support localization
# ----------------------------------------------------------------------------------------------

def normalcy_scores(
    jvp: Callable[[TaskVectorLike, Any], torch.Tensor],
    tau: TaskVectorLike,
    batches: Iterable,
) -> torch.Tensor:
    """Per-example normalcy score ``‖J_θ f(x; θ0) τ‖²`` for task vector τ (TAK Sec. 5, Fig. 5).

    ``jvp(tau, batch) -> (N, D)`` returns the Jacobian-vector product ``J_θ f(x; θ0) τ`` per
    example (for a linearized model, its tangent output). High scores mark inputs of τ's task.

    Returns a CPU tensor of shape ``(n_examples,)``.
    """
    what = "normalcy_scores"
    tau = _tensors(tau)
    if tau is None:
        raise ValueError(f"{what}: tau must be a task vector, not None")
    batches = _batch_list(batches, what)
    scores = []
    with torch.no_grad():
        for batch in batches:
            jt = _per_example(jvp(tau, batch), what, name="jvp")
            scores.append(jt.pow(2).sum(dim=1))
    return _cat(scores, what)


def _scores_1d(x: Any, what: str) -> torch.Tensor:
    t = torch.as_tensor(x.detach().cpu() if isinstance(x, torch.Tensor) else x, dtype=torch.float64).reshape(-1)
    if t.numel() == 0:
        raise ValueError(f"auroc: no {what} scores given")
    if torch.isnan(t).any():
        raise ValueError(f"auroc: {what} scores contain NaN")
    return t


def auroc(inliers: Any, outliers: Any, *, higher_is_inlier: bool = True) -> float:
    """Area under the ROC curve of a score that detects inliers, exactly (Mann–Whitney U).

    With ``higher_is_inlier=True`` (the default, and the orientation of normalcy scores: in-task
    inputs have the larger ``‖Jτ‖²``, TAK Fig. 5) this is
    ``P(s_in > s_out) + ½ P(s_in = s_out)`` over all inlier/outlier pairs: 1.0 when every inlier
    scores above every outlier, 0.5 for indistinguishable scores, 0.0 for the reverse. With
    ``higher_is_inlier=False`` (a score where low means inlier, e.g. an anomaly score) the roles
    flip: ``P(s_in < s_out) + ½ P(s_in = s_out)``.

    Ties count 1/2. Computed from sorted counts, exact for any number of ties, O(n log n).
    """
    pos = _scores_1d(inliers, "inlier")
    neg = _scores_1d(outliers, "outlier")
    if not higher_is_inlier:
        pos, neg = -pos, -neg
    neg_sorted, _ = torch.sort(neg)
    below = torch.searchsorted(neg_sorted, pos, right=False)        # outliers strictly lower
    below_or_equal = torch.searchsorted(neg_sorted, pos, right=True)  # outliers lower or tied
    # twice U, an integer: 2·#(s_in > s_out) + #(s_in = s_out)
    twice_u = int((below + below_or_equal).sum())
    return twice_u / (2.0 * pos.numel() * neg.numel())


def support_localization(
    features: Callable[[TaskVectorLike, Any], torch.Tensor],
    tau: TaskVectorLike,
    in_batches: Iterable,
    out_batches: Iterable,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example edit distance ``(1/d) ‖f(x; θ0 + τ) − f(x; θ0)‖²`` (DELTA Fig. 5).

    ``features(task_vector_or_None, batch) -> (N, d)``; ``None`` is the pretrained model.
    ``in_batches`` are inputs of τ's own task, ``out_batches`` inputs of other tasks. Good
    support localization: large in-domain, near zero out-of-domain.

    Returns ``(in_mse (n_in,), out_mse (n_out,))`` as CPU tensors.
    """
    what = "support_localization"
    tau = _tensors(tau)
    if tau is None:
        raise ValueError(f"{what}: tau must be a task vector, not None")
    results = []
    for batches, which in ((in_batches, "in_batches"), (out_batches, "out_batches")):
        batches = _batch_list(batches, f"{what} ({which})")
        mses = []
        with torch.no_grad():
            for k, batch in enumerate(batches):
                base = _per_example(features(None, batch), what, name="features")
                tuned = _per_example(features(tau, batch), what, name="features")
                if base.shape != tuned.shape:
                    raise ValueError(f"{what}: {which} batch {k}: features of shape {tuple(base.shape)} "
                                     f"pretrained but {tuple(tuned.shape)} fine-tuned")
                if base.shape[1] == 0:
                    raise ValueError(f"{what}: features have zero width")
                mses.append((tuned - base).pow(2).mean(dim=1))
        results.append(_cat(mses, f"{what} ({which})"))
    return results[0], results[1]


# ----------------------------------------------------------------------------------------------
# α sweeps
# ----------------------------------------------------------------------------------------------

def alpha_sweep(score: Callable[[float], Any], alphas: Iterable[float]) -> list[float]:
    """``[score(α) for α in alphas]`` as floats (e.g. merged-model accuracy at θ0 + α Σ τ_t)."""
    alphas = _alpha_list(alphas, "alpha_sweep")
    out = []
    with torch.no_grad():
        for alpha in alphas:
            value = score(alpha)
            if isinstance(value, torch.Tensor):
                if value.numel() != 1:
                    raise ValueError(f"alpha_sweep: score({alpha}) returned a tensor of shape {tuple(value.shape)}")
                value = value.item()
            out.append(float(value))
    return out
