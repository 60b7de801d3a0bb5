"""The HTTP protocol uvicorn runs for each connection, bounded against slow and hostile clients.

uvicorn's httptools protocol, with three limits the ASGI app cannot enforce because it only sees
a request once its headers are in:

* ``header_timeout_s``: a connection must deliver a request's line and headers within this,
  counted from the request's first byte (or from connecting, for the first request). A client
  trickling header bytes, or connecting and sending nothing, gets 408 and is closed.
* ``body_timeout_s``: the whole body must arrive within this after the headers; else 408 and the
  connection is closed (a handler waiting on that body sees the client leave).
* ``max_connections``: a connection opened while that many are open is answered 503
  (``code: too_many_connections``, ``Retry-After``) to its first request and closed. It is
  refused once its headers are read, not at accept: closing a socket with the request still
  unread would reset it and lose the answer.

Errors use OpenAI's shape, like every other answer. A request that arrives whole in one read
(nearly all of them) starts no timer: the deadline is armed only when a read leaves a head or
a body incomplete.

An answer's head and body go out in one send system call, not two (:class:`_CoalescingTransport`).

A request sent while the answer to the one before is still under way (pipelined, or sent early
on a keep-alive connection) waits for that answer: uvicorn will not run it before, so its clock
starts when that answer is complete, not at its first byte. Otherwise a slow answer would let
the next request's deadline expire and close the connection, cutting the answer the client was
owed; a client trickling the next head is still cut, ``header_timeout_s`` after that answer.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from uvicorn._types import ASGIReceiveCallable, ASGISendCallable, Scope
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from tidegate.api.errors import error_body
from tidegate.api.guard import DISCONNECT_EXTENSION
from tidegate.config import ServerConfig

__all__ = ["ConnectionLimits", "http_protocol"]

log = logging.getLogger("tidegate.server")


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    header_timeout_s: float
    body_timeout_s: float
    max_connections: int

    @classmethod
    def from_config(cls, server: ServerConfig) -> ConnectionLimits:
        return cls(header_timeout_s=server.header_timeout_s,
                   body_timeout_s=server.body_timeout_s,
                   max_connections=server.max_connections)


class _Reading(enum.Enum):
    IDLE = "idle"
    """Between requests: uvicorn's keep-alive timeout bounds the wait."""
    HEAD = "head"
    BODY = "body"


def _timeout_response(message: str) -> bytes:
    """A whole 408 response that closes its connection, in OpenAI's error shape."""
    body = error_body(message, type_="invalid_request_error", code="request_timeout")
    return b"".join([
        STATUS_LINE[408],
        b"content-type: application/json\r\n",
        b"content-length: ", str(len(body)).encode("ascii"), b"\r\n",
        b"connection: close\r\n\r\n",
        body,
    ])


