"""Overload soak: ``python -m bench.soak`` (also the ``soak`` section of
``python -m bench.run_all``, run with ``--all`` or ``--only soak``).

For embeddings (the bundled MiniLM, one short sentence per request) and for generation
(non-streamed completions, ``max_tokens`` 16, from the random-weight GPT-2 of
``bench.tiny_gpt2``), each against its own server with a small bounded queue
(``max_queue_items`` / ``max_waiting``), bounded in time too (``max_queue_wait_ms``:
:data:`QUEUE_WAIT_MS`, or ``--queue-wait-ms``):

1. **capacity**: on a server without the bound in time, a closed-loop run (wrk at 64
   connections for embeddings; as many clients as decode slots for generation) gives
   requests/s (2xx only) and the service time; then the soak's server starts, with it;
2. **warm-up**: a closed-loop run of the same shape (the recovery's baseline), then a 60 s
   open-loop burst at the soak rate (so the refusal path and the connection pool have been
   exercised and the connections the overload needs are open), then the server's RSS;
3. **soak**: an open-loop load (``bench.open_loop``: a fixed arrival rate, new connections as
   needed) at 4x capacity for ``--soak-s`` seconds (default 60);
4. **recovery**: as soon as the last soak request is sent, a closed-loop load of the pre-soak
   shape; its 2xx per second over the first seconds;
5. RSS again once the server is idle, and the server log scanned for error lines.

Checks: only 2xx and 429/503 (every 429/503 with ``Retry-After``); the admitted requests' p99
latency (from each request's due time) within the queue bound's drain time,
``min(queue bound / capacity, max_queue_wait_ms) + service time`` (service time: one batch's
mean compute time for embeddings, one request's mean latency at capacity for generation); RSS
after the soak within 5% of RSS after the warm-up; no error lines in the server log; the
recovery load reaches 0.9x its pre-soak throughput within 5 s.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import enum
import os
import re
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from bench.http_load import (
    EMBEDDINGS_PATH,
    HOST,
    ServerProcess,
    run_on_uvloop,
    run_wrk,
    write_bodies,
)
from bench.open_loop import (
    LoadRecord,
    Pool,
    closed_loop,
    encode_posts,
    open_loop,
    percentile,
)
from bench.report import Check
from bench.serving import raise_fd_limit, read_metrics, rss_kib, sum_samples, tidegate_from_toml
from bench.workload import embedding_bodies, make_sentences

__all__ = [
    "SoakResults",
    "SoakRun",
    "SoakSettings",
    "SoakWorkload",
    "format_soak",
    "run_soak",
    "soak_checks",
    "soak_markdown",
]

EMBEDDING_MODEL = "all-minilm-l6-v2"
GENERATION_MODEL = "bench-gpt2"
COMPLETIONS_PATH = "/v1/completions"
EMBEDDING_QUEUE = 1024
EMBEDDING_CLIENTS = 64
GENERATION_SEQS = 16
GENERATION_QUEUE = 128
GENERATION_MAX_TOKENS = 16
RECOVERY_WITHIN_S = 5
RECOVERY_FRACTION = 0.9
RSS_TOLERANCE = 0.05
_BODIES = 1024
_RSS_SAMPLES = 5
_ERROR_LINE = re.compile(r"(^|\s)(ERROR|CRITICAL)[:\s]|Traceback")


class SoakWorkload(enum.StrEnum):
    EMBEDDINGS = "embeddings"
    GENERATION = "generation"


QUEUE_WAIT_MS = {SoakWorkload.EMBEDDINGS: 300.0, SoakWorkload.GENERATION: 150.0}
"""Each workload's ``max_queue_wait_ms`` on the soak's server, as a deployment would set it:
above the latency of a closed loop at capacity (a request waits for about one batch and
computes in the next: p99 90 to 175 ms for embeddings at 64 connections on 2 Zen 4 cores, whose
mean batch compute ran from 28 to 130 ms in different hours), or the bound refuses what the
model would serve and clients that retry at once (wrk, the recovery load) meet mostly
refusals; at 3 mean batch times (102 ms) a 64-client closed loop fell from 938 to 127 req/s.
The queues in items (``EMBEDDING_QUEUE``, ``GENERATION_QUEUE``) are sized to drain slower
than this, as memory guards, so that the bound in time is the one the soak tests."""


@dataclass(frozen=True, kw_only=True, slots=True)
class SoakSettings:
    workloads: tuple[SoakWorkload, ...] = tuple(SoakWorkload)
    soak_s: float = 60.0
    overload: float = 4.0
    """Arrival rate as a multiple of the measured capacity."""
    rate: float | None = None
    """A fixed arrival rate (requests/s) instead of ``overload`` x capacity."""
    capacity_s: int = 10
    warmup_s: int = 3
    burst_s: float = 60.0
    """The warm-up's open-loop burst at the soak rate, long enough for the server's memory to
    reach the overload's high-water mark (the connections and requests in flight at its peak:
    ~8.5 KiB per connection, kept by the allocator after it closes). Repeated 20 s rounds at
    4,800 req/s grew RSS by 3.4 and 4.3 MB, then by 0.3-0.4 MB a round; with a 2 s burst the
    soak ended 8-10% above the warm-up, with 10 s, 3-5%. With ``max_queue_wait_ms`` the
    batches come in many more shapes and the plateau comes later: 20 s rounds at 3,500 req/s
    grew RSS by 21, 7, 1.4 and 0.1 MB (``MALLOC_ARENA_MAX=2``), and after a 30 s burst the
    embeddings soak still ended 5.4% above the warm-up."""
    recovery_s: int = 8
    drain_timeout_s: float = 30.0
    max_connections: int = 2000
    queue_wait_ms: float | None = None
    """Bound every workload's queue in time to this (``max_queue_wait_ms`` of the batcher, or
    of the generation engine), 0 for no bound in time; ``None``: :data:`QUEUE_WAIT_MS`."""
    threads: int | None = None
    """The model's compute threads (``intra_op_threads``); default: the engine's own."""
    pipeline_process: bool | None = None
    """Generation: ``[models.generation] pipeline_process`` (None: unset, tidegate decides)."""
    malloc_arena_max: int | None = 2
    """``MALLOC_ARENA_MAX`` in the servers' environment (README, "Memory under a varied
    load"); ``None``: as inherited."""


    def wait_ms(self, workload: SoakWorkload) -> float | None:
        """The soak server's ``max_queue_wait_ms`` for ``workload``, ``None`` for none."""
        wait = QUEUE_WAIT_MS[workload] if self.queue_wait_ms is None else self.queue_wait_ms
        return wait or None


