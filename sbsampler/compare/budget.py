"""The budget-matched baseline: full training on a schedule fitted to a selective mode's budget.

Kaddour et al. ("No Train No Gain", NeurIPS 2023) found that the gains of data selection and other
efficient-training methods vanish against full training whose learning-rate schedule is fitted to
the same compute budget: a cosine schedule cut off early is not what full training would do with
less time. So where the user gives a schedule, ``compare`` also trains full training for a
selective mode's budget (its wall time, or its back-propagated rows, as a share of full training's)
with the schedule stretched to end there, and compares the two at equal budget, by final score.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Callable

import numpy as np

from .loop import Run

__all__ = ["budget_share", "fitted_schedule", "BUDGETS"]

BUDGETS = ("wall", "rows")


def budget_share(runs: Sequence[Run], full_runs: Sequence[Run], budget: str = "wall") -> float:
    """A mode's budget as a share of full training's, paired by seed and averaged: its wall time (``"wall"``) or
    its samples back-propagated (``"rows"``) over the same seed's full run's."""
    if budget not in BUDGETS:
        raise ValueError(f"budget must be one of {BUDGETS}, got {budget!r}")
    full = {r.seed: r for r in full_runs}
    shares = []
    for r in runs:
        f = full.get(r.seed)
        if f is None:
            continue
        mine, theirs = (r.wall_s, f.wall_s) if budget == "wall" else (r.samples_backprop, f.samples_backprop)
        if theirs > 0:
            shares.append(mine / theirs)
    if not shares:
        raise ValueError("no selective run is paired with a full run of the same seed")
    return float(np.clip(np.mean(shares), 1e-3, 1.0))


def fitted_schedule(schedule: Callable[[float], float], share: float) -> Callable[[float], float]:
    """``schedule`` (an LR factor of the epochs of progress, for the full run's epochs) compressed to end after
    ``share`` of them: ``progress -> schedule(progress / share)``."""
    if not 0.0 < share <= 1.0:
        raise ValueError(f"a budget share must be in (0, 1], got {share}")

    def fitted(progress: float) -> float:
        return schedule(progress / share)

    return fitted
