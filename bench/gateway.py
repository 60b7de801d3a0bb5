"""Gateway benchmark: tidegate in front of another tidegate (``runtime = "remote"``).

Two upstreams, each measured directly and through a gateway with wrk and
``bench/post_embedding.lua`` (one sentence per ``POST /v1/embeddings``):

* MiniLM (the default config): what a client sees when the upstream does real, CPU-bound work;
  the gateway's batcher coalesces concurrent requests into list inputs. The gateway with
  ``max_batch_size = 1`` at 64 connections is the baseline for that coalescing, once with the
  default ``max_concurrent_batches = 1`` (one upstream request at a time) and once with 64, a
  plain proxy keeping 64 upstream requests in flight;
* the ``echo`` runtime: an upstream that costs almost nothing, so gateway minus direct latency
  is the proxy's own cost (on a 2-core machine the MiniLM numbers mostly show CPU contention
  between the gateway process and the upstream it waits on).

After each gateway's runs its ``/metrics`` gives upstream connection reuse:
``1 - tidegate_upstream_connections_opened_total / tidegate_upstream_requests_total``.
``python -m bench.run_all --only gateway`` runs it and renders it into BENCHMARKS.md.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench.http_load import (
    HOST,
    ModelSpec,
    ServerProcess,
    WrkResult,
    read_batch_totals,
    run_wrk,
    tidegate_server,
    write_bodies,
)
from bench.serving import read_metrics, sum_samples, tidegate_from_toml
from bench.workload import embedding_bodies, make_sentences

__all__ = [
    "GATEWAY_CONNECTIONS",
    "GatewayResults",
    "GatewayRun",
    "Reuse",
    "Route",
    "Upstream",
    "run_gateway",
]

MINILM_ID = "all-minilm-l6-v2"
ECHO_ID = "echo"
GATEWAY_CONNECTIONS = (1, 10, 64)
"""1 connection: the gateway's added latency with no queueing and no batching, one request at a
time; 10 and 64: under load (the targets are checked at 10)."""
_SENTENCES = 1024


class Upstream(enum.StrEnum):
    MINILM = "MiniLM"
    ECHO = "echo"


class Route(enum.StrEnum):
    DIRECT = "direct"
    GATEWAY = "gateway"
    GATEWAY_NOBATCH = "gateway, max_batch_size = 1"
    GATEWAY_NOBATCH_PARALLEL = "gateway, max_batch_size = 1, max_concurrent_batches = 64"


@dataclass(frozen=True, kw_only=True, slots=True)
class GatewayRun:
    upstream: Upstream
    route: Route
    server: ServerProcess
    result: WrkResult
    mean_batch: float | None
    """Mean inputs per batch of the server wrk hit (the gateway's own batcher for gateways)."""
    upstream_requests: float | None = None
    """``tidegate_upstream_requests_total`` over the measured run (gateways only)."""
    batches: float | None = None
    """Batches the server's batcher dispatched in the measured run: for a gateway, its upstream
    calls (before retries)."""
    connections_opened: float | None = None
    """Upstream connections the gateway opened during the measured run (gateways only)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Reuse:
    upstream: Upstream
    route: Route
    opened: float
    requests: float
    batches: float | None
    """Batches the gateway dispatched, one upstream call each (retries aside)."""
    ratio_gauge: float | None
    """The gateway's own ``tidegate_upstream_connection_reuse_ratio``, as a cross-check."""

    @property
    def calls(self) -> float:
        """Upstream requests: the metric, unless the batcher counted fewer calls (the metric
        then counts more than requests, which would flatter reuse)."""
        return min(self.requests, self.batches) if self.batches else self.requests

    @property
    def reuse(self) -> float | None:
        return 1 - self.opened / self.calls if self.calls > 0 else None


@dataclass(slots=True)
class GatewayResults:
    runs: list[GatewayRun] = field(default_factory=list)
    reuse: list[Reuse] = field(default_factory=list)
    servers: list[ServerProcess] = field(default_factory=list)

    def run(self, upstream: Upstream, route: Route, connections: int) -> WrkResult | None:
        for r in self.runs:
            if r.upstream is upstream and r.route is route and r.result.connections == connections:
                return r.result
        return None


@dataclass(frozen=True, kw_only=True, slots=True)
class GatewaySettings:
    duration_s: int
    warmup_s: int


def render_gateway_config(
    model_id: str, upstream: ServerProcess, *, max_batch_size: int, upstream_model: str | None,
    max_concurrent_batches: int | None = None, log_level: str = "info",
) -> str:
    lines = [
        "[server]", f'host = "{HOST}"', f'log_level = "{log_level}"', "",
        "[[models]]", f'id = "{model_id}"', 'runtime = "remote"',
        f'upstreams = ["{upstream.base_url}"]',
    ]
    if upstream_model is not None:
        lines.append(f'upstream_model = "{upstream_model}"')
    lines += ["[models.batching]", f"max_batch_size = {max_batch_size}"]
    if max_concurrent_batches is not None:
        lines.append(f"max_concurrent_batches = {max_concurrent_batches}")
    return "\n".join(lines) + "\n"


def _upstream_counters(server: ServerProcess, model: str) -> tuple[float, float] | None:
    """``(connections opened, upstream requests)`` so far for ``model``; None without them."""
    samples = read_metrics(server.base_url)
    opened = sum_samples(samples, "tidegate_upstream_connections_opened_total", model=model)
    requests = sum_samples(samples, "tidegate_upstream_requests_total", model=model)
    return (opened, requests) if opened is not None and requests is not None else None


class _Bench:
    """One section run: where files go, the settings, and the results collected so far."""

    def __init__(self, settings: GatewaySettings, workdir: Path) -> None:
        self.settings = settings
        self.workdir = workdir
        self.results = GatewayResults()

    def bodies(self, model: str) -> Path:
        path = self.workdir / f"gateway-bodies-{model}.jsonl"
        if not path.exists():
            write_bodies(path, embedding_bodies(model, make_sentences(_SENTENCES)))
        return path

    def measure(self, server: ServerProcess, model: str, upstream: Upstream, route: Route,
                connections: int) -> None:
        bodies = self.bodies(model)
        if self.settings.warmup_s > 0:
            run_wrk(server.embeddings_url, bodies, connections=connections,
                    duration_s=self.settings.warmup_s)
        before = read_batch_totals(server.base_url, model)
        counters_before = _upstream_counters(server, model)
        result = run_wrk(server.embeddings_url, bodies, connections=connections,
                         duration_s=self.settings.duration_s)
        after = read_batch_totals(server.base_url, model)
        counters_after = _upstream_counters(server, model)
        mean_batch = after.mean_since(before) if before and after else None
        batches = after.batches - before.batches if before and after else None
        opened = requests = None
        if counters_before is not None and counters_after is not None:
            opened = counters_after[0] - counters_before[0]
            requests = counters_after[1] - counters_before[1]
        self.results.runs.append(GatewayRun(
            upstream=upstream, route=route, server=server, result=result, mean_batch=mean_batch,
            upstream_requests=requests, connections_opened=opened, batches=batches,
        ))
        upstream_text = (f", upstream: {requests:.0f} requests on {opened:.0f} new connections"
                         if requests is not None else "")
        print(f"  {upstream.value} {route.value}, {connections} conns: "
              f"{result.requests_per_s:.1f} req/s, p50 {result.p50_ms:.2f} ms, "
              f"p99 {result.p99_ms:.2f} ms, non-2xx {result.non_2xx}, "
              f"errors {result.socket_errors}, mean batch {mean_batch or 0:.1f}{upstream_text}",
              flush=True)

    def record_reuse(self, gateway: ServerProcess, model: str, upstream: Upstream,
                     route: Route) -> None:
        samples = read_metrics(gateway.base_url)
        opened = sum_samples(samples, "tidegate_upstream_connections_opened_total", model=model)
        requests = sum_samples(samples, "tidegate_upstream_requests_total", model=model)
        gauge = sum_samples(samples, "tidegate_upstream_connection_reuse_ratio", model=model)
        batches = sum_samples(samples, "tidegate_batch_size_items_count", model=model)
        if opened is None or requests is None:
            print(f"  {gateway.base_url}/metrics lacks tidegate_upstream_connections_opened_total"
                  " or tidegate_upstream_requests_total for this model", flush=True)
            return
        reuse = Reuse(upstream=upstream, route=route, opened=opened, requests=requests,
                      batches=batches, ratio_gauge=gauge)
        self.results.reuse.append(reuse)
        print(f"  {upstream.value} {route.value}: {opened:.0f} upstream connections opened for "
              f"{requests:.0f} upstream requests by the metric, {batches or 0:.0f} batches "
              f"(reuse {reuse.reuse or 0:.4f})", flush=True)

    def direct_and_gateway(self, upstream_server: ServerProcess, model: str,
                           upstream: Upstream, upstream_model: str | None) -> None:
        self.results.servers.append(upstream_server)
        for connections in GATEWAY_CONNECTIONS:
            self.measure(upstream_server, model, upstream, Route.DIRECT, connections)
        config = render_gateway_config(model, upstream_server, max_batch_size=64,
                                       upstream_model=upstream_model)
        name = f"gateway-{upstream.name.lower()}"
        with tidegate_from_toml(config, workdir=self.workdir, name=name) as gateway:
            self.results.servers.append(gateway)
            for connections in GATEWAY_CONNECTIONS:
                self.measure(gateway, model, upstream, Route.GATEWAY, connections)
            self.record_reuse(gateway, model, upstream, Route.GATEWAY)

    def nobatch_gateways(self, upstream_server: ServerProcess, model: str) -> None:
        """Coalescing off: first as configured in the target (one batch at a time, so one
        upstream request at a time), then with 64 single-input upstream requests in flight."""
        for route, concurrent in ((Route.GATEWAY_NOBATCH, None),
                                  (Route.GATEWAY_NOBATCH_PARALLEL, 64)):
            config = render_gateway_config(model, upstream_server, max_batch_size=1,
                                           upstream_model=None,
                                           max_concurrent_batches=concurrent)
            name = "gateway-nobatch" if concurrent is None else "gateway-nobatch-parallel"
            with tidegate_from_toml(config, workdir=self.workdir, name=name) as gateway:
                self.results.servers.append(gateway)
                self.measure(gateway, model, Upstream.MINILM, route, 64)
                self.record_reuse(gateway, model, Upstream.MINILM, route)


def run_gateway(settings: GatewaySettings, workdir: Path,
                upstreams: Sequence[Upstream] = tuple(Upstream)) -> GatewayResults:
    """Each upstream directly, then through a gateway; MiniLM also through an unbatched one."""
    bench = _Bench(settings, workdir)
    if Upstream.MINILM in upstreams:
        with tidegate_server([ModelSpec(id=MINILM_ID)], workdir=workdir,
                             name="upstream-minilm") as upstream:
            bench.direct_and_gateway(upstream, MINILM_ID, Upstream.MINILM, upstream_model=None)
            bench.nobatch_gateways(upstream, MINILM_ID)
    if Upstream.ECHO in upstreams:
        with tidegate_server([ModelSpec(id=ECHO_ID, runtime="echo")], workdir=workdir,
                             name="upstream-echo") as upstream:
            bench.direct_and_gateway(upstream, ECHO_ID, Upstream.ECHO, upstream_model=ECHO_ID)
    return bench.results
