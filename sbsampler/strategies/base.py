"""The base of every rule: ``Strategy`` (validation, the RNG, state), ``Selection``, ``budget``, and the
helpers the rules share (equal weights, the losses on their device, open uniforms)."""

from __future__ import annotations

import math
import numbers
from typing import Any, ClassVar, Optional, Union

import numpy as np
import torch

from .. import ondevice
from ..checkpoint import check_saved_by, check_version, require
from ..scores import Scores

Seed = Union[None, int, np.random.Generator]

#: version of the layout of ``Strategy.state_dict()`` (a state without one is read as version 0)
STATE_VERSION = 1


def check_fraction(fraction: Any, name: str = "fraction") -> float:
    """``fraction`` as a float, if it is a real number in (0, 1] (``0.25``, ``np.float32(0.25)``; not a bool, a
    string or NaN); else ``ValueError`` naming ``name``. Every kept share sbsampler takes is checked here."""
    if isinstance(fraction, bool) or not isinstance(fraction, numbers.Real) or not 0.0 < float(fraction) <= 1.0:
        raise ValueError(f"{name} must be a number in (0, 1], got {fraction!r}")
    return float(fraction)


def budget(fraction: float, batch_size: int) -> int:
    """Sub-batch size for ``fraction`` of ``batch_size``: ``ceil(fraction * B)``, at least 1 (``check_fraction``)."""
    return max(1, min(batch_size, math.ceil(check_fraction(fraction) * batch_size - 1e-9)))


#: the share of a batch kept when no ``fraction`` is given, for a rule whose count follows it
DEFAULT_FRACTION = 0.25


def resolve_fraction(fraction: Optional[float], strategy: "Strategy", default: float = DEFAULT_FRACTION,
                     ) -> Optional[float]:
    """The fraction a selection runs at: ``fraction`` checked, ``default`` when it is ``None``, and ``None`` for a
    rule whose count does not follow a fraction (``Strategy.uses_fraction`` false).

    Raises:
        ValueError: ``fraction`` is not a number in (0, 1], or it is given to a rule that chooses its own count
            (InfoBatch, Bernoulli Selective Backprop) or keeps every sample (Full): it would be ignored, and a
            report labelled with it would claim a share the rule never kept.
    """
    if fraction is None:
        return float(default) if strategy.uses_fraction else None
    budget(fraction, 1)  # a number in (0, 1]
    if not strategy.uses_fraction:
        raise ValueError(f"{strategy!r} does not keep a fraction of each batch: {strategy.count_rule} Leave "
                         f"fraction= out (it would be ignored: fraction={fraction!r} was given)")
    return float(fraction)


def count_for(fraction: Optional[float], n: int) -> int:
    """``k`` for a batch of ``n``: ``budget(fraction, n)``, or ``n`` for a rule that takes no fraction (``None``)."""
    return n if fraction is None else budget(fraction, n)


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
    #: whether its count follows ``fraction`` (``k = ceil(fraction B)``); a rule that chooses its own count or keeps
    #: every sample refuses a fraction given to it (``resolve_fraction``), saying what sets its share instead
    uses_fraction: ClassVar[bool] = True
    #: what sets the kept share of a rule with ``uses_fraction`` false (said when a fraction is refused)
    count_rule: ClassVar[str] = ""

    @property
    def signed_weights(self) -> bool:
        """Whether a weight can be negative (GradientMatching with ``nonneg=False``); a saved negative one is refused
        otherwise."""
        return False

    def __init__(self, seed: Seed = None) -> None:
        self.rng = _rng(seed)
        self._generators: dict[str, torch.Generator] = {}  # select_tensors' RNG, one per device
        self._generator_states: dict[str, torch.Tensor] = {}  # restored states for devices not used yet

    def warm_up(self) -> None:
        """Load (or, the first time on a machine, compile) the Numba kernels ``select`` runs, on a made-up batch, with
        no effect on the strategy (its own RNG and history are left alone). ``select_batch`` calls it once per
        process and class, outside the stage clock: a fresh process pays about 0.5 s for it (25 s to compile), which
        would otherwise be counted as the first batch's selection time and read as a cost of every step."""
        g = torch.Generator().manual_seed(0)
        scores = Scores(loss=torch.rand(64, generator=g), logit_grad=torch.randn(64, 10, generator=g),
                        features=torch.rand(64, 16, generator=g))
        if self.needs_reference:
            scores = scores.with_reference(torch.rand(64, generator=g, dtype=torch.float64))
        self.select(scores if self.needs_scores else 64, 16, rng=0)

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
            if not np.isfinite(loss.sum()):  # one pass; a NaN or an infinity (or an overflowing sum) is looked for
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

    def check_dataset_size(self, n: int) -> None:
        """Refuse per-sample tables of another size than a dataset of ``n`` samples (RhoLoss's reference losses);
        a no-op for a rule that keeps none. The loader and the sampler call it where they know ``n``."""

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

    @property
    def state_key(self) -> str:
        """Not a Lightning callback: a strategy passed in ``Trainer(callbacks=[...])`` is refused here, where
        Lightning first reads a callback's attribute, with what to pass instead."""
        raise TypeError(
            f"{self!r} is a selection strategy, not a Lightning callback: pass "
            f"sbsampler.integrations.lightning.SelectiveBackpropCallback({self!r}, ...) in Trainer(callbacks=[...]) "
            "(the strategy goes inside it)")

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
