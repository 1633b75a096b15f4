"""The linear maps of a model that get Kronecker factors.

Every ``nn.Linear`` (including ``nn.MultiheadAttention.out_proj``) and Hugging Face's ``Conv1D`` (GPT-2's linear
maps, z = x W + b with W (d_in, d_out): layout "transposed"); every ``nn.Conv2d`` (groups 1,
numeric zero padding or "valid") as the linear map of its unfolded patches (Grosse & Martens 2016): W (d_out,
C·kh·kw) the flattened kernel, the output positions its tokens; the output projection of open_clip's
vision transformer, z = pooled @ ``proj`` (W = ``proj``ᵀ); and the fused q/k/v input
projection of an ``nn.MultiheadAttention`` (open_clip's attention): z = x W_inᵀ + b_in with W_in =
``in_proj_weight`` (3d × d). The projection is treated as ONE linear layer named ``<module>.in_proj``: its
B (3d × 3d) keeps the cross-covariances of the q, k and v gradients; attention over other inputs (a pooling
probe, cross-attention) projects each distinct input as a call of that layer (``tak.curvature.capture``).
``nn.MultiheadAttention`` applies ``out_proj`` inside its functional forward, not as a module call, so
both projections are seen through a replacement forward that covers attention without
bias_k/bias_v/add_zero_attn and with one q/k/v width; other attention modules get neither (with a warning).
open_clip's ``AttentionPool2d`` (the ModifiedResNet's pool) likewise passes its q/k/v/c projections' weights to
``F.multi_head_attention_forward``: its replacement forward calls them (q on the one query token its output takes)
and adds its ``positional_embedding`` (layer ``<pool>.positional_embedding``, an embedding of the token positions).
Every ``nn.Embedding`` (without ``max_norm``) is the linear map of its one-hot inputs: W = weightᵀ
(embedding_dim, num_embeddings), its input the token ids, so its A is diagonal (the tokens' frequencies); so is
the position table of open_clip's and timm's vision transformers, ``positional_embedding`` (T, d) and ``pos_embed``
(1, T, d) (a layer named ``<tower>.positional_embedding`` or ``<tower>.pos_embed``), whose rows every image's tokens
add at the position ids 0..T-1 (timm's at the model's own image size; after its class and register tokens where it
has ``no_embed_class``). Hugging Face's ViT and DINOv2 (with registers) add their ``position_embeddings`` (1, T, d),
and CLIP and SigLIP the weight (T, d) of their ``position_embedding``, resized to each image's patch grid (DINOv2
always, the others with ``interpolate_pos_encoding``): a linear map of the table's rows, bicubic in the patches' rows,
the class token's row (not SigLIP's: it has none) as it is. Layout "resized": W = tableᵀ as for an embedding, its
input at each class or patch token that token's row of the map (``resized_rows``: one-hot where the grid is the
table's), so its A is dense; the layer's module is the embeddings module, whose output holds those tokens.
DeBERTa's relative position table (its encoder's ``rel_embeddings``, an ``nn.Embedding`` never called:
``get_rel_embedding`` reads its weight whole) is an embedding whose input is the ids of its K rows, shared by the
batch (``tokens.TABLE``); the layer's module is the encoder.
"""
import warnings
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from .._selection import check_patterns, selects
from ..models.base import resized_positions

LAYOUTS = ("linear", "conv", "transposed", "embedding", "resized")


def as_matrix(weight, layout: str):
    """The (d_out, d_in) matrix W of a layer's weight parameter (or task vector) of this layout:
    "linear" W itself, "conv" (d_out, C, kh, kw) flattened to (d_out, C·kh·kw), "transposed" (d_in, d_out),
    "embedding" (num_embeddings, embedding_dim) = (d_in, d_out) (timm's position table: (1, d_in, d_out)), "resized"
    a position table (1, d_in, d_out) or (d_in, d_out) likewise."""
    if layout == "conv":
        return weight.reshape(weight.shape[0], -1)
    if layout in ("embedding", "resized"):
        return weight.reshape(-1, weight.shape[-1]).T
    return weight.T if layout == "transposed" else weight


