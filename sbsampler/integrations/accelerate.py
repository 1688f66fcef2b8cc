"""accelerate: a ``SelectiveLoader`` over a loader that ``accelerator.prepare`` returned.

accelerate owns the device placement, the sharding and the gradient accumulation;
a ``SelectiveLoader`` wrapped around the prepared loader owns the selection, and
under several processes its ranks agree on every step (``sbsampler.distributed``
over the process group accelerate started)::

    model, opt, train_dl = accelerator.prepare(model, opt, train_dl)
    loader = selective_loader(accelerator, train_dl, sb.ScoringHook(accelerator.unwrap_model(model)), "sb", 0.25)
    for batch in loader:
        with accelerator.accumulate(model):
            losses = F.cross_entropy(model(batch.inputs), batch.targets, reduction="none")
            accelerator.backward(sb.weighted_loss(losses, batch.weights))
            opt.step(); opt.zero_grad()

``even_batches`` (accelerate's default ``True``) gives every process the same
number of batches by repeating samples from the start of the data in the last
ones; those repeats are scored and selected like any sample. With
``even_batches=False`` processes may hold different numbers of batches, and the
``SelectiveLoader`` keeps them in step itself: a process that has run out takes
the same steps with zero-weight rows (``LoaderStats.samples_padded``). So
``accelerator.join_uneven_inputs`` is not needed around a ``SelectiveLoader``'s
loop: its steps are already equal on every process.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional, Union

from accelerate import Accelerator

from ..hook import ScoringHook
from ..loader import SelectiveLoader
from ..strategies import Strategy

__all__ = ["selective_loader"]


def selective_loader(accelerator: Accelerator, prepared: Iterable, hook: ScoringHook,
                     strategy: Union[None, str, Strategy] = "uniform", fraction: Optional[float] = None,
                     **kwargs: Any) -> SelectiveLoader:
    """``SelectiveLoader(prepared, hook, strategy, fraction, device=accelerator.device, distributed=...)``.

    ``distributed`` is the process group accelerate initialised when it runs
    more than one process, else none; ``kwargs`` go to ``SelectiveLoader``
    (``rebatch``, ``seed``, ``epochs``, ...). The hook should sit on the
    unwrapped model (``accelerator.unwrap_model``), so that scoring runs no DDP
    collective.
    """
    if not isinstance(accelerator, Accelerator):
        raise TypeError(f"accelerator must be an accelerate.Accelerator, got {type(accelerator).__name__}")
    kwargs.setdefault("device", accelerator.device)
    kwargs.setdefault("distributed", accelerator.num_processes > 1)
    return SelectiveLoader(prepared, hook, strategy, fraction, **kwargs)
