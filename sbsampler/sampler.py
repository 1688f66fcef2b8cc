"""Sampler-level selection: choose which samples to load from scores remembered earlier.

Per-batch selection (``SelectiveLoader``) still loads and scores every sample.
``SelectiveSampler`` decides, at the start of each epoch, which dataset indices
to load at all, from the losses in a ``ScoreStore`` (Jiang et al.'s StaleSB,
InfoBatch): a pruned sample costs nothing, not even its loading.

Each epoch's *plan* is a pure function of (store, strategy, seed, epoch):

1. in the last ``anneal`` share of the epochs, every sample (weight 1);
2. otherwise every sample never scored, or scored ``max_staleness`` or more
   epochs ago, is loaded with weight 1 (so its score gets refreshed);
3. the strategy picks among the others from their stored scores
   (``budget(fraction, n)`` of them; InfoBatch and Bernoulli SB choose their own
   count). A pick's multiplier is ``w_i * n`` with ``w`` the strategy's
   weights, so the plan's weighted sum estimates the whole dataset's sum.

A plan is frozen when its epoch starts (``__iter__``); until then ``len()``
and ``plan()`` follow the store, so asking for the next epoch's length early
(mid-epoch, or before the last scores are written) never fixes a plan on
incomplete scores, and the epoch in progress keeps its own plan and weights.

Multipliers are normalised to mean 1 over the plan: ``WeightedBatches`` turns
them into ``SubBatch.weights = r_i / len(batch)``, so a batch's weighted loss
estimates the dataset's mean loss (uniform selection gives plain ``1/b``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, Optional, Union

import numpy as np
import torch

from .hook import Scores
from .loader import SubBatch, _as_index_tensor, _split_batch
from .store import ScoreStore
from .strategies import SelectiveBackprop, Strategy, budget, get_strategy

__all__ = ["SelectiveSampler", "WeightedBatches"]

_NEEDS_CURRENT_GRADIENTS = ("gradmatch",)


class SelectiveSampler(torch.utils.data.Sampler):
    """A ``Sampler`` that yields only the dataset indices worth loading this epoch.

    Args:
        store: the ``ScoreStore`` of this dataset.
        strategy: a name or ``Strategy`` that works from stored scores:
            ``"uniform"``, ``"topk"``, ``"sb"`` (its history is the whole
            store when given by name), ``"importance"`` (needs stored gradient
            norms), ``"infobatch"``. GradientMatching needs the current
            gradients and is refused: use ``SelectiveLoader`` for it.
        fraction: share of the fresh (recently scored) samples to load.
        max_staleness: a sample scored this many epochs ago (or more) is loaded
            again regardless, so its score is refreshed; ``None``: never forced.
        anneal: share of the final epochs that load the full data
            (InfoBatch's annealing); needs ``epochs``.
        epochs: total training epochs (for ``anneal``).
        shuffle: shuffle the plan (seeded by ``seed`` and the epoch).
        seed: seeds the shuffle and the strategy, per epoch.
        num_replicas, rank: shard the plan for DDP, as ``DistributedSampler``
            does (the plan is padded by repeats to a multiple of
            ``num_replicas``). Every rank must hold the same store
            (``ScoreStore.merge``) so that every rank draws the same plan.
    """

    def __init__(
        self,
        store: ScoreStore,
        strategy: Union[str, Strategy] = "uniform",
        fraction: float = 0.5,
        max_staleness: Optional[int] = None,
        anneal: float = 0.0,
        epochs: Optional[int] = None,
        shuffle: bool = True,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        if not isinstance(store, ScoreStore):
            raise TypeError(f"store must be a ScoreStore, got {type(store).__name__}")
        by_name = isinstance(strategy, str)
        strategy = get_strategy(strategy)  # names and aliases resolved in one place
        if strategy.name in _NEEDS_CURRENT_GRADIENTS:
            raise ValueError(
                "GradientMatching needs the current per-sample gradients, which a store does not hold; "
                "select per batch with SelectiveLoader instead"
            )
        budget(fraction, 1)
        if max_staleness is not None and (not isinstance(max_staleness, int) or max_staleness < 1):
            raise ValueError(f"max_staleness must be None or an int >= 1, got {max_staleness!r}")
        if not 0.0 <= anneal < 1.0:
            raise ValueError(f"anneal must be in [0, 1), got {anneal!r}")
        if anneal and not (isinstance(epochs, int) and epochs >= 1):
            raise ValueError(f"anneal is a share of the training epochs: pass epochs= (got {epochs!r})")
        if not (isinstance(num_replicas, int) and num_replicas >= 1 and 0 <= rank < num_replicas):
            raise ValueError(f"need num_replicas >= 1 and 0 <= rank < num_replicas, got {num_replicas}, {rank}")
        self.store = store
        if by_name and isinstance(strategy, SelectiveBackprop):
            strategy = SelectiveBackprop(history=len(store))
        self.strategy = strategy
        self.fraction = float(fraction)
        self.max_staleness = max_staleness
        self.anneal = float(anneal)
        self.epochs = epochs
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.num_replicas, self.rank = num_replicas, rank
        self.epoch = 0
        # epoch -> (store version it was drawn from, indices, multipliers, per-index weights)
        self._plans: dict[int, tuple[int, np.ndarray, np.ndarray, np.ndarray]] = {}
        self.active_epoch: Optional[int] = None

    def set_epoch(self, epoch: int) -> None:
        """The epoch the next ``__iter__``/``__len__`` plans for (also stamps the store's updates)."""
        self.epoch = int(epoch)
        self.store.epoch = self.epoch

    def is_annealing(self, epoch: int) -> bool:
        """Whether ``epoch`` lies in the final full-data share."""
        return bool(self.anneal) and epoch >= self.epochs * (1.0 - self.anneal)  # type: ignore[operator]

    def plan(self, epoch: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
        """``(indices, multipliers)`` to load in ``epoch`` (default: the current one), for all ranks.

        Cached, so ``len()`` and ``__iter__`` agree; scores written during epoch
        ``e`` shape the plan of ``e + 1``. The plan of the epoch being iterated is
        frozen; another epoch's is drawn again if the store changed since.
        """
        return self._cached(self.epoch if epoch is None else int(epoch))[1:3]

    def _cached(self, e: int) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
        hit = self._plans.get(e)
        if hit is not None and (e == self.active_epoch or hit[0] == self.store.version):
            return hit
        entry = (self.store.version, *self._draw(e))
        # keep the epoch in progress and the newest draw, nothing older
        self._plans = {k: v for k, v in self._plans.items() if k == self.active_epoch}
        self._plans[e] = entry
        return entry

    def _draw(self, e: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        n = len(self.store)
        if self.is_annealing(e):
            idx, mult = np.arange(n), np.ones(n)
        else:
            forced = ~self.store.scored()
            if self.max_staleness is not None:
                forced |= (e - self.store.seen_epoch) >= self.max_staleness
            fresh = np.flatnonzero(~forced)
            idx, mult = np.flatnonzero(forced), np.ones(int(forced.sum()))
            if fresh.size:
                self.strategy.rng = np.random.default_rng([self.seed, e, 1])
                norms = self.store.grad_norm[fresh]
                if self.strategy.needs_gradients and not np.isfinite(norms).all():
                    raise ValueError(
                        f"{self.strategy!r} needs stored gradient norms; write them with "
                        "store.update(indices, losses, grad_norms) or SelectiveLoader(store=...)"
                    )
                scores = Scores(loss=torch.from_numpy(self.store.loss[fresh]),
                                norms=torch.from_numpy(norms) if self.strategy.needs_gradients else None)
                sel = self.strategy.select(scores, budget(self.fraction, fresh.size))
                picked = np.unique(sel.indices)
                w = np.zeros(fresh.size)
                np.add.at(w, sel.indices, sel.weights.astype(np.float64))  # repeats add up
                idx = np.concatenate([idx, fresh[picked]])
                mult = np.concatenate([mult, w[picked] * fresh.size])
        if self.shuffle:
            order = np.random.default_rng([self.seed, e, 0]).permutation(idx.size)
            idx, mult = idx[order], mult[order]
        mult = mult * (idx.size / mult.sum()) if mult.sum() > 0 else mult
        weights = np.full(n, np.nan)
        weights[idx] = mult
        return idx, mult, weights

    def _shard(self, idx: np.ndarray) -> np.ndarray:
        if self.num_replicas == 1:
            return idx
        total = -(-idx.size // self.num_replicas) * self.num_replicas
        padded = np.resize(idx, total) if idx.size else idx
        return padded[self.rank :: self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        idx, _ = self.plan()
        self.active_epoch = self.epoch  # freezes this epoch's plan
        return iter(self._shard(idx).tolist())

    def num_indices(self, epoch: Optional[int] = None) -> int:
        """Indices this rank loads in ``epoch`` (default: the current one); draws the plan if needed."""
        return int(self._shard(self.plan(epoch)[0]).size)

    def __len__(self) -> int:
        """Indices this rank loads in the current epoch (exact: the plan is drawn here if needed)."""
        return self.num_indices()

    def weights_for(self, indices: Union[np.ndarray, torch.Tensor], epoch: Optional[int] = None) -> np.ndarray:
        """Plan multipliers (mean 1 over the plan) of dataset ``indices`` in ``epoch`` (default: the active one)."""
        e = self.active_epoch if epoch is None else epoch
        weights = self._cached(self.epoch if e is None else int(e))[3]
        idx = np.asarray(indices.cpu().numpy() if isinstance(indices, torch.Tensor) else indices, dtype=np.int64)
        w = weights[idx]
        if np.isnan(w).any():
            raise ValueError(f"indices {idx[np.isnan(w)][:10].tolist()} are not in epoch {e}'s plan")
        return w

    def state_dict(self) -> dict[str, Any]:
        """The epoch counters and the frozen plan of the epoch in progress (indices and multipliers).

        Save it with the ``ScoreStore``'s: the store changes during an epoch, so
        after a restart the epoch in progress could not be drawn again from it.
        """
        active = self._plans.get(self.active_epoch) if self.active_epoch is not None else None
        return {"epoch": self.epoch, "active_epoch": self.active_epoch,
                "plan": None if active is None else (active[1].copy(), active[2].copy())}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict()``: the epoch in progress keeps the plan it was started with."""
        self.set_epoch(state["epoch"])
        self.active_epoch = state["active_epoch"]
        self._plans = {}
        if state["plan"] is not None:
            idx = np.asarray(state["plan"][0], dtype=np.int64)
            mult = np.asarray(state["plan"][1], dtype=np.float64)
            if idx.shape != mult.shape or (idx.size and (idx.min() < 0 or idx.max() >= len(self.store))):
                raise ValueError(f"the saved plan does not fit a store of {len(self.store)} samples")
            weights = np.full(len(self.store), np.nan)
            weights[idx] = mult
            self._plans[self.active_epoch] = (self.store.version, idx, mult, weights)

    def __repr__(self) -> str:
        return (f"SelectiveSampler(strategy={self.strategy!r}, fraction={self.fraction}, "
                f"max_staleness={self.max_staleness}, anneal={self.anneal})")


class WeightedBatches:
    """Batches of a loader driven by a ``SelectiveSampler``, as ``SubBatch``es with the plan's weights.

    Works for a ``DataLoader(..., sampler=sampler)`` over ``with_indices(dataset)``
    and for an FFCV ``Loader`` with ``order=SelectiveOrder(sampler)`` and an
    ``index`` field. The weights are looked up in the main process from each
    batch's dataset indices (``r_i / len(batch)``), so they are right with any
    number of (persistent) workers, which would hold a stale copy of anything else.

    Args:
        loader: the wrapped loader.
        sampler: the ``SelectiveSampler`` that orders it.
    """

    def __init__(self, loader: Iterable, sampler: SelectiveSampler) -> None:
        from .ffcv import FFCVBatches, is_ffcv_loader

        self._ffcv = loader if is_ffcv_loader(loader) else None
        self.loader = FFCVBatches(loader) if self._ffcv is not None else loader
        self.sampler = sampler
        self._epoch_len: Optional[int] = None

    def __len__(self) -> int:
        """Batches of the epoch being iterated, else of the next one (from that epoch's plan)."""
        if self._epoch_len is not None:
            return self._epoch_len
        if self._ffcv is not None:
            from .ffcv import ffcv_epoch_length

            return ffcv_epoch_length(self._ffcv, self.sampler)
        return len(self.loader)  # type: ignore[arg-type]

    def __repr__(self) -> str:
        return f"WeightedBatches({type(self.loader).__name__}, {self.sampler!r})"

    def __iter__(self) -> Iterator[SubBatch]:
        # FFCV's len() means the *next* epoch once this one has started: remember this one's
        n = len(self)
        try:
            self._epoch_len = n
            for batch in self.loader:
                x, y, idx, extras = _split_batch(batch)
                if idx is None:
                    raise ValueError(
                        "WeightedBatches needs dataset indices in each batch: wrap the dataset with_indices"
                    )
                idx = _as_index_tensor(idx, int(x.shape[0]))
                w = torch.from_numpy(self.sampler.weights_for(idx) / max(len(idx), 1)).float()
                yield SubBatch(x, y, w.to(x.device), idx, extras)
        finally:
            self._epoch_len = None