class _CoalescingTransport:
    """The connection's transport as one response sees it: a write is held until the next
    write or the end of the event loop's turn, whichever comes first, and the two go out in
    one ``writev``. uvicorn writes a response's head and its body separately, and a handler
    sends both in one turn, so an answer costs one send system call instead of two (and its
    client one read): 2,000 requests, 2,001 ``writev`` against 4,002 ``write`` (strace). A
    stream's head that no event follows in the same turn goes out at the turn's end.
    """

    __slots__ = ("_flush", "_held", "_loop", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._held: bytes | None = None
        self._flush: asyncio.Handle | None = None

    def write(self, data: bytes) -> None:
        held = self._held
        if held is None:
            self._held = data
            self._flush = self._loop.call_soon(self._write_held)
            return
        self._held = None
        assert self._flush is not None
        self._flush.cancel()
        self._flush = None
        if not self._transport.is_closing():
            self._transport.writelines((held, data))

    def _write_held(self) -> None:
        held, self._held, self._flush = self._held, None, None
        if held is not None and not self._transport.is_closing():
            self._transport.write(held)

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def close(self) -> None:
        if self._flush is not None:
            self._flush.cancel()
        self._write_held()
        self._transport.close()


class LimitedHttpProtocol(HttpToolsProtocol):
    """One connection. ``limits`` is set on the subclass :func:`http_protocol` makes."""

    limits: ConnectionLimits

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._reading = _Reading.HEAD
        self._deadline: asyncio.TimerHandle | None = None
        self._on_lost: set[Callable[[], None]] = set()
        """What the app asked to be told of the connection's loss (:data:`DISCONNECT_EXTENSION`)."""

    # -- the connection cap --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        over_cap = len(self.connections) >= self.limits.max_connections
        super().connection_made(transport)
        if over_cap:
            log.debug("refusing a connection from %s: %d open", self.client, len(self.connections))
            self.app = self._refuse
        # The first request's head is due within header_timeout_s of connecting.
        self._arm(self.limits.header_timeout_s)

    async def _refuse(self, scope: Scope, receive: ASGIReceiveCallable,
                      send: ASGISendCallable) -> None:
        limit = self.limits.max_connections
        body = error_body(
            f"The server has {limit} connections open, its limit ([server] max_connections); "
            "retry later.", type_="service_unavailable", code="too_many_connections")
        await send({"type": "http.response.start", "status": 503, "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode("ascii")),
            (b"retry-after", b"1"), (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body, "more_body": False})

    # -- header and body deadlines -------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        # Only a read that leaves a request incomplete starts its deadline.
        self._arm_for_reading()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # A request that waited for this answer is now the connection's: its clock starts.
        self._arm_for_reading()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._reading = _Reading.HEAD
        self.scope["extensions"] = {DISCONNECT_EXTENSION: {"callbacks": self._on_lost}}

    def on_headers_complete(self) -> None:
        self._disarm()
        self._reading = _Reading.BODY
        super().on_headers_complete()
        # The response's writes (uvicorn's cycle) go out in pairs; see _CoalescingTransport.
        self.cycle.transport = _CoalescingTransport(  # type: ignore[assignment]
            self.transport, self.loop)

    def on_message_complete(self) -> None:
        self._disarm()
        self._reading = _Reading.IDLE
        super().on_message_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)
        callbacks, self._on_lost = list(self._on_lost), set()
        for callback in callbacks:
            callback()

    def _arm_for_reading(self) -> None:
        """Start the deadline of the request being read, if it is incomplete and no answer
        before it is still under way."""
        if self._deadline is not None or self.transport.is_closing():
            return
        if self._reading is _Reading.HEAD:
            # self.cycle is the request before this head (None for the first).
            if self.cycle is None or self.cycle.response_complete:
                self._arm(self.limits.header_timeout_s)
        # In a body, self.cycle is this request: queued in the pipeline while another is answered.
        elif self._reading is _Reading.BODY and not self.pipeline:
            self._arm(self.limits.body_timeout_s)

    def _arm(self, timeout_s: float) -> None:
        self._deadline = self.loop.call_later(timeout_s, self._expired)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        cycle = self.cycle  # the request being read, or (reading a head) the one before
        if self.flow.read_paused:
            # Not the client's fault: uvicorn stopped reading (a body the handler has not
            # consumed yet).
            self._arm(self.limits.body_timeout_s)
            return
        if self._reading is _Reading.HEAD:
            message = (f"The request's headers were not received within "
                       f"{self.limits.header_timeout_s:g}s ([server] header_timeout_s).")
            answer = True  # the answer before, if any, is complete (see _arm_for_reading)
        elif self._reading is _Reading.BODY:
            message = (f"The request's body was not received within "
                       f"{self.limits.body_timeout_s:g}s ([server] body_timeout_s).")
            # An answer already under way (a handler that did not wait for the body) is cut.
            answer = not cycle.response_started
        else:
            return
        log.debug("closing a connection from %s: %s", self.client, message)
        if answer:
            self.transport.write(_timeout_response(message))
        self.transport.close()


def http_protocol(server: ServerConfig) -> type[asyncio.Protocol]:
    """The protocol class for uvicorn's ``http`` setting, with ``server``'s limits."""

    class Protocol(LimitedHttpProtocol):
        limits = ConnectionLimits.from_config(server)

    return Protocol
