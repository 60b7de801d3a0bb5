"""A lean asyncio HTTP/1.1 load generator: open loop (a fixed arrival rate) or closed loop.

Open loop means arrival times do not depend on responses: request ``i`` is due at
``t0 + i / rate`` whether or not earlier ones were answered, as real clients arrive. A closed
loop (N clients, each sending its next request when the last is answered) slows down with the
server and so can never overload it. Each request goes out on an idle keep-alive connection of
a pool; when none is idle a new one is opened, up to a cap, beyond which requests wait in a
client-side backlog. Latency counts from the request's *due* time, so time spent waiting in
the client (a full pool, a late event loop) is charged to the server as a real client would
see it, not hidden (no coordinated omission).

The generator shares the CPU with the server it measures, so its per-request cost is kept
low: request bytes are encoded once, responses are parsed only as far as the status line,
the header block (``Content-Length``, ``Retry-After``, chunked) and the body's length, on an
:class:`asyncio.Protocol` without a coroutine per request. One request per connection at a
time (no pipelining). Only 127.0.0.1 is ever connected to.
"""

from __future__ import annotations

import asyncio
import collections
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import cast

__all__ = ["LoadRecord", "Pool", "closed_loop", "encode_posts", "open_loop", "percentile"]

HOST = "127.0.0.1"
STATUS_CLIENT_ERROR = 0
"""A request whose connection failed or was lost before its response (recorded as status 0)."""
STATUS_UNFINISHED = -1
"""A request still unanswered when the run's drain timeout ran out."""
_CHUNKED_END = b"\r\n0\r\n\r\n"
_TICK_S = 0.001
"""The open loop's send granularity: a timer per request cost the generator a fifth of its CPU
at 5,000 requests/s, CPU the server it measures then lacks."""


def encode_posts(path: str, port: int, bodies: Sequence[bytes]) -> list[bytes]:
    """Each body as a complete ``POST path`` HTTP/1.1 keep-alive request, encoded once."""
    return [
        (f"POST {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\nContent-Type: application/json\r\n"
         f"Content-Length: {len(body)}\r\n\r\n").encode() + body
        for body in bodies
    ]


class LoadRecord:
    """Per-request outcomes, indexed by the order requests were issued."""

    __slots__ = ("done", "due", "retry_after", "sent", "status")

    def __init__(self) -> None:
        self.due: list[float] = []
        """When the request was due (open loop) or issued (closed loop), ``perf_counter``."""
        self.sent: list[float] = []
        """When its bytes were written (later than ``due`` when it waited in the client)."""
        self.done: list[float] = []
        self.status: list[int] = []
        self.retry_after: list[bool] = []

    def add(self, due: float) -> int:
        self.due.append(due)
        self.sent.append(math.nan)
        self.done.append(math.nan)
        self.status.append(STATUS_UNFINISHED)
        self.retry_after.append(False)
        return len(self.due) - 1

    def __len__(self) -> int:
        return len(self.due)

    def latencies_s(self, *, statuses: Callable[[int], bool]) -> list[float]:
        """``done - due`` of the answered requests whose status ``statuses`` accepts."""
        return [
            done - due for due, done, status in zip(self.due, self.done, self.status, strict=True)
            if statuses(status) and not math.isnan(done)
        ]

    def from_sent_s(self, *, statuses: Callable[[int], bool]) -> list[float]:
        """``done - sent`` of the answered requests whose status ``statuses`` accepts: the
        latency with the client's own delay in sending left out."""
        return [
            done - sent for sent, done, status in zip(self.sent, self.done, self.status,
                                                      strict=True)
            if statuses(status) and not math.isnan(done) and not math.isnan(sent)
        ]

    def send_lags_s(self) -> list[float]:
        """``sent - due`` of every request sent: how late the client put it on the wire."""
        return [sent - due for due, sent in zip(self.due, self.sent, strict=True)
                if not math.isnan(sent)]

    def per_second(self, start: float, seconds: int) -> list[int]:
        """2xx responses that arrived in each whole second after ``start``."""
        counts = [0] * seconds
        for done, status in zip(self.done, self.status, strict=True):
            if 200 <= status < 300:
                slot = int(done - start)
                if 0 <= slot < seconds:
                    counts[slot] += 1
        return counts


