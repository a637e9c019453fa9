import numpy as np
import pytest

from pipeline.app.store_bench import latency_with_and_without_store, p99_change_interval, p99_spread, rounds_for


def test_runs_alternate_so_both_settings_sit_at_the_same_mean_time() -> None:
    order: list[bool] = []
    off, on = latency_with_and_without_store(lambda store_on, _rate: order.append(store_on) or len(order) - 1, 1.0)
    assert order == [False, True, True, False] * 2
    assert np.mean(off) == np.mean(on) == 3.5


def test_p99_spread_is_the_change_between_two_halves_of_the_same_setting() -> None:
    steady = [np.arange(100, dtype=float) for _ in range(4)]
    assert p99_spread(steady) == 0.0
    # One of four runs with a long tail: it lands in the inner half (runs 1 and 2), whose p99 doubles.
    noisy = [np.full(100, 100.0) for _ in range(4)]
    noisy[1] = np.r_[np.full(90, 100.0), np.full(10, 200.0)]
    assert p99_spread(noisy) == pytest.approx(1.0)
    noisy[0], noisy[1] = noisy[1], noisy[0]  # now in the outer half: the inner p99 is half of it
    assert p99_spread(noisy) == pytest.approx(0.5)
    assert p99_spread([np.full(10, 5.0)]) == 0.0


def test_rounds_grow_with_the_replay_time_and_never_fall_below_two() -> None:
    assert rounds_for(1.0) == 2
    assert rounds_for(200.0) == 4
    order: list[bool] = []
    latency_with_and_without_store(lambda store_on, _rate: order.append(store_on), 1.0, rounds_for(200.0))
    assert order == [False, True, True, False] * 4


def test_p99_change_interval_holds_a_real_change_and_excludes_none() -> None:
    rng = np.random.default_rng(1)
    off = [rng.normal(100.0, 5.0, 500) for _ in range(8)]
    slower = [run * 1.2 for run in off]  # every verdict 20 % slower
    low, high = p99_change_interval(off, slower)
    assert 0.1 < low < 0.2 < high < 0.3
    low, high = p99_change_interval(off, [rng.normal(100.0, 5.0, 500) for _ in range(8)])
    assert low < 0.0 < high and high - low < 0.1  # same distribution: no change, and a tight interval


def test_p99_change_interval_widens_when_one_run_stalls() -> None:
    rng = np.random.default_rng(2)
    off = [rng.normal(100.0, 5.0, 200) for _ in range(8)]
    on = [rng.normal(100.0, 5.0, 200) for _ in range(8)]
    _, steady_high = p99_change_interval(off, on)
    on[3] = np.r_[on[3][:180], np.full(20, 300.0)]  # a burst of stalls in one run
    low, high = p99_change_interval(off, on)
    assert high > 1.0 > steady_high  # the stalled run, drawn or not, spans "no change" to "much slower"
    assert low < 0.1


def test_p99_change_interval_leaves_out_runs_without_verdicts() -> None:
    rng = np.random.default_rng(3)
    off = [rng.normal(100.0, 5.0, 500) for _ in range(4)] + [np.empty(0)] * 4  # half the runs too short
    on = [rng.normal(120.0, 5.0, 500) for _ in range(4)] + [np.empty(0)]
    low, high = p99_change_interval(off, on)
    assert 0.1 < low <= high < 0.3
    assert all(np.isnan(v) for v in p99_change_interval([np.empty(0)], on))
