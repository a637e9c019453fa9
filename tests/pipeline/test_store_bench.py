import numpy as np
import pytest

from pipeline.app.store_bench import latency_with_and_without_store, p99_spread


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
