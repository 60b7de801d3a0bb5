"""Generation benchmark: tidegate's engines over HTTP against the OpenVINO pipeline's ceiling.

The model is a random-weight Llama of SmolLM2-135M's shape (``bench.bench_llama``). In one run:

* **throughput over HTTP**, each server configuration on its own fresh ``tidegate serve``
  (:data:`SERVING_RUNS`: the torch engine in fp32, OpenVINO in its default precision and in
  fp32): N clients each keep one streamed completion open, back to back
  (``bench.stream_load``);
* **the in-process ceiling** of the same OpenVINO pipeline (``bench.genai_ceiling``): a closed
  loop keeping exactly N requests in flight with the same prompts and sampling, no HTTP;
* **memory per idle stream** (OpenVINO, default precision, one decode slot): server RSS per
  stream waiting for the slot, 1,000 of them (``bench.stream_load``).

The in-process runs go first, with no server alive; the servers then run one at a time. The
OpenVINO export is cached in tidegate's cache directory (``TIDEGATE_CACHE_DIR`` or the user
cache), the same one the servers use, so only the first run pays for it.

``python -m bench.run_all --only generation`` runs it and renders it into BENCHMARKS.md.
"""

from __future__ import annotations

import json
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from bench.bench_llama import BenchLlama, build_bench_llama
from bench.genai_ceiling import PipelineLoad, measure_pipeline
from bench.http_load import HOST, ServerProcess, run_on_uvloop
from bench.serving import raise_fd_limit, tidegate_from_toml
from bench.stream_load import IdleMemory, StreamLoad, measure_idle_memory, measure_streams
from tidegate.config import GenerationConfig, default_cache_dir
from tidegate.engines import Backend, Precision

__all__ = [
    "MAX_NUM_SEQS",
    "OPENVINO_AUTO",
    "OPENVINO_FP32",
    "PIPELINE_RUNS",
    "SERVING_RUNS",
    "TORCH_FP32",
    "GenerationResults",
    "GenerationSettings",
    "HttpRun",
    "IdleMemory",
    "Serving",
    "StreamLoad",
    "render_config",
    "run_generation",
]

MODEL_ID = "bench-llama"
MAX_NUM_SEQS = 32


@dataclass(frozen=True, kw_only=True, slots=True)
class Serving:
    """One server configuration of the throughput runs: ``backend`` and ``precision``."""

    backend: Backend
    precision: Precision

    @property
    def label(self) -> str:
        return f"{self.backend.value} {self.precision.value}"


TORCH_FP32 = Serving(backend=Backend.TORCH, precision=Precision.FP32)
OPENVINO_AUTO = Serving(backend=Backend.OPENVINO, precision=Precision.AUTO)
OPENVINO_FP32 = Serving(backend=Backend.OPENVINO, precision=Precision.FP32)
SERVING_RUNS: tuple[tuple[Serving, tuple[int, ...]], ...] = (
    (TORCH_FP32, (1, 16)),
    (OPENVINO_AUTO, (1, 16, 32)),
    (OPENVINO_FP32, (16,)),
)
"""Each server configuration and the stream counts measured on it."""
PIPELINE_RUNS: tuple[tuple[Precision, tuple[int, ...]], ...] = (
    (Precision.AUTO, (1, 16)),
    (Precision.FP32, (16,)),
)
"""Each in-process pipeline precision and the in-flight request counts measured on it."""


@dataclass(frozen=True, kw_only=True, slots=True)
class GenerationSettings:
    duration_s: float
    warmup_s: float
    idle_streams: int = 1000
    servings: tuple[tuple[Serving, tuple[int, ...]], ...] = SERVING_RUNS
    pipeline: tuple[tuple[Precision, tuple[int, ...]], ...] = PIPELINE_RUNS


@dataclass(frozen=True, kw_only=True, slots=True)
class HttpRun:
    """One server configuration's measurements."""

    serving: Serving
    server: ServerProcess
    served: str
    """The engine and precision the server reports for the model (``GET /v1/models/{id}``)."""
    loads: list[StreamLoad]


@dataclass(frozen=True, kw_only=True, slots=True)
class GenerationResults:
    model: BenchLlama
    runs: list[HttpRun]
    pipeline: list[PipelineLoad]
    memory_server: ServerProcess | None
    memory: IdleMemory | None
    memory_error: str | None = None
    errors: tuple[str, ...] = ()
    """Configurations that could not be measured, and why."""

    def http(self, serving: Serving, concurrency: int) -> StreamLoad | None:
        return next((load for run in self.runs if run.serving == serving
                     for load in run.loads if load.concurrency == concurrency), None)

    def run(self, serving: Serving) -> HttpRun | None:
        return next((run for run in self.runs if run.serving == serving), None)

    def in_process(self, precision: Precision, concurrency: int) -> PipelineLoad | None:
        return next((x for x in self.pipeline
                     if x.precision is precision and x.concurrency == concurrency), None)


def render_config(model_dir: Path, *, model_id: str = MODEL_ID, backend: Backend = Backend.AUTO,
                  precision: Precision = Precision.AUTO, threads: int | None = None,
                  pipeline_process: bool | None = None, **generation: int | float) -> str:
    lines = [
        "[server]", f'host = "{HOST}"', 'log_level = "info"', "",
        "[[models]]", f'id = "{model_id}"', 'runtime = "causal-lm"', f'source = "{model_dir}"',
        f'backend = "{backend.value}"', f'precision = "{precision.value}"',
        *([] if threads is None else [f"intra_op_threads = {threads}"]),
        "[models.generation]",
        *(f"{key} = {value}" for key, value in generation.items()),
        *([] if pipeline_process is None
          else [f"pipeline_process = {str(pipeline_process).lower()}"]),
    ]
    return "\n".join(lines) + "\n"


