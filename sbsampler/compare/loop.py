"""The one training loop of ``compare`` and the benchmarks: weighted steps of a loader, timed and evaluated.

``train_loop`` trains a model on a ``SelectiveLoader`` (per batch) or ``WeightedBatches`` over a
``SelectiveSampler`` (sampler level) for some epochs, evaluates it a few times an epoch outside the
clock, and returns a ``Run``: its curve of ``Point`` s and where its time went. Every benchmark that
trains goes through it, so that they and ``compare`` time the same thing. It decides nothing.
"""

from __future__ import annotations

import math
import numbers
import time
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..batch import weighted_loss
from ..epoch import EpochIterator
from ..loader import SelectiveLoader
from ..sampler import SelectiveSampler
from ..schedule import progress_lr
from ..store import ScoreStore

__all__ = ["Point", "Run", "train_loop", "per_sample_cross_entropy", "score_of"]


class Point(NamedTuple):
    """One evaluation: the wall seconds trained (evaluation not counted), steps and rows back-propagated so far,
    epochs of progress, and the score."""

    wall: float
    steps: int
    rows: int
    progress: float
    score: float


@dataclass
class Run:
    """One (mode, seed) run: its curve of ``Point`` s, where its time went, and the loader's own estimate of the
    time it saved (``estimate``: ``low``, ``high``, ``point``, ``basis``; per batch only)."""

    mode: str
    seed: int
    fraction: Optional[float]
    curve: list[Point]
    wall_s: float
    steps: int
    samples_seen: int
    samples_backprop: int
    time_loading: float
    time_selection: float
    time_step: float
    weight_sum: float  # mean over steps of the step's weight sum
    estimate: Optional[dict] = None

    @property
    def final(self) -> float:
        """The score at the last evaluation."""
        return self.curve[-1].score

    @property
    def first(self) -> Optional[float]:
        """The score before any step (``None`` when the run was not evaluated then)."""
        return self.curve[0].score if self.curve and self.curve[0].steps == 0 else None

    @property
    def progress(self) -> float:
        """Epochs of progress at the last evaluation."""
        return self.curve[-1].progress

    @property
    def wall_per_epoch(self) -> float:
        """Wall seconds per epoch of progress."""
        return self.wall_s / max(self.progress, 1e-9)

    def reached(self, target: float) -> Optional[Point]:
        """The first evaluation scoring ``>= target``, or ``None``."""
        return next((point for point in self.curve if point.score >= target), None)


def per_sample_cross_entropy(outputs: Tensor, targets: Tensor) -> Tensor:
    """The default loss: cross-entropy per sample, ``(B,)``."""
    return F.cross_entropy(outputs, targets, reduction="none")


def score_of(value: Any, where: str = "evaluate(model)") -> float:
    """``value`` as the float score it must be (NaN kept, for the decision to name); ``TypeError`` otherwise."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{where} must return a number (higher is better, e.g. a test accuracy), got "
                        f"{type(value).__name__}: {value!r}")
    return float(value)


def _move(x: Any, device: Optional[torch.device]) -> Any:
    return x if device is None else x.to(device, non_blocking=True)


def step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: Any, loss: Callable[[Tensor, Tensor], Tensor],
         device: Optional[torch.device], store: Optional[ScoreStore]) -> Tensor:
    """One optimizer step on ``sum_i w_i l_i`` of a weighted sub-batch (its losses into ``store`` at the sampler
    level: no extra forward); returns the step's weights on the device."""
    inputs, targets, weights = (_move(t, device) for t in (batch.inputs, batch.targets, batch.weights))
    per = loss(model(inputs), targets)
    if per.dim() != 1 or per.shape[0] != len(batch):
        raise ValueError(f"loss(outputs, targets) must return one loss per sample, shape ({len(batch)},); "
                         f"got {tuple(per.shape)}")
    optimizer.zero_grad(set_to_none=True)
    weighted_loss(per, weights).backward()
    optimizer.step()
    if store is not None:
        store.update(batch.indices, per.detach())
    return weights


