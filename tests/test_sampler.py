"""ScoreStore, SelectiveSampler, InfoBatch, WeightedBatches and the FFCV traversal order."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import sbsampler as sb


def _store(n=100, seed=0, epoch=0):
    rng = np.random.default_rng(seed)
    store = sb.ScoreStore(n)
    store.update(np.arange(n), rng.exponential(size=n), rng.random(n) + 0.1, epoch=epoch)
    return store


def test_store_update_validation_and_state():
    s = sb.ScoreStore(10)
    assert not s.scored().any()
    s.update(torch.tensor([1, 3]), torch.tensor([0.5, 2.0]), grad_norms=[1.0, 2.0])
    assert s.loss[3] == 2.0 and s.grad_norm[1] == 1.0 and s.scored_epoch[1] == 0 and s.scored().sum() == 2
    with pytest.raises(ValueError, match="index 10 is out of range"):
        s.update([10], [1.0])
    with pytest.raises(ValueError, match="non-finite loss for indices \\[2\\]"):
        s.update([2], [float("nan")])
    with pytest.raises(ValueError, match="2 losses for 1 indices"):
        s.update([2], [1.0, 2.0])
    t = sb.ScoreStore(10)
    t.load_state_dict(s.state_dict())
    assert np.array_equal(t.loss, s.loss, equal_nan=True) and np.array_equal(t.scored_epoch, s.scored_epoch)


def test_first_epoch_loads_everything_then_the_fraction():
    store = sb.ScoreStore(100)
    sampler = sb.SelectiveSampler(store, "uniform", fraction=0.3, seed=0)
    assert len(sampler) == 100 and sorted(sampler) == list(range(100))  # nothing scored yet
    store.update(np.arange(100), np.ones(100))
    sampler.set_epoch(1)
    assert len(sampler) == 30 == len(list(sampler)) == len(set(sampler))


def test_plan_is_deterministic_per_seed_and_epoch():
    a = sb.SelectiveSampler(_store(), "sb", fraction=0.4, seed=3)
    b = sb.SelectiveSampler(_store(), "sb", fraction=0.4, seed=3)
    a.set_epoch(5)
    b.set_epoch(5)
    assert list(a) == list(b)
    b.set_epoch(6)
    assert list(a) != list(b)


def test_topk_from_stored_losses():
    store = _store()
    sampler = sb.SelectiveSampler(store, "topk", fraction=0.2, shuffle=False)
    sampler.set_epoch(1)
    assert set(sampler) == set(np.argsort(-store.loss)[:20].tolist())


def test_staleness_forces_a_rescore():
    store = _store(epoch=0)
    store.update(np.arange(50), np.ones(50), epoch=3)  # half refreshed at epoch 3
    sampler = sb.SelectiveSampler(store, "uniform", fraction=0.1, max_staleness=2, seed=0)
    sampler.set_epoch(4)
    got = set(sampler)
    assert set(range(50, 100)) <= got  # scored at epoch 0: 4 epochs stale, so loaded
    assert len(got & set(range(50))) == 5  # 10% of the fresh half
    idx, mult = sampler.plan()
    assert mult.mean() == pytest.approx(1.0)
    # the fresh picks stand for 10 samples each, the forced ones for themselves
    fresh = np.isin(idx, np.arange(50))
    assert mult[fresh][0] / mult[~fresh][0] == pytest.approx(10.0)


def test_a_plan_follows_the_store_until_its_epoch_starts():
    """Asking for the next epoch's length early never fixes its plan on incomplete scores,
    and never disturbs the plan (and weights) of the epoch in progress."""
    store = sb.ScoreStore(100)
    sampler = sb.SelectiveSampler(store, "topk", fraction=0.5, shuffle=False)
    sampler.set_epoch(0)
    it = iter(sampler)  # epoch 0 starts: all 100, weight 1
    first = [next(it) for _ in range(50)]
    store.update(first, np.arange(50.0))  # half of epoch 0 scored so far
    assert sampler.num_indices(1) == 50 + 25  # 50 unscored forced + top half of the 50 fresh
    store.update(list(it), 100.0 + np.arange(50.0))  # the rest of epoch 0 scored
    assert sampler.weights_for([0, 99]).tolist() == [0.5, 0.5]  # epoch 0's own plan (multipliers 1), unchanged
    assert sampler.num_indices(1) == 50  # redrawn from the complete store
    sampler.set_epoch(1)
    got = list(sampler)  # epoch 1 starts: frozen from here
    assert sorted(got) == list(range(50, 100))
    store.update(got, np.zeros(50))
    assert list(sampler) == got and len(sampler) == 50


def test_sampler_state_restores_the_epoch_in_progress():
    """Mid-epoch restart: the store has changed since the epoch began, yet the epoch keeps its plan."""
    store = _store()
    sampler = sb.SelectiveSampler(store, "topk", fraction=0.3, seed=4)
    sampler.set_epoch(2)
    order = list(sampler)
    weights = sampler.weights_for(order)
    store.update(order[:10], np.zeros(10))  # the first steps of epoch 2 wrote new (low) losses
    saved_store, saved = store.state_dict(), sampler.state_dict()

    store2 = sb.ScoreStore(100)
    store2.load_state_dict(saved_store)
    fresh = sb.SelectiveSampler(store2, "topk", fraction=0.3, seed=4)
    fresh.set_epoch(2)
    assert list(fresh) != order  # drawn again from the changed store: not the same epoch
    restored = sb.SelectiveSampler(store2, "topk", fraction=0.3, seed=4)
    restored.load_state_dict(saved)
    assert list(restored) == order and np.array_equal(restored.weights_for(order), weights)
    restored.set_epoch(3)
    assert len(restored) == 30  # later epochs are drawn from the store as usual


def test_anneal_loads_the_full_data_at_the_end():
    sampler = sb.SelectiveSampler(_store(), "infobatch", anneal=0.2, epochs=10)
    sampler.set_epoch(7)
    assert len(sampler) < 100
    sampler.set_epoch(8)
    assert len(sampler) == 100 and np.all(sampler.plan()[1] == 1.0)


def test_infobatch_rule_is_unbiased():
    rng = np.random.default_rng(0)
    loss = rng.exponential(size=200)
    strat = sb.InfoBatch(prune=0.6, seed=1)
    est, kept = [], []
    for _ in range(3000):
        idx, w = strat.select(sb.Scores(loss=torch.from_numpy(loss)), 1)
        est.append(float((w * loss[idx]).sum()))
        kept.append(len(idx))
        assert set(np.flatnonzero(loss >= loss.mean())) <= set(idx)  # above-mean losses always kept
    assert np.mean(est) == pytest.approx(loss.mean(), rel=0.01)
    assert np.mean(kept) == pytest.approx(200 - 0.6 * (loss < loss.mean()).sum(), rel=0.02)


def test_importance_needs_stored_norms_and_gradmatch_is_refused():
    store = sb.ScoreStore(10)
    store.update(np.arange(10), np.ones(10))
    s = sb.SelectiveSampler(store, "importance")
    s.set_epoch(1)
    with pytest.raises(ValueError, match="gradient norms"):
        len(s)
    for name in ("gradmatch", "gradient_matching", sb.GradientMatching()):
        with pytest.raises(ValueError, match="SelectiveLoader"):
            sb.SelectiveSampler(store, name)


def test_sampler_sb_ranks_against_every_stored_loss():
    """The CDF is over all the fresh stored losses, whatever the strategy's history length or how it is named,
    and a plan does not depend on earlier draws (the sampler never feeds the strategy's history)."""
    store = _store(3000, seed=1)
    plans = []
    for strategy in ("sb", "selective_backprop", sb.SelectiveBackprop(history=16), sb.SelectiveBackprop(history=10**6)):
        s = sb.SelectiveSampler(store, strategy, fraction=0.2, seed=5)
        s.set_epoch(1)
        plans.append(list(s))
        s.set_epoch(2)
        list(s)
        s.set_epoch(1)
        assert list(s) == plans[-1]  # drawn again: the same plan
    assert all(p == plans[0] for p in plans)


def test_ddp_sharding_covers_the_plan():
    store = _store(101)
    shards = []
    for rank in range(3):
        s = sb.SelectiveSampler(store, "uniform", fraction=0.5, num_replicas=3, rank=rank, seed=2)
        s.set_epoch(1)
        shards.append(list(s))
    assert len({len(x) for x in shards}) == 1
    plan = sb.SelectiveSampler(store, "uniform", fraction=0.5, seed=2)
    plan.set_epoch(1)
    assert set().union(*map(set, shards)) == set(plan)


def _digits(n=400):
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return torch.tensor(x[:n] / 16.0, dtype=torch.float32), torch.tensor(y[:n])


@pytest.mark.parametrize("workers", [0, 2])
def test_training_from_stored_scores(workers):
    """Per-batch mode writes the store; later epochs load only the planned samples, weighted."""
    x, y = _digits()
    ds = sb.with_indices(TensorDataset(x, y))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    store = sb.ScoreStore(len(ds))
    sampler = sb.SelectiveSampler(store, "infobatch", max_staleness=3, anneal=0.2, epochs=5, seed=0)
    loader = DataLoader(ds, batch_size=50, sampler=sampler, num_workers=workers, persistent_workers=workers > 0)
    batches = sb.WeightedBatches(loader, sampler)
    lengths, loaded = [], []
    for epoch in range(5):
        sampler.set_epoch(epoch)
        lengths.append(len(batches))
        n = 0
        seen = set()
        for batch in batches:
            out = model(batch.inputs)
            loss = nn.functional.cross_entropy(out, batch.targets, reduction="none")
            store.update(batch.indices, loss.detach())  # the step's own losses: no extra forward
            opt.zero_grad()
            sb.weighted_loss(loss, batch.weights).backward()
            opt.step()
            shares = dict(zip(*(a.tolist() for a in sampler.plan())))  # multipliers / samples per pick
            expected = torch.tensor([shares[i] for i in batch.indices.tolist()]) / len(batch)
            torch.testing.assert_close(batch.weights, expected.float())
            n += 1
            seen |= set(batch.indices.tolist())
        assert n == lengths[-1]  # len() told the truth for this epoch
        loaded.append(len(seen))
    assert loaded[0] == 400 and loaded[4] == 400  # first epoch: nothing scored; last: annealing
    assert all(v < 400 for v in loaded[1:4])
    assert lengths[1] < lengths[0]
    assert (store.scored_epoch >= 2).all() or (4 - store.scored_epoch <= 3).all()


def test_selective_loader_writes_the_store():
    x, y = _digits(100)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 10))
    store = sb.ScoreStore(100)
    loader = sb.SelectiveLoader(DataLoader(sb.with_indices(TensorDataset(x, y)), batch_size=25), sb.ScoringHook(model),
                                "uniform", store=store)
    list(loader)
    hook = sb.ScoringHook(model)
    ref = hook.score(x, y)
    assert np.allclose(store.loss, ref.loss.numpy(), rtol=1e-5)
    assert np.allclose(store.grad_norm, ref.grad_norms().numpy(), rtol=1e-5)
    assert (store.scored_epoch == 0).all()


