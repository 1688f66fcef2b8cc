"""Numba kernels behind the selection strategies.

Every function here is pure: contiguous NumPy arrays in, NumPy arrays out, no
randomness of its own (random numbers are passed in, drawn by the caller's
``numpy.random.Generator``), no state. Each has a slow, obviously-correct NumPy
twin in ``tests/reference.py`` and a hypothesis test that checks the two agree.

Kernels
-------
``ecdf``
    Empirical CDF ``P(L <= l)`` of each loss against a loss history.
``self_ecdf``
    The same CDF of each value against the array itself, at the speed of a radix
    sort (a sampler's plan over every stored loss).
``sample_without_replacement`` / ``efraimidis_keys``
    ``k`` distinct indices drawn sequentially with probability proportional to a
    weight (Efraimidis & Spirakis keys); the keys alone.
``top_k_indices``
    The ``k`` largest values (ties to the lower position), as a sorted index set,
    in linear time (NumPy's introselect; no full sort).
``inclusion_probabilities`` / ``systematic_sample``
    Probability-proportional-to-size sampling of exactly ``k`` distinct indices
    with known inclusion probabilities, for unbiased Horvitz-Thompson weights.
``outer_norms``
    Norms of per-sample outer products ``e_i (x) [h_i, 1]`` (last-layer gradient
    norms) from ``E`` and ``H``, in one pass over each.
``omp_gram``
    Orthogonal matching pursuit in Gram space: greedily picks the atoms whose
    span best approximates the target, touching only the ``B x B`` Gram matrix.
``gather_gram``
    The Gram block of a chosen subset, in float64.
``nnls_gram``
    Non-negative least squares on a small Gram system (coordinate descent).
"""

from __future__ import annotations

import os
import tempfile
import warnings
from typing import Any, Callable, Optional

import numba
import numpy as np

__all__ = [
    "ecdf",
    "self_ecdf",
    "sample_without_replacement",
    "efraimidis_keys",
    "top_k_indices",
    "inclusion_probabilities",
    "systematic_sample",
    "outer_norms",
    "omp_gram",
    "row_means",
    "gather_gram",
    "nnls_gram",
]

_JIT = {"nogil": True}
# Reassociation (vectorised sums) and fused multiply-add, but not "no NaNs": a NaN must stay a NaN.
_FAST = {**_JIT, "fastmath": {"reassoc", "contract"}}


_UNCACHED: list = []  # kernels compiled without a cache


def _fallback_cache_dir() -> Optional[str]:
    """A writable per-user cache folder under the system's temp dir, or ``None``."""
    try:
        user = str(os.getuid()) if hasattr(os, "getuid") else os.environ.get("USERNAME", "user")
        path = os.path.join(tempfile.gettempdir(), f"sbsampler-numba-cache-{user}")
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path):
            pass
        return path
    except OSError:
        return None


def _njit(**options: Any) -> Callable:
    """``numba.njit(cache=True, **options)``, that also works installed read-only.

    Numba caches compiled kernels next to the source (``__pycache__``) or in the
    user's cache folder; where neither is writable (a read-only site-packages and no
    usable ``$HOME``: containers, Nix) it refuses at import, "cannot cache function
    ...: no locator available" (numba issues #4908, #5566). Then the kernels cache
    in a per-user folder under the temp dir (``NUMBA_CACHE_DIR`` for them alone),
    and where that fails too they compile uncached (a few seconds more per process).
    """
    def decorate(fn: Callable) -> Callable:
        try:
            return numba.njit(cache=True, **options)(fn)
        except RuntimeError as err:
            if "no locator available" not in str(err):
                raise
        folder = _fallback_cache_dir()
        if folder is not None:
            saved = numba.config.CACHE_DIR
            numba.config.CACHE_DIR = folder  # read when the locator is made, here
            try:
                return numba.njit(cache=True, **options)(fn)
            except RuntimeError:
                pass
            finally:
                numba.config.CACHE_DIR = saved
        if not _UNCACHED:  # once, not once per kernel
            warnings.warn("sbsampler: no writable Numba cache (read-only install, no usable $HOME or temp dir); "
                          "its kernels compile uncached in each process. Set NUMBA_CACHE_DIR to a writable folder "
                          "to cache them", RuntimeWarning, stacklevel=2)
        _UNCACHED.append(fn.__name__)
        return numba.njit(cache=False, **options)(fn)
    return decorate


