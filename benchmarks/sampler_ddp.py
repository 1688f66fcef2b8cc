"""Sharing the ScoreStore across ranks: an all-gather every step (``update_all``) or a merge every epoch (``merge``)?

    python benchmarks/sampler_ddp.py            # 2 gloo processes on this machine; ImageNet's 1.28M samples too
    python benchmarks/sampler_ddp.py --quick    # a smoke run: the small data sets only

Sampler-level selection under DDP needs every rank's store to hold every rank's scores before the next epoch's
plan is drawn. ``ScoreStore.update_all`` all-gathers each step's (index, loss) rows, ``ScoreStore.merge``
all-gathers the whole store (loss, gradient norm, epoch) once an epoch. Times both on 2 gloo processes (the
CPU's; NCCL on GPUs moves the same bytes faster, and its per-call latency is lower) and prints the cost per epoch
of each for a dataset of N samples at batch B per rank: ``update_all`` costs N / (2 B) calls of one step's rows,
``merge`` one call of the whole store. Writes ``benchmarks/results/sampler_ddp[_quick].json``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import table, write_results  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

import sbsampler as sb  # noqa: E402
from sbsampler.distributed import RankSync  # noqa: E402


def _worker(rank: int, port: str, sizes: list[int], batch: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    sync = RankSync()
    rows = []
    rng = np.random.default_rng(rank)
    for n in sizes:
        store = sb.ScoreStore(n)
        idx = rng.integers(0, n, size=batch)
        loss = rng.random(batch)
        for _ in range(3):
            store.update_all(sync, idx, loss)  # warm-up
        dist.barrier()
        reps = 50
        t0 = time.perf_counter()
        for _ in range(reps):
            store.update_all(sync, idx, loss)
        per_step = (time.perf_counter() - t0) / reps
        store.update(np.arange(n), rng.random(n), epoch=1)
        store.merge(sync)  # warm-up
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(3):
            store.merge(sync)
        merge = (time.perf_counter() - t0) / 3
        steps = -(-n // (2 * batch))  # an epoch's steps on each of 2 ranks
        rows.append({"samples": n, "batch": batch, "update_all_ms": 1e3 * per_step, "steps_per_epoch": steps,
                     "update_all_epoch_s": per_step * steps, "merge_epoch_s": merge,
                     "cheaper": "merge" if merge < per_step * steps else "update_all"})
    if rank == 0:
        Path(out).write_text(json.dumps(rows))
    dist.barrier()
    dist.destroy_process_group()


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="10k and 50k samples only")
    parser.add_argument("--batch", type=int, default=256, help="samples per step on each rank")
    args = parser.parse_args(argv)
    sizes = [10_000, 50_000] if args.quick else [10_000, 50_000, 1_281_167]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rows.json")
        mp.spawn(_worker, args=(port, sizes, args.batch, out), nprocs=2, join=True)
        rows = json.loads(Path(out).read_text())
    print(f"2 gloo ranks on this machine, batch {args.batch} per rank")
    print(table(rows, [("samples", "samples", "d"), ("update_all_ms", "update_all ms/step", ".3f"),
                       ("steps_per_epoch", "steps/epoch", "d"), ("update_all_epoch_s", "update_all s/epoch", ".3f"),
                       ("merge_epoch_s", "merge s/epoch", ".3f"), ("cheaper", "cheaper", "s")]))
    name = "sampler_ddp_quick" if args.quick else "sampler_ddp"
    path = write_results(name, {"quick": args.quick, "backend": "gloo", "world_size": 2, "rows": rows})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
