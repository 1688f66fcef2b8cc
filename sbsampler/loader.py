"""Loader wrappers: turn any iterable of batches into weighted sub-batches.

``SelectiveLoader`` owns iteration, gathering, rebatching and bookkeeping; the
choice of samples belongs to a ``Strategy`` and the scores to a ``ScoringHook``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Union

import numpy as np
import torch
from torch import Tensor

from .ffcv import FFCVBatches, is_ffcv_loader
from .hook import Scores, ScoringHook
from .distributed import RankSync, default_sync
from .strategies import Seed, Strategy, budget, get_strategy

__all__ = ["SubBatch", "LoaderStats", "SelectiveLoader", "IndexedDataset", "with_indices", "weighted_loss"]


@dataclass
class SubBatch:
    """One training step's data.

    Attributes:
        inputs: (k, ...) the selected inputs, on the batch's device.
        targets: (k,) their labels.
        weights: (k,) float32 loss weights: the step's loss is ``sum(w * l)``.
        indices: (k,) int64 dataset indices (stream positions when the wrapped
            loader provides none), on the CPU.
        extras: the batch's other fields, gathered alongside: a dict batch's
            other keys, or a tuple batch's items after the indices by position
            (3, 4, ...). Per-sample values (tensors, arrays, lists with one entry
            per sample) are gathered; batch-level values pass through unchanged.
    """

    inputs: Tensor
    targets: Tensor
    weights: Tensor
    indices: Tensor
    extras: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.targets.shape[0])

    def __iter__(self) -> Iterator[Tensor]:
        """Unpack as ``x, y, w, idx = batch``."""
        return iter((self.inputs, self.targets, self.weights, self.indices))


@dataclass
class LoaderStats:
    """Counters a user needs to see the saving. All cumulative until ``reset()``.

    Every sample that enters is accounted for:
    ``samples_seen == samples_selected + samples_not_selected + samples_skipped``,
    ``samples_yielded`` counts rows yielded for back-propagation (a sample drawn
    twice by sampling with replacement counts twice); with no repeats,
    ``samples_yielded + samples_dropped + samples_abandoned == samples_selected``
    once an epoch has ended. ``samples_padded`` counts the zero-weight repeats
    added under DDP (not included in ``samples_yielded``).
    """

    batches_seen: int = 0
    samples_seen: int = 0
    samples_scored: int = 0
    samples_selected: int = 0
    samples_not_selected: int = 0
    samples_skipped: int = 0  # non-finite losses under nan_policy="skip", empty batches
    samples_yielded: int = 0  # samples back-propagated, if every yielded batch is trained on
    samples_dropped: int = 0  # rebatching remainder dropped because drop_last=True
    samples_abandoned: int = 0  # left in the rebatching queue when an epoch was broken off
    samples_padded: int = 0  # zero-weight repeats added so that DDP ranks take equal steps
    steps: int = 0  # sub-batches yielded
    time_loading: float = 0.0
    time_scoring: float = 0.0
    time_selecting: float = 0.0
    time_gathering: float = 0.0
    residuals: list = field(default_factory=list)  # GradientMatching fit per batch

    @property
    def backprop_fraction(self) -> float:
        """Samples back-propagated per sample seen."""
        return self.samples_yielded / self.samples_seen if self.samples_seen else 0.0

    @property
    def selection_time(self) -> float:
        """Seconds spent scoring, selecting and gathering."""
        return self.time_scoring + self.time_selecting + self.time_gathering

    def reset(self) -> None:
        """Zero every counter."""
        fresh = LoaderStats()
        for k, v in asdict(fresh).items():
            setattr(self, k, v)

    def as_dict(self) -> dict[str, Any]:
        """Counters and derived figures as a plain dict."""
        d = asdict(self)
        d.pop("residuals")
        d["backprop_fraction"] = self.backprop_fraction
        d["selection_time"] = self.selection_time
        d["mean_residual"] = float(np.mean(self.residuals)) if self.residuals else None
        return d


class IndexedDataset(torch.utils.data.Dataset):
    """A map-style dataset whose items gain their own index: ``(*item, index)``."""

    def __init__(self, dataset: Any) -> None:
        if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
            raise TypeError(
                f"with_indices needs a map-style dataset (__getitem__ and __len__), got {type(dataset).__name__}"
            )
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple:
        item = self.dataset[index]
        if not isinstance(item, (tuple, list)):
            raise TypeError(f"dataset items must be (input, target) tuples, got {type(item).__name__}")
        return (*item, index)


def with_indices(dataset: Any) -> IndexedDataset:
    """Wrap a map-style dataset so each ``(x, y)`` item becomes ``(x, y, index)``.

    A ``DataLoader`` over the result yields ``(inputs, targets, indices)``
    batches, and ``SelectiveLoader`` reports dataset indices in ``batch.indices``.
    """
    return IndexedDataset(dataset)


def weighted_loss(losses: Tensor, weights: Tensor) -> Tensor:
    """``sum_i w_i * l_i``: the sub-batch loss that estimates the minibatch mean.

    Args:
        losses: (k,) per-sample losses (``reduction="none"``).
        weights: (k,) weights from ``SubBatch.weights``; moved to the losses'
            device and dtype.
    """
    if losses.dim() != 1:
        raise ValueError(f"losses must be per-sample, shape (k,); got {tuple(losses.shape)} (use reduction='none')")
    if weights.shape != losses.shape:
        raise ValueError(f"weights {tuple(weights.shape)} and losses {tuple(losses.shape)} must have the same shape")
    return (losses * weights.to(device=losses.device, dtype=losses.dtype)).sum()


def _split_batch(batch: Any) -> tuple[Tensor, Tensor, Optional[Tensor], dict]:
    """``(inputs, targets, indices or None, extras)`` of one batch from the wrapped loader."""
    if isinstance(batch, dict):
        if "inputs" not in batch or "targets" not in batch:
            raise TypeError(f"dict batches need 'inputs' and 'targets' keys, got {sorted(batch)}")
        extras = {k: v for k, v in batch.items() if k not in ("inputs", "targets", "indices")}
        return batch["inputs"], batch["targets"], batch.get("indices"), extras
    if isinstance(batch, Sequence) and not isinstance(batch, (str, bytes)) and len(batch) >= 2:
        x, y = batch[0], batch[1]
        idx = batch[2] if len(batch) >= 3 else None
        return x, y, idx, {j: batch[j] for j in range(3, len(batch))}
    length = f" of length {len(batch)}" if hasattr(batch, "__len__") else ""
    raise TypeError(
        "batches must be (inputs, targets[, indices, *extras]) sequences or a dict with 'inputs' and "
        f"'targets' keys; got {type(batch).__name__}{length}"
    )


def _per_sample(value: Any, n: int) -> bool:
    if isinstance(value, (Tensor, np.ndarray)):
        return value.ndim >= 1 and value.shape[0] == n
    return isinstance(value, (list, tuple)) and len(value) == n


def _gather(value: Any, pos: Tensor, n: int) -> Any:
    """Rows ``pos`` of a per-sample value (tensor, array or list); batch-level values unchanged."""
    if not _per_sample(value, n):
        return value
    if isinstance(value, Tensor):
        return value[pos.to(value.device)]
    if isinstance(value, np.ndarray):
        return value[pos.numpy()]
    return type(value)(value[i] for i in pos.tolist()) if isinstance(value, tuple) else [value[i] for i in pos.tolist()]


def _concat(values: list, n_parts: list[int], key: Any) -> Any:
    first = values[0]
    if not all(_per_sample(v, m) for v, m in zip(values, n_parts)):
        raise TypeError(
            f"extra field {key!r} is not per-sample (a tensor, array or list with one entry per sample), "
            "so it cannot be rebatched across batches; make it per-sample or use rebatch=False"
        )
    if isinstance(first, Tensor):
        return torch.cat(values)
    if isinstance(first, np.ndarray):
        return np.concatenate(values)
    return [v for part in values for v in part]


def _as_index_tensor(idx: Any, n: int) -> Tensor:
    t = torch.as_tensor(idx).reshape(-1)
    if t.dtype.is_floating_point or t.dtype == torch.bool:
        raise TypeError(f"indices must be integers, got dtype {t.dtype}")
    t = t.to("cpu", torch.int64, copy=True)  # a copy: FFCV reuses its output buffers
    if t.shape[0] != n:
        raise ValueError(f"got {t.shape[0]} indices for a batch of {n} samples")
    return t


def _rows(sub: SubBatch, pos: Tensor, weights: Optional[Tensor] = None) -> SubBatch:
    """The rows ``pos`` (CPU int64) of a sub-batch, extras included."""
    n = len(sub)
    on = pos.to(sub.inputs.device)
    return SubBatch(
        sub.inputs[on],
        sub.targets[on],
        sub.weights[pos.to(sub.weights.device)] if weights is None else weights,
        sub.indices[pos],
        {k: _gather(v, pos, n) for k, v in sub.extras.items()},
    )


def _cat(parts: list[SubBatch]) -> SubBatch:
    if len(parts) == 1:
        return parts[0]
    sizes = [len(p) for p in parts]
    return SubBatch(
        torch.cat([p.inputs for p in parts]),
        torch.cat([p.targets for p in parts]),
        torch.cat([p.weights for p in parts]),
        torch.cat([p.indices for p in parts]),
        {k: _concat([p.extras[k] for p in parts], sizes, k) for k in parts[0].extras},
    )


class SelectiveLoader:
    """Wraps a loader of ``(inputs, targets[, indices])`` batches and yields ``SubBatch``es.

    Per batch: one scoring forward (``hook.score``), one selection
    (``strategy.select``), one gather on the batch's own device.

    Args:
        loader: any re-iterable of batches: a ``torch.utils.data.DataLoader``,
            an ``ffcv.loader.Loader`` over a ``.beton`` with an ``"index"`` field
            (see ``sbsampler.ffcv``), or anything yielding
            ``(inputs, targets[, indices, *extras])`` tuples or dicts with
            ``"inputs"``, ``"targets"`` (and ``"indices"``) keys; other fields
            travel in ``SubBatch.extras``.
        hook: the ``ScoringHook`` on the model being trained.
        strategy: a name (``"uniform"``, ``"topk"``, ``"sb"``, ``"gradmatch"``,
            ``"importance"``) or a ``Strategy`` object. Default ``"uniform"``.
        fraction: share of each batch to back-propagate, in (0, 1]; the
            sub-batch size is ``ceil(fraction * B)``.
        rebatch: accumulate selected samples until a full batch of
            ``batch_size`` is ready (Jiang et al.'s queue); the remainder at
            epoch end is yielded too, unless ``drop_last``.
        start, end: the selective window as fractions of ``epochs``: epoch ``e``
            (0-based) is selective when ``start <= e / epochs < end``; outside
            it whole batches pass through with weights ``1/B``, unscored.
        epochs: total epochs, needed when ``start``/``end`` are set.
        device: move each batch there before scoring (``None``: leave it).
        nan_policy: non-finite losses: ``"raise"`` (``ValueError``),
            ``"skip"`` (left out of the step, counted in ``stats.samples_skipped``)
            or ``"keep"`` (stay candidates, scored as the batch's largest
            finite loss with zero gradient information).
        batch_size: rebatching size; default the wrapped loader's
            ``batch_size``, else the first batch's size.
        drop_last: with ``rebatch``, drop the incomplete last batch of an epoch
            (counted in ``stats.samples_dropped``).
        seed: seed for a strategy given by name.
        distributed: agree on the step count with the other ranks of a
            ``torch.distributed`` job (see ``sbsampler.distributed`` for the
            rule). ``None`` (default) turns it on when a process group with more
            than one rank is initialised; ``False`` turns it off; a ``RankSync``
            uses that group.
        sync_history: under ``distributed``, share the SelectiveBackprop loss
            history across ranks (all-gather per round), so every rank ranks its
            losses against the same, global history; ``False`` keeps one
            history per rank.
        store: a ``ScoreStore`` that records every scored sample's loss and
            last-layer gradient norm (by dataset index, stamped with the epoch),
            for a ``SelectiveSampler`` to choose from later.

    Resume: ``state_dict()`` between two steps captures the epoch, the position
    in it, the strategy's state (RNG, loss history), the counters and the
    rebatching queue as dataset indices; ``load_state_dict()`` on a fresh
    loader continues the interrupted epoch exactly, provided the wrapped loader
    replays the same batch order (seed it; call ``sampler.set_epoch`` as usual).
    The batches already consumed are read again and skipped, unscored.
    """

    def __init__(
        self,
        loader: Iterable,
        hook: ScoringHook,
        strategy: Union[str, Strategy] = "uniform",
        fraction: float = 0.25,
        rebatch: bool = False,
        start: float = 0.0,
        end: float = 1.0,
        epochs: Optional[int] = None,
        device: Union[None, str, torch.device] = None,
        nan_policy: str = "raise",
        batch_size: Optional[int] = None,
        drop_last: bool = False,
        seed: Seed = None,
        distributed: Union[None, bool, RankSync] = None,
        sync_history: bool = False,
        store: Optional[Any] = None,
    ) -> None:
        if not isinstance(hook, ScoringHook):
            raise TypeError(f"hook must be a ScoringHook, got {type(hook).__name__}")
        budget(fraction, 1)  # validates fraction
        if not (0.0 <= start <= end <= 1.0):
            raise ValueError(f"need 0 <= start <= end <= 1, got start={start}, end={end}")
        if (start, end) != (0.0, 1.0) and not (isinstance(epochs, int) and epochs >= 1):
            raise ValueError(f"start/end are fractions of the training epochs: pass epochs= (got {epochs!r})")
        if nan_policy not in ("raise", "skip", "keep"):
            raise ValueError(f"nan_policy must be 'raise', 'skip' or 'keep', got {nan_policy!r}")
        if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if is_ffcv_loader(loader):
            loader = FFCVBatches(loader)
        self.loader = loader
        self.hook = hook
        self.strategy = get_strategy(strategy, seed=seed)
        self.fraction = float(fraction)
        self.rebatch = bool(rebatch)
        self.start, self.end = float(start), float(end)
        self.epochs = epochs
        self.device = torch.device(device) if device is not None else None
        self.nan_policy = nan_policy
        self.batch_size = batch_size if batch_size is not None else getattr(loader, "batch_size", None)
        self.drop_last = bool(drop_last)
        if distributed is None:
            self.sync = default_sync()
        elif distributed is True:
            self.sync = RankSync()
        elif distributed is False:
            self.sync = None
        elif isinstance(distributed, RankSync):
            self.sync = distributed
        else:
            raise TypeError(f"distributed must be None, a bool or a RankSync, got {type(distributed).__name__}")
        self.store = store
        self.sync_history = bool(sync_history)
        if self.sync_history:
            if self.sync is None:
                raise ValueError("sync_history=True needs a distributed job (torch.distributed initialised, 2+ ranks)")
            if not hasattr(self.strategy, "history_sync"):
                raise ValueError(f"sync_history=True needs a strategy with a loss history, got {self.strategy!r}")
            self.strategy.history_sync = self.sync.all_gather_1d  # type: ignore[attr-defined]
        self.epoch = 0
        self.stats = LoaderStats()
        # Iteration state, kept on the object so that state_dict() sees it between steps.
        self._in_epoch = False
        self._epoch_now = 0
        self._position = 0  # wrapped batches consumed this epoch
        self._stream = 0  # samples consumed this epoch (indices when the loader gives none)
        self._queue: list[tuple[SubBatch, int, Tensor]] = []  # (rows, source batch ordinal, positions in it)
        self._resume: Optional[dict[str, Any]] = None
        self._pad_source: Optional[SubBatch] = None
        self._observed = False

    # -- public helpers -----------------------------------------------------------
    def is_selective(self, epoch: Optional[int] = None) -> bool:
        """Whether ``epoch`` (default: the next one) lies in the selective window."""
        e = self.epoch if epoch is None else epoch
        if self.epochs is None:
            return True
        pos = e / self.epochs
        return self.start <= pos < self.end

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch counter that the next iteration uses (it then advances by one)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        """Sub-batches the next epoch yields; exact for fixed-count strategies on one process."""
        n_batches = len(self.loader)  # type: ignore[arg-type]
        if not self.is_selective() or not self.rebatch:
            return n_batches
        if self.strategy.variable_count:
            raise TypeError(f"{self.strategy!r} selects a variable count: the rebatched length is not known ahead")
        sizes = self._batch_sizes(n_batches)
        if sizes is None or self.batch_size is None:
            raise TypeError("cannot tell the rebatched length: the wrapped loader has no dataset/batch_size")
        total = sum(budget(self.fraction, b) for b in sizes)
        return total // self.batch_size if self.drop_last else math.ceil(total / self.batch_size)

    def _batch_sizes(self, n_batches: int) -> Optional[list[int]]:
        dataset = getattr(self.loader, "dataset", None)
        n = len(dataset) if dataset is not None else getattr(self.loader, "num_samples", None)
        bs = getattr(self.loader, "batch_size", None)
        if n is None or bs is None:
            return None
        sampler = getattr(self.loader, "sampler", None)
        if sampler is not None and hasattr(sampler, "__len__"):
            n = len(sampler)  # a DistributedSampler's shard
        sizes = [bs] * (n // bs)
        if n % bs and not getattr(self.loader, "drop_last", False):
            sizes.append(n % bs)
        return sizes[:n_batches]

    # -- resume -------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue where the last yielded step left off.

        Plain Python/NumPy values (``torch.save``-able): the epoch counters, the
        number of wrapped batches consumed, the queued samples as (batch ordinal,
        row, dataset index, weight), the strategy's ``state_dict`` and the counters.
        """
        if self._resume is not None:  # loaded but not iterated yet: hand the same state back
            return dict(self._resume)
        return {
            "version": 1,
            "epoch": self.epoch,
            "in_epoch": self._in_epoch,
            "epoch_now": self._epoch_now,
            "position": self._position,
            "batch_size": self.batch_size,
            "queue": [
                {
                    "batch": ordinal,
                    "rows": rows.numpy().copy(),
                    "indices": sub.indices.numpy().copy(),
                    "weights": sub.weights.detach().cpu().numpy().copy(),
                }
                for sub, ordinal, rows in self._queue
            ],
            "strategy": self.strategy.state_dict(),
            "stats": asdict(self.stats),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict()``; the next iteration continues the saved epoch."""
        if state.get("version") != 1:
            raise ValueError(f"unknown SelectiveLoader state version {state.get('version')!r}")
        self.epoch = int(state["epoch"])
        self.batch_size = state["batch_size"]
        self.strategy.load_state_dict(state["strategy"])
        self.stats = LoaderStats(**{**state["stats"], "residuals": list(state["stats"]["residuals"])})
        self._queue = []
        self._in_epoch = False
        self._resume = dict(state) if state["in_epoch"] else None

    def _fast_forward(self, it: Iterator, state: dict[str, Any]) -> None:
        """Consume the batches the saved run had consumed; rebuild its queue from them."""
        wanted: dict[int, list[int]] = {}
        for j, entry in enumerate(state["queue"]):
            wanted.setdefault(int(entry["batch"]), []).append(j)
        pieces: list[Optional[tuple[SubBatch, int, Tensor]]] = [None] * len(state["queue"])
        for ordinal in range(int(state["position"])):
            try:
                batch = next(it)
            except StopIteration:
                raise RuntimeError(
                    f"cannot resume: the wrapped loader ended after {ordinal} batches, but the saved "
                    f"state had consumed {state['position']}"
                ) from None
            x, y, idx, extras = self._unpack(batch)
            if ordinal not in wanted:
                continue
            if self.device is not None:
                x, y = x.to(self.device), y.to(self.device)
            full = SubBatch(x, y, torch.zeros(len(idx)), idx, extras)
            for j in wanted[ordinal]:
                entry = state["queue"][j]
                rows = torch.as_tensor(entry["rows"], dtype=torch.int64)
                if not torch.equal(idx[rows], torch.as_tensor(entry["indices"], dtype=torch.int64)):
                    raise RuntimeError(
                        f"cannot resume: batch {ordinal} of the wrapped loader holds other samples than in the "
                        "saved run; the loader must replay the same order (seed it, set the sampler's epoch)"
                    )
                w = torch.as_tensor(entry["weights"], dtype=torch.float32).to(x.device)
                pieces[j] = (_rows(full, rows, w), ordinal, rows)
        self._queue = [p for p in pieces if p is not None]
        self._position = int(state["position"])

    # -- iteration ----------------------------------------------------------------
    def __iter__(self) -> Iterator[SubBatch]:
        resume, self._resume = self._resume, None
        if self._in_epoch and self._queue:  # the last epoch was broken off (break or exception)
            self.stats.samples_abandoned += sum(len(sub) for sub, _, _ in self._queue)
        self._queue, self._position, self._stream = [], 0, 0
        if resume is None:
            self._epoch_now = self.epoch
            self.epoch += 1
        else:
            self._epoch_now = int(resume["epoch_now"])
        self._in_epoch = True
        selective = self.is_selective(self._epoch_now)
        it = iter(self.loader)
        if resume is not None:
            self._fast_forward(it, resume)
        if selective and self.rebatch:
            yield from self._rebatched(it)
        else:
            yield from self._direct(it, selective)
        self._in_epoch = False

    def _unpack(self, batch: Any) -> tuple[Tensor, Tensor, Tensor, dict]:
        """Split a wrapped batch, check its lengths, and give it indices (stream positions if none)."""
        x, y, idx, extras = _split_batch(batch)
        n = int(x.shape[0])
        if int(y.shape[0]) != n:
            raise ValueError(f"inputs have {n} samples but targets have {int(y.shape[0])}")
        idx = _as_index_tensor(idx, n) if idx is not None else torch.arange(self._stream, self._stream + n)
        self._stream += n
        return x, y, idx, extras

    def _pull(self, it: Iterator, selective: bool) -> tuple[bool, Optional[SubBatch], Optional[Tensor]]:
        """Next wrapped batch -> ``(exhausted, sub-batch or None, its rows in the batch)``."""
        t0 = time.perf_counter()
        try:
            batch = next(it)
        except StopIteration:
            return True, None, None
        self.stats.time_loading += time.perf_counter() - t0
        x, y, idx, extras = self._unpack(batch)
        if self.device is not None:
            x = x.to(self.device, non_blocking=True)
            y = y.to(self.device, non_blocking=True)
        n = int(x.shape[0])
        self._last_batch_n = n
        self._position += 1
        self.stats.batches_seen += 1
        self.stats.samples_seen += n
        if n == 0:
            return False, None, None
        full = SubBatch(x, y, torch.full((n,), 1.0 / n, device=x.device), idx, extras)
        if not selective:
            self.stats.samples_selected += n
            return False, full, torch.arange(n)
        pos, weights = self._select(x, y, idx) or (None, None)
        if pos is None:
            return False, None, None
        return False, _rows(full, pos, weights), pos

    def _emit(self, sub: SubBatch) -> SubBatch:
        self.stats.samples_yielded += len(sub)
        self.stats.steps += 1
        self._pad_source = sub
        return sub

    def _direct(self, it: Iterator, selective: bool) -> Iterator[SubBatch]:
        """One step per wrapped batch (no rebatching, or outside the selective window)."""
        while True:
            self._observed = False
            exhausted, sub, _ = self._pull(it, selective)
            self._observe_nothing(selective)
            if self.sync is None:
                if exhausted:
                    return
                if sub is not None:
                    yield self._emit(sub)
                continue
            _, (size, more) = self.sync.min_max([len(sub) if sub is not None else 0, int(not exhausted)])
            if size:
                yield self._pad(sub, size)
            if not more:
                return

    def _rebatched(self, it: Iterator) -> Iterator[SubBatch]:
        """Jiang et al.'s queue: selected samples accumulate until a full batch is ready."""
        while True:
            self._observed = False
            exhausted, sub, rows = self._pull(it, True)
            self._observe_nothing(True)
            if sub is not None:
                if self.batch_size is None:  # no batch_size given or on the loader: the first batch's
                    self.batch_size = self._last_batch_n
                # Weights become relative to the emitted batch: w * k / batch_size.
                sub.weights = sub.weights * len(sub)
                self._queue.append((sub, self._position - 1, rows))
            size = self.batch_size
            queued = self._queued()
            ready = queued // size if size else 0
            if self.sync is None:
                for _ in range(ready):
                    yield self._emit(self._take(size))
                if exhausted:
                    break
                continue
            mn, mx = self.sync.min_max([ready, int(not exhausted)])
            for _ in range(mn[0]):
                yield self._emit(self._take(size))
            if not mx[1]:
                break
        yield from self._tail()

    def _tail(self) -> Iterator[SubBatch]:
        """The samples left in the queue when the epoch's input has run out."""
        size = self.batch_size or 1
        queued = self._queued()
        if self.sync is None:
            if queued and self.drop_last:
                self._drop(queued)
            elif queued:
                yield self._emit(self._take(queued))
            return
        mn, mx = self.sync.min_max([queued // size, -(-queued // size)])
        if self.drop_last:
            for _ in range(mn[0]):
                yield self._emit(self._take(size))
            self._drop(self._queued())
            return
        for _ in range(mx[1]):
            m = min(size, self._queued())
            yield self._pad(self._take(m) if m else None, size)

    def _queued(self) -> int:
        return sum(len(sub) for sub, _, _ in self._queue)

    def _drop(self, count: int) -> None:
        self.stats.samples_dropped += count
        self._queue = []

    def _pad(self, sub: Optional[SubBatch], size: int) -> SubBatch:
        """``sub`` made ``size`` rows long with zero-weight repeats (DDP steps must agree)."""
        have = len(sub) if sub is not None else 0
        if have >= size:
            return self._emit(sub)  # type: ignore[arg-type]
        base = sub if have else self._pad_source
        if base is None:
            raise RuntimeError(
                f"rank {self.sync.rank if self.sync else 0} has no sample to pad a step with: every rank "
                "needs at least one sample in its first round"
            )
        need = size - have
        pad = _rows(base, torch.arange(need) % len(base), torch.zeros(need, device=base.weights.device))
        out = _cat([sub, pad]) if have else pad  # type: ignore[list-item]
        if have:
            self._pad_source = sub
        self.stats.samples_yielded += have
        self.stats.samples_padded += need
        self.stats.steps += 1
        return out

    def _observe_nothing(self, selective: bool) -> None:
        """Under ``sync_history`` a rank that did not select this round still joins the all-gather."""
        if self.sync_history and selective and not self._observed:
            self.strategy.observe(np.zeros(0))  # type: ignore[attr-defined]

    def _select(self, x: Tensor, y: Tensor, idx: Tensor) -> Optional[tuple[Tensor, Tensor]]:
        n = int(x.shape[0])
        t0 = time.perf_counter()
        scores = self.hook.score(x, y)
        self.stats.samples_scored += n
        t1 = time.perf_counter()
        self.stats.time_scoring += t1 - t0
        candidates, scores = self._apply_nan_policy(scores, idx)
        if self.store is not None and len(scores):
            kept = idx if candidates is None else idx[candidates]
            scores.norms = scores.grad_norms()  # computed once: a norm-based strategy reads them too
            self.store.update(kept, scores.loss, scores.norms, epoch=self._epoch_now)
        m = len(scores)
        if m == 0:
            return None
        k = budget(self.fraction, n)
        self._observed = True
        sel = self.strategy.select(scores, min(k, m))
        if sel.residual is not None:
            self.stats.residuals.append(sel.residual)
        t2 = time.perf_counter()
        self.stats.time_selecting += t2 - t1
        pos = torch.from_numpy(sel.indices)
        if candidates is not None:
            pos = candidates[pos]
        # Sampling with replacement can repeat a sample: count distinct ones as selected.
        distinct = int(torch.unique(pos).numel())
        self.stats.samples_selected += distinct
        self.stats.samples_not_selected += m - distinct
        self.stats.time_gathering += time.perf_counter() - t2
        if distinct == 0:  # a variable-count rule kept nothing: no step from this batch
            return None
        return pos, torch.from_numpy(sel.weights).to(x.device)

    def _apply_nan_policy(self, scores: Scores, idx: Tensor) -> tuple[Optional[Tensor], Scores]:
        finite = torch.isfinite(scores.loss)
        if scores.logit_grad is not None:
            finite &= torch.isfinite(scores.logit_grad).all(1)
        if scores.features is not None:
            finite &= torch.isfinite(scores.features).all(1)
        if bool(finite.all()):
            return None, scores
        bad = (~finite).nonzero().flatten().cpu()
        if self.nan_policy == "raise":
            raise ValueError(
                f"non-finite loss or gradient for {bad.numel()} sample(s), dataset indices "
                f"{idx[bad][:10].tolist()}; pass nan_policy='skip' or 'keep' to SelectiveLoader to go on"
            )
        if self.nan_policy == "skip":
            self.stats.samples_skipped += int(bad.numel())
            keep = finite.nonzero().flatten()
            return keep.cpu(), scores.subset(keep)
        # keep: a non-finite sample stays a candidate with the largest finite loss and no gradient.
        loss = scores.loss.clone()
        top = loss[finite].max() if bool(finite.any()) else torch.zeros((), device=loss.device)
        loss[~finite] = top
        e = scores.logit_grad
        h = scores.features
        if e is not None:
            e = torch.where(finite[:, None], e, torch.zeros_like(e))
        if h is not None:
            h = torch.where(finite[:, None], h, torch.zeros_like(h))
        return None, Scores(loss=loss, logit_grad=e, features=h, targets=scores.targets, bias=scores.bias)

    def _take(self, size: int) -> SubBatch:
        """Pop ``size`` samples off the front of the queue as one SubBatch (weights / ``size``)."""
        parts: list[SubBatch] = []
        need = size
        while need:
            head, ordinal, rows = self._queue[0]
            if len(head) <= need:
                parts.append(head)
                self._queue.pop(0)
                need -= len(head)
            else:
                parts.append(_rows(head, torch.arange(need)))
                rest = torch.arange(need, len(head))
                self._queue[0] = (_rows(head, rest), ordinal, rows[need:])
                need = 0
        out = _cat(parts)
        out.weights = out.weights / size
        return out

    def __repr__(self) -> str:
        return (
            f"SelectiveLoader(strategy={self.strategy!r}, fraction={self.fraction}, rebatch={self.rebatch}, "
            f"start={self.start}, end={self.end}, epochs={self.epochs})"
        )