@dataclass(frozen=True, kw_only=True, slots=True)
class SoakRun:
    workload: SoakWorkload
    server: ServerProcess
    queue_key: str
    queue_bound: int
    capacity_rps: float
    capacity_how: str
    service_s: float
    service_how: str
    baseline_rps: float
    """The recovery load's own closed-loop throughput before the soak."""
    queue_wait_s: float | None = None
    """The queue's bound in time (``max_queue_wait_ms``), if the server has one."""
    recovery_clients: int
    rate: float
    soak_s: float
    issued: int
    issue_s: float
    max_lag_s: float
    max_open: int
    max_backlog: int
    statuses: dict[int, int]
    """Responses by status; 0: connection failed or lost, -1: unanswered at the drain timeout."""
    refused_without_retry_after: int
    admitted_p50_ms: float | None
    admitted_p99_ms: float | None
    admitted_max_ms: float | None
    refused_p99_ms: float | None
    admitted_sent_p99_ms: float | None
    """The admitted requests' p99 from when their bytes were written (the client's own delay
    in sending left out): reported beside the check, which counts from the due time."""
    send_lag_p99_ms: float | None
    """How late the client wrote requests, p99 (it shares the CPU with the server)."""
    rss_start_kib: int
    rss_warm_kib: int
    rss_after_kib: int
    error_lines: int
    first_error_line: str | None
    recovery_per_s: list[int]

    @property
    def bound_s(self) -> float:
        """Drain time of a full queue at capacity (or the queue's bound in time, if smaller),
        plus the service time of the request itself."""
        drain_s = self.queue_bound / self.capacity_rps
        if self.queue_wait_s is not None:
            drain_s = min(drain_s, self.queue_wait_s)
        return drain_s + self.service_s

    @property
    def admitted(self) -> int:
        return sum(n for status, n in self.statuses.items() if 200 <= status < 300)

    @property
    def refused(self) -> int:
        return self.statuses.get(429, 0) + self.statuses.get(503, 0)

    @property
    def allowed(self) -> int:
        """2xx, and 429/503 with ``Retry-After``."""
        return self.admitted + self.refused - self.refused_without_retry_after

    @property
    def recovered_at_s(self) -> int | None:
        """The first whole second (1-based) whose 2xx reach 0.9x the pre-soak throughput."""
        if self.baseline_rps <= 0:
            return None
        for second, count in enumerate(self.recovery_per_s, start=1):
            if count >= RECOVERY_FRACTION * self.baseline_rps:
                return second
        return None


