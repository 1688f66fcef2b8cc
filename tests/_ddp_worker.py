"""Helper for tests/test_distributed.py: 2 gloo ranks train a DDP model through SelectiveLoader.

    python _ddp_worker.py OUT_DIR PORT

Each rank runs every configuration for 2 epochs on its own shard and writes
``OUT_DIR/rank{r}.json`` with, per configuration: steps and sub-batch sizes per
epoch, the loader's stats, a checksum of the parameters and whether the
parameters equal rank 0's, and the SelectiveBackprop history.
"""

from __future__ import annotations

import sys

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _dist import digits, finish, join, train_epochs
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Subset, TensorDataset

import sbsampler as sb

CONFIGS = []
for strategy in ("uniform", "topk", "sb", "sb_bernoulli", "gradmatch", "importance"):
    for rebatch in (False, True):
        for uneven in (False, True):
            CONFIGS.append({"strategy": strategy, "rebatch": rebatch, "uneven": uneven, "sync_history": False,
                            "drop_last": False})
CONFIGS += [
    {"strategy": "sb", "rebatch": True, "uneven": True, "sync_history": True, "drop_last": False},
    {"strategy": "sb_bernoulli", "rebatch": True, "uneven": False, "sync_history": True, "drop_last": False},
    {"strategy": "sb_bernoulli", "rebatch": True, "uneven": True, "sync_history": False, "drop_last": True},
]


def strategy_for(name: str, rank: int):
    if name == "sb_bernoulli":
        return sb.SelectiveBackprop(mode="bernoulli", beta=2.0, history=300, seed=10 + rank)
    if name == "sb":
        return sb.SelectiveBackprop(history=300, seed=10 + rank)
    return sb.get_strategy(name, seed=10 + rank)


def run_config(cfg: dict, rank: int, data) -> dict:
    x, y = data
    ds = sb.with_indices(TensorDataset(x, y))
    # Shards: rank 0 gets 320 samples; rank 1 gets 320 (even) or 190 (uneven): 10 vs 6 batches.
    n1 = 190 if cfg["uneven"] else 320
    shard = range(0, 320) if rank == 0 else range(320, 320 + n1)
    loader = DataLoader(Subset(ds, list(shard)), batch_size=32, shuffle=True,
                        generator=torch.Generator().manual_seed(rank))
    torch.manual_seed(rank)  # different initial weights: DDP must broadcast rank 0's
    model = DDP(nn.Sequential(nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 10)))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    strategy = strategy_for(cfg["strategy"], rank)
    sel = sb.SelectiveLoader(loader, sb.ScoringHook(model), strategy,
                             fraction=sb.strategies.fraction_for(strategy, 0.3), rebatch=cfg["rebatch"],
                             sync_history=cfg["sync_history"], drop_last=cfg["drop_last"])
    sizes = train_epochs(sel, model, opt)
    # Parameters only: BatchNorm running stats are per-rank between DDP buffer broadcasts.
    flat = torch.cat([p.detach().reshape(-1) for p in model.module.parameters()])
    ref = flat.clone()
    dist.broadcast(ref, 0)
    hist = sel.strategy.recent_losses().tolist() if hasattr(sel.strategy, "recent_losses") else None
    return {"sizes": sizes, "stats": sel.stats.as_dict(), "same_params_as_rank0": bool(torch.equal(flat, ref)),
            "history": hist}


def worker(rank: int, out_dir: str, port: str) -> None:
    join(rank, port)
    data = digits(640)
    results = [run_config(cfg, rank, data) for cfg in CONFIGS]
    # ScoreStore.merge: rank 0 scored samples 0-5 at epoch 1, rank 1 samples 4-9 at epoch 2.
    store = sb.ScoreStore(10)
    if rank == 0:
        store.update(np.arange(6), np.full(6, 1.0), np.full(6, 10.0), epoch=1)
    else:
        store.update(np.arange(4, 10), np.full(6, 2.0), np.full(6, 20.0), epoch=2)
    store.merge(sb.distributed.RankSync())
    merged = {"loss": store.loss.tolist(), "grad_norm": store.grad_norm.tolist(), "seen": store.scored_epoch.tolist()}
    finish(out_dir, rank, {"configs": CONFIGS, "results": results, "merged_store": merged})


if __name__ == "__main__":
    mp.spawn(worker, args=(sys.argv[1], sys.argv[2]), nprocs=2, join=True)
