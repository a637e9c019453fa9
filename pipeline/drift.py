"""Drift watch: does each camera's stream of pass scores still look like the good frames it was calibrated on?

The threshold's false-reject bound holds only while good parts score as the held-out good frames did.
A moved camera, a dirty lens or new lighting raises good parts' scores, often long before many of them
cross the threshold. So the watch counts passed parts scoring above q, a quantile (by default the median)
of the held-out scores below the threshold, and tests that share against what calibration allows:

- The held-out scores below the threshold are, given the threshold, a sample of what good parts that
  pass score. With probability `confidence` over that sample, a passed good part exceeds q with
  probability at most p0 (the same order-statistic bound as the threshold's own).
- Each passed part gives the likelihood ratio of "exceeds with probability p1 = 2 p0" against p0, and the
  Shiryaev-Roberts statistic R_t = (1 + R_{t-1}) * LR_t sums them over every possible change point. With
  no drift E[LR] <= 1, so R_t - t is a supermartingale and P(R reaches A within N parts) <= N / A. The
  alarm level A = horizon / false_alarm keeps a false alarm within `horizon` parts below `false_alarm`
  (plus the held-out bounds' own 1 - confidence).
- After a real change R grows geometrically, and once the change is undone it decays back.

A sequential statistic answers after every part, with a stated false-alarm rate over any stretch of the
run; a windowed two-sample test must fix its window (slow to react, or noisy) and pays for re-testing
overlapping windows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from calibration.threshold import fpr_upper_bound

MIN_REFERENCE_SCORES = 20
STATISTIC_CAP = 1e6  # times the alarm level: keeps R finite during a long drift, and its decay short after
CLEAR_FRACTION = 1e-3  # an alarm clears once R falls this far below the level, not on every dip under it


@dataclass(frozen=True)
class DriftReference:
    level: float  # q: the held-out passes' score at the reference quantile
    exceed_bound: float  # p0: upper bound on the share of passed good parts scoring above q
    n: int  # held-out scores below the threshold it was made from

    @classmethod
    def from_holdout(
        cls, scores: Sequence[float], threshold: float, quantile: float, confidence: float
    ) -> DriftReference | None:
        """None when too few held-out scores lie below the threshold (fewer than MIN_REFERENCE_SCORES)."""
        passes = np.sort(np.asarray(scores, dtype=np.float64))
        passes = passes[passes < threshold]
        n = int(passes.size)
        if n < MIN_REFERENCE_SCORES:
            return None
        k = min(n, max(1, math.ceil(quantile * (n + 1))))
        return cls(float(passes[k - 1]), min(fpr_upper_bound(n, k, confidence), 0.9), n)


class DriftWatch:
    """The Shiryaev-Roberts statistic of one camera's passed parts against a reference."""

    def __init__(self, reference: DriftReference, alarm_level: float) -> None:
        self.reference, self.alarm_level = reference, alarm_level
        p0 = reference.exceed_bound
        p1 = min(2.0 * p0, (1.0 + p0) / 2.0)
        self.ratio_above, self.ratio_below = p1 / p0, (1.0 - p1) / (1.0 - p0)
        self.statistic = 0.0
        self.parts = 0
        self.alarm = False

    def observe(self, score: float) -> None:
        """One passed part's score."""
        ratio = self.ratio_above if score > self.reference.level else self.ratio_below
        self.statistic = min((1.0 + self.statistic) * ratio, STATISTIC_CAP * self.alarm_level)
        self.parts += 1
        if self.statistic >= self.alarm_level:
            self.alarm = True
        elif self.statistic < CLEAR_FRACTION * self.alarm_level:
            self.alarm = False


def alarm_level(horizon_parts: int, false_alarm: float) -> float:
    """A: no drift gives an alarm within `horizon_parts` passed parts with probability at most `false_alarm`."""
    return horizon_parts / false_alarm
