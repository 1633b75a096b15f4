"""Exact GGN blocks of LayerNorm and RMSNorm parameters and the class token against torch.func.jacrev."""
import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev

from tak.curvature import DenseFactors, fit_diagonal, fit_kfac, find_dense_groups
from tests.util import rel_err


def exact_block(model, params, X, output):
    """1/N Σ_n J_nᵀ J_n for the flattened, concatenated ``params`` (float64 model); ``output(m, X)``: f of the
    model ``m`` on the batch ``X`` (N examples)."""
    named = dict(model.named_parameters())
    sizes = [named[p].numel() for p in params]

    def f(flat):
        chunks = dict(zip(params, [c.view_as(named[p]) for c, p in zip(flat.split(sizes), params)]))
        return output(lambda *args, **kwargs: functional_call(model, {**named, **chunks}, args, kwargs), X)

    flat = torch.cat([named[p].detach().reshape(-1) for p in params])
    J = jacrev(f)(flat)  # (N, C, P)
    return torch.einsum("ncp,ncq->pq", J, J) / J.shape[0]


class TokenNet(nn.Module):
    """x (N, T, d) -> LayerNorm -> Linear -> GELU -> LayerNorm(no bias) -> mean over tokens: (N, C)."""

    def __init__(self, d=6, c=4):
        super().__init__()
        self.ln1, self.fc, self.ln2 = nn.LayerNorm(d), nn.Linear(d, c), nn.LayerNorm(c, bias=False)

    def forward(self, x):
        return self.ln2(torch.nn.functional.gelu(self.fc(self.ln1(x)))).mean(1)


@pytest.mark.parametrize("tokens", ["expand", "reduce"])
def test_layernorm_blocks_equal_the_exact_ggn(tokens):
    model = TokenNet().double()
    with torch.no_grad():
        for ln in (model.ln1, model.ln2):
            ln.weight.uniform_(0.5, 1.5)
        model.ln1.bias.normal_()
    X = torch.randn(7, 5, 6, dtype=torch.float64)
    f = fit_kfac(model, [X[:3], X[3:]], exact=True, tokens=tokens, progress=False)
    for name in ("ln1", "ln2"):
        block = f[name]
        assert isinstance(block, DenseFactors) and block.A.shape == (1, 1)
        G = exact_block(model, block.params, X, lambda m, x: m(x))
        assert rel_err(block.B, G) < 1e-5
        assert torch.equal(block.B, block.B.T)


class RMSNet(nn.Module):
    """x (N, T, d) -> nn.RMSNorm -> Linear -> GELU -> T5LayerNorm -> mean over tokens: (N, C)."""

    def __init__(self, d=6, c=4, eps=None):
        from transformers.models.t5.modeling_t5 import T5LayerNorm
        super().__init__()
        self.rms, self.fc, self.t5 = nn.RMSNorm(d, eps=eps), nn.Linear(d, c), T5LayerNorm(c, eps=0.1)

    def forward(self, x):
        return self.t5(torch.nn.functional.gelu(self.fc(self.rms(x)))).mean(1)


@pytest.mark.parametrize("eps", [None, 0.2])
def test_rmsnorm_blocks_equal_the_exact_ggn(eps):
    pytest.importorskip("transformers")
    model = RMSNet(eps=eps).double()
    with torch.no_grad():
        for norm in (model.rms, model.t5):
            norm.weight.uniform_(0.5, 1.5)
    X = 0.3 * torch.randn(7, 5, 6, dtype=torch.float64)  # small: ε matters
    f = fit_kfac(model, [X[:3], X[3:]], exact=True, progress=False)
    for name, param in (("rms", "rms.weight"), ("t5", "t5.weight")):
        block = f[name]
        assert isinstance(block, DenseFactors) and block.params == (param,) and f.meta["dense"][name]["kind"] == "rmsnorm"
        assert rel_err(block.B, exact_block(model, block.params, X, lambda m, x: m(x))) < 1e-5, name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_rmsnorm_normalizes_as_pytorch_does(dtype):
    """nn.RMSNorm(eps=None) takes ε of its compute type (fp32 for 16-bit inputs), not of the input's."""
    from tak.curvature.dense import _normalized
    norm = nn.RMSNorm(8).to(dtype)
    x = (0.05 * torch.randn(4, 3, 8)).to(dtype)  # small: ε matters
    assert rel_err(_normalized(norm, x).to(dtype), norm(x)) < 1e-2


