"""Does selection pay on my model? One call trains full and selective modes and says which to use.

Whether selection saves time depends on the model, the data and the machine: a scoring
forward costs a share of a step, and the picks must keep up full training's accuracy.
``compare`` measures both on the user's own model, through one training loop for every
mode (the loop the benchmarks share)::

    import sbsampler as sb
    result = sb.compare(model=make_model, train_loader=train_dl, evaluate=test_accuracy,
                        optimizer=lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9),
                        epochs=4, strategy="sb", fractions=(0.25,), seeds=(0, 1))
    print(result.table())            # per mode: accuracy, time to full training's accuracy, cost split
    print(result.recommendation)     # which mode, or "train on everything", and the evidence
    result.write("compare_out")      # compare.jsonl (one line per run, then the summary) and compare.png

or ``python -m sbsampler.compare my_script.py --epochs 4`` for a script that defines
``model()``, ``train_loader()``, ``evaluate(model)`` and ``optimizer(params)`` (and may define
``loss(outputs, targets)`` per sample and ``schedule(epochs)``, returning ``progress -> LR factor``).

Default modes: full training; ``uniform`` (the baseline that matters), the given strategy
per batch, and InfoBatch at the sampler level (it loads only what it keeps), each at every
fraction. Each (mode, seed) trains a fresh ``model()`` for the same epochs (or until a
wall-clock budget), evaluated ``evals_per_epoch`` times an epoch; evaluation time is not
counted. Reported per mode: the final score, the wall time, optimizer steps and samples
back-propagated to full training's final score minus ``tolerance`` (0.5 pt), the split of
each run into loading, scoring + selection, and step, the measured speed-up per epoch and
the cost model's ideal one. The **break-even fraction** ``1 - c / s`` (``c``: scoring and
selection per sample, ``s``: step per back-propagated sample, both measured here) is the
kept share below which a score-reading rule can save time at all on this model and machine.
A preflight runs one batch of every mode first, so a misconfiguration fails in seconds.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import runpy
import sys
import time
import types
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from .batch import IndexedDataset, weighted_loss, with_indices
from .hook import ScoringHook
from .loader import SelectiveLoader
from .sampler import SelectiveSampler, WeightedBatches
from .schedule import progress_lr
from .stats import SelectionCostWarning
from .store import ScoreStore
from .strategies import InfoBatch, Strategy, get_strategy

__all__ = ["Mode", "Point", "Run", "Comparison", "Recommendation", "default_modes", "train_loop", "run_mode", "compare",
           "summarise", "recommend", "break_even", "ideal_speedup", "main"]

TOLERANCE = 0.005  # "full training's accuracy": its final score minus half a point
MARGIN = 0.05  # a mode must reach the target at least 5% sooner than full training to be recommended


@dataclass
class Mode:
    """One way to train: a strategy at a fraction, per batch (``SelectiveLoader``) or at the sampler level.

    ``strategy``: a registered name, a ``Strategy`` (deep-copied per run) or a factory ``seed -> Strategy``;
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
    """Full training, then per fraction: uniform, ``strategy`` (when not uniform) and sampler-level InfoBatch."""
    name = strategy if isinstance(strategy, str) else strategy.name
    modes = [Mode("full")]
    for f in fractions:
        modes.append(Mode(f"uniform {f:g}", "uniform", f))
        if name != "uniform":
            modes.append(Mode(f"{name} {f:g}", strategy, f))
        modes.append(Mode(f"sampler infobatch prune {1.0 - f:g}", lambda seed, f=f: InfoBatch(prune=1.0 - f, seed=seed),
                          level="sampler", options={"anneal": 0.125}))
    return modes


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
    """One (mode, seed) run: its curve of ``Point`` s and where its time went."""

    mode: str
    seed: int
    fraction: float
    curve: list[Point]
    wall_s: float
    steps: int
    samples_seen: int
    samples_backprop: int
    time_loading: float
    time_selection: float
    time_step: float
    weight_sum: float  # mean over steps of the step's weight sum

    @property
    def final(self) -> float:
        """The score at the last evaluation."""
        return self.curve[-1].score

    @property
    def progress(self) -> float:
        """Epochs of progress at the last evaluation."""
        return self.curve[-1].progress

    def reached(self, target: float) -> Optional[Point]:
        """The first evaluation scoring ``>= target``, or ``None``."""
        return next((point for point in self.curve if point.score >= target), None)


