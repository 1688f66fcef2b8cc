"""Selection strategies: map a minibatch's ``Scores`` to weighted sample indices.

Every strategy is a small object with one method,
``select(scores, k, rng=None) -> Selection(indices, weights)``, where ``indices``
is int64 (k,) positions in the minibatch and ``weights`` float32 (k,). The
sub-batch loss ``sum_i w_i * l_i`` estimates the mean loss of the whole minibatch
(exactly, in expectation, for the unbiased rules; as the paper defines it for the
others; ``sbsampler.weights`` says how the weights travel on to a step).

Strategies know nothing about models, loaders, ranks or devices. Their state (a
loss history, an RNG) is explicit: ``state_dict()`` / ``load_state_dict()``. A
strategy with a loss history remembers what it is shown through ``observe``,
once per round, by whoever drives it; ``select`` never changes the history.

What a strategy needs is declared on its class, and the loader and the sampler
read these facts instead of names:

=========================  ==========================================================
``needs_scores``           reads the scoring pass at all (``Full`` does not)
``needs_gradients``        reads last-layer gradient information (norms or the Gram)
``works_from_stored``      can choose from stored losses/norms (``SelectiveSampler``)
``keeps_history``          remembers past losses (``observe``)
``variable_count``         may return a count other than ``k``
``keeps_all``              every sample passes, ``k`` is ignored (no rebatching)
``sampler_scale``          a ``SelectiveSampler``'s default weight scale (``"step"``/``"epoch"``)
``selects_on_device``      has a torch-op rule (``sbsampler.ondevice``) that selects on the losses' device
``signed_weights``         may give a negative weight (a property: GradientMatching with ``nonneg=False``)
``needs_reference``        reads each sample's reference loss (``Scores.reference``, by dataset index)
=========================  ==========================================================

Two implementations of each loss-only rule follow the same law: ``select`` (NumPy
and the Numba kernels, on the host; draws from ``self.rng``) and
``select_tensors`` (torch ops on the losses' device, no host round trip; draws from
a ``torch.Generator`` on that device, seeded once from ``self.rng``). ``select_batch``
uses the second for losses on an accelerator (``select_on="auto"``).

======================  ===========  =====================================================
name                    class        rule
======================  ===========  =====================================================
``"uniform"``           Uniform      k without replacement, ``w = 1/k`` (the baseline)
``"topk"``              TopK         the k largest losses, ``w = 1/k``
``"sb"``                SelectiveBackprop  keep-probability ``CDF(loss)**beta`` (Jiang et al. 2019)
``"composer"``          ComposerRule       draw by loss rank, ``p ~ percentile**(1/keep - 1)`` (MosaicML Composer)
``"gradmatch"``         GradientMatching   weighted subset matching the mean gradient (OMP + NNLS)
``"importance"``        ImportanceSampling ``p ~ grad norm``, ``w = 1/(B k p)`` (Katharopoulos & Fleuret 2018)
``"infobatch"``         InfoBatch    drop below-mean losses w.p. r, up-weight the rest ``1/(1-r)`` (Qin et al. 2024)
``"full"``              Full         every sample, ``w = 1/B``, no scoring pass (full backprop)
======================  ===========  =====================================================
"""

from __future__ import annotations

import math
import numbers
from typing import Any, ClassVar, Optional, Union

import numpy as np
import torch

from . import kernels, ondevice
from .checkpoint import check_saved_by, check_version, read_array, require
from .scores import Scores

__all__ = [
    "Selection",
    "Strategy",
    "Uniform",
    "TopK",
    "SelectiveBackprop",
    "BernoulliSelectiveBackprop",
    "ComposerRule",
    "GradientMatching",
    "ImportanceSampling",
    "InfoBatch",
    "RhoLoss",
    "Full",
    "STRATEGIES",
    "get_strategy",
    "budget",
]

Seed = Union[None, int, np.random.Generator]

#: version of the layout of ``Strategy.state_dict()`` (a state without one is read as version 0)
STATE_VERSION = 1


