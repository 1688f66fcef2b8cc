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

__all__ = ["is_stateful", "ffcv_loader"]


def ffcv_loader(loader: Any) -> Optional[Any]:
    """The FFCV ``Loader`` behind an adapted loader (``sbsampler.ffcv.FFCVBatches``), else ``None``."""
    inner = getattr(loader, "loader", None)
    if type(loader).__name__ == "FFCVBatches" and hasattr(inner, "next_epoch"):
        return inner
    return None


def is_stateful(loader: Any) -> bool:
    """Whether ``loader`` saves and restores its own position (``state_dict`` and ``load_state_dict``)."""
    if ffcv_loader(loader) is not None:
        return False
    if getattr(loader, "use_stateful_dataloader", True) is False:  # accelerate's wrapper of a plain DataLoader
        return False
    return callable(getattr(loader, "state_dict", None)) and callable(getattr(loader, "load_state_dict", None))