def _default_loss(outputs: Tensor, targets: Tensor) -> Tensor:
    return F.cross_entropy(outputs, targets, reduction="none")


def _move(x: Any, device: Optional[torch.device]) -> Any:
    return x if device is None else x.to(device, non_blocking=True)


def _step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: Any, loss: Callable[[Tensor, Tensor], Tensor],
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
               evaluate: Callable[[nn.Module], float], loss: Callable[[Tensor, Tensor], Tensor] = _default_loss,
               schedule: Optional[Callable[[float], float]] = None, plan: Optional[SelectiveSampler] = None,
               store: Optional[ScoreStore] = None, evals_per_epoch: float = 2, seconds: Optional[float] = None,
               device: Union[None, str, torch.device] = None, mode: str = "", seed: int = 0, fraction: float = 1.0,
               on_epoch: Optional[Callable[[], None]] = None, on_step: Optional[Callable[[Any], None]] = None,
               clock: Callable[[], float] = time.perf_counter) -> Run:
    """Train ``epochs`` epochs of ``loader``'s weighted steps (``sum_i w_i l_i``); the one loop of ``compare`` and
    the benchmarks.

    ``loader`` is a ``SelectiveLoader`` (per batch) or ``WeightedBatches`` over ``plan`` (sampler level: its
    ``set_epoch`` is called each epoch and the step's own losses go into ``store``). The model is evaluated
    ``evals_per_epoch`` times an epoch of progress (``loader.progress``) and at the end, outside the clock;
    ``seconds`` stops training once that much wall time is spent. ``schedule(progress)``: an LR factor.
    ``evals_per_epoch=0``: evaluate once, at the end (it may be fractional). ``on_step(batch)`` runs after each
    step, inside its time. Under ``SelectiveLoader(lookahead=N)`` the thread finishes its turn before the clock is
    read, so the time it works ahead is never free.
    """
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

    curve = [Point(0.0, 0, 0, 0.0, float(evaluate(model)))] if evals_per_epoch > 0 else []
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
            weights = _step(model, optimizer, batch, loss, device, store)
            if sched is not None:
                sched.step()
            if on_step is not None:
                on_step(batch)
            stepping += clock() - t1
            steps += 1
            rows += len(batch)
            weight_sums.append(float(weights.sum()))
            progress = float(loader.progress)
            over = seconds is not None and wall + (now() - t_epoch) >= seconds
            if progress + 1e-9 >= next_eval or over:
                wall += now() - t_epoch
                curve.append(Point(wall, steps, rows, progress, float(evaluate(model))))
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
        curve.append(Point(wall, steps, rows, float(loader.progress), float(evaluate(model))))
    if isinstance(loader, SelectiveLoader):
        selection, seen = loader.stats.selection_time, loader.stats.samples_seen
        loading = max(waiting - selection, 0.0)
    else:
        selection, seen, loading = planning, rows, waiting
    return Run(mode=mode, seed=seed, fraction=fraction, curve=curve, wall_s=wall, steps=steps, samples_seen=seen,
               samples_backprop=rows, time_loading=loading, time_selection=selection, time_step=stepping,
               weight_sum=float(np.mean(weight_sums)) if weight_sums else 0.0)


def _build(mode: Mode, seed: int, model_fn: Callable[[], nn.Module], train_loader: DataLoader,
           optimizer_fn: Callable[[Iterable], torch.optim.Optimizer], loss: Callable, epochs: int,
           device: Optional[torch.device]) -> tuple[nn.Module, torch.optim.Optimizer, Any, Any, Any]:
    """A fresh model (seeded), its optimizer, and the mode's loader (with its plan and store at the sampler level)."""
    torch.manual_seed(seed)
    model = model_fn()
    if device is not None:
        model = model.to(device)
    opt = optimizer_fn(model.parameters())
    strategy = mode.make_strategy(seed)
    if mode.level == "sampler":
        data = train_loader.dataset
        data = data if isinstance(data, IndexedDataset) else with_indices(data)
        store = ScoreStore(len(data))
        plan = SelectiveSampler(store, strategy, mode.fraction, epochs=epochs, seed=seed, **mode.options)
        loader = WeightedBatches(DataLoader(data, batch_size=train_loader.batch_size, sampler=plan,
                                            num_workers=train_loader.num_workers), plan)
        return model, opt, loader, plan, store
    hook = ScoringHook(model, loss=loss if loss is not _default_loss else "cross_entropy")
    loader = SelectiveLoader(train_loader, hook, strategy, mode.fraction, device=device, **mode.options)
    return model, opt, loader, None, None


