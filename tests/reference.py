"""Slow, obviously-correct NumPy twins of the Numba kernels in ``sbsampler.kernels``, and test scores.

``make_scores`` builds ``Scores`` shaped like a trained classifier's (softmax errors,
ReLU features) and ``explicit_grads`` materialises their last-layer gradients; the
tests and ``benchmarks/kernels.py`` share them.
"""

from __future__ import annotations

import numpy as np
import torch

import sbsampler as sb


def make_scores(seed: int = 0, b: int = 64, c: int = 5, d: int = 12, loss=None, dtype=torch.float64,
                logit_scale: float = 2.0) -> sb.Scores:
    """Scores of ``b`` samples, ``c`` classes, ``d`` features: ``E = softmax(z) - onehot(y)``, ``H = relu(N(0, 1))``."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(b, c, generator=g, dtype=dtype) * logit_scale
    y = torch.randint(0, c, (b,), generator=g)
    h = torch.relu(torch.randn(b, d, generator=g, dtype=dtype))
    p = torch.softmax(z, 1)
    e = p - torch.nn.functional.one_hot(y, c).to(dtype)
    ce = -torch.log(p.gather(1, y[:, None]))[:, 0]
    return sb.Scores(loss=ce if loss is None else loss, logit_grad=e, features=h, targets=y)


def explicit_grads(scores: sb.Scores) -> np.ndarray:
    """(B, C (d + 1)) materialised last-layer (weight and bias) gradients ``e_i (x) [h_i, 1]``."""
    h1 = torch.cat([scores.features, torch.ones(len(scores), 1, dtype=scores.features.dtype)], 1)
    return torch.einsum("bc,bd->bcd", scores.logit_grad, h1).reshape(len(scores), -1).numpy()


def ecdf_ref(history: np.ndarray, losses: np.ndarray) -> np.ndarray:
    """For each loss: the fraction of history values <= it (ones for an empty history)."""
    if history.size == 0:
        return np.ones(losses.shape[0])
    return np.array([np.count_nonzero(history <= v) / history.size for v in losses])


def es_order_ref(weights: np.ndarray, uniforms: np.ndarray, k: int) -> np.ndarray:
    """Efraimidis-Spirakis by brute force: repeatedly take the largest key u**(1/w)."""
    keys = [(u ** (1.0 / w) if w > 0 else -1.0, -i) for i, (w, u) in enumerate(zip(weights, uniforms))]
    out = []
    left = list(range(len(weights)))
    for _ in range(k):
        best = max(left, key=lambda i: keys[i])
        out.append(best)
        left.remove(best)
    return np.array(out, dtype=np.int64)


def inclusion_probabilities_ref(p: np.ndarray, k: int) -> np.ndarray:
    """``min(1, c p)`` with ``c`` found by bisection so that the sum is ``k``."""
    lo, hi = 0.0, 1.0
    while np.minimum(1.0, hi * p).sum() < k:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if np.minimum(1.0, mid * p).sum() < k:
            lo = mid
        else:
            hi = mid
    return np.minimum(1.0, hi * p)


def omp_ref(atoms: np.ndarray, target: np.ndarray, k: int, nonneg: bool) -> tuple[np.ndarray, np.ndarray]:
    """OMP on explicit vectors (columns of ``atoms``): pick by correlation, re-fit by lstsq."""
    chosen: list[int] = []
    w = np.zeros(0)
    for _ in range(k):
        resid = target - atoms[:, chosen] @ w
        corr = atoms.T @ resid
        score = corr if nonneg else np.abs(corr)
        score[chosen] = -np.inf
        best = int(np.argmax(score))
        if score[best] <= 1e-10 * np.abs(atoms.T @ target).max():
            break
        chosen.append(best)
        w = np.linalg.lstsq(atoms[:, chosen], target, rcond=None)[0]
    return np.array(chosen, dtype=np.int64), w


def outer_norms_ref(e: np.ndarray, h: np.ndarray, bias: bool) -> np.ndarray:
    """Frobenius norm of each explicit outer product ``e_i (x) [h_i, 1]``."""
    rows = []
    for ei, hi in zip(e.astype(np.float64), h.astype(np.float64)):
        hb = np.append(hi, 1.0) if bias else hi
        rows.append(np.linalg.norm(np.outer(ei, hb)))
    return np.array(rows)


def composer_select_ref(losses: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """MosaicML Composer's ``select_using_loss`` rule, written out: rank the losses, weight rank r by
    ((r + 0.5) / B) ** (1 / keep - 1) with keep = k / B, draw k without replacement one at a time."""
    b = losses.shape[0]
    by_rank = np.argsort(losses, kind="stable")
    probs = ((np.arange(b) + 0.5) / b) ** (b / k - 1.0)
    chosen = rng.choice(b, size=k, replace=False, p=probs / probs.sum())
    return np.sort(by_rank[chosen])


def top_k_ref(values: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` largest values' positions, ties to the lower position, sorted: a stable argsort."""
    return np.sort(np.argsort(-np.asarray(values), kind="stable")[:k]).astype(np.int64)