@_njit(**_JIT)
def ecdf(history: np.ndarray, losses: np.ndarray) -> np.ndarray:
    """Fraction of ``history`` values that are ``<=`` each entry of ``losses``.

    ``history`` (n,) and ``losses`` (B,) are float64. Returns float64 (B,) in
    [0, 1]. An empty history gives ones (no evidence: keep everything).
    Cost: O(n log n + B log n).
    """
    n = history.shape[0]
    out = np.ones(losses.shape[0])
    if n == 0:
        return out
    s = np.sort(history)
    for i in range(losses.shape[0]):
        v = losses[i]
        lo, hi = 0, n  # first position whose value is > v
        while lo < hi:
            mid = (lo + hi) >> 1
            if s[mid] <= v:
                lo = mid + 1
            else:
                hi = mid
        out[i] = lo / n
    return out


@_njit(**_JIT)
def efraimidis_keys(weights: np.ndarray, uniforms: np.ndarray) -> np.ndarray:
    """Efraimidis-Spirakis keys ``log(u_i) / w_i`` (``-inf`` for a zero weight): the ``k`` largest are a sample
    with the law of ``k`` successive weighted draws without replacement. ``uniforms`` (B,) are U(0, 1] numbers."""
    b = weights.shape[0]
    keys = np.empty(b)
    for i in range(b):
        w = weights[i]
        if w > 0.0:
            keys[i] = np.log(uniforms[i]) / w
        else:
            keys[i] = -np.inf
    return keys


@_njit(**_JIT)
def sample_without_replacement(weights: np.ndarray, uniforms: np.ndarray, k: int) -> np.ndarray:
    """Draw ``k`` distinct indices, each draw proportional to ``weights`` among those left.

    Uses Efraimidis-Spirakis keys ``log(u_i) / w_i``: the ``k`` largest keys are a
    sample with the same law as ``k`` successive weighted draws without
    replacement. ``uniforms`` (B,) are U(0, 1] numbers from the caller's RNG.
    Zero-weight items come last, in index order, and only when fewer than ``k``
    items have positive weight. Returns int64 (k,), ordered by draw (for the set
    alone, sorted, ``top_k_indices(efraimidis_keys(w, u), k)`` takes linear time).
    """
    keys = efraimidis_keys(weights, uniforms)
    order = np.argsort(-keys, kind="mergesort")
    return order[:k].astype(np.int64)


def top_k_indices(values: np.ndarray, k: int) -> np.ndarray:
    """Sorted int64 positions of the ``k`` largest ``values`` (ties to the lower position; ``-inf`` allowed):
    ``np.sort(np.argsort(-values, kind="stable")[:k])`` in linear time (a partition, no full sort)."""
    values = np.asarray(values)
    n = values.shape[0]
    if k >= n:
        return np.arange(n, dtype=np.int64)
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    t = np.partition(values, n - k)[n - k]  # the k-th largest value
    chosen = values > t
    need = k - int(np.count_nonzero(chosen))
    if need:
        chosen[np.flatnonzero(values == t)[:need]] = True  # ties at the threshold: the lower positions
    return np.flatnonzero(chosen).astype(np.int64)


_SIGN = np.uint64(1) << np.uint64(63)
_DIGIT = np.uint64(0xFFFF)


@_njit(**_JIT)
def self_ecdf(values: np.ndarray) -> np.ndarray:
    """``ecdf(values, values)``: the share of ``values`` that are ``<=`` each of them, float64 (n,).

    An LSD radix sort of the values' bits (16 bits a pass; a pass whose digit is the
    same for every value is skipped, so float32 scores held as float64 take two),
    stable, then one walk over the runs of equal values: linear time, where the
    binary search of ``ecdf`` costs ``n log n``. ``values`` finite (``-0.0`` equals ``0.0``).
    """
    n = values.shape[0]
    out = np.ones(n)
    if n == 0:
        return out
    keys = np.empty(n, dtype=np.uint64)
    bits = (values + 0.0).view(np.uint64)  # + 0.0: -0.0 becomes 0.0
    for i in range(n):
        b = bits[i]
        keys[i] = ~b if b & _SIGN else b | _SIGN  # order-preserving: negatives reversed below the positives
    if n >= 2**32:
        raise ValueError("self_ecdf ranks at most 2**32 values")
    order = np.arange(n).astype(np.uint32)  # 4 bytes a sample
    tmp_keys = np.empty_like(keys)
    tmp_order = np.empty_like(order)
    counts = np.zeros((4, 65537), dtype=np.int64)  # the four digits' histograms, in one read of the keys
    for i in range(n):
        k = keys[i]
        for p in range(4):
            counts[p, np.int64((k >> np.uint64(16 * p)) & _DIGIT) + 1] += 1
    for p in range(4):
        if counts[p].max() == n:  # one digit for every value: this pass moves nothing
            continue
        shift = np.uint64(16 * p)
        for d in range(1, 65537):
            counts[p, d] += counts[p, d - 1]
        for i in range(n):
            d = np.int64((keys[i] >> shift) & _DIGIT)
            at = counts[p, d]
            counts[p, d] = at + 1
            tmp_keys[at] = keys[i]
            tmp_order[at] = order[i]
        keys, tmp_keys = tmp_keys, keys
        order, tmp_order = tmp_order, order
    i = 0
    while i < n:
        j = i
        while j + 1 < n and keys[j + 1] == keys[i]:
            j += 1
        share = (j + 1) / n
        for t in range(i, j + 1):
            out[order[t]] = share
        i = j + 1
    return out


