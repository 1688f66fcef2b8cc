"""SelectiveLoader over real DataLoaders: indices, rebatching, window, NaN policy, bookkeeping."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import sbsampler as sb

N, DIM, CLASSES = 150, 6, 4


def dataset():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, DIM, generator=g)
    y = torch.randint(0, CLASSES, (N,), generator=g)
    return TensorDataset(x, y)


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(DIM, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, CLASSES))


def make(strategy="uniform", bs=32, shuffle=True, indexed=True, **kw):
    ds = dataset()
    dl = DataLoader(sb.with_indices(ds) if indexed else ds, batch_size=bs, shuffle=shuffle,
                    generator=torch.Generator().manual_seed(1))
    net = model()
    return ds, net, sb.SelectiveLoader(dl, sb.ScoringHook(net), strategy=strategy, seed=0, **kw)


def check_accounting(stats):
    assert stats.samples_seen == stats.samples_selected + stats.samples_not_selected + stats.samples_skipped


@pytest.mark.parametrize("strategy", ["uniform", "topk", "sb", "gradmatch", "importance"])
def test_sub_batches_carry_dataset_indices_and_train(strategy):
    ds, net, loader = make(strategy, fraction=0.25)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    steps = 0
    for batch in loader:
        x, y, w, idx = batch
        assert idx.dtype == torch.int64 and w.dtype == torch.float32
        torch.testing.assert_close(x, ds.tensors[0][idx])
        assert torch.equal(y, ds.tensors[1][idx])
        loss = sb.weighted_loss(F.cross_entropy(net(x), y, reduction="none"), w)
        loss.backward()
        opt.step()
        opt.zero_grad()
        steps += 1
    assert steps == len(loader) == math.ceil(N / 32)
    st = loader.stats
    assert st.samples_seen == N and st.samples_scored == (N if loader.strategy.needs_scores else 0)
    assert st.steps == steps
    check_accounting(st)
    if strategy == "gradmatch":
        assert len(st.residuals) == steps and st.as_dict()["mean_residual"] is not None


def test_sub_batch_size_is_ceil_fraction_of_each_batch():
    _, _, loader = make(fraction=0.1, shuffle=False)
    sizes = [len(b) for b in loader]
    assert sizes == [4, 4, 4, 4, 3]  # ceil(0.1*32) x4, ceil(0.1*22)
    assert loader.stats.samples_yielded == sum(sizes)


def test_rebatch_yields_full_batches_and_loses_nothing():
    ds, _, loader = make("topk", bs=32, fraction=0.3, rebatch=True)
    batches = list(loader)
    sizes = [len(b) for b in batches]
    selected = sum(math.ceil(0.3 * b - 1e-9) for b in [32, 32, 32, 32, 22])
    assert sizes[:-1] == [32] * (len(sizes) - 1) and sum(sizes) == selected
    assert len(loader) == len(batches) == math.ceil(selected / 32)
    idx = torch.cat([b.indices for b in batches])
    assert idx.unique().numel() == idx.numel()  # every selected sample exactly once
    for b in batches:  # a rebatched TopK batch is weighted 1/len, the remainder too
        torch.testing.assert_close(b.weights, torch.full((len(b),), 1 / len(b)))
        torch.testing.assert_close(b.inputs, ds.tensors[0][b.indices])
    check_accounting(loader.stats)


def test_rebatch_drop_last_counts_the_remainder():
    _, _, loader = make("uniform", bs=32, fraction=0.3, rebatch=True, drop_last=True)
    batches = list(loader)
    st = loader.stats
    assert all(len(b) == 32 for b in batches) and len(loader) == len(batches)
    assert st.samples_dropped == st.samples_selected - 32 * len(batches) > 0
    assert st.samples_yielded + st.samples_dropped == st.samples_selected


def test_rebatch_weights_estimate_the_mean():
    # Importance weights survive rebatching: sum(w) estimates 1 on average.
    _, _, loader = make("importance", bs=16, fraction=0.5, rebatch=True)
    sums = [float(b.weights.sum()) for _ in range(5) for b in loader if len(b) == 16]
    assert abs(np.mean(sums) - 1.0) < 0.15


def test_start_end_window_passes_full_batches_through():
    _, _, loader = make("topk", bs=50, fraction=0.2, start=0.5, end=0.75, epochs=4)
    scored = []
    for epoch in range(4):
        before = loader.stats.samples_scored
        sizes = [len(b) for b in loader]
        scored.append(loader.stats.samples_scored - before)
        if epoch == 2:
            assert sizes == [10, 10, 10]
        else:
            assert sizes == [50, 50, 50]
    assert scored == [0, 0, N, 0]
    check_accounting(loader.stats)


def test_passthrough_weights_are_one_over_b():
    _, _, loader = make(bs=50, start=0.0, end=0.0, epochs=1)
    b = next(iter(loader))
    torch.testing.assert_close(b.weights, torch.full((50,), 1 / 50))


def test_without_indices_uses_stream_positions():
    _, _, loader = make(indexed=False, shuffle=False, bs=50, fraction=1.0)
    idx = torch.cat([b.indices for b in loader])
    assert sorted(idx.tolist()) == list(range(N))


class NaNOn(nn.Module):
    """Features (and so logits and losses) are NaN for inputs whose first feature is > 1.5."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(DIM, CLASSES)

    def forward(self, x):
        return self.fc(torch.where(x[:, :1] > 1.5, torch.full_like(x, float("nan")), x))


