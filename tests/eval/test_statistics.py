"""The paired bootstrap and the across-seed interval against direct computations: exhaustive
enumeration of every resample of a tiny set, an explicit loop over the same seeded draws, and
hand-computed t intervals."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from dtm_fast.eval.statistics import across_seeds, paired_bootstrap, resampled_means


def test_resampled_means_are_the_means_of_the_seeded_draws():
    values = np.array([1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0])
    means = resampled_means(values, 2500, seed=7)
    # the same generator, drawn by hand, row by row in blocks of 1000
    rng = np.random.default_rng(7)
    expected = []
    for rows in (1000, 1000, 500):
        for row in rng.integers(0, len(values), size=(rows, len(values))):
            expected.append(sum(values[i] for i in row) / len(values))
    assert np.array_equal(means, np.array(expected))


def test_bootstrap_interval_matches_exhaustive_enumeration():
    """n = 5: all 5^5 = 3125 resamples are equally likely; the exact distribution of the resampled
    mean difference gives the exact percentiles the bootstrap estimates."""
    a = [1.0, 1.0, 0.0, 1.0, 0.0]
    b = [0.0, 1.0, 0.0, 0.0, 1.0]
    differences = [x - y for x, y in zip(a, b)]
    exact = sorted(sum(differences[i] for i in draw) / 5 for draw in itertools.product(range(5), repeat=5))
    low_exact, high_exact = np.quantile(exact, [0.025, 0.975])
    interval = paired_bootstrap(a, b, iterations=200_000, seed=0)
    assert interval.estimate == pytest.approx(0.2)
    # the resampled mean takes values in steps of 0.2: a large sample lands on the exact quantiles
    assert interval.low == pytest.approx(low_exact, abs=1e-9)
    assert interval.high == pytest.approx(high_exact, abs=1e-9)
    assert (low_exact, high_exact) == (-0.4, 0.8)
    assert not interval.excludes_zero


def test_pairing_cancels_question_difficulty():
    """b is a plus a constant on every question: every resample has the same difference, so the
    interval is that one point, far from zero, although each model alone varies a lot."""
    a = np.linspace(-10, 0, 40)
    interval = paired_bootstrap(a + 0.5, a, iterations=500, seed=3)
    assert interval.low == pytest.approx(0.5) and interval.high == pytest.approx(0.5)
    assert interval.excludes_zero


def test_seeded_and_degenerate_cases():
    a, b = [0.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]
    assert paired_bootstrap(a, b, 1000, seed=5) == paired_bootstrap(a, b, 1000, seed=5)
    assert paired_bootstrap(a, b, 0, seed=5).low is None  # no resamples: no interval
    with pytest.raises(ValueError):
        paired_bootstrap([1.0], [1.0, 2.0], 10, 0)


def test_across_seeds_t_interval_by_hand():
    summary = across_seeds([0.30, 0.34, 0.32])
    assert summary.mean == pytest.approx(0.32)
    assert summary.std == pytest.approx(0.02)  # sqrt(((-.02)^2 + .02^2 + 0) / 2)
    half = 4.303 * 0.02 / math.sqrt(3)  # t(0.975, df=2)
    assert summary.interval.low == pytest.approx(0.32 - half)
    assert summary.interval.high == pytest.approx(0.32 + half)
    single = across_seeds([0.5])
    assert single.std is None and single.interval.low is None
