"""Non-streamed completions and chat through the real server: ``request_timeout_s`` bounds the
whole answer (504, the sequence leaves the batch) and a client that hangs up frees its sequence
at once; the same for a remote model, whose upstream exchange is closed.

The local model never ends on its own (``endless_dir``), so every request here runs until it is
timed out or its client leaves, whatever the speed of the machine.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from tests.e2e.test_embeddings_api import metric
from tests.serverproc import ServerProcess, run_server
from tests.upstream.faulty_upstream import FaultyUpstream

pytestmark = pytest.mark.e2e

ENDLESS = "endless"
TIMEOUT_S = 2.0
ENDPOINTS = {
    "/v1/completions": {"prompt": "The quick brown fox"},
    "/v1/chat/completions": {"messages": [{"role": "user", "content": "hi"}]},
}


@pytest.fixture(scope="module")
def upstream() -> Iterator[FaultyUpstream]:
    with FaultyUpstream("held") as faulty:
        yield faulty


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path, endless_dir: Path,
           upstream: FaultyUpstream) -> Iterator[ServerProcess]:
    # "patient": read_s above request_timeout_s, so the request timeout fires first;
    # "impatient": read_s below it, so the replica's silence fires first.
    config = f"""
[server]
request_timeout_s = {TIMEOUT_S}

[[models]]
id = "{ENDLESS}"
runtime = "causal-lm"
source = "{endless_dir}"

[[models]]
id = "patient"
runtime = "remote"
upstreams = ["{upstream.url}"]
[models.upstream.timeouts]
read_s = 30
[models.upstream.retry]
max_retries = 0

[[models]]
id = "impatient"
runtime = "remote"
upstreams = ["{upstream.url}"]
[models.upstream.timeouts]
read_s = 0.2
[models.upstream.retry]
max_retries = 0
"""
    with run_server(tmp_path_factory.mktemp("gen-timeouts"), config, cache_dir) as proc:
        yield proc


@pytest.fixture()
def held(upstream: FaultyUpstream) -> Iterator[FaultyUpstream]:
    """The upstream answers nothing to non-streamed requests until the test ends."""
    upstream.hold()
    try:
        yield upstream
    finally:
        upstream.release()


def metrics_page(server: ServerProcess) -> str:
    return httpx.get(server.url + "/metrics", timeout=10).text


def sample(page: str, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels``."""
    wanted = [f'{key}="{value}"' for key, value in labels.items()]
    total = 0.0
    for line in page.splitlines():
        if line.startswith(name + "{") and all(label in line for label in wanted):
            total += float(line.rsplit(" ", 1)[1])
    return total


def wait_until(condition: Callable[[], bool], what: str, timeout_s: float = 10.0) -> None:
    """Poll the server's state until ``condition`` holds; fail naming ``what`` after the
    deadline."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: still not so after {timeout_s}s")
        time.sleep(0.02)


def running(server: ServerProcess) -> float:
    return metric(metrics_page(server), "tidegate_generation_running", ENDLESS)


def in_use(server: ServerProcess, model: str) -> float:
    return sample(metrics_page(server), "tidegate_upstream_in_use", model=model)


def aborted(server: ServerProcess) -> float:
    return sample(metrics_page(server), "tidegate_generation_finished_total", model=ENDLESS,
                  reason="abort")


def open_request(server: ServerProcess, path: str, body: dict[str, Any]) -> socket.socket:
    """Send one request on a raw connection and return it unread (the caller hangs up)."""
    payload = orjson.dumps(body)
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\n\r\n").encode()
    sock.sendall(head + payload)
    return sock


@pytest.mark.parametrize("path", list(ENDPOINTS))
def test_non_streamed_generation_past_the_timeout_is_504_and_leaves_the_batch(
    server: ServerProcess, path: str
) -> None:
    before = aborted(server)
    started = time.monotonic()
    response = httpx.post(server.url + path, timeout=30, json={
        "model": ENDLESS, "max_tokens": 1_000_000, "temperature": 0, **ENDPOINTS[path]})
    elapsed = time.monotonic() - started
    assert response.status_code == 504, response.text
    error = response.json()["error"]
    assert (error["type"], error["code"]) == ("timeout", "timeout")
    assert f"timed out after {TIMEOUT_S:g}s" in error["message"]
    assert TIMEOUT_S - 0.05 <= elapsed < TIMEOUT_S + 5  # the loop may fire a timer ~1 ms early
    wait_until(lambda: running(server) == 0, "the timed-out sequence is still running")
    assert aborted(server) == before + 1
    page = metrics_page(server)
    assert sample(page, "tidegate_generation_tokens_total", model=ENDLESS, kind="completion") > 0


@pytest.mark.parametrize("path", list(ENDPOINTS))
def test_client_hanging_up_on_a_non_streamed_generation_frees_its_sequence(
    server: ServerProcess, path: str
) -> None:
    before = aborted(server)
    sock = open_request(server, path, {"model": ENDLESS, "max_tokens": 1_000_000,
                                       "temperature": 0, **ENDPOINTS[path]})
    try:
        wait_until(lambda: running(server) == 1, "the request never started decoding")
    finally:
        sock.close()
    # Well inside the request timeout: the disconnect, not the timeout, ended it.
    wait_until(lambda: running(server) == 0, "the sequence outlived its client",
               timeout_s=TIMEOUT_S / 2)
    assert aborted(server) == before + 1


def test_remote_non_streamed_request_is_bounded_by_the_request_timeout(
    server: ServerProcess, held: FaultyUpstream
) -> None:
    started = time.monotonic()
    response = httpx.post(server.url + "/v1/chat/completions", timeout=30, json={
        "model": "patient", "messages": [{"role": "user", "content": "hi"}]})
    elapsed = time.monotonic() - started
    assert response.status_code == 504, response.text
    assert response.json()["error"]["code"] == "timeout"
    assert TIMEOUT_S - 0.05 <= elapsed < TIMEOUT_S + 5  # the loop may fire a timer ~1 ms early
    wait_until(lambda: in_use(server, "patient") == 0, "the upstream exchange is still open")


def test_remote_read_timeout_below_the_request_timeout_fires_first(
    server: ServerProcess, held: FaultyUpstream
) -> None:
    started = time.monotonic()
    response = httpx.post(server.url + "/v1/chat/completions", timeout=30, json={
        "model": "impatient", "messages": [{"role": "user", "content": "hi"}]})
    assert response.status_code == 504, response.text
    assert response.json()["error"]["code"] == "upstream_timeout"
    assert time.monotonic() - started < TIMEOUT_S
    wait_until(lambda: in_use(server, "impatient") == 0, "the upstream exchange is still open")


def test_client_hanging_up_on_a_remote_request_closes_the_upstream_exchange(
    server: ServerProcess, held: FaultyUpstream
) -> None:
    hits = held.hits["/v1/chat/completions"]
    sock = open_request(server, "/v1/chat/completions", {
        "model": "patient", "messages": [{"role": "user", "content": "hi"}]})
    try:
        wait_until(lambda: held.hits["/v1/chat/completions"] > hits,
                   "the request never reached the upstream")
        assert in_use(server, "patient") == 1
    finally:
        sock.close()
    wait_until(lambda: in_use(server, "patient") == 0,
               "the upstream exchange outlived its client", timeout_s=TIMEOUT_S / 2)
