"""DualModel: a model rebuilt from tak.nn dual layers, its τ keyed by the source model's parameter names.

A converter builds the dual layers with a ``Builder``, which records for every θ0 the name of the
source parameter it is (tied parameters are one θ0 with one τ), then calls ``DualModel.bind``.
"""

import torch
import torch.nn.functional as F
from torch import nn

from .._selection import select_parameters
from ..nn import (DualActivation, DualConv1D, DualDropout, DualEmbedding, DualLayerNorm, DualLayerScale, DualLinear,
                  DualModule, DualRMSNorm)
from ..nn.base import add, apply

# Hugging Face activation names (config.hidden_act, config.dense_act_fn) with a dual layer, as DualActivation kinds.
_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "quick_gelu": "quick_gelu",
                "relu": "relu", "silu": "silu", "swish": "silu", "tanh": "tanh"}


# Activation modules by class name (torch's; open_clip's and timm's QuickGELU x·σ(1.702 x); timm's GELU, GELUTanh), as
# names of the above.
_MODULES = {"ReLU": "relu", "Tanh": "tanh", "QuickGELU": "quick_gelu", "GELU": "gelu", "GELUTanh": "gelu_pytorch_tanh",
            "SiLU": "silu"}


def activation(act: str | nn.Module, where: str) -> DualActivation:
    """The dual of an activation: a torch, open_clip or timm module, or a Hugging Face activation name."""
    if isinstance(act, nn.GELU):
        return DualActivation("gelu" if act.approximate == "none" else "gelu_tanh")
    name = act if isinstance(act, str) else _MODULES.get(type(act).__name__)
    if name not in _ACTIVATIONS:
        raise NotImplementedError(f"{where}: activation {act!r} has no dual layer; supported: nn.GELU, nn.ReLU, "
                                  "nn.SiLU, nn.Tanh, QuickGELU, timm's GELU and GELUTanh, and the names "
                                  f"{sorted(_ACTIVATIONS)}")
    return DualActivation(_ACTIVATIONS[name])


def hf_options(owner: str, options: dict, accepted: dict) -> dict:
    """``options`` that Hugging Face callers pass, each at one of its ``accepted`` values ({name: (values)}); any
    other is refused (ValueError naming it), pointing to the generic path, which takes them all."""
    refused = {k: v for k, v in options.items() if k not in accepted or not any(v is a for a in accepted[k])}
    if refused:
        raise ValueError(f"{owner}: {refused} not supported (accepted: {accepted}); tak.linearize(model, fast=False) "
                         "takes every argument of the model")
    return options


def padding_mask(owner: str, name: str, attention_mask):
    """``attention_mask`` (B, Lk) of 1 = token, 0 = padding -> bool (B, 1, 1, Lk), True = attend; None stays None.
    Other shapes (HF's 3-D/4-D masks) are refused naming ``owner`` and ``name``."""
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2:
        raise ValueError(f"{owner}: {name} must be (batch, length), got {tuple(attention_mask.shape)}; "
                         "tak.linearize(model, fast=False) takes every argument of the model")
    return attention_mask.bool()[:, None, None, :]


# The options Hugging Face callers of a decoder-only LM pass, at the values the dual models take (no cache, all logits).
CAUSAL_LM_OPTIONS = {"return_dict": (None, True), "output_attentions": (None, False),
                     "output_hidden_states": (None, False), "use_cache": (None, False), "past_key_values": (None,),
                     "cache": (None,), "cache_position": (None,), "logits_to_keep": (0, None),
                     "num_logits_to_keep": (0, None)}


def causal_mask(owner: str, length: int, attention_mask, device) -> torch.Tensor:
    """bool (1 or B, 1, L, L), True = attend: each query the keys at and before its position, those that
    ``attention_mask`` (B, L) keeps where it is given (see ``padding_mask``)."""
    mask = torch.ones(length, length, dtype=torch.bool, device=device).tril()[None, None]
    return mask if attention_mask is None else mask & padding_mask(owner, "attention_mask", attention_mask)


def lm_outputs(x, dx, logits, hidden_cls, logits_cls):
    """(y, dy) of a decoder's final states x, dx (B, L, d): each as ``hidden_cls(last_hidden_state=...)``, or, with
    an LM head (``logits``: (x, dx) -> the logits (B, L, vocab) and their tangent; None without one), each as
    ``logits_cls(logits=...)``; dy is None where the tangent is."""
    if logits is None:
        return hidden_cls(last_hidden_state=x), None if dx is None else hidden_cls(last_hidden_state=dx)
    z, dz = logits(x, dx)
    return logits_cls(logits=z), None if dz is None else logits_cls(logits=dz)


