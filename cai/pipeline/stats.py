"""Paired statistics for comparing two systems scored on the same items.

Base vs SFT vs DPO are evaluated on the *same* prompts, so the right tests are paired:
a bootstrap for a confidence interval on the difference in mean score, and McNemar's
exact test on the discordant items for 0/1 scores. Templated eval sets make items
within a template correlated, so the bootstrap resamples *clusters* (all items of a
template together) when cluster labels are given; with one item per cluster it is the
ordinary item bootstrap, draw for draw. Several comparisons in one report are corrected
together with Holm's step-down method. Everything is deterministic (the bootstrap takes
a seed), so a report can be rebuilt exactly.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence

import numpy as np
from scipy.stats import binomtest

from cai.errors import BadInputError

# Indices drawn per chunk in the bootstrap (keeps memory bounded for large n).
_CHUNK_CELLS = 2_000_000


def _vector(a: Sequence[float], what: str) -> np.ndarray:
    x = np.asarray(a, dtype=float)
    if x.ndim != 1:
        raise BadInputError(f"{what} must be a one-dimensional sequence")
    if x.size == 0:
        raise BadInputError(f"{what} are empty")
    if not np.isfinite(x).all():
        raise BadInputError(f"{what} contain NaN or infinity")
    return x


def _paired(a: Sequence[float], b: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(a, dtype=float)
    y = np.asarray(b, dtype=float)
    if x.ndim != 1 or y.ndim != 1:
        raise BadInputError("paired scores must be one-dimensional sequences")
    if x.shape != y.shape:
        raise BadInputError(f"paired scores differ in length: {x.size} vs {y.size}")
    return _vector(x, "paired scores"), _vector(y, "paired scores")


def _cluster_sums(values: np.ndarray, clusters: Sequence[Hashable] | None) -> tuple[np.ndarray, np.ndarray]:
    """Per-cluster (sum, size), clusters in order of first appearance; no labels means one
    cluster per item (so the cluster bootstrap below is exactly the item bootstrap)."""
    if clusters is None:
        return values, np.ones_like(values)
    labels = list(clusters)
    if len(labels) != values.size:
        raise BadInputError(f"{len(labels)} cluster label(s) for {values.size} score(s)")
    index: dict[Hashable, int] = {}
    ids = np.array([index.setdefault(c, len(index)) for c in labels])
    sums = np.bincount(ids, weights=values, minlength=len(index))
    sizes = np.bincount(ids, minlength=len(index)).astype(float)
    return sums, sizes


def _bootstrap(values: np.ndarray, clusters: Sequence[Hashable] | None, n_resamples: int, seed: int,
               alpha: float) -> tuple[float, float, float]:
    """(mean, lo, hi): percentile bootstrap of the mean, resampling whole clusters with
    replacement (the resampled mean is the ratio sum / size over the drawn clusters).
    Means are sum / n in the point estimate and the resamples, so for 0/1 scores the
    interval of an all-zero vector is exactly [0, 0]."""
    if not 0.0 < alpha < 1.0:
        raise BadInputError(f"alpha must be in (0, 1), got {alpha}")
    if n_resamples < 1:
        raise BadInputError(f"n_resamples must be positive, got {n_resamples}")
    sums, sizes = _cluster_sums(values, clusters)
    k = sums.size
    mean = float(values.sum() / values.size)
    rng = np.random.default_rng(seed)
    chunk = max(1, _CHUNK_CELLS // k)
    means = np.empty(n_resamples, dtype=float)
    for start in range(0, n_resamples, chunk):
        stop = min(start + chunk, n_resamples)
        idx = rng.integers(0, k, size=(stop - start, k))
        means[start:stop] = sums[idx].sum(axis=1) / sizes[idx].sum(axis=1)
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return mean, float(lo), float(hi)


def n_clusters(clusters: Sequence[Hashable]) -> int:
    return len(set(clusters))


def bootstrap_mean_ci(
    values: Sequence[float],
    n_resamples: int = 10000,
    seed: int = 0,
    alpha: float = 0.05,
    clusters: Sequence[Hashable] | None = None,
) -> tuple[float, float, float]:
    """(mean, lo, hi) of one system's scores; `clusters` labels each item's cluster
    (template), which is resampled as a unit."""
    return _bootstrap(_vector(values, "scores"), clusters, n_resamples, seed, alpha)


def paired_bootstrap_ci(
    a: Sequence[float],
    b: Sequence[float],
    n_resamples: int = 10000,
    seed: int = 0,
    alpha: float = 0.05,
    clusters: Sequence[Hashable] | None = None,
) -> tuple[float, float, float]:
    """(diff, lo, hi): diff = mean(a) - mean(b) over paired items, and the percentile
    bootstrap (1 - alpha) interval from resampling items, or whole clusters of items when
    `clusters` is given (pairs kept together, which is what makes it paired: per-item
    difficulty cancels; clusters kept together, which keeps correlated items from passing
    for independent evidence)."""
    x, y = _paired(a, b)
    return _bootstrap(x - y, clusters, n_resamples, seed, alpha)


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm step-down adjusted p-values, in the input order: sorted ascending, the i-th
    (0-based) of m is multiplied by m - i, made monotone, capped at 1. Controls the
    family-wise error rate over all the tests of one report without assuming independence."""
    p = [float(v) for v in pvalues]
    if any(not (0.0 <= v <= 1.0) for v in p):
        raise BadInputError(f"p-values must lie in [0, 1], got {p}")
    m = len(p)
    adjusted = [0.0] * m
    running = 0.0
    for rank, i in enumerate(sorted(range(m), key=lambda j: p[j])):
        running = max(running, min(1.0, (m - rank) * p[i]))
        adjusted[i] = running
    return adjusted


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
    return b01, b10, min(1.0, float(binomtest(b01, n, 0.5, alternative="two-sided").pvalue))
