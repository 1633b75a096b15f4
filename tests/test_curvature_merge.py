"""Merging (TAK Eq. 8), per-task factors (Eq. 7), leave-one-out and compression, against their definitions."""
import math

import numpy as np
import pytest
import torch
from torch import nn

import kfac_kernels as kk
from tak.curvature import KFAC, DenseFactors, LayerFactors, TaskFactors, compress, fit_kfac, merge, merge_kfac, \
    merge_kfac_except, pool_kfac
from tests.util import rel_err

SHAPES = {"enc": (7, 6), "head": (3, 9), "one": (1, 5)}  # layer: (d_out, d_in), odd sizes


def spd(n, dtype=torch.float32):
    X = torch.randn(n + 3, n, dtype=torch.float64)
    return (X.T @ X / (n + 3)).to(dtype)


def random_kfac(task=None, shapes=SHAPES, dtype=torch.float32, **meta):
    factors = {name: LayerFactors(A=spd(d_in, dtype), B=spd(d_out, dtype), weight=f"{name}.weight", bias=None)
               for name, (d_out, d_in) in shapes.items()}
    meta = {"kind": "kfac", "tokens": "expand", "exact": False, "fingerprint": "f00d", "n_examples": 10,
            "scale": "test", **meta}
    if task is not None:
        meta["task"] = task
    return KFAC(factors, meta)


def random_taus(shapes=SHAPES, dtype=torch.float32):
    return {name: torch.randn(d_out, d_in, dtype=dtype) for name, (d_out, d_in) in shapes.items()}


def explicit_q(taus, B, A):
    """vec(τ)ᵀ (B ⊗ A) vec(τ) in float64, row-major vec, from dense matrices."""
    v = taus.double().reshape(-1)
    return v @ torch.kron(B.double(), A.double()) @ v


def dense(F):
    return F if isinstance(F, torch.Tensor) else F.to_dense()


def tasks_and_sizes(T):
    return [random_kfac(f"task{t}") for t in range(T)], torch.randint(1, 200, (T,)).tolist()


# ---------------------------------------------------------------- merge (Eq. 8)

def test_merge_equals_its_definition():
    fs, sizes = tasks_and_sizes(3)
    lam = [s / sum(sizes) for s in sizes]
    m = merge_kfac(fs, sizes)
    for name in SHAPES:
        B = sum(f[name].B.double() for f in fs)
        A = sum(lt * f[name].A.double() for lt, f in zip(lam, fs))
        assert m[name].B.dtype == torch.float32 and m[name].weight == f"{name}.weight"
        assert rel_err(torch.kron(m[name].B, m[name].A), torch.kron(B, A)) < 1e-6
    taus = random_taus()
    ref = sum(explicit_q(taus[n], sum(f[n].B.double() for f in fs),
                         sum(lt * f[n].A.double() for lt, f in zip(lam, fs))) for n in SHAPES)
    assert rel_err(m.quadratic_form(taus), ref) < 1e-5
    assert m.meta["merge"]["sizes"] == sizes and m.meta["merge"]["tasks"] == ["task0", "task1", "task2"]
    assert math.isclose(sum(m.meta["merge"]["lambdas"]), 1.0) and m.meta["merge"]["lambdas"] == pytest.approx(lam)
    assert m.meta["n_examples"] == 30 and m.meta["kind"] == "kfac" and m.meta["fingerprint"] == "f00d"
    from_numpy = merge_kfac(fs, np.array(sizes))  # numpy sizes become Python numbers in the metadata
    assert from_numpy.meta["merge"]["sizes"] == sizes and type(from_numpy.meta["merge"]["sizes"][0]) is int


def test_merge_of_fitted_factors_keeps_dense_blocks_by_the_same_rule():
    model = nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Tanh(), nn.Linear(5, 2), nn.Flatten())
    fs = [fit_kfac(model, [torch.randn(n, 1, 4)], progress=False) for n in (3, 5)]  # (N, T=1, d): tokens
    m = merge_kfac(fs, [3, 5])
    assert isinstance(m["1"], DenseFactors) and m["1"].params == fs[0]["1"].params
    assert torch.allclose(m["1"].A, torch.ones(1, 1)) and torch.allclose(m["1"].B, fs[0]["1"].B + fs[1]["1"].B)
    assert torch.allclose(m["0"].A, (3 * fs[0]["0"].A + 5 * fs[1]["0"].A) / 8, atol=1e-7)
    assert [p["n_examples"] for p in m.meta["merge"]["parts"]] == [3, 5] and m.meta["n_examples"] == 8


