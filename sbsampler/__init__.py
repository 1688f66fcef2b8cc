"""sbsampler: Selective Backprop at the data-loader level.

Wrap a loader, register a scoring hook, pick a strategy::

    import sbsampler as sb
    hook = sb.ScoringHook(model)
    loader = sb.SelectiveLoader(train_loader, hook, strategy="gradmatch", fraction=0.25)
    for batch in loader:
        out = model(batch.inputs)
        loss = sb.weighted_loss(F.cross_entropy(out, batch.targets, reduction="none"), batch.weights)
        loss.backward(); opt.step(); opt.zero_grad()
"""

from . import kernels, strategies
from .hook import Scores, ScoringHook, find_head
from .sampler import SelectiveSampler, WeightedBatches
from .store import ScoreStore
from .loader import IndexedDataset, LoaderStats, SelectiveLoader, SubBatch, weighted_loss, with_indices
from .strategies import (
    STRATEGIES,
    GradientMatching,
    ImportanceSampling,
    InfoBatch,
    Selection,
    SelectiveBackprop,
    Strategy,
    TopK,
    Uniform,
    get_strategy,
)

__version__ = "0.1.0"

__all__ = [
    "Scores",
    "ScoringHook",
    "find_head",
    "SelectiveLoader",
    "SubBatch",
    "LoaderStats",
    "IndexedDataset",
    "with_indices",
    "weighted_loss",
    "Strategy",
    "Selection",
    "Uniform",
    "TopK",
    "SelectiveBackprop",
    "GradientMatching",
    "ImportanceSampling",
    "InfoBatch",
    "ScoreStore",
    "SelectiveSampler",
    "WeightedBatches",
    "STRATEGIES",
    "get_strategy",
    "kernels",
    "strategies",
]
