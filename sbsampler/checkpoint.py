"""State dicts that load under ``torch.load(weights_only=True)``.

A framework's checkpoint (Lightning's, the HF Trainer's) is loaded with torch's
safe unpickler, which refuses NumPy arrays and scalars. ``safe_state`` turns
them into tensors and Python numbers; the strategies read either back
(``np.asarray`` takes a CPU tensor).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.utils import _pytree as pytree

__all__ = ["safe_state"]


def _leaf(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.array(value, copy=True))
    if isinstance(value, np.generic):
        return value.item()
    return value


def safe_state(state: Any) -> Any:
    """``state`` with every NumPy array a CPU tensor and every NumPy scalar a Python number."""
    return pytree.tree_map(_leaf, state)
