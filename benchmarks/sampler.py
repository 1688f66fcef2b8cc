"""Sampler-level selection (stored scores) against per-batch selection and full training.

    python benchmarks/sampler.py            # 3 seeds, 8 epochs for the accuracy part
    python benchmarks/sampler.py --quick    # 1 seed, 3 epochs (a smoke run, under a minute on 2 cores)

Part 1, on a ``.beton`` (FFCV): samples loaded, samples back-propagated and wall time
per epoch for full training, per-batch ``SelectiveLoader`` (uniform, f=0.3, rebatched)
and ``SelectiveSampler`` from stored scores (uniform f=0.3, InfoBatch prune=0.5), all
with the same small CNN on digits upscaled to 32x32 RGB. The sampler's first epoch
loads everything (nothing is scored yet), so the table reports the mean of the later
epochs. Skipped (and said so) when FFCV is not installed.

Part 2, on the paper benchmark's data (digits, MNIST-1D): test accuracy (mean +- std
over seeds) and samples back-propagated of full training, per-batch uniform and SB,
and sampler-level uniform, SB (stale losses) and InfoBatch (with its anneal), at the
same number of epochs and the same learning rate.

Writes ``benchmarks/results/sampler.json``. No target is asserted: the point is the
side-by-side numbers.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import table, write_results  # noqa: E402
from harness import BetonCNN, digits_rgb, load_data, train_run, train_step  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

import sbsampler as sb  # noqa: E402
from sbsampler.strategies import fraction_for  # noqa: E402

FRACTION = 0.3
BATCH = 64
LR = 0.02
#: mode -> (strategy, train_run keyword arguments)
MODES: dict[str, tuple[Any, dict[str, Any]]] = {
    "full": ("full", {}),
    "batch_uniform": ("uniform", {"rebatch": True}),
    "batch_sb": ("sb", {"rebatch": True}),
    "sampler_uniform": ("uniform", {"sampler": {"max_staleness": 4}}),
    "sampler_sb": ("sb", {"sampler": {"max_staleness": 4}}),
    "sampler_infobatch": (sb.InfoBatch(prune=0.5), {"sampler": {"anneal": 0.125}}),
}


def make_sampler(mode: str, store: sb.ScoreStore, seed: int, epochs: int) -> sb.SelectiveSampler:
    """The ``SelectiveSampler`` of a ``sampler_*`` mode (as ``train_run`` builds it)."""
    strategy, kw = MODES[mode]
    return sb.SelectiveSampler(store, strategy, fraction_for(strategy, FRACTION), epochs=epochs, seed=seed,
                               **kw["sampler"])


def accuracy_run(job: dict[str, Any]) -> dict[str, Any]:
    """One (dataset, mode, seed) training run: accuracy, samples back-propagated, wall time."""
    torch.set_num_threads(1)
    train, test, model_cls = load_data(job["dataset"])
    strategy, kw = MODES[job["mode"]]
    result = train_run(model_cls, train, test, strategy, fraction=FRACTION, epochs=job["epochs"], batch_size=BATCH,
                       lr=LR, seed=job["seed"], label=job["mode"], **kw)
    return {**job, **asdict(result)}


def loading_table(epochs: int) -> list[dict[str, Any]]:
    """Part 1: per-epoch loading and wall time on a .beton."""
    try:
        from ffcv.fields.decoders import IntDecoder, SimpleRGBImageDecoder
        from ffcv.loader import Loader, OrderOption
        from ffcv.transforms import ToTensor, ToTorchImage
    except ImportError:
        print("FFCV is not installed: part 1 (.beton loading) skipped")
        return []
    torch.set_num_threads(1)
    imgs, labels = digits_rgb(32)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "digits32.beton"
        sb.ffcv.write_beton([(imgs[i], int(labels[i])) for i in range(len(labels))], path)
        pipelines = {"image": [SimpleRGBImageDecoder(), ToTensor(), ToTorchImage()],
                     "label": [IntDecoder(), ToTensor()], "index": [IntDecoder(), ToTensor()]}
        for mode in ["full", "batch_uniform", "sampler_uniform", "sampler_infobatch"]:
            torch.manual_seed(0)
            model = BetonCNN()
            opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
            store = sb.ScoreStore(len(labels))
            if mode.startswith("sampler"):
                sampler = make_sampler(mode, store, 0, epochs)
                loader = Loader(str(path), batch_size=BATCH, num_workers=2, drop_last=False,
                                order=sb.ffcv.selective_order(sampler), pipelines=pipelines)
                batches: Any = sb.WeightedBatches(loader, sampler)
            else:
                loader = Loader(str(path), batch_size=BATCH, num_workers=2, drop_last=False, order=OrderOption.RANDOM,
                                seed=0, pipelines=pipelines)
                batches = sb.SelectiveLoader(loader, sb.ScoringHook(model), MODES[mode][0],
                                             fraction_for(MODES[mode][0], FRACTION), rebatch=True, seed=0)
            for epoch in range(epochs):
                t0 = time.perf_counter()
                loaded = sampler.num_indices(epoch) if mode.startswith("sampler") else len(store)
                back = 0
                for b in batches:
                    store.update(b.indices, train_step(model, opt, b.inputs, b.targets, b.weights))
                    back += len(b)
                rows.append({"mode": mode, "epoch": epoch, "loaded": loaded, "backprop": back,
                             "wall_s": time.perf_counter() - t0})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, 3 epochs: a smoke run")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    seeds, epochs = (1, 3) if args.quick else (3, 8)

    per_epoch = loading_table(epochs=3 if args.quick else 4)
    summary = []
    for mode in dict.fromkeys(r["mode"] for r in per_epoch):
        rs = [r for r in per_epoch if r["mode"] == mode and r["epoch"] >= 1]
        summary.append({"mode": mode, "loaded": np.mean([r["loaded"] for r in rs]),
                        "backprop": np.mean([r["backprop"] for r in rs]), "wall_s": np.mean([r["wall_s"] for r in rs])})
    if summary:
        full = summary[0]["wall_s"]
        for r in summary:
            r["speedup"] = full / r["wall_s"]
        print("\n.beton, epochs 1-3 (mean per epoch), CNN on 1797 32x32 RGB digits, batch 64")
        print(table(summary, [("mode", "mode", "s"), ("loaded", "samples loaded", ".0f"),
                              ("backprop", "back-propagated", ".0f"), ("wall_s", "wall s", ".2f"),
                              ("speedup", "x full", ".2f")]))

    jobs = [{"dataset": d, "mode": m, "seed": s, "epochs": epochs}
            for d in ("digits", "mnist1d") for m in MODES for s in range(seeds)]
    ctx = mp.get_context("spawn")
    t0 = time.perf_counter()
    with ctx.Pool(args.workers) as pool:
        runs = list(pool.imap_unordered(accuracy_run, jobs))
    acc_rows = []
    for d in ("digits", "mnist1d"):
        for m in MODES:
            rs = [r for r in runs if r["dataset"] == d and r["mode"] == m]
            acc_rows.append({"dataset": d, "mode": m, "acc_mean": float(np.mean([r["accuracy"] for r in rs])),
                             "acc_std": float(np.std([r["accuracy"] for r in rs])),
                             "backprop": float(np.mean([r["samples_backprop"] for r in rs])),
                             "wall_s": float(np.mean([r["wall_s"] for r in rs]))})
    print(f"\naccuracy after {epochs} epochs, {seeds} seeds, fraction {FRACTION} ({time.perf_counter() - t0:.0f} s)")
    print(table(acc_rows, [("dataset", "data", "s"), ("mode", "mode", "s"), ("acc_mean", "acc mean", ".4f"),
                           ("acc_std", "std", ".4f"), ("backprop", "back-propagated", ".0f"),
                           ("wall_s", "wall s", ".1f")]))
    name = "sampler_quick" if args.quick else "sampler"  # a smoke run never overwrites the full table
    path = write_results(name, {"quick": args.quick, "epochs": epochs, "seeds": seeds, "fraction": FRACTION,
                                "beton_per_epoch": per_epoch, "beton_summary": summary,
                                "accuracy": acc_rows, "runs": runs})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
