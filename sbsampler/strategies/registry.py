"""The name registry: ``STRATEGIES``, ``get_strategy`` and ``fraction_for``."""

from __future__ import annotations

from typing import Optional, Union

from .base import Seed, Strategy
from .composer import ComposerRule
from .full import Full
from .gradmatch import GradientMatching
from .importance import ImportanceSampling
from .infobatch import InfoBatch
from .sb import SelectiveBackprop
from .topk import TopK
from .uniform import Uniform

STRATEGIES: dict[str, type[Strategy]] = {
    "uniform": Uniform,
    "topk": TopK,
    "sb": SelectiveBackprop,
    "composer": ComposerRule,
    "gradmatch": GradientMatching,
    "importance": ImportanceSampling,
    "infobatch": InfoBatch,
    "full": Full,
}
_ALIASES = {"random": "uniform", "selective_backprop": "sb", "gradient_matching": "gradmatch"}


def get_strategy(strategy: Union[None, str, Strategy], seed: Seed = None) -> Strategy:
    """A strategy object from a registered name (or the object itself, unchanged).

    Names: ``"uniform"``, ``"topk"``, ``"sb"``, ``"composer"``, ``"gradmatch"``, ``"importance"``,
    ``"infobatch"``, ``"full"`` (aliases ``"random"``, ``"selective_backprop"``, ``"gradient_matching"``);
    ``None`` is ``Full()``. ``seed`` is passed to the constructor of a named strategy.
    """
    if isinstance(strategy, Strategy):
        return strategy
    if strategy is None:
        return Full(seed=seed)
    if isinstance(strategy, str):
        key = _ALIASES.get(strategy.lower(), strategy.lower())
        if key not in STRATEGIES:
            raise ValueError(f"unknown strategy {strategy!r}; choose one of {sorted(STRATEGIES)}")
        return STRATEGIES[key](seed=seed)
    raise TypeError(f"strategy must be a name or a Strategy object, got {type(strategy).__name__}")


def fraction_for(strategy: Union[None, str, Strategy], fraction: Optional[float]) -> Optional[float]:
    """``fraction`` for a rule that takes one, ``None`` for one that does not: for a sweep over rules with one
    fraction column (a benchmark's job table), where dropping it for InfoBatch, Bernoulli SB or full training is
    meant. Anywhere else, pass the fraction and let a rule that takes none refuse it (``resolve_fraction``)."""
    return fraction if get_strategy(strategy).uses_fraction else None
