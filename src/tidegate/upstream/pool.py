"""The connection pool to one replica: an ``aiohttp.ClientSession`` whose connector counts its
connections and retires old ones.

Why aiohttp: measured on this project's 2-core machine against a local echo upstream, 10
concurrent requests on one loop, httpx 0.28 managed ~930 req/s and aiohttp ~6,200 req/s; the
client's CPU per request is the gateway's added latency.

aiohttp has no knob for a maximum connection age, so :class:`_AgingConnector` overrides the
connector's public ``connect()``: every connection handed to a request is recorded (first sight:
opened; later: reused). One older than ``max_connection_age_s`` is retired with its protocol's
``force_close()``, which makes the connector close it instead of pooling it: at hand-out if it
aged while idle (the request then gets another connection), or, through the connection's
release callback, as the request that was using it ends. An old connection is never
interrupted. A connection counts as closed when its protocol's ``closed`` future resolves,
whoever closed it (the pool's idle expiry, the upstream, a discarded half-read response), or
earlier, when statistics are read and its transport is already closing.

The pool wait is a semaphore of ``max_connections`` slots in front of the connector (whose own
limit is the same): a request holds a slot from before it asks for a connection until its
exchange is closed. Waiting for a slot is the pool wait, measured and bounded by
``timeouts.pool_s`` (:class:`PoolTimeout`, which tidegate answers with 503).
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import aiohttp
import yarl
from multidict import CIMultiDictProxy

from tidegate.histogram import TIME_BUCKETS, Histogram
from tidegate.upstream.config import PoolConfig, UpstreamTimeouts
from tidegate.upstream.stats import PoolStatistics

if TYPE_CHECKING:
    from aiohttp.client_proto import ResponseHandler
    from aiohttp.client_reqrep import ClientRequest
    from aiohttp.tracing import Trace

__all__ = [
    "TRANSPORT_ERRORS",
    "Exchange",
    "PoolStatistics",
    "PoolTimeout",
    "ReplicaPool",
    "describe_error",
]

Clock = Callable[[], float]


class PoolTimeout(Exception):
    """Every connection to the replica stayed busy for ``timeouts.pool_s``."""


TRANSPORT_ERRORS: tuple[type[BaseException], ...] = (aiohttp.ClientError, TimeoutError,
                                                      PoolTimeout)
"""What a request to a replica raises when the transport fails (not an HTTP error status)."""


def describe_error(exc: BaseException) -> str:
    """A transport failure for messages: its type, and its text when it has one."""
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


class _Counters:
    __slots__ = ("closed", "opened", "pool_timeouts", "requests", "retired_by_age", "reused")

    def __init__(self) -> None:
        self.opened = 0
        self.closed = 0
        self.requests = 0
        self.reused = 0
        self.retired_by_age = 0
        self.pool_timeouts = 0


class _AgingConnector(aiohttp.TCPConnector):
    """A TCP connector that counts its connections and retires those past their age."""

    def __init__(self, config: PoolConfig, *, clock: Clock, counters: _Counters) -> None:
        expiry = config.keepalive_expiry_s
        keepalive: dict[str, Any] = (
            {"force_close": True} if expiry == 0 else {"keepalive_timeout": expiry}
        )
        super().__init__(limit=config.max_connections, limit_per_host=0, **keepalive)
        self._max_age_s = config.max_connection_age_s
        self._clock = clock
        self._counters = counters
        self._born: dict[ResponseHandler, float] = {}

    async def connect(self, req: ClientRequest, traces: list[Trace],
                      timeout: aiohttp.ClientTimeout,  # noqa: ASYNC109 - aiohttp signature
                      ) -> aiohttp.connector.Connection:
        while True:
            connection = await super().connect(req, traces, timeout)
            protocol = connection.protocol
            if protocol is None:  # pragma: no cover - aiohttp hands out live connections
                return connection
            born = self._born.get(protocol)
            if born is None:
                self._track(protocol, self._clock())
                break
            if not self._too_old(born):
                self._counters.reused += 1
                break
            self._retire(protocol)  # it aged while idle: close it and ask again
            connection.release()
        self._counters.requests += 1
        connection.add_callback(functools.partial(self._released, protocol))
        return connection

    def _too_old(self, born: float) -> bool:
        return self._max_age_s is not None and self._clock() - born >= self._max_age_s

    def _retire(self, protocol: ResponseHandler) -> None:
        protocol.force_close()  # the connector closes it instead of pooling it
        self._counters.retired_by_age += 1

    def _released(self, protocol: ResponseHandler) -> None:
        """Runs as a request gives its connection back, before the connector pools it."""
        born = self._born.get(protocol)
        if born is not None and self._too_old(born) and not protocol.should_close:
            self._retire(protocol)

    def _track(self, protocol: ResponseHandler, now: float) -> None:
        self._counters.opened += 1
        self._born[protocol] = now
        closed = protocol.closed
        if closed is None:  # already lost
            self._forget(protocol)
        else:
            closed.add_done_callback(lambda _: self._forget(protocol))

    def _forget(self, protocol: ResponseHandler) -> None:
        if self._born.pop(protocol, None) is not None:
            self._counters.closed += 1

    def open_connections(self) -> int:
        """Connections opened and not closed yet. A close that aiohttp has started (the
        transport is gone or closing) counts now rather than when the kernel confirms it."""
        for protocol in [p for p in self._born if not p.is_connected()]:
            self._forget(protocol)
        return len(self._born)


class Exchange:
    """One request on one replica whose response headers have arrived and whose body has not
    been read. :meth:`aclose` (idempotent) releases the connection and the pool slot; closing
    before the body was read to its end discards the connection."""

    __slots__ = ("_closed", "_pool", "_response")

    def __init__(self, pool: ReplicaPool, response: aiohttp.ClientResponse) -> None:
        self._pool = pool
        self._response = response
        self._closed = False

    @property
    def replica(self) -> str:
        return self._pool.url

    @property
    def status(self) -> int:
        return self._response.status

    @property
    def headers(self) -> CIMultiDictProxy[str]:
        return self._response.headers

    async def read(self) -> bytes:
        """The whole body."""
        return await self._response.read()

    async def read_chunk(self) -> bytes:
        """The next bytes as they arrive; ``b""`` at the end of the body."""
        return await self._response.content.readany()

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        response = self._response
        try:
            if response.content.is_eof():
                response.release()
            else:
                response.close()  # a half-read body: the connection cannot be reused
        finally:
            self._pool._release_slot()


class ReplicaPool:
    """Pooled HTTP connections to one replica, with statistics.

    The session is created on first use (aiohttp binds it to the running loop); ``aclose()``
    closes every connection.
    """

    def __init__(
        self, url: str, *, pool: PoolConfig, timeouts: UpstreamTimeouts,
        headers: Mapping[str, str] | None = None, clock: Clock = time.monotonic,
    ) -> None:
        self.url = url
        self._config = pool
        self._timeouts = timeouts
        # Relay bytes as the replica sent them: no compression to undo or re-label.
        self._headers = {"accept-encoding": "identity", **(headers or {})}
        self._clock = clock
        self._counters = _Counters()
        self._connector: _AgingConnector | None = None
        self._session: aiohttp.ClientSession | None = None
        self._slots: asyncio.Semaphore | None = None
        self._pool_wait = Histogram(TIME_BUCKETS)
        self._in_flight = 0
        self._holding = 0
        self._closed = False
        self._urls: dict[str, yarl.URL] = {}

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def _open_session(self) -> aiohttp.ClientSession:
        self._connector = _AgingConnector(self._config, clock=self._clock,
                                          counters=self._counters)
        self._slots = asyncio.Semaphore(self._config.max_connections)
        timeouts = self._timeouts
        self._session = aiohttp.ClientSession(
            connector=self._connector,
            timeout=aiohttp.ClientTimeout(
                total=None, connect=None, sock_connect=timeouts.connect_s,
                sock_read=timeouts.read_s,
            ),
            headers=self._headers,
            auto_decompress=False,
            trust_env=False,
        )
        return self._session

    async def _acquire_slot(self, slots: asyncio.Semaphore) -> None:
        if not slots.locked():
            await slots.acquire()  # free: returns without suspending
            self._pool_wait.observe(0.0)
            return
        started = self._clock()
        try:
            async with asyncio.timeout(self._timeouts.pool_s):
                await slots.acquire()
        except TimeoutError:
            self._counters.pool_timeouts += 1
            raise PoolTimeout(
                f"no free connection to {self.url} within {self._timeouts.pool_s:g}s"
            ) from None
        self._pool_wait.observe(self._clock() - started)

    def _url_for(self, path: str) -> yarl.URL:
        # Appended, not joined: a replica URL may carry a path prefix (https://host/openai).
        # Parsed once per path: the gateway sends the same few paths over and over.
        url = self._urls.get(path)
        if url is None:
            url = self._urls[path] = yarl.URL(self.url + path)
        return url

    def _release_slot(self) -> None:
        self._in_flight -= 1
        self._holding -= 1
        assert self._slots is not None
        self._slots.release()

    async def open(
        self, method: str, path: str, *, content: bytes | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Exchange:
        """Send a request and return once the response headers arrived.

        The caller must ``aclose()`` the exchange. Transport failures raise one of
        :data:`TRANSPORT_ERRORS` (:class:`PoolTimeout` after ``timeouts.pool_s`` without a free
        connection).
        """
        if self._closed:
            raise aiohttp.ClientConnectionError(f"the connection pool to {self.url} is closed")
        session = self._session or self._open_session()
        slots = self._slots
        assert slots is not None
        self._in_flight += 1
        try:
            await self._acquire_slot(slots)
        except BaseException:
            self._in_flight -= 1
            raise
        self._holding += 1
        try:
            response = await session.request(
                method, self._url_for(path), data=content, headers=headers,
                allow_redirects=False,
            )
        except BaseException:
            self._release_slot()
            raise
        return Exchange(self, response)

    def statistics(self) -> PoolStatistics:
        open_now = 0 if self._connector is None else self._connector.open_connections()
        active = min(self._holding, open_now)
        counters = self._counters
        return PoolStatistics(
            url=self.url,
            in_flight=self._in_flight,
            connections_active=active,
            connections_idle=open_now - active,
            opened=counters.opened,
            closed=counters.closed,
            requests=counters.requests,
            reused=counters.reused,
            reuse_rate=counters.reused / counters.requests if counters.requests else 0.0,
            retired_by_age=counters.retired_by_age,
            pool_timeouts=counters.pool_timeouts,
            pool_wait=self._pool_wait.snapshot(),
        )

    async def aclose(self) -> None:
        """Close every connection; responses still open fail when next read, and later
        requests fail at once."""
        self._closed = True
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    def __repr__(self) -> str:
        s = self.statistics()
        return (
            f"<ReplicaPool {self.url} in_flight={s.in_flight} active={s.connections_active} "
            f"idle={s.connections_idle} opened={s.opened} closed={s.closed} reused={s.reused}>"
        )
