"""Sampler-level selection: choose which samples to load from scores remembered earlier.

Per-batch selection (``SelectiveLoader``) still loads and scores every sample.
``SelectiveSampler`` decides, at the start of each epoch, which dataset indices
to load at all, from the losses in a ``ScoreStore`` (Jiang et al.'s StaleSB,
InfoBatch): a pruned sample costs nothing, not even its loading.

Each epoch's ``Plan`` is a pure function of (store, strategy, seed, epoch):

1. in the last ``anneal`` share of the epochs, every sample (multiplier 1);
2. otherwise every sample never scored, or scored ``max_staleness`` or more
   epochs ago, is loaded with multiplier 1 (so its score gets refreshed);
3. the strategy picks among the others from their stored scores
   (``budget(fraction, n)`` of them; InfoBatch and Bernoulli SB choose their own
   count), with an RNG seeded by (seed, epoch). A pick's multiplier is ``w_i n``
   with ``w`` the strategy's weights, so the plan's multipliers add up to the
   dataset size (exactly for the equal-weight rules, in expectation otherwise).

Only strategies that declare ``works_from_stored`` are accepted (not
GradientMatching, which needs the current gradients); ones that declare
``needs_gradients`` read the stored gradient norms.

A plan is frozen when its epoch starts (``__iter__``); until then ``len()``
and ``plan()`` follow the store, so asking for the next epoch's length early
(mid-epoch, or before the last scores are written) never fixes a plan on
incomplete scores, and the epoch in progress keeps its own plan and weights.

``WeightedBatches`` turns the plan's multipliers into each batch's weights with
``sbsampler.weights.step_weights``. Under ``scale="step"`` the plan is one draw of
``len(plan)`` picks standing for the dataset, so a batch's weighted loss estimates
the dataset's mean loss (uniform selection gives plain ``1/b``); under
``scale="epoch"`` (InfoBatch's default, as its official code) a batch's weights are
its multipliers over its length, so a pruned epoch's summed update estimates a
full epoch's.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Optional, Union

import numpy as np
import torch

from .batch import BatchKeys, SubBatch, adapt_loader, parse_batch
from .checkpoint import check_saved_by, check_version, read_array, read_int, require
from .schedule import anneal_start
from .scores import Scores
from .store import ScoreStore
from .strategies import Strategy, count_for, get_strategy, resolve_fraction
from .weights import step_weights

__all__ = ["SelectiveSampler", "WeightedBatches", "Plan"]

#: version of the layout of ``SelectiveSampler.state_dict()`` (a state without one is read as version 0)
STATE_VERSION = 1


@dataclass
class Plan:
    """One epoch's plan, for all ranks.

    Attributes:
        indices: int64 dataset indices to load, in order.
        multipliers: float64, how many samples of the dataset each one stands for.
        per_pick: what the weights divide a multiplier by (``sbsampler.weights``):
            ``dataset_size / len(indices)`` under ``scale="step"``, 1 under
            ``scale="epoch"``.
        dataset_size: the number of samples the plan stands for.
        store_version: the ``ScoreStore.version`` it was drawn from.
    """

    indices: np.ndarray
    multipliers: np.ndarray
    per_pick: float
    dataset_size: int
    store_version: int

    def __post_init__(self) -> None:
        self._by_index: Optional[np.ndarray] = None  # multipliers by dataset index, made at the first lookup

    @property
    def shares(self) -> np.ndarray:
        """``multipliers / per_pick``: a batch's weights are its shares over its length."""
        return self.multipliers / self.per_pick

    def multipliers_for(self, indices: np.ndarray, epoch: Any) -> np.ndarray:
        """Multipliers of dataset ``indices``; raises for an index not in the plan."""
        if self._by_index is None:
            self._by_index = np.full(self.dataset_size, np.nan)
            self._by_index[self.indices] = self.multipliers
        m = self._by_index[indices]
        if np.isnan(m).any():
            raise ValueError(f"indices {indices[np.isnan(m)][:10].tolist()} are not in epoch {epoch}'s plan")
        return m


