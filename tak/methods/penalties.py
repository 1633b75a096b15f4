"""Drift penalties on a task vector τ (TAK Eq. 7/8, DELTA Eq. 6) and the data-dependent τJp baseline.

``CurvaturePenalty``: β Σ_l w_l q_l(τ_l), q_l from any factor container with ``quadratic_form``
(``KFAC``, per-task ``TaskFactors``, ``EKFAC``, ``DiagonalGGN``; compressed factors included).
Every ``every`` steps only (TAK Fig. 8), with the factors on the CPU in between when ``offload``.

``TauJpPenalty``: β · 1/N Σ_n ‖J_θ f(x_n; θ0) τ‖² on batches of the other tasks' inputs, with
J τ = f_lin(x; θ0 + τ) − f(x; θ0) (Yoshida et al. 2025), both from one forward (one dropout mask).
"""
import copy
import dataclasses

import torch

from .._selection import selects


def layer_weights(factors, *, last_layer_weight: float = 1.0, patterns: dict | None = None,
                  last_layer: str | None = None) -> dict[str, float]:
    """{layer: w}: ``last_layer_weight`` for the model's last layer (TAK Sec. E: 0.1 on CLIP's ``proj``), then
    ``patterns`` ({glob: w}, later patterns win) over the layer names. The last layer is ``last_layer`` where the
    backbone names it (``Backbone.last_layer``; not factored, e.g. untrained: no layer gets the weight), else the
    last factored linear layer with non-zero curvature (the exact LayerNorm / class-token blocks, listed after the
    linear layers, are not it, nor is a layer the features do not reach, e.g. BERT's pooler under mean pooling)."""
    layers = _layers(factors)
    names = list(layers)
    weights = {n: 1.0 for n in names}
    linear = [n for n in names if getattr(layers[n], "weight", None) is not None and _reached(layers[n])]
    last = (linear[-1:] if last_layer is None else [last_layer] if last_layer in layers else [])
    for n in last:
        weights[n] = float(last_layer_weight)
    for pattern, w in (patterns or {}).items():
        hits = [n for n in names if selects(pattern, n)]
        if not hits:
            raise ValueError(f"layer_weights: pattern {pattern!r} matches no factored layer (e.g. {names[:3]})")
        weights.update({n: float(w) for n in hits})
    return weights


def penalized_parameters(factors) -> set[str]:
    """The parameter names that ``factors`` (any container, or per-task ``TaskFactors``) has curvature for."""
    return {p for lf in _layers(factors).values() for p in lf.params}


def _reached(layer_factors) -> bool:
    """Whether a linear layer's output curvature (KFAC B, EK-FAC S or the diagonal D) has a non-zero entry."""
    for side in ("B", "S", "D"):
        F = getattr(layer_factors, side, None)
        if F is not None:
            return bool((F if isinstance(F, torch.Tensor) else F.to_dense()).any())
    return True


def _layers(factors):
    return factors.tasks[0] if hasattr(factors, "tasks") else factors


def _map_tensors(factors, fn):
    """A copy of ``factors`` (a factor container, per-task ``TaskFactors`` of them, a per-layer dataclass, a
    compressed factor) with ``fn`` applied to each tensor it holds; names, shapes and metadata as they are."""
    if isinstance(factors, torch.Tensor):
        return fn(factors)
    if dataclasses.is_dataclass(factors):
        return dataclasses.replace(factors, **{f.name: _map_tensors(getattr(factors, f.name), fn)
                                               for f in dataclasses.fields(factors)})
    if hasattr(factors, "tasks"):
        mapped = type(factors).__new__(type(factors))
        mapped.__dict__.update(factors.__dict__, tasks=[_map_tensors(f, fn) for f in factors.tasks])
        return mapped
    if hasattr(factors, "meta"):
        return type(factors)({n: _map_tensors(f, fn) for n, f in factors.items()}, factors.meta)
    return factors  # parameter names, layouts, sizes


