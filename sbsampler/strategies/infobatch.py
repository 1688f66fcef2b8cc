"""InfoBatch (Qin et al. 2024): drop below-mean losses at random, up-weight the rest."""

from __future__ import annotations

import numpy as np
import torch

from ..scores import Scores
from .base import (
    Seed,
    Selection,
    Strategy,
    _device_loss,
)


class InfoBatch(Strategy):
    """InfoBatch's rule (Qin et al. 2024, "InfoBatch: Lossless Training Speed Up by Unbiased Dynamic Data Pruning").

    Samples whose loss is below the mean loss are dropped at random with
    probability ``prune``; the kept ones among them are up-weighted by
    ``1 / (1 - prune)``, the others keep weight 1, so the weighted sum is an
    unbiased estimate of the full sum. Weights are divided by the number of
    candidates ``B`` (an estimate of the mean loss). The count varies and
    ``k`` is ignored: the expected kept share is ``1 - prune * P(loss < mean)``.

    The official code (``NUS-HPC-AI-Lab/InfoBatch``) keeps exactly
    ``int(keep * n_low)`` below-mean samples, weighted ``1 / keep``; this rule keeps
    each with probability ``keep`` instead, which makes the estimate exactly
    unbiased. As a ``SelectiveSampler`` strategy it follows the official weight
    scale by default (``sampler_scale = "epoch"``).

    Args:
        prune: probability of dropping a below-mean sample, in [0, 1).
        seed: int or ``numpy.random.Generator``.
    """

    name = "infobatch"
    variable_count = True
    uses_fraction = False
    count_rule = ("it drops below-mean losses with probability prune, so it keeps 1 - prune x (the share of losses "
                  "below the batch mean), about 1 - prune / 2 (InfoBatch(prune=0.5), the default, keeps about 75%; "
                  "prune=0.9 about 55%): set prune, and read the share it really kept in loader.stats.")
    selects_on_device = True
    sampler_scale = "epoch"  # the official code: kept samples 1/keep, the others 1, the plain batch mean

    def __init__(self, prune: float = 0.5, seed: Seed = None) -> None:
        super().__init__(seed)
        if not (isinstance(prune, (int, float)) and 0.0 <= prune < 1.0):
            raise ValueError(f"prune must be in [0, 1), got {prune!r}")
        self.prune = float(prune)

    def _select(self, scores: Scores, loss: np.ndarray, k: int, rng: np.random.Generator) -> Selection:
        b = loss.shape[0]
        low = loss < loss.mean()
        drop = low & (rng.random(b) < self.prune)
        idx = np.flatnonzero(~drop)
        w = np.where(low[idx], 1.0 / (1.0 - self.prune) / b, 1.0 / b).astype(np.float32)
        return Selection(idx, w, expected=b - self.prune * np.count_nonzero(low))

    def _select_tensors(self, scores: Scores, n: int, k: int, g: torch.Generator):
        loss = _device_loss(scores)
        low = loss < loss.mean()
        drop = low & (torch.rand(n, generator=g, device=loss.device, dtype=loss.dtype) < self.prune)
        idx = (~drop).nonzero().flatten()  # reads the count
        one = torch.ones((), dtype=loss.dtype, device=loss.device)
        return idx, torch.where(low[idx], one / (1.0 - self.prune), one) / n, n - self.prune * low.sum(dtype=loss.dtype)

    def _params(self) -> str:
        return f"prune={self.prune}"
