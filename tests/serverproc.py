"""Start the real ``tidegate serve`` in a subprocess on an ephemeral port, for e2e tests."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx


def with_no_drain_grace(config_toml: str) -> str:
    """``config_toml`` with ``[server] drain_grace_s = 0`` unless it sets a grace itself: a test
    server stops at once instead of holding its listener open for a load balancer."""
    if "drain_grace_s" in config_toml:
        return config_toml
    if re.search(r"^\[server\]\s*$", config_toml, flags=re.MULTILINE):
        return re.sub(r"^\[server\]\s*$", "[server]\ndrain_grace_s = 0", config_toml, count=1,
                      flags=re.MULTILINE)
    return "[server]\ndrain_grace_s = 0\n" + config_toml


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServerProcess:
    def __init__(self, proc: subprocess.Popen[bytes], port: int, log_path: Path) -> None:
        self.proc = proc
        self.port = port
        self.log_path = log_path
        self.url = f"http://127.0.0.1:{port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, path: str = "/health/ready", timeout_s: float = 120.0) -> None:
        """Poll until the server answers 200 on ``path``; fail with its log if it dies."""
        deadline = time.monotonic() + timeout_s
        with httpx.Client(timeout=2.0) as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
                try:
                    if client.get(self.url + path).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                time.sleep(0.05)
        raise TimeoutError(f"server not ready after {timeout_s}s:\n{self.log()}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@contextmanager
def run_server(
    tmp_path: Path, config_toml: str, cache_dir: Path, *, wait: str | None = "/health/ready",
    args: tuple[str, ...] = (), wait_s: float = 120.0,
) -> Iterator[ServerProcess]:
    port = free_port()
    config = tmp_path / "tidegate.toml"
    config.write_text(with_no_drain_grace(config_toml), encoding="utf-8")
    log_path = tmp_path / "server.log"
    env = dict(os.environ, TIDEGATE_CACHE_DIR=str(cache_dir), HF_HUB_OFFLINE="1")
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tidegate", "serve", "--config", str(config),
             "--port", str(port), *args],
            stdout=log, stderr=subprocess.STDOUT, env=env,
        )
    server = ServerProcess(proc, port, log_path)
    try:
        if wait:
            server.wait_ready(wait, timeout_s=wait_s)
        yield server
    finally:
        server.stop()