@dataclass(frozen=True)
class Layer:
    """z = a Wᵀ + b with W (d_out, d_in) the model parameter ``weight`` seen through ``layout`` (see
    ``as_matrix``) and b the parameter ``bias``. ``attention``: for the ``out_proj`` of an
    ``nn.MultiheadAttention`` and the layers of an ``AttentionPool2d``, that module (its forward must be replaced for
    their calls to be seen)."""

    name: str
    module: nn.Module
    weight: str
    bias: str | None
    d_out: int
    d_in: int
    attention: nn.Module | None = None
    layout: str = "linear"

    @property
    def block_shape(self) -> tuple[int, int]:
        """Shape of the task-vector block [W | b]: (d_out, d_in + 1 with a bias)."""
        return self.d_out, self.d_in + (self.bias is not None)

    def meta(self) -> dict:
        """What a factor file records of the layer."""
        return {"weight": self.weight, "bias": self.bias, "d_out": self.d_out, "d_in": self.d_in,
                "layout": self.layout}


def find_layers(model: nn.Module, layers=None) -> dict[str, Layer]:
    """The model's linear layers, in module order; ``layers`` selects by name or glob pattern
    (a string or a list of them) or by a predicate ``layers(name) -> bool``. A layer's parameters are
    named as ``model.named_parameters()`` names them: the layers of a tied weight all read its one τ."""
    found, order = {}, {}  # order: a layer's place, after the modules it follows in the forward
    out_projs = {}  # id(linear) -> the attention calling it in a replaced forward, or None when that cannot be done
    tables = set()  # id of an nn.Embedding found as a table of the module above it (DeBERTa's, CLIP's, SigLIP's)
    modules = list(model.named_modules())
    named = parameter_names(model)
    for index, (path, module) in enumerate(modules):
        prefix = f"{path}." if path else ""

        def param(attr):  # the model's name of the module's parameter (the first one when tied), or None
            p = getattr(module, attr, None)
            return None if p is None else named.get(id(p), prefix + attr)
        order[path] = index
        if _is_vision_projection(module):  # applied after the tower's last module
            name = prefix + "proj"
            order[name] = max(i for i, (p, _) in enumerate(modules) if p == path or p.startswith(prefix)) + 0.5
            found[name] = Layer(name, module, param("proj"), None, module.proj.shape[1], module.proj.shape[0],
                                layout="transposed")
        if (table := position_table(module)) is not None:
            name, positions = prefix + table, getattr(module, table)
            if type(module).__name__ in _RESIZED_TABLES:  # in the output of the module
                order[name] = max(i for i, (p, _) in enumerate(modules) if p == path or p.startswith(prefix)) + 0.5
                layout = "resized"
            else:  # added to the tokens before ln_pre / at pos_drop
                order[name] = next(i for i, (p, _) in enumerate(modules)
                                   if p in (prefix + "ln_pre", prefix + "pos_drop")) - 0.5
                layout = "embedding"
            if isinstance(positions, nn.Embedding):  # CLIP's and SigLIP's: the embedding's weight
                tables.add(id(positions))
                positions = positions.weight
            found[name] = Layer(name, module, named.get(id(positions), name), None, positions.shape[-1],
                                positions.shape[-2], layout=layout)
        if is_attention_pool(module):  # its positions added first, then its projections
            name = prefix + "positional_embedding"
            order[name] = index + 0.5
            found[name] = Layer(name, module, param("positional_embedding"), None, module.positional_embedding.shape[1],
                                module.positional_embedding.shape[0], attention=module, layout="embedding")
            out_projs.update({id(getattr(module, p)): module for p in ("q_proj", "k_proj", "v_proj", "c_proj")})
        if (table := relative_table(module)) is not None:
            tables.add(id(table))
            name = prefix + "rel_embeddings"
            found[name] = Layer(name, module, named.get(id(table.weight), name + ".weight"), None, table.embedding_dim,
                                table.num_embeddings, layout="embedding")
        if isinstance(module, nn.Conv2d):
            if module.groups != 1 or module.padding == "same" or module.padding_mode != "zeros":
                warnings.warn(f"{path}: nn.Conv2d with groups={module.groups}, padding={module.padding!r}, "
                              f"padding_mode={module.padding_mode!r} gets no Kronecker factors (groups 1 and numeric "
                              "zero padding or 'valid' only)", stacklevel=2)
                continue
            found[path] = Layer(path, module, param("weight"), param("bias"), module.out_channels,
                                module.weight[0].numel(), layout="conv")
        elif isinstance(module, nn.Embedding) and id(module) not in tables:
            if module.max_norm is not None:
                warnings.warn(f"{path}: nn.Embedding with max_norm={module.max_norm} rescales its rows in the forward "
                              "and gets no Kronecker factors", stacklevel=2)
                continue
            found[path] = Layer(path, module, param("weight"), None, module.embedding_dim, module.num_embeddings,
                                layout="embedding")
        elif is_conv1d(module):
            found[path] = Layer(path, module, param("weight"), param("bias"), module.nf, module.weight.shape[0],
                                layout="transposed")
        elif isinstance(module, nn.Linear):
            if id(module) in out_projs and out_projs[id(module)] is None:
                continue  # the out_proj of an attention module Capture cannot replace: never called as a module
            found[path] = Layer(path, module, param("weight"), param("bias"), module.out_features, module.in_features,
                                attention=out_projs.get(id(module)))
        elif isinstance(module, nn.MultiheadAttention):
            if not module._qkv_same_embed_dim or module.bias_k is not None or module.add_zero_attn:
                out_projs[id(module.out_proj)] = None
                warnings.warn(f"{path}: nn.MultiheadAttention with separate q/k/v weights, bias_k/bias_v or "
                              "add_zero_attn gets no Kronecker factors for its input and output projections",
                              stacklevel=2)
                continue
            out_projs[id(module.out_proj)] = module
            name = prefix + "in_proj"
            order[name] = index
            found[name] = Layer(name, module, param("in_proj_weight"), param("in_proj_bias"), 3 * module.embed_dim,
                                module.embed_dim)
    found = dict(sorted(found.items(), key=lambda item: order[item[0]]))
    check_patterns(layers, found, "layers", "linear layer of the model")
    selected = {n: layer for n, layer in found.items() if selects(layers, n)}
    if not selected:
        raise ValueError(f"layers: no linear layer selected among the model's {len(found)}")
    return selected