def run_mode(mode: Mode, seed: int, *, model: Callable[[], nn.Module], train_loader: DataLoader,
             optimizer: Callable[[Iterable], torch.optim.Optimizer], evaluate: Callable[[nn.Module], float],
             epochs: int, loss: Callable = _default_loss, schedule: Optional[Callable[[float], float]] = None,
             seconds: Optional[float] = None, evals_per_epoch: float = 2,
             device: Union[None, str, torch.device] = None, on_epoch: Optional[Callable[[], None]] = None) -> Run:
    """Train one ``mode`` with one ``seed`` through ``train_loop``."""
    device = None if device is None else torch.device(device)
    net, opt, loader, plan, store = _build(mode, seed, model, train_loader, optimizer, loss, epochs, device)
    return train_loop(net, opt, loader, epochs=epochs, evaluate=evaluate, loss=loss, schedule=schedule, plan=plan,
                      store=store, evals_per_epoch=evals_per_epoch, seconds=seconds, device=device, mode=mode.name,
                      seed=seed, fraction=mode.fraction, on_epoch=on_epoch)


def _preflight(modes: Sequence[Mode], model: Callable[[], nn.Module], train_loader: DataLoader,
               optimizer: Callable, loss: Callable, epochs: int, device: Optional[torch.device]) -> None:
    """One scored batch and one step of every mode, on throwaway models: a misconfiguration fails in seconds."""
    for mode in modes:
        try:
            net, opt, loader, plan, store = _build(mode, 0, model, train_loader, optimizer, loss, epochs, device)
            if plan is not None:
                plan.set_epoch(0)
            _step(net, opt, next(iter(loader)), loss, device, store)
        except Exception as err:
            raise RuntimeError(f"compare: the preflight of mode {mode.name!r} failed on its first batch, before any "
                               f"run ({type(err).__name__}: {err}). Fix the setup and call compare again") from err


def break_even(selection_per_sample: float, step_per_sample: float) -> float:
    """The kept share below which a score-reading rule saves time: ``1 - c / s`` (``<= 0``: no share pays)."""
    if step_per_sample <= 0:
        raise ValueError(f"the step cost per sample must be > 0, got {step_per_sample}")
    return 1.0 - selection_per_sample / step_per_sample


def ideal_speedup(fraction: float, selection_per_sample: float, step_per_sample: float,
                  loading_per_sample: float = 0.0, level: str = "batch") -> float:
    """The cost model's speed-up per epoch against full training: per batch every sample is loaded and scored and
    ``fraction`` of them stepped on; at the sampler level only ``fraction`` of them is loaded, with no scoring.
    ``fraction``: the share actually back-propagated (a variable-count rule's, measured)."""
    full = loading_per_sample + step_per_sample
    if level == "sampler":
        cost = fraction * (loading_per_sample + step_per_sample)
    else:
        cost = loading_per_sample + selection_per_sample + fraction * step_per_sample
    return full / cost if cost > 0 else math.inf


