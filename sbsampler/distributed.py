"""Rank agreement for ``torch.distributed`` (DDP) training.

DistributedDataParallel all-reduces gradients in every backward pass, so every
rank must take the same number of optimizer steps, or the job hangs. Selection
makes the step count data-dependent (rebatching queues fill at different rates,
shards can be uneven), so ``SelectiveLoader`` asks a ``RankSync`` a few small
questions per wrapped batch and yields only what every rank agrees on.

The rule (documented in the README):

- Ranks advance in lockstep *rounds*: in each round every rank pulls at most
  one batch from its own shard. A rank whose shard is exhausted keeps taking
  part in the rounds until every rank is exhausted.
- Without rebatching, every round in which some rank has a sub-batch is one
  step on every rank, of the largest sub-batch size among the ranks; shorter
  or missing sub-batches are padded with zero-weight repeats (counted in
  ``stats.samples_padded``), so nothing is lost and the gradient is unchanged.
- With rebatching, each round yields ``min over ranks`` of the full batches
  ready. At the end of the epoch the leftovers are either padded up to
  ``max over ranks`` of the batches still needed (``drop_last=False``) or cut to
  ``min over ranks`` of the full batches left, the rest counted in
  ``stats.samples_dropped`` (``drop_last=True``).

Everything here is a thin translation onto ``torch.distributed`` collectives;
it runs on any backend (gloo on CPU, NCCL on GPU). ``LocalSync`` answers the same
questions for a single process (every "collective" returns its input), so the
epoch iterator (``sbsampler.epoch``) has one code path for one rank and for many.
"""

from __future__ import annotations

from typing import Any, Optional, Union

import numpy as np
import torch
import torch.distributed as dist

__all__ = ["RankSync", "LocalSync", "resolve_sync", "is_sharded"]


class RankSync:
    """Small collectives over a process group, on a device that the backend accepts.

    Args:
        group: the process group (default: the world).
        device: where the collective tensors live; default CUDA for the NCCL
            backend, else CPU.
    """

    def __init__(self, group: Optional[dist.ProcessGroup] = None, device: Optional[torch.device] = None) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("RankSync needs torch.distributed to be initialised (dist.init_process_group)")
        self.group = group
        if device is None:
            backend = dist.get_backend(group)
            device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        self.device = device
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)

    def min_max(self, values: list[int]) -> tuple[list[int], list[int]]:
        """Element-wise min and max of integer vectors over the ranks, in one all-reduce."""
        t = torch.tensor([-v for v in values] + list(values), dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        n = len(values)
        out = t.tolist()
        return [-v for v in out[:n]], out[n:]

    def all_gather_1d(self, values: np.ndarray) -> np.ndarray:
        """Concatenate every rank's float64 1-D array in rank order (lengths may differ)."""
        values = np.ascontiguousarray(values, dtype=np.float64).ravel()
        _, (longest,) = self.min_max([values.shape[0]])
        buf = torch.full((longest + 1,), float("nan"), dtype=torch.float64, device=self.device)
        buf[0] = values.shape[0]
        buf[1 : 1 + values.shape[0]] = torch.from_numpy(values).to(self.device)
        parts = [torch.empty_like(buf) for _ in range(self.world_size)]
        dist.all_gather(parts, buf, group=self.group)
        out = [p[1 : 1 + int(p[0].item())].cpu().numpy() for p in parts]
        return np.concatenate(out) if out else np.zeros(0)


class LocalSync:
    """The one-process answer to ``RankSync``'s questions: rank 0 of 1, every collective returns its input."""

    rank = 0
    world_size = 1

    def min_max(self, values: list[int]) -> tuple[list[int], list[int]]:
        """Element-wise min and max over one rank: the values themselves."""
        return list(values), list(values)

    def all_gather_1d(self, values: np.ndarray) -> np.ndarray:
        """Every rank's values in rank order: this rank's."""
        return np.ascontiguousarray(values, dtype=np.float64).ravel()


Sync = Union[RankSync, LocalSync]


def is_sharded(model: Any) -> bool:
    """Whether ``model``'s forward gathers sharded parameters from the other ranks: it holds an FSDP2
    (``fully_shard``) or FSDP1 module, or DeepSpeed ZeRO-3 parameters (``ds_id``)."""
    try:
        from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
    except ImportError:  # pragma: no cover - torch without FSDP
        return False
    if any(isinstance(m, (FSDPModule, FullyShardedDataParallel)) for m in model.modules()):
        return True
    return any(hasattr(p, "ds_id") for p in model.parameters())


def resolve_sync(distributed: Union[None, bool, RankSync, LocalSync]) -> Sync:
    """The sync object for ``SelectiveLoader(distributed=...)``.

    ``None``: a ``RankSync`` on the world group when a process group with more
    than one rank is initialised, else a ``LocalSync``; ``True``: a ``RankSync``
    (raises unless ``torch.distributed`` is initialised); ``False``: a
    ``LocalSync``; a sync object: itself.
    """
    if isinstance(distributed, (RankSync, LocalSync)):
        return distributed
    if distributed is None:
        multi = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        return RankSync() if multi else LocalSync()
    if distributed is True:
        return RankSync()
    if distributed is False:
        return LocalSync()
    raise TypeError(f"distributed must be None, a bool or a RankSync, got {type(distributed).__name__}")
