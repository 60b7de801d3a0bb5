"""Slow and hostile clients against the real server, over raw sockets: a client trickling its
headers or its body, or connecting and sending nothing, gets 408 and is closed within the
timeout; a request pipelined behind a slow answer is timed from that answer; connections beyond
``max_connections`` get a 503 in OpenAI's error shape.

Every wait is on the server's answer (or its close) with a deadline; the trickling clients send
their next byte only when a short wait for that answer comes back empty. A slow answer comes
from a ``python`` model held until the test creates a file.
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



def embedding_request(model: str) -> tuple[bytes, bytes]:
    """A whole ``POST /v1/embeddings`` for ``model``: its head and its body."""
    body = orjson.dumps({"model": model, "input": "hello"})
    head = (b"POST /v1/embeddings HTTP/1.1\r\nHost: tidegate\r\n"
            b"Content-Type: application/json\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n")
    return head, body


HEAD, BODY = embedding_request("echo")
HELD = b"".join(embedding_request("held"))
"""Answered only once the test creates the ``held_server`` fixture's release file."""


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


@pytest.fixture
def held_server(tmp_path: Path, cache_dir: Path) -> Iterator[tuple[ServerProcess, Path]]:
    """A server with the short timeouts and a ``held`` model; the file that releases it."""
    release = tmp_path / "release"
    config = f"""
[server]
header_timeout_s = {TIMEOUT_S}
body_timeout_s = {TIMEOUT_S}

[[models]]
id = "echo"
runtime = "echo"

[[models]]
id = "held"
runtime = "python"
source = "tests.models.fixture_models:Blob"
options = {{ name = "held", embed_until = "{release}" }}
"""
    with run_server(tmp_path, config, cache_dir) as proc:
        try:
            yield proc, release
        finally:
            release.touch()  # the model's worker thread waits for it


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


def assert_quiet(sock: socket.socket, seconds: float, *, trickle: bytes = b"") -> bytes:
    """Assert that the server sends nothing and keeps the connection open for ``seconds``,
    while ``trickle`` goes on as in :func:`read_until_closed`; what is left of ``trickle``."""
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        readable, _, _ = select.select([sock], [], [], min(0.1, left))
        if readable:
            raise AssertionError(f"the server answered or closed early: {sock.recv(65536)!r}")
        if trickle:
            sock.sendall(trickle[:1])
            trickle = trickle[1:]
    return trickle


def split_answer(received: bytes) -> tuple[bytes, bytes]:
    """The first whole answer in ``received`` (it has a Content-Length), and what follows."""
    head, _, rest = received.partition(b"\r\n\r\n")
    length = int(re.search(rb"content-length: (\d+)", head, re.IGNORECASE)[1])  # type: ignore[index]
    assert len(rest) >= length, received
    return head + b"\r\n\r\n" + rest[:length], rest[length:]


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
    return read_status(sock)


def read_status(sock: socket.socket) -> int:
    """The status of the next answer on ``sock``, read whole."""
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


def test_a_request_pipelined_behind_a_slow_answer_is_timed_from_that_answer(
    held_server: tuple[ServerProcess, Path],
) -> None:
    """The echo request's head and part of its body arrive with the held request; held past
    both timeouts, the connection stays open, and the rest of the body may come after the held
    answer: both are served."""
    server, release = held_server
    with connect(server) as sock:
        sock.sendall(HELD + HEAD + BODY[:5])
        assert_quiet(sock, 1.5 * TIMEOUT_S)
        release.touch()
        assert read_status(sock) == 200
        sock.sendall(BODY[5:])
        assert read_status(sock) == 200
    assert "Traceback" not in server.log()


def test_a_head_trickled_behind_a_slow_answer_gets_408_after_that_answer(
    held_server: tuple[ServerProcess, Path],
) -> None:
    """A client that sends a whole request, then trickles the next head forever: the held
    answer still comes whole, then the head gets its 408, header_timeout_s after that answer."""
    server, release = held_server
    with connect(server) as sock:
        sock.sendall(HELD + b"POST /v1/embeddings HTTP/1.1\r\n")
        trickle = assert_quiet(sock, 1.5 * TIMEOUT_S, trickle=b"X-Slow: " + b"a" * 200)
        release.touch()
        answered = time.monotonic()
        received, closed = read_until_closed(sock, trickle=trickle)
    held, timeout = split_answer(received)
    assert parse(held)[0] == 200
    assert_timeout_answer(timeout, "header_timeout_s")
    assert EARLIEST_S <= closed - answered < DEADLINE_S


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
