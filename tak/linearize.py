"""Linearized models (TAK Eq. 1): f_lin(x; θ0 + τ) = f(x; θ0) + J_θ f(x; θ0) τ, trained in τ only.

Fast path, chosen automatically for the architectures ``tak.models.to_dual`` converts (open_clip vision transformers,
timm's VisionTransformer (open_clip's SigLIP towers), Hugging Face CLIP and SigLIP vision towers, ViT and DINOv2,
BERT-like encoders, MPNet, DeBERTa v1/v2/v3 and ModernBERT, T5 and mT5, decoder-only LMs (Llama, Mistral, Qwen2, Qwen3,
Gemma, Gemma 2, Gemma 3, Phi-3, OLMo 2/3, SmolLM3, Granite, GPT-2, GPT-NeoX), and Hugging Face task heads around them):
the model rebuilt from ``tak.nn`` dual layers carries (primal, tangent) pairs through fused kernels, and its backward is
the tangent path's alone (``DualLinearizedModel``).

Generic path, for any ``nn.Module`` and the oracle of the fast one (``LinearizedModel``):
``torch.func.jvp`` of ``torch.func.functional_call`` at the frozen θ0 in the direction τ. Forward-mode AD has no formula for fused attention (flash / efficient
SDPA, the fused ``nn.MultiheadAttention`` fast path), so the forward runs math attention. The JVP's
tangent output is an ordinary autograd function of τ, so ``loss.backward()`` gives
∂loss/∂τ = Jᵀ ∂loss/∂f_lin and nothing else receives a gradient.
"""
import contextlib
import copy
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping

import torch
from torch import nn
from torch.func import jvp
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils import _pytree as pytree

from ._selection import select_parameters
from ._substitute import call_with, parameter_paths

Trainable = None | str | Iterable[str] | Callable[[str], bool]

_PASS_THROUGH = (bool, int, float, str, type(None))


def linearize(model: nn.Module, *, trainable: Trainable = None, fast: bool | None = None):
    """The linearization of ``model`` at its current parameters θ0 (``model`` is not modified).

    ``fast=None``: the fast path (``DualLinearizedModel``) for the architectures ``tak.models.to_dual``
    supports, else the generic one (``LinearizedModel``) with a warning naming what has no fast path;
    ``fast=True`` requires the fast path (NotImplementedError otherwise); ``fast=False`` the generic one.
    Both have the same interface, compute the same function and start in the train/eval modes of ``model``
    and its modules (dropout where the model's is in train mode)."""
    if fast is False:
        return LinearizedModel(model, trainable=trainable)
    from .models import to_dual

    base = copy.deepcopy(model)
    try:
        return DualLinearizedModel(model, base, to_dual(base, trainable=trainable))
    except NotImplementedError as e:
        if fast:
            raise
        warnings.warn(f"tak.linearize: generic torch.func.jvp path (math attention, no fused kernels): {e}",
                      stacklevel=2)
        return LinearizedModel(model, trainable=trainable)


