"""Server-sent events: encoding, and a response that races the producer against the client.

:class:`EventStreamResponse` sends each chunk an async iterator yields, as it yields it. A
second task listens for ``http.disconnect`` (under tidegate's own protocol, a callback from the
connection instead: :data:`~tidegate.api.guard.DISCONNECT_EXTENSION`); when the client goes away
the producer is cancelled at once, so whatever it holds (a sequence's slot, an upstream
connection) is released by its own ``async with``/``finally`` blocks within one step. When the
server's drain cuts the request at shutdown, the producer is cancelled the same way and the
stream ends with an error event and ``[DONE]``, so the client knows it was cut rather than
finished.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping

import orjson
from starlette.types import Receive, Scope, Send

from tidegate.api.drain import Drain
from tidegate.api.errors import error_response
from tidegate.api.guard import disconnect_callbacks

__all__ = ["DONE", "EventStreamResponse", "sse_event"]

DONE = b"data: [DONE]\n\n"


def sse_event(data: object) -> bytes:
    """One ``data:`` event with a JSON payload (orjson never emits raw newlines)."""
    return b"data: " + orjson.dumps(data) + b"\n\n"


class EventStreamResponse:
    """An ASGI response streaming ``body`` chunk by chunk, cancelled on client disconnect."""

    def __init__(
        self,
        body: AsyncIterator[bytes],
        *,
        status_code: int = 200,
        media_type: str = "text/event-stream",
        headers: Mapping[str, str] | None = None,
        drain: Drain | None = None,
    ) -> None:
        self._body = body
        self._status = status_code
        self._drain = drain
        self._started = False
        self._finished = False
        raw = {"content-type": media_type, "cache-control": "no-cache",
               "x-accel-buffering": "no", **{k.lower(): v for k, v in (headers or {}).items()}}
        self._headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in raw.items()]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        producer = asyncio.ensure_future(self._produce(send))
        # tidegate's protocol calls back when the connection is lost; elsewhere a task watches.
        callbacks = disconnect_callbacks(scope)

        def on_lost() -> None:
            producer.cancel()

        if callbacks is not None:
            callbacks.add(on_lost)
            tasks: tuple[asyncio.Future[None], ...] = (producer,)
        else:
            tasks = (producer, asyncio.ensure_future(self._watch(receive)))
        cut = False
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            if self._drain is None or not self._drain.was_cut(asyncio.current_task()):
                raise
            cut = True
        finally:
            if callbacks is not None:
                callbacks.discard(on_lost)
            for task in tasks:
                task.cancel()
            # Let the producer's cleanup (closing the iterator) run to completion.
            await asyncio.gather(*tasks, return_exceptions=True)
            with contextlib.suppress(Exception):
                await self._close_body()
        if cut:
            current = asyncio.current_task()
            assert current is not None and self._drain is not None
            current.uncancel()
            await self._send_cut(send, self._drain)
            return
        if producer.done() and not producer.cancelled() and producer.exception() is not None:
            raise producer.exception()  # type: ignore[misc]

    async def _send_cut(self, send: Send, drain: Drain) -> None:
        """End a stream the drain cut: 503 if nothing was sent yet, else an error event."""
        if self._finished:
            return
        response = error_response(drain.error(cut=True))
        body = bytes(response.body)
        with contextlib.suppress(OSError):
            if not self._started:
                await send({"type": "http.response.start", "status": response.status_code,
                            "headers": response.raw_headers})
                await send({"type": "http.response.body", "body": body, "more_body": False})
                return
            event = b"data: " + body + b"\n\n" + DONE
            await send({"type": "http.response.body", "body": event, "more_body": False})

    async def _close_body(self) -> None:
        closer = getattr(self._body, "aclose", None)
        if closer is not None:
            await closer()

    async def _produce(self, send: Send) -> None:
        self._started = True
        await send({"type": "http.response.start", "status": self._status,
                    "headers": self._headers})
        try:
            async for chunk in self._body:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except OSError:  # the transport broke under us: same as a disconnect
            return
        self._finished = True
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    @staticmethod
    async def _watch(receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
