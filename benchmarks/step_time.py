"""Does selection save time? Selective vs full training steps against the cost model.

    python benchmarks/step_time.py              # ResNet-18, 32x32, batch 128 (256 on GPU)
    python benchmarks/step_time.py --quick      # a smoke run: 2 rounds, batch 16 of 16x16 images on CPU, no loader

Measures, in one run and interleaved (round-robin over every configuration, medians
over rounds):

- a full step: forward + backward + optimiser step on B samples;
- a selective step at fractions 0.1 / 0.25 / 0.5 for every strategy: scoring forward
  (no graph) + selection + gather + forward/backward/step on k samples;
- each cost-model term on its own: the scoring forward on B, each strategy's
  selection, and the step on k samples.

Prints measured speedup (full / selective), the ideal speedup from the separately
measured terms (full / (score + select + step(k))), their ratio (target >= 0.9) and
the selection share of the selective step (target <= 5% for GradientMatching), then
samples/second through ``SelectiveLoader`` over a ``DataLoader`` with 2 workers.

Look-ahead rows (``SelectiveLoader(lookahead=1)``, ``sbsampler.lookahead``): a loop of
steps through the loader in series and with the look-ahead thread (on CUDA a side
stream), per step, against the in-series ideal ``score + select + step(k)`` and the
overlapped one ``max(score + select, step(k)) + refresh`` (the replica's copy of the
parameters, on the loop's path). Measured, not asserted.
Writes ``benchmarks/results/step_time.json`` (the device is recorded). Non-zero exit
when a target is missed.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
from _common import table, write_results  # noqa: E402
from harness import train_step  # noqa: E402
from resnets import resnet  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

import sbsampler as sb  # noqa: E402
from sbsampler.strategies import fraction_for  # noqa: E402
from sbsampler.strategies import budget  # noqa: E402

FRACTIONS = [0.1, 0.25, 0.5]
AHEAD = ("uniform", "sb", "gradmatch")  # look-ahead rows: the baseline, a loss rule, the gradient rule
AHEAD_STEPS = 6  # steps per timed loop (3 with --quick); the first of each loop cannot overlap
TARGET_EFFICIENCY = 0.9
TARGET_GM_SHARE = 0.05


def resnet18() -> tuple[nn.Module, str]:
    """ResNet-18 for 32x32 inputs: torchvision's where it imports, else the examples' compact one."""
    return resnet("resnet18", num_classes=10, small_input=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: 2 rounds, batch 32 on CPU, no DataLoader section")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None)
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    batch = args.batch or (256 if device.type == "cuda" else 16 if args.quick else 128)
    size = 16 if args.quick and device.type == "cpu" else 32  # a smoke run: a quarter of the pixels
    rounds = args.rounds or (2 if args.quick else 3)
    torch.manual_seed(0)
    model, model_name = resnet18()
    model = model.to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    hook = sb.ScoringHook(model)
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    ks = {f: budget(f, batch) for f in FRACTIONS}
    strategies = {name: sb.get_strategy(name, seed=0) for name, cls in sb.STRATEGIES.items()
                  if not (cls.variable_count or cls.keeps_all)}  # the rules that choose exactly k

    def step(xs: torch.Tensor, ys: torch.Tensor, w: torch.Tensor | None = None) -> None:
        train_step(model, opt, xs, ys, w)

    def selective(name: str, f: float) -> None:  # what SelectiveLoader does per batch: score, select, gather, step
        sub = sb.select_batch(hook, strategies[name], (x, y), f).sub
        step(sub.inputs, sub.targets, sub.weights)

    scores_cache = hook.score(x, y)
    configs: dict[str, Callable[[], None]] = {"full": lambda: step(x, y), "score": lambda: hook.score(x, y)}
    n_ahead = 3 if args.quick else AHEAD_STEPS
    batches = [(x.roll(j, 0), y.roll(j, 0)) for j in range(n_ahead)]
    loaders = {(name, f, depth): sb.SelectiveLoader(batches, hook, sb.get_strategy(name, seed=0), fraction=f,
                                                    lookahead=depth)
               for name in AHEAD for f in FRACTIONS for depth in (0, 1)}

    def loop(name: str, f: float, depth: int) -> None:
        for b in loaders[name, f, depth]:
            step(b.inputs, b.targets, b.weights)

    for (name, f, depth) in loaders:
        configs[f"loop{depth}_{name}_{f}"] = lambda n=name, f=f, d=depth: loop(n, f, d)
    loop("sb", FRACTIONS[0], 1)  # the replica exists before its refresh is timed
    replica = loaders["sb", FRACTIONS[0], 1]._replica
    configs["refresh"] = replica.refresh
    for f, k in ks.items():
        configs[f"step_k{k}"] = lambda k=k: step(x[:k], y[:k], torch.full((k,), 1.0 / k, device=device))
        for name in strategies:
            configs[f"select_{name}_{f}"] = lambda n=name, f=f: strategies[n].select(scores_cache, ks[f])
            configs[f"selective_{name}_{f}"] = lambda n=name, f=f: selective(n, f)
    for fn in configs.values():  # warm-up: kernels compiled, allocator and caches primed
        fn()
    times: dict[str, list[float]] = {k: [] for k in configs}
    rng = random.Random(0)
    for r in range(rounds):
        order = list(configs)
        rng.shuffle(order)
        for key in order:
            times[key].append(timed(configs[key], device))
        print(f"round {r + 1}/{rounds} done", flush=True)
    med = {k: float(np.median(v)) for k, v in times.items()}

    rows = []
    full = med["full"]
    for f, k in ks.items():
        for name in strategies:
            measured = med[f"selective_{name}_{f}"]
            scoring = med["score"] if strategies[name].needs_scores else 0.0  # uniform runs no scoring pass
            ideal = scoring + med[f"select_{name}_{f}"] + med[f"step_k{k}"]
            rows.append({"strategy": name, "fraction": f, "k": k, "full_ms": 1e3 * full,
                         "selective_ms": 1e3 * measured, "score_ms": 1e3 * scoring,
                         "select_ms": 1e3 * med[f"select_{name}_{f}"], "step_k_ms": 1e3 * med[f"step_k{k}"],
                         "speedup": full / measured, "ideal_speedup": full / ideal,
                         "efficiency": ideal / measured,
                         "select_share": med[f"select_{name}_{f}"] / measured})
    ahead_rows = []
    for f, k in ks.items():
        for name in AHEAD:
            scoring = med["score"] if strategies[name].needs_scores else 0.0
            prepare = scoring + med[f"select_{name}_{f}"]
            series, ahead = (med[f"loop{d}_{name}_{f}"] / n_ahead for d in (0, 1))
            overlapped = max(prepare, med[f"step_k{k}"]) + med["refresh"]
            ahead_rows.append({"strategy": name, "fraction": f, "k": k, "full_ms": 1e3 * full,
                               "series_ms": 1e3 * series, "ahead_ms": 1e3 * ahead,
                               "series_ideal_ms": 1e3 * (prepare + med[f"step_k{k}"]),
                               "overlapped_ideal_ms": 1e3 * overlapped, "refresh_ms": 1e3 * med["refresh"],
                               "ahead_vs_series": series / ahead, "ahead_vs_full": full / ahead,
                               "ahead_efficiency": overlapped / ahead})
    print(f"device: {device} ({torch.cuda.get_device_name(0) if device.type == 'cuda' else 'CPU'}), "
          f"model: {model_name}, batch {batch}, {rounds} interleaved rounds, torch threads {torch.get_num_threads()}")
    print(table(rows, [("strategy", "strategy", "s"), ("fraction", "fraction", ".2f"), ("k", "k", "d"),
                       ("full_ms", "full ms", ".0f"), ("selective_ms", "selective ms", ".0f"),
                       ("score_ms", "score ms", ".0f"), ("select_ms", "select ms", ".2f"),
                       ("step_k_ms", "step(k) ms", ".0f"), ("speedup", "speedup", ".2f"),
                       ("ideal_speedup", "ideal", ".2f"), ("efficiency", "measured/ideal", ".2f"),
                       ("select_share", "select share", ".3f")]))

    print(f"\nlook-ahead (lookahead=1) against in series, through SelectiveLoader, {n_ahead}-step loops")
    print(table(ahead_rows, [("strategy", "strategy", "s"), ("fraction", "fraction", ".2f"), ("k", "k", "d"),
                             ("full_ms", "full ms", ".0f"), ("series_ms", "in series ms", ".0f"),
                             ("ahead_ms", "look-ahead ms", ".0f"), ("series_ideal_ms", "series ideal", ".0f"),
                             ("overlapped_ideal_ms", "overlapped ideal", ".0f"), ("refresh_ms", "refresh ms", ".1f"),
                             ("ahead_vs_series", "x series", ".2f"), ("ahead_vs_full", "x full", ".2f"),
                             ("ahead_efficiency", "overlapped ideal/measured", ".2f")]))

    loader_rows = []
    if not args.quick:
        n = 4 * batch
        data = TensorDataset(torch.randn(n, 3, 32, 32), torch.randint(0, 10, (n,)))
        dl = DataLoader(sb.with_indices(data), batch_size=batch, shuffle=True, num_workers=2,
                        persistent_workers=True, pin_memory=device.type == "cuda")
        for mode in ("full", "uniform", "gradmatch"):
            for _ in range(2):  # first pass starts the workers
                t0 = time.perf_counter()
                for b in sb.SelectiveLoader(dl, hook, strategy=mode, fraction=fraction_for(mode, 0.25), device=device,
                                            seed=0):
                    step(b.inputs, b.targets, b.weights)  # "full": whole batches, weights 1/B, no scoring
                sync(device)
                elapsed = time.perf_counter() - t0
            loader_rows.append({"loader": mode, "fraction": 1.0 if mode == "full" else 0.25,
                                "samples_per_s": n / elapsed, "epoch_s": elapsed})
        base = loader_rows[0]["samples_per_s"]
        for r in loader_rows:
            r["vs_full"] = r["samples_per_s"] / base
        print(table(loader_rows, [("loader", "loader", "s"), ("fraction", "fraction", ".2f"),
                                  ("samples_per_s", "samples/s", ".0f"), ("epoch_s", "epoch s", ".2f"),
                                  ("vs_full", "x full", ".2f")]))

    checks = []
    for r in rows:
        checks.append((f"{r['strategy']} f={r['fraction']}: measured/ideal {r['efficiency']:.2f} >= "
                       f"{TARGET_EFFICIENCY}", r["efficiency"] >= TARGET_EFFICIENCY))
        if r["strategy"] == "gradmatch":
            checks.append((f"gradmatch f={r['fraction']}: selection share {r['select_share']:.3f} <= "
                           f"{TARGET_GM_SHARE}", r["select_share"] <= TARGET_GM_SHARE))
    for msg, ok in checks:
        print(("PASS " if ok else "MISS ") + msg)
    device_name = torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"
    name = ("step_time" if device.type == "cpu" else "step_time_gpu") + ("_quick" if args.quick else "")
    path = write_results(name, {
        "device": device_name, "model": model_name, "batch": batch, "image_size": size, "rounds": rounds,
        "quick": args.quick,
        "torch_threads": torch.get_num_threads(), "rows": rows, "lookahead": ahead_rows, "loader": loader_rows,
        "raw_median_s": med, "targets": [{"check": m, "met": ok} for m, ok in checks]})
    print(f"wrote {path}")
    # the figure: this run, beside the other machine's full results where they are there (CPU and GPU panels)
    import json

    from figures import step_time_figure

    other = path.parent / ("step_time_gpu.json" if device.type == "cpu" else "step_time.json")
    results = [json.loads(path.read_text())]
    if not args.quick and other.is_file():
        results = sorted(results + [json.loads(other.read_text())], key=lambda r: r["device"] != "cpu")
    step_time_figure(results, path.with_suffix(".png"))
    print(f"wrote {path.with_suffix('.png')}")
    return 0 if all(ok for _, ok in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