def summarise(runs: Sequence[Run], modes: Sequence[Mode], target: Optional[float] = None,
              tolerance: float = TOLERANCE) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Per mode: final score (mean, std), seeds that reached the target, wall time / steps / samples back-propagated
    to it (mean over those), the cost split per sample, measured and ideal speed-up; and the cost model's figures."""
    full_runs = [r for r in runs if r.mode == modes[0].name]
    if target is None:
        target = float(np.mean([r.final for r in full_runs])) - tolerance
    step_s = float(np.mean([r.time_step / max(r.samples_backprop, 1) for r in full_runs]))
    load_s = float(np.mean([r.time_loading / max(r.samples_seen, 1) for r in full_runs]))
    full_wall = float(np.mean([r.wall_s / max(r.progress, 1e-9) for r in full_runs]))  # per epoch
    full_rows = float(np.mean([r.samples_backprop / max(r.progress, 1e-9) for r in full_runs]))
    rows = []
    for m in modes:
        rs = [r for r in runs if r.mode == m.name]
        if not rs:
            continue
        hits = [h for h in (r.reached(target) for r in rs) if h is not None]
        sel = float(np.mean([r.time_selection / max(r.samples_seen, 1) for r in rs]))
        per_epoch = float(np.mean([r.wall_s / max(r.progress, 1e-9) for r in rs]))
        finals = [r.final for r in rs]
        if m.level == "sampler":  # rows back-propagated per epoch, against full training's (every sample)
            kept = float(np.mean([r.samples_backprop / max(r.progress, 1e-9) for r in rs])) / full_rows
        else:
            kept = float(np.mean([r.samples_backprop / max(r.samples_seen, 1) for r in rs]))
        rows.append({
            "mode": m.name, "level": m.level, "fraction": m.fraction, "kept": kept, "final": float(np.mean(finals)),
            "final_std": float(np.std(finals)), "reached": len(hits), "seeds": len(rs),
            "time_to_target_s": float(np.mean([h.wall for h in hits])) if hits else None,
            "steps_to_target": int(np.mean([h.steps for h in hits])) if hits else None,
            "samples_to_target": int(np.mean([h.rows for h in hits])) if hits else None,
            "epochs_to_target": float(np.mean([h.progress for h in hits])) if hits else None,
            "wall_s": float(np.mean([r.wall_s for r in rs])), "steps": int(np.mean([r.steps for r in rs])),
            "samples_backprop": int(np.mean([r.samples_backprop for r in rs])),
            "loading_share": float(np.mean([r.time_loading / r.wall_s for r in rs if r.wall_s > 0] or [0.0])),
            "selection_share": float(np.mean([r.time_selection / r.wall_s for r in rs if r.wall_s > 0] or [0.0])),
            "step_share": float(np.mean([r.time_step / r.wall_s for r in rs if r.wall_s > 0] or [0.0])),
            "selection_per_sample_s": sel,
            "speedup": full_wall / per_epoch if per_epoch > 0 else None,
            "ideal_speedup": 1.0 if m.is_full else ideal_speedup(kept, sel, step_s, load_s, m.level),
        })
    by_name = {m.name: m for m in modes}
    scored = [r for r in rows if r["selection_per_sample_s"] > 0 and by_name[r["mode"]].level == "batch"
              and not by_name[r["mode"]].is_full]
    costliest = max(scored, key=lambda r: r["selection_per_sample_s"], default=None)  # the break-even's rule
    known = costliest is not None and step_s > 0
    model = {"target": target, "step_per_sample_s": step_s, "loading_per_sample_s": load_s,
             "break_even": break_even(costliest["selection_per_sample_s"], step_s) if known else None,
             "break_even_mode": costliest["mode"] if costliest is not None else None}
    return rows, model


@dataclass
class Recommendation:
    """Which mode to train with (``None``: train on everything), and why, in words."""

    mode: Optional[str]
    reason: str

    def __str__(self) -> str:
        head = f"Recommendation: {self.mode}" if self.mode else "Recommendation: train on everything (full)"
        return f"{head}. {self.reason}"