@dataclass(slots=True)
class SoakResults:
    settings: SoakSettings
    runs: list[SoakRun] = field(default_factory=list)
    errors: dict[SoakWorkload, str] = field(default_factory=dict)

    def run(self, workload: SoakWorkload) -> SoakRun | None:
        return next((r for r in self.runs if r.workload is workload), None)


# -- measuring -------------------------------------------------------------------------------


def _port(server: ServerProcess) -> int:
    return int(server.base_url.rsplit(":", 1)[1])


def _pid(server: ServerProcess) -> int:
    if server.pid is None:
        raise LookupError("the soak needs the server's pid")
    return server.pid


async def _settled_rss(pid: int) -> int:
    samples = []
    for _ in range(_RSS_SAMPLES):
        samples.append(rss_kib(pid))
        await asyncio.sleep(0.2)
    return int(statistics.median(samples))


def _throughput(record: LoadRecord, start: float, seconds: float) -> float:
    return sum(record.per_second(start, int(seconds))) / int(seconds)


def _scan_log(path: Path) -> tuple[int, str | None]:
    lines = [line for line in path.read_text(errors="replace").splitlines()
             if _ERROR_LINE.search(line)]
    return len(lines), (lines[0][:300] if lines else None)


@dataclass(frozen=True, kw_only=True, slots=True)
class _Target:
    """What the soak phases need to know about one prepared server."""

    workload: SoakWorkload
    server: ServerProcess
    requests: list[bytes]
    clients: int
    queue_key: str
    queue_bound: int
    capacity_rps: float
    capacity_how: str
    service_s: float
    service_how: str
    rss_start_kib: int
    queue_wait_s: float | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class _Soaked:
    pool: Pool
    rate: float
    issue_s: float
    max_lag_s: float
    baseline_rps: float
    rss_warm_kib: int
    rss_after_kib: int
    recovery_per_s: list[int]


async def _phases(target: _Target, settings: SoakSettings) -> _Soaked:
    port, pid = _port(target.server), _pid(target.server)
    # the recovery load's own throughput before the soak, on the soak's server
    record, start = await closed_loop(port, target.requests, clients=target.clients,
                                      duration_s=settings.capacity_s)
    baseline = _throughput(record, start, settings.capacity_s)
    print(f"  pre-soak closed loop ({target.clients} clients, this generator): "
          f"{baseline:.1f} req/s", flush=True)
    rate = settings.rate or settings.overload * target.capacity_rps
    if settings.burst_s > 0:
        burst = await open_loop(port, target.requests, rate=rate, duration_s=settings.burst_s,
                                max_connections=settings.max_connections)
        await burst.pool.drain(settings.drain_timeout_s)
        burst.pool.close()
    await asyncio.sleep(0.5)
    rss_warm = await _settled_rss(pid)
    print(f"  RSS after warm-up {rss_warm} KiB; soak at {rate:.1f} req/s for "
          f"{settings.soak_s:g} s", flush=True)
    soak = await open_loop(port, target.requests, rate=rate, duration_s=settings.soak_s,
                           max_connections=settings.max_connections)
    # Recovery starts the moment arrivals stop, while the soak's last requests still drain.
    _, (recovery, recovery_start) = await asyncio.gather(
        soak.pool.drain(settings.drain_timeout_s),
        closed_loop(port, target.requests, clients=target.clients,
                    duration_s=settings.recovery_s),
    )
    soak.pool.close()
    await asyncio.sleep(0.5)
    rss_after = await _settled_rss(pid)
    return _Soaked(
        pool=soak.pool, rate=rate, issue_s=soak.end - soak.start, max_lag_s=soak.max_lag_s,
        baseline_rps=baseline, rss_warm_kib=rss_warm, rss_after_kib=rss_after,
        recovery_per_s=recovery.per_second(recovery_start, settings.recovery_s),
    )


