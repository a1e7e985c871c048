"""The one permutation-test helper: the (k + 1) / (n + 1) convention against known distributions."""

from __future__ import annotations

import math

import numpy as np
import pytest

from xmodal.errors import ConfigError
from xmodal.metrics import statistics as S


def test_pvalue_counts_the_observed_value_among_the_draws():
    null = np.arange(99.0)  # 0..98: four draws (95..98) are at least 95
    assert S.pvalue(95.0, null) == pytest.approx(5 / 100)
    assert S.pvalue(1000.0, null) == pytest.approx(1 / 100)  # never 0, whatever n
    assert S.pvalue(2.0, null, "less") == pytest.approx(4 / 100)  # 0, 1, 2
    # two-sided: distance from the null's mean 49; |x - 49| >= 47 holds for 0, 1, 2, 96, 97, 98
    assert S.pvalue(2.0, null, "two-sided") == pytest.approx(7 / 100)
    # NaN draws are left out of k and n alike
    assert S.pvalue(95.0, np.append(null, [np.nan] * 10)) == pytest.approx(5 / 100)
    assert math.isnan(S.pvalue(float("nan"), null))


def test_exact_enumeration_where_every_pairing_fits():
    # Fixed points of a pairing of n = 5 rows: 1 pairing has 5, 10 have exactly 3 (a
    # derangement of the other two each), none has 4. P(at least 3) = 11/120, scipy's exact test.
    def fixed_points(order: np.ndarray) -> float:
        return float(np.sum(order == np.arange(5)) >= 3)

    observed, p, null = S.permutation_test(fixed_points, 5, 1000, seed=0)
    assert observed == 1.0 and len(null) == 120
    assert p == pytest.approx(11 / 120)


def test_random_draws_follow_the_k_plus_one_convention_and_the_known_rate():
    # statistic = -(row 0's partner): only pairings that keep row 0 in place reach the observed 0,
    # a 1-in-20 event. With 1999 draws, p = (k + 1) / 2000, k ~ Binomial(1999, 1/20).
    observed, p, null = S.permutation_test(lambda order: -float(order[0]), 20, 1999, seed=3)
    assert observed == 0.0 and len(null) == 1999
    assert p == (np.sum(null >= observed) + 1) / (len(null) + 1)
    assert abs(p - 0.05) < 4 * math.sqrt(0.05 * 0.95 / 1999)
    again = S.permutation_test(lambda order: -float(order[0]), 20, 1999, seed=3)
    assert again[1] == p and np.array_equal(again[2], null)


def test_within_group_repairing_never_crosses_a_group_and_keeps_the_convention():
    groups = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 1])
    seen = []

    def crossings(order: np.ndarray) -> float:
        seen.append(order)
        return float(np.sum(order[:4] == np.arange(4)))  # fixed points of group 0: observed 4, P = 1/24

    observed, p, null = S.permutation_test(crossings, 10, 2399, seed=1, groups=groups)
    assert all((groups[order] == groups).all() and sorted(order) == list(range(10)) for order in seen)
    assert observed == 4.0 and p == (np.sum(null >= 4) + 1) / 2400
    assert abs(p - 1 / 24) < 4 * math.sqrt(1 / 24 * 23 / 24 / 2399)


def test_max_statistic_pvalues_compare_each_test_with_the_largest_null_draw():
    null = np.array([[0.1, 0.5, np.nan], [0.9, 0.2, 0.3], [0.4, 0.4, 0.4], [np.nan, np.nan, np.nan]])
    # maxima of the finite draws: 0.5, 0.9, 0.4 (the all-NaN draw is left out)
    p = S.max_statistic_pvalues(np.array([0.95, 0.45, 0.3]), null)
    assert p.tolist() == pytest.approx([1 / 4, 3 / 4, 4 / 4])


def test_null_groups_follow_the_categories_or_stop_with_one_line():
    assert S.null_groups(["a", "b", "c"], S.NullPairing.all).tolist() == [0, 0, 0]
    groups = S.null_groups(["colour", "shape", "colour"], S.NullPairing.within_category)
    assert groups[0] == groups[2] != groups[1]
    with pytest.raises(ConfigError, match="experiment.null=within_category needs categories with two or more concepts"):
        S.null_groups(["colour", "shape"], S.NullPairing.within_category)
