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
    """

    inputs: Tensor
    targets: Tensor
    weights: Tensor
    indices: Tensor

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
    ``samples_yielded + samples_dropped == samples_selected``.
    """

    batches_seen: int = 0
    samples_seen: int = 0
    samples_scored: int = 0
    samples_selected: int = 0
    samples_not_selected: int = 0
    samples_skipped: int = 0  # non-finite losses under nan_policy="skip", empty batches
    samples_yielded: int = 0  # samples back-propagated, if every yielded batch is trained on
    samples_dropped: int = 0  # rebatching remainder dropped because drop_last=True
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


def _split_batch(batch: Any) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    if isinstance(batch, dict):
        if "inputs" not in batch or "targets" not in batch:
            raise TypeError(f"dict batches need 'inputs' and 'targets' keys, got {sorted(batch)}")
        return batch["inputs"], batch["targets"], batch.get("indices")
    if isinstance(batch, Sequence) and not isinstance(batch, (str, bytes)) and len(batch) in (2, 3):
        x, y = batch[0], batch[1]
        idx = batch[2] if len(batch) == 3 else None
        return x, y, idx
    raise TypeError(
        "batches must be (inputs, targets) or (inputs, targets, indices) sequences or a dict with those keys; "
        f"got {type(batch).__name__}" + (f" of length {len(batch)}" if hasattr(batch, "__len__") else "")
    )


def _as_index_tensor(idx: Any, n: int) -> Tensor:
    t = torch.as_tensor(idx).reshape(-1)
    if t.dtype.is_floating_point or t.dtype == torch.bool:
        raise TypeError(f"indices must be integers, got dtype {t.dtype}")
    t = t.to("cpu", torch.int64, copy=True)  # a copy: FFCV reuses its output buffers
    if t.shape[0] != n:
        raise ValueError(f"got {t.shape[0]} indices for a batch of {n} samples")
    return t


class SelectiveLoader:
    """Wraps a loader of ``(inputs, targets[, indices])`` batches and yields ``SubBatch``es.

    Per batch: one scoring forward (``hook.score``), one selection
    (``strategy.select``), one gather on the batch's own device.

    Args:
        loader: any re-iterable of batches: a ``torch.utils.data.DataLoader``,
            an ``ffcv.loader.Loader`` over a ``.beton`` with an ``"index"`` field
            (see ``sbsampler.ffcv``), or anything yielding ``(inputs, targets)`` /
            ``(inputs, targets, indices)`` tuples or dicts with those keys.
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
        self.epoch = 0
        self.stats = LoaderStats()

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
        """Sub-batches the next epoch yields; exact for fixed-count strategies."""
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
        sizes = [bs] * (n // bs)
        if n % bs and not getattr(self.loader, "drop_last", False):
            sizes.append(n % bs)
        return sizes[:n_batches]

    # -- iteration ----------------------------------------------------------------
    def __iter__(self) -> Iterator[SubBatch]:
        selective = self.is_selective()
        self.epoch += 1
        queue: list[SubBatch] = []
        queued = 0
        position = 0
        it = iter(self.loader)
        while True:
            t0 = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                break
            self.stats.time_loading += time.perf_counter() - t0
            x, y, idx = _split_batch(batch)
            if self.device is not None:
                x = x.to(self.device, non_blocking=True)
                y = y.to(self.device, non_blocking=True)
            n = int(x.shape[0])
            if int(y.shape[0]) != n:
                raise ValueError(f"inputs have {n} samples but targets have {int(y.shape[0])}")
            idx = _as_index_tensor(idx, n) if idx is not None else torch.arange(position, position + n)
            position += n
            self.stats.batches_seen += 1
            self.stats.samples_seen += n
            if n == 0:
                continue
            if not selective:
                self.stats.samples_selected += n
                self.stats.samples_yielded += n
                self.stats.steps += 1
                yield SubBatch(x, y, torch.full((n,), 1.0 / n), idx)
                continue
            sub = self._select(x, y, idx)
            if sub is None:
                continue
            if not self.rebatch:
                self.stats.samples_yielded += len(sub)
                self.stats.steps += 1
                yield sub
                continue
            # Rebatching: weights become relative to the emitted batch (w * k / batch_size).
            sub.weights = sub.weights * len(sub)
            queue.append(sub)
            queued += len(sub)
            size = self.batch_size or n
            if self.batch_size is None:
                self.batch_size = n
            while queued >= size:
                out, queue, queued = self._take(queue, size)
                self.stats.samples_yielded += size
                self.stats.steps += 1
                yield out
        if queued:
            if self.drop_last:
                self.stats.samples_dropped += queued
            else:
                out, queue, queued = self._take(queue, queued)
                self.stats.samples_yielded += len(out)
                self.stats.steps += 1
                yield out

    def _select(self, x: Tensor, y: Tensor, idx: Tensor) -> Optional[SubBatch]:
        n = int(x.shape[0])
        t0 = time.perf_counter()
        scores = self.hook.score(x, y)
        self.stats.samples_scored += n
        t1 = time.perf_counter()
        self.stats.time_scoring += t1 - t0
        candidates, scores = self._apply_nan_policy(scores, idx)
        m = len(scores)
        if m == 0:
            return None
        k = budget(self.fraction, n)
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
        on = pos.to(x.device)
        out = SubBatch(x[on], y[on], torch.from_numpy(sel.weights).to(x.device), idx[pos])
        self.stats.time_gathering += time.perf_counter() - t2
        return out

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

    @staticmethod
    def _take(queue: list[SubBatch], size: int) -> tuple[SubBatch, list[SubBatch], int]:
        """Pop ``size`` samples off the front of the queue as one SubBatch."""
        parts: list[SubBatch] = []
        need = size
        while need:
            head = queue[0]
            if len(head) <= need:
                parts.append(queue.pop(0))
                need -= len(head)
            else:
                parts.append(SubBatch(head.inputs[:need], head.targets[:need], head.weights[:need], head.indices[:need]))
                queue[0] = SubBatch(head.inputs[need:], head.targets[need:], head.weights[need:], head.indices[need:])
                need = 0
        out = SubBatch(
            torch.cat([p.inputs for p in parts]),
            torch.cat([p.targets for p in parts]),
            torch.cat([p.weights for p in parts]) / size,
            torch.cat([p.indices for p in parts]),
        )
        return out, queue, sum(len(p) for p in queue)

    def __repr__(self) -> str:
        return (
            f"SelectiveLoader(strategy={self.strategy!r}, fraction={self.fraction}, rebatch={self.rebatch}, "
            f"start={self.start}, end={self.end}, epochs={self.epochs})"
        )
