"""Tests of tak.arithmetic.analyses / plots / report on toy callables (no models, CPU, fast)."""
import itertools
import os

import pytest
import torch

from tak.arithmetic import analyses as A
from tak.arithmetic import plots as P
from tak.arithmetic.report import Report, markdown_table

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------------------------
# toy models as callables
# ----------------------------------------------------------------------------------------------

def linear_predict(W0):
    """f(x; θ0 + τ) = x (W0 + τ["w"])ᵀ, a linear classifier."""
    def predict(tau, x):
        W = W0 if tau is None else W0 + tau["w"]
        return x @ W.T
    return predict


def brute_force_xi(predict, tau1, tau2, b1, b2, a1, a2):
    """ξ straight from the definition, no caching."""
    xi = torch.zeros(len(a1), len(a2), dtype=torch.float64)
    for i, j in itertools.product(range(len(a1)), range(len(a2))):
        both = {"w": a1[i] * tau1["w"] + a2[j] * tau2["w"]}
        total = 0.0
        for batches, single in ((b1, {"w": a1[i] * tau1["w"]}), (b2, {"w": a2[j] * tau2["w"]})):
            x = torch.cat(batches)
            changed = predict(single, x).argmax(1) != predict(both, x).argmax(1)
            total += changed.double().mean().item()
        xi[i, j] = total
    return xi


# ----------------------------------------------------------------------------------------------
# combine
# ----------------------------------------------------------------------------------------------

def test_combine_sums_and_handles_none_and_missing_names():
    t1 = {"a": torch.ones(2), "b": torch.full((3,), 2.0)}
    t2 = {"a": torch.full((2,), 3.0)}
    out = A.combine([t1, None, t2], [2.0, 5.0, -1.0])
    assert torch.equal(out["a"], torch.full((2,), -1.0))
    assert torch.equal(out["b"], torch.full((3,), 4.0))
    assert torch.equal(t1["a"], torch.ones(2))  # inputs untouched
    assert A.combine([None, None], [1.0, 2.0]) is None
    with pytest.raises(ValueError, match="shape"):
        A.combine([t1, {"a": torch.ones(3)}], [1.0, 1.0])
    with pytest.raises(ValueError, match="coefficients"):
        A.combine([t1], [1.0, 2.0])
    with pytest.raises(ValueError):
        A.combine([], [])


def test_combine_of_bf16_task_vectors_rounds_once():
    """Σ_t α_t τ_t of bf16 τ is summed in float32 and rounded to bf16 once: within half a bf16 ulp of the exact
    mean (a bf16 sum rounds at every step)."""
    g = torch.Generator().manual_seed(3)
    taus = [{"w": torch.randn(64, 33, generator=g).bfloat16()} for _ in range(5)]
    mean = A.combine(taus, [1 / 5] * 5)["w"]
    exact = sum(t["w"].double() for t in taus) / 5
    assert mean.dtype == torch.bfloat16
    assert ((mean.double() - exact).abs() <= 2 ** -8 * 1.001 * exact.abs()).all()


# ----------------------------------------------------------------------------------------------
# disentanglement error
# ----------------------------------------------------------------------------------------------

def test_disentanglement_error_is_zero_for_disjoint_supports():
    """Task 1 lives on input features 0..2, task 2 on 3..5 (the other features are exactly 0).
    τ1 touches only the columns of W reading features 0..2, τ2 only those reading 3..5; θ0 is a
    full (shared) matrix. Then on task-t inputs the other task vector multiplies zeros: the logits,
    hence predictions, of θ0 + α1τ1 + α2τ2 equal those of θ0 + α_t τ_t exactly, for every α."""
    g = torch.Generator().manual_seed(0)
    d, C = 6, 5
    W0 = torch.randn(C, d, generator=g, dtype=torch.float64)
    tau1 = {"w": torch.zeros(C, d, dtype=torch.float64)}
    tau2 = {"w": torch.zeros(C, d, dtype=torch.float64)}
    tau1["w"][:, :3] = 3 * torch.randn(C, 3, generator=g, dtype=torch.float64)
    tau2["w"][:, 3:] = 3 * torch.randn(C, 3, generator=g, dtype=torch.float64)

    def inputs(lo, hi, n):
        x = torch.zeros(n, d, dtype=torch.float64)
        x[:, lo:hi] = torch.randn(n, hi - lo, generator=g, dtype=torch.float64)
        return x

    b1 = [inputs(0, 3, 7), inputs(0, 3, 5)]
    b2 = [inputs(3, 6, 4), inputs(3, 6, 9), inputs(3, 6, 1)]
    alphas = [-1.0, 0.0, 0.5, 1.0, 2.0]
    predict = linear_predict(W0)
    xi = A.disentanglement_error(predict, tau1, tau2, b1, b2, alphas, alphas[:3])
    assert xi.shape == (5, 3) and xi.dtype == torch.float64 and xi.device.type == "cpu"
    assert torch.equal(xi, torch.zeros(5, 3))
    # the task vectors do change predictions on their own task, so the zero is not vacuous
    x1 = torch.cat(b1)
    assert (predict(None, x1).argmax(1) != predict({"w": 2 * tau1["w"]}, x1).argmax(1)).any()


