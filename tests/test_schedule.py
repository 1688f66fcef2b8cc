"""Progress in epochs and the learning-rate schedules that follow it (sbsampler.schedule)."""

import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import sbsampler as sb
from sbsampler.schedule import cosine, one_cycle, progress_lr


def setup(strategy="sb", rebatch=True, n=96, batch=8):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    ds = TensorDataset(torch.randn(n, 4), torch.randint(0, 3, (n,)))
    return model, sb.SelectiveLoader(DataLoader(ds, batch_size=batch), sb.ScoringHook(model), strategy,
                                     fraction=sb.strategies.fraction_for(strategy, 0.25), rebatch=rebatch, seed=0)


def test_progress_counts_wrapped_batches_in_epochs():
    _, loader = setup()
    assert loader.progress == 0.0
    seen = []
    for epoch in range(2):
        for _ in loader:
            seen.append(loader.progress)
        assert loader.progress == epoch + 1
    assert all(a < b for a, b in zip(seen, seen[1:]))  # strictly rising, steps of a rebatched epoch included
    assert seen[-1] == 2.0  # the tail step comes after the last wrapped batch


def test_progress_lr_ends_where_the_schedule_ends_whatever_the_step_count():
    """A rebatched variable-count epoch has a length nobody knows ahead; the schedule still reaches 0 at the end."""
    model, loader = setup(strategy="infobatch")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = progress_lr(opt, loader, cosine(3))
    lrs = []
    for _ in range(3):
        for _ in loader:
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
    assert lrs[0] == pytest.approx(0.1)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_weighted_batches_progress_follows_each_epochs_plan():
    ds = sb.with_indices(TensorDataset(torch.randn(64, 4), torch.randint(0, 3, (64,))))
    store = sb.ScoreStore(64)
    sampler = sb.SelectiveSampler(store, "uniform", fraction=0.5, seed=0)
    batches = sb.WeightedBatches(DataLoader(ds, batch_size=8, sampler=sampler), sampler)
    for epoch in range(2):
        sampler.set_epoch(epoch)
        n = len(batches)
        got = []
        for b in batches:
            got.append(batches.progress)
            store.update(b.indices, torch.rand(len(b)))
        assert got == [epoch + (i + 1) / n for i in range(n)]
    assert len(got) < 8  # the second epoch's plan is shorter than the first


def test_schedule_shapes():
    f = one_cycle(10, 2)
    assert f(0) == pytest.approx(1e-4) and f(2) == 1.0 and f(10) == 0.0 and f(6) == pytest.approx(0.5)
    g = cosine(4, final=0.1)
    assert g(0) == 1.0 and g(4) == pytest.approx(0.1) and g(2) == pytest.approx(0.55) and g(9) == pytest.approx(0.1)
    assert math.isclose(cosine(2)(1), 0.5)
    with pytest.raises(ValueError, match="peak_epoch"):
        one_cycle(5, 6)
    with pytest.raises(TypeError, match="progress"):
        progress_lr(torch.optim.SGD(nn.Linear(1, 1).parameters(), lr=1), [1, 2], cosine(1))
