"""A small, real OpenAI-ish HTTP server with switchable faults, for the upstream client's tests.

Each :class:`FaultyUpstream` is a Starlette app served by uvicorn on its own event loop in a
background thread, on an ephemeral 127.0.0.1 port. The listening socket is bound before the
thread starts, so the URL is usable at once: early connections wait in the listen backlog, and
no test has to wait for readiness.

Knobs are plain attributes set from the test's thread; gates (``hold``/``release``) are asyncio
events of the server's loop, set thread-safely. Tests observe the server through ``hits`` and
``wait_hits`` (a condition variable), never by sleeping.
"""

from __future__ import annotations

import asyncio
import collections
import socket
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from types import TracebackType
from typing import Any

import orjson
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Mount, Route

from tidegate.upstream.config import UpstreamConfig

__all__ = [
    "STREAM_PROMPT_TOKENS",
    "FakeClock",
    "FaultyUpstream",
    "refused_url",
    "run",
    "until",
    "upstream_config",
    "vector_for",
]


def refused_url() -> str:
    """A URL on which nothing listens: connecting to it is refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def vector_for(text: str) -> list[float]:
    """The fixed embedding the fake upstream returns for ``text``."""
    return [float(len(text)), float(sum(map(ord, text)) % 997), 1.0]


STREAM_PROMPT_TOKENS = 5
"""The prompt tokens a stream's usage chunk reports (``stream_options.include_usage``)."""


class _DropConnection(Exception):
    """Raised mid-body so that uvicorn aborts the connection."""