def nan_loader(policy, strategy="topk"):
    ds = dataset()
    net = NaNOn()
    dl = DataLoader(sb.with_indices(ds), batch_size=50)
    return ds, sb.SelectiveLoader(dl, sb.ScoringHook(net), strategy=strategy, fraction=0.5, nan_policy=policy)


def test_nan_policy_raise_names_indices():
    ds, loader = nan_loader("raise")
    bad = (ds.tensors[0][:50, 0] > 1.5).nonzero().flatten().tolist()
    assert bad
    with pytest.raises(ValueError, match=r"non-finite loss.*dataset indices \[" + str(bad[0])):
        list(loader)


def test_nan_policy_skip_counts_and_excludes():
    ds, loader = nan_loader("skip")
    chosen = torch.cat([b.indices for b in loader])
    bad = set((ds.tensors[0][:, 0] > 1.5).nonzero().flatten().tolist())
    assert not bad & set(chosen.tolist())
    assert loader.stats.samples_skipped == len(bad)
    check_accounting(loader.stats)


def test_nan_policy_keep_keeps_candidates():
    ds, loader = nan_loader("keep")
    chosen = set(torch.cat([b.indices for b in loader]).tolist())
    bad = set((ds.tensors[0][:, 0] > 1.5).nonzero().flatten().tolist())
    assert bad <= chosen  # scored as the largest loss: TopK takes them
    assert loader.stats.samples_skipped == 0


def test_empty_batches_are_skipped():
    net = model()
    batches = [(torch.zeros(0, DIM), torch.zeros(0, dtype=torch.long)), (torch.randn(8, DIM), torch.arange(8) % 4)]
    loader = sb.SelectiveLoader(batches, sb.ScoringHook(net), fraction=0.5, seed=0)
    out = list(loader)
    assert [len(b) for b in out] == [4]
    assert loader.stats.batches_seen == 2


def test_dict_batches_and_device():
    net = model()
    batches = [{"inputs": torch.randn(8, DIM), "targets": torch.arange(8) % 4, "indices": torch.arange(100, 108)}]
    loader = sb.SelectiveLoader(batches, sb.ScoringHook(net), fraction=0.5, device="cpu", seed=0)
    (b,) = list(loader)
    assert b.indices.min() >= 100 and len(b) == 4


@pytest.mark.parametrize(
    "batch,err,match",
    [
        ((torch.randn(8, DIM), torch.arange(7) % 4), ValueError, "8 samples but targets have 7"),
        ((torch.randn(8, DIM), torch.arange(8) + 10), ValueError, "out of range"),
        ((torch.randn(8, DIM), torch.rand(8)), TypeError, "integer"),
        ((torch.randn(8, DIM),), TypeError, "batches must be"),
        ((torch.randn(8, DIM), torch.arange(8) % 4, torch.arange(5)), ValueError, "5 indices"),
    ],
)
def test_bad_batches(batch, err, match):
    loader = sb.SelectiveLoader([batch], sb.ScoringHook(model()), "topk", fraction=0.5)  # a strategy that scores
    with pytest.raises(err, match=match):
        list(loader)


