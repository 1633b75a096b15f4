"""CLIP vision towers as dual models: open_clip's VisionTransformer here; Hugging Face's CLIP vision models in
``hf_clip`` and timm's VisionTransformer in ``timm_vit`` use the blocks and tokens defined here.

Tokens: patches of the image through the patch embedding (a convolution with stride = kernel: a linear map of
patches), the class embedding prepended, the positional embedding added; then a LayerNorm (ln_pre) and pre-norm
residual blocks x + ls_1(attn(ln_1(x))), x + ls_2(mlp(ln_2(x))) (LayerScales where ls_init_value) with a fused q/k/v
input projection, pooling ('tok', 'avg' or 'none'), ln_post (before or after pooling) and pooled @ proj. In training,
patch dropout (open_clip's ``patch_dropout``) after the positional embedding, and the attention weights dropped out as
nn.MultiheadAttention's ``dropout`` says.
"""
import torch
from torch import nn

from ..nn import DualAttention, DualLinear, DualPatchDropout, DualPatchEmbedding, linear
from ..nn.base import add, apply, chain
from .base import Builder, DualModel, activation


def _unsupported(where: str, what: str):
    return NotImplementedError(f"open_clip VisionTransformer: {where} ({what}) is not supported by tak.models")


class DualResidualAttentionBlock(nn.Module):
    """x + ls_1(drop_attn(attn(ln_1(x)))), then x + ls_2(drop_out(proj(drop_mid(act(fc(ln_2(x))))))), on (B, L, d);
    the LayerScales ``ls_1``, ``ls_2`` and the dropouts are optional (None: none), and so is ``act`` (a gated ``fc``
    that applies its own)."""

    def __init__(self, ln_1, attn: DualAttention, ln_2, fc, act, proj, *, ls_1=None, ls_2=None, drop_attn=None,
                 drop_mid=None, drop_out=None):
        super().__init__()
        self.ln_1, self.attn, self.ln_2, self.fc, self.act, self.proj = ln_1, attn, ln_2, fc, act, proj
        self.ls_1, self.ls_2 = ls_1, ls_2
        self.drop_attn, self.drop_mid, self.drop_out = drop_attn, drop_mid, drop_out

    @classmethod
    def of_open_clip(cls, b: Builder, block: nn.Module, where: str) -> "DualResidualAttentionBlock":
        """open_clip's ResidualAttentionBlock (nn.MultiheadAttention with a fused in_proj)."""
        if type(block).__name__ != "ResidualAttentionBlock" or hasattr(block, "ln_1_kv"):
            raise _unsupported(where, type(block).__name__)
        attn = block.attn
        if not (isinstance(attn, nn.MultiheadAttention) and attn._qkv_same_embed_dim and attn.bias_k is None
                and not attn.add_zero_attn):
            raise _unsupported(f"{where}.attn", "attention other than nn.MultiheadAttention with a fused in_proj")
        qkv = b.record(DualLinear(attn.in_proj_weight, attn.in_proj_bias),
                       weight=attn.in_proj_weight, bias=attn.in_proj_bias)
        dual_attn = DualAttention(attn.num_heads, b.linear(attn.out_proj), qkv=qkv, dropout=attn.dropout)
        return cls(b.layer_norm(block.ln_1), dual_attn.train(attn.training), b.layer_norm(block.ln_2),
                   b.linear(block.mlp.c_fc), activation(block.mlp.gelu, f"{where}.mlp.gelu"),
                   b.linear(block.mlp.c_proj), ls_1=b.layer_scale(block.ls_1), ls_2=b.layer_scale(block.ls_2))

    @classmethod
    def of_hf_clip(cls, b: Builder, layer: nn.Module, act: str, where: str) -> "DualResidualAttentionBlock":
        """Hugging Face's CLIPEncoderLayer."""
        a = layer.self_attn
        attn = DualAttention(a.num_heads, b.linear(a.out_proj), q=b.linear(a.q_proj), k=b.linear(a.k_proj),
                             v=b.linear(a.v_proj), scale=a.scale, dropout=a.dropout)
        return cls(b.layer_norm(layer.layer_norm1), attn.train(a.training), b.layer_norm(layer.layer_norm2),
                   b.linear(layer.mlp.fc1), activation(act, f"{where}.mlp"), b.linear(layer.mlp.fc2))

    def forward(self, x, dx=None):
        h, dh = chain(self.attn(*self.ln_1(x, dx)), self.drop_attn, self.ls_1)
        x, dx = x + h, add(dx, dh)
        h, dh = chain(self.fc(*self.ln_2(x, dx)), self.act, self.drop_mid)
        h, dh = chain(self.proj(h, dh), self.drop_out, self.ls_2)
        return x + h, add(dx, dh)


