"""tidegate on Ray Serve against single-process tidegate, and the two ways requests can enter.

Three servers of the bundled MiniLM, one after the other, each measured with wrk at 1
connection (added latency) and 64 connections (throughput), one short sentence per request:

* ``single``: ``tidegate serve`` (one process, the model in it);
* ``ray-tidegate``: ``tidegate serve --ray --ingress tidegate``: tidegate's own server in the
  ``serve`` process, calling the model's replica through a Serve deployment handle;
* ``ray-serve``: ``tidegate serve --ray --ingress serve``: Serve's HTTP proxy in front of
  tidegate's ingress app as a deployment, which calls the replica the same way.

Each Ray run starts a local single-node Ray (all of this machine's cores) with one replica.
The faster Ray ingress at 64 connections is the default of ``--ingress``. Run with
``python -m bench.ray_ingress`` (``--help`` for durations); ``python -m bench.run_all --only
ray`` puts the table in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import dataclass
from pathlib import Path

from bench.http_load import WrkResult, load_test, tidegate_from_toml, write_bodies
from bench.report import Check
from bench.workload import embedding_bodies, make_sentences

__all__ = ["RayResults", "RaySettings", "main", "ray_checks", "ray_markdown", "run"]

MODEL = "minilm"
VARIANTS = {
    "single": (),
    "ray-tidegate": ("--ray", "--ingress", "tidegate"),
    "ray-serve": ("--ray", "--ingress", "serve"),
}
CONNECTIONS = (1, 64)
_CONFIG = f"""
[server]
log_level = "warning"

[[models]]
id = "{MODEL}"
runtime = "embedding"
[models.scaling]
replicas = 1
num_cpus = 1
"""


@dataclass(frozen=True, slots=True)
class RaySettings:
    duration_s: int = 10
    warmup_s: int = 3


@dataclass(frozen=True, slots=True)
class RayResults:
    runs: dict[tuple[str, int], WrkResult]
    ready_s: dict[str, float]


def run(settings: RaySettings, workdir: Path) -> RayResults:
    bodies = write_bodies(workdir / "ray-bodies.txt",
                          embedding_bodies(MODEL, make_sentences(512)))
    runs: dict[tuple[str, int], WrkResult] = {}
    ready: dict[str, float] = {}
    for variant, args in VARIANTS.items():
        with tidegate_from_toml(_CONFIG, workdir=workdir, name=variant, args=args,
                                ready_timeout_s=300) as server:
            ready[variant] = server.ready_s
            for connections in CONNECTIONS:
                result = load_test(server.embeddings_url, bodies, connections=connections,
                                   duration_s=settings.duration_s, warmup_s=settings.warmup_s)
                runs[variant, connections] = result
                print(f"{variant:13s} {connections:3d} conns: {result.requests_per_s:8.1f} req/s "
                      f"p50 {result.p50_ms:7.2f} ms p99 {result.p99_ms:7.2f} ms "
                      f"non-2xx {result.non_2xx}", flush=True)
    return RayResults(runs, ready)


def faster_ingress(results: RayResults) -> str:
    return max(("ray-tidegate", "ray-serve"), key=lambda v: results.runs[v, 64].requests_per_s)


def ray_checks(results: RayResults | None) -> list[Check]:
    if results is None:
        return [Check(key=key, title=title, target=target) for key, title, target in (
            ("y1", "Ray: the default ingress (tidegate) is the faster at 64 connections",
             "tidegate's req/s >= Serve proxy's"),
            ("y2", "Ray p50 at 1 connection vs single process", "reported"),
            ("y3", "Ray throughput at 64 connections vs single process", "reported"))]
    single1, single64 = results.runs["single", 1], results.runs["single", 64]
    best = faster_ingress(results)
    other = "ray-serve" if best == "ray-tidegate" else "ray-tidegate"
    ray1, ray64 = results.runs[best, 1], results.runs[best, 64]
    return [
        Check(key="y1", title="Ray: the default ingress (tidegate) is the faster at 64 connections",
              target="tidegate's req/s >= Serve proxy's",
              measured=f"ray-tidegate {results.runs['ray-tidegate', 64].requests_per_s:.1f} vs "
                       f"ray-serve {results.runs['ray-serve', 64].requests_per_s:.1f} req/s",
              ratio=results.runs["ray-tidegate", 64].requests_per_s
              / results.runs["ray-serve", 64].requests_per_s,
              passed=best == "ray-tidegate"),
        Check(key="y2", title=f"Ray ({best}) p50 at 1 connection vs single process",
              target="reported",
              measured=f"p50 {ray1.p50_ms:.2f} vs {single1.p50_ms:.2f} ms "
                       f"(+{ray1.p50_ms - single1.p50_ms:.2f} ms; {other}: "
                       f"{results.runs[other, 1].p50_ms:.2f} ms)",
              ratio=ray1.p50_ms / single1.p50_ms, passed=True),
        Check(key="y3", title=f"Ray ({best}) throughput at 64 connections vs single process",
              target="reported",
              measured=f"{ray64.requests_per_s:.1f} vs {single64.requests_per_s:.1f} req/s",
              ratio=ray64.requests_per_s / single64.requests_per_s, passed=True),
    ]


def ray_markdown(results: RayResults, checks: list[Check]) -> list[str]:
    lines = [
        "## Ray Serve: ingress choice and cost (MiniLM, one replica, local single-node Ray)",
        "",
        "Command: `python -m bench.run_all --only ray` (alone: `python -m bench.ray_ingress`). "
        "One short sentence per `POST /v1/embeddings`, wrk on 127.0.0.1 sharing the machine's "
        "cores with the server, Ray and the replica. `single` is `tidegate serve`; "
        "`ray-tidegate` is `tidegate serve --ray --ingress tidegate` (tidegate's server calls "
        "the replica's deployment handle); `ray-serve` is `--ingress serve` (Serve's HTTP "
        "proxy, then tidegate's ingress app as a deployment, then the replica).",
        "",
        "| server | ready s | 1 conn p50 ms | 1 conn p99 ms | 1 conn req/s | 64 conns req/s "
        "| 64 conns p50 ms | 64 conns p99 ms | non-2xx |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for variant in VARIANTS:
        one, many = results.runs[variant, 1], results.runs[variant, 64]
        lines.append(
            f"| {variant} | {results.ready_s[variant]:.1f} | {one.p50_ms:.2f} | "
            f"{one.p99_ms:.2f} | {one.requests_per_s:.1f} | {many.requests_per_s:.1f} | "
            f"{many.p50_ms:.2f} | {many.p99_ms:.2f} | {one.non_2xx + many.non_2xx} |")
    lines.append("")
    for check in checks:
        lines.append(f"- **{check.verdict}** ({check.key}) {check.title}: {check.measured} "
                     f"[{check.target}]")
    lines.append("")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.ray_ingress", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=int, default=10, help="seconds per measured run")
    parser.add_argument("--warmup", type=int, default=3, help="seconds of discarded warm-up")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tidegate-ray-bench-") as tmp:
        results = run(RaySettings(args.duration, args.warmup), Path(tmp))
    print("\n".join(ray_markdown(results, ray_checks(results))))


if __name__ == "__main__":
    main()