@_njit(**_JIT)
def inclusion_probabilities(p: np.ndarray, k: int) -> np.ndarray:
    """Inclusion probabilities ``pi_i = min(1, c * p_i)`` with ``sum(pi) == k``.

    ``p`` (B,) is non-negative with a positive sum and at least ``k`` positive
    entries. Items whose share would exceed 1 are capped at 1 and the rest
    rescaled, repeatedly, until every ``pi_i <= 1``.
    """
    b = p.shape[0]
    pi = np.zeros(b)
    capped = np.zeros(b, dtype=np.bool_)
    n_capped = 0
    while True:
        rest = 0.0
        for i in range(b):
            if not capped[i]:
                rest += p[i]
        scale = (k - n_capped) / rest if rest > 0.0 else 0.0
        changed = False
        for i in range(b):
            if not capped[i]:
                v = p[i] * scale
                if v >= 1.0:
                    capped[i] = True
                    n_capped += 1
                    changed = True
        if not changed:
            for i in range(b):
                pi[i] = 1.0 if capped[i] else p[i] * scale
            return pi


@_njit(**_JIT)
def systematic_sample(pi: np.ndarray, order: np.ndarray, u: float) -> np.ndarray:
    """Systematic probability-proportional-to-size sample along ``order``.

    Walks the items in ``order`` (a permutation), accumulating ``pi``; item ``i``
    is taken when the running sum crosses one of ``u, u + 1, ..., u + k - 1``
    (``u`` in [0, 1)). With ``sum(pi) == k`` and every ``pi_i <= 1`` this returns
    exactly ``k`` distinct indices, item ``i`` included with probability ``pi_i``
    over ``u``. Returns int64 (k,).
    """
    k = int(np.round(pi.sum()))
    out = np.empty(k, dtype=np.int64)
    acc = 0.0
    nxt = u
    m = 0
    for j in range(order.shape[0]):
        i = order[j]
        acc += pi[i]
        while m < k and acc > nxt:
            out[m] = i
            m += 1
            nxt += 1.0
    while m < k:  # float round-off on the last crossing
        out[m] = order[order.shape[0] - 1 - (k - 1 - m)]
        m += 1
    return out


@_njit(**_FAST)
def outer_norms(e: np.ndarray, h: np.ndarray, bias: bool) -> np.ndarray:
    """float64 (B,) ``|e_i| * |[h_i, 1]|`` (``|e_i| * |h_i|`` without ``bias``).

    The Frobenius norm of the outer product ``e_i (x) [h_i, 1]``, i.e. of sample
    ``i``'s last-layer gradient, from ``E`` (B, C) and ``H`` (B, d), C-contiguous.
    Squares are summed in the inputs' dtype (16 lanes at a time for float32, so
    the rounding error stays near float32 epsilon), the product in float64.
    """
    b = e.shape[0]
    out = np.empty(b)
    zero_e = np.zeros(1, dtype=e.dtype)[0]
    zero_h = np.zeros(1, dtype=h.dtype)[0]
    for i in range(b):
        se = zero_e
        ei = e[i]
        for c in range(e.shape[1]):
            se += ei[c] * ei[c]
        sh = zero_h
        hi = h[i]
        for c in range(h.shape[1]):
            sh += hi[c] * hi[c]
        out[i] = np.sqrt(float(se) * (float(sh) + (1.0 if bias else 0.0)))
    return out