class SelectiveSampler(torch.utils.data.Sampler):
    """A ``Sampler`` that yields only the dataset indices worth loading this epoch.

    Args:
        store: the ``ScoreStore`` of this dataset.
        strategy: a name or ``Strategy`` that works from stored scores:
            ``"uniform"``, ``"topk"``, ``"sb"`` (its CDF is taken over the
            stored losses it chooses from), ``"importance"`` (needs stored
            gradient norms), ``"infobatch"``. GradientMatching needs the current
            gradients and is refused: use ``SelectiveLoader`` for it.
        fraction: share of the fresh (recently scored) samples to load; default
            0.5. InfoBatch and Bernoulli SB choose their own count and refuse one
            (``resolve_fraction``).
        max_staleness: a sample scored this many epochs ago (or more) is loaded
            again regardless, so its score is refreshed; ``None``: never forced.
        anneal: share of the final epochs that load the full data
            (InfoBatch's annealing, ``1 - delta``): every epoch from
            ``floor(epochs * (1 - anneal))`` on, as the official code; needs ``epochs``.
        epochs: total training epochs (for ``anneal``).
        scale: how far a pruned epoch moves the model. ``"step"``: each
            batch's weights sum to about 1 (its weighted loss estimates the
            dataset's mean loss), so an epoch of fewer steps moves less far.
            ``"epoch"``: a batch's weights are its multipliers over its length
            (no renormalisation), so a pruned epoch's summed update estimates a
            full epoch's, as the official InfoBatch code does. Default: the
            strategy's ``sampler_scale`` (``"epoch"`` for InfoBatch, ``"step"``
            for the others, whose multipliers of ``1 / fraction`` would make
            every step that much larger).
        shuffle: shuffle the plan (seeded by ``seed`` and the epoch).
        seed: seeds the shuffle and the strategy's draw, per epoch.
        num_replicas: with ``rank``, shard the plan for DDP by ``DistributedSampler``'s
            rule (padded by repeats to a multiple of ``num_replicas``, then every
            ``num_replicas``-th index from ``rank``). Every rank must hold the same
            store (``ScoreStore.merge``) so that every rank draws the same plan.
        rank: this process's rank (see ``num_replicas``).
    """

    def __init__(
        self,
        store: ScoreStore,
        strategy: Union[str, Strategy] = "uniform",
        fraction: Optional[float] = None,
        max_staleness: Optional[int] = None,
        anneal: float = 0.0,
        epochs: Optional[int] = None,
        shuffle: bool = True,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        scale: Optional[str] = None,
    ) -> None:
        if not isinstance(store, ScoreStore):
            raise TypeError(f"store must be a ScoreStore, got {type(store).__name__}")
        strategy = get_strategy(strategy)
        if not strategy.works_from_stored:
            raise ValueError(
                f"{strategy!r} needs the current per-sample gradients, which a store does not hold; "
                "select per batch with SelectiveLoader instead"
            )
        fraction = resolve_fraction(fraction, strategy, default=0.5)
        strategy.check_dataset_size(len(store))
        if max_staleness is not None and (not isinstance(max_staleness, int) or max_staleness < 1):
            raise ValueError(f"max_staleness must be None or an int >= 1, got {max_staleness!r}")
        if not 0.0 <= anneal < 1.0:
            raise ValueError(f"anneal must be in [0, 1), got {anneal!r}")
        if anneal and not (isinstance(epochs, int) and epochs >= 1):
            raise ValueError(f"anneal is a share of the training epochs: pass epochs= (got {epochs!r})")
        if not (isinstance(num_replicas, int) and num_replicas >= 1 and 0 <= rank < num_replicas):
            raise ValueError(f"need num_replicas >= 1 and 0 <= rank < num_replicas, got {num_replicas}, {rank}")
        if scale not in (None, "step", "epoch"):
            raise ValueError(f"scale must be 'step' or 'epoch' (or None for the strategy's), got {scale!r}")
        self.store = store
        self.strategy = strategy
        self.scale = scale or strategy.sampler_scale
        self.fraction = fraction
        self.max_staleness = max_staleness
        self.anneal = float(anneal)
        self.epochs = epochs
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.num_replicas, self.rank = num_replicas, rank
        self.epoch = 0
        self.frozen_epoch: Optional[int] = None  # the epoch being iterated: its plan no longer follows the store
        self._plans: dict[int, Plan] = {}

    def set_epoch(self, epoch: int) -> None:
        """The epoch the next ``__iter__``/``__len__`` plans for (also stamps the store's updates)."""
        self.epoch = int(epoch)
        self.store.current_epoch = self.epoch

    def is_annealing(self, epoch: int) -> bool:
        """Whether ``epoch`` lies in the final full-data share."""
        return bool(self.anneal) and epoch >= anneal_start(self.epochs, self.anneal)  # type: ignore[arg-type]

    def plan(self, epoch: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
        """``(indices, shares)`` to load in ``epoch`` (default: the current one), for all ranks.

        ``shares`` are the multipliers relative to the plan's samples per pick
        (``Plan.shares``: 1 for a uniform pick, mean 1 over the plan in
        expectation). Cached, so ``len()`` and ``__iter__`` agree; scores written
        during epoch ``e`` shape the plan of ``e + 1``. The plan of the epoch
        being iterated is frozen; another epoch's is drawn again if the store
        changed since.
        """
        p = self._plan(self.epoch if epoch is None else int(epoch))
        return p.indices, p.shares

    def _plan(self, e: int) -> Plan:
        hit = self._plans.get(e)
        if hit is not None and (e == self.frozen_epoch or hit.store_version == self.store.version):
            return hit
        plan = self._draw(e)
        # keep the epoch in progress and the newest draw, nothing older
        self._plans = {k: v for k, v in self._plans.items() if k == self.frozen_epoch}
        self._plans[e] = plan
        return plan

    def _draw(self, e: int) -> Plan:
        n = len(self.store)
        if self.is_annealing(e):
            idx, mult = np.arange(n), np.ones(n)
        else:
            forced = ~self.store.scored()
            if self.max_staleness is not None:
                forced |= (e - self.store.scored_epoch) >= self.max_staleness
            fresh = np.flatnonzero(~forced)
            idx, mult = np.flatnonzero(forced), np.ones(int(forced.sum()))
            if fresh.size:
                picked, m = self._pick(fresh, e)
                idx, mult = (picked, m) if not idx.size else (np.concatenate([idx, picked]), np.concatenate([mult, m]))
        if self.shuffle:
            order = np.random.default_rng([self.seed, e, 0]).permutation(idx.size)
            idx, mult = idx[order], mult[order]
        return Plan(idx, mult, self._per_pick(n, idx.size), n, self.store.version)

    def _per_pick(self, n: int, picks: int) -> float:
        return n / max(picks, 1) if self.scale == "step" else 1.0

    def _pick(self, fresh: np.ndarray, e: int) -> tuple[np.ndarray, np.ndarray]:
        """The strategy's picks among the ``fresh`` indices and their multipliers."""
        norms = None
        if self.strategy.needs_gradients:
            norms = self.store.grad_norm[fresh]
            if not np.isfinite(norms).all():
                raise ValueError(
                    f"{self.strategy!r} needs stored gradient norms; write them with "
                    "store.update(indices, losses, grad_norms) or SelectiveLoader(store=...)"
                )
            norms = torch.from_numpy(norms)
        scores = Scores.from_stored(torch.from_numpy(self.store.loss[fresh]), norms)
        if self.strategy.needs_reference:  # RhoLoss: the stored loss against each sample's reference loss
            scores = scores.with_reference(self.strategy.reference_for(fresh))
        rng = np.random.default_rng([self.seed, e, 1])
        sel = self.strategy.select(scores, count_for(self.fraction, fresh.size), rng=rng)
        idx, w = sel.indices, sel.weights
        if idx.size > 1 and not bool((idx[1:] > idx[:-1]).all()):  # repeats (sampling with replacement): add up
            w = np.bincount(idx, weights=w.astype(np.float64), minlength=fresh.size)
            idx = np.flatnonzero(np.bincount(idx, minlength=fresh.size))
            w = w[idx]
        return fresh[idx], np.multiply(w, float(fresh.size), dtype=np.float64)

    def _shard(self, idx: np.ndarray) -> np.ndarray:
        """This rank's part of the plan: ``DistributedSampler``'s rule (padded by repeats from the start to a
        multiple of the ranks, then every ``num_replicas``-th from ``rank``), as a strided slice."""
        if self.num_replicas == 1 or idx.size == 0:
            return idx
        total = -(-idx.size // self.num_replicas) * self.num_replicas
        return idx[np.arange(self.rank, total, self.num_replicas) % idx.size]

    def __iter__(self) -> Iterator[int]:
        """This rank's indices of the epoch's plan, as Python ints in chunks (never a list of all of them)."""
        plan = self._plan(self.epoch)
        self.frozen_epoch = self.epoch  # freezes this epoch's plan
        return _ints(self._shard(plan.indices))

    def num_indices(self, epoch: Optional[int] = None) -> int:
        """Indices this rank loads in ``epoch`` (default: the current one); draws the plan if needed."""
        return int(self._shard(self.plan(epoch)[0]).size)

    def __len__(self) -> int:
        """Indices this rank loads in the current epoch (exact: the plan is drawn here if needed)."""
        return self.num_indices()

    def weights_for(self, indices: Union[np.ndarray, torch.Tensor], epoch: Optional[int] = None) -> np.ndarray:
        """Loss weights of one batch of dataset ``indices`` from ``epoch``'s plan (default: the frozen one).

        ``sbsampler.weights.step_weights`` of their multipliers: the batch's
        weighted loss estimates the dataset's mean loss.
        """
        e = self.frozen_epoch if epoch is None else epoch
        plan = self._plan(self.epoch if e is None else int(e))
        idx = np.asarray(indices.cpu().numpy() if isinstance(indices, torch.Tensor) else indices, dtype=np.int64)
        return step_weights(plan.multipliers_for(idx, e), plan.per_pick)

    def state_dict(self) -> dict[str, Any]:
        """The epoch counters and the frozen plan of the epoch in progress (indices and multipliers).

        Save it with the ``ScoreStore``'s: the store changes during an epoch, so
        after a restart the epoch in progress could not be drawn again from it.
        """
        frozen = self._plans.get(self.frozen_epoch) if self.frozen_epoch is not None else None
        return {"version": STATE_VERSION, "num_samples": len(self.store), "strategy": type(self.strategy).__name__,
                "epoch": self.epoch, "frozen_epoch": self.frozen_epoch,
                "plan": None if frozen is None else (torch.from_numpy(frozen.indices.copy()),
                                                     torch.from_numpy(frozen.multipliers.copy()))}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict()``: the epoch in progress keeps the plan it was started with.

        Checked first (dataset size, strategy, the plan's arrays), then set; nothing half-loaded.
        """
        kind = "SelectiveSampler"
        require(state, ["epoch", "frozen_epoch", "plan"], kind)
        check_version(state, kind, (0, STATE_VERSION), legacy=0)
        n = len(self.store)
        if state.get("num_samples", n) != n:
            raise ValueError(f"this SelectiveSampler state planned over {state['num_samples']} samples, this "
                             f"sampler's store holds {n}: it comes from another dataset")
        check_saved_by(state, "strategy", type(self.strategy).__name__, kind)
        epoch = read_int(state["epoch"], "epoch", kind)
        frozen = read_int(state["frozen_epoch"], "frozen_epoch", kind, none=True)
        plans = {}
        if state["plan"] is not None:
            if frozen is None or not isinstance(state["plan"], (list, tuple)) or len(state["plan"]) != 2:
                raise ValueError(f"{kind} state field 'plan' must be (indices, multipliers) of the frozen epoch")
            idx = read_array(state["plan"][0], "plan.indices", kind, integer=True, low=0, high=n)
            mult = read_array(state["plan"][1], "plan.multipliers", kind, idx.shape[0], finite=True, low=0.0)
            plans[frozen] = Plan(idx, mult, self._per_pick(n, idx.size), n, self.store.version)
        self.set_epoch(epoch)
        self.frozen_epoch = frozen
        self._plans = plans

    def __repr__(self) -> str:
        return (f"SelectiveSampler(strategy={self.strategy!r}, fraction={self.fraction}, "
                f"max_staleness={self.max_staleness}, anneal={self.anneal}, scale={self.scale!r})")


def _ints(indices: np.ndarray, chunk: int = 1 << 16) -> Iterator[int]:
    """``indices`` as Python ints, ``chunk`` at a time."""
    for start in range(0, indices.size, chunk):
        yield from indices[start:start + chunk].tolist()


class WeightedBatches:
    """Batches of a loader driven by a ``SelectiveSampler``, as ``SubBatch``es with the plan's weights.

    Works for a ``DataLoader(..., sampler=sampler)`` over ``with_indices(dataset)``
    and for an FFCV ``Loader`` with ``order=sbsampler.ffcv.selective_order(sampler)``
    and an ``index`` field. The weights are looked up in the main process from each
    batch's dataset indices (``SelectiveSampler.weights_for``), so they are right
    with any number of (persistent) workers, which would hold a stale copy of
    anything else.

    Args:
        loader: the wrapped loader.
        sampler: the ``SelectiveSampler`` that orders it.
        batch_fields: keys of extra fields that belong to the whole batch (as in
            ``SelectiveLoader``).
        batch_keys: where dict batches keep their parts (as in ``SelectiveLoader``).
    """

    def __init__(self, loader: Iterable, sampler: SelectiveSampler, batch_fields: Iterable = (),
                 batch_keys: BatchKeys = BatchKeys()) -> None:
        self.loader = adapt_loader(loader)
        self.sampler = sampler
        self.batch_fields = frozenset(batch_fields)
        self.batch_keys = batch_keys
        self._epoch_len: Optional[int] = None
        self._yielded = 0  # steps yielded in the epoch being iterated
        self._check_size()

    @property
    def progress(self) -> float:
        """Epochs of training done: ``epoch + steps yielded / this epoch's len()`` (the sampler's epoch).

        During a step, the steps yielded include it. For per-iteration schedules
        (``sbsampler.schedule.progress_lr``): an epoch's length follows its plan.
        """
        if self._epoch_len is None:
            return float(self.sampler.epoch)
        return self.sampler.epoch + self._yielded / max(self._epoch_len, 1)

    def _check_size(self) -> None:
        """The dataset must be the store's: a larger one would never be fully loaded, a smaller one fail to load."""
        dataset = getattr(self.loader, "dataset", None)
        n = len(dataset) if dataset is not None else getattr(self.loader, "num_samples", None)
        if n is not None and n != len(self.sampler.store):
            raise ValueError(
                f"the loader's dataset has {n} samples but the ScoreStore {len(self.sampler.store)}: the store "
                "must have one entry per dataset index (ScoreStore(len(dataset))); make a new store for a "
                "dataset that changed size"
            )

    def __len__(self) -> int:
        """Batches of the epoch being iterated, else of the next one (from that epoch's plan)."""
        if self._epoch_len is not None:
            return self._epoch_len
        return len(self.loader)  # type: ignore[arg-type]

    def __repr__(self) -> str:
        return f"WeightedBatches({type(self.loader).__name__}, {self.sampler!r})"

    def __iter__(self) -> Iterator[SubBatch]:
        self._check_size()  # datasets can change between epochs
        # FFCV's len() means the *next* epoch once this one has started: remember this one's
        n = len(self)
        try:
            self._epoch_len, self._yielded = n, 0
            for raw in self.loader:
                batch = parse_batch(raw, batch_fields=self.batch_fields, keys=self.batch_keys)
                batch.weights = torch.from_numpy(self.sampler.weights_for(batch.indices)).float().to(
                    batch.weights.device)
                self._yielded += 1
                yield batch
            planned = len(self.sampler.plan()[0])
            if self._yielded == 0 and planned:
                raise RuntimeError(
                    f"epoch {self.sampler.epoch}'s plan holds {planned} samples, but the loader made no batch of them "
                    "(fewer than one batch, with drop_last=True?): the epoch would train on nothing. Use a smaller "
                    "batch size, drop_last=False, or a larger fraction")
        finally:
            self._epoch_len = None
