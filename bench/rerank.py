"""Reranking over HTTP against the raw in-process ceiling of the same engine.

Workload: one query against 64 passages of ~100 tokens per request (each pair ~115 tokens),
scored by a random-weight BERT cross-encoder of ms-marco-MiniLM-L-6-v2's size
(``bench.tiny_cross_encoder.MINILM_L6``) with the bundled MiniLM tokenizer.

* ceiling: :class:`~tidegate.runtimes.cross_encoder.CrossEncoderRuntime` in this process,
  timing ``prepare_pairs`` (tokenization) plus ``run_batch`` per request, back to back;
* HTTP: ``tidegate serve`` on the same backend and precision, ``POST /v1/rerank`` from wrk.

Both print pairs per second; the target is HTTP >= 0.85 of the ceiling. Run with
``python -m bench.rerank`` (``--help`` for the duration, connections and backend).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench.http_load import run_wrk, tidegate_from_toml, write_bodies
from bench.report import Check
from bench.tiny_cross_encoder import MINILM_L6, build_cross_encoder
from bench.workload import make_sentences
from tidegate.engines import Backend, Precision
from tidegate.runtimes.cross_encoder import CrossEncoderRuntime

__all__ = ["RERANK_TARGET", "RerankSettings", "main", "rerank_checks", "rerank_markdown",
           "run", "run_section"]

RERANK_TARGET = 0.85
"""HTTP pairs/s over the in-process ceiling, same engine and precision."""
SECTION_BACKENDS = (Backend.AUTO, Backend.ONNXRUNTIME)
PASSAGES_PER_REQUEST = 64
_SENTENCES_PER_PASSAGE = 7  # 7 sentences of ~12 words: ~100 tokens
_BODIES = 8


@dataclass(frozen=True, slots=True)
class RerankSettings:
    backend: Backend = Backend.AUTO
    precision: Precision = Precision.AUTO
    duration_s: int = 10
    connections: int = 4


def workload(count: int = _BODIES) -> list[tuple[str, list[str]]]:
    """``count`` (query, 64 passages) requests, the same on every run."""
    sentences = make_sentences(count * (1 + PASSAGES_PER_REQUEST * _SENTENCES_PER_PASSAGE))
    requests = []
    for _ in range(count):
        query, sentences = sentences[0], sentences[1:]
        passages = []
        for _ in range(PASSAGES_PER_REQUEST):
            passages.append(" ".join(sentences[:_SENTENCES_PER_PASSAGE]))
            sentences = sentences[_SENTENCES_PER_PASSAGE:]
        requests.append((query, passages))
    return requests


def ceiling(runtime: CrossEncoderRuntime, requests: list[tuple[str, list[str]]],
            duration_s: float) -> float:
    """Pairs per second, one request's pairs per forward call, back to back."""
    for query, passages in requests[:2]:  # warm-up
        runtime.run_batch([p.payload for p in runtime.prepare_pairs(query, passages)])
    pairs, started = 0, time.perf_counter()
    while time.perf_counter() - started < duration_s:
        for query, passages in requests:
            runtime.run_batch([p.payload for p in runtime.prepare_pairs(query, passages)])
            pairs += len(passages)
    return pairs / (time.perf_counter() - started)


def run(settings: RerankSettings, workdir: Path) -> dict[str, object]:
    model_dir = build_cross_encoder(workdir / "model", MINILM_L6)
    cache = workdir / "cache"
    requests = workload()
    runtime = CrossEncoderRuntime(model_dir, cache, backend=settings.backend,
                                  precision=settings.precision)
    try:
        backend, precision = runtime.backend, runtime.precision
        tokens = sum(p.tokens for p in runtime.prepare_pairs(*requests[0])) / PASSAGES_PER_REQUEST
        raw = ceiling(runtime, requests, settings.duration_s)
    finally:
        runtime.close()
    config = (f'[server]\nlog_level = "warning"\ncache_dir = "{cache}"\n\n'
              f'[[models]]\nid = "reranker"\n'
              f'runtime = "cross-encoder"\nsource = "{model_dir}"\nbackend = "{backend}"\n'
              f'precision = "{precision}"\n')
    bodies = write_bodies(workdir / "bodies.jsonl", [
        json.dumps({"model": "reranker", "query": q, "documents": d}).encode()
        for q, d in requests
    ])
    with tidegate_from_toml(config, workdir=workdir, name="rerank") as server:
        url = server.base_url + "/v1/rerank"
        run_wrk(url, bodies, connections=settings.connections, duration_s=2)  # warm-up
        result = run_wrk(url, bodies, connections=settings.connections,
                         duration_s=settings.duration_s)
    http = result.requests_per_s * PASSAGES_PER_REQUEST
    return {"backend": backend.value, "precision": precision.value,
            "tokens_per_pair": round(tokens, 1), "connections": settings.connections,
            "ceiling_pairs_per_s": round(raw, 1), "http_pairs_per_s": round(http, 1),
            "ratio": round(http / raw, 3), "non_2xx": result.non_2xx,
            "p50_ms": round(result.p50_ms, 1), "p99_ms": round(result.p99_ms, 1)}


