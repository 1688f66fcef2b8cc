"""Per-batch selection for a training loop that owns its loader: Lightning, the HF Trainer, accelerate.

``SelectiveLoader`` wraps a loader and decides what a step is. A framework that
iterates its own loader (and shards it, counts its length, saves its position)
needs the opposite: a batch that has already reached the device goes in, the
weighted sub-batch to train on comes out, one step per batch. ``BatchSelector``
is that: ``select_batch`` (``sbsampler.select``) plus what must outlive a batch,
the strategy (its RNG and loss history), the counters (``LoaderStats``) and a
``state_dict`` for the framework's checkpoint::

    selector = sb.BatchSelector(sb.ScoringHook(model), "sb", fraction=0.25, seed=0)
    sub = selector(batch)          # scored with the model as it is now, on the batch's device
    loss = sb.weighted_loss(F.cross_entropy(model(sub.inputs), sub.targets, reduction="none"), sub.weights)

Every call yields a step, so the framework's step count, epoch length and
learning-rate schedule are those of the wrapped loader: a variable-count rule
that keeps nothing yields one row at weight 0 (a zero gradient). A batch whose
every loss is non-finite under ``nan_policy="skip"`` cannot become a step and
raises (``SelectiveLoader`` can wait for the next batch; a framework cannot).

Under DDP each rank selects from its own batch (with ``sync_history`` a
loss-history strategy ranks against every rank's losses, an all-gather each
call), so the ranks' steps stay one per batch; their row counts may differ,
which DDP's gradient all-reduce does not mind.
"""

from __future__ import annotations

import time

from typing import Any, Iterable, Optional, Union

import torch

from .batch import BatchKeys, SubBatch, parse_batch
from .checkpoint import check_version, require, safe_state
from .distributed import LocalSync, RankSync, resolve_sync
from .hook import ScoringHook
from .scores import check_nan_policy
from .select import SELECT_ON, observe_round, select_batch
from .stats import LoaderStats, read_stats
from .strategies import Seed, Strategy, get_strategy, resolve_fraction

__all__ = ["BatchSelector"]

STATE_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)  # 2: the strategy's state records its version and class; 3: stats.steps_timed


