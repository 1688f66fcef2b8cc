"""The weights rule, in one place.

A training step's loss is ``sum_i w_i l_i`` (``weighted_loss``). Its weights are
made so that this sum estimates **the mean loss of the samples the step stands
for**, and **sum to 1** (exactly for rules that weight their picks equally, in
expectation for the unbiased estimators; GradientMatching's fitted weights are
the one exception: they solve the matching problem and usually sum to less,
unless ``normalize=True``).

Every path gets there through one conversion, ``step_weights``:

- A *draw* picks ``k`` samples to stand for ``n`` samples: a strategy's selection
  in one batch (``n`` = the batch's candidates), or a ``SelectiveSampler``'s plan
  for an epoch (``n`` = the dataset). Each pick's **multiplier** ``m_i`` is how
  many of those ``n`` samples it stands for (``m_i = w_i n`` for a strategy's
  weights ``w``; uniform: ``n / k``). The draw's **samples per pick** is
  ``n / k``, the multipliers' mean in expectation.
- A step of ``rows`` picks, each from some draw, gets
  ``w_i = m_i / (rows * per_pick_i)`` (zero-weight DDP padding rows are not
  picks and do not count).

So a step that is one whole draw (per batch, no rebatching) keeps the strategy's
own weights; a rebatched step mixes picks of several batches, each weighted
relative to its own batch; and a ``WeightedBatches`` step over a sampler's plan
weights each pick by its multiplier relative to the plan's mean.

**Rebatching a variable-count rule** (InfoBatch, Bernoulli SB): a draw keeps a
random number of picks, correlated with the losses it keeps, and batches whose
losses differ keep different numbers of rows. Weighting each draw by its own
``n / k`` (or by a ratio that changes from batch to batch) gives a batch that keeps
more rows more of the epoch's update (InfoBatch +5%, Bernoulli SB -6% over batches
of different loss levels). So every pick of a rebatched epoch takes **one** samples
per pick ``rho``, fixed before the epoch's draws: the last epoch's candidates per
*expected* pick (a draw's expected count given its losses, ``Selection.expected``,
e.g. ``sum p_i``), or in the first epoch that draws, its first draw's (``sbsampler.epoch``).
What holds then, for a rebatched epoch of steps ``s`` with ``rows_s`` picks each:

- ``E[sum_s rows_s * sum_i w_i l_i] = (sum of the epoch's losses) / rho``: each
  batch's picks carry its samples' share of the epoch's update, however many rows
  it kept, as in full training (a short last step counts by its rows, as full
  training's short last batch does);
- when the keep rate is steady (``rho`` equals the epoch's own expected samples per
  pick), that is ``E[picks] * mean loss``: the rows-weighted mean of the steps'
  losses estimates the mean loss without bias. A keep rate that drifts from one
  epoch to the next scales every weight of the epoch by the same factor.

Under DDP each rank keeps its own ``rho`` (its shard's keep rate; random shards
of one dataset keep about the same).

The plain mean over steps (each step counted once, whatever its rows) is not the
estimand: over a fixed batch order, the short last step holds the last batches'
rows, for every rule alike. ``tests/test_rebatch_law.py`` checks the two statements,
and shows the plain mean off for uniform.
"""

from __future__ import annotations

from typing import Union

import numpy as np
import torch

__all__ = ["step_weights"]

Array = Union[torch.Tensor, np.ndarray]


def step_weights(multipliers: Array, per_pick: Union[Array, float]) -> Array:
    """Loss weights of one step: ``w_i = m_i / (rows * per_pick_i)``, ``rows = len(multipliers)``.

    Args:
        multipliers: (rows,) how many samples of its draw each pick of the step
            stands for (repeats of a pick drawn with replacement count as rows).
        per_pick: samples per pick of the draw each pick came from (``n / k``):
            one number, or one per pick.

    Returns:
        The weights, of the type (and device) of ``multipliers``.
    """
    rows = len(multipliers)
    if rows < 1:
        raise ValueError("a step needs at least one pick")
    return multipliers / (per_pick * rows)