def budget(fraction: float, batch_size: int) -> int:
    """Sub-batch size for ``fraction`` of ``batch_size``: ``ceil(fraction * B)``, at least 1.

    ``fraction`` may be any real number type (``0.25``, ``np.float32(0.25)``), not a bool.
    """
    if isinstance(fraction, bool) or not isinstance(fraction, numbers.Real) or not 0.0 < float(fraction) <= 1.0:
        raise ValueError(f"fraction must be a number in (0, 1], got {fraction!r}")
    return max(1, min(batch_size, math.ceil(float(fraction) * batch_size - 1e-9)))


class Selection(tuple):
    """``(indices, weights)`` plus optional diagnostics; unpacks as a 2-tuple.

    Attributes:
        indices: int64 (k,) positions in the minibatch.
        weights: float32 (k,) loss weights.
        residual: for GradientMatching, ``|sum_i w_i g_i - g_mean| / |g_mean|``
            over last-layer gradients; ``None`` for the other strategies.
        expected: a variable-count rule's expected count given the scores (the
            sum of its inclusion probabilities), which rebatching weights by
            (``sbsampler.weights``); ``None`` for a fixed count (it is ``k``).
    """

    residual: Optional[float]
    expected: Optional[float]

    def __new__(cls, indices: np.ndarray, weights: np.ndarray, residual: Optional[float] = None,
                expected: Optional[float] = None):
        self = super().__new__(
            cls,
            (np.ascontiguousarray(indices, dtype=np.int64), np.ascontiguousarray(weights, dtype=np.float32)),
        )
        self.residual = residual
        self.expected = None if expected is None else float(expected)
        return self

    @property
    def indices(self) -> np.ndarray:
        return self[0]

    @property
    def weights(self) -> np.ndarray:
        return self[1]


def _rng(seed: Seed) -> np.random.Generator:
    if isinstance(seed, np.random.Generator):
        return seed
    if seed is None or isinstance(seed, (int, np.integer)):
        return np.random.default_rng(seed)
    raise TypeError(f"seed must be None, an int or a numpy.random.Generator, got {type(seed).__name__}")


def _numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float64).numpy()


def _non_finite(count: int, positions: list) -> ValueError:
    return ValueError(f"{count} non-finite loss value(s) at batch positions {positions}; use nan_policy='skip' or "
                      "'keep' in SelectiveLoader")


def _device_key(device: Union[str, torch.device]) -> str:
    """``"cuda:0"`` for ``"cuda"`` (the current device), the device's own name otherwise."""
    device = torch.device(device)
    if device.index is None and device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    return str(device)


