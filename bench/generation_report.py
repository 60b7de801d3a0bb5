"""The generation benchmark's target checks, console tables and BENCHMARKS.md section."""

from __future__ import annotations

import shlex
from dataclasses import dataclass

from bench.genai_ceiling import MAX_TOKENS, PipelineLoad
from bench.generation import (
    MAX_NUM_SEQS,
    OPENVINO_AUTO,
    OPENVINO_FP32,
    TORCH_FP32,
    GenerationResults,
    HttpRun,
    Serving,
    StreamLoad,
)
from bench.report import Check
from bench.stream_load import IDLE_MAX_TOKENS
from tidegate.engines import Precision

__all__ = ["format_generation", "generation_checks", "generation_markdown"]

ENGINE_TARGET = 2.3
"""OpenVINO (default precision) vs the torch engine (fp32), 16 streams over HTTP."""
CEILING_TARGET = 0.90
"""Over HTTP vs the in-process pipeline, same precision and concurrency."""
IDLE_KB_TARGET = 50.0


def _opt(value: float | None, digits: int = 1) -> str:
    return f"{value:.{digits}f}" if value is not None else "-"


@dataclass(frozen=True, slots=True)
class _Figure:
    """One headline comparison: ``value`` against ``reference``."""

    title: str
    value: float | None
    reference: float | None
    unit: str
    reference_title: str

    @property
    def ratio(self) -> float | None:
        if self.value is None or not self.reference:
            return None
        return self.value / self.reference

    def measured(self) -> str:
        return (f"{_opt(self.value, 1)} vs {_opt(self.reference, 1)} {self.unit} "
                f"({self.reference_title})")


@dataclass(frozen=True, slots=True)
class _Lookup:
    results: GenerationResults | None

    def http(self, serving: Serving, concurrency: int) -> StreamLoad | None:
        return self.results.http(serving, concurrency) if self.results else None

    def in_process(self, precision: Precision, concurrency: int) -> PipelineLoad | None:
        return self.results.in_process(precision, concurrency) if self.results else None


def _tps(load: StreamLoad | PipelineLoad | None) -> float | None:
    return load.tokens_per_s if load is not None else None


def _figures(results: GenerationResults | None) -> dict[str, _Figure]:
    """Every headline comparison (all values None without results: the checks then SKIP)."""
    r = _Lookup(results)
    ov16 = _tps(r.http(OPENVINO_AUTO, 16))
    ov1 = r.http(OPENVINO_AUTO, 1)
    pipe1 = r.in_process(Precision.AUTO, 1)
    torch1 = _tps(r.http(TORCH_FP32, 1))
    return {
        "engines": _Figure("OpenVINO default precision vs torch engine fp32, 16 streams over HTTP",
                           ov16, _tps(r.http(TORCH_FP32, 16)), "tokens/s", "torch fp32"),
        "ceiling16": _Figure("OpenVINO default precision, 16 streams over HTTP vs in-process "
                             "pipeline with 16 requests in flight", ov16,
                             _tps(r.in_process(Precision.AUTO, 16)), "tokens/s", "in-process"),
        "ceiling1": _Figure("OpenVINO default precision, 1 stream over HTTP vs in-process "
                            "single request", _tps(ov1), _tps(pipe1), "tokens/s", "in-process"),
        "ttft1": _Figure("OpenVINO default precision, 1 stream: TTFT p50 over HTTP vs in-process",
                         ov1.ttft_p50_ms if ov1 else None,
                         pipe1.ttft_p50_ms if pipe1 else None, "ms", "in-process"),
        "fp32": _Figure("OpenVINO fp32, 16 streams over HTTP vs in-process pipeline fp32 with "
                        "16 requests in flight", _tps(r.http(OPENVINO_FP32, 16)),
                        _tps(r.in_process(Precision.FP32, 16)), "tokens/s", "in-process"),
        "precision": _Figure("OpenVINO default precision vs fp32, 16 streams over HTTP", ov16,
                             _tps(r.http(OPENVINO_FP32, 16)), "tokens/s", "OpenVINO fp32"),
        "ov32": _Figure("OpenVINO default precision, 32 vs 16 streams over HTTP",
                        _tps(r.http(OPENVINO_AUTO, 32)), ov16, "tokens/s", "16 streams"),
        "ov16v1": _Figure("OpenVINO default precision, 16 streams vs 1 stream over HTTP", ov16,
                          _tps(ov1), "tokens/s", "1 stream"),
        "torch16v1": _Figure("torch engine fp32, 16 streams vs 1 stream over HTTP",
                             _tps(r.http(TORCH_FP32, 16)), torch1, "tokens/s", "1 stream"),
        "single": _Figure("1 stream over HTTP, OpenVINO default precision vs torch engine fp32",
                          _tps(ov1), torch1, "tokens/s", "torch fp32"),
    }


