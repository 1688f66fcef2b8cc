"""Does selection pay on my model? One call trains full and selective modes and says which to use, or that it
cannot tell.

Whether selection saves time depends on the model, the data and the machine: a scoring forward
costs a share of a step, and the picks must keep up full training's accuracy. ``compare``
measures both on the user's own model, through one training loop for every mode (the loop the
benchmarks share), several seeds paired by seed::

    import sbsampler as sb
    result = sb.compare(model=make_model, train_loader=train_dl, evaluate=test_accuracy,
                        optimizer=lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9),
                        epochs=4, strategy="sb", fractions=(0.25,), schedule=sb.schedule.cosine(4))
    print(result.report())           # the tables, the noise, the cost model, and the verdict with its reason
    result.write("compare_out")      # compare.jsonl (one line per run, then the summary) and compare.png

or ``python -m sbsampler.compare my_script.py`` for a script that defines ``model()``,
``train_loader()``, ``evaluate(model)`` and ``optimizer(params)`` (and may define
``loss(outputs, targets)`` per sample and ``schedule(epochs)``; ``--help`` lists every option).

Default modes: full training; ``uniform`` (the baseline that matters), the given strategy per
batch, and InfoBatch at the sampler level (it loads only what it keeps), at every fraction;
three seeds. The verdict (``decision``) recommends a mode only if it reached full training's
final score minus a tolerance sooner by a margin in *every* seed and by more than full training's
own spread between seeds; it says "cannot tell" when noise is larger than the gain, when a
speed-up is more than the mode's kept share allows, when full training did not learn, met its
target at its first evaluation, or scored NaN, and with one seed; with a schedule it also
matches each mode with full training on that schedule fitted to the mode's budget (``budget``).

The rooms: ``loop`` (``train_loop``, the one loop, and its ``Run``), ``modes`` (``Mode``, a run of
one, the preflight), ``costs`` (the break-even fraction, the ideal speed-up), ``summary`` (a row per
mode), ``budget`` (the budget-matched baseline), ``decision`` (the verdict), ``report`` (tables,
files, plot), ``runner`` (``compare``), ``cli`` (the command line).
"""

from __future__ import annotations

import sys
import types
from typing import Any

from .budget import budget_share, fitted_schedule
from .cli import main
from .costs import break_even, ideal_speedup
from .decision import MARGIN, Recommendation, classify, recommend
from .loop import Point, Run, per_sample_cross_entropy, train_loop
from .modes import Mode, default_modes, run_mode
from .report import Comparison
from .runner import DEFAULT_SEEDS, compare
from .summary import TOLERANCE, summarise

__all__ = ["Mode", "Point", "Run", "Comparison", "Recommendation", "default_modes", "train_loop", "run_mode",
           "compare", "summarise", "recommend", "classify", "break_even", "ideal_speedup", "budget_share",
           "fitted_schedule", "per_sample_cross_entropy", "main", "MARGIN", "TOLERANCE", "DEFAULT_SEEDS"]


class _CallableModule(types.ModuleType):
    """``sb.compare(...)`` calls ``compare``; ``sbsampler.compare.Mode`` and the rest stay reachable."""

    def __call__(self, **kwargs: Any) -> Comparison:
        return compare(**kwargs)


sys.modules[__name__].__class__ = _CallableModule
