"""Training progress in epochs: when selection is on, and learning-rate schedules that follow it.

Composer's ``should_selective_backprop`` decides per batch from the elapsed share of
training, and so does ``SelectiveLoader(start=, end=)`` (``SelectiveLoader.selects``):
batch ``j`` of ``n`` in epoch ``e`` selects when ``(e + j / n) / epochs`` lies in
``[start, end)``, unless it is an ``interrupt`` batch. ``SelectiveSampler(anneal=)``
loads everything from epoch ``floor(epochs * (1 - anneal))`` on, as the official
InfoBatch code does (it stops pruning after ``num_epochs * delta``, ``delta = 1 - anneal``).

A selective epoch's length can change (rebatching, a sampler's plan), so a
per-iteration schedule built on a step count fixed ahead (``OneCycleLR``'s
``total_steps``) drifts or fails ("Tried to step 527 times. The specified number of
total steps is 525"). ``progress_lr`` instead sets the rate from the loader's
``progress`` in epochs (``SelectiveLoader.progress``, ``WeightedBatches.progress``)
at every ``scheduler.step()``, so a schedule written in epochs holds however many
steps each epoch has::

    sched = sb.schedule.progress_lr(opt, loader, sb.schedule.one_cycle(epochs, peak_epoch=2))
    for epoch in range(epochs):
        for batch in loader:
            ...; opt.step(); sched.step()
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import numpy as np
import torch

__all__ = ["in_window", "anneal_start", "progress_lr", "cosine", "one_cycle"]


def in_window(progress: Optional[float], start: float, end: float) -> bool:
    """Whether ``start <= progress < end``; an unknown progress (``None``) is inside."""
    return progress is None or start <= progress < end


def anneal_start(epochs: int, anneal: float) -> int:
    """The first epoch that loads the full data: ``floor(epochs * (1 - anneal))`` (InfoBatch's rule)."""
    return math.floor(epochs * (1.0 - anneal) + 1e-9)  # 1e-9: 10 * (1 - 0.1) must give 9, not 8


def progress_lr(optimizer: torch.optim.Optimizer, loader: Any,
                factor: Callable[[float], float]) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` whose factor is ``factor(loader.progress)``: the base rate times a function of epochs done.

    Call its ``step()`` after each ``optimizer.step()``: the next step's rate is
    read from the progress after the batches consumed so far.
    """
    if not hasattr(type(loader), "progress"):
        raise TypeError(f"{type(loader).__name__} has no progress; pass a SelectiveLoader or WeightedBatches")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _step: float(factor(loader.progress)))


def cosine(epochs: float, final: float = 0.0) -> Callable[[float], float]:
    """Cosine decay from 1 at progress 0 to ``final`` at ``epochs`` (and after)."""
    def f(progress: float) -> float:
        t = min(max(progress / epochs, 0.0), 1.0)
        return final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * t))
    return f


def one_cycle(epochs: float, peak_epoch: float, start: float = 1e-4) -> Callable[[float], float]:
    """FFCV's triangular schedule: ``start`` at 0, 1 at ``peak_epoch``, 0 at ``epochs``, linear in between."""
    if not (epochs > 0 and 0 <= peak_epoch <= epochs):
        raise ValueError(f"need 0 <= peak_epoch <= epochs and epochs > 0, got peak_epoch={peak_epoch}, epochs={epochs}")
    return lambda progress: float(np.interp(progress, [0.0, peak_epoch, epochs], [start, 1.0, 0.0]))