def test_disentanglement_error_positive_when_interfering_and_matches_definition():
    g = torch.Generator().manual_seed(1)
    d, C = 4, 3
    W0 = torch.randn(C, d, generator=g, dtype=torch.float64)
    tau1 = {"w": 2 * torch.randn(C, d, generator=g, dtype=torch.float64)}
    tau2 = {"w": 2 * torch.randn(C, d, generator=g, dtype=torch.float64)}
    b1 = [torch.randn(n, d, generator=g, dtype=torch.float64) for n in (8, 3)]
    b2 = [torch.randn(n, d, generator=g, dtype=torch.float64) for n in (6,)]
    a1, a2 = [0.0, 0.5, 1.0, 1.5], [0.0, 1.0, 2.0]
    calls = []

    base = linear_predict(W0)

    def predict(tau, x):
        calls.append(1)
        return base(tau, x)

    xi = A.disentanglement_error(predict, tau1, tau2, b1, b2, a1, a2)
    assert torch.equal(xi, brute_force_xi(base, tau1, tau2, b1, b2, a1, a2))
    assert xi[0, 0] == 0  # both at θ0
    assert xi.max() > 0
    assert (xi >= 0).all() and (xi <= 2).all()
    # single-task predictions are cached per α: one pass per α_t, then one per grid cell
    assert len(calls) == len(a1) * len(b1) + len(a2) * len(b2) + len(a1) * len(a2) * (len(b1) + len(b2))


def test_disentanglement_error_rejects_bad_inputs():
    W0 = torch.randn(3, 2)
    tau = {"w": torch.ones(3, 2)}
    predict = linear_predict(W0)
    x = [torch.randn(4, 2)]
    with pytest.raises(ValueError, match="no batches"):
        A.disentanglement_error(predict, tau, tau, [], x, [1.0], [1.0])
    with pytest.raises(ValueError, match="no batches"):
        A.disentanglement_error(predict, tau, tau, x, iter([]), [1.0], [1.0])
    with pytest.raises(ValueError, match="empty"):
        A.disentanglement_error(predict, tau, tau, x, x, [], [1.0])
    with pytest.raises(ValueError, match="no examples"):
        A.disentanglement_error(predict, tau, tau, [torch.randn(0, 2)], x, [1.0], [1.0])
    with pytest.raises(ValueError, match="not None"):
        A.disentanglement_error(predict, None, tau, x, x, [1.0], [1.0])
    with pytest.raises(ValueError, match=r"\(N, C\)"):
        A.disentanglement_error(lambda t, b: predict(t, b)[:, 0], tau, tau, x, x, [1.0], [1.0])


# ----------------------------------------------------------------------------------------------
# linearization error
# ----------------------------------------------------------------------------------------------

def test_linearization_error_exactly_zero_for_linear_model():
    """Integer-valued data and T = 2 (a mean is a halving): every float op is exact."""
    g = torch.Generator().manual_seed(2)

    def ints(*shape):
        return torch.randint(-4, 5, shape, generator=g).double()

    W0, b0 = ints(3, 5), ints(3)
    taus = [{"w": ints(3, 5), "b": ints(3)} for _ in range(2)]

    def outputs(tau, x):
        W = W0 + (tau["w"] if tau else 0)
        b = b0 + (tau["b"] if tau else 0)
        return x @ W.T + b

    batches = [ints(4, 5), ints(1, 5), ints(6, 5)]
    err = A.linearization_error(outputs, taus, batches)
    assert err.shape == (11,)
    assert torch.equal(err, torch.zeros(11, dtype=torch.float64))
    # with more tasks and non-integer data it is zero up to rounding
    taus3 = [{"w": torch.randn(3, 5, dtype=torch.float64), "b": torch.randn(3, dtype=torch.float64)}
             for _ in range(3)]
    err3 = A.linearization_error(outputs, taus3, [torch.randn(5, 5, dtype=torch.float64)])
    assert err3.abs().max() < 1e-12


