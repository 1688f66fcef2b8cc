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

import copy
import threading
from collections import deque
from collections.abc import Iterator
from typing import Any, Optional

import torch
from torch import nn
from torch.utils import _pytree as pytree

from .batch import SubBatch
from .hook import ScoringHook

__all__ = ["Replica", "Steps"]


def _copy_model(model: nn.Module) -> nn.Module:
    """``copy.deepcopy(model)`` without the ``ScoringHook`` forward hooks on it (a copy would copy their hooks)."""
    removed = []
    for module in model.modules():
        for key, fn in list(module._forward_hooks.items()):
            if isinstance(getattr(fn, "__self__", None), ScoringHook):
                removed.append((module, key, fn))
                del module._forward_hooks[key]
    try:
        twin = copy.deepcopy(model)
    except Exception as err:  # noqa: BLE001 - said plainly, with what to do
        raise TypeError(f"lookahead scores a copy of the model beside the training step, but copy.deepcopy of "
                        f"{type(model).__name__} failed ({type(err).__name__}: {err}); make the model copyable "
                        "(no locks, files or generators as attributes), or use lookahead=0") from err
    finally:
        for module, key, fn in removed:
            module._forward_hooks[key] = fn
    for p in twin.parameters():
        p.requires_grad_(False)
    return twin


class Replica:
    """A copy of the hooked model and a ``ScoringHook`` on it, refreshed from the live model by ``refresh``.

    Args:
        hook: the ``ScoringHook`` on the live model.
    """

    def __init__(self, hook: ScoringHook) -> None:
        self.live = hook.model
        self.model = _copy_model(hook.model)
        self.hook = hook.replicate(self.model)
        live = list(self.live.parameters()) + list(self.live.buffers())
        mine = list(self.model.parameters()) + list(self.model.buffers())
        if [t.shape for t in live] != [t.shape for t in mine]:
            raise RuntimeError("the model's copy does not match it (parameters or buffers added since?)")
        self._pairs = (mine, live)

    def refresh(self) -> None:
        """Copy the live parameters and buffers into the replica (on CUDA: queued on the current stream)."""
        mine, live = self._pairs
        with torch.no_grad():
            if hasattr(torch, "_foreach_copy_"):
                torch._foreach_copy_(mine, live)
            else:  # pragma: no cover - older torch
                for dst, src in zip(mine, live):
                    dst.copy_(src)


def _record_stream(step: SubBatch, stream: "torch.cuda.Stream") -> None:
    """Tell the caching allocator that ``stream`` uses the step's tensors (they were made on another stream)."""
    for leaf in pytree.tree_leaves((step.inputs, step.targets, step.weights, step.indices, step.extras)):
        if isinstance(leaf, torch.Tensor) and leaf.is_cuda:
            leaf.record_stream(stream)


class Steps:
    """An epoch's steps, produced by a thread up to ``depth`` steps ahead under the turn-taking rule above.

    Args:
        produce: the epoch's step generator (it scores with ``replica.hook``); each item it yields is
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
        self._cond = threading.Condition()
        self._out: deque = deque(ready)
        self._produced = len(self._out)  # steps produced (the ready ones included)
        self._consumed = 0
        self._version = 0
        self._done = False
        self._stop = False
        self._error: Optional[BaseException] = None
        self._cuda = device is not None and device.type == "cuda"
        self._side = torch.cuda.Stream(device) if self._cuda else None
        if self._cuda:  # version 0: the replica's refresh at the epoch's start, on the loop's stream
            self._refreshed = torch.cuda.Event()
            self._refreshed.record(torch.cuda.current_stream(device))
        self._thread = threading.Thread(target=self._run, name="sbsampler-lookahead", daemon=True)
        self._thread.start()

    # -- the thread -------------------------------------------------------------------
    def _run(self) -> None:
        p = self._produced
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._stop or self._version >= p - self.depth)
                if self._stop:
                    return
            try:
                item = self._next_item()
            except StopIteration:
                item = None
            except BaseException as err:  # noqa: BLE001 - handed to the loop, raised at its step
                with self._cond:
                    self._error, self._done = err, True
                    self._cond.notify_all()
                return
            with self._cond:
                if item is None:
                    self._done = True
                else:
                    self._out.append(item)
                    self._produced += 1
                self._cond.notify_all()
            if item is None:
                return
            p += 1

    def _next_item(self) -> Any:
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
        with self._cond:
            self._cond.wait_for(lambda: self._produced >= c + self.depth or self._done)
            if c > 0 and not self._done:
                self._refresh(c)
            if not self._out:
                self._consumed = c
                if self._error is not None:
                    err, self._error = self._error, None
                    raise err
                raise StopIteration
            item = self._out.popleft()
            self._consumed = c + 1
        if self._cuda:
            step, record, done = item
            stream = torch.cuda.current_stream(self._side.device)
            stream.wait_event(done)
            _record_stream(step, stream)
            return step, record
        return item

    def _refresh(self, version: int) -> None:
        """Copy the live parameters into the replica (the thread waits at the gate) and let the thread go on."""
        if self._cuda:
            stream = torch.cuda.current_stream(self._side.device)
            stream.wait_stream(self._side)  # the replica's last reads are done before it is written
        if self.replica is not None:
            self.replica.refresh()
        if self._cuda:
            self._refreshed = torch.cuda.Event()
            self._refreshed.record(torch.cuda.current_stream(self._side.device))
        self._version = version
        self._cond.notify_all()

    def settle(self) -> None:
        """Wait until the thread is at its gate (or done): its state is then that of the steps produced so far."""
        c = self._consumed
        with self._cond:
            self._cond.wait_for(lambda: self._produced >= c + self.depth or self._done)

    def pending(self) -> list:
        """The items produced and not yet taken (call ``settle`` first)."""
        with self._cond:
            return [item[:2] if self._cuda else item for item in self._out]

    def close(self) -> None:
        """Stop the thread after the step it is producing, and wait for it."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not threading.current_thread():
            self._thread.join()

