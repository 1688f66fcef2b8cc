"""The benchmarks' figures, readable at a page's width: one panel per data set, at most six series, distinct colours
and a legend in each panel.

    python benchmarks/figures.py        # redraws every figure below from the committed results files

``paper.py``, ``time_to_accuracy.py``, ``step_time.py``, ``kernels.py``, ``saving_estimate.py`` and
``sb_recipe.py`` draw their figures through these functions too, so a re-run of a benchmark and a
redraw give the same picture.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS  # noqa: E402

__all__ = ["paper_figure", "time_to_accuracy_figure", "step_time_figure", "kernels_figure", "saving_figure",
           "sb_recipe_figure", "COLOURS"]

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


def _save(fig: Any, path: Path) -> None:
    """Lay the figure out, write it as a PNG at 110 dpi and free it."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)


def _row_axes(n: int, row_inches: float) -> tuple[Any, Any, np.ndarray]:
    """One panel with a row per item, the first at the top: the figure, its axes and the rows' y positions."""
    fig, ax = _plt().subplots(figsize=(9.5, row_inches * n + 1.4))
    return fig, ax, np.arange(n)[::-1]


def _save_rows(fig: Any, ax: Any, path: Path) -> None:
    """``_row_axes``'s figure finished: a grid along x, the legend at the lower right, saved."""
    ax.grid(alpha=0.3, axis="x")
    ax.legend(fontsize=8, loc="lower right")
    _save(fig, path)


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
    _save(fig, path)


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
    _save(fig, path)


STEP_RULES = ("uniform", "sb", "topk", "gradmatch", "importance")


def step_time_figure(results: Sequence[dict[str, Any]], path: Path) -> None:
    """A selective step's speed-up against a full step, per rule and kept fraction, one panel per machine (the
    results of ``step_time.py`` there); the cost model's ideal as a hollow marker."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(results), figsize=(6.2 * len(results), 4.4), squeeze=False)
    for ax, res in zip(axes[0], results):
        fractions = sorted({r["fraction"] for r in res["rows"]})
        width = 0.8 / len(STEP_RULES)
        for j, rule in enumerate(STEP_RULES):
            rows = [next(r for r in res["rows"] if r["strategy"] == rule and r["fraction"] == f) for f in fractions]
            x = np.arange(len(fractions)) + (j - (len(STEP_RULES) - 1) / 2) * width
            ax.bar(x, [r["speedup"] for r in rows], width, color=_colour(rule), label=rule)
            ax.plot(x, [r["ideal_speedup"] for r in rows], "o", mfc="none", mec="#333333", ms=5,
                    label="ideal (cost model)" if j == 0 else None)
        ax.axhline(1.0, color="#000000", lw=1.2, label="full training's step")
        speedups = [r["speedup"] for r in res["rows"]]
        if max(speedups) / min(speedups) > 4:  # a wide range (the CPU's 1-11x) on a log axis, in plain numbers
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(plt.FuncFormatter(lambda v, _: f"{v:g}"))
            ax.yaxis.set_minor_formatter(plt.NullFormatter())
        ax.set_xticks(np.arange(len(fractions)), [f"{f:g}" for f in fractions])
        device = res.get("device") or "cpu"
        where = f"{res['machine']['cpus']}-core CPU" if device == "cpu" else device
        ax.set(title=f"{where}: {res['model'].split(' ')[0]}, batch {res['batch']}",
               xlabel="kept fraction of each batch", ylabel="speed-up of a step against a full step")
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=8, loc="upper right")
    _save(fig, path)


KERNEL_RULES = ("uniform", "topk", "sb", "composer", "importance", "gradmatch")


def kernels_figure(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """Milliseconds one selection takes against the batch size, at k = B/4, one panel per class count."""
    plt = _plt()
    classes = sorted({r["C"] for r in rows})
    fig, axes = plt.subplots(1, len(classes), figsize=(6.2 * len(classes), 4.4), squeeze=False)
    for ax, c in zip(axes[0], classes):
        picked = sorted((r for r in rows if r["C"] == c and r["k"] == r["B"] // 4), key=lambda r: r["B"])
        for rule in KERNEL_RULES:
            ax.plot([r["B"] for r in picked], [r[f"{rule}_ms"] for r in picked], "o-", color=_colour(rule),
                    label=rule + (" (with the Gram matrix)" if rule == "gradmatch" else ""))
        ax.set(xscale="log", yscale="log", title=f"{c} classes: one selection, k = B/4, one CPU thread",
               xlabel="batch size B", ylabel="milliseconds (median)")
        ax.set_xticks([r["B"] for r in picked], [str(r["B"]) for r in picked])
        ax.xaxis.set_minor_locator(plt.NullLocator())
        ax.yaxis.set_major_formatter(plt.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8, loc="upper left")
    _save(fig, path)


def saving_figure(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """Each run's measured saving (mean over seeds, the seeds' range as a bar) against the estimate's range."""
    fig, ax, y = _row_axes(len(rows), 0.55)
    for yi, r in zip(y, rows):
        ax.plot([r["estimate_low"], r["estimate_high"]], [yi + 0.12] * 2, color="#0072B2", lw=5, alpha=0.6,
                solid_capstyle="butt", label="estimated range" if yi == y[0] else None)
        lo, hi = (float(v) for v in r["measured_range"].split(" to "))
        m = r["measured_s"]  # the range is printed to 3 digits: clip its rounding
        ax.errorbar(m, yi - 0.12, xerr=[[max(0.0, m - lo)], [max(0.0, hi - m)]], fmt="o",
                    color="#D55E00", capsize=3, label="measured (mean, range over seeds)" if yi == y[0] else None)
    ax.axvline(0.0, color="#000000", lw=0.8)
    ax.set_yticks(y, [f"{r['example']}: {r['mode']}" for r in rows])
    ax.set(xlabel="seconds saved against full training (negative: lost)",
           title="the saving estimate against the saving measured")
    _save_rows(fig, ax, path)


