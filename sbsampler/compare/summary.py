"""From runs to a row per mode: the score, the time to full training's score, paired by seed, where the time went,
the measured and ideal speed-ups, the time saved (measured, and as the loader estimated it), and how much the
seeds of full training itself differ (the noise a saving must beat).

Nothing here decides: ``sbsampler.compare.decision`` reads the rows and the cost figures.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Optional

import numpy as np

from .costs import break_even, ideal_speedup
from .loop import Run
from .modes import Mode

__all__ = ["summarise", "TOLERANCE", "relative_spread"]

TOLERANCE = 0.005  # "full training's accuracy": its final score minus half a point
IMPLAUSIBLE_SLACK = 0.05  # a measured speed-up this far above the cost model's (after the timing spread) is noise


def relative_spread(values: Sequence[float]) -> Optional[float]:
    """``(max - min) / mean`` of positive ``values``: how much identical runs differ (``None`` for fewer than 2)."""
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if len(vals) < 2 or np.mean(vals) <= 0:
        return None
    return float((max(vals) - min(vals)) / np.mean(vals))


def _mean(values: Sequence[Optional[float]]) -> Optional[float]:
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


def _has_nan(run: Run) -> bool:
    return any(math.isnan(p.score) for p in run.curve)


def summarise(runs: Sequence[Run], modes: Sequence[Mode], target: Optional[float] = None,
              tolerance: float = TOLERANCE,
              baselines: Optional[dict[str, list[Run]]] = None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Per mode: final score (mean, std), seeds that reached the target, wall time / steps / samples back-propagated
    to it (mean over those), the gain over full training per seed, the cost split, measured and ideal speed-up, the
    time saved (measured against the same seed's full run, and the loader's estimate), and against the
    budget-matched full training in ``baselines`` (mode name -> runs) where given; and the cost model's figures
    with full training's own spread."""
    full_runs = [r for r in runs if r.mode == modes[0].name]
    finals = [r.final for r in full_runs if not math.isnan(r.final)]
    if target is None:
        target = float(np.mean(finals)) - tolerance if finals else math.nan
    full_hits = {r.seed: r.reached(target) for r in full_runs}
    full_time = {s: h.wall for s, h in full_hits.items() if h is not None}
    full_epoch = {r.seed: r.wall_per_epoch for r in full_runs}
    step_s = float(np.mean([r.time_step / max(r.samples_backprop, 1) for r in full_runs]))
    load_s = float(np.mean([r.time_loading / max(r.samples_seen, 1) for r in full_runs]))
    full_wall = float(np.mean(list(full_epoch.values())))  # per epoch
    full_rows = float(np.mean([r.samples_backprop / max(r.progress, 1e-9) for r in full_runs]))
    epoch_noise = relative_spread(list(full_epoch.values()))
    rows = []
    for m in modes:
        rs = [r for r in runs if r.mode == m.name]
        if not rs:
            continue
        hits = {r.seed: r.reached(target) for r in rs}
        reached = [h for h in hits.values() if h is not None]
        sel = float(np.mean([r.time_selection / max(r.samples_seen, 1) for r in rs]))
        per_epoch = float(np.mean([r.wall_per_epoch for r in rs]))
        finals_m = [r.final for r in rs]
        if m.level == "sampler":  # rows back-propagated per epoch, against full training's (every sample)
            kept = float(np.mean([r.samples_backprop / max(r.progress, 1e-9) for r in rs])) / full_rows
        else:
            kept = float(np.mean([r.samples_backprop / max(r.samples_seen, 1) for r in rs]))
        gains = [] if m.is_full else [1.0 - h.wall / full_time[s] for s, h in sorted(hits.items())
                                      if h is not None and full_time.get(s, 0) > 0]
        speedup = full_wall / per_epoch if per_epoch > 0 else None
        ideal = 1.0 if m.is_full else ideal_speedup(kept, sel, step_s, load_s, m.level)
        measured = [full_epoch[r.seed] * r.progress - r.wall_s for r in rs if r.seed in full_epoch]
        row = {
            "mode": m.name, "level": m.level, "fraction": m.fraction, "kept": kept,
            "final": float(np.mean(finals_m)), "final_std": float(np.std(finals_m)), "reached": len(reached),
            "seeds": len(rs), "time_to_target_s": _mean([h.wall for h in reached]),
            "steps_to_target": int(np.mean([h.steps for h in reached])) if reached else None,
            "samples_to_target": int(np.mean([h.rows for h in reached])) if reached else None,
            "epochs_to_target": _mean([h.progress for h in reached]),
            "gains": gains, "gain_min": min(gains) if gains else None, "gain_mean": _mean(gains),
            "wall_s": float(np.mean([r.wall_s for r in rs])), "steps": int(np.mean([r.steps for r in rs])),
            "samples_backprop": int(np.mean([r.samples_backprop for r in rs])),
            "loading_share": float(np.mean([r.time_loading / r.wall_s for r in rs if r.wall_s > 0] or [0.0])),
            "selection_share": float(np.mean([r.time_selection / r.wall_s for r in rs if r.wall_s > 0] or [0.0])),
            "step_share": float(np.mean([r.time_step / r.wall_s for r in rs if r.wall_s > 0] or [0.0])),
            "selection_per_sample_s": sel, "speedup": speedup, "ideal_speedup": ideal,
            "implausible": (not m.is_full and speedup is not None
                            and speedup > ideal * (1.0 + (epoch_noise or 0.0)) + IMPLAUSIBLE_SLACK),
            "saving_measured_s": None if m.is_full else _mean(measured),
            "saving_measured_range": [min(measured), max(measured)] if measured and not m.is_full else None,
            "saving_estimated": None if m.is_full else _estimated([r.estimate for r in rs]),
        }
        if baselines and m.name in baselines:
            row.update(_against_baseline(rs, baselines[m.name], tolerance))
        rows.append(row)
    by_name = {m.name: m for m in modes}
    scored = [r for r in rows if r["selection_per_sample_s"] > 0 and by_name[r["mode"]].level == "batch"
              and not by_name[r["mode"]].is_full]
    costliest = max(scored, key=lambda r: r["selection_per_sample_s"], default=None)  # the break-even's rule
    known = costliest is not None and step_s > 0
    firsts = [r.first for r in full_runs if r.first is not None]
    early = sorted(s for s, h in full_hits.items() if h is not None and _first_evaluation(full_runs, s, h))
    cost = {"target": target, "tolerance": tolerance, "step_per_sample_s": step_s, "loading_per_sample_s": load_s,
            "break_even": break_even(costliest["selection_per_sample_s"], step_s) if known else None,
            "break_even_mode": costliest["mode"] if costliest is not None else None,
            "seeds": len(full_runs), "noise": relative_spread(list(full_time.values())), "epoch_noise": epoch_noise,
            "full_first": float(np.mean(firsts)) if firsts else None,
            "full_final": float(np.mean(finals)) if finals else math.nan,
            "first_hit_seeds": early, "nan_runs": [(r.mode, r.seed) for r in runs if _has_nan(r)]}
    return rows, cost