def test_linearization_error_nonlinear_matches_direct_loop():
    g = torch.Generator().manual_seed(3)
    W0 = torch.randn(4, 3, generator=g, dtype=torch.float64)
    taus = [{"w": torch.randn(4, 3, generator=g, dtype=torch.float64)} for _ in range(3)]

    def outputs(tau, x):
        return torch.tanh(x @ (W0 + (tau["w"] if tau else 0)).T)

    batches = [torch.randn(n, 3, generator=g, dtype=torch.float64) for n in (5, 2)]
    err = A.linearization_error(outputs, taus, batches)
    expected = []
    mean_w = sum(t["w"] for t in taus) / 3
    for x in batches:
        for row in x:
            avg = sum(torch.tanh(row @ (W0 + t["w"]).T) for t in taus) / 3
            expected.append((avg - torch.tanh(row @ (W0 + mean_w).T)).abs().sum())
    torch.testing.assert_close(err, torch.stack(expected), rtol=1e-12, atol=1e-12)
    assert (err > 0).all()
    with pytest.raises(ValueError, match="no batches"):
        A.linearization_error(outputs, taus, [])
    with pytest.raises(ValueError, match="no task vectors"):
        A.linearization_error(outputs, [], batches)


# ----------------------------------------------------------------------------------------------
# AUROC
# ----------------------------------------------------------------------------------------------

def brute_force_auroc(inl, out):
    total = 0.0
    for a in inl:
        for b in out:
            total += 1.0 if a > b else 0.5 if a == b else 0.0
    return total / (len(inl) * len(out))


def test_auroc_known_cases():
    assert A.auroc(torch.tensor([5.0, 6.0, 7.0]), torch.tensor([0.0, 1.0])) == 1.0
    assert A.auroc([0.0, 1.0], [5.0, 6.0, 7.0]) == 0.0
    assert A.auroc([2.0, 2.0, 2.0], [2.0, 2.0]) == 0.5
    same = torch.randn(50, generator=torch.Generator().manual_seed(4))
    assert A.auroc(same, same) == 0.5
    # pairs: 3>2, 3>1, 2=2 (½), 2>1, 2=2 (½), 2>1 -> 5/6
    assert A.auroc([3.0, 2.0, 2.0], [2.0, 1.0]) == pytest.approx(5 / 6, abs=0)
    # low scores mark inliers: 1<2, 1<3, 2=2 (½), 2<3 -> 3.5/4
    assert A.auroc([1.0, 2.0], [2.0, 3.0], higher_is_inlier=False) == 0.875


def test_auroc_matches_pairwise_count_with_many_ties():
    g = torch.Generator().manual_seed(5)
    inl = torch.randint(0, 6, (37,), generator=g).float()
    out = torch.randint(0, 4, (23,), generator=g).float()
    assert A.auroc(inl, out) == pytest.approx(brute_force_auroc(inl.tolist(), out.tolist()), abs=1e-15)
    assert A.auroc(inl, out, higher_is_inlier=False) == pytest.approx(1 - A.auroc(inl, out), abs=1e-15)


def test_auroc_rejects_empty_and_nan():
    with pytest.raises(ValueError, match="no inlier"):
        A.auroc([], [1.0])
    with pytest.raises(ValueError, match="no outlier"):
        A.auroc([1.0], torch.empty(0))
    with pytest.raises(ValueError, match="NaN"):
        A.auroc([1.0, float("nan")], [0.0])


# ----------------------------------------------------------------------------------------------
# normalcy scores, support localization, α sweeps
# ----------------------------------------------------------------------------------------------

def tiny_mlp():
    g = torch.Generator().manual_seed(6)
    params = {"w1": torch.randn(5, 3, generator=g, dtype=torch.float64),
              "b1": torch.randn(5, generator=g, dtype=torch.float64),
              "w2": torch.randn(2, 5, generator=g, dtype=torch.float64),
              "b2": torch.randn(2, generator=g, dtype=torch.float64)}

    def f(p, x):
        return torch.tanh(x @ p["w1"].T + p["b1"]) @ p["w2"].T + p["b2"]

    return params, f


