"""Benchmark results, the target checks computed from them, and BENCHMARKS.md rendering."""

from __future__ import annotations

import enum
import importlib.metadata
import os
import platform
import shlex
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from bench.ceiling import CeilingResult, best_at
from bench.http_load import ServerProcess, WrkResult

__all__ = [
    "Check",
    "Environment",
    "LoadRun",
    "Results",
    "Scenario",
    "capture_environment",
    "compute_checks",
    "format_checks",
    "format_load_table",
    "render_markdown",
]

_PACKAGES = ("onnxruntime", "torch", "sentence-transformers", "tokenizers", "uvicorn", "starlette")


class Scenario(enum.StrEnum):
    BATCHING_ON = "MiniLM, batching on (default config)"
    BATCHING_OFF = "MiniLM, batching off (max_batch_size = 1)"
    ECHO = "tidegate, echo runtime"
    BARE = "bare Starlette echo (no tidegate)"


@dataclass(frozen=True, kw_only=True, slots=True)
class LoadRun:
    scenario: Scenario
    server: ServerProcess
    result: WrkResult
    mean_batch: float | None
    """Mean inputs per batch the server ran during the measured window (tidegate only)."""


@dataclass(slots=True)
class Results:
    ceiling: list[CeilingResult] = field(default_factory=list)
    loads: list[LoadRun] = field(default_factory=list)

    def load(self, scenario: Scenario, connections: int) -> WrkResult | None:
        return next(
            (
                run.result for run in self.loads
                if run.scenario is scenario and run.result.connections == connections
            ),
            None,
        )


@dataclass(frozen=True, kw_only=True, slots=True)
class Environment:
    date: str
    cpu_model: str
    nproc: int
    load_average: tuple[float, float, float]
    python: str
    wrk: str
    packages: dict[str, str]


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _wrk_version() -> str:
    try:
        completed = subprocess.run(
            ["wrk", "--version"], capture_output=True, text=True, timeout=10, check=False
        )
    except OSError:
        return "not installed"
    first = (completed.stdout or completed.stderr).splitlines()[:1]
    return first[0].split(" Copyright")[0].strip() if first else "unknown"


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def capture_environment() -> Environment:
    return Environment(
        date=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        cpu_model=_cpu_model(),
        nproc=len(os.sched_getaffinity(0)),
        load_average=os.getloadavg(),
        python=platform.python_version(),
        wrk=_wrk_version(),
        packages={name: _version(name) for name in _PACKAGES},
    )


# -- target checks -------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True, slots=True)
class Check:
    key: str
    title: str
    target: str
    measured: str = "not measured"
    ratio: float | None = None
    passed: bool | None = None
    """``None`` when the sections it needs were not run."""

    @property
    def verdict(self) -> str:
        if self.passed is None:
            return "SKIP"
        return "PASS" if self.passed else "MISS"


def _check_ceiling(results: Results) -> Check:
    check = Check(
        key="i", title="64-conn server req/s vs best raw ceiling at batch 64",
        target="ratio >= 0.90",
    )
    server = results.load(Scenario.BATCHING_ON, 64)
    best = best_at(results.ceiling, 64)
    if server is None or best is None:
        return check
    ratio = server.requests_per_s / best.sentences_per_s
    measured = (
        f"{server.requests_per_s:.1f} req/s vs {best.sentences_per_s:.1f} sentences/s "
        f"({best.runtime})"
    )
    return Check(
        key=check.key, title=check.title, target=check.target, measured=measured, ratio=ratio,
        passed=ratio >= 0.90,
    )


def _check_batching(results: Results) -> Check:
    check = Check(
        key="ii", title="batching on vs batching off at 64 conns", target="ratio >= 4.0",
    )
    on = results.load(Scenario.BATCHING_ON, 64)
    off = results.load(Scenario.BATCHING_OFF, 64)
    if on is None or off is None or off.requests_per_s <= 0:
        return check
    ratio = on.requests_per_s / off.requests_per_s
    measured = f"{on.requests_per_s:.1f} vs {off.requests_per_s:.1f} req/s"
    return Check(
        key=check.key, title=check.title, target=check.target, measured=measured, ratio=ratio,
        passed=ratio >= 4.0,
    )


