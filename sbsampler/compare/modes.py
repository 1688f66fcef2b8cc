"""The ways to train that ``compare`` runs: ``Mode``, the default set, and one run of a mode (and its preflight).

A ``Mode`` is a strategy at a fraction, per batch (``SelectiveLoader``) or at the sampler level
(``SelectiveSampler``). ``run_mode`` builds a fresh model, optimizer and loader for one (mode, seed)
and trains it through ``train_loop``; ``preflight`` runs one batch and one step of every mode before
any run, calling each of the user's factories apart, so that a mistake names the factory or the mode.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

import torch
from torch import nn
from torch.utils.data import DataLoader

from ..batch import IndexedDataset, with_indices
from ..hook import ScoringHook
from ..loader import SelectiveLoader
from ..sampler import SelectiveSampler, WeightedBatches
from ..store import ScoreStore
from ..strategies import InfoBatch, Strategy, get_strategy
from .loop import Run, per_sample_cross_entropy, score_of, step, train_loop

__all__ = ["Mode", "default_modes", "run_mode", "preflight", "built_model"]


@dataclass
class Mode:
    """One way to train: a strategy at a fraction, per batch (``SelectiveLoader``) or at the sampler level.

    ``strategy``: a registered name, a ``Strategy`` (deep-copied per run) or a factory ``seed -> Strategy``;
    ``fraction``: ``None`` for a rule that chooses its own count (InfoBatch, Bernoulli SB) and for full training;
    ``options``: keyword arguments of ``SelectiveLoader`` (per batch) or ``SelectiveSampler``.
    """

    name: str
    strategy: Union[str, Strategy, Callable[[int], Strategy]] = "full"
    fraction: Optional[float] = None
    level: str = "batch"
    options: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.level not in ("batch", "sampler"):
            raise ValueError(f"Mode {self.name!r}: level must be 'batch' or 'sampler', got {self.level!r}")

    def make_strategy(self, seed: int) -> Strategy:
        """A fresh strategy for one run: by name (seeded), a deep copy of the object, or the factory's."""
        if isinstance(self.strategy, str):
            return get_strategy(self.strategy, seed=seed)
        if isinstance(self.strategy, Strategy):
            return copy.deepcopy(self.strategy)
        return self.strategy(seed)

    @property
    def is_full(self) -> bool:
        """Whether this mode is full training (the reference of the others)."""
        return isinstance(self.strategy, str) and self.strategy == "full"


def default_modes(strategy: Union[str, Strategy] = "sb", fractions: Sequence[float] = (0.25,)) -> list[Mode]:
    """Full training, then per fraction: uniform, ``strategy`` (when not uniform) and sampler-level InfoBatch
    with ``prune = 1 - fraction`` (named by its prune ratio: its kept share is measured, not set)."""
    name = strategy if isinstance(strategy, str) else strategy.name
    modes = [Mode("full")]
    for f in fractions:
        modes.append(Mode(f"uniform {f:g}", "uniform", f))
        if name != "uniform":
            modes.append(Mode(f"{name} {f:g}", strategy, f))
        modes.append(Mode(f"sampler infobatch prune {1.0 - f:g}", lambda seed, f=f: InfoBatch(prune=1.0 - f, seed=seed),
                          level="sampler", options={"anneal": 0.125}))
    return modes


def built_model(model: Callable[[], nn.Module]) -> nn.Module:
    """``model()``, said plainly when it fails or returns no module."""
    try:
        net = model()
    except Exception as err:
        raise RuntimeError(f"compare: the model factory model() raised {type(err).__name__}: {err}") from err
    if not isinstance(net, nn.Module):
        raise TypeError(f"compare: model() must return a fresh torch.nn.Module, got {type(net).__name__}")
    return net


