"""Helper for tests/test_distributed.py: 2 gloo ranks where one rank's data goes wrong.

    python _ddp_fail_worker.py OUT_DIR PORT SCENARIO

``raise``: rank 1 meets a non-finite loss under ``nan_policy="raise"`` in its third batch;
``skip_first``: rank 1's first batch is all non-finite under ``nan_policy="skip"``.
Each rank writes ``OUT_DIR/rank{r}.json``: per configuration, the error it raised (type
and message) or its step sizes, stats and a parameter checksum.
"""

from __future__ import annotations

import json
import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
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
            loss = sb.weighted_loss(nn.functional.cross_entropy(model(b.inputs), b.targets, reduction="none"),
                                    b.weights)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sizes.append(len(b))
    except Exception as err:  # noqa: BLE001 - what each rank raised is the result
        return {"error": type(err).__name__, "message": str(err), "sizes": sizes}
    flat = torch.cat([p.detach().reshape(-1) for p in model.module.parameters()])
    ref = flat.clone()
    dist.broadcast(ref, 0)
    return {"error": None, "sizes": sizes, "stats": loader.stats.as_dict(), "same_params": bool(torch.equal(flat, ref))}


def worker(rank: int, out_dir: str, port: str, scenario: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = port
    torch.set_num_threads(1)
    # A short timeout: a rank left waiting in a collective fails the test in seconds, not in 30 minutes.
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=30))
    results = {str(rebatch): run(rank, scenario, rebatch) for rebatch in (False, True)}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    dist.barrier()
    # Leave without tearing gloo down: its teardown after a caught error aborted ~1 run in 40 here
    # ("terminate called without an active exception"); the results are already written.
    os._exit(0)


if __name__ == "__main__":
    mp.spawn(worker, args=tuple(sys.argv[1:4]), nprocs=2, join=True)