@pytest.mark.parametrize(
    "kw,err,match",
    [
        (dict(fraction=0.0), ValueError, "fraction"),
        (dict(fraction=1.5), ValueError, "fraction"),
        (dict(start=0.5), ValueError, "epochs"),
        (dict(start=0.8, end=0.2, epochs=3), ValueError, "start"),
        (dict(nan_policy="ignore"), ValueError, "nan_policy"),
        (dict(strategy="nope"), ValueError, "unknown strategy"),
        (dict(batch_size=0), ValueError, "batch_size"),
    ],
)
def test_bad_arguments(kw, err, match):
    with pytest.raises(err, match=match):
        sb.SelectiveLoader([], sb.ScoringHook(model()), **kw)


def test_hook_type_checked():
    with pytest.raises(TypeError, match="ScoringHook"):
        sb.SelectiveLoader([], model())


def test_bernoulli_rebatch_length_unknown():
    _, _, loader = make(sb.SelectiveBackprop(mode="bernoulli"), rebatch=True)
    with pytest.raises(TypeError, match="variable count"):
        len(loader)


def test_weighted_loss():
    torch.testing.assert_close(sb.weighted_loss(torch.tensor([1.0, 3.0]), torch.tensor([0.25, 0.25])),
                               torch.tensor(1.0))
    with pytest.raises(ValueError, match="reduction='none'"):
        sb.weighted_loss(torch.tensor(1.0), torch.tensor(1.0))
    with pytest.raises(ValueError, match="same shape"):
        sb.weighted_loss(torch.ones(3), torch.ones(2))


def test_with_indices_checks_dataset():
    with pytest.raises(TypeError, match="map-style"):
        sb.with_indices(iter([]))
    ds = sb.with_indices([(1, 2), (3, 4)])
    assert ds[1] == (3, 4, 1) and len(ds) == 2


def test_same_seed_same_epoch():
    runs = []
    for _ in range(2):
        _, _, loader = make("sb", fraction=0.25)
        runs.append(torch.cat([b.indices for b in loader]))
    assert torch.equal(*runs)


def test_stats_reset_and_fraction():
    _, _, loader = make(fraction=0.5)
    list(loader)
    assert 0.45 < loader.stats.backprop_fraction < 0.55
    loader.stats.reset()
    assert loader.stats.samples_seen == 0 and loader.stats.residuals == []


def test_an_iterator_never_consumed_starts_no_epoch():
    """tqdm.auto calls iter() once ahead of the loop: that unused iterator must not claim an epoch."""
    _, _, loader = make("topk", bs=50, fraction=0.2, start=0.0, end=0.5, epochs=2)
    unused = iter(loader)
    assert loader.next_epoch == 0 and loader.current_epoch is None
    sizes = [len(b) for b in loader]  # epoch 0: selective
    assert sizes == [10, 10, 10] and loader.next_epoch == 1
    del unused
    from tqdm.asyncio import tqdm  # what tqdm.auto gives: its constructor calls iter(iterable)
    assert [len(b) for b in tqdm(loader, disable=True)] == [50, 50, 50]  # epoch 1: outside the window
    assert loader.next_epoch == 2


def test_two_live_iterators_of_one_loader_are_refused():
    _, _, loader = make("uniform", bs=50, fraction=0.2, rebatch=True)
    with pytest.raises(RuntimeError, match="superseded"):
        for _ in zip(loader, loader):
            pass
    assert [len(b) for b in loader] == [30]  # a fresh epoch afterwards runs normally (3 batches of 10 rebatched)


def test_a_one_shot_iterator_is_refused():
    def batches():
        yield torch.randn(8, DIM), torch.arange(8) % CLASSES

    with pytest.raises(TypeError, match="one-shot iterator"):
        sb.SelectiveLoader(batches(), sb.ScoringHook(model()))
    with pytest.raises(TypeError, match="one-shot iterator"):
        sb.SelectiveLoader(iter([]), sb.ScoringHook(model()))