def _summarize(target: _Target, soaked: _Soaked, settings: SoakSettings) -> SoakRun:
    record = soaked.pool.record
    statuses = collections.Counter(record.status)
    refused_plain = sum(
        1 for status, retry in zip(record.status, record.retry_after, strict=True)
        if status in (429, 503) and not retry
    )
    admitted = record.latencies_s(statuses=lambda s: 200 <= s < 300)
    refused = record.latencies_s(statuses=lambda s: s in (429, 503))
    errors, first_error = _scan_log(target.server.log_path)

    def ms(value: float | None) -> float | None:
        return value * 1000 if value is not None else None

    return SoakRun(
        workload=target.workload, server=target.server, queue_key=target.queue_key,
        queue_wait_s=target.queue_wait_s,
        queue_bound=target.queue_bound, capacity_rps=target.capacity_rps,
        capacity_how=target.capacity_how, service_s=target.service_s,
        service_how=target.service_how, baseline_rps=soaked.baseline_rps,
        recovery_clients=target.clients, rate=soaked.rate, soak_s=settings.soak_s,
        issued=len(record), issue_s=soaked.issue_s, max_lag_s=soaked.max_lag_s,
        max_open=soaked.pool.max_open, max_backlog=soaked.pool.max_backlog,
        statuses=dict(sorted(statuses.items())), refused_without_retry_after=refused_plain,
        admitted_p50_ms=ms(percentile(admitted, 0.50)),
        admitted_p99_ms=ms(percentile(admitted, 0.99)),
        admitted_max_ms=ms(max(admitted, default=None)),
        refused_p99_ms=ms(percentile(refused, 0.99)),
        admitted_sent_p99_ms=ms(percentile(
            record.from_sent_s(statuses=lambda s: 200 <= s < 300), 0.99)),
        send_lag_p99_ms=ms(percentile(record.send_lags_s(), 0.99)),
        rss_start_kib=target.rss_start_kib, rss_warm_kib=soaked.rss_warm_kib,
        rss_after_kib=soaked.rss_after_kib, error_lines=errors, first_error_line=first_error,
        recovery_per_s=soaked.recovery_per_s,
    )


def _soak(target: _Target, settings: SoakSettings) -> SoakRun:
    run = _summarize(target, run_on_uvloop(_phases(target, settings)), settings)
    print(f"  soak: {run.issued} requests, statuses {run.statuses}, admitted p99 "
          f"{run.admitted_p99_ms or 0:.1f} ms (bound {run.bound_s * 1000:.1f} ms), RSS "
          f"{run.rss_warm_kib} -> {run.rss_after_kib} KiB, recovery/s {run.recovery_per_s}",
          flush=True)
    return run


def _embeddings_toml(queue_wait_ms: float | None, threads: int | None) -> str:
    wait = "" if queue_wait_ms is None else f"max_queue_wait_ms = {queue_wait_ms:g}\n"
    threads_line = "" if threads is None else f"intra_op_threads = {threads}\n"
    return (
        f'[server]\nhost = "{HOST}"\nlog_level = "info"\n\n'
        f'[[models]]\nid = "{EMBEDDING_MODEL}"\nruntime = "embedding"\n{threads_line}'
        f"[models.batching]\nmax_queue_items = {EMBEDDING_QUEUE}\n{wait}"
    )


def _batch_compute(base_url: str) -> tuple[float | None, float | None]:
    samples = read_metrics(base_url)
    return (sum_samples(samples, "tidegate_batch_compute_seconds_sum", model=EMBEDDING_MODEL),
            sum_samples(samples, "tidegate_batch_compute_seconds_count", model=EMBEDDING_MODEL))


def _soak_embeddings(settings: SoakSettings, workdir: Path) -> SoakRun:
    bodies = embedding_bodies(EMBEDDING_MODEL, make_sentences(_BODIES))
    bodies_path = write_bodies(workdir / "soak-embeddings.jsonl", bodies)
    capacity_toml = _embeddings_toml(None, settings.threads)
    with tidegate_from_toml(capacity_toml, workdir=workdir,
                            name="soak-embeddings-capacity") as server:
        if settings.warmup_s > 0:
            run_wrk(server.embeddings_url, bodies_path, connections=EMBEDDING_CLIENTS,
                    duration_s=settings.warmup_s)
        sum_before, count_before = _batch_compute(server.base_url)
        wrk = run_wrk(server.embeddings_url, bodies_path, connections=EMBEDDING_CLIENTS,
                      duration_s=settings.capacity_s)
        sum_after, count_after = _batch_compute(server.base_url)
        if None in (sum_before, count_before, sum_after, count_after):
            raise RuntimeError("the server's /metrics has no tidegate_batch_compute_seconds")
        batches = (count_after or 0) - (count_before or 0)
        compute_s = ((sum_after or 0) - (sum_before or 0)) / batches if batches else 0.0
        print(f"  capacity (wrk, {EMBEDDING_CLIENTS} connections): {wrk.ok_per_s:.1f} 2xx/s "
              f"({wrk.non_2xx} refused), p99 {wrk.p99_ms:.1f} ms, mean batch compute "
              f"{compute_s * 1000:.1f} ms", flush=True)
    wait_ms = settings.wait_ms(SoakWorkload.EMBEDDINGS)
    toml = _embeddings_toml(wait_ms, settings.threads)
    with tidegate_from_toml(toml, workdir=workdir, name="soak-embeddings") as server:
        target = _Target(
            workload=SoakWorkload.EMBEDDINGS, server=server,
            requests=encode_posts(EMBEDDINGS_PATH, _port(server), bodies),
            clients=EMBEDDING_CLIENTS, queue_key="max_queue_items", queue_bound=EMBEDDING_QUEUE,
            capacity_rps=wrk.ok_per_s,
            capacity_how=f"wrk, {EMBEDDING_CLIENTS} connections, {settings.capacity_s} s, 2xx "
                         f"only",
            service_s=compute_s, service_how="mean batch compute time at capacity (/metrics)",
            rss_start_kib=rss_kib(_pid(server)),
            queue_wait_s=None if wait_ms is None else wait_ms / 1000,
        )
        return _soak(target, settings)