def test_pooling_per_task_fits_equals_one_fit_over_all_their_examples():
    """pool_kfac with the examples each fit saw: the KFAC of all of them at once (exact probes, so both see the same
    probes; factors are fp32), exact LayerNorm blocks included; Eq. 8's merge has the same A and Σ_t B_t."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Tanh(), nn.Linear(5, 3)).double()
    batches = [[torch.randn(n, 4, dtype=torch.float64)] for n in (3, 7)]
    parts = [fit_kfac(model, b, exact=True, progress=False) for b in batches]
    pooled, joint = pool_kfac(parts, [3, 7]), fit_kfac(model, batches[0] + batches[1], exact=True, progress=False)
    merged = merge_kfac(parts, [3, 7])
    assert list(pooled) == list(joint) == ["0", "3", "1"]
    for name in joint:
        for side in ("A", "B"):
            torch.testing.assert_close(getattr(pooled[name], side), getattr(joint[name], side), rtol=1e-6, atol=0)
        assert torch.equal(pooled[name].A, merged[name].A)
        torch.testing.assert_close(merged[name].B, parts[0][name].B + parts[1][name].B, rtol=1e-6, atol=0)
    assert pooled.meta["n_examples"] == 10 and pooled.meta["scale"].startswith("pooled: B = sum_t lambda_t B_t")
    with pytest.raises(ValueError, match=r"pool_kfac: 2 factors but 1 sizes"):
        pool_kfac(parts, [3])


def test_merge_refuses_what_cannot_be_merged():
    fs, sizes = tasks_and_sizes(2)
    with pytest.raises(ValueError, match="2 factors but 3 sizes"):
        merge_kfac(fs, sizes + [1])
    with pytest.raises(ValueError, match="factors is empty"):
        merge_kfac([], [])
    for bad in (0, -3, float("nan"), True, "10"):
        with pytest.raises(ValueError, match=r"sizes\[1\] must be a positive number"):
            merge_kfac(fs, [4, bad])
    other = random_kfac(shapes={**SHAPES, "enc": (7, 5)})
    with pytest.raises(ValueError, match=r"enc.A has shape \(5, 5\) in factors\[1\], \(6, 6\) in factors\[0\]"):
        merge_kfac([fs[0], other], sizes)
    fewer = random_kfac(shapes={"enc": (7, 6), "one": (1, 5), "extra": (2, 2)})
    with pytest.raises(ValueError, match=r"other layers than factors\[0\]: missing \['head'\], extra \['extra'\]"):
        merge_kfac([fs[0], fewer], sizes)
    for key, value in (("tokens", "reduce"), ("exact", True), ("fingerprint", "beef")):
        with pytest.raises(ValueError, match=f"factors\\[1\\] has {key}={value!r}, factors\\[0\\] has {key}="):
            merge_kfac([fs[0], random_kfac(**{key: value})], sizes)
    renamed = random_kfac()
    renamed.factors["enc"] = LayerFactors(renamed["enc"].A, renamed["enc"].B, "enc.weight", "enc.bias")
    with pytest.raises(ValueError, match=r"'enc' is \('LayerFactors', 'enc.weight', 'enc.bias', 'linear'\) in factors\[1\]"):
        merge_kfac([fs[0], renamed], sizes)
    compressed, _ = compress(fs[1], method="int8", which="B")
    with pytest.raises(ValueError, match=r"enc.B of factors\[1\] is a Int8Factor; merge dense factors"):
        merge_kfac([fs[0], compressed], sizes)
    with pytest.raises(ValueError, match=r"factors\[1\] is a dict"):
        merge_kfac([fs[0], {}], sizes)


# ---------------------------------------------------------------- per-task factors (Eq. 7)

def test_task_factors_sum_the_per_task_forms(monkeypatch, backend):
    fs, sizes = tasks_and_sizes(3)
    lam = [s / sum(sizes) for s in sizes]
    tf = TaskFactors(fs, sizes)
    assert len(tf) == 3 and tf.lambdas == pytest.approx(lam)
    taus = {n: t.requires_grad_() for n, t in random_taus().items()}
    weights = {"head": 0.1}
    calls = []
    real = kk.quadratic_forms
    monkeypatch.setattr(merge.kk, "quadratic_forms", lambda *a, **k: calls.append(len(a[0])) or real(*a, **k))
    q = tf.quadratic_form(taus, weights)
    assert calls == [3 * len(SHAPES)]  # one call over tasks × layers
    per_task = sum(lt * f.quadratic_form(taus, weights) for lt, f in zip(lam, fs))
    explicit = sum(lt * weights.get(n, 1.0) * explicit_q(taus[n], f[n].B, f[n].A)
                   for lt, f in zip(lam, fs) for n in SHAPES)
    assert rel_err(q, per_task) < 1e-5 and rel_err(q, explicit) < 1e-5
    grads = torch.autograd.grad(q, list(taus.values()))
    want = torch.autograd.grad(per_task, list(taus.values()))
    assert all(rel_err(g, w) < 1e-5 for g, w in zip(grads, want))


def test_weights_name_factored_layers_and_are_constants():
    """A weights key that names no factored layer (a typo, a parameter name) would silently weigh nothing,
    and a weight that requires grad would get none: both refused, for KFAC and the per-task factors."""
    f, taus = random_kfac(), random_taus()
    for factors in (f, TaskFactors([f, random_kfac()], [1, 3])):
        with pytest.raises(ValueError, match=r"weights names 2 keys that are not factored layers: \['head.weight', "
                                             r"'hed'\]; parameter 'head.weight' is in layer 'head'"):
            factors.quadratic_form(taus, weights={"enc": 0.5, "head.weight": 0.1, "hed": 0.0})
        with pytest.raises(ValueError, match=r"weights must be constants; \['head'\] require grad"):
            factors.quadratic_form(taus, weights={"head": torch.tensor(0.1, requires_grad=True)})
        with pytest.raises(TypeError, match="weights must be a mapping"):
            factors.quadratic_form(taus, weights=[0.1, 1.0, 1.0])
    want = sum(w * explicit_q(taus[n], f[n].B, f[n].A) for n, w in (("enc", 0.5), ("head", 0.1), ("one", 1.0)))
    assert rel_err(f.quadratic_form(taus, weights={"enc": 0.5, "head": torch.tensor(0.1)}), want) < 1e-5


def test_task_factors_by_parameter_name_and_compressed():
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    fs = [fit_kfac(model, [torch.randn(5, 4)], progress=False, dense=False) for _ in range(2)]
    fs[1], _ = compress(fs[1], method="eigen", rank=3)
    taus = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    tf = TaskFactors(fs, [2, 6])
    want = 0.25 * fs[0].quadratic_form(taus) + 0.75 * fs[1].quadratic_form(taus)
    assert rel_err(tf.quadratic_form(taus), want) < 1e-5
    with pytest.raises(ValueError, match="taus names none of the 2 factored layers"):
        tf.quadratic_form({"nothing": torch.zeros(2)})
    for bad in ({**taus, "2.bias": torch.zeros(4)}, {"2": torch.zeros(3, 6)}):
        given = r"\{'2.weight': \(3, 6\), '2.bias': \(4,\)\}" if "2.bias" in bad else r"\{'2': \(3, 6\)\}"
        with pytest.raises(ValueError, match=rf"layer '2' has factors for a block of shape \(3, 7\): W \(3, 6\) and b \(3,\); "
                                             rf"taus gives {given}"):
            fs[0].quadratic_form(bad)
    with pytest.raises(TypeError, match="taus must be a mapping"):
        fs[0].quadratic_form(list(taus.values()))


def test_a_missing_weight_or_bias_counts_as_zero():
    """τ by parameter name with only some of a layer's parameters (e.g. ``tak.linearize(model,
    trainable="*.bias")``): the block [W | b] has zeros for the missing ones, against the dense form."""
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    f = fit_kfac(model, [torch.randn(5, 4)], progress=False, dense=False)
    params = dict(model.named_parameters())
    for names in (["0.bias", "2.bias"], ["0.weight", "2.bias"]):
        taus = {n: torch.randn_like(params[n]) for n in names}
        want = 0
        for layer in ("0", "2"):
            W = taus.get(f"{layer}.weight", torch.zeros_like(params[f"{layer}.weight"]))
            b = taus.get(f"{layer}.bias", torch.zeros_like(params[f"{layer}.bias"]))
            want = want + explicit_q(torch.cat([W, b[:, None]], 1), f[layer].B, f[layer].A)
        assert rel_err(f.quadratic_form(taus), want) < 1e-5, names


# ---------------------------------------------------------------- leave-one-out

@pytest.mark.parametrize("t", [0, 2, 3])
def test_leave_one_out_equals_the_others(t):
    fs, sizes = tasks_and_sizes(4)
    others, other_sizes = fs[:t] + fs[t + 1:], sizes[:t] + sizes[t + 1:]
    m, ref = merge_kfac_except(fs, sizes, t), merge_kfac(others, other_sizes)
    for name in SHAPES:
        assert torch.equal(m[name].A, ref[name].A) and torch.equal(m[name].B, ref[name].B)
    assert m.meta["merge"]["tasks"] == [f"task{i}" for i in range(4) if i != t]
    loo = TaskFactors(fs, sizes).without(t)
    assert loo.tasks == others and loo.lambdas == pytest.approx([s / sum(other_sizes) for s in other_sizes])
    taus = random_taus()
    assert torch.equal(loo.quadratic_form(taus), TaskFactors(others, other_sizes).quadratic_form(taus))


def test_leave_one_out_refuses_bad_indices():
    fs, sizes = tasks_and_sizes(2)
    for t in (2, -1, 1.0, True):
        with pytest.raises(ValueError, match=r"t must be a task index in \[0, 2\)"):
            merge_kfac_except(fs, sizes, t)
    with pytest.raises(ValueError, match="leaves no task"):
        TaskFactors(fs[:1], sizes[:1]).without(0)
    with pytest.raises(ValueError, match="3 factors but 2 sizes"):  # checked before a task is left out
        merge_kfac_except(fs + fs[:1], sizes, 2)


# ---------------------------------------------------------------- compression

def compressed(method, which="both", **args):
    f = random_kfac()
    c, report = compress(f, method=method, which=which, **args)
    return f, c, report


def check_report(f, c, report):
    for name in SHAPES:
        before = f[name].A.nbytes + f[name].B.nbytes
        after = c[name].A.nbytes + c[name].B.nbytes
        assert report["layers"][name]["bytes_before"] == before and report["layers"][name]["bytes_after"] == after
    assert report["bytes_before"] == sum(4 * (a * a + b * b) for b, a in SHAPES.values())
    assert report["bytes_after"] == sum(e["bytes_after"] for e in report["layers"].values())
    assert report["ratio"] == report["bytes_before"] / report["bytes_after"]


@pytest.mark.parametrize("k", [1, 2, 3, 50])
def test_blockdiag_keeps_the_diagonal_blocks(k):
    f, c, report = compressed("blockdiag", k=k)
    for name in SHAPES:
        for side in "AB":
            F, G = getattr(f[name], side), getattr(c[name], side)
            assert isinstance(G, kk.BlockDiagonalFactor)
            n = F.shape[0]
            b = -(-n // min(k, n))
            block = torch.arange(n) // b
            assert torch.equal(G.to_dense(), torch.where(block[:, None] == block[None, :], F, 0.0))
    check_report(f, c, report)
    assert report["method"] == "blockdiag" and report["k"] == k
    assert c.meta["compression"] == [{"method": "blockdiag", "which": "both", "k": k}]


@pytest.mark.parametrize("args", [{"rank": 2}, {"rank": 100}, {"fraction": 0.5}])
def test_eigen_keeps_the_top_eigenpairs(args):
    f, c, report = compressed("eigen", **args)
    for name in SHAPES:
        for side in "AB":
            F, G = getattr(f[name], side).double(), getattr(c[name], side)
            n = F.shape[0]
            r = min(args["rank"], n) if "rank" in args else max(1, round(args["fraction"] * n))
            lam, U = torch.linalg.eigh(F)
            assert isinstance(G, kk.LowRankFactor) and G.rank == r
            assert rel_err(G.eigenvalues, lam.flip(0)[:r]) < 1e-5
            assert rel_err(G.to_dense(), (U[:, -r:] * lam[-r:]) @ U[:, -r:].T) < 1e-5
    check_report(f, c, report)


@pytest.mark.parametrize("keep", [0.05, 0.3, 0.77, 1.0])
def test_prune_keeps_the_largest_entries(keep):
    f, c, report = compressed("prune", keep=keep)
    for name in SHAPES:
        for side in "AB":
            F, G = getattr(f[name], side), getattr(c[name], side)
            n = F.shape[0]
            kept = G != 0
            assert isinstance(G, torch.Tensor) and torch.equal(G, G.T) and torch.equal(G.diagonal(), F.diagonal())
            assert torch.equal(G[kept], F[kept])
            assert int(kept.sum()) == report["layers"][name]["nonzeros"][side]
            assert int(kept.sum()) == n + 2 * min(max(round(keep * n * n) - n, 0) // 2, n * (n - 1) // 2)
            off = ~torch.eye(n, dtype=torch.bool)
            if (kept & off).any() and (~kept & off).any():
                assert F[kept & off].abs().min() >= F[~kept & off].abs().max()
    check_report(f, c, report)
    assert report["ratio"] == 1.0  # dense result: same bytes


def test_int8_dequantizes_within_half_a_step():
    f, c, report = compressed("int8")
    for name in SHAPES:
        for side in "AB":
            F, G = getattr(f[name], side), getattr(c[name], side)
            assert isinstance(G, kk.Int8Factor)
            step = G.scale[:, None] * G.scale[None, :]
            assert ((G.to_dense() - F).abs() <= 0.5 * step * (1 + 1e-5) + 1e-7).all()
    check_report(f, c, report)
    assert report["bytes_after"] == sum(n * n + 4 * n for shape in SHAPES.values() for n in shape)  # q int8, s fp32


@pytest.mark.parametrize("method,args", [("blockdiag", {"k": 2}), ("eigen", {"fraction": 0.4}),
                                         ("prune", {"keep": 0.5}), ("int8", {})])
@pytest.mark.parametrize("which", ["both", "A", "B"])
def test_compressed_quadratic_form_uses_the_compressed_factors(method, args, which):
    f, c, _ = compressed(method, which, **args)
    for name in SHAPES:
        for side in "AB":
            if which not in ("both", side):
                assert getattr(c[name], side) is getattr(f[name], side)
    taus = random_taus()
    ref = sum(explicit_q(taus[n], dense(c[n].B), dense(c[n].A)) for n in SHAPES)
    assert rel_err(c.quadratic_form(taus), ref) < 1e-5


def test_compress_refuses_bad_arguments():
    f = random_kfac()
    with pytest.raises(ValueError, match="method must be one of"):
        compress(f, method="svd")
    with pytest.raises(ValueError, match=r"method='blockdiag' takes \['k'\], got \['rank'\]"):
        compress(f, method="blockdiag", k=2, rank=3)
    with pytest.raises(ValueError, match="method='int8' takes no arguments, got"):
        compress(f, method="int8", keep=0.5)
    for k in (None, 0, 2.0):
        with pytest.raises(ValueError, match="needs k= a positive int"):
            compress(f, method="blockdiag", k=k)
    with pytest.raises(ValueError, match="exactly one of rank= or fraction="):
        compress(f, method="eigen", rank=2, fraction=0.5)
    with pytest.raises(ValueError, match="fraction must be in"):
        compress(f, method="eigen", fraction=1.5)
    with pytest.raises(ValueError, match="rank must be a positive int"):
        compress(f, method="eigen", rank=0)
    for keep in (None, 0.0, 1.2):
        with pytest.raises(ValueError, match=r"needs keep= in \(0, 1\]"):
            compress(f, method="prune", keep=keep)
    with pytest.raises(ValueError, match="which must be 'both', 'A' or 'B'"):
        compress(f, method="int8", which="AB")
    c, _ = compress(f, method="int8", which="A")
    with pytest.raises(ValueError, match="enc.A is already a Int8Factor"):
        compress(c, method="eigen", rank=2)
    with pytest.raises(ValueError, match="needs KFAC factors"):
        compress({}, method="int8")
