"""Every Prometheus instrument, declared once.

The hot path (per request, per batch) records into plain Python counters and bucket arrays that
live with each model (:class:`BatchMetrics`); a collector turns them into Prometheus samples only
when ``/metrics`` is scraped. prometheus_client's own instruments take a lock per update, which
measured ~10% of the echo runtime's request cost. Everything runs on the event loop thread, so
the plain counters need no lock. Each app owns its registry (not the global one), so several
apps can live in one process, as in tests.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client import exposition as _exposition
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

__all__ = ["BatchMetrics", "CacheMetrics", "Histogram", "Metrics"]

SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
TOKEN_BUCKETS = (16, 64, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)
TIME_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
DISPATCH_REASONS = ("full", "tokens", "timeout", "idle")


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
        total = 0
        out = []
        for bound, count in zip((*map(str, map(float, self.buckets)), "+Inf"), self.counts,
                                strict=True):
            total += count
            out.append((bound, float(total)))
        return out


class BatchMetrics:
    """One model's batching instruments. Outlives a batcher, so counters survive a reload."""

    __slots__ = ("batch_items", "batch_tokens", "compute", "dispatch", "queue_depth",
                 "queue_wait", "rejected", "withdrawn")

    def __init__(self) -> None:
        self.batch_items = Histogram(SIZE_BUCKETS)
        self.batch_tokens = Histogram(TOKEN_BUCKETS)
        self.queue_wait = Histogram(TIME_BUCKETS)
        self.compute = Histogram(TIME_BUCKETS)
        self.dispatch = dict.fromkeys(DISPATCH_REASONS, 0)
        self.rejected = 0
        self.withdrawn = 0
        self.queue_depth: Callable[[], int] = lambda: 0


class CacheMetrics:
    """The model cache's counters."""

    def __init__(self) -> None:
        self.hits = 0
        self.misses = 0
        self.loads: dict[str, int] = {}
        self.load_failures = 0
        self.evictions: dict[str, int] = {}
        self.load_seconds = Histogram((0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0))
        self.preloads = 0
        self.preload_hits = 0
        self.preload_wasted = 0
        self.describe: Callable[[], list[dict[str, object]]] = list

    def preload_hit_rate(self) -> float | None:
        settled = self.preload_hits + self.preload_wasted
        return self.preload_hits / settled if settled else None


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


class _CacheCollector:
    def __init__(self, cache: CacheMetrics) -> None:
        self._cache = cache

    def collect(self) -> Iterator[Metric]:
        c = self._cache
        yield _counter("tidegate_cache_hits", "Requests that found their model loaded", c.hits)
        yield _counter("tidegate_cache_misses", "Requests that had to wait for a load", c.misses)
        loads = CounterMetricFamily("tidegate_model_loads", "Model loads by reason",
                                    labels=["reason"])
        for reason, count in c.loads.items():
            loads.add_metric([reason], count)
        yield loads
        yield _counter("tidegate_model_load_failures", "Failed or timed-out loads",
                       c.load_failures)
        evictions = CounterMetricFamily("tidegate_model_evictions", "Evictions by reason",
                                        labels=["reason"])
        for reason, count in c.evictions.items():
            evictions.add_metric([reason], count)
        yield evictions
        hist = HistogramMetricFamily("tidegate_model_load_seconds", "Time to load a model")
        hist.add_metric([], c.load_seconds.cumulative(), c.load_seconds.sum)
        yield hist
        yield _counter("tidegate_predictive_preloads", "Predictive preloads started", c.preloads)
        yield _counter("tidegate_preload_hits", "Preloaded models used before eviction",
                       c.preload_hits)
        yield _counter("tidegate_preload_wasted", "Preloaded models evicted unused",
                       c.preload_wasted)
        rate = c.preload_hit_rate()
        yield GaugeMetricFamily("tidegate_preload_hit_rate",
                                "preload hits / (hits + wasted); NaN before any settle",
                                value=float("nan") if rate is None else rate)
        memory = GaugeMetricFamily("tidegate_model_memory_bytes", "Measured size of loaded models",
                                   labels=["model"])
        state = GaugeMetricFamily("tidegate_model_loaded", "1 if the model is loaded",
                                  labels=["model"])
        for card in c.describe():
            loaded = card["status"] == "loaded"
            state.add_metric([str(card["id"])], 1.0 if loaded else 0.0)
            if loaded:
                memory.add_metric([str(card["id"])], float(card["memory_bytes"] or 0))  # type: ignore[arg-type]
        yield memory
        yield state


class _BatchCollector:
    def __init__(self, models: dict[str, BatchMetrics]) -> None:
        self._models = models

    def collect(self) -> Iterator[Metric]:
        histograms = {
            "batch_items": ("tidegate_batch_size_items", "Inputs per dispatched batch"),
            "batch_tokens": ("tidegate_batch_size_tokens", "Tokens per dispatched batch"),
            "queue_wait": ("tidegate_queue_wait_seconds", "Time an input waited in the queue"),
            "compute": ("tidegate_batch_compute_seconds", "Time to compute one batch"),
        }
        for attr, (name, doc) in histograms.items():
            family = HistogramMetricFamily(name, doc, labels=["model"])
            for model, metrics in self._models.items():
                hist: Histogram = getattr(metrics, attr)
                family.add_metric([model], hist.cumulative(), hist.sum)
            yield family
        dispatch = CounterMetricFamily(
            "tidegate_batch_dispatch", "Batches dispatched, by reason", labels=["model", "reason"]
        )
        depth = GaugeMetricFamily(
            "tidegate_queue_depth_items", "Inputs waiting in the queue", labels=["model"]
        )
        rejected = CounterMetricFamily(
            "tidegate_rejected_requests", "Requests refused because the queue was full",
            labels=["model"],
        )
        withdrawn = CounterMetricFamily(
            "tidegate_withdrawn_items",
            "Queued inputs removed before dispatch (client gone or request timed out)",
            labels=["model"],
        )
        for model, metrics in self._models.items():
            for reason, count in metrics.dispatch.items():
                dispatch.add_metric([model, reason], count)
            depth.add_metric([model], metrics.queue_depth())
            rejected.add_metric([model], metrics.rejected)
            withdrawn.add_metric([model], metrics.withdrawn)
        yield from (dispatch, depth, rejected, withdrawn)


class Metrics:
    """All of tidegate's instruments, in a registry of the app's own."""

    content_type = _exposition.CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._batching: dict[str, BatchMetrics] = {}
        self.cache = CacheMetrics()
        self.registry.register(_BatchCollector(self._batching))
        self.registry.register(_CacheCollector(self.cache))

    def for_batcher(self, model: str) -> BatchMetrics:
        """The (persistent) batching instruments of ``model``."""
        return self._batching.setdefault(model, BatchMetrics())

    def render(self) -> bytes:
        return bytes(generate_latest(self.registry))
