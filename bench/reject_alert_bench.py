"""Benchmark: how often the reject-rate alert (deploy/alerts.yml) fires at exactly the bound, and how
strongly it sees a doubled reject rate.

    python bench/reject_alert_bench.py [--days 30] [--z 4] [--seed 1]

A line whose false-reject rate sits exactly at the calibrated bound p rejects each part with
probability p. The alert's rule sums a 15-minute window every 15 s and fires when its z exceeds the
limit; this simulates that day by day and prints, per line speed and bound, the share of days with at
least one evaluation over the limit: for the rule's arcsine transform and, for comparison, the plain
normal approximation. Then the mean z of a window whose reject rate is twice the bound.
"""

from __future__ import annotations

import argparse

import numpy as np

WINDOW_S, STEP_S, DAY_S = 900, 15, 86_400


def z_arcsine(r: np.ndarray, n: float, p: float) -> np.ndarray:
    """The rule's z: 2 sqrt(n) (asin sqrt((r + 3/8) / (n + 3/4)) - asin sqrt(p))."""
    return 2 * np.sqrt(n) * (np.arcsin(np.sqrt((r + 0.375) / (n + 0.75))) - np.arcsin(np.sqrt(p)))


def z_normal(r: np.ndarray, n: float, p: float) -> np.ndarray:
    return (r - n * p) / np.sqrt(n * p * (1 - p))


def alarm_days(rate: float, p: float, limit: float, days: int, seed: int) -> dict[str, float]:
    """Share of days with a window over `limit`, per transform, at a reject probability of exactly p."""
    rng = np.random.default_rng(seed)
    per_step, steps = int(rate * STEP_S), WINDOW_S // STEP_S
    n = per_step * steps
    hits = {"arcsine": 0, "normal": 0}
    for _ in range(days):
        counts = rng.binomial(per_step, p, size=DAY_S // STEP_S)
        windows = np.convolve(counts, np.ones(steps, dtype=np.int64), "valid")
        hits["arcsine"] += bool((z_arcsine(windows, n, p) > limit).any())
        hits["normal"] += bool((z_normal(windows, n, p) > limit).any())
    return {k: v / days for k, v in hits.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--z", type=float, default=4.0, help="the rule's limit")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    print(f"days with an alert at exactly the bound (z > {args.z:g}, {args.days} simulated days each)")
    print(f"{'parts/s':>8} {'bound':>6} {'arcsine':>8} {'normal':>7} {'z at 2x bound':>14}")
    for rate in (1, 10, 80):
        for p in (0.001, 0.01, 0.05, 0.2):
            share = alarm_days(rate, p, args.z, args.days, args.seed)
            n = rate * WINDOW_S
            doubled = float(z_arcsine(np.array(2 * p * n), n, p))
            print(f"{rate:>8} {p:>6} {share['arcsine']:>8.2f} {share['normal']:>7.2f} {doubled:>14.1f}")


if __name__ == "__main__":
    main()
