"""Threads that share: how much slower does training get under a competing load, with torch's default threads
against one, and does sbsampler add to it?

    python benchmarks/threads.py            # 3 repeats of each case (CPU: ~4 min on 2 cores)
    python benchmarks/threads.py --quick    # 1 repeat, a short epoch, one competing process, no demo (a smoke run)

Issue 33 saw ``python benchmarks/demo.py`` take 8 min 23 s with default threads on a loaded
2-core machine and 31 s with ``OMP_NUM_THREADS=1``. Here each case runs in a fresh process
(torch reads its thread count at start), while ``os.cpu_count()`` other processes keep every
core busy (a NumPy matrix product each, on one thread): one epoch of digits with
``harness.DigitsCNN`` (batches of 64) as a plain torch loop (``plain``), through
``SelectiveLoader`` with ``"sb"`` at 0.25 (``sbsampler``), and the demo's own loop
(``harness.train_run``, 1 epoch). Each with torch's default threads and with one
(``OMP_NUM_THREADS=1``). A case's slowdown is its time with default threads over its time with
one; sbsampler's share is its slowdown over the plain loop's (issue 33 asks for at most
1.2). Also reported: whether Numba started threads of its own (it runs no parallel kernel).

Writes ``benchmarks/results/threads[_quick].json``. Measures; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import table, write_results  # noqa: E402

HERE = Path(__file__).resolve().parent
CASES = ("plain", "sbsampler", "demo")
SHARE_CAP = 1.2

_CASE = r'''
import json, sys, threading, time
sys.path.insert(0, sys.argv[3])
import torch, torch.nn.functional as F
from torch.utils.data import DataLoader
from harness import DigitsCNN, load_digits_split, train_run, warm_up
import sbsampler as sb
case, epochs = sys.argv[1], float(sys.argv[2])
train, test = load_digits_split(seed=0)
warm_up(["sb"])
torch.manual_seed(0)
model = DigitsCNN()
opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
steps = int(epochs * len(train) / 64)
t0 = time.perf_counter()
if case == "demo":
    train_run(DigitsCNN, train, test, "sb", fraction=0.25, epochs=max(1, round(epochs)), batch_size=64)
else:
    dl = DataLoader(sb.with_indices(train) if case == "sbsampler" else train, batch_size=64, shuffle=True,
                    generator=torch.Generator().manual_seed(0))
    loader = sb.SelectiveLoader(dl, sb.ScoringHook(model), "sb", fraction=0.25, seed=0) if case == "sbsampler" else dl
    done = 0
    while done < steps:
        for b in loader:
            x, y, w = (b.inputs, b.targets, b.weights) if case == "sbsampler" else (b[0], b[1], None)
            losses = F.cross_entropy(model(x), y, reduction="none")
            loss = sb.weighted_loss(losses, w) if w is not None else losses.mean()
            opt.zero_grad(); loss.backward(); opt.step()
            done += 1
            if done >= steps:
                break
print(json.dumps({"seconds": time.perf_counter() - t0, "torch_threads": torch.get_num_threads(),
                  "threads": threading.active_count(), "numba_threads_started": _numba_started()}))
'''

_NUMBA = '''
def _numba_started():
    try:
        from numba.np.ufunc import parallel
        return bool(getattr(parallel, "_is_initialized", False))
    except Exception:
        return None
'''


def busy(n: int) -> list[subprocess.Popen]:
    """``n`` processes keeping a core each busy (a NumPy matrix product on one thread, forever)."""
    code = "import numpy as np\na = np.random.rand(400, 400)\nwhile True:\n    a = (a @ a) / 400.0\n"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return [subprocess.Popen([sys.executable, "-c", code], env=env) for _ in range(n)]


def run_case(case: str, threads: str, epochs: float) -> dict[str, Any]:
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS"):
        env.pop(var, None)
    if threads == "one":
        env["OMP_NUM_THREADS"] = "1"
    out = subprocess.run([sys.executable, "-c", _NUMBA + _CASE, case, str(epochs), str(HERE)], env=env,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: Any = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: 1 repeat of a quarter epoch, without the demo's case")
    args = parser.parse_args(argv)
    repeats, epochs = (1, 0.25) if args.quick else (3, 1.0)
    load = busy(1 if args.quick else os.cpu_count() or 2)  # a smoke run: one competing process
    rows = []
    try:
        time.sleep(1.0)  # the load is running
        for case in CASES[:2] if args.quick else CASES:
            times: dict[str, list[float]] = {"default": [], "one": []}
            info: dict[str, Any] = {}
            for _ in range(repeats):
                for threads in ("default", "one"):
                    got = run_case(case, threads, epochs)
                    times[threads].append(got["seconds"])
                    info[threads] = got
            default, one = min(times["default"]), min(times["one"])
            rows.append({"case": case, "default_s": default, "one_thread_s": one, "slowdown": default / one,
                         "torch_threads": info["default"]["torch_threads"],
                         "numba_threads_started": info["default"]["numba_threads_started"],
                         "spread_default": max(times["default"]) / default, "spread_one": max(times["one"]) / one})
    finally:
        for p in load:
            p.kill()
    plain = next(r for r in rows if r["case"] == "plain")["slowdown"]
    for r in rows:
        r["share"] = r["slowdown"] / plain
    print(table(rows, [("case", "case", "s"), ("default_s", "default threads s", ".3g"),
                       ("one_thread_s", "one thread s", ".3g"), ("slowdown", "slowdown", ".2f"),
                       ("share", "over plain torch's", ".2f"), ("torch_threads", "torch threads", "d")]))
    for r in rows:
        if r["case"] != "plain" and r["share"] > SHARE_CAP:
            print(f"MISS {r['case']}: slowdown {r['share']:.2f}x plain torch's (aim {SHARE_CAP:g})")
    path = write_results("threads_quick" if args.quick else "threads", {"rows": rows, "load_processes": len(load),
                                                                        "aim": SHARE_CAP})
    print(f"wrote {path}")
    return {"rows": rows}


if __name__ == "__main__":
    main()