@pytest.mark.parametrize("strategy", ["uniform", "topk", "sb", "infobatch"])
def test_a_hook_without_a_head_stores_losses_with_unknown_norms(strategy):
    """With ScoringHook(head=False) a store records the losses and leaves every gradient norm unknown (NaN), for
    every rule that reads losses only (before: "gradient-based strategies need ..." for every rule)."""
    x, y = _digits(100)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 10))
    store = sb.ScoreStore(100)
    loader = sb.SelectiveLoader(DataLoader(sb.with_indices(TensorDataset(x, y)), batch_size=25),
                                sb.ScoringHook(model, head=False), strategy, store=store, seed=0)
    list(loader)
    np.testing.assert_allclose(store.loss, sb.ScoringHook(model).score(x, y).loss.numpy(), rtol=1e-5)
    assert np.isnan(store.grad_norm).all() and (store.scored_epoch == 0).all()
    with pytest.raises(ValueError, match="gradient norms"):  # a rule that reads norms says what is missing
        sb.SelectiveSampler(store, "importance").plan(1)


def test_ffcv_selective_order(tmp_path):
    if os.environ.get("SBSAMPLER_REQUIRE_FFCV") != "1":
        pytest.importorskip("ffcv")
    from ffcv.fields.decoders import IntDecoder, SimpleRGBImageDecoder
    from ffcv.loader import Loader
    from ffcv.transforms import ToTensor, ToTorchImage

    n = 96
    imgs = torch.randint(0, 255, (n, 3, 8, 8), dtype=torch.uint8)
    path = tmp_path / "s.beton"
    sb.ffcv.write_beton([(imgs[i], i % 10) for i in range(n)], path)
    store = sb.ScoreStore(n)
    store.update(np.arange(n), np.ones(n))  # resumed with a full store: epoch 0 loads 25% only
    sampler = sb.SelectiveSampler(store, "uniform", fraction=0.25, seed=0)
    loader = Loader(str(path), batch_size=16, num_workers=1, order=sb.ffcv.selective_order(sampler), drop_last=False,
                    pipelines={"image": [SimpleRGBImageDecoder(), ToTensor(), ToTorchImage()],
                               "label": [IntDecoder(), ToTensor()], "index": [IntDecoder(), ToTensor()]})
    batches = sb.WeightedBatches(loader, sampler)
    per_epoch = []
    for epoch in range(3):
        expected = len(batches)
        got = []
        for b in batches:
            assert torch.equal(b.inputs, imgs[b.indices])
            assert len(batches) == expected  # this epoch's length while it runs, not the next one's
            got += b.indices.tolist()
            store.update(b.indices, torch.rand(len(b)) + 0.1)
        assert -(-len(got) // 16) == expected == len(loader)
        per_epoch.append(got)
        if epoch == 0:  # forget every score: the next epoch must load the whole set
            store.scored_epoch[:] = -1
    assert len(per_epoch[0]) == 24 == len(set(per_epoch[0]))  # 25% of the scored set
    # FFCV 1.0.2 would cut this epoch to epoch 0's length (2 batches); selective_order prevents it.
    assert sorted(per_epoch[1]) == list(range(n))
    assert len(per_epoch[2]) == 24


def test_store_refuses_indices_it_would_misread():
    s = sb.ScoreStore(4)
    with pytest.raises(TypeError, match="boolean mask"):
        s.update(torch.tensor([True, False, True, False]), [1.0, 2.0, 3.0, 4.0])
    with pytest.raises(TypeError, match="must be integers"):
        s.update(np.array([2.9]), [1.0])
    with pytest.raises(ValueError, match=r"non-finite gradient norm for indices \[1\]"):
        s.update([0, 1], [1.0, 2.0], grad_norms=[0.5, float("nan")])
    assert not s.scored().any() and np.isnan(s.loss).all()  # nothing half-written
    s.update(torch.tensor([3, 1]), [1.0, 2.0], grad_norms=[0.5, 0.25])
    assert s.loss[3] == 1.0 and s.grad_norm[1] == 0.25


def test_loader_with_a_store_needs_dataset_indices():
    x, y = _digits(60)
    loader = DataLoader(TensorDataset(x, y), batch_size=20, shuffle=True)  # no with_indices: positions only
    sel = sb.SelectiveLoader(loader, sb.ScoringHook(nn.Linear(64, 10)), "uniform", store=sb.ScoreStore(60))
    with pytest.raises(ValueError, match="with_indices"):
        list(sel)


@pytest.mark.parametrize("n", [120, 80])
def test_weighted_batches_refuse_a_dataset_of_another_size(n):
    x, y = _digits(n)
    store = sb.ScoreStore(100)
    sampler = sb.SelectiveSampler(store, "uniform", seed=0)
    loader = DataLoader(sb.with_indices(TensorDataset(x, y)), batch_size=10, sampler=sampler)
    with pytest.raises(ValueError, match=f"dataset has {n} samples but the ScoreStore 100"):
        sb.WeightedBatches(loader, sampler)


def test_infobatch_follows_the_official_rule_by_default():
    """The official code anneals from epoch floor(epochs * delta) and weights a kept below-mean sample 1/keep,
    every other sample 1, over the plain batch mean: a pruning epoch's summed update equals a full epoch's."""
    store = _store(200, seed=5)
    sampler = sb.SelectiveSampler(store, "infobatch", anneal=0.125, epochs=10, seed=0)  # delta 0.875: 8.75 -> 8
    assert [sampler.is_annealing(e) for e in (7, 8, 9)] == [False, True, True]
    sampler.set_epoch(1)
    idx, shares = sampler.plan()
    low = store.loss[idx] < store.loss.mean()
    np.testing.assert_allclose(shares[low], 2.0)  # 1 / keep, keep = 1 - prune = 0.5
    np.testing.assert_allclose(shares[~low], 1.0)
    assert low.sum() < (store.loss < store.loss.mean()).sum()  # some below-mean samples were pruned
    batch = idx[:16]
    by_index = dict(zip(idx.tolist(), shares.tolist()))
    np.testing.assert_allclose(sampler.weights_for(batch), [by_index[i] / 16 for i in batch.tolist()])  # m / len
    step = sb.SelectiveSampler(store, "infobatch", seed=0, scale="step")  # each step's weights sum to ~1 instead
    step.set_epoch(1)
    np.testing.assert_allclose(step.plan()[1].mean(), 1.0, rtol=0.05)
    with pytest.raises(ValueError, match="scale"):
        sb.SelectiveSampler(store, "infobatch", scale="batch")


def test_an_epoch_whose_plan_fills_no_batch_is_an_error():
    """A plan of 30 samples under batches of 64 with drop_last=True gave an epoch of no step, silently (the README's
    CIFAR command trained on nothing after its first epoch; issue 22)."""
    n = 100
    store = _store(n)
    sampler = sb.SelectiveSampler(store, "uniform", fraction=0.3, seed=0)
    sampler.set_epoch(1)
    x, y = torch.randn(n, 4), torch.randint(0, 3, (n,))
    batches = sb.WeightedBatches(DataLoader(sb.with_indices(TensorDataset(x, y)), batch_size=64, sampler=sampler,
                                            drop_last=True), sampler)
    with pytest.raises(RuntimeError, match=r"epoch 1's plan holds 30 samples, but the loader made no batch of them"):
        list(batches)
    ok = sb.WeightedBatches(DataLoader(sb.with_indices(TensorDataset(x, y)), batch_size=16, sampler=sampler,
                                       drop_last=True), sampler)
    assert len(list(ok)) == 1


# -- plans at scale (issue 33 item 1): the same plan as the slow reference, drawn with array operations -------------

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from reference import plan_ref, shard_ref, top_k_ref  # noqa: E402

RULES = {"uniform": lambda: sb.Uniform(), "infobatch": lambda: sb.InfoBatch(prune=0.6),
         "sb": lambda: sb.SelectiveBackprop(beta=2.0), "topk": lambda: sb.TopK(), "composer": lambda: sb.ComposerRule(),
         "importance": lambda: sb.ImportanceSampling(), "rho": None}


@settings(max_examples=80, deadline=None)
@given(st.integers(1, 300), st.sampled_from(sorted(RULES)), st.floats(0.05, 1.0), st.integers(0, 2**31 - 1),
       st.booleans(), st.sampled_from([None, 2]), st.integers(1, 4))
def test_a_plan_is_the_slow_references_plan(n, rule, fraction, seed, ties, staleness, replicas):
    """Random stores (ties among the losses or not, unscored and stale samples), every rule that plans from stored
    scores, any number of ranks: the plan and each rank's shard equal the reference's, element for element."""
    rng = np.random.default_rng(seed)
    store = sb.ScoreStore(n)
    scored = np.flatnonzero(rng.random(n) < 0.8)
    losses = rng.integers(0, 4, scored.size).astype(float) if ties else rng.exponential(size=scored.size)
    store.update(scored, losses, rng.random(scored.size) + 0.1, epoch=0)
    store.update(scored[: scored.size // 3], losses[: scored.size // 3], epoch=2)
    store.set_reference(rng.exponential(size=n))
    strategy = sb.RhoLoss(reference=store) if rule == "rho" else RULES[rule]()
    f = fraction if strategy.uses_fraction else None
    sampler = sb.SelectiveSampler(store, strategy, fraction=f, seed=seed % 1000, max_staleness=staleness)
    sampler.set_epoch(3)
    indices, shares = sampler.plan()
    want_idx, want_mult = plan_ref(store, strategy if rule != "rho" else sb.RhoLoss(reference=store),
                                   f if f is not None else None, seed % 1000, 3, staleness)
    np.testing.assert_array_equal(indices, want_idx)
    np.testing.assert_array_equal(sampler._plans[3].multipliers, want_mult)
    for rank in range(replicas):
        shard = sb.SelectiveSampler(store, strategy, fraction=f, seed=seed % 1000, max_staleness=staleness,
                                    num_replicas=replicas, rank=rank)
        shard.set_epoch(3)
        np.testing.assert_array_equal(np.fromiter(iter(shard), dtype=np.int64), shard_ref(want_idx, replicas, rank))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from([0.0, -0.0, 1.0, 2.5, -3.0, float("-inf")]) | st.floats(-5, 5), max_size=60),
       st.integers(0, 70))
def test_top_k_in_linear_time_is_the_stable_argsorts(values, k):
    values = np.array(values, dtype=np.float64)
    np.testing.assert_array_equal(sb.kernels.top_k_indices(values, k), top_k_ref(values, k))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(-1e6, 1e6) | st.sampled_from([0.0, -0.0, 1.0, 7.0]), min_size=1, max_size=80))
def test_self_ecdf_is_the_ecdf_of_the_values_against_themselves(values):
    from reference import ecdf_ref

    values = np.array(values, dtype=np.float64)
    np.testing.assert_array_equal(sb.kernels.self_ecdf(values), ecdf_ref(values, values))


def test_iterating_a_sampler_never_builds_a_list_of_every_index():
    store = _store(200_000)
    sampler = sb.SelectiveSampler(store, "uniform", fraction=0.5, seed=0)
    sampler.set_epoch(1)
    it = iter(sampler)
    first = next(it)
    assert isinstance(first, int) and not isinstance(it, list)
    assert sum(1 for _ in it) + 1 == len(sampler) == 100_000