class FaultyUpstream:
    def __init__(self, name: str = "upstream", *, prefix: str = "") -> None:
        """``prefix``: serve under a path (``/openai``), as some gateways do; ``url`` has it."""
        self.name = name
        self._prefix = prefix
        # -- fault knobs -------------------------------------------------------------------
        self.status: int | None = None
        """Answer every /v1 request with this status and an OpenAI error carrying ``detail``."""
        self.detail = "injected failure"
        self.retry_after: str | None = None
        self.health_status = 200
        self.stream_chunks = 3
        self.stall_after: int | None = None
        """Streams send this many chunks, then stall until the client leaves (or ``stop``)."""
        self.drop_after: int | None = None
        """Streams send this many chunks, then drop the connection."""
        self.drop_body = False
        """Non-stream answers promise a body, send part of it, then drop the connection."""
        # -- observations ------------------------------------------------------------------
        self.hits: collections.Counter[str] = collections.Counter()
        self.inputs_received = 0
        """Embedding inputs received, counted before a held answer waits."""
        self.finished: collections.Counter[str] = collections.Counter()
        self.last_headers: dict[str, str] = {}
        self.last_body: dict[str, Any] = {}
        self._cond = threading.Condition()
        # -- machinery ---------------------------------------------------------------------
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(1024)
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}{prefix}"
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_ready = threading.Event()
        self._gate: asyncio.Event | None = None
        self._stall = asyncio.Event()
        self._server = uvicorn.Server(uvicorn.Config(
            self._app(), lifespan="off", loop="asyncio", http="h11", log_level="warning",
            access_log=False, timeout_graceful_shutdown=1,
        ))
        self._thread = threading.Thread(target=self._serve, name=f"faulty-{name}", daemon=True)

    # -- lifecycle -----------------------------------------------------------------------------

    def __enter__(self) -> FaultyUpstream:
        self._thread.start()
        assert self._loop_ready.wait(10), "the fake upstream's loop did not start"
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()
        loop = self._loop
        assert loop is not None
        loop.call_soon_threadsafe(self._stall.set)
        self._server.should_exit = True
        self._thread.join(10)
        self._sock.close()
        assert not self._thread.is_alive(), "the fake upstream did not stop"

    def _serve(self) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._loop_ready.set()
            await self._server.serve(sockets=[self._sock])

        asyncio.run(main())

    # -- controls ------------------------------------------------------------------------------

    def hold(self) -> None:
        """Non-stream answers wait before responding, streams after their first chunk, until
        :meth:`release`."""
        self._gate = asyncio.Event()

    def release(self) -> None:
        gate, self._gate = self._gate, None
        if gate is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(gate.set)

    async def wait_hits(self, path: str, count: int, timeout_s: float = 10.0) -> None:
        """Wait (off the event loop) until ``path`` has been requested ``count`` times."""
        def wait() -> bool:
            with self._cond:
                return self._cond.wait_for(lambda: self.hits[path] >= count, timeout_s)

        assert await asyncio.to_thread(wait), f"{self.name}: {path} hit {self.hits[path]} times"

    def _hit(self, path: str) -> None:
        with self._cond:
            self.hits[path] += 1
            self._cond.notify_all()

    # -- the app -------------------------------------------------------------------------------

    def _app(self) -> Starlette:
        routes = [
            Route("/health", self._health, methods=["GET"]),
            Route("/health/ready", self._health, methods=["GET"]),
            Route("/v1/models", self._models, methods=["GET"]),
            Route("/v1/embeddings", self._embeddings, methods=["POST"]),
            Route("/v1/chat/completions", self._chat, methods=["POST"]),
            Route("/v1/completions", self._completion, methods=["POST"]),
        ]
        if self._prefix:
            return Starlette(routes=[Mount(self._prefix, routes=routes)])
        return Starlette(routes=routes)

    async def _health(self, request: Request) -> Response:
        self._hit(request.url.path)
        return Response(b'{"status":"ok"}', status_code=self.health_status,
                        media_type="application/json")

    async def _models(self, request: Request) -> Response:
        self._hit("/v1/models")
        return self._json({"object": "list", "data": [{"id": "fake", "object": "model"}]})

    async def _embeddings(self, request: Request) -> Response:
        body = await self._received(request)
        if (failure := self._injected()) is not None:
            return failure
        inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
        self.inputs_received += len(inputs)
        await self._wait_gate()
        items = [
            {"object": "embedding", "index": i, "embedding": vector_for(text)}
            for i, text in enumerate(inputs)
        ]
        # Out of order on purpose: clients must place results by "index".
        items.reverse()
        payload = {"object": "list", "model": body.get("model"), "data": items,
                   "usage": {"prompt_tokens": len(inputs), "total_tokens": len(inputs)}}
        return self._answer("/v1/embeddings", payload)

    async def _chat(self, request: Request) -> Response:
        body = await self._received(request)
        if (failure := self._injected()) is not None:
            return failure
        if body.get("stream"):
            return StreamingResponse(self._sse(body), media_type="text/event-stream")
        await self._wait_gate()
        payload = {
            "id": "chatcmpl-fake", "object": "chat.completion", "model": body.get("model"),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "hello"},
                         "finish_reason": "stop"}],
        }
        return self._answer("/v1/chat/completions", payload)

    async def _completion(self, request: Request) -> Response:
        body = await self._received(request)
        if (failure := self._injected()) is not None:
            return failure
        payload = {
            "id": "cmpl-fake", "object": "text_completion", "model": body.get("model"),
            "choices": [{"index": 0, "text": "hello", "finish_reason": "stop"}],
        }
        return self._answer("/v1/completions", payload)

    async def _sse(self, body: dict[str, Any]) -> AsyncIterator[bytes]:
        model = body.get("model")
        options = body.get("stream_options")
        for i in range(self.stream_chunks):
            if i == self.stall_after:
                await self._stall.wait()
            if i == self.drop_after:
                raise _DropConnection(f"{self.name} drops the stream after {i} chunks")
            chunk = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "model": model,
                     "choices": [{"index": 0, "delta": {"content": f"tok{i} "}}]}
            yield b"data: " + orjson.dumps(chunk) + b"\n\n"
            if i == 0:
                await self._wait_gate()
        if isinstance(options, dict) and options.get("include_usage"):  # as OpenAI: a last chunk
            usage = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "model": model,
                     "choices": [], "usage": {"prompt_tokens": STREAM_PROMPT_TOKENS,
                                              "completion_tokens": self.stream_chunks,
                                              "total_tokens": STREAM_PROMPT_TOKENS
                                              + self.stream_chunks}}
            yield b"data: " + orjson.dumps(usage) + b"\n\n"
        yield b"data: [DONE]\n\n"
        self.finished["/v1/chat/completions"] += 1

    # -- helpers -------------------------------------------------------------------------------

    async def _received(self, request: Request) -> dict[str, Any]:
        body: dict[str, Any] = orjson.loads(await request.body())
        self.last_headers = dict(request.headers)
        self.last_body = body
        self._hit(request.url.path)
        return body

    def _injected(self) -> Response | None:
        if self.status is None:
            return None
        error = {"error": {"message": self.detail, "type": "server_error", "param": None,
                           "code": "injected"}}
        headers = {"retry-after": self.retry_after} if self.retry_after else None
        return self._json(error, self.status, headers)

    async def _wait_gate(self) -> None:
        gate = self._gate
        if gate is not None:
            await gate.wait()

    def _answer(self, path: str, payload: object) -> Response:
        self.finished[path] += 1
        if self.drop_body:
            content = orjson.dumps(payload)

            async def partial() -> AsyncIterator[bytes]:
                yield content[: len(content) // 2]
                raise _DropConnection(f"{self.name} drops the body half way")

            return StreamingResponse(
                partial(), media_type="application/json",
                headers={"content-length": str(len(content))},
            )
        return self._json(payload)

    @staticmethod
    def _json(data: object, status: int = 200, headers: dict[str, str] | None = None) -> Response:
        return Response(orjson.dumps(data), status_code=status, headers=headers,
                        media_type="application/json")


# -- helpers shared by the upstream tests ---------------------------------------------------------


def upstream_config(*replicas: str, **sections: Any) -> UpstreamConfig:
    """An UpstreamConfig for tests: active checks off and short timeouts unless overridden,
    e.g. ``upstream_config(url, pool={"max_connections": 1}, retry={"max_retries": 0})``."""
    table: dict[str, Any] = {
        "upstreams": list(replicas),
        "timeouts": {"connect_s": 2.0, "read_s": 5.0, "pool_s": 2.0},
        "health": {"path": None},
    }
    for key, values in sections.items():
        if isinstance(values, dict) and isinstance(table.get(key), dict):
            table[key] = {**table[key], **values}
        else:
            table[key] = values
    return UpstreamConfig.from_mapping(table)


async def until(predicate: Callable[[], bool], timeout_s: float = 10.0, *,
                what: str = "") -> None:
    """Wait for a condition that another thread (the fake upstream) or the kernel makes true;
    fail with ``what`` (or the predicate's source) after ``timeout_s``.

    It polls with a short sleep rather than ``sleep(0)``: spinning would starve the server
    thread of the GIL."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not predicate():
        if asyncio.get_running_loop().time() >= deadline:
            described = what or getattr(predicate, "__qualname__", repr(predicate))
            raise AssertionError(f"still false after {timeout_s:g}s: {described}")
        await asyncio.sleep(0.005)


class FakeClock:
    """A clock the test moves by hand (``clock.now += 5``)."""

    def __init__(self, now: float = 500.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    """Run an async test scenario with an overall bound."""

    async def main() -> None:
        async with asyncio.timeout(60):
            await scenario()

    asyncio.run(main())