class SequenceFirstRMS(nn.Module):
    """x (N, T, d) -> (T, N, d) -> nn.RMSNorm -> Linear -> mean over tokens: (N, C)."""

    def __init__(self, d=6, c=3):
        super().__init__()
        self.rms, self.fc = nn.RMSNorm(d), nn.Linear(d, c)

    def forward(self, x):
        return self.fc(self.rms(x.transpose(0, 1))).mean(0)


def test_rmsnorm_block_of_sequence_first_activations_with_as_many_tokens_as_examples():
    model = SequenceFirstRMS().double()
    with torch.no_grad():
        model.rms.weight.uniform_(0.5, 1.5)
    X = torch.randn(5, 5, 6, dtype=torch.float64)  # T = N: only the measured layout tells
    f = fit_kfac(model, [X], exact=True, progress=False)
    assert rel_err(f["rms"].B, exact_block(model, f["rms"].params, X, lambda m, x: m(x))) < 1e-5


def test_rmsnorm_blocks_of_t5_equal_the_exact_ggn():
    """T5's layer norms (T5LayerNorm) on padded text, f its decoder state at the start token."""
    transformers = pytest.importorskip("transformers")
    from tak.curvature.outputs import default_output_fn
    torch.manual_seed(0)
    config = transformers.T5Config(vocab_size=64, d_model=8, d_kv=4, d_ff=12, num_layers=1, num_heads=2,
                                   decoder_start_token_id=0, pad_token_id=0, attn_implementation="eager")
    model = transformers.T5ForConditionalGeneration(config).double().eval()  # eager: jacrev through the masks
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.uniform_(0.5, 1.5)
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] * 5 + [0]])
    batch = dict(input_ids=torch.randint(1, 64, (3, 6)).masked_fill(mask == 0, 0), attention_mask=mask)
    norms = ["encoder.block.0.layer.0.layer_norm", "encoder.final_layer_norm", "decoder.block.0.layer.1.layer_norm",
             "decoder.final_layer_norm"]
    f = fit_kfac(model, [batch], exact=True, layers=norms, progress=False)
    assert set(f) == set(norms)
    output = default_output_fn(model)
    for name in norms:
        G = exact_block(model, f[name].params, batch, output)
        assert f[name].params == (f"{name}.weight",) and G.norm() > 0
        assert rel_err(f[name].B, G) < 1e-5, name
    grouped = {p for group in find_dense_groups(model).values() for p in group.params}
    assert grouped == {n for n, _ in model.named_parameters() if "layer_norm" in n}  # all 5 of them


class SequenceFirst(nn.Module):
    """A PyTorch encoder layer on (T, N, d) activations (batch_first=False), batch-first in and out."""

    def __init__(self, d=8, c=3):
        super().__init__()
        self.enc = nn.TransformerEncoderLayer(d, 2, dim_feedforward=12, dropout=0.0)
        self.head = nn.Linear(d, c)

    def forward(self, x):  # x (N, T, d)
        return self.head(self.enc(x.transpose(0, 1)).mean(0))


def test_layernorm_blocks_of_sequence_first_activations():
    torch.manual_seed(0)
    model = SequenceFirst().double()
    X = torch.randn(3, 5, 8, dtype=torch.float64)  # T != N: the layout is known
    f = fit_kfac(model, [X], exact=True, progress=False)
    for name in ("enc.norm1", "enc.norm2"):
        G = exact_block(model, f[name].params, X, lambda m, x: m(x))
        assert rel_err(f[name].B, G) < 1e-5, name