class Strategy:
    """Base class: validation, the RNG and (empty) state handling.

    Subclasses implement ``_select(scores, loss, k, rng) -> Selection`` where
    ``loss`` is the float64 NumPy copy of ``scores.loss``, already checked finite
    (``None`` for a strategy that needs no scores and was given a count).
    """

    name: ClassVar[str] = ""
    #: whether ``select`` reads the scoring pass at all
    needs_scores: ClassVar[bool] = True
    #: whether ``select`` reads gradient information (``grad_norms``/``gram``)
    needs_gradients: ClassVar[bool] = False
    #: whether it can choose from stored losses (and gradient norms) alone
    works_from_stored: ClassVar[bool] = True
    #: whether it remembers the losses it is shown through ``observe``
    keeps_history: ClassVar[bool] = False
    #: whether the returned count can differ from ``k``
    variable_count: ClassVar[bool] = False
    #: whether every sample passes (weights ``1/B``, ``k`` ignored)
    keeps_all: ClassVar[bool] = False
    #: a ``SelectiveSampler``'s default ``scale`` with this strategy (``"step"`` or ``"epoch"``)
    sampler_scale: ClassVar[str] = "step"
    #: whether ``select_tensors`` can choose with torch ops on the losses' device
    selects_on_device: ClassVar[bool] = False
    #: whether it reads each sample's reference loss (``Scores.reference``; ``reference_for`` looks them up)
    needs_reference: ClassVar[bool] = False

    @property
    def signed_weights(self) -> bool:
        """Whether a weight can be negative (GradientMatching with ``nonneg=False``); a saved negative one is refused
        otherwise."""
        return False

    def __init__(self, seed: Seed = None) -> None:
        self.rng = _rng(seed)
        self._generators: dict[str, torch.Generator] = {}  # select_tensors' RNG, one per device
        self._generator_states: dict[str, torch.Tensor] = {}  # restored states for devices not used yet

    def select(self, scores: Union[Scores, int], k: int, rng: Seed = None) -> Selection:
        """Choose ``k`` samples of the minibatch and their loss weights.

        Args:
            scores: the minibatch's ``Scores``; a strategy that does not read
                scores (``needs_scores`` false) also takes the batch size.
            k: the budget, in ``[1, B]``.
            rng: draw from this generator (or seed) instead of the strategy's
                own; the strategy's RNG is then left untouched.
        """
        given_count, _ = self._check_arguments(scores, k)
        loss = None
        if not given_count:
            loss = _numpy(scores.loss)
            bad = ~np.isfinite(loss)
            if bad.any():
                raise _non_finite(int(bad.sum()), np.flatnonzero(bad)[:10].tolist())
        return self._select(scores, loss, int(k), self.rng if rng is None else _rng(rng))

    def _check_arguments(self, scores: Union[Scores, int], k: int) -> tuple[bool, int]:
        """What ``select`` and ``select_tensors`` both check: ``(given a count, the batch size)``."""
        given_count = isinstance(scores, (int, np.integer)) and not isinstance(scores, bool)
        if given_count and self.needs_scores:
            raise TypeError(f"{self!r} reads the batch's scores: pass Scores, not a count")
        n = int(scores) if given_count else len(scores)
        if n == 0:
            raise ValueError("cannot select from an empty batch (0 samples)")
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
            raise TypeError(f"k must be an int, got {type(k).__name__}")
        if not 1 <= k <= n:
            raise ValueError(f"k must be in [1, {n}] for a batch of {n} samples, got k={k}")
        if not given_count and tuple(scores.loss.shape) != (n,):
            raise ValueError(f"scores.loss must have shape ({n},), got {tuple(scores.loss.shape)}")
        return given_count, n

    def _select(self, scores: Any, loss: Optional[np.ndarray], k: int, rng: np.random.Generator) -> Selection:
        raise NotImplementedError

    def select_tensors(self, scores: Union[Scores, int], k: int, device: Union[None, str, torch.device] = None,
                       rng: Seed = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``select``'s rule in torch ops on the losses' device: ``(indices int64 (k,), weights (k,))`` there.

        Same arguments and law as ``select`` (the draws come from a ``torch.Generator``
        on the device instead of ``self.rng``, so the picks differ from ``select``'s).
        A fixed-count rule reads nothing back to the host apart from this method's
        own check that the losses are finite; ``select_batch`` applies its NaN policy
        instead, with no host read on the way. A variable-count rule reads its count.

        Args:
            scores: the minibatch's ``Scores``, or the batch size for a strategy that reads no scores.
            k: the budget, in ``[1, B]``.
            device: where to select when ``scores`` is a count (default the CPU).
            rng: a seed or ``numpy.random.Generator`` for a one-off ``torch.Generator``;
                the strategy's own generators are then left untouched.
        """
        if not self.selects_on_device:
            raise TypeError(f"{self!r} has no on-device rule (selects_on_device is False); use select()")
        given_count, n = self._check_arguments(scores, k)
        if not given_count:
            device = scores.loss.device
            bad = ~torch.isfinite(scores.loss.detach())
            if bool(bad.any()):
                raise _non_finite(int(bad.sum()), bad.nonzero().flatten()[:10].tolist())
        device = torch.device("cpu" if device is None else device)
        picked = self._select_tensors(None if given_count else scores, n, int(k), self.device_generator(device, rng))
        return picked[0], picked[1]

    def device_generator(self, device: Union[str, torch.device], rng: Seed = None) -> torch.Generator:
        """The ``torch.Generator`` that ``select_tensors`` draws from on ``device``.

        Created at first use, seeded from ``self.rng`` (or from a state that
        ``load_state_dict`` restored); ``rng`` instead gives a fresh one seeded from it.
        """
        device = torch.device(device)
        if rng is not None:
            return torch.Generator(device=device).manual_seed(int(_rng(rng).integers(2**63)))
        key = _device_key(device)
        g = self._generators.get(key)
        if g is None:
            g = torch.Generator(device=device)
            saved = self._generator_states.pop(key, None)
            if saved is not None:
                g.set_state(saved)
            else:
                g.manual_seed(int(self.rng.integers(2**63)))
            self._generators[key] = g
        return g

    def _select_tensors(self, scores: Optional[Scores], n: int, k: int, g: torch.Generator) -> tuple:
        """The on-device rule: ``scores`` finite (``None`` when given a count), ``k`` in [1, n].

        Returns ``(indices, weights)``; a variable-count rule adds its expected count as a
        0-d tensor on the device (``Selection.expected``): ``(indices, weights, expected)``.
        """
        raise NotImplementedError

    def observe(self, losses: Union[np.ndarray, torch.Tensor]) -> None:
        """Remember a round's losses (a no-op unless ``keeps_history``)."""

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue identically: the RNG states (NumPy's, and any device generator's).

        Tensors and plain values only: loads with ``torch.load(weights_only=True)``.
        """
        generators = {**self._generator_states, **{k: g.get_state() for k, g in self._generators.items()}}
        return {"version": STATE_VERSION, "strategy": type(self).__name__, "rng": self.rng.bit_generator.state,
                "device_rng": generators}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` saved; a state of another strategy or a malformed one is refused unchanged."""
        self._apply_state(self._read_state(state))

    def _read_state(self, state: dict[str, Any]) -> dict[str, Any]:
        """Check ``state`` and read it into what ``_apply_state`` sets; changes nothing."""
        kind = type(self).__name__
        require(state, ["rng"], kind)
        check_version(state, kind, (0, STATE_VERSION), legacy=0)
        check_saved_by(state, "strategy", kind, kind)
        scratch = type(self.rng.bit_generator)()
        try:
            scratch.state = state["rng"]
        except (TypeError, ValueError, KeyError) as err:
            raise ValueError(f"{kind} state field 'rng' is not a {type(scratch).__name__} state: {err}") from err
        generators = {}
        for key, value in (state.get("device_rng") or {}).items():
            t = torch.as_tensor(value)
            if t.dtype != torch.uint8 or t.dim() != 1:
                raise ValueError(f"{kind} state field 'device_rng' for {key!r} must be a 1-D uint8 generator state, "
                                 f"got {t.dtype} of shape {tuple(t.shape)}")
            generators[str(key)] = t.clone()
        return {"rng": state["rng"], "_generators": {}, "_generator_states": generators}

    def _apply_state(self, read: dict[str, Any]) -> None:
        """Set what ``_read_state`` read (cannot fail)."""
        self.rng.bit_generator.state = read.pop("rng")
        for name, value in read.items():
            setattr(self, name, value)

    def _params(self) -> str:
        return ""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._params()})"


