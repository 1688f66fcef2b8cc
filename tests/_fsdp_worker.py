"""Helper for tests/test_fsdp.py: 2 gloo ranks train an FSDP2 (``fully_shard``) model through SelectiveLoader.

    python _fsdp_worker.py OUT_DIR PORT

Each rank runs every configuration for 2 epochs on its own shard (even: 10 batches each; uneven: 10 and 4) and
writes ``OUT_DIR/rank{r}.json`` with, per configuration: sub-batch sizes per epoch, the stats, whether the full
parameters equal rank 0's, and how its scores compare with the same model unsharded. Then the failure scenarios:
rank 1's loader raising mid-epoch, and a non-finite loss on rank 1 under ``nan_policy="raise"``: what each rank
raised.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _dist import digits, finish, join, step, train_epochs
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.utils.data import DataLoader, Subset, TensorDataset

import sbsampler as sb

CONFIGS = [{"strategy": s, "rebatch": r, "uneven": u}
           for s in ("uniform", "topk", "sb", "sb_bernoulli", "composer", "gradmatch", "importance", "infobatch")
           for r in (False, True) for u in (False, True)]
CONFIGS += [{"strategy": "sb", "rebatch": False, "uneven": True, "window": True}]  # ranks enter the window apart


def strategy_for(name: str, rank: int):
    if name == "sb_bernoulli":
        return sb.SelectiveBackprop(mode="bernoulli", beta=2.0, seed=10 + rank)
    return sb.get_strategy(name, seed=10 + rank)


def net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10))


def sharded(seed: int) -> nn.Module:
    model = net(seed)
    for layer in (model[0], model[2], model[4]):
        fully_shard(layer)
    fully_shard(model)
    return model


def full_params(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.full_tensor().reshape(-1) for p in model.parameters()])


def loader_for(cfg: dict, rank: int, data, fail_at=None):
    x, y = data
    ds = sb.with_indices(TensorDataset(x, y))
    n = 320 if rank == 0 or not cfg["uneven"] else 128  # batches of 32: 10 on rank 0, 10 or 4 on rank 1
    shard = list(range(0, 320)) if rank == 0 else list(range(320, 320 + n))
    dl = DataLoader(Subset(ds, shard), batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(rank))
    if fail_at is None:
        return dl

    class Failing:
        def __iter__(self):
            for j, batch in enumerate(dl):
                if j == fail_at:
                    raise OSError(f"rank {rank}: disk error at batch {j}")
                yield batch

    return Failing()


def run_config(cfg: dict, rank: int, data) -> dict:
    model = sharded(0)  # the same initial weights on every rank
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    window = dict(start=0.3, epochs=2) if cfg.get("window") else {}  # at different rounds on uneven shards
    strategy = strategy_for(cfg["strategy"], rank)
    sel = sb.SelectiveLoader(loader_for(cfg, rank, data), sb.ScoringHook(model), strategy,
                             fraction=sb.strategies.fraction_for(strategy, 0.3), rebatch=cfg["rebatch"], **window)
    assert sel.sharded
    sizes = train_epochs(sel, model, opt)
    flat = full_params(model)
    ref = flat.clone()
    dist.broadcast(ref, 0)
    return {"sizes": sizes, "stats": sel.stats.as_dict(), "same_params_as_rank0": bool(torch.equal(flat, ref))}


def scores_match_the_unsharded_model(data) -> float:
    """Largest difference between the sharded model's scores and the same weights unsharded."""
    x, y = data
    model, plain = sharded(3), net(3)
    got = sb.ScoringHook(model).score(x[:64], y[:64])
    want = sb.ScoringHook(plain).score(x[:64], y[:64])
    gram = (torch.as_tensor(got.gram()) - torch.as_tensor(want.gram())).abs().max()
    return float(max((got.loss - want.loss).abs().max(), gram))


def failure(scenario: str, rank: int, data) -> dict:
    cfg = {"uneven": True}
    x, y = data
    if scenario == "nan" and rank == 1:
        x = x.clone()
        x[320 + 40] = float("nan")  # in rank 1's second batch or so (shuffled): a non-finite loss
    model = sharded(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    dl = loader_for(cfg, rank, (x, y), fail_at=1 if scenario == "loader" and rank == 1 else None)
    sel = sb.SelectiveLoader(dl, sb.ScoringHook(model), "sb", fraction=0.3, seed=rank)
    steps = 0
    try:
        for batch in sel:
            step(model, opt, batch)
            steps += 1
    except Exception as err:  # noqa: BLE001 - what each rank raised is the result
        return {"error": type(err).__name__, "message": str(err), "steps": steps}
    return {"error": None, "steps": steps}


def worker(rank: int, out_dir: str, port: str) -> None:
    join(rank, port, timeout=60)  # a hang inside a forward becomes an error in a minute
    data = digits(640)
    results = [run_config(cfg, rank, data) for cfg in CONFIGS]
    out = {"configs": CONFIGS, "results": results, "score_diff": scores_match_the_unsharded_model(data),
           "failures": {s: failure(s, rank, data) for s in ("loader", "nan")}}
    finish(out_dir, rank, out, teardown=False)  # no gloo teardown after the caught errors


if __name__ == "__main__":
    mp.spawn(worker, args=(sys.argv[1], sys.argv[2]), nprocs=2, join=True)
