"""Token-level selection for causal language models: Rho-1's selective language modelling.

Rho-1 (Lin et al., 2024, "Not all tokens are what you need") trains on the tokens whose
loss most exceeds a reference model's: of a batch's label tokens, it keeps the top
``fraction`` by *excess loss* ``l_t - l_ref_t`` and averages the loss over the kept tokens
alone (``L = sum_kept l_t / (fraction * N)``). The authors released no training code; this
module writes the rule out as its paper states it, in three pure functions and one record:

- ``token_losses(logits, labels, shift=)``: the (B, T') per-token cross-entropies and the
  mask of label tokens (``-100`` ignored; ``shift``: position t predicts t + 1);
- ``kept_tokens(n, fraction)``: how many of ``n`` label tokens are kept, ``ceil(fraction * n)``
  (at least 1 when ``n > 0``), the same budget as the per-sample rules;
- ``select_tokens(excess, valid, fraction)``: the mask of kept tokens: the ``kept_tokens`` largest
  excess losses among the valid tokens, ties to the earlier position;
- ``selective_lm_loss(...)``: the loss over the kept tokens, divided by ``num_kept``; pass the
  kept count of *everything one optimizer step stands for* (all accumulated micro-batches on
  all ranks: a global token count, not a mean of means), or leave it out for this batch's own.

In a plain loop::

    logits = model(input_ids).logits
    with torch.no_grad():
        ref, _ = sb.tokens.token_losses(reference_model(input_ids).logits, labels, shift=True)
    out = sb.tokens.selective_lm_loss(logits, labels, ref, fraction=0.6, shift=True)
    out.loss.backward()

``SelectiveTrainer(tokens=TokenSelection(fraction, reference))`` does this inside the
HuggingFace Trainer, with the global count over gradient accumulation and processes.

**A token mask saves no compute in a dense model**: the forward and the backward still run over
every token; only the loss ignores some. Rho-1 is a rule for *what* to learn, not a way to train
faster. To back-propagate less, drop whole sequences: ``SelectiveTrainer(strategy=...)`` with
the per-sequence rules (``RhoLoss`` with per-sequence reference losses is RHO-LOSS's rule).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .strategies import check_fraction

__all__ = ["TokenLoss", "TokenSelection", "token_losses", "kept_tokens", "select_tokens", "selective_lm_loss",
           "label_mask"]


def label_mask(labels: Tensor, shift: bool = False, ignore_index: int = -100) -> Tensor:
    """(B, T') bool: the label tokens a loss counts (``shift``: labels from position 1 on)."""
    if shift:
        labels = labels[..., 1:]
    return labels != ignore_index


def token_losses(logits: Tensor, labels: Tensor, *, shift: bool = False,
                 ignore_index: int = -100) -> tuple[Tensor, Tensor]:
    """``(losses, valid)``: (B, T') per-token cross-entropies (0 where ignored) and the mask of label tokens.

    Args:
        logits: (B, T, V) logits.
        labels: (B, T) token ids, ``ignore_index`` where no loss is taken.
        shift: position t predicts token t + 1 (a causal LM's own loss), so T' = T - 1.
    """
    if logits.dim() != 3 or labels.dim() != 2 or logits.shape[:2] != labels.shape:
        raise ValueError(f"token_losses takes (B, T, V) logits and (B, T) labels, got {tuple(logits.shape)} and "
                         f"{tuple(labels.shape)}")
    valid = label_mask(labels, shift, ignore_index)
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    losses = F.cross_entropy(logits.transpose(1, 2), labels, reduction="none", ignore_index=ignore_index)
    return losses, valid


def kept_tokens(n: Union[int, Tensor], fraction: float) -> int:
    """How many of ``n`` label tokens a step keeps: ``ceil(fraction * n)``, at least 1 when ``n > 0``.

    Raises:
        ValueError: ``fraction`` is not a number in (0, 1], or ``n`` is negative.
    """
    fraction = _check_fraction(fraction)
    n = int(n)
    if n < 0:
        raise ValueError(f"a token count is never negative, got {n}")
    if n == 0:
        return 0
    return max(1, min(n, math.ceil(float(fraction) * n - 1e-9)))


def _check_fraction(fraction: float) -> float:
    return check_fraction(fraction, "the kept share of tokens (fraction)")


def select_tokens(excess: Tensor, valid: Tensor, fraction: float) -> Tensor:
    """(B, T') bool: the ``kept_tokens(valid.sum(), fraction)`` valid tokens of largest ``excess``.

    Ties go to the earlier position (row-major), so the choice is deterministic. A non-finite
    excess loss on a valid token raises ``ValueError`` (it cannot be ranked).
    """
    fraction = _check_fraction(fraction)
    if excess.shape != valid.shape:
        raise ValueError(f"excess {tuple(excess.shape)} and valid {tuple(valid.shape)} must have the same shape")
    valid = valid.bool()
    scores = excess.detach()
    if not bool(torch.isfinite(scores[valid]).all()):
        raise ValueError("a label token's excess loss is not finite (the model's or the reference's loss is NaN or "
                         "inf): fix the inputs or the reference before selecting tokens")
    k = kept_tokens(valid.sum(), fraction)
    flat = scores.masked_fill(~valid, -math.inf).flatten()
    order = torch.sort(flat, descending=True, stable=True).indices[:k]
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[order] = True
    return keep.view_as(valid)


@dataclass
class TokenLoss:
    """``selective_lm_loss``'s result: the loss, the kept-token mask, and the counts behind it."""

    loss: Tensor
    kept: Tensor
    num_kept: int
    num_valid: int


def selective_lm_loss(logits: Tensor, labels: Tensor, reference: Tensor, fraction: float, *, shift: bool = False,
                      num_kept: Union[None, int, Tensor] = None, ignore_index: int = -100) -> TokenLoss:
    """The selective language-modelling loss: ``sum over kept tokens of l_t / num_kept``.

    Args:
        logits: (B, T, V) the training model's logits (with their graph).
        labels: (B, T) token ids.
        reference: (B, T') the reference model's per-token losses, in ``token_losses``'s layout
            (already shifted when ``shift``); ignored positions may hold anything finite.
        fraction: the kept share of this batch's label tokens (Rho-1's k%).
        shift: a causal LM's shift (position t predicts t + 1).
        num_kept: the divisor: the kept tokens of everything the optimizer step stands for (all
            accumulated micro-batches, all ranks); default, this batch's own kept count.
    """
    losses, valid = token_losses(logits, labels, shift=shift, ignore_index=ignore_index)
    if reference.shape != losses.shape:
        raise ValueError(f"the reference losses have shape {tuple(reference.shape)}, the batch's token losses "
                         f"{tuple(losses.shape)}: give them in token_losses's layout (shifted for a causal LM)")
    keep = select_tokens(losses.detach() - reference.to(losses.device, losses.dtype), valid, fraction)
    count = int(keep.sum())
    divisor = count if num_kept is None else num_kept
    if isinstance(divisor, Tensor):  # a step without kept tokens: a zero loss (clamped on the device, no read)
        divisor = divisor.to(losses.device, losses.dtype).clamp(min=1)
    elif divisor < 0:
        raise ValueError(f"num_kept is a count of tokens, never negative: got {divisor}")
    elif divisor == 0:
        divisor = 1  # a batch without label tokens: a zero loss, as the Trainer's own
    loss = (losses * keep).sum() / divisor
    return TokenLoss(loss, keep, count, int(valid.sum()))


def _describe(inputs: dict) -> str:
    return ", ".join(f"{k} {tuple(v.shape)}" for k, v in inputs.items() if isinstance(v, Tensor))


def _check_fits(model: nn.Module, inputs: dict, vocab: Optional[int]) -> None:
    """A live reference takes the batch: as many token embeddings as the training model's vocabulary, as many
    positions as the batch is long (where the model says: ``get_input_embeddings``, its config)."""
    name = type(model).__name__
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    size = getattr(embeddings, "num_embeddings", None)
    if vocab is not None and isinstance(size, int) and size < vocab:
        raise ValueError(f"the Rho-1 reference model ({name}) has {size} token embeddings, the training model's "
                         f"logits {vocab} classes: its vocabulary is smaller, so a token id of the batch can fall "
                         "outside it. Use a reference with the training model's tokenizer")
    config = getattr(model, "config", None)
    positions = next((getattr(config, k) for k in ("max_position_embeddings", "n_positions", "n_ctx")
                      if isinstance(getattr(config, k, None), int)), None)
    ids = inputs.get("input_ids")
    if positions is not None and isinstance(ids, Tensor) and ids.dim() == 2 and ids.shape[1] > positions:
        raise ValueError(f"the Rho-1 reference model ({name}) takes {positions} positions, the batch has "
                         f"{ids.shape[1]} (input_ids {tuple(ids.shape)}): use a reference with at least the training "
                         "context, or truncate the batches to its length")


@dataclass
class TokenSelection:
    """Rho-1 token selection for ``SelectiveTrainer(tokens=...)``.

    Args:
        fraction: the share of each micro-batch's label tokens to train on (Rho-1's k%, e.g. 0.6).
        reference: the reference model (an ``nn.Module`` called under ``no_grad`` on the same
            inputs, its per-token losses computed as the training model's), or stored per-token
            reference losses: a (N, T') tensor or array in ``token_losses``'s layout, looked up by
            each row's dataset index under ``index_key``.
        index_key: the batch key of the dataset indices (stored references only; keep it with
            ``TrainingArguments(remove_unused_columns=False)``; it is never passed to the model).

    A stored table must be made with the same collation as training (tokenizer, padding side,
    truncation, sequence length): a row is read position by position, and a table made with
    left padding for batches padded on the right would rank shifted tokens, which cannot be detected.
    """

    fraction: float
    reference: Union[nn.Module, Tensor, np.ndarray]
    index_key: str = "indices"

    def __post_init__(self) -> None:
        self.fraction = _check_fraction(self.fraction)
        if isinstance(self.reference, np.ndarray):
            self.reference = torch.from_numpy(self.reference)
        if isinstance(self.reference, Tensor):
            if self.reference.dim() != 2 or not self.reference.dtype.is_floating_point:
                raise ValueError(f"stored reference losses must be a float (N, T') table, got "
                                 f"{self.reference.dtype} of shape {tuple(self.reference.shape)}")
            if not bool(torch.isfinite(self.reference).all()):
                raise ValueError("stored reference losses must be finite everywhere (put 0 where a token has no label)")
        elif not isinstance(self.reference, nn.Module):
            raise TypeError(f"reference must be an nn.Module or a (N, T') table of losses, got "
                            f"{type(self.reference).__name__}")

    def reference_losses(self, inputs: dict, labels: Tensor, logits_of, shift: bool,
                         indices: Optional[Tensor], vocab: Optional[int] = None) -> Tensor:
        """(B, T') reference losses for one batch: the reference model's, or the stored rows of ``indices``.

        ``vocab``: the training model's vocabulary (its logits' last size); a live reference with fewer token
        embeddings, or fewer positions than the batch's length, is refused naming both sizes.

        A stored table must come from the same collation as training (tokenizer, padding side, truncation):
        its row of a sample is read position by position, and a shifted row cannot be detected.
        """
        if isinstance(self.reference, nn.Module):
            model = self.reference
            first = next(model.parameters(), None)
            if first is not None and first.device != labels.device:
                model.to(labels.device)
            _check_fits(model, inputs, vocab)
            was = model.training
            model.eval()
            try:
                with torch.no_grad():
                    out = logits_of(model(**inputs))
            except (IndexError, RuntimeError) as err:
                raise ValueError(f"the Rho-1 reference model ({type(model).__name__}) failed on the training batch "
                                 f"({_describe(inputs)}): {type(err).__name__}: {err}. It must take the training "
                                 "model's tokens and sequence length (the same tokenizer and context)") from err
            finally:
                model.train(was)
            return token_losses(out, labels, shift=shift)[0]
        if indices is None:
            raise ValueError(f"stored reference losses are looked up by dataset index, and the batch has no "
                             f"{self.index_key!r}: add an index column and keep it with "
                             "TrainingArguments(remove_unused_columns=False)")
        idx = indices.reshape(-1).to("cpu", torch.long)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.reference.shape[0]):
            raise ValueError(f"dataset index out of range for {self.reference.shape[0]} stored reference rows")
        return self.reference[idx].to(labels.device)
