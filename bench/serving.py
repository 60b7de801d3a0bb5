"""Helpers for the generation and gateway benchmarks: servers from a TOML text, /metrics, RSS.

:func:`tidegate_from_toml` starts ``tidegate serve`` with a configuration written out verbatim
(``bench.http_load.tidegate_server`` renders only embedding and echo models) on top of
:func:`bench.http_load.managed_server`, so readiness polling and shutdown are the same.
"""

from __future__ import annotations

import os
import resource
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from bench.http_load import HOST, ServerProcess, tidegate_from_toml

__all__ = [
    "MetricSamples",
    "label_values",
    "raise_fd_limit",
    "read_metrics",
    "rss_kib",
    "server_pid",
    "sum_samples",
    "tidegate_from_toml",
]

MetricSamples = dict[tuple[str, frozenset[tuple[str, str]]], float]
"""``(sample name, labels) -> value`` for every sample on a /metrics page."""


def server_pid(server: ServerProcess) -> int:
    """The pid of our child process that ``server`` runs in (found by its command line)."""
    wanted = [part.encode() for part in server.command]
    parent = os.getpid()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().rstrip(b"\0").split(b"\0")
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == parent and cmdline[-len(wanted) :] == wanted:
            return int(entry.name)
    raise LookupError(f"no child process runs {server.command}")


def rss_kib(pid: int) -> int:
    """Resident set size of ``pid`` and its child processes (an OpenVINO GenAI model's pipeline
    runs in one) in KiB, from /proc/<pid>/status ``VmRSS``."""
    total = 0
    for process in (pid, *_descendants(pid)):
        try:
            lines = Path(f"/proc/{process}/status").read_text().splitlines()
        except FileNotFoundError:  # a child that just exited
            continue
        rss = [int(line.split()[1]) for line in lines if line.startswith("VmRSS:")]
        if not rss and process == pid:
            raise LookupError(f"/proc/{pid}/status has no VmRSS line")
        total += sum(rss)
    return total


def _descendants(pid: int) -> list[int]:
    found: list[int] = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except FileNotFoundError:
        return found
    for task in tasks:
        try:
            children = (task / "children").read_text().split()
        except FileNotFoundError:
            continue
        for child in map(int, children):
            found += [child, *_descendants(child)]
    return found


def read_metrics(base_url: str, *, timeout_s: float = 5.0) -> MetricSamples:
    """Every sample of the server's Prometheus ``/metrics`` page."""
    if not base_url.startswith(f"http://{HOST}:"):
        raise ValueError(f"benchmarks only talk to {HOST}, not {base_url}")
    try:
        with urllib.request.urlopen(base_url + "/metrics", timeout=timeout_s) as response:
            text = response.read().decode()
    except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
        raise RuntimeError(f"could not read {base_url}/metrics: {exc}") from exc
    samples: MetricSamples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def sum_samples(samples: MetricSamples, name: str, **labels: str) -> float | None:
    """The sum of ``name``'s samples whose labels include ``labels``; None if none match."""
    wanted = set(labels.items())
    values = [
        value for (sample, sample_labels), value in samples.items()
        if sample == name and wanted <= sample_labels
    ]
    return sum(values) if values else None


def label_values(samples: MetricSamples, name: str, label: str) -> Mapping[str, float]:
    """``name``'s samples keyed by one label's value."""
    return {
        dict(sample_labels).get(label, ""): value
        for (sample, sample_labels), value in samples.items() if sample == name
    }


def raise_fd_limit(wanted: int) -> int:
    """Raise this process's soft open-file limit towards ``wanted`` (children inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        return target
    return soft
