"""One epoch of a ``SelectiveLoader``: pull, select, queue, agree, yield.

``SelectiveLoader`` holds the configuration; ``iter(loader)`` returns an
``EpochIterator`` that owns one epoch's moving state, as torch's ``DataLoader``
hands out a ``_BaseDataLoaderIter`` and FFCV's ``Loader`` an ``EpochIterator``.

A round is one wrapped batch on every rank:

1. pull the next batch of the wrapped loader (``parse_batch``; stream positions
   as indices when it has none) and move it to the loader's device;
2. ``select_batch`` scores it and lets the epoch's strategy choose (``Full``
   outside the ``start``/``end`` window); the scores go to the ``ScoreStore``, and
   a strategy with a loss history is shown the round's losses (``observe``, via
   an all-gather under ``sync_history``);
3. ranks agree (``sbsampler.distributed``; one process answers itself): without
   rebatching, one step of the largest sub-batch on every rank; with it, the
   chosen rows join a queue and every rank yields as many full batches as the
   slowest has ready. When every rank has run out, the queue's tail is yielded
   (or dropped with ``drop_last``).

Steps shorter than the rank's agreed size are padded with zero-weight repeats
(only ever under DDP). Weights follow ``sbsampler.weights``: a rebatched step
weights each row by its multiplier relative to its own batch's draw.

``state_dict()`` between two steps holds what a fresh iterator needs to continue:
the epoch, the wrapped batches consumed, the queue as (batch ordinal, rows,
dataset indices, multipliers, samples per pick), the epoch's draws so far
(candidates, expected picks) and the samples per pick in force (``carried``); the
consumed batches are read again, unscored, to rebuild the queue.
"""

from __future__ import annotations

import contextlib
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Optional, Protocol, Union

import numpy as np
import torch
from torch import Tensor

from .batch import BatchKeys, SubBatch, parse_batch
from .distributed import LocalSync, RankSync
from .hook import ScoringHook
from .lookahead import Closed, Steps
from .replica import Replica
from .select import Selected, observe_round, select_batch
from .stats import LoaderStats
from .store import ScoreStore
from .strategies import Full, Strategy
from .weights import step_weights
from .wrapped import handoff, is_stateful, save_wrapped

__all__ = ["EpochIterator", "EpochOwner"]


class EpochOwner(Protocol):
    """What an ``EpochIterator`` reads of the loader that made it (a ``SelectiveLoader``): its configuration, its
    counters, and its per-epoch decisions. Written out here so that this module never imports the loader's."""

    loader: Any  # the wrapped loader
    strategy: Strategy
    hook: ScoringHook
    store: Optional[ScoreStore]
    stats: LoaderStats
    fraction: float
    nan_policy: str
    select_on: str
    rebatch: bool
    batch_size: Optional[int]
    drop_last: bool
    device: Optional[torch.device]
    lookahead: int
    sharded: Optional[bool]
    batch_keys: BatchKeys
    batch_fields: tuple
    sync: Union[RankSync, LocalSync]
    sync_history: bool
    current_iterator: Optional["EpochIterator"]
    epoch_lock: Any  # a threading.Lock, held while an epoch starts

    def begin_epoch(self, iterator: "EpochIterator") -> tuple[int, Optional[dict[str, Any]]]:
        """At the first step: ``(the epoch to run, the state to resume or None)``."""

    def samples_per_pick(self) -> Any:
        """Candidates per expected pick of the last epoch that drew."""

    def is_selective(self, epoch: Optional[int] = None) -> bool:
        """Whether any batch of ``epoch`` selects."""

    def selects(self, epoch: int, batch: int, batches: Optional[int]) -> bool:
        """Whether batch ``batch`` of ``epoch`` selects."""

    def batches_per_epoch(self) -> Optional[int]:
        """``len()`` of the wrapped loader, or ``None``."""

    def replica(self) -> Replica:
        """The look-ahead's copy of the model, refreshed."""

