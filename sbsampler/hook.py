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

from typing import Any, Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .scores import Scores

__all__ = ["ScoringHook", "find_head"]

LossFn = Callable[[Tensor, Tensor], Tensor]


def _logits_of(output: Any) -> Optional[Tensor]:
    """The logits in a model's output: the tensor itself, the first item of a tuple/list, or ``.logits``."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    logits = output.get("logits") if isinstance(output, dict) else getattr(output, "logits", None)
    return logits if isinstance(logits, Tensor) else None


def _same(logits: Tensor, z: Tensor) -> bool:
    """The same values (NaN where NaN, inf where inf), whatever the dtype the model returns them in."""
    return logits.shape == z.shape and bool(torch.isclose(logits.detach().to(z.dtype), z.detach(), rtol=0.0,
                                                          atol=0.0, equal_nan=True).all())


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
        self._auto_head = head is None  # found by find_head: the first scored batch may correct it
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
        self._calls = 0  # head calls in the current scoring forward
        self._head_checked = False  # the head's output was compared with the model's logits
        self._handle = head.register_forward_hook(self._capture)

    @property
    def num_classes(self) -> int:
        """Number of outputs of the head."""
        return int(self.head.out_features)

    def _capture(self, module: nn.Module, inputs: tuple, output: Tensor) -> None:
        if self._active:
            self._calls += 1
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

    def _run(self, inputs: Tensor) -> Any:
        """One no-graph forward of the model in scoring mode; every module's mode and buffer restored."""
        model = self.model
        modes = [(m, m.training) for m in model.modules()]  # each module's own flag: frozen parts stay frozen
        saved = None
        if self.train_mode:
            saved = [b.detach().clone() for b in model.buffers()]
        else:
            model.eval()
        try:
            amp = self.amp_dtype is not None
            with torch.no_grad(), torch.autocast(device_type=inputs.device.type,
                                                 dtype=self.amp_dtype or torch.float16, enabled=amp):
                return model(inputs)
        finally:
            for module, training in modes:
                module.training = training
            if saved is not None:
                with torch.no_grad():
                    for b, s in zip(model.buffers(), saved):
                        b.copy_(s)

    def _forward(self, inputs: Tensor) -> tuple[Tensor, Tensor]:
        self._active, self._captured, self._calls = True, None, 0
        try:
            output = self._run(inputs)
        finally:
            self._active = False
        captured, calls, self._captured = self._captured, self._calls, None
        if captured is None:
            raise RuntimeError(
                f"the head {self._name(self.head)} was not called in the model's forward pass; "
                "pass the layer that produces the logits as head="
            )
        if calls != 1:
            raise RuntimeError(
                f"the head {self._name(self.head)} ran {calls} times in one forward pass (two views, or a layer "
                "shared with another branch?), so its output is not one row of logits per sample; pass head= the "
                "layer that produces the logits once"
            )
        if not self._head_checked:
            if not self._head_matches(output, captured[1], inputs):
                return self._forward(inputs)  # the head was corrected: score again with it
            self._head_checked = True
        return captured

    def _name(self, module: nn.Module) -> str:
        names = {m: n for n, m in self.model.named_modules()}
        label = names.get(module, "?") or "the model itself"
        if isinstance(module, nn.Linear):
            return f"{label!r} (Linear({module.in_features}, {module.out_features}))"
        return repr(label)

    def _head_matches(self, output: Any, z: Tensor, inputs: Tensor) -> bool:
        """Whether ``z`` is what the model returns as logits; corrects an automatically found head.

        Returns ``False`` after switching to the right head (the caller scores again), raises if
        the head was given, or no single linear layer produces the logits. An output whose logits
        cannot be told apart (not a tensor, a tuple/list starting with one, a dict or object with
        ``logits``) is taken on trust.
        """
        logits = _logits_of(output)
        if logits is None or _same(logits, z):
            return True
        producers = self._linears_producing(logits, inputs)
        if self._auto_head and len(producers) == 1:
            self.head = producers[0]
            self._handle.remove()
            self._handle = self.head.register_forward_hook(self._capture)
            return False
        found = ", ".join(self._name(m) for m in producers)
        how = (f"the logits come from {found}: pass it, e.g. ScoringHook(model, head=model.<that layer>)" if producers
               else "no linear layer outputs them: the logits are changed after the last layer (a temperature, a "
                    "scale, a sum of views); move that change into loss= or into the layer, or pass head=")
        raise ValueError(
            f"the head {self._name(self.head)} is not the layer whose output the model returns as logits "
            f"(head output {tuple(z.shape)}, model logits {tuple(logits.shape)}); {how}"
        )

    def _linears_producing(self, logits: Tensor, inputs: Tensor) -> list[nn.Linear]:
        """The linear layers called once in a forward pass whose output equals ``logits``."""
        outputs: dict[nn.Module, list[Tensor]] = {}

        def record(module: nn.Module, args: tuple, out: Tensor) -> None:
            outputs.setdefault(module, []).append(out)

        handles = [m.register_forward_hook(record) for m in self.model.modules() if isinstance(m, nn.Linear)]
        try:
            self._run(inputs)
        finally:
            for h in handles:
                h.remove()
        return [m for m, outs in outputs.items() if len(outs) == 1 and _same(logits, outs[0])]

    def score(self, inputs: Tensor, targets: Tensor) -> Scores:
        """Score one minibatch: per-sample loss, ``dl/dz`` and head features.

        Args:
            inputs: the model's input batch, (B, ...).
            targets: (B,) integer class labels in ``[0, C)``.

        Returns:
            ``Scores`` on the inputs' device, in the head's dtype (float32 for half-precision heads).
        """
        batch = int(inputs.shape[0]) if isinstance(inputs, Tensor) else len(inputs)
        h, z = self._forward(inputs)  # first: a wrong head would make the label check below misleading
        self.validate_targets(targets, batch)
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