def train_loop(model: nn.Module, optimizer: torch.optim.Optimizer, loader: Any, *, epochs: int,
               evaluate: Callable[[nn.Module], float],
               loss: Callable[[Tensor, Tensor], Tensor] = per_sample_cross_entropy,
               schedule: Optional[Callable[[float], float]] = None, plan: Optional[SelectiveSampler] = None,
               store: Optional[ScoreStore] = None, evals_per_epoch: float = 2, seconds: Optional[float] = None,
               max_progress: Optional[float] = None, device: Union[None, str, torch.device] = None, mode: str = "",
               seed: int = 0, fraction: Optional[float] = None, on_epoch: Optional[Callable[[], None]] = None,
               on_step: Optional[Callable[[Any], None]] = None, clock: Optional[Callable[[], float]] = None) -> Run:
    """Train ``epochs`` epochs of ``loader``'s weighted steps (``sum_i w_i l_i``); the one loop of ``compare`` and
    the benchmarks.

    ``loader`` is a ``SelectiveLoader`` (per batch) or ``WeightedBatches`` over ``plan`` (sampler level: its
    ``set_epoch`` is called each epoch and the step's own losses go into ``store``). The model is evaluated
    ``evals_per_epoch`` times an epoch of progress (``loader.progress``) and at the end, outside the clock;
    ``seconds`` stops training once that much wall time is spent, ``max_progress`` once that many epochs of
    progress are done (a fraction of ``epochs``: the budget-matched baseline). ``schedule(progress)``: an LR
    factor. ``evals_per_epoch=0``: evaluate once, at the end (it may be fractional). ``on_step(batch)`` runs after
    each step, inside its time. Under ``SelectiveLoader(lookahead=N)`` the thread finishes its turn before the
    clock is read, so the time it works ahead is never free.
    """
    clock = clock or time.perf_counter  # read at the call: a test's fake clock reaches it
    device = None if device is None else torch.device(device)
    sched = progress_lr(optimizer, loader, schedule) if schedule is not None else None
    cuda = device is not None and device.type == "cuda"

    ahead = isinstance(loader, SelectiveLoader) and loader.lookahead > 0

    def now() -> float:
        if ahead and loader.current_iterator is not None:
            loader.current_iterator.pending()
        if cuda:
            torch.cuda.synchronize(device)
        return clock()

    def scored(it: Any = None) -> float:
        if isinstance(it, EpochIterator):  # not counted as the step just taken (its saving estimate)
            with it.untimed():
                return score_of(evaluate(model))
        return score_of(evaluate(model))

    curve = [Point(0.0, 0, 0, 0.0, scored())] if evals_per_epoch > 0 else []
    wall = waiting = stepping = planning = 0.0
    steps = rows = 0
    weight_sums: list[float] = []
    every = 1.0 / float(evals_per_epoch) if evals_per_epoch > 0 else math.inf  # 0: evaluate once, at the end
    next_eval = every
    stopped = False
    for epoch in range(epochs):
        t_epoch = now()
        if plan is not None:
            plan.set_epoch(epoch)
            planning += clock() - t_epoch
        it = iter(loader)
        while True:
            t0 = clock()
            try:
                batch = next(it)
            except StopIteration:
                waiting += clock() - t0
                break
            t1 = clock()
            waiting += t1 - t0
            weights = step(model, optimizer, batch, loss, device, store)
            if sched is not None:
                sched.step()
            if on_step is not None:
                on_step(batch)
            stepping += clock() - t1
            steps += 1
            rows += len(batch)
            weight_sums.append(float(weights.sum()))
            progress = float(loader.progress)
            over = ((seconds is not None and wall + (now() - t_epoch) >= seconds)
                    or (max_progress is not None and progress + 1e-9 >= max_progress))
            if progress + 1e-9 >= next_eval or over:
                wall += now() - t_epoch
                curve.append(Point(wall, steps, rows, progress, scored(it)))
                while next_eval <= progress + 1e-9:
                    next_eval += every
                t_epoch = now()
            if over:
                stopped = True
                break
        if not stopped:
            wall += now() - t_epoch
        if on_epoch is not None:
            on_epoch()
        if stopped:
            break
    if not curve or curve[-1].progress < float(loader.progress) - 1e-9 or len(curve) == 1:
        curve.append(Point(wall, steps, rows, float(loader.progress), scored()))
    estimate = None
    if isinstance(loader, SelectiveLoader):
        selection, seen = loader.stats.selection_time, loader.stats.samples_seen
        loading = max(waiting - selection, 0.0)
        saving = loader.stats.saving_estimate()
        if saving is not None:
            estimate = {"low": saving.low, "high": saving.high, "point": saving.point, "basis": saving.basis}
    else:
        selection, seen, loading = planning, rows, waiting
    return Run(mode=mode, seed=seed, fraction=fraction, curve=curve, wall_s=wall, steps=steps, samples_seen=seen,
               samples_backprop=rows, time_loading=loading, time_selection=selection, time_step=stepping,
               weight_sum=float(np.mean(weight_sums)) if weight_sums else 0.0, estimate=estimate)
