"""The torch-op selection path (``sbsampler.ondevice``, ``Strategy.select_tensors``) against the Numba path.

Kernels: the same random numbers in, the same result out (hypothesis). Strategies: the
same law (inclusion frequencies, unbiased weights) from their own streams, on CPU tensors.
"""

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import sbsampler as sb
from sbsampler import kernels, ondevice
from reference import make_scores

SETTINGS = settings(max_examples=60, deadline=None)
floats = st.floats(-1e3, 1e3, allow_nan=False, width=32)


@SETTINGS
@given(st.lists(floats, max_size=60), st.lists(floats, min_size=1, max_size=40))
def test_ecdf_matches_the_kernel(history, losses):
    hist, loss = np.array(history, dtype=np.float64), np.array(losses, dtype=np.float64)
    got = ondevice.ecdf(torch.from_numpy(hist), torch.from_numpy(loss)).numpy()
    np.testing.assert_array_equal(got, kernels.ecdf(hist, loss))


@SETTINGS
@given(st.integers(0, 2**32 - 1), st.integers(1, 40), st.data())
def test_sample_without_replacement_matches_the_kernel(seed, b, data):
    rng = np.random.default_rng(seed)
    w = rng.random(b) * (rng.random(b) > 0.2)  # some zero weights
    u = 1.0 - rng.random(b)
    k = data.draw(st.integers(1, b))
    keys = np.sort(np.log(u[w > 0]) / w[w > 0])
    assume(np.all(np.diff(keys) > 1e-9 * (1 + np.abs(keys[1:]))))  # no near-ties for two log()s to order apart
    got = ondevice.sample_without_replacement(torch.from_numpy(w), torch.from_numpy(u), k)
    assert got.dtype == torch.int64
    np.testing.assert_array_equal(got.numpy(), kernels.sample_without_replacement(w, u, k))


@SETTINGS
@given(st.integers(0, 2**32 - 1), st.integers(1, 50), st.data())
def test_inclusion_probabilities_match_the_kernel(seed, b, data):
    rng = np.random.default_rng(seed)
    p = rng.random(b) ** data.draw(st.sampled_from([1, 3, 8])) + 1e-6  # the higher powers cap several
    k = data.draw(st.integers(1, b))
    got = ondevice.inclusion_probabilities(torch.from_numpy(p), k).numpy()
    assert got.max() <= 1.0 + 1e-12
    np.testing.assert_allclose(got, kernels.inclusion_probabilities(p, k), atol=1e-9)


def test_inclusion_probabilities_at_full_budget_are_ones():
    p = torch.tensor([0.5, 0.2, 0.2, 0.1], dtype=torch.float64)
    np.testing.assert_array_equal(ondevice.inclusion_probabilities(p, 4).numpy(), np.ones(4))


@SETTINGS
@given(st.integers(0, 2**32 - 1), st.integers(1, 50), st.data())
def test_systematic_sample_matches_the_kernel(seed, b, data):
    rng = np.random.default_rng(seed)
    k = data.draw(st.integers(1, b))
    pi = kernels.inclusion_probabilities(rng.random(b) ** 2 + 1e-3, k)
    order, u = rng.permutation(b), float(rng.random())
    got = ondevice.systematic_sample(torch.from_numpy(pi), torch.from_numpy(order), torch.tensor(u), k).numpy()
    np.testing.assert_array_equal(got, kernels.systematic_sample(pi, order, u))
    assert len(set(got.tolist())) == k


@SETTINGS
@given(st.lists(st.integers(0, 5), min_size=1, max_size=40), st.data())
def test_ranks_and_top_k_break_ties_by_position(values, data):
    loss = np.array(values, dtype=np.float64)
    rank = np.empty(loss.size, dtype=np.int64)
    rank[np.argsort(loss, kind="stable")] = np.arange(loss.size)
    np.testing.assert_array_equal(ondevice.ranks(torch.from_numpy(loss)).numpy(), rank)
    k = data.draw(st.integers(1, loss.size))
    np.testing.assert_array_equal(ondevice.top_k(torch.from_numpy(loss), k).numpy(),
                                  np.sort(np.argsort(-loss, kind="stable")[:k]))


# -- the strategies: the same law on both paths ---------------------------------------------------------------------

def _frequencies(draw, b, trials):
    counts, weight_sums = np.zeros(b), np.zeros(b)
    for _ in range(trials):
        idx, w = draw()
        idx, w = np.asarray(idx), np.asarray(w, dtype=np.float64)
        np.add.at(counts, idx, 1)
        np.add.at(weight_sums, idx, w)
    return counts / trials, weight_sums / trials


LAWS = [
    ("uniform", {}),
    ("sb", {"beta": 2.0}),
    ("sb", {"beta": 1.0, "unbiased": True}),
    ("sb", {"beta": 1.0, "mode": "bernoulli"}),
    ("sb", {"beta": 1.0, "mode": "bernoulli", "unbiased": True}),
    ("composer", {}),
    ("infobatch", {"prune": 0.5}),
]