class SharedNorm(nn.Module):
    """One LayerNorm applied twice in a forward: its gradient is the sum over both calls."""

    def __init__(self, c):
        super().__init__()
        self.fc, self.ln, self.out = nn.Linear(4, 5), nn.LayerNorm(5), nn.Linear(5, c)

    def forward(self, x):
        h = self.ln(self.fc(x))
        return self.out(self.ln(torch.tanh(h) + h))


@pytest.mark.parametrize("c", [1, 3], ids=["plain_backward", "batched_probes"])
def test_layernorm_called_twice_gets_its_exact_block(c):
    """The block of a LayerNorm used twice has the cross terms of its two calls (one output: the plain
    backward; three: batched probes); the GGN diagonal is that block's diagonal."""
    from tak.curvature.diagonal import fit_diagonal
    model = SharedNorm(c).double()
    X = torch.randn(6, 4, dtype=torch.float64)
    block = fit_kfac(model, [X], exact=True, progress=False)["ln"]
    G = exact_block(model, block.params, X, lambda m, x: m(x))
    assert rel_err(block.B, G) < 1e-5
    diagonal = fit_diagonal(model, [X], exact=True, progress=False)["ln"].D.reshape(-1)
    assert rel_err(diagonal, G.diagonal()) < 1e-5


class FlatTokens(nn.Module):
    """x (N, T, d) flattened to tokens as rows (N·T, d) or (T·N, d) -> LayerNorm -> Linear -> mean over tokens."""

    def __init__(self, by_token: bool, d=6, c=3):
        super().__init__()
        self.by_token, self.ln, self.fc = by_token, nn.LayerNorm(d), nn.Linear(d, c)

    def forward(self, x):
        n, t, d = x.shape
        rows = x.transpose(0, 1).reshape(t * n, d) if self.by_token else x.reshape(n * t, d)
        y = self.fc(self.ln(rows))
        return (y.reshape(t, n, -1).transpose(0, 1) if self.by_token else y.reshape(n, t, -1)).mean(1)


@pytest.mark.parametrize("by_token", [False, True])
def test_layernorm_on_flattened_tokens_sums_each_examples_tokens(by_token):
    model = FlatTokens(by_token).double()
    with torch.no_grad():
        model.ln.weight.uniform_(0.5, 1.5)
    X = torch.randn(4, 3, 6, dtype=torch.float64)
    block = fit_kfac(model, [X], exact=True, progress=False)["ln"]
    assert rel_err(block.B, exact_block(model, block.params, X, lambda m, x: m(x))) < 1e-5


def test_layernorm_on_vectors():
    """A LayerNorm on (N, d) inputs: no token dimension to sum over."""
    model = nn.Sequential(nn.Linear(3, 5), nn.LayerNorm(5), nn.Linear(5, 2)).double()
    X = torch.randn(6, 3, dtype=torch.float64)
    block = fit_kfac(model, [X], exact=True, progress=False)["1"]
    assert rel_err(block.B, exact_block(model, block.params, X, lambda m, x: m(x))) < 1e-5


def test_dense_blocks_enter_the_quadratic_form():
    model = TokenNet().double()
    X = torch.randn(9, 3, 6, dtype=torch.float64)
    f = fit_kfac(model, [X], exact=True, progress=False)
    taus = {n: 0.1 * torch.randn_like(p, dtype=torch.float32) for n, p in model.named_parameters()}
    G = exact_block(model, f["ln1"].params, X, lambda m, x: m(x))
    v = torch.cat([taus["ln1.weight"], taus["ln1.bias"]]).double()
    only_ln1 = {"ln1.weight": taus["ln1.weight"], "ln1.bias": taus["ln1.bias"]}
    assert rel_err(f.quadratic_form(only_ln1), v @ G @ v) < 1e-5
    only_weight = {"ln1.weight": taus["ln1.weight"]}  # a missing bias counts as zero
    w = torch.cat([taus["ln1.weight"], torch.zeros(6)]).double()
    assert rel_err(f.quadratic_form(only_weight), w @ G @ w) < 1e-5


