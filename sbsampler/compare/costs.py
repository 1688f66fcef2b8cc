"""The cost model: what selection can save at most on this model and machine, from the measured costs.

Per batch, every sample is loaded and scored and a share ``k`` of them stepped on; at the sampler
level only the kept share is loaded, with no scoring. With ``c`` the scoring and selection cost per
sample seen and ``s`` the step cost per back-propagated sample, a per-batch rule saves time only while
``k < 1 - c / s``: the **break-even fraction**. The ideal speed-up per epoch bounds what a mode can
measure: one that measures more is timing noise, not a saving (``sbsampler.compare.decision``).
"""

from __future__ import annotations

import math

__all__ = ["break_even", "ideal_speedup"]


def break_even(selection_per_sample: float, step_per_sample: float) -> float:
    """The kept share below which a score-reading rule saves time: ``1 - c / s`` (``<= 0``: no share pays)."""
    if step_per_sample <= 0:
        raise ValueError(f"the step cost per sample must be > 0, got {step_per_sample}")
    return 1.0 - selection_per_sample / step_per_sample


def ideal_speedup(fraction: float, selection_per_sample: float, step_per_sample: float,
                  loading_per_sample: float = 0.0, level: str = "batch") -> float:
    """The cost model's speed-up per epoch against full training: per batch every sample is loaded and scored and
    ``fraction`` of them stepped on; at the sampler level only ``fraction`` of them is loaded, with no scoring.
    ``fraction``: the share actually back-propagated (a variable-count rule's, measured)."""
    full = loading_per_sample + step_per_sample
    if level == "sampler":
        cost = fraction * (loading_per_sample + step_per_sample)
    else:
        cost = loading_per_sample + selection_per_sample + fraction * step_per_sample
    return full / cost if cost > 0 else math.inf
