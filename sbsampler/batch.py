"""Batches: parsing what a wrapped loader yields, and the rows of a training step.

Everything that knows the *shape* of a batch lives here, so that the per-batch
loader (``SelectiveLoader``), the functional step (``select_batch``) and the
sampler side (``WeightedBatches``) read batches the same way:

- ``parse_batch`` splits one batch of a wrapped loader into a ``SubBatch``
  (inputs, targets, indices, extras; weights ``1/B``), checking its lengths;
- ``SubBatch.take`` gathers rows of every field (extras included) and
  ``SubBatch.concat`` joins sub-batches, for the rebatching queue and DDP padding;
- ``adapt_loader`` is the one place where an FFCV ``Loader`` is adapted
  (``sbsampler.ffcv.FFCVBatches``, imported only when one is given);
- ``with_indices`` makes a dataset's items carry their own index, and
  ``weighted_loss`` is the step's loss ``sum_i w_i l_i``.

What the weights mean is written down in ``sbsampler.weights``.
"""

from __future__ import annotations

import dis
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor
from torch.utils import _pytree as pytree

__all__ = [
    "SubBatch",
    "BatchKeys",
    "parse_batch",
    "adapt_loader",
    "is_ffcv_loader",
    "IndexedDataset",
    "with_indices",
    "weighted_loss",
]



@dataclass(frozen=True)
class BatchKeys:
    """Where a dict batch (or a namedtuple's fields) keeps its parts.

    A namedtuple batch whose fields include ``inputs`` and ``targets`` (these names, or
    the ones given here) is read by name; any other by position, unless its field
    names say that would swap inputs and targets (``Batch(label, image)``: refused).

    ``inputs=None`` makes every key other than the targets and indices part of
    the inputs, as a dict (a HuggingFace batch: ``BatchKeys(inputs=None,
    targets="labels")`` gives ``{"input_ids", "attention_mask", ...}`` as inputs,
    for ``model(**inputs)``); otherwise keys not named here are extras.
    """

    inputs: Optional[str] = "inputs"
    targets: str = "targets"
    indices: str = "indices"

    def split(self, batch: Mapping) -> tuple[Any, Any, Any, dict]:
        """``(inputs, targets, indices, extras)`` of a dict batch, read by these keys."""
        named = [k for k in (self.inputs, self.targets) if k is not None]
        missing = [k for k in named if k not in batch]
        if missing:
            raise TypeError(f"dict batches need the keys {named} (BatchKeys), got {sorted(batch)}; missing {missing}")
        rest = {k: v for k, v in batch.items() if k not in (self.inputs, self.targets, self.indices)}
        if self.inputs is None:
            return rest, batch[self.targets], batch.get(self.indices), {}
        return batch[self.inputs], batch[self.targets], batch.get(self.indices), rest


_DEFAULT_KEYS = BatchKeys()


def _is_tensor(value: Any) -> bool:
    return isinstance(value, Tensor)


def tree_rows(tree: Any) -> Optional[int]:
    """The batch size of a tree of tensors: the first dimension of its first tensor leaf (None: no tensor)."""
    for leaf in pytree.tree_leaves(tree):
        if isinstance(leaf, Tensor) and leaf.dim() > 0:
            return int(leaf.shape[0])
    return None


def _tree_take(tree: Any, rows: Tensor) -> Any:
    if _is_tensor(tree):  # the common case, without the tree walk
        return tree[rows.to(tree.device)]
    return pytree.tree_map(lambda t: t[rows.to(t.device)] if _is_tensor(t) else t, tree)


def _tree_to(tree: Any, device: torch.device) -> Any:
    if _is_tensor(tree):
        return tree.to(device, non_blocking=True)
    return pytree.tree_map(lambda t: t.to(device, non_blocking=True) if _is_tensor(t) else t, tree)


def _tree_concat(trees: list, name: str) -> Any:
    def cat(*leaves: Any) -> Any:
        if not _is_tensor(leaves[0]):
            return leaves[0]
        shapes = {tuple(t.shape[1:]) for t in leaves}
        if len(shapes) > 1:
            raise ValueError(
                f"rebatching joins samples of different batches, but their {name} have different shapes "
                f"beyond the batch dimension: {sorted(shapes)} (padded to each batch's longest sequence?); "
                "pad to one fixed length in the collate function, or use rebatch=False"
            )
        return torch.cat(leaves)

    return pytree.tree_map(cat, trees[0], *trees[1:])