def recommend(rows: Sequence[dict[str, Any]], cost: dict[str, Any], margin: float = MARGIN) -> Recommendation:
    """The fastest mode that reached the target in every seed and at least ``margin`` sooner than full training;
    otherwise full training, saying why (nothing reached the target, or nothing was fast enough)."""
    full, others = rows[0], list(rows[1:])
    be = cost.get("break_even")
    note = (f" The break-even fraction here is {be:.2f} ({cost['break_even_mode']}): a score-reading rule that "
            f"keeps more than that cannot save time on this model and machine." if be is not None and be > 0 else
            " Scoring a sample costs about as much as a step on it here, so no score-reading rule can save time."
            if be is not None else "")
    full_t = full["time_to_target_s"] if full["reached"] == full["seeds"] else None
    if full_t is None:
        return Recommendation(None, f"full training did not reach its own final score - tolerance in every seed "
                                    f"(target {cost['target']:.4f}): the budget is too short to judge; give more "
                                    f"epochs." + note)
    done = [r for r in others if r["reached"] == r["seeds"] and r["time_to_target_s"] is not None]
    if not done:
        best = max(others, key=lambda r: r["final"]) if others else None
        tail = (f" The best, {best['mode']}, ended at {best['final']:.4f} against full training's "
                f"{full['final']:.4f}." if best else "")
        return Recommendation(None, f"no selective mode reached {cost['target']:.4f} (full training's final score "
                                    f"- tolerance) in every seed within the budget.{tail}" + note)
    fastest = min(done, key=lambda r: r["time_to_target_s"])
    gain = 1.0 - fastest["time_to_target_s"] / full_t
    if gain < margin:
        return Recommendation(None, f"the fastest selective mode, {fastest['mode']}, reached {cost['target']:.4f} "
                                    f"in {fastest['time_to_target_s']:.3g} s against full training's {full_t:.3g} s "
                                    f"({gain:+.0%}), less than the {margin:.0%} that would pay for the change."
                                    + note)
    return Recommendation(fastest["mode"], f"it reached {cost['target']:.4f} (full training's final score - "
                                           f"tolerance) in every seed, in {fastest['time_to_target_s']:.3g} s "
                                           f"against full training's {full_t:.3g} s ({gain:.0%} less wall time), "
                                           f"back-propagating {fastest['samples_to_target']} samples against "
                                           f"{full['samples_to_target']}." + note)


COLUMNS = [("mode", "mode", "s"), ("kept", "kept", ".2f"), ("final", "final", ".4f"), ("final_std", "± std", ".4f"),
           ("reached", "reached", "d"), ("time_to_target_s", "s to target", ".3g"),
           ("samples_to_target", "rows to target", "d"), ("speedup", "speed-up/epoch", ".2f"),
           ("ideal_speedup", "ideal", ".2f"), ("loading_share", "loading", ".0%"),
           ("selection_share", "scoring+sel.", ".0%"), ("step_share", "step", ".0%")]


