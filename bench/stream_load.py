"""Streamed completions against a running server: throughput and memory per idle stream.

* :func:`measure_streams`: N clients each keep one ``stream: true`` completion open at all
  times, back to back, for a fixed window after a warm-up. Aggregate tokens/s counts the text
  chunks that arrived inside the window, scaled by the tokens per chunk the final usage chunks
  report (about 1). Time to first token is measured from the request's first byte sent;
* :func:`measure_idle_memory`: with one decode slot (``max_num_seqs = 1``), one long generation
  runs while N more streams wait for the slot. The server's RSS with only the running stream
  open is subtracted from its RSS with all of them open and divided by N, so the running
  sequence's KV cache is in both and cancels out.

Requests are ``POST /v1/completions`` over the shared prompts (``bench.genai_ceiling.prompts``),
request ``i`` sampled at temperature 1.0 with seed ``i`` and ``ignore_eos``, as the in-process
ceiling does.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from bench.genai_ceiling import MAX_TOKENS, prompts
from bench.http_load import HOST, ServerProcess
from bench.serving import read_metrics, rss_kib, server_pid, sum_samples
from bench.sse_client import SseConnection, StreamRecord, StreamRejected

__all__ = ["COMPLETIONS_PATH", "IDLE_MAX_TOKENS", "IdleMemory", "StreamLoad",
           "measure_idle_memory", "measure_streams"]

COMPLETIONS_PATH = "/v1/completions"
IDLE_MAX_TOKENS = 1500
"""Long enough that the running sequence outlives the time it takes to open the idle ones."""
_T = TypeVar("_T")


@dataclass(frozen=True, kw_only=True, slots=True)
class StreamLoad:
    concurrency: int
    window_s: float
    tokens: float
    streams_completed: int
    streams_started: int
    tokens_per_chunk: float
    ttft_p50_ms: float | None
    ttft_p99_ms: float | None
    errors: int
    server_tokens_per_s: float | None
    """From the server's ``tidegate_generation_tokens_total{kind="completion"}`` over the window."""
    mean_decode_batch: float | None
    mean_step_ms: float | None
    """Mean engine step (prefill and/or decode) over the window, from /metrics."""
    engine_busy: float | None
    """Fraction of the window the engine spent inside steps."""

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.window_s


@dataclass(frozen=True, kw_only=True, slots=True)
class IdleMemory:
    streams: int
    rss_before_kib: int
    rss_after_kib: int
    waiting: float | None
    running: float | None
    all_open: bool
    """The server counted (almost) every stream as waiting or running before RSS was read."""
    opened_s: float
    rss_closed_kib: int
    drained: bool
    errors: int

    @property
    def kib_per_stream(self) -> float:
        return (self.rss_after_kib - self.rss_before_kib) / self.streams


class _Bodies:
    """Completion request bodies over the shared prompts, request ``i`` with seed ``i``, each
    running to ``max_tokens`` (``ignore_eos``)."""

    def __init__(self, model: str, max_tokens: int) -> None:
        self._model = model
        self._prompts = prompts()
        self._max_tokens = max_tokens
        self._next = 0

    def __call__(self) -> dict[str, Any]:
        index = self._next
        self._next += 1
        return {
            "model": self._model, "prompt": self._prompts[index % len(self._prompts)],
            "max_tokens": self._max_tokens, "temperature": 1.0, "seed": index,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True},
        }


def _port(server: ServerProcess) -> int:
    return int(server.base_url.rsplit(":", 1)[1])


async def _metrics(server: ServerProcess, model: str) -> dict[str, float | None]:
    samples = await asyncio.to_thread(read_metrics, server.base_url)
    return {
        "tokens": sum_samples(samples, "tidegate_generation_tokens_total", kind="completion"),
        "batch_sum": sum_samples(samples, "tidegate_generation_decode_batch_size_sum"),
        "batch_count": sum_samples(samples, "tidegate_generation_decode_batch_size_count"),
        "step_sum": sum_samples(samples, "tidegate_generation_step_seconds_sum"),
        "step_count": sum_samples(samples, "tidegate_generation_step_seconds_count"),
        "running": sum_samples(samples, "tidegate_generation_running", model=model),
        "waiting": sum_samples(samples, "tidegate_generation_waiting", model=model),
    }


async def _keep_streaming(
    server: ServerProcess, bodies: _Bodies, records: list[StreamRecord], errors: list[str]
) -> None:
    async with SseConnection(HOST, _port(server)) as connection:
        while True:
            record = StreamRecord(started=time.perf_counter())
            records.append(record)
            try:
                await connection.stream(COMPLETIONS_PATH, bodies(), record)
            except (StreamRejected, OSError, asyncio.IncompleteReadError) as exc:
                errors.append(str(exc))
                await asyncio.sleep(0.05)  # a refusing server is not hammered in a tight loop


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


@dataclass(frozen=True, slots=True)
class _Window:
    """The measured interval and the server's metrics at both ends."""

    start: float
    end: float
    before: dict[str, float | None]
    after: dict[str, float | None]

    def delta(self, key: str) -> float | None:
        a, b = self.after[key], self.before[key]
        return a - b if a is not None and b is not None else None

    def holds(self, moment: float | None) -> bool:
        return moment is not None and self.start <= moment < self.end


