"""The gateway benchmark's target checks, console table and BENCHMARKS.md section."""

from __future__ import annotations

import shlex

from bench.gateway import GATEWAY_CONNECTIONS, GatewayResults, GatewayRun, Route, Upstream
from bench.report import Check

__all__ = ["format_gateway", "gateway_checks", "gateway_markdown"]

ADDED_P50_TARGET_MS = 0.5
REUSE_TARGET = 0.99
CHECK_CONNECTIONS = 10
"""Added latency is checked at 10 connections, where neither side is saturated by queueing."""


def _added_p50(results: GatewayResults, upstream: Upstream, connections: int) -> float | None:
    direct = results.run(upstream, Route.DIRECT, connections)
    gateway = results.run(upstream, Route.GATEWAY, connections)
    return gateway.p50_ms - direct.p50_ms if direct and gateway else None


def _check_added(results: GatewayResults | None, upstream: Upstream, key: str) -> Check:
    check = Check(
        key=key,
        title=f"gateway p50 - direct p50, {upstream.value} upstream, {CHECK_CONNECTIONS} conns",
        target=f"added / {ADDED_P50_TARGET_MS} ms <= 1.0",
    )
    added = _added_p50(results, upstream, CHECK_CONNECTIONS) if results else None
    if results is None or added is None:
        return check
    direct = results.run(upstream, Route.DIRECT, CHECK_CONNECTIONS)
    gateway = results.run(upstream, Route.GATEWAY, CHECK_CONNECTIONS)
    assert direct is not None and gateway is not None
    return Check(
        key=check.key, title=check.title, target=check.target,
        ratio=added / ADDED_P50_TARGET_MS, passed=added <= ADDED_P50_TARGET_MS,
        measured=f"+{added:.2f} ms (p50 {gateway.p50_ms:.2f} vs {direct.p50_ms:.2f} ms)",
    )


def _check_reuse(results: GatewayResults | None) -> Check:
    check = Check(key="viii", title="gateway upstream connection reuse (worse of the two)",
                  target=f"1 - opened/requests >= {REUSE_TARGET}")
    measured = [r for r in (results.reuse if results else [])
                if r.reuse is not None and r.route is Route.GATEWAY]
    if not measured:
        return check
    worst = min(measured, key=lambda r: r.reuse or 0.0)
    reuse = worst.reuse or 0.0
    return Check(
        key=check.key, title=check.title, target=check.target, ratio=reuse,
        passed=reuse >= REUSE_TARGET,
        measured=(f"{worst.opened:.0f} opened / {worst.calls:.0f} upstream requests "
                  f"({worst.upstream.value}, {worst.route.value})"),
    )


def _check_coalescing(results: GatewayResults | None) -> Check:
    check = Check(key="ix", title="gateway max_batch_size 64 vs 1, MiniLM upstream, 64 conns",
                  target="ratio > 1.0")
    on = results.run(Upstream.MINILM, Route.GATEWAY, 64) if results else None
    off = results.run(Upstream.MINILM, Route.GATEWAY_NOBATCH, 64) if results else None
    if on is None or off is None or off.requests_per_s <= 0:
        return check
    ratio = on.requests_per_s / off.requests_per_s
    return Check(
        key=check.key, title=check.title, target=check.target, ratio=ratio, passed=ratio > 1.0,
        measured=f"{on.requests_per_s:.1f} vs {off.requests_per_s:.1f} req/s",
    )


def gateway_checks(results: GatewayResults | None) -> list[Check]:
    return [
        _check_added(results, Upstream.MINILM, "vii-a"),
        _check_added(results, Upstream.ECHO, "vii-b"),
        _check_reuse(results),
        _check_coalescing(results),
    ]


_HEADER = ["upstream", "route", "conns", "req/s", "p50 ms", "p90 ms", "p99 ms", "added p50 ms",
           "mean batch", "batches", "upstream req (metric)", "new upstream conns", "non-2xx",
           "errors"]


def _row(results: GatewayResults, run: GatewayRun) -> list[str]:
    r = run.result
    added = (_added_p50(results, run.upstream, r.connections)
             if run.route is Route.GATEWAY else None)
    return [
        run.upstream.value, run.route.value, str(r.connections), f"{r.requests_per_s:.1f}",
        f"{r.p50_ms:.2f}", f"{r.p90_ms:.2f}", f"{r.p99_ms:.2f}",
        f"{added:+.2f}" if added is not None else "-",
        f"{run.mean_batch:.1f}" if run.mean_batch is not None else "-",
        f"{run.batches:.0f}" if run.batches is not None else "-",
        f"{run.upstream_requests:.0f}" if run.upstream_requests is not None else "-",
        f"{run.connections_opened:.0f}" if run.connections_opened is not None else "-",
        str(r.non_2xx), str(r.socket_errors),
    ]


