"""The scoring hook: per-sample losses and last-layer gradients from one forward pass.

For a model whose last layer is ``z = W h + b`` and a per-sample loss ``l(z, y)``,
the gradient of sample ``i`` with respect to ``(W, b)`` is the outer product
``g_i = e_i (x) [h_i, 1]`` with ``e_i = dl_i/dz_i``. For cross-entropy
``e_i = softmax(z_i) - q_i`` in closed form (``q_i`` the target distribution:
one-hot, label-smoothed, or soft/mixup targets), so one forward pass with no
autograd graph gives every sample's loss and last-layer gradient. For any other
per-sample loss (a callable), ``e_i`` comes from autograd on the logits alone.
``Scores`` (``sbsampler.scores``) keeps ``e_i`` and ``h_i`` and derives gradient
norms and the Gram matrix from them without building the ``C (d + 1)``-wide
gradients.

A head applied per token (``(B, T, C)`` logits over ``(B, T, d)`` features, a
language model's) gives sample ``i`` the gradient ``G_i = sum_t e_it (x) [h_it, 1]``.
The hook hands it over exactly when ``C (d + 1)`` is small enough
(``exact_limit``), and otherwise as a Kronecker-structured random sketch
``sum_t (P' e_it) (x) (Q' [h_it, 1])`` with Gaussian ``P`` (C x r) and ``Q``
((d + 1) x r), entries of variance ``1/r``: its Gram matrix is an unbiased
estimate of the exact one. A squared norm ``G_ii`` has a relative standard
deviation of about ``sqrt(2 / r)``, an off-diagonal entry an error below
``sqrt(2 / r) * sqrt(G_ii G_jj)`` (measured: 0.23 and 0.13 at the default
``r = 32``; tested against ``torch.func``).

Strategies that read only losses (uniform, topk, sb, composer, infobatch) need
no head at all (``head=False``, or a model without an ``nn.Linear``).

The rooms: ``head`` (finding the head and checking it is the logits' layer),
``forward`` (the no-graph scoring forward), ``losses`` (losses and ``dl/dz``),
``per_token`` (per-token heads' gradients, exact or sketched), and ``scoring``
(``ScoringHook``, which puts them together).
"""

from __future__ import annotations

from .head import find_head
from .scoring import ScoringHook

__all__ = ["ScoringHook", "find_head"]
