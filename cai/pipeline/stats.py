"""Paired statistics for comparing two systems scored on the same items.

Base vs SFT vs DPO are evaluated on the *same* prompts, so the right tests are paired:
a bootstrap over items for a confidence interval on the difference in mean score, and
McNemar's exact test on the discordant items for 0/1 scores. Both are small and
deterministic (the bootstrap takes a seed), so a report can be rebuilt exactly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from cai.errors import BadInputError

# Indices drawn per chunk in the bootstrap (keeps memory bounded for large n).
_CHUNK_CELLS = 2_000_000


def _paired(a: Sequence[float], b: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(a, dtype=float)
    y = np.asarray(b, dtype=float)
    if x.ndim != 1 or y.ndim != 1:
        raise BadInputError("paired scores must be one-dimensional sequences")
    if x.shape != y.shape:
        raise BadInputError(f"paired scores differ in length: {x.size} vs {y.size}")
    if x.size == 0:
        raise BadInputError("paired scores are empty")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise BadInputError("paired scores contain NaN or infinity")
    return x, y


def paired_bootstrap_ci(
    a: Sequence[float],
    b: Sequence[float],
    n_resamples: int = 10000,
    seed: int = 0,
    alpha: float = 0.05,
) -> tuple[float, float, float]:
    """(diff, lo, hi): diff = mean(a) - mean(b) over paired items, and the percentile
    bootstrap (1 - alpha) interval from resampling *items* (pairs kept together, which is
    what makes it paired: per-item difficulty cancels).

    Means are computed as sum / n in both the point estimate and the resamples, so for
    0/1 (integer) scores the arithmetic is exact and the interval of identical vectors is
    exactly [0, 0]."""
    x, y = _paired(a, b)
    if not 0.0 < alpha < 1.0:
        raise BadInputError(f"alpha must be in (0, 1), got {alpha}")
    if n_resamples < 1:
        raise BadInputError(f"n_resamples must be positive, got {n_resamples}")
    d = x - y
    n = d.size
    diff = float(d.sum() / n)
    rng = np.random.default_rng(seed)
    chunk = max(1, _CHUNK_CELLS // n)
    means = np.empty(n_resamples, dtype=float)
    for start in range(0, n_resamples, chunk):
        stop = min(start + chunk, n_resamples)
        idx = rng.integers(0, n, size=(stop - start, n))
        means[start:stop] = d[idx].sum(axis=1) / n
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return diff, float(lo), float(hi)


def _binom_two_sided_half(k: int, n: int) -> float:
    """Exact two-sided binomial p-value for k successes in n trials at p = 1/2
    (the distribution is symmetric, so it is twice the smaller tail, capped at 1)."""
    if n == 0:
        return 1.0
    k = min(k, n - k)
    tail = sum(math.comb(n, i) for i in range(k + 1))
    return min(1.0, 2 * tail / 2**n)


def mcnemar_exact(a: Sequence[int], b: Sequence[int]) -> tuple[int, int, float]:
    """(b01, b10, p): b01 = items where a fails and b passes, b10 = a passes and b fails;
    p is the exact two-sided binomial test of b01 vs b10 at 1/2 (McNemar's exact test).
    Concordant items carry no information about the difference and are ignored, which is
    why a report must also show how many items changed at all. Scores must be 0/1."""
    x, y = _paired(a, b)
    if not (np.isin(x, (0.0, 1.0)).all() and np.isin(y, (0.0, 1.0)).all()):
        raise BadInputError("McNemar needs 0/1 (pass/fail) scores")
    b01 = int(np.sum((x == 0) & (y == 1)))
    b10 = int(np.sum((x == 1) & (y == 0)))
    n = b01 + b10
    if n == 0:
        return b01, b10, 1.0
    try:
        from scipy.stats import binomtest
    except ImportError:  # pragma: no cover - scipy is present with the pinned stack
        p = _binom_two_sided_half(b01, n)
    else:
        p = float(binomtest(min(b01, b10), n, 0.5, alternative="two-sided").pvalue)
    return b01, b10, min(1.0, p)