def _completion_bodies() -> list[bytes]:
    prompts = make_sentences(256)
    return [
        orjson.dumps({"model": GENERATION_MODEL, "prompt": prompt,
                      "max_tokens": GENERATION_MAX_TOKENS, "temperature": 1.0, "seed": seed})
        for seed, prompt in enumerate(prompts)
    ]


def _soak_generation(settings: SoakSettings, workdir: Path) -> SoakRun:
    from bench.generation import render_config  # torch and transformers only when needed
    from bench.tiny_gpt2 import build_tiny_gpt2

    model = build_tiny_gpt2(workdir / "soak-gpt2")
    print(f"  model: {model.describe()}", flush=True)

    def config(wait_ms: float | None) -> str:
        wait: dict[str, float] = {} if wait_ms is None else {"max_queue_wait_ms": wait_ms}
        return render_config(model.path, model_id=GENERATION_MODEL,
                             max_num_seqs=GENERATION_SEQS, max_waiting=GENERATION_QUEUE,
                             threads=settings.threads,
                             pipeline_process=settings.pipeline_process, **wait)

    with tidegate_from_toml(config(None), workdir=workdir,
                            name="soak-generation-capacity") as server:
        requests = encode_posts(COMPLETIONS_PATH, _port(server), _completion_bodies())

        async def capacity() -> tuple[LoadRecord, float]:
            if settings.warmup_s > 0:
                await closed_loop(_port(server), requests, clients=GENERATION_SEQS,
                                  duration_s=settings.warmup_s)
            return await closed_loop(_port(server), requests, clients=GENERATION_SEQS,
                                     duration_s=settings.capacity_s)

        record, start = run_on_uvloop(capacity())
        rps = _throughput(record, start, settings.capacity_s)
        latencies = record.latencies_s(statuses=lambda s: 200 <= s < 300)
        service_s = statistics.fmean(latencies) if latencies else 0.0
        print(f"  capacity ({GENERATION_SEQS} clients): {rps:.1f} req/s, mean latency "
              f"{service_s * 1000:.1f} ms", flush=True)
    wait_ms = settings.wait_ms(SoakWorkload.GENERATION)
    with tidegate_from_toml(config(wait_ms), workdir=workdir, name="soak-generation") as server:
        target = _Target(
            workload=SoakWorkload.GENERATION, server=server,
            requests=encode_posts(COMPLETIONS_PATH, _port(server), _completion_bodies()),
            clients=GENERATION_SEQS, queue_key="max_waiting", queue_bound=GENERATION_QUEUE,
            capacity_rps=rps,
            capacity_how=f"{GENERATION_SEQS} closed-loop clients (= max_num_seqs), "
                         f"{settings.capacity_s} s",
            service_s=service_s, service_how="mean request latency at capacity",
            rss_start_kib=rss_kib(_pid(server)),
            queue_wait_s=None if wait_ms is None else wait_ms / 1000,
        )
        return _soak(target, settings)


_RUNNERS = {SoakWorkload.EMBEDDINGS: _soak_embeddings, SoakWorkload.GENERATION: _soak_generation}


def run_soak(settings: SoakSettings, workdir: Path) -> SoakResults:
    """Each workload against its own fresh server; a failed workload is recorded, not raised."""
    # Every soak connection is a socket on both ends; children inherit the raised limit.
    raise_fd_limit(settings.max_connections * 2 + 1024)
    if settings.malloc_arena_max is not None:  # the servers inherit it
        os.environ["MALLOC_ARENA_MAX"] = str(settings.malloc_arena_max)
    results = SoakResults(settings=settings)
    for workload in settings.workloads:
        print(f"== soak: {workload.value}", flush=True)
        try:
            results.runs.append(_RUNNERS[workload](settings, workdir))
        except (RuntimeError, LookupError, OSError) as exc:
            results.errors[workload] = f"{type(exc).__name__}: {exc}"
            print(f"  {workload.value} soak failed: {results.errors[workload]}", flush=True)
    return results


