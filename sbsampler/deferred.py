"""Checks of values on an accelerator that raise a little later instead of stalling the host now.

Reading one flag off a GPU (``bool(t)``, ``int(t.min())``) waits for every kernel queued
before it: per batch, that removes the overlap between the host launching the next
batch and the GPU running this one. ``DeferredChecks`` copies a check's flag into
pinned host memory without waiting (``non_blocking``), records a CUDA event, and looks
at the flag only once the event has passed (``poll``, which never waits) or when told
to wait (``flush``, once per epoch). A failed check raises its error then, a batch or
two after the batch it names; the message says so.

On the CPU (and any device without CUDA events) a check is read at once: there is no
queue to wait for.
"""

from __future__ import annotations

from collections import deque
from typing import Callable

import torch
from torch import Tensor

__all__ = ["DeferredChecks"]

LATE = " (found after later batches were already queued: sbsampler checks GPU values without stalling the GPU)"


class DeferredChecks:
    """Pending checks, oldest first: ``add`` a failure flag and its error; ``poll``/``flush`` raise it."""

    def __init__(self) -> None:
        self._pending: deque = deque()

    def add(self, failed: Tensor, error: Callable[[], Exception]) -> None:
        """Raise ``error()`` once the 0-d bool ``failed`` is known to be true (at once off CUDA)."""
        if failed.device.type != "cuda":
            if bool(failed):
                raise error()
            return
        host = torch.empty((), dtype=torch.bool, pin_memory=True)
        host.copy_(failed, non_blocking=True)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(failed.device))
        self._pending.append((host, event, error))

    def poll(self) -> None:
        """Look at the checks whose flags have arrived (never waits); raise the first that failed."""
        while self._pending and self._pending[0][1].query():
            self._settle(self._pending.popleft())

    def flush(self) -> None:
        """Wait for every pending flag; raise the first that failed."""
        while self._pending:
            entry = self._pending.popleft()
            entry[1].synchronize()
            self._settle(entry)

    def __len__(self) -> int:
        return len(self._pending)

    def _settle(self, entry: tuple) -> None:
        host, _, error = entry
        if bool(host):
            self._pending.clear()  # the run stops here; later flags do not matter
            err = error()
            err.args = (f"{err.args[0]}{LATE}",) + err.args[1:] if err.args else err.args
            raise err
