"""timm's VisionTransformer, alone or as the trunk of open_clip's TimmModel (the SigLIP and SigLIP2 image towers),
as a dual model.

Tokens: patches through the patch embedding (a convolution with stride = kernel), the class and register tokens
prepended, the position embedding added (before prepending them where ``no_embed_class``), dropout; then norm_pre and
pre-norm Blocks x + ls1(attn(norm1(x))), x + ls2(mlp(norm2(x))) with a fused q/k/v projection (Q and K LayerNorm-ed
per head where qk_norm), LayerScale where init_values; norm; pooling: the class token ('token'), the mean of the patch
tokens ('avg'), none (''), or the attention pool ('map', ``AttentionPoolLatent``: learned latent queries attend over
the tokens, then x + mlp(norm(x))); fc_norm, head_drop and the head. In open_clip's TimmModel, its ``head`` after the
trunk (nothing, or dropout and a linear projection). Dropout where timm has it; stochastic depth (drop_path), patch
dropout and dynamic image sizes are not supported.
"""
import torch
from torch import nn

from ..nn import DualAttention, DualPatchEmbedding
from ..nn.attention import dual_attention, merge_heads, split_heads
from ..nn.base import add, apply, chain
from .base import Builder, DualModel, activation
from .clip_vit import DualResidualAttentionBlock


def _refuse(where: str, what: str):
    return NotImplementedError(f"timm VisionTransformer: {where} ({what}) is not supported by tak.models; "
                               "tak.linearize(model, fast=False) takes it")


def _optional_norm(b: Builder, m: nn.Module):
    return None if isinstance(m, nn.Identity) else b.layer_norm(m)


class DualTimmAttention(DualAttention):
    """timm's Attention: a fused qkv projection, Q and K LayerNorm-ed per head (where ``qk_norm``), proj."""

    def __init__(self, b: Builder, a: nn.Module, where: str):
        if not isinstance(a.norm, nn.Identity) or getattr(a, "gate", None) is not None:
            raise _refuse(where, "attention with scale_norm or a gate")
        super().__init__(a.num_heads, b.linear(a.proj), qkv=b.linear(a.qkv), scale=a.scale, dropout=a.attn_drop.p)
        self.train(a.training)
        self.q_norm, self.k_norm = _optional_norm(b, a.q_norm), _optional_norm(b, a.k_norm)

    def forward(self, x, dx=None):
        (q, k, v), (dq, dk, dv) = self.project(x, dx, None, None)
        q, dq = chain((q, dq), self.q_norm)
        k, dk = chain((k, dk), self.k_norm)
        o, do = dual_attention(q, k, v, dq, dk, dv, scale=self.scale, dropout=self.dropout if self.training else 0.0)
        return self.out(merge_heads(o), apply(merge_heads, do))


def _block(b: Builder, block: nn.Module, where: str) -> DualResidualAttentionBlock:
    """timm's Block."""
    if type(block).__name__ != "Block":
        raise _refuse(where, type(block).__name__)
    if not (isinstance(block.drop_path1, nn.Identity) and isinstance(block.drop_path2, nn.Identity)):
        raise _refuse(where, "stochastic depth (drop_path_rate > 0)")
    mlp = block.mlp
    if type(mlp).__name__ != "Mlp" or not isinstance(mlp.norm, nn.Identity):
        raise _refuse(f"{where}.mlp", f"{type(mlp).__name__} other than an Mlp without norm")
    return DualResidualAttentionBlock(
        b.layer_norm(block.norm1), DualTimmAttention(b, block.attn, f"{where}.attn"), b.layer_norm(block.norm2),
        b.linear(mlp.fc1), activation(mlp.act, f"{where}.mlp.act"), b.linear(mlp.fc2),
        ls_1=b.layer_scale(block.ls1), ls_2=b.layer_scale(block.ls2), drop_attn=b.dropout(block.attn.proj_drop),
        drop_mid=b.dropout(mlp.drop1), drop_out=b.dropout(mlp.drop2))


