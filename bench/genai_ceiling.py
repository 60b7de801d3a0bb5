"""The in-process ceiling of OpenVINO GenAI's continuous-batching pipeline, without tidegate.

The same pipeline tidegate serves (:class:`~tidegate.runtimes.genai_lm.GenaiLMRuntime`: the same
export, precision, scheduler config and per-request ``GenerationConfig``), driven by a closed
loop in this process: exactly N requests are in flight; when one finishes, the next is added
before the next ``step()``. Prompts are the HTTP benchmark's sentences, tokenized by the same
code the server uses, with the same sampling (temperature 1.0, a seed per request, 64 new
tokens, ``ignore_eos``). Tokens are counted as they are read from the handles, inside a timed
window after a warm-up; time to first token runs from ``add_request`` to the read of the
request's first token.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.workload import make_sentences
from tidegate.config import GenerationConfig
from tidegate.engines import Precision, Weights, cpu_supports_bf16

__all__ = ["MAX_TOKENS", "PipelineLoad", "measure_pipeline", "prompts", "resolve_precision"]

MAX_TOKENS = 64
"""New tokens per request, here and over HTTP."""
_PROMPT_SENTENCES = 256


def prompts() -> list[str]:
    """The completion prompts, request ``i`` taking ``prompts()[i % len]`` (seed ``i``)."""
    return make_sentences(_PROMPT_SENTENCES)


def resolve_precision(precision: Precision) -> Precision:
    """What ``auto`` means on this CPU, as tidegate's loader resolves it for OpenVINO."""
    if precision is Precision.AUTO:
        return Precision.BF16 if cpu_supports_bf16() else Precision.FP32
    return precision


@dataclass(frozen=True, kw_only=True, slots=True)
class PipelineLoad:
    precision: Precision
    """As configured (``auto`` or ``fp32``)."""
    resolved: Precision
    concurrency: int
    window_s: float
    tokens: int
    requests_completed: int
    requests_started: int
    ttft_p50_ms: float | None
    """For requests added inside the window."""
    mean_step_ms: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.window_s


@dataclass(slots=True)
class _Request:
    handle: Any
    added: float
    first: float | None = None
    tokens: int = 0


@dataclass(slots=True)
class _Loop:
    """One closed loop's state and counts."""

    runtime: Any
    prompt_ids: Sequence[list[int]]
    start: float
    end: float
    in_flight: dict[int, _Request] = field(default_factory=dict)
    added: int = 0
    tokens: int = 0
    completed: int = 0
    started: int = 0
    steps: int = 0
    step_s: float = 0.0
    ttfts: list[float] = field(default_factory=list)

    def add(self) -> None:
        import numpy as np
        import openvino as ov

        from tidegate.generation.genai_worker import generation_config
        from tidegate.generation.params import SamplingParams

        index = self.added
        self.added += 1
        config = generation_config(
            SamplingParams(temperature=1.0, seed=index, max_tokens=MAX_TOKENS,
                           ignore_eos=True),
            max_new=MAX_TOKENS, eos_token_ids=self.runtime.eos_token_ids,
            vocab_size=self.runtime.vocab_size)
        ids = ov.Tensor(np.array([self.prompt_ids[index % len(self.prompt_ids)]],
                                 dtype=np.int64))
        added = time.perf_counter()
        # The handle must stay referenced: dropping it cancels the request.
        handle = self.runtime.pipeline.add_request(index, ids, config)
        self.in_flight[index] = _Request(handle=handle, added=added)
        if self.start <= added < self.end:
            self.started += 1

    def step(self, running: Any) -> float:
        began = time.perf_counter()
        self.runtime.pipeline.step()
        now = time.perf_counter()
        inside = self.start <= now < self.end
        if inside:
            self.steps += 1
            self.step_s += now - began
        for index, request in list(self.in_flight.items()):
            got = 0
            while request.handle.can_read():
                got += sum(len(o.generated_ids) for o in request.handle.read().values())
            if got and request.first is None:
                request.first = now
                if self.start <= request.added < self.end:
                    self.ttfts.append(now - request.added)
            request.tokens += got
            if inside:
                self.tokens += got
            if request.handle.get_status() != running and not request.handle.can_read():
                del self.in_flight[index]
                if inside:
                    self.completed += 1
        return now


def _closed_loop(runtime: Any, prompt_ids: Sequence[list[int]], concurrency: int, *,
                 warmup_s: float, duration_s: float) -> _Loop:
    import openvino_genai

    running = openvino_genai.GenerationStatus.RUNNING
    start = time.perf_counter() + warmup_s
    loop = _Loop(runtime=runtime, prompt_ids=prompt_ids, start=start, end=start + duration_s)
    now = time.perf_counter()
    while now < loop.end:
        while len(loop.in_flight) < concurrency:
            loop.add()
        now = loop.step(running)
    for request in loop.in_flight.values():
        request.handle.cancel()
    while runtime.pipeline.has_non_finished_requests():  # let the cancels free their blocks
        runtime.pipeline.step()
    return loop


def measure_pipeline(
    model_dir: Path, cache_dir: Path, *, precision: Precision, generation: GenerationConfig,
    concurrency: Sequence[int], warmup_s: float, duration_s: float,
    weights: Weights = Weights.ORIGINAL,
) -> list[PipelineLoad]:
    """Load the pipeline once (exporting the model if the cache lacks it), then one closed
    loop per entry of ``concurrency``; the pipeline is released before returning."""
    from tidegate.runtimes.genai_lm import GenaiLMRuntime

    resolved = resolve_precision(precision)
    runtime = GenaiLMRuntime(model_dir, cache_dir, precision=resolved, generation=generation,
                             weights=weights, in_process=True)  # driven here, step by step
    try:
        prompt_ids = [runtime.encode(text) for text in prompts()]
        loads = []
        for n in concurrency:
            loop = _closed_loop(runtime, prompt_ids, n, warmup_s=warmup_s,
                                duration_s=duration_s)
            loads.append(PipelineLoad(
                precision=precision, resolved=resolved, concurrency=n, window_s=duration_s,
                tokens=loop.tokens, requests_completed=loop.completed,
                requests_started=loop.started,
                ttft_p50_ms=statistics.median(loop.ttfts) * 1000 if loop.ttfts else None,
                mean_step_ms=loop.step_s / loop.steps * 1000 if loop.steps else 0.0,
            ))
    finally:
        runtime.close()
        del runtime
        gc.collect()  # the pipeline's weights and KV cache go before a server starts
    return loads