@_njit(**_FAST)
def _orthogonalise(row: np.ndarray, q: np.ndarray, coef: np.ndarray, m: int, n: int) -> None:
    """``row[:n] -= sum_{t < m} coef[t] * q[t, :n]``, four rows of ``q`` per pass."""
    t = 0
    while t + 4 <= m:
        a0, a1, a2, a3 = coef[t], coef[t + 1], coef[t + 2], coef[t + 3]
        q0, q1, q2, q3 = q[t], q[t + 1], q[t + 2], q[t + 3]
        for i in range(n):
            row[i] -= a0 * q0[i] + a1 * q1[i] + a2 * q2[i] + a3 * q3[i]
        t += 4
    while t < m:
        a0 = coef[t]
        q0 = q[t]
        for i in range(n):
            row[i] -= a0 * q0[i]
        t += 1


@_njit(**_JIT)
def _most_correlated(corr: np.ndarray, atom: np.ndarray, live: int, nonneg: bool, floor: float) -> int:
    """Position (< ``live``) of the largest (signed or absolute) correlation above ``floor``; -1 if none.

    Ties go to the lowest atom id, so the pick does not depend on the column order.
    """
    top = floor
    if nonneg:
        for p in range(live):  # a plain max: vectorised
            top = max(top, corr[p])
    else:
        for p in range(live):
            top = max(top, abs(corr[p]))
    if not top > floor:
        return -1
    best = -1
    for p in range(live):
        v = corr[p] if nonneg else abs(corr[p])
        if v == top and (best < 0 or atom[p] < atom[best]):
            best = p
    return best


@_njit(**_JIT)
def _retire(p: int, live: int, q: np.ndarray, m: int, corr: np.ndarray, atom: np.ndarray) -> None:
    """Swap column ``p`` with the last live column ``live - 1`` (rows ``q[:m]``, ``corr``, ``atom``)."""
    last = live - 1
    if p != last:
        for t in range(m):
            q[t, p], q[t, last] = q[t, last], q[t, p]
        corr[p], corr[last] = corr[last], corr[p]
        atom[p], atom[last] = atom[last], atom[p]


