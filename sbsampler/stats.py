"""What a ``SelectiveLoader`` counts: samples in and out, where the time went, and whether selection pays.

The selection stages are timed by a ``Clock`` (``sbsampler.clock``); a GPU clock's
events are read when a time figure is read, which waits for them. The loop's own
step is timed between batches (``time_training``, and each step with its rows in
``steps_timed``), which gives the estimate of the time saved against full training
(``sbsampler.saving``: a range, and a point where the steps say enough) and the
``SelectionCostWarning``. ``print(stats)`` says it all in a few lines.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

import numpy as np

from .checkpoint import read_int, read_number
from .clock import STAGES, Clock
from .saving import SavingEstimate, StepCosts, estimate_saving

if TYPE_CHECKING:
    from .select import Selected

__all__ = ["LoaderStats", "read_stats", "SelectionCostWarning"]

MIN_STEPS_TO_WARN = 10  # steps measured before the estimate is trusted enough to warn


class SelectionCostWarning(UserWarning):
    """Selection costs more than it saves on this model and machine (even the most it can have saved,
    ``LoaderStats.saving_estimate().high``, is below 0)."""


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
    steps_timed: StepCosts = field(default_factory=StepCosts)  # each timed step's rows and seconds (moments)
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

    def record_step(self, rows: int, seconds: float) -> None:
        """The loop's training step on a yielded sub-batch of ``rows`` rows took ``seconds``."""
        self.time_training += seconds
        self.steps_timed.add(rows, seconds)

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

    def saving_estimate(self) -> Optional[SavingEstimate]:
        """Seconds saved against back-propagating every sample seen: a range ``[low, high]``, a ``point`` where the
        timed steps say enough, and its ``basis`` (``sbsampler.saving``); ``None`` before a step was timed.

        A whole batch's step is not measured in a selective run, so it is bounded by the timed steps (a cost
        fixed per step, or proportional to its rows) and, when the steps differ in size, fitted as
        ``a + b · rows``. ``high`` is what the old single figure said (proportional): the saving is at most that.
        """
        return estimate_saving(self.steps_timed, self.batches_seen, self.samples_seen, self.selection_time)

    @property
    def estimated_time_saved(self) -> Optional[float]:
        """The point of ``saving_estimate()``: seconds saved against back-propagating every sample seen, where the
        timed steps pin it within ±25%; ``None`` otherwise (read ``saving_estimate()`` for its range)."""
        estimate = self.saving_estimate()
        return estimate.point if estimate is not None else None

    @property
    def estimated_saving(self) -> Optional[float]:
        """``estimated_time_saved`` as a share of full training's estimated time for the same samples."""
        estimate = self.saving_estimate()
        if estimate is None or estimate.point is None:
            return None
        full = self.batches_seen * estimate.full_step_s
        return estimate.point / full if full > 0 else None

    @property
    def break_even_fraction(self) -> Optional[float]:
        """The kept share below which selection saves time, by the cost model: ``1 - c / s`` with ``c`` the
        selection cost per sample seen and ``s`` the step cost per back-propagated row: the fitted per-row cost
        where the steps pin it (more than two standard errors above 0), else the mean step per row, which makes
        this an upper bound (a slope that is noise made two identical runs say 'none' and '0.53'); ``<= 0``:
        none pays."""
        per = self.step_time_per_sample
        if per is None or not self.samples_seen:
            return None
        fitted = self.steps_timed.fit()
        if fitted is not None and fitted[1] > 2 * math.sqrt(fitted[2] / fitted[3]):
            per = fitted[1]
        return 1.0 - (self.selection_time / self.samples_seen) / per

    def warn_if_costly(self, where: str = "SelectiveLoader") -> bool:
        """Warn once (``SelectionCostWarning``) when selection is estimated to cost more than it saves, after at
        least ``MIN_STEPS_TO_WARN`` timed steps; whether it warned now. Never raises."""
        if self._warned or self.steps < MIN_STEPS_TO_WARN:
            return False
        if self.samples_yielded >= self.samples_seen and self.selection_time <= 0:
            return False  # nothing skipped and nothing spent choosing (full backprop): no selection to weigh
        estimate = self.saving_estimate()
        if estimate is None or estimate.high >= -1e-9 * max(1.0, self.time_training):
            return False  # a saving of -1e-16 s is rounding, not a cost
        saved = estimate.high
        self._warned = True
        f, kept = self.break_even_fraction, self.backprop_fraction
        advice = (f"keep fewer than {f:.0%} of each batch" if f is not None and f > 0 else
                  "no fraction pays here: scoring a sample costs about as much as a step on it")
        warnings.warn(
            f"{where}: selection costs more than it saves on this model and machine: scoring, selecting and "
            f"gathering took {self.selection_time:.3g} s for {self.samples_seen} samples, and skipping "
            f"{self.samples_seen - self.samples_yielded} of them saved at most "
            f"{self.selection_time + saved:.3g} s of steps (at most {saved:+.3g} s against training on "
            f"everything, keeping {kept:.0%}). To save time, {advice}, use strategy='uniform' (no scoring "
            "pass), select at the sampler level from stored losses, or train on everything "
            "(sbsampler.compare measures all of these on your model).", SelectionCostWarning, stacklevel=3)
        return True

    def reset(self) -> None:
        """Zero every counter."""
        fresh = LoaderStats()
        self._clocks = []
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(fresh, name))

    def as_dict(self, wait: bool = True) -> dict[str, Any]:
        """Counters and derived figures as a plain dict.

        ``wait=False`` (for logging every step on a GPU): the times count the batches whose
        GPU work has finished, without waiting for the others, which count at a later read.
        """
        left = [] if wait else self._settle(wait=False)
        try:  # everything read from the clocks is read here, while the unfinished ones are set aside
            d = self.state()
            estimate = self.saving_estimate()
            d["selection_time"] = self.selection_time
            d["estimated_saving"] = self.estimated_saving
            d["break_even_fraction"] = self.break_even_fraction
        finally:
            self._clocks = left + self._clocks
        d.pop("residuals")
        d["backprop_fraction"] = self.backprop_fraction
        d["estimated_time_saved"] = estimate.point if estimate is not None else None
        d["estimated_time_saved_low"] = estimate.low if estimate is not None else None
        d["estimated_time_saved_high"] = estimate.high if estimate is not None else None
        d["estimate_basis"] = estimate.basis if estimate is not None else None
        d["mean_residual"] = float(np.mean(self.residuals)) if self.residuals else None
        return d

    def state(self) -> dict[str, Any]:
        """The counters as plain values (a loader's or selector's state; ``read_stats`` reads it back)."""
        d = {name: getattr(self, name) for name in self.__dataclass_fields__}
        d["steps_timed"] = self.steps_timed.as_list()
        d["residuals"] = list(self.residuals)
        return d

    def __str__(self) -> str:
        """A few plain lines: the kept share, the time per stage, the estimated saving with its basis, the
        break-even fraction."""
        if not self.samples_seen:
            return "no sample seen yet"
        lines = [f"kept {self.backprop_fraction:.0%}: {self.samples_yielded:,} of {self.samples_seen:,} samples "
                 f"seen back-propagated, in {self.steps:,} steps"]
        times = ", ".join(f"{stage} {getattr(self, f'time_{stage}'):.3g} s" for stage in ("loading",) + STAGES)
        lines.append(f"time: {times}, training step {self.time_training:.3g} s")
        estimate = self.saving_estimate()
        if estimate is not None:
            head = (f"{estimate.point:+.3g} s" if estimate.point is not None else
                    f"{estimate.low:+.3g} to {estimate.high:+.3g} s")
            lines.append(f"estimated time saved against training on everything: {head}")
            lines.append(f"  ({estimate.basis})")
        f = self.break_even_fraction
        if f is not None:
            lines.append(f"break-even fraction: {f:.2f} (selection can save time only while keeping less than this)"
                         if f > 0 else "break-even fraction: none (scoring a sample costs about a step on it)")
        return "\n".join(lines)


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
    missing = sorted(set(fields) - set(state) - {"time_training", "steps_timed"})  # newer than some states
    if missing:
        raise ValueError(f"{kind} state field 'stats' lacks the counters {missing}: it was not saved by "
                         f"{kind}.state_dict()")
    values: dict[str, Any] = {}
    for name, value in state.items():
        if name == "residuals":
            if not isinstance(value, (list, tuple)):
                raise ValueError(f"{kind} state field 'stats.residuals' must be a list of numbers")
            values[name] = [read_number(r, "stats.residuals", kind) for r in value]
        elif name == "steps_timed":
            try:
                values[name] = StepCosts.from_list(value)
            except ValueError as err:
                raise ValueError(f"{kind} state field 'stats.steps_timed': {err}") from err
        elif fields[name].type == "int":
            values[name] = read_int(value, f"stats.{name}", kind)
        else:
            values[name] = read_number(value, f"stats.{name}", kind)
    entered = values["samples_selected"] + values["samples_not_selected"] + values["samples_skipped"]
    if values["samples_seen"] != entered:
        raise ValueError(f"{kind} state field 'stats' does not add up: samples_seen {values['samples_seen']} != "
                         f"selected + not selected + skipped = {entered}")
    return LoaderStats(**values)
