"""When selection is on: the training window, shared by the loader and the sampler.

Composer's ``should_selective_backprop`` decides per batch from the elapsed share of
training; here the unit is the epoch. ``SelectiveLoader(start=, end=)`` selects in
the epochs whose progress lies in ``[start, end)``, and ``SelectiveSampler(anneal=)``
plans from stored scores in ``[0, 1 - anneal)`` and loads everything after.
"""

from __future__ import annotations

from typing import Optional

__all__ = ["in_window", "epoch_progress"]


def epoch_progress(epoch: int, epochs: Optional[int]) -> Optional[float]:
    """Share of training done when ``epoch`` (0-based) starts, ``epoch / epochs``; ``None`` without ``epochs``."""
    return None if epochs is None else epoch / epochs


def in_window(progress: Optional[float], start: float, end: float) -> bool:
    """Whether ``start <= progress < end``; an unknown progress (``None``) is inside."""
    return progress is None or start <= progress < end
