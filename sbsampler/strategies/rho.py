"""RHO-LOSS (Mindermann et al. 2022): the top k by reducible loss."""

from __future__ import annotations

from typing import Any, Optional, Union

import numpy as np
import torch

from .. import kernels, ondevice
from ..scores import Scores
from .base import (
    Seed,
    Selection,
    Strategy,
    _device_loss,
    _equal_weights,
    _numpy,
    _uniform_weights,
)


class RhoLoss(Strategy):
    """RHO-LOSS (Mindermann et al. 2022, "Prioritized Training on Points that are Learnable, Worth Learning, and
    Not Yet Learnt"): the ``k`` largest *reducible* losses, ``w = 1/k``.

    Reducible loss = the training model's loss - the sample's *irreducible* loss, the loss of a
    model trained on held-out data (``sbsampler.reference.reference_losses``), computed once and
    looked up by dataset index. A mislabelled or ambiguous sample has a high loss under both
    models, so its reducible loss is small and it is rarely picked; a learnable, not yet learnt
    sample has a high loss only under the training model. The reference code
    (``OATML/RHO-Loss``, ``reducible_loss_selection``) takes the top ``k`` of ``loss -
    irreducible`` and trains on the mean loss of those: the same rule, equal weights, ties to the
    lower position. Not a registered name: it needs its reference losses.

    Args:
        reference: the irreducible losses, by dataset index: a ``ScoreStore`` whose
            ``reference`` column is set (``ScoreStore.set_reference``), or an (N,) array or tensor.
        seed: unused (the rule is deterministic); for the common signature.
    """

    name = "rho"
    needs_reference = True
    selects_on_device = True

    def __init__(self, reference: Any = None, seed: Seed = None) -> None:
        super().__init__(seed)
        if reference is not None and not hasattr(reference, "reference"):  # an array: checked now, once
            table = np.asarray(reference.numpy() if isinstance(reference, torch.Tensor) else reference,
                               dtype=np.float64)
            if table.ndim != 1:
                raise ValueError(f"RhoLoss(reference=) takes one loss per dataset index, a 1-D array; got shape "
                                 f"{table.shape}")
            inf = np.flatnonzero(np.isinf(table))
            if inf.size:
                raise ValueError(f"infinite reference loss for dataset indices {inf[:10].tolist()}: that sample would "
                                 "never (or always) be picked. Leave a sample without a reference as NaN (it is "
                                 "then refused when it is drawn), or fix the reference model's losses")
            reference = table
        self.reference = reference

    def _store(self) -> bool:
        """Whether the reference losses are a ``ScoreStore``'s column (else an array, or none)."""
        return hasattr(self.reference, "set_reference")

    def _table(self) -> Optional[np.ndarray]:
        """The reference losses by dataset index: the store's column, or the array given; ``None`` without any."""
        return self.reference.reference if self._store() else self.reference

    def check_dataset_size(self, n: int) -> None:
        """Refuse a reference table of another length than the dataset's ``n`` samples: its values would be looked
        up by indices of another dataset."""
        size = len(self.reference) if self._store() else (len(self.reference) if self.reference is not None else n)
        if size != n:
            raise ValueError(f"RhoLoss has {size} reference losses for a dataset of {n} samples: they come "
                             "from another dataset (or split); compute one per sample of this one "
                             "(sb.reference.reference_losses)")

    def reference_for(self, indices: Union[np.ndarray, torch.Tensor]) -> torch.Tensor:
        """(B,) float64 reference losses of the dataset ``indices``; an error names any without one."""
        table = self._table()
        if table is None and self._store():
            raise ValueError("the ScoreStore holds no reference losses: call store.set_reference(sb.reference."
                             "reference_losses(reference_model, loader, len(dataset))) before training (a store "
                             "loaded from a state saved without them, version 1 or before set_reference, has none)")
        if table is None:
            raise ValueError("RhoLoss needs reference losses: RhoLoss(reference=store) with store.set_reference("
                             "sb.reference.reference_losses(reference_model, loader, len(dataset))), or an array")
        idx = torch.as_tensor(indices).to("cpu", torch.int64).reshape(-1).numpy()
        if idx.size and (int(idx.min()) < 0 or int(idx.max()) >= table.shape[0]):
            raise ValueError(f"dataset index {int(idx.max())} is out of range for {table.shape[0]} reference losses: "
                             "the batches need their dataset indices (sb.with_indices)")
        ref = torch.from_numpy(np.asarray(table[idx], dtype=np.float64))  # only the batch's rows are read
        missing = torch.isnan(ref)
        if bool(missing.any()):
            raise ValueError(f"no reference loss for dataset indices {idx[missing.numpy()][:10].tolist()}: compute "
                             "them for every training sample (sb.reference.reference_losses)")
        return ref

    def _reducible(self, scores: Scores, loss: Any) -> Any:
        if scores.reference is None:
            raise ValueError("RhoLoss reads Scores.reference: select through select_batch, SelectiveLoader or "
                             "SelectiveSampler, which look it up by dataset index (or use scores.with_reference)")
        ref = scores.reference
        return loss - (ref if isinstance(loss, torch.Tensor) else _numpy(ref))

    def _select(self, scores: Scores, loss: np.ndarray, k: int, rng: np.random.Generator) -> Selection:
        reducible = self._reducible(scores, loss)
        idx = kernels.top_k_indices(reducible, k)
        return Selection(idx, _uniform_weights(k))

    def _select_tensors(self, scores: Scores, n: int, k: int, g: torch.Generator):
        loss = _device_loss(scores)
        idx = ondevice.top_k(self._reducible(scores, loss).to(loss.dtype), k)
        return idx, _equal_weights(idx, loss.dtype)