class DualAttentionPool(nn.Module):
    """timm's AttentionPoolLatent: Q = q(latent), [K | V] = kv(x), O = attention per head, h = proj(O), then
    h + mlp(norm(h)), pooled over the latents ('token': the first, 'avg': their mean, else all): x (B, N, d) -> h."""

    def __init__(self, b: Builder, p: nn.Module, where: str):
        super().__init__()
        if p.pos_embed is not None or isinstance(p.q, nn.Identity) or isinstance(p.proj, nn.Identity):
            raise _refuse(where, "attention pool with a position embedding, without q or without proj")
        self.latent = b.parameter(p.latent)
        self.heads, self.scale, self.pool = p.num_heads, p.scale, p.pool
        self.q, self.kv = b.linear(p.q), b.linear(p.kv)
        self.q_norm, self.k_norm = _optional_norm(b, p.q_norm), _optional_norm(b, p.k_norm)
        self.proj, self.drop = b.linear(p.proj), b.dropout(p.proj_drop)
        self.norm = _optional_norm(b, p.norm)
        self.mlp = None
        if p.mlp is not None:
            self.mlp = nn.ModuleList([b.linear(p.mlp.fc1), activation(p.mlp.act, f"{where}.mlp.act"),
                                      b.linear(p.mlp.fc2)])

    def forward(self, x, dx=None):
        B = x.shape[0]
        lat, dlat = self.latent.dual("value")
        expand = lambda t: t.to(x.dtype).expand(B, -1, -1)  # noqa: E731
        q, dq = self.q(expand(lat), apply(expand, dlat))
        kv, dkv = self.kv(x, dx)
        heads = lambda t: split_heads(t, self.heads)  # noqa: E731
        (k, v), (dk, dv) = kv.chunk(2, -1), ((None, None) if dkv is None else dkv.chunk(2, -1))
        q, dq = chain((heads(q), apply(heads, dq)), self.q_norm)
        k, dk = chain((heads(k), apply(heads, dk)), self.k_norm)
        o, do = dual_attention(q, k, heads(v), dq, dk, apply(heads, dv), scale=self.scale)
        h, dh = chain(self.proj(merge_heads(o), apply(merge_heads, do)), self.drop)
        if self.mlp is not None:
            m, dm = chain(chain((h, dh), self.norm), *self.mlp)
            h, dh = h + m, add(dh, dm)
        pick = {"token": lambda t: t[:, 0], "avg": lambda t: t.mean(1)}.get(self.pool, lambda t: t)
        return pick(h), apply(pick, dh)