# -- checks and report -----------------------------------------------------------------------


_TITLES = {
    "status": ("soak responses are 2xx, or 429/503 with Retry-After",
               "allowed / all = 1.0"),
    "latency": ("admitted p99 vs queue bound / capacity + service time",
                "p99 / bound <= 1.0"),
    "rss": ("server RSS after the soak vs after the warm-up",
            f"ratio within 1 +- {RSS_TOLERANCE:.2f}"),
    "log": ("error lines in the server log", "count = 0"),
    "recovery": (f"best 1-s throughput in the first {RECOVERY_WITHIN_S} s after the soak vs "
                 "pre-soak", f"ratio >= {RECOVERY_FRACTION}"),
}
_PREFIX = {SoakWorkload.EMBEDDINGS: "se", SoakWorkload.GENERATION: "sg"}


def _check(workload: SoakWorkload, number: int, name: str, *, measured: str | None = None,
           ratio: float | None = None, passed: bool | None = None) -> Check:
    title, target = _TITLES[name]
    key = f"{_PREFIX[workload]}{number}"
    title = f"{workload.value} soak: {title}"
    if measured is None:
        return Check(key=key, title=title, target=target)
    return Check(key=key, title=title, target=target, measured=measured, ratio=ratio,
                 passed=passed)


def _run_checks(run: SoakRun) -> list[Check]:
    w = run.workload
    others = {s: n for s, n in run.statuses.items()
              if not (200 <= s < 300 or s in (429, 503))}
    total = sum(run.statuses.values())
    status_ratio = run.allowed / total if total else 0.0
    status_text = (f"{run.admitted} 2xx, {run.refused} 429/503 "
                   f"({run.refused_without_retry_after} without Retry-After), other {others}")
    checks = [_check(w, 1, "status", measured=status_text, ratio=status_ratio,
                     passed=status_ratio == 1.0)]
    if run.admitted_p99_ms is None:
        checks.append(_check(w, 2, "latency", measured="no request admitted", passed=False))
    else:
        bound_ms = run.bound_s * 1000
        drain = f"{run.queue_bound} / {run.capacity_rps:.1f} req/s"
        if run.queue_wait_s is not None and run.queue_wait_s < run.queue_bound / run.capacity_rps:
            drain = f"max_queue_wait_ms {run.queue_wait_s * 1000:g} ms"
        bound_text = (f"p99 {run.admitted_p99_ms:.1f} ms vs {bound_ms:.1f} ms = {drain} + "
                      f"{run.service_s * 1000:.1f} ms")
        checks.append(_check(w, 2, "latency", measured=bound_text,
                             ratio=run.admitted_p99_ms / bound_ms,
                             passed=run.admitted_p99_ms <= bound_ms))
    rss_ratio = run.rss_after_kib / run.rss_warm_kib
    checks.append(_check(w, 3, "rss", measured=f"{run.rss_warm_kib} -> {run.rss_after_kib} KiB",
                         ratio=rss_ratio, passed=abs(rss_ratio - 1) <= RSS_TOLERANCE))
    log_text = f"{run.error_lines} lines" + (
        f", first: {run.first_error_line}" if run.first_error_line else "")
    checks.append(_check(w, 4, "log", measured=log_text, ratio=float(run.error_lines),
                         passed=run.error_lines == 0))
    first = run.recovery_per_s[:RECOVERY_WITHIN_S]
    best = max(first, default=0)
    ratio = best / run.baseline_rps if run.baseline_rps > 0 else 0.0
    at = run.recovered_at_s
    recovery_text = (f"2xx per second {first} vs {run.baseline_rps:.1f} req/s before; "
                     + (f"0.9x reached in second {at}" if at is not None else "0.9x not reached"))
    checks.append(_check(w, 5, "recovery", measured=recovery_text, ratio=ratio,
                         passed=ratio >= RECOVERY_FRACTION))
    return checks


def soak_checks(results: SoakResults | None) -> list[Check]:
    """Five checks per workload (SKIP where the workload was not run)."""
    checks: list[Check] = []
    for workload in SoakWorkload:
        run = results.run(workload) if results is not None else None
        if run is None:
            checks += [_check(workload, n, name) for n, name in enumerate(_TITLES, start=1)]
        else:
            checks += _run_checks(run)
    return checks