def _check_single_latency(results: Results) -> Check:
    check = Check(
        key="iii", title="1-conn p50 vs 1.3 x the fastest raw single-input time + 1 ms",
        target="p50 / limit <= 1.0",
    )
    server = results.load(Scenario.BATCHING_ON, 1)
    raw = min((r for r in results.ceiling if r.batch_size == 1 and r.runtime != "pytorch-fp32"),
              key=lambda r: r.ms_per_sentence, default=None)
    if server is None or raw is None:
        return check
    limit_ms = 1.3 * raw.ms_per_sentence + 1.0
    ratio = server.p50_ms / limit_ms
    measured = (
        f"p50 {server.p50_ms:.2f} ms vs limit {limit_ms:.2f} ms "
        f"(raw {raw.runtime} {raw.ms_per_sentence:.2f} ms)"
    )
    return Check(
        key=check.key, title=check.title, target=check.target, measured=measured, ratio=ratio,
        passed=ratio <= 1.0,
    )


def _check_echo(results: Results) -> Check:
    check = Check(
        key="iv", title="echo runtime vs bare Starlette echo at 10 conns; echo p99",
        target="ratio >= 0.60 and p99 < 2 ms",
    )
    echo = results.load(Scenario.ECHO, 10)
    bare = results.load(Scenario.BARE, 10)
    if echo is None or bare is None or bare.requests_per_s <= 0:
        return check
    ratio = echo.requests_per_s / bare.requests_per_s
    measured = (
        f"{echo.requests_per_s:.0f} vs {bare.requests_per_s:.0f} req/s, "
        f"echo p99 {echo.p99_ms:.2f} ms"
    )
    return Check(
        key=check.key, title=check.title, target=check.target, measured=measured, ratio=ratio,
        passed=ratio >= 0.60 and echo.p99_ms < 2.0,
    )


def compute_checks(results: Results) -> list[Check]:
    return [
        _check_ceiling(results),
        _check_batching(results),
        _check_single_latency(results),
        _check_echo(results),
    ]


def _ratio_text(check: Check) -> str:
    return f"{check.ratio:.2f}" if check.ratio is not None else "-"


def format_checks(checks: Sequence[Check]) -> str:
    return "\n".join(
        f"{c.verdict} ({c.key}) {c.title}: ratio {_ratio_text(c)} [{c.target}]; {c.measured}"
        for c in checks
    )


def format_load_table(loads: Sequence[LoadRun]) -> str:
    header = (
        f"{'scenario':<44} {'conns':>5} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'non-2xx':>7} {'errors':>6} {'batch':>6}"
    )
    lines = [header, "-" * len(header)]
    for run in loads:
        r = run.result
        batch = f"{run.mean_batch:.1f}" if run.mean_batch is not None else "-"
        lines.append(
            f"{run.scenario.value:<44} {r.connections:>5} {r.requests_per_s:>9.1f} "
            f"{r.p50_ms:>8.2f} {r.p99_ms:>8.2f} {r.non_2xx:>7} {r.socket_errors:>6} {batch:>6}"
        )
    return "\n".join(lines)


# -- BENCHMARKS.md ---------------------------------------------------------------------------


def _machine_section(env: Environment) -> list[str]:
    load = ", ".join(f"{value:.2f}" for value in env.load_average)
    packages = ", ".join(f"{name} {version}" for name, version in env.packages.items())
    return [
        "## Machine",
        "",
        f"- Date: {env.date}",
        f"- CPU: {env.cpu_model}",
        f"- nproc: {env.nproc}",
        f"- Load average when the run started (1/5/15 min): {load}",
        f"- Python {env.python}; {packages}",
        f"- Load generator: {env.wrk}",
        "",
    ]


