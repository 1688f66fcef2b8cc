"""Selection strategies: each rule, its weights, its state and its input checks."""

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import sbsampler as sb
from reference import explicit_grads
from reference import make_scores as _make_scores
from sbsampler.strategies import budget

B, C, D = 64, 5, 12


def make_scores(seed=0, b=B, c=C, d=D, loss=None):
    return _make_scores(seed, b, c, d, loss)



def fit_residual(g, idx, w):
    target = g.mean(0)
    return np.linalg.norm(w @ g[idx] - target) / np.linalg.norm(target)


ALL = ["uniform", "topk", "sb", "gradmatch", "importance"]


@pytest.mark.parametrize("name", ALL)
def test_every_strategy_returns_k_weighted_indices(name):
    s = sb.get_strategy(name, seed=0)
    idx, w = s.select(make_scores(), 16)
    assert idx.dtype == np.int64 and w.dtype == np.float32
    assert idx.shape == w.shape == (16,)
    assert ((0 <= idx) & (idx < B)).all()
    assert np.isfinite(w).all() and (w >= 0).all()


@pytest.mark.parametrize("name", ALL)
def test_same_seed_same_selection_and_state_resumes(name):
    scores = [make_scores(i) for i in range(4)]
    a, b = sb.get_strategy(name, seed=7), sb.get_strategy(name, seed=7)
    for s in scores[:2]:
        ra, rb = a.select(s, 10), b.select(s, 10)
        np.testing.assert_array_equal(ra.indices, rb.indices)
        np.testing.assert_array_equal(ra.weights, rb.weights)
    saved = a.state_dict()
    fresh = sb.get_strategy(name, seed=123)
    fresh.load_state_dict(saved)
    for s in scores[2:]:
        ra, rf = a.select(s, 10), fresh.select(s, 10)
        np.testing.assert_array_equal(ra.indices, rf.indices)
        np.testing.assert_array_equal(ra.weights, rf.weights)


def test_uniform_is_default_and_unbiased():
    loader_default = sb.SelectiveLoader.__init__.__defaults__
    assert "uniform" in loader_default
    scores = make_scores(1)
    g = explicit_grads(scores)
    s = sb.Uniform(seed=0)
    n = 4000
    acc = np.zeros(g.shape[1])
    counts = np.zeros(B)
    for _ in range(n):
        idx, w = s.select(scores, 8)
        assert len(set(idx.tolist())) == 8
        np.testing.assert_allclose(w, 1 / 8)
        acc += w @ g[idx]
        counts[idx] += 1
    target = g.mean(0)
    # Monte-Carlo error of the mean estimate, relative to the target's size.
    assert np.linalg.norm(acc / n - target) < 0.1 * np.linalg.norm(target) + 0.05 * np.abs(g).mean()
    np.testing.assert_allclose(counts / n, 8 / B, atol=0.03)


def test_topk_returns_exactly_the_largest_losses():
    loss = torch.tensor([0.3, 2.0, 0.1, 5.0, 2.0, 0.0, 1.5])
    idx, w = sb.TopK().select(sb.Scores(loss=loss), 3)
    assert idx.tolist() == [1, 3, 4]
    np.testing.assert_allclose(w, 1 / 3)
    idx, _ = sb.TopK().select(sb.Scores(loss=loss), 2)  # tie at 2.0: the lower position wins
    assert idx.tolist() == [1, 3]
    rng = np.random.default_rng(0)
    big = torch.from_numpy(rng.random(500))
    idx, _ = sb.TopK().select(sb.Scores(loss=big), 50)
    assert set(idx.tolist()) == set(np.argsort(-big.numpy())[:50].tolist())


def test_gradmatch_beats_uniform_and_reports_true_residual():
    for seed in range(3):
        scores = make_scores(seed, b=128)
        g = explicit_grads(scores)
        sel = sb.GradientMatching(seed=0).select(scores, 16)
        assert (sel.weights >= 0).all()
        np.testing.assert_allclose(sel.residual, fit_residual(g, sel.indices, sel.weights.astype(np.float64)),
                                   rtol=1e-4)
        uni = [fit_residual(g, *sb.Uniform(seed=s).select(scores, 16)) for s in range(20)]
        assert sel.residual < 0.5 * np.median(uni)
        assert sel.residual < min(uni)


def test_gradmatch_full_budget_matches_exactly():
    scores = make_scores(2, b=20)
    sel = sb.GradientMatching().select(scores, 20)
    assert sel.residual < 1e-4
    assert sorted(sel.indices.tolist()) == list(range(20))