def _opt(value: float | None, digits: int = 1) -> str:
    return f"{value:.{digits}f}" if value is not None else "-"


_HEADER = ["workload", "queue bound", "capacity req/s", "rate req/s", "sent", "send s",
           "2xx", "429/503", "other", "admitted p50 ms", "admitted p99 ms", "bound ms",
           "refused p99 ms", "admitted p99 from send ms", "send lag p99 ms", "max conns",
           "RSS warm KiB", "RSS after KiB", "error lines",
           "recovery 2xx/s"]


def _queue_text(run: SoakRun) -> str:
    text = f"{run.queue_key} {run.queue_bound}"
    if run.queue_wait_s is not None:
        text += f", max_queue_wait_ms {run.queue_wait_s * 1000:g}"
    return text


def _row(run: SoakRun) -> list[str]:
    other = sum(n for s, n in run.statuses.items() if not (200 <= s < 300 or s in (429, 503)))
    return [
        run.workload.value, _queue_text(run), f"{run.capacity_rps:.1f}",
        f"{run.rate:.1f}", str(run.issued), f"{run.issue_s:.1f}", str(run.admitted),
        str(run.refused), str(other), _opt(run.admitted_p50_ms), _opt(run.admitted_p99_ms),
        f"{run.bound_s * 1000:.1f}", _opt(run.refused_p99_ms), _opt(run.admitted_sent_p99_ms),
        _opt(run.send_lag_p99_ms), str(run.max_open),
        str(run.rss_warm_kib), str(run.rss_after_kib), str(run.error_lines),
        " ".join(str(n) for n in run.recovery_per_s),
    ]


def format_soak(results: SoakResults) -> str:
    lines = []
    for run in results.runs:
        lines.append("  ".join(f"{h}: {c}" for h, c in zip(_HEADER, _row(run), strict=True)))
        lines.append(f"  statuses {run.statuses}; scheduler lag max {run.max_lag_s * 1000:.1f} ms, "
                     f"client backlog max {run.max_backlog}; RSS at start {run.rss_start_kib} KiB")
    for workload, error in results.errors.items():
        lines.append(f"{workload.value}: failed: {error}")
    return "\n".join(lines)


def _command(settings: SoakSettings) -> str:
    args = ["python", "-m", "bench.soak", "--soak-s", f"{settings.soak_s:g}"]
    if settings.rate is not None:
        args += ["--rate", f"{settings.rate:g}"]
    if len(settings.workloads) == 1:
        args += ["--only", settings.workloads[0].value]
    if settings.queue_wait_ms is not None:
        args += ["--queue-wait-ms", f"{settings.queue_wait_ms:g}"]
    if settings.threads is not None:
        args += ["--threads", str(settings.threads)]
    if settings.pipeline_process is not None:
        args += ["--pipeline-process", str(settings.pipeline_process).lower()]
    if settings.malloc_arena_max != 2:
        args += ["--malloc-arena-max", str(settings.malloc_arena_max or 0)]
    return shlex.join(args)


def _wait_text(settings: SoakSettings) -> str:
    if settings.queue_wait_ms is None:
        return " / ".join(f"{QUEUE_WAIT_MS[w]:g} ({w.value})" for w in settings.workloads)
    return f"{settings.queue_wait_ms:g}" if settings.queue_wait_ms else "unset"


