"""What a method trains, and the task vector τ it stands for.

A trainee holds θ0 frozen and exposes:
- ``taus()``: {model parameter name: τ}, differentiable in the trained parameters;
- ``at(alpha)``: a callable model computing the network at θ0 + α τ (α = 1: the trained model),
  for ``Backbone.features``;
- ``task_vector()``: detached copies of ``taus()``;
- ``decay_anchors(decay_to)``: where AdamW's decoupled weight decay must pull each trained parameter for the
  weights to decay towards ``decay_to`` (``DECAY_TARGETS``): "zero", θ = θ0 + τ → 0, as the papers' code has it
  in both regimes (AdamW over θ, the linearized model's parameters included), or "pretrained", τ → 0.

``LinearTrainee``: τ of the linearized model f(θ0) + J τ (``tak.linearize``); the parameters are τ.
``NonlinearTrainee``: a copy of the model whose selected parameters θ are trained; τ = θ − θ0.
``LoRATrainee``: τ_W = (s / r) B A for the selected linear layers (Hu et al. 2021), B = 0 at start; its
factors decay to 0 (τ → 0, as in peft) whatever ``decay_to`` says: θ → 0 is not a decay of A and B.
"""
import copy
import math

import torch
from torch import nn

from .._selection import select_parameters
from .._substitute import call_with, parameter_paths
from ..linearize import linearize

DECAY_TARGETS = ("zero", "pretrained")
Anchor = tuple[nn.Parameter, torch.Tensor, float]  # (p, θ0, s): the decay pulls p to s θ0 instead of 0


def attention_only(name: str) -> bool:
    """The attention projections (q, k, v, out) of open_clip, BERT-like and T5 models, not their norms (BERT's
    LayerNorm, open_clip's ``ln_attn`` and ``attn.ln_inner``) nor T5's relative position bias."""
    lowered = name.lower()
    norm = "norm" in lowered or any(part.startswith("ln_") for part in lowered.split("."))
    return ("attn" in lowered or "attention" in lowered) and not norm and "relative_attention_bias" not in lowered


def trainable_names(model: nn.Module, trainable) -> list[str]:
    """Names of the parameters ``trainable`` selects: None or "all" (those with requires_grad),
    "attention" (``attention_only``), or glob patterns / a predicate as ``tak.linearize`` takes them
    (``tak._selection.select_parameters``: tied aliases match, each pattern must match)."""
    if trainable in (None, "all"):
        trainable = None
    elif trainable == "attention":
        trainable = attention_only
    return select_parameters(model, trainable)


class _At:
    """The module evaluated with the parameters ``params()`` (a callable model for ``Backbone.features``);
    ``paths``: ``parameter_paths(module)``."""

    def __init__(self, module: nn.Module, params, paths: dict[str, str]):
        self.module, self.params, self.paths = module, params, paths

    def __call__(self, *args, **kwargs):
        return call_with(self.module, self.params(), args, kwargs, self.paths)

    def __getattr__(self, name):
        return getattr(self.module, name)


class _Scaled:
    """A linearized model evaluated at θ0 + α τ."""

    def __init__(self, lin: nn.Module, alpha: float):
        self.lin, self.alpha = lin, alpha

    def __call__(self, *args, **kwargs):
        with self.lin.scaled(self.alpha):
            return self.lin(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.lin, name)


class LinearTrainee(nn.Module):
    regime = "linear"

    def __init__(self, model: nn.Module, trainable=None):
        super().__init__()
        self.names = trainable_names(model, trainable)
        self.lin = linearize(model, trainable=self.names)

    def taus(self) -> dict[str, torch.Tensor]:
        return dict(self.lin._taus())

    def at(self, alpha: float = 1.0):
        return self.lin if alpha == 1.0 else _Scaled(self.lin, alpha)

    def base(self) -> nn.Module:
        """The network at θ0 (shared, frozen)."""
        return self.lin._base

    def task_vector(self) -> dict[str, torch.Tensor]:
        return self.lin.task_vector()

    def decay_anchors(self, decay_to: str) -> list[Anchor]:
        """θ0 + τ → 0 is τ → −θ0; τ → 0 is AdamW's own."""
        if decay_to == "pretrained":
            return []
        theta0 = self.lin.base_parameters()
        return [(tau, theta0[name], -1.0) for name, tau in self.lin._taus()]


