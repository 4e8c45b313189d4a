"""Bootstrap intervals and the exact McNemar test on cases whose answers are known in closed form."""

from __future__ import annotations

import math

import pytest

from job.evaluation.confidence import bootstrap_interval, mcnemar_exact_p, paired_comparison


def test_bootstrap_interval_of_a_known_proportion() -> None:
    flags = [True] * 50 + [False] * 50
    low, high = bootstrap_interval(flags)
    half_width = 1.96 * math.sqrt(0.5 * 0.5 / 100)  # normal approximation: +/- 9.8 pp
    assert low == pytest.approx(0.5 - half_width, abs=0.02) and high == pytest.approx(0.5 + half_width, abs=0.02)
    assert bootstrap_interval(flags) == [low, high]  # seeded: the same every time
    assert bootstrap_interval([True] * 20) == [1.0, 1.0] and bootstrap_interval([False] * 7) == [0.0, 0.0]
    assert bootstrap_interval([]) is None
    wide, narrow = bootstrap_interval([True, False] * 10), bootstrap_interval([True, False] * 500)
    assert (wide[1] - wide[0]) > 3 * (narrow[1] - narrow[0])  # 50x the rows: about 1/7 the width


def test_exact_mcnemar_matches_the_binomial_tail() -> None:
    assert mcnemar_exact_p(0, 6) == pytest.approx(2 / 64)
    assert mcnemar_exact_p(1, 5) == pytest.approx(2 * 7 / 64)
    assert mcnemar_exact_p(3, 3) == 1.0 and mcnemar_exact_p(0, 0) == 1.0
    assert mcnemar_exact_p(10, 30) == pytest.approx(0.00222, abs=1e-4)  # scipy.stats.binomtest(10, 40).pvalue


def test_paired_comparison_says_when_a_difference_is_noise() -> None:
    # 100 rows, tuned +5 pp: 8 rows only tuned gets right, 3 only base: p = 0.23, noise
    base = [True] * 20 + [True] * 3 + [False] * 8 + [False] * 69
    tuned = [True] * 20 + [False] * 3 + [True] * 8 + [False] * 69
    result = paired_comparison(base, tuned)
    assert result["delta"] == pytest.approx(0.05) and (result["base_only"], result["tuned_only"]) == (3, 8)
    assert result["p_value"] == pytest.approx(mcnemar_exact_p(3, 8)) and result["p_value"] > 0.05
    assert result["within_noise"] and "+5.0 pp is within noise on these 100 rows" in result["statement"]
    assert result["ci95"][0] < 0 < result["ci95"][1]

    big = paired_comparison([False] * 70 + [True] * 30, [True] * 60 + [False] * 10 + [True] * 30)
    assert not big["within_noise"] and big["p_value"] < 1e-6 and "tuned model is better by 60.0 pp" in big["statement"]
    with pytest.raises(ValueError):
        paired_comparison([True], [True, False])