_FULL = Full()


@dataclass
class _Queued:
    """Selected rows waiting in the rebatching queue, with where they came from."""

    sub: SubBatch
    ordinal: int  # the wrapped batch of this epoch they came from
    rows: Tensor  # their positions in that batch (where the strategy chose: the CPU or the batch's device)
    multipliers: Tensor  # float64, beside rows: samples of that batch each row stands for
    per_pick: Tensor  # float64, beside rows: samples per pick of that batch's draw, per row

    def split(self, count: int) -> tuple["_Queued", "_Queued"]:
        """The first ``count`` rows and the rest."""
        device = self.rows.device  # positions made where they are used: no copy to a GPU per step
        front, rest = torch.arange(count, device=device), torch.arange(count, len(self.sub), device=device)
        return self._part(front), self._part(rest)

    def _part(self, pos: Tensor) -> "_Queued":
        return _Queued(self.sub.take(pos), self.ordinal, self.rows[pos], self.multipliers[pos], self.per_pick[pos])


def _join(parts: list[_Queued]) -> SubBatch:
    """The queued rows ``parts`` as one step, each weighted against its own draw (``sbsampler.weights``)."""
    out = SubBatch.concat([p.sub for p in parts], same_batch=len({p.ordinal for p in parts}) == 1)
    device = parts[-1].multipliers.device  # rows restored on the CPU may meet rows picked on a GPU
    weights = step_weights(torch.cat([p.multipliers.to(device) for p in parts]),
                           torch.cat([p.per_pick.to(device) for p in parts]))
    out.weights = weights.to(out.weights.device, torch.float32)
    return out


def _entry(q: _Queued) -> dict[str, Any]:
    """A queued piece as a saved entry: the batch it came from, its rows there, their dataset indices, weights."""
    return {
        "batch": q.ordinal,
        "rows": q.rows.to("cpu", torch.int64, copy=True),
        "indices": q.sub.indices.to("cpu", torch.int64, copy=True),
        "multipliers": q.multipliers.to("cpu", torch.float64, copy=True),
        "per_pick": q.per_pick.to("cpu", torch.float64, copy=True),
    }