def select_ref(strategy: "sb.Strategy", loss: np.ndarray, reference: np.ndarray, k: int,
               rng: np.random.Generator, norms: np.ndarray = None) -> tuple[np.ndarray, np.ndarray]:
    """``(indices, float32 weights)`` of a sampler-level selection as sbsampler drew it up to 0.2: a stable argsort
    for top-k and RHO-LOSS, the binary-search ECDF and the draw-ordered Efraimidis-Spirakis kernel for Selective
    Backprop and Composer's rule, the rules' own code for the others (their random streams are the same)."""
    from sbsampler import kernels

    b = loss.shape[0]
    if isinstance(strategy, sb.TopK):
        idx = top_k_ref(loss, k)
    elif isinstance(strategy, sb.RhoLoss):
        idx = top_k_ref(loss - reference, k)
    elif type(strategy) is sb.SelectiveBackprop and not strategy.unbiased:
        p = kernels.ecdf(loss, loss) ** strategy.beta
        idx = np.sort(kernels.sample_without_replacement(p, 1.0 - rng.random(b), k))
    elif isinstance(strategy, sb.ComposerRule):
        rank = np.empty(b)
        rank[np.argsort(loss, kind="stable")] = np.arange(b)
        p = ((rank + 0.5) / b) ** (b / k - 1.0)
        idx = np.sort(kernels.sample_without_replacement(p, 1.0 - rng.random(b), k))
    else:
        stored = sb.Scores.from_stored(torch.from_numpy(loss), None if norms is None else torch.from_numpy(norms))
        sel = strategy.select(stored, k, rng=rng)
        return sel.indices, sel.weights
    return idx, np.full(k, 1.0 / k, dtype=np.float32)


def plan_ref(store: "sb.ScoreStore", strategy: "sb.Strategy", fraction: float, seed: int, epoch: int,
             max_staleness=None) -> tuple[np.ndarray, np.ndarray]:
    """A ``SelectiveSampler``'s plan ``(indices, multipliers)`` as 0.2 drew it: forced samples first, then the
    picks among the fresh ones (repeats added up with ``np.add.at`` and ``np.unique``), shuffled."""
    n = len(store)
    forced = ~store.scored()
    if max_staleness is not None:
        forced |= (epoch - store.scored_epoch) >= max_staleness
    fresh = np.flatnonzero(~forced)
    idx, mult = np.flatnonzero(forced), np.ones(int(forced.sum()))
    if fresh.size:
        loss = store.loss[fresh].astype(np.float64)
        reference = store.reference[fresh].astype(np.float64) if store.reference is not None else None
        k = n if fraction is None else sb.strategies.budget(fraction, fresh.size)
        norms = store.grad_norm[fresh].astype(np.float64) if strategy.needs_gradients else None
        picks, weights = select_ref(strategy, loss, reference, min(k, fresh.size),
                                    np.random.default_rng([seed, epoch, 1]), norms)
        w = np.zeros(fresh.size)
        np.add.at(w, picks, weights.astype(np.float64))
        picked = np.unique(picks)
        idx, mult = np.concatenate([idx, fresh[picked]]), np.concatenate([mult, w[picked] * fresh.size])
    order = np.random.default_rng([seed, epoch, 0]).permutation(idx.size)
    return idx[order], mult[order]


def shard_ref(indices: np.ndarray, num_replicas: int, rank: int) -> np.ndarray:
    """This rank's part of a plan, by iterating ``torch.utils.data.DistributedSampler`` (no shuffling)."""
    rule = torch.utils.data.DistributedSampler(range(indices.size), num_replicas=num_replicas, rank=rank,
                                               shuffle=False)
    return indices[list(iter(rule))] if indices.size else indices
