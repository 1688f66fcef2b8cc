"""Per-sample losses and their gradients with respect to the logits, ``e = dl/dz``: in closed form for the built-in
cross-entropy (``softmax(z) - q`` for one-hot, label-smoothed or soft targets), by autograd on the logits alone for
a callable loss; and the built-in loss's check of its targets."""

from __future__ import annotations

from typing import Any, Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from ..deferred import DeferredChecks

__all__ = ["LossFn", "validate_targets", "loss_and_logit_grad"]

LossFn = Callable[[Any, Any], Tensor]


def validate_targets(targets: Any, batch_size: int, classes: Optional[int], checks: DeferredChecks) -> None:
    """For the built-in cross-entropy: (B,) integer labels in [0, C), or (B, C) target distributions. The label
    range is checked through ``checks`` (on a GPU, read later without a stall)."""
    if not isinstance(targets, Tensor):
        raise TypeError(f"targets must be a torch.Tensor for loss='cross_entropy', got {type(targets).__name__}; "
                        "pass loss= a callable for other targets")
    if targets.dtype.is_floating_point and targets.dim() == 2:  # soft / mixup target distributions
        if targets.shape != (batch_size, classes):
            raise ValueError(f"soft targets must have shape ({batch_size}, {classes}), got {tuple(targets.shape)}")
        if batch_size:
            _check_distributions(targets, checks)
        return
    if targets.dtype.is_floating_point or targets.dtype == torch.bool or targets.is_complex():
        raise TypeError(f"targets must be integer class labels (or (B, C) target distributions), got dtype "
                        f"{targets.dtype} of shape {tuple(targets.shape)}; pass loss= a callable for other targets")
    if targets.dim() != 1 or targets.shape[0] != batch_size:
        raise ValueError(
            f"targets must have shape ({batch_size},) to match the inputs, "
            f"got {tuple(targets.shape)}"
        )
    if batch_size:
        def error() -> ValueError:
            lo, hi = int(targets.min()), int(targets.max())
            return ValueError(
                f"target label {lo if lo < 0 else hi} is out of range for logits with {classes} classes (labels "
                f"must be in [0, {classes - 1}]; for ignore_index or other targets pass loss= a callable)")
        # On a GPU the check is read later (no stall); the scoring forward clamps the labels meanwhile.
        checks.add(((targets < 0) | (targets >= classes)).any(), error)


def _check_distributions(targets: Tensor, checks: DeferredChecks) -> None:
    """(B, C) float targets are distributions: every entry >= 0, every row summing to 1 (to the dtype's round-off).

    Regression values or multi-hot rows would otherwise be scored as a cross-entropy against a "distribution" that
    is none, silently. Through ``checks``: on a GPU, read later without a stall."""
    q = targets.detach().float()
    tol = 1e-2 if targets.dtype in (torch.float16, torch.bfloat16) else 1e-3
    sums = q.sum(1)

    def error() -> ValueError:
        return ValueError(
            f"(B, C) float targets are read as target distributions by loss='cross_entropy' (soft, mixup or "
            f"smoothed labels): each row must be >= 0 and sum to 1, but the rows sum to {float(sums.min()):.4g} .. "
            f"{float(sums.max()):.4g} and the smallest entry is {float(q.min()):.4g}. For regression or multi-label "
            "targets pass loss= a callable returning one loss per sample, e.g. loss=lambda z, y: "
            "F.mse_loss(z, y, reduction='none').mean(1) or F.binary_cross_entropy_with_logits(z, y, "
            "reduction='none').mean(1)")

    checks.add((q < 0).any() | ((sums - 1).abs() > tol).any(), error)


def loss_and_logit_grad(z: Tensor, targets: Any, batch: int, loss: Union[str, LossFn], label_smoothing: float,
                        checks: DeferredChecks) -> tuple[Tensor, Tensor]:
    """Per-sample losses and ``e = dl/dz`` (closed form for ``loss="cross_entropy"``, else autograd)."""
    if loss == "cross_entropy":
        if z.dim() != 2:
            raise ValueError(f"loss='cross_entropy' scores (B, C) logits, got {tuple(z.shape)}: pass loss= a "
                             "callable returning one loss per sample (e.g. the mean loss over a sequence), "
                             "or pool/flatten before the head")
        if z.shape[1] == 1:
            raise ValueError(
                "the model has one output, and loss='cross_entropy' over one class scores every sample 0 (its "
                "softmax is 1), so every rule would pick at random: pass the loss the training step uses as loss= a "
                "callable returning one loss per sample, e.g. loss=lambda z, y: F.mse_loss(z, y, reduction='none')"
                ".mean(1) for regression, or F.binary_cross_entropy_with_logits(z, y.float(), reduction='none')"
                ".mean(1) for a binary label")
        validate_targets(targets, batch, int(z.shape[1]), checks)
        logp = torch.log_softmax(z, dim=1)
        if targets.dtype.is_floating_point:
            q = targets.to(z.device, z.dtype)
        else:
            labels = targets.to(z.device, torch.int64)
            if labels.is_cuda:  # an out-of-range label is reported by the deferred check, not a device assert
                labels = labels.clamp(0, z.shape[1] - 1)
            q = F.one_hot(labels, z.shape[1]).to(z.dtype)  # uint8/int32 labels too
        if label_smoothing:
            q = q * (1 - label_smoothing) + label_smoothing / z.shape[1]
        return -(q * logp).sum(1), logp.exp() - q
    zz = z.clone().requires_grad_(True)
    with torch.enable_grad():
        out = loss(zz, targets)
        if not isinstance(out, Tensor) or out.shape != (batch,):
            shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(f"loss callable must return per-sample losses of shape ({batch},), got {shape}")
        (e,) = torch.autograd.grad(out.sum(), zz, allow_unused=True)
    return out.detach(), (e if e is not None else torch.zeros_like(zz))
