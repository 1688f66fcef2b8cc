"""PyTorch Lightning: selection as a ``Callback``.

Lightning iterates, shards (``DistributedSampler``), counts and checkpoints its
own loader, and prefetches one batch ahead. So selection happens where the batch
has reached the device, just before ``training_step``: the callback chains a
step onto the module's ``on_after_batch_transfer`` that turns each training batch
into a weighted ``SubBatch`` (``BatchSelector``), scored by the model as it is at
that step (not one step stale, as a wrapped loader under Lightning's prefetch
would be). One step per batch: ``len(train_dataloader)``, ``max_steps``,
``estimated_stepping_batches`` and every LR schedule are Lightning's own::

    from sbsampler.integrations.lightning import SelectiveBackpropCallback

    class Model(L.LightningModule):
        def training_step(self, batch, batch_idx):       # batch: an sb.SubBatch
            losses = F.cross_entropy(self(batch.inputs), batch.targets, reduction="none")
            return sb.weighted_loss(losses, batch.weights)

    trainer = L.Trainer(max_epochs=10, callbacks=[SelectiveBackpropCallback("sb", fraction=0.25, seed=0)])

``SelectiveBackpropCallback`` was called ``SelectiveBackprop`` until 0.3, like the
strategy ``sbsampler.SelectiveBackprop``; the old name still works, with a
``FutureWarning``, and both save their state under the key ``"SelectiveBackprop"``,
so older checkpoints restore.

The selector's state (strategy RNG and history, counters) is the callback's
``state_dict``, which Lightning writes into every checkpoint and restores on
``fit(ckpt_path=...)``. The counters are logged as ``sb/...`` each step.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any, Optional, Union

try:
    from lightning.pytorch import Callback, LightningModule, Trainer
except ImportError:  # pragma: no cover - the standalone package
    from pytorch_lightning import Callback, LightningModule, Trainer  # type: ignore[no-redef]

from ..batch import SubBatch
from ..hook import ScoringHook
from ..selector import BatchSelector
from ..strategies import Strategy, get_strategy, resolve_fraction

__all__ = ["SelectiveBackpropCallback", "SelectiveBackprop"]

LOGGED = ("backprop_fraction", "samples_yielded", "samples_seen", "selection_time", "estimated_time_saved",
          "estimated_time_saved_low", "estimated_time_saved_high")


class SelectiveBackpropCallback(Callback):
    """Back-propagate a weighted share of every training batch.

    Args:
        strategy: a ``Strategy`` or registered name.
        fraction: share of each batch to back-propagate; default 0.25 (refused for a rule that chooses its own
            count: ``sbsampler.strategies.resolve_fraction``).
        hook: the ``ScoringHook`` to score with, on the ``LightningModule`` or
            one of its submodules (another model is refused at ``fit``); default
            one on the module itself (``ScoringHook(module, **hook_kwargs)``),
            made at ``fit``'s setup. A callback reused to fit another module (a
            sweep) makes a new hook and selector for it: fresh counters, and the
            strategy as first given (a copy of a ``Strategy`` object).
        hook_kwargs: passed to that default ``ScoringHook`` (``loss=``, ``head=``, ...).
        log: log the counters (``sb/backprop_fraction``, ...) every step.
        **selector_kwargs: passed to ``BatchSelector`` (``seed``, ``nan_policy``,
            ``sync_history``, ``batch_keys``, ``batch_fields``).
    """

    def __init__(self, strategy: Union[None, str, Strategy] = "uniform", fraction: Optional[float] = None, *,
                 hook: Optional[ScoringHook] = None, hook_kwargs: Optional[dict] = None, log: bool = True,
                 **selector_kwargs: Any) -> None:
        resolve_fraction(fraction, get_strategy(strategy))  # refused now, not at fit: a rule that takes none
        # a Strategy object is kept as given for the first fit; a fit on another module starts from a copy of it
        self._args = (strategy, fraction, selector_kwargs)
        self._pristine = copy.deepcopy(strategy) if isinstance(strategy, Strategy) else strategy
        self._own_hook = hook is None
        self.hook = hook
        self.hook_kwargs = dict(hook_kwargs or {})
        self.log = log
        self.selector: Optional[BatchSelector] = None
        self._pending: Optional[dict] = None  # a checkpoint's state restored before setup made the selector
        self._module: Optional[LightningModule] = None
        if hook is not None:
            self._make_selector(hook)

    def _make_selector(self, hook: ScoringHook) -> None:
        strategy, fraction, kwargs = self._args
        self.selector = BatchSelector(hook, strategy, fraction, **kwargs)
        if self._pending is not None:
            self.selector.load_state_dict(self._pending)
            self._pending = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Make the hook and selector for the module being fitted (again for a new module)."""
        if stage != "fit":
            return
        if not self._own_hook and not any(m is self.hook.model for m in pl_module.modules()):  # type: ignore[union-attr]
            raise ValueError(
                "SelectiveBackpropCallback(hook=...) scores a model that is not the LightningModule being fit, nor "
                f"one of its submodules ({type(self.hook.model).__name__}): it would select by another model's losses. "  # type: ignore[union-attr]
                "Make the hook on this module, or leave hook=None to have one made on each module fit")
        if self._own_hook and self.hook is not None and self.hook.model is not pl_module:
            # A callback reused for a new module (a sweep): score that module, with a fresh selector.
            strategy, fraction, kwargs = self._args
            self._args = (copy.deepcopy(self._pristine), fraction, kwargs)
            self.selector = None
        if self.selector is None:
            self.hook = ScoringHook(pl_module, **self.hook_kwargs)
            self._make_selector(self.hook)
        original = pl_module.on_after_batch_transfer
        selector = self.selector

        def on_after_batch_transfer(batch: Any, dataloader_idx: int) -> Any:
            batch = original(batch, dataloader_idx)
            return selector(batch) if trainer.training else batch  # type: ignore[misc]

        pl_module.on_after_batch_transfer = on_after_batch_transfer  # type: ignore[method-assign]
        self._module = pl_module

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Remove the scoring hook from the model when fitting ends."""
        if stage == "fit" and self._module is pl_module and "on_after_batch_transfer" in vars(pl_module):
            del pl_module.on_after_batch_transfer  # the class's own hook again
            self._module = None

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        """Check that the batch reaching ``training_step`` was selected (``on_after_batch_transfer`` ran)."""
        if not isinstance(batch, SubBatch):
            raise RuntimeError(
                f"SelectiveBackpropCallback: training_step would get an unselected {type(batch).__name__}: the "
                "module's "
                "on_after_batch_transfer was bypassed (a LightningDataModule that defines on_after_batch_transfer "
                "takes precedence). Move that hook into the LightningModule, or call the callback's selector "
                "yourself at its end: `return callback.selector(batch)`")

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Read the epoch's last GPU checks; warn once if selection costs more than it saves."""
        if self.selector is not None:
            self.selector.epoch_end()  # the epoch's last GPU checks read; a SelectionCostWarning if it does not pay

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        """Log the selection's counters and the estimated time saved (``sb/...``), without waiting for the GPU."""
        if self.log and self.selector is not None:
            stats = self.selector.stats.as_dict(wait=False)  # no wait for the GPU each step
            pl_module.log_dict({f"sb/{k}": float(stats[k]) for k in LOGGED if stats[k] is not None}, on_step=True,
                               on_epoch=False, batch_size=len(batch))

    def state_dict(self) -> dict[str, Any]:
        """The selector's state, saved in Lightning's checkpoint."""
        if self.selector is None:
            return dict(self._pending or {})
        return self.selector.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the selector's state (kept until ``setup`` makes the selector, when it does not exist yet)."""
        if not state_dict:
            return
        if self.selector is None:
            self._pending = dict(state_dict)
        else:
            self.selector.load_state_dict(state_dict)

    @property
    def state_key(self) -> str:
        """The key of the callback's state in Lightning's checkpoint: ``"SelectiveBackprop"`` (the old name's, so a
        checkpoint written before the rename restores)."""
        return "SelectiveBackprop"


class SelectiveBackprop(SelectiveBackpropCallback):
    """The former name of ``SelectiveBackpropCallback`` (deprecated: it shares its name with the strategy
    ``sbsampler.SelectiveBackprop``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        warnings.warn("sbsampler.integrations.lightning.SelectiveBackprop is now SelectiveBackpropCallback (the old "
                      "name is the strategy's too); it will be removed in 0.4", FutureWarning, stacklevel=2)
        super().__init__(*args, **kwargs)