class EpochIterator:
    """The state and steps of one epoch of a ``SelectiveLoader`` (see the module docstring).

    Args:
        loader: the ``SelectiveLoader`` whose configuration and counters it
            uses; at the first step it tells the iterator which epoch to run
            and any saved state to continue from (``SelectiveLoader.begin_epoch``).
    """

    def __init__(self, loader: EpochOwner) -> None:
        self.loader = loader
        self.sync = loader.sync
        self.history_sync = loader.sync if loader.sync_history else LocalSync()
        self.epoch: Optional[int] = None  # claimed when the first step is asked for
        self.position = 0  # wrapped batches consumed
        self.samples_read = 0  # samples consumed: the indices of a loader that gives none
        self.queue: list[_Queued] = []
        self.finished = False
        self._pad_source: Optional[SubBatch] = None  # the rows a rank with nothing this round repeats
        self._stand_in: Optional[SubBatch] = None  # a sharded model's forward input for a rank with no batch
        self._steps: Optional[Iterator[tuple]] = None  # (step, record) pairs; a lookahead.Steps with look-ahead
        self._last_parts: list = []  # where the rows of the step just made came from (_recorded)
        self._ready: deque = deque()  # steps a resumed epoch yields first, without look-ahead
        self._yielded_at: Optional[float] = None  # when the last step was handed to the loop (its step is timed)
        self._yielded_rows = 0  # and its rows
        self.consumed_position = 0  # wrapped batches consumed by the steps taken so far (what progress reads)
        self._start_error: Optional[BaseException] = None  # reported in the first round, on every rank
        self._drawn: list = [0, 0.0]  # candidates and expected picks of this epoch's draws (see _per_pick)
        self._rho: Any = None  # the samples per pick this epoch's variable-count rows are weighted against
        self._stateful = is_stateful(loader.loader)
        self._snapshots: dict[int, dict[str, Any]] = {}  # a stateful loader's state before each batch still queued
        self._replica: Optional[Replica] = None  # the look-ahead's copy of the model, when it scores

    @property
    def hook(self) -> ScoringHook:
        """The hook this epoch scores with: the look-ahead replica's (made again when the model changes), or the
        loader's."""
        return self._replica.hook if self._replica is not None else self.loader.hook  # type: ignore[return-value]

    def _start(self) -> Iterator[SubBatch]:
        """Claim the epoch from the loader (and any state to resume), open the wrapped loader.

        Nothing happens before the first step is asked for, so an ``iter(loader)``
        that is never consumed (tqdm's, say) neither advances nor breaks an epoch.
        Under the loader's ``epoch_lock``: of two threads starting epochs of one
        loader, the second closes the first's look-ahead once it has started.
        """
        with self.loader.epoch_lock:
            return self._claim()

    def _claim(self) -> Iterator[SubBatch]:
        epoch, resume = self.loader.begin_epoch(self)
        self._rho = self.loader.samples_per_pick()  # the last epoch's (a resumed epoch's own: _fast_forward)
        self.stats = self.loader.stats
        self.epoch = epoch
        self.strategy = self.loader.strategy if self.loader.is_selective(epoch) else _FULL
        self.rebatch = self.loader.rebatch and not self.strategy.keeps_all
        self._batches = self.loader.batches_per_epoch()
        depth = self.loader.lookahead
        scored = self.loader.strategy.needs_scores or self.loader.store is not None
        self._replica = self.loader.replica() if depth and scored else None  # refreshed: version 0 of this epoch
        replica = self._replica
        ready: list = []
        try:
            self._source = iter(self.loader.loader)
            if resume is not None:
                ready = self._fast_forward(resume)
        except Exception as err:  # noqa: BLE001 - raised in the first round, on every rank at once
            self._start_error = err
        produce = self._recorded(self._rebatched() if self.rebatch else self._direct())
        if depth:
            return Steps(produce, replica, self._device(), depth, ready)
        self._ready.extend(ready)
        return produce

    def _device(self) -> Optional[torch.device]:
        """Where the steps are made: the loader's device, else the model's."""
        if self.loader.device is not None:
            return self.loader.device
        first = next(self.loader.hook.model.parameters(), None)
        return first.device if first is not None else None

    def _recorded(self, steps: Iterator[SubBatch]) -> Iterator[tuple]:
        """Each step with its record: where its rows came from, and the wrapped batches consumed by then."""
        for step in steps:
            yield step, (self._last_parts, self.position)

    def __iter__(self) -> "EpochIterator":
        return self

    def __next__(self) -> SubBatch:
        if self._steps is None:
            if self.finished:
                raise StopIteration
            self._steps = self._start()
        elif self.loader.current_iterator is not self and not self.finished:
            raise self._superseded()
        if self._yielded_at is not None:  # the loop's step on the last batch: stats.time_training, steps_timed
            self.stats.record_step(self._yielded_rows, time.perf_counter() - self._yielded_at)
            self._yielded_at = None
        try:
            step, record = self._ready.popleft() if self._ready else next(self._steps)
        except Closed:  # another thread started the next epoch while this one waited for its step
            raise self._superseded() from None
        except StopIteration:
            self.finished = True
            self.stats.warn_if_costly("SelectiveLoader")
            raise
        self.consumed_position = record[1]
        self._yielded_rows = len(step)
        self._yielded_at = time.perf_counter()
        return step

    @contextlib.contextmanager
    def untimed(self) -> Iterator[None]:
        """Time spent inside (an evaluation between two steps) is not counted as the loop's training step
        (``stats.time_training``, ``stats.steps_timed``)."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self._yielded_at is not None:
                self._yielded_at += time.perf_counter() - t0

    def _superseded(self) -> RuntimeError:
        return RuntimeError(
            f"epoch {self.epoch} of this SelectiveLoader was superseded: another iteration of the same loader "
            "started while it was running (two live iterators of one loader, e.g. zip(loader, loader), or two "
            "threads). Finish or break out of one epoch before starting the next; use two loaders to iterate twice "
            "at once")

    def queued(self) -> int:
        """Rows waiting in the rebatching queue."""
        return sum(len(q.sub) for q in self.queue)

    def close(self) -> None:
        """Stop a look-ahead thread (after the step it is producing); steps it made and nobody took are counted
        as abandoned, not yielded. Called when another epoch starts while this one was broken off; a loop that
        breaks off an epoch and starts no other may call it (the thread also ends when the epoch is collected)."""
        if isinstance(self._steps, Steps) and not self._steps.closed:
            self._steps.close()
            for step, _ in self._steps.pending():
                self.stats.samples_yielded -= len(step)
                self.stats.samples_abandoned += len(step)
                self.stats.steps -= 1

    # -- a round ---------------------------------------------------------------------
    def _read(self) -> Optional[SubBatch]:
        """The next wrapped batch, parsed (``None`` at the end of the wrapped loader)."""
        try:
            raw = next(self._source)
        except StopIteration:
            return None
        # Stream positions stand in for missing indices, except where a ScoreStore needs dataset indices.
        indexed = self.loader.store is not None or self.loader.strategy.needs_reference  # dataset indices needed
        batch = parse_batch(raw, None if indexed else self.samples_read, self.loader.batch_fields,
                            self.loader.batch_keys)
        self.samples_read += len(batch)
        return batch

    def _next_batch(self) -> Optional[SubBatch]:
        t0 = time.perf_counter()
        if self._stateful:  # where to hand off to the wrapped loader if a state is saved while this batch is queued
            oldest = self.queue[0].ordinal if self.queue else self.position
            self._snapshots = {k: v for k, v in self._snapshots.items() if k >= oldest}
            self._snapshots[self.position] = self._handoff()
        batch = self._read()
        if batch is None:
            return None
        self.stats.time_loading += time.perf_counter() - t0
        self.position += 1
        self.stats.batches_seen += 1
        self.stats.samples_seen += len(batch)
        return batch.to(self.loader.device)

    def _round(self) -> tuple[Optional[SubBatch], Optional[Selected], Optional[BaseException], Optional[SubBatch]]:
        """Pull and select one batch: ``(the batch or None at the end, what was selected, an error or None,
        a whole batch to step on by itself or None)``.

        The round's strategy is the epoch's, or ``Full`` for a batch outside the window or interrupting
        it (the same decision on every rank: it depends on the batch's position only). An error is
        caught, not raised here: the round's agreement must still run on every rank, so that every
        rank raises together (``_fail``) instead of the others waiting for this one forever.
        """
        selects = self.loader.selects(self.epoch, self.position, self._batches)  # type: ignore[arg-type]
        strategy = self.strategy if selects else _FULL
        batch = picked = None
        error, self._start_error = self._start_error, None
        if error is None:
            try:
                batch = self._next_batch()
                if batch is None:  # this rank's input has run out: wait for its GPU checks still pending
                    self.hook.checks.flush()  # (labels, non-finite losses; an error reaches every rank)
            except Exception as err:  # noqa: BLE001 - reported to every rank, then re-raised
                batch, error = None, err
        scoring = strategy.needs_scores or self.loader.store is not None
        go = True
        if self.loader.sharded:  # every rank runs each scoring forward: its collectives must match up
            go, error = self._score_in_step(batch, error, scoring)
        if error is None and batch is not None and go:
            try:
                picked = self._select(batch, strategy)
            except Exception as err:  # noqa: BLE001 - reported to every rank, then re-raised
                batch, picked, error = None, None, err
        if strategy.keeps_history:  # every rank, every such round: the all-gather must match up
            observe_round(strategy, picked, self.history_sync)
        whole = None
        if picked is not None and picked.sub is not None:
            if self.rebatch and strategy.keeps_all:
                whole = picked.sub  # a full batch inside a rebatched epoch: its own step, not the queue
            else:
                if self.loader.batch_size is None:  # neither given nor on the wrapped loader: the first batch's
                    self.loader.batch_size = len(batch)  # type: ignore[arg-type]
                per_pick = self._per_pick(picked, strategy, len(batch) - picked.skipped)  # type: ignore[arg-type]
                self.queue.append(_Queued(picked.sub, self.position - 1, picked.rows, picked.multipliers, per_pick))
        if picked is not None and strategy.needs_scores:
            self._drawn[0] += len(batch) - picked.skipped  # type: ignore[arg-type]
            self._drawn[1] = self._drawn[1] + picked.expected  # a 0-d tensor on the device path: no host read
        return batch, picked, error, whole

    def _score_in_step(self, batch: Optional[SubBatch], error: Optional[BaseException],
                       scoring: bool) -> tuple[bool, Optional[BaseException]]:
        """Under a sharded model (FSDP), every rank runs the round's scoring forward, or none does.

        A sharded model's forward gathers its parameters from every rank, so a rank that skipped a
        scoring forward (its shard ran out, its loader failed, its batch is outside the window) would
        leave the others waiting inside theirs. The ranks first agree (one all-reduce): if any rank
        failed, nobody scores and every rank raises at the round's agreement; if any rank scores, a rank
        with nothing of its own to score runs the forward on a stand-in (its last batch), whose scores
        are thrown away. Returns ``(whether this rank goes on to select from its own batch, its error)``.
        """
        own = batch is not None and scoring
        stand_in = batch if batch is not None else self._stand_in
        mn, mx = self.sync.min_max([int(own), int(error is not None), int(stand_in is not None)])
        if mx[1]:
            return False, error
        if mx[0] and not mn[2]:  # some rank has nothing to run a forward on: nobody scores, every rank stops
            return False, error or RuntimeError(
                f"rank {self.sync.rank} has no batch to run the scoring forward on beside the other ranks (its "
                "shard is empty): a sharded model (FSDP) needs every rank in every scoring forward; give every "
                "rank at least one batch")
        if mx[0] and not own:
            self.hook.score(stand_in.inputs, stand_in.targets)  # type: ignore[union-attr] - thrown away
        if batch is not None:
            self._stand_in = batch
        return True, error

    def _per_pick(self, picked: Selected, strategy: Strategy, candidates: int) -> Tensor:
        """Samples per pick for each of this draw's rows in the queue (``sbsampler.weights``).

        A fixed-count draw's own ratio ``n / k`` is fixed before it draws, so its rows keep it
        (and a step made of one draw keeps the strategy's weights). A variable-count draw's rows in
        a rebatched epoch are weighted against one ratio for the whole epoch, fixed before the
        epoch's draws: the last epoch's candidates per *expected* pick (or, in the first epoch that
        draws, this first draw's own expected ratio). Its own count is correlated with what it kept,
        and a ratio that changes from batch to batch gives a batch that keeps more rows more of the
        epoch's update: both biased the rebatched estimate (InfoBatch +5%, Bernoulli SB -6% over
        batches whose losses differ).
        """
        m = picked.multipliers
        if not (self.rebatch and strategy.variable_count):
            return torch.full_like(m, picked.per_pick)
        if self._rho is None:
            self._rho = candidates / picked.expected
        if isinstance(self._rho, Tensor):
            return self._rho.to(m.device, m.dtype).expand(m.shape).clone()
        return torch.full_like(m, self._rho)

    def samples_per_pick(self) -> Any:
        """Candidates per expected pick over this epoch's draws so far, or ``None`` before any draw.

        A number, or a 0-d tensor on the device where a variable-count rule chose on it.
        """
        candidates, expected = self._drawn
        return candidates / expected if candidates else None

    def _fail(self, error: Optional[BaseException]) -> None:
        """Every rank raises: this rank's own error, or one naming the rank that failed and why."""
        text = f"{type(error).__name__}: {error}" if error is not None else ""
        codes = np.frombuffer(text.encode()[:4000], dtype=np.uint8).astype(np.float64)
        gathered = self.sync.all_gather_1d(np.concatenate([[codes.size], codes]))
        if error is not None:
            raise error
        messages, at = [], 0
        for rank in range(self.sync.world_size):
            size = int(gathered[at])
            if size:
                messages.append(f"rank {rank}: {gathered[at + 1:at + 1 + size].astype(np.uint8).tobytes().decode()}")
            at += 1 + size
        raise RuntimeError(f"another rank failed, so every rank stops here ({'; '.join(messages)})")

    def _fail_unmatched(self, has_rows: bool) -> None:
        """Every rank raises: a rank with no rows to pad the agreed step with cannot match the others' steps."""
        self._fail(None if has_rows else RuntimeError(
            f"rank {self.sync.rank} has no sample to pad a step with (every batch so far empty or skipped as "
            "non-finite), so the other ranks' steps cannot be matched"))

    def _can_pad(self) -> int:
        """Whether this rank has rows to make a step from (queued, or earlier ones to repeat at weight 0)."""
        return int(bool(self.queue) or self._pad_source is not None)

    def _select(self, batch: SubBatch, strategy: Strategy) -> Selected:
        loader, stats = self.loader, self.stats
        fraction = loader.fraction if strategy.uses_fraction else None  # the window's whole batches take none
        picked = select_batch(self.hook, strategy, batch, fraction, nan_policy=loader.nan_policy,
                              score=loader.store is not None and not strategy.keeps_all,  # the store keeps scores
                              select_on=loader.select_on)
        stats.record(picked, len(batch))
        scores = picked.scores
        if loader.store is not None and scores is not None and len(scores):
            kept = batch.indices if picked.candidates is None else batch.indices[picked.candidates.cpu()]
            norms = scores.grad_norms() if scores.has_gradients else None  # head=False: the norm stays unknown (NaN)
            loader.store.update(kept, scores.loss, norms, epoch=self.epoch)
        return picked

    # -- steps -----------------------------------------------------------------------
    def _direct(self) -> Iterator[SubBatch]:
        """One step per round (no rebatching, or a strategy that keeps every sample).

        Every rank steps with the longest rank's rows. If a rank has nothing to pad a step with yet (its
        first batches were all skipped as non-finite), no rank steps this round: the rows wait in the
        queue and join the next step, weighted against their own batch (``sbsampler.weights``).
        """
        while True:
            batch, picked, error, _ = self._round()
            queued = self.queued()
            mn, mx = self.sync.min_max([queued, int(batch is not None), int(error is not None), self._can_pad()])
            if mx[2]:
                self._fail(error)
            if mx[0] and mn[3]:
                yield self._emit(self._take(queued) if queued else None, mx[0])
            if not mx[1]:
                break
        if mx[0]:  # rows left that could never be stepped on: some rank had no finite sample all epoch
            self._fail_unmatched(bool(self._can_pad()))

    def _rebatched(self) -> Iterator[SubBatch]:
        """Jiang et al.'s queue: chosen rows accumulate until a full batch is ready."""
        while True:
            batch, picked, error, whole = self._round()
            size = self.loader.batch_size
            ready = self.queued() // size if size else 0
            rows = len(whole) if whole is not None else 0
            mn, mx = self.sync.min_max([ready, int(batch is not None), int(error is not None), rows,
                                        int(whole is not None) or self._can_pad()])
            if mx[2]:
                self._fail(error)
            if mx[3]:  # a full batch (outside the window, or an interrupt): one step of its own on every rank
                if not mn[4]:
                    self._fail_unmatched(bool(self._can_pad()) or whole is not None)
                yield self._emit(self._whole(whole), mx[3])
            for _ in range(mn[0]):
                yield self._emit(self._take(size), size)
            if not mx[1]:
                break
        yield from self._tail()

    def _tail(self) -> Iterator[SubBatch]:
        """The rows left in the queue once every rank's input has run out."""
        size = self.loader.batch_size or 1
        queued = self.queued()
        mn, mx = self.sync.min_max([queued // size, -(-queued // size), queued, self._can_pad()])
        if self.loader.drop_last:
            for _ in range(mn[0]):
                yield self._emit(self._take(size), size)
            self._drop(self.queued())
            return
        if mx[1] and not mn[3]:
            self._fail_unmatched(bool(self._can_pad()))
        for j in range(mx[1]):  # the step size every rank agrees on: the longest rank's rows
            have = min(size, self.queued())
            yield self._emit(self._take(have) if have else None, min(size, mx[2] - j * size))

    def _take(self, count: int) -> SubBatch:
        """Pop ``count`` rows off the front of the queue as one step (weights from their multipliers)."""
        parts: list[_Queued] = []
        while count:
            head = self.queue[0]
            if len(head.sub) <= count:
                parts.append(self.queue.pop(0))
                count -= len(head.sub)
            else:
                front, self.queue[0] = head.split(count)
                parts.append(front)
                count = 0
        self._last_parts = parts
        return _join(parts)

    def _whole(self, sub: SubBatch) -> SubBatch:
        """A whole batch as its own step (weights ``1/B``), recorded as one part."""
        ones = torch.ones(len(sub), dtype=torch.float64)
        self._last_parts = [_Queued(sub, self.position - 1, torch.arange(len(sub)), ones, ones)]
        return sub

    def _drop(self, count: int) -> None:
        self.stats.samples_dropped += count
        self.queue = []

    def _emit(self, sub: Optional[SubBatch], size: int) -> SubBatch:
        """``sub`` as one step of ``size`` rows, padded with zero-weight repeats if short (DDP)."""
        have = len(sub) if sub is not None else 0
        out = sub
        if have < size:
            base = sub if have else self._pad_source
            if base is None:
                raise RuntimeError(
                    f"rank {self.sync.rank} has no sample to pad a step with: every rank needs at least one "
                    "sample in its first round"
                )
            need = size - have
            device = base.weights.device
            pad = base.take(torch.arange(need, device=device) % len(base), torch.zeros(need, device=device))
            out = SubBatch.concat([sub, pad], same_batch=True) if have else pad  # type: ignore[list-item]
            self.stats.samples_padded += need
        if have:
            self._pad_source = sub
        self.stats.samples_yielded += have
        self.stats.steps += 1
        return out  # type: ignore[return-value]

    # -- resume ----------------------------------------------------------------------
    def _handoff(self) -> dict[str, Any]:
        """The stateful wrapped loader's state now, and where this epoch stands."""
        return handoff(self.loader.loader, self.position, self.samples_read)

    def wrapped_state(self) -> Optional[dict[str, Any]]:
        """The wrapped loader's state to resume this epoch from (``sbsampler.wrapped``), or ``None``.

        A stateful loader's state from before the oldest batch with rows still queued
        (the current one when nothing is queued); an FFCV loader's epoch counter.
        """
        if self._stateful and self.queue:
            return self._snapshots[self.queue[0].ordinal]
        if self._stateful:
            return self._handoff()
        return save_wrapped(self.loader.loader, iterating=True)

    def pending(self) -> list[tuple]:
        """``(step, record)`` of the steps made and not yet taken: a look-ahead's, or a resumed epoch's."""
        if isinstance(self._steps, Steps):
            self._steps.settle()  # the thread at its gate: the epoch's state is that of the steps made
            return self._steps.pending()
        return list(self._ready)

    def state_dict(self) -> dict[str, Any]:
        """The epoch, the wrapped batches consumed, the queue and the steps made but not taken (look-ahead):
        plain values and CPU tensors."""
        pending = self.pending()
        if pending and self._stateful:
            raise NotImplementedError(
                "a mid-epoch state of a look-ahead over a stateful wrapped loader (StatefulDataLoader) is not "
                "supported yet: save between epochs, or use lookahead=0")
        return {
            "wrapped": self.wrapped_state(),
            "epoch": self.epoch,
            "position": self.position,
            "drawn": [int(self._drawn[0]), float(self._drawn[1])],
            "carried": None if self._rho is None else float(self._rho),
            "queue": [_entry(q) for q in self.queue],
            "pending": [{"position": int(position), "parts": [_entry(q) for q in parts]}
                        for _, (parts, position) in pending],
        }

    def _fast_forward(self, state: dict[str, Any]) -> list[tuple]:
        """Read the batches the saved run had consumed (unscored); rebuild its queue and the steps it had made
        but not yielded (a look-ahead's), which are returned as ``(step, record)`` to yield first."""
        entries = list(state["queue"]) + [e for step in state.get("pending", []) for e in step["parts"]]
        wanted: dict[int, list[int]] = {}
        for j, entry in enumerate(entries):
            wanted.setdefault(int(entry["batch"]), []).append(j)
        pieces: list[Optional[_Queued]] = [None] * len(entries)
        first = 0
        handoff = state.get("wrapped")
        if self._stateful and handoff is not None and "state" in handoff:  # the loader resumes itself from there
            first = int(handoff["position"])
            self.samples_read = int(handoff["samples_read"])
        for ordinal in range(first, int(state["position"])):
            if self._stateful:
                self._snapshots[ordinal] = self._handoff() | {"position": ordinal}
            batch = self._read()
            if batch is None:
                raise RuntimeError(
                    f"cannot resume: the wrapped loader ended after {ordinal} batches, but the saved "
                    f"state had consumed {state['position']}"
                )
            if ordinal not in wanted:
                continue
            batch = batch.to(self.loader.device)
            for j in wanted[ordinal]:
                entry = entries[j]
                rows = torch.as_tensor(entry["rows"], dtype=torch.int64)
                if rows.numel() and int(rows.max()) >= len(batch):
                    raise RuntimeError(
                        f"cannot resume: the saved queue holds row {int(rows.max())} of batch {ordinal}, which has "
                        f"{len(batch)} samples; the state comes from another loader or batch size"
                    )
                if not torch.equal(batch.indices[rows].cpu(), torch.as_tensor(entry["indices"], dtype=torch.int64)):
                    raise RuntimeError(
                        f"cannot resume: batch {ordinal} of the wrapped loader holds other samples than in the "
                        "saved run; the loader must replay the same order (seed it, set the sampler's epoch)"
                    )
                mult = torch.as_tensor(entry["multipliers"], dtype=torch.float64)
                per_pick = torch.as_tensor(entry["per_pick"], dtype=torch.float64)
                weights = step_weights(mult, per_pick).to(batch.weights.device, torch.float32)
                pieces[j] = _Queued(batch.take(rows, weights), ordinal, rows, mult, per_pick)
        self.queue = [p for p in pieces[:len(state["queue"])] if p is not None]
        rest, ready = pieces[len(state["queue"]):], []
        for step in state.get("pending", []):
            parts, rest = rest[:len(step["parts"])], rest[len(step["parts"]):]
            ready.append((_join(parts), (parts, int(step["position"]))))  # type: ignore[arg-type]
        self.position = int(state["position"])
        self._drawn = [int(state["drawn"][0]), float(state["drawn"][1])]
        self._rho = state["carried"]
        return ready