class _Linearization(nn.Module):
    """What both paths share: θ0 in a private copy ``_base`` of the model (not a submodule, so
    ``parameters()`` are τ alone, while ``to()`` / ``train()`` reach it), τ by the model's names
    (``_taus()``), and the scale α of ``scaled``."""

    _kept = None  # the KeptPrimal of an active ``keeping_primal`` context

    @contextlib.contextmanager
    def scaled(self, alpha: float):
        """Within the context the forward computes f(x; θ0) + α J τ (a scaled task vector)."""
        before, self._alpha = self._alpha, float(alpha)
        try:
            yield self
        finally:
            self._alpha = before

    @contextlib.contextmanager
    def keeping_primal(self):
        """Within the context each forward keeps its output at θ0 (the primal alone, which the forward
        computes anyway; detached) in the yielded ``KeptPrimal``: calling it returns that output, so
        ``backbone.features(kept, batch)`` gives f(x; θ0) for the same inputs, dropout masks included."""
        kept = KeptPrimal()
        before, self._kept = self._kept, kept
        try:
            yield kept
        finally:
            self._kept = before

    def _keep(self, leaves: list, spec, primals) -> None:
        if self._kept is not None:
            primals = iter(primals)
            self._kept.output = _primal_plus_tangent(list(leaves), spec, lambda: (next(primals).detach(), None))

    def _check_arguments(self, kwargs: dict) -> None:
        """Refuse ``labels`` of a Hugging Face model (one with a ``config``): it would compute its loss inside the
        forward, which the linearization would linearize too: loss(θ0) + ∇loss·τ is not the loss of f_lin."""
        if kwargs.get("labels") is not None and hasattr(self._base, "config"):
            raise ValueError("tak.linearize: labels= makes a Hugging Face model compute its loss inside forward, so the "
                             "linearized output's loss would be loss(θ0) + ∇loss·τ, linear in τ, not the loss of "
                             "f_lin; call it without labels (T5: decoder_input_ids=model._shift_right(labels)) and "
                             "take the loss of the output's logits")

    def base_parameters(self) -> dict[str, torch.Tensor]:
        """{model parameter name: θ0} for every parameter: the held tensors (detached), not copies."""
        return {name: p.detach() for name, p in self._base.named_parameters()}

    def nonlinear_model(self, alpha: float = 1.0) -> nn.Module:
        """A plain copy of the model with parameters θ0 + α τ and the original ``requires_grad`` flags."""
        model = copy.deepcopy(self._base)
        with torch.no_grad():
            for name, tau in self._taus():
                model.get_parameter(name).add_(tau, alpha=alpha)
        for name, p in model.named_parameters():
            p.requires_grad_(self._requires_grad[name])
        return model

    def train(self, mode: bool = True):
        self._base.train(mode)
        return super().train(mode)

    def _apply(self, fn, recurse=True):
        if recurse:
            self._base._apply(fn)
        return super()._apply(fn, recurse)


