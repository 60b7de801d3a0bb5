"""Graceful drain through the real server: SIGTERM with embedding requests and streams in flight.

The embedding model is a ``python`` model whose every batch waits for a file the test creates
(so its 20 requests stay in flight, one computing and 19 queued, until the test lets them go);
the streams come from a model that never ends on its own (``endless_dir``).
"""

from __future__ import annotations

import asyncio
import re
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import orjson
import pytest

from tests.e2e.test_embeddings_api import metric
from tests.serverproc import ServerProcess, run_server
from tests.upstream.faulty_upstream import FaultyUpstream

pytestmark = pytest.mark.e2e

EMBEDS = 20
STREAMS = 4
GRACE_S = 3.0
EXIT_MARGIN_S = 15.0


async def until(condition: Callable[[], Awaitable[bool]], what: str,
                timeout_s: float = 30.0) -> None:
    """Poll ``condition`` until it holds; fail naming ``what`` after the deadline."""
    deadline = time.monotonic() + timeout_s
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: still not so after {timeout_s}s")
        await asyncio.sleep(0.02)


async def read_stream(http: httpx.AsyncClient, body: dict[str, object],
                      first: asyncio.Event, path: str = "/v1/completions"
                      ) -> tuple[int, list[bytes]]:
    """Stream a completion; ``first`` is set once its first event arrived. Returns the status
    and every ``data:`` payload."""
    events: list[bytes] = []
    async with http.stream("POST", path, json={**body, "stream": True}) as response:
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                events.append(line[len("data: "):].encode())
                first.set()
    return response.status_code, events


def outcome(status: int, events: list[bytes], finish_reason: str | None = "length") -> str:
    """"finished" (``finish_reason``, then [DONE]) or "cut" (the error event, then [DONE])."""
    assert status == 200
    assert events[-1] == b"[DONE]", events[-3:]
    last = orjson.loads(events[-2])
    if "error" in last:
        assert last["error"]["code"] == "shutting_down", last
        return "cut"
    assert last["choices"][0].get("finish_reason") == finish_reason, last
    return "finished"


def wait_exit(server: ServerProcess, signalled_at: float, within_s: float) -> float:
    """Wait for the server to exit on its own; return how long after the signal it did."""
    server.proc.wait(timeout=max(0.0, signalled_at + within_s - time.monotonic()))
    return time.monotonic() - signalled_at


def counts(server: ServerProcess) -> tuple[int, int]:
    found = re.search(r"shutdown complete: (\d+) requests drained, (\d+) cut", server.log())
    assert found, server.log()
    return int(found[1]), int(found[2])


def test_sigterm_drains_requests_in_flight_and_refuses_new_ones(
    tmp_path: Path, cache_dir: Path, endless_dir: Path
) -> None:
    release = tmp_path / "release"
    events_log = tmp_path / "events.log"
    timeout_s = 60.0
    config = f"""
[server]
drain_grace_s = {GRACE_S}
shutdown_timeout_s = {timeout_s}

[[models]]
id = "held"
runtime = "python"
source = "tests.models.fixture_models:Blob"
options = {{ name = "held", log = "{events_log}", embed_until = "{release}" }}
[models.batching]
max_batch_size = 1

[[models]]
id = "endless"
runtime = "causal-lm"
source = "{endless_dir}"
"""
    with run_server(tmp_path, config, cache_dir) as server:

        async def scenario() -> tuple[float, list[httpx.Response], list[str]]:
            limits = httpx.Limits(max_connections=EMBEDS + STREAMS)
            async with httpx.AsyncClient(base_url=server.url, timeout=120,
                                         limits=limits) as http, \
                    httpx.AsyncClient(base_url=server.url, timeout=10) as probe:

                async def queued() -> bool:
                    page = (await probe.get("/metrics")).text
                    return metric(page, "tidegate_queue_depth_items", "held") == EMBEDS - 1

                embeds = [asyncio.create_task(http.post(
                    "/v1/embeddings", json={"model": "held", "input": f"text {i}"}))
                    for i in range(EMBEDS)]
                await until(queued, "one embedding batch computing and 19 requests queued")
                firsts = [asyncio.Event() for _ in range(STREAMS)]
                streams = [asyncio.create_task(read_stream(http, {
                    "model": "endless", "prompt": "The quick brown fox", "max_tokens": 3000,
                    "temperature": 0}, first)) for first in firsts]
                await asyncio.wait_for(asyncio.gather(*(f.wait() for f in firsts)), 60)
                assert not any(task.done() for task in (*embeds, *streams))

                signalled_at = time.monotonic()
                server.proc.send_signal(signal.SIGTERM)

                async def unready() -> bool:
                    return (await probe.get("/health/ready")).status_code == 503

                await until(unready, "readiness is 503 after SIGTERM", timeout_s=GRACE_S)
                assert (await probe.get("/health/live")).status_code == 200
                async with httpx.AsyncClient(base_url=server.url, timeout=10) as late:
                    refused = await late.post("/v1/embeddings",
                                              json={"model": "held", "input": "late"})
                assert refused.status_code == 503, refused.text
                assert refused.json()["error"]["code"] == "shutting_down"
                assert refused.json()["error"]["type"] == "service_unavailable"
                assert refused.headers["retry-after"] == "1"
                assert refused.headers["connection"] == "close"

                release.touch()
                embedded = await asyncio.gather(*embeds)
                finished = [outcome(*await task) for task in streams]
            return signalled_at, embedded, finished

        signalled_at, embedded, finished = asyncio.run(scenario())
        for response in embedded:
            assert response.status_code == 200, response.text
            assert len(response.json()["data"]) == 1
        # A stream may only have been cut at shutdown_timeout_s, long after it should finish.
        assert all(result == "finished" for result in finished) or \
            time.monotonic() - signalled_at >= timeout_s

        # After the grace the listener is closed: connections are refused while the process
        # finishes (or once it has exited).
        deadline = signalled_at + GRACE_S + EXIT_MARGIN_S
        while True:
            try:
                httpx.get(server.url + "/health/live", timeout=2)
            except httpx.ConnectError:
                break
            assert time.monotonic() < deadline, "the listener is still open after the grace"
            time.sleep(0.05)
        assert time.monotonic() - signalled_at >= GRACE_S - 0.5

        elapsed = wait_exit(server, signalled_at, GRACE_S + timeout_s + EXIT_MARGIN_S)
        assert server.proc.returncode == 0, server.log()
        assert elapsed >= GRACE_S - 0.5
        assert counts(server) == (EMBEDS + finished.count("finished"), finished.count("cut"))