def _served(server: ServerProcess) -> str:
    """``backend precision`` of the model as the server reports it (``auto`` resolved)."""
    url = f"{server.base_url}/v1/models/{MODEL_ID}"
    with urllib.request.urlopen(url, timeout=10) as response:
        data = json.loads(response.read())
    details = data.get("details", data) if isinstance(data, dict) else {}
    return f"{details.get('backend', '?')} {details.get('precision', '?')}"


def _print_load(label: str, load: StreamLoad) -> None:
    print(f"  {label}, {load.concurrency} streams: {load.tokens_per_s:.0f} tokens/s, TTFT p50 "
          f"{load.ttft_p50_ms or 0:.1f} ms p99 {load.ttft_p99_ms or 0:.1f} ms, mean decode "
          f"batch {load.mean_decode_batch or 0:.1f}, step {load.mean_step_ms or 0:.1f} ms, "
          f"engine busy {load.engine_busy or 0:.0%}", flush=True)


def _run_pipeline(model: BenchLlama, settings: GenerationSettings,
                  errors: list[str]) -> list[PipelineLoad]:
    generation = GenerationConfig(max_num_seqs=MAX_NUM_SEQS)
    loads: list[PipelineLoad] = []
    for precision, concurrency in settings.pipeline:
        try:
            measured = measure_pipeline(
                model.path, default_cache_dir(), precision=precision, generation=generation,
                concurrency=concurrency, warmup_s=settings.warmup_s,
                duration_s=settings.duration_s)
        except (RuntimeError, OSError) as exc:  # export, probe or engine: keep the other runs
            errors.append(f"in-process pipeline {precision.value}: {type(exc).__name__}: {exc}")
            print(f"  {errors[-1]}", flush=True)
            continue
        for load in measured:
            print(f"  in-process pipeline {precision.value} ({load.resolved.value}), "
                  f"{load.concurrency} in flight: {load.tokens_per_s:.0f} tokens/s, TTFT p50 "
                  f"{load.ttft_p50_ms or 0:.1f} ms, step {load.mean_step_ms:.1f} ms", flush=True)
        loads += measured
    return loads


def _run_http(model: BenchLlama, settings: GenerationSettings, workdir: Path,
              errors: list[str]) -> list[HttpRun]:
    runs: list[HttpRun] = []
    for serving, concurrency in settings.servings:
        config = render_config(model.path, backend=serving.backend,
                               precision=serving.precision, max_num_seqs=MAX_NUM_SEQS)
        name = f"generation-{serving.backend.value}-{serving.precision.value}"
        try:
            with tidegate_from_toml(config, workdir=workdir, name=name) as server:
                served = _served(server)
                print(f"  {serving.label}: serving on {served}", flush=True)
                loads = []
                for n in concurrency:
                    loads.append(run_on_uvloop(measure_streams(
                        server, n, model=MODEL_ID, warmup_s=settings.warmup_s,
                        duration_s=settings.duration_s)))
                    _print_load(serving.label, loads[-1])
        except (RuntimeError, OSError) as exc:  # e.g. the server failed to become ready
            errors.append(f"HTTP {serving.label}: {type(exc).__name__}: {exc}")
            print(f"  {errors[-1]}", flush=True)
            continue
        runs.append(HttpRun(serving=serving, server=server, served=served, loads=loads))
    return runs


def _run_idle_memory(
    model: BenchLlama, settings: GenerationSettings, workdir: Path
) -> tuple[ServerProcess | None, IdleMemory | None, str | None]:
    # Every idle stream is a socket on both ends; children inherit the raised limit.
    raise_fd_limit(settings.idle_streams * 2 + 1024)
    config = render_config(model.path, backend=Backend.OPENVINO, precision=Precision.AUTO,
                           max_num_seqs=1, max_waiting=settings.idle_streams * 2,
                           stream_timeout_s=600)
    server: ServerProcess | None = None
    try:
        with tidegate_from_toml(config, workdir=workdir, name="generation-idle") as server:
            memory = run_on_uvloop(
                measure_idle_memory(server, settings.idle_streams, model=MODEL_ID))
    except (RuntimeError, LookupError, OSError) as exc:
        error = f"{type(exc).__name__}: {exc}"
        print(f"  idle-stream memory failed: {error}", flush=True)
        return server, None, error
    print(f"  {memory.streams} idle streams: {memory.kib_per_stream:.1f} KiB each "
          f"(RSS {memory.rss_before_kib} -> {memory.rss_after_kib} KiB; waiting "
          f"{memory.waiting}, running {memory.running}; drained {memory.drained})", flush=True)
    return server, memory, None


def run_generation(settings: GenerationSettings, workdir: Path) -> GenerationResults:
    """Build the model, run the in-process pipeline (no server alive), then each server
    configuration and the idle-stream memory, each against its own fresh server."""
    model = build_bench_llama(workdir / "bench-llama")
    print(f"  model: {model.describe()}", flush=True)
    errors: list[str] = []
    pipeline = _run_pipeline(model, settings, errors)
    runs = _run_http(model, settings, workdir, errors)
    memory_server: ServerProcess | None = None
    memory: IdleMemory | None = None
    memory_error: str | None = "skipped"
    if settings.idle_streams:
        memory_server, memory, memory_error = _run_idle_memory(model, settings, workdir)
    return GenerationResults(model=model, runs=runs, pipeline=pipeline,
                             memory_server=memory_server, memory=memory,
                             memory_error=memory_error, errors=tuple(errors))
