"""The stage clock of one ``select_batch``: ``time.perf_counter`` on the host, CUDA events on a GPU.

A host clock on a GPU would time the kernel launches, not the kernels, and
synchronising to read it would stall the GPU every batch; so on CUDA the marks are
events, read (``Clock.seconds``) only when a time figure is wanted.
"""

from __future__ import annotations

import time
from typing import Any

import torch

__all__ = ["Clock", "STAGES"]

STAGES = ("scoring", "selecting", "gathering")


class Clock:
    """The seconds each stage of one ``select_batch`` took, marked as each stage ends.

    On a CUDA device the marks are events on the current stream, and ``seconds``
    waits for the last one; elsewhere they are host clock readings.
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = torch.device(device).type == "cuda"
        self._seconds = dict.fromkeys(STAGES, 0.0)
        self._events: list[tuple[str, Any]] = []
        if self.cuda:
            self._events.append(("", self._event()))
        else:
            self._t = time.perf_counter()

    @staticmethod
    def _event() -> Any:
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        return e

    def mark(self, stage: str) -> None:
        """``stage`` ends now (it began at the previous mark, or when the clock was made)."""
        if self.cuda:
            self._events.append((stage, self._event()))
        else:
            now = time.perf_counter()
            self._seconds[stage] += now - self._t
            self._t = now

    def skip(self) -> None:
        """What ran since the last mark belongs to no stage (a one-off kernel load): it is not counted."""
        if self.cuda:
            self._events.append(("", self._event()))
        else:
            self._t = time.perf_counter()

    def done(self) -> bool:
        """Whether every stage has run (never waits): always on the host, on CUDA once the last event has passed."""
        return not self.cuda or len(self._events) < 2 or bool(self._events[-1][1].query())

    @property
    def seconds(self) -> dict[str, float]:
        """Seconds per stage (on CUDA this waits for the stages to have run)."""
        if self.cuda and len(self._events) > 1:
            self._events[-1][1].synchronize()
            for (_, start), (stage, end) in zip(self._events, self._events[1:]):
                if stage:  # "" : skipped
                    self._seconds[stage] += start.elapsed_time(end) / 1e3
            self._events = self._events[-1:]
        return dict(self._seconds)
