"""Bootstrap CIs (item and cluster), exact McNemar and Holm (cai.pipeline.stats)."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cai.errors import BadInputError
from cai.pipeline.stats import bootstrap_mean_ci, holm, mcnemar_exact, paired_bootstrap_ci

bits = st.integers(0, 1)


@st.composite
def paired_bits(draw, min_size=1, max_size=60):
    n = draw(st.integers(min_size, max_size))
    return draw(st.lists(bits, min_size=n, max_size=n)), draw(st.lists(bits, min_size=n, max_size=n))


def exact_p(k: int, n: int) -> float:
    """Independent two-sided exact binomial p at 1/2 with rational arithmetic: the sum of
    the probabilities of all outcomes no more likely than the observed one."""
    if n == 0:
        return 1.0
    probs = [Fraction(math.comb(n, i), 2**n) for i in range(n + 1)]
    return float(min(Fraction(1), sum(p for p in probs if p <= probs[k])))


# ---------------------------------------------------------------- bootstrap


@settings(max_examples=60, deadline=None)
@given(paired_bits(), st.integers(0, 2**32 - 1))
def test_ci_contains_the_difference(pair, seed):
    a, b = pair
    diff, lo, hi = paired_bootstrap_ci(a, b, n_resamples=400, seed=seed)
    assert diff == pytest.approx(sum(a) / len(a) - sum(b) / len(b))
    assert lo <= diff <= hi
    assert -1.0 <= lo <= hi <= 1.0


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(-5, 5, allow_nan=False), min_size=1, max_size=40))
def test_ci_of_identical_vectors_is_zero(a):
    assert paired_bootstrap_ci(a, list(a), n_resamples=200) == (0.0, 0.0, 0.0)


@settings(max_examples=40, deadline=None)
@given(paired_bits(), st.integers(0, 1000))
def test_ci_antisymmetric_and_reproducible(pair, seed):
    a, b = pair
    diff, lo, hi = paired_bootstrap_ci(a, b, n_resamples=300, seed=seed)
    assert paired_bootstrap_ci(a, b, n_resamples=300, seed=seed) == (diff, lo, hi)
    rdiff, rlo, rhi = paired_bootstrap_ci(b, a, n_resamples=300, seed=seed)
    # Same resampled indices, negated differences: the interval mirrors.
    assert rdiff == pytest.approx(-diff)
    assert rlo == pytest.approx(-hi) and rhi == pytest.approx(-lo)


def test_ci_shrinks_with_more_items_and_covers_a_clear_effect():
    a = [1] * 80 + [0] * 20
    b = [1] * 50 + [0] * 50
    diff, lo, hi = paired_bootstrap_ci(a, b)
    assert diff == pytest.approx(0.3)
    assert 0 < lo < 0.3 < hi
    diff4, lo4, hi4 = paired_bootstrap_ci(a * 4, b * 4)
    assert hi4 - lo4 < hi - lo


def test_bootstrap_rejects_bad_input():
    with pytest.raises(BadInputError):
        paired_bootstrap_ci([1, 0], [1])
    with pytest.raises(BadInputError):
        paired_bootstrap_ci([], [])
    with pytest.raises(BadInputError):
        paired_bootstrap_ci([1], [0], alpha=1.5)


# ---------------------------------------------------------------- clusters


@settings(max_examples=60, deadline=None)
@given(paired_bits(max_size=40), st.integers(0, 2**32 - 1))
def test_one_item_per_cluster_is_the_item_bootstrap(pair, seed):
    a, b = pair
    labels = [f"c{i}" for i in range(len(a))]
    assert paired_bootstrap_ci(a, b, n_resamples=300, seed=seed, clusters=labels) == \
        paired_bootstrap_ci(a, b, n_resamples=300, seed=seed)
    assert bootstrap_mean_ci(a, n_resamples=300, seed=seed, clusters=labels) == \
        bootstrap_mean_ci(a, n_resamples=300, seed=seed)


@settings(max_examples=60, deadline=None)
@given(paired_bits(max_size=30), st.integers(2, 6), st.integers(0, 2**32 - 1))
def test_duplicated_clusters_carry_no_more_evidence_than_one_copy(pair, k, seed):
    """k copies of every item, labelled as one cluster, resample exactly like the original
    items: duplicates are not new evidence. Treated as i.i.d. they would be."""
    a, b = pair
    dup_a = [x for x in a for _ in range(k)]
    dup_b = [x for x in b for _ in range(k)]
    labels = [i for i in range(len(a)) for _ in range(k)]
    clustered = paired_bootstrap_ci(dup_a, dup_b, n_resamples=300, seed=seed, clusters=labels)
    original = paired_bootstrap_ci(a, b, n_resamples=300, seed=seed)
    assert clustered == pytest.approx(original, abs=1e-12)


def test_cluster_bootstrap_widens_the_ci_on_a_templated_fixture():
    """Ten templates of eight near-identical items each: whole templates pass or fail
    together, so the i.i.d. bootstrap is far too sure of itself."""
    template_outcome = [1, 1, 1, 0, 1, 0, 1, 1, 0, 1]
    a = [v for v in template_outcome for _ in range(8)]
    b = [0] * len(a)
    labels = [t for t in range(10) for _ in range(8)]
    diff, lo, hi = paired_bootstrap_ci(a, b, n_resamples=4000, seed=1)
    cdiff, clo, chi = paired_bootstrap_ci(a, b, n_resamples=4000, seed=1, clusters=labels)
    assert diff == cdiff == pytest.approx(0.7)
    assert chi - clo > 2 * (hi - lo)
    assert clo <= cdiff <= chi
    mean, mlo, mhi = bootstrap_mean_ci(a, n_resamples=4000, seed=1, clusters=labels)
    assert mean == pytest.approx(0.7) and mhi - mlo == pytest.approx(chi - clo)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(bits, st.integers(0, 5)), min_size=1, max_size=50), st.integers(0, 1000))
def test_cluster_ci_contains_the_mean_and_is_bounded(rows, seed):
    values, labels = [v for v, _ in rows], [c for _, c in rows]
    mean, lo, hi = bootstrap_mean_ci(values, n_resamples=300, seed=seed, clusters=labels)
    assert mean == pytest.approx(sum(values) / len(values))
    assert 0.0 <= lo <= hi <= 1.0
    if len(set(labels)) == 1:  # one cluster: every resample is the whole set
        assert lo == hi == pytest.approx(mean)


def test_cluster_labels_must_match_the_scores():
    with pytest.raises(BadInputError):
        paired_bootstrap_ci([1, 0], [0, 0], clusters=["x"])
    with pytest.raises(BadInputError):
        bootstrap_mean_ci([])


# ---------------------------------------------------------------- Holm


def test_holm_hand_computed():
    # m = 4, sorted p = .01 .02 .03 .04 -> .04 .06 .06 .06 (monotone), back in input order.
    assert holm([0.03, 0.01, 0.04, 0.02]) == pytest.approx([0.06, 0.04, 0.06, 0.06])
    # capped at 1, and a large first p dominates the rest
    assert holm([0.5, 0.4, 0.001]) == pytest.approx([0.8, 0.8, 0.003])
    assert holm([0.9, 0.8]) == pytest.approx([1.0, 1.0])
    assert holm([0.2]) == [0.2] and holm([]) == []


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(0, 1, allow_nan=False), min_size=1, max_size=20))
def test_holm_properties(p):
    adj = holm(p)
    assert all(a >= x - 1e-15 for a, x in zip(adj, p))  # never smaller than the raw p
    assert all(a <= min(1.0, len(p) * x) + 1e-12 for a, x in zip(adj, p))  # never above Bonferroni
    order = sorted(range(len(p)), key=lambda i: p[i])
    assert all(adj[order[i]] <= adj[order[i + 1]] for i in range(len(p) - 1))  # monotone in p


def test_holm_rejects_non_probabilities():
    with pytest.raises(BadInputError):
        holm([0.1, 1.5])


# ---------------------------------------------------------------- McNemar


def test_mcnemar_textbook_value():
    # Fagerland, Lydersen & Laake (2013), BMC Med Res Methodol 13:91, worked example
    # (airway hyper-responsiveness before/after stem cell transplantation): discordant
    # pairs 1 and 7, exact conditional McNemar p = 0.070. Here: 2 * (C(8,0)+C(8,1)) / 2^8.
    a = [1] * 1 + [0] * 7 + [1] * 2 + [0] * 11  # 8 discordant + 13 concordant (any split)
    b = [0] * 1 + [1] * 7 + [1] * 2 + [0] * 11
    b01, b10, p = mcnemar_exact(a, b)
    assert (b01, b10) == (7, 1)
    assert p == pytest.approx(18 / 256)
    assert round(p, 3) == 0.070
    assert p == pytest.approx(exact_p(1, 8))


def test_mcnemar_no_discordant_pairs_gives_one():
    assert mcnemar_exact([1, 0, 1], [1, 0, 1]) == (0, 0, 1.0)


@settings(max_examples=100, deadline=None)
@given(paired_bits())
def test_mcnemar_properties(pair):
    a, b = pair
    b01, b10, p = mcnemar_exact(a, b)
    assert b01 == sum(1 for x, y in zip(a, b) if x == 0 and y == 1)
    assert b10 == sum(1 for x, y in zip(a, b) if x == 1 and y == 0)
    assert 0.0 < p <= 1.0
    # symmetric in its arguments (counts swap, p unchanged)
    rb01, rb10, rp = mcnemar_exact(b, a)
    assert (rb01, rb10) == (b10, b01) and rp == pytest.approx(p)
    # concordant pairs do not matter; p equals an independent exact computation
    assert p == pytest.approx(exact_p(min(b01, b10), b01 + b10), rel=1e-9)
    if b01 == b10:
        assert p == 1.0


def test_mcnemar_rejects_non_binary_scores():
    with pytest.raises(BadInputError):
        mcnemar_exact([0.5, 1], [1, 0])