def test_dense_selection():
    model = TokenNet()
    assert set(find_dense_groups(model)) == {"ln1", "ln2"}
    f = fit_kfac(model, [torch.randn(2, 3, 6)], layers=["fc", "ln2"], progress=False)
    assert set(f) == {"fc", "ln2"}
    assert set(fit_kfac(model, [torch.randn(2, 3, 6)], dense=False, progress=False)) == {"fc"}


def test_class_token_block_of_open_clip():
    open_clip = pytest.importorskip("open_clip")
    from open_clip.transformer import VisionTransformer

    vit = VisionTransformer(image_size=16, patch_size=8, width=8, layers=1, heads=2, mlp_ratio=2.0, output_dim=5).double()
    with torch.no_grad():
        vit.class_embedding.normal_()
    X = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    f = fit_kfac(vit, [X], exact=True, output_fn=lambda m, x: m(x), progress=False)
    block = f["class_embedding"]
    assert block.params == ("class_embedding",)
    G = exact_block(vit, block.params, X, lambda m, x: m(x))
    assert rel_err(block.B, G) < 1e-5
    assert {"ln_pre", "ln_post"} <= set(f)


@pytest.mark.parametrize("kind", ["clip", "vit", "dinov2", "dinov2_registers"])
def test_class_token_block_of_hugging_face_vision_transformers(kind):
    """The embeddings of CLIP (class_embedding), ViT and DINOv2 (cls_token) put the class token at token 0 of their
    output, DINOv2 with registers its register tokens after it, which the blocks' taps see."""
    transformers = pytest.importorskip("transformers")
    if kind == "dinov2_registers":
        pytest.importorskip("transformers.models.dinov2_with_registers")  # from transformers 4.48
    size = dict(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, image_size=16, patch_size=8)
    model, names, embeds = {
        "clip": lambda: (transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(
            intermediate_size=12, projection_dim=5, **size)), ["vision_model.embeddings.class_embedding"],
            lambda m, x: m(pixel_values=x).image_embeds),
        "vit": lambda: (transformers.ViTModel(transformers.ViTConfig(intermediate_size=12, **size)),
                        ["embeddings.cls_token"], lambda m, x: m(pixel_values=x).pooler_output),
        "dinov2": lambda: (transformers.Dinov2Model(transformers.Dinov2Config(mlp_ratio=2, **size)),
                           ["embeddings.cls_token"], lambda m, x: m(pixel_values=x).pooler_output),
        "dinov2_registers": lambda: (transformers.Dinov2WithRegistersModel(transformers.Dinov2WithRegistersConfig(
            mlp_ratio=2, num_register_tokens=3, **size)), ["embeddings.cls_token", "embeddings.register_tokens"],
            lambda m, x: m(pixel_values=x).last_hidden_state.mean(1))}[kind]()
    model = model.double().eval()
    with torch.no_grad():
        for name in names:
            model.get_parameter(name).normal_()
    X = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    f = fit_kfac(model, [X], exact=True, output_fn=embeds, progress=False)
    for name in names:
        block = f[name]
        assert block.params == (name,) and f.meta["dense"][name]["size"] == model.get_parameter(name).numel()
        assert rel_err(block.B, exact_block(model, block.params, X, embeds)) < 1e-5, name


@pytest.mark.parametrize("class_token", [True, False])
def test_class_and_register_token_blocks_of_timm(class_token):
    """timm's VisionTransformer puts [class token, register tokens] first among the tokens pos_drop gives."""
    pytest.importorskip("timm")
    from tak._compat import ensure_torchvision_importable
    ensure_torchvision_importable()
    from timm.models.vision_transformer import VisionTransformer
    model = VisionTransformer(img_size=16, patch_size=8, embed_dim=8, depth=1, num_heads=2, mlp_ratio=1.5,
                              class_token=class_token, reg_tokens=2, global_pool="avg" if not class_token else "token",
                              num_classes=5).double().eval()
    names = ["cls_token", "reg_token"] if class_token else ["reg_token"]
    with torch.no_grad():
        for name in names:
            model.get_parameter(name).normal_()
    X = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    f = fit_kfac(model, [X], exact=True, output_fn=lambda m, x: m(x), progress=False)
    assert [n for n in f.meta["dense"] if f.meta["dense"][n]["kind"] != "layernorm"] == names
    for name in names:
        assert rel_err(f[name].B, exact_block(model, (name,), X, lambda m, x: m(x))) < 1e-5, name


