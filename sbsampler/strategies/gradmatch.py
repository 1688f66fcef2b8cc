"""Gradient matching (Balles et al. 2023): a weighted subset matching the mean gradient."""

from __future__ import annotations

import math
from typing import ClassVar

import numpy as np
import torch

from .. import kernels
from ..scores import Scores
from .base import (
    Seed,
    Selection,
    Strategy,
    _rng,
    _uniform_weights,
)


class GradientMatching(Strategy):
    """The weighted subset whose last-layer gradient sum best matches the minibatch mean.

    Solves ``min_{|S| = k, w} || sum_{i in S} w_i g_i - mean_j g_j ||`` over the
    exact last-layer (weight and bias) gradients ``g_i = e_i (x) [h_i, 1]``,
    working only with their ``B x B`` Gram matrix (never the ``C (d + 1)``-wide
    gradients): orthogonal matching pursuit picks ``S`` (by largest positive
    correlation with the residual when ``nonneg``), then non-negative least
    squares on ``S`` sets the weights. The residual
    ``|sum w g - mean g| / |mean g|`` is reported in the result.

    When the budget is more than the pursuit can use (``k`` above the rank of the
    last-layer gradients, at most ``(C - 1)(d + 1)`` for cross-entropy; the mean
    already matched; nothing correlating positively), the pursuit stops at the
    atoms it could add, the rest of the budget is filled with random samples,
    and all ``k`` weights are fitted with a small ridge toward the uniform
    weights ``1/k`` (``FILL_RIDGE`` times the mean squared gradient norm). The fit
    stays near exact, the weights stay bounded (an unregularised fit on a
    singular block could sum to 1e4), and at ``k = B`` every sample gets ``1/B``.
    (Balles et al. 2023, "A Negative Result on Gradient Matching for Selective
    Backprop"; GradMatch, Killamsetty et al. 2021.)

    Args:
        reg: ridge penalty on the weights, relative to the mean squared
            gradient norm: adds ``reg * mean_i |g_i|^2 * |w|^2`` to the fit.
        nonneg: constrain weights to be ``>= 0`` (a negative weight would turn a
            sample's gradient step around).
        normalize: rescale the fitted weights to sum to 1. The fit usually
            sums to less than 1 (the subset's gradients add up to more than the
            mean), which acts as a smaller learning rate; ``True`` keeps the
            subset and its relative weights but the step size of the others.
            The reported residual is that of the returned weights.
        seed: for filling the budget when the pursuit stops early.
    """

    name = "gradmatch"
    needs_gradients = True
    works_from_stored = False  # needs the current gradients' Gram matrix
    #: ridge toward uniform weights when the pursuit stops short of ``k``, relative to the mean squared gradient norm
    FILL_RIDGE: ClassVar[float] = 1e-4

    def __init__(self, reg: float = 0.0, nonneg: bool = True, normalize: bool = False, seed: Seed = None) -> None:
        super().__init__(seed)
        self.normalize = bool(normalize)
        if not (isinstance(reg, (int, float)) and reg >= 0 and math.isfinite(reg)):
            raise ValueError(f"reg must be a finite number >= 0, got {reg!r}")
        self.reg = float(reg)
        self.nonneg = bool(nonneg)

    def _select(self, scores: Scores, loss: np.ndarray, k: int, rng: np.random.Generator) -> Selection:
        gram = scores.gram().detach().to("cpu", torch.float32).numpy()
        if not np.isfinite(gram).all():
            raise ValueError("non-finite values in the last-layer gradients (logit_grad or features)")
        return self.select_from_gram(gram, k, rng)

    def select_from_gram(self, gram: np.ndarray, k: int, rng: Seed = None) -> Selection:
        """Select from a precomputed (B, B) Gram matrix of per-sample gradients.

        float32 (what ``Scores.gram`` gives) runs the pursuit's dominant update
        at twice the speed of float64; the weights are always solved in float64.
        ``rng`` (default the strategy's own) fills the budget if the pursuit stops early.
        """
        rng = self.rng if rng is None else _rng(rng)
        if gram.dtype not in (np.float32, np.float64):
            gram = gram.astype(np.float64)
        gram = np.ascontiguousarray(gram)
        b = gram.shape[0]
        target = kernels.row_means(gram)  # <g_i, mean g>
        tnorm2 = float(target.mean())  # |mean g|^2
        ridge = self.reg * float(np.mean(np.diag(gram), dtype=np.float64))
        if tnorm2 <= 0.0:  # every gradient is zero: nothing to match
            idx = np.sort(rng.choice(b, size=k, replace=False))
            return Selection(idx, _uniform_weights(k), residual=0.0)
        dep_tol = 1e-4 if gram.dtype == np.float32 else 1e-10  # float32 round-off fakes independence below it
        chosen, w, _ = kernels.omp_gram(gram, target, k, self.nonneg, ridge, dep_tol)
        # Weights in float64 on the chosen block (also repairs float32 round-off).
        if chosen.shape[0] == k:
            sub = kernels.gather_gram(gram, chosen, ridge)
            if self.nonneg:
                w = kernels.nnls_gram(sub, target[chosen], w, 500, 1e-7)
            else:
                w = np.linalg.solve(sub + 1e-12 * np.trace(sub) / k * np.eye(k), target[chosen])
        else:  # the pursuit stopped short: fill the budget, fit all k with a ridge toward 1/k
            rest = np.setdiff1d(np.arange(b), chosen)
            chosen = np.concatenate([chosen, rng.choice(rest, size=k - chosen.shape[0], replace=False)])
            sub = kernels.gather_gram(gram, chosen, ridge)
            lam = self.FILL_RIDGE * float(np.mean(np.diag(gram), dtype=np.float64))
            uniform = np.full(k, 1.0 / k)
            fill_sub, fill_target = sub + lam * np.eye(k), target[chosen] + lam * uniform
            if self.nonneg:
                w = kernels.nnls_gram(fill_sub, fill_target, uniform, 2000, 1e-9)
            else:
                w = np.linalg.solve(fill_sub, fill_target)
        if self.normalize and w.sum() > 0:
            w = w / w.sum()
        if ridge:
            sub[np.diag_indices(k)] -= ridge
        err2 = float(w @ sub @ w - 2.0 * w @ target[chosen] + tnorm2)
        residual = math.sqrt(max(err2, 0.0) / tnorm2)
        order = np.argsort(chosen)
        return Selection(chosen[order], w[order], residual=residual)

    @property
    def signed_weights(self) -> bool:
        return not self.nonneg

    def _params(self) -> str:
        return f"reg={self.reg}, nonneg={self.nonneg}, normalize={self.normalize}"
