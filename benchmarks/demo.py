"""Demo: full backprop against every strategy on scikit-learn's digits.

    python benchmarks/demo.py

Trains the same small CNN on the 8x8 digits (they ship inside scikit-learn: nothing
is downloaded) once with full backprop and once per strategy at ``--fraction`` of
each batch, for the same number of epochs, and prints test accuracy, samples
back-propagated, wall time and the share of that time spent on scoring and
selection. Every run goes through ``harness.train_run``. The Numba kernels are compiled
(or loaded from Numba's cache) before the first run, so the table shows the steady state;
the compile time is printed on its own line.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import DigitsCNN, RunResult, load_digits_split, train_run, warm_up  # noqa: E402

import sbsampler as sb  # noqa: E402

#: the strategies that choose a fixed share of each batch (what the demo compares at one fraction)
FIXED_SHARE = [name for name, cls in sb.STRATEGIES.items() if not (cls.variable_count or cls.keeps_all)]


def format_table(results: Sequence[RunResult]) -> str:
    """The demo's results as a fixed-width text table."""
    head = f"{'strategy':<11} {'test acc':>8} {'backprop':>9} {'of seen':>8} {'wall s':>7} {'select %':>8}"
    lines = [head, "-" * len(head)]
    for r in results:
        lines.append(
            f"{r.strategy:<11} {r.accuracy:>8.3f} {r.samples_backprop:>9d} "
            f"{r.samples_backprop / max(r.samples_seen, 1):>8.2f} {r.wall_s:>7.2f} {100 * r.overhead_share:>7.1f}%"
        )
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> list[RunResult]:
    """Command-line entry point; returns the results it printed."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--fraction", type=float, default=0.25)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.01, help="SGD learning rate (momentum 0.9)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--strategies", nargs="+", default=FIXED_SHARE, choices=list(sb.STRATEGIES))
    args = parser.parse_args(argv)
    train, test = load_digits_split(seed=args.seed)
    print(f"digits: {len(train)} train / {len(test)} test, {args.epochs} epochs, batch {args.batch_size}, "
          f"fraction {args.fraction}")
    print(f"kernels warmed up in {warm_up(args.strategies):.1f} s (compile or cache load, not in the table)")
    results = []
    for name in dict.fromkeys(["full", *args.strategies]):
        results.append(train_run(DigitsCNN, train, test, name, fraction=args.fraction, epochs=args.epochs,
                                 batch_size=args.batch_size, lr=args.lr, seed=args.seed))
        print(f"  {name}: done", flush=True)
    print(format_table(results))
    return results


if __name__ == "__main__":
    main()