def test_gradmatch_signed_and_ridge():
    scores = make_scores(3, b=60)
    g = explicit_grads(scores)
    signed = sb.GradientMatching(nonneg=False).select(scores, 12)
    np.testing.assert_allclose(signed.residual, fit_residual(g, signed.indices, signed.weights.astype(np.float64)),
                               rtol=1e-4)
    nonneg = sb.GradientMatching().select(scores, 12)
    assert signed.residual <= nonneg.residual + 1e-6
    ridge = sb.GradientMatching(reg=10.0).select(scores, 12)
    assert np.abs(ridge.weights).sum() < np.abs(nonneg.weights).sum()


def test_gradmatch_fills_budget_when_pursuit_stops_early():
    # Rank-2 gradients: the mean is matched after 2 atoms, the other 8 are filled in.
    e = torch.zeros(30, 3, dtype=torch.float64)
    e[:, 0] = 1.0
    h = torch.zeros(30, 4, dtype=torch.float64)
    h[:, 0] = torch.linspace(0.5, 2.0, 30)
    scores = sb.Scores(loss=torch.ones(30), logit_grad=e, features=h)
    sel = sb.GradientMatching(seed=0).select(scores, 10)
    assert len(set(sel.indices.tolist())) == 10
    assert sel.residual < 1e-4  # the Gram is float32: ~1e-5 is its round-off floor


def test_gradmatch_all_zero_gradients():
    scores = sb.Scores(loss=torch.zeros(10), logit_grad=torch.zeros(10, 3), features=torch.ones(10, 2))
    sel = sb.GradientMatching(seed=0).select(scores, 4)
    assert sel.residual == 0.0 and len(sel.indices) == 4


def test_selective_backprop_keep_probability_is_cdf_power_beta():
    s = sb.SelectiveBackprop(beta=2.0, history=1000)
    s.observe(np.arange(1000, dtype=np.float64))  # history 0..999
    p = s.keep_probabilities(np.array([-1.0, 0.0, 499.0, 999.0, 5000.0]))
    np.testing.assert_allclose(p, np.array([0.0, 0.001, 0.5, 1.0, 1.0]) ** 2)


def test_selective_backprop_bernoulli_keeps_with_cdf_probability():
    rng = np.random.default_rng(0)
    s = sb.SelectiveBackprop(beta=1.0, history=4096, mode="bernoulli", seed=0)
    kept = np.zeros(10)
    n = 3000
    for _ in range(n):
        s.load_state_dict({**s.state_dict(), "history": rng.random(4086)})  # fixed-size random history
        loss = np.linspace(0.05, 0.95, 10)
        idx, w = s.select(sb.Scores(loss=torch.from_numpy(loss)), 1)
        kept[idx] += 1
        np.testing.assert_allclose(w, 1 / len(idx))
    # history = 4086 U(0,1) values + the 10 losses: P(keep) ~= loss
    np.testing.assert_allclose(kept / n, np.linspace(0.05, 0.95, 10), atol=0.04)


def test_selective_backprop_history_is_bounded_and_ordered():
    s = sb.SelectiveBackprop(history=5)
    s.observe(np.arange(3.0))
    s.observe(np.arange(3.0, 7.0))
    np.testing.assert_array_equal(s.recent_losses(), [2, 3, 4, 5, 6])


def test_selective_backprop_fixed_prefers_high_loss():
    loss = torch.linspace(0, 1, 100, dtype=torch.float64)
    counts = np.zeros(100)
    s = sb.SelectiveBackprop(beta=3.0, history=100, seed=0)
    for _ in range(300):
        idx, w = s.select(sb.Scores(loss=loss), 20)
        assert len(set(idx.tolist())) == 20
        counts[idx] += 1
    assert counts[80:].sum() > 3 * counts[:20].sum()


@pytest.mark.parametrize("mode", ["fixed", "bernoulli"])
def test_selective_backprop_unbiased_weights(mode):
    loss = torch.linspace(0.1, 3, 40, dtype=torch.float64)
    s = sb.SelectiveBackprop(beta=1.0, history=40, mode=mode, unbiased=True, seed=1)
    est = [float(w @ loss.numpy()[idx]) for idx, w in (s.select(sb.Scores(loss=loss), 10) for _ in range(6000))]
    np.testing.assert_allclose(np.mean(est), loss.mean().item(), rtol=0.02)


@pytest.mark.parametrize("replace", [True, False])
def test_importance_sampling_is_unbiased_and_follows_norms(replace):
    scores = make_scores(4, b=30)
    loss = scores.loss.numpy()
    s = sb.ImportanceSampling(replace=replace, seed=0)
    norms = scores.grad_norms().numpy()
    counts = np.zeros(30)
    est = []
    n = 6000
    for _ in range(n):
        idx, w = s.select(scores, 6)
        if not replace:
            assert len(set(idx.tolist())) == 6
        np.add.at(counts, idx, 1)
        est.append(float(w.astype(np.float64) @ loss[idx]))
    np.testing.assert_allclose(np.mean(est), loss.mean(), rtol=0.03)
    if replace:
        np.testing.assert_allclose(counts / (n * 6), norms / norms.sum(), atol=0.01)


