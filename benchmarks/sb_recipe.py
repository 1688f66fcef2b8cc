"""Selective Backprop as its authors run it: does priming and rebatching keep a fresh network alive?

    python benchmarks/sb_recipe.py            # 9 modes x 5 seeds, 6 epochs on digits (CPU: ~3 min on 2 cores)
    python benchmarks/sb_recipe.py --quick    # 3 modes, 1 seed, 2 epochs (a smoke run, not a result)

Issue 31 (item 13) saw Selective Backprop at fraction 0.25, with sbsampler's defaults (no
warm-up, each step the picked rows of one batch alone) and SGD at lr 0.05, kill the ReLUs
before the head of a fresh network: in series in 1 of 5 seeds, one step stale
(``lookahead=1``) in 5 of 5. Jiang et al.'s code (``angelajiang/SelectiveBackprop``) primes the
network with one epoch of full backprop (``num_images_to_prime``), keeps each sample with
probability ``CDF(loss) ** beta`` (``prob_pow`` 3 by default) and steps only on full batches
of kept rows (``get_batch``): ``SelectiveLoader.selective_backprop``.

Modes (scikit-learn's digits, ``harness.DigitsCNN``, batches of 64, SGD lr 0.05 momentum 0.9,
constant LR, 6 epochs, ``compare.train_loop``): full; ``"sb"`` at 0.25 stepping on the picked
rows alone, in series and one step stale; the same rebatched into full batches; the preset
``SelectiveLoader.selective_backprop`` at fraction 0.25 (the same rule, primed with one epoch
of full backprop and rebatched); and the preset with the authors' own rule (Bernoulli,
beta 3), each in series and one step stale.
Reported per mode: final test accuracy per seed, the seeds that collapsed (final accuracy
below 0.5), the share of the 64 units before the head that are dead (zero on every test
digit), and the share of samples back-propagated. Writes
``benchmarks/results/sb_recipe[_quick].json``. Measures; asserts nothing.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import table, write_results  # noqa: E402
from harness import DigitsCNN, accuracy, load_data, warm_up  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

import sbsampler as sb  # noqa: E402
from sbsampler.compare import train_loop  # noqa: E402

BATCH, LR, EPOCHS, SEEDS = 64, 0.05, 6, 5
COLLAPSED = 0.5  # a final accuracy below this is a collapse (chance is 0.1)

#: name -> (how the loader is made: "plain" or "authors", keyword arguments)
MODES: dict[str, tuple[str, dict[str, Any]]] = {
    "full": ("plain", {"strategy": "full"}),
    "sb 0.25, picked rows alone": ("plain", {"strategy": "sb", "fraction": 0.25}),
    "sb 0.25, picked rows alone, 1 step stale": ("plain", {"strategy": "sb", "fraction": 0.25, "lookahead": 1}),
    "sb 0.25, rebatched": ("plain", {"strategy": "sb", "fraction": 0.25, "rebatch": True}),
    "sb 0.25, rebatched, 1 step stale": ("plain", {"strategy": "sb", "fraction": 0.25, "rebatch": True,
                                                   "lookahead": 1}),
    "preset at 0.25 (sb 0.25, primed, rebatched)": ("authors", {"fraction": 0.25}),
    "preset at 0.25, 1 step stale": ("authors", {"fraction": 0.25, "lookahead": 1}),
    "preset, their rule (Bernoulli beta 3, primed, rebatched)": ("authors", {}),
    "preset, their rule, 1 step stale": ("authors", {"lookahead": 1}),
}
QUICK = ["full", "sb 0.25, picked rows alone, 1 step stale", "preset at 0.25, 1 step stale"]


def dead_share(model: DigitsCNN, test: torch.utils.data.TensorDataset) -> float:
    """Share of the units before the head that output 0 on every test digit (eval mode)."""
    was = model.training
    model.eval()
    with torch.no_grad():
        h = model.features(test.tensors[0])
    model.train(was)
    return float((h.amax(0) <= 0).float().mean())


def run(name: str, seed: int, train, test, epochs: int) -> dict[str, Any]:
    kind, kw = MODES[name]
    torch.manual_seed(seed)
    model = DigitsCNN()
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    base = DataLoader(sb.with_indices(train), batch_size=BATCH, shuffle=True,
                      generator=torch.Generator().manual_seed(seed))
    hook = sb.ScoringHook(model)
    if kind == "authors":
        loader = sb.SelectiveLoader.selective_backprop(base, hook, seed=seed, **kw)
    else:
        kw = dict(kw)
        loader = sb.SelectiveLoader(base, hook, kw.pop("strategy"), seed=seed, **kw)
    t0 = time.perf_counter()
    result = train_loop(model, opt, loader, epochs=epochs, evaluate=lambda m: accuracy(m, test), evals_per_epoch=0,
                        mode=name, seed=seed)
    return {"mode": name, "seed": seed, "final": result.final, "dead": dead_share(model, test),
            "kept": loader.stats.backprop_fraction, "wall_s": time.perf_counter() - t0}


def summarise(runs: list[dict[str, Any]], names: list[str]) -> list[dict[str, Any]]:
    rows = []
    for name in names:
        mine = [r for r in runs if r["mode"] == name]
        finals = np.array([r["final"] for r in mine])
        rows.append({"mode": name, "mean": float(finals.mean()), "min": float(finals.min()),
                     "collapsed": f"{int((finals < COLLAPSED).sum())}/{len(mine)}",
                     "dead": float(np.mean([r["dead"] for r in mine])),
                     "kept": float(np.mean([r["kept"] for r in mine]))})
    return rows


def main(argv: Any = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 modes, 1 seed, 2 epochs: a smoke run")
    args = parser.parse_args(argv)
    names, seeds, epochs = (QUICK, 1, 2) if args.quick else (list(MODES), SEEDS, EPOCHS)
    train, test, _ = load_data("digits")
    warm_up(["sb"])
    runs = [run(name, seed, train, test, epochs) for name in names for seed in range(seeds)]
    rows = summarise(runs, names)
    print(table(rows, [("mode", "mode", "s"), ("mean", "final acc (mean)", ".3f"), ("min", "worst seed", ".3f"),
                       ("collapsed", f"collapsed (< {COLLAPSED})", "s"), ("dead", "dead units", ".2f"),
                       ("kept", "kept", ".2f")]))
    payload = {"settings": {"batch": BATCH, "lr": LR, "epochs": epochs, "seeds": seeds, "collapsed_below": COLLAPSED},
               "summary": rows, "runs": runs}
    path = write_results("sb_recipe_quick" if args.quick else "sb_recipe", payload)
    from figures import sb_recipe_figure

    sb_recipe_figure(rows, path.with_suffix(".png"))
    print(f"wrote {path} and {path.with_suffix('.png')}")
    return payload


if __name__ == "__main__":
    main()
