"""Full backprop as a strategy: every sample, no scoring pass."""

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


class Full(Strategy):
    """Full backprop as a strategy: every sample, ``w = 1/B``, no scoring pass (``k`` is ignored).

    ``SelectiveLoader(strategy="full")`` (or ``strategy=None``) trains on whole
    batches through the same loop as every other strategy; it is also what the
    loader uses outside its ``start``/``end`` window.
    """

    name = "full"
    needs_scores = False
    keeps_all = True
    selects_on_device = True
    uses_fraction = False
    count_rule = "it keeps every sample of every batch."

    def _select(self, scores: Any, loss: Optional[np.ndarray], k: int, rng: np.random.Generator) -> Selection:
        n = int(scores) if loss is None else loss.shape[0]
        return Selection(np.arange(n), _uniform_weights(n))

    def _select_tensors(self, scores: Optional[Scores], n: int, k: int, g: torch.Generator):
        idx = torch.arange(n, device=g.device)
        return idx, _equal_weights(idx, ondevice.work_dtype(g.device))