def _loss_estimate_z(strategy, rebatch, epochs=600, n=256, bs=32):
    """z-score of the loader's loss estimate against the true mean loss of a fixed model, over many epochs.

    Per epoch e: d_e = sum over steps of sum_i w_i l_i  -  L * steps_e, whose mean is 0 when every step's
    weighted loss estimates the mean loss L (the ratio estimator of the pooled mean step loss).
    """
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 6, generator=g) * 2, torch.randint(0, 4, (n,), generator=g)
    torch.manual_seed(0)
    net = nn.Linear(6, 4)
    with torch.no_grad():
        losses = F.cross_entropy(net(x), y, reduction="none").double()
    dl = DataLoader(sb.with_indices(TensorDataset(x, y)), batch_size=bs, shuffle=True,
                    generator=torch.Generator().manual_seed(0))
    loader = sb.SelectiveLoader(dl, sb.ScoringHook(net), strategy, fraction=sb.strategies.fraction_for(strategy, 0.25),
                                rebatch=rebatch, batch_size=bs)
    d = []
    for _ in range(epochs):
        steps = [float((b.weights.double() * losses[b.indices]).sum()) for b in loader]
        d.append(sum(steps) - losses.mean().item() * len(steps))
    d = np.array(d)
    return d.mean() / (d.std(ddof=1) / np.sqrt(epochs))


@pytest.mark.parametrize("strategy,rebatch", [
    (lambda: sb.InfoBatch(prune=0.5, seed=1), True),
    (lambda: sb.InfoBatch(prune=0.5, seed=1), False),
    (lambda: sb.SelectiveBackprop(mode="bernoulli", unbiased=True, seed=1), True),
    (lambda: sb.SelectiveBackprop(mode="bernoulli", unbiased=True, seed=1), False),
    (lambda: sb.SelectiveBackprop(unbiased=True, seed=1), True),
    (lambda: sb.ImportanceSampling(replace=False, seed=1), True),
    (lambda: sb.Uniform(seed=1), True),
], ids=["infobatch-rebatch", "infobatch", "sb-bernoulli-rebatch", "sb-bernoulli", "sb-fixed-rebatch",
        "importance-rebatch", "uniform-rebatch"])
def test_unbiased_strategies_stay_unbiased_at_loader_level(strategy, rebatch):
    """Rebatching weighted a variable-count draw by its own count, which is correlated with what it kept:
    InfoBatch's estimate was +2% off (z = +4 here), unbiased Bernoulli SB's +6% (z = +12)."""
    assert abs(_loss_estimate_z(strategy(), rebatch)) < 3.5


def test_window_is_decided_per_batch_and_interrupt_alternates_full_batches():
    """Composer decides per batch from the elapsed share of training, and every interrupt-th batch is a full one."""
    _, _, loader = make("topk", bs=50, fraction=0.2, start=0.25, end=0.75, epochs=2, shuffle=False)
    # 3 batches an epoch: progress 0, 1/6, 1/3 | 1/2, 2/3, 5/6 -> selective for the last of epoch 0, first two of 1
    assert [[len(b) for b in loader] for _ in range(2)] == [[50, 50, 10], [10, 10, 50]]
    _, _, loader = make("uniform", bs=30, fraction=0.2, interrupt=2)  # 5 batches: selective, full, selective, ...
    assert [len(b) for b in loader] == [6, 30, 6, 30, 6]
    _, _, loader = make("uniform", bs=30, fraction=0.2, interrupt=2, rebatch=True)
    sizes = [len(b) for b in loader]
    assert sizes == [30, 30, 18] and len(loader) == 3  # full batches are steps of their own; 3 x 6 queued
    assert loader.stats.samples_yielded == 78 == loader.stats.samples_selected


def test_composer_preset():
    ds, net, _ = make()
    loader = sb.SelectiveLoader.composer(DataLoader(sb.with_indices(ds), batch_size=30), sb.ScoringHook(net), epochs=4)
    assert isinstance(loader.strategy, sb.ComposerRule)
    assert (loader.fraction, loader.start, loader.end, loader.interrupt) == (0.5, 0.5, 0.9, 2)
    sizes = [[len(b) for b in loader] for _ in range(4)]
    assert sizes[0] == sizes[1] == [30] * 5  # before start
    assert sizes[2] == [15, 30, 15, 30, 15]  # selective, interrupted every 2nd batch