def _build(mode: Mode, seed: int, model_fn: Callable[[], nn.Module], train_loader: DataLoader,
           optimizer_fn: Callable[[Iterable], torch.optim.Optimizer], loss: Callable, epochs: int,
           device: Optional[torch.device]) -> tuple[nn.Module, torch.optim.Optimizer, Any, Any, Any]:
    """A fresh model (seeded), its optimizer, and the mode's loader (with its plan and store at the sampler level)."""
    torch.manual_seed(seed)
    model = built_model(model_fn)
    if device is not None:
        model = model.to(device)
    try:
        opt = optimizer_fn(model.parameters())
    except Exception as err:
        raise RuntimeError(f"compare: the optimizer factory optimizer(params) raised {type(err).__name__}: "
                           f"{err}") from err
    if not isinstance(opt, torch.optim.Optimizer):
        raise TypeError(f"compare: optimizer(params) must return a torch.optim.Optimizer, got {type(opt).__name__}")
    strategy = mode.make_strategy(seed)
    if mode.level == "sampler":
        data = train_loader.dataset
        data = data if isinstance(data, IndexedDataset) else with_indices(data)
        store = ScoreStore(len(data))
        plan = SelectiveSampler(store, strategy, mode.fraction, epochs=epochs, seed=seed, **mode.options)
        loader = WeightedBatches(DataLoader(data, batch_size=train_loader.batch_size, sampler=plan,
                                            num_workers=train_loader.num_workers), plan)
        return model, opt, loader, plan, store
    hook = ScoringHook(model, loss=loss if loss is not per_sample_cross_entropy else "cross_entropy")
    loader = SelectiveLoader(train_loader, hook, strategy, mode.fraction, device=device, **mode.options)
    return model, opt, loader, None, None


def run_mode(mode: Mode, seed: int, *, model: Callable[[], nn.Module], train_loader: DataLoader,
             optimizer: Callable[[Iterable], torch.optim.Optimizer], evaluate: Callable[[nn.Module], float],
             epochs: int, loss: Callable = per_sample_cross_entropy,
             schedule: Optional[Callable[[float], float]] = None,
             seconds: Optional[float] = None, max_progress: Optional[float] = None, evals_per_epoch: float = 2,
             device: Union[None, str, torch.device] = None, on_epoch: Optional[Callable[[], None]] = None,
             name: Optional[str] = None) -> Run:
    """Train one ``mode`` with one ``seed`` through ``train_loop`` (``name``: the run's label, default the mode's)."""
    device = None if device is None else torch.device(device)
    net, opt, loader, plan, store = _build(mode, seed, model, train_loader, optimizer, loss, epochs, device)
    return train_loop(net, opt, loader, epochs=epochs, evaluate=evaluate, loss=loss, schedule=schedule, plan=plan,
                      store=store, evals_per_epoch=evals_per_epoch, seconds=seconds, max_progress=max_progress,
                      device=device, mode=name or mode.name, seed=seed, fraction=mode.fraction, on_epoch=on_epoch)


def preflight(modes: Sequence[Mode], model: Callable[[], nn.Module], train_loader: DataLoader,
              optimizer: Callable, evaluate: Callable, loss: Callable, epochs: int,
              device: Optional[torch.device]) -> None:
    """One model, one batch, one step and one evaluation of every mode before any run: a misconfiguration fails in
    seconds, naming the factory (``model()``, ``optimizer(params)``, ``evaluate(model)``) or the mode at fault."""
    net = built_model(model)
    if device is not None:
        net = net.to(device)
    try:
        value = evaluate(net)
    except Exception as err:
        raise RuntimeError(f"compare: evaluate(model) raised {type(err).__name__}: {err}") from err
    score_of(value)
    for mode in modes:
        try:
            net, opt, loader, plan, store = _build(mode, 0, model, train_loader, optimizer, loss, epochs, device)
            if plan is not None:
                plan.set_epoch(0)
            step(net, opt, next(iter(loader)), loss, device, store)
        except Exception as err:
            if str(err).startswith("compare:"):  # a factory's own failure, named already
                raise
            raise RuntimeError(f"compare: the preflight of mode {mode.name!r} failed on its first batch, before any "
                               f"run ({type(err).__name__}: {err}). Fix the setup and call compare again") from err
