"""Helper for tests/test_distributed.py: 2 gloo ranks where one rank's data goes wrong.

    python _ddp_fail_worker.py OUT_DIR PORT SCENARIO

``raise``: rank 1 meets a non-finite loss under ``nan_policy="raise"`` in its third batch;
``skip_first``: rank 1's first batch is all non-finite under ``nan_policy="skip"``.
Each rank writes ``OUT_DIR/rank{r}.json``: per configuration, the error it raised (type
and message) or its step sizes, stats and a parameter checksum.
"""

from __future__ import annotations

import sys
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _dist import finish, join, step
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import sbsampler as sb


def batches(rank: int, scenario: str) -> list:
    g = torch.Generator().manual_seed(rank)
    out = []
    for j in range(5):
        x, y = torch.randn(16, 8, generator=g), torch.randint(0, 3, (16,), generator=g)
        if rank == 1 and scenario == "raise" and j == 2:
            x[4] = float("nan")
        if rank == 1 and scenario == "skip_first" and j == 0:
            x[:] = float("nan")
        out.append((x, y, torch.arange(16 * j, 16 * j + 16) + 1000 * rank))
    return out


def run(rank: int, scenario: str, rebatch: bool) -> dict:
    torch.manual_seed(rank)
    model = DDP(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    policy = "raise" if scenario == "raise" else "skip"
    loader = sb.SelectiveLoader(batches(rank, scenario), sb.ScoringHook(model), "topk", fraction=0.5,
                                rebatch=rebatch, batch_size=8, nan_policy=policy)
    sizes = []
    try:
        for b in loader:
            step(model, opt, b)
            sizes.append(len(b))
    except Exception as err:  # noqa: BLE001 - what each rank raised is the result
        return {"error": type(err).__name__, "message": str(err), "sizes": sizes}
    flat = torch.cat([p.detach().reshape(-1) for p in model.module.parameters()])
    ref = flat.clone()
    dist.broadcast(ref, 0)
    return {"error": None, "sizes": sizes, "stats": loader.stats.as_dict(), "same_params": bool(torch.equal(flat, ref))}


def worker(rank: int, out_dir: str, port: str, scenario: str) -> None:
    join(rank, port, timeout=30)  # a rank left waiting in a collective fails the test in seconds, not in 30 minutes
    results = {str(rebatch): run(rank, scenario, rebatch) for rebatch in (False, True)}
    finish(out_dir, rank, results, teardown=False)  # no gloo teardown after a caught error


if __name__ == "__main__":
    mp.spawn(worker, args=tuple(sys.argv[1:4]), nprocs=2, join=True)
