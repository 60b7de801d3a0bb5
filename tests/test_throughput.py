"""DrainRate: how fast a queue drains, the server's time between units of work included."""

from __future__ import annotations

import pytest

from tidegate.throughput import DrainRate


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
