"""The weights rule: the same picks through the per-batch, rebatch and sampler paths, checked against step_weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import sbsampler as sb
from sbsampler.weights import step_weights

PICKS = np.array([1, 4, 6])
W = np.array([0.2, 0.5, 0.3])  # the strategy's weights for its picks: they estimate the batch mean


class FixedPicks(sb.Strategy):
    """Always picks positions PICKS of whatever it is given, with weights W (unequal on purpose)."""

    name = "fixed_picks"
    needs_scores = True

    def _select(self, scores, loss, k, rng):
        return sb.Selection(PICKS, W)


def _batches(n_batches=3, b=8):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(b, 4, generator=g), torch.randint(0, 3, (b,), generator=g), torch.arange(j * b, (j + 1) * b))
            for j in range(n_batches)]


def _loader(**kw):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    return sb.SelectiveLoader(_batches(), sb.ScoringHook(model), FixedPicks(), fraction=3 / 8, **kw)


def test_step_weights_is_multiplier_over_rows_times_samples_per_pick():
    m = torch.tensor([2.0, 4.0, 6.0])
    torch.testing.assert_close(step_weights(m, 4.0), m / 12)
    torch.testing.assert_close(step_weights(m, torch.tensor([1.0, 2.0, 3.0])), torch.tensor([2 / 3, 2 / 3, 2 / 3]))
    np.testing.assert_allclose(step_weights(np.full(5, 20 / 5), 20 / 5), np.full(5, 0.2))  # uniform: 1/k
    with pytest.raises(ValueError, match="at least one pick"):
        step_weights(torch.zeros(0), 1.0)


def test_per_batch_step_keeps_the_strategys_weights():
    steps = list(_loader())
    assert len(steps) == 3
    for j, step in enumerate(steps):
        assert step.indices.tolist() == (PICKS + 8 * j).tolist()
        m, per_pick = torch.tensor(W * 8, dtype=torch.float32), 8 / 3  # 3 picks stand for the 8 samples
        torch.testing.assert_close(step.weights, step_weights(m, per_pick))
        torch.testing.assert_close(step.weights, torch.tensor(W, dtype=torch.float32))


def test_rebatched_steps_weight_each_row_against_its_own_batch():
    steps = list(_loader(rebatch=True, batch_size=4))
    assert [len(s) for s in steps] == [4, 4, 1]  # 9 picks from 3 batches, steps of 4
    rows = np.concatenate([s.indices.numpy() for s in steps])
    assert rows.tolist() == [p + 8 * j for j in range(3) for p in PICKS]
    m = np.tile(W * 8, 3)  # multiplier of each pick, in queue order
    start = 0
    for s in steps:
        part = m[start:start + len(s)]
        expected = step_weights(torch.tensor(part, dtype=torch.float32), 8 / 3)
        torch.testing.assert_close(s.weights, expected)
        start += len(s)
    torch.testing.assert_close(steps[0].weights, torch.tensor([0.2, 0.5, 0.3, 0.2]) * 3 / 4)


def test_sampler_plan_weights_each_row_against_the_plan():
    n = 8
    store = sb.ScoreStore(n)
    store.update(np.arange(n), np.linspace(0.1, 1.0, n))  # everything fresh: the strategy picks among all 8
    sampler = sb.SelectiveSampler(store, FixedPicks(), fraction=3 / 8, shuffle=False)
    sampler.set_epoch(1)
    x, y = torch.randn(n, 4), torch.randint(0, 3, (n,))
    batches = sb.WeightedBatches(DataLoader(sb.with_indices(TensorDataset(x, y)), batch_size=2, sampler=sampler),
                                 sampler)
    got = list(batches)
    assert [b.indices.tolist() for b in got] == [[1, 4], [6]]
    mult = dict(zip(PICKS.tolist(), (W * n).tolist()))  # the plan: 3 picks standing for the 8 samples
    for b in got:
        m = torch.tensor([mult[i] for i in b.indices.tolist()])
        torch.testing.assert_close(b.weights, step_weights(m, n / 3).float())
    torch.testing.assert_close(got[1].weights, torch.tensor([0.3 * 8 / (n / 3)]))