def _as_tree(value: Any) -> Any:
    """Inputs or targets as a tree of tensors: NumPy arrays become tensors, mappings (a HuggingFace
    ``BatchEncoding``) become dicts."""
    if isinstance(value, Mapping) and not isinstance(value, dict):
        value = dict(value)
    return pytree.tree_map(lambda v: torch.as_tensor(v) if isinstance(v, np.ndarray) else v, value)


def _check_rows(tree: Any, n: int, name: str) -> None:
    """Every tensor leaf of inputs/targets has the batch dimension ``n``."""
    for leaf in pytree.tree_leaves(tree):
        if _is_tensor(leaf) and (leaf.dim() == 0 or leaf.shape[0] != n):
            got = "a scalar" if leaf.dim() == 0 else f"{leaf.shape[0]} rows"
            raise ValueError(f"{name} hold a tensor with {got} in a batch of {n} samples: every tensor in the "
                             "inputs and targets needs one row per sample")


_UNPACK = dis.opmap.get("UNPACK_SEQUENCE")


def _unpacked_into(frame: Any) -> Optional[int]:
    """How many names the instruction running in ``frame`` unpacks into (``a, b = ...``), or ``None`` when it is no
    plain unpacking (a loop, ``list(...)``, a starred target) or the bytecode cannot be read."""
    try:
        code, at = frame.f_code.co_code, frame.f_lasti
        if _UNPACK is not None and code[at] == _UNPACK:
            return int(code[at + 1])
    except (AttributeError, IndexError, TypeError):  # pragma: no cover - another interpreter
        pass
    return None


@dataclass
class SubBatch:
    """One training step's data (or one parsed batch of the wrapped loader).

    Attributes:
        inputs: (k, ...) the selected inputs, on the batch's device: a tensor or
            any tree (dicts, lists, tuples) of tensors with one row per sample.
        targets: (k, ...) their targets: labels, soft labels, regression values,
            or a tree of them.
        weights: (k,) float32 loss weights: the step's loss is ``sum(w * l)``
            (see ``sbsampler.weights`` for what they mean).
        indices: (k,) int64 dataset indices (stream positions when the wrapped
            loader provides none): on the CPU, or beside the rows that chose them
            when the strategy chose on the batch's device (``select_batch``).
        extras: the batch's other fields, gathered alongside: a dict batch's
            other keys, or a tuple batch's items after the indices by position
            (3, 4, ...). Tensors, arrays, lists and tuples are per-sample (one
            row per sample) and gathered, unless their key is in ``batch_level``;
            other values (strings, numbers, dicts) pass through unchanged.
        batch_level: keys of ``extras`` that belong to the whole batch (a
            class-weight vector, say): passed through, never gathered.
    """

    inputs: Any
    targets: Any
    weights: Tensor
    indices: Tensor
    extras: dict = field(default_factory=dict)
    batch_level: frozenset = frozenset()

    def __len__(self) -> int:
        return int(self.weights.shape[0])

    def __iter__(self) -> Iterator[Any]:
        """Unpack as ``x, y, w, idx = batch``; ``x, y = batch`` raises a ``ValueError`` naming the fields (a
        training step written for ``(inputs, targets)`` batches would otherwise drop the weights)."""
        wanted = _unpacked_into(sys._getframe(1))
        if wanted is not None and wanted != 4:
            raise ValueError(
                f"a SubBatch unpacks into 4 values (x, y, w, idx = batch), not {wanted}: read batch.inputs, "
                "batch.targets and batch.weights, and weight the per-sample losses: "
                "sb.weighted_loss(F.cross_entropy(model(batch.inputs), batch.targets, reduction='none'), "
                "batch.weights)")
        return iter((self.inputs, self.targets, self.weights, self.indices))

    def to(self, device: Optional[torch.device]) -> "SubBatch":
        """Inputs and targets (every tensor in them) moved to ``device`` (``None``: unchanged); weights follow."""
        if device is None:
            return self
        return SubBatch(_tree_to(self.inputs, device), _tree_to(self.targets, device), self.weights.to(device),
                        self.indices, self.extras, self.batch_level)

    def take(self, rows: Tensor, weights: Optional[Tensor] = None) -> "SubBatch":
        """The rows ``rows`` (int64 positions) of every field; ``weights`` replaces theirs when given.

        Positions on the batch's device gather there with no host round trip (the
        indices go to that device, without waiting, rather than the rows to the host).
        """
        n = len(self)
        indices = self.indices if rows.device == self.indices.device else self.indices.to(rows.device,
                                                                                           non_blocking=True)
        return SubBatch(
            _tree_take(self.inputs, rows),
            _tree_take(self.targets, rows),
            self.weights[rows.to(self.weights.device)] if weights is None else weights,
            indices[rows],
            {k: v if k in self.batch_level else _take_field(v, rows, n) for k, v in self.extras.items()},
            self.batch_level,
        )

    @staticmethod
    def concat(parts: Sequence["SubBatch"], same_batch: bool = False) -> "SubBatch":
        """The rows of ``parts`` one after the other, extras included.

        ``same_batch``: the parts are rows of one batch, so its batch-level
        fields carry over; otherwise a batch-level field cannot be joined.
        """
        if len(parts) == 1:
            return parts[0]
        return SubBatch(
            _tree_concat([p.inputs for p in parts], "inputs"),
            _tree_concat([p.targets for p in parts], "targets"),
            torch.cat([p.weights for p in parts]),
            torch.cat([p.indices for p in parts]),
            {k: _concat_field([p.extras[k] for p in parts], k, parts[0].batch_level, same_batch)
             for k in parts[0].extras},
            parts[0].batch_level,
        )