class LinearizedModel(_Linearization):
    """f_lin(x; θ0 + τ) = f(x; θ0) + J_θ f(x; θ0) τ, with τ the only parameters (zeros at start).

    θ0 is a frozen deep copy of ``model`` (its parameters with ``requires_grad=False``), held outside
    the module tree: ``parameters()`` and ``state_dict()`` hold τ only, while ``to()`` / ``double()``
    and ``train()`` / ``eval()`` also reach the copy. ``model`` itself is never modified.

    τ for parameter ``name`` of the model has that parameter's shape and lives at ``tau.<name>``;
    ``task_vector()`` / ``load_task_vector()`` use the model's names. Tied parameters share one τ,
    named by the model's first name for them (``named_parameters()``).

    trainable: which parameters get a τ (the others have zero tangent). ``None``: those with
    ``requires_grad=True``; a glob pattern or list of them (``["*attn*"]``), matched against every
    name of a parameter, each pattern matching at least one; or a predicate ``name -> bool``.

    The forward returns the model's output structure (tensor, tuple, dict, Hugging Face ModelOutput):
    floating tensor leaves are primal + tangent, other tensors are the primal, Python scalars and
    strings pass through, and any other object (e.g. a Hugging Face cache, computed at θ0 only) is
    replaced by ``None``. In train mode primal and tangent share each dropout mask (one random draw
    per forward, as in the plain model). The model's floating buffers are copied for each forward, so that one it
    updates in place (a rotary table transformers 5 swaps so) leaves θ0's as they were.
    """

    def __init__(self, model: nn.Module, *, trainable: Trainable = None):
        super().__init__()
        self._names = select_parameters(model, trainable)
        self._requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
        base = copy.deepcopy(model).requires_grad_(False)
        self.__dict__["_base"] = base  # not a submodule: its parameters are not parameters of self
        self._paths = parameter_paths(base)
        self.tau = nn.Module()
        for name in self._names:
            _set_parameter(self.tau, name, nn.Parameter(torch.zeros_like(base.get_parameter(name))))
        self._alpha = 1.0
        self.training = model.training  # the modules inside keep their own modes (θ0 copies them)
        self._batch_norms = [(n, m) for n, m in base.named_modules()
                             if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]

    def _taus(self) -> Iterator[tuple[str, nn.Parameter]]:
        return ((name, self.tau.get_parameter(name)) for name in self._names)

    def forward(self, *args, **kwargs):
        self._check_arguments(kwargs)
        updating = [n for n, m in self._batch_norms if m.training]
        if updating:
            raise ValueError(f"tak.linearize: BatchNorm {updating[:3]} in train mode would update its running "
                             "statistics inside torch.func.jvp, which cannot mutate them: call .eval() on it (the "
                             "linearization at θ0 then uses θ0's statistics) or build it with "
                             "track_running_stats=False")
        primals = {name: self._base.get_parameter(name) for name in self._names}
        tangents = {name: tau if self._alpha == 1.0 else self._alpha * tau for name, tau in self._taus()}
        spec, leaves = None, []

        def f(params):
            nonlocal spec, leaves
            # floating buffers as copies made here, which a forward may update in place (transformers 5's longrope
            # swaps its rotary table so) where torch.func refuses to mutate a tensor from outside
            buffers = {n: b.clone() for n, b in self._base.named_buffers() if b.is_floating_point()}
            leaves, spec = pytree.tree_flatten(call_with(self._base, params, args, kwargs, self._paths, buffers))
            return tuple(leaf for leaf in leaves if isinstance(leaf, torch.Tensor))

        with math_attention():
            outs, dots = jvp(f, (primals,), (tangents,))
        self._keep(leaves, spec, outs)
        outs, dots = iter(outs), iter(dots)
        return _primal_plus_tangent(leaves, spec, lambda: (next(outs), next(dots)))

    def task_vector(self) -> dict[str, torch.Tensor]:
        """{model parameter name: τ}, detached copies."""
        return {name: tau.detach().clone() for name, tau in self._taus()}

    def load_task_vector(self, taus: Mapping[str, torch.Tensor], *, strict: bool = True) -> None:
        """Copies ``taus`` (model parameter name -> tensor of the parameter's shape) into τ.

        Merged task vectors load the same way: ``{name: Σ_t α_t τ_t[name]}``. Raises ValueError
        listing entries that are extra (no τ under that name), mis-shaped, or, when ``strict``,
        missing; with ``strict=False`` a subset loads and the other τ keep their values.
        """
        own = dict(self._taus())
        problems = []
        extra = sorted(set(taus) - set(own))
        if extra:
            problems.append(f"extra (no τ of that name): {extra}")
        missing = sorted(set(own) - set(taus))
        if strict and missing:
            problems.append(f"missing: {missing}")
        shapes = {name: tuple(torch.as_tensor(value).shape) for name, value in taus.items() if name in own}
        wrong = [f"{name}: got {shape}, expected {tuple(own[name].shape)}"
                 for name, shape in shapes.items() if shape != own[name].shape]
        if wrong:
            problems.append(f"mis-shaped: [{'; '.join(wrong)}]")
        if problems:
            raise ValueError("task vector refused: " + "; ".join(problems))
        with torch.no_grad():
            for name in shapes:
                own[name].copy_(torch.as_tensor(taus[name]))

    def extra_repr(self) -> str:
        n = sum(tau.numel() for _, tau in self._taus())
        return f"base={type(self._base).__name__}, {len(self._names)} τ tensors, {n} entries"