def test_a_stream_still_running_at_shutdown_timeout_is_cut_with_an_error_event(
    tmp_path: Path, cache_dir: Path, endless_dir: Path
) -> None:
    timeout_s = 1.5
    config = f"""
[server]
drain_grace_s = 0
shutdown_timeout_s = {timeout_s}

[[models]]
id = "endless"
runtime = "causal-lm"
source = "{endless_dir}"
"""
    with run_server(tmp_path, config, cache_dir) as server:

        async def scenario() -> tuple[float, tuple[int, list[bytes]], httpx.Response]:
            body = {"model": "endless", "prompt": "The quick brown fox",
                    "max_tokens": 1_000_000, "temperature": 0}
            async with httpx.AsyncClient(base_url=server.url, timeout=60) as http:
                first = asyncio.Event()
                stream = asyncio.create_task(read_stream(http, body, first))
                whole = asyncio.create_task(http.post("/v1/completions", json=body))

                async def both_running() -> bool:
                    page = (await http.get("/metrics")).text
                    return metric(page, "tidegate_generation_running", "endless") == 2

                await asyncio.wait_for(first.wait(), 60)
                await until(both_running, "the stream and the plain completion are decoding")
                signalled_at = time.monotonic()
                server.proc.send_signal(signal.SIGTERM)
                return signalled_at, await stream, await whole

        signalled_at, (status, events), whole = asyncio.run(scenario())
        assert outcome(status, events) == "cut"
        error = orjson.loads(events[-2])["error"]
        assert f"shutdown_timeout_s = {timeout_s:g}" in error["message"]
        assert whole.status_code == 503, whole.text
        assert whole.json()["error"]["code"] == "shutting_down"
        assert whole.headers["retry-after"] == "1"

        elapsed = wait_exit(server, signalled_at, timeout_s + EXIT_MARGIN_S)
        assert server.proc.returncode == 0, server.log()
        assert elapsed >= timeout_s - 0.1
        assert counts(server) == (0, 2)
        assert "cutting 2 requests still in flight (shutdown_timeout_s = 1.5)" in server.log()


def test_a_second_signal_ends_the_grace_and_cuts_at_once(
    tmp_path: Path, cache_dir: Path, endless_dir: Path
) -> None:
    grace_s, timeout_s = 60.0, 120.0
    config = f"""
[server]
drain_grace_s = {grace_s}
shutdown_timeout_s = {timeout_s}

[[models]]
id = "endless"
runtime = "causal-lm"
source = "{endless_dir}"
"""
    with run_server(tmp_path, config, cache_dir) as server:

        async def scenario() -> tuple[float, tuple[int, list[bytes]]]:
            body = {"model": "endless", "prompt": "The quick brown fox",
                    "max_tokens": 1_000_000, "temperature": 0}
            async with httpx.AsyncClient(base_url=server.url, timeout=60) as http, \
                    httpx.AsyncClient(base_url=server.url, timeout=10) as probe:
                first = asyncio.Event()
                stream = asyncio.create_task(read_stream(http, body, first))
                await asyncio.wait_for(first.wait(), 60)
                signalled_at = time.monotonic()
                server.proc.send_signal(signal.SIGTERM)

                async def unready() -> bool:
                    return (await probe.get("/health/ready")).status_code == 503

                await until(unready, "readiness is 503 after SIGTERM")
                server.proc.send_signal(signal.SIGINT)
                return signalled_at, await stream

        signalled_at, (status, events) = asyncio.run(scenario())
        assert outcome(status, events) == "cut"
        elapsed = wait_exit(server, signalled_at, EXIT_MARGIN_S)
        assert elapsed < grace_s
        assert server.proc.returncode == 0, server.log()
        assert counts(server) == (0, 1)
        assert "SIGINT received again: ending the grace and cutting the 1 requests in flight now" \
            in server.log()


