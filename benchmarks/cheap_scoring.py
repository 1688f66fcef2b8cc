"""Cheaper scoring forwards: what each option costs, and whether the picks change.

    python benchmarks/cheap_scoring.py            # ResNet-18 at 32x32 (batch 256 on a GPU, 64 on a CPU)
    python benchmarks/cheap_scoring.py --quick    # a small CNN, batch 32 (a smoke run)

The scoring forward is inference, so the ScoringHook offers what makes inference cheap:
``amp_dtype`` (autocast to float16 on a GPU, bfloat16 on both), ``channels_last=True``
(with the model in channels-last memory format), ``compile=True`` (``torch.compile``) and,
on a GPU, ``compile="reduce-overhead"`` (the forward captured once as a CUDA graph, for a
fixed batch shape). For each option: the median scoring time against float32 eager
(compile time reported apart), and against float32's scores on the same batch: the
largest loss difference, the rank correlation of the losses, and the overlap of the
picked sets of top-k, Selective Backprop (the same random numbers) and GradientMatching at
k = B/4. Writes ``benchmarks/results/cheap_scoring[_gpu][_quick].json``. Measures; asserts
nothing.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
from _common import median_time, table, write_results  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import sbsampler as sb  # noqa: E402


def small_cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))


def options(device: torch.device) -> list[tuple[str, dict[str, Any], bool]]:
    """``(name, ScoringHook keywords, model in channels-last)``."""
    half = torch.float16 if device.type == "cuda" else torch.bfloat16
    out = [("fp32", {}, False), (f"amp {str(half)[6:]}", {"amp_dtype": half}, False),
           ("channels_last", {"channels_last": True}, True), ("compile", {"compile": True}, False)]
    if device.type == "cuda":
        out += [("compile reduce-overhead", {"compile": "reduce-overhead"}, False),
                ("amp + channels_last + reduce-overhead",
                 {"amp_dtype": half, "channels_last": True, "compile": "reduce-overhead"}, True)]
    else:
        out += [(f"amp {str(half)[6:]} + channels_last + compile",
                 {"amp_dtype": half, "channels_last": True, "compile": True}, True)]
    return out


def overlap(a: np.ndarray, b: np.ndarray) -> float:
    return len(set(a.tolist()) & set(b.tolist())) / max(len(a), 1)


def picks(scores: sb.Scores, k: int) -> dict[str, np.ndarray]:
    out = {}
    for name, strategy in (("topk", sb.TopK()), ("sb", sb.SelectiveBackprop(seed=0)),
                           ("gradmatch", sb.GradientMatching(seed=0))):
        out[name] = strategy.select(scores, k, rng=0).indices
    return out


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a small CNN, batch 32 (a smoke run)")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args(argv)
    from scipy.stats import spearmanr

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    if args.quick:
        base, name = small_cnn(), "small CNN"
    else:
        from resnets import resnet

        base, name = resnet("resnet18", num_classes=10, small_input=True)
    base = base.to(device).eval()
    batch = args.batch or (32 if args.quick else 256 if device.type == "cuda" else 64)
    repeats = args.repeats or (5 if args.quick else 20)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, 32, 32, generator=g).to(device)
    y = torch.randint(0, 10, (batch,), generator=g).to(device)
    k = max(batch // 4, 1)
    rows, ref, ref_picks = [], None, None
    for label, kw, cl in options(device):
        model = copy.deepcopy(base)
        if cl:
            model = model.to(memory_format=torch.channels_last)
        hook = sb.ScoringHook(model, **kw)
        t0 = time.perf_counter()
        scores = hook.score(x, y)  # the first call compiles, when asked to
        if device.type == "cuda":
            torch.cuda.synchronize()
        first = time.perf_counter() - t0

        def run() -> None:
            hook.score(x, y)
            if device.type == "cuda":
                torch.cuda.synchronize()

        ms = 1e3 * median_time(run, repeats, warmup=2)
        loss = scores.loss.double().cpu()
        chosen = picks(scores, k)
        if ref is None:
            ref, ref_picks = loss, chosen
        rows.append({"option": label, "score_ms": ms, "first_call_s": first, "x_fp32": None,
                     "max_loss_diff": float((loss - ref).abs().max()),
                     "rank_corr": float(spearmanr(loss.numpy(), ref.numpy()).statistic),
                     **{f"overlap_{n}": overlap(chosen[n], ref_picks[n]) for n in chosen}})
    for r in rows:
        r["x_fp32"] = rows[0]["score_ms"] / r["score_ms"]
    card = torch.cuda.get_device_name(0) if device.type == "cuda" else "CPU"
    print(f"{name}, batch {batch}, 32x32, {device} ({card}), {torch.get_num_threads()} threads; picks of k = {k}")
    print(table(rows, [("option", "option", "s"), ("score_ms", "scoring ms", ".2f"), ("x_fp32", "x fp32", ".2f"),
                       ("first_call_s", "first call s", ".1f"), ("max_loss_diff", "max |loss diff|", ".1e"),
                       ("rank_corr", "loss rank corr", ".4f"), ("overlap_topk", "topk overlap", ".2f"),
                       ("overlap_sb", "sb overlap", ".2f"), ("overlap_gradmatch", "gradmatch overlap", ".2f")]))
    result = "cheap_scoring" + ("_gpu" if device.type == "cuda" else "") + ("_quick" if args.quick else "")
    path = write_results(result, {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
                                  "model": name, "batch": batch, "k": k, "quick": args.quick, "rows": rows})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
