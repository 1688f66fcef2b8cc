"""Look-ahead: the next steps scored, selected and gathered while the training step runs.

``SelectiveLoader(lookahead=N)`` runs an epoch's steps (pull, score, select,
gather, rebatch: ``sbsampler.epoch``) in a background thread, up to ``N`` steps
ahead of the training loop; on CUDA the thread's work goes to a side stream, so
the scoring forward of a later batch overlaps the training step of this one.

**One version of the parameters per batch.** The optimizer writes the parameters
in place, so scoring the live model beside the step could read some layers before
an optimizer step and others after it. The thread scores a ``Replica`` instead: a
copy of the model, refreshed from the live one between steps (when the loop asks
for its next step, the optimizer step before it has been issued). The two sides
take turns (``Steps``):

- the thread produces step ``p`` only once the replica holds version
  ``max(0, p - N)`` (the parameters after that many steps of this epoch);
- the loop, asking for step ``c``, waits until step ``c + N - 1`` is produced (the
  thread then needs version ``c`` and waits), refreshes the replica to version
  ``c`` and lets the thread go on.

So the batches of step ``p`` are scored by exactly the parameters after
``max(0, p - N)`` steps (rows a rebatching queue carries over keep the version of
the batch they came from, as without look-ahead), whatever the threads' timing:
a run is deterministic, and its ``state_dict`` resumes it exactly (the steps
produced but not yet taken are saved as rows, like the rebatching queue).

Costs and limits: one copy of the model's parameters and buffers (no gradients or
optimizer state), copied once per step. On a 2-core CPU a scoring thread beside
the step does not beat the in-series step that uses both cores (a small CNN,
batch 128 to 32: full 105 ms, in series 51 ms, scoring in a thread beside the step
83 ms; issue 23), so on a CPU it is for correctness tests and machines with cores
to spare. Not under DDP yet (the ranks' agreement would run collectives from the
thread beside DDP's own), and not with a ``ScoringHook(forward=...)`` callable (it
calls the live model).
"""

from __future__ import annotations

import threading
import weakref
from collections import deque
from collections.abc import Iterator
from typing import Any, Optional

import torch
from torch.utils import _pytree as pytree

from .batch import SubBatch
from .replica import Replica

__all__ = ["Steps", "Closed"]


def _record_stream(step: SubBatch, stream: "torch.cuda.Stream") -> None:
    """Tell the caching allocator that ``stream`` uses the step's tensors (they were made on another stream)."""
    for leaf in pytree.tree_leaves((step.inputs, step.targets, step.weights, step.indices, step.extras)):
        if isinstance(leaf, torch.Tensor) and leaf.is_cuda:
            leaf.record_stream(stream)


class Closed(RuntimeError):
    """Raised to a loop that asks a closed ``Steps`` for a step (its epoch was superseded or closed)."""


class _Gate:
    """What the loop and the thread share: the turn-taking counters, the steps made, and a condition.

    It holds no reference to the epoch, its generator or the model, so the thread, which
    holds only this and a weak reference to its ``Steps``, keeps none of them alive: once
    the ``Steps`` is collected (with its epoch, its loader), a finalizer stops the thread.
    """

    def __init__(self, depth: int, ready: list) -> None:
        self.cond = threading.Condition()
        self.depth = depth
        self.out: deque = deque(ready)
        self.produced = len(self.out)  # steps produced (the ready ones included)
        self.version = 0
        self.done = False  # the epoch's steps are all made (or one failed)
        self.stop = False  # closed: the thread ends after the step it is making, the loop gets no more
        self.error: Optional[BaseException] = None

    def halt(self) -> None:
        """Stop the thread and wake every waiter (a finalizer calls it too)."""
        with self.cond:
            self.stop = True
            self.cond.notify_all()


def _run(gate: _Gate, steps_ref: "weakref.ref[Steps]") -> None:
    """The thread: make step ``p`` once the replica holds version ``p - depth``; hold the ``Steps`` only while
    making a step."""
    p = gate.produced
    while True:
        with gate.cond:
            gate.cond.wait_for(lambda: gate.stop or gate.version >= p - gate.depth)
            if gate.stop:
                return
        steps = steps_ref()
        if steps is None:  # collected: nobody will take another step
            return
        try:
            item = steps._next_item()
        except StopIteration:
            item = None
        except BaseException as err:  # noqa: BLE001 - handed to the loop, raised at its step
            with gate.cond:
                gate.error, gate.done = err, True
                gate.cond.notify_all()
            return
        finally:
            del steps
        with gate.cond:
            if item is None:
                gate.done = True
            else:
                gate.out.append(item)
                gate.produced += 1
            gate.cond.notify_all()
        if item is None:
            return
        p += 1


