"""Exact GGN blocks of the small parameters (TAK Sec. E): each LayerNorm's (weight, bias) and
open_clip's class token, whose sizes grow linearly with the width, get their dense GGN block instead
of a Kronecker approximation.

For a parameter group θ_p with per-example, per-probe gradient v = (J_{θ_p} f)ᵀ s, the block is
G_p = 1/(N·M) Σ_{n,m} v vᵀ (Σ_c over unit probes when exact), from the same probes as the Kronecker
factors. Per-example gradients come from a tap on one tensor per group:
- LayerNorm y = x̂ ⊙ γ + β: tap y, and v = [Σ_t dy ⊙ x̂, Σ_t dy] over the example's tokens.
- class token c (concatenated as token 0 before ``ln_pre``): tap ln_pre's input x, and v = dx[:, 0].
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
    kind: str  # "layernorm" | "class_token"
    size: int


def find_dense_groups(model: nn.Module, exclude=()) -> dict[str, DenseGroup]:
    """Every affine nn.LayerNorm, and the class token of open_clip vision transformers."""
    groups, named = {}, parameter_names(model)
    for path, module in model.named_modules():
        prefix = f"{path}." if path else ""
        if isinstance(module, nn.LayerNorm) and module.elementwise_affine:
            params = tuple(named.get(id(p), prefix + n) for n, p in (("weight", module.weight), ("bias", module.bias))
                           if p is not None)
            groups[path] = DenseGroup(path, module, params, "layernorm", sum(p.numel() for p in module.parameters(recurse=False)))
        token = getattr(module, "class_embedding", None)
        if isinstance(token, nn.Parameter) and isinstance(getattr(module, "ln_pre", None), nn.Module):
            name = prefix + "class_embedding"
            groups[name] = DenseGroup(name, module, (named.get(id(token), name),), "class_token", token.numel())
    return {n: g for n, g in groups.items() if n not in exclude}


def install(group: DenseGroup, tap, batch):
    """Register the hooks that tap ``group``'s tensor; ``tap(group, z, to_vectors)`` returns z behind a
    tap whose gradient ``to_vectors`` turns into per-example gradient vectors (N, size); ``batch()`` is the
    current batch's ``BatchTokens`` (which says whether a LayerNorm input is sequence-first (T, N, ...)).
    Returns the handle."""
    if group.kind == "layernorm":
        ln = group.module

        def hook(module, inputs, output):
            x_hat = F.layer_norm(inputs[0].detach(), ln.normalized_shape, eps=ln.eps)
            lead = x_hat.dim() - len(ln.normalized_shape)  # the dims before the normalized ones
            sequence_first = lead == 2 and batch().sequence_first(group.name, x_hat)
            tokens = tuple(range(1, lead))  # dims between N and the normalized ones

            def per_example(t):  # (N, ..., *normalized_shape) -> (N, numel(normalized_shape))
                t = t.transpose(0, 1) if sequence_first else t
                return (t.sum(tokens) if tokens else t).reshape(t.shape[0], -1)

            def to_vectors(dy):
                parts = ([per_example(dy * x_hat)] if ln.weight is not None else []) + \
                        ([per_example(dy)] if ln.bias is not None else [])
                return torch.cat(parts, dim=1)
            return tap(group, output, to_vectors)
        return ln.register_forward_hook(hook)

    def pre_hook(module, args):
        return (tap(group, args[0], lambda dx: dx[:, 0]),) + tuple(args[1:])
    return group.module.ln_pre.register_forward_pre_hook(pre_hook)
