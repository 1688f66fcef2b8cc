"""What the 2-process worker scripts share (tests/_ddp_worker.py, _ddp_fail_worker.py, _fsdp_worker.py,
_sampler_ddp_worker.py): joining the gloo group, the digits they train on, one weighted training step."""

from __future__ import annotations

import json
import os
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

import sbsampler as sb


def join(rank: int, port: str, world_size: int = 2, timeout: Optional[float] = None) -> None:
    """This process as ``rank`` of a gloo group on this machine, one thread; ``timeout`` (seconds): how long a rank
    waits in a collective before it fails (a short one turns a hang into an error in seconds)."""
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = port
    torch.set_num_threads(1)
    kw = {} if timeout is None else {"timeout": timedelta(seconds=timeout)}
    dist.init_process_group("gloo", rank=rank, world_size=world_size, **kw)


def digits(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` of scikit-learn's 8x8 digits, scaled to [0, 1]."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return torch.tensor(x[:n] / 16.0, dtype=torch.float32), torch.tensor(y[:n])


def step(model: nn.Module, opt: torch.optim.Optimizer, batch: sb.SubBatch) -> torch.Tensor:
    """One optimizer step on ``sum_i w_i l_i``; returns the per-sample losses (detached)."""
    per = nn.functional.cross_entropy(model(batch.inputs), batch.targets, reduction="none")
    opt.zero_grad()
    sb.weighted_loss(per, batch.weights).backward()
    opt.step()
    return per.detach()


def train_epochs(loader, model: nn.Module, opt: torch.optim.Optimizer, epochs: int = 2) -> list[list[int]]:
    """Train ``epochs`` epochs of ``loader``'s steps; the sub-batch sizes, per epoch."""
    sizes = []
    for _ in range(epochs):
        sizes.append([len(step(model, opt, batch)) for batch in loader])
    return sizes


def finish(out_dir: str, rank: int, results: dict, teardown: bool = True) -> None:
    """Write ``results`` to ``out_dir/rank{rank}.json``, wait for the other rank, leave the group. ``teardown=False``
    exits at once instead: gloo's teardown after a caught error aborted about 1 run in 40 here ("terminate called
    without an active exception"), and the results are written by then."""
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    dist.barrier()
    if not teardown:
        os._exit(0)
    dist.destroy_process_group()
