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
and product), a few numbers whatever the run's length. ``estimate_saving`` fits ``a + b r``
by least squares (``a, b >= 0``) when the steps differ in size (a primed or full-window epoch, rebatching
tails, a variable-count rule), and gives the saving as the range that the fit's ``±2``
standard errors, widened by ``DRIFT`` for the steps not taken whole, and the two bounds above
allow; a point only where that range is narrow (within ±25% of it). Otherwise the range is
the bounds', said as such. A saving is a difference of two large times, so a point is rare:
``benchmarks/saving_estimate.py`` checks the range against the clock on the project's examples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

__all__ = ["StepCosts", "SavingEstimate", "estimate_saving"]

MIN_STEPS_TO_FIT = 8  # steps of more than one size needed before a fit is tried
POINT_WITHIN = 0.25  # a point is given when the range is within this share of it, either way
#: how far a whole batch's step may differ from the fit where it was not timed: the machine's speed drifts while a
#: run goes on (full training's epochs differed by up to 18% within one run on the 2-core CI machine)
DRIFT = 0.15


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
    at_max: int = 0  # steps of ``max_rows`` rows

    def add(self, rows: int, seconds: float) -> None:
        """One timed step of ``rows`` rows."""
        self.min_rows = rows if self.n == 0 else min(self.min_rows, rows)
        if self.n == 0 or rows > self.max_rows:
            self.max_rows, self.at_max = rows, 0
        self.at_max += rows == self.max_rows
        self.n += 1
        self.rows += rows
        self.rows2 += rows * rows
        self.seconds += seconds
        self.rows_seconds += rows * seconds
        self.seconds2 += seconds * seconds

    def as_list(self) -> list[float]:
        """The moments as a list of numbers (for a state)."""
        return [self.n, self.rows, self.rows2, self.seconds, self.rows_seconds, self.seconds2, self.min_rows,
                self.max_rows, self.at_max]

    @classmethod
    def from_list(cls, values: Any) -> "StepCosts":
        """``as_list``'s inverse; ``ValueError`` on anything else."""
        if not (isinstance(values, (list, tuple)) and len(values) == 9):
            raise ValueError(f"step moments must be a list of 9 numbers, got {values!r}")
        vals = [float(v) for v in values]
        if any(not math.isfinite(v) or v < 0 for v in vals) or any(vals[j] != int(vals[j]) for j in (0, 6, 7, 8)):
            raise ValueError(f"step moments must be finite numbers >= 0 and whole counts, got {values!r}")
        return cls(int(vals[0]), *vals[1:6], int(vals[6]), int(vals[7]), int(vals[8]))

    def fit(self) -> Optional[tuple[float, float, float, float]]:
        """``(a, b, residual variance, Sxx)`` of ``t = a + b r`` by least squares with ``a, b >= 0`` (a step has no
        negative cost, fixed or per row), or ``None`` while the steps are too few or all of one size.

        Where the free fit has a negative coefficient (noisy steps that cost less with more rows), the best fit on
        the edges ``b = 0`` (the mean step) or ``a = 0`` (``Σrt / Σr²``) is taken: the exact answer of the
        constrained problem, since its objective is convex."""
        n = self.n
        if n < MIN_STEPS_TO_FIT or self.max_rows == self.min_rows:
            return None
        mean_r, mean_t = self.rows / n, self.seconds / n
        sxx = self.rows2 - n * mean_r * mean_r
        if sxx <= 1e-12 * max(self.rows2, 1.0):
            return None
        b = (self.rows_seconds - n * mean_r * mean_t) / sxx
        a = mean_t - b * mean_r
        if a < 0 or b < 0:
            a, b = min(((mean_t, 0.0), (0.0, self.rows_seconds / self.rows2)), key=lambda ab: self._sse(*ab))
        return a, b, max(self._sse(a, b), 0.0) / max(n - 2, 1), sxx

    def _sse(self, a: float, b: float) -> float:
        """``Σ (t - a - b r)²`` from the moments."""
        return (self.seconds2 - 2 * a * self.seconds - 2 * b * self.rows_seconds + self.n * a * a
                + 2 * a * b * self.rows + b * b * self.rows2)


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
    best = None  # a whole batch's step as the fit predicts it
    fitted = costs.fit()
    if fitted is not None:
        a, b, residual, sxx = fitted
        pred = a + b * whole
        se = math.sqrt(residual * (1.0 / n + (whole - mean_r) ** 2 / sxx))
        untimed = batches if costs.max_rows < whole else max(batches - costs.at_max, 0)  # not taken whole
        margin = 2 * se + DRIFT * pred * untimed / batches
        lo, hi = max(lo, pred - margin), min(hi, pred + margin)
        if lo > hi:  # the fit disagrees with the bounds (a noisy, non-linear step): keep the bounds
            lo, hi = sorted((mean_t, mean_t * whole / mean_r))
        else:
            best = min(max(pred, lo), hi)
            basis = (f"a step's cost fitted as {1e3 * a:.3g} ms + {1e6 * b:.3g} µs per row over {n} steps of "
                     f"{costs.min_rows}-{costs.max_rows} rows, ±2 standard errors and {DRIFT:.0%} drift")

    def saved(step: float) -> float:
        return batches * step - costs.seconds - selection_s

    low, high = saved(lo), saved(hi)
    if lo == hi:  # every step was a whole batch's: nothing was skipped
        best = lo
    point = saved(best) if best is not None else None
    if point is not None and max(high - point, point - low) > POINT_WITHIN * abs(point):
        point = None
    return SavingEstimate(low, high, point, basis, best if best is not None else (lo + hi) / 2)
