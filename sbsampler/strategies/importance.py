"""Importance sampling by gradient norm (Katharopoulos & Fleuret 2018)."""

from __future__ import annotations

import numpy as np

from .. import kernels
from ..scores import Scores
from .base import (
    Seed,
    Selection,
    Strategy,
    _numpy,
)


class ImportanceSampling(Strategy):
    """Sampling proportional to last-layer gradient norm (Katharopoulos & Fleuret 2018).

    ``p_i = |g_i| / sum_j |g_j|``; weights ``1 / (B k p_i)`` make the weighted
    sub-batch loss an unbiased estimate of the minibatch mean loss.

    Args:
        replace: ``True`` draws ``k`` independent samples (repeats possible);
            ``False`` draws ``k`` distinct samples by systematic PPS sampling
            with inclusion probabilities ``pi_i = min(1, c p_i)`` and weights
            ``1 / (B pi_i)``.
        smoothing: mixes ``p`` with the uniform distribution,
            ``(1 - smoothing) p + smoothing / B``, which bounds the weights.
        seed: int or ``numpy.random.Generator``.
    """

    name = "importance"
    needs_gradients = True

    def __init__(self, replace: bool = True, smoothing: float = 0.0, seed: Seed = None) -> None:
        super().__init__(seed)
        if not (isinstance(smoothing, (int, float)) and 0.0 <= smoothing <= 1.0):
            raise ValueError(f"smoothing must be in [0, 1], got {smoothing!r}")
        self.replace = bool(replace)
        self.smoothing = float(smoothing)

    def probabilities(self, norms: np.ndarray) -> np.ndarray:
        """Sampling distribution from gradient norms (uniform if all are zero)."""
        b = norms.shape[0]
        total = norms.sum()
        p = norms / total if total > 0 else np.full(b, 1.0 / b)
        if self.smoothing:
            p = (1.0 - self.smoothing) * p + self.smoothing / b
        return p

    def _select(self, scores: Scores, loss: np.ndarray, k: int, rng: np.random.Generator) -> Selection:
        norms = _numpy(scores.grad_norms())
        if not np.isfinite(norms).all():
            raise ValueError("non-finite last-layer gradient norms")
        b = norms.shape[0]
        p = self.probabilities(norms)
        if self.replace:
            # Inverse-CDF draws: the law of rng.choice(p=p) without its per-call validation.
            cdf = np.cumsum(p)
            idx = np.sort(np.minimum(np.searchsorted(cdf, rng.random(k) * cdf[-1], side="right"), b - 1))
            return Selection(idx, 1.0 / (b * k * p[idx]))
        if np.count_nonzero(p) < k:  # too few non-zero norms for k distinct draws
            p = 0.5 * p + 0.5 / b
        pi = kernels.inclusion_probabilities(p, k)
        idx = np.sort(kernels.systematic_sample(pi, rng.permutation(b), rng.random()))
        return Selection(idx, 1.0 / (b * pi[idx]))

    def _params(self) -> str:
        return f"replace={self.replace}, smoothing={self.smoothing}"
