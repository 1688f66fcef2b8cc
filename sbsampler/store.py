"""Per-sample memory of scores: what a sampler chooses from before anything is loaded.

``ScoreStore`` keeps, for every dataset index, the latest loss, the latest
last-layer gradient norm and the epoch in which they were measured
(``scored_epoch``), as NumPy arrays. It is written by ``SelectiveLoader(store=...)``
(from the scoring pass) or by the training step itself
(``store.update(batch.indices, losses)``, no extra forward), and read by
``SelectiveSampler`` at the start of each epoch.
"""

from __future__ import annotations

from typing import Any, Optional, Union

import numpy as np
import torch

from .checkpoint import check_version, read_array, read_int, require

__all__ = ["ScoreStore"]

#: version of the layout of ``ScoreStore.state_dict()`` (a state without one is read as version 0;
#: version 2 added the reference losses)
STATE_VERSION = 2

ArrayLike = Union[np.ndarray, torch.Tensor, list]


def _array(values: ArrayLike, dtype) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    return np.asarray(values, dtype=dtype).reshape(-1)


def _indices(values: ArrayLike) -> np.ndarray:
    """Integer dataset indices; a boolean mask or a float array is refused, never cast."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    arr = np.asarray(values)
    if arr.dtype == np.bool_:
        raise TypeError("indices are a boolean mask; pass the integer indices (e.g. mask.nonzero()) of the samples")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"indices must be integers, got dtype {arr.dtype} (a float index would be truncated)")
    return arr.astype(np.int64).reshape(-1)


class ScoreStore:
    """Latest loss, gradient norm and epoch seen, per dataset index.

    Args:
        num_samples: dataset size; indices must lie in ``[0, num_samples)``.

    Attributes:
        loss: float64 (N,) latest loss (NaN: never scored).
        grad_norm: float64 (N,) latest last-layer gradient norm (NaN: unknown).
        scored_epoch: int64 (N,) epoch of the latest update (-1: never).
        current_epoch: the epoch that ``update`` stamps by default
            (``SelectiveSampler.set_epoch`` sets it).
        reference: float64 (N,) each sample's reference (irreducible) loss, from
            a model trained on held-out data (``set_reference``;
            ``sbsampler.reference.reference_losses``); NaN: none. Read by
            ``RhoLoss(reference=store)``; not touched by ``merge`` (compute it
            the same on every rank).
        version: counts the writes (``update``, ``merge``, ``load_state_dict``),
            so a sampler can tell whether a plan drawn earlier is out of date.
    """

    def __init__(self, num_samples: int) -> None:
        if isinstance(num_samples, bool) or not isinstance(num_samples, (int, np.integer)) or num_samples < 1:
            raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
        n = int(num_samples)
        self.loss = np.full(n, np.nan)
        self.grad_norm = np.full(n, np.nan)
        self.scored_epoch = np.full(n, -1, dtype=np.int64)
        self.reference = np.full(n, np.nan)
        self.current_epoch = 0
        self.version = 0

    def __len__(self) -> int:
        return int(self.loss.shape[0])

    def update(
        self,
        indices: ArrayLike,
        losses: ArrayLike,
        grad_norms: Optional[ArrayLike] = None,
        epoch: Optional[int] = None,
    ) -> None:
        """Record losses (and gradient norms) of the samples at ``indices``.

        Raises ``TypeError`` on indices that are not integers (a boolean mask,
        floats), ``ValueError`` on indices out of range, mismatched lengths or
        non-finite losses or norms (they would poison every later selection). A
        repeated index keeps its last value.
        """
        idx = _indices(indices)
        loss = _array(losses, np.float64)
        if loss.shape != idx.shape:
            raise ValueError(f"got {loss.shape[0]} losses for {idx.shape[0]} indices")
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            bad = int(idx.min() if idx.min() < 0 else idx.max())
            raise ValueError(f"index {bad} is out of range for a store of {len(self)} samples")
        if not np.isfinite(loss).all():
            raise ValueError(f"non-finite loss for indices {idx[~np.isfinite(loss)][:10].tolist()}")
        norms = None
        if grad_norms is not None:
            norms = _array(grad_norms, np.float64)
            if norms.shape != idx.shape:
                raise ValueError(f"got {norms.shape[0]} gradient norms for {idx.shape[0]} indices")
            if not np.isfinite(norms).all():
                raise ValueError(f"non-finite gradient norm for indices {idx[~np.isfinite(norms)][:10].tolist()}")
        self.loss[idx] = loss  # everything checked: nothing is half-written
        if norms is not None:
            self.grad_norm[idx] = norms
        self.scored_epoch[idx] = self.current_epoch if epoch is None else int(epoch)
        self.version += 1

    def set_reference(self, losses: ArrayLike, indices: Optional[ArrayLike] = None) -> None:
        """Record reference losses: ``losses`` for ``indices`` (default: the whole dataset, in index order).

        Raises ``ValueError`` on a length that does not fit, an index out of range, or
        an infinite or NaN loss (a sample without a reference is left out of
        ``indices``, not given NaN).
        """
        loss = _array(losses, np.float64)
        idx = np.arange(len(self)) if indices is None else _indices(indices)
        if loss.shape != idx.shape:
            raise ValueError(f"got {loss.shape[0]} reference losses for {idx.shape[0]} samples"
                             + (" (the store's size: pass indices= for a part)" if indices is None else ""))
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise ValueError(f"index {int(idx.min() if idx.min() < 0 else idx.max())} is out of range for a store "
                             f"of {len(self)} samples")
        if not np.isfinite(loss).all():
            raise ValueError(f"non-finite reference loss for indices {idx[~np.isfinite(loss)][:10].tolist()}")
        self.reference[idx] = loss
        self.version += 1

    def update_all(self, sync: Any, indices: ArrayLike, losses: ArrayLike, grad_norms: Optional[ArrayLike] = None,
                   epoch: Optional[int] = None) -> None:
        """``update`` with every rank's samples of this step: one all-gather of (index, loss[, norm]) rows.

        Call it on every rank at the same step (``sync`` a ``sbsampler.distributed.RankSync``):
        every rank's store then holds every rank's scores as they are written, so every rank
        draws the same ``SelectiveSampler`` plan. The alternative, ``merge`` once an epoch,
        moves the whole store instead (``benchmarks/sampler_ddp.py`` measures both).
        """
        idx = _indices(indices).astype(np.float64)
        loss = _array(losses, np.float64)
        if loss.shape != idx.shape:
            raise ValueError(f"got {loss.shape[0]} losses for {idx.shape[0]} indices")
        has_norms = grad_norms is not None
        _, (any_norms,) = sync.min_max([int(has_norms)])
        if any_norms and not has_norms:
            raise ValueError("every rank must pass grad_norms to update_all, or none")
        cols = [idx, loss] + ([_array(grad_norms, np.float64)] if has_norms else [])
        rows = sync.all_gather_1d(np.stack(cols, axis=1).ravel()).reshape(-1, len(cols))
        self.update(rows[:, 0].astype(np.int64), rows[:, 1], rows[:, 2] if has_norms else None, epoch=epoch)

    def scored(self) -> np.ndarray:
        """Boolean (N,) mask of the samples with a stored loss."""
        return self.scored_epoch >= 0

    def merge(self, sync: Any) -> None:
        """Merge the stores of every DDP rank in place: per sample, the latest update wins.

        ``sync`` is a ``sbsampler.distributed.RankSync``. Call it on every rank
        at the same point (e.g. at the end of each epoch); afterwards every rank
        holds the same store, so every rank draws the same ``SelectiveSampler`` plan.
        """
        epochs = sync.all_gather_1d(self.scored_epoch.astype(np.float64)).reshape(sync.world_size, -1)
        losses = sync.all_gather_1d(self.loss).reshape(sync.world_size, -1)
        norms = sync.all_gather_1d(self.grad_norm).reshape(sync.world_size, -1)
        # The latest epoch wins; ties go to the highest rank (a fixed rule, the same on every rank).
        winner = (len(epochs) - 1) - np.argmax(epochs[::-1], axis=0)
        cols = np.arange(len(self))
        self.scored_epoch = epochs[winner, cols].astype(np.int64)
        self.loss = losses[winner, cols]
        self.grad_norm = norms[winner, cols]
        self.version += 1

    def state_dict(self) -> dict[str, Any]:
        """Copies of the arrays (CPU tensors) and the epoch counter: loads with ``torch.load(weights_only=True)``."""
        return {"version": STATE_VERSION, "num_samples": len(self), "loss": torch.from_numpy(self.loss.copy()),
                "grad_norm": torch.from_numpy(self.grad_norm.copy()),
                "reference": torch.from_numpy(self.reference.copy()),
                "scored_epoch": torch.from_numpy(self.scored_epoch.copy()), "current_epoch": self.current_epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict()``: checked first (dataset size, shapes, dtypes), then set; nothing half-loaded.

        Reference losses the state does not hold (a version-1 state, or samples it saved as NaN) keep the
        store's own, so a store given ``set_reference`` before loading an older checkpoint keeps them.
        """
        kind = "ScoreStore"
        require(state, ["loss", "grad_norm", "scored_epoch", "current_epoch"], kind)
        check_version(state, kind, (0, 1, STATE_VERSION), legacy=0)
        n = len(self)
        saved_n = state.get("num_samples", len(state["loss"]))
        if saved_n != n:
            raise ValueError(f"this ScoreStore state holds {saved_n} samples, this store {n}: it comes from "
                             "another dataset")
        loss = read_array(state["loss"], "loss", kind, n)
        norms = read_array(state["grad_norm"], "grad_norm", kind, n, low=0.0)  # NaN: unknown
        epochs = read_array(state["scored_epoch"], "scored_epoch", kind, n, integer=True, low=-1)
        current = read_int(state["current_epoch"], "current_epoch", kind)
        if not np.isfinite(loss[epochs >= 0]).all():
            raise ValueError(f"{kind} state field 'loss' holds non-finite losses of scored samples")
        if np.isinf(norms).any():
            raise ValueError(f"{kind} state field 'grad_norm' holds infinite norms")
        reference = self.reference  # a state without reference losses keeps the store's own (set_reference)
        if state.get("reference") is not None:  # version 2; NaN where it had none
            saved = read_array(state["reference"], "reference", kind, n)
            if np.isinf(saved).any():
                raise ValueError(f"{kind} state field 'reference' holds infinite losses")
            reference = np.where(np.isnan(saved), self.reference, saved)
        self.loss, self.grad_norm, self.scored_epoch, self.current_epoch = loss, norms, epochs, current
        self.reference = reference
        self.version += 1

    def __repr__(self) -> str:
        scored = int(self.scored().sum())
        return f"ScoreStore(num_samples={len(self)}, scored={scored}, current_epoch={self.current_epoch})"
