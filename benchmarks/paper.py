"""Random vs loss vs gradient matching at equal budget (Balles et al. 2023, on offline data).

    python benchmarks/paper.py --quick     # <= 10 min on 2 CPU cores
    python benchmarks/paper.py             # longer runs, more epochs

For each data set (scikit-learn's 8x8 digits; MNIST-1D from the ``mnist1d``
package's generator, nothing downloaded), trains full backprop and Uniform,
SelectiveBackprop (CDF**beta, fixed count), TopK, GradientMatching (fitted weights,
and ``gradmatch_norm``: the same subsets with weights rescaled to sum 1) and
ImportanceSampling at fractions 0.1 / 0.25 / 0.5, with 3 seeds each, under two
budgets:

- ``forward``: the same number of epochs as full backprop (equal forward passes);
- ``backward``: ``epochs / fraction`` epochs, so as many samples are
  back-propagated as by full backprop.

Every run goes through ``harness.train_run`` with the same optimiser and the same
cosine learning-rate schedule over its own iterations (one iteration = one batch of
the wrapped loader; each yields one sub-batch). Prints mean +- std test accuracy and wall time per run, writes
``benchmarks/results/paper.json`` and ``paper.png`` (accuracy vs samples
back-propagated; ``paper_quick.*`` with ``--quick``), and a verdict per setting:
does any strategy beat Uniform by more than the seed spread (the two standard
deviations added)?

``mean sum(w)`` is the average over steps of the sub-batch's weight sum. Uniform,
TopK and SB give 1; the unbiased estimators give 1 on average; GradientMatching's
fitted weights can sum to less, which acts like a smaller learning rate; the
``gradmatch_norm`` rows separate that effect from the choice of samples.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, table, write_results  # noqa: E402
from harness import load_data, train_run  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

import sbsampler as sb  # noqa: E402

METHODS = ["full", "uniform", "sb", "topk", "gradmatch", "gradmatch_norm", "importance"]
FRACTIONS = [0.1, 0.25, 0.5]
BATCH = 64
LR = 0.02

_DATA: dict[str, Any] = {}


def run_one(job: dict[str, Any]) -> dict[str, Any]:
    """Train one configuration and return its accuracy, budget use and wall time."""
    torch.set_num_threads(1)
    name = job["dataset"]
    if name not in _DATA:
        _DATA[name] = load_data(name)
    train, test, model_cls = _DATA[name]
    seed, method = job["seed"], job["method"]
    strategy = sb.GradientMatching(normalize=True, seed=seed) if method == "gradmatch_norm" else method
    result = train_run(model_cls, train, test, strategy, fraction=job["fraction"], epochs=job["epochs"],
                       batch_size=BATCH, lr=LR, weight_decay=5e-4, cosine=True, seed=seed, label=method)
    return {**job, **asdict(result)}


def jobs_for(dataset: str, epochs: int, seeds: int) -> list[dict[str, Any]]:
    jobs = [{"dataset": dataset, "method": "full", "fraction": 1.0, "budget": "full", "epochs": epochs, "seed": s}
            for s in range(seeds)]
    for budget in ("forward", "backward"):
        for f in FRACTIONS:
            ep = epochs if budget == "forward" else int(round(epochs / f))
            for m in METHODS[1:]:
                for s in range(seeds):
                    jobs.append({"dataset": dataset, "method": m, "fraction": f, "budget": budget,
                                 "epochs": ep, "seed": s})
    return jobs


def summarise(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    groups: dict[tuple, list] = {}
    for r in results:
        groups.setdefault((r["dataset"], r["budget"], r["fraction"], r["method"]), []).append(r)
    rows = []
    for (d, b, f, m), rs in groups.items():
        acc = np.array([r["accuracy"] for r in rs])
        rows.append({"dataset": d, "budget": b, "fraction": f, "method": m, "epochs": rs[0]["epochs"],
                     "acc_mean": acc.mean(), "acc_std": acc.std(ddof=1) if len(acc) > 1 else 0.0,
                     "samples_backprop": int(np.mean([r["samples_backprop"] for r in rs])),
                     "wall_s": float(np.mean([r["wall_s"] for r in rs])), "seeds": len(rs),
                     "weight_sum": float(np.mean([r["weight_sum"] for r in rs]))})
    order = {m: i for i, m in enumerate(METHODS)}
    rows.sort(key=lambda r: (r["dataset"], r["budget"] != "full", r["budget"], r["fraction"], order[r["method"]]))
    return rows


def verdicts(rows: list[dict[str, Any]]) -> list[str]:
    """For each setting: strategies whose mean beats Uniform's by more than std_s + std_u."""
    lines = []
    for r in rows:
        if r["method"] != "uniform":
            continue
        peers = [p for p in rows if (p["dataset"], p["budget"], p["fraction"]) == (r["dataset"], r["budget"],
                                                                                  r["fraction"])]
        better = [p["method"] for p in peers if p["method"] not in ("uniform",)
                  and p["acc_mean"] - r["acc_mean"] > p["acc_std"] + r["acc_std"]]
        worse = [p["method"] for p in peers if p["method"] not in ("uniform",)
                 and r["acc_mean"] - p["acc_mean"] > p["acc_std"] + r["acc_std"]]
        lines.append(f"{r['dataset']:8s} {r['budget']:8s} f={r['fraction']:<4}: beats uniform beyond the seed "
                     f"spread: {', '.join(better) or 'none'}; worse than uniform: {', '.join(worse) or 'none'}")
    return lines


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """The headline figure (``figures.paper_figure``): accuracy at an equal backward budget, one panel per data set."""
    from figures import paper_figure

    paper_figure(rows, path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="few epochs: <= 10 min on 2 cores")
    parser.add_argument("--datasets", nargs="+", default=["digits", "mnist1d"])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=None, help="epochs of full backprop (default 3 quick, 15)")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    epochs = args.epochs or (3 if args.quick else 15)
    jobs = [j for d in args.datasets for j in jobs_for(d, epochs, args.seeds)]
    jobs.sort(key=lambda j: -j["epochs"])  # long runs first: better packing on the pool
    t0 = time.perf_counter()
    ctx = mp.get_context("spawn")
    with ctx.Pool(args.workers) as pool:
        results = list(tqdm(pool.imap_unordered(run_one, jobs), total=len(jobs), desc="runs", disable=None))
    elapsed = time.perf_counter() - t0
    rows = summarise(results)
    print(table(rows, [("dataset", "data", "s"), ("budget", "budget", "s"), ("fraction", "fraction", ".2f"),
                       ("method", "method", "s"), ("epochs", "epochs", "d"), ("acc_mean", "acc mean", ".4f"),
                       ("acc_std", "acc std", ".4f"), ("samples_backprop", "backprop", "d"),
                       ("weight_sum", "mean sum(w)", ".2f"), ("wall_s", "wall s/run", ".2f")]))
    lines = verdicts(rows)
    print("\n".join(lines))
    print(f"{len(jobs)} runs in {elapsed:.0f} s on {args.workers} workers")
    name = "paper_quick" if args.quick else "paper"  # the quick table never overwrites the full one
    if sorted(args.datasets) != ["digits", "mnist1d"] or args.seeds != 3:  # nor does a smaller run either table
        name += f"_{'-'.join(args.datasets)}_{args.seeds}seeds"
    png = RESULTS / f"{name}.png"
    RESULTS.mkdir(parents=True, exist_ok=True)
    plot(rows, png)
    path = write_results(name, {"quick": args.quick, "epochs_full": epochs, "seeds": args.seeds,
                                   "batch_size": BATCH, "lr": LR, "elapsed_s": elapsed, "rows": rows,
                                   "verdicts": lines, "runs": results})
    print(f"wrote {path} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