@pytest.mark.parametrize("upstream_answers", [True, False], ids=["drained", "cut"])
def test_upstream_calls_in_flight_are_drained_or_cut(
    tmp_path: Path, cache_dir: Path, upstream_answers: bool
) -> None:
    timeout_s = 2.0
    with FaultyUpstream("held") as upstream:
        config = f"""
[server]
drain_grace_s = 0
shutdown_timeout_s = {timeout_s}

[[models]]
id = "relayed"
runtime = "remote"
upstreams = ["{upstream.url}"]
[models.upstream.retry]
max_retries = 0
"""
        upstream.hold()  # a stream after its first chunk, a plain answer before it
        with run_server(tmp_path, config, cache_dir) as server:

            async def scenario() -> tuple[float, tuple[int, list[bytes]], httpx.Response]:
                body = {"model": "relayed", "messages": [{"role": "user", "content": "hi"}]}
                async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
                    first = asyncio.Event()
                    stream = asyncio.create_task(
                        read_stream(http, body, first, "/v1/chat/completions"))
                    whole = asyncio.create_task(http.post("/v1/chat/completions", json=body))
                    await asyncio.wait_for(first.wait(), 10)
                    await upstream.wait_hits("/v1/chat/completions", 2)
                    signalled_at = time.monotonic()
                    server.proc.send_signal(signal.SIGTERM)
                    if upstream_answers:
                        upstream.release()
                    return signalled_at, await stream, await whole

            signalled_at, (status, events), whole = asyncio.run(scenario())
            elapsed = wait_exit(server, signalled_at, timeout_s + EXIT_MARGIN_S)
            assert server.proc.returncode == 0, server.log()
            if upstream_answers:
                assert outcome(status, events, finish_reason=None) == "finished"  # the fake's
                assert whole.status_code == 200, whole.text
                assert counts(server) == (2, 0)
            else:
                assert outcome(status, events) == "cut"
                assert whole.status_code == 503, whole.text
                assert whole.json()["error"]["code"] == "shutting_down"
                assert elapsed >= timeout_s - 0.1
                assert counts(server) == (0, 2)


def _sigterm_until_unready(server: ServerProcess) -> None:
    server.proc.send_signal(signal.SIGTERM)

    async def unready() -> bool:
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as probe:
            return (await probe.get("/health/ready")).status_code == 503

    asyncio.run(until(unready, "readiness is 503 after SIGTERM"))


def test_a_request_refused_while_its_body_is_still_arriving_gets_the_503(
    tmp_path: Path, cache_dir: Path
) -> None:
    """A 1 MiB body sent in pieces during the grace: the server reads it before answering and
    closing, so the client reads the 503 instead of a connection reset."""
    config = """
[server]
drain_grace_s = 60

[[models]]
id = "echo"
runtime = "echo"
"""
    body = b"x" * (1 << 20)
    with run_server(tmp_path, config, cache_dir) as server:
        _sigterm_until_unready(server)
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            sock.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: tidegate\r\n"
                         b"Content-Type: application/json\r\n"
                         b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n")
            for offset in range(0, len(body), 65536):
                sock.sendall(body[offset:offset + 65536])
            received = b""
            while chunk := sock.recv(65536):
                received += chunk
        head, _, payload = received.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503 "), received
        assert b"connection: close" in head.lower()
        assert orjson.loads(payload)["error"]["code"] == "shutting_down"


def test_a_client_stalling_mid_body_while_draining_gets_the_503_not_a_timeout(
    tmp_path: Path, cache_dir: Path
) -> None:
    """Part of a body, then nothing: answered 503 shutting_down within a second or so, not the
    408 of body_timeout_s (10 s here) nor a reset."""
    config = """
[server]
drain_grace_s = 60
body_timeout_s = 10

[[models]]
id = "echo"
runtime = "echo"
"""
    with run_server(tmp_path, config, cache_dir) as server:
        _sigterm_until_unready(server)
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            started = time.monotonic()
            sock.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: tidegate\r\n"
                         b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n"
                         b'{"model": ')
            received = b""
            while chunk := sock.recv(65536):
                received += chunk
            elapsed = time.monotonic() - started
        head, _, payload = received.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503 "), received
        assert orjson.loads(payload)["error"]["code"] == "shutting_down"
        assert elapsed < 5.0
