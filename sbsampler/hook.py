"""The scoring hook: per-sample losses and last-layer gradients from one forward pass.

For a classifier whose last layer is ``z = W h + b`` and a per-sample loss
``l(z, y)``, the gradient of sample ``i`` with respect to ``(W, b)`` is the outer
product ``g_i = e_i (x) [h_i, 1]`` with ``e_i = dl_i/dz_i``. For cross-entropy
``e_i = softmax(z_i) - q_i`` in closed form (``q_i`` the, possibly smoothed,
target distribution), so one forward pass with no autograd graph gives every
sample's loss and last-layer gradient. ``Scores`` (``sbsampler.scores``) keeps
``e_i`` and ``h_i`` and derives gradient norms and the Gram matrix from them
without ever building the ``C * (d + 1)``-wide gradients.
"""

from __future__ import annotations

from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .scores import Scores

__all__ = ["ScoringHook", "find_head"]

LossFn = Callable[[Tensor, Tensor], Tensor]


def find_head(model: nn.Module) -> nn.Linear:
    """Return the last ``nn.Linear`` registered in ``model`` (its classifier head).

    Raises:
        ValueError: if the model has no ``nn.Linear``; pass ``head=`` explicitly.
    """
    head = None
    for module in model.modules():
        if isinstance(module, nn.Linear):
            head = module
    if head is None:
        raise ValueError(
            f"{type(model).__name__} has no nn.Linear layer to score; pass the "
            "classifier layer explicitly: ScoringHook(model, head=model.fc)"
        )
    return head


