"""HTTP load: start a server as a subprocess on a free local port, drive it with ``wrk``.

Servers are started with :func:`tidegate_server` (or :func:`managed_server` for any command),
which waits on a readiness URL by polling (bounded) and always stops the process on exit:
SIGINT first, for a graceful shutdown, then SIGKILL. :func:`load_test` runs a warm-up and a
measured ``wrk`` run with ``bench/post_embedding.lua`` and parses its machine-readable line.
Everything binds and connects to 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeVar

__all__ = [
    "LUA_SCRIPT",
    "REPO_ROOT",
    "BatchTotals",
    "ModelSpec",
    "ServerProcess",
    "WrkResult",
    "free_port",
    "load_test",
    "managed_server",
    "read_batch_totals",
    "render_tidegate_toml",
    "run_on_uvloop",
    "run_wrk",
    "tidegate_from_toml",
    "tidegate_server",
    "write_bodies",
]

REPO_ROOT = Path(__file__).resolve().parent.parent
LUA_SCRIPT = Path(__file__).resolve().parent / "post_embedding.lua"
HOST = "127.0.0.1"
EMBEDDINGS_PATH = "/v1/embeddings"
_WRK_PREFIX = "TIDEGATE_WRK "
_READY_POLL_S = 0.1
_STOP_GRACE_S = 15.0


@dataclass(frozen=True, kw_only=True, slots=True)
class ModelSpec:
    """One ``[[models]]`` entry of the generated config."""

    id: str
    runtime: Literal["embedding", "echo"] = "embedding"
    max_batch_size: int | None = None
    """``None`` keeps tidegate's default batching config."""


@dataclass(frozen=True, kw_only=True, slots=True)
class ServerProcess:
    """A running server: where to reach it and how it was started."""

    base_url: str
    command: tuple[str, ...]
    log_path: Path
    config_text: str | None = None
    ready_s: float = 0.0
    """Seconds from starting the process to its first ready answer."""
    pid: int | None = None
    """The server process (for /proc/<pid>/status); None for a server started elsewhere."""

    @property
    def embeddings_url(self) -> str:
        return self.base_url + EMBEDDINGS_PATH


@dataclass(frozen=True, kw_only=True, slots=True)
class WrkResult:
    connections: int
    threads: int
    duration_s: int
    requests: int
    requests_per_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    max_ms: float
    non_2xx: int
    socket_errors: int
    """Connect, read and write errors plus timeouts, as wrk counts them."""
    command: tuple[str, ...]

    @property
    def ok_per_s(self) -> float:
        """2xx responses per second: what the server served, where ``requests_per_s`` also
        counts its fast refusals (a 429 answered in microseconds is not capacity)."""
        if self.requests <= 0:
            return 0.0
        return self.requests_per_s * (self.requests - self.non_2xx) / self.requests


@dataclass(frozen=True, slots=True)
class BatchTotals:
    """The server's cumulative ``tidegate_batch_size_items`` histogram sum and count."""

    items: float
    batches: float

    def mean_since(self, earlier: BatchTotals) -> float | None:
        batches = self.batches - earlier.batches
        return (self.items - earlier.items) / batches if batches > 0 else None