def _is_sequence(value: Any) -> bool:
    """Tensors, arrays, lists and tuples: the values an extra field can hold one row per sample in."""
    return isinstance(value, (Tensor, np.ndarray, list, tuple)) and not (
        isinstance(value, (Tensor, np.ndarray)) and value.ndim == 0)


def _rows_of(value: Any) -> int:
    return int(value.shape[0]) if isinstance(value, (Tensor, np.ndarray)) else len(value)


def _take_field(value: Any, rows: Tensor, n: int) -> Any:
    """Rows of a per-sample value (tensor, array or list); a value of another kind unchanged."""
    if not _is_sequence(value):
        return value
    if isinstance(value, Tensor):
        return value[rows.to(value.device)]
    if isinstance(value, np.ndarray):
        return value[rows.cpu().numpy()]
    picked = [value[i] for i in rows.tolist()]
    return type(value)(picked) if isinstance(value, tuple) else picked


def _concat_field(values: list, key: Any, batch_level: frozenset, same_batch: bool) -> Any:
    whole_batch = key in batch_level or not all(_is_sequence(v) for v in values)
    if whole_batch and same_batch:
        return values[0]  # rows of one batch (a queue entry split, DDP padding): its batch-level value
    if whole_batch:
        raise TypeError(
            f"extra field {key!r} is not per-sample (it belongs to the whole batch), so it cannot be rebatched "
            "across batches; make it per-sample or use rebatch=False"
        )
    first = values[0]
    if isinstance(first, Tensor):
        return torch.cat(values)
    if isinstance(first, np.ndarray):
        return np.concatenate(values)
    return [v for part in values for v in part]


def _check_extras(extras: dict, n: int, batch_level: frozenset) -> None:
    """Every sequence extra not named batch-level must have one row per sample: no guessing by length."""
    for key, value in extras.items():
        if key not in batch_level and _is_sequence(value) and _rows_of(value) != n:
            raise ValueError(
                f"extra field {key!r} has {_rows_of(value)} rows for a batch of {n} samples: tensors, arrays and "
                "lists in a batch are per-sample (one row per sample); name a field that belongs to the whole "
                f"batch in batch_fields=({key!r},)"
            )


_TARGET_NAMES = {"y", "label", "labels", "target", "targets", "class", "classes", "cls"}
_INPUT_NAMES = {"x", "input", "inputs", "image", "images", "img", "imgs", "data", "features", "input_ids",
                "pixel_values"}