class BatchSelector:
    """Score a batch, choose a weighted sub-batch, remember what a resume needs.

    Args:
        hook: the ``ScoringHook`` on the model being trained (``None`` only for
            a strategy that reads no scores).
        strategy: a ``Strategy`` or registered name (``sbsampler.strategies``).
        fraction: share of each batch to back-propagate, in (0, 1]; default 0.25
            (refused for a rule that chooses its own count: ``resolve_fraction``).
        nan_policy: ``"raise"``, ``"skip"`` or ``"keep"`` (``sbsampler.scores``).
        seed: seeds a named strategy's draws.
        sync_history: under DDP, show a loss-history strategy every rank's losses.
        distributed: as ``SelectiveLoader(distributed=)``; only read with ``sync_history``.
        batch_keys: with ``batch_fields``, how batches are read (``parse_batch``); for
            HuggingFace dict batches ``BatchKeys(inputs=None, targets="labels")``.
        batch_fields: the batch-wide fields (see ``batch_keys``).
        select_on: where the strategy chooses (``SelectiveLoader(select_on=)``):
            ``"auto"`` selects a GPU batch on the GPU with no host round trip.
    """

    def __init__(
        self,
        hook: Optional[ScoringHook],
        strategy: Union[None, str, Strategy] = "uniform",
        fraction: Optional[float] = None,
        *,
        nan_policy: str = "raise",
        seed: Seed = None,
        sync_history: bool = False,
        distributed: Union[None, bool, RankSync, LocalSync] = None,
        batch_keys: BatchKeys = BatchKeys(),
        batch_fields: Iterable = (),
        select_on: str = "auto",
    ) -> None:
        self.strategy = get_strategy(strategy, seed=seed)
        if self.strategy.needs_scores and not isinstance(hook, ScoringHook):
            raise TypeError(f"{self.strategy!r} reads scores: pass the ScoringHook on the model, "
                            f"got {type(hook).__name__}")
        self.fraction = resolve_fraction(fraction, self.strategy)
        check_nan_policy(nan_policy, self.strategy)
        if select_on not in SELECT_ON:
            raise ValueError(f"select_on must be one of {SELECT_ON}, got {select_on!r}")
        if not isinstance(batch_keys, BatchKeys):
            raise TypeError(f"batch_keys must be a BatchKeys, got {type(batch_keys).__name__}")
        self.hook = hook
        self.nan_policy = nan_policy
        self.select_on = select_on
        self.sync_history = bool(sync_history)
        self._distributed = distributed
        self._history_sync: Union[None, RankSync, LocalSync] = None  # resolved at the first call (DDP is up by then)
        self.batch_keys = batch_keys
        self.batch_fields = tuple(batch_fields)
        self.stats = LoaderStats()
        self._returned_at: Optional[float] = None  # the framework's time between calls: stats.time_training
        self._returned_rows = 0  # the rows of the sub-batch returned last

    def __call__(self, batch: Any) -> SubBatch:
        """The weighted sub-batch of ``batch`` to train on (see the module docstring)."""
        if self._returned_at is not None:
            self.stats.record_step(self._returned_rows, time.perf_counter() - self._returned_at)
            self._returned_at = None
        first = None if self.strategy.needs_reference else self.stats.samples_seen  # RhoLoss: dataset indices
        sub = batch if isinstance(batch, SubBatch) else parse_batch(batch, first, self.batch_fields,
                                                                    self.batch_keys)
        n = len(sub)
        if n == 0:
            raise ValueError("got an empty batch: there is nothing to select from or to step on")
        picked = select_batch(self.hook, self.strategy, sub, self.fraction, nan_policy=self.nan_policy,
                              select_on=self.select_on)
        self.stats.batches_seen += 1
        self.stats.samples_seen += n
        self.stats.record(picked, n)
        if self.strategy.keeps_history:
            if self._history_sync is None:
                self._history_sync = resolve_sync(self._distributed) if self.sync_history else LocalSync()
            observe_round(self.strategy, picked, self._history_sync)
        out = picked.sub
        if out is None:
            if picked.skipped == n:
                raise RuntimeError(
                    f"every one of the batch's {n} losses is non-finite (nan_policy='skip'): a framework's step "
                    "cannot be skipped from here. Lower the learning rate, use nan_policy='raise' to stop at the "
                    "first such batch, or iterate a SelectiveLoader, which waits for the next batch")
            finite = 0 if picked.candidates is None else int(picked.candidates[0])
            out = sub.take(torch.tensor([finite]), torch.zeros(1, device=sub.weights.device))
            self.stats.samples_padded += 1
        else:
            self.stats.samples_yielded += len(out)
        self.stats.steps += 1
        self._returned_rows = len(out)
        self._returned_at = time.perf_counter()
        return out

    def epoch_end(self) -> None:
        """What the frameworks call at each epoch's end: ``flush_checks``, then a ``SelectionCostWarning`` (once)
        if selection is estimated to cost more than it saves; the time to the next epoch's first batch
        (evaluation, checkpoints) is not counted as a step."""
        self._returned_at = None
        self.flush_checks()
        self.stats.warn_if_costly("BatchSelector")

    def flush_checks(self) -> None:
        """Wait for the hook's GPU checks still pending (labels, non-finite losses) and raise the first failure.

        On a GPU they are read without stalling it (``sbsampler.deferred``), so a failure
        surfaces at a later batch's scoring; a framework's epoch end calls this so that
        none is left unread. Nothing to wait for on the CPU.
        """
        if self.hook is not None:
            self.hook.checks.flush()

    def state_dict(self) -> dict[str, Any]:
        """Plain values (``torch.save``-able, ``weights_only``-safe): the strategy's state and the counters."""
        state = {"version": STATE_VERSION, "strategy": self.strategy.state_dict(), "stats": self.stats.state()}
        return safe_state(state)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict()``: the next call draws as the saved selector's next call would have."""
        require(state, ["version", "strategy", "stats"], "BatchSelector")
        check_version(state, "BatchSelector", READABLE_VERSIONS)
        strategy = self.strategy._read_state(state["strategy"])  # everything checked before anything changes
        stats = read_stats(state["stats"], "BatchSelector")
        self.strategy._apply_state(strategy)
        self.stats = stats

    def __repr__(self) -> str:
        return f"BatchSelector(strategy={self.strategy!r}, fraction={self.fraction}, nan_policy={self.nan_policy!r})"
