"""HuggingFace ``Trainer``: selection inside ``compute_loss``.

``SelectiveTrainer`` is a ``Trainer`` whose ``compute_loss`` scores each training
micro-batch (a dict of tensors on the device, its targets under ``labels``, or
under the one key named in ``TrainingArguments(label_names=[...])``) with one
no-graph forward, keeps a weighted share of its rows (``BatchSelector``) and
back-propagates ``sum_i w_i l_i`` through a forward of those rows alone. The
Trainer's loader, sampler, length, ``max_steps``, LR schedule and gradient
accumulation are untouched: one optimizer step per ``gradient_accumulation_steps``
micro-batches, as without selection::

    from sbsampler.integrations.transformers import SelectiveTrainer

    trainer = SelectiveTrainer(model=model, args=args, train_dataset=train, strategy="sb", fraction=0.25, seed=0)
    trainer.train()

The loss matches the Trainer's own normalisation:

- without ``num_items_in_batch`` (a model that takes no loss kwargs, e.g. a
  sequence classifier): ``sum_i w_i l_i`` estimates the micro-batch's mean
  per-sample loss, and the Trainer divides by the accumulation steps, as it
  does its own mean loss;
- with ``num_items_in_batch`` (the label tokens of all accumulated micro-batches,
  e.g. a causal LM): ``B * sum_i w_i l_i / num_items_in_batch`` with ``l_i`` the
  *sum* of sample ``i``'s token losses estimates this micro-batch's share of
  the Trainer's token-mean loss, already scaled for accumulation (and by the
  number of processes under ``average_tokens_across_devices``, as the Trainer
  scales its own).

With ``strategy="full"`` the loss equals the Trainer's own (a test checks the
whole trajectory). The per-sample loss (``loss=``) is also what the scoring hook
ranks by; the default is cross-entropy per sample for (B, C) logits, and the
sum of the token cross-entropies (``-100`` ignored, shifted for causal LMs)
for (B, T, C) logits. The selector's state goes into every checkpoint folder
(``sbsampler_selector.pt``) and is restored by ``train(resume_from_checkpoint=...)``.

**Token selection (Rho-1).** ``SelectiveTrainer(tokens=TokenSelection(fraction, reference))``
trains a causal LM on the top ``fraction`` of each micro-batch's label tokens by excess loss
over a reference model's (``sbsampler.tokens``); no sequence is dropped. The loss is the sum
of the kept tokens' losses over the kept tokens of the whole optimizer step: every
accumulated micro-batch on every process (one count gathered per step, whatever
``average_tokens_across_devices`` says: a global token mean, never a mean of means). A token
mask saves no compute: the forward and backward still cover every token.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from ..batch import BatchKeys, weighted_loss
from ..hook import ScoringHook
from ..selector import BatchSelector
from ..strategies import Strategy
from ..tokens import TokenSelection, kept_tokens, label_mask, selective_lm_loss

__all__ = ["SelectiveTrainer", "per_sample_loss", "causal_lm", "STATE_FILE"]

STATE_FILE = "sbsampler_selector.pt"


def per_sample_loss(logits: Tensor, labels: Tensor, shift: bool = False) -> Tensor:
    """(B,) losses: cross-entropy per sample for (B, C) logits; for (B, T, C) logits, the sum over the
    sample's tokens of their cross-entropy (labels ``-100`` ignored; ``shift``: position t predicts t + 1)."""
    if logits.dim() == 2:
        if labels.dtype.is_floating_point and logits.shape[1] == 1:  # a one-output regression head
            return F.mse_loss(logits[:, 0], labels.to(logits.dtype).reshape(-1), reduction="none")
        return F.cross_entropy(logits, labels, reduction="none")
    if logits.dim() == 3:
        if shift:
            logits, labels = logits[:, :-1], labels[:, 1:]
        per_token = F.cross_entropy(logits.transpose(1, 2), labels, reduction="none", ignore_index=-100)
        return per_token.sum(1)
    raise ValueError(f"per_sample_loss takes (B, C) or (B, T, C) logits, got shape {tuple(logits.shape)}: "
                     "pass SelectiveTrainer(loss=) a callable (logits, labels) -> (B,)")


