"""Finding the head and checking it: the last ``nn.Linear`` by default, confirmed on the first scored batch to be
the layer whose output the model returns as its logits (and corrected when another single linear layer's is)."""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

__all__ = ["find_head", "same", "module_name", "linears_producing", "wrong_head_error"]


def find_head(model: nn.Module) -> Optional[nn.Linear]:
    """The last ``nn.Linear`` registered in ``model`` (its classifier head, usually), or ``None``.

    ``ScoringHook`` checks on the first scored batch that its output is the
    model's logits, and corrects the choice when another linear layer's is.
    """
    head = None
    for module in model.modules():
        if isinstance(module, nn.Linear):
            head = module
    return head


def same(logits: Tensor, z: Tensor) -> bool:
    """The same values (NaN where NaN, inf where inf), whatever the dtype or the (B, 1) vs (B,) shape."""
    if logits.numel() != z.numel() or logits.shape[:1] != z.shape[:1]:
        return False
    a = logits.detach().reshape(z.shape).to(z.dtype)
    return bool(torch.isclose(a, z.detach(), rtol=0.0, atol=0.0, equal_nan=True).all())


def module_name(model: nn.Module, module: nn.Module) -> str:
    """``'fc' (Linear(64, 10))``: where ``module`` sits in ``model``, for an error message."""
    names = {m: n for n, m in model.named_modules()}
    label = names.get(module, "?") or "the model itself"
    if isinstance(module, nn.Linear):
        return f"{label!r} (Linear({module.in_features}, {module.out_features}))"
    return repr(label)


def linears_producing(model: nn.Module, run: Callable[[Any], Any], logits: Tensor, inputs: Any) -> list[nn.Linear]:
    """The linear layers of ``model`` called once in ``run(inputs)`` (a scoring forward) whose output equals
    ``logits``."""
    outputs: dict[nn.Module, list[Tensor]] = {}

    def record(module: nn.Module, args: tuple, out: Tensor) -> None:
        outputs.setdefault(module, []).append(out)

    handles = [m.register_forward_hook(record) for m in model.modules() if isinstance(m, nn.Linear)]
    try:
        run(inputs)
    finally:
        for h in handles:
            h.remove()
    return [m for m, outs in outputs.items() if len(outs) == 1 and same(logits, outs[0])]


def wrong_head_error(model: nn.Module, head: nn.Module, producers: list[nn.Linear], z: Tensor,
                     logits: Tensor) -> ValueError:
    """The error for a head whose output is not the model's logits, saying which layer's is (if one is)."""
    found = ", ".join(module_name(model, m) for m in producers)
    how = (f"the logits come from {found}: pass it, e.g. ScoringHook(model, head=model.<that layer>)" if producers
           else "no linear layer outputs them: the logits are changed after the last layer (a temperature, a "
                "scale, a sum of views); move that change into loss= or into the layer, pass head=, or pass "
                "head=False to score losses only")
    return ValueError(
        f"the head {module_name(model, head)} is not the layer whose output the model returns as logits "
        f"(head output {tuple(z.shape)}, model logits {tuple(logits.shape)}); {how}"
    )
