"""Uniform: the baseline that matters."""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch

from .. import ondevice
from ..scores import Scores
from .base import (
    Selection,
    Strategy,
    _equal_weights,
    _uniform_weights,
)


class Uniform(Strategy):
    """``k`` samples uniformly at random without replacement, ``w = 1/k``.

    The baseline that matters: the weighted sub-batch gradient is an unbiased
    estimate of the minibatch mean gradient. It reads no scores, so a
    ``SelectiveLoader`` runs no scoring forward for it (a step costs the
    sub-batch step alone), and its draws are the same with or without ``Scores``.
    """

    name = "uniform"
    needs_scores = False
    selects_on_device = True

    def _select(self, scores: Any, loss: Optional[np.ndarray], k: int, rng: np.random.Generator) -> Selection:
        n = int(scores) if loss is None else loss.shape[0]
        idx = np.sort(rng.choice(n, size=k, replace=False))
        return Selection(idx, _uniform_weights(k))

    def _select_tensors(self, scores: Optional[Scores], n: int, k: int, g: torch.Generator):
        idx = torch.sort(torch.randperm(n, generator=g, device=g.device)[:k]).values
        return idx, _equal_weights(idx, ondevice.work_dtype(g.device))