def test_importance_probabilities_smoothing_and_zero_norms():
    s = sb.ImportanceSampling(smoothing=0.5)
    np.testing.assert_allclose(s.probabilities(np.array([1.0, 0.0])), [0.75, 0.25])
    np.testing.assert_allclose(sb.ImportanceSampling().probabilities(np.zeros(4)), 0.25)


def test_registry_and_aliases():
    assert set(sb.STRATEGIES) == set(ALL) | {"infobatch", "full", "composer"}  # InfoBatch, composer: tested apart
    assert isinstance(sb.get_strategy("random"), sb.Uniform)
    assert isinstance(sb.get_strategy("selective_backprop"), sb.SelectiveBackprop)
    obj = sb.TopK()
    assert sb.get_strategy(obj) is obj
    with pytest.raises(ValueError, match="unknown strategy"):
        sb.get_strategy("bogus")
    with pytest.raises(TypeError):
        sb.get_strategy(3)


@pytest.mark.parametrize("k", [0, B + 1, -1])
def test_k_out_of_range(k):
    with pytest.raises(ValueError, match="k must be in"):
        sb.Uniform().select(make_scores(), k)


def test_non_integer_k_and_empty_batch():
    with pytest.raises(TypeError, match="k must be an int"):
        sb.Uniform().select(make_scores(), 2.0)
    with pytest.raises(ValueError, match="empty"):
        sb.Uniform().select(sb.Scores(loss=torch.zeros(0)), 1)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_losses_rejected(bad):
    loss = torch.ones(8)
    loss[3] = bad
    with pytest.raises(ValueError, match=r"non-finite loss.*\[3\]"):
        sb.TopK().select(sb.Scores(loss=loss), 2)


@pytest.mark.parametrize(
    "ctor,match",
    [
        (lambda: sb.SelectiveBackprop(beta=-1), "beta"),
        (lambda: sb.SelectiveBackprop(history=0), "history"),
        (lambda: sb.SelectiveBackprop(mode="sometimes"), "mode"),
        (lambda: sb.GradientMatching(reg=-0.1), "reg"),
        (lambda: sb.ImportanceSampling(smoothing=2), "smoothing"),
        (lambda: sb.Uniform(seed="abc"), "seed"),
    ],
)
def test_bad_hyper_parameters(ctor, match):
    with pytest.raises((ValueError, TypeError), match=match):
        ctor()


def test_budget():
    assert budget(0.25, 128) == 32
    assert budget(0.1, 128) == 13
    assert budget(0.01, 10) == 1
    assert budget(1.0, 7) == 7
    for bad in (0, 1.5, -0.1, True):
        with pytest.raises(ValueError, match="fraction"):
            budget(bad, 10)


def test_gradmatch_normalize_keeps_subset_and_ratios():
    scores = make_scores(5, b=80)
    g = explicit_grads(scores)
    plain = sb.GradientMatching(seed=0).select(scores, 10)
    norm = sb.GradientMatching(normalize=True, seed=0).select(scores, 10)
    np.testing.assert_array_equal(plain.indices, norm.indices)
    np.testing.assert_allclose(norm.weights.sum(), 1.0, rtol=1e-6)
    np.testing.assert_allclose(norm.weights, plain.weights / plain.weights.sum(), rtol=1e-5)
    np.testing.assert_allclose(norm.residual, fit_residual(g, norm.indices, norm.weights.astype(np.float64)),
                               rtol=1e-4)
    assert norm.residual >= plain.residual - 1e-9  # the fit was optimal; rescaling can only lose


@pytest.mark.parametrize("c", [2, 10, 100])
def test_gradmatch_is_safe_whatever_the_rank_of_the_gradients(c):
    """Budgets above the rank (C - 1)(d + 1) of the last-layer gradients: weights bounded, fit at least as good
    as Uniform's median, and the whole batch at 1/B when the budget is the whole batch."""
    for d in (8, 16, 32, 128):
        for b in (64, 256):
            for f in (0.25, 0.5, 1.0):
                scores = _make_scores(0, b, c, d, dtype=torch.float32)
                k = budget(f, b)
                sel = sb.GradientMatching(seed=0).select(scores, k)
                case = (c, d, b, f)
                assert len(set(sel.indices.tolist())) == k, case
                assert (sel.weights >= 0).all() and sel.weights.max() * k <= 4.0 and sel.weights.sum() <= 1.1, case
                g = explicit_grads(scores)
                res = fit_residual(g, sel.indices, sel.weights.astype(np.float64))
                uniform = np.median([fit_residual(g, *sb.Uniform(seed=s).select(scores, k)) for s in range(9)])
                assert res <= uniform + 1e-4, case
                if f == 1.0:
                    np.testing.assert_allclose(sel.weights, 1.0 / b, rtol=1e-3, err_msg=str(case))


