"""One batch in, one weighted sub-batch out: the functional step under ``SelectiveLoader``.

``select_batch`` scores a batch with one no-graph forward (``ScoringHook.score``),
applies the NaN policy, lets the strategy choose, and gathers the chosen rows with
their weights (``sbsampler.weights``) on the batch's own device. It holds no state
of its own: the loader's epoch iterator calls it once per batch, and a training
loop that wants no wrapper can call it directly::

    picked = sb.select_batch(hook, strategy, (x, y), fraction=0.25)
    if picked.sub is not None:
        out = model(picked.sub.inputs)
        loss = sb.weighted_loss(F.cross_entropy(out, picked.sub.targets, reduction="none"), picked.sub.weights)

It does not remember losses for a strategy with a history (``observe``): whoever
drives it decides what a round is (the loader shows every round's losses, on
every rank).

Where the strategy chooses (``select_on``): a loss-only rule with an on-device twin
(``Strategy.selects_on_device``) chooses with torch ops on the device the losses
live on when that is an accelerator (``"auto"``), so that a GPU batch is selected
and gathered with no host round trip: the rows, weights and multipliers stay on
the GPU, a NaN check or a label check is read later (``sbsampler.deferred``), the
stage timers are CUDA events (``sbsampler.clock.Clock``). What still reads back to
the host per batch: a variable-count rule's count (InfoBatch, Bernoulli SB) and
``nan_policy="skip"``'s, which set the sub-batch's shape; a ``ScoreStore``; the
history all-gather under DDP. Gradient-based rules (``gradmatch``, ``importance``)
choose on the host (Numba), as every rule does with ``select_on="host"``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor

from .batch import SubBatch, parse_batch
from .hook import ScoringHook
from .distributed import LocalSync
from .ondevice import work_dtype
from .scores import Scores, apply_nan_policy, check_nan_policy
from .clock import Clock
from .strategies import Seed, count_for, get_strategy, resolve_fraction
from .weights import step_weights

__all__ = ["Selected", "select_batch", "observe_round", "SELECT_ON"]

#: where a strategy chooses: ``"auto"`` (on the losses' device if it is an accelerator and the
#: strategy has a torch-op rule), ``"host"`` (NumPy and Numba), ``"device"`` (torch ops, even on the CPU)
SELECT_ON = ("auto", "host", "device")
#: the strategy classes whose kernels this process has loaded (``Strategy.warm_up``)
_WARM: set = set()


@dataclass
class Selected:
    """What ``select_batch`` made of one batch.

    Attributes:
        sub: the weighted sub-batch to train on; ``None`` when nothing was
            chosen (an empty batch, every sample skipped, or a variable-count
            rule that kept none).
        rows: (k,) int64 positions of ``sub``'s rows in the batch, on the
            device the strategy chose on (the CPU, or the losses' device).
        multipliers: (k,) float64 (float32 on MPS), beside ``rows``: how many
            samples of the batch each row stands for (``sbsampler.weights``).
        per_pick: samples per pick of this draw (candidates / picks).
        expected: picks this draw makes in expectation, given the scores: the
            count of a fixed-count rule; a variable-count rule's sum of inclusion
            probabilities (``Selection.expected``; a 0-d tensor when it chose on
            the device). Rebatching weights by it (``sbsampler.weights``).
        scores: the candidates' scores after the NaN policy; ``None`` when the
            strategy reads no scores (no scoring pass ran).
        candidates: positions of the candidates in the batch (on the
            scores' device), ``None`` when every sample was one.
        skipped: samples left out by ``nan_policy="skip"``.
        distinct: distinct samples chosen (sampling with replacement can repeat one).
        residual: GradientMatching's fit, else ``None``.
        clock: the stage timer; ``seconds`` reads it.
    """

    sub: Optional[SubBatch]
    rows: Tensor
    multipliers: Optional[Tensor] = None
    per_pick: float = 1.0
    expected: Any = 0.0
    scores: Optional[Scores] = None
    candidates: Optional[Tensor] = None
    skipped: int = 0
    distinct: int = 0
    residual: Optional[float] = None
    clock: Clock = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.clock is None:
            self.clock = Clock(torch.device("cpu"))

    @property
    def seconds(self) -> dict[str, float]:
        """Time spent ``scoring``, ``selecting`` and ``gathering`` (on CUDA, reading it waits for them)."""
        return self.clock.seconds


def select_batch(
    hook: Optional[ScoringHook],
    strategy: Any,
    batch: Any,
    fraction: Optional[float] = None,
    *,
    nan_policy: str = "raise",
    rng: Seed = None,
    score: bool = False,
    select_on: str = "auto",
) -> Selected:
    """Score ``batch``, choose ``ceil(fraction * B)`` of it with ``strategy``, gather the weighted rows.

    Args:
        hook: the ``ScoringHook`` on the model being trained (may be ``None``
            for a strategy that reads no scores, such as ``"full"``).
        strategy: a ``Strategy`` or a registered name.
        batch: a ``SubBatch`` from ``parse_batch``, or anything ``parse_batch``
            reads (``(inputs, targets[, indices, *extras])`` or a dict); without
            indices the rows are numbered from 0. (Batch-level extra fields:
            parse it with ``parse_batch(batch, 0, batch_fields=...)`` first.)
        fraction: share of the batch to choose, in (0, 1]; default 0.25. A rule
            that chooses its own count (InfoBatch, Bernoulli SB) or keeps every
            sample refuses one (``resolve_fraction``).
        nan_policy: ``"raise"``, ``"skip"`` or ``"keep"`` (``sbsampler.scores.apply_nan_policy``).
        rng: draw from this generator instead of the strategy's own.
        score: run the scoring pass even for a strategy that reads no scores
            (``Uniform``), because the caller keeps them (a ``ScoreStore``).
        select_on: ``"auto"``, ``"host"`` or ``"device"`` (``SELECT_ON``, the module docstring).
    """
    strategy = get_strategy(strategy)
    check_nan_policy(nan_policy, strategy, score)
    if select_on not in SELECT_ON:
        raise ValueError(f"select_on must be one of {SELECT_ON}, got {select_on!r}")
    if not isinstance(batch, SubBatch):  # numbered from 0, unless the strategy looks samples up by dataset index
        batch = parse_batch(batch, first_position=None if strategy.needs_reference else 0)
    n = len(batch)
    k = count_for(resolve_fraction(fraction, strategy), max(n, 1))
    empty = torch.zeros(0, dtype=torch.int64)
    if n == 0:
        return Selected(None, empty)
    if strategy.keeps_all:  # the whole batch as it came, weights 1/B: no scoring, no copy
        return Selected(batch, torch.arange(n), torch.ones(n, dtype=torch.float64), 1.0, n, distinct=n)
    clock = Clock(batch.weights.device)
    scores, candidates = None, None
    if strategy.needs_scores or score:
        if not isinstance(hook, ScoringHook):
            raise TypeError(f"{strategy!r} reads scores: pass the ScoringHook on the model, got {type(hook).__name__}")
        scores = hook.score(batch.inputs, batch.targets)
        clock.mark("scoring")
    device = scores.loss.device if scores is not None else batch.weights.device
    on_device = strategy.selects_on_device and (select_on == "device" or (select_on == "auto"
                                                                          and device.type != "cpu"))
    if scores is not None:
        scores, candidates = apply_nan_policy(scores, nan_policy, batch.indices, hook.checks if on_device else None)
        if strategy.needs_reference:  # RhoLoss: each candidate's reference loss, by dataset index
            kept = batch.indices if candidates is None else batch.indices[candidates.to(batch.indices.device)]
            scores = scores.with_reference(strategy.reference_for(kept))
    m = n if scores is None else len(scores)
    skipped = n - m
    if m == 0:
        return Selected(None, empty, scores=scores, candidates=candidates, skipped=skipped, clock=clock)
    residual = None
    if on_device:  # torch ops where the losses are: nothing read back but a variable count's shape
        chosen = strategy._select_tensors(scores, m, min(k, m), strategy.device_generator(device, rng))
        rows, w = chosen[0], chosen[1]
        expected = chosen[2] if len(chosen) > 2 else int(rows.shape[0])
        if candidates is not None:
            rows = candidates[rows]
        distinct = int(rows.shape[0])  # no on-device rule repeats a pick
        multipliers = w.to(work_dtype(device)) * m
    else:
        if type(strategy) not in _WARM:  # the first host selection of this rule in this process: load its kernels
            clock.mark("selecting")     # (Numba's cache, or a compile), a one-off kept out of the stage times
            _WARM.add(type(strategy))
            strategy.warm_up()
            clock.skip()
        sel = strategy.select(scores if scores is not None else m, min(k, m), rng=rng)
        rows = torch.from_numpy(sel.indices)
        if candidates is not None:
            rows = candidates.cpu()[rows]
        distinct = int(torch.unique(rows).numel())
        residual = sel.residual
        expected = sel.expected if sel.expected is not None else int(rows.shape[0])
        multipliers = torch.from_numpy(sel.weights.astype(np.float64) * m)  # float64: the round trip is exact
    clock.mark("selecting")
    common = dict(expected=expected, scores=scores, candidates=candidates, skipped=skipped, distinct=distinct,
                  residual=residual, clock=clock)
    if distinct == 0:  # a variable-count rule kept nothing: no step from this batch
        return Selected(None, rows, **common)
    per_pick = m / len(rows)
    weights = step_weights(multipliers, per_pick).to(batch.weights.device, torch.float32)
    sub = batch.take(rows, weights)
    clock.mark("gathering")
    return Selected(sub, rows, multipliers, per_pick, **common)


def observe_round(strategy: Any, picked: Optional[Selected], sync: Any) -> None:
    """Show a strategy with a loss history one round's losses (``Strategy.observe``), gathered over ``sync``.

    Every rank calls it every round, with or without scores of its own (an empty
    share then), so that the all-gather of ``RankSync`` matches up. One process
    shows the losses as they are, on their device (a GPU history stays there).
    """
    scores = picked.scores if picked is not None else None
    if isinstance(sync, LocalSync):
        strategy.observe(scores.loss.detach() if scores is not None else np.zeros(0))
        return
    losses = scores.loss.detach().to("cpu", torch.float64).numpy() if scores is not None else np.zeros(0)
    strategy.observe(sync.all_gather_1d(losses))
