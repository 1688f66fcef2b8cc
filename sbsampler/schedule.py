"""When selection is on: the training window, shared by the loader and the sampler.

Composer's ``should_selective_backprop`` decides per batch from the elapsed share of
training, and so does ``SelectiveLoader(start=, end=)`` (``SelectiveLoader.selects``):
batch ``j`` of ``n`` in epoch ``e`` selects when ``(e + j / n) / epochs`` lies in
``[start, end)``, unless it is an ``interrupt`` batch. ``SelectiveSampler(anneal=)``
loads everything from epoch ``floor(epochs * (1 - anneal))`` on, as the official
InfoBatch code does (it stops pruning after ``num_epochs * delta``, ``delta = 1 - anneal``).
"""

from __future__ import annotations

import math
from typing import Optional

__all__ = ["in_window", "anneal_start"]


def in_window(progress: Optional[float], start: float, end: float) -> bool:
    """Whether ``start <= progress < end``; an unknown progress (``None``) is inside."""
    return progress is None or start <= progress < end


def anneal_start(epochs: int, anneal: float) -> int:
    """The first epoch that loads the full data: ``floor(epochs * (1 - anneal))`` (InfoBatch's rule)."""
    return math.floor(epochs * (1.0 - anneal) + 1e-9)  # 1e-9: 10 * (1 - 0.1) must give 9, not 8