def causal_lm(model: torch.nn.Module) -> bool:
    """Whether ``model`` is a causal LM whose own loss shifts its labels (a decoder-only ``...ForCausalLM``)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False):
        return False
    return type(model).__name__ in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()) or \
        getattr(model, "loss_type", None) == "ForCausalLM"


class _SaveSelector(TrainerCallback):
    """Writes the selector's state into each checkpoint folder, after the Trainer has written it; reads the
    selector's GPU checks still pending at each epoch's end."""

    def __init__(self, trainer: "SelectiveTrainer") -> None:
        self.trainer = trainer

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.trainer.selector is not None:
            self.trainer.selector.epoch_end()  # GPU checks read; a SelectionCostWarning if selection does not pay

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if state.is_world_process_zero and os.path.isdir(folder):
            torch.save(self.trainer.selection_state(), os.path.join(folder, STATE_FILE))


class SelectiveTrainer(Trainer):
    """A ``Trainer`` that back-propagates a weighted share of each training micro-batch.

    Args:
        *args: the ``Trainer``'s own.
        **kwargs: the ``Trainer``'s own.
        strategy: a ``Strategy`` or registered name; default ``"uniform"`` (with ``tokens``,
            every sequence: token and sequence selection are not combined).
        fraction: share of each micro-batch to back-propagate; default 0.25 (a rule that
            chooses its own count refuses one: ``sbsampler.strategies.resolve_fraction``).
        loss: per-sample loss ``(logits, labels) -> (B,)``; default ``per_sample_loss``
            (token sums, shifted for a causal LM).
        shift_labels: whether the default loss shifts token labels (position t
            predicts t + 1); default: for a causal LM (``causal_lm``).
        hook: the ``ScoringHook``; default ``ScoringHook(model, loss=loss)``.
        seed: passed to ``BatchSelector``.
        nan_policy: passed to ``BatchSelector``.
        sync_history: passed to ``BatchSelector``.
        select_on: passed to ``BatchSelector``.
        tokens: Rho-1 token selection (``TokenSelection``) instead of selecting sequences; the
            counters ``tokens_seen`` / ``tokens_kept`` follow it and resume with the checkpoint.
    """

    def __init__(self, *args: Any, strategy: Union[None, str, Strategy] = None, fraction: Optional[float] = None,
                 loss: Optional[Callable[[Tensor, Any], Tensor]] = None, hook: Optional[ScoringHook] = None,
                 seed: Optional[int] = None, nan_policy: str = "raise", sync_history: bool = False,
                 select_on: str = "auto",
                 shift_labels: Optional[bool] = None, tokens: Optional[TokenSelection] = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if tokens is not None and not isinstance(tokens, TokenSelection):
            raise TypeError(f"tokens must be a sbsampler.tokens.TokenSelection, got {type(tokens).__name__}")
        if tokens is not None and strategy not in (None, "full"):
            raise ValueError(f"SelectiveTrainer(tokens=...) selects tokens of every sequence; strategy={strategy!r} "
                             "would also drop sequences, which is not supported together. Use one of the two")
        if tokens is not None and loss is not None:
            raise ValueError("SelectiveTrainer(tokens=...) ranks and trains on per-token cross-entropies; a per-sample "
                             "loss= has no per-token form. Leave loss= out")
        self.tokens = tokens
        self.token_counts = {"tokens_seen": 0, "tokens_kept": 0}
        shift = causal_lm(self.model) if shift_labels is None else bool(shift_labels)
        self.shift_labels = shift
        if loss is None:

            def loss(logits: Tensor, labels: Tensor) -> Tensor:
                return per_sample_loss(logits, labels, shift=shift)
        self.per_sample_loss = loss
        if hook is None:
            hook = ScoringHook(self.model, loss=loss)
        names = list(self.label_names or ["labels"])
        if len(names) != 1:
            raise ValueError(
                f"SelectiveTrainer selects by one targets field, got label_names={names}: the per-sample loss takes "
                "one labels tensor. Collate the targets into one field and name it in TrainingArguments(label_names=)")
        self.label_key = names[0]
        self.hook = hook
        keys = BatchKeys(inputs=None, targets=self.label_key)
        self.selector = None if tokens is not None else BatchSelector(
            hook, "uniform" if strategy is None else strategy, fraction, seed=seed, nan_policy=nan_policy,
            sync_history=sync_history, batch_keys=keys, select_on=select_on)
        self.add_callback(_SaveSelector(self))

    def selection_state(self) -> dict[str, Any]:
        """What a checkpoint keeps of the selection: the selector's state, or the token counters."""
        if self.selector is None:
            return {"tokens": dict(self.token_counts)}
        return self.selector.state_dict()

    def load_selection_state(self, state: dict[str, Any]) -> None:
        """Restore what ``selection_state`` saved (the selector's state, or the token counters)."""
        if self.selector is None:
            counts = state.get("tokens") if isinstance(state, dict) else None
            if not isinstance(counts, dict) or set(counts) != set(self.token_counts) or \
                    not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in counts.values()):
                raise ValueError(f"{STATE_FILE} holds no token-selection counters: it was written by a "
                                 "SelectiveTrainer selecting sequences, not tokens")
            self.token_counts = dict(counts)
            return
        self.selector.load_state_dict(state)

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """The Trainer's log, with the selection's figures on training logs (``sb/backprop_fraction``,
        ``sb/selection_time``, ``sb/estimated_time_saved`` where the steps pin it, and always its range
        ``sb/estimated_time_saved_low`` / ``_high``; ``sb/tokens_kept`` under token selection)."""
        if "loss" in logs:  # a training log, not an evaluation's
            if self.selector is not None:
                stats = self.selector.stats.as_dict(wait=False)
                logs = {**logs, **{f"sb/{k}": float(stats[k]) for k in
                                   ("backprop_fraction", "selection_time", "estimated_time_saved",
                                    "estimated_time_saved_low", "estimated_time_saved_high")
                                   if stats[k] is not None}}
            else:
                logs = {**logs, "sb/tokens_kept": float(self.token_counts["tokens_kept"]),
                        "sb/tokens_seen": float(self.token_counts["tokens_seen"])}
        super().log(logs, *args, **kwargs)

    def get_batch_samples(self, epoch_iterator: Any, num_batches: int, device: torch.device) -> tuple[list, Any]:
        """The Trainer's micro-batches of one optimizer step; under token selection, the step's kept-token
        count over every micro-batch and every process, the divisor of each micro-batch's loss."""
        batches, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        if self.tokens is None:
            return batches, num_items
        kept = 0
        for batch in batches:
            if self.label_key not in batch:
                raise KeyError(f"SelectiveTrainer: the training batch has no {self.label_key!r} (its keys: "
                               f"{sorted(batch)}), so no token can be selected")
            kept += kept_tokens(label_mask(batch[self.label_key], self.shift_labels).sum(), self.tokens.fraction)
        count = torch.tensor(kept, device=device, dtype=torch.long)
        if self.args.world_size > 1:
            count = self.accelerator.gather(count.reshape(1)).sum()
        return batches, count

    def _token_loss(self, model: torch.nn.Module, inputs: dict[str, Any], return_outputs: bool,
                    num_items_in_batch: Union[None, int, Tensor]) -> Any:
        labels = inputs[self.label_key]
        indices = inputs.get(self.tokens.index_key)
        model_inputs = {k: v for k, v in inputs.items() if k not in (self.label_key, self.tokens.index_key)}
        outputs = model(**model_inputs)
        logits = self.hook.logits(outputs)
        if not isinstance(logits, Tensor):
            raise TypeError(f"cannot find the logits in the model's output of type {type(outputs).__name__}: pass "
                            "hook=ScoringHook(model, logits=lambda output: ...) naming them")
        reference = self.tokens.reference_losses(model_inputs, labels, self.hook.logits, self.shift_labels, indices,
                                                 vocab=int(logits.shape[-1]))
        out = selective_lm_loss(logits, labels, reference, self.tokens.fraction, shift=self.shift_labels,
                                num_kept=num_items_in_batch)
        self.token_counts["tokens_seen"] += out.num_valid
        self.token_counts["tokens_kept"] += out.num_kept
        loss = out.loss
        if num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes  # DDP averages the ranks' gradients; the count is global
        self.loss_is_scaled_for_ga = num_items_in_batch is not None
        return (loss, outputs) if return_outputs else loss

    def compute_loss(self, model: torch.nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Union[None, int, Tensor] = None) -> Any:
        """The training loss of one micro-batch: weighted selected rows, or the kept tokens; evaluation is the Trainer's own."""
        if not model.training:  # evaluation: the Trainer's own loss
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        if self.label_key not in inputs:
            raise KeyError(
                f"SelectiveTrainer: the training batch has no {self.label_key!r} (its keys: {sorted(inputs)}), so "
                "nothing can be scored or selected. Name the key that holds the targets in "
                "TrainingArguments(label_names=[...])")
        if self.tokens is not None:
            return self._token_loss(model, inputs, return_outputs, num_items_in_batch)
        batch = len(inputs[self.label_key])
        sub = self.selector(inputs)
        outputs = model(**sub.inputs)
        logits = self.selector.hook.logits(outputs)  # the hook's selector: a ScoringHook(logits=...) applies here too
        if not isinstance(logits, Tensor):
            raise TypeError(f"cannot find the logits in the model's output of type {type(outputs).__name__}: pass "
                            "hook=ScoringHook(model, logits=lambda output: ...) naming them")
        loss = weighted_loss(self.per_sample_loss(logits, sub.targets), sub.weights)
        if num_items_in_batch is not None:
            loss = loss * (batch / num_items_in_batch)
            if self.args.average_tokens_across_devices and self.args.world_size > 1:
                loss = loss * self.accelerator.num_processes  # the Trainer's own scaling for a gathered count
        self.loss_is_scaled_for_ga = num_items_in_batch is not None
        return (loss, outputs) if return_outputs else loss

    def train(self, resume_from_checkpoint: Union[None, bool, str] = None, *args: Any, **kwargs: Any) -> Any:
        """The Trainer's ``train``, restoring the selection's state from ``resume_from_checkpoint`` first."""
        folder = resume_from_checkpoint
        if folder is True:
            folder = get_last_checkpoint(self.args.output_dir)
        if isinstance(folder, str):
            path = os.path.join(folder, STATE_FILE)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{path} is missing: the checkpoint was not written by a SelectiveTrainer, "
                                        "so the selector cannot resume where it stopped")
            self.load_selection_state(torch.load(path, weights_only=True))
        return super().train(resume_from_checkpoint, *args, **kwargs)
