"""The linear maps of a model that get Kronecker factors.

Every ``nn.Linear`` (including ``nn.MultiheadAttention.out_proj``), and the fused q/k/v input
projection of a self-attention ``nn.MultiheadAttention`` (open_clip's attention): z = x W_inᵀ + b_in
with W_in = ``in_proj_weight`` (3d × d). The projection is treated as ONE linear layer named
``<module>.in_proj``: its B (3d × 3d) keeps the cross-covariances of the q, k and v gradients.
``nn.MultiheadAttention`` applies ``out_proj`` inside its functional forward, not as a module call, so
both projections are seen through a replacement forward (``tak.curvature.capture``) that covers
self-attention without bias_k/bias_v/add_zero_attn and with one q/k/v width; other attention modules
get neither (with a warning).
"""
import warnings
from dataclasses import dataclass

from torch import nn

from .._selection import check_patterns, selects


@dataclass(frozen=True)
class Layer:
    """z = a Wᵀ + b with W (d_out, d_in) the model parameter ``weight`` and b the parameter ``bias``.
    ``attention``: for the ``out_proj`` of an ``nn.MultiheadAttention``, that module (its forward must
    be replaced for the out_proj call to be seen)."""

    name: str
    module: nn.Module
    weight: str
    bias: str | None
    d_out: int
    d_in: int
    attention: nn.Module | None = None

    @property
    def block_shape(self) -> tuple[int, int]:
        """Shape of the task-vector block [W | b]: (d_out, d_in + 1 with a bias)."""
        return self.d_out, self.d_in + (self.bias is not None)


def find_layers(model: nn.Module, layers=None) -> dict[str, Layer]:
    """The model's linear layers, in module order; ``layers`` selects by name or glob pattern
    (a string or a list of them) or by a predicate ``layers(name) -> bool``."""
    found = {}
    out_projs = {}  # id(out_proj) -> its nn.MultiheadAttention, or None when that one cannot be seen
    for path, module in model.named_modules():
        prefix = f"{path}." if path else ""
        if isinstance(module, nn.Linear):
            if id(module) in out_projs and out_projs[id(module)] is None:
                continue  # the out_proj of an attention module Capture cannot replace: never called as a module
            found[path] = Layer(path, module, prefix + "weight", prefix + "bias" if module.bias is not None else None,
                                module.out_features, module.in_features, attention=out_projs.get(id(module)))
        elif isinstance(module, nn.MultiheadAttention):
            if not module._qkv_same_embed_dim or module.bias_k is not None or module.add_zero_attn:
                out_projs[id(module.out_proj)] = None
                warnings.warn(f"{path}: nn.MultiheadAttention with separate q/k/v weights, bias_k/bias_v or "
                              "add_zero_attn gets no Kronecker factors for its input and output projections",
                              stacklevel=2)
                continue
            out_projs[id(module.out_proj)] = module
            name = prefix + "in_proj"
            found[name] = Layer(name, module, prefix + "in_proj_weight",
                                prefix + "in_proj_bias" if module.in_proj_bias is not None else None,
                                3 * module.embed_dim, module.embed_dim)
    check_patterns(layers, found, "layers", "linear layer of the model")
    selected = {n: layer for n, layer in found.items() if selects(layers, n)}
    if not selected:
        raise ValueError(f"layers: no linear layer selected among the model's {len(found)}")
    return selected
