"""RHO-LOSS (issue 25): reference losses by dataset index, the reducible-loss rule per batch, on the device, at the
sampler level and inside a framework, against the reference code's rule written out."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import sbsampler as sb

N, DIM, CLASSES = 96, 6, 4


def reference_rule(loss: np.ndarray, irreducible: np.ndarray, k: int) -> np.ndarray:
    """OATML/RHO-Loss ``reducible_loss_selection``: argsort(loss - irreducible, descending)[:k] (then trained on with
    the mean of their losses: equal weights)."""
    return np.sort(np.argsort(-(loss - irreducible))[:k])


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 64), st.floats(0.05, 1.0), st.integers(0, 2**31 - 1))
def test_the_rule_is_the_reference_codes(b, fraction, seed):
    rng = np.random.default_rng(seed)
    loss, irreducible = rng.exponential(size=b), rng.exponential(size=b)  # continuous: no ties
    k = sb.strategies.budget(fraction, b)
    scores = sb.Scores(loss=torch.from_numpy(loss)).with_reference(torch.from_numpy(irreducible))
    sel = sb.RhoLoss().select(scores, k)
    np.testing.assert_array_equal(sel.indices, reference_rule(loss, irreducible, k))
    np.testing.assert_allclose(sel.weights, np.full(k, 1.0 / k))
    idx, w = sb.RhoLoss().select_tensors(scores, k)  # the torch-op twin picks the same rows
    np.testing.assert_array_equal(idx.numpy(), sel.indices)


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, DIM, generator=g), torch.randint(0, CLASSES, (N,), generator=g)


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(DIM, 16), nn.ReLU(), nn.Linear(16, CLASSES))


def _losses(model, x, y):
    with torch.no_grad():
        return F.cross_entropy(model(x), y, reduction="none").double().numpy()


def test_reference_losses_are_the_reference_models_losses_by_dataset_index():
    x, y = _data()
    ref_model = _model(1)
    dl = DataLoader(sb.with_indices(TensorDataset(x, y)), batch_size=16, shuffle=True,
                    generator=torch.Generator().manual_seed(0))
    got = sb.reference.reference_losses(ref_model, dl, N, progress=False)
    np.testing.assert_allclose(got, _losses(ref_model, x, y), rtol=1e-6)
    with pytest.raises(ValueError, match="no indices|dataset indices"):
        sb.reference.reference_losses(ref_model, DataLoader(TensorDataset(x, y), batch_size=16), N, progress=False)
    with pytest.raises(ValueError, match=r"16 samples were never scored \(indices \[80"):
        sb.reference.reference_losses(ref_model, [(x[:80], y[:80], torch.arange(80))], N, progress=False)
    with pytest.raises(ValueError, match="out of range for num_samples=50"):
        sb.reference.reference_losses(ref_model, dl, 50, progress=False)


def test_the_store_keeps_reference_losses_safely():
    store = sb.ScoreStore(10)
    store.set_reference(np.linspace(0.1, 1.0, 10))
    state = store.state_dict()
    other = sb.ScoreStore(10)
    other.load_state_dict(state)
    np.testing.assert_array_equal(other.reference, store.reference)
    old = {k: v for k, v in state.items() if k != "reference"} | {"version": 1}  # before reference losses
    other.load_state_dict(old)  # a state without reference losses keeps the store's own (before: reset to NaN)
    np.testing.assert_array_equal(other.reference, store.reference)
    fresh = sb.ScoreStore(10)
    fresh.load_state_dict(old)
    assert fresh.reference is None  # no reference column until one is set (issue 33: compact stores)
    with pytest.raises(ValueError, match="non-finite reference loss for indices \\[3\\]"):
        store.set_reference([float("inf")], indices=[3])
    with pytest.raises(ValueError, match="got 9 reference losses for 10 samples"):
        store.set_reference(np.ones(9))
    with pytest.raises(ValueError, match="'reference' holds infinite losses"):
        sb.ScoreStore(10).load_state_dict({**state, "reference": torch.full((10,), float("inf"), dtype=torch.float64)})


@pytest.mark.parametrize("select_on", ["host", "device"])
def test_through_the_loader_each_batch_keeps_its_top_reducible_losses(select_on):
    x, y = _data()
    model, ref_model = _model(0), _model(1)
    store = sb.ScoreStore(N)
    store.set_reference(_losses(ref_model, x, y))
    dl = DataLoader(sb.with_indices(TensorDataset(x, y)), batch_size=32)
    loader = sb.SelectiveLoader(dl, sb.ScoringHook(model), sb.RhoLoss(reference=store), fraction=0.25,
                                select_on=select_on)
    loss, irreducible = _losses(model, x, y), store.reference
    for j, step in enumerate(loader):
        rows = slice(32 * j, 32 * (j + 1))
        want = reference_rule(loss[rows], irreducible[rows], 8) + 32 * j
        assert sorted(step.indices.tolist()) == want.tolist()
        torch.testing.assert_close(step.weights, torch.full((8,), 1 / 8))


def test_at_the_sampler_level_the_plan_keeps_the_top_reducible_stored_losses():
    store = sb.ScoreStore(50)
    rng = np.random.default_rng(0)
    store.update(np.arange(50), rng.exponential(size=50), epoch=0)
    store.set_reference(rng.exponential(size=50))
    sampler = sb.SelectiveSampler(store, sb.RhoLoss(reference=store), fraction=0.2, seed=0, shuffle=False)
    sampler.set_epoch(1)
    plan = sampler.plan()[0]
    assert sorted(plan.tolist()) == reference_rule(store.loss, store.reference, 10).tolist()


def test_inside_a_framework_loop_the_batch_selector_looks_up_dataset_indices():
    x, y = _data()
    model = _model(0)
    ref = _losses(_model(1), x, y)
    selector = sb.BatchSelector(sb.ScoringHook(model), sb.RhoLoss(reference=ref), fraction=0.25)
    idx = torch.arange(40, 72)
    sub = selector({"inputs": x[idx], "targets": y[idx], "indices": idx})
    want = reference_rule(_losses(model, x[idx], y[idx]), ref[40:72], 8) + 40
    assert sorted(sub.indices.tolist()) == want.tolist()
    with pytest.raises(ValueError, match="indices"):  # positions are not dataset indices: refused, not guessed
        selector((x[:32], y[:32]))


def test_what_it_refuses():
    x, y = _data()
    scores = sb.Scores(loss=torch.rand(8))
    with pytest.raises(ValueError, match="RhoLoss reads Scores.reference"):
        sb.RhoLoss().select(scores, 2)
    hook = sb.ScoringHook(_model())
    with pytest.raises(ValueError, match="RhoLoss needs reference losses"):
        sb.select_batch(hook, sb.RhoLoss(), (x[:8], y[:8], torch.arange(8)), 0.25)
    with pytest.raises(ValueError, match=r"no reference loss for dataset indices \[2\]"):
        table = np.ones(N)
        table[2] = np.nan
        sb.select_batch(hook, sb.RhoLoss(reference=table), (x[:8], y[:8], torch.arange(8)), 0.25)
    with pytest.raises(ValueError, match="indices"):  # a batch without dataset indices
        sb.select_batch(hook, sb.RhoLoss(reference=np.ones(N)), (x[:8], y[:8]), 0.25)
    with pytest.raises(ValueError, match="index 200 is out of range for 96 reference losses"):
        sb.select_batch(hook, sb.RhoLoss(reference=np.ones(N)), (x[:8], y[:8], torch.arange(193, 201)), 0.25)


@pytest.mark.parametrize("bad", [np.inf, -np.inf])
def test_a_reference_array_with_an_infinite_loss_is_refused(bad):
    """An infinite reference loss made its sample never (or always) picked, silently (issue 31, item 5)."""
    table = np.ones(N)
    table[3] = bad
    with pytest.raises(ValueError, match=r"infinite reference loss for dataset indices \[3\]"):
        sb.RhoLoss(reference=table)
    with pytest.raises(ValueError, match="1-D"):
        sb.RhoLoss(reference=np.ones((4, 4)))


def test_a_reference_of_another_dataset_size_is_refused_where_the_size_is_known():
    """A reference 10 longer than the dataset picked from misaligned values in 8 of 8 batches: the loader and the
    sampler know the dataset's size, so they refuse it."""
    x, y = _data()
    dl = DataLoader(sb.with_indices(TensorDataset(x, y)), batch_size=32)
    hook = sb.ScoringHook(_model())
    longer = sb.ScoreStore(N + 10)
    longer.set_reference(np.ones(N + 10))
    for reference in (np.ones(N + 10), longer):
        with pytest.raises(ValueError, match=rf"{N + 10} reference losses for a dataset of {N} samples"):
            sb.SelectiveLoader(dl, hook, sb.RhoLoss(reference=reference), fraction=0.25)
        with pytest.raises(ValueError, match=rf"{N + 10} reference losses for a dataset of {N} samples"):
            sb.SelectiveSampler(sb.ScoreStore(N), sb.RhoLoss(reference=reference), fraction=0.25)


def test_a_store_without_reference_losses_says_why_at_the_first_batch():
    x, y = _data()
    store = sb.ScoreStore(N)
    store.load_state_dict({k: v for k, v in sb.ScoreStore(N).state_dict().items() if k != "reference"}
                          | {"version": 1})
    loader = sb.SelectiveLoader(DataLoader(sb.with_indices(TensorDataset(x, y)), batch_size=32),
                                sb.ScoringHook(_model()), sb.RhoLoss(reference=store), fraction=0.25)
    with pytest.raises(ValueError, match=r"the ScoreStore holds no reference losses.*set_reference.*a state saved "
                                         r"without them"):
        next(iter(loader))
