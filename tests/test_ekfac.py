"""EK-FAC (tak.curvature.ekfac): corrected eigenvalues against per-example float64 references."""
import copy
from dataclasses import replace

import pytest
import torch
from torch import nn

import kfac_kernels as kk
from kfac_kernels import correction
from tak.curvature import EKFAC, KFAC, EigenFactors, LayerFactors, fit_ekfac, fit_kfac
from tak.curvature.outputs import call
from tak.curvature.tokens import probes

from .util import rel_err


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1, self.l2, self.l3 = nn.Linear(5, 6), nn.Linear(6, 4, bias=False), nn.Linear(4, 3)

    def forward(self, x):
        return self.l3(torch.tanh(self.l2(torch.tanh(self.l1(x)))))


class TokenNet(nn.Module):
    """Tokens mix through a mean over all positions, padding included, so padded tokens get nonzero
    gradients at ``l1`` (which the factors must leave out). ``pool``: masked-mean output (N, C), else (N, T, C)."""

    def __init__(self, pool: bool):
        super().__init__()
        self.pool = pool
        self.l1, self.l2, self.head = nn.Linear(4, 6), nn.Linear(6, 5, bias=False), nn.Linear(5, 3)

    def forward(self, x, attention_mask):
        u = torch.tanh(self.l1(x))
        y = self.head(torch.tanh(self.l2(u + u.mean(1, keepdim=True))))
        if not self.pool:
            return y
        m = attention_mask.unsqueeze(-1).to(y.dtype)
        return (y * m).sum(1) / m.sum(1)


def mlp_batches(sizes=(3, 2)):
    return [torch.randn(n, 5) for n in sizes]


def token_batches(sizes=(3, 2), T=5):
    out = []
    for n in sizes:
        lengths = torch.randint(1, T + 1, (n,))
        lengths[0] = T - 1  # at least one padded example
        mask = (torch.arange(T) < lengths[:, None]).long()
        out.append({"x": torch.randn(n, T, 4), "attention_mask": mask})
    return out


def make(kind):
    if kind == "mlp":
        return MLP(), mlp_batches()
    return TokenNet(pool=kind == "pooled"), token_batches()


def random_spd(d):
    Q = torch.randn(d, d)
    return Q @ Q.T + 0.1 * torch.eye(d)


def double(batch):
    if isinstance(batch, dict):
        return {k: v.double() if v.is_floating_point() else v for k, v in batch.items()}
    return batch.double()


def per_example(model, batch, names):
    """Layer inputs a and Jacobians J = ∂f/∂z of the layer outputs z (*f.shape, *z.shape) for one batch."""
    modules = dict(model.named_modules())
    inputs, shapes, eps = {}, {}, {}

    def hook(name):
        def h(module, args, out):
            inputs.setdefault(name, args[0])
            shapes[name] = out.shape
            return out + eps[name] if name in eps else out
        return h

    handles = [modules[n].register_forward_hook(hook(n)) for n in names]
    try:
        with torch.no_grad():
            call(model, batch)

        def f(e):
            eps.update(e)
            return call(model, batch)
        J = torch.func.jacrev(f)({n: torch.zeros(shapes[n], dtype=torch.float64) for n in names})
    finally:
        for h in handles:
            h.remove()
    return inputs, J