def _first_evaluation(full_runs: Sequence[Run], seed: int, hit: Any) -> bool:
    """Whether full training of ``seed`` met the target at its first evaluation (before or at its first one after
    training started): no time to compare against."""
    run = next(r for r in full_runs if r.seed == seed)
    evaluated = [p for p in run.curve if p.steps > 0]
    return hit.steps == 0 or (bool(evaluated) and hit == evaluated[0] and len(evaluated) > 1)


def _estimated(estimates: Sequence[Optional[dict]]) -> Optional[dict]:
    """The runs' own saving estimates, averaged: the range's ends, the point where every run named one."""
    given = [e for e in estimates if e is not None]
    if not given:
        return None
    points = [e["point"] for e in given]
    return {"low": float(np.mean([e["low"] for e in given])), "high": float(np.mean([e["high"] for e in given])),
            "point": float(np.mean(points)) if all(p is not None for p in points) else None,
            "basis": given[0]["basis"]}


def _against_baseline(runs: Sequence[Run], baseline: Sequence[Run], tolerance: float) -> dict[str, Any]:
    """The mode's final scores against full training on a schedule fitted to its budget, paired by seed."""
    mine = {r.seed: r.final for r in runs}
    deltas = [mine[b.seed] - b.final for b in baseline if b.seed in mine]
    if not deltas:
        return {}
    mean = float(np.mean(deltas))
    if min(deltas) > 0 and mean > tolerance:
        verdict = "selection better"
    elif max(deltas) < 0 and mean < -tolerance:
        verdict = "full better"
    else:
        verdict = "tie"
    return {"baseline_final": float(np.mean([b.final for b in baseline])),
            "baseline_epochs": float(np.mean([b.progress for b in baseline])), "baseline_deltas": deltas,
            "baseline_vs": verdict}