class NonlinearTrainee(nn.Module):
    regime = "nonlinear"

    def __init__(self, model: nn.Module, trainable=None):
        super().__init__()
        self.names = trainable_names(model, trainable)
        self.model = copy.deepcopy(model)
        chosen = set(self.names)
        for name, p in self.model.named_parameters():
            p.requires_grad_(name in chosen)
        self.__dict__["_theta0"] = {n: self.model.get_parameter(n).detach().clone() for n in self.names}
        self._paths = parameter_paths(self.model)

    def _apply(self, fn, recurse=True):
        self.__dict__["_theta0"] = {n: fn(t) for n, t in self._theta0.items()}
        return super()._apply(fn, recurse)

    def taus(self) -> dict[str, torch.Tensor]:
        return {n: self.model.get_parameter(n) - self._theta0[n] for n in self.names}

    def at(self, alpha: float = 1.0):
        if alpha == 1.0:
            return self.model
        return _At(self.model, lambda: {n: self._theta0[n] + alpha * t for n, t in self.taus().items()}, self._paths)

    def base(self) -> nn.Module:
        return _At(self.model, lambda: dict(self._theta0), self._paths)

    def task_vector(self) -> dict[str, torch.Tensor]:
        return {n: t.detach().clone() for n, t in self.taus().items()}

    def decay_anchors(self, decay_to: str) -> list[Anchor]:
        """θ → 0 is AdamW's own; τ → 0 is θ → θ0."""
        if decay_to == "zero":
            return []
        return [(self.model.get_parameter(n), self._theta0[n], 1.0) for n in self.names]


class LoRATrainee(nn.Module):
    """τ_W = (scale / rank) B A for every selected weight matrix W (d_out, d_in) of an ``nn.Linear`` and
    every fused q/k/v ``in_proj_weight`` (3d, d) of an ``nn.MultiheadAttention`` (Hu et al. 2022)."""

    regime = "nonlinear"

    def __init__(self, model: nn.Module, trainable=None, rank: int = 16, scale: float = 16.0):
        super().__init__()
        self.model = copy.deepcopy(model).requires_grad_(False)
        chosen = set(trainable_names(model, trainable))
        matrices = {f"{m}.weight" for m, mod in self.model.named_modules() if isinstance(mod, nn.Linear)}
        matrices |= {f"{m}.in_proj_weight" for m, mod in self.model.named_modules()
                     if isinstance(mod, nn.MultiheadAttention) and mod.in_proj_weight is not None}
        self.weights = {n: p for n, p in self.model.named_parameters() if n in chosen and n in matrices}
        if not self.weights:
            raise ValueError(f"LoRA: trainable={trainable!r} selects no nn.Linear weight or nn.MultiheadAttention "
                             "in_proj_weight")
        self.names = list(self.weights)
        self._paths = parameter_paths(self.model)
        self.scale = scale / rank
        self.A = nn.ParameterList()
        self.B = nn.ParameterList()
        for W in self.weights.values():
            a = torch.empty(rank, W.shape[1], dtype=W.dtype)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            self.A.append(nn.Parameter(a))
            self.B.append(nn.Parameter(torch.zeros(W.shape[0], rank, dtype=W.dtype)))

    def taus(self) -> dict[str, torch.Tensor]:
        return {n: self.scale * B @ A for n, A, B in zip(self.names, self.A, self.B)}

    def at(self, alpha: float = 1.0):
        return _At(self.model, lambda: {n: self.weights[n] + alpha * t for n, t in self.taus().items()}, self._paths)

    def base(self) -> nn.Module:
        return self.model

    def task_vector(self) -> dict[str, torch.Tensor]:
        return {n: t.detach().clone() for n, t in self.taus().items()}

    def decay_anchors(self, decay_to: str) -> list[Anchor]:
        return []