class _Connection(asyncio.Protocol):
    """One keep-alive connection with at most one request in flight."""

    __slots__ = ("_buffer", "_chunked", "_closing", "_head_end", "_need", "_pool", "_retry",
                 "_status", "index", "transport")

    def __init__(self, pool: Pool) -> None:
        self._pool = pool
        self._buffer = bytearray()
        self.transport: asyncio.Transport | None = None
        self.index = -1
        self._need = -1
        self._head_end = -1
        self._status = 0
        self._retry = False
        self._chunked = False
        self._closing = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCP transport is not an asyncio.Transport subclass, only duck-typed as one.
        self.transport = cast(asyncio.Transport, transport)

    def send(self, index: int, payload: bytes) -> None:
        assert self.transport is not None
        self.index = index
        self._pool.record.sent[index] = time.perf_counter()
        self.transport.write(payload)

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        while self.index >= 0:
            if self._head_end < 0 and not self._parse_head():
                return
            if self._chunked:
                end = buffer.find(_CHUNKED_END, self._head_end + 2)
                if end < 0:
                    return
                consumed = end + len(_CHUNKED_END)
            else:
                if len(buffer) < self._need:
                    return
                consumed = self._need
            del buffer[:consumed]
            index, self.index, self._head_end = self.index, -1, -1
            self._pool.finished(self, index, self._status, self._retry, reuse=not self._closing)

    def _parse_head(self) -> bool:
        buffer = self._buffer
        end = buffer.find(b"\r\n\r\n")
        if end < 0:
            return False
        head = bytes(buffer[:end]).lower()
        self._head_end = end
        self._status = int(head[9:12])
        self._retry = b"\r\nretry-after:" in head
        self._closing = b"\r\nconnection: close" in head
        at = head.find(b"\r\ncontent-length:")
        self._chunked = at < 0 and b"\r\ntransfer-encoding: chunked" in head
        if at >= 0:
            stop = head.find(b"\r\n", at + 2)
            self._need = end + 4 + int(head[at + 17 : stop if stop >= 0 else len(head)])
        else:
            self._need = end + 4
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self._pool.lost(self)


class Pool:
    """Keep-alive connections to ``127.0.0.1:port``, opened on demand up to ``max_connections``."""

    def __init__(self, port: int, requests: Sequence[bytes], *, max_connections: int,
                 record: LoadRecord | None = None) -> None:
        self.record = record if record is not None else LoadRecord()
        self._port = port
        self._requests = requests
        self._max = max_connections
        self._idle: list[_Connection] = []
        self._connections: set[_Connection] = set()
        self._open = 0
        self._backlog: collections.deque[int] = collections.deque()
        self._tasks: set[asyncio.Task[None]] = set()
        self.on_finished: Callable[[int], None] | None = None
        self.outstanding = 0
        self._all_done: asyncio.Event | None = None
        self.max_open = 0
        self.max_backlog = 0
        self.connect_errors = 0

    def _payload(self, index: int) -> bytes:
        return self._requests[index % len(self._requests)]

    def issue(self, due: float) -> None:
        """Add a request due at ``due`` and send it now (or as soon as a connection is free)."""
        index = self.record.add(due)
        self.outstanding += 1
        if self._idle:
            # The most recently used connection: the least likely to be closed by the server's
            # keep-alive timeout while the request is on its way.
            self._idle.pop().send(index, self._payload(index))
        elif self._open < self._max:
            self._open_for(index)
        else:
            self._backlog.append(index)
            self.max_backlog = max(self.max_backlog, len(self._backlog))

    def _open_for(self, index: int) -> None:
        self._open += 1
        self.max_open = max(self.max_open, self._open)
        task = asyncio.get_running_loop().create_task(self._connect(index))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _connect(self, index: int) -> None:
        loop = asyncio.get_running_loop()
        try:
            _, connection = await loop.create_connection(
                lambda: _Connection(self), HOST, self._port
            )
        except OSError:
            self._open -= 1
            self.connect_errors += 1
            self._complete(index, STATUS_CLIENT_ERROR, retry_after=False)
            return
        self._connections.add(connection)
        connection.send(index, self._payload(index))

    def finished(self, connection: _Connection, index: int, status: int, retry: bool, *,
                 reuse: bool) -> None:
        if not reuse:  # "Connection: close": lost() hands its place to a waiting request
            if connection.transport is not None:
                connection.transport.close()
        elif self._backlog:
            backlogged = self._backlog.popleft()
            connection.send(backlogged, self._payload(backlogged))
        else:
            self._idle.append(connection)
        self._complete(index, status, retry_after=retry)

    def lost(self, connection: _Connection) -> None:
        self._open -= 1
        self._connections.discard(connection)
        if connection in self._idle:
            self._idle.remove(connection)
        if connection.index >= 0:
            index, connection.index = connection.index, -1
            self._complete(index, STATUS_CLIENT_ERROR, retry_after=False)
        if self._backlog and self._open < self._max:  # its place goes to a waiting request
            self._open_for(self._backlog.popleft())

    def _complete(self, index: int, status: int, *, retry_after: bool) -> None:
        record = self.record
        record.done[index] = time.perf_counter()
        record.status[index] = status
        record.retry_after[index] = retry_after
        self.outstanding -= 1
        if self.on_finished is not None:
            self.on_finished(index)
        if self.outstanding == 0 and self._all_done is not None:
            self._all_done.set()

    async def drain(self, timeout_s: float) -> int:
        """Wait (bounded) for every issued request; returns how many were still unanswered."""
        if self.outstanding > 0:
            self._all_done = asyncio.Event()
            try:
                await asyncio.wait_for(self._all_done.wait(), timeout_s)
            except TimeoutError:
                pass
            finally:
                self._all_done = None
        return self.outstanding

    def close(self) -> None:
        """Close every connection; requests still in flight stay ``STATUS_UNFINISHED``."""
        self.on_finished = None
        for task in self._tasks:
            task.cancel()
        self._backlog.clear()
        for connection in list(self._connections):
            connection.index = -1  # unanswered: not a connection error
            if connection.transport is not None:
                connection.transport.close()
        self._connections.clear()
        self._idle.clear()


