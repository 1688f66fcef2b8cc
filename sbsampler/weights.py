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

One refinement keeps rebatching unbiased: a variable-count draw (InfoBatch,
Bernoulli SB) keeps a random number of picks, correlated with the losses it keeps,
so its own ``n / k`` would bias the estimate (+2% and +6% measured). Its rows in
the rebatching queue take the samples per pick of the draws before it (this
epoch's, else the last epoch's) instead (``sbsampler.epoch``).
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
