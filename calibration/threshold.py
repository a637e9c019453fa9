"""A reject threshold with a stated bound on the false-reject rate, from held-out normal scores alone.

Held-out normal scores s(1) <= ... <= s(n); threshold t = s(k); a frame is rejected when score > t.
For a new normal frame exchangeable with the held-out ones, FPR(t) = 1 - F(s(k)) where
F(s(k)) ~ Beta(k, n - k + 1), hence

    P(FPR(t) > alpha) = P(Binomial(n, 1 - alpha) >= k).

We take the smallest k (the lowest threshold, so the most defects caught) with that probability
<= delta = 1 - confidence. With k = n the condition is (1 - alpha)^n <= delta, which fixes the least
number of held-out frames: ceil(ln delta / ln(1 - alpha)), e.g. 299 for alpha = 1 %, 95 % confidence.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np


class InsufficientCalibrationData(ValueError):
    """Too few held-out normal frames for the requested FPR target at the requested confidence."""


def binomial_tail(n: int, p: float, k: int) -> float:
    """P(Binomial(n, p) >= k), summed exactly term by term in log space (no scipy needed)."""
    if k <= 0:
        return 1.0
    if k > n:
        return 0.0
    if p <= 0.0:
        return 0.0
    if p >= 1.0:
        return 1.0
    log_p, log_q = math.log(p), math.log1p(-p)
    lgn = math.lgamma(n + 1)
    logs = [lgn - math.lgamma(j + 1) - math.lgamma(n - j + 1) + j * log_p + (n - j) * log_q for j in range(k, n + 1)]
    top = max(logs)
    return min(1.0, math.exp(top) * math.fsum(math.exp(v - top) for v in logs))


def exceed_probability(n: int, k: int, target_fpr: float) -> float:
    """P(FPR(s(k)) > target_fpr) for threshold s(k) of n exchangeable held-out normal scores."""
    return binomial_tail(n, 1.0 - target_fpr, k)


def min_calibration_frames(target_fpr: float, confidence: float) -> int:
    """Fewest held-out normal frames for which some order statistic meets the bound (k = n)."""
    _check_levels(target_fpr, confidence)
    return math.ceil(math.log(1.0 - confidence) / math.log1p(-target_fpr) - 1e-12)


def bounded_order(n: int, target_fpr: float, confidence: float) -> int | None:
    """Smallest k in 1..n with P(FPR(s(k)) > target_fpr) <= 1 - confidence; None when even k = n fails."""
    _check_levels(target_fpr, confidence)
    delta = 1.0 - confidence
    if n < 1 or exceed_probability(n, n, target_fpr) > delta:
        return None
    lo, hi = 1, n  # exceed_probability falls as k grows: binary search for the first k that passes
    while lo < hi:
        mid = (lo + hi) // 2
        if exceed_probability(n, mid, target_fpr) <= delta:
            hi = mid
        else:
            lo = mid + 1
    return lo


def fpr_upper_bound(n: int, k: int, confidence: float) -> float:
    """The FPR level that threshold s(k) stays under with probability `confidence` (Beta quantile)."""
    if not 1 <= k <= n:
        raise ValueError(f"order statistic k must be in 1..{n}, got {k}")
    return _solve_decreasing(lambda a: exceed_probability(n, k, a), 1.0 - confidence)


def proportion_interval(successes: int, trials: int, confidence: float = 0.95) -> tuple[float, float]:
    """Two-sided Clopper-Pearson interval for a rate such as recall: successes out of trials."""
    if not 0 <= successes <= trials or trials == 0:
        raise ValueError(f"need 0 <= successes <= trials and trials > 0, got {successes}/{trials}")
    tail = (1.0 - confidence) / 2.0
    # lower: P(Bin(m, p) >= x) = tail; upper: P(Bin(m, p) <= x) = tail, i.e. P(Bin(m, p) >= x + 1) = 1 - tail
    low = 0.0 if successes == 0 else 1.0 - _solve_decreasing(lambda q: binomial_tail(trials, 1 - q, successes), tail)
    high = (
        1.0
        if successes == trials
        else 1.0 - _solve_decreasing(lambda q: binomial_tail(trials, 1 - q, successes + 1), 1.0 - tail)
    )
    return low, high


def _solve_decreasing(f: Callable[[float], float], level: float) -> float:
    """Smallest a in [0, 1] with f(a) <= level, for f falling from 1 to 0 (bisection to ~1e-12)."""
    lo, hi = 0.0, 1.0
    for _ in range(45):
        mid = (lo + hi) / 2.0
        if f(mid) <= level:
            hi = mid
        else:
            lo = mid
    return hi


@dataclass(frozen=True)
class ThresholdChoice:
    """The chosen threshold and everything needed to state (and re-check) its guarantee."""

    threshold: float
    method: str  # "order_statistic" (bound met) or "max_score_weak" (too few frames, allowed)
    target_fpr: float
    confidence: float
    n: int  # held-out normal frames
    k: int  # threshold = k-th smallest held-out score
    fpr_bound: float  # FPR the threshold stays under with probability `confidence`
    exceed_probability: float  # P(FPR > target_fpr) at this threshold
    empirical_threshold: float  # plain (1 - target_fpr) quantile of the held-out scores
    empirical_exceed_probability: float  # P(FPR > target_fpr) had the plain quantile been used
    min_frames: int  # held-out frames needed for the bound at target and confidence

    @property
    def meets_target(self) -> bool:
        return self.method == "order_statistic"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def choose_threshold(
    normal_scores: np.ndarray, target_fpr: float, confidence: float, allow_weak_bound: bool = False
) -> ThresholdChoice:
    """Pick the FPR-bounded threshold from held-out normal scores (reject when score > threshold).

    Raises InsufficientCalibrationData when no order statistic meets the bound, unless
    `allow_weak_bound`: then the largest score is used and the weaker bound it gives is reported.
    """
    scores = np.sort(np.asarray(normal_scores, dtype=np.float64).ravel())
    if scores.size == 0:
        raise InsufficientCalibrationData("no held-out normal scores to choose a threshold from")
    if not np.all(np.isfinite(scores)):
        raise ValueError("held-out normal scores contain NaN or infinite values")
    n = int(scores.size)
    needed = min_calibration_frames(target_fpr, confidence)
    k = bounded_order(n, target_fpr, confidence)
    method = "order_statistic"
    if k is None:
        if not allow_weak_bound:
            require_enough_frames(n, target_fpr, confidence)
        k, method = n, "max_score_weak"
    k_emp = min(n, max(1, math.ceil(n * (1.0 - target_fpr))))
    return ThresholdChoice(
        threshold=float(scores[k - 1]),
        method=method,
        target_fpr=target_fpr,
        confidence=confidence,
        n=n,
        k=k,
        fpr_bound=fpr_upper_bound(n, k, confidence),
        exceed_probability=exceed_probability(n, k, target_fpr),
        empirical_threshold=float(scores[k_emp - 1]),
        empirical_exceed_probability=exceed_probability(n, k_emp, target_fpr),
        min_frames=needed,
    )


def require_enough_frames(n: int, target_fpr: float, confidence: float) -> None:
    """Raise InsufficientCalibrationData, naming the minimum, when n held-out frames cannot meet the bound."""
    if bounded_order(n, target_fpr, confidence) is None:
        needed = min_calibration_frames(target_fpr, confidence)
        raise InsufficientCalibrationData(
            f"{n} held-out normal frames cannot bound the false-reject rate at {target_fpr:g} with "
            f"{confidence:.0%} confidence: at least {needed} are needed (give more normal frames, a larger "
            f"holdout, a higher target or lower confidence, or pass --allow-weak-bound)"
        )


def _check_levels(target_fpr: float, confidence: float) -> None:
    if not 0.0 < target_fpr < 1.0:
        raise ValueError(f"target FPR must be in (0, 1), got {target_fpr}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
