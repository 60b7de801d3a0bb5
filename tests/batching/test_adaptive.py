"""The adaptive controller against a simulated model whose cost grows with batch size."""

from __future__ import annotations

from tidegate.batching.adaptive import AdaptiveBatchSize


def compute_s(batch: int) -> float:
    return 0.002 + 0.001 * batch  # 2 ms fixed + 1 ms per input


def run_compute_bound(controller: AdaptiveBatchSize, windows: int) -> list[int]:
    """Arrivals keep batches full; an input waits for the batch ahead of it, then its own."""
    sizes = []
    for _ in range(windows * controller.window_batches):
        size = controller.size
        latency = 2 * compute_s(size)
        controller.observe([latency] * size, backlogged=False)
        sizes.append(controller.size)
    return sizes


def test_shrinks_toward_the_target_and_settles_in_band() -> None:
    target = 0.030
    controller = AdaptiveBatchSize(target_s=target, max_size=64)
    run_compute_bound(controller, windows=60)
    latency = 2 * compute_s(controller.size)
    assert controller.headroom * target * 0.8 <= latency <= target
    assert controller.size < 64


def test_grows_back_when_the_target_is_relaxed() -> None:
    controller = AdaptiveBatchSize(target_s=0.010, max_size=64)
    run_compute_bound(controller, windows=40)
    small = controller.size
    controller.target_s = 0.200
    run_compute_bound(controller, windows=40)
    assert controller.size > small
    assert controller.size == 64  # 2 * compute(64) = 132 ms < 0.7 * 200 ms


def test_backlog_grows_the_batch_instead_of_shrinking_it() -> None:
    controller = AdaptiveBatchSize(target_s=0.010, max_size=64, size=8)
    for _ in range(controller.window_batches * 5):
        controller.observe([0.5] * controller.size, backlogged=True)
    assert controller.size > 8


def test_stays_within_bounds() -> None:
    controller = AdaptiveBatchSize(target_s=0.0001, max_size=16)
    run_compute_bound(controller, windows=50)
    assert controller.size == 1