class Steps:
    """An epoch's steps, produced by a thread up to ``depth`` steps ahead under the turn-taking rule above.

    The thread ends when the epoch's steps are all made, when ``close`` is called (another
    epoch of the loader starts, or the loop closes the epoch), or when this object is
    collected with its epoch (the loader and the model deleted): it never keeps them alive.

    Args:
        produce: the epoch's step generator (it scores with the replica's hook); each item it yields is
            ``(step, record)``, ``record`` being what a saved state needs to rebuild the step.
        replica: the scoring replica, at version 0 (refreshed at the epoch's start); ``None`` when
            nothing is scored (uniform): the turns are taken all the same.
        device: where the steps' tensors are made (a CUDA device: on a side stream), or ``None``.
        depth: ``N``, at least 1.
        ready: steps already produced before the thread starts (a resumed epoch's), in order.
    """

    def __init__(self, produce: Iterator[Any], replica: Optional[Replica], device: Optional[torch.device],
                 depth: int, ready: list = ()) -> None:
        self._produce = produce
        self.replica = replica
        self.depth = depth
        self._gate = _Gate(depth, list(ready))
        self._consumed = 0
        self._cuda = device is not None and device.type == "cuda"
        self._side = torch.cuda.Stream(device) if self._cuda else None
        if self._cuda:  # version 0: the replica's refresh at the epoch's start, on the loop's stream
            self._refreshed = torch.cuda.Event()
            self._refreshed.record(torch.cuda.current_stream(device))
        weakref.finalize(self, self._gate.halt)
        self._thread = threading.Thread(target=_run, args=(self._gate, weakref.ref(self)),
                                        name="sbsampler-lookahead", daemon=True)
        self._thread.start()

    def _next_item(self) -> Any:
        """The next ``(step, record)`` of the epoch (in the thread; on CUDA, made on the side stream)."""
        if self._side is None:
            return next(self._produce)
        with torch.cuda.stream(self._side):
            self._side.wait_event(self._refreshed)  # the replica's copy, queued on the loop's stream
            item = next(self._produce)
            done = torch.cuda.Event()
            done.record(self._side)
        return item + (done,)

    # -- the loop ---------------------------------------------------------------------
    def __iter__(self) -> "Steps":
        return self

    def __next__(self) -> Any:
        c = self._consumed
        gate = self._gate
        with gate.cond:
            gate.cond.wait_for(lambda: gate.produced >= c + self.depth or gate.done or gate.stop)
            if gate.stop:
                raise Closed("this epoch's look-ahead was closed (another epoch of the loader started)")
            if c > 0 and not gate.done:
                self._refresh(c)
            if not gate.out:
                self._consumed = c
                if gate.error is not None:
                    err, gate.error = gate.error, None
                    raise err
                raise StopIteration
            item = gate.out.popleft()
            self._consumed = c + 1
        if self._cuda:
            step, record, done = item
            stream = torch.cuda.current_stream(self._side.device)
            stream.wait_event(done)
            _record_stream(step, stream)
            return step, record
        return item

    def _refresh(self, version: int) -> None:
        """Bring the replica to ``version`` (the thread waits at the gate) and let the thread go on."""
        if self._cuda:
            stream = torch.cuda.current_stream(self._side.device)
            stream.wait_stream(self._side)  # the replica's last reads are done before it is written
        if self.replica is not None:
            self.replica.refresh()
        if self._cuda:
            self._refreshed = torch.cuda.Event()
            self._refreshed.record(torch.cuda.current_stream(self._side.device))
        self._gate.version = version
        self._gate.cond.notify_all()

    def settle(self) -> None:
        """Wait until the thread is at its gate (or done, or closed): its state is then that of the steps
        produced so far."""
        c = self._consumed
        gate = self._gate
        with gate.cond:
            gate.cond.wait_for(lambda: gate.produced >= c + self.depth or gate.done or gate.stop)

    def pending(self) -> list:
        """The items produced and not yet taken (call ``settle`` first)."""
        with self._gate.cond:
            return [item[:2] if self._cuda else item for item in self._gate.out]

    @property
    def closed(self) -> bool:
        """Whether ``close`` was called (or the finalizer stopped the thread)."""
        return self._gate.stop

    def close(self) -> None:
        """Stop the thread after the step it is producing, and wait for it; a loop waiting for a step gets
        ``Closed``."""
        self._gate.halt()
        if self._thread is not threading.current_thread():
            self._thread.join()
