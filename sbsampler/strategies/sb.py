"""Selective Backprop (Jiang et al. 2019): SelectiveBackprop and its Bernoulli form."""

from __future__ import annotations

import math
from typing import Any, Union

import numpy as np
import torch

from .. import kernels, ondevice
from ..checkpoint import read_array, require
from ..scores import Scores
from .base import (
    Seed,
    Selection,
    Strategy,
    _device_loss,
    _equal_weights,
    _numpy,
    _open_uniforms,
    _uniform_weights,
)


class SelectiveBackprop(Strategy):
    """Selective Backprop (Jiang et al. 2019, "Accelerating Deep Learning by Focusing on the Biggest Losers").

    Each sample's keep-probability is ``P_i = F(l_i) ** beta`` with ``F`` the
    empirical CDF ``P(L <= l)`` over the losses remembered (the last ``history``
    losses ``observe``d) together with the batch's own losses, so the largest
    loss in view has ``P = 1``; when the batch holds more than ``history``
    losses the CDF is taken over the batch alone. ``select`` does not change the
    history: ``SelectiveLoader`` shows the strategy each round's losses through
    ``observe`` after selecting (a ``SelectiveSampler`` never does, so there the
    CDF is over the stored losses it chooses from).

    Args:
        beta: selectivity; with a continuous loss distribution the expected
            kept fraction is ``1 / (beta + 1)`` in ``"bernoulli"`` mode.
        history: how many recent losses the CDF is taken over.
        mode: ``"fixed"`` draws exactly ``k`` without replacement, successively
            proportional to ``P_i`` (for equal-budget comparisons);
            ``"bernoulli"`` keeps each sample independently with probability
            ``P_i`` (the original; the count varies and ``k`` is ignored), and
            gives a ``BernoulliSelectiveBackprop``.
        unbiased: ``False`` (the paper) weights kept samples equally,
            ``1/count``; ``True`` uses Horvitz-Thompson weights ``1/(B pi_i)``
            with exact inclusion probabilities (``pi_i = P_i`` in bernoulli
            mode; systematic PPS sampling in fixed mode), an unbiased estimate.
        seed: int or ``numpy.random.Generator``.
    """

    name = "sb"
    keeps_history = True
    selects_on_device = True

    def __new__(cls, *args: Any, **kwargs: Any):
        unknown = sorted(set(kwargs) - {"beta", "history", "mode", "unbiased", "seed"})
        if (args and isinstance(args[0], (str, Strategy))) or unknown:
            got = f"keyword {unknown[0]}=" if unknown else f"{args[0]!r} as beta"
            raise TypeError(
                f"sbsampler.SelectiveBackprop is the strategy (beta, history, mode, unbiased, seed), and got {got}: "
                "for the Lightning callback use sbsampler.integrations.lightning.SelectiveBackpropCallback(strategy, "
                "fraction=...); for a loader, SelectiveLoader(loader, hook, 'sb', fraction=...)")
        mode = kwargs.get("mode", args[2] if len(args) > 2 else "fixed")
        if cls is SelectiveBackprop and mode == "bernoulli":
            cls = BernoulliSelectiveBackprop
        return super().__new__(cls)

    def __init__(
        self,
        beta: float = 1.0,
        history: int = 1024,
        mode: str = "fixed",
        unbiased: bool = False,
        seed: Seed = None,
    ) -> None:
        super().__init__(seed)
        if not (isinstance(beta, (int, float)) and beta >= 0 and math.isfinite(beta)):
            raise ValueError(f"beta must be a finite number >= 0, got {beta!r}")
        if isinstance(history, bool) or not isinstance(history, (int, np.integer)) or history < 1:
            raise ValueError(f"history must be a positive int, got {history!r}")
        if mode not in ("fixed", "bernoulli"):
            raise ValueError(f"mode must be 'fixed' or 'bernoulli', got {mode!r}")
        self.beta = float(beta)
        self.history = int(history)
        self.mode = mode
        self.unbiased = bool(unbiased)
        # The latest ``history`` losses, a tensor on the device of the losses last observed: losses
        # observed on a GPU stay there, for select_tensors' CDF with no host round trip.
        self._hist = torch.zeros(0, dtype=torch.float64)

    def recent_losses(self) -> np.ndarray:
        """The losses remembered (oldest first), a float64 NumPy copy."""
        return _numpy(self._hist).copy()

    def observe(self, losses: Union[np.ndarray, torch.Tensor]) -> None:
        """Remember losses, keeping the latest ``history`` of them (a tensor's stay on its device)."""
        t = losses.detach() if isinstance(losses, torch.Tensor) else torch.as_tensor(np.asarray(losses, np.float64))
        t = t.reshape(-1).to(ondevice.work_dtype(t.device))
        self._hist = torch.cat([self._hist.to(t.device, t.dtype), t])[-self.history :]

    def keep_probabilities(self, loss: np.ndarray) -> np.ndarray:
        """``CDF(loss) ** beta`` against the remembered losses alone (no update)."""
        return kernels.ecdf(_numpy(self._hist), np.ascontiguousarray(loss, dtype=np.float64)) ** self.beta

    def _ranked(self, loss: np.ndarray) -> np.ndarray:
        """``CDF(loss) ** beta`` against the remembered losses and the batch's own."""
        loss = np.ascontiguousarray(loss, dtype=np.float64)
        if self._hist.shape[0] == 0 or loss.shape[0] >= self.history:  # ranked against themselves alone
            return kernels.self_ecdf(loss) ** self.beta  # linear time: a plan over every stored loss
        reference = np.concatenate([_numpy(self._hist), loss])[-max(self.history, loss.shape[0]) :]
        return kernels.ecdf(reference, loss) ** self.beta

    def _ranked_tensors(self, loss: torch.Tensor) -> torch.Tensor:
        """``_ranked`` in torch ops on ``loss``'s device (the history moves there once, and stays)."""
        reference = torch.cat([self._hist.to(loss.device, loss.dtype), loss])[-max(self.history, loss.shape[0]) :]
        return ondevice.ecdf(reference, loss) ** self.beta

    def _select(self, scores: Scores, loss: np.ndarray, k: int, rng: np.random.Generator) -> Selection:
        b = loss.shape[0]
        p = self._ranked(loss)
        if self.unbiased:
            pi = kernels.inclusion_probabilities(p, k)
            idx = np.sort(kernels.systematic_sample(pi, rng.permutation(b), rng.random()))
            return Selection(idx, 1.0 / (b * pi[idx]))
        u = 1.0 - rng.random(b)  # in (0, 1]
        idx = kernels.top_k_indices(kernels.efraimidis_keys(p, u), k)  # the draws' set, sorted
        return Selection(idx, _uniform_weights(k))

    def warm_up(self) -> None:
        """Both of the ranking's kernels: against itself (an empty history) and against a history."""
        super().warm_up()
        kernels.ecdf(np.zeros(2), np.zeros(2))
        kernels.self_ecdf(np.zeros(2))

    def _select_tensors(self, scores: Scores, n: int, k: int, g: torch.Generator):
        loss = _device_loss(scores)
        p = self._ranked_tensors(loss)
        if self.unbiased:
            pi = ondevice.inclusion_probabilities(p, k)
            order = torch.randperm(n, generator=g, device=loss.device)
            u = torch.rand(1, generator=g, device=loss.device, dtype=loss.dtype)
            idx = torch.sort(ondevice.systematic_sample(pi, order, u, k)).values
            return idx, 1.0 / (n * pi[idx])
        idx = torch.sort(ondevice.sample_without_replacement(p, _open_uniforms(n, g, loss), k)).values
        return idx, _equal_weights(idx, loss.dtype)

    def state_dict(self) -> dict[str, Any]:
        """RNG state and the loss history (a float64 CPU tensor)."""
        return {**super().state_dict(), "history": self._hist.to("cpu", torch.float64).clone()}

    def _read_state(self, state: dict[str, Any]) -> dict[str, Any]:
        read = super()._read_state(state)
        require(state, ["history"], type(self).__name__)
        history = read_array(state["history"], "history", type(self).__name__)
        if not np.isfinite(history).all():
            raise ValueError(f"{type(self).__name__} state field 'history' holds non-finite losses")
        return {**read, "_hist": torch.from_numpy(history[-self.history:].copy())}

    def _params(self) -> str:
        return f"beta={self.beta}, history={self.history}, mode={self.mode!r}, unbiased={self.unbiased}"