def _ratio_check(key: str, figure: _Figure, target: float, extra: str = "") -> Check:
    check = Check(key=key, title=figure.title, target=f"ratio >= {target:g}")
    ratio = figure.ratio
    if ratio is None:
        return check
    return Check(key=key, title=check.title, target=check.target, ratio=ratio,
                 measured=figure.measured() + extra, passed=ratio >= target)


def _check_idle_memory(results: GenerationResults | None) -> Check:
    check = Check(key="vi", title="server RSS per open idle (waiting) stream, 1,000 streams, "
                                  "OpenVINO", target=f"per stream / {IDLE_KB_TARGET:.0f} KB < 1.0")
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
    figures = _figures(results)
    ttft = figures["ttft1"]
    ttft_text = f"; TTFT p50 {_opt(ttft.value)} ms vs {_opt(ttft.reference)} ms in-process"
    return [
        _ratio_check("g1", figures["engines"], ENGINE_TARGET),
        _ratio_check("g2", figures["ceiling16"], CEILING_TARGET),
        _ratio_check("g3", figures["ceiling1"], CEILING_TARGET, ttft_text),
        _check_idle_memory(results),
    ]


# -- tables ----------------------------------------------------------------------------------

_HTTP_HEADER = ["config", "served as", "streams", "tokens/s", "vs 1 stream", "TTFT p50 ms",
                "TTFT p99 ms", "completed", "decode batch", "step ms", "engine busy",
                "server tokens/s", "tokens/chunk", "errors"]
_PIPELINE_HEADER = ["precision", "computed in", "in flight", "tokens/s", "TTFT p50 ms",
                    "completed", "step ms"]
_FIGURE_HEADER = ["figure", "measured", "reference", "ratio"]


def _http_rows(results: GenerationResults) -> list[list[str]]:
    rows = []
    for run in results.runs:
        one = next((x for x in run.loads if x.concurrency == 1), None)
        rows += [_http_row(run, load, one.tokens_per_s if one else None) for load in run.loads]
    return rows


def _http_row(run: HttpRun, load: StreamLoad, single: float | None) -> list[str]:
    return [
        run.serving.label, run.served, str(load.concurrency), f"{load.tokens_per_s:.0f}",
        _opt(load.tokens_per_s / single, 2) if single else "-",
        _opt(load.ttft_p50_ms), _opt(load.ttft_p99_ms), str(load.streams_completed),
        _opt(load.mean_decode_batch), _opt(load.mean_step_ms, 2),
        f"{load.engine_busy:.0%}" if load.engine_busy is not None else "-",
        _opt(load.server_tokens_per_s, 0), f"{load.tokens_per_chunk:.3f}", str(load.errors),
    ]


def _pipeline_rows(results: GenerationResults) -> list[list[str]]:
    return [[x.precision.value, x.resolved.value, str(x.concurrency), f"{x.tokens_per_s:.0f}",
             _opt(x.ttft_p50_ms), str(x.requests_completed), _opt(x.mean_step_ms, 2)]
            for x in results.pipeline]


def _figure_rows(results: GenerationResults) -> list[list[str]]:
    rows = []
    for figure in _figures(results).values():
        value = f"{_opt(figure.value)} {figure.unit}"
        reference = f"{_opt(figure.reference)} {figure.unit} ({figure.reference_title})"
        rows.append([figure.title, value, reference, _opt(figure.ratio, 2)])
    return rows


def _console_table(header: list[str], rows: list[list[str]], first_left: bool = False) -> str:
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(header)]

    def line(cells: list[str]) -> str:
        return " ".join(c.ljust(w) if first_left and i == 0 else c.rjust(w)
                        for i, (c, w) in enumerate(zip(cells, widths, strict=True)))

    return "\n".join([line(header), *(line(r) for r in rows)])


