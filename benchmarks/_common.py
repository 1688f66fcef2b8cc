"""Shared helpers for the benchmarks: timing, tables, results files, machine description."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Sequence

#: where results files go: ``benchmarks/results``, or ``$SBSAMPLER_RESULTS_DIR`` (the tests' temporary folder)
RESULTS = Path(os.environ.get("SBSAMPLER_RESULTS_DIR") or Path(__file__).resolve().parent / "results")


def single_thread() -> None:
    """Pin BLAS/OpenMP/torch to one thread (call before heavy imports run any work)."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ.setdefault(var, "1")
    import torch

    torch.set_num_threads(1)


def median_time(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in seconds over ``repeats`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def machine() -> dict[str, Any]:
    """Where the numbers were taken."""
    import numba
    import numpy
    import torch

    info = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "numba": numba.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    return info


def table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str, str]]) -> str:
    """Fixed-width text table. ``columns``: (key, header, format spec)."""
    cells = [[h for _, h, _ in columns]]
    for r in rows:
        cells.append([("-" if r.get(k) is None else format(r[k], f)) for k, _, f in columns])
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_results(name: str, payload: dict[str, Any]) -> Path:
    """Write ``benchmarks/results/<name>.json`` and return its path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    payload = {"benchmark": name, "date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine(), **payload}
    path.write_text(compact_json(payload))
    return path


def compact_json(payload: dict[str, Any]) -> str:
    """``payload`` as JSON that stays small and diffable: one top-level key per line, and a top-level list one
    element (a run, a row) per line, each written compactly. ``json.load`` reads it as any JSON."""
    def dump(value: Any) -> str:
        return json.dumps(value, separators=(",", ":"), default=float)

    parts = []
    for key, value in payload.items():
        if isinstance(value, list) and value and all(isinstance(v, (dict, list)) for v in value):
            inner = ",\n  ".join(dump(v) for v in value)
            parts.append(f"{dump(key)}: [\n  {inner}\n]")
        else:
            parts.append(f"{dump(key)}: {dump(value)}")
    return "{" + ",\n".join(parts) + "}\n"