@pytest.mark.parametrize("name,kwargs", LAWS, ids=[f"{n}-{k}" for n, k in LAWS])
def test_both_paths_follow_the_same_law(name, kwargs):
    """Inclusion frequencies and mean weights per sample agree between ``select`` and ``select_tensors``."""
    b, k, trials = 12, 4, 6000
    scores = make_scores(seed=3, b=b)
    history = np.random.default_rng(0).exponential(size=200)
    host, device = (sb.STRATEGIES[name](**kwargs, seed=s) for s in (1, 2))
    for s in (host, device):
        s.observe(history) if s.keeps_history else None
    arg = scores if host.needs_scores else b
    f_host, w_host = _frequencies(lambda: host.select(arg, k), b, trials)
    f_dev, w_dev = _frequencies(lambda: tuple(t.numpy() for t in device.select_tensors(arg, k)), b, trials)
    np.testing.assert_allclose(f_dev, f_host, atol=0.035)
    np.testing.assert_allclose(w_dev, w_host, atol=0.1 * w_host.max())  # about 5 standard errors


@pytest.mark.parametrize("name,kwargs", [("sb", {"unbiased": True}), ("sb", {"mode": "bernoulli", "unbiased": True}),
                                         ("infobatch", {"prune": 0.7})])
def test_unbiased_rules_stay_unbiased_on_device(name, kwargs):
    """``E[sum_i w_i l_i]`` is the batch's mean loss for the unbiased rules' torch path."""
    scores = make_scores(seed=5, b=16)
    s = sb.STRATEGIES[name](**kwargs, seed=0)
    s.observe(np.random.default_rng(1).exponential(size=100)) if s.keeps_history else None
    loss = scores.loss.numpy()
    estimates = [float((w * scores.loss[idx]).sum()) for idx, w in (s.select_tensors(scores, 5) for _ in range(8000))]
    assert np.mean(estimates) == pytest.approx(loss.mean(), rel=0.02)


def test_topk_and_full_agree_exactly_with_the_host_path():
    scores = make_scores(seed=7, b=30)
    for name in ("topk", "full"):
        s = sb.get_strategy(name, seed=0)
        idx, w = s.select_tensors(scores if s.needs_scores else 30, 9)
        ref = s.select(scores if s.needs_scores else 30, 9)
        np.testing.assert_array_equal(idx.numpy(), ref.indices)
        np.testing.assert_allclose(w.numpy(), ref.weights, rtol=1e-6)


def test_history_observed_as_tensors_stays_a_tensor_and_is_bounded():
    s = sb.SelectiveBackprop(history=5, seed=0)
    s.observe(torch.arange(3.0))
    s.observe(torch.arange(3.0, 7.0))
    assert isinstance(s._hist, torch.Tensor) and s._hist.dtype == torch.float64
    np.testing.assert_array_equal(s.recent_losses(), [2, 3, 4, 5, 6])
    s.observe(np.array([7.0]))  # arrays too, the host path's type
    np.testing.assert_array_equal(s.recent_losses(), [3, 4, 5, 6, 7])


def test_device_generator_state_round_trips_and_one_off_rng_leaves_it_alone():
    scores = make_scores(seed=2, b=40)
    a = sb.ComposerRule(seed=4)
    a.select_tensors(scores, 10)
    state = a.state_dict()
    assert set(state["device_rng"]) == {"cpu"}
    first = a.select_tensors(scores, 10)[0]
    b = sb.ComposerRule(seed=99)
    b.load_state_dict(state)
    torch.testing.assert_close(b.select_tensors(scores, 10)[0], first)
    # a one-off rng draws from its own generator; the strategy's stream is untouched
    before = b.device_generator("cpu").get_state().clone()
    b.select_tensors(scores, 10, rng=123)
    torch.testing.assert_close(b.device_generator("cpu").get_state(), before)
    torch.testing.assert_close(b.select_tensors(scores, 10, rng=123)[0], sb.ComposerRule().select_tensors(
        scores, 10, rng=123)[0])


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_select_tensors_is_loud_about_non_finite_losses(bad):
    scores = make_scores(seed=1, b=8)
    scores.loss[3] = bad
    with pytest.raises(ValueError, match=r"non-finite loss value\(s\) at batch positions \[3\]"):
        sb.get_strategy("sb", seed=0).select_tensors(scores, 2)


def test_select_tensors_argument_errors():
    scores = make_scores(seed=1, b=8)
    with pytest.raises(TypeError, match="no on-device rule"):
        sb.get_strategy("gradmatch").select_tensors(scores, 2)
    with pytest.raises(TypeError, match="pass Scores"):
        sb.get_strategy("topk").select_tensors(8, 2)
    with pytest.raises(ValueError, match=r"k must be in \[1, 8\]"):
        sb.get_strategy("topk").select_tensors(scores, 9)
    with pytest.raises(ValueError, match="empty batch"):
        sb.get_strategy("uniform").select_tensors(0, 1)
