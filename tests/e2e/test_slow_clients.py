"""Slow and hostile clients against the real server, over raw sockets: a client trickling its
headers or its body, or connecting and sending nothing, gets 408 and is closed within the
timeout; connections beyond ``max_connections`` get a 503 in OpenAI's error shape.

Every wait is on the server's answer (or its close) with a deadline; the trickling clients send
their next byte only when a short wait for that answer comes back empty.
"""

from __future__ import annotations

import re
import select
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from tests.serverproc import ServerProcess, run_server

pytestmark = pytest.mark.e2e

TIMEOUT_S = 1.0
DEADLINE_S = 10.0
# The event loop may run a timer up to its clock's resolution early, and the client's clock
# starts after the server's first byte arrived: allow a little slack below the timeout.
EARLIEST_S = TIMEOUT_S - 0.05
"""How long a test waits for an answer before failing (well above TIMEOUT_S)."""
MAX_CONNECTIONS = 4

BODY = orjson.dumps({"model": "echo", "input": "hello"})
HEAD = (b"POST /v1/embeddings HTTP/1.1\r\nHost: tidegate\r\nContent-Type: application/json\r\n"
        b"Content-Length: " + str(len(BODY)).encode() + b"\r\n\r\n")


@pytest.fixture(scope="module")
def timeouts_server(tmp_path_factory: pytest.TempPathFactory,
                    cache_dir: Path) -> Iterator[ServerProcess]:
    config = f"""
[server]
header_timeout_s = {TIMEOUT_S}
body_timeout_s = {TIMEOUT_S}

[[models]]
id = "echo"
runtime = "echo"
"""
    with run_server(tmp_path_factory.mktemp("slow"), config, cache_dir) as proc:
        yield proc


@pytest.fixture(scope="module")
def capped_server(tmp_path_factory: pytest.TempPathFactory,
                  cache_dir: Path) -> Iterator[ServerProcess]:
    # Long read timeouts: the connections holding the cap stay open for the whole test.
    config = f"""
[server]
max_connections = {MAX_CONNECTIONS}
header_timeout_s = 120
body_timeout_s = 120

[[models]]
id = "echo"
runtime = "echo"
"""
    with run_server(tmp_path_factory.mktemp("capped"), config, cache_dir) as proc:
        yield proc


def connect(server: ServerProcess) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=DEADLINE_S)


def read_until_closed(sock: socket.socket, *, trickle: bytes = b"") -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and when it closed
    (``time.monotonic()``).

    With ``trickle``, one more byte of it is sent each time 0.1 s pass without an answer,
    as a slow client would (never enough to complete the request)."""
    received = b""
    deadline = time.monotonic() + DEADLINE_S
    pending = trickle
    while time.monotonic() < deadline:
        readable, _, _ = select.select([sock], [], [], 0.1)
        if not readable:
            if pending:
                sock.sendall(pending[:1])
                pending = pending[1:]
            continue
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            return received, time.monotonic()
        received += chunk
    raise AssertionError(f"the server did not close the connection within {DEADLINE_S}s; "
                         f"got {received!r}")


def parse(response: bytes) -> tuple[int, dict[str, str], dict[str, object]]:
    head, _, body = response.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers, orjson.loads(body)


def assert_timeout_answer(response: bytes, what: str) -> None:
    status, headers, body = parse(response)
    assert status == 408
    assert headers["connection"] == "close"
    assert headers["content-type"] == "application/json"
    error = body["error"]
    assert isinstance(error, dict)
    assert error["code"] == "request_timeout" and error["type"] == "invalid_request_error"
    assert what in str(error["message"])


def embed_on(sock: socket.socket) -> int:
    """One whole request on an open connection; the status of its answer, read whole."""
    sock.sendall(HEAD + BODY)
    received = b""
    while b"\r\n\r\n" not in received:
        chunk = sock.recv(65536)
        assert chunk, "closed before answering"
        received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    length = int(re.search(rb"content-length: (\d+)", head, re.IGNORECASE)[1])  # type: ignore[index]
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "closed before the whole answer"
        body += chunk
    return int(head.split(b" ", 2)[1])


def test_trickled_headers_get_408_and_close(timeouts_server: ServerProcess) -> None:
    started = time.monotonic()
    with connect(timeouts_server) as sock:
        sock.sendall(b"POST /v1/embeddings HTTP/1.1\r\n")
        response, closed = read_until_closed(sock, trickle=b"X-Slow: " + b"a" * 200)
    assert_timeout_answer(response, "header_timeout_s")
    assert EARLIEST_S <= closed - started < DEADLINE_S


def test_trickled_headers_after_a_whole_request_get_408(timeouts_server: ServerProcess) -> None:
    with connect(timeouts_server) as sock:
        assert embed_on(sock) == 200
        sock.sendall(b"POST /v1/embeddings HTTP/1.1\r\n")
        response, _ = read_until_closed(sock, trickle=b"X-Slow: " + b"a" * 200)
    assert_timeout_answer(response, "header_timeout_s")


def test_a_silent_connection_gets_408_and_close(timeouts_server: ServerProcess) -> None:
    started = time.monotonic()
    with connect(timeouts_server) as sock:
        response, closed = read_until_closed(sock)
    assert_timeout_answer(response, "header_timeout_s")
    assert EARLIEST_S <= closed - started < DEADLINE_S


def test_trickled_body_gets_408_and_close(timeouts_server: ServerProcess) -> None:
    started = time.monotonic()
    with connect(timeouts_server) as sock:
        sock.sendall(HEAD.replace(b"Content-Length: " + str(len(BODY)).encode(),
                                  b"Content-Length: 10000"))
        response, closed = read_until_closed(sock, trickle=b" " * 10000)
    assert_timeout_answer(response, "body_timeout_s")
    assert EARLIEST_S <= closed - started < DEADLINE_S


def test_keep_alive_requests_are_not_timed_between_requests(
    timeouts_server: ServerProcess,
) -> None:
    """Whole requests on one connection are served however long the connection lives, and a
    server that closed slow clients keeps serving."""
    with connect(timeouts_server) as sock:
        assert embed_on(sock) == 200
        assert embed_on(sock) == 200
    assert "Traceback" not in timeouts_server.log()


def test_connections_beyond_the_cap_get_503(capped_server: ServerProcess) -> None:
    held = [connect(capped_server) for _ in range(MAX_CONNECTIONS)]
    try:
        # Each holder has been served once: the server has accepted all of them.
        for sock in held:
            assert embed_on(sock) == 200
        with connect(capped_server) as extra:
            extra.sendall(HEAD + BODY)
            response, _ = read_until_closed(extra)
        status, headers, body = parse(response)
        assert status == 503
        assert headers["retry-after"] == "1" and headers["connection"] == "close"
        error = body["error"]
        assert isinstance(error, dict)
        assert error["code"] == "too_many_connections"
        assert "max_connections" in str(error["message"])
        # The held connections are still served.
        assert embed_on(held[0]) == 200
    finally:
        for sock in held:
            sock.close()
    # Once they are closed, new connections are served again.
    deadline = time.monotonic() + DEADLINE_S
    while True:
        with connect(capped_server) as sock:
            status = embed_on(sock)
        if status == 200 or time.monotonic() > deadline:
            break
    assert status == 200
