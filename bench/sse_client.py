"""A lean asyncio HTTP/1.1 client for OpenAI-style SSE completion streams, for load generation.

Raw ``asyncio`` streams rather than a general HTTP client: the load generator shares the CPU
with the server it measures, so per-chunk client cost matters. It speaks exactly what the
benchmark needs: ``POST`` with a JSON body on a keep-alive connection, a response with a
``Content-Length`` or chunked body, and ``data: {json}`` events ending with ``data: [DONE]``.
Each stream's timings are recorded with ``time.perf_counter``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import orjson

__all__ = ["SseConnection", "StreamRecord", "StreamRejected"]

_DONE = b"[DONE]"
_MAX_HEADER_BYTES = 65536


class StreamRejected(Exception):
    """The server answered with a status other than 200."""

    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(f"HTTP {status}: {body[:300].decode(errors='replace')}")
        self.status = status
        self.body = body


@dataclass(slots=True)
class StreamRecord:
    """One streamed completion as the client saw it."""

    started: float
    headers_at: float | None = None
    chunk_times: list[float] = field(default_factory=list)
    """When each chunk with non-empty text arrived."""
    completion_tokens: int | None = None
    """From the final usage chunk (``stream_options.include_usage``)."""
    finished: float | None = None
    """When ``[DONE]`` arrived; None for a stream that was cut short."""
    finish_reason: str | None = None

    @property
    def ttft_s(self) -> float | None:
        return self.chunk_times[0] - self.started if self.chunk_times else None


class SseConnection:
    """One keep-alive connection that runs streaming POSTs one after another."""

    def __init__(self, host: str, port: int) -> None:
        self._host = host
        self._port = port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def __aenter__(self) -> SseConnection:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        writer, self._writer, self._reader = self._writer, None, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def connect(self) -> None:
        """Open the connection now (:meth:`stream` opens it when needed)."""
        await self._connected()

    async def _connected(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self._reader is None or self._writer is None or self._writer.is_closing():
            self._reader, self._writer = await asyncio.open_connection(self._host, self._port)
        return self._reader, self._writer

    async def stream(self, path: str, body: dict[str, Any], record: StreamRecord) -> None:
        """POST ``body`` to ``path`` and read its event stream into ``record`` to the end.

        Raises :class:`StreamRejected` for a non-200 answer; on any other failure or on
        cancellation the connection is closed (its stream is left unfinished).
        """
        try:
            await self._exchange(path, orjson.dumps(body), record)
        except BaseException:
            await self.aclose()
            raise

    async def _exchange(self, path: str, payload: bytes, record: StreamRecord) -> None:
        reader, writer = await self._connected()
        writer.write(
            f"POST {path} HTTP/1.1\r\nHost: {self._host}:{self._port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n"
            "Accept: text/event-stream\r\n\r\n".encode("latin-1") + payload
        )
        await writer.drain()
        status, headers = await _read_head(reader)
        record.headers_at = time.perf_counter()
        if status != 200:
            raise StreamRejected(status, b"".join([part async for part in _body(reader, headers)]))
        events = _EventParser(record)
        async for part in _body(reader, headers):
            events.feed(part)
        if headers.get("connection", "").lower() == "close":
            await self.aclose()


async def _read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    head = await reader.readuntil(b"\r\n\r\n")
    if len(head) > _MAX_HEADER_BYTES:
        raise ConnectionError("response head too large")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            name, value = line.split(":", 1)
            headers[name.strip().lower()] = value.strip()
    return status, headers


async def _body(
    reader: asyncio.StreamReader, headers: dict[str, str]
) -> AsyncIterator[bytes]:
    """The response body's parts as they arrive (chunked or ``Content-Length``)."""
    if headers.get("transfer-encoding", "").lower() == "chunked":
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";", 1)[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")  # no trailers are sent
                return
            chunk = await reader.readexactly(size + 2)
            yield chunk[:-2]
    else:
        length = int(headers.get("content-length", "0"))
        if length:
            yield await reader.readexactly(length)


class _EventParser:
    """Splits SSE bytes into ``data:`` events and records what each means for the stream."""

    def __init__(self, record: StreamRecord) -> None:
        self._record = record
        self._pending = b""

    def feed(self, data: bytes) -> None:
        now = time.perf_counter()
        buffer = self._pending + data
        *events, self._pending = buffer.split(b"\n\n")
        for event in events:
            self._event(event, now)

    def _event(self, event: bytes, now: float) -> None:
        if not event.startswith(b"data: "):
            return
        payload = event[6:]
        record = self._record
        if payload == _DONE:
            record.finished = now
            return
        data = orjson.loads(payload)
        if "error" in data:
            raise StreamRejected(200, payload)
        usage = data.get("usage")
        if usage:
            record.completion_tokens = int(usage["completion_tokens"])
        for choice in data.get("choices") or ():
            text = choice.get("text") or (choice.get("delta") or {}).get("content")
            if text:
                record.chunk_times.append(now)
            if choice.get("finish_reason"):
                record.finish_reason = choice["finish_reason"]
