"""The law of rebatched steps over batches that differ (issue 22, item 1).

What "unbiased" means under rebatching (``sbsampler.weights``): every pick of an epoch is
weighted ``m_i / (rows * rho)`` with one samples-per-pick ``rho`` for the whole epoch, fixed
before the epoch's draws. So

- each batch's picks carry, in expectation, the share of the epoch's update that its samples
  carry in full training (``sum of its losses / rho``), however many rows it kept;
- the epoch's update counted by rows, ``sum over steps of rows * sum_i w_i l_i``, estimates
  ``picks * mean loss`` (``rho`` is the last epoch's candidates per expected pick: with a fixed
  model, the epoch's own).

The batches here differ on purpose (inputs scaled by ``1 + 0.5 j``): a variable-count rule keeps
more rows of some than of others, which is what broke the old rule (InfoBatch +5%, Bernoulli SB
-6%); with one repeated batch, or shuffled ones, it did not show.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sbsampler as sb

BATCHES, BS, DIM, CLASSES = 8, 64, 6, 4


def _data():
    g = torch.Generator().manual_seed(0)
    batches, xs, ys = [], [], []
    for j in range(BATCHES):
        x = torch.randn(BS, DIM, generator=g) * (1 + 0.5 * j)
        y = torch.randint(0, CLASSES, (BS,), generator=g)
        batches.append((x, y, torch.arange(j * BS, (j + 1) * BS)))
        xs.append(x)
        ys.append(y)
    torch.manual_seed(0)
    net = nn.Linear(DIM, CLASSES)
    with torch.no_grad():
        losses = F.cross_entropy(net(torch.cat(xs)), torch.cat(ys), reduction="none").double()
    return batches, net, losses


@functools.lru_cache(maxsize=None)
def _run(name, epochs, fraction=0.25):
    """Per epoch: rows-weighted sum of step losses, rows, each batch's part of that sum, plain sum, steps."""
    batches, net, losses = _data()
    rule = RULES[name]()
    loader = sb.SelectiveLoader(batches, sb.ScoringHook(net), rule, fraction=sb.strategies.fraction_for(rule, fraction),
                                rebatch=True, batch_size=BS)
    total, rows, per_batch, plain, steps = [], [], [], [], []
    for _ in range(epochs):
        t = k = p = 0.0
        s = 0
        part = np.zeros(BATCHES)
        for b in loader:
            contrib = (b.weights.double() * losses[b.indices]).numpy() * len(b)
            np.add.at(part, (b.indices // BS).numpy(), contrib)
            t += contrib.sum()
            p += contrib.sum() / len(b)
            k += len(b)
            s += 1
        total.append(t)
        rows.append(k)
        per_batch.append(part)
        plain.append(p)
        steps.append(s)
    return losses, np.array(total), np.array(rows), np.array(per_batch), np.array(plain), np.array(steps)


def _z(d):
    return d.mean(axis=0) / (d.std(axis=0, ddof=1) / np.sqrt(len(d)))


RULES = {
    "infobatch": lambda: sb.InfoBatch(prune=0.5, seed=1),
    "sb-bernoulli-unbiased": lambda: sb.SelectiveBackprop(mode="bernoulli", unbiased=True, seed=1),
    "sb-fixed-unbiased": lambda: sb.SelectiveBackprop(unbiased=True, seed=1),
    "importance": lambda: sb.ImportanceSampling(replace=False, seed=1),
    "uniform": lambda: sb.Uniform(seed=1),
}


@pytest.mark.parametrize("name", list(RULES))
def test_rebatched_epoch_estimates_the_mean_loss_over_batches_that_differ(name):
    """Rows-weighted over the epoch's steps, the weighted losses estimate the data's mean loss (z-test).

    The first epoch is left out: it has no epoch before it to take samples per pick from (its
    scale comes from its first draw; see ``sbsampler.weights``)."""
    losses, total, rows, _, _, _ = _run(name, 1200)
    d = (total - losses.mean().item() * rows)[1:]
    z = _z(d)
    assert abs(z) < 4, f"z = {z:.1f}: rebatched steps are biased by {d.mean() / total[1:].mean():+.2%}"


@pytest.mark.parametrize("name", ["infobatch", "sb-bernoulli-unbiased"])
def test_each_batch_carries_its_share_of_the_epoch(name):
    """Batch j's picks carry (sum of its losses) / rho of the epoch's rows-weighted update, the same rho for
    every batch, whether it kept many rows or few: the per-batch ratios agree (z-test for each batch)."""
    losses, _, _, per_batch, _, _ = _run(name, 1200)
    share = per_batch / losses.reshape(BATCHES, BS).sum(dim=1).numpy()  # an estimate of 1 / rho, per batch
    d = (share - share.mean(axis=1, keepdims=True))[1:]
    z = _z(d)
    assert np.abs(z).max() < 4.5, f"per-batch z = {np.round(z, 1)}"


def test_the_plain_mean_over_steps_is_not_the_estimand_for_any_rule():
    """Uniform at 0.3 keeps 20 of each batch of 64: two full steps, then a short one of the last 32 picks (batches 6
    and 7, whose losses are the largest here). Counted once per step, that short step weighs as much as a full one, so
    the plain mean over steps is off although every weight is right; counted by rows, it is not (as in full training
    with a short last batch)."""
    losses, total, rows, _, plain, steps = _run("uniform", 300, 0.3)
    assert set(steps) == {3} and set(rows) == {160}
    mu = losses.mean().item()
    assert abs(_z(total - mu * rows)) < 4
    assert _z(plain - mu * steps) > 5  # z = 8.4 with this seed
