"""Per-sample memory of scores: what a sampler chooses from before anything is loaded.

``ScoreStore`` keeps, for every dataset index, the latest loss, the latest
last-layer gradient norm and the epoch in which they were measured
(``scored_epoch``), as compact NumPy columns: float32 scores and an int32 epoch
stamp, 12 bytes a sample (float64 scores on request, ``dtype="float64"``); the
reference-loss column of RHO-LOSS exists only once set. It is written by
``SelectiveLoader(store=...)`` (from the scoring pass) or by the training step
itself (``store.update(batch.indices, losses)``, no extra forward), and read by
``SelectiveSampler`` at the start of each epoch.

Beyond memory: ``ScoreStore.open(path, num_samples)`` keeps the columns in
memory-mapped ``.npy`` files in the folder ``path`` (the operating system pages
them in and out), and ``store.save(path)`` writes any store's columns there
atomically (a new folder renamed into place), so that ``ScoreStore.open(path)``
reopens it after a restart. ``state_dict()`` holds copies of the columns (a
small store in a torch checkpoint); save a large one with ``save``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch

from .checkpoint import check_version, read_array, read_int, require

__all__ = ["ScoreStore", "DTYPES"]

#: version of the layout of ``ScoreStore.state_dict()`` (a state without one is read as version 0;
#: version 2 added the reference losses; version 3: the scores' dtype, the reference only once set)
STATE_VERSION = 3
#: the scores' dtypes a store takes (the epoch stamp is always int32)
DTYPES = ("float32", "float64")
_COLUMNS = ("loss", "grad_norm", "scored_epoch", "reference")
_META = "store.json"
_MAX_EPOCH = np.iinfo(np.int32).max

ArrayLike = Union[np.ndarray, torch.Tensor, list]


def _array(values: ArrayLike, dtype: Any) -> np.ndarray:
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


def _size(num_samples: Any) -> int:
    if isinstance(num_samples, bool) or not isinstance(num_samples, (int, np.integer)) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
    return int(num_samples)


def _dtype(dtype: Any) -> np.dtype:
    name = np.dtype(dtype).name if not isinstance(dtype, str) else dtype
    if name not in DTYPES:
        raise ValueError(f"a ScoreStore keeps float32 or float64 scores, got dtype={dtype!r}")
    return np.dtype(name)


class ScoreStore:
    """Latest loss, gradient norm and epoch seen, per dataset index.

    Args:
        num_samples: dataset size; indices must lie in ``[0, num_samples)``.
        dtype: the scores' dtype, ``"float32"`` (default: 12 bytes a sample with the
            epoch stamp) or ``"float64"`` (20 bytes).

    Attributes:
        loss: (N,) latest loss (NaN: never scored).
        grad_norm: (N,) latest last-layer gradient norm (NaN: unknown).
        scored_epoch: int32 (N,) epoch of the latest update (-1: never).
        current_epoch: the epoch that ``update`` stamps by default
            (``SelectiveSampler.set_epoch`` sets it).
        reference: (N,) each sample's reference (irreducible) loss, from a model
            trained on held-out data (``set_reference``;
            ``sbsampler.reference.reference_losses``), NaN where none; ``None``
            until set. Read by ``RhoLoss(reference=store)``; not touched by ``merge``
            (compute it the same on every rank).
        version: counts the writes (``update``, ``merge``, ``load_state_dict``),
            so a sampler can tell whether a plan drawn earlier is out of date.
        path: the folder of a memory-mapped store (``ScoreStore.open``), else ``None``.
    """

    def __init__(self, num_samples: int, dtype: Any = "float32") -> None:
        n = _size(num_samples)
        self.dtype = _dtype(dtype)
        self.loss = np.full(n, np.nan, dtype=self.dtype)
        self.grad_norm = np.full(n, np.nan, dtype=self.dtype)
        self.scored_epoch = np.full(n, -1, dtype=np.int32)
        self.reference: Optional[np.ndarray] = None
        self.current_epoch = 0
        self.version = 0
        self.path: Optional[Path] = None

    def __len__(self) -> int:
        return int(self.loss.shape[0])

    @property
    def nbytes(self) -> int:
        """Bytes the columns take (in memory, or on disk for a memory-mapped store)."""
        return sum(int(getattr(self, c).nbytes) for c in _COLUMNS if getattr(self, c) is not None)

    # -- beyond memory -------------------------------------------------------------------
    @classmethod
    def open(cls, path: Union[str, os.PathLike], num_samples: Optional[int] = None,
             dtype: Any = "float32") -> "ScoreStore":
        """A store whose columns live in memory-mapped ``.npy`` files in the folder ``path``: created (with
        ``num_samples``) when the folder holds no store, reopened as it was saved otherwise.

        Raises:
            ValueError: ``num_samples`` or ``dtype`` differ from the store saved there, or neither a store nor
                ``num_samples`` is there to open.
        """
        folder = Path(path)
        meta_file = folder / _META
        if not meta_file.exists():
            if num_samples is None:
                raise ValueError(f"{folder} holds no ScoreStore: pass num_samples= to create one there")
            n = _size(num_samples)
            store = cls(1, dtype)  # its columns are made on disk below
            folder.mkdir(parents=True, exist_ok=True)
            store.loss = _new(folder / "loss.npy", n, store.dtype, np.nan)
            store.grad_norm = _new(folder / "grad_norm.npy", n, store.dtype, np.nan)
            store.scored_epoch = _new(folder / "scored_epoch.npy", n, np.int32, -1)
            store.path = folder
            store.flush()
            return store
        meta = json.loads(meta_file.read_text())
        store = cls._from_folder(folder, meta, mmap=True)
        if num_samples is not None and int(num_samples) != len(store):
            raise ValueError(f"the ScoreStore in {folder} holds {len(store)} samples, not {num_samples}")
        if np.dtype(meta["dtype"]) != _dtype(dtype):
            raise ValueError(f"the ScoreStore in {folder} keeps {meta['dtype']} scores, not {dtype}")
        return store

    @classmethod
    def _from_folder(cls, folder: Path, meta: dict[str, Any], mmap: bool) -> "ScoreStore":
        mode = "r+" if mmap else None
        store = cls(1, meta["dtype"])
        for column in _COLUMNS:
            file = folder / f"{column}.npy"
            if column == "reference" and not file.exists():
                continue
            setattr(store, column, np.load(file, mmap_mode=mode) if mmap else np.load(file))
        store.current_epoch = int(meta["current_epoch"])
        store.version = int(meta.get("version", 0))
        store.path = folder if mmap else None
        n = len(store)
        for column in _COLUMNS:
            arr = getattr(store, column)
            if arr is not None and arr.shape != (n,):
                raise ValueError(f"the ScoreStore in {folder} is damaged: {column} has shape {arr.shape}, not ({n},)")
        return store

    def flush(self) -> None:
        """Write a memory-mapped store's columns and counters to its files (a no-op in memory)."""
        if self.path is None:
            return
        for column in _COLUMNS:
            arr = getattr(self, column)
            if isinstance(arr, np.memmap):
                arr.flush()
        _write_meta(self.path, self._meta())

    def _meta(self) -> dict[str, Any]:
        return {"num_samples": len(self), "dtype": self.dtype.name, "current_epoch": self.current_epoch,
                "version": self.version}

    def save(self, path: Union[str, os.PathLike]) -> Path:
        """Write the columns and counters to the folder ``path`` atomically: into a new folder beside it, renamed
        into place, so a crash leaves the old store or the new one, never half of each. ``ScoreStore.open(path)``
        (memory-mapped) or ``ScoreStore.load(path)`` (in memory) reads it back."""
        folder = Path(path)
        folder.parent.mkdir(parents=True, exist_ok=True)
        if self.path is not None and folder.resolve() == self.path.resolve():
            self.flush()
            return folder
        staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
        try:
            for column in _COLUMNS:
                arr = getattr(self, column)
                if arr is not None:
                    np.save(staging / f"{column}.npy", np.asarray(arr))
            _write_meta(staging, self._meta())
            old = None
            if folder.exists():
                old = folder.with_name(f".{folder.name}.old")
                if old.exists():
                    shutil.rmtree(old)
                os.replace(folder, old)
            os.replace(staging, folder)
            if old is not None:
                shutil.rmtree(old)
        finally:
            if staging.exists():
                shutil.rmtree(staging)
        return folder

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "ScoreStore":
        """A store saved with ``save``, read into memory."""
        folder = Path(path)
        meta_file = folder / _META
        if not meta_file.exists():
            raise ValueError(f"{folder} holds no ScoreStore (no {_META})")
        return cls._from_folder(folder, json.loads(meta_file.read_text()), mmap=False)

    # -- writes --------------------------------------------------------------------------
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
        repeated index keeps its last value. Scores are kept in the store's dtype
        (float32 by default: rounded to 7 digits).
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
        stamp = self.current_epoch if epoch is None else int(epoch)
        if not -1 <= stamp <= _MAX_EPOCH:
            raise ValueError(f"epoch {stamp} does not fit the store's int32 epoch stamp")
        if self.dtype == np.float32 and np.abs(loss).max(initial=0.0) > np.finfo(np.float32).max:
            raise ValueError("a loss too large for the float32 store: use ScoreStore(..., dtype='float64')")
        self.loss[idx] = loss  # everything checked: nothing is half-written
        if norms is not None:
            self.grad_norm[idx] = norms
        self.scored_epoch[idx] = stamp
        self.version += 1

    def set_reference(self, losses: ArrayLike, indices: Optional[ArrayLike] = None) -> None:
        """Record reference losses: ``losses`` for ``indices`` (default: the whole dataset, in index order).

        The reference column is made at the first call (NaN where none is set). Raises ``ValueError`` on a length
        that does not fit, an index out of range, or an infinite or NaN loss (a sample without a reference is left
        out of ``indices``, not given NaN).
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
        if self.reference is None:
            self.reference = (np.full(len(self), np.nan, dtype=self.dtype) if self.path is None else
                              _new(self.path / "reference.npy", len(self), self.dtype, np.nan))
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
        self.scored_epoch[:] = epochs[winner, cols].astype(np.int32)
        self.loss[:] = losses[winner, cols]
        self.grad_norm[:] = norms[winner, cols]
        self.version += 1

    # -- checkpoints ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Copies of the columns (CPU tensors) and the epoch counter: loads with ``torch.load(weights_only=True)``.

        For a store too large to copy into a checkpoint, ``save(path)`` instead."""
        return {"version": STATE_VERSION, "num_samples": len(self), "dtype": self.dtype.name,
                "loss": torch.from_numpy(np.array(self.loss)),
                "grad_norm": torch.from_numpy(np.array(self.grad_norm)),
                "reference": None if self.reference is None else torch.from_numpy(np.array(self.reference)),
                "scored_epoch": torch.from_numpy(np.array(self.scored_epoch)), "current_epoch": self.current_epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict()``: checked first (dataset size, shapes, dtypes), then set; nothing half-loaded.

        Older states (float64 columns, an int64 epoch stamp, an all-NaN reference) load into this store's dtypes.
        Reference losses the state does not hold (a version-1 state, or samples it saved as NaN) keep the
        store's own, so a store given ``set_reference`` before loading an older checkpoint keeps them.
        """
        kind = "ScoreStore"
        require(state, ["loss", "grad_norm", "scored_epoch", "current_epoch"], kind)
        check_version(state, kind, (0, 1, 2, STATE_VERSION), legacy=0)
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
        if epochs.size and epochs.max() > _MAX_EPOCH:
            raise ValueError(f"{kind} state field 'scored_epoch' holds an epoch past the int32 stamp")
        reference = self.reference  # a state without reference losses keeps the store's own (set_reference)
        if state.get("reference") is not None:  # version 2 on; NaN where it had none
            saved = read_array(state["reference"], "reference", kind, n)
            if np.isinf(saved).any():
                raise ValueError(f"{kind} state field 'reference' holds infinite losses")
            if not np.isnan(saved).all() or reference is not None:
                mine = reference if reference is not None else np.full(n, np.nan)
                reference = np.where(np.isnan(saved), mine, saved).astype(self.dtype)
        self.loss[:] = loss
        self.grad_norm[:] = norms
        self.scored_epoch[:] = epochs
        if reference is not None and reference is not self.reference:
            if self.reference is None and self.path is not None:
                self.reference = _new(self.path / "reference.npy", n, self.dtype, np.nan)
            if self.reference is None:
                self.reference = reference
            else:
                self.reference[:] = reference
        self.current_epoch = current
        self.version += 1

    def __repr__(self) -> str:
        scored = int(self.scored().sum())
        where = f", path={str(self.path)!r}" if self.path is not None else ""
        return (f"ScoreStore(num_samples={len(self)}, scored={scored}, current_epoch={self.current_epoch}, "
                f"dtype={self.dtype.name}{where})")


def _new(file: Path, n: int, dtype: Any, fill: float) -> np.memmap:
    """A new memory-mapped ``.npy`` column of ``n`` values, filled."""
    arr = np.lib.format.open_memmap(file, mode="w+", dtype=dtype, shape=(n,))
    chunk = 1 << 24  # filled in pieces: a column beyond memory is never held at once
    for start in range(0, n, chunk):
        arr[start:start + chunk] = fill
    return arr


def _write_meta(folder: Path, meta: dict[str, Any]) -> None:
    tmp = folder / f".{_META}.tmp"
    tmp.write_text(json.dumps(meta))
    os.replace(tmp, folder / _META)
