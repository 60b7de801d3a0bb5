"""tidegate's uvicorn protocol, driven read by read over an in-memory transport: when the
header/body deadlines are armed (never for a request that arrives whole in one read, the hot
path), what expiring one answers, and the connection cap. The raw-socket behaviour against the
real server is tests/e2e/test_slow_clients.py."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import uvicorn
from uvicorn.server import ServerState

from tidegate.config import ServerConfig
from tidegate.protocol import LimitedHttpProtocol, http_protocol

WHOLE = b"GET /x HTTP/1.1\r\nHost: t\r\n\r\n"
POST_HEAD = b"POST /x HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\n\r\n"


class MemoryTransport(asyncio.Transport):
    """What the protocol writes, and whether it closed."""

    def __init__(self) -> None:
        super().__init__()
        self.written = b""
        self.sends: list[bytes] = []
        """Each write (one ``writelines`` counts once): a send system call on a socket."""
        self.closed = asyncio.Event()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 4242) if name in ("peername", "sockname") else default

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += bytes(data)
        self.sends.append(bytes(data))

    def writelines(self, list_of_data: Any) -> None:
        data = b"".join(list_of_data)
        self.written += data
        self.sends.append(data)

    def close(self) -> None:
        self.closed.set()

    def is_closing(self) -> bool:
        return self.closed.is_set()

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


App = Callable[[Any, Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]],
              Awaitable[None]]


async def ok_app(scope: Any, receive: Callable[[], Awaitable[Any]],
                 send: Callable[[Any], Awaitable[None]]) -> None:
    while (await receive()).get("more_body"):
        pass
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


def held_app(release: asyncio.Event) -> App:
    """``ok_app``, whose GETs answer only once ``release`` is set."""

    async def app(scope: Any, receive: Callable[[], Awaitable[Any]],
                  send: Callable[[Any], Awaitable[None]]) -> None:
        if scope["method"] == "GET":
            await release.wait()
        await ok_app(scope, receive, send)

    return app


def connect(state: ServerState | None = None, *, app: App = ok_app, **limits: Any
            ) -> tuple[LimitedHttpProtocol, MemoryTransport]:
    server = ServerConfig(**limits)
    config = uvicorn.Config(app, http=http_protocol(server), lifespan="off", log_config=None)
    config.load()
    protocol = config.http_protocol_class(  # type: ignore[call-arg]
        config=config, server_state=state or ServerState(), app_state={})
    assert isinstance(protocol, LimitedHttpProtocol)
    transport = MemoryTransport()
    protocol.connection_made(transport)
    return protocol, transport


async def answered(transport: MemoryTransport, marker: bytes) -> None:
    async with asyncio.timeout(10):
        while marker not in transport.written:
            await asyncio.sleep(0)


def error_of(written: bytes) -> dict[str, Any]:
    error: dict[str, Any] = orjson.loads(written.partition(b"\r\n\r\n")[2])["error"]
    return error


def test_a_request_in_one_read_arms_no_deadline() -> None:
    async def main() -> None:
        protocol, transport = connect()
        assert protocol._deadline is not None  # the first head is due from connecting
        protocol.data_received(WHOLE)
        assert protocol._deadline is None
        await answered(transport, b"ok")
        protocol.data_received(POST_HEAD + b"abcd")
        assert protocol._deadline is None
        await answered(transport, b"okHTTP/1.1 200 OK")  # the second answer
        protocol.connection_lost(None)

    asyncio.run(main())


def test_an_incomplete_head_or_body_arms_its_deadline() -> None:
    async def main() -> None:
        protocol, transport = connect()
        protocol.data_received(WHOLE)
        await answered(transport, b"ok")
        protocol.data_received(POST_HEAD[:10])
        head_deadline = protocol._deadline
        assert head_deadline is not None
        protocol.data_received(POST_HEAD[10:20])
        assert protocol._deadline is head_deadline  # counted from the head's first byte
        protocol.data_received(POST_HEAD[20:] + b"ab")
        assert head_deadline.cancelled()
        assert protocol._deadline is not None  # now the body's
        protocol.data_received(b"cd")
        assert protocol._deadline is None
        protocol.connection_lost(None)

    asyncio.run(main())


def test_an_expired_head_or_body_gets_408_and_the_connection_closes() -> None:
    async def main() -> None:
        for partial, knob in [(POST_HEAD[:10], "header_timeout_s"),
                              (POST_HEAD + b"a", "body_timeout_s")]:
            protocol, transport = connect(header_timeout_s=0.01, body_timeout_s=0.01)
            protocol.data_received(partial)
            async with asyncio.timeout(10):
                await transport.closed.wait()
            assert transport.written.startswith(b"HTTP/1.1 408 ")
            assert b"connection: close" in transport.written
            error = error_of(transport.written)
            assert error["code"] == "request_timeout" and knob in error["message"]
            protocol.connection_lost(None)

    asyncio.run(main())


def test_a_request_behind_an_answer_under_way_is_timed_from_that_answer() -> None:
    """A request pipelined (or sent early) behind a held answer arms nothing until that answer
    is complete: its deadline must not expire under the answer and close the connection."""

    async def main() -> None:
        release = asyncio.Event()
        protocol, transport = connect(app=held_app(release))
        protocol.data_received(WHOLE + POST_HEAD[:10])
        assert protocol._deadline is None  # the POST's head waits for the GET's answer
        protocol.data_received(POST_HEAD[10:] + b"ab")
        assert protocol._deadline is None  # queued behind the GET, its body too
        release.set()
        await answered(transport, b"ok")
        assert protocol._deadline is not None  # the body's clock runs from the GET's answer
        protocol.data_received(b"cd")
        assert protocol._deadline is None
        await answered(transport, b"okHTTP/1.1 200 OK")
        protocol.connection_lost(None)

    asyncio.run(main())


def test_a_head_trickled_behind_an_answer_under_way_gets_408_after_that_answer() -> None:
    async def main() -> None:
        release = asyncio.Event()
        protocol, transport = connect(app=held_app(release), header_timeout_s=0.01)
        protocol.data_received(WHOLE + POST_HEAD[:10])
        assert protocol._deadline is None
        release.set()
        async with asyncio.timeout(10):
            await transport.closed.wait()
        answer, _, timeout = transport.written.partition(b"ok")
        assert answer.startswith(b"HTTP/1.1 200 ")  # the GET's answer is whole
        assert timeout.startswith(b"HTTP/1.1 408 ")
        assert "header_timeout_s" in error_of(timeout)["message"]
        protocol.connection_lost(None)

    asyncio.run(main())


def test_a_connection_over_the_cap_is_answered_503_and_closed() -> None:
    async def main() -> None:
        state = ServerState()
        held = [connect(state, max_connections=2) for _ in range(2)]
        protocol, transport = connect(state, max_connections=2)
        protocol.data_received(WHOLE)
        async with asyncio.timeout(10):
            await transport.closed.wait()
        assert transport.written.startswith(b"HTTP/1.1 503 ")
        assert b"retry-after: 1" in transport.written
        assert error_of(transport.written)["code"] == "too_many_connections"
        protocol.connection_lost(None)
        # The connections within the cap are served.
        first, first_transport = held[0]
        first.data_received(WHOLE)
        await answered(first_transport, b"ok")
        for each, _ in held:
            each.connection_lost(None)

    asyncio.run(main())


def test_an_answers_head_and_body_go_out_in_one_send() -> None:
    async def scenario() -> None:
        protocol, transport = connect()
        protocol.data_received(WHOLE + WHOLE)  # two answers, one send each
        async with asyncio.timeout(10):
            while transport.written.count(b"ok") < 2:
                await asyncio.sleep(0)
        assert len(transport.sends) == 2
        assert all(send.startswith(b"HTTP/1.1 200") and send.endswith(b"\r\n\r\nok")
                   for send in transport.sends)
        assert not transport.is_closing()

    asyncio.run(scenario())


def test_a_streams_head_goes_out_before_its_first_event() -> None:
    release = asyncio.Event()
    headed = asyncio.Event()

    async def stream_app(scope: Any, receive: Callable[[], Awaitable[Any]],
                         send: Callable[[Any], Awaitable[None]]) -> None:
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})
        headed.set()
        await release.wait()  # the first event comes much later
        await send({"type": "http.response.body", "body": b"data: 1\n\n", "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def scenario() -> None:
        protocol, transport = connect(app=stream_app)
        protocol.data_received(WHOLE)
        await headed.wait()
        await answered(transport, b"\r\n\r\n")  # within the loop's turn, not held
        assert transport.sends[0].startswith(b"HTTP/1.1 200") and b"data:" not in transport.written
        release.set()
        await answered(transport, b"0\r\n\r\n")  # the chunked body's end
        assert transport.written.index(b"data: 1") > transport.written.index(b"\r\n\r\n")

    asyncio.run(scenario())


def test_a_held_write_goes_out_before_the_connection_closes() -> None:
    from tidegate.protocol import _CoalescingTransport

    async def scenario() -> None:
        transport = MemoryTransport()
        coalescing = _CoalescingTransport(transport, asyncio.get_running_loop())
        coalescing.write(b"head")
        coalescing.close()
        assert transport.sends == [b"head"] and transport.is_closing()
        await asyncio.sleep(0)  # the turn's end: nothing more (the flush was cancelled)
        assert transport.sends == [b"head"]
        late = _CoalescingTransport(transport, asyncio.get_running_loop())
        late.write(b"x")  # the connection closed meanwhile: nothing is written
        await asyncio.sleep(0)
        assert transport.sends == [b"head"]

    asyncio.run(scenario())
