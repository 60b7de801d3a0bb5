"""DrainRate, BatchCost and UpperBand: how fast a queue drains and how long a batch takes."""

from __future__ import annotations

import pytest

from tidegate.throughput import BatchCost, DrainRate, RecentQuantile, UpperBand


def test_back_to_back_work_counts_the_time_between_units() -> None:
    rate = DrainRate(weight=1.0)  # the last observation only
    rate.observe(10, ready_at=0.0, end=1.0)
    assert rate.per_second == pytest.approx(10.0)
    # Queued since 0.5, dispatched at 1.5 (the server was busy elsewhere), done at 2.0: the
    # queue drained 10 units in the 1.0 s since the previous batch ended, not in 0.5 s.
    rate.observe(10, ready_at=0.5, end=2.0)
    assert rate.per_second == pytest.approx(10.0)


def test_work_arriving_at_an_idle_server_counts_from_its_arrival() -> None:
    rate = DrainRate(weight=1.0)
    rate.observe(10, ready_at=0.0, end=1.0)
    rate.observe(5, ready_at=3.0, end=3.5)  # arrived long after the last batch ended
    assert rate.per_second == pytest.approx(10.0)
    rate.idle()
    rate.observe(4, ready_at=10.0, end=10.5)
    assert rate.per_second == pytest.approx(8.0)


def test_the_average_moves_by_its_weight_and_starts_at_the_first_measure() -> None:
    rate = DrainRate(weight=0.5)
    assert rate.per_second == 0.0
    rate.observe(10, ready_at=0.0, end=1.0)
    assert rate.per_second == pytest.approx(10.0)
    rate.observe(2, ready_at=0.0, end=2.0)  # 2 units in the second since
    assert rate.per_second == pytest.approx(6.0)
    rate.observe(3, ready_at=0.0, end=2.0)  # no time passed: nothing to learn
    assert rate.per_second == pytest.approx(6.0)


def test_overlapping_batches_measure_the_total_rate() -> None:
    """Two batches computing at once, each 1 s: ends 0.5 s apart give twice one's rate."""
    rate = DrainRate(weight=1.0)
    rate.observe(10, ready_at=0.0, end=1.0)
    rate.observe(10, ready_at=0.0, end=1.5)
    assert rate.per_second == pytest.approx(20.0)
    rate.observe(10, ready_at=0.0, end=1.2)  # finished out of order: the later end stands
    assert rate.per_second == pytest.approx(20.0)


# -- BatchCost: a batch's time by its size --------------------------------------------------


def test_batch_cost_fits_a_fixed_part_and_a_part_per_input() -> None:
    cost = BatchCost(weight=0.2)
    assert cost.seconds(10) == 0.0  # nothing measured yet
    for _ in range(60):
        for items in (4, 16, 64):
            cost.observe(items, 0.05 + 0.002 * items)
    assert cost.fixed_s == pytest.approx(0.05, rel=1e-3)
    assert cost.item_s == pytest.approx(0.002, rel=1e-3)
    # a time per input from either end alone would be far off for the other
    assert cost.seconds(14) == pytest.approx(0.078, rel=1e-3)
    assert cost.seconds(53) == pytest.approx(0.156, rel=1e-3)


def test_batch_cost_of_one_size_only_is_proportional() -> None:
    cost = BatchCost()
    for _ in range(5):
        cost.observe(32, 0.064)
    assert cost.fixed_s == 0.0
    assert cost.seconds(32) == pytest.approx(0.064)
    assert cost.seconds(16) == pytest.approx(0.032)


def test_batch_cost_never_fits_time_falling_with_size() -> None:
    cost = BatchCost(weight=0.5)
    cost.observe(8, 0.2)
    cost.observe(64, 0.1)  # noise: a large batch faster than a small one
    assert cost.item_s > 0 and cost.fixed_s == 0.0
    assert cost.seconds(64) > cost.seconds(8)


def test_batch_cost_allows_for_slow_batches_and_forgets_them() -> None:
    cost = BatchCost(weight=0.1)
    for _ in range(50):
        cost.observe(10, 0.1)
    assert cost.slow == pytest.approx(1.0)  # steady: no allowance
    for i in range(50):  # a shared CPU: every other batch twice as slow
        cost.observe(10, 0.2 if i % 2 else 0.1)
    assert 1.3 < cost.slow <= 3.0
    for _ in range(200):
        cost.observe(10, 0.1)
    assert cost.slow == pytest.approx(1.0, abs=0.05)


def test_batch_cost_ignores_empty_batches() -> None:
    cost = BatchCost()
    cost.observe(0, 1.0)
    cost.observe(5, -1.0)
    assert cost.seconds(5) == 0.0


# -- UpperBand ------------------------------------------------------------------------------


def test_upper_band_sits_above_a_noisy_stream_and_within_its_limits() -> None:
    band = UpperBand(start=1.0, low=1.0, high=3.0, weight=0.05)
    for i in range(400):
        band.observe(1.0 + (0.2 if i % 2 else -0.2))
    assert band.value == pytest.approx(1.4, abs=0.03)  # mean 1 + 2 x deviation 0.2
    for _ in range(400):
        band.observe(10.0)
    assert band.value == 3.0
    for _ in range(400):
        band.observe(0.1)
    assert band.value == 1.0


# -- RecentQuantile -------------------------------------------------------------------------


def test_recent_quantile_is_the_tail_of_the_last_values() -> None:
    tail = RecentQuantile(start=1.0, low=0.5, high=3.0, q=0.99, size=100)
    assert tail.value == 1.0
    for i in range(100):  # 1.00 .. 1.99: the 99th percentile is the largest
        tail.observe(1.0 + i / 100)
    assert tail.value == pytest.approx(1.99)
    for _ in range(100):  # a long tail of one in ten at 2.5 stands above a mean + deviations
        for i in range(10):
            tail.observe(2.5 if i == 0 else 1.0)
    assert tail.value == pytest.approx(2.5)


def test_recent_quantile_forgets_a_burst_and_keeps_its_limits() -> None:
    tail = RecentQuantile(start=1.0, low=0.5, high=3.0, size=50)
    tail.observe(9.0)
    assert tail.value == 3.0  # the first value counts at once, within the limits
    for _ in range(49):
        tail.observe(0.1)
    assert tail.value == 3.0  # still among the last 50
    for _ in range(5):  # sorted anew every 5 values
        tail.observe(0.1)
    assert tail.value == 0.5
