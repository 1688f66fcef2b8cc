"""What a ``SelectiveLoader`` counts: samples in and out, and where the time went."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from .select import Selected

__all__ = ["LoaderStats"]


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
    residuals: list = field(default_factory=list)  # GradientMatching fit per batch

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
        self.time_scoring += picked.seconds["scoring"]
        self.time_selecting += picked.seconds["selecting"]
        self.time_gathering += picked.seconds["gathering"]

    @property
    def backprop_fraction(self) -> float:
        """Samples back-propagated per sample seen."""
        return self.samples_yielded / self.samples_seen if self.samples_seen else 0.0

    @property
    def selection_time(self) -> float:
        """Seconds spent scoring, selecting and gathering."""
        return self.time_scoring + self.time_selecting + self.time_gathering

    def reset(self) -> None:
        """Zero every counter."""
        fresh = LoaderStats()
        for k, v in asdict(fresh).items():
            setattr(self, k, v)

    def as_dict(self) -> dict[str, Any]:
        """Counters and derived figures as a plain dict."""
        d = asdict(self)
        d.pop("residuals")
        d["backprop_fraction"] = self.backprop_fraction
        d["selection_time"] = self.selection_time
        d["mean_residual"] = float(np.mean(self.residuals)) if self.residuals else None
        return d