@pytest.mark.parametrize("library", ["open_clip", "timm", "dinov2", "dinov2_registers"])
def test_layer_scale_blocks(library):
    """Each LayerScale y = x ⊙ γ (open_clip's and timm's gamma, DINOv2's lambda1, two per block): its exact GGN block,
    from the gradients at its output and its input x."""
    size = (4, 3, 16, 16)
    if library == "open_clip":
        pytest.importorskip("open_clip")
        from open_clip.transformer import VisionTransformer
        model = VisionTransformer(image_size=16, patch_size=8, width=8, layers=2, heads=2, mlp_ratio=2.0, output_dim=5,
                                  ls_init_value=0.5)
        names, features = [f"transformer.resblocks.{i}.ls_{j}.gamma" for i in (0, 1) for j in (1, 2)], None
    elif library == "timm":
        pytest.importorskip("timm")
        from tak._compat import ensure_torchvision_importable
        ensure_torchvision_importable()
        from timm.models.vision_transformer import VisionTransformer
        model = VisionTransformer(img_size=16, patch_size=8, embed_dim=8, depth=2, num_heads=2, mlp_ratio=1.5,
                                  num_classes=5, init_values=0.5)
        names, features = [f"blocks.{i}.ls{j}.gamma" for i in (0, 1) for j in (1, 2)], None
    else:
        transformers = pytest.importorskip("transformers")
        if library == "dinov2_registers":
            pytest.importorskip("transformers.models.dinov2_with_registers")  # from transformers 4.48
        config = dict(hidden_size=8, num_hidden_layers=2, num_attention_heads=2, image_size=16, patch_size=8,
                      mlp_ratio=2, layerscale_value=0.5)
        model = (transformers.Dinov2Model(transformers.Dinov2Config(**config)) if library == "dinov2" else
                 transformers.Dinov2WithRegistersModel(transformers.Dinov2WithRegistersConfig(num_register_tokens=2,
                                                                                              **config)))
        names = [f"encoder.layer.{i}.layer_scale{j}.lambda1" for i in (0, 1) for j in (1, 2)]
        size, features = (4, 3, 24, 16), lambda m, x: m(pixel_values=x).pooler_output
    model = model.double().eval()
    with torch.no_grad():
        for name in names:
            model.get_parameter(name).normal_()
    features = features or (lambda m, x: m(x))
    X = torch.randn(*size, dtype=torch.float64)
    f = fit_kfac(model, [X], exact=True, output_fn=features, progress=False)
    assert [n for n in f.meta["dense"] if f.meta["dense"][n]["kind"] == "layerscale"] == [
        n.rsplit(".", 1)[0] for n in names]
    for name in names:
        block = f[name.rsplit(".", 1)[0]]
        assert block.params == (name,)
        assert rel_err(block.B, exact_block(model, block.params, X, features)) < 1e-5, name


