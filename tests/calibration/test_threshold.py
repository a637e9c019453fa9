from fractions import Fraction
from math import comb

import numpy as np
import pytest

from calibration.threshold import (
    InsufficientCalibrationData,
    binomial_tail,
    bounded_order,
    choose_threshold,
    exceed_probability,
    fpr_upper_bound,
    min_calibration_frames,
    proportion_interval,
)


def exact_tail(n: int, p: Fraction, k: int) -> Fraction:
    return sum((comb(n, j) * p**j * (1 - p) ** (n - j) for j in range(k, n + 1)), Fraction(0))


@pytest.mark.parametrize(("n", "p", "k"), [(10, "9/10", 10), (10, "9/10", 8), (50, "99/100", 49), (299, "99/100", 299)])
def test_binomial_tail_matches_exact_rational_arithmetic(n: int, p: str, k: int) -> None:
    expected = float(exact_tail(n, Fraction(p), k))
    assert binomial_tail(n, float(Fraction(p)), k) == pytest.approx(expected, rel=1e-10)


def test_binomial_tail_edges() -> None:
    assert binomial_tail(5, 0.5, 0) == 1.0
    assert binomial_tail(5, 0.5, 6) == 0.0
    assert binomial_tail(4, 0.5, 4) == pytest.approx(1 / 16)


def test_min_frames_for_one_percent_at_95_is_299() -> None:
    assert min_calibration_frames(0.01, 0.95) == 299
    assert 0.99**299 <= 0.05 < 0.99**298
    assert min_calibration_frames(0.05, 0.90) == 45  # 0.95^45 = 0.0994, 0.95^44 = 0.1046


def test_bounded_order_is_the_smallest_passing_k() -> None:
    n, alpha, conf = 1000, 0.05, 0.95
    k = bounded_order(n, alpha, conf)
    assert k is not None
    assert exceed_probability(n, k, alpha) <= 0.05 < exceed_probability(n, k - 1, alpha)
    # Binomial(1000, 0.95) has mean 950, sd 6.9: the 95 % bound sits ~1.645 sd above the mean.
    assert 960 <= k <= 962
    assert bounded_order(298, 0.01, 0.95) is None
    assert bounded_order(299, 0.01, 0.95) == 299


def test_fpr_upper_bound_inverts_the_tail() -> None:
    bound = fpr_upper_bound(299, 299, 0.95)
    assert bound <= 0.01
    assert exceed_probability(299, 299, bound) == pytest.approx(0.05, abs=1e-6)
    # k = n: closed form 1 - delta^(1/n)
    assert fpr_upper_bound(100, 100, 0.9) == pytest.approx(1 - 0.1 ** (1 / 100), rel=1e-6)


def test_choose_threshold_returns_the_kth_score_and_the_plain_quantile() -> None:
    rng = np.random.default_rng(0)
    scores = rng.permutation(np.arange(1000, dtype=float))  # s(k) = k - 1
    choice = choose_threshold(scores, 0.05, 0.95)
    assert choice.meets_target and choice.n == 1000
    assert choice.threshold == choice.k - 1
    assert choice.fpr_bound <= 0.05 and choice.exceed_probability <= 0.05
    assert choice.empirical_threshold == 949.0  # ceil(1000 * 0.95) = 950th smallest
    assert choice.empirical_exceed_probability > 0.4  # the plain quantile overshoots about half the time
    assert choice.min_frames == 59


def test_too_few_frames_is_refused_with_the_minimum_unless_allowed() -> None:
    scores = np.linspace(0, 1, 120)
    with pytest.raises(InsufficientCalibrationData, match="120 held-out .* at least 299 are needed"):
        choose_threshold(scores, 0.01, 0.95)
    weak = choose_threshold(scores, 0.01, 0.95, allow_weak_bound=True)
    assert not weak.meets_target and weak.method == "max_score_weak"
    assert weak.threshold == 1.0 and weak.k == 120
    assert 0.01 < weak.fpr_bound == pytest.approx(1 - 0.05 ** (1 / 120), rel=1e-6)


def test_bad_levels_and_scores() -> None:
    with pytest.raises(ValueError, match="target FPR"):
        choose_threshold(np.ones(10), 0.0, 0.9)
    with pytest.raises(ValueError, match="confidence"):
        choose_threshold(np.ones(10), 0.1, 1.0)
    with pytest.raises(ValueError, match="NaN"):
        choose_threshold(np.array([1.0, np.nan]), 0.5, 0.5)
    with pytest.raises(InsufficientCalibrationData):
        choose_threshold(np.array([]), 0.5, 0.5)


def test_proportion_interval_clopper_pearson() -> None:
    # 0 of 10: upper = 1 - 0.025^(1/10); 10 of 10: lower = 0.025^(1/10)
    assert proportion_interval(0, 10) == (0.0, pytest.approx(1 - 0.025**0.1, rel=1e-6))
    assert proportion_interval(10, 10) == (pytest.approx(0.025**0.1, rel=1e-6), 1.0)
    low, high = proportion_interval(5, 10)
    assert low == pytest.approx(0.187086, abs=1e-5) and high == pytest.approx(0.812914, abs=1e-5)
    with pytest.raises(ValueError):
        proportion_interval(3, 2)
