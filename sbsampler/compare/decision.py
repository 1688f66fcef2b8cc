"""The decision: recommend a mode, "train on everything", or "cannot tell", with the reason in words.

Timing on a shared machine is noisy: two identical runs of one script differ by more than a 5% margin.
So a mode is recommended only when the evidence is larger than that noise:

1. **Full training must be a reference.** A NaN score, full training missing its own target in some
   seed, not learning (its final score within a point of its score before training), or meeting its
   target at its first evaluation (no time to compare against) is "cannot tell", saying which.
2. **Seeds are paired.** Each seed's selective run is compared with the same seed's full run: its gain
   is ``1 - T_mode / T_full``, ``T`` the wall time to the target. One seed cannot tell noise from a
   saving: "cannot tell".
3. **A mode pays** when it reached the target in every seed, at least ``margin`` sooner in *every*
   seed, and its mean gain is larger than full training's own spread (``(max - min) / mean`` of its
   times to the target over seeds: what identical runs differ by). It **falls short** when it missed
   the target in a seed, **does not pay** when even its mean gain plus that spread stays below the
   margin, and is **unclear** otherwise (one seed slower, or a gain within the noise).
4. **A speed-up its kept share cannot explain is noise.** A mode measured faster per epoch than the
   cost model allows for the share it back-propagated (``ideal_speedup``, plus full training's spread
   of wall time per epoch and 5%) is flagged, never reported as a saving: "cannot tell".
5. **The fair baseline** (Kaddour et al., "No Train No Gain", NeurIPS 2023): where ``compare`` also ran
   full training on a schedule fitted to a mode's budget, a mode that pays must also end above it,
   paired by seed; where full training does as well on the shorter schedule, the answer is to train on
   everything for fewer epochs; where the two tie within the noise, "cannot tell".

The recommended mode is the paying one with the largest mean gain; with none, "cannot tell" if any
mode is unclear or flagged, else "train on everything".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

__all__ = ["Recommendation", "recommend", "classify", "MARGIN", "MIN_SEEDS", "VERDICTS"]

MARGIN = 0.05  # a mode must reach the target at least 5% sooner than full training, in every seed
MIN_SEEDS = 2  # seeds needed to measure full training's own spread
LEARNED = 0.01  # full training learned if its final score is at least this far above its score before training
VERDICTS = ("recommend", "train on everything", "cannot tell")


@dataclass
class Recommendation:
    """Which mode to train with (``mode``, with ``verdict="recommend"``), or ``"train on everything"``, or
    ``"cannot tell"`` (``mode=None``), and why, in words."""

    mode: Optional[str]
    reason: str
    verdict: str = "recommend"

    def __post_init__(self) -> None:
        if self.verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {VERDICTS}, got {self.verdict!r}")

    def __str__(self) -> str:
        head = {"recommend": f"Recommendation: {self.mode}", "cannot tell": "Recommendation: cannot tell",
                "train on everything": "Recommendation: train on everything (full)"}[self.verdict]
        return f"{head}. {self.reason}"


def _pct(x: float) -> str:
    return f"{x:+.0%}"


def classify(row: dict[str, Any], cost: dict[str, Any], margin: float = MARGIN) -> tuple[str, str]:
    """``(status, why)`` of one selective mode: ``"pays"``, ``"falls short"``, ``"does not pay"``, ``"unclear"`` or
    ``"noise"`` (the module docstring, rules 3 and 4)."""
    name = row["mode"]
    if row["reached"] < row["seeds"]:
        return "falls short", (f"{name} reached the target in {row['reached']} of {row['seeds']} seeds (final "
                               f"{row['final']:.4f})")
    if row.get("implausible"):
        spread = cost.get("epoch_noise") or 0.0
        return "noise", (f"{name} measured {row['speedup']:.2f}x full training's speed per epoch while "
                         f"back-propagating {row['kept']:.2f} of the samples, more than that share allows "
                         f"({row['ideal_speedup']:.2f}x by the cost model, with full training's own spread of "
                         f"{spread:.0%}): timing noise, not a saving")
    gains, noise = row["gains"], cost.get("noise") or 0.0
    per_seed = ", ".join(_pct(g) for g in gains)
    if not gains:
        return "falls short", f"{name} has no seed paired with a full run that reached the target"
    low, mean = min(gains), float(sum(gains) / len(gains))
    if low >= margin and mean > noise:
        return "pays", (f"{name} reached the target sooner in every seed ({per_seed}; mean {_pct(mean)}), more "
                        f"than full training's own spread of {noise:.0%} between seeds")
    if mean + noise < margin:
        return "does not pay", (f"{name} saved {_pct(mean)} on average ({per_seed}), less than the {margin:.0%} "
                                f"that would pay for the change even with the {noise:.0%} spread of full training")
    if low < margin:
        return "unclear", (f"{name} was {_pct(mean)} sooner on average but {_pct(low)} in one seed ({per_seed}): "
                           f"not sooner by {margin:.0%} in every seed")
    return "unclear", (f"{name} was {_pct(mean)} sooner on average ({per_seed}), within full training's own "
                       f"spread of {noise:.0%} between seeds")


def _reference_problem(rows: Sequence[dict[str, Any]], cost: dict[str, Any]) -> Optional[str]:
    """Why full training cannot serve as the reference (rule 1), or ``None``."""
    full = rows[0]
    if cost.get("nan_runs"):
        where = ", ".join(f"{m} seed {s}" for m, s in cost["nan_runs"][:4])
        return f"a score is NaN ({where}): evaluate(model) returned NaN, so no time to a target can be read"
    first, final = cost.get("full_first"), cost.get("full_final")
    if first is not None and final is not None and not (final - first >= max(LEARNED, 2 * cost.get("tolerance", 0))):
        return (f"full training did not learn: its score went from {first:.4f} before training to {final:.4f} "
                "(nothing to learn, or too few epochs or too low a learning rate); no saving can be measured")
    if full["reached"] < full["seeds"]:
        return (f"full training did not reach its own final score - tolerance ({cost['target']:.4f}) in every "
                f"seed ({full['reached']} of {full['seeds']}): the budget is too short to judge; give more epochs")
    if cost.get("first_hit_seeds"):
        moved = (f"; its score went from {first:.4f} before training to {final:.4f}" if first is not None else "")
        return (f"full training met its target ({cost['target']:.4f}) at its first evaluation (seeds "
                f"{cost['first_hit_seeds']}{moved}), so there is no time to compare against: evaluate more often "
                "(evals_per_epoch=), or pass a stricter target=")
    if cost.get("seeds", full["seeds"]) < MIN_SEEDS:
        return (f"{full['seeds']} seed cannot tell timing noise from a saving (two identical runs differ by more "
                "than the margin on a shared machine): run seeds=(0, 1, 2)")
    return None


def _break_even_note(cost: dict[str, Any]) -> str:
    be = cost.get("break_even")
    if be is None:
        return ""
    if be > 0:
        return (f" The break-even fraction here is {be:.2f} ({cost['break_even_mode']}): a score-reading rule that "
                "keeps more than that cannot save time on this model and machine.")
    return " Scoring a sample costs about as much as a step on it here, so no score-reading rule can save time."


def recommend(rows: Sequence[dict[str, Any]], cost: dict[str, Any], margin: float = MARGIN) -> Recommendation:
    """The decision of the module docstring on ``summarise``'s rows (the first full training) and cost figures."""
    note = _break_even_note(cost)
    problem = _reference_problem(rows, cost)
    if problem is not None:
        return Recommendation(None, f"{problem}.{note}", "cannot tell")
    full = rows[0]
    judged = [(row, *classify(row, cost, margin)) for row in rows[1:]]
    paying = [(row, why) for row, status, why in judged if status == "pays"]
    for row, why in sorted(paying, key=lambda item: -item[0]["gain_mean"]):
        vs = row.get("baseline_vs")
        if vs is None or vs == "selection better":
            against = (f" It also ended above full training on a schedule fitted to its budget "
                       f"({row['baseline_epochs']:.2g} epochs: {row['final']:.4f} against "
                       f"{row['baseline_final']:.4f})." if vs else
                       " (No budget-matched full training was run: pass schedule= to test against it.)")
            return Recommendation(row["mode"], (f"{why}, back-propagating {row['samples_to_target']} samples to the "
                                                f"target against {full['samples_to_target']}.{against}{note}"))
        if vs == "full better":
            return Recommendation(None, (f"{why}, but full training on a schedule fitted to the same budget "
                                         f"({row['baseline_epochs']:.2g} epochs) ended higher "
                                         f"({row['baseline_final']:.4f} against {row['final']:.4f}): train on "
                                         "everything for fewer epochs "
                                         f"instead.{note}"), "train on everything")
        return Recommendation(None, (f"{why}, but full training on a schedule fitted to the same budget "
                                     f"({row['baseline_epochs']:.2g} epochs) ended level with it "
                                     f"({row['baseline_final']:.4f} against {row['final']:.4f}, within the "
                                     f"tolerance or split by seed).{note}"), "cannot tell")
    open_ = [why for _, status, why in judged if status in ("unclear", "noise")]
    closed = [why for _, status, why in judged if status in ("falls short", "does not pay")]
    if open_:
        return Recommendation(None, "; ".join(open_) + "." + (" Otherwise: " + "; ".join(closed) + "." if closed
                                                             else "") + note, "cannot tell")
    if not judged:
        return Recommendation(None, f"only full training was run.{note}", "train on everything")
    return Recommendation(None, "; ".join(closed) + "." + note, "train on everything")
