"""``compare``'s result: the runs, a row per mode, the cost figures and the recommendation; as tables, a report, a
JSONL file and a plot. It presents; it decides nothing (``sbsampler.compare.decision`` does)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Union

from .decision import Recommendation
from .loop import Run

__all__ = ["Comparison", "COLUMNS", "TIME_COLUMNS"]


def _gains(row: dict[str, Any]) -> str:
    return ", ".join(f"{g:+.0%}" for g in row["gains"]) if row.get("gains") else "—"


def _baseline(row: dict[str, Any]) -> str:
    if row.get("baseline_final") is None:
        return "—"
    return f"{row['baseline_final']:.4f} ({row['baseline_epochs']:.2g} ep)"


def _estimated(row: dict[str, Any]) -> str:
    e = row.get("saving_estimated")
    if e is None:
        return "—"
    return f"{e['point']:+.3g}" if e["point"] is not None else f"{e['low']:+.3g} to {e['high']:+.3g}"


def _measured(row: dict[str, Any]) -> str:
    m, span = row.get("saving_measured_s"), row.get("saving_measured_range")
    if m is None:
        return "—"
    return f"{m:+.3g} ({span[0]:+.3g} to {span[1]:+.3g})" if span and span[0] != span[1] else f"{m:+.3g}"


#: (key, header, format or a function of the row) of the main table
COLUMNS = [("mode", "mode", "s"), ("kept", "kept", ".2f"), ("final", "final", ".4f"), ("final_std", "± std", ".4f"),
           ("reached", "reached", None), ("time_to_target_s", "s to target", ".3g"), ("gains", "gain per seed", _gains),
           ("speedup", "speed-up/epoch", ".2f"), ("ideal_speedup", "ideal", ".2f"),
           ("baseline_final", "budget-matched full", _baseline), ("status", "verdict", "s")]
#: the table of where the time went and the time saved, measured against full training and as the loader estimated it
TIME_COLUMNS = [("mode", "mode", "s"), ("loading_share", "loading", ".0%"), ("selection_share", "scoring+sel.", ".0%"),
                ("step_share", "step", ".0%"), ("saving_measured_s", "saved s, measured", _measured),
                ("saving_estimated", "saved s, estimated", _estimated)]


def _markdown(rows: list[dict[str, Any]], columns: list) -> str:
    lines = ["| " + " | ".join(c[1] for c in columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        cells = []
        for key, _, fmt in columns:
            v = r.get(key)
            if key == "reached":
                cells.append(f"{v}/{r['seeds']}")
            elif callable(fmt):
                cells.append(fmt(r))
            elif v is None:
                cells.append("—")
            else:
                cells.append(format(v, fmt))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


@dataclass
class Comparison:
    """``compare``'s result: every run (and the budget-matched baselines'), the summary per mode, the cost model
    and the recommendation."""

    runs: list[Run]
    summary: list[dict[str, Any]]
    cost: dict[str, Any]
    recommendation: Recommendation
    settings: dict[str, Any]
    baselines: list[Run] = field(default_factory=list)

    def table(self) -> str:
        """The summary as a Markdown table (``reached``: seeds that reached the target, of all seeds; ``gain per
        seed``: ``1 - T_mode / T_full`` of the time to the target, paired by seed)."""
        return _markdown(self.summary, COLUMNS)

    def time_table(self) -> str:
        """Where each mode's time went, and the time it saved against full training: measured (the same seed's
        full run, per epoch of progress; mean and range over seeds) and as its loader estimated it."""
        return _markdown(self.summary, TIME_COLUMNS)

    def report(self) -> str:
        """The two tables, the target and the noise, the cost model's figures, and the recommendation, as printed."""
        c = self.cost
        be = c.get("break_even")
        noise = c.get("noise")
        facts = [f"target: {c['target']:.4f} (full training's final score - {c['tolerance']:g})",
                 f"step {1e3 * c['step_per_sample_s']:.3g} ms per back-propagated sample"]
        if noise is not None:
            facts.append(f"full training's own spread of time to target between seeds: {noise:.0%}")
        if be is not None:
            facts.append(f"break-even fraction {be:.2f} ({c['break_even_mode']})")
        return "\n".join([self.table(), "", self.time_table(), "", "; ".join(facts), str(self.recommendation)])

    def write(self, out_dir: Union[str, Path]) -> tuple[Path, Path]:
        """``compare.jsonl`` (one compact line per run, the baselines' too, then one with the summary, cost model and
        recommendation) and ``compare.png`` (score against wall time and against samples back-propagated)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        lines = [json.dumps({"run": asdict(r)}, separators=(",", ":")) for r in self.runs + self.baselines]
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
                              "sbsampler[compare] extra); result.report() and result.summary need nothing "
                              "more") from err

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
        for i, row in enumerate(self.summary):
            color = f"C{i % 10}"
            for j, r in enumerate(x for x in self.runs if x.mode == row["mode"]):
                walls, _, rows_, _, score = zip(*r.curve)
                kw = {"label": f"{row['mode']} (kept {row['kept']:.2f})"} if j == 0 else {}
                a.plot(walls, score, color=color, alpha=0.8, **kw)
                b.plot(rows_, score, color=color, alpha=0.8)
        for j, r in enumerate(self.baselines):
            walls, _, rows_, _, score = zip(*r.curve)
            kw = {"label": "full, budget-matched"} if j == 0 else {}
            a.plot(walls, score, color="grey", ls="--", alpha=0.7, **kw)
            b.plot(rows_, score, color="grey", ls="--", alpha=0.7)
        for ax in (a, b):
            ax.axhline(self.cost["target"], color="grey", ls=":", lw=1)
        a.set(xlabel="wall seconds (evaluation not counted)", ylabel="score", title="score against wall time")
        b.set(xlabel="samples back-propagated", title="score against back-propagation")
        a.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
