"""Selection strategies: map a minibatch's ``Scores`` to weighted sample indices.

Every strategy is a small object with one method,
``select(scores, k, rng=None) -> Selection(indices, weights)``, where ``indices``
is int64 (k,) positions in the minibatch and ``weights`` float32 (k,). The
sub-batch loss ``sum_i w_i * l_i`` estimates the mean loss of the whole minibatch
(exactly, in expectation, for the unbiased rules; as the paper defines it for the
others; ``sbsampler.weights`` says how the weights travel on to a step).

Strategies know nothing about models, loaders, ranks or devices. Their state (a
loss history, an RNG) is explicit: ``state_dict()`` / ``load_state_dict()``. A
strategy with a loss history remembers what it is shown through ``observe``,
once per round, by whoever drives it; ``select`` never changes the history.

What a strategy needs is declared on its class, and the loader and the sampler
read these facts instead of names:

=========================  ==========================================================
``needs_scores``           reads the scoring pass at all (``Full`` does not)
``needs_gradients``        reads last-layer gradient information (norms or the Gram)
``works_from_stored``      can choose from stored losses/norms (``SelectiveSampler``)
``keeps_history``          remembers past losses (``observe``)
``variable_count``         may return a count other than ``k``
``keeps_all``              every sample passes, ``k`` is ignored (no rebatching)
``sampler_scale``          a ``SelectiveSampler``'s default weight scale (``"step"``/``"epoch"``)
``selects_on_device``      has a torch-op rule (``sbsampler.ondevice``) that selects on the losses' device
``signed_weights``         may give a negative weight (a property: GradientMatching with ``nonneg=False``)
``needs_reference``        reads each sample's reference loss (``Scores.reference``, by dataset index)
``uses_fraction``          its count follows ``fraction``; a fraction given to another rule is refused
=========================  ==========================================================

Two implementations of each loss-only rule follow the same law: ``select`` (NumPy
and the Numba kernels, on the host; draws from ``self.rng``) and
``select_tensors`` (torch ops on the losses' device, no host round trip; draws from
a ``torch.Generator`` on that device, seeded once from ``self.rng``). ``select_batch``
uses the second for losses on an accelerator (``select_on="auto"``).

======================  ===========  =====================================================
name                    class        rule
======================  ===========  =====================================================
``"uniform"``           Uniform      k without replacement, ``w = 1/k`` (the baseline)
``"topk"``              TopK         the k largest losses, ``w = 1/k``
``"sb"``                SelectiveBackprop  keep-probability ``CDF(loss)**beta`` (Jiang et al. 2019)
``"composer"``          ComposerRule       draw by loss rank, ``p ~ percentile**(1/keep - 1)`` (MosaicML Composer)
``"gradmatch"``         GradientMatching   weighted subset matching the mean gradient (OMP + NNLS)
``"importance"``        ImportanceSampling ``p ~ grad norm``, ``w = 1/(B k p)`` (Katharopoulos & Fleuret 2018)
``"infobatch"``         InfoBatch    drop below-mean losses w.p. r, up-weight the rest ``1/(1-r)`` (Qin et al. 2024)
``"full"``              Full         every sample, ``w = 1/B``, no scoring pass (full backprop)
======================  ===========  =====================================================

One file per rule (``uniform``, ``topk``, ``sb``, ``composer``, ``gradmatch``, ``importance``,
``infobatch``, ``rho``, ``full``); the base class and the helpers the rules share in ``base``;
the names in ``registry``.
"""

from __future__ import annotations

from .base import (  # noqa: F401 - Seed, STATE_VERSION, DEFAULT_FRACTION, count_for: for the loaders
    DEFAULT_FRACTION,
    STATE_VERSION,
    Seed,
    Selection,
    Strategy,
    budget,
    check_fraction,
    count_for,
    resolve_fraction,
)
from .composer import ComposerRule
from .full import Full
from .gradmatch import GradientMatching
from .importance import ImportanceSampling
from .infobatch import InfoBatch
from .registry import STRATEGIES, fraction_for, get_strategy
from .rho import RhoLoss
from .sb import BernoulliSelectiveBackprop, SelectiveBackprop
from .topk import TopK
from .uniform import Uniform

__all__ = [
    "Selection",
    "Strategy",
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
    "STRATEGIES",
    "get_strategy",
    "budget",
    "resolve_fraction",
    "fraction_for",
]
