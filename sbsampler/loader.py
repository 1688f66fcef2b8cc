"""``SelectiveLoader``: wrap any loader so that it yields weighted sub-batches.

This object is configuration and bookkeeping: what to wrap, how to score and
select, which epoch comes next, the counters, and the resume state. Iterating it
returns an ``EpochIterator`` (``sbsampler.epoch``) that owns one epoch's moving
state, as torch's ``DataLoader`` returns a ``_BaseDataLoaderIter``.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable, Iterator
from typing import Any, Optional, Union

import torch

from .batch import BatchKeys, adapt_loader
from .checkpoint import check_version, is_int, read_array, read_int, read_number, require, safe_state
from .replica import Replica
from .wrapped import read_wrapped, restore_wrapped, save_wrapped
from .distributed import LocalSync, RankSync, is_sharded, resolve_sync
from .epoch import EpochIterator
from .hook import ScoringHook
from .schedule import in_window
from .scores import NAN_POLICIES, check_nan_policy
from .select import SELECT_ON
from .stats import LoaderStats, read_stats
from .store import ScoreStore
from .strategies import Seed, Strategy, budget, get_strategy, resolve_fraction

__all__ = ["SelectiveLoader"]

#: version of the layout of ``SelectiveLoader.state_dict()``
STATE_VERSION = 6
# version 2 had no "wrapped" entry; up to 3, NumPy arrays where 4 has tensors; up to 4, "drawn" counted the picks
# made (5: the picks expected, a float), "carried" was None between epochs and no "dataset_size"/"batches" was saved
READABLE_VERSIONS = (2, 3, 4, 5, 6)  # 6: the stats time each step with its rows (steps_timed)


class SelectiveLoader:
    """Wraps a loader of ``(inputs, targets[, indices])`` batches and yields ``SubBatch``es.

    Per batch: one scoring forward (``hook.score``), one selection
    (``strategy.select``), one gather on the batch's own device; the step is
    ``sbsampler.select_batch``, the epoch's loop ``sbsampler.epoch.EpochIterator``.

    Args:
        loader: any re-iterable of batches: a ``torch.utils.data.DataLoader``,
            an ``ffcv.loader.Loader`` over a ``.beton`` with an ``"index"`` field
            (see ``sbsampler.ffcv``), or anything yielding
            ``(inputs, targets[, indices, *extras])`` tuples or dicts with
            ``"inputs"``, ``"targets"`` (and ``"indices"``) keys; other fields
            travel in ``SubBatch.extras``.
        hook: the ``ScoringHook`` on the model being trained.
        strategy: a ``Strategy`` object or a name: ``"uniform"`` (default),
            ``"topk"``, ``"sb"``, ``"gradmatch"``, ``"importance"``,
            ``"infobatch"``, or ``"full"`` (also ``None``: every sample, no
            scoring pass, i.e. full backprop through the same loop).
        fraction: share of each batch to back-propagate, in (0, 1]; the
            sub-batch size is ``ceil(fraction * B)``. Default (``None``): 0.25 for
            a rule whose count follows it; a rule that chooses its own count
            (InfoBatch, Bernoulli SB: ``Strategy.uses_fraction``) or keeps every
            sample refuses one (it would be ignored).
        rebatch: accumulate selected samples until a full batch of
            ``batch_size`` is ready (Jiang et al.'s queue); the remainder at
            epoch end is yielded too, unless ``drop_last``.
        start: the selective window as shares of training (``epochs``), from ``start`` to ``end``:
            batch ``j`` of epoch ``e`` (both 0-based, ``n`` batches an epoch) is
            selective when ``start <= (e + j / n) / epochs < end``, as Composer
            decides per batch (per epoch when the wrapped loader has no length);
            outside it whole batches pass through with weights ``1/B``, unscored.
        end: the window's end (see ``start``).
        epochs: total epochs, needed when ``start``/``end`` are set.
        batch_keys: where dict batches keep inputs, targets and indices
            (``sbsampler.BatchKeys``; ``BatchKeys(inputs=None, targets="labels")``
            for a HuggingFace batch, whose other keys become the inputs).
        prime: the first ``prime`` epochs train on every sample (whole batches,
            weights ``1/B``, unscored), as Jiang et al.'s code primes the network
            with one epoch of full backprop (``num_images_to_prime``) before
            selecting; ``0`` (default): select from the first batch.
        interrupt: Composer's interrupt: inside the window, every
            ``interrupt``-th batch of an epoch is a full batch (weights ``1/B``,
            unscored; with ``rebatch`` its own step). ``0``: never.
        device: move each batch there before scoring (``None``: leave it).
        nan_policy: non-finite losses: ``"raise"`` (``ValueError``),
            ``"skip"`` (left out of the step, counted in ``stats.samples_skipped``)
            or ``"keep"`` (stay candidates, scored as the batch's largest
            finite loss with zero gradient information). A strategy that runs
            no scoring pass (``"uniform"`` without a ``store``; ``"full"`` and the
            window's full batches) shows it no loss: nothing is checked there,
            ``"skip"`` is refused, and the step's own loss can be checked with
            ``weighted_loss(losses, batch.weights, indices=batch.indices)``.
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
        sync_history: under ``distributed``, share a loss history (SelectiveBackprop's)
            across ranks: each round's losses are all-gathered, so every rank
            holds the same, global history; ``False`` keeps one history per rank.
        store: a ``ScoreStore`` that records every scored sample's loss and
            last-layer gradient norm (by dataset index, stamped with the epoch),
            for a ``SelectiveSampler`` to choose from later.
        batch_fields: keys of extra fields (dict keys, or tuple positions 3,
            4, ...) that belong to the whole batch and pass through ungathered.
            Every other tensor, array or list field is per-sample and must have
            one row per sample (``sbsampler.batch.parse_batch``).
        select_on: where the strategy chooses: ``"auto"`` (default: with torch ops
            on the batch's device when that is an accelerator and the strategy has
            an on-device rule, so a GPU batch is selected with no host round trip;
            on the host otherwise), ``"host"`` (NumPy/Numba always) or ``"device"``
            (torch ops, on the CPU too). The two paths follow the same law from
            different random streams (``sbsampler.select``). On a GPU, a
            ``nan_policy="raise"`` or label error is then raised a batch or two
            after the batch it names, at the latest when the epoch ends.
        lookahead: prepare up to this many steps ahead of the training loop, in
            a background thread (on CUDA, a side stream): step ``p`` is scored
            by a copy of the model holding the parameters after ``max(0, p -
            lookahead)`` steps of the epoch, one version per batch, whatever the
            timing (``sbsampler.lookahead``). ``0`` (default): in series, with
            the parameters as they are. Not under DDP yet.
        sharded: the model's forward runs collectives (FSDP2 ``fully_shard``,
            FSDP1, DeepSpeed ZeRO-3 gather parameters in it), so under
            ``distributed`` every rank runs each round's scoring forward or none
            does (a rank with nothing to score scores a stand-in, thrown away;
            one more all-reduce of three integers a round). ``None`` (default):
            detected from FSDP modules and DeepSpeed parameters in the hooked model.

    Epochs: ``next_epoch`` is the epoch the next ``iter(loader)`` runs; it
    advances by one when an epoch starts, and ``set_epoch`` sets it.

    Resume: ``state_dict()`` between two steps captures the epoch, the position
    in it, the strategy's state (RNG, loss history), the counters and the
    rebatching queue as dataset indices; ``load_state_dict()`` on a fresh
    loader continues the interrupted epoch exactly, provided the wrapped loader
    replays the same batch order (seed it; call ``sampler.set_epoch(loader.next_epoch)``
    as usual). The batches already consumed are read again and skipped, unscored.
    """

    def __init__(
        self,
        loader: Iterable,
        hook: ScoringHook,
        strategy: Union[None, str, Strategy] = "uniform",
        fraction: Optional[float] = None,
        rebatch: bool = False,
        start: float = 0.0,
        end: float = 1.0,
        epochs: Optional[int] = None,
        device: Union[None, str, torch.device] = None,
        nan_policy: str = "raise",
        batch_size: Optional[int] = None,
        drop_last: bool = False,
        seed: Seed = None,
        distributed: Union[None, bool, RankSync, LocalSync] = None,
        sync_history: bool = False,
        store: Optional[ScoreStore] = None,
        batch_fields: Iterable = (),
        interrupt: int = 0,
        batch_keys: BatchKeys = BatchKeys(),
        select_on: str = "auto",
        lookahead: int = 0,
        sharded: Optional[bool] = None,
        prime: int = 0,
    ) -> None:
        if not isinstance(hook, ScoringHook):
            raise TypeError(f"hook must be a ScoringHook, got {type(hook).__name__}")
        if not (0.0 <= start <= end <= 1.0):
            raise ValueError(f"need 0 <= start <= end <= 1, got start={start}, end={end}")
        if (start, end) != (0.0, 1.0) and not (isinstance(epochs, int) and epochs >= 1):
            raise ValueError(f"start/end are fractions of the training epochs: pass epochs= (got {epochs!r})")
        if nan_policy not in NAN_POLICIES:
            raise ValueError(f"nan_policy must be one of {NAN_POLICIES}, got {nan_policy!r}")
        if select_on not in SELECT_ON:
            raise ValueError(f"select_on must be one of {SELECT_ON}, got {select_on!r}")
        if isinstance(interrupt, bool) or not isinstance(interrupt, int) or interrupt < 0:
            raise ValueError(f"interrupt must be an int >= 0 (0: never), got {interrupt!r}")
        if not is_int(prime) or prime < 0:
            raise ValueError(f"prime must be an int >= 0 (epochs of full backprop first; 0: none), got {prime!r}")
        if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if not is_int(lookahead) or lookahead < 0:
            raise ValueError(f"lookahead must be an int >= 0 (0: in series), got {lookahead!r}")
        if isinstance(loader, Iterator):
            raise TypeError(
                f"the wrapped loader is a one-shot iterator ({type(loader).__name__}): it would be empty after the "
                "first epoch. Pass a re-iterable (a DataLoader, an FFCV Loader, a list of batches, or an object "
                "whose __iter__ starts over)"
            )
        if store is not None and not isinstance(store, ScoreStore):
            raise TypeError(f"store must be a ScoreStore, got {type(store).__name__}")
        self.loader = adapt_loader(loader)
        self.hook = hook
        self.strategy = get_strategy(strategy, seed=seed)
        check_nan_policy(nan_policy, self.strategy, scored=store is not None)
        self.fraction = resolve_fraction(fraction, self.strategy)
        size = self.dataset_size()
        if size is not None:
            self.strategy.check_dataset_size(size)
        self.rebatch = bool(rebatch)
        self.start, self.end = float(start), float(end)
        self.epochs = epochs
        self.interrupt = interrupt
        self.prime = prime
        self.device = torch.device(device) if device is not None else None
        self.nan_policy = nan_policy
        self.select_on = select_on
        self.batch_size = batch_size if batch_size is not None else getattr(self.loader, "batch_size", None)
        self.drop_last = bool(drop_last)
        self.sync = resolve_sync(distributed)
        self.sync_history = bool(sync_history)
        if self.sync_history:
            if self.sync.world_size < 2:
                raise ValueError("sync_history=True needs a distributed job (torch.distributed initialised, 2+ ranks)")
            if not self.strategy.keeps_history:
                raise ValueError(f"sync_history=True needs a strategy with a loss history, got {self.strategy!r}")
        if lookahead and self.sync.world_size > 1:
            raise ValueError(
                "lookahead is not supported under DDP yet: the ranks' agreement would run collectives from the "
                "look-ahead thread beside DDP's own. Use lookahead=0")
        if lookahead and hook.forward is not None:
            hook.replicate(hook.model)  # raises: a forward= callable runs the live model
        self.lookahead = lookahead
        if sharded is not None and not isinstance(sharded, bool):
            raise TypeError(f"sharded must be None or a bool, got {type(sharded).__name__}")
        self.sharded = self.sync.world_size > 1 and (is_sharded(hook.model) if sharded is None else sharded)
        self._replica: Optional[Replica] = None  # the look-ahead's copy of the model, made at its first epoch
        self.store = store
        self.batch_fields = frozenset(batch_fields)
        if not isinstance(batch_keys, BatchKeys):
            raise TypeError(f"batch_keys must be a sbsampler.BatchKeys, got {type(batch_keys).__name__}")
        self.batch_keys = batch_keys
        self.next_epoch = 0
        self.stats = LoaderStats()
        self._running: Optional[EpochIterator] = None  # the epoch being iterated (or broken off)
        self.epoch_lock = threading.Lock()  # held while an epoch starts: two threads cannot both claim one
        self._resume: Optional[dict[str, Any]] = None  # a loaded mid-epoch state, until the next iteration
        self._samples_per_pick: Optional[float] = None  # of the last epoch that drew before _running (or loaded)

    # -- configuration ------------------------------------------------------------
    @classmethod
    def composer(cls, loader: Iterable, hook: ScoringHook, epochs: int, keep: float = 0.5, start: float = 0.5,
                 end: float = 0.9, interrupt: int = 2, **kwargs: Any) -> "SelectiveLoader":
        """MosaicML Composer's Selective Backprop, with its defaults.

        The ``"composer"`` rule (``ComposerRule``) at ``fraction=keep``, between
        ``start`` and ``end`` of training decided per batch, with every
        ``interrupt``-th batch a full one (Composer's ``SelectiveBackprop``
        algorithm: keep 0.5, start 0.5, end 0.9, interrupt 2). Other keyword
        arguments go to ``SelectiveLoader``.
        """
        return cls(loader, hook, "composer", fraction=keep, start=start, end=end, epochs=epochs,
                   interrupt=interrupt, **kwargs)

    @classmethod
    def selective_backprop(cls, loader: Iterable, hook: ScoringHook, fraction: Optional[float] = None, *,
                           beta: Optional[float] = None, prime: int = 1, history: int = 1024, seed: Seed = None,
                           **kwargs: Any) -> "SelectiveLoader":
        """Selective Backprop as Jiang et al.'s code runs it (``angelajiang/SelectiveBackprop``).

        One epoch of full backprop first (``prime``; their ``num_images_to_prime`` is the
        training set), then the kept rows queued into full batches before each step
        (``rebatch=True``, their ``get_batch``), ranking each loss against the last ``history``
        (their ``max_history_len``). The rule: without ``fraction``, theirs, each sample kept
        with probability ``CDF(loss) ** beta`` (``SelectiveBackprop(mode="bernoulli")``, ``beta``
        default 3, their ``prob_pow``: about a quarter kept); with ``fraction``, exactly
        ``ceil(fraction B)`` drawn by those probabilities (``mode="fixed"``, ``beta`` default 1),
        for comparisons at an equal budget.

        Steps of the picked rows alone can kill a fresh network's ReLUs: on digits at lr 0.05,
        ``"sb"`` at 0.25 collapsed in 3 of 5 seeds in series and 5 of 5 one step stale
        (``lookahead=1``); rebatched and primed, 0 of 5 both ways. Their own rule
        (Bernoulli, beta 3) is more selective and collapsed in 3 of 5 one step stale
        (``benchmarks/sb_recipe.py``). Other keyword arguments go to ``SelectiveLoader``
        (``batch_size``, ``lookahead``, ...).
        """
        from .strategies import SelectiveBackprop

        kwargs.setdefault("rebatch", True)
        if fraction is None:
            strategy = SelectiveBackprop(beta=3.0 if beta is None else beta, history=history, mode="bernoulli",
                                         seed=seed)
        else:
            strategy = SelectiveBackprop(beta=1.0 if beta is None else beta, history=history, seed=seed)
        return cls(loader, hook, strategy, fraction=fraction, prime=prime, **kwargs)

    def is_selective(self, epoch: Optional[int] = None) -> bool:
        """Whether any batch of ``epoch`` (default: the next one) selects."""
        e = self.next_epoch if epoch is None else epoch
        if self.interrupt == 1 or e < self.prime:
            return False
        if self.epochs is None:
            return True
        if self.batches_per_epoch() is None:  # per epoch: the epoch's start decides
            return in_window(e / self.epochs, self.start, self.end)
        return self.start * self.epochs < e + 1 and e < self.end * self.epochs

    def selects(self, epoch: int, batch: int, batches: Optional[int]) -> bool:
        """Whether batch ``batch`` (0-based) of ``epoch``, one of ``batches``, selects (prime, window and interrupt)."""
        if epoch < self.prime or (self.interrupt and (batch + 1) % self.interrupt == 0):
            return False
        if self.epochs is None:
            return True
        progress = (epoch + (batch / batches if batches else 0.0)) / self.epochs
        return in_window(progress, self.start, self.end)

    def batches_per_epoch(self) -> Optional[int]:
        """``len()`` of the wrapped loader, or ``None`` if it has none."""
        try:
            return len(self.loader)  # type: ignore[arg-type]
        except TypeError:
            return None

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch that the next iteration runs (it then advances by one)."""
        epoch = int(epoch)
        if self._resume is not None and epoch != self._resume["epoch"]:
            raise ValueError(
                f"a state saved in the middle of epoch {self._resume['epoch']} is loaded; the next iteration "
                f"finishes that epoch, so set_epoch({epoch}) would skip it (load a state saved between epochs)"
            )
        self.next_epoch = epoch

    @property
    def progress(self) -> float:
        """Epochs of training done: ``epoch + wrapped batches consumed / batches per epoch``.

        During a step, the batches consumed include those that made it; between
        epochs it is ``next_epoch``. For per-iteration schedules
        (``sbsampler.schedule.progress_lr``), whatever each epoch's number of steps.

        Raises:
            TypeError: mid-epoch, when the wrapped loader has no ``len()``.
        """
        running = self._running
        if running is None or running.finished or running.epoch is None:
            return float(self.next_epoch)
        n = self.batches_per_epoch()
        if not n:
            raise TypeError("progress within an epoch needs the wrapped loader's len(); it has none")
        return running.epoch + running.consumed_position / n

    @property
    def current_iterator(self) -> Optional[EpochIterator]:
        """The epoch iterator that started last (running, broken off or finished), or ``None``."""
        return self._running

    @property
    def current_epoch(self) -> Optional[int]:
        """The epoch being iterated, or ``None`` between epochs."""
        running = self._running
        return running.epoch if running is not None and not running.finished else None

    def __len__(self) -> int:
        """Sub-batches the next epoch yields; exact for fixed-count strategies on one process."""
        n_batches = len(self.loader)  # type: ignore[arg-type]
        if not self.is_selective() or self.strategy.keeps_all or not self.rebatch:
            return n_batches
        if self.strategy.variable_count:
            raise TypeError(f"{self.strategy!r} selects a variable count: the rebatched length is not known ahead")
        sizes = self._batch_sizes(n_batches)
        if sizes is None or self.batch_size is None:
            raise TypeError("cannot tell the rebatched length: the wrapped loader has no dataset/batch_size")
        chosen = [self.selects(self.next_epoch, j, n_batches) for j in range(len(sizes))]
        total = sum(budget(self.fraction, b) for b, c in zip(sizes, chosen) if c)  # type: ignore[arg-type]
        whole = chosen.count(False)  # full batches outside the window or interrupting it: a step each
        return whole + (total // self.batch_size if self.drop_last else math.ceil(total / self.batch_size))

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

    # -- iteration ------------------------------------------------------------------
    def __iter__(self) -> EpochIterator:
        """The next epoch's iterator; the epoch starts when its first step is asked for."""
        return EpochIterator(self)

    def begin_epoch(self, iterator: EpochIterator) -> tuple[int, Optional[dict[str, Any]]]:
        """Called by an ``EpochIterator`` at its first step: ``(the epoch it runs, the state to resume or None)``.

        The epoch is ``next_epoch`` (which then advances), or the one a loaded
        mid-epoch state was saved in. An epoch broken off before (``break`` or an
        exception) has its queued samples counted in ``stats.samples_abandoned``.
        """
        running = self._running
        if running is not None and not running.finished:
            running.close()  # a look-ahead thread stops (its steps not taken count as abandoned)
            self.stats.samples_abandoned += running.queued()
        self._samples_per_pick = self.samples_per_pick()
        resume, self._resume = self._resume, None
        epoch = self.next_epoch if resume is None else int(resume["epoch"])
        self.next_epoch = epoch + 1
        self._running = iterator
        return epoch, resume

    def replica(self) -> Replica:
        """The look-ahead's copy of the model, made at first use, refreshed from the live model now."""
        if self._replica is None:
            self._replica = Replica(self.hook)
        self._replica.refresh()
        return self._replica

    def samples_per_pick(self) -> Any:
        """Candidates per expected pick of the last epoch that drew (``None`` before any).

        What the next epoch's rebatched rows of a variable-count rule are weighted
        against (``sbsampler.weights``). A number, or a 0-d tensor on the device where
        the rule chose on it.
        """
        running = self._running
        ratio = running.samples_per_pick() if running is not None else None
        return ratio if ratio is not None else self._samples_per_pick

    # -- copies ---------------------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        """What ``pickle`` and ``copy.deepcopy`` copy: everything but the running epoch's generator.

        The copy goes on as the original would: its next epoch reads the samples per pick
        of the one before; a copy made in the middle of an epoch finishes that epoch from
        where it stands at its next iteration, as a loaded ``state_dict()`` does.
        """
        state = self.__dict__.copy()
        del state["epoch_lock"]
        running = state["_running"]
        state["_running"] = state["_replica"] = None  # the replica is made again from the copy's model
        ratio = self.samples_per_pick()
        state["_samples_per_pick"] = float(ratio) if ratio is not None else None
        if running is not None and not running.finished and running.epoch is not None:
            resume = self._read_resume(safe_state(running.state_dict()), "SelectiveLoader")
            state.update(_resume=resume, next_epoch=resume["epoch"], _samples_per_pick=resume["carried"])
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.epoch_lock = threading.Lock()

    # -- resume ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue where the last yielded step left off.

        Plain Python values and CPU tensors (``torch.save``-able, loads with
        ``torch.load(weights_only=True)``): the next epoch, the strategy's
        ``state_dict``, the counters and, in the middle of an epoch, that epoch,
        the number of wrapped batches it consumed and the queued samples as
        (batch ordinal, rows, dataset indices, multipliers, samples per pick).
        """
        if self._resume is not None:  # loaded (or copied) mid-epoch, not iterated yet: the state it stands for, with
            # the next epoch counted as the running epoch's original counts it (the one after the epoch it finishes)
            return self._saved({**self._resume, "in_epoch": True}, next_epoch=self._resume["epoch"] + 1)
        running = self._running
        in_epoch = running is not None and not running.finished
        ratio = self.samples_per_pick()
        epoch_state = running.state_dict() if in_epoch else {"epoch": None, "position": 0, "queue": [],
                                                             "pending": [], "drawn": [0, 0.0],
                                                             "carried": None if ratio is None else float(ratio),
                                                             "wrapped": save_wrapped(self.loader, iterating=False)}
        return self._saved({"in_epoch": in_epoch, **epoch_state})

    def dataset_size(self) -> Optional[int]:
        """Samples the wrapped loader reads an epoch, as far as it says (its dataset's or sampler's length), else
        ``None``."""
        sampler = getattr(self.loader, "sampler", None)
        for source in (sampler, getattr(self.loader, "dataset", None)):
            try:
                return len(source)  # type: ignore[arg-type]
            except TypeError:
                continue
        n = getattr(self.loader, "num_samples", None)
        return n if is_int(n) else None

    def _saved(self, epoch_state: dict[str, Any], next_epoch: Optional[int] = None) -> dict[str, Any]:
        return safe_state({
            "version": STATE_VERSION,
            "next_epoch": self.next_epoch if next_epoch is None else next_epoch,
            "batch_size": self.batch_size,
            "dataset_size": self.dataset_size(),
            "batches": self.batches_per_epoch(),
            "strategy": self.strategy.state_dict(),
            "stats": self.stats.state(),
            **epoch_state,
        })

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict()``; a state saved mid-epoch makes the next iteration finish that epoch.

        The wrapped loader's own state is restored too (``sbsampler.wrapped``): a
        stateful loader's position, an FFCV loader's epoch counter.

        Every field is checked before anything changes (``ValueError`` naming the
        field): the version, the strategy that saved it, the epoch counters, the
        counters in ``stats``, the samples per pick, the dataset size and batches per
        epoch it was saved with (against the wrapped loader's, where both are known),
        the position, and every queue entry's arrays (rows within a wrapped batch,
        finite multipliers, positive samples per pick).
        """
        kind = "SelectiveLoader"
        require(state, ["version", "next_epoch", "batch_size", "strategy", "stats", "in_epoch"], kind)
        check_version(state, kind, READABLE_VERSIONS)
        strategy = self.strategy._read_state(state["strategy"])
        stats = read_stats(state["stats"], kind)
        next_epoch = read_int(state["next_epoch"], "next_epoch", kind)
        batch_size = read_int(state["batch_size"], "batch_size", kind, low=1, none=True)
        carried = read_number(state.get("carried"), "carried", kind, positive=True, none=True)
        in_epoch = state["in_epoch"]
        if not isinstance(in_epoch, bool):
            raise ValueError(f"{kind} state field 'in_epoch' must be a bool, got {in_epoch!r}")
        self._check_source(state, kind)
        resume = self._read_resume(state, kind) if in_epoch else None
        wrapped = read_wrapped(state.get("wrapped"), kind)
        restore_wrapped(self.loader, wrapped)  # the wrapped loader's own load may refuse: before anything of ours
        self.strategy._apply_state(strategy)
        self.batch_size, self.stats, self._running, self._resume = batch_size, stats, None, resume
        self._samples_per_pick = carried
        self.next_epoch = resume["epoch"] if resume is not None else next_epoch

    def _check_source(self, state: dict[str, Any], kind: str) -> None:
        """The dataset size and batches per epoch the state was saved with match the wrapped loader's (where both
        are known): a state of another dataset or batch size would resume at the wrong place, or silently."""
        for key, now in (("dataset_size", self.dataset_size()), ("batches", self.batches_per_epoch())):
            saved = read_int(state.get(key), key, kind, none=True)
            if saved is not None and now is not None and saved != now:
                raise ValueError(f"this {kind} state was saved over a wrapped loader with {key} {saved}, this one has "
                                 f"{now}: it comes from another dataset, shard or batch size")

    def _read_resume(self, state: dict[str, Any], kind: str) -> dict[str, Any]:
        """The mid-epoch part of a loader state, checked: position, draws, every queued entry's arrays and the
        steps made but not taken (a look-ahead's)."""
        require(state, ["epoch", "position", "queue", "drawn", "carried"], kind)
        epoch = read_int(state["epoch"], "epoch", kind)
        position = read_int(state["position"], "position", kind)
        batches = self.batches_per_epoch()
        if batches is not None and position > batches:
            raise ValueError(f"the {kind} state was saved after {position} batches of its epoch, but the wrapped "
                             f"loader has {batches} an epoch: it comes from another dataset or batch size")
        drawn = state["drawn"]
        if not (isinstance(drawn, (list, tuple)) and len(drawn) == 2):
            raise ValueError(f"{kind} state field 'drawn' must be [candidates, expected picks], got {drawn!r}")
        candidates = read_int(drawn[0], "drawn[0]", kind)
        expected = read_number(drawn[1], "drawn[1]", kind, positive=candidates > 0)
        pending = []
        for i, step in enumerate(_read_list(state.get("pending", []), "pending", kind)):
            require(step, ["position", "parts"], f"{kind} pending step")
            at = read_int(step["position"], f"pending[{i}].position", kind)
            if at > position:
                raise ValueError(f"{kind} state field 'pending[{i}].position' is {at}, past the position {position}")
            pending.append({"position": at, "parts": self._read_entries(step["parts"], f"pending[{i}].parts",
                                                                        position, kind)})
            if not pending[-1]["parts"]:
                raise ValueError(f"{kind} state field 'pending[{i}].parts' is empty: a step has rows")
        return {"epoch": epoch, "position": position, "drawn": [candidates, expected],
                "queue": self._read_entries(state["queue"], "queue", position, kind), "pending": pending,
                "carried": read_number(state["carried"], "carried", kind, positive=True, none=True),
                "wrapped": read_wrapped(state.get("wrapped"), kind)}

    def _read_entries(self, entries: Any, name: str, position: int, kind: str) -> list[dict[str, Any]]:
        """Saved rows of wrapped batches (the queue's, or a step's parts), checked: their batch before
        ``position``, rows inside a wrapped batch, dataset indices, finite multipliers, positive samples per pick."""
        rows_below = getattr(self.loader, "batch_size", None)  # a wrapped batch's size, where the loader says
        rows_below = rows_below if is_int(rows_below) and rows_below > 0 else None
        low = None if self.strategy.signed_weights else 0.0
        out = []
        for j, entry in enumerate(_read_list(entries, name, kind)):
            field = f"{name}[{j}]"
            require(entry, ["batch", "rows", "indices", "multipliers", "per_pick"], f"{kind} {name} entry")
            batch = entry["batch"]
            if not (is_int(batch) and 0 <= batch < position):
                raise ValueError(f"{kind} state field '{field}.batch' must be a batch before position {position}, "
                                 f"got {batch!r}")
            rows = read_array(entry["rows"], f"{field}.rows", kind, integer=True, low=0, high=rows_below)
            n = rows.shape[0]
            out.append({
                "batch": batch, "rows": rows,
                "indices": read_array(entry["indices"], f"{field}.indices", kind, n, integer=True),
                "multipliers": read_array(entry["multipliers"], f"{field}.multipliers", kind, n, finite=True,
                                          low=low),
                "per_pick": _positive(read_array(entry["per_pick"], f"{field}.per_pick", kind, n, finite=True),
                                      f"{field}.per_pick", kind)})
        return out

    def __repr__(self) -> str:
        return (
            f"SelectiveLoader(strategy={self.strategy!r}, fraction={self.fraction}, rebatch={self.rebatch}, "
            f"start={self.start}, end={self.end}, epochs={self.epochs}, interrupt={self.interrupt}, "
            f"prime={self.prime}, lookahead={self.lookahead})"
        )


def _read_list(value: Any, name: str, kind: str) -> list:
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{kind} state field {name!r} must be a list, got {type(value).__name__}")
    return list(value)


def _positive(values: Any, name: str, kind: str) -> Any:
    if values.size and values.min() <= 0:
        raise ValueError(f"{kind} state field {name!r} holds {values.min():g}: it must be > 0")
    return values
