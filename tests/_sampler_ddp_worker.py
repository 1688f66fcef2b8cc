"""Helper for tests/test_sampler_ddp.py: sampler-level selection across 2 gloo ranks with a DDP model.

    python _sampler_ddp_worker.py OUT_DIR PORT

Every rank keeps a ScoreStore of the whole dataset, written from its own training steps and shared with the
other rank (``merge`` at each epoch's end, or ``update_all`` at every step); each epoch's plan is drawn from it on
every rank and sharded (``SelectiveSampler(num_replicas=2, rank=r)``). Writes ``OUT_DIR/rank{r}.json``: per
configuration and epoch, this rank's shard, the plan, the single-process plan drawn from the same store, the
steps, and whether the parameters equal rank 0's; and the steps and final parameters of a run stopped mid-epoch,
saved, restored into fresh objects and finished, against the straight run.
"""

from __future__ import annotations

import io
import sys

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _dist import digits, finish, join, step
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, TensorDataset

import sbsampler as sb
from sbsampler.distributed import RankSync

N, EPOCHS = 400, 3
CONFIGS = [{"strategy": s, "share": share} for s in ("uniform", "sb", "infobatch") for share in ("merge", "update_all")]


def data():
    return TensorDataset(*digits(N))


def make(cfg: dict, rank: int):
    torch.manual_seed(0)
    model = DDP(nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    store = sb.ScoreStore(N)
    fraction = sb.strategies.fraction_for(cfg["strategy"], 0.5)
    sampler = sb.SelectiveSampler(store, cfg["strategy"], fraction=fraction, seed=3, num_replicas=2, rank=rank)
    batches = sb.WeightedBatches(DataLoader(sb.with_indices(data()), batch_size=16, sampler=sampler), sampler)
    return model, opt, store, sampler, batches


def train_and_record(cfg: dict, model, opt, store: sb.ScoreStore, batch: sb.SubBatch) -> None:
    """One step, its losses written to this rank's store (and, with update_all, to every rank's)."""
    per = step(model, opt, batch)
    if cfg["share"] == "update_all":
        store.update_all(RankSync(), batch.indices, per)
    else:
        store.update(batch.indices, per)


def epoch(cfg, model, opt, store, sampler, batches, e: int, stop=None) -> int:
    """Train epoch ``e`` (up to ``stop`` steps); returns the steps taken."""
    steps = 0
    sampler.set_epoch(e)
    for b in batches:
        train_and_record(cfg, model, opt, store, b)
        steps += 1
        if stop is not None and steps == stop:
            return steps
    if cfg["share"] == "merge":
        store.merge(RankSync())
    return steps


def params(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.module.parameters()])


def run_config(cfg: dict, rank: int) -> dict:
    model, opt, store, sampler, batches = make(cfg, rank)
    out = []
    for e in range(EPOCHS):
        sampler.set_epoch(e)
        plan = sampler.plan(e)[0].tolist()
        single = sb.SelectiveSampler(store, cfg["strategy"], fraction=sampler.fraction, seed=3)  # one process
        single_plan = single.plan(e)[0].tolist()
        shard = list(iter(sampler))
        steps = epoch(cfg, model, opt, store, sampler, batches, e)
        flat = params(model)
        ref = flat.clone()
        dist.broadcast(ref, 0)
        out.append({"shard": shard, "plan": plan, "single_plan": single_plan, "steps": steps,
                    "same_params": bool(torch.equal(flat, ref)), "store_loss": float(np.nan_to_num(store.loss, nan=-1).sum())})
    return {"epochs": out, "final": params(model).tolist()}


def resumed(cfg: dict, rank: int, stop_epoch: int = 1, stop_step: int = 3) -> dict:
    """Stop mid-epoch, save everything through torch.save, restore into fresh objects, finish."""
    model, opt, store, sampler, batches = make(cfg, rank)
    for e in range(stop_epoch):
        epoch(cfg, model, opt, store, sampler, batches, e)
    epoch(cfg, model, opt, store, sampler, batches, stop_epoch, stop=stop_step)
    buf = io.BytesIO()
    torch.save({"model": model.module.state_dict(), "opt": opt.state_dict(), "store": store.state_dict(),
                "sampler": sampler.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    model, opt, store, sampler, batches = make(cfg, rank)
    model.module.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["opt"])
    store.load_state_dict(ckpt["store"])
    sampler.load_state_dict(ckpt["sampler"])
    sampler.set_epoch(stop_epoch)
    rest = 0  # the interrupted epoch's remaining steps: its frozen plan, from the step after the stop
    skip = stop_step
    for b in batches:
        if skip:  # the steps already taken (a DataLoader over the sampler replays the shard from its start)
            skip -= 1
            continue
        train_and_record(cfg, model, opt, store, b)
        rest += 1
    if cfg["share"] == "merge":
        store.merge(RankSync())
    for e in range(stop_epoch + 1, EPOCHS):
        epoch(cfg, model, opt, store, sampler, batches, e)
    return {"final": params(model).tolist(), "rest": rest}


def worker(rank: int, out_dir: str, port: str) -> None:
    join(rank, port)
    results = [run_config(cfg, rank) for cfg in CONFIGS]
    resumes = [resumed(cfg, rank) for cfg in CONFIGS]
    finish(out_dir, rank, {"configs": CONFIGS, "results": results, "resumed": resumes})


if __name__ == "__main__":
    mp.spawn(worker, args=(sys.argv[1], sys.argv[2]), nprocs=2, join=True)