def parameter_names(model: nn.Module) -> dict[int, str]:
    """{id(parameter): its name in ``model.named_parameters()``}: a parameter tied to several modules (an
    LM head tied to the embedding) has the one name task vectors and optimizers know it by, the first."""
    return {id(p): name for name, p in model.named_parameters()}


def is_conv1d(module: nn.Module) -> bool:
    """Hugging Face's ``Conv1D`` (transformers.pytorch_utils): a linear map x W + b of weight (d_in, d_out)."""
    weight = getattr(module, "weight", None)
    return type(module).__name__ == "Conv1D" and isinstance(getattr(module, "nf", None), int) and \
        isinstance(weight, nn.Parameter) and weight.dim() == 2 and weight.shape[1] == module.nf


class _Resizing(NamedTuple):
    """How Hugging Face vision embeddings add their position table to the tokens: resized at every image size (else
    with ``interpolate_pos_encoding`` only, where the patch grid is not the table's), in fp32, antialiased, the table's
    first row the class token's (else all rows are patches')."""

    table: str
    always: bool
    in_fp32: bool
    antialias: bool
    class_row: bool = True


# By class name of the embeddings module, whose output holds the tokens (with DINOv2's register tokens between the
# class and patch tokens): ViT's, DINOv2's, CLIP's, SigLIP's.
_RESIZED_TABLES = {"ViTEmbeddings": _Resizing("position_embeddings", False, False, False),
                   "Dinov2Embeddings": _Resizing("position_embeddings", True, True, False),
                   "Dinov2WithRegistersEmbeddings": _Resizing("position_embeddings", True, True, True),
                   "CLIPVisionEmbeddings": _Resizing("position_embedding", False, False, False),
                   "SiglipVisionEmbeddings": _Resizing("position_embedding", False, False, False, class_row=False)}