def reference_S(model, batches, factors, *, mc_samples, exact, seed=0):
    """S = 1/(N·M) Σ_{n,m} (U_Bᵀ G U_A)² in float64 with G, the example's gradient Σ_t g ãᵀ (whatever token
    convention gave the eigenbasis), built per example and probe by hand from the same probe draws as the fit
    (``tokens.probes`` with the same seed)."""
    model = copy.deepcopy(model).double()
    gen = torch.Generator().manual_seed(seed)
    S = {n: torch.zeros(ef.S.shape, dtype=torch.float64) for n, ef in factors.items()}
    N = 0
    for batch in batches:
        n_b = batch.shape[0] if isinstance(batch, torch.Tensor) else batch["x"].shape[0]
        mask = batch.get("attention_mask") if isinstance(batch, dict) else None
        with torch.no_grad():
            f_shape = call(model, double(batch)).shape
        P = probes(torch.empty(f_shape), mc_samples, exact, gen, mask).double()
        for i in range(n_b):
            one = batch[i:i + 1] if isinstance(batch, torch.Tensor) else {k: v[i:i + 1] for k, v in batch.items()}
            inputs, J = per_example(model, double(one), list(factors))
            for name, ef in factors.items():
                a = inputs[name][0]
                if ef.bias is not None:
                    a = torch.cat([a, torch.ones_like(a[..., :1])], -1)
                for p in P:
                    g = torch.tensordot(p[i:i + 1], J[name], dims=len(f_shape))[0]
                    if g.dim() == 1:
                        G = torch.outer(g, a)
                    else:
                        G = (g * mask[i].double()[:, None]).T @ a
                    S[name] += (ef.U_B.double().T @ G @ ef.U_A.double()) ** 2
        N += n_b
    return {n: s / (N * (1 if exact else mc_samples)) for n, s in S.items()}


@pytest.mark.parametrize("kind,tokens,mc_samples,exact,chunked", [
    ("mlp", "expand", 1, False, False),
    ("mlp", "expand", 1, True, False),
    ("pooled", "expand", 1, True, False),
    ("pooled", "reduce", 2, False, False),
    ("seq", "expand", 1, False, True),
    ("seq", "reduce", 3, False, False),
])
def test_S_matches_per_example_reference(kind, tokens, mc_samples, exact, chunked, monkeypatch):
    torch.manual_seed(0)
    model, batches = make(kind)
    if chunked:  # per-example products in chunks of 2 or 3 examples
        monkeypatch.setattr(correction, "_CHUNK_ELEMENTS", 64)
    # Random SPD factors: eigenbases far from anything the data would give.
    k = fit_kfac(model, batches, tokens=tokens, dense=False, progress=False)
    k = KFAC({n: replace(lf, A=random_spd(lf.A.shape[0]), B=random_spd(lf.B.shape[0])) for n, lf in k.items()}, k.meta)
    e = fit_ekfac(model, batches, kfac=k, tokens=tokens, mc_samples=mc_samples, exact=exact, probe_chunk=2,
                  seed=7, progress=False)
    assert list(e) == list(k) and e.meta["kind"] == "ekfac" and e.meta["n_examples"] == 5
    for name, ef in e.items():
        for U, F in ((ef.U_A, k[name].A), (ef.U_B, k[name].B)):  # orthonormal eigenbases, ascending
            assert rel_err(U.T @ U, torch.eye(U.shape[0])) < 1e-5
            D = U.double().T @ F.double() @ U.double()
            lam = torch.linalg.eigvalsh(F.double())
            assert rel_err(D, torch.diag(lam)) < 1e-5
    ref = reference_S(model, batches, e, mc_samples=mc_samples, exact=exact, seed=7)
    for name, ef in e.items():
        assert ef.S.dtype == torch.float32 and ef.S.shape == ef.U_B.shape[:1] + ef.U_A.shape[:1]
        assert rel_err(ef.S, ref[name]) < 1e-5, name


def test_one_example_exact_probes_give_the_exact_ggn_form():
    """One example, one token, all unit probes: EK-FAC is exact on every layer's GGN block."""
    model, x = MLP(), torch.randn(1, 5)
    e = fit_ekfac(model, [x], exact=True, progress=False)
    model64 = copy.deepcopy(model).double()
    params = {n: p.detach() for n, p in model64.named_parameters()}
    J = torch.func.jacrev(lambda p: torch.func.functional_call(model64, p, (x.double(),))[0])(params)
    for name, ef in e.items():
        Jl = J[f"{name}.weight"]  # (C, d_out, d_in)
        if ef.bias is not None:
            Jl = torch.cat([Jl, J[f"{name}.bias"][..., None]], -1)
        tau = torch.randn(Jl.shape[1:], dtype=torch.float64)
        exact = ((Jl * tau).sum((1, 2)) ** 2).sum()  # vec(τ)ᵀ (Σ_c J_cᵀ J_c) vec(τ)
        assert rel_err(e.quadratic_form({name: tau.float()}), exact) < 1e-4, name
        by_param = {ef.weight: tau[:, :Jl.shape[2] - (ef.bias is not None)].float()}
        if ef.bias is not None:
            by_param[ef.bias] = tau[:, -1].float()
        assert rel_err(e.quadratic_form(by_param), exact) < 1e-4, name