def _summarize(
    concurrency: int, records: list[StreamRecord], window: _Window, errors: int
) -> StreamLoad:
    completed = [r for r in records if r.finished is not None and r.completion_tokens is not None]
    chunks_done = sum(len(r.chunk_times) for r in completed)
    tokens_done = sum(r.completion_tokens or 0 for r in completed)
    per_chunk = tokens_done / chunks_done if chunks_done else 1.0
    chunks = sum(1 for r in records for t in r.chunk_times if window.holds(t))
    ttfts = [r.ttft_s * 1000 for r in records if r.ttft_s is not None and window.holds(r.started)]
    seconds = window.end - window.start
    server_tokens = window.delta("tokens")
    batch_sum, batch_count = window.delta("batch_sum"), window.delta("batch_count")
    step_sum, step_count = window.delta("step_sum"), window.delta("step_count")
    return StreamLoad(
        concurrency=concurrency, window_s=seconds, tokens=chunks * per_chunk,
        streams_completed=sum(1 for r in completed if window.holds(r.finished)),
        streams_started=sum(1 for r in records if window.holds(r.started)),
        tokens_per_chunk=per_chunk,
        ttft_p50_ms=_percentile(ttfts, 0.50), ttft_p99_ms=_percentile(ttfts, 0.99),
        errors=errors,
        server_tokens_per_s=server_tokens / seconds if server_tokens is not None else None,
        mean_decode_batch=(
            batch_sum / batch_count if batch_sum is not None and batch_count else None
        ),
        mean_step_ms=step_sum / step_count * 1000 if step_sum is not None and step_count else None,
        engine_busy=step_sum / seconds if step_sum is not None else None,
    )


async def measure_streams(
    server: ServerProcess, concurrency: int, *, model: str, warmup_s: float, duration_s: float
) -> StreamLoad:
    """``concurrency`` clients streaming back to back: warm-up, then the measured window."""
    bodies = _Bodies(model, MAX_TOKENS)
    records: list[StreamRecord] = []
    errors: list[str] = []
    workers = [
        asyncio.create_task(_keep_streaming(server, bodies, records, errors))
        for _ in range(concurrency)
    ]
    try:
        await asyncio.sleep(warmup_s)
        before = await _metrics(server, model)
        start = time.perf_counter()
        await asyncio.sleep(duration_s)
        end = time.perf_counter()
        after = await _metrics(server, model)
    finally:
        for worker in workers:
            worker.cancel()
        outcomes = await asyncio.gather(*workers, return_exceptions=True)
    # A worker that died of anything but its cancellation stopped streaming early: say why.
    errors += [f"worker died: {o!r}" for o in outcomes if isinstance(o, Exception)]
    load = _summarize(concurrency, records, _Window(start, end, before, after), len(errors))
    if errors:
        print(f"    {len(errors)} failed streams, first: {errors[0]}", flush=True)
    return load


async def _wait_for(
    probe: Callable[[], Awaitable[_T]], done: Callable[[_T], bool], *, timeout_s: float
) -> tuple[_T, bool]:
    """Poll ``probe`` (bounded, 4 times a second) until ``done`` holds for its value."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = await probe()
        if done(value) or time.monotonic() >= deadline:
            return value, done(value)
        await asyncio.sleep(0.25)


async def _settled_rss(pid: int) -> int:
    samples = []
    for _ in range(5):
        samples.append(rss_kib(pid))
        await asyncio.sleep(0.2)
    return int(statistics.median(samples))


async def _hold_stream(server: ServerProcess, body: dict[str, Any], record: StreamRecord,
                       errors: list[str], opening: asyncio.Semaphore) -> None:
    async with SseConnection(HOST, _port(server)) as connection:
        try:
            async with opening:  # bounds connects in progress, not open streams
                await connection.connect()
            await connection.stream(COMPLETIONS_PATH, body, record)
        except (StreamRejected, OSError, asyncio.IncompleteReadError) as exc:
            errors.append(str(exc))


async def measure_idle_memory(server: ServerProcess, streams: int, *, model: str) -> IdleMemory:
    """Server RSS per stream waiting for the one decode slot (``max_num_seqs = 1``)."""
    pid = server_pid(server)
    bodies = _Bodies(model, IDLE_MAX_TOKENS)
    warm = _Bodies(model, 8)
    async with SseConnection(HOST, _port(server)) as connection:
        for _ in range(3):  # first-request costs (allocator pools, lazy imports) land before
            await connection.stream(COMPLETIONS_PATH, warm(), StreamRecord(time.perf_counter()))
    errors: list[str] = []
    opening = asyncio.Semaphore(64)
    holders: list[asyncio.Task[None]] = []

    def hold() -> None:
        record = StreamRecord(started=time.perf_counter())
        holders.append(asyncio.create_task(_hold_stream(server, bodies(), record, errors, opening)))

    try:
        hold()  # the running sequence, part of the baseline
        await _wait_for(lambda: _metrics(server, model), lambda m: (m["running"] or 0) >= 1,
                        timeout_s=30)
        before = await _settled_rss(pid)
        opened_at = time.perf_counter()
        for _ in range(streams):
            hold()
        # Sequences that finished meanwhile were replaced from the waiting queue: count open ones.
        metrics, all_open = await _wait_for(
            lambda: _metrics(server, model),
            lambda m: (m["waiting"] or 0) + (m["running"] or 0)
            >= sum(not h.done() for h in holders) > streams * 0.98,
            timeout_s=120,
        )
        opened_s = time.perf_counter() - opened_at
        after = await _settled_rss(pid)
    finally:
        for holder in holders:
            holder.cancel()
        await asyncio.gather(*holders, return_exceptions=True)
    _, drained = await _wait_for(
        lambda: _metrics(server, model),
        lambda m: (m["waiting"] or 0) + (m["running"] or 0) == 0, timeout_s=60,
    )
    return IdleMemory(
        streams=streams, rss_before_kib=before, rss_after_kib=after,
        waiting=metrics["waiting"], running=metrics["running"], all_open=all_open,
        opened_s=opened_s,
        rss_closed_kib=await _settled_rss(pid), drained=drained, errors=len(errors),
    )