def test_normalcy_scores_match_explicit_jacobian():
    params, f = tiny_mlp()
    g = torch.Generator().manual_seed(7)
    tau = {k: torch.randn(v.shape, generator=g, dtype=torch.float64) for k, v in params.items()}

    def jvp(t, x):
        return torch.func.jvp(lambda p: f(p, x), (params,), (t,))[1]

    batches = [torch.randn(n, 3, generator=g, dtype=torch.float64) for n in (4, 3)]
    scores = A.normalcy_scores(jvp, tau, batches)
    names = list(params)
    vec_tau = torch.cat([tau[k].reshape(-1) for k in names])
    expected = []
    for x in torch.cat(batches):
        jac = torch.func.jacrev(lambda p: f(p, x[None])[0])(params)  # {name: (D, *shape)}
        J = torch.cat([jac[k].reshape(2, -1) for k in names], dim=1)  # (D, P)
        expected.append((J @ vec_tau).pow(2).sum())
    assert scores.shape == (7,) and scores.dtype == torch.float64
    torch.testing.assert_close(scores, torch.stack(expected), rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="no batches"):
        A.normalcy_scores(jvp, tau, [])


def test_support_localization_matches_direct_computation():
    params, f = tiny_mlp()
    g = torch.Generator().manual_seed(8)
    tau = {k: 0.3 * torch.randn(v.shape, generator=g, dtype=torch.float64) for k, v in params.items()}

    def features(t, x):
        p = params if t is None else {k: params[k] + t[k] for k in params}
        return f(p, x)

    xin = [torch.randn(n, 3, generator=g, dtype=torch.float64) for n in (3, 2)]
    xout = [torch.randn(4, 3, generator=g, dtype=torch.float64)]
    in_mse, out_mse = A.support_localization(features, tau, xin, xout)
    shifted = {k: params[k] + tau[k] for k in params}

    def direct(x):
        return ((f(shifted, x) - f(params, x)) ** 2).sum(1) / 2  # d = 2

    torch.testing.assert_close(in_mse, direct(torch.cat(xin)), rtol=1e-12, atol=0)
    torch.testing.assert_close(out_mse, direct(xout[0]), rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="out_batches"):
        A.support_localization(features, tau, xin, [])


def test_alpha_sweep():
    assert A.alpha_sweep(lambda a: torch.tensor(2 * a), [0, 0.5, 1]) == [0.0, 1.0, 2.0]
    with pytest.raises(ValueError, match="empty"):
        A.alpha_sweep(lambda a: a, [])


def test_analyses_run_without_grad():
    W0 = torch.randn(3, 2, requires_grad=True)
    tau = {"w": torch.randn(3, 2)}
    seen = []

    def outputs(t, x):
        seen.append(torch.is_grad_enabled())
        return x @ (W0 + (t["w"] if t else 0)).T

    err = A.linearization_error(outputs, [tau, tau], [torch.randn(2, 2)])
    assert not err.requires_grad and seen and not any(seen)


# ----------------------------------------------------------------------------------------------
# plots
# ----------------------------------------------------------------------------------------------

def assert_png(path, folder):
    assert path.exists() and path.stat().st_size > 1000
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    assert not [p for p in os.listdir(folder) if p.endswith(".tmp")]  # no temporary left


def test_plots_write_pngs(tmp_path):
    g = torch.Generator().manual_seed(9)
    out = tmp_path / "figs"  # created by the plot functions
    p = P.disentanglement_heatmap(torch.rand(4, 3, generator=g) * 2, [0.0, 0.5, 1.0, 1.5], [0.0, 1.0, 2.0],
                                  out / "xi.png", title="ξ toy")
    assert p == out / "xi.png"
    assert_png(p, out)
    p = P.histograms({"in-task": torch.rand(100, generator=g) + 1, "out-of-task": torch.rand(80, generator=g)},
                     out / "hist.png", title="normalcy (AUROC 1.00)", xlabel="‖Jτ‖²")
    assert_png(p, out)
    p = P.histograms({"a": [0.0, 1e-3, 1e-1, 1.0], "b": [1e-2, 10.0]}, out / "hist_log.png",
                     title="log", xlabel="error", log=True)
    assert_png(p, out)
    alphas = [0.0, 0.5, 1.0, 1.5, 2.0]
    p = P.alpha_sweeps({"TA": (alphas, [40, 60, 70, 50, 30]), "TAK": (alphas, [40, 70, 80, 79, 78])},
                       out / "sweep.png", title="α sweep")
    assert_png(p, out)
    p = P.bar_table({"TA": {"cars": 60.0, "dtd": 50.0}, "TAK": {"cars": 70.0, "dtd": 65.0, "svhn": 90.0}},
                    out / "bars.png", title="per task", average=True)
    assert_png(p, out)
    # overwriting an existing file works (os.replace)
    assert_png(P.alpha_sweeps({"TA": (alphas, alphas)}, out / "sweep.png", title="again"), out)


