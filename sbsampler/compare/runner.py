"""``compare(...)``: check the arguments, preflight every mode, train each (mode, seed), run the budget-matched
baselines, summarise and decide."""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Iterable, Sequence
from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from ..stats import SelectionCostWarning
from ..strategies import Strategy, check_fraction
from .budget import BUDGETS, budget_share, fitted_schedule
from .decision import MARGIN, classify, recommend
from .loop import Run, per_sample_cross_entropy
from .modes import Mode, default_modes, preflight as check_modes, run_mode
from .report import Comparison
from .summary import TOLERANCE, summarise

__all__ = ["compare", "DEFAULT_SEEDS"]

DEFAULT_SEEDS = (0, 1, 2)


def _factory(value: Any, name: str, example: str, instance: type) -> None:
    if isinstance(value, instance):
        raise TypeError(f"compare: {name}= takes a factory, called once per run for a fresh one, not a "
                        f"{type(value).__name__} instance: pass {example}")
    if not callable(value):
        raise TypeError(f"compare: {name}= must be callable ({example}), got {type(value).__name__}")


def _check(model: Any, train_loader: Any, evaluate: Any, optimizer: Any, epochs: Any, seconds: Any, fractions: Any,
           seeds: Any, target: Any, tolerance: Any, evals_per_epoch: Any, margin: Any, budget: Any,
           schedule: Any) -> None:
    """Every argument of ``compare``, checked before anything runs: a ``TypeError``/``ValueError`` naming it."""
    _factory(model, "model", "model=lambda: nn.Linear(6, 4), or a function returning a fresh model", nn.Module)
    _factory(optimizer, "optimizer", "optimizer=lambda params: torch.optim.SGD(params, lr=0.1)",
             torch.optim.Optimizer)
    if not callable(evaluate):
        raise TypeError(f"compare: evaluate= must be a function evaluate(model) -> float, got "
                        f"{type(evaluate).__name__}")
    if not isinstance(train_loader, DataLoader):
        raise TypeError(f"compare takes a torch DataLoader as train_loader, got {type(train_loader).__name__}")
    if isinstance(epochs, bool) or not isinstance(epochs, numbers.Integral) or epochs < 1:
        raise ValueError(f"compare: epochs must be a whole number of epochs >= 1, got {epochs!r} (for part of an "
                         "epoch, pass seconds= as a wall-clock budget per run)")
    if seconds is not None and (isinstance(seconds, bool) or not isinstance(seconds, numbers.Real)
                                or not math.isfinite(seconds) or seconds <= 0):
        raise ValueError(f"compare: seconds must be None or a wall-clock budget > 0 per run, got {seconds!r}")
    if isinstance(seeds, (str, bytes)) or not isinstance(seeds, Sequence) or not seeds:
        raise ValueError(f"compare: seeds must name at least one seed, e.g. seeds=(0, 1, 2); got {seeds!r}")
    if any(isinstance(s, bool) or not isinstance(s, numbers.Integral) for s in seeds) or len(set(seeds)) != len(seeds):
        raise ValueError(f"compare: seeds must be distinct ints, got {list(seeds)!r}")
    for f in fractions:
        check_fraction(f, "compare: every fraction in fractions=")
    if target is not None and (isinstance(target, bool) or not isinstance(target, numbers.Real)
                               or not math.isfinite(target)):
        raise ValueError(f"compare: target must be None or a finite score, got {target!r}")
    for name, value, top in (("tolerance", tolerance, math.inf), ("evals_per_epoch", evals_per_epoch, math.inf),
                             ("margin", margin, 1.0)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value < top:
            raise ValueError(f"compare: {name} must be a number >= 0{' and < 1' if top == 1.0 else ''}, got {value!r}")
    if budget not in BUDGETS:
        raise ValueError(f"compare: budget must be one of {BUDGETS}, got {budget!r}")
    if schedule is not None and not callable(schedule):
        raise TypeError(f"compare: schedule= must be a function of the epochs of progress returning an LR factor "
                        f"(sb.schedule.cosine(epochs)), got {type(schedule).__name__}")


def compare(*, model: Callable[[], nn.Module], train_loader: DataLoader, evaluate: Callable[[nn.Module], float],
            optimizer: Callable[[Iterable], torch.optim.Optimizer], epochs: int = 4, seconds: Optional[float] = None,
            strategy: Union[str, Strategy] = "sb", fractions: Sequence[float] = (0.25,),
            modes: Optional[Sequence[Mode]] = None, seeds: Sequence[int] = DEFAULT_SEEDS,
            target: Optional[float] = None, tolerance: float = TOLERANCE,
            loss: Callable[[Tensor, Tensor], Tensor] = per_sample_cross_entropy,
            schedule: Optional[Callable[[float], float]] = None, budget: str = "wall", evals_per_epoch: float = 2,
            device: Union[None, str, torch.device] = None, progress: bool = True, preflight: bool = True,
            margin: float = MARGIN) -> Comparison:
    """Train full and selective modes of the user's model through one loop; the tables, the cost model and a
    recommendation that knows noise from a saving (``sbsampler.compare``).

    Args:
        model: builds a fresh model (a factory; each run seeds torch before calling it).
        train_loader: a ``DataLoader`` of ``(input, target)`` samples; wrapped as it is per batch; its
            dataset (with indices) and batch size make the sampler-level loader.
        evaluate: ``evaluate(model) -> float``, higher is better (e.g. test accuracy); called outside the clock.
        optimizer: ``optimizer(params) -> Optimizer`` (a factory).
        epochs: whole epochs per run; ``seconds``: also stop each run once it has trained that long.
        strategy: the strategy of the default modes (``default_modes``).
        fractions: the fractions of the default modes.
        modes: the modes to run instead of the default ones (the first must be full training: the reference).
        seeds: one run per mode and seed, paired by seed (default three: one cannot tell noise from a saving).
        target: the score that counts as "reached"; default full training's mean final score - ``tolerance``.
        tolerance: how far below full training's final score still counts as its accuracy.
        loss: per-sample loss ``(outputs, targets) -> (B,)``; default cross-entropy.
        schedule: ``schedule(progress in epochs) -> LR factor`` (``sb.schedule.cosine(epochs)``). Given, every
            selective mode that reached the target is also matched by full training on this schedule
            compressed to the mode's budget (``sbsampler.compare.budget``), the fair baseline.
        budget: what the baseline's budget matches: the mode's wall time (``"wall"``) or its back-propagated
            rows (``"rows"``), as a share of full training's.
        evals_per_epoch: evaluations per epoch of progress (and one before training, one at the end).
        device: where the model and batches go.
        progress: a progress bar (tqdm) over the runs' epochs.
        preflight: one model, batch, step and evaluation of every mode before any run.
        margin: how much sooner than full training, in every seed, a mode must reach the target.

    Raises:
        TypeError, ValueError: an argument that cannot work, naming it (a module given as ``model=``, a fraction
            of epochs, no seed, a non-positive ``seconds``, ...), before anything runs.
        RuntimeError: the preflight failed, naming the factory or the mode.
    """
    fractions = tuple(fractions)
    _check(model, train_loader, evaluate, optimizer, epochs, seconds, fractions, seeds, target, tolerance,
           evals_per_epoch, margin, budget, schedule)
    modes = list(modes) if modes is not None else default_modes(strategy, fractions)
    if not modes or not modes[0].is_full:
        raise ValueError("compare: the first mode must be full training (Mode('full')), the reference of the rest")
    if len({m.name for m in modes}) != len(modes):
        raise ValueError(f"compare: mode names must differ, got {[m.name for m in modes]}")
    dev = None if device is None else torch.device(device)
    if preflight:
        check_modes(modes, model, train_loader, optimizer, evaluate, loss, epochs, dev)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SelectionCostWarning)  # compare measures the cost itself, and says so
        return _run(modes, model, train_loader, evaluate, optimizer, int(epochs), seconds, list(seeds), target,
                    tolerance, loss, schedule, budget, evals_per_epoch, dev, progress, margin)