def test_prime_trains_the_first_epochs_on_every_sample():
    _, _, loader = make("topk", bs=30, fraction=0.2, prime=2)
    assert len(loader) == 5 and not loader.is_selective(0) and not loader.is_selective(1) and loader.is_selective(2)
    epochs = [[(len(b), float(b.weights.sum())) for b in loader] for _ in range(3)]
    assert epochs[0] == epochs[1] == [(30, pytest.approx(1.0))] * 5  # whole batches, weights 1/B, unscored
    assert [n for n, _ in epochs[2]] == [6] * 5
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="prime must be an int >= 0"):
            make(prime=bad)


def test_selective_backprop_preset_is_the_authors_recipe():
    """Jiang et al.'s code: one primed epoch of full backprop, then Bernoulli keep-probabilities CDF(loss)**beta
    (prob_pow 3) over the last 1024 losses, and steps of full batches of kept rows (issue 31, item 13)."""
    ds, net, _ = make()
    loader = sb.SelectiveLoader.selective_backprop(DataLoader(sb.with_indices(ds), batch_size=30),
                                                   sb.ScoringHook(net), seed=0)
    strategy = loader.strategy
    assert isinstance(strategy, sb.BernoulliSelectiveBackprop)
    assert (strategy.beta, strategy.history, loader.prime, loader.rebatch, loader.fraction) == (3.0, 1024, 1, True,
                                                                                                None)
    first, second = [[len(b) for b in loader] for _ in range(2)]
    assert first == [30] * 5  # primed
    assert all(n == 30 for n in second[:-1]) and sum(second) < 150  # full batches of kept rows, and a tail
    fixed = sb.SelectiveLoader.selective_backprop(DataLoader(sb.with_indices(ds), batch_size=30),
                                                  sb.ScoringHook(net), fraction=0.2, seed=0)  # an exact budget
    assert type(fixed.strategy) is sb.SelectiveBackprop and fixed.strategy.beta == 1.0
    assert (fixed.fraction, fixed.prime, fixed.rebatch) == (0.2, 1, True)
    assert [[len(b) for b in fixed] for _ in range(2)] == [[30] * 5, [30]]  # primed, then 5 x 6 rows in one step


def test_uniform_has_no_losses_for_the_nan_policy_but_the_step_can_check():
    """Uniform runs no scoring pass, so nan_policy sees no loss: a non-finite input trains silently under the default
    'raise' (issue 22, item 6). The step's own loss can be checked (weighted_loss(indices=)); 'skip', a promise it
    cannot keep, is refused."""
    ds, loader = nan_loader("raise", strategy="uniform")
    net = loader.hook.model
    with pytest.raises(ValueError, match=r"non-finite loss for dataset indices \[\d+"):
        for b in loader:
            sb.weighted_loss(F.cross_entropy(net(b.inputs), b.targets, reduction="none"), b.weights, indices=b.indices)
    for name in ("uniform", sb.Uniform(seed=0)):
        with pytest.raises(ValueError, match="nan_policy='skip' cannot act with Uniform"):
            nan_loader("skip", strategy=name)
        with pytest.raises(ValueError, match="nan_policy='skip' cannot act with Uniform"):
            sb.BatchSelector(None, name, nan_policy="skip")
    x, y = ds.tensors[0][:8], ds.tensors[1][:8]
    with pytest.raises(ValueError, match="nan_policy='skip' cannot act with Uniform"):
        sb.select_batch(None, "uniform", (x, y), 0.5, nan_policy="skip")
    store = sb.ScoreStore(len(ds))  # with a store, uniform scores: the policy acts
    dl = DataLoader(sb.with_indices(ds), batch_size=50)
    skipping = sb.SelectiveLoader(dl, sb.ScoringHook(NaNOn()), "uniform", fraction=0.5, nan_policy="skip", store=store)
    assert not set(torch.cat([b.indices for b in skipping]).tolist()) & set(
        (ds.tensors[0][:, 0] > 1.5).nonzero().flatten().tolist())
    finite = torch.tensor([0.5, 1.0])
    assert float(sb.weighted_loss(finite, torch.tensor([0.5, 0.5]), indices=torch.tensor([3, 4]))) == 0.75
