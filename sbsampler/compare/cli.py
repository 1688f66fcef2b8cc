"""``python -m sbsampler.compare SCRIPT [options]``: ``compare`` on the factories a script defines."""

from __future__ import annotations

import argparse
import runpy
import sys
from typing import Optional

from .budget import BUDGETS
from .decision import MARGIN
from .loop import per_sample_cross_entropy
from .runner import DEFAULT_SEEDS, compare
from .summary import TOLERANCE

__all__ = ["main", "parser"]

FACTORIES = ("model", "train_loader", "evaluate", "optimizer")


def parser() -> argparse.ArgumentParser:
    """The command line's options, each with its help and default (``--help``)."""
    p = argparse.ArgumentParser(
        prog="python -m sbsampler.compare", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Does selection pay on my model? Trains full training and selective modes of the model SCRIPT "
                    "defines, paired by seed, and says which to use, 'train on everything', or 'cannot tell' (with "
                    "the reason). SCRIPT defines model() (a fresh model), train_loader() (a DataLoader), "
                    "evaluate(model) (a score, higher is better) and optimizer(params); optionally "
                    "loss(outputs, targets) (one loss per sample) and schedule(epochs) (progress -> LR factor), with "
                    "which full training on a schedule fitted to each mode's budget is run too.")
    p.add_argument("script", help="the Python file defining the factories")
    p.add_argument("--epochs", type=int, default=4, help="whole epochs per run")
    p.add_argument("--seconds", type=float, default=None, help="also stop each run after this much training (s)")
    p.add_argument("--strategy", default="sb", help="the per-batch rule of the default modes, beside uniform and "
                                                    "sampler-level InfoBatch (a registered name)")
    p.add_argument("--fractions", type=float, nargs="+", default=[0.25],
                   help="the kept shares of the default modes, each in (0, 1]")
    p.add_argument("--seeds", type=int, nargs="+", default=list(DEFAULT_SEEDS),
                   help="one run per mode and seed, paired by seed (one seed cannot tell noise from a saving)")
    p.add_argument("--target", type=float, default=None,
                   help="the score that counts as reached (default: full training's final score - tolerance)")
    p.add_argument("--tolerance", type=float, default=TOLERANCE,
                   help="how far below full training's final score still counts as its accuracy")
    p.add_argument("--margin", type=float, default=MARGIN,
                   help="how much sooner than full training, in every seed, a mode must be to be recommended")
    p.add_argument("--budget", choices=BUDGETS, default="wall",
                   help="what the budget-matched full training matches: a mode's wall time or its rows")
    p.add_argument("--evals-per-epoch", type=float, default=2, help="evaluations per epoch of progress")
    p.add_argument("--device", default=None, help="where the model and batches go (e.g. cuda); default: as built")
    p.add_argument("--out", default="compare_out", help="folder for compare.jsonl and compare.png")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    """Run ``compare`` on a script's factories; prints the report and writes the files. An error in the setup (a
    factory that raises, an argument that cannot work) is one line naming it, exit status 1."""
    p = parser()
    args = p.parse_args(argv)
    try:
        ns = runpy.run_path(args.script, run_name="sbsampler_compare_script")
    except Exception as err:
        print(f"compare: running {args.script} raised {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    missing = [k for k in FACTORIES if not callable(ns.get(k))]
    if missing:
        p.error(f"{args.script} must define {', '.join(missing)} (see python -m sbsampler.compare --help)")
    try:
        loader = ns["train_loader"]()
    except Exception as err:
        print(f"compare: the script's train_loader() raised {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    try:
        schedule = ns["schedule"](args.epochs) if callable(ns.get("schedule")) else None
        result = compare(model=ns["model"], train_loader=loader, evaluate=ns["evaluate"],
                         optimizer=ns["optimizer"], epochs=args.epochs, seconds=args.seconds, strategy=args.strategy,
                         fractions=args.fractions, seeds=args.seeds, target=args.target, tolerance=args.tolerance,
                         margin=args.margin, budget=args.budget, evals_per_epoch=args.evals_per_epoch,
                         loss=ns.get("loss") or per_sample_cross_entropy, schedule=schedule, device=args.device,
                         progress=not args.no_progress)
    except (TypeError, ValueError, RuntimeError) as err:
        if not str(err).startswith("compare"):  # not a setup error compare names: the traceback helps
            raise
        print(err, file=sys.stderr)
        return 1
    print(result.report())
    data, png = result.write(args.out)
    print(f"wrote {data} and {png}")
    return 0
