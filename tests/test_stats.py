"""Paired statistics of the effect reports: exact McNemar, Wilson and Newcombe intervals."""

from __future__ import annotations

import math
import random

import pytest

from softrepa.stats import mcnemar_exact, newcombe_paired_interval, paired_comparison, wilson_interval


def test_mcnemar_exact_matches_hand_binomial_sums():
    # b = 10, c = 2: 2 * P(X <= 2), X ~ Bin(12, 1/2) = 2 * (1 + 12 + 66) / 4096
    assert mcnemar_exact(10, 2) == pytest.approx(2 * 79 / 4096, rel=1e-15)
    assert mcnemar_exact(2, 10) == mcnemar_exact(10, 2)  # two-sided: symmetric
    assert mcnemar_exact(5, 5) == 1.0 and mcnemar_exact(0, 0) == 1.0  # capped, and no discordant pair
    assert mcnemar_exact(7, 0) == pytest.approx(2 / 2 ** 7)
    with pytest.raises(ValueError):
        mcnemar_exact(-1, 2)


def test_mcnemar_is_a_valid_test_under_the_null():
    """Under H0 (discordant pairs split 50/50) the rejection rate at 0.05 stays <= 0.05 (exact test)."""
    rng = random.Random(0)
    n, trials = 40, 2000
    rejections = sum(mcnemar_exact(b, n - b) < 0.05 for b in (sum(rng.random() < 0.5 for _ in range(n))
                                                             for _ in range(trials)))
    assert rejections / trials <= 0.05


def test_wilson_interval_contains_p_and_shrinks_with_n():
    lo, hi = wilson_interval(30, 100)
    assert lo < 0.3 < hi
    lo2, hi2 = wilson_interval(300, 1000)
    assert hi2 - lo2 < hi - lo
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == 1.0


def test_paired_comparison_counts_and_interval():
    a = [True] * 50 + [False] * 50
    b = [True] * 60 + [False] * 40  # 10 pairs improved, none worse
    c = paired_comparison(a, b)
    assert (c["n"], c["b_only"], c["a_only"]) == (100, 10, 0)
    assert c["delta"] == pytest.approx(0.10)
    assert c["delta_ci95"][0] < 0.10 < c["delta_ci95"][1] and c["delta_ci95"][0] > 0
    assert c["p_mcnemar"] == pytest.approx(2 / 2 ** 10)
    with pytest.raises(ValueError):
        paired_comparison(a, b[:-1])


def test_newcombe_interval_covers_the_true_difference():
    """Coverage of the paired-difference interval on simulated pairs is close to 95%."""
    rng = random.Random(1)
    hits, trials = 0, 400
    for _ in range(trials):
        pairs = []
        for _ in range(200):
            u = rng.random()
            pairs.append((u < 0.5, u < 0.6))  # correlated arms, true delta = +0.10
        a, b = zip(*pairs)
        lo, hi = newcombe_paired_interval(a, b)
        hits += lo <= 0.10 <= hi
    assert 0.90 <= hits / trials <= 0.99
    assert math.isfinite(lo) and math.isfinite(hi)
