"""The scoring forward: one no-graph pass of the model in scoring mode, every module's mode and buffer restored;
what the inputs are, and where the logits are in the output."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils import _pytree as pytree

__all__ = ["run_scoring_forward", "downscale", "logits_of", "first_tensor", "describe", "check_not_meta"]

_INTERPOLATE_MODES = {3: "linear", 4: "bilinear", 5: "trilinear"}  # by input dimensions, as Composer


def logits_of(output: Any) -> Optional[Tensor]:
    """The logits in a model's output: the tensor itself, the first item of a tuple/list, or ``.logits``."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    logits = output.get("logits") if isinstance(output, Mapping) else getattr(output, "logits", None)
    return logits if isinstance(logits, Tensor) else None


def _default_forward(model: nn.Module, inputs: Any) -> Any:
    """``model(**inputs)`` for a dict of inputs (a HuggingFace batch), else ``model(inputs)``."""
    return model(**inputs) if isinstance(inputs, Mapping) else model(inputs)


def first_tensor(tree: Any) -> Tensor:
    """The first tensor among the leaves of a batch's inputs (its batch size and device)."""
    for leaf in pytree.tree_leaves(tree):
        if isinstance(leaf, Tensor):
            return leaf
    raise TypeError(f"the inputs hold no tensor (got {type(tree).__name__})")


def describe(tree: Any) -> str:
    """What a batch's inputs are, for an error message: ``a Tensor float32 of shape (8, 6)``, ``a dict with keys``."""
    if isinstance(tree, Tensor):
        return f"a Tensor {str(tree.dtype).replace('torch.', '')} of shape {tuple(tree.shape)}"
    if isinstance(tree, dict):
        return f"a dict with keys {sorted(map(str, tree))}"
    return f"a {type(tree).__name__}"


def check_not_meta(first: Tensor, model: nn.Module) -> None:
    """Neither the inputs nor the model's parameters are meta tensors (shapes without data)."""
    if first.device.type == "meta":
        raise ValueError(
            "the batch's inputs are on the meta device: they hold shapes but no data, so they cannot be scored or "
            "trained on. Load real tensors (a meta tensor comes from torch.device('meta') or torch.empty(..., "
            "device='meta')), or move them with SelectiveLoader(device=...)")
    meta = [name for name, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if meta:
        raise ValueError(
            f"the model's parameters are on the meta device ({len(meta)} of its parameters and buffers: "
            f"{', '.join(meta[:3])}{', ...' if len(meta) > 3 else ''}): built under torch.device('meta') and not "
            "materialised. Call "
            "model.to_empty(device=...) and load or initialise the weights before training")


def downscale(inputs: Any, scale_factor: float) -> Any:
    """``inputs`` downscaled by ``scale_factor`` (linear/bilinear/trilinear by their dimensions, as Composer)."""
    if scale_factor == 1.0:
        return inputs
    if not isinstance(inputs, Tensor) or inputs.dim() not in _INTERPOLATE_MODES:
        shape = tuple(inputs.shape) if isinstance(inputs, Tensor) else type(inputs).__name__
        raise ValueError(f"scale_factor={scale_factor} downscales (B, C, L), (B, C, H, W) or (B, C, D, H, W) "
                         f"tensor inputs, got {shape}")
    x = inputs if inputs.is_floating_point() else inputs.float()
    x = F.interpolate(x, scale_factor=scale_factor, mode=_INTERPOLATE_MODES[inputs.dim()])
    return x if inputs.is_floating_point() else x.round().to(inputs.dtype)


def run_scoring_forward(model: nn.Module, inputs: Any, *, train_mode: bool, amp_dtype: Optional[torch.dtype],
                        channels_last: bool, forward: Optional[Callable[[Any], Any]],
                        compiled: Optional[Callable[..., Any]]) -> Any:
    """One no-graph forward of ``model`` on ``inputs``: in eval mode (or train mode with every buffer restored
    after), under autocast to ``amp_dtype``, through ``forward(inputs)`` or ``compiled`` when given; each module's
    own training flag restored (frozen parts stay frozen)."""
    modes = [(m, m.training) for m in model.modules()]
    saved = None
    if train_mode:
        saved = [b.detach().clone() for b in model.buffers()]
    else:
        model.eval()
    try:
        amp = amp_dtype is not None
        if channels_last and isinstance(inputs, Tensor) and inputs.dim() == 4:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        with torch.no_grad(), torch.autocast(device_type=first_tensor(inputs).device.type,
                                             dtype=amp_dtype or torch.float16, enabled=amp):
            if forward is not None:
                return forward(inputs)
            return _default_forward(compiled if compiled is not None else model, inputs)
    finally:
        for module, training in modes:
            if module.training != training:
                module.__dict__["training"] = training  # what Module.train sets, without __setattr__'s cost
        if saved is not None:
            with torch.no_grad():
                for b, s in zip(model.buffers(), saved):
                    b.copy_(s)
