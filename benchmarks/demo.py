"""Demo: full backprop against every strategy on scikit-learn's digits.

    python benchmarks/demo.py

Trains the same small CNN on the 8x8 digits (they ship inside scikit-learn: nothing
is downloaded) once with full backprop and once per strategy at ``--fraction`` of
each batch, for the same number of epochs, and prints test accuracy, samples
back-propagated, wall time, the speed-up against full backprop and the share of the
time spent on scoring and selection, then a verdict in words. Every run goes through
``harness.train_run``. The Numba kernels are compiled (the first time on a machine; then
loaded from Numba's cache) before the first run, so the table shows the steady state; the
time that took is printed on its own line. Torch's thread count is chosen from the
machine's load (a loaded machine runs faster on one thread: ``benchmarks/threads.py``),
unless ``OMP_NUM_THREADS`` is set.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path
from typing import Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import DigitsCNN, RunResult, load_digits_split, train_run, warm_up  # noqa: E402

import sbsampler as sb  # noqa: E402
from sbsampler.stats import SelectionCostWarning  # noqa: E402

#: the strategies that choose a fixed share of each batch (what the demo compares at one fraction)
FIXED_SHARE = [name for name, cls in sb.STRATEGIES.items() if not (cls.variable_count or cls.keeps_all)]


def threads(choice: str = "auto") -> str:
    """Set torch's thread count: from the machine's load (``"auto"``, unless ``OMP_NUM_THREADS`` is set), a number,
    or as it is (``"keep"``); say what was chosen."""
    import torch

    cores = os.cpu_count() or 1
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if choice == "keep" or os.environ.get("OMP_NUM_THREADS"):
        return f"torch threads: {torch.get_num_threads()}"
    if choice != "auto":
        torch.set_num_threads(int(choice))
        return f"torch threads: {int(choice)}"
    n = max(1, min(torch.get_num_threads(), cores - round(load)))
    torch.set_num_threads(n)
    return (f"torch threads: {n} ({cores} cores, load {load:.1f}; a busy machine runs faster on fewer: set "
            "OMP_NUM_THREADS to choose)")


def format_table(results: Sequence[RunResult]) -> str:
    """The demo's results as a fixed-width text table (``speed-up``: full backprop's wall time over the row's)."""
    full = next((r.wall_s for r in results if r.strategy == "full"), None)
    head = (f"{'strategy':<11} {'test acc':>8} {'backprop':>9} {'of seen':>8} {'wall s':>7} {'speed-up':>8} "
            f"{'select %':>8}")
    lines = [head, "-" * len(head)]
    for r in results:
        speedup = f"{full / r.wall_s:>7.2f}x" if full and r.wall_s > 0 else f"{'-':>8}"
        lines.append(
            f"{r.strategy:<11} {r.accuracy:>8.3f} {r.samples_backprop:>9d} "
            f"{r.samples_backprop / max(r.samples_seen, 1):>8.2f} {r.wall_s:>7.2f} {speedup} "
            f"{100 * r.overhead_share:>7.1f}%"
        )
    return "\n".join(lines)


def verdict(results: Sequence[RunResult]) -> str:
    """The table in words: the fastest rule, how it fared against full backprop and uniform, and what one seed on a
    tiny model cannot tell."""
    full = next((r for r in results if r.strategy == "full"), None)
    others = [r for r in results if r.strategy != "full"]
    if full is None or not others:
        return "Verdict: nothing to compare."
    uniform = next((r for r in others if r.strategy == "uniform"), None)
    better = [r for r in others if r.accuracy > (uniform.accuracy if uniform else 0.0)] if uniform else []
    fastest = max(others, key=lambda r: full.wall_s / r.wall_s if r.wall_s > 0 else 0.0)
    head = (f"Verdict: {fastest.strategy} trained {full.wall_s / fastest.wall_s:.1f}x faster than full backprop, "
            f"at test accuracy {fastest.accuracy:.3f} against {full.accuracy:.3f}")
    if uniform is not None:
        head += (f"; {len(better)} of {len(others) - 1} score-reading rules ended above uniform "
                 f"({uniform.accuracy:.3f}), each paying for a scoring forward")
    return (head + ". One seed on a tiny model cannot tell these apart from noise: for an answer that knows it, "
            "run python -m sbsampler.compare on your own model (it pairs seeds and says 'cannot tell').")


def main(argv: Optional[Sequence[str]] = None) -> list[RunResult]:
    """Command-line entry point; returns the results it printed."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--fraction", type=float, default=0.25)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.01, help="SGD learning rate (momentum 0.9)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--strategies", nargs="+", default=FIXED_SHARE, choices=list(sb.STRATEGIES))
    parser.add_argument("--threads", default="auto",
                        help="torch threads: 'auto' (from the machine's load), 'keep', or a number")
    args = parser.parse_args(argv)
    train, test = load_digits_split(seed=args.seed)
    print(f"digits: {len(train)} train / {len(test)} test, {args.epochs} epochs, batch {args.batch_size}, "
          f"fraction {args.fraction}; {threads(args.threads)}")
    print("selection kernels: compiling (once on a machine, about 25 s; Numba then loads them from its cache) ...",
          flush=True)
    print(f"selection kernels ready in {warm_up(args.strategies):.1f} s (not counted in the table)")
    results = []
    # the loader's SelectionCostWarning would repeat, a rule at a time, what the speed-up column shows
    warnings.filterwarnings("ignore", category=SelectionCostWarning)
    for name in dict.fromkeys(["full", *args.strategies]):
        results.append(train_run(DigitsCNN, train, test, name, fraction=args.fraction, epochs=args.epochs,
                                 batch_size=args.batch_size, lr=args.lr, seed=args.seed))
        print(f"  {name}: done", flush=True)
    print(format_table(results))
    print(verdict(results))
    return results


if __name__ == "__main__":
    main()
