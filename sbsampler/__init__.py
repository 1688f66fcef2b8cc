"""sbsampler: Selective Backprop at the data-loader level.

Wrap a loader, register a scoring hook, pick a strategy::

    import sbsampler as sb
    hook = sb.ScoringHook(model)
    loader = sb.SelectiveLoader(train_loader, hook, strategy="gradmatch", fraction=0.25)
    for batch in loader:
        out = model(batch.inputs)
        loss = sb.weighted_loss(F.cross_entropy(out, batch.targets, reduction="none"), batch.weights)
        loss.backward(); opt.step(); opt.zero_grad()

Where things are (one room per concern):

- ``batch``: parsing a wrapped loader's batches, ``SubBatch``, gathering rows,
  ``with_indices``, ``weighted_loss``, adapting an FFCV loader;
- ``hook`` (a package: the head, the forward, losses, per-token gradients) and
  ``scores``: the scoring forward and its ``Scores`` (NaN policy);
- ``strategies`` (a package, one file per rule) and ``kernels``: what to select, and
  the Numba inner loops;
  ``ondevice``: the loss-only rules' torch-op twins, for selection on a GPU;
- ``deferred``: checks of GPU values read without stalling the GPU;
- ``select``: ``select_batch``, one batch in, one weighted sub-batch out;
- ``weights``: the weights rule (multipliers to step weights), in one function;
- ``loader`` and ``epoch``: ``SelectiveLoader`` (configuration, resume) and its
  per-epoch ``EpochIterator`` (pull, select, rebatch, pad, tail); ``lookahead``:
  its steps prepared in a thread, scoring a replica of the model;
- ``selector``: ``BatchSelector``, per-batch selection for a loop that owns its
  loader (the framework integrations in ``sbsampler.integrations``);
- ``checkpoint``: state dicts that load with ``torch.load(weights_only=True)``;
- ``distributed``: how DDP ranks agree (and ``LocalSync`` for one process);
- ``schedule``: the start/end window, the sampler's anneal, and LR schedules that
  follow the loaders' ``progress`` in epochs (``progress_lr``);
- ``wrapped``: the wrapped loader's own state (stateful loaders, FFCV's epoch);
- ``store`` and ``sampler``: per-sample memory and sampler-level selection;
- ``reference``: reference (irreducible) losses for ``RhoLoss``, from a model
  trained on held-out data; ``tokens``: Rho-1's per-token selection for causal LMs;
- ``ffcv``: ``.beton`` files with indices, FFCV batches, the selective order
  (imported on first use; needs FFCV);
- ``stats``: the loader's counters and the time-saved estimate; ``clock``: the stage
  ``Clock`` (CUDA events on a GPU);
- ``compare``: "does selection pay on my model?" (``sb.compare(...)``, ``python -m
  sbsampler.compare``): the one training loop the benchmarks share, the cost model, the
  break-even fraction and a recommendation.
"""

from __future__ import annotations

import importlib
from typing import Any

from . import distributed, kernels, loader, reference, sampler, schedule, selector, store, strategies, tokens
from .batch import BatchKeys, IndexedDataset, SubBatch, parse_batch, weighted_loss, with_indices
from .epoch import EpochIterator
from .hook import ScoringHook, find_head
from .loader import SelectiveLoader
from .sampler import Plan, SelectiveSampler, WeightedBatches
from .scores import Scores
from .select import Selected, select_batch
from .selector import BatchSelector
from .stats import LoaderStats
from .store import ScoreStore
from .strategies import (
    STRATEGIES,
    BernoulliSelectiveBackprop,
    ComposerRule,
    Full,
    GradientMatching,
    ImportanceSampling,
    InfoBatch,
    RhoLoss,
    Selection,
    SelectiveBackprop,
    Strategy,
    TopK,
    Uniform,
    get_strategy,
)
from .weights import step_weights

__version__ = "0.3.0"

#: the layout version each ``state_dict()`` writes (its ``"version"`` field); ``load_state_dict`` reads these and
#: the older ones listed in the docs' reference (docs/reference/versions.md), and refuses newer ones
STATE_VERSIONS = {
    "SelectiveLoader": loader.STATE_VERSION,
    "BatchSelector": selector.STATE_VERSION,
    "ScoreStore": store.STATE_VERSION,
    "SelectiveSampler": sampler.STATE_VERSION,
    "Strategy": strategies.STATE_VERSION,
}

__all__ = [
    "Scores",
    "ScoringHook",
    "find_head",
    "SelectiveLoader",
    "EpochIterator",
    "SubBatch",
    "BatchKeys",
    "parse_batch",
    "LoaderStats",
    "IndexedDataset",
    "with_indices",
    "weighted_loss",
    "select_batch",
    "BatchSelector",
    "Selected",
    "step_weights",
    "Strategy",
    "Selection",
    "Uniform",
    "TopK",
    "SelectiveBackprop",
    "BernoulliSelectiveBackprop",
    "ComposerRule",
    "GradientMatching",
    "ImportanceSampling",
    "InfoBatch",
    "RhoLoss",
    "Full",
    "ScoreStore",
    "SelectiveSampler",
    "Plan",
    "WeightedBatches",
    "STRATEGIES",
    "get_strategy",
    "distributed",
    "kernels",
    "reference",
    "schedule",
    "strategies",
    "tokens",
    "compare",
    "STATE_VERSIONS",
    "__version__",
]


def __getattr__(name: str) -> Any:
    """``sbsampler.ffcv`` is imported on first use (it needs FFCV, the rest of the package does not), and so is
    ``sbsampler.compare``."""
    if name in ("ffcv", "compare"):  # compare: a callable module, sb.compare(...) (imported on first use, so that
        return importlib.import_module(f".{name}", __name__)  # `python -m sbsampler.compare` finds it unimported)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