@pytest.mark.parametrize("library", ["timm", "transformers"])
def test_channels_first_layer_norm_blocks(library):
    """ConvNeXt's LayerNorms of (N, C, H, W) over C (timm's LayerNorm2d, Hugging Face's with data_format
    "channels_first"): their exact blocks, the H·W positions an example's tokens."""
    if library == "timm":
        pytest.importorskip("timm")
        from tak._compat import ensure_torchvision_importable
        ensure_torchvision_importable()
        from timm.models.convnext import ConvNeXt
        from timm.layers import LayerNormAct2d
        model, features = ConvNeXt(depths=(1, 1, 1, 1), dims=(8, 8, 12, 12), num_classes=0), lambda m, x: m(x)
        names = ["stem.1", "stages.1.downsample.0"]
        with_act = nn.Sequential(LayerNormAct2d(4, act_layer=nn.GELU), LayerNormAct2d(4, apply_act=False))
        assert list(find_dense_groups(with_act)) == ["1"]  # y = GELU(x̂ ⊙ γ + β) is no LayerNorm's output
    else:
        transformers = pytest.importorskip("transformers")
        config = transformers.ConvNextConfig(hidden_sizes=[8, 12], depths=[1, 1], num_stages=2)
        model, features = transformers.ConvNextModel(config), lambda m, x: m(x).pooler_output
        names = ["embeddings.layernorm", "encoder.stages.1.downsampling_layer.0"]
    model = model.double().eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.normal_(std=0.5)
    X = torch.randn(3, 3, 40, 32, dtype=torch.float64)
    f = fit_kfac(model, [X], exact=True, output_fn=features, progress=False)
    for name in names:
        assert f.meta["dense"][name]["kind"] == "layernorm"
        assert rel_err(f[name].B, exact_block(model, f[name].params, X, features)) < 1e-6, name


def q_and_v_bias_model(kind):
    """(a float64 model whose attention adds q and v biases after a bias-free fused projection, its features (N, d),
    a batch): timm's EVA (rotary positions) and BEiT (relative position bias), which pass the projection's weight to
    F.linear, and DeBERTa (v1), whose projection gives each head's [q | k | v]."""
    if kind == "deberta_v1":
        transformers = pytest.importorskip("transformers")
        config = transformers.DebertaConfig(vocab_size=41, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                            intermediate_size=10, max_position_embeddings=16, type_vocab_size=0,
                                            relative_attention=True, pos_att_type=["c2p", "p2c"])
        return (transformers.DebertaModel(config), lambda m, x: m(x).last_hidden_state.mean(1),
                torch.randint(1, 41, (4, 5)))
    pytest.importorskip("timm")
    from tak._compat import ensure_torchvision_importable
    ensure_torchvision_importable()
    from timm.models import beit, eva
    size = dict(img_size=14, patch_size=7, embed_dim=8, depth=1, num_heads=2, qkv_bias=True, num_classes=0)
    if kind == "eva":
        model = eva.Eva(use_rot_pos_emb=True, ref_feat_shape=(2, 2), **size)
        return model, lambda m, x: m(x), torch.randn(4, 3, 14, 14)
    model = beit.Beit(use_rel_pos_bias=True, **size)
    model.blocks[0].attn.fused_attn = False  # PyTorch's CPU SDPA has no gradient for the position bias it is given
    return model, lambda m, x: m(x), torch.randn(4, 3, 14, 14)


@pytest.mark.parametrize("kind", ["eva", "beit", "deberta_v1"])
def test_q_and_v_biases_after_a_fused_projection(kind):
    """q_bias and v_bias (their exact block) and the fused projection's weight (a linear layer; its GGN diagonal)
    against the per-example Jacobians of the model as it runs (timm's through F.linear), which fitting leaves as it
    was."""
    model, features, X = q_and_v_bias_model(kind)
    model = model.double().eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.normal_(std=0.5)
    X = X.double() if X.is_floating_point() else X
    attention = next(m for m in model.modules() if hasattr(m, "q_bias"))
    prefix = next(n for n, m in model.named_modules() if m is attention)
    weight = f"{prefix}.{'in_proj' if kind == 'deberta_v1' else 'qkv'}.weight"
    with torch.no_grad():
        y = features(model, X)
    f = fit_kfac(model, [X], exact=True, output_fn=features, progress=False)
    block = f[f"{prefix}.qv_bias"]
    assert f.meta["dense"][f"{prefix}.qv_bias"]["kind"] == "qv_bias"
    assert block.params == (f"{prefix}.q_bias", f"{prefix}.v_bias") and block.B.shape == (16, 16)
    assert rel_err(block.B, exact_block(model, block.params, X, features)) < 1e-6
    d = fit_diagonal(model, [X], exact=True, output_fn=features, progress=False)
    J = jacrev(lambda w: features(lambda x: functional_call(model, {weight: w}, (x,)), X))(model.get_parameter(weight))
    assert rel_err(d[weight.rsplit(".", 1)[0]].D, J.square().sum((0, 1)) / len(X)) < 1e-6
    assert getattr(attention, "qkv_bias_separate", False) is False
    with torch.no_grad():
        assert torch.equal(features(model, X), y)