def format_generation(results: GenerationResults) -> str:
    parts = [_console_table(_FIGURE_HEADER, _figure_rows(results), first_left=True)]
    if results.runs:
        parts.append(_console_table(_HTTP_HEADER, _http_rows(results)))
    if results.pipeline:
        parts.append(_console_table(_PIPELINE_HEADER, _pipeline_rows(results)))
    parts += [f"not measured: {error}" for error in results.errors]
    return "\n\n".join(parts)


# -- BENCHMARKS.md ---------------------------------------------------------------------------


def _markdown_table(header: list[str], rows: list[list[str]], left: int = 1) -> list[str]:
    align = ["---"] * left + ["---:"] * (len(header) - left)
    return ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|",
            *("| " + " | ".join(row) + " |" for row in rows), ""]


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


def _method(results: GenerationResults) -> list[str]:
    return [
        f"Model: {results.model.describe()}, built offline by `bench/bench_llama.py` (seeded, "
        "so every run serves the same weights; its word-level tokenizer decodes every id to a "
        "word). Command: `python -m bench.run_all --only generation`.",
        "",
        "**Over HTTP**, each configuration on its own fresh server (`max_num_seqs` "
        f"{MAX_NUM_SEQS}): each client keeps one `POST /v1/completions` stream open at all "
        f"times (`max_tokens` {MAX_TOKENS}, `temperature` 1.0, request *i* with `seed` *i*, "
        "`ignore_eos`, `stream_options.include_usage`), over a keep-alive connection, for "
        "the measured window after a discarded warm-up. `tokens/s` counts text chunks "
        "received inside the window times `tokens/chunk` (completion tokens per text chunk "
        "from the usage chunks; a sampled end token has no text). TTFT runs from the "
        "request's send to its first text chunk, for streams started inside the window. "
        "`decode batch`, `step ms` (mean engine step), `engine busy` (step time / window) "
        "and `server tokens/s` come from the server's `/metrics` over the same window. "
        "`served as` is the engine and precision `GET /v1/models/{id}` reports (`auto` "
        "resolved).",
        "",
        "**In-process pipeline** (`bench/genai_ceiling.py`, run before any server starts, "
        "with no load generator beside it): tidegate's own `GenaiLMRuntime` (same export, "
        "precision, scheduler config and per-request `GenerationConfig` as the server) driven "
        "by a closed loop that keeps exactly N requests in flight, adding the next as one "
        "finishes, with the same prompts tokenized by the same tokenizer and the same "
        f"sampling ({MAX_TOKENS} new tokens, `ignore_eos`). Tokens are counted as they "
        "are read from the request handles inside the same-length window after the same "
        "warm-up; TTFT runs from `add_request` to the first token read.",
        "",
    ]


def _http_servers(results: GenerationResults) -> list[str]:
    if not results.runs:
        return []
    first = results.runs[0]
    others = ", ".join(f"`{run.serving.label}`" for run in results.runs[1:])
    lines = _server_block(f"Server ({first.serving.label}):", first.server.command,
                          first.server.config_text)
    if others:
        lines += [f"The other servers ({others}) differ only in `backend` and `precision`.", ""]
    return lines


def generation_markdown(results: GenerationResults, checks: list[Check]) -> list[str]:
    lines = [
        "## Generation: streamed completions (continuous batching)",
        "",
        *_method(results),
        *_markdown_table(_FIGURE_HEADER, _figure_rows(results)),
        "Over HTTP:",
        "",
        *_markdown_table(_HTTP_HEADER, _http_rows(results), left=2),
        "In-process pipeline (OpenVINO GenAI, no HTTP):",
        "",
        *_markdown_table(_PIPELINE_HEADER, _pipeline_rows(results), left=2),
        *_http_servers(results),
        *(f"Not measured: {error}\n" for error in results.errors),
        "### Server memory per open idle stream",
        "",
        f"OpenVINO, default precision, one decode slot: one stream generates ({IDLE_MAX_TOKENS} "
        "tokens each, so the slot is always busy) while the others wait in the queue with "
        "their connections open and read. RSS (`VmRSS`) is read (median of 5) with only the "
        "running stream open, then with it and 1,000 more, and divided by 1,000: the running "
        "sequence's KV cache (allocated at load) is in both. KB is 1,000 bytes.",
        "",
    ]
    if results.memory_server is not None:
        lines += _server_block("Server:", results.memory_server.command,
                               results.memory_server.config_text)
    lines += _memory_lines(results)
    lines += [f"- **{c.verdict}** ({c.key}) {c.title}: {c.measured} [{c.target}]" for c in checks]
    return [*lines, ""]
