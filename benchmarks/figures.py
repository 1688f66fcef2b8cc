"""The benchmarks' figures, readable at a page's width: one panel per data set, at most six series, distinct colours
and a legend in each panel.

    python benchmarks/figures.py        # redraws paper.png and time_to_accuracy.png from their results files

``paper.py`` and ``time_to_accuracy.py`` draw their figures through these functions too, so a
re-run of a benchmark and a redraw give the same picture.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS  # noqa: E402

__all__ = ["paper_figure", "time_to_accuracy_figure", "COLOURS"]

#: one colour per series, the same across figures (Okabe-Ito, readable in colour blindness)
COLOURS = {"full": "#000000", "uniform": "#E69F00", "sb": "#56B4E9", "topk": "#D55E00", "gradmatch": "#009E73",
           "importance": "#CC79A7", "sampler uniform": "#F0E442", "sampler infobatch": "#0072B2",
           "infobatch": "#0072B2", "composer": "#999999"}
PAPER_METHODS = ("uniform", "sb", "topk", "gradmatch", "importance")  # with full training: six series
TTA_MODES = ("full", "uniform 0.25", "sb 0.25", "gradmatch 0.25", "sampler uniform 0.5", "sampler infobatch 0.5")


def _colour(name: str) -> str:
    key = next((k for k in sorted(COLOURS, key=len, reverse=True) if name.startswith(k)), "full")
    return COLOURS[key]


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def paper_figure(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """Test accuracy at an equal backward budget (every rule back-propagates as many samples as full training),
    against the kept fraction: one panel per data set, full training as a band (mean ± std)."""
    plt = _plt()
    datasets = sorted({r["dataset"] for r in rows})
    fig, axes = plt.subplots(1, len(datasets), figsize=(6.2 * len(datasets), 4.4), squeeze=False)
    for ax, d in zip(axes[0], datasets):
        full = next((r for r in rows if r["dataset"] == d and r["method"] == "full"), None)
        if full is not None:
            ax.axhspan(full["acc_mean"] - full["acc_std"], full["acc_mean"] + full["acc_std"], color="#000000",
                       alpha=0.12)
            ax.axhline(full["acc_mean"], color="#000000", lw=1.5, label=f"full training ({full['acc_mean']:.3f})")
        ref = full["acc_mean"] if full is not None else 1.0
        floor = ref - 0.08  # zoomed on full training's neighbourhood; a collapse is drawn at the edge, labelled
        for j, m in enumerate(PAPER_METHODS):
            pts = sorted((r["fraction"], r["acc_mean"], r["acc_std"]) for r in rows
                         if r["dataset"] == d and r["method"] == m and r["budget"] == "backward")
            if not pts:
                continue
            xs, ys, es = (np.array(v) for v in zip(*pts))
            shift = xs * (1 + 0.05 * (j - 2))  # side by side at each fraction
            shown = np.maximum(ys, floor + 0.004)
            ax.errorbar(shift, shown, yerr=np.where(ys > floor, es, 0.0), marker="o", ms=6, capsize=3, lw=1.4,
                        color=_colour(m), label=m)
            for x, y in zip(shift, ys):
                if y <= floor:
                    ax.annotate(f"{m}: {y:.2f}", (x, floor + 0.004), xytext=(0, 12), textcoords="offset points",
                                ha="center", fontsize=8, color=_colour(m), arrowprops={"arrowstyle": "->",
                                                                                       "color": _colour(m)})
        ax.set_xscale("log")
        ax.set_xticks([0.1, 0.25, 0.5], ["0.1", "0.25", "0.5"])
        ax.minorticks_off()
        ax.set_ylim(floor, min(1.0, ref + 0.03))
        ax.set(xlabel="kept fraction of each batch (more epochs, the same samples back-propagated)",
               ylabel="test accuracy (mean ± std of seeds)", title=f"{d}: at an equal backward budget")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def time_to_accuracy_figure(runs: Sequence[dict[str, Any]], targets: dict[str, Any], path: Path,
                            modes: Sequence[str] = TTA_MODES) -> None:
    """Test accuracy against wall seconds (mean of seeds), one panel per data set, full training's final accuracy
    − 0.5 pt as the target line."""
    plt = _plt()
    datasets = [d for d in ("mnist", "digits", "mnist1d") if any(r["dataset"] == d for r in runs)]
    datasets += sorted({r["dataset"] for r in runs} - set(datasets))
    fig, axes = plt.subplots(1, len(datasets), figsize=(6.2 * len(datasets), 4.6), squeeze=False)
    for ax, name in zip(axes[0], datasets):
        for mode in modes:
            rs = [r for r in runs if r["dataset"] == name and r["mode"] == mode]
            if not rs:
                continue
            n = min(len(r["curve"]) for r in rs)  # the same evaluation points for every seed of a mode
            wall = np.mean([[c[0] for c in r["curve"][:n]] for r in rs], axis=0)
            acc = np.mean([[c[2] for c in r["curve"][:n]] for r in rs], axis=0)
            ax.plot(wall, acc, "-" if mode == "full" else ("--" if mode.startswith("sampler") else "-"),
                    lw=2.4 if mode == "full" else 1.6, color=_colour(mode), label=mode)
        target = targets.get(name, {}).get("minus_half_pt")
        if target is not None:
            ax.axhline(target, color="#555555", lw=0.9, ls=":", label="full's final − 0.5 pt")
            ax.set_ylim(max(0.0, target - 0.2), min(1.0, target + 0.04))
        ax.set(title=f"{name}: accuracy against wall time", xlabel="wall seconds (evaluation excluded)",
               ylabel="test accuracy (mean of seeds)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    paper = json.loads((RESULTS / "paper.json").read_text())
    paper_figure(paper["rows"], RESULTS / "paper.png")
    tta = json.loads((RESULTS / "time_to_accuracy.json").read_text())
    time_to_accuracy_figure(tta["runs"], tta["targets"], RESULTS / "time_to_accuracy.png")
    print(f"wrote {RESULTS / 'paper.png'} and {RESULTS / 'time_to_accuracy.png'}")


if __name__ == "__main__":
    main()