def resized_rows(embeddings: nn.Module, image_size: tuple[int, int], interpolate: bool | None) -> torch.Tensor:
    """R (T', T) in fp32: the T' tokens that Hugging Face ``embeddings``' position table of T rows reaches (the class
    token, if any, and N patches) in an ``image_size`` image get R @ table (``interpolate``: the forward's
    ``interpolate_pos_encoding``)."""
    how = _RESIZED_TABLES[type(embeddings).__name__]
    table = getattr(embeddings, how.table)
    table = table.weight if isinstance(table, nn.Embedding) else table
    identity = torch.eye(table.shape[-2], device=table.device)
    if not (how.always or interpolate):
        return identity
    patch = embeddings.patch_size if hasattr(embeddings, "patch_size") else embeddings.patch_embeddings.patch_size
    (H, W), patch = image_size, (patch, patch) if isinstance(patch, int) else tuple(patch)
    rows = identity if how.class_row else torch.cat([identity[:1] * 0, identity])  # a class row to resize around
    R = resized_positions(rows[None], (H // patch[0], W // patch[1]), H == W, how.in_fp32, how.antialias)[0]
    return R if how.class_row else R[1:]


def position_table(module: nn.Module) -> str | None:
    """The attribute of a vision transformer's position table: open_clip's ``positional_embedding`` (the tokens its
    ln_pre takes hold it), timm's ``pos_embed`` without dynamic image sizes (the tokens its pos_drop gives), Hugging
    Face ViT's and DINOv2's ``position_embeddings`` and CLIP's and SigLIP's ``position_embedding`` (an nn.Embedding)
    (their output holds them, resized: ``resized_rows``), else None."""
    how = _RESIZED_TABLES.get(type(module).__name__)
    if how is not None and isinstance(getattr(module, how.table, None), (nn.Parameter, nn.Embedding)):
        return how.table
    table = getattr(module, "positional_embedding", None)
    if isinstance(table, nn.Parameter) and table.dim() == 2 and hasattr(module, "conv1") and hasattr(module, "ln_pre"):
        return "positional_embedding"
    table = getattr(module, "pos_embed", None)
    if isinstance(table, nn.Parameter) and table.dim() == 3 and hasattr(module, "patch_embed") and \
            isinstance(getattr(module, "pos_drop", None), nn.Module) and not getattr(module, "dynamic_img_size", False):
        return "pos_embed"
    return None


def is_attention_pool(module: nn.Module) -> bool:
    """open_clip's ``AttentionPool2d``: attention of the mean token over [mean; tokens] + positions, through its
    ``q_proj``, ``k_proj``, ``v_proj`` and ``c_proj``."""
    positions = getattr(module, "positional_embedding", None)
    projections = [getattr(module, p, None) for p in ("q_proj", "k_proj", "v_proj", "c_proj")]
    return type(module).__name__ == "AttentionPool2d" and isinstance(positions, nn.Parameter) and \
        all(isinstance(p, nn.Linear) for p in projections)


def relative_table(module: nn.Module) -> nn.Embedding | None:
    """The relative position table a DeBERTa encoder reads whole in ``get_rel_embedding`` (its ``rel_embeddings``
    with ``relative_attention``), else None."""
    table = getattr(module, "rel_embeddings", None)
    if isinstance(table, nn.Embedding) and getattr(module, "relative_attention", False) and \
            callable(getattr(module, "get_rel_embedding", None)):
        return table
    return None


def _is_vision_projection(module: nn.Module) -> bool:
    """An open_clip vision transformer with an output projection ``pooled @ proj`` after ``_pool``."""
    proj = getattr(module, "proj", None)
    return isinstance(proj, nn.Parameter) and proj.dim() == 2 and callable(getattr(module, "_pool", None)) \
        and isinstance(getattr(module, "ln_post", None), nn.Module)
