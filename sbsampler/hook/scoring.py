"""``ScoringHook``: the class that puts the scoring rooms together (``head``, ``forward``, ``losses``,
``per_token``) behind one public API: ``ScoringHook(model, ...).score(inputs, targets) -> Scores``."""

from __future__ import annotations

import threading
from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor, nn

from ..deferred import DeferredChecks
from ..scores import Scores
from .forward import check_not_meta, describe, downscale, first_tensor, logits_of, run_scoring_forward
from .head import find_head, linears_producing, module_name, same, wrong_head_error
from .losses import LossFn, loss_and_logit_grad, validate_targets
from .per_token import Sketch, per_token_grads

__all__ = ["ScoringHook"]


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
        head: the last linear layer; found automatically when omitted (``None``).
            ``False``: no head, losses only (the loss-based strategies need no
            more). A model without any ``nn.Linear`` is scored for losses only.
        loss: ``"cross_entropy"`` (closed-form gradient; integer labels in
            ``[0, C)`` or (B, C) soft/mixup target distributions, (B, C) logits)
            or a callable ``loss(logits, targets) -> (B,)`` per-sample loss, for
            any targets (soft labels, multi-label, regression, token sequences
            with masks or ``ignore_index`` reduced per sample), differentiated by
            autograd on the logits only.
        label_smoothing: as in ``torch.nn.functional.cross_entropy``.
        train_mode: score with the modules' modes as they are (in a training
            loop: BatchNorm batch statistics and dropout, except in modules the
            user put in eval mode); every buffer is restored afterwards. Default
            ``False`` scores the whole model in eval mode, with running statistics.
        amp_dtype: run the scoring forward under ``torch.autocast`` with this
            dtype (``torch.float16``/``torch.bfloat16``), as a mixed-precision
            training step does; losses and gradients are still computed in float32.
        forward: ``forward(inputs) -> output``, how the model is called on a
            batch's inputs (default: ``model(**inputs)`` for a dict of inputs,
            else ``model(inputs)``).
        logits: ``logits(output) -> Tensor``, where the logits are in the model's
            output (default: the output itself, the first item of a tuple, or
            its ``logits`` key or attribute).
        exact_limit: per-token heads: hand over the exact per-sample gradients
            while ``C (d + 1)`` is at most this, else a sketch.
        sketch_dim: ``r`` of the Kronecker sketch (``r * r`` numbers per sample).
        seed: seeds the sketch's random projections.
        scale_factor: score on inputs downscaled by this factor in (0, 1]
            (Composer's ``scale_factor``: ``F.interpolate``, linear / bilinear /
            trilinear for 3-, 4- and 5-D inputs, an integer image interpolated in
            float and rounded back to its dtype); the step still trains on the
            full-size inputs. Every score (losses, ``E``, ``H``) is then the
            smaller input's: cheaper and approximate. The model must accept the
            smaller size (global pooling before its head, say).
        channels_last: hand 4-D image inputs to the scoring forward in
            channels-last memory format (what a channels-last model is fastest
            on, on a GPU); the values are the same.
        compile: compile the scoring forward once with ``torch.compile``:
            ``True`` (its default mode) or a mode name, ``"reduce-overhead"``
            capturing it as a CUDA graph for a fixed batch shape. The first
            scored batch pays the compile (seconds); the head's hook is traced
            with it, so the scores are the eager ones to float round-off
            (``benchmarks/cheap_scoring.py`` measures what each option costs and
            whether the picks change). Not with a ``forward=`` callable.

    Example:
        >>> hook = ScoringHook(model)                # doctest: +SKIP
        >>> scores = hook.score(inputs, targets)     # doctest: +SKIP
        >>> scores.loss.shape, scores.gram().shape   # doctest: +SKIP
    """

    def __init__(
        self,
        model: nn.Module,
        head: Union[None, bool, nn.Module] = None,
        loss: Union[str, LossFn] = "cross_entropy",
        label_smoothing: float = 0.0,
        train_mode: bool = False,
        amp_dtype: Optional[torch.dtype] = None,
        forward: Optional[Callable[[Any], Any]] = None,
        logits: Optional[Callable[[Any], Tensor]] = None,
        exact_limit: int = 65536,
        sketch_dim: int = 32,
        seed: int = 0,
        scale_factor: float = 1.0,
        channels_last: bool = False,
        compile: Union[bool, str, None] = None,
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
        elif head is False:
            head = None
        if head is not None and not isinstance(head, nn.Linear):
            raise TypeError(
                f"head must be an nn.Linear (the closed-form gradient needs z = W h + b), "
                f"got {type(head).__name__}; pass head=False to score losses only"
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
        if amp_dtype not in (None, torch.float16, torch.bfloat16):
            raise ValueError(f"amp_dtype must be None, torch.float16 or torch.bfloat16, got {amp_dtype!r}")
        for name, value in (("exact_limit", exact_limit), ("sketch_dim", sketch_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if isinstance(scale_factor, bool) or not isinstance(scale_factor, (int, float)) or \
                not 0.0 < float(scale_factor) <= 1.0:
            raise ValueError(f"scale_factor must be a number in (0, 1], got {scale_factor!r}")
        if compile is not None and not isinstance(compile, (bool, str)):
            raise TypeError(f"compile must be None, a bool or a torch.compile mode name, got {compile!r}")
        if compile and forward is not None:
            raise ValueError("compile= compiles the model's own forward; with a forward= callable, compile inside it")
        self.model = model
        self.scale_factor = float(scale_factor)
        self.channels_last = bool(channels_last)
        self.compile = compile or None
        self._compiled: Optional[Callable[..., Any]] = None
        self.head: Optional[nn.Linear] = head
        self.loss = loss
        self.label_smoothing = float(label_smoothing)
        self.train_mode = bool(train_mode)
        self.amp_dtype = amp_dtype
        self.forward = forward
        self.logits = logits or logits_of
        self.exact_limit = exact_limit
        self.sketch_dim = sketch_dim
        self.seed = int(seed)
        self._sketch = Sketch(sketch_dim, seed)
        self._active = False
        self._captured: Optional[tuple[Tensor, Tensor]] = None
        self._calls = 0  # head calls in the current scoring forward
        self._lock = threading.RLock()  # one scoring forward at a time: the capture and the modules' modes are shared
        self._head_checked = False  # the head's output was compared with the model's logits
        #: label checks on an accelerator, read without stalling it (``sbsampler.deferred``)
        self.checks = DeferredChecks()
        self._handle = head.register_forward_hook(self._capture) if head is not None else None

    @property
    def num_classes(self) -> Optional[int]:
        """Number of outputs of the head (``None`` without a head)."""
        return int(self.head.out_features) if self.head is not None else None

    def _capture(self, module: nn.Module, inputs: tuple, output: Tensor) -> None:
        if self._active:
            self._calls += 1
            self._captured = (inputs[0], output)

    def remove(self) -> None:
        """Detach the forward hook from the head."""
        if self._handle is not None:
            self._handle.remove()

    def replicate(self, model: nn.Module, previous: Optional["ScoringHook"] = None) -> "ScoringHook":
        """The same hook on ``model``, a copy of this hook's model (``copy.deepcopy``): same settings, the head at
        the same place (``sbsampler.lookahead`` scores such a replica beside the training step).

        Args:
            model: the copy.
            previous: the hook on an earlier copy of the same model, if any: its check of the head on the first
                scored batch (and an automatic head's correction) and its pending GPU checks carry over, as they
                would on the live model.

        Raises:
            ValueError: with a ``forward=`` callable, which calls the original model, not the copy.
            RuntimeError: when the head is no longer part of the model (replaced).
        """
        if self.forward is not None:
            raise ValueError("a ScoringHook(forward=...) callable runs the model it closes over, so a copy of the "
                             "model cannot be scored through it: drop forward= (the default calls model(inputs), or "
                             "model(**inputs) for a dict), or use lookahead=0")
        head: Union[bool, nn.Module] = False
        checked, auto = self._head_checked, self._auto_head
        if self.head is not None:
            names = {m: n for n, m in self.model.named_modules()}
            if self.head not in names:
                raise self._head_gone()
            here = dict(model.named_modules())
            head = here[names[self.head]]
            if previous is not None and previous.head is not None:  # where the earlier copy scored (corrected?)
                name = {m: n for n, m in previous.model.named_modules()}.get(previous.head)
                if name in here and isinstance(here[name], nn.Linear):
                    head, checked, auto = here[name], previous._head_checked, previous._auto_head
        twin = ScoringHook(model, head=head, loss=self.loss, label_smoothing=self.label_smoothing,
                           train_mode=self.train_mode, amp_dtype=self.amp_dtype, logits=self.logits,
                           exact_limit=self.exact_limit, sketch_dim=self.sketch_dim, seed=self.seed,
                           scale_factor=self.scale_factor, channels_last=self.channels_last, compile=self.compile)
        twin._auto_head, twin._head_checked = auto, checked
        if previous is not None:
            twin.checks = previous.checks
        return twin

    def _head_gone(self) -> RuntimeError:
        head = self.head
        return RuntimeError(
            f"the head this ScoringHook scores (Linear({head.in_features}, {head.out_features})) is not part of the "  # type: ignore[union-attr]
            "model, so it is not called in its forward (replaced since the hook was made, e.g. model.fc = "
            "nn.Linear(...), or a layer of another model?): make a new ScoringHook on the model as it is now (and a "
            "new loader with it), or pass head=False to score losses only")

    def validate_targets(self, targets: Any, batch_size: int, classes: Optional[int] = None) -> None:
        """For the built-in cross-entropy: (B,) integer labels in [0, C), or (B, C) target distributions."""
        validate_targets(targets, batch_size, self.num_classes if classes is None else classes, self.checks)

    def downscale(self, inputs: Any) -> Any:
        """``inputs`` as the scoring forward sees them: downscaled by ``scale_factor`` (see the class)."""
        return downscale(inputs, self.scale_factor)

    def _run(self, inputs: Any) -> Any:
        """One no-graph forward of the model in scoring mode; every module's mode and buffer restored."""
        if self.scale_factor != 1.0:
            small = self.downscale(inputs)
            try:
                return self._run_as_is(small)
            except RuntimeError as err:
                raise RuntimeError(f"the scoring forward failed on inputs downscaled by scale_factor="
                                   f"{self.scale_factor} to {tuple(small.shape)} from {tuple(inputs.shape)}: the "
                                   f"model must accept the smaller size (e.g. global pooling before its head). "
                                   f"{type(err).__name__}: {err}") from err
        return self._run_as_is(inputs)

    def _run_as_is(self, inputs: Any) -> Any:
        return run_scoring_forward(self.model, inputs, train_mode=self.train_mode, amp_dtype=self.amp_dtype,
                                   channels_last=self.channels_last, forward=self.forward,
                                   compiled=self._compiled_model() if self.compile else None)

    def __getstate__(self) -> dict[str, Any]:  # copies and pickles: the compiled forward is made again at first use
        state = {**self.__dict__, "_compiled": None}
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.RLock()

    def _compiled_model(self) -> Callable[..., Any]:
        """``torch.compile`` of the model (made at first use; the live model's parameters, the head's hook traced)."""
        if self._compiled is None:
            mode = self.compile if isinstance(self.compile, str) else None
            self._compiled = torch.compile(self.model, mode=mode)
        return self._compiled

    def _forward(self, inputs: Any) -> tuple[Optional[Tensor], Tensor]:
        """``(head input H or None without a head, the logits)`` of one scoring forward."""
        self._active, self._captured, self._calls = True, None, 0
        try:
            output = self._run(inputs)
        finally:
            self._active = False
        captured, calls, self._captured = self._captured, self._calls, None
        logits = self.logits(output)
        if not isinstance(logits, Tensor):
            raise TypeError(f"cannot find the logits in the model's output of type {type(output).__name__}: pass "
                            "ScoringHook(logits=lambda output: ...) naming them")
        if self.head is None:
            return None, logits
        if captured is None:
            if self.head not in set(self.model.modules()):
                raise self._head_gone()
            raise RuntimeError(
                f"the head {module_name(self.model, self.head)} was not called in the model's forward pass; "
                "pass the layer that produces the logits as head= (or head=False for losses only)"
            )
        if calls != 1:
            raise RuntimeError(
                f"the head {module_name(self.model, self.head)} ran {calls} times in one forward pass (two views, or "
                "a layer shared with another branch?), so its output is not one row of logits per sample; pass "
                "head= the layer that produces the logits once"
            )
        if not self._head_checked:
            if not self._head_matches(logits, captured[1], inputs):
                return self._forward(inputs)  # the head was corrected: score again with it
            self._head_checked = True
        return captured[0], logits

    def _head_matches(self, logits: Tensor, z: Tensor, inputs: Any) -> bool:
        """Whether ``z`` is what the model returns as logits; corrects an automatically found head.

        Returns ``False`` after switching to the right head (the caller scores again), raises if
        the head was given, or no single linear layer produces the logits.
        """
        if same(logits, z):
            return True
        producers = linears_producing(self.model, self._run, logits, inputs)
        if self._auto_head and len(producers) == 1:
            self.head = producers[0]
            self.remove()
            self._handle = self.head.register_forward_hook(self._capture)
            return False
        raise wrong_head_error(self.model, self.head, producers, z, logits)

    def per_token_grads(self, e: Tensor, h: Tensor) -> Tensor:
        """(B, D) per-sample last-layer gradients ``G_i = sum_t e_it (x) [h_it, 1]`` of a per-token head.

        Exact (``D = C (d + 1)``) up to ``exact_limit``, else the Kronecker sketch (``D = r * r``).
        """
        bias = self.head is not None and self.head.bias is not None
        return per_token_grads(e, h, bias, self.exact_limit, self._sketch)

    def score(self, inputs: Any, targets: Any) -> Scores:
        """Score one minibatch: per-sample loss, and (with a head) ``dl/dz`` and the head's features.

        Args:
            inputs: the model's input batch: a tensor (B, ...) or a tree of them
                (a dict for ``model(**inputs)``).
            targets: whatever the loss reads: (B,) integer labels or (B, C) soft
                targets for the built-in cross-entropy; anything for a callable.

        Returns:
            ``Scores`` on the inputs' device, in the head's dtype (float32 for half-precision heads).
            Without a head: losses only. With a per-token head: ``Scores.grads``.
        """
        self.checks.poll()  # an earlier batch's labels, checked on the GPU meanwhile
        first = first_tensor(inputs)
        check_not_meta(first, self.model)
        batch = int(first.shape[0])
        try:
            with self._lock:
                h, z = self._forward(inputs)  # first: a wrong head would make the label check misleading
        except (RuntimeError, TypeError) as err:
            if hasattr(err, "add_note"):  # Python 3.11+
                err.add_note(
                    f"sbsampler: scoring the batch's inputs ({describe(inputs)}) with the model failed. Batches are "
                    "read as (inputs, targets[, indices, *extras]) by position, or by name from dicts and namedtuples "
                    "(sbsampler.BatchKeys): check that what is read as the inputs is what the model takes")
            raise
        z = z.detach()
        if z.dtype in (torch.float16, torch.bfloat16):  # AMP activations are scored in float32
            z = z.float()
        if z.shape[0] != batch:
            raise ValueError(f"the logits have {z.shape[0]} rows for a batch of {batch} samples")
        loss, e = loss_and_logit_grad(z, targets, batch, self.loss, self.label_smoothing, self.checks)
        labels = targets if isinstance(targets, Tensor) and not targets.dtype.is_floating_point else None
        if h is None:
            return Scores(loss=loss, targets=labels)
        h = h.detach()
        if h.dtype in (torch.float16, torch.bfloat16):
            h = h.float()
        bias = self.head.bias is not None  # type: ignore[union-attr]
        if h.dim() == 2:
            return Scores(loss=loss, logit_grad=e.reshape(batch, -1), features=h, targets=labels, bias=bias)
        head_out = self.head.out_features  # type: ignore[union-attr]
        if h.dim() == 3 and h.shape[0] == batch and e.numel() == batch * h.shape[1] * head_out:
            grads = self.per_token_grads(e.reshape(batch, h.shape[1], head_out), h.to(e.dtype))
            return Scores(loss=loss, targets=labels, bias=bias, grads=grads)
        raise ValueError(
            f"the head's input has shape {tuple(h.shape)}; per-sample last-layer gradients need (B, d) features "
            "or (B, T, d) per-token features (pool or flatten before the head, or pass head=False for losses only)"
        )

    def __repr__(self) -> str:
        loss = self.loss if isinstance(self.loss, str) else getattr(self.loss, "__name__", "callable")
        return (
            f"ScoringHook(head={self.head}, loss={loss}, "
            f"label_smoothing={self.label_smoothing}, train_mode={self.train_mode})"
        )