def _namedtuple_fields(batch: Any, keys: BatchKeys) -> Optional[dict]:
    """A namedtuple batch as a dict when it names the ``keys``' inputs and targets, else ``None`` (read by position);
    a ``TypeError`` when its field names say that reading it by position would swap inputs and targets."""
    fields = getattr(batch, "_fields", None)
    if not isinstance(batch, tuple) or not isinstance(fields, tuple) or len(fields) < 2:
        return None
    if keys.targets in fields and (keys.inputs is None or keys.inputs in fields):
        return batch._asdict()
    lowered = [str(f).lower() for f in fields]
    if lowered[0] in _TARGET_NAMES or lowered[1] in _INPUT_NAMES:
        inputs = next((f for f, low in zip(fields, lowered) if low in _INPUT_NAMES), fields[1])
        targets = next((f for f, low in zip(fields, lowered) if low in _TARGET_NAMES), fields[0])
        which = (f"its first field {fields[0]!r} looks like the targets" if lowered[0] in _TARGET_NAMES
                 else f"its second field {fields[1]!r} looks like the inputs")
        raise TypeError(
            f"a namedtuple {type(batch).__name__}({', '.join(fields)}) is read by position as (inputs, targets[, "
            f"indices]), but {which}: pass batch_keys=BatchKeys(inputs={inputs!r}, targets={targets!r}) to read it by "
            "name, or put the inputs first")
    return None


def _split(batch: Any, keys: BatchKeys) -> tuple[Any, Any, Any, dict]:
    """``(inputs, targets, indices or None, extras)`` of one batch of the wrapped loader."""
    named = _namedtuple_fields(batch, keys)
    if named is not None:
        return keys.split(named)
    if isinstance(batch, Mapping):
        return keys.split(batch)
    if isinstance(batch, Sequence) and not isinstance(batch, (str, bytes)) and len(batch) >= 2:
        idx = batch[2] if len(batch) >= 3 else None
        return batch[0], batch[1], idx, {j: batch[j] for j in range(3, len(batch))}
    length = f" of length {len(batch)}" if hasattr(batch, "__len__") else ""
    raise TypeError(
        "batches must be (inputs, targets[, indices, *extras]) sequences or a dict with 'inputs' and "
        f"'targets' keys; got {type(batch).__name__}{length}"
    )


def _index_tensor(idx: Any, n: int) -> Tensor:
    t = torch.as_tensor(idx).reshape(-1)
    if t.dtype.is_floating_point or t.dtype == torch.bool:
        raise TypeError(f"indices must be integers, got dtype {t.dtype}")
    t = t.to("cpu", torch.int64, copy=True)  # a copy: FFCV reuses its output buffers
    if t.shape[0] != n:
        raise ValueError(f"got {t.shape[0]} indices for a batch of {n} samples")
    return t


def parse_batch(batch: Any, first_position: Optional[int] = None, batch_fields: Iterable = (),
                keys: BatchKeys = _DEFAULT_KEYS) -> SubBatch:
    """One batch of a wrapped loader as a ``SubBatch`` with weights ``1/B``.

    Accepts ``(inputs, targets[, indices, *extras])`` sequences and dicts (any
    mapping, e.g. a HuggingFace ``BatchEncoding``) with the ``keys`` of
    ``BatchKeys`` (default ``"inputs"``, ``"targets"``, ``"indices"``); other
    fields go to ``extras``. Inputs and targets may be tensors, NumPy arrays, or
    trees (dicts, lists, tuples) of them, every tensor with one row per sample.
    A batch without indices gets the stream positions ``first_position,
    first_position + 1, ...``; with ``first_position=None`` it is refused (the
    caller needs dataset indices).

    Extras that are tensors, arrays, lists or tuples are per-sample and must have
    one row per sample, except those whose key (dict key, or tuple position 3,
    4, ...) is in ``batch_fields``: those belong to the whole batch and pass
    through. Other values (strings, numbers, dicts) always pass through.

    Raises:
        TypeError: a batch of another shape, or non-integer indices.
        ValueError: inputs, targets and indices of different lengths, or no
            indices where they are needed.
    """
    x, y, idx, extras = _split(batch, keys)
    if not (_is_tensor(x) and _is_tensor(y)):  # plain tensors (the common case) need no tree walk
        x, y = _as_tree(x), _as_tree(y)
    if isinstance(y, Tensor) and y.dim() == 0:
        raise TypeError(
            "got a single unbatched sample (its target is a scalar): the wrapped loader must yield batches; "
            "DataLoader(batch_size=None) turns batching off, give it a batch_size"
        )
    n = tree_rows(x) if not _is_tensor(x) or x.dim() == 0 else int(x.shape[0])
    if n is None:
        raise TypeError(f"the inputs hold no tensor with a batch dimension (got {type(x).__name__})")
    m = tree_rows(y) if not _is_tensor(y) else int(y.shape[0])
    if m is not None and m != n:
        raise ValueError(f"inputs have {n} samples but targets have {m}")
    if not _is_tensor(x):
        _check_rows(x, n, "inputs")
    if not _is_tensor(y):
        _check_rows(y, n, "targets")
    if idx is not None:
        indices = _index_tensor(idx, n)
    elif first_position is not None:
        indices = torch.arange(first_position, first_position + n)
    else:
        raise ValueError("batches carry no dataset indices: wrap the dataset with sbsampler.with_indices(dataset) "
                         "(or write the .beton with sbsampler.ffcv.write_beton)")
    batch_level = frozenset(batch_fields)
    _check_extras(extras, n, batch_level)
    device = x.device if _is_tensor(x) else next(t.device for t in pytree.tree_leaves(x) if _is_tensor(t))
    weights = torch.full((n,), 1.0 / n if n else 0.0, device=device)
    return SubBatch(x, y, weights, indices, extras, batch_level)


