"""Run every benchmark and write BENCHMARKS.md: ``python -m bench.run_all`` (``make bench``).

Sections, in order (``--only`` picks some):

* ``ceiling``: raw in-process sentences/s at batch 1, 16, 64 (PyTorch, ONNX Runtime, OpenVINO
  fp32 and bf16);
* ``minilm``: tidegate serving MiniLM with default batching, at 1, 10 and 64 connections;
* ``nobatch``: the same with ``max_batch_size = 1``, at 64 connections;
* ``echo``: tidegate's echo runtime vs a bare Starlette echo, at 10 connections;
* ``engines`` (about 3 minutes): each embedding engine (ONNX Runtime fp32, OpenVINO fp32 and
  bf16) raw and over HTTP, on short sentences, a mixed RAG corpus and 32-input requests
  (``bench.embeddings``);
* ``trace``: model-cache policy replay (LRU, LFU, each with and without predictive
  preloading, and Belady) on Zipf and patterned traces (``bench.trace_replay``);
* ``generation`` (about 5 minutes): streamed completions from a random-weight Llama of
  SmolLM2-135M's shape over HTTP (torch engine fp32; OpenVINO in its default precision and in
  fp32) against the OpenVINO pipeline's in-process ceiling, and server memory per idle stream
  with 1,000 streams open (``bench.generation``);
* ``gateway`` (not run by default, about 4 minutes): MiniLM and echo upstreams measured directly
  and through a tidegate gateway (``runtime = "remote"``) at 1, 10 and 64 connections, upstream
  connection reuse, and coalescing on vs off (``bench.gateway``);
* ``soak`` (not run by default, about 10 minutes): an open-loop load at 4x the measured capacity
  for 60 s (``--soak-s``) against a bounded queue, for embeddings and generation, with its
  status, latency-bound, RSS, log and recovery checks (``bench.soak``);
* ``ray`` (not run by default, about 4 minutes): MiniLM on single-process tidegate and on a
  local Ray Serve with each ingress, at 1 and 64 connections (``bench.ray_ingress``).

Every section but ``gateway``, ``soak`` and ``ray`` runs by default (``rerank``: a
cross-encoder over ``/v1/rerank`` against its in-process ceiling, ``bench.rerank``);
``--only generation gateway`` runs just those two, ``--all`` every section. Then the target
checks are printed as PASS/MISS with their ratios (SKIP for sections not run).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.bare_echo import bare_echo_server
from bench.ceiling import CeilingSettings, format_table, run_ceiling
from bench.embeddings import (
    EngineResults,
    EngineSettings,
    engine_checks,
    engines_markdown,
    format_engines,
    run_engines,
)
from bench.gateway import GatewayResults, GatewaySettings, run_gateway
from bench.gateway_report import format_gateway, gateway_checks, gateway_markdown
from bench.generation import GenerationResults, GenerationSettings, run_generation
from bench.generation_report import format_generation, generation_checks, generation_markdown
from bench.http_load import (
    REPO_ROOT,
    ModelSpec,
    ServerProcess,
    read_batch_totals,
    run_wrk,
    tidegate_server,
    write_bodies,
)
from bench.ray_ingress import RayResults, RaySettings, ray_checks, ray_markdown
from bench.ray_ingress import run as run_ray
from bench.report import (
    Check,
    LoadRun,
    Results,
    Scenario,
    capture_environment,
    compute_checks,
    format_checks,
    format_load_table,
    render_markdown,
)
from bench.rerank import rerank_checks, rerank_markdown, run_section
from bench.soak import SoakResults, SoakSettings, format_soak, run_soak, soak_checks, soak_markdown
from bench.trace_replay import report as trace_report
from bench.workload import embedding_bodies, make_sentences

__all__ = ["main"]

DEFAULT_SECTIONS = ("ceiling", "minilm", "nobatch", "echo", "engines", "trace", "generation",
                    "rerank")
SECTIONS = (*DEFAULT_SECTIONS, "gateway", "soak", "ray")
MODEL_ID = "all-minilm-l6-v2"
ECHO_ID = "echo"
MINILM_CONNECTIONS = (1, 10, 64)
_SENTENCES = 1024


@dataclass(frozen=True, kw_only=True, slots=True)
class RunSettings:
    sections: tuple[str, ...]
    duration_s: int
    warmup_s: int
    ceiling_seconds: float
    soak_s: float = 60.0


@dataclass(slots=True)
class AllResults:
    core: Results
    generation: GenerationResults | None = None
    gateway: GatewayResults | None = None
    engines: EngineResults | None = None
    soak: SoakResults | None = None
    rerank: list[dict[str, object]] | None = None
    ray: RayResults | None = None

    def checks(self) -> list[Check]:
        """The engine, generation, rerank, gateway, soak and Ray targets (SKIP for a section not
        run)."""
        return [*engine_checks(self.engines), *generation_checks(self.generation),
                *rerank_checks(self.rerank), *gateway_checks(self.gateway),
                *soak_checks(self.soak), *ray_checks(self.ray)]


@dataclass(frozen=True, slots=True)
class Workdir:
    path: Path

    def bodies(self, model: str) -> Path:
        """The request bodies for ``model``, written once."""
        path = self.path / f"bodies-{model}.jsonl"
        if not path.exists():
            write_bodies(path, embedding_bodies(model, make_sentences(_SENTENCES)))
        return path


def _measure(
    server: ServerProcess, scenario: Scenario, *, model: str, connections: int,
    settings: RunSettings, workdir: Workdir,
) -> LoadRun:
    bodies = workdir.bodies(model)
    if settings.warmup_s > 0:
        run_wrk(server.embeddings_url, bodies, connections=connections,
                duration_s=settings.warmup_s)
    before = read_batch_totals(server.base_url, model)
    result = run_wrk(
        server.embeddings_url, bodies, connections=connections, duration_s=settings.duration_s
    )
    after = read_batch_totals(server.base_url, model)
    # The warm-up's batches fall before ``before``, so the mean covers the measured run only.
    mean_batch = after.mean_since(before) if before and after else None
    run = LoadRun(scenario=scenario, server=server, result=result, mean_batch=mean_batch)
    print(
        f"  {scenario.value}, {connections} conns: {result.requests_per_s:.1f} req/s, "
        f"p50 {result.p50_ms:.2f} ms, p99 {result.p99_ms:.2f} ms, non-2xx {result.non_2xx}",
        flush=True,
    )
    return run


def _run_minilm(settings: RunSettings, workdir: Workdir) -> list[LoadRun]:
    models = [ModelSpec(id=MODEL_ID)]
    with tidegate_server(models, workdir=workdir.path, name="minilm-batching") as server:
        return [
            _measure(
                server, Scenario.BATCHING_ON, model=MODEL_ID, connections=connections,
                settings=settings, workdir=workdir,
            )
            for connections in MINILM_CONNECTIONS
        ]


def _run_nobatch(settings: RunSettings, workdir: Workdir) -> list[LoadRun]:
    models = [ModelSpec(id=MODEL_ID, max_batch_size=1)]
    with tidegate_server(models, workdir=workdir.path, name="minilm-nobatch") as server:
        run = _measure(
            server, Scenario.BATCHING_OFF, model=MODEL_ID, connections=64, settings=settings,
            workdir=workdir,
        )
    return [run]


def _run_echo(settings: RunSettings, workdir: Workdir) -> list[LoadRun]:
    models = [ModelSpec(id=ECHO_ID, runtime="echo")]
    with tidegate_server(models, workdir=workdir.path, name="echo") as server:
        echo = _measure(
            server, Scenario.ECHO, model=ECHO_ID, connections=10, settings=settings,
            workdir=workdir,
        )
    with bare_echo_server(workdir=workdir.path) as server:
        bare = _measure(
            server, Scenario.BARE, model=ECHO_ID, connections=10, settings=settings,
            workdir=workdir,
        )
    return [echo, bare]


_HTTP_SECTIONS = {"minilm": _run_minilm, "nobatch": _run_nobatch, "echo": _run_echo}


def run(settings: RunSettings) -> AllResults:
    results = AllResults(core=Results())
    if "ceiling" in settings.sections:
        print("== raw ceiling", flush=True)
        ceiling = CeilingSettings(seconds=settings.ceiling_seconds)
        results.core.ceiling = run_ceiling(ceiling)
        print(format_table(results.core.ceiling), flush=True)
    with tempfile.TemporaryDirectory(prefix="tidegate-bench-") as tmp:
        workdir = Workdir(Path(tmp))
        for section, runner in _HTTP_SECTIONS.items():
            if section in settings.sections:
                print(f"== http: {section}", flush=True)
                results.core.loads += runner(settings, workdir)
        if "engines" in settings.sections:
            print("== embedding engines", flush=True)
            results.engines = run_engines(
                EngineSettings(duration_s=settings.duration_s, warmup_s=settings.warmup_s,
                               ceiling_seconds=settings.ceiling_seconds),
                workdir.path,
            )
        if "generation" in settings.sections:
            print("== generation (streamed completions)", flush=True)
            results.generation = run_generation(
                GenerationSettings(duration_s=settings.duration_s, warmup_s=settings.warmup_s),
                workdir.path,
            )
        if "rerank" in settings.sections:
            print("== rerank (cross-encoder)", flush=True)
            results.rerank = run_section(settings.duration_s, workdir.path)
        if "gateway" in settings.sections:
            print("== gateway (tidegate -> tidegate)", flush=True)
            results.gateway = run_gateway(
                GatewaySettings(duration_s=settings.duration_s, warmup_s=settings.warmup_s),
                workdir.path,
            )
        if "soak" in settings.sections:
            print("== overload soak (open loop)", flush=True)
            results.soak = run_soak(
                SoakSettings(soak_s=settings.soak_s, capacity_s=settings.duration_s,
                             warmup_s=settings.warmup_s),
                workdir.path,
            )
        if "ray" in settings.sections:
            print("== Ray Serve (ingress choice, vs single process)", flush=True)
            results.ray = run_ray(RaySettings(settings.duration_s, settings.warmup_s),
                                  workdir.path)
    return results


def _extra_markdown(results: AllResults) -> list[str]:
    lines: list[str] = []
    if results.engines is not None:
        lines += engines_markdown(results.engines)
    if results.generation is not None:
        lines += generation_markdown(results.generation, generation_checks(results.generation))
    if results.rerank is not None:
        lines += rerank_markdown(results.rerank)
    if results.gateway is not None:
        lines += gateway_markdown(results.gateway, gateway_checks(results.gateway))
    if results.soak is not None:
        lines += soak_markdown(results.soak, soak_checks(results.soak))
    if results.ray is not None:
        lines += ray_markdown(results.ray, ray_checks(results.ray))
    return lines


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run_all", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--duration", type=int,
        help="seconds per measured run, wrk or streaming (default 10; 2 with --quick)",
    )
    parser.add_argument(
        "--quick", action="store_true",
        help="smoke test: 2 s load runs, 1 s warm-ups, 0.5 s per ceiling cell",
    )
    picked = parser.add_mutually_exclusive_group()
    picked.add_argument(
        "--only", nargs="+", choices=SECTIONS, metavar="SECTION",
        help=f"run only these sections ({', '.join(SECTIONS)})",
    )
    picked.add_argument(
        "--all", action="store_true",
        help=f"run every section (default: {', '.join(DEFAULT_SECTIONS)})",
    )
    parser.add_argument(
        "--soak-s", type=float,
        help="seconds of open-loop overload in the soak section (default 60; 5 with --quick)",
    )
    parser.add_argument(
        "--write", action=argparse.BooleanOptionalAction, default=True,
        help="write BENCHMARKS.md at the repository root (default: yes)",
    )
    parser.add_argument("--output", type=Path, default=REPO_ROOT / "BENCHMARKS.md")
    return parser


def _settings(args: argparse.Namespace) -> RunSettings:
    duration = args.duration or (2 if args.quick else 10)
    if duration < 1:
        raise SystemExit("--duration must be at least 1 second")
    return RunSettings(
        sections=SECTIONS if args.all else tuple(args.only or DEFAULT_SECTIONS),
        duration_s=duration,
        warmup_s=1 if args.quick else 2,
        ceiling_seconds=0.5 if args.quick else 3.0,
        soak_s=args.soak_s or (5.0 if args.quick else 60.0),
    )


def portable(text: str) -> str:
    """``text`` without this machine's paths: the run's temporary directory as ``$TMP``,
    executables by name, other files relative to the repository."""
    text = re.sub(re.escape(tempfile.gettempdir()) + r"/tidegate-bench-[^/\s\"'`]+", "$TMP", text)
    wrk = shutil.which("wrk")
    if wrk:
        text = text.replace(wrk, "wrk")
    for prefix in (os.path.dirname(sys.executable), str(REPO_ROOT)):
        text = text.replace(prefix + os.sep, "")
    return text


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    settings = _settings(args)
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    invocation = shlex.join(["python", "-m", "bench.run_all", *argv])
    env = capture_environment()
    print(f"{env.cpu_model}, nproc {env.nproc}, load average {env.load_average[0]:.2f}")
    results = run(settings)
    if results.core.loads:
        print("== http summary")
        print(format_load_table(results.core.loads))
    if results.engines is not None:
        print("== embedding engines summary")
        print(format_engines(results.engines))
    if results.generation is not None:
        print("== generation summary")
        print(format_generation(results.generation))
    if results.gateway is not None:
        print("== gateway summary")
        print(format_gateway(results.gateway))
    if results.soak is not None:
        print("== overload soak summary")
        print(format_soak(results.soak))
    checks = [*compute_checks(results.core), *results.checks()]
    print("== targets")
    print(format_checks(checks))
    markdown = render_markdown(env, results.core, checks, invocation, _extra_markdown(results))
    if "trace" in settings.sections:
        replay = trace_report()
        print("== model cache trace replay")
        print(replay)
        markdown += ("\n## Model cache: trace replay\n\nCommand: `python -m bench.trace_replay`"
                     " (policy simulation with tidegate's own eviction and prediction code)."
                     "\n\n" + replay + "\n")
    if args.write:
        args.output.write_text(portable(markdown), "utf-8")
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