def _run(modes: list[Mode], model: Callable, train_loader: DataLoader, evaluate: Callable, optimizer: Callable,
         epochs: int, seconds: Optional[float], seeds: list[int], target: Optional[float], tolerance: float,
         loss: Callable, schedule: Optional[Callable], budget: str, evals_per_epoch: float,
         dev: Optional[torch.device], progress: bool, margin: float) -> Comparison:
    bar = _bar(len(modes) * len(seeds) * epochs) if progress else None
    common = dict(model=model, train_loader=train_loader, optimizer=optimizer, evaluate=evaluate, loss=loss,
                  seconds=seconds, evals_per_epoch=evals_per_epoch, device=dev,
                  on_epoch=(lambda: bar.update(1)) if bar is not None else None)
    runs: list[Run] = []
    baselines: dict[str, list[Run]] = {}
    try:
        for seed in seeds:
            for m in modes:
                if bar is not None:
                    bar.set_postfix_str(f"{m.name}, seed {seed}")
                runs.append(run_mode(m, seed, epochs=epochs, schedule=schedule, **common))
        rows, cost = summarise(runs, modes, target, tolerance)
        if schedule is not None:
            full = [r for r in runs if r.mode == modes[0].name]
            for m, row in zip(modes[1:], rows[1:]):
                if row["reached"] < row["seeds"]:  # it lost already: no baseline needed to say so
                    continue
                share = budget_share([r for r in runs if r.mode == m.name], full, budget)
                name = f"full @ {share:.2f} of the budget ({m.name})"
                if bar is not None:
                    bar.total += len(seeds) * epochs
                    bar.set_postfix_str(name)
                baselines[m.name] = [run_mode(modes[0], seed, epochs=epochs, max_progress=epochs * share,
                                              schedule=fitted_schedule(schedule, share), name=name, **common)
                                     for seed in seeds]
            rows, cost = summarise(runs, modes, target, tolerance, baselines)
    finally:
        if bar is not None:
            bar.close()
    recommendation = recommend(rows, cost, margin)
    rows[0]["status"] = "reference"
    for row in rows[1:]:
        row["status"] = classify(row, cost, margin)[0]
    settings = {"epochs": epochs, "seconds": seconds, "seeds": seeds, "tolerance": tolerance, "margin": margin,
                "budget": budget if schedule is not None else None, "evals_per_epoch": evals_per_epoch,
                "modes": [{"name": m.name, "level": m.level, "fraction": m.fraction} for m in modes]}
    return Comparison(runs, rows, cost, recommendation, settings, [r for rs in baselines.values() for r in rs])


def _bar(total: int) -> Any:
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is optional
        return None
    return tqdm(total=total, desc="compare", unit="epoch")
