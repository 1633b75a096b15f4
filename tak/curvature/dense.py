"""Exact GGN blocks of the small parameters (TAK Sec. E): each LayerNorm's (weight, bias), each RMSNorm's
weight (T5's "layer norms"), each BatchNorm's (weight, bias), each LayerScale's γ, separate q and v biases, the class
and register tokens of a vision transformer and SigLIP's pooling probe, whose sizes grow linearly with the width, get
their dense GGN block instead of a Kronecker approximation.

For a parameter group θ_p with per-example, per-probe gradient v = (J_{θ_p} f)ᵀ s, the block is
G_p = 1/(N·M) Σ_{n,m} v vᵀ (Σ_c over unit probes when exact), from the same probes as the Kronecker
factors. Per-example gradients come from a tap on one tensor per group:
- LayerNorm y = x̂ ⊙ γ + β, x̂ = (x − μ) r: tap y, and v = [Σ_t dy ⊙ x̂, Σ_t dy] over the example's tokens. These are
  ``nn.LayerNorm`` and Hugging Face's that keep ε as ``variance_epsilon`` (DeBERTa's, statistics in fp32); a
  channels-first one (ConvNeXt's) normalizes (N, C, H, W) over C, its tokens the H·W positions.
- BatchNorm y = x̂ ⊙ γ + β with x̂ = (x − running mean) (running var + ε)^(-1/2) per channel (dim 1), as a model
  fitted in eval mode applies it: the same, its tokens the positions after the channel dim.
- RMSNorm y = γ ⊙ x̂, x̂ = x (mean(x²) + ε)^(-1/2): the same, v = Σ_t dy ⊙ x̂. These are ``nn.RMSNorm`` and the
  Hugging Face norms that keep ε as ``variance_epsilon`` and have no bias (``T5LayerNorm``, ``LlamaRMSNorm``, ...),
  whose statistics are taken in fp32 as theirs are.
- LayerScale y = x ⊙ γ (open_clip's and timm's ``gamma``, DINOv2's ``lambda1``): the same with x̂ = x, v = Σ_t dy ⊙ x.
- class token c (concatenated as token 0), register tokens r (R of them, after it): tap the tokens x they are in,
  and v = dx[:, 0] (dx[:, 1:1 + R].flatten(1), or from token 0 without a class token); x is ln_pre's input in
  open_clip, pos_drop's output in timm's VisionTransformer (``cls_token``, ``reg_token``), the output of the
  embeddings in Hugging Face's CLIP (``class_embedding``), ViT, DINOv2 and DINOv2 with registers (``cls_token``,
  ``register_tokens``).
- separate q and v biases added after a bias-free fused projection (timm's EVA and BEiT: ``qkv`` gives [q | k | v];
  DeBERTa's: ``in_proj`` gives [q_h | k_h | v_h] per head): tap the projection's output z (N, T, 3d), and v = Σ_t dz at
  the q_bias and v_bias entries. The projection's weight is a linear layer of its own.
- attention pooling probe p (P, d), repeated per example as the query: tap that query q, and v = dq[n] flattened;
  q is the query of the nn.MultiheadAttention ``attention`` beside ``probe`` (SigLIP's head in transformers), the
  input of the projection ``q`` beside ``latent`` (timm's AttentionPoolLatent: open_clip's SigLIP towers).
A block is stored like a layer with B = G_p and A = [[1]], so q(τ_p) = τ_pᵀ G_p τ_p is the same
Kronecker quadratic form (τ_p flattened into a column).
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .layers import parameter_names


@dataclass(frozen=True)
class DenseGroup:
    """Parameters (names, in block order) with an exact GGN block, and how to see their gradients."""

    name: str
    module: nn.Module
    params: tuple[str, ...]
    kind: str  # "layernorm" | "rmsnorm" | "batchnorm" | "layerscale" | "class_token" | "register_tokens" | "qv_bias"
    #            (module: the attention) | "probe" (module: the probe's consumer)
    size: int
    tokens: tuple[int, int] = (0, 1)  # class or register tokens: their positions [start, stop) among the tokens


def _norm_kind(module: nn.Module) -> str | None:
    """"layernorm" for an affine nn.LayerNorm (channels-first ones too: ``channels_first``; not timm's LayerNormAct
    with an activation after it) or a Hugging Face LayerNorm (``variance_epsilon``, vector weight and bias:
    DeBERTa's), "rmsnorm" for an affine nn.RMSNorm or a Hugging Face RMSNorm (``variance_epsilon``, a vector weight,
    no bias; or Gemma's: ``eps`` and ``_norm``, y = x̂ ⊙ (1 + γ)), "batchnorm" for an affine BatchNorm with running
    statistics, else None."""
    if isinstance(module, nn.LayerNorm):
        plain = isinstance(getattr(module, "act", None), (nn.Identity, type(None)))
        return "layernorm" if module.elementwise_affine and plain else None
    if isinstance(module, nn.RMSNorm):
        return "rmsnorm" if module.weight is not None else None
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return "batchnorm" if module.affine and module.track_running_stats else None
    weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
    if not (isinstance(weight, nn.Parameter) and weight.dim() == 1):
        return None
    if hasattr(module, "variance_epsilon"):
        if bias is None:
            return "rmsnorm"
        return "layernorm" if isinstance(bias, nn.Parameter) and bias.shape == weight.shape else None
    if _gemma_rms_norm(module):
        return "rmsnorm"
    return None


def _gemma_rms_norm(module: nn.Module) -> bool:
    """Gemma's RMSNorm: x̂ = ``_norm(x)`` in fp32, y = x̂ ⊙ (1 + γ): γ's gradient is that of the plain one's."""
    own_norm = callable(getattr(module, "_norm", None)) and hasattr(module, "eps")
    return type(module).__name__.endswith("RMSNorm") and own_norm and getattr(module, "bias", None) is None


# Elementwise scales over the last dim by module class name, their weight's attribute: open_clip's and timm's
# LayerScale, DINOv2's (with registers or not).
_LAYER_SCALES = {"LayerScale": "gamma", "Dinov2LayerScale": "lambda1", "Dinov2WithRegistersLayerScale": "lambda1"}


def scale_weight(module: nn.Module) -> nn.Parameter:
    """γ of a norm or LayerScale ``module``: what multiplies x̂ elementwise."""
    return getattr(module, _LAYER_SCALES.get(type(module).__name__, "weight"))


def _is_layer_scale(module: nn.Module) -> bool:
    gamma = getattr(module, _LAYER_SCALES.get(type(module).__name__, ""), None)
    return isinstance(gamma, nn.Parameter) and gamma.dim() == 1


def channels_first(module: nn.Module) -> bool:
    """Whether the norm ``module`` normalizes dim 1 of an (N, C, ...) input: a BatchNorm, or a LayerNorm of (N, C, H, W)
    over C (timm's LayerNorm2d, Hugging Face ConvNeXt's with data_format "channels_first")."""
    return isinstance(module, nn.modules.batchnorm._BatchNorm) or type(module).__name__ == "LayerNorm2d" or \
        getattr(module, "data_format", None) == "channels_first"


def _normalized(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """x̂ of the norm ``module`` (a LayerNorm's (x − μ) r or an RMSNorm's x r) over the trailing dims its weight has; a
    BatchNorm's (x − running mean) (running var + ε)^(-1/2), channels last."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return (x - module.running_mean) * torch.rsqrt(module.running_var + module.eps)
    if isinstance(module, nn.LayerNorm):
        return F.layer_norm(x, module.normalized_shape, eps=module.eps)
    if getattr(module, "bias", None) is not None:  # a Hugging Face LayerNorm: statistics in fp32, as DeBERTa's
        return F.layer_norm(x.float(), x.shape[-1:], eps=module.variance_epsilon)
    dims = tuple(range(-module.weight.dim(), 0))
    if isinstance(module, nn.RMSNorm):  # as PyTorch computes it: in at least fp32, ε of that type by default
        x = x.to(torch.promote_types(x.dtype, torch.float32))
        eps = torch.finfo(x.dtype).eps if module.eps is None else module.eps
        return x * torch.rsqrt(x.pow(2).mean(dims, keepdim=True) + eps)
    if _gemma_rms_norm(module):
        return module._norm(x.float())
    return x * torch.rsqrt(x.to(torch.float32).pow(2).mean(dims, keepdim=True) + module.variance_epsilon)


def qv_biases(module: nn.Module) -> tuple[nn.Linear, torch.Tensor] | None:
    """(its fused projection, the positions (2d,) of q_bias's and v_bias's entries among that one's 3d outputs) of an
    attention that adds separate q and v biases after a bias-free projection (module docstring), else None."""
    q, v = getattr(module, "q_bias", None), getattr(module, "v_bias", None)
    if not (isinstance(q, nn.Parameter) and isinstance(v, nn.Parameter) and q.dim() == 1 and q.shape == v.shape):
        return None
    d = q.numel()
    for attr in ("qkv", "in_proj"):
        projection = getattr(module, attr, None)
        if isinstance(projection, nn.Linear) and projection.bias is None and projection.out_features == 3 * d:
            break
    else:
        return None
    if attr == "qkv":  # [q | k | v]
        q_at, v_offset = torch.arange(d), 2 * d
    else:  # DeBERTa's: per head [q_h | k_h | v_h], d / h each
        w = d // module.num_attention_heads
        q_at, v_offset = (torch.arange(module.num_attention_heads)[:, None] * 3 * w + torch.arange(w)).flatten(), 2 * w
    return projection, torch.cat([q_at, q_at + v_offset])


# Prefix tokens by attribute, in their order among the tokens: a class token, then register tokens.
_PREFIX_TOKENS = {"class_embedding": "class_token", "cls_token": "class_token", "register_tokens": "register_tokens",
                  "reg_token": "register_tokens"}
# A module holding them, by where it sees the tokens: open_clip's tower (ln_pre takes them), timm's VisionTransformer
# (pos_drop gives them), a Hugging Face embeddings module (its output is them).
_TOKEN_SITES = ("ln_pre", "pos_drop", "patch_embedding", "patch_embeddings")


def find_dense_groups(model: nn.Module, exclude=()) -> dict[str, DenseGroup]:
    """Every affine LayerNorm and RMSNorm, every LayerScale, the class and register tokens of open_clip's, timm's and
    Hugging Face's vision transformers (CLIP, ViT, DINOv2), and the probe of an attention pooling head (module
    docstring)."""
    groups, named = {}, parameter_names(model)
    for path, module in model.named_modules():
        prefix = f"{path}." if path else ""
        if (kind := _norm_kind(module)) is not None:
            own = [(n, p) for n, p in (("weight", module.weight), ("bias", getattr(module, "bias", None)))
                   if p is not None]
            groups[path] = DenseGroup(path, module, tuple(named.get(id(p), prefix + n) for n, p in own), kind,
                                      sum(p.numel() for _, p in own))
        if _is_layer_scale(module):
            attr = _LAYER_SCALES[type(module).__name__]
            gamma = getattr(module, attr)
            groups[path] = DenseGroup(path, module, (named.get(id(gamma), prefix + attr),), "layerscale", gamma.numel())
        if qv_biases(module) is not None:
            name = prefix + "qv_bias"
            params = tuple(named.get(id(getattr(module, n)), prefix + n) for n in ("q_bias", "v_bias"))
            groups[name] = DenseGroup(name, module, params, "qv_bias", 2 * module.q_bias.numel())
        holds_tokens, start = any(hasattr(module, a) for a in _TOKEN_SITES), 0
        for attr, kind in _PREFIX_TOKENS.items():
            token = getattr(module, attr, None)
            if holds_tokens and isinstance(token, nn.Parameter):
                name, count = prefix + attr, token.numel() // token.shape[-1]
                groups[name] = DenseGroup(name, module, (named.get(id(token), name),), kind, token.numel(),
                                          (start, start + count))
                start += count
        for attr, consumer in (("probe", "attention"), ("latent", "q")):  # SigLIP's (transformers), timm's
            probe, query = getattr(module, attr, None), getattr(module, consumer, None)
            if isinstance(probe, nn.Parameter) and isinstance(query, (nn.MultiheadAttention, nn.Linear, nn.Identity)):
                name = prefix + attr
                groups[name] = DenseGroup(name, query, (named.get(id(probe), name),), "probe", probe.numel())
    return {n: g for n, g in groups.items() if n not in exclude}


def install(group: DenseGroup, tap, batch, calls):
    """Register the hooks that tap ``group``'s tensor; ``tap(group, z, to_vectors, shared)`` returns z behind a
    tap whose gradient ``to_vectors`` turns into per-example gradient vectors (N, size), or one vector (1, size) for
    a norm of a tensor the batch ``shared`` (``tokens``); ``batch()`` is the current batch's ``BatchTokens`` (which
    says whether a LayerNorm input is sequence-first (T, N, ...) or shared at its call number ``calls(name)``).
    Returns the handle."""
    if group.kind in ("layernorm", "rmsnorm", "batchnorm", "layerscale"):
        norm, weight = group.module, scale_weight(group.module)
        last = (lambda t: t.movedim(1, -1)) if channels_first(norm) else (lambda t: t)  # noqa: E731

        def hook(module, inputs, output):
            x = last(inputs[0].detach())
            x_hat = x if group.kind == "layerscale" else _normalized(norm, x)
            lead = x_hat.dim() - weight.dim()  # the dims before the normalized ones
            call = calls(group.name)
            shared = batch().shared(group.name, x_hat, call)
            sequence_first = not shared and lead == 2 and batch().sequence_first(group.name, x_hat, call)
            tokens = tuple(range(1, lead))  # dims between N and the normalized ones
            flattened = lead == 1 and x_hat.shape[0] != batch().n  # tokens as rows (N·T, d), as measured

            def per_example(t):  # (N, ..., *normalized_shape) -> (N, numel(normalized_shape))
                if shared:
                    return t.reshape(-1, weight.numel()).sum(0, keepdim=True)
                if flattened:
                    return batch().view(t, group.name, call)[0].sum(1)
                t = t.transpose(0, 1) if sequence_first else t
                return (t.sum(tokens) if tokens else t).reshape(t.shape[0], -1)

            def to_vectors(dy):
                dy, bias = last(dy), getattr(norm, "bias", None) is not None
                return torch.cat([per_example(dy * x_hat)] + ([per_example(dy)] if bias else []), dim=1)
            return tap(group, output, to_vectors, shared)
        return norm.register_forward_hook(hook)

    if group.kind == "qv_bias":  # the fused projection's output (N, T, 3d)
        projection, positions = qv_biases(group.module)

        def qv_hook(module, args, output):
            index = positions.to(output.device)
            return tap(group, output, lambda dz: dz.reshape(dz.shape[0], -1, dz.shape[-1]).sum(1)[:, index])
        return projection.register_forward_hook(qv_hook)
    if group.kind == "probe":  # the probe expanded per example, as its module (``group.module``) takes it
        key = "query" if isinstance(group.module, nn.MultiheadAttention) else "input"

        def query_hook(module, args, kwargs):
            if args:
                return (tap(group, args[0], lambda dq: dq.flatten(1)),) + tuple(args[1:]), kwargs
            return args, {**kwargs, key: tap(group, kwargs[key], lambda dq: dq.flatten(1))}
        return group.module.register_forward_pre_hook(query_hook, with_kwargs=True)
    start, stop = group.tokens

    def prefix(dx):  # (N, T, d) -> the group's tokens' gradients (N, size)
        return dx[:, start:stop].flatten(1)
    if hasattr(group.module, "ln_pre"):  # open_clip: the tokens ln_pre takes
        def pre_hook(module, args):
            return (tap(group, args[0], prefix),) + tuple(args[1:])
        return group.module.ln_pre.register_forward_pre_hook(pre_hook)
    site = group.module.pos_drop if hasattr(group.module, "pos_drop") else group.module  # timm's; Hugging Face's
    return site.register_forward_hook(lambda module, args, output: tap(group, output, prefix))
