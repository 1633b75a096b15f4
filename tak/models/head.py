"""A Hugging Face model with a task head (``*ForSequenceClassification``, ``*ForTokenClassification``, ``*ForMaskedLM``,
...) around a base model that has a dual model.

The base (``model.base_model``) runs as its dual model; the rest of the model's own forward (pooling, classifier,
LM head) runs by forward-mode AD: the forward of a copy of the model without its base, called with the head's
parameters as dual tensors (θ0, τ) and its call of the base answered by the base's (primal, tangent). The head is a
few small maps, so its dual tensors cost little; its parameters tied to the base's (an LM head tied to the token
embedding) take the base's τ.
"""
import contextlib
import copy
from collections.abc import Mapping

import torch
import torch.autograd.forward_ad as fwAD
from torch import nn
from torch.func import functional_call
from torch.utils import _pytree as pytree

from .._selection import select_parameters
from .base import DualModel, DualParameter


class _BaseCall(nn.Module):
    """Stands in for the base model inside the head's copy: calling it calls ``fn``."""

    def __init__(self):
        super().__init__()
        self.fn = None

    def forward(self, *args, **kwargs):
        return self.fn(*args, **kwargs)


class DualHeadModel(DualModel):
    """forward(*args, **kwargs) of the source model -> (y, dy) in its output structure (a ModelOutput); dy is None
    outside the "linearized" mode. ``base``: the dual model of the base model; the head's parameters are DualParameters
    ``head.<i>``; task vectors are keyed by the source model's parameter names."""

    def __init__(self, model: nn.Module, base_converter, trainable=None):
        super().__init__()
        prefix = model.base_model_prefix
        chosen = set(select_parameters(model, trainable))
        self.base = base_converter(model.base_model, trainable="*")
        self.base.training = model.base_model.training
        for name, (path, attr) in self.base._sources.items():
            if f"{prefix}.{name}" not in chosen:
                self.base.get_submodule(path).freeze(attr)
        with _replaced(model, prefix, _BaseCall()):
            head = copy.deepcopy(model).requires_grad_(False)  # the head alone: the base is not copied
        self.__dict__["_head"], self.__dict__["_call"] = head, head._modules[prefix]  # not submodules: no τ there
        source = {id(p): f"{prefix}.{n}" for n, p in model.base_model.named_parameters()}  # id -> source name
        own = [(n, p) for n, p in model.named_parameters() if id(p) not in source]
        source |= {id(p): n for n, p in own}
        self.head = nn.ModuleList(DualParameter(p) for _, p in own)
        self._sources = {f"{prefix}.{n}": (f"base.{path}", attr) for n, (path, attr) in self.base._sources.items()}
        self._sources |= {n: (f"head.{i}", "value") for i, (n, _) in enumerate(own)}
        for i, (n, _) in enumerate(own):
            if n not in chosen:
                self.head[i].freeze("value")
        # each parameter the head's forward reads, under each of its names -> where its θ0 and τ are (tied: the base's)
        self._reads = {n: self._sources[source[id(p)]] for n, p in model.named_parameters(remove_duplicate=False)
                       if not n.startswith(f"{prefix}.")}

    def forward(self, *args, **kwargs):
        thetas = {n: self.get_submodule(path).dual(attr) for n, (path, attr) in self._reads.items()}
        linearized = self.mode == "linearized"
        self._call.fn = lambda *a, **k: _dual_tensors(*self.base(*a, **k)) if linearized else self.base(*a, **k)[0]
        with fwAD.dual_level() if linearized else contextlib.nullcontext():
            params = {n: theta if dtheta is None else fwAD.make_dual(theta, dtheta)
                      for n, (theta, dtheta) in thetas.items()}
            out = functional_call(self._head, params, args, kwargs, tie_weights=False)
            if not linearized:
                return out, None
            leaves, spec = pytree.tree_flatten(out)
            pairs = [fwAD.unpack_dual(x) if isinstance(x, torch.Tensor) else (x, None) for x in leaves]
        primal = pytree.tree_unflatten([p for p, _ in pairs], spec)
        if all(t is None for _, t in pairs):
            return primal, None
        return primal, pytree.tree_unflatten([t for _, t in pairs], spec)

    def train(self, mode: bool = True):
        self._head.train(mode)
        return super().train(mode)

    def _apply(self, fn, recurse=True):
        self._head._apply(fn)
        return super()._apply(fn, recurse)


def _dual_tensors(y, dy):
    """``y`` with each floating tensor made a forward-AD dual tensor of its tangent in ``dy`` (same structure, None
    where no τ reaches)."""
    if isinstance(y, torch.Tensor):
        return y if dy is None or not y.is_floating_point() else fwAD.make_dual(y, dy)
    if isinstance(y, Mapping):  # dicts, Hugging Face ModelOutputs
        return type(y)(**{k: _dual_tensors(v, None if dy is None else dy.get(k)) for k, v in y.items()})
    if isinstance(y, (tuple, list)):
        return type(y)(_dual_tensors(v, None if dy is None else dy[i]) for i, v in enumerate(y))
    return y


@contextlib.contextmanager
def _replaced(model: nn.Module, name: str, module: nn.Module):
    """``model``'s submodule ``name`` replaced by ``module`` inside the block."""
    before = model._modules[name]
    model._modules[name] = module
    try:
        yield
    finally:
        model._modules[name] = before
