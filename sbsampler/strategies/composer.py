"""Composer's rule: draw by loss rank (MosaicML Composer's SelectiveBackprop)."""

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
    _open_uniforms,
    _uniform_weights,
)


class ComposerRule(Strategy):
    """MosaicML Composer's Selective Backprop rule (``select_using_loss``).

    Ranks the batch's losses (ascending), gives rank ``r`` the percentile
    ``(r + 0.5) / B`` and draws ``k`` samples without replacement, successively
    proportional to ``percentile ** (1/keep - 1)``; equal weights ``1/k`` (Composer
    trains on the kept samples' plain mean). ``keep`` is ``k / B``, the loader's
    fraction. This is SelectiveBackprop with ``beta = 1/keep - 1`` and the CDF over
    the current batch only, with mid-rank percentiles. Differences from Composer:
    the budget is ``ceil(keep * B)`` (Composer: ``int(keep * B)``) and tied losses
    rank by position (Composer's ``torch.argsort`` is not stable).

    For Composer's schedule (selection between ``start`` and ``end`` of training,
    every ``interrupt``-th batch a full one), use ``SelectiveLoader.composer``.

    Args:
        seed: int or ``numpy.random.Generator``.
    """

    name = "composer"
    selects_on_device = True

    def _select(self, scores: Scores, loss: np.ndarray, k: int, rng: np.random.Generator) -> Selection:
        b = loss.shape[0]
        rank = np.empty(b)
        rank[np.argsort(loss, kind="stable")] = np.arange(b)
        p = ((rank + 0.5) / b) ** (b / k - 1.0)
        u = 1.0 - rng.random(b)  # in (0, 1]
        idx = kernels.top_k_indices(kernels.efraimidis_keys(p, u), k)  # the draws' set, sorted
        return Selection(idx, _uniform_weights(k))

    def _select_tensors(self, scores: Scores, n: int, k: int, g: torch.Generator):
        loss = _device_loss(scores)
        p = ((ondevice.ranks(loss).to(loss.dtype) + 0.5) / n) ** (n / k - 1.0)
        idx = torch.sort(ondevice.sample_without_replacement(p, _open_uniforms(n, g, loss), k)).values
        return idx, _equal_weights(idx, loss.dtype)
