"""What a ``SelectiveLoader`` counts: samples in and out, where the time went, and whether selection pays.

The selection stages are timed by a ``Clock`` (``sbsampler.clock``); a GPU clock's
events are read when a time figure is read, which waits for them. The loop's own
step is timed between batches (``time_training``), which gives the estimate of the
time saved against full training and the ``SelectionCostWarning``.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Optional

import numpy as np

from .checkpoint import read_int, read_number
from .clock import STAGES, Clock

if TYPE_CHECKING:
    from .select import Selected

__all__ = ["LoaderStats", "read_stats", "SelectionCostWarning"]

MIN_STEPS_TO_WARN = 10  # steps measured before the estimate is trusted enough to warn


class SelectionCostWarning(UserWarning):
    """Selection costs more than it saves on this model and machine (``LoaderStats.estimated_time_saved < 0``)."""


_TIMES = tuple(f"time_{stage}" for stage in STAGES)


@dataclass
class LoaderStats:
    """Counters a user needs to see the saving. All cumulative until ``reset()``.

    Every sample that enters is accounted for:
    ``samples_seen == samples_selected + samples_not_selected + samples_skipped``,
    ``samples_yielded`` counts rows yielded for back-propagation (a sample drawn
    twice by sampling with replacement counts twice); with no repeats,
    ``samples_yielded + samples_dropped + samples_abandoned == samples_selected``
    once an epoch has ended. ``samples_padded`` counts the zero-weight repeats
    added under DDP (not included in ``samples_yielded``).
    """

    batches_seen: int = 0
    samples_seen: int = 0
    samples_scored: int = 0
    samples_selected: int = 0
    samples_not_selected: int = 0
    samples_skipped: int = 0  # non-finite losses under nan_policy="skip", empty batches
    samples_yielded: int = 0  # samples back-propagated, if every yielded batch is trained on
    samples_dropped: int = 0  # rebatching remainder dropped because drop_last=True
    samples_abandoned: int = 0  # left in the rebatching queue when an epoch was broken off
    samples_padded: int = 0  # zero-weight repeats added so that DDP ranks take equal steps
    steps: int = 0  # sub-batches yielded
    time_loading: float = 0.0  # waiting for the wrapped loader
    time_scoring: float = 0.0  # the scoring forward
    time_selecting: float = 0.0  # the NaN policy and the strategy
    time_gathering: float = 0.0  # gathering the chosen rows
    time_training: float = 0.0  # the loop's own time between steps (the training step), timed by the loader
    residuals: list = field(default_factory=list)  # GradientMatching fit per batch

    def __post_init__(self) -> None:
        self._clocks: list[Clock] = []  # GPU clocks not read yet (not a field: not in asdict or a state)
        self._warned = False  # SelectionCostWarning given (not a field)

    def __getattribute__(self, name: str) -> Any:
        if name in _TIMES and object.__getattribute__(self, "__dict__").get("_clocks"):  # read the GPU clocks first
            object.__getattribute__(self, "_settle")()
        return object.__getattribute__(self, name)

    def __getstate__(self) -> dict[str, Any]:  # copies and pickles: the GPU clocks read, not copied
        if self.__dict__.get("_clocks"):
            self._settle()
        return {k: v for k, v in self.__dict__.items() if k != "_clocks"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._clocks = []
        self.__dict__.setdefault("_warned", False)

    def _settle(self, wait: bool = True) -> list:
        """Add the GPU clocks' times (``wait=False``: only those done); returns, and drops, those left."""
        clocks, self._clocks = self._clocks, []
        left = []
        for clock in clocks:
            if left or not (wait or clock.done()):  # in order: a clock after an unfinished one waits too
                left.append(clock)
                continue
            seconds = clock.seconds
            for stage in STAGES:
                setattr(self, f"time_{stage}", getattr(self, f"time_{stage}") + seconds[stage])
        return left

    def record(self, picked: "Selected", batch_size: int) -> None:
        """Count one ``select_batch`` result on a batch of ``batch_size`` samples (not yet the rows yielded)."""
        if picked.scores is not None:
            self.samples_scored += batch_size
        self.samples_skipped += picked.skipped
        candidates = batch_size - picked.skipped
        if candidates:
            self.samples_selected += picked.distinct
            self.samples_not_selected += candidates - picked.distinct
        if picked.residual is not None:
            self.residuals.append(picked.residual)
        if picked.clock.cuda:  # read when a time figure is (no wait now)
            self._clocks.append(picked.clock)
            return
        seconds = picked.clock.seconds
        self.time_scoring += seconds["scoring"]
        self.time_selecting += seconds["selecting"]
        self.time_gathering += seconds["gathering"]

    @property
    def backprop_fraction(self) -> float:
        """Samples back-propagated per sample seen."""
        return self.samples_yielded / self.samples_seen if self.samples_seen else 0.0

    @property
    def selection_time(self) -> float:
        """Seconds spent scoring, selecting and gathering."""
        return self.time_scoring + self.time_selecting + self.time_gathering

    @property
    def step_time_per_sample(self) -> Optional[float]:
        """Seconds of the training step per back-propagated row (``time_training / samples_yielded``)."""
        if self.samples_yielded <= 0 or self.time_training <= 0:
            return None
        return self.time_training / self.samples_yielded

    @property
    def estimated_time_saved(self) -> Optional[float]:
        """Seconds saved against back-propagating every sample seen, estimated from the measured costs.

        ``(samples_seen - samples_yielded) * step_time_per_sample - selection_time``: the steps
        skipped, at the measured step cost per row, minus what scoring, selecting and gathering
        took. An estimate: a step on fewer rows rarely costs proportionally less (small batches
        use a GPU less well), so the true saving is at most this. ``None`` before a step was timed.
        """
        per = self.step_time_per_sample
        if per is None:
            return None
        return (self.samples_seen - self.samples_yielded) * per - self.selection_time

    @property
    def estimated_saving(self) -> Optional[float]:
        """``estimated_time_saved`` as a share of full training's estimated time for the same samples."""
        saved, per = self.estimated_time_saved, self.step_time_per_sample
        if saved is None or per is None or not self.samples_seen:
            return None
        return saved / (self.samples_seen * per)

    @property
    def break_even_fraction(self) -> Optional[float]:
        """The kept share below which selection saves time, by the cost model: ``1 - c / s`` with ``c`` the
        selection cost per sample seen and ``s`` the step cost per back-propagated row (``<= 0``: none pays)."""
        per = self.step_time_per_sample
        if per is None or not self.samples_seen:
            return None
        return 1.0 - (self.selection_time / self.samples_seen) / per

    def warn_if_costly(self, where: str = "SelectiveLoader") -> bool:
        """Warn once (``SelectionCostWarning``) when selection is estimated to cost more than it saves, after at
        least ``MIN_STEPS_TO_WARN`` timed steps; whether it warned now. Never raises."""
        if self._warned or self.steps < MIN_STEPS_TO_WARN:
            return False
        saved = self.estimated_time_saved
        if saved is None or saved >= 0:
            return False
        self._warned = True
        f, kept = self.break_even_fraction, self.backprop_fraction
        advice = (f"keep fewer than {f:.0%} of each batch" if f is not None and f > 0 else
                  "no fraction pays here: scoring a sample costs about as much as a step on it")
        warnings.warn(
            f"{where}: selection costs more than it saves on this model and machine: scoring, selecting and "
            f"gathering took {self.selection_time:.3g} s for {self.samples_seen} samples, and skipping "
            f"{self.samples_seen - self.samples_yielded} of them saved about "
            f"{self.selection_time + saved:.3g} s of steps (an estimated {saved:+.3g} s against training on "
            f"everything, keeping {kept:.0%}). To save time, {advice}, use strategy='uniform' (no scoring "
            "pass), select at the sampler level from stored losses, or train on everything "
            "(sbsampler.compare measures all of these on your model).", SelectionCostWarning, stacklevel=3)
        return True

    def reset(self) -> None:
        """Zero every counter."""
        fresh = LoaderStats()
        self._clocks = []
        for k, v in asdict(fresh).items():
            setattr(self, k, v)

    def as_dict(self, wait: bool = True) -> dict[str, Any]:
        """Counters and derived figures as a plain dict.

        ``wait=False`` (for logging every step on a GPU): the times count the batches whose
        GPU work has finished, without waiting for the others, which count at a later read.
        """
        left = [] if wait else self._settle(wait=False)
        try:
            d = asdict(self)
            selection = self.time_scoring + self.time_selecting + self.time_gathering
        finally:
            self._clocks = left + self._clocks
        d["selection_time"] = selection
        d.pop("residuals")
        d["backprop_fraction"] = self.backprop_fraction
        d["estimated_time_saved"] = self.estimated_time_saved
        d["estimated_saving"] = self.estimated_saving
        d["mean_residual"] = float(np.mean(self.residuals)) if self.residuals else None
        return d


