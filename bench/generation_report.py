"""The generation benchmark's target checks, console table and BENCHMARKS.md section."""

from __future__ import annotations

import shlex

from bench.generation import CONCURRENCY, GenerationResults, StreamLoad
from bench.report import Check

__all__ = ["format_generation", "generation_checks", "generation_markdown"]

SPEEDUP_TARGET = 8.0
IDLE_KB_TARGET = 50.0


def _opt(value: float | None, digits: int = 1) -> str:
    return f"{value:.{digits}f}" if value is not None else "-"


def _check_speedup(results: GenerationResults | None) -> Check:
    check = Check(key="v", title="16 concurrent streams vs 1 stream, aggregate tokens/s",
                  target=f"ratio >= {SPEEDUP_TARGET:.0f}")
    one = results.load(1) if results else None
    sixteen = results.load(16) if results else None
    if one is None or sixteen is None or one.tokens_per_s <= 0:
        return check
    ratio = sixteen.tokens_per_s / one.tokens_per_s
    return Check(
        key=check.key, title=check.title, target=check.target, ratio=ratio,
        measured=f"{sixteen.tokens_per_s:.0f} vs {one.tokens_per_s:.0f} tokens/s",
        passed=ratio >= SPEEDUP_TARGET,
    )


def _check_idle_memory(results: GenerationResults | None) -> Check:
    check = Check(key="vi", title="server RSS per open idle (waiting) stream, 1,000 streams",
                  target=f"per stream / {IDLE_KB_TARGET:.0f} KB < 1.0")
    memory = results.memory if results else None
    if memory is None:
        return check
    kb = memory.kib_per_stream * 1.024
    ratio = kb / IDLE_KB_TARGET
    measured = (f"{kb:.1f} KB per stream (RSS {memory.rss_before_kib} -> "
                f"{memory.rss_after_kib} KiB, {memory.streams} streams)")
    if not memory.all_open:
        measured += "; not every stream was open when RSS was read"
    return Check(key=check.key, title=check.title, target=check.target, ratio=ratio,
                 measured=measured, passed=ratio < 1.0 and memory.all_open)


def generation_checks(results: GenerationResults | None) -> list[Check]:
    return [_check_speedup(results), _check_idle_memory(results)]


def _row(load: StreamLoad, single: float | None) -> list[str]:
    speedup = load.tokens_per_s / single if single else None
    return [
        str(load.concurrency), f"{load.tokens_per_s:.0f}", _opt(speedup, 2),
        _opt(load.ttft_p50_ms), _opt(load.ttft_p99_ms), str(load.streams_completed),
        _opt(load.mean_decode_batch), _opt(load.mean_step_ms, 2),
        f"{load.engine_busy:.0%}" if load.engine_busy is not None else "-",
        _opt(load.server_tokens_per_s, 0),
        f"{load.tokens_per_chunk:.3f}", str(load.errors),
    ]


_HEADER = ["streams", "tokens/s", "vs 1 stream", "TTFT p50 ms", "TTFT p99 ms", "completed",
           "decode batch", "step ms", "engine busy", "server tokens/s", "tokens/chunk", "errors"]


def _rows(results: GenerationResults) -> list[list[str]]:
    one = results.load(1)
    single = one.tokens_per_s if one else None
    return [_row(load, single) for load in results.loads]


def format_generation(results: GenerationResults) -> str:
    widths = [max(len(h), 8) for h in _HEADER]
    lines = [" ".join(h.rjust(w) for h, w in zip(_HEADER, widths, strict=True))]
    lines += [" ".join(c.rjust(w) for c, w in zip(row, widths, strict=True))
              for row in _rows(results)]
    return "\n".join(lines)


def _server_block(title: str, command: tuple[str, ...], config: str | None) -> list[str]:
    lines = [title, "", "```", shlex.join(command), "```", ""]
    if config:
        lines += ["```toml", config.rstrip(), "```", ""]
    return lines


def _memory_lines(results: GenerationResults) -> list[str]:
    memory = results.memory
    if memory is None:
        return [f"Not measured: {results.memory_error or 'skipped'}.", ""]
    return [
        "| idle streams | RSS before KiB | RSS all open KiB | KB per stream | waiting | running "
        "| all open | open took s | failed streams | drained after close | RSS after close KiB |",
        "|---:|---:|---:|---:|---:|---:|---|---:|---:|---|---:|",
        f"| {memory.streams} | {memory.rss_before_kib} | {memory.rss_after_kib} | "
        f"{memory.kib_per_stream * 1.024:.1f} | {_opt(memory.waiting, 0)} | "
        f"{_opt(memory.running, 0)} | {memory.all_open} | {memory.opened_s:.1f} | "
        f"{memory.errors} | {memory.drained} | {memory.rss_closed_kib} |",
        "",
    ]


def generation_markdown(results: GenerationResults, checks: list[Check]) -> list[str]:
    lines = [
        "## Generation: streamed completions (continuous batching)",
        "",
        f"Model: {results.model.describe()}, built offline by `bench/tiny_gpt2.py` "
        "(seeded, so every run serves the same weights). Each client keeps one "
        "`POST /v1/completions` stream open at all times (`max_tokens` 64, `temperature` 1.0, "
        "a seed per request, `stream_options.include_usage`), over a keep-alive connection, "
        "for the measured window after a discarded warm-up. `tokens/s` counts text chunks "
        "received inside the window times `tokens/chunk` (completion tokens per text chunk "
        "from the usage chunks; the end-of-sequence token has no text). TTFT runs from the "
        "request's send to its first text chunk, for streams started inside the window. "
        "`decode batch`, `step ms` (mean engine step), `engine busy` (step time / window) and "
        "`server tokens/s` come from the server's `/metrics` over the same window; an engine "
        "busy well below 100% means time goes outside the model steps (HTTP, SSE encoding, "
        f"the client). Streams: {', '.join(str(c) for c in CONCURRENCY)}.",
        "",
        *_server_block("Server:", results.server.command, results.server.config_text),
        "| " + " | ".join(_HEADER) + " |",
        "|" + "---:|" * len(_HEADER),
        *("| " + " | ".join(row) + " |" for row in _rows(results)),
        "",
        "### Server memory per open idle stream",
        "",
        "One decode slot: one stream generates (400 tokens each, so the slot is always busy) "
        "while the others wait in the queue with their connections open and read. RSS "
        "(`VmRSS`) is read (median of 5) with only the running stream open, then with it and "
        "1,000 more, and divided by 1,000: the running sequence's KV cache is in both. KB is "
        "1,000 bytes.",
        "",
    ]
    if results.memory_server is not None:
        lines += _server_block("Server:", results.memory_server.command,
                               results.memory_server.config_text)
    lines += _memory_lines(results)
    lines += [f"- **{c.verdict}** ({c.key}) {c.title}: {c.measured} [{c.target}]" for c in checks]
    return [*lines, ""]
