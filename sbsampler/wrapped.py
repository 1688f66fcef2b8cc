"""The wrapped loader's own state, saved and restored with the ``SelectiveLoader``'s.

Two kinds of wrapped loader carry state that decides which batches come next:

- a *stateful* loader, one with ``state_dict``/``load_state_dict`` (torchdata's
  ``StatefulDataLoader``): its state is saved with ours, and a resume hands off
  to it, reading again only the batches whose rows still wait in the rebatching
  queue (none without rebatching) instead of every batch the epoch consumed;
- an FFCV ``Loader``, whose order is a function of its ``next_epoch`` counter
  (it advances at each ``iter``): the counter of the epoch being iterated is
  saved and set back, so the consumed batches replay in the same order.

Any other loader must replay its order by itself (seed it, ``set_epoch``), as
before; its consumed batches are read again to find the resume point.
"""

from __future__ import annotations

from typing import Any, Optional

from .batch import is_ffcv_loader
from .checkpoint import read_int

__all__ = ["is_stateful", "ffcv_loader", "handoff", "save_wrapped", "read_wrapped", "restore_wrapped"]


def ffcv_loader(loader: Any) -> Optional[Any]:
    """The FFCV ``Loader`` behind an adapted loader (``sbsampler.ffcv.FFCVBatches``), else ``None``."""
    inner = getattr(loader, "loader", None)
    return inner if is_ffcv_loader(inner) else None


def is_stateful(loader: Any) -> bool:
    """Whether ``loader`` saves and restores its own position (``state_dict`` and ``load_state_dict``)."""
    if ffcv_loader(loader) is not None:
        return False
    if getattr(loader, "use_stateful_dataloader", True) is False:  # accelerate's wrapper of a plain DataLoader
        return False
    return callable(getattr(loader, "state_dict", None)) and callable(getattr(loader, "load_state_dict", None))


def handoff(loader: Any, position: int = 0, samples_read: int = 0) -> dict[str, Any]:
    """A stateful loader's state now, with the wrapped batches and samples its epoch had consumed by then."""
    return {"state": loader.state_dict(), "position": position, "samples_read": samples_read}


def save_wrapped(loader: Any, iterating: bool) -> Optional[dict[str, Any]]:
    """The wrapped loader's state to save now, or ``None`` for a loader that keeps none.

    ``iterating``: an epoch of it is under way. FFCV then counts it already (its
    ``next_epoch`` advanced at ``iter``), so the saved counter is the running
    epoch's. A stateful loader's state is its current one (an epoch iterator with
    rows still queued saves an earlier snapshot instead, see ``EpochIterator``).
    """
    ffcv = ffcv_loader(loader)
    if ffcv is not None:
        return {"ffcv_epoch": int(ffcv.next_epoch) - int(iterating)}
    if is_stateful(loader):
        return handoff(loader)
    return None


def read_wrapped(wrapped: Any, kind: str) -> Optional[dict[str, Any]]:
    """A saved ``save_wrapped`` entry, checked: ``None``, an FFCV epoch counter, or a stateful loader's state with
    the position and samples read at which it was taken."""
    if wrapped is None:
        return None
    if not isinstance(wrapped, dict):
        raise ValueError(f"{kind} state field 'wrapped' must be a dict or None, got {type(wrapped).__name__}")
    if "ffcv_epoch" in wrapped:
        read_int(wrapped["ffcv_epoch"], "wrapped.ffcv_epoch", kind)
    if "state" in wrapped:
        for key in ("position", "samples_read"):
            read_int(wrapped.get(key), f"wrapped.{key}", kind)
    return wrapped


def restore_wrapped(loader: Any, wrapped: Optional[dict[str, Any]]) -> None:
    """Set a saved state (``save_wrapped``) back on the wrapped loader; ``None`` or a foreign kind: nothing."""
    if wrapped is None:
        return
    ffcv = ffcv_loader(loader)
    if ffcv is not None and "ffcv_epoch" in wrapped:
        ffcv.next_epoch = int(wrapped["ffcv_epoch"])
    elif is_stateful(loader) and "state" in wrapped:
        loader.load_state_dict(wrapped["state"])
