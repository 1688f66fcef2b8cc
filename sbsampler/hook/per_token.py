"""Per-sample last-layer gradients of a head applied per token: ``G_i = sum_t e_it (x) [h_it, 1]``, exact up to a
size, else a Kronecker-structured random sketch whose Gram matrix is an unbiased estimate of the exact one."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["Sketch", "per_token_grads"]


class Sketch:
    """The Gaussian projections ``P`` (C x r) and ``Q`` ((d + 1) x r), entries of variance ``1/r``, made once per
    shape, device and dtype from ``seed``."""

    def __init__(self, dim: int, seed: int) -> None:
        self.dim, self.seed = int(dim), int(seed)
        self._made: dict[tuple, tuple[Tensor, Tensor]] = {}

    def projections(self, c: int, d: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """``(P, Q)`` for ``C = c`` outputs and ``d`` features (with the bias column), on ``device`` in ``dtype``."""
        key = (c, d, device, dtype)
        if key not in self._made:
            g = torch.Generator().manual_seed(self.seed)
            r = self.dim
            p = torch.randn(c, r, generator=g, dtype=torch.float64) / r ** 0.5
            q = torch.randn(d, r, generator=g, dtype=torch.float64) / r ** 0.5
            self._made[key] = (p.to(device, dtype), q.to(device, dtype))
        return self._made[key]


def per_token_grads(e: Tensor, h: Tensor, bias: bool, exact_limit: int, sketch: Sketch) -> Tensor:
    """(B, D) per-sample gradients ``G_i = sum_t e_it (x) [h_it, 1]`` (``[h_it]`` without a bias) from (B, T, C)
    ``e`` and (B, T, d) ``h``: exact (``D = C (d + 1)``) up to ``exact_limit``, else sketched (``D = r * r``)."""
    if bias:
        h = torch.cat([h, torch.ones_like(h[..., :1])], dim=-1)
    b, c, d = e.shape[0], e.shape[-1], h.shape[-1]
    if c * d <= exact_limit:
        return torch.einsum("btc,btd->bcd", e, h).reshape(b, c * d)
    p, q = sketch.projections(c, d, e.device, e.dtype)
    return torch.einsum("btr,bts->brs", e @ p, h @ q).reshape(b, -1)
