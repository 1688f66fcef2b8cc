"""State dicts that load under ``torch.load(weights_only=True)``, and the checks every ``load_state_dict`` makes.

A framework's checkpoint (Lightning's, the HF Trainer's) is loaded with torch's
safe unpickler, which refuses NumPy arrays and scalars and any other object: a
tampered checkpoint could otherwise run code on load. Every ``state_dict()`` in
sbsampler holds tensors and plain Python values only (``safe_state`` is the last
guard), and every ``load_state_dict`` reads tensors, NumPy arrays or lists back.

Loading checks before it changes anything: the kind of state and its format
version (``check_version``), which class saved it (``check_saved_by``), and each
array's type, shape and length (``read_array``), raising ``ValueError`` naming
the mismatch; the object is only changed once everything has been read.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Optional

import numpy as np
import torch
from torch.utils import _pytree as pytree

__all__ = ["safe_state", "check_version", "check_saved_by", "read_array", "read_int", "read_number", "require",
           "is_int"]


def _leaf(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.array(value, copy=True))
    if isinstance(value, np.generic):
        return value.item()
    return value


def safe_state(state: Any) -> Any:
    """``state`` with every NumPy array a CPU tensor and every NumPy scalar a Python number."""
    return pytree.tree_map(_leaf, state)


def is_int(value: Any) -> bool:
    """A saved whole number: a Python ``int``, not a ``bool``."""
    return isinstance(value, int) and not isinstance(value, bool)


def read_int(value: Any, name: str, kind: str, low: Optional[int] = 0, none: bool = False) -> Optional[int]:
    """A saved whole number ``>= low`` (``low=None``: any), or ``None`` where ``none`` allows it."""
    if value is None and none:
        return None
    if not is_int(value) or (low is not None and value < low):
        what = "an int" + (f" >= {low}" if low is not None else "") + (" or None" if none else "")
        raise ValueError(f"{kind} state field {name!r} must be {what}, got {value!r}")
    return int(value)


def read_number(value: Any, name: str, kind: str, low: float = 0.0, positive: bool = False,
                none: bool = False) -> Optional[float]:
    """A saved finite real number ``>= low`` (``> low`` where ``positive``), or ``None`` where ``none`` allows it."""
    if value is None and none:
        return None
    ok = (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
          and (value > low if positive else value >= low))
    if not ok:
        what = f"a finite number {'>' if positive else '>='} {low:g}" + (" or None" if none else "")
        raise ValueError(f"{kind} state field {name!r} must be {what}, got {value!r}")
    return float(value)


def require(state: Any, keys: Iterable[str], kind: str) -> None:
    """``state`` is a dict holding ``keys``."""
    if not isinstance(state, dict):
        raise ValueError(f"a {kind} state must be a dict (from {kind}.state_dict()), got {type(state).__name__}")
    missing = [k for k in keys if k not in state]
    if missing:
        raise ValueError(f"this {kind} state lacks {missing}: it was not saved by {kind}.state_dict()")


def check_version(state: dict, kind: str, readable: tuple, legacy: Optional[int] = None) -> int:
    """The state's ``version``, if this sbsampler reads it; ``legacy`` stands for a state saved without one."""
    version = state.get("version", legacy)
    if version not in readable:
        raise ValueError(f"unknown {kind} state version {state.get('version')!r} (this sbsampler reads versions "
                         f"{readable}); save it again with this sbsampler's {kind}.state_dict()")
    return int(version)


def check_saved_by(state: dict, key: str, expected: str, kind: str) -> None:
    """The class (or other name) recorded under ``key`` is ``expected``, when the state records one."""
    saved = state.get(key)
    if saved is not None and saved != expected:
        raise ValueError(f"this {kind} state was saved with {key} {saved!r}, this {kind} has {expected!r}: "
                         "load it into a matching object")


def read_array(value: Any, name: str, kind: str, length: Optional[int] = None, integer: bool = False,
               dims: int = 1, low: Optional[float] = None, high: Optional[float] = None,
               finite: bool = False) -> np.ndarray:
    """A saved array (tensor, NumPy array or list) as a fresh NumPy array, checked.

    ``integer``: int64 values (a float array is refused, never cast); else float64.
    ``length``: the first dimension it must have.
    ``low``/``high``: every value lies in ``[low, high)`` (NaN, meaning unknown, is let
    through unless ``finite``). ``finite``: no NaN or infinity.
    """
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    elif not isinstance(value, (np.ndarray, list, tuple)):
        raise ValueError(f"{kind} state field {name!r} must be an array, got {type(value).__name__}")
    arr = np.asarray(value)
    if arr.ndim != dims and not (arr.size == 0 and dims == 1):
        raise ValueError(f"{kind} state field {name!r} must have {dims} dimension(s), got shape {arr.shape}")
    if arr.size and (arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.number)):
        raise ValueError(f"{kind} state field {name!r} must hold numbers, got dtype {arr.dtype}")
    if integer and arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{kind} state field {name!r} must hold integers, got dtype {arr.dtype}")
    if length is not None and arr.shape[0] != length:
        raise ValueError(f"{kind} state field {name!r} has {arr.shape[0]} entries, expected {length}")
    out = np.array(arr.reshape(-1) if dims == 1 else arr, dtype=np.int64 if integer else np.float64, copy=True)
    if finite and not np.isfinite(out).all():
        raise ValueError(f"{kind} state field {name!r} holds non-finite values")
    known = out[~np.isnan(out)] if not integer else out
    if low is not None and known.size and known.min() < low:
        raise ValueError(f"{kind} state field {name!r} holds {known.min():g}, below its least value {low:g}")
    if high is not None and known.size and known.max() >= high:
        raise ValueError(f"{kind} state field {name!r} holds {known.max():g}: it must be below {high:g}")
    return out