def test_kfac_eigenvalues_in_place_of_S_give_the_kfac_form():
    torch.manual_seed(1)
    model, batches = make("pooled")
    k = fit_kfac(model, batches, dense=False, progress=False)
    e = fit_ekfac(model, batches, kfac=k, progress=False)
    names = list(e)
    taus = [torch.randn(e[n].S.shape) for n in names]
    lam = {n: (torch.linalg.eigvalsh(k[n].B.double()), torch.linalg.eigvalsh(k[n].A.double())) for n in names}
    S_kfac = [torch.outer(*lam[n]).float() for n in names]
    q = kk.eigen_quadratic_forms(taus, [e[n].U_B for n in names], [e[n].U_A for n in names], S_kfac)
    assert rel_err(q, k.quadratic_form(dict(zip(names, taus)))) < 1e-5
    # the correction matters: the fitted S differs from λ_B λ_Aᵀ
    assert all(rel_err(e[n].S, s) > 1e-2 for n, s in zip(names, S_kfac))


def random_ekfac(shapes, bias):
    def orth(d):
        return torch.linalg.qr(torch.randn(d, d))[0]
    factors = {f"l{i}": EigenFactors(U_B=orth(do), U_A=orth(di), S=torch.rand(do, di) + 0.1,
                                     weight=f"l{i}.weight", bias=f"l{i}.bias" if b else None)
               for i, ((do, di), b) in enumerate(zip(shapes, bias))}
    return EKFAC(factors, {"kind": "ekfac", "tokens": "expand", "n_examples": 1})


def explicit_form(e, taus, weights):
    return sum(weights.get(n, 1.0) * (e[n].S.double() * (e[n].U_B.double().T @ t @ e[n].U_A.double()) ** 2).sum()
               for n, t in taus.items())


def test_quadratic_form_and_gradient_against_explicit_sum():
    e = random_ekfac([(7, 5), (3, 8), (4, 4)], [True, False, True])
    taus = {n: torch.randn(ef.S.shape, dtype=torch.float64, requires_grad=True) for n, ef in e.items()}
    weights = {"l2": 0.1}
    ref = explicit_form(e, taus, weights)
    ref_grads = torch.autograd.grad(ref, list(taus.values()))
    q = e.quadratic_form({n: t.float() for n, t in taus.items()}, weights=weights)
    assert q.dim() == 0 and rel_err(q, ref) < 1e-5
    grads = torch.autograd.grad(q, list(taus.values()))
    for g, r in zip(grads, ref_grads):
        assert rel_err(g, r) < 1e-5
    # float64 factors: float64 result; by parameter name, a missing bias counts as zero
    e64 = e.to(dtype=torch.float64)
    W = taus["l0"].detach()[:, :-1]
    expect = explicit_form(e64, {"l0": torch.cat([W, torch.zeros(7, 1, dtype=torch.float64)], 1)}, {})
    assert rel_err(e64.quadratic_form({"l0.weight": W}), expect) < 1e-12
    assert e64["l1"].S.dtype == torch.float64 and e["l1"].S.dtype == torch.float32
    with pytest.raises(ValueError, match="names none"):
        e.quadratic_form({"nope": W})


def test_fitting_kfac_first_needs_reiterable_batches():
    torch.manual_seed(2)
    model, batches = make("mlp")
    with pytest.raises(TypeError, match="one-shot iterator"):
        fit_ekfac(model, iter(batches), progress=False)
    k = fit_kfac(model, batches, dense=False, mc_samples=2, progress=False)
    e = fit_ekfac(model, batches, mc_samples=2, progress=False)  # fits the same k first
    e_iter = fit_ekfac(model, iter(batches), kfac=k, mc_samples=2, progress=False)  # one pass: fine
    for n in e:
        assert torch.equal(e[n].S, e_iter[n].S) and torch.equal(e[n].U_A, e_iter[n].U_A)
    assert e.meta["kfac"]["n_examples"] == 5 and e.meta["kfac"]["mc_samples"] == 2

    class Shrinking:  # re-iterable, but one batch shorter after each full pass
        def __init__(self, items):
            self.items = items

        def __iter__(self):
            yield from self.items
            self.items = self.items[:-1]
    with pytest.raises(ValueError, match="5 examples in the KFAC pass and 3"):
        fit_ekfac(model, Shrinking(batches), progress=False)


class Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.l = nn.Linear(3, 3)

    def forward(self, x):
        return self.l(torch.tanh(self.l(x)))


def test_a_layer_called_twice_sums_its_calls_gradients_per_example():
    """G_n of a layer applied twice, l(tanh(l(x))), is Σ over its calls of g ãᵀ: S and the diagonal GGN equal float64
    references from per-example Jacobians (exact probes: G_{n,c} = ∂f_{n,c}/∂[W | b]), for a batch of one too."""
    from tak.curvature import fit_diagonal
    torch.manual_seed(0)
    model = Twice().double()
    batches = [torch.randn(4, 3, dtype=torch.float64), torch.randn(1, 3, dtype=torch.float64)]
    e = fit_ekfac(model, batches, exact=True, progress=False)
    d = fit_diagonal(model, batches, exact=True, progress=False)
    U_B, U_A = e["l"].U_B.double(), e["l"].U_A.double()
    w, b = model.l.weight.detach(), model.l.bias.detach()

    def f(w, b, x):
        return torch.func.functional_call(model, {"l.weight": w, "l.bias": b}, (x[None],))[0]
    jacobians = [torch.func.vmap(torch.func.jacrev(f, argnums=(0, 1)), in_dims=(None, None, 0))(w, b, x)
                 for x in batches]
    G = torch.cat([torch.cat([Jw, Jb.unsqueeze(-1)], -1) for Jw, Jb in jacobians])  # (N, C, d_out, d_in + 1)
    assert rel_err(e["l"].S, ((U_B.T @ G @ U_A) ** 2).sum(1).mean(0)) < 1e-5
    assert rel_err(d["l"].D, (G ** 2).sum(1).mean(0)) < 1e-5