class PatchTokens:
    """For a dual model with ``patch_embed`` and the θ0 ``class_embedding`` (d,) and ``positional_embedding``
    (1 + N, d) (or (1, 1, d) and (1, 1 + N, d)): the tokens of images."""

    def embed(self, images, positions=None):
        """Tokens (B, 1 + N, d): [class; patches] + positional embedding (through ``positions``, a linear map of it,
        where given: resized to the image's patch grid), and their tangent."""
        t, dt = self.patch_embed(images)
        (c, dc), (pos, dpos) = self.dual("class_embedding"), self.dual("positional_embedding")
        if positions is not None:
            pos, dpos = positions(pos), apply(positions, dpos)
        B, N, d = t.shape
        x = torch.cat([c.to(t.dtype).expand(B, 1, d), t], 1) + pos.to(t.dtype)
        dx = None
        if dc is not None or dt is not None:
            dc = torch.zeros(d, dtype=t.dtype, device=t.device) if dc is None else dc.to(t.dtype)
            dx = torch.cat([dc.expand(B, 1, d), torch.zeros_like(t) if dt is None else dt], 1)
        return x, add(dx, apply(lambda p: p.to(t.dtype).expand(B, N + 1, d), dpos))


class DualVisionTransformer(DualModel, PatchTokens):
    """forward(x: images (B, 3, H, W)) -> (pooled, d pooled), each (B, output_dim); with ``output_tokens``
    ((pooled, tokens), (d pooled, d tokens)) like the source."""

    def __init__(self, model: nn.Module, trainable=None):
        super().__init__()
        if getattr(model, "attn_pool", None) is not None:
            raise _unsupported("attn_pool", "attentional pooling")
        b = Builder(model)
        self.patch_embed = b.record(DualPatchEmbedding(model.conv1.weight, model.conv1.bias),
                                    weight=model.conv1.weight, bias=model.conv1.bias)
        b.own(self, class_embedding=model.class_embedding, positional_embedding=model.positional_embedding,
              proj=model.proj)
        pd = getattr(model, "patch_dropout", None)
        self.patch_dropout = None
        if pd is not None and not isinstance(pd, nn.Identity):
            self.patch_dropout = DualPatchDropout(pd.prob, pd.exclude_first_token).train(pd.training)
        self.ln_pre = None if isinstance(model.ln_pre, nn.Identity) else b.layer_norm(model.ln_pre)
        self.blocks = nn.ModuleList(DualResidualAttentionBlock.of_open_clip(b, blk, f"transformer.resblocks.{i}")
                                    for i, blk in enumerate(model.transformer.resblocks))
        self.ln_post = b.layer_norm(model.ln_post)
        self.pool_type, self.final_ln_after_pool = model.pool_type, model.final_ln_after_pool
        self.output_tokens = model.output_tokens
        self.bind(b, model, trainable)

    def pool(self, x, dx):
        """(pooled, tokens) and their tangents, by the pool type."""
        if self.pool_type == "tok":
            pick = (lambda t: t[:, 0]), (lambda t: t[:, 1:])
        elif self.pool_type == "avg":
            pick = (lambda t: t[:, 1:].mean(1)), (lambda t: t[:, 1:])
        else:
            pick = (lambda t: t), (lambda t: t)
        return (pick[0](x), apply(pick[0], dx)), (pick[1](x), apply(pick[1], dx))

    def forward(self, x):
        x, dx = self.embed(x)
        if self.patch_dropout is not None:
            x, dx = self.patch_dropout(x, dx)
        if self.ln_pre is not None:
            x, dx = self.ln_pre(x, dx)
        for block in self.blocks:
            x, dx = block(x, dx)
        if self.final_ln_after_pool:
            (p, dp), (t, dt) = self.pool(x, dx)
            p, dp = self.ln_post(p, dp)
        else:
            (p, dp), (t, dt) = self.pool(*self.ln_post(x, dx))
        w, dw = self.dual("proj")
        if w is not None:
            p, dp = linear(p, dp, w.T, apply(lambda t: t.T, dw))
        if not self.output_tokens:
            return p, dp
        return (p, t), (None if dp is None and dt is None else (dp, dt))