def _commands_section(results: Results, invocation: str) -> list[str]:
    lines = ["## Commands", "",
             "Paths are relative to the repository; `$TMP` is the run's temporary directory.",
             "", "```", invocation, "```", ""]
    seen: set[tuple[str, ...]] = set()
    for run in results.loads:
        if run.server.command in seen:
            continue
        seen.add(run.server.command)
        lines += [f"{run.scenario.value}: server", "", "```", shlex.join(run.server.command), "```"]
        if run.server.config_text:
            lines += ["", "```toml", run.server.config_text.rstrip(), "```"]
        lines.append("")
    for run in results.loads:
        lines += [
            f"{run.scenario.value}, {run.result.connections} conns "
            "(after a discarded warm-up run of the same shape):",
            "", "```", shlex.join(run.result.command), "```", "",
        ]
    return lines


def _ceiling_section(ceiling: Sequence[CeilingResult]) -> list[str]:
    lines = [
        "## Raw in-process ceiling (all-MiniLM-L6-v2)",
        "",
        "The same deterministic ~12-word sentences for every runtime. `onnx-fp32`, "
        "`openvino-fp32` and `openvino-bf16` time tidegate's runtime on that engine: "
        "tokenization plus the forward pass, as the server does per batch; `pytorch-fp32` is "
        "sentence-transformers `encode(normalize_embeddings=True)` with 2 torch threads.",
        "",
        "| runtime | batch | sentences/s | ms/sentence | batch p50 ms | iterations |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in ceiling:
        lines.append(
            f"| {r.runtime} | {r.batch_size} | {r.sentences_per_s:.1f} | "
            f"{r.ms_per_sentence:.3f} | {r.batch_p50_ms:.2f} | {r.iterations} |"
        )
    return [*lines, ""]


def _load_section(loads: Sequence[LoadRun]) -> list[str]:
    lines = [
        "## HTTP load (wrk, one sentence per request)",
        "",
        "`mean batch` is inputs per batch the server ran during the measured run (from "
        "`/metrics`). `errors` counts wrk's connect/read/write errors and timeouts.",
        "",
        "| scenario | conns | req/s | p50 ms | p90 ms | p99 ms | max ms | non-2xx | errors "
        "| mean batch |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for run in loads:
        r = run.result
        batch = f"{run.mean_batch:.1f}" if run.mean_batch is not None else "-"
        lines.append(
            f"| {run.scenario.value} | {r.connections} | {r.requests_per_s:.1f} | "
            f"{r.p50_ms:.2f} | {r.p90_ms:.2f} | {r.p99_ms:.2f} | {r.max_ms:.2f} | "
            f"{r.non_2xx} | {r.socket_errors} | {batch} |"
        )
    return [*lines, ""]


def _checks_section(checks: Sequence[Check]) -> list[str]:
    lines = [
        "## Targets",
        "",
        "| # | target | measured | ratio | threshold | result |",
        "|---|---|---|---:|---|---|",
    ]
    for c in checks:
        lines.append(
            f"| {c.key} | {c.title} | {c.measured} | {_ratio_text(c)} | {c.target} "
            f"| {c.verdict} |"
        )
    return [*lines, ""]


_NOTES = [
    "## Notes",
    "",
    "- wrk runs on the same machine as the server and shares its cores; at high request rates "
    "it takes CPU the server would otherwise use, so HTTP numbers are a lower bound.",
    "- Each load run is preceded by a discarded warm-up run at the same concurrency; every "
    "server was started fresh and waited on `/health/ready` before any load.",
    "- Numbers from a busy machine (see the load average above) are not comparable to numbers "
    "from an idle one.",
    "",
]


def render_markdown(
    env: Environment, results: Results, checks: Sequence[Check], invocation: str,
    extra_sections: Sequence[str] = (),
) -> str:
    """The whole BENCHMARKS.md; ``extra_sections`` (lines) go before the targets table."""
    lines = [
        "# tidegate benchmarks",
        "",
        f"Generated by `{invocation}` (`make bench`) on {env.date}.",
        "",
        *_machine_section(env),
        *_commands_section(results, invocation),
    ]
    if results.ceiling:
        lines += _ceiling_section(results.ceiling)
    if results.loads:
        lines += _load_section(results.loads)
    lines += extra_sections
    lines += _checks_section(checks)
    lines += _NOTES
    return "\n".join(lines)
