"""Lock-free histograms and their bucket bounds: a leaf module that imports nothing from tidegate.

The components that record numbers (batching, generation, upstream pools, the model cache) and
:mod:`tidegate.metrics`, which exports them, both use these; keeping them here keeps the
exporter out of the recorders' imports.
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass

__all__ = [
    "SIZE_BUCKETS",
    "TIME_BUCKETS",
    "TOKEN_BUCKETS",
    "Histogram",
    "HistogramSnapshot",
]

SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
TOKEN_BUCKETS = (16, 64, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)
TIME_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


def _cumulative(buckets: tuple[float, ...], counts: tuple[int, ...] | list[int]
                ) -> list[tuple[str, float]]:
    total = 0
    out = []
    for bound, count in zip((*map(str, map(float, buckets)), "+Inf"), counts, strict=True):
        total += count
        out.append((bound, float(total)))
    return out


class Histogram:
    """A lock-free histogram for single-threaded (event loop) use."""

    __slots__ = ("buckets", "counts", "sum")

    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # the last slot is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.buckets, value)] += 1
        self.sum += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[str, float]]:
        """``(upper bound, observations <= bound)`` pairs, as Prometheus exposes them."""
        return _cumulative(self.buckets, self.counts)

    def snapshot(self) -> HistogramSnapshot:
        return HistogramSnapshot(tuple(self.buckets), tuple(self.counts), self.sum)


@dataclass(frozen=True, slots=True)
class HistogramSnapshot:
    """A frozen copy of a :class:`Histogram`."""

    buckets: tuple[float, ...]
    counts: tuple[int, ...]
    """Per bucket (not cumulative); the last one is +Inf."""
    sum: float

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[str, float]]:
        """``(upper bound, observations <= bound)`` pairs, as Prometheus exposes them."""
        return _cumulative(self.buckets, self.counts)

    @classmethod
    def of(cls, histogram: Histogram) -> HistogramSnapshot:
        return histogram.snapshot()