def is_ffcv_loader(obj: Any) -> bool:
    """Whether ``obj`` is an ``ffcv.loader.Loader`` (checked without importing FFCV)."""
    return type(obj).__module__.startswith("ffcv.") and hasattr(obj, "reader") and hasattr(obj, "pipeline_specs")


def adapt_loader(loader: Iterable) -> Iterable:
    """The loader as a re-iterable of batches that ``parse_batch`` reads.

    An FFCV ``Loader`` is wrapped in ``sbsampler.ffcv.FFCVBatches`` (its output
    tuple mapped to ``(images, labels, indices)`` by field name); anything else
    is returned unchanged.
    """
    if is_ffcv_loader(loader):
        from .ffcv import FFCVBatches

        return FFCVBatches(loader)
    return loader


class IndexedDataset(torch.utils.data.Dataset):
    """A map-style dataset whose items gain their own index: ``(*item, index)``."""

    def __init__(self, dataset: Any) -> None:
        if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
            raise TypeError(
                f"with_indices needs a map-style dataset (__getitem__ and __len__), got {type(dataset).__name__}"
            )
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple:
        item = self.dataset[index]
        if not isinstance(item, (tuple, list)):
            raise TypeError(f"dataset items must be (input, target) tuples, got {type(item).__name__}")
        return (*item, index)


def with_indices(dataset: Any) -> IndexedDataset:
    """Wrap a map-style dataset so each ``(x, y)`` item becomes ``(x, y, index)``.

    A ``DataLoader`` over the result yields ``(inputs, targets, indices)``
    batches, and ``SelectiveLoader`` reports dataset indices in ``batch.indices``.
    """
    return IndexedDataset(dataset)


def weighted_loss(losses: Tensor, weights: Tensor, indices: Optional[Tensor] = None) -> Tensor:
    """``sum_i w_i * l_i``: the step's loss, an estimate of the mean loss of the samples it stands for.

    Args:
        losses: (k,) per-sample losses (``reduction="none"``).
        weights: (k,) weights from ``SubBatch.weights``; moved to the losses'
            device and dtype.
        indices: (k,) the step's dataset indices (``SubBatch.indices``); given,
            a non-finite loss raises ``ValueError`` naming its samples. The check
            for a strategy that runs no scoring pass (``Uniform``, ``Full``),
            which no ``nan_policy`` sees; it reads one flag back per step (on a
            GPU, a wait for the forward).
    """
    if losses.dim() != 1:
        raise ValueError(f"losses must be per-sample, shape (k,); got {tuple(losses.shape)} (use reduction='none')")
    if weights.shape != losses.shape:
        raise ValueError(f"weights {tuple(weights.shape)} and losses {tuple(losses.shape)} must have the same shape")
    if indices is not None:
        finite = torch.isfinite(losses.detach())
        if not bool(finite.all()):
            bad = (~finite).nonzero().flatten().cpu()
            raise ValueError(f"non-finite loss for dataset indices {indices.cpu()[bad][:10].tolist()} "
                             f"({bad.numel()} of the step's {losses.shape[0]} samples)")
    return (losses * weights.to(device=losses.device, dtype=losses.dtype)).sum()