class ScoringHook:
    """Scores a minibatch with one forward pass and no autograd graph.

    Registers a forward hook on ``head`` that records its input (the features
    ``H``) and output (the logits ``z``) only while ``score`` runs; during normal
    training the hook does nothing.

    Args:
        model: the network. It is left exactly as it was: every module's own
            train/eval flag restored (a BatchNorm frozen with ``.eval()`` stays
            frozen), BatchNorm running statistics untouched, no ``.grad`` set.
            A ``DistributedDataParallel``/``DataParallel`` wrapper is scored
            through its ``.module`` (no collective runs during scoring).
        head: the last linear layer; found automatically when omitted.
        loss: ``"cross_entropy"`` (closed-form gradient) or a callable
            ``loss(logits, targets) -> (B,)`` per-sample loss, differentiated by
            autograd on the logits only.
        label_smoothing: as in ``torch.nn.functional.cross_entropy``.
        train_mode: score with the modules' modes as they are (in a training
            loop: BatchNorm batch statistics and dropout, except in modules the
            user put in eval mode); every buffer is restored afterwards. Default
            ``False`` scores the whole model in eval mode, with running statistics.
        amp_dtype: run the scoring forward under ``torch.autocast`` with this
            dtype (``torch.float16``/``torch.bfloat16``), as a mixed-precision
            training step does; losses and gradients are still computed in float32.

    Example:
        >>> hook = ScoringHook(model)                # doctest: +SKIP
        >>> scores = hook.score(inputs, targets)     # doctest: +SKIP
        >>> scores.loss.shape, scores.gram().shape   # doctest: +SKIP
    """

    def __init__(
        self,
        model: nn.Module,
        head: Optional[nn.Module] = None,
        loss: Union[str, LossFn] = "cross_entropy",
        label_smoothing: float = 0.0,
        train_mode: bool = False,
        amp_dtype: Optional[torch.dtype] = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            # Score the wrapped module: a DDP forward may broadcast buffers (a collective),
            # and ranks do not always score the same number of times.
            model = model.module
        if head is None:
            head = find_head(model)
        if not isinstance(head, nn.Linear):
            raise TypeError(
                f"head must be an nn.Linear (the closed-form gradient needs z = W h + b), "
                f"got {type(head).__name__}"
            )
        if not (loss == "cross_entropy" or callable(loss)):
            raise ValueError(f"loss must be 'cross_entropy' or a callable, got {loss!r}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        if callable(loss) and label_smoothing:
            raise ValueError(
                "label_smoothing applies to the built-in 'cross_entropy' only; a callable loss must smooth its "
                "own targets, e.g. lambda z, y: F.cross_entropy(z, y, label_smoothing=0.1, reduction='none')"
            )
        self.model = model
        self.head = head
        self.loss = loss
        self.label_smoothing = float(label_smoothing)
        self.train_mode = bool(train_mode)
        if amp_dtype not in (None, torch.float16, torch.bfloat16):
            raise ValueError(f"amp_dtype must be None, torch.float16 or torch.bfloat16, got {amp_dtype!r}")
        self.amp_dtype = amp_dtype
        self._active = False
        self._captured: Optional[tuple[Tensor, Tensor]] = None
        self._handle = head.register_forward_hook(self._capture)

    @property
    def num_classes(self) -> int:
        """Number of outputs of the head."""
        return int(self.head.out_features)

    def _capture(self, module: nn.Module, inputs: tuple, output: Tensor) -> None:
        if self._active:
            self._captured = (inputs[0], output)

    def remove(self) -> None:
        """Detach the forward hook from the head."""
        self._handle.remove()

    def validate_targets(self, targets: Tensor, batch_size: int) -> None:
        """Raise a clear error unless ``targets`` are (B,) int labels in [0, C)."""
        if not isinstance(targets, Tensor):
            raise TypeError(f"targets must be a torch.Tensor, got {type(targets).__name__}")
        if targets.dtype.is_floating_point or targets.dtype == torch.bool or targets.is_complex():
            raise TypeError(f"targets must be integer class labels, got dtype {targets.dtype}")
        if targets.dim() != 1 or targets.shape[0] != batch_size:
            raise ValueError(
                f"targets must have shape ({batch_size},) to match the inputs, "
                f"got {tuple(targets.shape)}"
            )
        if batch_size:
            lo, hi = int(targets.min()), int(targets.max())
            if lo < 0 or hi >= self.num_classes:
                bad = lo if lo < 0 else hi
                raise ValueError(
                    f"target label {bad} is out of range for a head with "
                    f"{self.num_classes} outputs (labels must be in [0, {self.num_classes - 1}])"
                )

    def _forward(self, inputs: Tensor) -> tuple[Tensor, Tensor]:
        model = self.model
        modes = [(m, m.training) for m in model.modules()]  # each module's own flag: frozen parts stay frozen
        saved = None
        if self.train_mode:
            saved = [b.detach().clone() for b in model.buffers()]
        else:
            model.eval()
        self._active, self._captured = True, None
        try:
            amp = self.amp_dtype is not None
            with torch.no_grad(), torch.autocast(device_type=inputs.device.type,
                                                 dtype=self.amp_dtype or torch.float16, enabled=amp):
                model(inputs)
        finally:
            self._active = False
            for module, training in modes:
                module.training = training
            if saved is not None:
                with torch.no_grad():
                    for b, s in zip(model.buffers(), saved):
                        b.copy_(s)
        captured, self._captured = self._captured, None
        if captured is None:
            raise RuntimeError(
                f"the head {type(self.head).__name__}({self.head.in_features}, "
                f"{self.head.out_features}) was not called in the model's forward pass; "
                "pass the layer that produces the logits as head="
            )
        return captured

    def score(self, inputs: Tensor, targets: Tensor) -> Scores:
        """Score one minibatch: per-sample loss, ``dl/dz`` and head features.

        Args:
            inputs: the model's input batch, (B, ...).
            targets: (B,) integer class labels in ``[0, C)``.

        Returns:
            ``Scores`` on the inputs' device, in the head's dtype (float32 for half-precision heads).
        """
        batch = int(inputs.shape[0]) if isinstance(inputs, Tensor) else len(inputs)
        self.validate_targets(targets, batch)
        h, z = self._forward(inputs)
        if h.dim() != 2:
            raise ValueError(
                f"the head's input has shape {tuple(h.shape)}; per-sample last-layer "
                "gradients need (B, d) features (pool or flatten before the head)"
            )
        # Half-precision (AMP) activations are scored in float32; float32/64 as they are.
        h = h.detach()
        z = z.detach()
        if h.dtype in (torch.float16, torch.bfloat16):
            h = h.float()
        if z.dtype in (torch.float16, torch.bfloat16):
            z = z.float()
        targets = targets.to(z.device, torch.int64)  # uint8/int16/int32 labels: one_hot needs int64
        if self.loss == "cross_entropy":
            logp = torch.log_softmax(z, dim=1)
            q = F.one_hot(targets, z.shape[1]).to(z.dtype)
            if self.label_smoothing:
                eps = self.label_smoothing
                q = q * (1 - eps) + eps / z.shape[1]
            loss = -(q * logp).sum(1)
            e = logp.exp() - q
        else:
            zz = z.clone().requires_grad_(True)
            with torch.enable_grad():
                loss = self.loss(zz, targets)
                if loss.shape != (batch,):
                    raise ValueError(
                        f"loss callable must return per-sample losses of shape ({batch},), "
                        f"got {tuple(loss.shape)}"
                    )
                (e,) = torch.autograd.grad(loss.sum(), zz)
            loss = loss.detach()
        return Scores(
            loss=loss,
            logit_grad=e,
            features=h,
            targets=targets,
            bias=self.head.bias is not None,
        )

    def __repr__(self) -> str:
        loss = self.loss if isinstance(self.loss, str) else getattr(self.loss, "__name__", "callable")
        return (
            f"ScoringHook(head={self.head}, loss={loss}, "
            f"label_smoothing={self.label_smoothing}, train_mode={self.train_mode})"
        )