def _uniform_weights(k: int) -> np.ndarray:
    return np.full(k, 1.0 / k) if k else np.zeros(0)


def _equal_weights(idx: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``1/count`` for each of ``idx`` on its device (an empty vector for none)."""
    return torch.full(idx.shape, 1.0 / max(idx.shape[0], 1), dtype=dtype, device=idx.device)


def _device_loss(scores: Scores) -> torch.Tensor:
    loss = scores.loss.detach()
    return loss.to(ondevice.work_dtype(loss.device))


def _open_uniforms(n: int, g: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    """U(0, 1] numbers on ``like``'s device (for Efraimidis-Spirakis keys ``log(u) / w``)."""
    return 1.0 - torch.rand(n, generator=g, device=like.device, dtype=like.dtype)


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


class TopK(Strategy):
    """The ``k`` largest losses (ties to the lower position), ``w = 1/k``.

    Deterministic; the "ordered SGD" rule (Kawaguchi & Lu 2020). Composer's
    ``SelectiveBackprop`` is not this rule: it samples without replacement by
    loss *rank*, with probability growing as ``rank ** (1/keep - 1)``.
    """

    name = "topk"
    selects_on_device = True

    def _select(self, scores: Scores, loss: np.ndarray, k: int, rng: np.random.Generator) -> Selection:
        idx = np.sort(np.argsort(-loss, kind="stable")[:k])
        return Selection(idx, _uniform_weights(k))

    def _select_tensors(self, scores: Scores, n: int, k: int, g: torch.Generator):
        loss = _device_loss(scores)
        idx = ondevice.top_k(loss, k)
        return idx, _equal_weights(idx, loss.dtype)


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

    def __new__(cls, beta: float = 1.0, history: int = 1024, mode: str = "fixed", unbiased: bool = False,
                seed: Seed = None):
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
        idx = np.sort(kernels.sample_without_replacement(p, u, k))
        return Selection(idx, _uniform_weights(k))

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
        idx = np.sort(kernels.sample_without_replacement(p, u, k))
        return Selection(idx, _uniform_weights(k))

    def _select_tensors(self, scores: Scores, n: int, k: int, g: torch.Generator):
        loss = _device_loss(scores)
        p = ((ondevice.ranks(loss).to(loss.dtype) + 0.5) / n) ** (n / k - 1.0)
        idx = torch.sort(ondevice.sample_without_replacement(p, _open_uniforms(n, g, loss), k)).values
        return idx, _equal_weights(idx, loss.dtype)


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
        w = np.where(low[idx], 1.0 / (1.0 - self.prune), 1.0) / b
        return Selection(idx, w, expected=b - self.prune * low.sum())

    def _select_tensors(self, scores: Scores, n: int, k: int, g: torch.Generator):
        loss = _device_loss(scores)
        low = loss < loss.mean()
        drop = low & (torch.rand(n, generator=g, device=loss.device, dtype=loss.dtype) < self.prune)
        idx = (~drop).nonzero().flatten()  # reads the count
        one = torch.ones((), dtype=loss.dtype, device=loss.device)
        return idx, torch.where(low[idx], one / (1.0 - self.prune), one) / n, n - self.prune * low.sum(dtype=loss.dtype)

    def _params(self) -> str:
        return f"prune={self.prune}"


class RhoLoss(Strategy):
    """RHO-LOSS (Mindermann et al. 2022, "Prioritized Training on Points that are Learnable, Worth Learning, and
    Not Yet Learnt"): the ``k`` largest *reducible* losses, ``w = 1/k``.

    Reducible loss = the training model's loss - the sample's *irreducible* loss, the loss of a
    model trained on held-out data (``sbsampler.reference.reference_losses``), computed once and
    looked up by dataset index. A mislabelled or ambiguous sample has a high loss under both
    models, so its reducible loss is small and it is rarely picked; a learnable, not yet learnt
    sample has a high loss only under the training model. The reference code
    (``OATML/RHO-Loss``, ``reducible_loss_selection``) takes the top ``k`` of ``loss -
    irreducible`` and trains on the mean loss of those: the same rule, equal weights, ties to the
    lower position. Not a registered name: it needs its reference losses.

    Args:
        reference: the irreducible losses, by dataset index: a ``ScoreStore`` whose
            ``reference`` column is set (``ScoreStore.set_reference``), or an (N,) array or tensor.
        seed: unused (the rule is deterministic); for the common signature.
    """

    name = "rho"
    needs_reference = True
    selects_on_device = True

    def __init__(self, reference: Any = None, seed: Seed = None) -> None:
        super().__init__(seed)
        self.reference = reference

    def reference_for(self, indices: Union[np.ndarray, torch.Tensor]) -> torch.Tensor:
        """(B,) float64 reference losses of the dataset ``indices``; an error names any without one."""
        table = getattr(self.reference, "reference", self.reference)  # a ScoreStore, or the array itself
        if table is None:
            raise ValueError("RhoLoss needs reference losses: RhoLoss(reference=store) with store.set_reference("
                             "sb.reference.reference_losses(reference_model, loader, len(dataset))), or an array")
        table = torch.as_tensor(table.numpy() if isinstance(table, torch.Tensor) else np.asarray(table),
                                dtype=torch.float64)
        idx = torch.as_tensor(indices).to("cpu", torch.int64).reshape(-1)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= table.shape[0]):
            raise ValueError(f"dataset index {int(idx.max())} is out of range for {table.shape[0]} reference losses: "
                             "the batches need their dataset indices (sb.with_indices)")
        ref = table[idx]
        missing = torch.isnan(ref)
        if bool(missing.any()):
            raise ValueError(f"no reference loss for dataset indices {idx[missing][:10].tolist()}: compute them "
                             "for every training sample (sb.reference.reference_losses)")
        return ref

    def _reducible(self, scores: Scores, loss: Any) -> Any:
        if scores.reference is None:
            raise ValueError("RhoLoss reads Scores.reference: select through select_batch, SelectiveLoader or "
                             "SelectiveSampler, which look it up by dataset index (or use scores.with_reference)")
        ref = scores.reference
        return loss - (ref if isinstance(loss, torch.Tensor) else _numpy(ref))

    def _select(self, scores: Scores, loss: np.ndarray, k: int, rng: np.random.Generator) -> Selection:
        reducible = self._reducible(scores, loss)
        idx = np.sort(np.argsort(-reducible, kind="stable")[:k])
        return Selection(idx, _uniform_weights(k))

    def _select_tensors(self, scores: Scores, n: int, k: int, g: torch.Generator):
        loss = _device_loss(scores)
        idx = ondevice.top_k(self._reducible(scores, loss).to(loss.dtype), k)
        return idx, _equal_weights(idx, loss.dtype)


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

    def _select(self, scores: Any, loss: Optional[np.ndarray], k: int, rng: np.random.Generator) -> Selection:
        n = int(scores) if loss is None else loss.shape[0]
        return Selection(np.arange(n), _uniform_weights(n))

    def _select_tensors(self, scores: Optional[Scores], n: int, k: int, g: torch.Generator):
        idx = torch.arange(n, device=g.device)
        return idx, _equal_weights(idx, ondevice.work_dtype(g.device))