@dataclass
class Comparison:
    """``compare``'s result: every run, the summary per mode, the cost model and the recommendation."""

    runs: list[Run]
    summary: list[dict[str, Any]]
    cost: dict[str, Any]
    recommendation: Recommendation
    settings: dict[str, Any]

    def table(self) -> str:
        """The summary as a Markdown table (``reached``: seeds that reached the target, of all seeds)."""
        head = "| " + " | ".join(c[1] for c in COLUMNS) + " |"
        lines = [head, "|" + "---|" * len(COLUMNS)]
        for r in self.summary:
            cells = []
            for key, _, fmt in COLUMNS:
                v = r[key]
                if key == "reached":
                    cells.append(f"{v}/{r['seeds']}")
                elif v is None:
                    cells.append("—")
                else:
                    cells.append(format(v, fmt))
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def report(self) -> str:
        """The table, the target and the cost model's figures, and the recommendation, as printed."""
        be = self.cost["break_even"]
        return "\n".join([
            self.table(), "",
            f"target: {self.cost['target']:.4f} (full training's final score - tolerance); step "
            f"{1e3 * self.cost['step_per_sample_s']:.3g} ms per back-propagated sample"
            + (f"; break-even fraction {be:.2f} ({self.cost['break_even_mode']})" if be is not None else ""),
            str(self.recommendation)])

    def write(self, out_dir: Union[str, Path]) -> tuple[Path, Path]:
        """``compare.jsonl`` (one compact line per run, then one with the summary, cost model and recommendation)
        and ``compare.png`` (score against wall time and against samples back-propagated) in ``out_dir``."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        lines = [json.dumps({"run": asdict(r)}, separators=(",", ":")) for r in self.runs]
        lines.append(json.dumps({"summary": self.summary, "cost": self.cost, "settings": self.settings,
                                 "recommendation": asdict(self.recommendation)}, separators=(",", ":")))
        data = out / "compare.jsonl"
        data.write_text("\n".join(lines) + "\n")
        png = out / "compare.png"
        self.plot(png)
        return data, png

    def plot(self, path: Union[str, Path]) -> None:
        """Score against wall time and against rows back-propagated, one line per run (needs matplotlib)."""
        try:
            import matplotlib
        except ImportError as err:
            raise ImportError("Comparison.plot and write need matplotlib: pip install matplotlib (or the "
                              "sbsampler[compare] extra); result.report() and result.summary need nothing more") from err

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
        for i, row in enumerate(self.summary):
            color = f"C{i % 10}"
            for j, r in enumerate(x for x in self.runs if x.mode == row["mode"]):
                walls, _, rows_, _, score = zip(*r.curve)
                kw = {"label": row["mode"]} if j == 0 else {}
                a.plot(walls, score, color=color, alpha=0.8, **kw)
                b.plot(rows_, score, color=color, alpha=0.8)
        for ax in (a, b):
            ax.axhline(self.cost["target"], color="grey", ls=":", lw=1)
        a.set(xlabel="wall seconds (evaluation not counted)", ylabel="score", title="score against wall time")
        b.set(xlabel="samples back-propagated", title="score against back-propagation")
        a.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)


def compare(*, model: Callable[[], nn.Module], train_loader: DataLoader, evaluate: Callable[[nn.Module], float],
            optimizer: Callable[[Iterable], torch.optim.Optimizer], epochs: int = 4, seconds: Optional[float] = None,
            strategy: Union[str, Strategy] = "sb", fractions: Sequence[float] = (0.25,),
            modes: Optional[Sequence[Mode]] = None, seeds: Sequence[int] = (0,), target: Optional[float] = None,
            tolerance: float = TOLERANCE, loss: Callable[[Tensor, Tensor], Tensor] = _default_loss,
            schedule: Optional[Callable[[float], float]] = None, evals_per_epoch: float = 2,
            device: Union[None, str, torch.device] = None, progress: bool = True, preflight: bool = True,
            margin: float = MARGIN) -> Comparison:
    """Train full and selective modes of the user's model through one loop; the table, the cost model and a
    recommendation (see the module docstring).

    Args:
        model: builds a fresh model (each run seeds torch before calling it).
        train_loader: a ``DataLoader`` of ``(input, target)`` samples; wrapped as it is per batch; its
            dataset (with indices) and batch size make the sampler-level loader.
        evaluate: ``evaluate(model) -> float``, higher is better (e.g. test accuracy); called outside the clock.
        optimizer: ``optimizer(params) -> Optimizer``.
        epochs: epochs per run; ``seconds``: also stop a run once it has trained that long.
        strategy: the strategy of the default modes (``default_modes``).
        fractions: the fractions of the default modes.
        modes: the modes to run instead of the default ones (the first must be full training: the reference).
        seeds: one run per mode and seed.
        target: the score that counts as "reached"; default full training's mean final score - ``tolerance``.
        loss: per-sample loss ``(outputs, targets) -> (B,)``; default cross-entropy.
        schedule: ``schedule(progress in epochs) -> LR factor`` (``sb.schedule.cosine(epochs)``).
        device: where the model and batches go.
        progress: a progress bar (tqdm) over the runs' epochs.
        preflight: one batch and one step of every mode before any run.
        margin: how much sooner than full training a mode must reach the target to be recommended.
    """
    modes = list(modes) if modes is not None else default_modes(strategy, fractions)
    if not modes or not modes[0].is_full:
        raise ValueError("compare: the first mode must be full training (Mode('full')), the reference of the rest")
    if len({m.name for m in modes}) != len(modes):
        raise ValueError(f"compare: mode names must differ, got {[m.name for m in modes]}")
    if epochs < 1:
        raise ValueError(f"compare: epochs must be >= 1, got {epochs}")
    if not isinstance(train_loader, DataLoader):
        raise TypeError(f"compare takes a torch DataLoader as train_loader, got {type(train_loader).__name__}")
    dev = None if device is None else torch.device(device)
    with warnings.catch_warnings():
        return _compare(modes, model, train_loader, evaluate, optimizer, epochs, seconds, seeds, target, tolerance,
                        loss, schedule, evals_per_epoch, dev, progress, preflight, margin)


def _compare(modes: list[Mode], model: Callable, train_loader: DataLoader, evaluate: Callable, optimizer: Callable,
             epochs: int, seconds: Optional[float], seeds: Sequence[int], target: Optional[float], tolerance: float,
             loss: Callable, schedule: Optional[Callable], evals_per_epoch: int, dev: Optional[torch.device],
             progress: bool, preflight: bool, margin: float) -> Comparison:
    if preflight:
        _preflight(modes, model, train_loader, optimizer, loss, epochs, dev)
    bar = None
    if progress:
        try:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(modes) * len(seeds) * epochs, desc="compare", unit="epoch")
        except ImportError:  # pragma: no cover - tqdm is optional
            bar = None
    runs = []
    try:
        warnings.simplefilter("ignore", SelectionCostWarning)  # compare measures the cost itself, and says so
        for seed in seeds:
            for m in modes:
                if bar is not None:
                    bar.set_postfix_str(f"{m.name}, seed {seed}")
                runs.append(run_mode(m, seed, model=model, train_loader=train_loader, optimizer=optimizer,
                                     evaluate=evaluate, epochs=epochs, loss=loss, schedule=schedule, seconds=seconds,
                                     evals_per_epoch=evals_per_epoch, device=dev,
                                     on_epoch=(lambda: bar.update(1)) if bar is not None else None))
    finally:
        if bar is not None:
            bar.close()
    rows, cost = summarise(runs, modes, target, tolerance)
    settings = {"epochs": epochs, "seconds": seconds, "seeds": list(seeds), "tolerance": tolerance,
                "margin": margin, "modes": [{"name": m.name, "level": m.level, "fraction": m.fraction}
                                            for m in modes]}
    return Comparison(runs, rows, cost, recommend(rows, cost, margin), settings)


def main(argv: Optional[list[str]] = None) -> int:
    """``python -m sbsampler.compare SCRIPT [options]``: run ``compare`` on a script's factories; prints the report, writes the files."""
    parser = argparse.ArgumentParser(
        prog="python -m sbsampler.compare",
        description="Does selection pay on my model? SCRIPT defines model(), train_loader(), evaluate(model) and "
                    "optimizer(params); optionally loss(outputs, targets) per sample and schedule(epochs) -> "
                    "(progress -> LR factor).")
    parser.add_argument("script")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=None, help="also stop each run after this much training")
    parser.add_argument("--strategy", default="sb")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.25])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--target", type=float, default=None)
    parser.add_argument("--device", default=None)
    parser.add_argument("--out", default="compare_out", help="folder for compare.jsonl and compare.png")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    ns = runpy.run_path(args.script, run_name="sbsampler_compare_script")
    missing = [k for k in ("model", "train_loader", "evaluate", "optimizer") if not callable(ns.get(k))]
    if missing:
        parser.error(f"{args.script} must define {', '.join(missing)} (see python -m sbsampler.compare --help)")
    schedule = ns["schedule"](args.epochs) if callable(ns.get("schedule")) else None
    result = compare(model=ns["model"], train_loader=ns["train_loader"](), evaluate=ns["evaluate"],
                     optimizer=ns["optimizer"], epochs=args.epochs, seconds=args.seconds, strategy=args.strategy,
                     fractions=args.fractions, seeds=args.seeds, target=args.target,
                     loss=ns.get("loss") or _default_loss, schedule=schedule, device=args.device,
                     progress=not args.no_progress)
    print(result.report())
    data, png = result.write(args.out)
    print(f"wrote {data} and {png}")
    return 0


class _CallableModule(types.ModuleType):
    """``sb.compare(...)`` calls ``compare``; ``sbsampler.compare.Mode`` and the rest stay reachable."""

    def __call__(self, **kwargs: Any) -> Comparison:
        return compare(**kwargs)


if __name__ == "__main__":
    sys.exit(main())
else:
    sys.modules[__name__].__class__ = _CallableModule