def read_stats(state: Any, kind: str) -> LoaderStats:
    """``LoaderStats`` from ``asdict`` of one, checked: every counter there, counts whole and >= 0, times finite and
    >= 0, residuals finite, and the samples that entered accounted for (``seen == selected + not selected +
    skipped``)."""
    if not isinstance(state, dict):
        raise ValueError(f"{kind} state field 'stats' must be a dict, got {type(state).__name__}")
    fields = LoaderStats.__dataclass_fields__
    unknown = sorted(set(state) - set(fields))
    if unknown:
        raise ValueError(f"{kind} state field 'stats' holds unknown counters {unknown}")
    missing = sorted(set(fields) - set(state) - {"time_training"})  # time_training: newer than some states
    if missing:
        raise ValueError(f"{kind} state field 'stats' lacks the counters {missing}: it was not saved by "
                         f"{kind}.state_dict()")
    values: dict[str, Any] = {}
    for name, value in state.items():
        if name == "residuals":
            if not isinstance(value, (list, tuple)):
                raise ValueError(f"{kind} state field 'stats.residuals' must be a list of numbers")
            values[name] = [read_number(r, "stats.residuals", kind) for r in value]
        elif fields[name].type == "int":
            values[name] = read_int(value, f"stats.{name}", kind)
        else:
            values[name] = read_number(value, f"stats.{name}", kind)
    entered = values["samples_selected"] + values["samples_not_selected"] + values["samples_skipped"]
    if values["samples_seen"] != entered:
        raise ValueError(f"{kind} state field 'stats' does not add up: samples_seen {values['samples_seen']} != "
                         f"selected + not selected + skipped = {entered}")
    return LoaderStats(**values)
