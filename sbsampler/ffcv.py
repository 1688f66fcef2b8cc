"""FFCV adapter: write ``.beton`` files that know their sample indices, read FFCV batches.

``write_beton`` stores each sample's own dataset index in an ``IntField`` named
``"index"``, so every FFCV batch says which rows it holds. ``SelectiveLoader`` and
``WeightedBatches`` accept an ``ffcv.loader.Loader`` directly:
``sbsampler.batch.adapt_loader`` wraps it in ``FFCVBatches``, which maps its output
tuple to ``(images, labels, indices)`` by field name. Scoring and the gather run on
whatever device the pipeline's ``ToDevice`` chose; only the small per-sample score
arrays reach the Numba kernels. FFCV reuses its output buffers between batches;
``SelectiveLoader`` only keeps gathered copies (``x[idx]``), so nothing it holds
across steps (the rebatching queue) aliases those buffers.

``selective_order(sampler)`` gives a ``SelectiveOrder``, the FFCV traversal order
that loads a ``SelectiveSampler``'s plan each epoch.

This module imports FFCV; the rest of sbsampler works without it (``sbsampler.ffcv``
is imported on first use).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Optional, Union

import numpy as np
import torch

try:
    from ffcv.fields import IntField, RGBImageField
    from ffcv.traversal_order.base import TraversalOrder
    from ffcv.writer import DatasetWriter
except ImportError as err:  # pragma: no cover - exercised only without FFCV
    raise ImportError(
        "sbsampler.ffcv needs FFCV (the .beton loader): install it with `bash scripts/install_ffcv.sh` "
        f"({err})"
    ) from err

__all__ = ["INDEX_FIELD", "write_beton", "FFCVBatches", "SelectiveOrder", "selective_order"]

#: name of the per-sample index field that ``write_beton`` adds
INDEX_FIELD = "index"


def _to_hwc_uint8(image: Any) -> np.ndarray:
    """An image as an (H, W, 3) uint8 array: from PIL, NumPy HWC/HW or torch CHW/HW (float in [0, 1] or uint8)."""
    if hasattr(image, "convert") and hasattr(image, "size"):  # PIL
        return np.asarray(image.convert("RGB"), dtype=np.uint8)
    if isinstance(image, torch.Tensor):
        t = image.detach().cpu()
        if t.dim() == 3 and t.shape[0] in (1, 3) and t.shape[-1] not in (1, 3):
            t = t.permute(1, 2, 0)
        arr = t.numpy()
    else:
        arr = np.asarray(image)
    if arr.dtype != np.uint8:
        if not np.issubdtype(arr.dtype, np.floating):
            raise TypeError(f"images must be uint8 or float in [0, 1], got dtype {arr.dtype}")
        arr = np.clip(np.round(arr * 255.0), 0, 255).astype(np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3):
        raise ValueError(f"images must be (H, W), (H, W, 1|3) or (1|3, H, W); got shape {arr.shape}")
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    return np.ascontiguousarray(arr)


class _IndexedImages:
    """Dataset view yielding ``(HWC uint8 image, int label, int index)`` for the writer."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int, int]:
        image, label = self.dataset[i][:2]
        return _to_hwc_uint8(image), int(label), int(i)


def write_beton(
    dataset: Any,
    path: Union[str, Path],
    *,
    write_mode: str = "raw",
    max_resolution: Optional[int] = None,
    jpeg_quality: int = 90,
    compress_probability: Optional[float] = None,
    num_workers: int = 1,
    chunk_size: int = 100,
    image_field: str = "image",
    label_field: str = "label",
) -> Path:
    """Write an indexable ``(image, label)`` dataset to an FFCV ``.beton`` with an index field.

    Fields: ``image_field`` (``RGBImageField``), ``label_field`` (``IntField``) and
    ``"index"`` (``IntField``, the sample's position in ``dataset``).

    Args:
        dataset: ``dataset[i]`` gives ``(image, label, ...)``; images may be PIL,
            NumPy (H, W[, C]) or torch (C, H, W) tensors, uint8 or float in [0, 1];
            grayscale is repeated to RGB.
        path: the ``.beton`` file to write (parent folders are created).
        write_mode: ``"raw"`` (lossless) or ``"jpg"`` (FFCV's ``RGBImageField``
            modes; ``"smart"`` and ``"proportion"`` work too).
        max_resolution: resize so the longer side is at most this (FFCV's option).
        jpeg_quality: JPEG quality for ``"jpg"`` (and the JPEG share of ``"proportion"``).
        compress_probability: with ``"proportion"``, the share of images stored as JPEG
            (ffcv-imagenet writes ImageNet with ``"proportion"``, 0.5, quality 90, max 500 px).
        num_workers: FFCV writer processes.
        chunk_size: samples per writer chunk.

    Returns:
        The path written.
    """
    if len(dataset) == 0:
        raise ValueError("cannot write an empty dataset to a .beton")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image_kw: dict[str, Any] = {"write_mode": write_mode, "jpeg_quality": jpeg_quality}
    if compress_probability is not None:
        image_kw["compress_probability"] = compress_probability
    if max_resolution is not None:
        image_kw["max_resolution"] = max_resolution
    fields = {image_field: RGBImageField(**image_kw), label_field: IntField(), INDEX_FIELD: IntField()}
    writer = DatasetWriter(str(path), fields, num_workers=num_workers)
    writer.from_indexed_dataset(_IndexedImages(dataset), chunksize=chunk_size)
    return path