@pytest.mark.parametrize("family", ["deberta", "gemma"])
def test_hugging_face_norm_blocks(family):
    """DeBERTa's own LayerNorm (weight, bias, variance_epsilon; statistics in fp32) is a LayerNorm, Gemma's RMSNorm
    (eps, _norm; y = x̂ ⊙ (1 + γ)) an RMSNorm: their exact blocks."""
    transformers = pytest.importorskip("transformers")
    size = dict(vocab_size=41, hidden_size=8, num_hidden_layers=1, num_attention_heads=2)
    if family == "deberta":
        model = transformers.DebertaModel(transformers.DebertaConfig(intermediate_size=10, max_position_embeddings=16,
                                                                     type_vocab_size=0, **size))
        names, kind = ["encoder.layer.0.output.LayerNorm"], "layernorm"
    else:
        model = transformers.GemmaModel(transformers.GemmaConfig(head_dim=4, num_key_value_heads=1,
                                                                 intermediate_size=12, **size))
        names, kind = ["layers.0.input_layernorm", "norm"], "rmsnorm"
    model = model.double().eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.normal_(std=0.5)
    X = torch.randint(1, 41, (4, 5))

    def features(m, x):
        return m(x).last_hidden_state.mean(1)
    f = fit_kfac(model, [X], exact=True, output_fn=features, progress=False)
    for name in names:
        own = ("weight", "bias") if kind == "layernorm" else ("weight",)
        assert f.meta["dense"][name]["kind"] == kind and f[name].params == tuple(f"{name}.{p}" for p in own)
        assert rel_err(f[name].B, exact_block(model, f[name].params, X, features)) < 1e-5, name


def siglip_tower(library):
    """(SigLIP-style image tower with an attention pooling probe, its features (N, d)), float64, random weights."""
    if library == "transformers":
        transformers = pytest.importorskip("transformers")
        config = transformers.SiglipVisionConfig(hidden_size=8, intermediate_size=12, num_hidden_layers=1,
                                                 num_attention_heads=2, image_size=16, patch_size=8)
        return transformers.SiglipVisionModel(config).double().eval(), lambda m, x: m(pixel_values=x).pooler_output
    pytest.importorskip("timm")
    from tak._compat import ensure_torchvision_importable
    ensure_torchvision_importable()
    from timm.models.vision_transformer import VisionTransformer
    model = VisionTransformer(img_size=16, patch_size=8, embed_dim=8, depth=1, num_heads=2, mlp_ratio=1.5,
                              class_token=False, global_pool="map", num_classes=0).double().eval()
    with torch.no_grad():
        model.attn_pool.latent.normal_()
    return model, lambda m, x: m(x)


@pytest.mark.parametrize("library", ["transformers", "timm"])
def test_probe_block_of_attention_pooling(library):
    """SigLIP's pooling probe, repeated per example as the query (of nn.MultiheadAttention in transformers, of the q
    projection of timm's AttentionPoolLatent): its exact GGN block."""
    model, features = siglip_tower(library)
    X = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    f = fit_kfac(model, [X], exact=True, output_fn=features, progress=False)
    name = next(n for n, _ in model.named_parameters() if n.endswith(("head.probe", "attn_pool.latent")))
    block = f[name]
    assert block.params == (name,) and block.B.shape == (8, 8)
    assert rel_err(block.B, exact_block(model, block.params, X, features)) < 1e-5
    assert any(n.endswith(("head.attention.in_proj", "attn_pool.q")) for n in f)  # fitted alongside, on the tapped q