class BernoulliSelectiveBackprop(SelectiveBackprop):
    """Selective Backprop as in the paper: each sample kept independently with probability ``P_i``.

    What ``SelectiveBackprop(mode="bernoulli")`` gives. The count varies (``k`` is
    ignored); the expected kept fraction is ``1 / (beta + 1)`` for continuous losses.
    """

    variable_count = True
    uses_fraction = False
    count_rule = ("it keeps each sample with probability CDF(loss)**beta, about 1 / (beta + 1) of a batch "
                  "(beta=3 keeps about 25%): set beta, or use mode='fixed' for an exact fraction.")

    def __init__(self, beta: float = 1.0, history: int = 1024, mode: str = "bernoulli", unbiased: bool = False,
                 seed: Seed = None) -> None:
        if mode != "bernoulli":
            raise ValueError(f"BernoulliSelectiveBackprop has mode 'bernoulli', got {mode!r}")
        super().__init__(beta, history, mode, unbiased, seed)

    def _select(self, scores: Scores, loss: np.ndarray, k: int, rng: np.random.Generator) -> Selection:
        b = loss.shape[0]
        p = self._ranked(loss)
        idx = np.flatnonzero(rng.random(b) < p)
        w = 1.0 / (b * p[idx]) if self.unbiased else _uniform_weights(idx.shape[0])
        return Selection(idx, w, expected=p.sum())

    def _select_tensors(self, scores: Scores, n: int, k: int, g: torch.Generator):
        loss = _device_loss(scores)
        p = self._ranked_tensors(loss)
        idx = (torch.rand(n, generator=g, device=loss.device, dtype=loss.dtype) < p).nonzero().flatten()  # the count
        w = 1.0 / (n * p[idx]) if self.unbiased else _equal_weights(idx, loss.dtype)
        return idx, w, p.sum()