def soak_markdown(results: SoakResults, checks: list[Check]) -> list[str]:
    settings = results.settings
    lines = [
        "## Overload soak (open loop, bounded queue)",
        "",
        f"Command: `{_command(settings)}` (or `python -m bench.run_all --only soak`). Per "
        "workload: capacity (and the service time) from a closed-loop run on a server without "
        "a bound in time; then a fresh server with `max_queue_wait_ms` "
        f"{_wait_text(settings)}; on it a warm-up of the same "
        f"requests (closed loop, the recovery's baseline, then a {settings.burst_s:g} s "
        "open-loop burst at the soak rate); then an **open-loop** load "
        "(`bench/open_loop.py`: request *i* is sent at t0 + i / rate whatever the answers, "
        f"on keep-alive connections opened as needed, at most {settings.max_connections}) "
        f"at {settings.overload:g}x capacity for "
        f"{settings.soak_s:g} s; the moment arrivals stop, a closed-loop load of the pre-soak "
        "shape, counted per second. Latency runs from each request's due time, so time spent "
        "waiting in the client counts. Embeddings: MiniLM, one ~12-word sentence per request. "
        f"Generation: non-streamed completions (`max_tokens` {GENERATION_MAX_TOKENS}) from the "
        "random-weight GPT-2 of `bench/tiny_gpt2.py`. The latency bound is the drain time of "
        "a full queue, `min(queue bound / capacity, max_queue_wait_ms) + service time` "
        "(service time: one batch's mean compute for embeddings, one request's mean latency "
        "at capacity for generation). RSS is `VmRSS` of the server process and its children "
        "(an OpenVINO GenAI model's pipeline runs in one), median of 5 reads with the server "
        "idle; the servers run with "
        + (f"`MALLOC_ARENA_MAX={settings.malloc_arena_max}`" if settings.malloc_arena_max
           else "the environment's `MALLOC_ARENA_MAX`")
        + " (README, \"Memory under a varied load\").",
        "",
        "| " + " | ".join(_HEADER) + " |",
        "|---|---|" + "---:|" * (len(_HEADER) - 3) + "---|",
        *("| " + " | ".join(_row(run)) + " |" for run in results.runs),
        "",
    ]
    for run in results.runs:
        lines += [
            f"{run.workload.value}: capacity from {run.capacity_how}; service time: "
            f"{run.service_how}; recovery load {run.recovery_clients} closed-loop clients "
            f"({run.baseline_rps:.1f} req/s before the soak); statuses {run.statuses}. Server:",
            "", "```", shlex.join(run.server.command), "```", "",
        ]
        if run.server.config_text:
            lines += ["```toml", run.server.config_text.rstrip(), "```", ""]
    for workload, error in results.errors.items():
        lines += [f"{workload.value}: not measured: {error}.", ""]
    lines += [f"- **{c.verdict}** ({c.key}) {c.title}: {c.measured} [{c.target}]" for c in checks]
    return [*lines, ""]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--soak-s", type=float, default=60.0,
                        help="seconds of open-loop overload (default 60)")
    parser.add_argument("--rate", type=float,
                        help="arrival rate in requests/s (default: 4x the measured capacity)")
    parser.add_argument("--only", choices=[w.value for w in SoakWorkload],
                        help="run one workload (default: both)")
    parser.add_argument("--capacity-s", type=int, default=10,
                        help="seconds of the closed-loop capacity run (default 10)")
    parser.add_argument("--queue-wait-ms", type=float,
                        help="bound both queues in time to this (max_queue_wait_ms, in "
                             "[models.batching] or [models.generation]; 0: no bound in time); "
                             "default: embeddings 300, generation 150; the latency bound uses "
                             "it if smaller than the queue's drain time")
    parser.add_argument("--pipeline-process", choices=["true", "false"],
                        help="generation: run OpenVINO GenAI's pipeline in a child process or "
                             "not ([models.generation] pipeline_process; default: unset)")
    parser.add_argument("--threads", type=int,
                        help="the model's compute threads (intra_op_threads; default: the "
                             "engine's own, one per core)")
    parser.add_argument("--malloc-arena-max", type=int, default=2,
                        help="MALLOC_ARENA_MAX in the servers' environment (default 2; 0: as "
                             "inherited)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.soak_s <= 0 or (args.rate is not None and args.rate <= 0) or args.capacity_s < 1:
        raise SystemExit("--soak-s and --rate must be positive, --capacity-s at least 1")
    if args.queue_wait_ms is not None and args.queue_wait_ms < 0:
        raise SystemExit("--queue-wait-ms must be 0 (no bound in time) or more")
    if args.threads is not None and args.threads < 1:
        raise SystemExit("--threads must be at least 1")
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    workloads = (SoakWorkload(args.only),) if args.only else tuple(SoakWorkload)
    settings = SoakSettings(workloads=workloads, soak_s=args.soak_s, rate=args.rate,
                            capacity_s=args.capacity_s, queue_wait_ms=args.queue_wait_ms,
                            threads=args.threads, malloc_arena_max=args.malloc_arena_max or None,
                            pipeline_process=(None if args.pipeline_process is None
                                              else args.pipeline_process == "true"))
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tidegate-soak-") as tmp:
        results = run_soak(settings, Path(tmp))
    print(format_soak(results))
    prefixes = tuple(_PREFIX[w] for w in workloads)
    for check in soak_checks(results):
        if not check.key.startswith(prefixes):
            continue
        ratio = f"{check.ratio:.2f}" if check.ratio is not None else "-"
        print(f"{check.verdict} ({check.key}) {check.title}: ratio {ratio} [{check.target}]; "
              f"{check.measured}")
    print(f"took {time.perf_counter() - started:.0f} s")
    return 0 if not results.errors else 1


if __name__ == "__main__":
    sys.exit(main())
