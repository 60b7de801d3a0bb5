"""The drain in-process: counting what was drained and cut, a cut non-streamed request's 503, a
cut stream's final error event, and the app refusing new requests while draining. The real
server's signal handling is tested end to end in tests/e2e/test_drain.py."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from types import SimpleNamespace
from typing import Any

import httpx
import orjson
import pytest
from starlette.requests import Request
from starlette.responses import Response

from tidegate.api.app import create_app
from tidegate.api.common import endpoint
from tidegate.api.drain import Drain, DrainStatistics
from tidegate.api.sse import DONE, EventStreamResponse
from tidegate.config import Config, ModelConfig, ServerConfig


async def _forever() -> None:
    await asyncio.Event().wait()


def test_requests_finishing_after_the_drain_began_are_drained_and_cut_ones_are_cut() -> None:
    async def main() -> None:
        drain = Drain(shutdown_timeout_s=30)
        before = asyncio.create_task(asyncio.sleep(0))
        drain.enter(before)
        drain.leave(before)
        tasks = [asyncio.create_task(_forever()) for _ in range(3)]
        for task in tasks:
            drain.enter(task)
        drain.begin()
        drain.leave(tasks[0])  # it completed during the drain
        assert drain.cut() == 2
        assert drain.was_cut(tasks[1]) and not drain.was_cut(asyncio.current_task())
        await asyncio.gather(*tasks[1:], return_exceptions=True)
        for task in tasks[1:]:
            drain.leave(task)
        assert drain.statistics() == DrainStatistics(draining=True, in_flight=0, drained=1,
                                                     cut=2)
        tasks[0].cancel()
        await asyncio.gather(tasks[0], return_exceptions=True)

    asyncio.run(main())


def _request(drain: Drain) -> Request:
    app = SimpleNamespace(state=SimpleNamespace(tidegate=SimpleNamespace(drain=drain)))
    return Request({"type": "http", "method": "POST", "path": "/", "headers": [], "app": app})


def test_a_cut_request_answers_503_shutting_down_and_other_cancellations_propagate() -> None:
    started = asyncio.Event()

    @endpoint
    async def slow(request: Request) -> Response:
        started.set()
        await _forever()
        raise AssertionError("unreachable")

    async def main() -> None:
        drain = Drain(shutdown_timeout_s=2.5)
        cut = asyncio.create_task(slow(_request(drain)))
        drain.enter(cut)
        await started.wait()
        drain.begin()
        drain.cut()
        response = await cut
        assert response.status_code == 503
        assert response.headers["retry-after"] == "1"
        error = orjson.loads(bytes(response.body))["error"]
        assert (error["type"], error["code"]) == ("service_unavailable", "shutting_down")
        assert "shutdown_timeout_s = 2.5" in error["message"]

        started.clear()
        other = asyncio.create_task(slow(_request(drain)))
        await started.wait()
        other.cancel()  # not the drain's: stays a cancellation
        with pytest.raises(asyncio.CancelledError):
            await other

    asyncio.run(main())


async def _events(yielded: asyncio.Event) -> AsyncIterator[bytes]:
    yield b"data: 1\n\n"
    yielded.set()
    await _forever()
    yield b"never"


def test_a_cut_stream_ends_with_an_error_event_and_done() -> None:
    async def main() -> list[dict[str, Any]]:
        drain = Drain(shutdown_timeout_s=30)
        yielded = asyncio.Event()
        sent: list[dict[str, Any]] = []
        response = EventStreamResponse(_events(yielded), drain=drain)

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        async def receive() -> dict[str, Any]:
            await _forever()
            raise AssertionError("unreachable")

        task = asyncio.create_task(response({"type": "http"}, receive, send))
        drain.enter(task)
        await yielded.wait()
        drain.begin()
        drain.cut()
        await task  # ends normally: the cut is answered, not raised
        drain.leave(task)
        assert drain.statistics().cut == 1
        return sent

    sent = asyncio.run(main())
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body",
                                         "http.response.body"]
    assert sent[0]["status"] == 200
    assert sent[1]["body"] == b"data: 1\n\n"
    last = sent[2]
    assert last["more_body"] is False
    event, done = last["body"].split(b"\n\n", 1)
    assert done == DONE
    assert orjson.loads(event.removeprefix(b"data: "))["error"]["code"] == "shutting_down"


def test_while_draining_the_app_refuses_new_requests_but_answers_probes() -> None:
    config = Config(models=(ModelConfig(id="echo", runtime="echo"),))
    app = create_app(config)

    async def main() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            app.state.tidegate.drain.begin()
            for method, path in [("POST", "/v1/embeddings"), ("POST", "/v1/chat/completions"),
                                 ("GET", "/v1/models"), ("POST", "/admin/models/echo/load")]:
                refused = await http.request(method, path, json={"model": "echo", "input": "x"})
                assert refused.status_code == 503, (path, refused.text)
                assert refused.json()["error"]["code"] == "shutting_down"
                assert refused.headers["retry-after"] == "1"
                assert refused.headers["connection"] == "close"
            ready = await http.get("/health/ready")
            assert (ready.status_code, ready.json()["status"]) == (503, "shutting_down")
            assert (await http.get("/health/live")).status_code == 200
            assert (await http.get("/metrics")).status_code == 200
        assert app.state.tidegate.drain.statistics().in_flight == 0

    asyncio.run(main())


CHUNK = b"x" * 65536


def _post(headers: list[tuple[bytes, bytes]] | None = None) -> dict[str, Any]:
    return {"type": "http", "method": "POST", "path": "/v1/embeddings", "root_path": "",
            "query_string": b"", "headers": headers or [(b"content-type", b"application/json")]}


async def _refused(config: Config, scope: dict[str, Any],
                   receive: Callable[[], Awaitable[dict[str, Any]]]) -> list[dict[str, Any]]:
    """What a draining app sends for ``scope`` (status, then body messages)."""
    app = create_app(config)
    app.state.tidegate.drain.begin()
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    assert sent[0]["status"] == 503
    assert orjson.loads(sent[1]["body"])["error"]["code"] == "shutting_down"
    return sent


def test_a_refused_request_is_answered_once_its_body_is_read() -> None:
    """Answering (and closing) while the body is still arriving would reset the connection:
    the client might see the reset instead of the 503."""
    config = Config(models=(ModelConfig(id="echo", runtime="echo"),))
    chunks = 16  # 1 MiB
    read = 0

    async def receive() -> dict[str, Any]:
        nonlocal read
        read += 1
        return {"type": "http.request", "body": CHUNK, "more_body": read < chunks}

    asyncio.run(_refused(config, _post(), receive))
    assert read == chunks


def test_a_refused_request_reads_no_more_than_max_body_bytes_for_body_timeout_s() -> None:
    config = Config(server=ServerConfig(max_body_bytes=100_000, body_timeout_s=0.05),
                    models=(ModelConfig(id="echo", runtime="echo"),))
    read = 0

    async def endless() -> dict[str, Any]:
        nonlocal read
        read += 1
        return {"type": "http.request", "body": CHUNK, "more_body": True}

    asyncio.run(_refused(config, _post(), endless))
    assert read == 2  # past max_body_bytes: answered, whatever is still to come

    async def silent() -> dict[str, Any]:
        await _forever()
        raise AssertionError("unreachable")

    asyncio.run(_refused(config, _post(), silent))  # answered after body_timeout_s

    async def unexpected() -> dict[str, Any]:
        raise AssertionError("a client expecting 100-continue sends nothing before it")

    asyncio.run(_refused(config, _post([(b"expect", b"100-continue")]), unexpected))
