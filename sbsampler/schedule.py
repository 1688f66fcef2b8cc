"""When selection is on: the training window, shared by the loader and the sampler.

Composer's ``should_selective_backprop`` decides per batch from the elapsed share of
training; here the unit is the epoch. ``SelectiveLoader(start=, end=)`` selects in
the epochs whose progress lies in ``[start, end)``. ``SelectiveSampler(anneal=)``
loads everything from epoch ``floor(epochs * (1 - anneal))`` on, as the official
InfoBatch code does (it stops pruning after ``num_epochs * delta``, ``delta = 1 - anneal``).
"""

from __future__ import annotations

import math
from typing import Optional

__all__ = ["in_window", "epoch_progress", "anneal_start"]


def epoch_progress(epoch: int, epochs: Optional[int]) -> Optional[float]:
    """Share of training done when ``epoch`` (0-based) starts, ``epoch / epochs``; ``None`` without ``epochs``."""
    return None if epochs is None else epoch / epochs


def in_window(progress: Optional[float], start: float, end: float) -> bool:
    """Whether ``start <= progress < end``; an unknown progress (``None``) is inside."""
    return progress is None or start <= progress < end


def anneal_start(epochs: int, anneal: float) -> int:
    """The first epoch that loads the full data: ``floor(epochs * (1 - anneal))`` (InfoBatch's rule)."""
    return math.floor(epochs * (1.0 - anneal) + 1e-9)  # 1e-9: 10 * (1 - 0.1) must give 9, not 8
