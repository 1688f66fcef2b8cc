"""Does the estimate of the time saved match the clock? The loaders' own estimate against the saving measured.

    python benchmarks/saving_estimate.py            # digits, MNIST and the HF example, 2 seeds (CPU: ~6 min)
    python benchmarks/saving_estimate.py --quick    # digits only, 1 epoch (a smoke run, not a result)

``loader.stats.saving_estimate()`` (``sbsampler.saving``) says how much time selection saved
against back-propagating every sample seen, from the steps it timed: a range between a whole
batch's step costing what the timed steps cost (all fixed) and that cost scaled to its rows (all
per row), narrowed by a fit of ``a + b · rows`` when the steps differ in size, with a point
where the range is within ±25% of it. Issue 32 found the old single figure (the proportional
end) at 56.9 s for a run that saved 4.7 s. Here each selective run is paired with the full run of
the same seed, and the saving measured is the full run's wall time for the same epochs minus the
selective run's:

- digits (scikit-learn's 8x8, ``harness.DigitsCNN``) and MNIST (``examples/compare_mnist.py``)
  through ``sb.compare`` (its "saved s" columns), modes uniform 0.25, sb 0.25, and sb 0.25
  primed with one epoch of full backprop (``prime=1``: whole-batch steps to fit);
- the HuggingFace example (``examples/hf_trainer_digits.py``, a tiny ViT in ``SelectiveTrainer``):
  ``--strategy full`` against ``sb``, the Trainer's ``train_runtime``.

Per row: the saving measured (mean and range over seeds), the estimate (point, or range), and
whether it holds (a point within 25% of the measured saving, or a range that contains it), per
seed and for the mean over seeds. The measured saving is itself a difference of two runs' wall
times: run it on a quiet machine.
Writes ``benchmarks/results/saving_estimate[_quick].json``. Measures; asserts nothing.
"""

from __future__ import annotations

import argparse
import runpy
import sys
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import table, write_results  # noqa: E402
from harness import DigitsCNN, accuracy, load_data  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

import sbsampler as sb  # noqa: E402
from sbsampler.compare import Mode  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MODES = [Mode("full"), Mode("uniform 0.25", "uniform", 0.25), Mode("sb 0.25", "sb", 0.25),
         Mode("sb 0.25 primed", "sb", 0.25, options={"prime": 1})]


def holds(measured: float, estimate: dict[str, Any]) -> bool:
    """A point within 25% of the measured saving, or a range that contains it."""
    if estimate.get("point") is not None:
        return abs(estimate["point"] - measured) <= 0.25 * abs(measured)
    return estimate["low"] <= measured <= estimate["high"]


def row(example: str, mode: str, measured: list[float], estimates: list[dict[str, Any]]) -> dict[str, Any]:
    points = [e["point"] for e in estimates]
    est = {"low": float(np.mean([e["low"] for e in estimates])), "high": float(np.mean([e["high"] for e in estimates])),
           "point": float(np.mean(points)) if all(p is not None for p in points) else None}
    m = float(np.mean(measured))
    shown = f"{est['point']:+.3g}" if est["point"] is not None else f"{est['low']:+.3g} to {est['high']:+.3g}"
    return {"example": example, "mode": mode, "measured_s": m, "measured_range": f"{min(measured):+.3g} to "
            f"{max(measured):+.3g}", "estimated": shown, **{f"estimate_{k}": v for k, v in est.items()},
            "holds": f"{sum(holds(x, e) for x, e in zip(measured, estimates))}/{len(measured)}",
            "mean_holds": "yes" if holds(m, est) else "no",
            "basis": estimates[0]["basis"]}


def through_compare(example: str, model: Any, loader: DataLoader, evaluate: Any, optimizer: Any, epochs: int,
                    seeds: tuple, schedule: Optional[Any]) -> list[dict[str, Any]]:
    result = sb.compare(model=model, train_loader=loader, evaluate=evaluate, optimizer=optimizer, epochs=epochs,
                        seeds=seeds, modes=MODES, schedule=schedule, progress=False, evals_per_epoch=1)
    full = {r.seed: r for r in result.runs if r.mode == "full"}
    rows = []
    for mode in MODES[1:]:
        runs = [r for r in result.runs if r.mode == mode.name]
        measured = [full[r.seed].wall_per_epoch * r.progress - r.wall_s for r in runs]
        rows.append(row(example, mode.name, measured, [r.estimate for r in runs]))
    return rows


def digits(epochs: int, seeds: tuple) -> list[dict[str, Any]]:
    train, test, _ = load_data("digits")
    loader = DataLoader(sb.with_indices(train), batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0))
    return through_compare("digits", DigitsCNN, loader, lambda m: accuracy(m, test),
                           lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9), epochs, seeds, None)


def mnist(epochs: int, seeds: tuple) -> list[dict[str, Any]]:
    ns = runpy.run_path(str(ROOT / "examples" / "compare_mnist.py"))
    return through_compare("MNIST", ns["model"], ns["train_loader"](), ns["evaluate"], ns["optimizer"], epochs,
                           seeds, ns["schedule"](epochs))


def hf(epochs: int, seeds: tuple) -> list[dict[str, Any]]:
    ns = runpy.run_path(str(ROOT / "examples" / "hf_trainer_digits.py"))
    measured, estimates = [], []
    for seed in seeds:
        full = ns["main"](["--strategy", "full", "--epochs", str(epochs), "--seed", str(seed)])
        sel = ns["main"](["--strategy", "sb", "--epochs", str(epochs), "--seed", str(seed)])
        measured.append(full["train_s"] - sel["train_s"])
        estimates.append(sel["estimated_saved_s"])
    return [row("HF Trainer (ViT, digits)", "sb 0.25", measured, estimates)]


def main(argv: Any = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="digits only, 1 epoch, 1 seed: a smoke run")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # the two runs of a pair should see the same machine
    if args.quick:
        rows = digits(1, (0,))
    else:
        rows = digits(3, (0, 1)) + mnist(3, (0, 1)) + hf(6, (0, 1))
    print(table(rows, [("example", "example", "s"), ("mode", "mode", "s"), ("measured_s", "saved s, measured", "+.3g"),
                       ("measured_range", "range", "s"), ("estimated", "saved s, estimated", "s"),
                       ("holds", "holds per seed", "s"), ("mean_holds", "holds for the mean", "s")]))
    path = write_results("saving_estimate_quick" if args.quick else "saving_estimate", {"rows": rows})
    from figures import saving_figure

    saving_figure(rows, path.with_suffix(".png"))
    print(f"wrote {path} and {path.with_suffix('.png')}")
    return {"rows": rows}


if __name__ == "__main__":
    main()