def free_port() -> int:
    """A port the kernel considers free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def render_tidegate_toml(models: Sequence[ModelSpec], *, log_level: str = "info") -> str:
    lines = ["[server]", f'host = "{HOST}"', f'log_level = "{log_level}"']
    for model in models:
        lines += ["", "[[models]]", f'id = "{model.id}"', f'runtime = "{model.runtime}"']
        if model.max_batch_size is not None:
            lines += ["[models.batching]", f"max_batch_size = {model.max_batch_size}"]
    return "\n".join(lines) + "\n"


def _tidegate_command() -> list[str]:
    # The console script beside this interpreter is what `tidegate serve` runs in the venv.
    script = Path(sys.executable).parent / "tidegate"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "tidegate"]


def _server_env() -> dict[str, str]:
    # An explicit environment: a forked child must not inherit changes a library made to
    # ours after fork (tokenizers turns off its parallelism in forked children).
    env = dict(os.environ)
    env["HF_HUB_OFFLINE"] = "1"
    env.setdefault("TOKENIZERS_PARALLELISM", "true")
    return env


def _log_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _is_ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2.0) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


def _wait_ready(
    process: subprocess.Popen[bytes], url: str, log_path: Path, timeout_s: float
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"server exited with code {process.returncode} before {url} was ready; "
                f"log tail:\n{_log_tail(log_path)}"
            )
        if _is_ready(url):
            return
        time.sleep(_READY_POLL_S)
    raise TimeoutError(
        f"{url} was not ready after {timeout_s:.0f}s; log tail:\n{_log_tail(log_path)}"
    )


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=_STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@contextlib.contextmanager
def managed_server(
    command: Sequence[str],
    *,
    port: int,
    log_path: Path,
    ready_path: str = "/health/ready",
    ready_timeout_s: float = 180.0,
    config_text: str | None = None,
) -> Iterator[ServerProcess]:
    """Run ``command`` (which must serve on ``port``) until the block exits."""
    base_url = f"http://{HOST}:{port}"
    started = time.perf_counter()
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            list(command), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            env=_server_env(), cwd=REPO_ROOT,
        )
    try:
        _wait_ready(process, base_url + ready_path, log_path, ready_timeout_s)
        yield ServerProcess(
            base_url=base_url, command=tuple(command), log_path=log_path,
            config_text=config_text, ready_s=time.perf_counter() - started, pid=process.pid,
        )
    finally:
        _stop(process)


@contextlib.contextmanager
def tidegate_server(
    models: Sequence[ModelSpec], *, workdir: Path, name: str, ready_timeout_s: float = 180.0
) -> Iterator[ServerProcess]:
    """``tidegate serve`` with a config generated from ``models``, ready to take load."""
    with tidegate_from_toml(
        render_tidegate_toml(models), workdir=workdir, name=name, ready_timeout_s=ready_timeout_s
    ) as server:
        yield server


@contextlib.contextmanager
def tidegate_from_toml(
    config_text: str, *, workdir: Path, name: str, ready_timeout_s: float = 180.0,
    args: Sequence[str] = (),
) -> Iterator[ServerProcess]:
    """``tidegate serve --config <name>.toml --port <free port> [args]`` until the block
    exits."""
    config_path = workdir / f"{name}.toml"
    config_path.write_text(config_text, encoding="utf-8")
    port = free_port()
    command = [*_tidegate_command(), "serve", "--config", str(config_path), "--port", str(port),
               *args]
    with managed_server(
        command, port=port, log_path=workdir / f"{name}.log",
        ready_timeout_s=ready_timeout_s, config_text=config_text,
    ) as server:
        yield server


def write_bodies(path: Path, bodies: Sequence[bytes]) -> Path:
    """One JSON body per line, as ``post_embedding.lua`` reads them."""
    path.write_bytes(b"\n".join(bodies) + b"\n")
    return path


def _wrk_binary() -> str:
    found = shutil.which("wrk")
    if found is None:
        raise FileNotFoundError("wrk is not installed (Debian: apt-get install wrk)")
    return found


def _parse_wrk(stdout: str) -> dict[str, float]:
    for line in stdout.splitlines():
        if line.startswith(_WRK_PREFIX):
            data: dict[str, float] = json.loads(line[len(_WRK_PREFIX) :])
            return data
    raise RuntimeError(f"wrk printed no {_WRK_PREFIX.strip()} line; output:\n{stdout}")


def run_wrk(
    url: str, bodies_path: Path, *, connections: int, duration_s: int, timeout_s: int = 10
) -> WrkResult:
    """One wrk run: 2 threads for 2+ connections, else 1. Stops by itself after the duration."""
    threads = 2 if connections >= 2 else 1
    command = (
        _wrk_binary(), f"-t{threads}", f"-c{connections}", f"-d{duration_s}s",
        f"--timeout={timeout_s}s", "-s", str(LUA_SCRIPT), url, "--", str(bodies_path),
    )
    completed = subprocess.run(
        command, capture_output=True, text=True, timeout=duration_s + timeout_s + 30,
        check=False,
    )
    if completed.returncode != 0:
        raise RuntimeError(
            f"wrk exited with {completed.returncode}:\n{completed.stdout}{completed.stderr}"
        )
    data = _parse_wrk(completed.stdout)
    seconds = data["duration_us"] / 1e6
    return WrkResult(
        connections=connections,
        threads=threads,
        duration_s=duration_s,
        requests=int(data["requests"]),
        requests_per_s=data["requests"] / seconds if seconds > 0 else 0.0,
        p50_ms=data["p50_us"] / 1000,
        p90_ms=data["p90_us"] / 1000,
        p99_ms=data["p99_us"] / 1000,
        mean_ms=data["mean_us"] / 1000,
        max_ms=data["max_us"] / 1000,
        non_2xx=int(data["non2xx"]),
        socket_errors=int(
            data["connect_errors"] + data["read_errors"] + data["write_errors"]
            + data["timeouts"]
        ),
        command=command,
    )


def load_test(
    url: str, bodies_path: Path, *, connections: int, duration_s: int, warmup_s: int
) -> WrkResult:
    """A discarded warm-up run, then the measured run, at the same concurrency."""
    if warmup_s > 0:
        run_wrk(url, bodies_path, connections=connections, duration_s=warmup_s)
    return run_wrk(url, bodies_path, connections=connections, duration_s=duration_s)


def read_batch_totals(base_url: str, model: str) -> BatchTotals | None:
    """Scrape tidegate's /metrics for how many inputs and batches the model has run."""
    try:
        with urllib.request.urlopen(base_url + "/metrics", timeout=5.0) as response:
            text = response.read().decode()
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None
    values: dict[str, float] = {}
    label = f'{{model="{model}"}}'
    for suffix in ("sum", "count"):
        prefix = f"tidegate_batch_size_items_{suffix}{label} "
        for line in text.splitlines():
            if line.startswith(prefix):
                values[suffix] = float(line[len(prefix) :])
    if len(values) != 2:
        return None
    return BatchTotals(items=values["sum"], batches=values["count"])


_T = TypeVar("_T")


def run_on_uvloop(coroutine: Awaitable[_T]) -> _T:
    """Run a load generator's ``coroutine`` to completion on uvloop (asyncio without it)."""

    async def main() -> _T:
        return await coroutine

    try:
        import uvloop
    except ImportError:
        return asyncio.run(main())
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main())
