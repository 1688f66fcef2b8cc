"""Each Numba kernel against its slow NumPy reference, on random inputs (hypothesis)."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import nnls

from sbsampler import kernels
from reference import ecdf_ref, es_order_ref, inclusion_probabilities_ref, omp_ref, outer_norms_ref

SETTINGS = settings(max_examples=60, deadline=None)

floats = st.floats(-1e3, 1e3, allow_nan=False, width=32)


@SETTINGS
@given(st.lists(floats, max_size=60), st.lists(floats, min_size=1, max_size=40))
def test_ecdf_matches_reference(history, losses):
    hist, loss = np.array(history, dtype=np.float64), np.array(losses, dtype=np.float64)
    np.testing.assert_allclose(kernels.ecdf(hist, loss), ecdf_ref(hist, loss))


@SETTINGS
@given(st.integers(0, 2**32 - 1), st.integers(1, 40), st.data())
def test_sample_without_replacement_matches_brute_force(seed, b, data):
    rng = np.random.default_rng(seed)
    w = rng.random(b) * (rng.random(b) > 0.2)  # some zero weights
    u = 1.0 - rng.random(b)
    k = data.draw(st.integers(1, b))
    got = kernels.sample_without_replacement(w, u, k)
    assert got.dtype == np.int64 and len(set(got.tolist())) == k
    np.testing.assert_array_equal(got, es_order_ref(w, u, k))


def test_sample_without_replacement_has_successive_sampling_law():
    # Inclusion frequencies of the kernel agree with numpy's successive sampling.
    w = np.array([5.0, 3.0, 1.0, 1.0, 0.5, 0.0])
    rng = np.random.default_rng(0)
    n, k = 20000, 2
    ours = np.zeros(w.size)
    ref = np.zeros(w.size)
    for _ in range(n):
        ours[kernels.sample_without_replacement(w, 1.0 - rng.random(w.size), k)] += 1
        ref[rng.choice(w.size, size=k, replace=False, p=w / w.sum())] += 1
    np.testing.assert_allclose(ours / n, ref / n, atol=0.015)
    assert ours[-1] == 0  # zero weight, never drawn while positive weights remain


@SETTINGS
@given(st.integers(0, 2**32 - 1), st.integers(1, 50), st.data())
def test_inclusion_probabilities_match_bisection(seed, b, data):
    rng = np.random.default_rng(seed)
    p = rng.random(b) ** 3 + 1e-6
    k = data.draw(st.integers(1, b))
    pi = kernels.inclusion_probabilities(p, k)
    assert pi.max() <= 1.0 + 1e-12
    np.testing.assert_allclose(pi.sum(), k)
    np.testing.assert_allclose(pi, inclusion_probabilities_ref(p, k), atol=1e-9)


@SETTINGS
@given(st.integers(0, 2**32 - 1), st.integers(1, 30), st.data())
def test_systematic_sample_has_exact_inclusion_probabilities(seed, b, data):
    rng = np.random.default_rng(seed)
    k = data.draw(st.integers(1, b))
    pi = kernels.inclusion_probabilities(rng.random(b) + 0.05, k)
    order = rng.permutation(b).astype(np.int64)
    grid = (np.arange(4000) + 0.5) / 4000  # integrate over u in [0, 1)
    freq = np.zeros(b)
    for u in grid:
        s = kernels.systematic_sample(pi, order, u)
        assert s.shape == (k,) and len(set(s.tolist())) == k
        freq[s] += 1
    np.testing.assert_allclose(freq / grid.size, pi, atol=2e-3)


def _atoms(seed: int, b: int, dim: int):
    rng = np.random.default_rng(seed)
    atoms = rng.standard_normal((dim, b)) + 0.3  # mostly positively correlated, like gradients
    target = atoms.mean(axis=1)
    return atoms, target


@SETTINGS
@given(st.integers(0, 2**32 - 1), st.integers(2, 25), st.booleans(), st.data())
def test_omp_gram_matches_explicit_omp(seed, b, nonneg, data):
    dim = data.draw(st.integers(b, 3 * b))  # full column rank: the path is unique
    atoms, target = _atoms(seed, b, dim)
    k = data.draw(st.integers(1, b))
    gram = atoms.T @ atoms
    chosen, w, explained = kernels.omp_gram(gram, atoms.T @ target, k, nonneg, 0.0)
    ref_chosen, ref_w = omp_ref(atoms, target, k, nonneg)
    np.testing.assert_array_equal(chosen, ref_chosen)
    np.testing.assert_allclose(w, ref_w, rtol=1e-6, atol=1e-9)
    proj = atoms[:, chosen] @ w
    np.testing.assert_allclose(explained, proj @ proj, rtol=1e-6, atol=1e-12)


def test_omp_gram_matches_explicit_omp_on_a_larger_batch():
    # Many steps, so many columns are retired (swapped out) along the way.
    atoms, target = _atoms(11, 300, 400)
    chosen, w, _ = kernels.omp_gram(atoms.T @ atoms, atoms.T @ target, 120, True, 0.0)
    ref_chosen, ref_w = omp_ref(atoms, target, 120, True)
    np.testing.assert_array_equal(chosen, ref_chosen)
    np.testing.assert_allclose(w, ref_w, rtol=1e-6, atol=1e-9)


def test_omp_gram_breaks_ties_by_lowest_index():
    # Every atom appears twice: equal correlations, and the copy of a chosen atom is dependent.
    base, _ = _atoms(2, 20, 60)
    copy_of = np.random.default_rng(0).permutation(40) % 20  # atom i is a copy of base atom copy_of[i]
    atoms = base[:, copy_of]
    gram = (base.T @ base)[np.ix_(copy_of, copy_of)]  # exactly equal rows for copies
    chosen, _, _ = kernels.omp_gram(gram, gram.mean(axis=1), 15, True, 0.0)
    ref_chosen, _ = omp_ref(atoms, atoms.mean(axis=1), 15, True)
    np.testing.assert_array_equal(chosen, ref_chosen)
    first = {int(np.flatnonzero(copy_of == j).min()) for j in range(20)}
    assert set(chosen.tolist()) <= first  # the lower-index copy every time


@SETTINGS
@given(st.integers(0, 2**32 - 1), st.integers(1, 30), st.integers(1, 70), st.integers(0, 70), st.booleans(),
       st.sampled_from([np.float32, np.float64]))
def test_outer_norms_matches_explicit_outer_products(seed, b, c, d, bias, dtype):
    rng = np.random.default_rng(seed)
    e = rng.standard_normal((b, c)).astype(dtype)
    h = (rng.standard_normal((b, d)) * 10).astype(dtype)
    np.testing.assert_allclose(kernels.outer_norms(e, h, bias), outer_norms_ref(e, h, bias), rtol=1e-5, atol=1e-12)


def test_omp_gram_float32_agrees_with_float64():
    atoms, target = _atoms(3, 200, 600)
    gram = atoms.T @ atoms
    c64, w64, e64 = kernels.omp_gram(gram, atoms.T @ target, 50, True, 0.0)
    c32, w32, e32 = kernels.omp_gram(gram.astype(np.float32), atoms.T @ target, 50, True, 0.0)
    assert len(set(c64.tolist()) & set(c32.tolist())) >= 45
    np.testing.assert_allclose(e32, e64, rtol=1e-3)


def test_omp_gram_ridge_equals_augmented_atoms():
    # Ridge on the chosen atoms == OMP where atom i gains its own extra coordinate sqrt(ridge).
    atoms, target = _atoms(5, 12, 30)
    ridge = 0.7
    chosen, w, _ = kernels.omp_gram(atoms.T @ atoms, atoms.T @ target, 6, False, ridge)
    sub = atoms[:, chosen]
    w_ref = np.linalg.solve(sub.T @ sub + ridge * np.eye(len(chosen)), sub.T @ target)
    np.testing.assert_allclose(w, w_ref, rtol=1e-8)


def test_omp_gram_stops_when_target_is_matched():
    atoms, _ = _atoms(1, 10, 4)  # rank 4: four atoms span the target exactly
    target = atoms.mean(axis=1)
    chosen, w, explained = kernels.omp_gram(atoms.T @ atoms, atoms.T @ target, 10, False, 0.0)
    assert len(chosen) == 4
    np.testing.assert_allclose(explained, target @ target, rtol=1e-9)


@SETTINGS
@given(st.integers(0, 2**32 - 1), st.integers(1, 20))
def test_nnls_gram_matches_scipy(seed, m):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((m + 5, m))
    t = rng.standard_normal(m + 5)
    w = kernels.nnls_gram(a.T @ a, a.T @ t, np.zeros(m), 5000, 1e-12)
    ref, _ = nnls(a, t)
    assert (w >= 0).all()
    obj = lambda v: np.sum((a @ v - t) ** 2)  # noqa: E731
    assert obj(w) <= obj(ref) + 1e-8 * max(1.0, obj(ref))


def test_row_means_and_gather_gram():
    g = np.random.default_rng(0).random((7, 7)).astype(np.float32)
    np.testing.assert_allclose(kernels.row_means(g), g.astype(np.float64).mean(axis=1), rtol=1e-6)
    idx = np.array([4, 1, 6], dtype=np.int64)
    np.testing.assert_array_equal(kernels.gather_gram(g, idx, 0.5), g[np.ix_(idx, idx)] + 0.5 * np.eye(3))


@pytest.mark.parametrize("k", [1, 3])
def test_ecdf_empty_history_keeps_everything(k):
    assert (kernels.ecdf(np.zeros(0), np.arange(k, dtype=np.float64)) == 1).all()