class DualTimmVisionTransformer(DualModel):
    """forward(x: images (B, C, H, W)) -> (y, dy): the source's output (pooled features, or logits through its head;
    the tokens (B, L, d) with global_pool ''), and its tangent."""

    def __init__(self, model: nn.Module, trainable=None):
        super().__init__()
        trunk = getattr(model, "trunk", model)  # open_clip's TimmModel holds it as ``trunk``
        if type(trunk).__name__ != "VisionTransformer":
            raise _refuse("trunk", type(trunk).__name__)
        pe, conv = trunk.patch_embed, trunk.patch_embed.proj
        if trunk.dynamic_img_size or getattr(pe, "dynamic_img_pad", False) or not isinstance(conv, nn.Conv2d) \
                or conv.kernel_size != conv.stride or conv.padding != (0, 0) or not isinstance(pe.norm, nn.Identity):
            raise _refuse("patch_embed", "dynamic image sizes or padding, or a patch embedding other than a "
                          "convolution with stride = kernel and no norm")
        if not isinstance(trunk.patch_drop, nn.Identity):
            raise _refuse("patch_drop", "patch dropout")
        if trunk.attn_pool is None and trunk.global_pool not in ("token", "avg", ""):
            raise _refuse("global_pool", repr(trunk.global_pool))
        b = Builder(model)
        self.image_size = tuple(pe.img_size)
        self.patch_embed = b.record(DualPatchEmbedding(conv.weight, conv.bias), weight=conv.weight, bias=conv.bias)
        tokens = {"cls_token": trunk.cls_token, "reg_token": trunk.reg_token, "pos_embed": trunk.pos_embed}
        b.own(self, **{name: p for name, p in tokens.items() if p is not None})
        self.prefix = [name for name in ("cls_token", "reg_token") if tokens[name] is not None]
        self.has_pos, self.no_embed_class = trunk.pos_embed is not None, trunk.no_embed_class
        self.pos_drop = b.dropout(trunk.pos_drop)
        self.norm_pre = _optional_norm(b, trunk.norm_pre)
        self.blocks = nn.ModuleList(_block(b, block, f"blocks.{i}") for i, block in enumerate(trunk.blocks))
        self.norm = _optional_norm(b, trunk.norm)
        self.attn_pool = None if trunk.attn_pool is None else DualAttentionPool(b, trunk.attn_pool, "attn_pool")
        self.global_pool, self.num_prefix = trunk.global_pool, trunk.num_prefix_tokens
        self.pool_include_prefix = getattr(trunk, "pool_include_prefix", False)
        self.fc_norm, self.head_drop = _optional_norm(b, trunk.fc_norm), b.dropout(trunk.head_drop)
        self.head = None if isinstance(trunk.head, nn.Identity) else b.linear(trunk.head)
        self.projection = nn.ModuleList(self._projection(b, model.head) if trunk is not model else [])
        self.bind(b, model, trainable)

    @staticmethod
    def _projection(b: Builder, head: nn.Sequential) -> list:
        """open_clip's TimmModel head: nothing, or dropout and a linear projection."""
        layers = []
        for name, m in head.named_children():
            if isinstance(m, nn.Dropout):
                layers.append(b.dropout(m))
            elif isinstance(m, nn.Linear):
                layers.append(b.linear(m))
            else:
                raise _refuse(f"head.{name}", f"{type(m).__name__} in open_clip's TimmModel head")
        return layers

    def embed(self, images):
        """Tokens (B, prefix + N, d) and their tangent: [class; registers; patches] + position embedding."""
        t, dt = self.patch_embed(images)
        B, _, d = t.shape
        prefix = [self.dual(name) for name in self.prefix]
        pos, dpos = self.dual("pos_embed") if self.has_pos else (None, None)

        def with_prefix(x, dx):
            if not prefix:
                return x, dx
            wide = lambda p: p.to(x.dtype).expand(B, -1, -1)  # noqa: E731
            y = torch.cat([wide(p) for p, _ in prefix] + [x], 1)
            if dx is None and all(dp is None for _, dp in prefix):
                return y, None
            parts = [wide(p).new_zeros(B, p.shape[1], d) if dp is None else wide(dp) for p, dp in prefix]
            return y, torch.cat(parts + [torch.zeros_like(x) if dx is None else dx], 1)

        def with_position(x, dx):
            if pos is None:
                return x, dx
            return x + pos.to(x.dtype), add(dx, apply(lambda p: p.to(x.dtype).expand(x.shape), dpos))

        if self.no_embed_class:  # position embedding of the patches only (DeiT-3, SigLIP)
            return with_prefix(*with_position(t, dt))
        return with_position(*with_prefix(t, dt))

    def pool(self, x, dx):
        """The pooled features (B, d) (or the tokens, for global_pool '') and their tangent."""
        if self.attn_pool is not None:
            if not self.pool_include_prefix:
                x, dx = x[:, self.num_prefix:], apply(lambda t: t[:, self.num_prefix:], dx)
            return self.attn_pool(x, dx)
        if self.global_pool == "token":
            pick = lambda t: t[:, 0]  # noqa: E731
        elif self.global_pool == "avg":
            first = 0 if self.pool_include_prefix else self.num_prefix
            pick = lambda t: t[:, first:].mean(1)  # noqa: E731
        else:
            return x, dx
        return pick(x), apply(pick, dx)

    def forward(self, x):
        H, W = x.shape[-2:]
        if (H, W) != self.image_size:
            raise ValueError(f"DualTimmVisionTransformer: images of {self.image_size[0]}×{self.image_size[1]} only, "
                             f"got {H}×{W}")
        y = chain(self.embed(x), self.pos_drop, self.norm_pre)
        for block in self.blocks:
            y = block(*y)
        y = chain(self.pool(*chain(y, self.norm)), self.fc_norm, self.head_drop, self.head, *self.projection)
        return y