def test_gradmatch_trains_a_two_class_task_as_well_as_uniform():
    """C = 2 and 32 features: rank <= 33 < k = 64. The per-step weight sum stays ~1 (it reached 1e18 before)."""

    def train(strategy, seed):
        g = torch.Generator().manual_seed(seed)
        y = torch.randint(0, 2, (2048,), generator=g)
        x = torch.randn(2048, 16, generator=g) + 1.5 * (2 * y[:, None] - 1) * torch.linspace(1, 0, 16)
        torch.manual_seed(seed)
        model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 2))
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=256, shuffle=True,
                                           generator=g)
        sums = []
        for _ in range(3):
            for b in sb.SelectiveLoader(data, sb.ScoringHook(model), strategy, fraction=0.25, seed=seed):
                loss = torch.nn.functional.cross_entropy(model(b.inputs), b.targets, reduction="none")
                opt.zero_grad()
                sb.weighted_loss(loss, b.weights).backward()
                opt.step()
                sums.append(float(b.weights.sum()))
        with torch.no_grad():
            return float(torch.nn.functional.cross_entropy(model(x), y)), max(sums)

    for seed in range(2):
        uniform_loss, _ = train("uniform", seed)
        gm_loss, gm_sum = train("gradmatch", seed)
        assert gm_sum <= 1.1
        assert gm_loss <= 1.5 * uniform_loss + 0.01


def test_composer_rule_follows_composers_law():
    """Inclusion frequencies against Composer's select_using_loss written out (tests/reference.py)."""
    from reference import composer_select_ref

    loss = torch.tensor(np.random.default_rng(0).exponential(size=20))
    s = sb.ComposerRule(seed=0)
    rng = np.random.default_rng(1)
    ours, ref = np.zeros(20), np.zeros(20)
    n = 6000
    for _ in range(n):
        idx, w = s.select(sb.Scores(loss=loss), 5)
        ours[idx] += 1
        np.testing.assert_allclose(w, 1 / 5)
        ref[composer_select_ref(loss.numpy(), 5, rng)] += 1
    np.testing.assert_allclose(ours / n, ref / n, atol=0.03)
    order = np.argsort(loss.numpy())
    assert ours[order[-5:]].sum() > 3 * ours[order[:5]].sum()  # high losses kept far more often


def _entry_points():
    """Every public place that takes a fraction, as ``make(strategy, **kw)``."""
    model = nn.Sequential(nn.Linear(4, 3))
    hook = sb.ScoringHook(model)
    x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    data = DataLoader(sb.with_indices(TensorDataset(x, y)), batch_size=16)
    return {
        "SelectiveLoader": lambda s, **kw: sb.SelectiveLoader(data, hook, s, seed=0, **kw),
        "BatchSelector": lambda s, **kw: sb.BatchSelector(hook, s, seed=0, **kw),
        "select_batch": lambda s, **kw: sb.select_batch(hook, s, (x, y), rng=0, **kw),
        "SelectiveSampler": lambda s, **kw: sb.SelectiveSampler(sb.ScoreStore(32), s, **kw),
    }


@pytest.mark.parametrize("entry", ["SelectiveLoader", "BatchSelector", "select_batch", "SelectiveSampler"])
@pytest.mark.parametrize("strategy,says", [("infobatch", "prune"), (sb.SelectiveBackprop(mode="bernoulli"), "beta"),
                                           ("full", "every sample")])
def test_a_fraction_given_to_a_rule_that_takes_none_is_refused(entry, strategy, says):
    """InfoBatch kept 64-73% of each batch with fraction=0.25, silently (issue 31, item 4): a rule that chooses its
    own count, or keeps every sample, refuses a fraction and says what sets its share instead."""
    make = _entry_points()[entry]
    with pytest.raises(ValueError, match=rf"does not keep a fraction of each batch: .*{says}.*Leave fraction= out"):
        make(strategy, fraction=0.25)
    make(strategy)  # without one, it runs at its own count


def test_a_rule_that_takes_a_fraction_defaults_to_a_quarter_and_infobatch_keeps_its_own_share():
    entries = _entry_points()
    assert entries["SelectiveLoader"]("uniform").fraction == 0.25
    assert entries["BatchSelector"]("topk").fraction == 0.25
    assert entries["SelectiveSampler"]("uniform").fraction == 0.5
    assert len(entries["select_batch"]("uniform").rows) == 8  # a quarter of 32
    loader = entries["SelectiveLoader"]("infobatch")
    assert loader.fraction is None and "fraction=None" in repr(loader)
    list(loader)
    assert 0.5 < loader.stats.backprop_fraction < 1.0  # InfoBatch(prune=0.5): about 3/4, whatever a fraction says
