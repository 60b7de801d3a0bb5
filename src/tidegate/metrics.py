"""Every Prometheus instrument, declared once, in a registry owned by the app (not the global
one, so several apps can live in one process, as in tests)."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import exposition as _exposition

__all__ = ["BatchMetrics", "Metrics"]

_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
_TOKEN_BUCKETS = (16, 64, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)
_TIME_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


@dataclass(frozen=True, slots=True)
class BatchMetrics:
    """The batcher's instruments with the model label already bound (no per-call lookup)."""

    batch_items: Histogram
    batch_tokens: Histogram
    queue_wait: Histogram
    compute: Histogram
    queue_depth: Gauge
    rejected: Counter
    withdrawn: Counter
    dispatch: dict[str, Counter]


class Metrics:
    """All of tidegate's instruments."""

    content_type = _exposition.CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.batch_items = Histogram(
            "tidegate_batch_size_items", "Inputs per dispatched batch", ["model"],
            buckets=_SIZE_BUCKETS, registry=r,
        )
        self.batch_tokens = Histogram(
            "tidegate_batch_size_tokens", "Tokens per dispatched batch", ["model"],
            buckets=_TOKEN_BUCKETS, registry=r,
        )
        self.dispatch = Counter(
            "tidegate_batch_dispatch", "Batches dispatched, by reason", ["model", "reason"],
            registry=r,
        )
        self.queue_wait = Histogram(
            "tidegate_queue_wait_seconds", "Time an input waited in the queue", ["model"],
            buckets=_TIME_BUCKETS, registry=r,
        )
        self.compute = Histogram(
            "tidegate_batch_compute_seconds", "Time to compute one batch", ["model"],
            buckets=_TIME_BUCKETS, registry=r,
        )
        self.queue_depth = Gauge(
            "tidegate_queue_depth_items", "Inputs waiting in the queue", ["model"], registry=r
        )
        self.rejected = Counter(
            "tidegate_rejected_requests", "Requests refused because the queue was full",
            ["model"], registry=r,
        )
        self.withdrawn = Counter(
            "tidegate_withdrawn_items",
            "Queued inputs removed before dispatch (client gone or request timed out)",
            ["model"], registry=r,
        )

    def for_batcher(self, model: str) -> BatchMetrics:
        from tidegate.batching.policy import DispatchReason

        return BatchMetrics(
            batch_items=self.batch_items.labels(model),
            batch_tokens=self.batch_tokens.labels(model),
            queue_wait=self.queue_wait.labels(model),
            compute=self.compute.labels(model),
            queue_depth=self.queue_depth.labels(model),
            rejected=self.rejected.labels(model),
            withdrawn=self.withdrawn.labels(model),
            dispatch={reason.value: self.dispatch.labels(model, reason.value)
                      for reason in DispatchReason},
        )

    def render(self) -> bytes:
        return bytes(generate_latest(self.registry))