class FFCVBatches:
    """Re-iterable view of an FFCV ``Loader`` as ``(inputs, targets, indices)`` batches.

    Args:
        loader: the ``ffcv.loader.Loader``.
        image_field: the input field; default the first field that is neither
            the label nor the index.
        label_field: the label field (default ``"label"``).
        index_field: the per-sample index field (default ``"index"``).

    Raises:
        ValueError: if the ``.beton`` has no index field (or it is disabled in
            ``pipelines``), naming how to write one.
    """

    def __init__(self, loader: Any, image_field: Optional[str] = None, label_field: str = "label",
                 index_field: str = INDEX_FIELD) -> None:
        names = list(loader.pipeline_specs.keys())  # the order of FFCV's output tuple
        if index_field not in names:
            raise ValueError(
                f"the FFCV loader for {getattr(loader, 'fname', '?')} yields fields {names} but no "
                f"{index_field!r} field, so batches cannot name their samples; write the .beton with "
                f"sbsampler.ffcv.write_beton(dataset, path) (it adds an IntField {index_field!r} holding "
                "each sample's index), or pass index_field= naming your own"
            )
        if label_field not in names:
            raise ValueError(f"no label field {label_field!r} among the FFCV loader's fields {names}")
        if image_field is None:
            rest = [n for n in names if n not in (label_field, index_field)]
            if not rest:
                raise ValueError(f"no input field among the FFCV loader's fields {names}")
            image_field = rest[0]
        elif image_field not in names:
            raise ValueError(f"no input field {image_field!r} among the FFCV loader's fields {names}")
        self.loader = loader
        self.positions = (names.index(image_field), names.index(label_field), names.index(index_field))
        self.batch_size = int(loader.batch_size)
        self.drop_last = bool(loader.drop_last)

    @property
    def num_samples(self) -> int:
        """Samples the loader traverses per epoch (before ``drop_last``)."""
        return len(self.loader.indices)

    def __len__(self) -> int:
        """Batches of the loader's next epoch (from the plan, under ``selective_order``)."""
        order = self.loader.traversal_order
        if isinstance(order, SelectiveOrder):  # FFCV 1.0.2's own len() is the first epoch's
            n = order.sampler.num_indices(self.loader.next_epoch)
            return n // self.batch_size if self.drop_last else -(-n // self.batch_size)
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        ix, iy, ii = self.positions
        for batch in self.loader:
            yield batch[ix], batch[iy].reshape(-1), batch[ii].reshape(-1)


class SelectiveOrder(TraversalOrder):
    """An FFCV traversal order whose epoch ``e`` is a ``SelectiveSampler``'s plan for ``e``.

    Made by ``selective_order(sampler)``; see there. Written for PyPI FFCV 1.0.2,
    which accepts an *instance* of ``TraversalOrder`` and calls it with the loader
    to bind it.
    """

    def __init__(self, sampler: Any) -> None:  # no loader yet: FFCV binds it by calling us
        self.sampler = sampler
        self.loader = None
        self.indices = None
        self.seed = sampler.seed
        self.distributed = False

    def __call__(self, loader: Any) -> "SelectiveOrder":
        n = len(self.sampler.store)
        if len(loader.indices) != n or not np.array_equal(np.asarray(loader.indices), np.arange(n)):
            raise ValueError(
                f"selective_order needs the loader to traverse all {n} samples of the store "
                f"(got {len(loader.indices)} indices); drop Loader(indices=...)"
            )
        self.loader, self.indices, self.distributed = loader, loader.indices, loader.distributed
        return self

    def sample_order(self, epoch: int) -> np.ndarray:
        """FFCV's hook: the dataset indices to load in ``epoch``, the sampler's plan for it (this rank's shard)."""
        self.sampler.set_epoch(epoch)
        order = np.fromiter(iter(self.sampler), dtype=np.int64)
        if self.loader is not None:
            self.loader.first_traversal_order = order  # FFCV 1.0.2 takes len() and the cut from here
        return order


def selective_order(sampler: Any) -> SelectiveOrder:
    """An FFCV traversal order that loads, each epoch, the plan of a ``SelectiveSampler``.

    Pass it as ``Loader(path, order=selective_order(sampler), ...)`` and iterate
    with ``sbsampler.WeightedBatches(loader, sampler)``. PyPI FFCV 1.0.2 freezes
    ``len(loader)`` at the first epoch's order and cuts every later epoch's order
    to that length; the order refreshes the loader's notion of length each time
    it draws an epoch, so a later epoch that loads more samples is not cut short
    (``WeightedBatches``'s ``len()`` reads the plan itself).

    The FFCV loader's epoch counter drives ``sampler.set_epoch``. The loader
    must traverse the whole ``.beton`` (no ``indices=`` subset): the store's
    indices are the ``.beton``'s sample indices.
    """
    return SelectiveOrder(sampler)