def sb_recipe_figure(summary: Sequence[dict[str, Any]], path: Path) -> None:
    """Final test accuracy per mode (mean over seeds, the worst seed as a dot)."""
    fig, ax, y = _row_axes(len(summary), 0.5)
    for yi, r in zip(y, summary):
        colour = "#000000" if r["mode"] == "full" else ("#009E73" if "primed" in r["mode"] or "preset" in r["mode"]
                                                       else "#56B4E9")
        ax.barh(yi, r["mean"], color=colour, alpha=0.8)
        ax.plot(r["min"], yi, "o", color="#D55E00", label="worst seed" if yi == y[0] else None)
        ax.text(max(r["mean"], r["min"]) + 0.015, yi, f"{r['collapsed']} collapsed", va="center", fontsize=8)
    ax.set_yticks(y, [r["mode"] for r in summary], fontsize=8)
    ax.set(xlim=(0, 1.18), xlabel="final test accuracy (mean of seeds)",
           title="Selective Backprop on digits: as its authors run it, and without their recipe")
    _save_rows(fig, ax, path)


#: the committed results the figures are drawn from (the figures go to RESULTS, which SBSAMPLER_RESULTS_DIR moves)
COMMITTED = Path(__file__).resolve().parent / "results"


def _load(name: str) -> dict[str, Any]:
    return json.loads((COMMITTED / f"{name}.json").read_text())


def main() -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    paper_figure(_load("paper")["rows"], RESULTS / "paper.png")
    tta = _load("time_to_accuracy")
    time_to_accuracy_figure(tta["runs"], tta["targets"], RESULTS / "time_to_accuracy.png")
    step_time_figure([_load("step_time"), _load("step_time_gpu")], RESULTS / "step_time.png")
    kernels_figure(_load("kernels")["rows"], RESULTS / "kernels.png")
    saving_figure(_load("saving_estimate")["rows"], RESULTS / "saving_estimate.png")
    sb_recipe_figure(_load("sb_recipe")["summary"], RESULTS / "sb_recipe.png")
    written = ["paper", "time_to_accuracy", "step_time", "kernels", "saving_estimate", "sb_recipe"]
    print(f"wrote {', '.join(n + '.png' for n in written)} in {RESULTS}")


if __name__ == "__main__":
    main()