@dataclass(frozen=True, kw_only=True, slots=True)
class OpenLoopRun:
    pool: Pool
    start: float
    """``perf_counter`` when the first request was due."""
    end: float
    """When the last request was issued."""
    rate: float
    issued: int
    max_lag_s: float
    """The most the scheduler ran behind the due time of a request it issued."""


async def open_loop(
    port: int, requests: Sequence[bytes], *, rate: float, duration_s: float,
    max_connections: int = 2000,
) -> OpenLoopRun:
    """Issue ``rate * duration_s`` requests, request ``i`` at ``start + i / rate``.

    Returns as soon as the last one is issued; :meth:`Pool.drain` then waits for the answers.
    """
    pool = Pool(port, requests, max_connections=max_connections)
    total = max(1, int(rate * duration_s))
    interval = 1.0 / rate
    start = time.perf_counter() + 0.01
    issued = 0
    max_lag = 0.0
    while issued < total:
        now = time.perf_counter()
        due = start + issued * interval
        if due > now:
            # One timer per tick, not per request: requests due within a tick go out together
            # at its end (up to _TICK_S late, which their latency counts from the due time).
            await asyncio.sleep(max(due - now, _TICK_S))
            continue
        max_lag = max(max_lag, now - due)
        while issued < total and due <= now:
            pool.issue(due)
            issued += 1
            due = start + issued * interval
        await asyncio.sleep(0)  # let responses in between bursts of a late scheduler
    return OpenLoopRun(pool=pool, start=start, end=time.perf_counter(), rate=rate,
                       issued=issued, max_lag_s=max_lag)


async def closed_loop(
    port: int, requests: Sequence[bytes], *, clients: int, duration_s: float,
    drain_timeout_s: float = 30.0,
) -> tuple[LoadRecord, float]:
    """``clients`` connections, each sending its next request as its last is answered, for
    ``duration_s``; returns the record and the start time (requests in flight at the end are
    waited for, bounded by ``drain_timeout_s``)."""
    pool = Pool(port, requests, max_connections=clients)
    start = time.perf_counter()
    deadline = start + duration_s

    def again(_: int) -> None:
        now = time.perf_counter()
        if now < deadline:
            pool.issue(now)

    pool.on_finished = again
    for _ in range(clients):
        pool.issue(start)
    await asyncio.sleep(duration_s)
    pool.on_finished = None
    await pool.drain(drain_timeout_s)
    pool.close()
    return pool.record, start


def percentile(values: Sequence[float], q: float) -> float | None:
    """The nearest-rank ``q`` quantile (0..1) of ``values``; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]
