"""Selection kernels in torch ops, on the device the losses live on: the accelerator twin of ``kernels``.

The loss-only strategies (uniform, top-k, Selective Backprop, Composer's rule,
InfoBatch) choose from a vector of ``B`` losses. On a GPU, copying those losses to
the host for the Numba kernels costs a host synchronisation per batch, which stalls
the CPU until every queued kernel has run and so removes the overlap between the
next batch's launches and this one's compute. These functions do the same work in
torch ops on the losses' device, and never read a value back to the host: every
output shape is known from the inputs' shapes and ``k``.

Each function mirrors a kernel in ``sbsampler.kernels`` and, given the same random
numbers, returns the same result (``tests/test_ondevice.py`` checks both on random
inputs with hypothesis); the strategies draw those numbers from a ``torch.Generator``
on the device (``Strategy._select_tensors``) instead of NumPy's, so the two paths
follow the same law with different streams.

Functions
---------
``ecdf``
    Empirical CDF of losses against a history (``torch.searchsorted``).
``sample_without_replacement``
    ``k`` successive weighted draws without replacement (Efraimidis-Spirakis keys, a stable sort).
``inclusion_probabilities`` / ``systematic_sample``
    Probability-proportional-to-size sampling of exactly ``k`` with known inclusion probabilities.
``ranks``
    Each loss's ascending rank, ties by position (Composer's percentiles).
``top_k``
    The ``k`` largest, ties to the lower position.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["ecdf", "sample_without_replacement", "inclusion_probabilities", "systematic_sample", "ranks", "top_k",
           "work_dtype"]


def work_dtype(device: torch.device) -> torch.dtype:
    """The float type selection works in: float64, except on Apple's MPS, which has none."""
    return torch.float32 if device.type == "mps" else torch.float64


def ecdf(history: Tensor, losses: Tensor) -> Tensor:
    """Fraction of ``history`` values ``<=`` each of ``losses`` (ones for an empty history), as ``kernels.ecdf``."""
    n = history.shape[0]
    if n == 0:
        return torch.ones_like(losses)
    ordered = torch.sort(history).values
    return torch.searchsorted(ordered, losses.contiguous(), right=True).to(losses.dtype) / n


def sample_without_replacement(weights: Tensor, uniforms: Tensor, k: int) -> Tensor:
    """``k`` distinct positions, in draw order, as ``kernels.sample_without_replacement``.

    Keys ``log(u_i) / w_i`` (``-inf`` for a zero weight); the ``k`` largest, ties and
    zero-weight items in position order (a stable sort), are a sample with the law of
    ``k`` successive draws proportional to ``weights`` among those left.
    """
    keys = torch.where(weights > 0, torch.log(uniforms) / weights, torch.full_like(weights, -torch.inf))
    return torch.sort(-keys, stable=True).indices[:k]


def inclusion_probabilities(p: Tensor, k: int) -> Tensor:
    """``pi_i = min(1, c p_i)`` with ``sum(pi) == k``, as ``kernels.inclusion_probabilities``, without a loop.

    With ``q`` the probabilities in descending order and ``S_m = q_m + ... + q_{B-1}``,
    capping the ``m`` largest at 1 leaves the scale ``(k - m) / S_m`` for the rest.
    ``q_m (k - m) < S_m`` holds for every ``m`` from the first one where it holds (so
    the number capped is that first ``m``, or ``B`` when there is none): the fixed
    point the kernel's repeated capping reaches.
    """
    b = p.shape[0]
    q, order = torch.sort(p, descending=True, stable=True)
    rest = torch.flip(torch.cumsum(torch.flip(q, (0,)), 0), (0,))  # S_m
    m = torch.arange(b + 1, device=p.device, dtype=p.dtype)
    rest = torch.cat([rest, rest.new_zeros(1)])
    scale = torch.where(rest > 0, (k - m) / torch.where(rest > 0, rest, torch.ones_like(rest)), torch.zeros_like(rest))
    stops = torch.cat([q * scale[:b] < 1.0, torch.ones(1, dtype=torch.bool, device=p.device)])
    capped = torch.argmax(stops.to(torch.int8))  # the first m where it holds (a 0-d tensor: no host read)
    pi_sorted = torch.where(m[:b] < capped, torch.ones_like(q), q * scale[capped])
    return torch.empty_like(pi_sorted).scatter_(0, order, pi_sorted)


def systematic_sample(pi: Tensor, order: Tensor, u: Tensor, k: int) -> Tensor:
    """Systematic PPS sample of ``k`` positions along ``order``, as ``kernels.systematic_sample``.

    Item ``order[j]`` is taken for each of ``u, u + 1, ..., u + k - 1`` that its running
    sum is the first to exceed; a crossing lost to float round-off falls back to the
    last items of ``order``, as in the kernel. ``u`` is a 0-d or (1,) tensor in [0, 1).
    """
    b = order.shape[0]
    running = torch.cumsum(pi[order], 0)
    steps = torch.arange(k, device=pi.device, dtype=pi.dtype)
    at = torch.searchsorted(running, u.reshape(1).to(pi.dtype) + steps, right=True)
    fallback = torch.arange(b - k, b, device=pi.device)
    return order[torch.where(at < b, at, fallback)]


def ranks(loss: Tensor) -> Tensor:
    """Each loss's ascending rank (0 for the smallest), ties by position."""
    order = torch.sort(loss, stable=True).indices
    return torch.empty_like(order).scatter_(0, order, torch.arange(loss.shape[0], device=loss.device))


def top_k(loss: Tensor, k: int) -> Tensor:
    """Positions of the ``k`` largest losses, ties to the lower position, in ascending position order."""
    return torch.sort(torch.sort(-loss, stable=True).indices[:k]).values
