"""Post-hoc merges (tak.arithmetic.merges) against naive references of the papers' definitions.

The references are written independently of the production code: NumPy instead of torch, loops
over entries for TIES, and polar factors through the eigendecomposition of the Gram matrix,
``A (AᵀA)^{-1/2}`` (or ``(AAᵀ)^{-1/2} A`` for wide A), instead of an SVD.
"""
import math

import numpy as np
import pytest
import torch

from tak.arithmetic import merges as M
from tak.arithmetic.merges import MERGES, iso_c, iso_cts, merge, task_arithmetic, ties, tsv_m

SHAPES = {"w": (7, 5), "wide": (4, 9), "row": (1, 6), "col": (3, 1), "bias": (5,), "scale": (), "conv": (3, 2, 2)}
MATRIX_KEYS = [k for k, s in SHAPES.items() if len(s) == 2]
OTHER_KEYS = [k for k, s in SHAPES.items() if len(s) != 2]
ATOL = 1e-10


def rand_taus(T, seed, shapes=SHAPES, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [{k: torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for k, s in shapes.items()}
            for _ in range(T)]


def np_taus(taus, key):
    return [tau[key].double().numpy() for tau in taus]


def assert_close(x, ref, atol=ATOL):
    ref = np.asarray(ref, dtype=np.float64)
    x = x.double().numpy()
    assert x.shape == ref.shape
    assert np.abs(x - ref).max(initial=0.0) <= atol * max(1.0, np.abs(ref).max(initial=0.0)), (x, ref)


def inv_sqrt_psd(G):
    w, Q = np.linalg.eigh(G)
    assert w.min() > 1e-8 * w.max(), "reference polar factor needs a full-rank argument"
    return (Q / np.sqrt(w)) @ Q.T


def polar_ref(A):
    """Polar factor through the Gram matrix (no SVD)."""
    m, r = A.shape
    return A @ inv_sqrt_psd(A.T @ A) if r <= m else inv_sqrt_psd(A @ A.T) @ A


def top_triplets(X, r):
    U, s, Vt = np.linalg.svd(X, full_matrices=False)
    return U[:, :r], s[:r], Vt[:r].T


# ----------------------------------------------------------------------------------------------
# references


def ties_ref(taus, key, k):
    """Loops over entries: trim, elect by total mass (zero -> majority sign), disjoint mean."""
    vals = [[float(v) for v in tau[key].double().reshape(-1)] for tau in taus]
    n, T = len(vals[0]), len(vals)
    if n == 0:
        return np.zeros(tuple(taus[0][key].shape))
    n_keep = max(1, math.ceil(round(k * n, 9)))
    trimmed = []
    for row in vals:
        mags = sorted((abs(v) for v in row), reverse=True)
        thr = mags[n_keep - 1]
        trimmed.append([v if abs(v) >= thr else 0.0 for v in row])
    elected = []
    for j in range(n):
        tot = sum(trimmed[t][j] for t in range(T))
        elected.append((tot > 0) - (tot < 0))
    maj = sum(elected)
    maj = (maj > 0) - (maj < 0)
    out = []
    for j in range(n):
        e = elected[j] if elected[j] != 0 else maj
        picked = [trimmed[t][j] for t in range(T) if trimmed[t][j] != 0 and (trimmed[t][j] > 0) == (e > 0) and e != 0]
        out.append(sum(picked) / len(picked) if picked else 0.0)
    return np.array(out).reshape(tuple(taus[0][key].shape))


def tsv_ref(taus, key):
    Xs = np_taus(taus, key)
    if Xs[0].ndim != 2:
        return sum(Xs) / len(Xs)
    T, d = len(Xs), min(Xs[0].shape)
    r = max(1, d // T)
    parts = [top_triplets(X, r) for X in Xs]
    U = np.concatenate([p[0] for p in parts], axis=1)
    s = np.concatenate([p[1] for p in parts])
    V = np.concatenate([p[2] for p in parts], axis=1)
    return polar_ref(U) @ np.diag(s) @ polar_ref(V).T


def iso_c_ref(taus, key):
    Xs = np_taus(taus, key)
    if Xs[0].ndim != 2:
        return sum(Xs) / len(Xs)
    Msum = sum(Xs)
    sbar = np.linalg.norm(Msum, "nuc") / min(Msum.shape)
    return sbar * polar_ref(Msum)


def iso_cts_ref(taus, key, k, s, sigma="combined"):
    """Iso-CTS with given common size k and per-task size s."""
    Xs = np_taus(taus, key)
    if Xs[0].ndim != 2:
        return sum(Xs) / len(Xs)
    Msum = sum(Xs)
    Uc, sc, Vc = top_triplets(Msum, k)
    Us, ss, Vs = [Uc], [sc], [Vc]
    for X in Xs:
        proj = X - Uc @ (Uc.T @ X)
        u, sv, v = top_triplets(proj, s)
        Us.append(u), ss.append(sv), Vs.append(v)
    spectrum = np.concatenate(ss)
    assert len(spectrum) == min(Msum.shape)
    sbar = spectrum.mean() if sigma == "combined" else np.linalg.norm(Msum, "nuc") / min(Msum.shape)
    return sbar * polar_ref(np.concatenate(Us, axis=1)) @ polar_ref(np.concatenate(Vs, axis=1)).T


# ----------------------------------------------------------------------------------------------
# task arithmetic


@pytest.mark.parametrize("T", [1, 3])
def test_task_arithmetic_is_the_sum(T):
    taus = rand_taus(T, seed=1)
    out = task_arithmetic(taus)
    assert list(out) == list(SHAPES)
    for key in SHAPES:
        acc = np.zeros(SHAPES[key])
        for x in np_taus(taus, key):
            acc = acc + x
        assert_close(out[key], acc)


# ----------------------------------------------------------------------------------------------
# TIES


@pytest.mark.parametrize("T,k", [(1, 0.2), (3, 0.2), (4, 0.5), (2, 1.0), (5, 0.05)])
def test_ties_matches_entrywise_reference(T, k):
    taus = rand_taus(T, seed=10 + T)
    out = ties(taus, k=k)
    for key in SHAPES:
        assert_close(out[key], ties_ref(taus, key, k))


def test_ties_with_sign_conflicts_matches_reference():
    # small integers: many exact ties in magnitude and in the sign sum
    g = torch.Generator().manual_seed(3)
    taus = [{"w": torch.randint(-3, 4, (6, 7), generator=g).double(), "b": torch.randint(-2, 3, (9,), generator=g).double()}
            for _ in range(4)]
    for k in (0.1, 0.3, 0.75, 1.0):
        out = ties(taus, k=k)
        for key in ("w", "b"):
            assert_close(out[key], ties_ref(taus, key, k))


def test_ties_hand_example_election_and_disjoint_mean():
    taus = [{"v": torch.tensor([1.0, -2.0, 3.0, 0.0])},
            {"v": torch.tensor([2.0, 1.0, -3.0, 0.0])},
            {"v": torch.tensor([-4.0, 1.0, -1.0, 0.0])}]
    # sums (-1, 0, -1, 0): entry 1 sums to zero and takes the majority sign (-1)
    assert ties(taus, k=1.0)["v"].tolist() == [-4.0, -2.0, -2.0, 0.0]
    # entries agreeing with a positive elected sign are averaged, the others dropped
    taus = [{"v": torch.tensor([3.0, -1.0])}, {"v": torch.tensor([1.0, 4.0])}, {"v": torch.tensor([-2.0, 5.0])}]
    assert ties(taus, k=1.0)["v"].tolist() == [2.0, 4.5]


def test_ties_zero_sum_and_no_majority_gives_zero():
    taus = [{"v": torch.tensor([1.0, -2.0])}, {"v": torch.tensor([-1.0, 2.0])}]
    assert ties(taus, k=1.0)["v"].tolist() == [0.0, 0.0]


def test_ties_trim_keeps_every_entry_tied_with_the_threshold():
    tau = {"v": torch.tensor([3.0, -3.0, 1.0, 3.0, 0.5, 2.0])}  # k·n = 1.2 -> n_keep = 2, threshold 3
    assert ties([tau], k=0.2)["v"].tolist() == [3.0, -3.0, 0.0, 3.0, 0.0, 0.0]
    tau = {"v": torch.tensor([5.0, -3.0, 1.0, 3.0, 0.5, 2.0])}  # threshold 3: the two 3s tie
    assert ties([tau], k=0.2)["v"].tolist() == [5.0, -3.0, 0.0, 3.0, 0.0, 0.0]
    tau = {"v": torch.tensor([5.0, -4.0, 1.0, 3.0, 0.5, 2.0])}  # no tie: exactly 2 kept
    assert ties([tau], k=0.2)["v"].tolist() == [5.0, -4.0, 0.0, 0.0, 0.0, 0.0]


@pytest.mark.parametrize("n,k,expected", [(10, 0.7, 7), (10, 0.3, 3), (10, 0.25, 3), (7, 0.01, 1), (100, 0.29, 29),
                                          (100, 0.07, 7), (6, 1.0, 6)])  # 0.07 * 100 = 7.000000000000001 in floats
def test_ties_keeps_ceil_k_n_entries_exactly(n, k, expected):
    tau = {"v": torch.arange(1, n + 1, dtype=torch.float64) * torch.tensor([1.0, -1.0]).repeat(n)[:n]}
    for given in (k, np.float32(k), np.float64(k)):  # a float32 0.2 is 1/5, not 0.20000000298...
        assert int((ties([tau], k=given)["v"] != 0).sum()) == expected


def test_ties_single_task_is_the_trimmed_vector():
    (tau,) = rand_taus(1, seed=4)
    out = ties([tau], k=0.4)
    for key, x in tau.items():
        flat = x.reshape(-1)
        n_keep = max(1, math.ceil(round(0.4 * flat.numel(), 9)))
        keep = flat.abs() >= flat.abs().sort(descending=True).values[n_keep - 1]
        assert torch.equal(out[key].reshape(-1), torch.where(keep, flat, torch.zeros_like(flat)))


# ----------------------------------------------------------------------------------------------
# TSV-M


@pytest.mark.parametrize("T", [1, 2, 3, 4])
def test_tsv_m_matches_reference(T):
    taus = rand_taus(T, seed=20 + T)
    out = tsv_m(taus)
    for key in SHAPES:
        assert_close(out[key], tsv_ref(taus, key), atol=1e-9)


def test_tsv_m_single_task_is_identity():
    (tau,) = rand_taus(1, seed=5)
    out = tsv_m([tau])
    for key in SHAPES:
        assert_close(out[key], tau[key].numpy(), atol=1e-12)


@pytest.mark.parametrize("shape,T", [((7, 5), 2), ((9, 4), 4), ((6, 6), 3)])
def test_tsv_m_keeps_the_concatenated_spectrum(shape, T):
    # T·⌊d/T⌋ ≤ d: U_⊥ and V_⊥ have orthonormal columns, so the result's singular values are σ_cat
    taus = rand_taus(T, seed=7, shapes={"w": shape})
    r = max(1, min(shape) // T)
    s_cat = np.sort(np.concatenate([np.linalg.svd(x, compute_uv=False)[:r] for x in np_taus(taus, "w")]))[::-1]
    s_out = np.linalg.svd(tsv_m(taus)["w"].numpy(), compute_uv=False)
    assert np.allclose(s_out[:len(s_cat)], s_cat, atol=1e-10)
    assert np.allclose(s_out[len(s_cat):], 0.0, atol=1e-10)


def test_polar_factor_is_orthonormal_and_fixes_orthonormal_input():
    g = torch.Generator().manual_seed(8)
    for shape in [(7, 3), (3, 7), (5, 5), (1, 4), (4, 1)]:
        A = torch.randn(shape, generator=g, dtype=torch.float64)
        P = M._polar(A)
        gram = P.T @ P if shape[0] >= shape[1] else P @ P.T
        assert torch.allclose(gram, torch.eye(min(shape), dtype=torch.float64), atol=1e-12)
        assert_close(P, polar_ref(A.numpy()), atol=1e-12)
        assert torch.allclose(M._polar(P), P, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# Iso-C


@pytest.mark.parametrize("T", [1, 2, 5])
def test_iso_c_matches_reference(T):
    taus = rand_taus(T, seed=30 + T)
    out = iso_c(taus)
    for key in SHAPES:
        assert_close(out[key], iso_c_ref(taus, key), atol=1e-9)


@pytest.mark.parametrize("key", MATRIX_KEYS)
def test_iso_c_spectrum_is_flat_with_the_sum_of_singular_values(key):
    taus = rand_taus(3, seed=9)
    Msum = sum(np_taus(taus, key))
    d = min(Msum.shape)
    s_out = np.linalg.svd(iso_c(taus)[key].numpy(), compute_uv=False)
    assert len(s_out) == d
    assert np.allclose(s_out, np.linalg.norm(Msum, "nuc") / d, atol=1e-10)
    assert abs(s_out.sum() - np.linalg.svd(Msum, compute_uv=False).sum()) < 1e-10


def test_iso_c_rank_deficient_sum_spreads_the_nuclear_norm_over_all_d_directions():
    g = torch.Generator().manual_seed(10)
    taus = [{"w": torch.randn(6, 1, generator=g, dtype=torch.float64) @ torch.randn(1, 4, generator=g, dtype=torch.float64)}
            for _ in range(2)]  # M has rank 2 < d = 4
    Msum = sum(np_taus(taus, "w"))
    assert np.linalg.matrix_rank(Msum) == 2
    s_out = np.linalg.svd(iso_c(taus)["w"].numpy(), compute_uv=False)
    assert np.allclose(s_out, np.linalg.norm(Msum, "nuc") / 4, atol=1e-10)


def test_iso_c_of_a_vector_shaped_matrix_is_the_sum():
    taus = rand_taus(4, seed=11, shapes={"row": (1, 6), "col": (3, 1)})
    out = iso_c(taus)
    for key in ("row", "col"):  # d = 1: the spectrum is already flat
        assert_close(out[key], sum(np_taus(taus, key)), atol=1e-12)


# ----------------------------------------------------------------------------------------------
# Iso-CTS


@pytest.mark.parametrize("d,T,frac,expected", [
    (5, 3, 0.8, (5, 0)),      # (5-4)/3 rounds to 0: all common
    (5, 2, 0.4, (1, 2)),      # 3/2 = 1.5 rounds to even 2
    (7, 3, 0.5, (4, 1)),      # 4/3 -> 1, common grows to 4
    (10, 4, 0.0, (2, 2)),     # 2.5 -> 2
    (3, 4, 0.0, (3, 0)),      # 0.75 -> 1 would need 4 > 3 directions
    (9, 4, 0.0, (1, 2)),      # 9/4 = 2.25 -> 2
    (20, 8, 0.8, (20, 0)),    # 0.5 -> 0
    (768, 8, 0.8, (616, 19)),
    (6, 1, 0.5, (3, 3)),
    (4, 2, 1.0, (4, 0)),
])
def test_iso_cts_sizes(d, T, frac, expected):
    k, s = M._cts_sizes(d, T, M._fraction(frac, "common_fraction", low_open=False))
    assert (k, s) == expected
    assert k + s * T == d


@pytest.mark.parametrize("T,frac", [(1, 0.5), (2, 0.4), (3, 0.5), (2, 0.0), (3, 0.8)])
@pytest.mark.parametrize("sigma", ["combined", "sum"])
def test_iso_cts_matches_reference(T, frac, sigma):
    taus = rand_taus(T, seed=40 + T)
    out = iso_cts(taus, common_fraction=frac, sigma=sigma)
    checked = 0
    for key in SHAPES:
        if key in MATRIX_KEYS:
            k, s = M._cts_sizes(min(SHAPES[key]), T, M._fraction(frac, "common_fraction", low_open=False))
            checked += s > 0
            ref = iso_cts_ref(taus, key, k, s, sigma)
        else:
            ref = iso_cts_ref(taus, key, 0, 0)
        assert_close(out[key], ref, atol=1e-9)
    if T > 1 and frac < 0.8:
        assert checked > 0  # the task-specific branch was exercised


@pytest.mark.parametrize("key", ["w", "wide"])
def test_iso_cts_spectrum_is_flat(key):
    taus = rand_taus(2, seed=12)
    d = min(SHAPES[key])
    k, s = M._cts_sizes(d, 2, M._fraction(0.4, "common_fraction", low_open=False))
    assert s > 0
    Msum = sum(np_taus(taus, key))
    Uc, sc, _ = top_triplets(Msum, k)
    spectrum = list(sc)
    for x in np_taus(taus, key):
        spectrum += list(np.linalg.svd(x - Uc @ (Uc.T @ x), compute_uv=False)[:s])
    s_out = np.linalg.svd(iso_cts(taus, common_fraction=0.4)[key].numpy(), compute_uv=False)
    assert len(s_out) == d
    assert np.allclose(s_out, np.mean(spectrum), atol=1e-10)
    s_sum = np.linalg.svd(iso_cts(taus, common_fraction=0.4, sigma="sum")[key].numpy(), compute_uv=False)
    assert np.allclose(s_sum, np.linalg.norm(Msum, "nuc") / d, atol=1e-10)


def test_iso_cts_keeps_the_common_subspace():
    taus = rand_taus(3, seed=13, shapes={"w": (11, 6)})
    k, s = M._cts_sizes(6, 3, M._fraction(0.5, "common_fraction", low_open=False))
    assert (k, s) == (3, 1)
    Uc, _, _ = top_triplets(sum(np_taus(taus, "w")), k)
    R = iso_cts(taus, common_fraction=0.5)["w"].numpy()
    Q, _, _ = np.linalg.svd(R, full_matrices=False)  # 6-dim column space of the result in R^11
    assert np.abs(Uc - Q @ (Q.T @ Uc)).max() < 1e-10


def test_iso_cts_with_all_common_equals_iso_c():
    taus = rand_taus(3, seed=14)
    a, b = iso_cts(taus, common_fraction=1.0), iso_c(taus)
    for key in SHAPES:
        assert_close(a[key], b[key].numpy(), atol=1e-10)


# ----------------------------------------------------------------------------------------------
# non-matrix tensors, dtypes, devices, inputs


@pytest.mark.parametrize("name", ["tsv_m", "iso_c", "iso_cts"])
def test_non_matrix_tensors_are_averaged(name):
    taus = rand_taus(3, seed=15)
    out = merge(name, taus)
    for key in OTHER_KEYS:
        assert_close(out[key], sum(np_taus(taus, key)) / 3, atol=1e-12)


@pytest.mark.parametrize("name", ["tsv_m", "iso_c", "iso_cts"])
def test_matrix_filter_sends_matrices_to_the_mean(name):
    taus = rand_taus(3, seed=16)
    out = merge(name, taus, matrix_filter=lambda key, t: key != "w")
    assert_close(out["w"], sum(np_taus(taus, "w")) / 3, atol=1e-12)
    assert_close(out["wide"], merge(name, taus)["wide"].numpy(), atol=1e-12)


@pytest.mark.parametrize("name", list(MERGES))
def test_all_zero_task_vectors_give_zero(name):
    taus = [{k: torch.zeros(s, dtype=torch.float64) for k, s in SHAPES.items()} for _ in range(3)]
    for T in (1, 3):
        out = merge(name, taus[:T])
        for key, s in SHAPES.items():
            assert out[key].shape == s and torch.equal(out[key], torch.zeros(s, dtype=torch.float64)), (key, out[key])


@pytest.mark.parametrize("name", list(MERGES))
def test_one_zero_task_among_others_is_finite(name):
    taus = rand_taus(3, seed=17)
    taus[1] = {k: torch.zeros_like(v) for k, v in taus[1].items()}
    out = merge(name, taus)
    assert all(torch.isfinite(v).all() for v in out.values())


@pytest.mark.parametrize("name", list(MERGES))
def test_empty_tensors(name):
    taus = [{"e": torch.zeros(0, 4), "b": torch.zeros(0)} for _ in range(2)]
    out = merge(name, taus)
    assert out["e"].shape == (0, 4) and out["b"].shape == (0,)


@pytest.mark.parametrize("name", list(MERGES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision_inputs_keep_their_dtype_and_are_computed_in_fp32(name, dtype):
    taus = rand_taus(3, seed=18, dtype=dtype)
    out = merge(name, taus)
    ref = merge(name, [{k: v.float() for k, v in tau.items()} for tau in taus])
    for key in SHAPES:
        assert out[key].dtype == dtype and out[key].device == taus[0][key].device
        assert torch.equal(out[key], ref[key].to(dtype))
        assert ref[key].dtype == torch.float32


@pytest.mark.parametrize("name", list(MERGES))
def test_float32_is_close_to_float64(name):
    taus = rand_taus(3, seed=19)
    out64 = merge(name, taus)
    out32 = merge(name, [{k: v.float() for k, v in tau.items()} for tau in taus])
    for key in SHAPES:
        assert torch.allclose(out32[key].double(), out64[key], atol=1e-4, rtol=1e-4), key


@pytest.mark.parametrize("name", list(MERGES))
def test_inputs_are_not_modified_and_not_aliased(name):
    taus = rand_taus(2, seed=21)
    for tau in taus:
        for v in tau.values():
            v.requires_grad_(True)
    before = [{k: v.detach().clone() for k, v in tau.items()} for tau in taus]
    out = merge(name, taus)
    for tau, b in zip(taus, before):
        for key in SHAPES:
            assert torch.equal(tau[key].detach(), b[key])
    for key, v in out.items():
        assert not v.requires_grad
        for tau in taus:
            assert v.data_ptr() != tau[key].data_ptr() or v.numel() == 0
        v.add_(1.0)  # writable, independent of the inputs
    assert all(torch.equal(tau["w"].detach(), b["w"]) for tau, b in zip(taus, before))


def test_task_vector_objects_are_accepted():
    class TV:
        def __init__(self, tensors):
            self.tensors = tensors

    taus = rand_taus(2, seed=22)
    a, b = ties([TV(t) for t in taus], k=0.5), ties(taus, k=0.5)
    assert all(torch.equal(a[k], b[k]) for k in SHAPES)


def test_merge_dispatches_with_options():
    taus = rand_taus(3, seed=23)
    a, b = merge("ties", taus, k=0.5), ties(taus, k=0.5)
    c = ties(taus, k=0.2)
    assert all(torch.equal(a[k], b[k]) for k in SHAPES)
    assert not all(torch.equal(a[k], c[k]) for k in SHAPES)
    a = merge("iso_cts", taus, common_fraction=0.3)
    assert all(torch.equal(a[k], iso_cts(taus, 0.3)[k]) for k in SHAPES)
    assert set(MERGES) == {"task_arithmetic", "ties", "tsv_m", "iso_c", "iso_cts"}


# ----------------------------------------------------------------------------------------------
# errors


def test_unknown_merge_name_lists_the_valid_ones():
    with pytest.raises(ValueError) as e:
        merge("tiez", rand_taus(2, seed=0))
    for name in MERGES:
        assert name in str(e.value)
    assert "tiez" in str(e.value)


@pytest.mark.parametrize("name", list(MERGES))
def test_empty_list(name):
    with pytest.raises(ValueError, match="taus is empty"):
        merge(name, [])


@pytest.mark.parametrize("name", list(MERGES))
def test_a_single_mapping_instead_of_a_list(name):
    with pytest.raises(TypeError, match="taus must be a sequence"):
        merge(name, rand_taus(1, seed=0)[0])


@pytest.mark.parametrize("name", list(MERGES))
def test_different_keys_are_named(name):
    taus = rand_taus(3, seed=0)
    taus[2] = {("extra_key" if k == "bias" else k): v for k, v in taus[2].items()}
    with pytest.raises(ValueError, match=r"taus\[2\] has different keys.*missing \['bias'\].*extra \['extra_key'\]"):
        merge(name, taus)
    del taus[1]["w"]
    with pytest.raises(ValueError, match=r"taus\[1\] has different keys than taus\[0\]: missing \['w'\]$"):
        merge(name, taus)


@pytest.mark.parametrize("name", list(MERGES))
def test_different_shapes_are_named(name):
    taus = rand_taus(2, seed=0)
    taus[1]["wide"] = torch.zeros(9, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"taus\[1\]\['wide'\] has shape \(9, 4\) but taus\[0\]\['wide'\] has shape \(4, 9\)"):
        merge(name, taus)


@pytest.mark.parametrize("name", list(MERGES))
def test_non_float_and_non_tensor_values(name):
    with pytest.raises(TypeError, match=r"taus\[0\]\['v'\] has dtype torch.int64"):
        merge(name, [{"v": torch.arange(3)}])
    with pytest.raises(TypeError, match=r"taus\[1\]\['v'\] must be a torch.Tensor"):
        merge(name, [{"v": torch.ones(3)}, {"v": [1.0, 2.0, 3.0]}])
    with pytest.raises(TypeError, match=r"taus\[1\] must be a mapping"):
        merge(name, [{"v": torch.ones(3)}, torch.ones(3)])


@pytest.mark.parametrize("k", [0, 0.0, -0.1, 1.0001, 2, float("nan"), float("inf")])
def test_ties_k_out_of_range(k):
    with pytest.raises(ValueError, match=r"k must be in \(0, 1\]"):
        ties(rand_taus(2, seed=0), k=k)


def test_ties_k_type_and_valid_edges():
    with pytest.raises(TypeError, match="k must be a real number"):
        ties(rand_taus(2, seed=0), k="0.2")
    with pytest.raises(TypeError, match="k must be a real number"):
        ties(rand_taus(2, seed=0), k=True)
    ties(rand_taus(2, seed=0), k=1)
    ties(rand_taus(2, seed=0), k=1e-9)


def test_iso_cts_option_errors():
    taus = rand_taus(2, seed=0)
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"common_fraction must be in \[0, 1\]"):
            iso_cts(taus, common_fraction=bad)
    with pytest.raises(ValueError, match="sigma must be 'combined' or 'sum'"):
        iso_cts(taus, sigma="mean")
    with pytest.raises(TypeError, match="matrix_filter must be a callable"):
        iso_c(taus, matrix_filter="w")
