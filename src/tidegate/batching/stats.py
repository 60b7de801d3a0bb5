"""The batcher's instruments: plain counters and histograms that outlive a batcher.

Written only from the event loop thread, so they need no lock (prometheus_client's own
instruments take a lock per update, which measured ~10% of the echo runtime's request cost).
:mod:`tidegate.metrics` reads them when ``/metrics`` is scraped; this module imports nothing
from the exporter.
"""

from __future__ import annotations

from collections.abc import Callable

from tidegate.batching.policy import DispatchReason
from tidegate.histogram import SIZE_BUCKETS, TIME_BUCKETS, TOKEN_BUCKETS, Histogram

__all__ = ["BatchMetrics", "nothing_queued"]


def nothing_queued() -> int:
    """The queue depth of a model with no batcher (not loaded)."""
    return 0


class BatchMetrics:
    """One model's batching instruments. Outlives a batcher, so counters survive a reload."""

    __slots__ = ("batch_items", "batch_tokens", "compute", "dispatch", "queue_depth",
                 "queue_wait", "rejected", "withdrawn")

    def __init__(self) -> None:
        self.batch_items = Histogram(SIZE_BUCKETS)
        self.batch_tokens = Histogram(TOKEN_BUCKETS)
        self.queue_wait = Histogram(TIME_BUCKETS)
        self.compute = Histogram(TIME_BUCKETS)
        self.dispatch = {reason.value: 0 for reason in DispatchReason}
        """Batches dispatched, by :class:`~tidegate.batching.policy.DispatchReason` value."""
        self.rejected = 0
        self.withdrawn = 0
        self.queue_depth: Callable[[], int] = nothing_queued
        """Inputs queued now; the live batcher installs its own reader, and puts
        :func:`nothing_queued` back when it closes."""