class CurvaturePenalty:
    def __init__(self, factors, beta: float, *, weights: dict[str, float] | None = None, every: int = 1,
                 offload: bool = False, device=None):
        """``device``: where the penalty is computed (that of τ); None keeps the factors where they are.
        ``offload`` (with a ``device``): the factors live on the CPU and visit ``device`` at the steps the penalty
        applies."""
        if every < 1:
            raise ValueError(f"penalty every={every}: must be ≥ 1")
        self.beta, self.weights, self.every, self.offload, self.device = float(beta), weights, every, offload, device
        home = torch.device("cpu") if offload and device is not None else device
        self.factors = factors if home is None else _map_tensors(factors, lambda t: t.to(home))
        if offload and device is not None and torch.device(device).type == "cuda":
            self.factors = _map_tensors(self.factors, torch.Tensor.pin_memory)  # so that visits copy asynchronously
        self._visits = _Visits(self.factors, takers=int(self.beta != 0))

    def with_beta(self, beta: float) -> "CurvaturePenalty":
        """The same penalty at weight ``beta`` (DELTA's teacher's), sharing the factors and, offloaded, their
        copy on the device at each step: one copy for both, not two."""
        other = copy.copy(self)
        other.beta = float(beta)
        self._visits.takers += int(other.beta != 0)
        return other

    def active(self, step: int) -> bool:
        return self.beta != 0 and step % self.every == 0

    def __call__(self, taus: dict[str, torch.Tensor], step: int = 0) -> torch.Tensor | None:
        """β Σ_l w_l q_l(τ_l) at the steps where the penalty applies, else None."""
        if not self.active(step):
            return None
        factors = self._visits.at(self.device, step) if self.offload and self.device is not None else self.factors
        return self.beta * factors.quadratic_form(taus, self.weights)


class _Visits:
    """Offloaded factors' copy on the device for one step: made by the first of the ``takers`` penalties that apply
    at that step, handed to the others, then forgotten (the forms hold it until their backward, nothing longer).
    On a GPU the copies run on a stream of their own from pinned memory, beside the kernels queued before them (the
    step's forward); the stream that computes the penalty waits for them."""

    def __init__(self, factors, takers: int):
        self.factors, self.takers, self.step, self.copy, self.left = factors, takers, None, None, 0
        self.streams = {}  # device -> the stream copies run on

    def at(self, device, step: int):
        if self.step != step or self.left == 0:
            self.copy, self.step, self.left = self._visit(torch.device(device)), step, self.takers
        copy_, self.left = self.copy, self.left - 1
        if self.left <= 0:
            self.copy = None
        return copy_

    def _visit(self, device: torch.device):
        if device.type != "cuda":
            return _map_tensors(self.factors, lambda t: t.to(device))
        computing = torch.cuda.current_stream(device)
        if device not in self.streams:
            self.streams[device] = torch.cuda.Stream(device)
        copying = self.streams[device]

        def copied(t):
            t = t.to(device, non_blocking=True)
            t.record_stream(computing)  # its memory is not reused for copies before the penalty's kernels are done
            return t
        with torch.cuda.stream(copying):
            copy_ = _map_tensors(self.factors, copied)
        computing.wait_stream(copying)
        return copy_


class TauJpPenalty:
    """``batches``: model inputs of the other tasks, taken in turn: the k-th application uses batch
    k mod len(batches), k = step // every (so a resumed run sees the batches an unbroken one does)."""

    def __init__(self, batches, beta: float, features, *, every: int = 1):
        self.beta, self.features, self.every = float(beta), features, every
        self.batches = list(batches)
        if not self.batches:
            raise ValueError("TauJpPenalty: batches is empty")

    def active(self, step: int) -> bool:
        return self.beta != 0 and step % self.every == 0

    def __call__(self, trainee, step: int = 0) -> torch.Tensor | None:
        """β · mean_n ‖f_lin(x_n) − f(x_n; θ0)‖² of a ``LinearTrainee`` on this step's batch, f(x_n; θ0)
        the primal its forward keeps (same dropout masks: 0 at τ = 0), or None off-schedule."""
        if not self.active(step):
            return None
        batch = self.batches[(step // self.every) % len(self.batches)]
        with trainee.lin.keeping_primal() as at_theta0:
            f = self.features(trainee.at(1.0), batch)
        with torch.no_grad():
            f0 = self.features(at_theta0, batch)
        return self.beta * (f - f0).pow(2).sum(-1).mean()