def format_gateway(results: GatewayResults) -> str:
    rows = [_HEADER, *(_row(results, run) for run in results.runs)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_HEADER))]
    return "\n".join(
        " ".join(cell.ljust(w) if i < 2 else cell.rjust(w)
                 for i, (cell, w) in enumerate(zip(row, widths, strict=True)))
        for row in rows
    )


def _servers(results: GatewayResults) -> list[str]:
    lines: list[str] = []
    for server in results.servers:
        name = server.log_path.stem
        lines += [f"`{name}`:", "", "```", shlex.join(server.command), "```", ""]
        if server.config_text:
            lines += ["```toml", server.config_text.rstrip(), "```", ""]
    return lines


def _reuse_lines(results: GatewayResults) -> list[str]:
    lines = [
        "| upstream | gateway | connections opened | upstream requests (metric) | batches "
        "| reuse | reuse gauge |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in results.reuse:
        gauge = f"{r.ratio_gauge:.4f}" if r.ratio_gauge is not None else "-"
        reuse = f"{r.reuse:.4f}" if r.reuse is not None else "-"
        batches = f"{r.batches:.0f}" if r.batches is not None else "-"
        lines.append(f"| {r.upstream.value} | {r.route.value} | {r.opened:.0f} | "
                     f"{r.requests:.0f} | {batches} | {reuse} | {gauge} |")
    return [*lines, ""]


def gateway_markdown(results: GatewayResults, checks: list[Check]) -> list[str]:
    wrk = results.runs[0].result.command if results.runs else ()
    conns = ", ".join(str(c) for c in GATEWAY_CONNECTIONS[:-1]) + f" and {GATEWAY_CONNECTIONS[-1]}"
    lines = [
        "## Upstream gateway: tidegate in front of tidegate",
        "",
        f"wrk with `bench/post_embedding.lua` (one sentence per `POST /v1/embeddings`) at {conns} "
        "connections against each upstream directly, then through a gateway (a second "
        "tidegate with the model as `runtime = \"remote\"`), each run after a discarded warm-up. "
        "`added p50` is gateway p50 minus direct p50 at the same connections; at 1 connection "
        "nothing queues and nothing is coalesced, so it is the latency of the gateway's path "
        "alone (two more loopback hops, the inbound request, the upstream client). With the echo "
        "upstream the upstream costs almost nothing, so that difference is the proxy's own "
        "cost; with MiniLM all processes share the machine's cores. `mean batch` is the "
        "batcher of the server wrk hit (the gateway's coalescing for gateway rows). Both "
        "max_batch_size = 1 rows are the coalescing baseline at 64 connections: the first "
        "with the default `max_concurrent_batches = 1`, the second keeping 64 single-input "
        "upstream requests in flight. `batches` is what the batcher of the server wrk hit "
        "dispatched in the measured run (for a gateway: its upstream calls); `upstream req "
        "(metric)` and `new upstream conns` are the gateway's "
        "`tidegate_upstream_requests_total` and `tidegate_upstream_connections_opened_total` "
        "over the same run.",
        "",
    ]
    if wrk:
        lines += ["wrk (first run shown; the others differ in -c and URL):", "", "```",
                  shlex.join(wrk), "```", ""]
    lines += _servers(results)
    lines += [
        "| " + " | ".join(_HEADER) + " |",
        "|---|---|" + "---:|" * (len(_HEADER) - 2),
        *("| " + " | ".join(_row(results, run)) + " |" for run in results.runs),
        "",
        "### Upstream connection reuse",
        "",
        "From each gateway's `/metrics` after all its runs (warm-ups included): "
        "`tidegate_upstream_connections_opened_total` and `tidegate_upstream_requests_total`, "
        "summed over replicas, and the batches the gateway dispatched (one upstream call each). "
        "reuse = 1 - opened / requests, where requests is the smaller of the metric and the "
        "batches: with several upstream requests in flight the metric has been seen to count "
        "more than were sent, which would flatter reuse. `reuse gauge` is the gateway's own "
        "`tidegate_upstream_connection_reuse_ratio`. The target (viii) applies to the two "
        "`max_batch_size = 64` gateways; the baselines are shown for information.",
        "",
        *_reuse_lines(results),
    ]
    lines += [f"- **{c.verdict}** ({c.key}) {c.title}: {c.measured} [{c.target}]" for c in checks]
    parallel = results.run(Upstream.MINILM, Route.GATEWAY_NOBATCH_PARALLEL, 64)
    batched = results.run(Upstream.MINILM, Route.GATEWAY, 64)
    if parallel and batched and parallel.requests_per_s > 0:
        lines.append(
            f"- (info) coalescing vs a plain proxy with 64 upstream requests in flight: "
            f"{batched.requests_per_s / parallel.requests_per_s:.2f}x "
            f"({batched.requests_per_s:.1f} vs {parallel.requests_per_s:.1f} req/s)"
        )
    return [*lines, ""]
