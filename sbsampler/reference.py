"""Reference (irreducible) losses for RHO-LOSS: a model trained on held-out data scores the training set, once.

``reference_losses`` runs one no-graph scoring forward (``ScoringHook``, losses only) of a
reference model over a loader of the training set and returns each sample's loss by its
dataset index, for ``ScoreStore.set_reference`` and ``RhoLoss`` (``sbsampler.strategies``)::

    ref_model = train_on(holdout)                                   # your own loop
    store = sb.ScoreStore(len(train_set))
    store.set_reference(sb.reference.reference_losses(ref_model, DataLoader(sb.with_indices(train_set), 256),
                                                      len(train_set)))
    loader = sb.SelectiveLoader(train_loader, hook, sb.RhoLoss(reference=store), fraction=0.1)

Mindermann et al. train the reference ("irreducible loss") model on a holdout split of the
training data; a small model will do (the paper's ablations). Any batch structure the
loader's ``parse_batch`` reads works; the batches need dataset indices (``with_indices``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Callable, Optional, Union

import numpy as np
import torch
from torch import Tensor, nn

from .batch import BatchKeys, parse_batch
from .hook import ScoringHook

__all__ = ["reference_losses"]


def reference_losses(model: nn.Module, loader: Iterable, num_samples: int, *,
                     loss: Union[str, Callable[[Tensor, Any], Tensor]] = "cross_entropy",
                     device: Union[None, str, torch.device] = None, batch_keys: BatchKeys = BatchKeys(),
                     hook: Optional[ScoringHook] = None, progress: bool = True) -> np.ndarray:
    """Each sample's loss under ``model``, by dataset index: a float64 (``num_samples``,) array.

    Args:
        model: the reference model (its modes and buffers are left as they are).
        loader: batches of the training set with dataset indices (``(inputs, targets, indices)``
            or dicts with an ``"indices"`` key; ``sb.with_indices(dataset)``).
        num_samples: the dataset's size (the array's length).
        loss: the per-sample loss (``ScoringHook(loss=)``): ``"cross_entropy"`` or a callable.
        device: move each batch there first.
        batch_keys: where dict batches keep their parts.
        hook: a ``ScoringHook`` on ``model`` to use instead (its ``loss``, ``forward``, ``logits``).
        progress: a progress bar (tqdm, when installed).

    Raises:
        ValueError: a batch without indices, an index out of range, a non-finite loss, or a
            sample of the dataset never scored.
    """
    hook = hook or ScoringHook(model, head=False, loss=loss)
    out = np.full(int(num_samples), np.nan)
    batches: Iterable = loader
    if progress:
        try:
            from tqdm.auto import tqdm

            batches = tqdm(loader, desc="reference losses", leave=False)
        except ImportError:  # pragma: no cover - tqdm is optional
            pass
    for raw in batches:
        batch = parse_batch(raw, None, keys=batch_keys)  # None: dataset indices, never stream positions
        if device is not None:
            batch = batch.to(torch.device(device))
        idx = batch.indices.cpu().numpy()
        if idx.size and (idx.min() < 0 or idx.max() >= out.shape[0]):
            raise ValueError(f"dataset index {int(idx.max())} is out of range for num_samples={num_samples}")
        losses = hook.score(batch.inputs, batch.targets).loss.detach().to("cpu", torch.float64).numpy()
        bad = ~np.isfinite(losses)
        if bad.any():
            raise ValueError(f"the reference model's loss is not finite for dataset indices {idx[bad][:10].tolist()}")
        out[idx] = losses
    missing = np.flatnonzero(np.isnan(out))
    if missing.size:
        raise ValueError(f"{missing.size} samples were never scored (indices {missing[:10].tolist()}): the loader "
                         f"must cover all {num_samples} samples once")
    return out