def test_bad_inputs():
    torch.manual_seed(3)
    model, batches = make("seq")
    k = fit_kfac(model, batches, dense=False, progress=False)
    with pytest.raises(ValueError, match="tokens"):
        fit_ekfac(model, batches, kfac=k, tokens="mean", progress=False)
    with pytest.raises(ValueError, match="mc_samples"):
        fit_ekfac(model, batches, kfac=k, mc_samples=0, progress=False)
    with pytest.raises(ValueError, match="probe_chunk"):
        fit_ekfac(model, batches, kfac=k, probe_chunk=0, progress=False)
    with pytest.raises(TypeError, match="kfac must be a KFAC"):
        fit_ekfac(model, batches, kfac=dict(k), progress=False)
    with pytest.raises(ValueError, match="tokens='expand'"):
        fit_ekfac(model, batches, kfac=k, tokens="reduce", progress=False)
    with pytest.raises(ValueError, match="selects none"):
        fit_ekfac(model, batches, kfac=k, layers="nope*", progress=False)
    with pytest.raises(ValueError, match=r"exact=True needs a feature output f of shape \(N, C\)"):
        fit_ekfac(model, batches, kfac=k, exact=True, progress=False)
    wrong = KFAC({**k.factors, "l1": replace(k["l1"], A=torch.eye(4))}, k.meta)
    with pytest.raises(ValueError, match=r"A \(5, 5\)"):
        fit_ekfac(model, batches, kfac=wrong, progress=False)
    compressed = kk.LowRankFactor(torch.eye(5)[:, :2], torch.ones(2))
    low_rank = KFAC({**k.factors, "l1": replace(k["l1"], A=compressed)}, k.meta)
    with pytest.raises(TypeError, match="compressed"):
        fit_ekfac(model, batches, kfac=low_rank, progress=False)
    other = KFAC({"fc": LayerFactors(A=torch.eye(2), B=torch.eye(2), weight="fc.weight", bias=None)}, k.meta)
    with pytest.raises(ValueError, match="not a linear layer of the model"):
        fit_ekfac(model, batches, kfac=other, progress=False)
    model.train()
    with pytest.raises(ZeroDivisionError):
        fit_ekfac(model, batches, kfac=k, output_fn=lambda m, batch: 1 / 0, progress=False)
    assert model.training  # mode restored after a failure
    # selecting layers among kfac's; mode restored and parameters untouched after success
    model.train()
    before = {n: p.clone() for n, p in model.named_parameters()}
    e = fit_ekfac(model, batches, kfac=k, layers=["l2", "head"], progress=False)
    assert list(e) == ["l2", "head"] and model.training
    assert all(torch.equal(p, before[n]) and p.grad is None for n, p in model.named_parameters())


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(4)
    model, batches = make("pooled")
    e = fit_ekfac(model, batches, tokens="reduce", progress=False)
    e.save(tmp_path / "e.safetensors")
    back = EKFAC.load(tmp_path / "e.safetensors", model=model)
    assert isinstance(back, EKFAC) and list(back) == list(e)
    assert back.meta["kind"] == "ekfac" and back.meta["tokens"] == "reduce"
    for n in e:
        for f in ("U_B", "U_A", "S"):
            assert torch.equal(getattr(back[n], f), getattr(e[n], f))
            assert getattr(back[n], f).stride() == getattr(e[n], f).stride()  # one layout: one matmul path
        assert (back[n].weight, back[n].bias) == (e[n].weight, e[n].bias)
    taus = {n: torch.randn_like(p, requires_grad=True) for n, p in model.named_parameters()}
    fitted, loaded = (torch.autograd.grad(f.quadratic_form(taus), list(taus.values())) for f in (e, back))
    assert all(torch.equal(a, b) for a, b in zip(fitted, loaded))  # a resumed run's penalty is the unbroken one's
    with pytest.raises(ValueError, match="not KFAC"):
        KFAC.load(tmp_path / "e.safetensors")



class NormNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1, self.norm, self.head = nn.Linear(5, 6), nn.LayerNorm(6), nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.norm(torch.tanh(self.l1(x))))


def test_exact_blocks_of_the_kfac_pass_join_the_eigen_form(tmp_path):
    """With ``dense`` (the default) the LayerNorm's exact GGN block of the KFAC pass is kept, and the form
    adds its τᵀ G τ to the EK-FAC terms; the block survives a save and load."""
    torch.manual_seed(5)
    model, batches = NormNet(), mlp_batches()
    k = fit_kfac(model, batches, progress=False)
    e = fit_ekfac(model, batches, progress=False)
    assert list(e) == ["l1", "head", "norm"] and e.meta["dense"] == k.meta["dense"]
    assert torch.equal(e["norm"].B, k["norm"].B)
    assert list(fit_ekfac(model, batches, dense=False, progress=False)) == ["l1", "head"]
    taus = {n: 0.1 * torch.randn_like(p) for n, p in model.named_parameters()}
    weights = {"head": 0.1, "norm": 3.0}
    G = k["norm"].B.double()
    v = torch.cat([taus["norm.weight"], taus["norm.bias"]]).double()
    expected = 3.0 * v @ G @ v
    for name, w in (("l1", 1.0), ("head", 0.1)):
        ef = e[name]
        block = torch.cat([taus[ef.weight], taus[ef.bias][:, None]], 1).double()
        expected += w * (ef.S.double() * (ef.U_B.double().T @ block @ ef.U_A.double()) ** 2).sum()
    assert rel_err(e.quadratic_form(taus, weights), expected) < 1e-5
    assert rel_err(e.to(dtype=torch.float64).quadratic_form({n: t.double() for n, t in taus.items()}, weights),
                   expected) < 1e-5
    e.save(tmp_path / "e.safetensors")
    back = EKFAC.load(tmp_path / "e.safetensors", model=model)
    assert rel_err(back.quadratic_form(taus, weights), expected) < 1e-6