STRATEGIES: dict[str, type[Strategy]] = {
    "uniform": Uniform,
    "topk": TopK,
    "sb": SelectiveBackprop,
    "composer": ComposerRule,
    "gradmatch": GradientMatching,
    "importance": ImportanceSampling,
    "infobatch": InfoBatch,
    "full": Full,
}
_ALIASES = {"random": "uniform", "selective_backprop": "sb", "gradient_matching": "gradmatch"}


def get_strategy(strategy: Union[None, str, Strategy], seed: Seed = None) -> Strategy:
    """A strategy object from a registered name (or the object itself, unchanged).

    Names: ``"uniform"``, ``"topk"``, ``"sb"``, ``"composer"``, ``"gradmatch"``, ``"importance"``,
    ``"infobatch"``, ``"full"`` (aliases ``"random"``, ``"selective_backprop"``, ``"gradient_matching"``);
    ``None`` is ``Full()``. ``seed`` is passed to the constructor of a named strategy.
    """
    if isinstance(strategy, Strategy):
        return strategy
    if strategy is None:
        return Full(seed=seed)
    if isinstance(strategy, str):
        key = _ALIASES.get(strategy.lower(), strategy.lower())
        if key not in STRATEGIES:
            raise ValueError(f"unknown strategy {strategy!r}; choose one of {sorted(STRATEGIES)}")
        return STRATEGIES[key](seed=seed)
    raise TypeError(f"strategy must be a name or a Strategy object, got {type(strategy).__name__}")