class DualLinearizedModel(_Linearization):
    """The fast path of ``linearize``: ``dual`` = ``tak.models.to_dual(base)`` in "linearized" mode, with
    the interface of ``LinearizedModel``; ``base`` is a private copy of ``model`` whose parameters are θ0.
    τ are the dual model's tangent directions (its only parameters), keyed by the model's parameter
    names in ``task_vector()``."""

    def __init__(self, model: nn.Module, base: nn.Module, dual):
        super().__init__()
        self.dual = dual.set_mode("linearized")
        self.__dict__["_base"] = base.requires_grad_(False)  # θ0; not a submodule
        self._requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
        self._alpha = 1.0
        self.training = model.training  # the modules inside keep their own modes (θ0 copies them)

    def forward(self, *args, **kwargs):
        self._check_arguments(kwargs)
        if torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad
                                           for t in pytree.tree_leaves((args, kwargs))):
            raise ValueError("tak.linearize's fast path differentiates in τ only, and an input requires grad; "
                             "for gradients in the inputs use tak.linearize(model, fast=False)")
        primal, tangent = self.dual(*args, **kwargs)
        leaves, spec = pytree.tree_flatten(primal)
        self._keep(leaves, spec, (x for x in leaves if isinstance(x, torch.Tensor)))
        pairs = zip((x for x in leaves if isinstance(x, torch.Tensor)),
                    (t for t in pytree.tree_leaves(_aligned(primal, tangent)) if isinstance(t, torch.Tensor)))

        def next_pair():
            out, dot = next(pairs)
            return out, dot if self._alpha == 1.0 else self._alpha * dot
        return _primal_plus_tangent(leaves, spec, next_pair)

    def task_vector(self) -> dict[str, torch.Tensor]:
        """{model parameter name: τ}, detached copies."""
        return self.dual.task_vector()

    def load_task_vector(self, taus: Mapping[str, torch.Tensor], *, strict: bool = True) -> None:
        """As ``LinearizedModel.load_task_vector``."""
        own = self.dual.named_taus()
        if not strict:
            taus = {**{n: t.detach() for n, t in own.items()}, **taus}
        self.dual.load_task_vector(dict(taus))

    def _taus(self) -> Iterator[tuple[str, nn.Parameter]]:
        return iter(self.dual.named_taus().items())

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self.dual.share_theta0(self._base)  # the dual's θ0 were moved/cast on their own: views of _base's again
        return self

    def __deepcopy__(self, memo):
        clone = type(self).__new__(type(self))
        memo[id(self)] = clone
        clone.__dict__.update(copy.deepcopy(self.__dict__, memo))
        clone.dual.share_theta0(clone._base)
        return clone


class KeptPrimal:
    """The output at θ0 of the last forward inside ``keeping_primal()``; calling it (with any arguments)
    returns that output."""

    output = None

    def __call__(self, *args, **kwargs):
        if self.output is None:
            raise RuntimeError("keeping_primal: no forward ran inside the context yet")
        return self.output


def _aligned(primal, tangent):
    """``tangent`` in ``primal``'s structure: where the dual model gives None (no τ reaches that output),
    zeros, so that the two flatten to matching leaves."""
    if isinstance(primal, torch.Tensor):
        return torch.zeros_like(primal) if tangent is None else tangent
    if isinstance(primal, Mapping):  # dicts, Hugging Face ModelOutputs
        return type(primal)(**{k: _aligned(v, None if tangent is None else tangent.get(k)) for k, v in primal.items()})
    if isinstance(primal, (tuple, list)):
        items = [_aligned(v, None if tangent is None else tangent[i]) for i, v in enumerate(primal)]
        return type(primal)(*items) if hasattr(primal, "_fields") else type(primal)(items)  # namedtuples too
    return primal


def _primal_plus_tangent(leaves: list, spec, next_pair):
    """The output structure with each floating tensor leaf primal + tangent (``next_pair()`` gives the
    (primal, tangent) of the next tensor leaf), other tensors their primal, Python scalars and strings
    as they are, anything else None."""
    for i, leaf in enumerate(leaves):
        if isinstance(leaf, torch.Tensor):
            out, dot = next_pair()
            leaves[i] = out + dot if out.is_floating_point() and dot is not None else out
        elif not isinstance(leaf, _PASS_THROUGH):
            leaves[i] = None
    return pytree.tree_unflatten(leaves, spec)


def _set_parameter(root: nn.Module, name: str, param: nn.Parameter) -> None:
    """Registers ``param`` at dotted ``name`` under ``root``, creating empty container modules."""
    *path, leaf = name.split(".")
    for part in path:
        if part not in root._modules:
            root.add_module(part, nn.Module())
        root = root._modules[part]
    root.register_parameter(leaf, param)


@contextlib.contextmanager
def math_attention():
    """Math SDPA and no fused ``nn.MultiheadAttention`` / ``TransformerEncoderLayer`` fast path."""
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
