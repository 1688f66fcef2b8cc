"""RHO-LOSS (Mindermann et al. 2022): the top k by reducible loss."""

from __future__ import annotations

from typing import Any, Union

import numpy as np
import torch

from .. import ondevice
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
        self.reference = reference

    def reference_for(self, indices: Union[np.ndarray, torch.Tensor]) -> torch.Tensor:
        """(B,) float64 reference losses of the dataset ``indices``; an error names any without one."""
        table = getattr(self.reference, "reference", self.reference)  # a ScoreStore, or the array itself
        if table is None:
            raise ValueError("RhoLoss needs reference losses: RhoLoss(reference=store) with store.set_reference("
                             "sb.reference.reference_losses(reference_model, loader, len(dataset))), or an array")
        table = torch.as_tensor(table.numpy() if isinstance(table, torch.Tensor) else np.asarray(table),
                                dtype=torch.float64)
        idx = torch.as_tensor(indices).to("cpu", torch.int64).reshape(-1)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= table.shape[0]):
            raise ValueError(f"dataset index {int(idx.max())} is out of range for {table.shape[0]} reference losses: "
                             "the batches need their dataset indices (sb.with_indices)")
        ref = table[idx]
        missing = torch.isnan(ref)
        if bool(missing.any()):
            raise ValueError(f"no reference loss for dataset indices {idx[missing][:10].tolist()}: compute them "
                             "for every training sample (sb.reference.reference_losses)")
        return ref

    def _reducible(self, scores: Scores, loss: Any) -> Any:
        if scores.reference is None:
            raise ValueError("RhoLoss reads Scores.reference: select through select_batch, SelectiveLoader or "
                             "SelectiveSampler, which look it up by dataset index (or use scores.with_reference)")
        ref = scores.reference
        return loss - (ref if isinstance(loss, torch.Tensor) else _numpy(ref))

    def _select(self, scores: Scores, loss: np.ndarray, k: int, rng: np.random.Generator) -> Selection:
        reducible = self._reducible(scores, loss)
        idx = np.sort(np.argsort(-reducible, kind="stable")[:k])
        return Selection(idx, _uniform_weights(k))

    def _select_tensors(self, scores: Scores, n: int, k: int, g: torch.Generator):
        loss = _device_loss(scores)
        idx = ondevice.top_k(self._reducible(scores, loss).to(loss.dtype), k)
        return idx, _equal_weights(idx, loss.dtype)