def plus_rows(x, dx, table: DualEmbedding, ids):
    """x + table(ids) (B, L, d) and its tangent; ids (B, L) or (1, L), whose rows every example shares."""
    e, de = table(ids)
    return x + e, add(dx, apply(lambda t: t.expand(x.shape), de))


def rotary_angles(inv_freq: torch.Tensor, scaling: float, position_ids: torch.Tensor, dtype: torch.dtype):
    """(cos θ, sin θ) (B or 1, L, D) in ``dtype`` of a rotary embedding, θ = [p · inv_freq | p · inv_freq] for the
    positions p, from fp32 and times the rope's attention ``scaling``, as transformers computes them."""
    freqs = position_ids[..., None].float() * inv_freq.float()
    theta = torch.cat((freqs, freqs), -1)
    return (theta.cos() * scaling).to(dtype), (theta.sin() * scaling).to(dtype)


def split_pair(pair, sizes):
    """(t, dt) of a fused projection -> one (t_i, dt_i) per size along the last dim."""
    t, dt = pair
    parts = t.split(sizes, -1)
    return list(zip(parts, dt.split(sizes, -1) if dt is not None else [None] * len(parts)))


def rotary_table(core: nn.Module, attention: nn.Module, layer_type: str | None,
                 where: str) -> tuple[torch.Tensor, float, int | None]:
    """(inv_freq, attention_scaling, limit) of the rotary table a Hugging Face decoder's ``attention`` (of type
    ``layer_type``) turns Q and K with: the model ``core``'s (one per model; transformers 4.47's Mistral and GPT-NeoX
    keep one per attention module, all alike), its layer type's (Gemma 3's and OLMo 3's in transformers 5, OLMo 3's
    ``rotary_embs`` in 4), the local one of a sliding layer (Gemma 3's in transformers 4). Static rope types, and
    longrope's short table, which holds for positions below ``limit`` (its original_max_position_embeddings; None for
    the others); dynamic types are refused naming ``where``."""
    if hasattr(core, "rotary_embs"):
        rotary = core.rotary_embs[layer_type]
    elif getattr(attention, "is_sliding", False) and hasattr(core, "rotary_emb_local"):
        rotary = core.rotary_emb_local
    else:
        rotary = core.rotary_emb if hasattr(core, "rotary_emb") else attention.rotary_emb
    if not hasattr(rotary, "rope_type") and getattr(core.config, "rope_scaling", None):
        raise NotImplementedError(f"{where}: {type(rotary).__name__} scales its table at each call (rope_scaling="
                                  f"{core.config.rope_scaling}); it has no dual layer in this transformers version")
    typed = isinstance(getattr(rotary, "rope_type", None), dict)  # by layer type
    prefix = f"{layer_type}_" if typed else ""
    kind = str(rotary.rope_type[layer_type] if typed else getattr(rotary, "rope_type", "default"))
    inv_freq, limit = getattr(rotary, f"{prefix}inv_freq"), None
    scaling = getattr(rotary, f"{prefix}attention_scaling", 1.0)
    if kind == "longrope":  # the short table (its own copy: the source swaps its inv_freq in place) up to the limit
        params = getattr(core.config, "rope_parameters", None) or {}
        params = params.get(layer_type, params) if typed else params
        limit = params.get("original_max_position_embeddings", getattr(core.config, "original_max_position_embeddings",
                                                                       None))
        inv_freq = getattr(rotary, f"{prefix}original_inv_freq", None)
    if "dynamic" in kind or (kind == "longrope" and (inv_freq is None or limit is None)):
        raise NotImplementedError(f"{where}: rope type {kind!r} (updated at each call) has no dual layer; static rope "
                                  "types and longrope are supported")
    return inv_freq, float(scaling), limit