def run_section(duration_s: float, workdir: Path) -> list[dict[str, object]]:
    """The ``rerank`` section of ``python -m bench.run_all``: each of
    :data:`SECTION_BACKENDS`, one after the other."""
    figures = []
    for backend in SECTION_BACKENDS:
        settings = RerankSettings(backend=backend, duration_s=int(duration_s))
        figures.append(run(settings, workdir / f"rerank-{backend.value}"))
        print(f"  rerank {backend.value}: {figures[-1]}", flush=True)
    return figures


def rerank_checks(figures: list[dict[str, object]] | None) -> list[Check]:
    """One check per engine: HTTP pairs/s >= RERANK_TARGET x the in-process ceiling."""
    checks = []
    for index, backend in enumerate(SECTION_BACKENDS):
        check = Check(key=f"r{index + 1}",
                      title=f"rerank, backend {backend.value}: HTTP pairs/s vs in-process ceiling",
                      target=f"ratio >= {RERANK_TARGET}")
        if figures is not None and index < len(figures):
            row = figures[index]
            ratio = float(str(row["ratio"]))
            check = Check(key=check.key, title=check.title, target=check.target, ratio=ratio,
                          passed=ratio >= RERANK_TARGET,
                          measured=(f"{row['http_pairs_per_s']} vs {row['ceiling_pairs_per_s']} "
                                    f"pairs/s ({row['backend']} {row['precision']})"))
        checks.append(check)
    return checks


def rerank_markdown(figures: list[dict[str, object]]) -> list[str]:
    lines = [
        "## Reranking (random-weight MiniLM-L6-sized BERT cross-encoder)", "",
        "Command: `python -m bench.run_all --only rerank` (one engine: `python -m bench.rerank "
        "--backend auto`). One query against 64 passages of ~100 tokens per request, 4 wrk "
        "connections on `POST /v1/rerank`; the ceiling is the same engine and precision in "
        "process (tokenize + forward per request, back to back), measured just before the "
        "server. `auto` keeps bf16 only if the load-time probe's scores stay within "
        "`max_score_error` of fp32; a random-weight model may not.", "",
        "| backend asked | served as | tokens/pair | ceiling pairs/s | HTTP pairs/s | ratio "
        "| p50 / p99 ms | non-2xx |",
        "|---|---|---:|---:|---:|---:|---|---:|",
    ]
    for backend, row in zip(SECTION_BACKENDS, figures, strict=False):
        lines.append(
            f"| {backend.value} | {row['backend']} {row['precision']} | {row['tokens_per_pair']} "
            f"| {row['ceiling_pairs_per_s']} | {row['http_pairs_per_s']} | {row['ratio']} "
            f"| {row['p50_ms']} / {row['p99_ms']} | {row['non_2xx']} |")
    return [*lines, ""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", type=Backend, default=Backend.AUTO)
    parser.add_argument("--precision", type=Precision, default=Precision.AUTO)
    parser.add_argument("--duration", type=int, default=10, help="seconds per measurement")
    parser.add_argument("--connections", type=int, default=4)
    args = parser.parse_args()
    settings = RerankSettings(backend=args.backend, precision=args.precision,
                              duration_s=args.duration, connections=args.connections)
    with tempfile.TemporaryDirectory(prefix="tidegate-rerank-") as tmp:
        figures = run(settings, Path(tmp))
    for name, value in figures.items():
        print(f"{name:>20}: {value}")


if __name__ == "__main__":
    main()