@_njit(**_JIT)
def omp_gram(gram: np.ndarray, target_corr: np.ndarray, k: int, nonneg: bool, ridge: float,
             dep_tol: float = 1e-10):
    """Orthogonal matching pursuit using only inner products.

    Atoms are vectors ``g_i`` with ``gram[i, j] = <g_i, g_j>``; the target is a
    vector ``t`` with ``target_corr[i] = <g_i, t>`` (float64). Each step adds the
    atom most correlated with the current residual ``t - P_S t`` (the largest
    positive correlation when ``nonneg``, else the largest magnitude; ties to the
    lowest index), then updates the correlations of the atoms not yet chosen by
    Gram-Schmidt against the chosen ones, so step ``j`` costs O((B - j) * j).
    ``ridge`` is added to the diagonal of the chosen atoms' Gram matrix. The
    working rows are kept in ``gram``'s dtype (float32 halves the memory traffic
    of the dominant update; float64 is exact); scalars and the Cholesky factor
    are float64.

    The columns of the working rows are the candidates still open: a chosen (or
    numerically dependent) atom's column is swapped out to the end and never
    touched again, which saves a sixth of the work at ``k = B / 4``.

    Stops early when no candidate improves the fit: no correlation above
    ``1e-10`` of the largest initial one, or every candidate left is
    numerically dependent on those chosen: the part of it orthogonal to their
    span has a squared norm of at most ``dep_tol`` times its own (give about
    ``1e-4`` for a float32 Gram matrix, whose round-off is far above ``1e-10``).

    Returns ``(chosen, weights, explained)``: int64 (m,) atoms in pick order with
    ``m <= k``; float64 (m,) least-squares weights of ``t`` on them (no sign
    constraint: see ``nnls_gram``); and ``sum_j y_j**2``, the squared norm of
    the projection of ``t`` onto their span.
    """
    b = gram.shape[0]
    # Rows of q and chol are written before they are read: no need to zero them.
    # q[t, p] = <g_atom[p], u_t>, u_t orthonormal. Rows padded by 64 bytes: with a row
    # length of a multiple of 4 KiB, the rows streamed together would alias in L1.
    q = np.empty((k, b + 64 // gram.itemsize), dtype=gram.dtype)
    chol = np.empty((k, k))  # lower Cholesky factor of gram[S, S] + ridge * I
    coef = np.zeros(k, dtype=gram.dtype)
    y = np.zeros(k)  # y[t] = <target, u_t>
    corr = target_corr.astype(np.float64)  # corr[p] = <g_atom[p], residual>
    atom = np.arange(b)  # the atom in each column; columns [0, live) are still open
    live = b
    chosen = np.empty(k, dtype=np.int64)
    corr_tol = 0.0
    for i in range(b):
        corr_tol = max(corr_tol, abs(target_corr[i]))
    corr_tol *= 1e-10
    m = 0
    explained = 0.0
    pos = _most_correlated(corr, atom, live, nonneg, corr_tol)
    while m < k and pos >= 0:
        best = atom[pos]
        # Cholesky row of the new atom: its components along u_0 .. u_{m-1}.
        diag = float(gram[best, best]) + ridge
        sq = diag
        for t in range(m):
            lt = float(q[t, pos])
            chol[m, t] = lt
            coef[t] = lt
            sq -= lt * lt
        _retire(pos, live, q, m, corr, atom)
        live -= 1
        if sq <= dep_tol * diag:  # dependent on the atoms already chosen: never pick it again
            pos = _most_correlated(corr, atom, live, nonneg, corr_tol)
            continue
        d = np.sqrt(sq)
        chol[m, m] = d
        inv = 1.0 / d
        yt = target_corr[best]
        for t in range(m):
            yt -= chol[m, t] * y[t]
        yt *= inv
        y[m] = yt
        explained += yt * yt
        chosen[m] = best
        m += 1
        row = q[m - 1]
        src = gram[best]
        for p in range(live):
            row[p] = src[atom[p]]
        _orthogonalise(row, q, coef, m - 1, live)
        # Normalise the new direction and update the correlations (vectorised), then find the next atom.
        for p in range(live):
            r = row[p] * inv
            row[p] = r
            corr[p] -= yt * r
        pos = _most_correlated(corr, atom, live, nonneg, corr_tol)
    # Weights: solve chol^T w = y (back substitution).
    w = np.zeros(m)
    for r in range(m - 1, -1, -1):
        s = y[r]
        for c in range(r + 1, m):
            s -= chol[c, r] * w[c]
        w[r] = s / chol[r, r]
    return chosen[:m].copy(), w, explained


@_njit(**_FAST)
def row_means(gram: np.ndarray) -> np.ndarray:
    """float64 mean of each row: ``<g_i, mean_j g_j>`` for a Gram matrix."""
    b = gram.shape[0]
    out = np.empty(b)
    for r in range(b):
        src = gram[r]
        acc = 0.0
        for c in range(gram.shape[1]):
            acc += src[c]
        out[r] = acc / gram.shape[1]
    return out


@_njit(**_JIT)
def gather_gram(gram: np.ndarray, index: np.ndarray, ridge: float) -> np.ndarray:
    """``gram[index][:, index] + ridge * I`` as a new float64 (m, m) array."""
    m = index.shape[0]
    out = np.empty((m, m))
    for r in range(m):
        src = gram[index[r]]
        for c in range(m):
            out[r, c] = src[index[c]]
        out[r, r] += ridge
    return out


@_njit(**_JIT)
def nnls_gram(gram: np.ndarray, target_corr: np.ndarray, init: np.ndarray,
              max_sweeps: int, tol: float) -> np.ndarray:
    """Minimise ``0.5 w' G w - c' w`` subject to ``w >= 0`` by cyclic coordinate descent.

    That is non-negative least squares ``min ||sum_i w_i g_i - t||`` written in
    Gram form (``G = gram``, ``c = target_corr``). Starts from ``max(init, 0)``
    and sweeps until the largest coordinate change is below ``tol`` times the
    largest weight, or ``max_sweeps`` sweeps. Zero-diagonal coordinates stay 0.
    Returns float64 (m,).
    """
    m = gram.shape[0]
    w = np.empty(m)
    for i in range(m):
        w[i] = max(init[i], 0.0)
    grad = gram @ w - target_corr  # G w - c
    for _ in range(max_sweeps):
        biggest_step = 0.0
        biggest_w = 0.0
        for i in range(m):
            gii = gram[i, i]
            if gii <= 0.0:
                continue
            new = max(w[i] - grad[i] / gii, 0.0)
            delta = new - w[i]
            if delta != 0.0:
                gi = gram[i]  # symmetric: row i is column i, contiguous
                for j in range(m):
                    grad[j] += delta * gi[j]
                w[i] = new
                biggest_step = max(biggest_step, abs(delta))
            biggest_w = max(biggest_w, new)
        if biggest_step <= tol * max(biggest_w, 1e-300):
            break
    return w