def rotate(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, acc: torch.dtype | None = None) -> torch.Tensor:
    """t cos θ + rotate_half(t) sin θ for t (B, H, L, D) and cos, sin (B or 1, L, R), computed in ``acc`` (None: t's
    dtype) and returned in t's: on t's first R dims, the others as they are (a partial rotary: Phi-3's where
    R < D). Linear in t: a tangent turns the same way."""
    a = t if acc is None else t.to(acc)
    r = cos.shape[-1]
    a, rest = a[..., :r], a[..., r:]
    turned = a * cos[:, None] + torch.cat((-a[..., r // 2:], a[..., :r // 2]), -1) * sin[:, None]
    return (torch.cat((turned, rest), -1) if rest.shape[-1] else turned).to(t.dtype)


def resized_positions(pos: torch.Tensor, grid: tuple[int, int], square: bool, in_fp32: bool,
                      antialias: bool = False) -> torch.Tensor:
    """Position embeddings (1, 1 + N, d) for a patch grid (h, w): as they are where h·w = N and the image is
    ``square``, else the patches' √N × √N embeddings resized bicubically to h × w (in fp32 where ``in_fp32``)."""
    n, d = pos.shape[1] - 1, pos.shape[2]
    if grid[0] * grid[1] == n and square:
        return pos
    side = round(n ** 0.5)
    patches = pos[:, 1:].reshape(1, side, side, d).permute(0, 3, 1, 2)
    resized = F.interpolate(patches.float() if in_fp32 else patches, size=grid, mode="bicubic", align_corners=False,
                            antialias=antialias)
    return torch.cat([pos[:, :1], resized.to(pos.dtype).permute(0, 2, 3, 1).reshape(1, -1, d)], 1)


def position_bias(table: DualEmbedding, buckets: torch.Tensor):
    """A relative position bias (1, H, Lq, Lk), the rows of ``table`` (buckets, H) at ``buckets`` (Lq, Lk) with heads
    first, and its tangent."""
    bias, dbias = table(buckets)
    heads_first = lambda t: t.permute(2, 0, 1)[None]  # noqa: E731
    return heads_first(bias), apply(heads_first, dbias)


class DualParameter(DualModule):
    """One θ0 tensor used as it is, ``value``, with its τ."""

    def __init__(self, value: torch.Tensor):
        super().__init__()
        self.register_dual("value", value)


class Builder:
    """Makes dual layers from a source model's modules; ``records`` holds (dual module, attribute, source
    parameter name) for every θ0."""

    def __init__(self, source: nn.Module):
        self.names = {id(p): n for n, p in source.named_parameters()}
        self.records = []
        self._embeddings = {}

    def record(self, layer: DualModule, **params):
        """Record that ``layer``'s θ0 ``attr`` is the source parameter ``params[attr]``; returns layer."""
        for attr, p in params.items():
            if p is not None:
                self.records.append((layer, attr, self.names[id(p)]))
        return layer

    def own(self, owner: DualModule, **params) -> None:
        """Register source parameters (not inside a converted layer) as θ0 of ``owner``."""
        for attr, p in params.items():
            owner.register_dual(attr, p)
        self.record(owner, **params)

    def linear(self, m: nn.Linear) -> DualLinear:
        return self.record(DualLinear(m.weight, m.bias), weight=m.weight, bias=m.bias)

    def conv1d(self, m: nn.Module) -> DualConv1D:
        """The dual of Hugging Face's ``Conv1D`` (x W + b, W (d_in, d_out))."""
        return self.record(DualConv1D(m.weight, m.bias), weight=m.weight, bias=m.bias)

    def layer_norm(self, m: nn.Module) -> DualLayerNorm:
        """The dual of an ``nn.LayerNorm`` over the last dim, or of DeBERTa's DebertaLayerNorm (the same map)."""
        if type(m).__name__ == "DebertaLayerNorm":
            return self.record(DualLayerNorm(m.weight, m.bias, m.variance_epsilon), weight=m.weight, bias=m.bias)
        if not isinstance(m, nn.LayerNorm):
            raise NotImplementedError(f"{type(m).__module__}.{type(m).__qualname__} where an nn.LayerNorm is "
                                      "expected has no dual layer")
        if len(m.normalized_shape) != 1:
            raise NotImplementedError(f"LayerNorm over {tuple(m.normalized_shape)}: only the last dimension "
                                      "is supported")
        return self.record(DualLayerNorm(m.weight, m.bias, m.eps), weight=m.weight, bias=m.bias)

    def rms_norm(self, weight: torch.Tensor, eps: float, offset: float = 0.0) -> DualRMSNorm:
        return self.record(DualRMSNorm(weight, eps, offset), weight=weight)

    def parameter(self, p: nn.Parameter) -> DualParameter:
        """A parameter used as it is (latent queries, a probe) as a DualParameter."""
        return self.record(DualParameter(p), value=p)

    def layer_scale(self, m: nn.Module) -> DualLayerScale | None:
        """The dual of a LayerScale ``m`` (open_clip's or timm's x ⊙ gamma, DINOv2's x ⊙ lambda1); None for an
        ``nn.Identity``."""
        if isinstance(m, nn.Identity):
            return None
        gamma = getattr(m, "gamma", getattr(m, "lambda1", None))
        if not isinstance(gamma, nn.Parameter):
            raise NotImplementedError(f"{type(m).__module__}.{type(m).__qualname__} where a LayerScale (x ⊙ gamma) "
                                      "or nn.Identity is expected has no dual layer")
        return self.record(DualLayerScale(gamma), gamma=gamma)

    def dropout(self, m: nn.Module) -> DualDropout:
        """The dual of an ``nn.Dropout`` ``m``, in ``m``'s train/eval mode."""
        return DualDropout(m.p).train(m.training)

    def embedding(self, m: nn.Embedding) -> DualEmbedding:
        """One DualEmbedding per table: a table tied across modules gets a single θ0 and τ."""
        if id(m.weight) not in self._embeddings:
            self._embeddings[id(m.weight)] = self.record(DualEmbedding(m.weight, m.padding_idx), weight=m.weight)
        return self._embeddings[id(m.weight)]


class DualModel(DualModule):
    """Base of the converted models. ``forward`` takes the source model's inputs and returns
    (primal, tangent) of its output; the tangent is None outside the "linearized" mode.

    ``task_vector()`` / ``load_task_vector()`` key τ by the source model's parameter names (as in its
    ``named_parameters()``), so task vectors are interchangeable with any other linearization of it."""

    def bind(self, builder: Builder, source: nn.Module, trainable=None) -> None:
        """Map source parameter names to (module path, attribute); freeze what ``trainable`` does not select
        (``tak._selection.select_parameters``: None selects the parameters with requires_grad=True)."""
        paths = {id(m): p for p, m in self.named_modules()}
        found = {name: (paths[id(layer)], attr) for layer, attr, name in builder.records}
        params = dict(source.named_parameters())
        missing = [n for n in params if n not in found]
        if missing:
            raise NotImplementedError(f"{type(source).__name__}: the dual model has no counterpart for parameters "
                                      f"{missing}; its output would differ from the source model's")
        self._sources = {name: found[name] for name in params}
        chosen = set(select_parameters(source, trainable))
        for name, (path, attr) in self._sources.items():
            if name not in chosen:
                self.get_submodule(path).freeze(attr)

    def share_theta0(self, source: nn.Module) -> None:
        """Point every θ0 at ``source``'s parameter of its name (the model this one was converted from, after
        both were moved or cast: θ0 is then held once)."""
        for name, (path, attr) in self._sources.items():
            self.get_submodule(path).register_buffer(attr, source.get_parameter(name).detach(), persistent=False)

    def set_mode(self, mode: str) -> "DualModel":
        """Set the mode ("linearized", "primal" or "merged"; see tak.nn.base) of every layer; returns self."""
        self.mode = mode
        return self

    def named_taus(self) -> dict[str, nn.Parameter]:
        """{source parameter name: τ} for the trainable parameters: the live parameters (for optimizers and
        regularizers keyed by the source model's names)."""
        taus = {}
        for name, (path, attr) in self._sources.items():
            tau = self.get_submodule(path).tau
            if attr in tau:
                taus[name] = tau[attr]
        return taus

    def task_vector(self) -> dict[str, torch.Tensor]:
        """{source parameter name: a copy of τ} for the trainable parameters."""
        return {name: tau.detach().clone() for name, tau in self.named_taus().items()}

    def load_task_vector(self, taus: dict[str, torch.Tensor]) -> None:
        """Copy ``taus`` into τ; its keys must be exactly the trainable parameters' names, with their shapes."""
        own, taus = self.named_taus(), {n: torch.as_tensor(v) for n, v in taus.items()}  # lists too, as generic
        shapes = [f"{n} {tuple(taus[n].shape)} != {tuple(t.shape)}" for n, t in own.items()
                  if n in taus and taus[n].shape != t.shape]
        checks = (("missing", sorted(own.keys() - taus.keys())),
                  ("unexpected (not trainable here)", sorted(taus.keys() - own.keys())),
                  ("mis-shaped (given != expected)", shapes))
        problems = [f"{what}: {items}" for what, items in checks if items]
        if problems:
            raise ValueError("load_task_vector: " + "; ".join(problems))
        with torch.no_grad():
            for name, tau in own.items():
                tau.copy_(taus[name])
