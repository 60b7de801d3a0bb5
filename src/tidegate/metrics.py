"""Every Prometheus instrument, declared once.

The hot path (per request, per batch) records into plain Python counters and bucket arrays that
live with each component (:class:`~tidegate.batching.stats.BatchMetrics`,
:class:`~tidegate.generation.stats.GenerationMetrics`, an upstream pool's wait histogram); a
collector turns them, or typed statistics snapshots, into Prometheus samples only when
``/metrics`` is scraped. prometheus_client's own instruments take a lock per update, which
measured ~10% of the echo runtime's request cost. Everything runs on the event loop thread, so
the plain counters need no lock. Each app owns its registry (not the global one), so several
apps can live in one process, as in tests.

This module collects; the components it reads never import it (the histogram is in the leaf
:mod:`tidegate.histogram`; the layering is checked by ``make layers``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import Protocol

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client import exposition as _exposition
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from tidegate.auth.stats import KeyRingStatistics
from tidegate.batching.stats import BatchMetrics
from tidegate.generation.stats import EngineStatistics, GenerationMetrics
from tidegate.histogram import Histogram, HistogramSnapshot
from tidegate.upstream.stats import UpstreamStatistics

__all__ = ["CacheMetrics", "Metrics", "RouteMetrics", "UpstreamSource"]


class UpstreamSource(Protocol):
    """What the exporter reads of an upstream client
    (:class:`~tidegate.upstream.client.UpstreamClient`)."""

    def statistics(self) -> UpstreamStatistics: ...


class ModelSample(Protocol):
    """What the cache collector reads of one model (the model manager's ``ModelSnapshot``)."""

    @property
    def id(self) -> str: ...
    @property
    def loaded(self) -> bool: ...
    @property
    def memory_bytes(self) -> int | None: ...


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
        self.models: Callable[[], Iterable[ModelSample]] = tuple

    def preload_hit_rate(self) -> float | None:
        settled = self.preload_hits + self.preload_wasted
        return self.preload_hits / settled if settled else None


class RouteMetrics:
    """Requests answered, by route, model and status, counted by the routes that report them
    (``/tokenize``, ``/detokenize``). ``model`` is empty when the request named no configured
    model: a client's model names never become labels."""

    def __init__(self) -> None:
        self.requests: Counter[tuple[str, str, int]] = Counter()

    def count(self, route: str, model: str, status: int) -> None:
        self.requests[route, model, status] += 1


class _RouteCollector:
    def __init__(self, routes: RouteMetrics) -> None:
        self._routes = routes

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily("tidegate_route_requests", "Requests answered, by route, "
                                       "model and status", labels=["route", "model", "status"])
        for (route, model, status), count in sorted(self._routes.requests.items()):
            requests.add_metric([route, model, str(status)], count)
        yield requests


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
        for model in c.models():
            state.add_metric([model.id], 1.0 if model.loaded else 0.0)
            if model.loaded:
                memory.add_metric([model.id], float(model.memory_bytes or 0))
        yield memory
        yield state


class _BatchCollector:
    def __init__(self, models: dict[str, BatchMetrics]) -> None:
        self._models = models

    def collect(self) -> Iterator[Metric]:
        histograms: tuple[tuple[str, str, Callable[[BatchMetrics], Histogram]], ...] = (
            ("tidegate_batch_size_items", "Inputs per dispatched batch", lambda m: m.batch_items),
            ("tidegate_batch_size_tokens", "Tokens per dispatched batch",
             lambda m: m.batch_tokens),
            ("tidegate_queue_wait_seconds", "Time an input waited in the queue",
             lambda m: m.queue_wait),
            ("tidegate_batch_compute_seconds", "Time to compute one batch", lambda m: m.compute),
        )
        for name, doc, read in histograms:
            family = HistogramMetricFamily(name, doc, labels=["model"])
            for model, metrics in self._models.items():
                _add_histogram(family, [model], read(metrics))
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


def _histogram(name: str, doc: str, labels: list[str]) -> HistogramMetricFamily:
    return HistogramMetricFamily(name, doc, labels=labels)


def _add_histogram(family: HistogramMetricFamily, labels: list[str],
                   histogram: Histogram | HistogramSnapshot) -> None:
    family.add_metric(labels, histogram.cumulative(), histogram.sum)


class _GenerationCollector:
    def __init__(self, metrics: dict[str, GenerationMetrics],
                 engines: dict[str, Callable[[], EngineStatistics]]) -> None:
        self._metrics = metrics
        self._engines = engines

    def collect(self) -> Iterator[Metric]:
        histograms: tuple[tuple[str, str, Callable[[GenerationMetrics], Histogram]], ...] = (
            ("tidegate_generation_ttft_seconds",
             "Submit to first token, queueing and prefill included",
             lambda m: m.time_to_first_token),
            ("tidegate_generation_inter_token_seconds",
             "Time between consecutive tokens of a sequence", lambda m: m.inter_token_latency),
            ("tidegate_generation_step_seconds", "One engine step", lambda m: m.step_seconds),
            ("tidegate_generation_decode_batch_size", "Sequences per decode step",
             lambda m: m.batch_size),
        )
        for name, doc, read in histograms:
            family = _histogram(name, doc, ["model"])
            for model, metrics in self._metrics.items():
                _add_histogram(family, [model], read(metrics))
            yield family
        tokens = CounterMetricFamily("tidegate_generation_tokens", "Tokens processed",
                                     labels=["model", "kind"])
        finished = CounterMetricFamily("tidegate_generation_finished", "Sequences ended",
                                       labels=["model", "reason"])
        rejected = CounterMetricFamily("tidegate_generation_rejected",
                                       "Sequences refused: waiting queue full", labels=["model"])
        for model, metrics in self._metrics.items():
            tokens.add_metric([model, "prompt"], metrics.prompt_tokens)
            tokens.add_metric([model, "completion"], metrics.generated_tokens)
            for reason, count in metrics.finished.items():
                finished.add_metric([model, reason], count)
            rejected.add_metric([model], metrics.rejected)
        yield from (tokens, finished, rejected)
        running = GaugeMetricFamily("tidegate_generation_running", "Sequences holding a slot",
                                    labels=["model"])
        waiting = GaugeMetricFamily("tidegate_generation_waiting", "Sequences waiting for a slot",
                                    labels=["model"])
        rate = GaugeMetricFamily("tidegate_generation_tokens_per_second",
                                 "Generated tokens per second while generating (smoothed)",
                                 labels=["model"])
        for model, statistics in self._engines.items():
            stats = statistics()
            running.add_metric([model], stats.running)
            waiting.add_metric([model], stats.waiting)
            rate.add_metric([model], stats.tokens_per_second)
        yield from (running, waiting, rate)


class _UpstreamCollector:
    def __init__(self, clients: dict[str, UpstreamSource]) -> None:
        self._clients = clients

    def collect(self) -> Iterator[Metric]:
        labels = ["model", "replica"]
        opened = CounterMetricFamily("tidegate_upstream_connections_opened",
                                     "Connections opened to a replica", labels=labels)
        closed = CounterMetricFamily("tidegate_upstream_connections_closed",
                                     "Connections closed", labels=labels)
        reused = CounterMetricFamily("tidegate_upstream_connections_reused",
                                     "Requests sent on a kept-alive connection", labels=labels)
        requests = CounterMetricFamily("tidegate_upstream_requests",
                                       "Requests handed a connection", labels=labels)
        retired = CounterMetricFamily("tidegate_upstream_connections_retired",
                                      "Connections retired at max age", labels=labels)
        timeouts = CounterMetricFamily("tidegate_upstream_pool_timeouts",
                                       "Requests that found no free connection", labels=labels)
        reuse = GaugeMetricFamily("tidegate_upstream_connection_reuse_ratio",
                                  "reused / requests", labels=labels)
        in_use = GaugeMetricFamily("tidegate_upstream_in_use",
                                   "Requests in flight (connections in use)", labels=labels)
        healthy = GaugeMetricFamily("tidegate_upstream_healthy", "1 if the replica is routable",
                                    labels=labels)
        wait = _histogram("tidegate_upstream_pool_wait_seconds",
                          "Time waiting for a pooled connection", labels)
        for model, client in self._clients.items():
            stats = client.statistics()
            for pool, routable in zip(stats.replicas, stats.health.healthy, strict=True):
                key = [model, pool.url]
                opened.add_metric(key, pool.opened)
                closed.add_metric(key, pool.closed)
                reused.add_metric(key, pool.reused)
                requests.add_metric(key, pool.requests)
                retired.add_metric(key, pool.retired_by_age)
                timeouts.add_metric(key, pool.pool_timeouts)
                reuse.add_metric(key, pool.reuse_rate)
                in_use.add_metric(key, pool.in_flight)
                healthy.add_metric(key, 1.0 if routable else 0.0)
                _add_histogram(wait, key, pool.pool_wait)
        yield from (opened, closed, reused, requests, retired, timeouts)
        yield from (reuse, in_use, healthy, wait)


_KEY_FAMILY = "tidegate_api_key_"


class _KeyCollector:
    """Per API key, labelled by its id (the key itself is never known here)."""

    def __init__(self, source: Callable[[], KeyRingStatistics]) -> None:
        self._source = source

    def collect(self) -> Iterator[Metric]:
        stats = self._source()
        requests = CounterMetricFamily(f"{_KEY_FAMILY}requests",
                                       "Requests admitted, by API key", labels=["key"])
        limited = CounterMetricFamily(f"{_KEY_FAMILY}rate_limited",
                                      "Requests refused with 429, by API key and limit",
                                      labels=["key", "limit"])
        tokens = CounterMetricFamily(f"{_KEY_FAMILY}tokens",
                                     "Tokens used (as usage reports them), by API key",
                                     labels=["key", "kind"])
        for key in stats.keys:
            requests.add_metric([key.id], key.requests)
            limited.add_metric([key.id, "requests"], key.rate_limited_requests)
            limited.add_metric([key.id, "tokens"], key.rate_limited_tokens)
            tokens.add_metric([key.id, "prompt"], key.prompt_tokens)
            tokens.add_metric([key.id, "completion"], key.completion_tokens)
        yield from (requests, limited, tokens)
        yield _counter(f"{_KEY_FAMILY}invalid", "Requests refused with 401 invalid_api_key",
                       stats.invalid)


class _OneKeysView:
    """The registry as one API key reads it: the other keys' series left out (their ids, their
    traffic), the rest whole."""

    def __init__(self, registry: CollectorRegistry, key_id: str) -> None:
        self._registry = registry
        self._key_id = key_id

    def collect(self) -> Iterator[Metric]:
        for family in self._registry.collect():
            if not family.name.startswith(_KEY_FAMILY):
                yield family
                continue
            kept = Metric(family.name, family.documentation, family.type, family.unit)
            kept.samples = [sample for sample in family.samples
                            if sample.labels.get("key", self._key_id) == self._key_id]
            yield kept


class Metrics:
    """All of tidegate's instruments, in a registry of the app's own."""

    content_type = _exposition.CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._batching: dict[str, BatchMetrics] = {}
        self.cache = CacheMetrics()
        self._generation: dict[str, GenerationMetrics] = {}
        self._engines: dict[str, Callable[[], EngineStatistics]] = {}
        self._upstreams: dict[str, UpstreamSource] = {}
        self.routes = RouteMetrics()
        self.registry.register(_BatchCollector(self._batching))
        self.registry.register(_CacheCollector(self.cache))
        self.registry.register(_GenerationCollector(self._generation, self._engines))
        self.registry.register(_UpstreamCollector(self._upstreams))
        self.registry.register(_RouteCollector(self.routes))

    def for_batcher(self, model: str) -> BatchMetrics:
        """The (persistent) batching instruments of ``model``."""
        return self._batching.setdefault(model, BatchMetrics())

    def for_generation(self, model: str) -> GenerationMetrics:
        """The (persistent) generation instruments of ``model``."""
        return self._generation.setdefault(model, GenerationMetrics())

    def track_engine(self, model: str, statistics: Callable[[], EngineStatistics]) -> None:
        self._engines[model] = statistics

    def track_upstream(self, model: str, client: UpstreamSource) -> None:
        self._upstreams[model] = client

    def untrack(self, model: str) -> None:
        """A model was unloaded: stop reading its live engine or upstream client."""
        self._engines.pop(model, None)
        self._upstreams.pop(model, None)

    def track_keys(self, statistics: Callable[[], KeyRingStatistics]) -> None:
        """Export the API keys' counters (only when keys are configured)."""
        self.registry.register(_KeyCollector(statistics))

    def render(self, *, key_id: str | None = None) -> bytes:
        """The exposition text; with ``key_id``, only that API key's own per-key series."""
        if key_id is None:
            return bytes(generate_latest(self.registry))
        return bytes(generate_latest(_OneKeysView(self.registry, key_id)))