def test_alpha_sweeps_star_the_chosen_alpha_of_each_curve(tmp_path, monkeypatch):
    saved = []
    monkeypatch.setattr(P, "_save", lambda fig, path: saved.append([(line.get_xdata().tolist(), line.get_marker())
                                                                      for line in fig.axes[0].lines]))
    flat = [0.0, 0.5, 1.0, 1.5]
    P.alpha_sweeps({"TA": (flat, [80, 80, 80, 70]), "TAK": (flat, [1, 2, 3, 4])}, tmp_path / "s.png", title="t",
                   marks={"TA": 1.0})  # a tie: the protocol chose 1.0, not the first maximum
    assert [(x, m) for x, m in saved[0] if m == "*"] == [([1.0], "*")]
    with pytest.raises(ValueError, match=r"marks\['TA'\] = 0.7 is not among the curve's alphas"):
        P.alpha_sweeps({"TA": (flat, flat)}, tmp_path / "s.png", title="t", marks={"TA": 0.7})


def test_plots_reject_bad_data(tmp_path):
    with pytest.raises(ValueError, match="expected"):
        P.disentanglement_heatmap(torch.zeros(2, 2), [0, 1, 2], [0, 1], tmp_path / "x.png")
    with pytest.raises(ValueError, match="no groups"):
        P.histograms({}, tmp_path / "h.png", title="t", xlabel="x")
    with pytest.raises(ValueError, match="empty"):
        P.histograms({"a": []}, tmp_path / "h.png", title="t", xlabel="x")
    with pytest.raises(ValueError, match="2 alphas but 3"):
        P.alpha_sweeps({"a": ([0, 1], [1, 2, 3])}, tmp_path / "s.png", title="t")
    assert not list(tmp_path.iterdir())


# ----------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------

def test_markdown_table_formats_numbers_and_missing_cells():
    rows = [{"method": "TA", "avg": 71.2345, "n": 8},
            {"method": "TAK|reg", "avg": torch.tensor(83.96), "extra": None},
            {"method": "none", "avg": float("nan"), "n": 3}]
    assert markdown_table(rows).splitlines() == [
        "| method | avg | n | extra |",
        "|---|---:|---:|---|",
        "| TA | 71.2 | 8 |  |",
        "| TAK\\|reg | 84.0 |  |  |",
        "| none | nan | 3 |  |",
    ]
    assert markdown_table(rows, columns=["n", "avg"], floatfmt=".3f").splitlines()[2] == "| 8 | 71.234 |"
    with pytest.raises(ValueError):
        markdown_table([])


def test_report_renders_and_writes_atomically(tmp_path, monkeypatch):
    out = tmp_path / "out"
    fig = P.alpha_sweeps({"TA": ([0, 1], [1, 2])}, out / "figs" / "sweep.png", title="t")
    other = tmp_path / "elsewhere" / "my fig.png"
    r = (Report("Task addition")
         .section("Accuracy", "Absolute accuracy (%) of the merged model.")
         .table([{"method": "TA", "acc": 70.04}, {"method": "TAK", "acc": 80.96}], caption="Table 1")
         .image(fig, "α sweep")
         .image(other, "another [one]"))
    path = r.write(out / "report.md")
    assert path == out / "report.md"
    assert path.read_text(encoding="utf-8").splitlines() == [
        "# Task addition",
        "",
        "## Accuracy",
        "",
        "Absolute accuracy (%) of the merged model.",
        "",
        "*Table 1*",
        "",
        "| method | acc |",
        "|---|---:|",
        "| TA | 70.0 |",
        "| TAK | 81.0 |",
        "",
        "![α sweep](figs/sweep.png)",
        "",
        "*α sweep*",
        "",
        "![another (one)](<../elsewhere/my fig.png>)",
        "",
        "*another [one]*",
    ]
    assert sorted(os.listdir(out)) == ["figs", "report.md"]

    # a failed write leaves the previous report intact and no temporary file behind
    before = path.read_bytes()

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        Report("Other").section("x").write(path)
    assert path.read_bytes() == before
    assert sorted(os.listdir(out)) == ["figs", "report.md"]
