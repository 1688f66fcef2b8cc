"""TopK: the k largest losses."""

from __future__ import annotations

import numpy as np
import torch

from .. import kernels, ondevice
from ..scores import Scores
from .base import (
    Selection,
    Strategy,
    _device_loss,
    _equal_weights,
    _uniform_weights,
)


class TopK(Strategy):
    """The ``k`` largest losses (ties to the lower position), ``w = 1/k``.

    Deterministic; the "ordered SGD" rule (Kawaguchi & Lu 2020). Composer's
    ``SelectiveBackprop`` is not this rule: it samples without replacement by
    loss *rank*, with probability growing as ``rank ** (1/keep - 1)``.
    """

    name = "topk"
    selects_on_device = True

    def _select(self, scores: Scores, loss: np.ndarray, k: int, rng: np.random.Generator) -> Selection:
        idx = kernels.top_k_indices(loss, k)
        return Selection(idx, _uniform_weights(k))

    def _select_tensors(self, scores: Scores, n: int, k: int, g: torch.Generator):
        loss = _device_loss(scores)
        idx = ondevice.top_k(loss, k)
        return idx, _equal_weights(idx, loss.dtype)
