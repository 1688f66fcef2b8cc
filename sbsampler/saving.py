"""How much time selection saves, estimated from the training steps it timed: a range, and a point where the steps
say enough.

Selection saves the steps' time on the rows it skips and pays for scoring and selecting.
What a step on a whole batch would have cost is not measured in a selective run: its
steps ran on fewer rows. A step costs a fixed part (the optimizer's update, launches,
Python) and a part per row (forward and backward), ``t(r) = a + b r`` with ``a, b >= 0``,
so from the mean step ``(r̄, t̄)`` alone a whole batch of ``B`` rows took between ``t̄``
(all fixed) and ``t̄ B / r̄`` (all per row). Saying the second alone, as "the saving",
overstated it: a run that saved 4.7 s (12%) was told 56.9 s (issue 32).

``StepCosts`` keeps the moments of the timed steps (count, rows, seconds, and their squares
and product), six numbers whatever the run's length. ``estimate_saving`` fits ``a + b r``
by least squares when the steps differ in size (a primed or full-window epoch, rebatching
tails, a variable-count rule), and gives the saving as the range that the fit's ``±2``
standard errors and the two bounds above allow; a point only where that range is narrow
(within ±25% of it). Otherwise the range is the bounds', said as such.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

__all__ = ["StepCosts", "SavingEstimate", "estimate_saving"]

MIN_STEPS_TO_FIT = 8  # steps of more than one size needed before a fit is tried
POINT_WITHIN = 0.25  # a point is given when the range is within this share of it, either way


@dataclass
class StepCosts:
    """Moments of the timed training steps: ``n``, sums of rows, rows², seconds, rows·seconds, seconds², and the
    smallest and largest step (rows)."""

    n: int = 0
    rows: float = 0.0
    rows2: float = 0.0
    seconds: float = 0.0
    rows_seconds: float = 0.0
    seconds2: float = 0.0
    min_rows: int = 0
    max_rows: int = 0

    def add(self, rows: int, seconds: float) -> None:
        """One timed step of ``rows`` rows."""
        self.min_rows = rows if self.n == 0 else min(self.min_rows, rows)
        self.max_rows = rows if self.n == 0 else max(self.max_rows, rows)
        self.n += 1
        self.rows += rows
        self.rows2 += rows * rows
        self.seconds += seconds
        self.rows_seconds += rows * seconds
        self.seconds2 += seconds * seconds

    def as_list(self) -> list[float]:
        """The moments as a list of numbers (for a state)."""
        return [self.n, self.rows, self.rows2, self.seconds, self.rows_seconds, self.seconds2, self.min_rows,
                self.max_rows]

    @classmethod
    def from_list(cls, values: Any) -> "StepCosts":
        """``as_list``'s inverse; ``ValueError`` on anything else."""
        if not (isinstance(values, (list, tuple)) and len(values) == 8):
            raise ValueError(f"step moments must be a list of 8 numbers, got {values!r}")
        vals = [float(v) for v in values]
        if any(not math.isfinite(v) or v < 0 for v in vals) or vals[0] != int(vals[0]):
            raise ValueError(f"step moments must be finite numbers >= 0 and a whole count, got {values!r}")
        return cls(int(vals[0]), *vals[1:6], int(vals[6]), int(vals[7]))

    def fit(self) -> Optional[tuple[float, float, float, float]]:
        """``(a, b, residual variance, Sxx)`` of ``t = a + b r`` by least squares, or ``None`` while the steps are
        too few or all of one size."""
        n = self.n
        if n < MIN_STEPS_TO_FIT or self.max_rows == self.min_rows:
            return None
        mean_r, mean_t = self.rows / n, self.seconds / n
        sxx = self.rows2 - n * mean_r * mean_r
        if sxx <= 1e-12 * max(self.rows2, 1.0):
            return None
        sxy = self.rows_seconds - n * mean_r * mean_t
        syy = self.seconds2 - n * mean_t * mean_t
        b = sxy / sxx
        a = mean_t - b * mean_r
        residual = max(syy - b * sxy, 0.0) / max(n - 2, 1)
        return a, b, residual, sxx


@dataclass(frozen=True)
class SavingEstimate:
    """Seconds saved against back-propagating every sample seen: between ``low`` and ``high``; ``point`` where the
    range is narrow enough to name one (else ``None``); ``basis`` says how it was made."""

    low: float
    high: float
    point: Optional[float]
    basis: str
    full_step_s: float  # a whole batch's step, as estimated (the point, or the middle of its range)

    def __str__(self) -> str:
        head = f"{self.point:+.3g} s" if self.point is not None else f"{self.low:+.3g} to {self.high:+.3g} s"
        return f"{head} ({self.basis})"


def estimate_saving(costs: StepCosts, batches: int, samples_seen: int, selection_s: float) -> Optional[SavingEstimate]:
    """The time saved against training on every sample seen, from the timed steps (module docstring).

    Args:
        costs: the run's timed steps.
        batches: batches seen (full training's steps).
        samples_seen: samples seen (``batches`` steps of ``samples_seen / batches`` rows).
        selection_s: what scoring, selecting and gathering took.

    Returns ``None`` before any step was timed.
    """
    n = costs.n
    if n == 0 or batches == 0 or costs.rows <= 0 or costs.seconds <= 0:
        return None
    mean_r, mean_t = costs.rows / n, costs.seconds / n
    whole = samples_seen / batches  # a batch of full training
    lo, hi = sorted((mean_t, mean_t * whole / mean_r))  # all fixed .. all per row
    basis = (f"steps of {costs.min_rows} rows only: between a step cost that does not depend on its rows and one "
             "proportional to them" if costs.max_rows == costs.min_rows else
             f"{n} steps of {mean_r:.0f} rows on average: between a fixed step cost and one proportional to its rows")
    fitted = costs.fit()
    if fitted is not None:
        a, b, residual, sxx = fitted
        pred = a + b * whole
        se = math.sqrt(residual * (1.0 / n + (whole - mean_r) ** 2 / sxx))
        lo, hi = max(lo, pred - 2 * se), min(hi, pred + 2 * se)
        if lo > hi:  # the fit disagrees with the bounds (a noisy, non-linear step): keep the bounds
            lo, hi = sorted((mean_t, mean_t * whole / mean_r))
        else:
            basis = (f"a step's cost fitted as {1e3 * a:.3g} ms + {1e6 * b:.3g} µs per row over {n} steps of "
                     f"{costs.min_rows}-{costs.max_rows} rows, ±2 standard errors")

    def saved(step: float) -> float:
        return batches * step - costs.seconds - selection_s

    low, high = saved(lo), saved(hi)
    middle = (low + high) / 2
    point = middle if high - low <= 2 * POINT_WITHIN * abs(middle) else None
    return SavingEstimate(low, high, point, basis, (lo + hi) / 2)
