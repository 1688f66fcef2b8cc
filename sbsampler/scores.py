"""Per-sample scores of one minibatch, and what to do with non-finite ones.

For a classifier whose last layer is ``z = W h + b`` and a per-sample loss
``l(z, y)``, the gradient of sample ``i`` with respect to ``(W, b)`` is the outer
product ``g_i = e_i (x) [h_i, 1]`` with ``e_i = dl_i/dz_i``. ``Scores`` keeps
``e_i`` and ``h_i`` (from ``ScoringHook.score``) and derives gradient norms and
the Gram matrix from them without ever building the ``C * (d + 1)``-wide
gradients. Scores remembered in a ``ScoreStore`` hold losses and norms only
(``Scores.from_stored``).

``apply_nan_policy`` decides what happens to samples whose loss or gradient is
not finite: ``"raise"`` names them, ``"skip"`` drops them from the candidates,
``"keep"`` keeps them as candidates scored with the batch's largest finite loss.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, TYPE_CHECKING, Optional

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .deferred import DeferredChecks

__all__ = ["Scores", "apply_nan_policy", "check_nan_policy", "NAN_POLICIES"]

NAN_POLICIES = ("raise", "skip", "keep")
_KERNEL_DTYPES = (torch.float32, torch.float64)


@dataclass
class Scores:
    """Per-sample scores of one minibatch, as tensors on the batch's device.

    Attributes:
        loss: (B,) per-sample loss.
        logit_grad: (B, C) ``E = dl/dz``, the loss gradient at the head's output.
        features: (B, d) ``H``, the head's input.
        targets: (B,) int64 class labels (``None`` for other targets).
        bias: whether the head has a bias (adds the ``1`` in ``[h_i, 1]``).
        grads: (B, D) each sample's last-layer gradient, flattened, when it is not
            one outer product (a head applied per token: ``sum_t e_it (x) [h_it, 1]``,
            exact or a Kronecker sketch, see ``ScoringHook``); ``gram()`` and
            ``grad_norms()`` read it instead of ``logit_grad`` and ``features``.
        reference: (B,) each sample's reference (irreducible) loss, for a strategy
            that declares ``needs_reference`` (``RhoLoss``): looked up by dataset index.
    """

    loss: Tensor
    logit_grad: Optional[Tensor] = None
    features: Optional[Tensor] = None
    targets: Optional[Tensor] = None
    bias: bool = True
    grads: Optional[Tensor] = None
    reference: Optional[Tensor] = None
    # grad_norms() computed once, or given by from_stored()
    _grad_norms: Optional[Tensor] = field(default=None, init=False, repr=False, compare=False)

    @classmethod
    def from_stored(cls, loss: Tensor, grad_norms: Optional[Tensor] = None) -> "Scores":
        """Scores known only as losses (and last-layer gradient norms), e.g. from a ``ScoreStore``."""
        scores = cls(loss=loss)
        scores._grad_norms = grad_norms
        return scores

    def __len__(self) -> int:
        return int(self.loss.shape[0])

    def with_reference(self, reference: Tensor) -> "Scores":
        """These scores with each sample's reference loss (``reference``, (B,), moved to the losses' device)."""
        if tuple(reference.shape) != (len(self),):
            raise ValueError(f"got {tuple(reference.shape)} reference losses for {len(self)} samples")
        out = Scores(loss=self.loss, logit_grad=self.logit_grad, features=self.features, targets=self.targets,
                     bias=self.bias, grads=self.grads, reference=reference.to(self.loss.device, self.loss.dtype))
        out._grad_norms = self._grad_norms
        return out

    @property
    def has_gradients(self) -> bool:
        """Whether these scores carry last-layer gradient information (``grad_norms()`` can be read): a
        ``ScoringHook`` with a head gives it, ``head=False`` does not."""
        return self._grad_norms is not None or self.grads is not None or (
            self.logit_grad is not None and self.features is not None)

    def _require_grads(self) -> tuple[Tensor, Tensor]:
        if self.logit_grad is None or self.features is None:
            raise ValueError(
                "these Scores hold losses only: gradient-based strategies (gradmatch, importance) need the last "
                "layer's gradients, which a ScoringHook with a head gives (ScoringHook(model, head=model.<last "
                "linear layer>)); the loss-based strategies need none"
            )
        return self.logit_grad, self.features

    def grad_norms(self) -> Tensor:
        """(B,) norm of each sample's last-layer gradient: ``|e_i| * |[h_i, 1]|`` (computed once)."""
        if self._grad_norms is None:
            self._grad_norms = self._compute_grad_norms()
        return self._grad_norms

    def _compute_grad_norms(self) -> Tensor:
        if self.grads is not None:
            return torch.linalg.vector_norm(self.grads, dim=1)
        e, h = self._require_grads()
        if all(t.device.type == "cpu" and t.dtype in _KERNEL_DTYPES for t in (e, h)):
            from .kernels import outer_norms  # one pass over E and H; torch's takes twice as long at C=1000

            e_np, h_np = (t.detach().contiguous().numpy() for t in (e, h))
            return torch.from_numpy(outer_norms(e_np, h_np, bool(self.bias))).to(e.dtype)
        hn = torch.linalg.vector_norm(h, dim=1)
        if self.bias:
            hn = torch.sqrt(hn * hn + 1)
        return torch.linalg.vector_norm(e, dim=1) * hn

    def gram(self) -> Tensor:
        """(B, B) Gram matrix of last-layer (weight and bias) gradients.

        ``<g_i, g_j> = (e_i . e_j) * (h_i . h_j + 1)``, exact, computed in the
        dtype of the scores on their device.
        """
        if self.grads is not None:
            return self.grads @ self.grads.T
        e, h = self._require_grads()
        hh = h @ h.T
        if self.bias:
            hh = hh + 1
        return (e @ e.T) * hh

    def subset(self, index: Tensor) -> "Scores":
        """The scores of the samples at ``index`` (a LongTensor or bool mask)."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        out = Scores(**{k: v[index] if isinstance(v, Tensor) else v for k, v in values.items() if k != "_grad_norms"})
        if self._grad_norms is not None:
            out._grad_norms = self._grad_norms[index]
        return out

    def finite(self) -> Tensor:
        """(B,) bool: the loss, and the gradient information if any, are finite."""
        ok = torch.isfinite(self.loss)
        for t in (self.logit_grad, self.features, self.grads):
            if t is not None:
                ok &= torch.isfinite(t).all(1)
        return ok

    def with_non_finite_as_max(self, finite: Tensor) -> "Scores":
        """Non-finite samples scored as the largest finite loss (0 if none), with zero gradient information.

        Reads nothing back to the host (no ``bool()`` of a device value).
        """
        masked = torch.where(finite, self.loss, torch.full_like(self.loss, -torch.inf))
        top = masked.amax()
        top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
        loss = torch.where(finite, self.loss, top)
        e, h, g = (None if t is None else torch.where(finite[:, None], t, torch.zeros_like(t))
                   for t in (self.logit_grad, self.features, self.grads))
        return Scores(loss=loss, logit_grad=e, features=h, targets=self.targets, bias=self.bias, grads=g,
                      reference=self.reference)


def check_nan_policy(policy: str, strategy: Any, scored: bool = False) -> None:
    """``policy`` is a NaN policy that can act with ``strategy``.

    A strategy that reads no scores (``Uniform``) runs no scoring pass unless
    ``scored`` (a ``ScoreStore`` keeps the losses), so no loss is seen before the
    step: ``"raise"`` and ``"keep"`` then check nothing (documented), and ``"skip"``,
    a promise it cannot keep, is refused. ``Full`` passes whole batches (the
    window's edges): nothing is checked there either.
    """
    if policy not in NAN_POLICIES:
        raise ValueError(f"nan_policy must be one of {NAN_POLICIES}, got {policy!r}")
    if policy == "skip" and not (strategy.needs_scores or strategy.keeps_all or scored):
        raise ValueError(
            f"nan_policy='skip' cannot act with {strategy!r}: it runs no scoring pass, so no loss is seen before the "
            "step. Use a strategy that scores, attach a ScoreStore (then it scores), or keep nan_policy='raise' and "
            "check the step's own loss: sb.weighted_loss(losses, batch.weights, indices=batch.indices) raises on a "
            "non-finite one")


def apply_nan_policy(scores: Scores, policy: str, indices: Tensor,
                     checks: Optional["DeferredChecks"] = None) -> tuple[Scores, Optional[Tensor]]:
    """The candidates of a batch under ``policy``: ``(their scores, their positions or None for all)``.

    Args:
        scores: the batch's scores.
        policy: ``"raise"`` (``ValueError`` naming the dataset indices),
            ``"skip"`` (non-finite samples stop being candidates) or ``"keep"``
            (they stay candidates, scored as the largest finite loss with zero
            gradient information).
        indices: (B,) dataset indices of the batch, for the error message.
        checks: for selection on the losses' device, where nothing should be read
            back to the host: ``"raise"`` then hands its check to these
            ``DeferredChecks`` (on a GPU it raises a batch or two later, and the
            batch's selection has gone ahead meanwhile) and ``"keep"``
            replaces without testing first. ``"skip"`` always reads the count back:
            the candidates' number sets the shapes.
    """
    if policy not in NAN_POLICIES:
        raise ValueError(f"nan_policy must be one of {NAN_POLICIES}, got {policy!r}")
    finite = scores.finite()

    def error() -> ValueError:
        bad = (~finite).nonzero().flatten().cpu()
        return ValueError(
            f"non-finite loss or gradient for {bad.numel()} sample(s), dataset indices "
            f"{indices[bad.to(indices.device)][:10].tolist()}; pass nan_policy='skip' or 'keep' to SelectiveLoader "
            "to go on")

    if checks is not None and policy == "raise":
        checks.add(~finite.all(), error)
        return scores, None
    if checks is not None and policy == "keep":
        return scores.with_non_finite_as_max(finite), None
    if bool(finite.all()):
        return scores, None
    if policy == "keep":
        return scores.with_non_finite_as_max(finite), None
    if policy == "skip":
        keep = finite.nonzero().flatten()
        return scores.subset(keep), keep
    raise error()
