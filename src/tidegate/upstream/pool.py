"""The connection pool to one replica: an ``httpx.AsyncClient`` whose httpcore pool counts its
connections and retires old ones.

httpx has no knob for a maximum connection age, so this module hooks httpcore at two public
extension points and one documented private one:

* ``AsyncConnectionPool.create_connection`` is overridden to wrap every connection in
  :class:`_AgedConnection`, which records when it was created and reports itself *expired*
  (``has_expired``) once it is idle and older than ``max_connection_age_s``. httpcore's pool asks
  every connection ``has_expired()`` whenever a request arrives or a response is closed, and
  closes expired idle ones, so an old connection finishes its current request and is then
  closed, never interrupted. Reuse is counted here too.
* The pool's ``network_backend`` is wrapped so that every real socket opened and closed is
  counted, whichever layer closes it (the pool, the HTTP/1.1 state machine after an aborted
  body, or a failed TLS handshake).
* httpx builds its transport's httpcore pool itself; :class:`_PooledTransport` replaces that
  (still unused) pool with ours. This is the one private attribute touched (``_pool``); the
  constructor checks it so an httpx release that renames it fails at start-up, not silently.

Pool wait is measured with httpx's documented ``trace`` request extension: the first
connection event of a request (a TCP connect, or sending headers on a reused connection) marks
the moment the pool handed it a connection.
"""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import httpcore
import httpx

from tidegate.metrics import TIME_BUCKETS, Histogram
from tidegate.upstream.config import PoolConfig, UpstreamTimeouts

__all__ = ["Exchange", "PoolStatistics", "ReplicaPool"]

log = logging.getLogger("tidegate.upstream")

Clock = Callable[[], float]

# The first trace event a request sees once the pool has given it a connection.
_CONNECTION_ACQUIRED = frozenset({
    "connection.connect_tcp.started",
    "connection.connect_unix_socket.started",
    "http11.send_request_headers.started",
    "http2.send_request_headers.started",
})


class _Counters:
    __slots__ = ("closed", "opened", "pool_timeouts", "requests", "retired_by_age", "reused")

    def __init__(self) -> None:
        self.opened = 0
        self.closed = 0
        self.requests = 0
        self.reused = 0
        self.retired_by_age = 0
        self.pool_timeouts = 0


# The stream and backend below implement httpcore's interfaces, whose methods take ``timeout``
# arguments (hence the ASYNC109 exemptions).


class _CountedStream(httpcore.AsyncNetworkStream):
    """A socket stream that counts itself closed exactly once."""

    def __init__(self, inner: httpcore.AsyncNetworkStream, counters: _Counters) -> None:
        self._inner = inner
        self._counters = counters
        self._closed = False

    def _mark_closed(self) -> None:
        if not self._closed:
            self._closed = True
            self._counters.closed += 1

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:  # noqa: ASYNC109
        return await self._inner.read(max_bytes, timeout)

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:  # noqa: ASYNC109
        await self._inner.write(buffer, timeout)

    async def aclose(self) -> None:
        self._mark_closed()
        await self._inner.aclose()

    async def start_tls(
        self, ssl_context: ssl.SSLContext, server_hostname: str | None = None,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> httpcore.AsyncNetworkStream:
        # The TLS stream takes over the socket: it is the one that will be closed, and the
        # plain stream is closed by the backend itself if the handshake fails.
        self._closed = True
        try:
            tls = await self._inner.start_tls(ssl_context, server_hostname, timeout)
        except BaseException:
            self._counters.closed += 1
            raise
        return _CountedStream(tls, self._counters)

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class _CountingBackend(httpcore.AsyncNetworkBackend):
    def __init__(self, counters: _Counters) -> None:
        self._inner = httpcore.AnyIOBackend()
        self._counters = counters

    async def connect_tcp(
        self, host: str, port: int, timeout: float | None = None,  # noqa: ASYNC109
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        stream = await self._inner.connect_tcp(host, port, timeout, local_address, socket_options)
        self._counters.opened += 1
        return _CountedStream(stream, self._counters)

    async def connect_unix_socket(
        self, path: str, timeout: float | None = None,  # noqa: ASYNC109
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        stream = await self._inner.connect_unix_socket(path, timeout, socket_options)
        self._counters.opened += 1
        return _CountedStream(stream, self._counters)

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


class _AgedConnection(httpcore.AsyncConnectionInterface):
    """Delegates to httpcore's connection; expires once idle and older than ``max_age_s``."""

    def __init__(
        self, inner: httpcore.AsyncConnectionInterface, *, max_age_s: float | None,
        clock: Clock, counters: _Counters,
    ) -> None:
        self._inner = inner
        self._max_age_s = max_age_s
        self._clock = clock
        self._counters = counters
        self._created_at = clock()
        self._served = 0
        self._retired = False

    def _too_old(self) -> bool:
        return self._max_age_s is not None and self._clock() - self._created_at >= self._max_age_s

    async def handle_async_request(self, request: httpcore.Request) -> httpcore.Response:
        try:
            response = await self._inner.handle_async_request(request)
        except httpcore.ConnectionNotAvailable:
            # httpcore's pool offered a connection that turned out busy and will try another:
            # this one served nothing, so it counts neither as a request nor as a reuse.
            raise
        except BaseException:
            self._count_request()
            raise
        self._count_request()
        return response

    def _count_request(self) -> None:
        self._served += 1
        self._counters.requests += 1
        if self._served > 1:
            self._counters.reused += 1

    async def aclose(self) -> None:
        await self._inner.aclose()

    def info(self) -> str:
        return self._inner.info()

    def can_handle_request(self, origin: httpcore.Origin) -> bool:
        return self._inner.can_handle_request(origin)

    def is_available(self) -> bool:
        return self._inner.is_available() and not self._too_old()

    def has_expired(self) -> bool:
        if self._inner.has_expired():
            return True
        if self._inner.is_idle() and not self._inner.is_closed() and self._too_old():
            if not self._retired:
                self._retired = True
                self._counters.retired_by_age += 1
            return True
        return False

    def is_idle(self) -> bool:
        return self._inner.is_idle()

    def is_closed(self) -> bool:
        return self._inner.is_closed()

    def __repr__(self) -> str:
        return f"<_AgedConnection {self._inner!r} served={self._served}>"


class _AgingPool(httpcore.AsyncConnectionPool):
    def __init__(
        self, config: PoolConfig, *, clock: Clock, counters: _Counters
    ) -> None:
        super().__init__(
            max_connections=config.max_connections,
            max_keepalive_connections=config.max_keepalive_connections,
            keepalive_expiry=config.keepalive_expiry_s,
            # One context per replica: httpcore would otherwise build (and load the CA bundle
            # into) a new one for every https connection.
            ssl_context=httpcore.default_ssl_context(),
            network_backend=_CountingBackend(counters),
        )
        self._max_age_s = config.max_connection_age_s
        self._clock = clock
        self._counters = counters

    def create_connection(self, origin: httpcore.Origin) -> httpcore.AsyncConnectionInterface:
        return _AgedConnection(
            super().create_connection(origin), max_age_s=self._max_age_s, clock=self._clock,
            counters=self._counters,
        )


class _PooledTransport(httpx.AsyncHTTPTransport):
    def __init__(self, pool: _AgingPool) -> None:
        super().__init__(trust_env=False)
        if not isinstance(self._pool, httpcore.AsyncConnectionPool):  # pragma: no cover
            raise RuntimeError(
                f"httpx {httpx.__version__} no longer keeps its httpcore pool in "
                "AsyncHTTPTransport._pool; tidegate.upstream.pool needs updating"
            )
        self._pool = pool


class _PoolWaitTracer:
    """httpx ``trace`` extension callback: observes the time until a connection is acquired."""

    __slots__ = ("_clock", "_histogram", "_started", "acquired")

    def __init__(self, histogram: Histogram, clock: Clock) -> None:
        self._histogram = histogram
        self._clock = clock
        self._started = clock()
        self.acquired = False

    async def __call__(self, event: str, info: Mapping[str, Any]) -> None:
        if not self.acquired and event in _CONNECTION_ACQUIRED:
            self.acquired = True
            self._histogram.observe(self._clock() - self._started)


@dataclass(frozen=True, slots=True)
class PoolStatistics:
    url: str
    in_flight: int
    """Requests sent whose responses are not closed yet (routing's "outstanding")."""
    connections_active: int
    """Connections serving a request (or connecting) now."""
    connections_idle: int
    opened: int
    closed: int
    requests: int
    """Requests handed a connection (first uses plus reuses)."""
    reused: int
    reuse_rate: float
    retired_by_age: int
    pool_timeouts: int
    pool_wait_count: int
    pool_wait_sum_s: float


class Exchange:
    """One request on one replica whose response headers have arrived and whose body has not
    been read. :meth:`aclose` (idempotent) releases the connection and the in-flight slot."""

    __slots__ = ("_closed", "_pool", "response")

    def __init__(self, pool: ReplicaPool, response: httpx.Response) -> None:
        self._pool = pool
        self.response = response
        self._closed = False

    @property
    def replica(self) -> str:
        return self._pool.url

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            await self.response.aclose()
        finally:
            self._pool._in_flight -= 1


class ReplicaPool:
    """Pooled HTTP connections to one replica, with statistics."""

    def __init__(
        self, url: str, *, pool: PoolConfig, timeouts: UpstreamTimeouts,
        headers: Mapping[str, str] | None = None, clock: Clock = time.monotonic,
    ) -> None:
        self.url = url
        self._clock = clock
        self._counters = _Counters()
        self._pool = _AgingPool(pool, clock=clock, counters=self._counters)
        self._client = httpx.AsyncClient(
            base_url=url,
            transport=_PooledTransport(self._pool),
            timeout=httpx.Timeout(
                connect=timeouts.connect_s, read=timeouts.read_s, write=timeouts.write_s,
                pool=timeouts.pool_s,
            ),
            # Relay bytes as the replica sent them: no compression to undo or re-label.
            headers={"accept-encoding": "identity", **(headers or {})},
            trust_env=False,
            follow_redirects=False,
        )
        self.pool_wait = Histogram(TIME_BUCKETS)
        self._in_flight = 0

    @property
    def in_flight(self) -> int:
        return self._in_flight

    async def open(
        self, method: str, path: str, *, content: bytes | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Exchange:
        """Send a request and return once the response headers arrived.

        The caller must ``aclose()`` the exchange. httpx errors propagate unchanged.
        """
        tracer = _PoolWaitTracer(self.pool_wait, self._clock)
        request = self._client.build_request(
            method, path, content=content, headers=headers, extensions={"trace": tracer}
        )
        self._in_flight += 1
        try:
            response = await self._client.send(request, stream=True)
        except BaseException as exc:
            self._in_flight -= 1
            if isinstance(exc, httpx.PoolTimeout):
                self._counters.pool_timeouts += 1
            raise
        return Exchange(self, response)

    def statistics(self) -> PoolStatistics:
        counters = self._counters
        idle = active = 0
        for connection in self._pool.connections:
            if connection.is_closed():
                continue
            if connection.is_idle():
                idle += 1
            else:
                active += 1
        return PoolStatistics(
            url=self.url,
            in_flight=self._in_flight,
            connections_active=active,
            connections_idle=idle,
            opened=counters.opened,
            closed=counters.closed,
            requests=counters.requests,
            reused=counters.reused,
            reuse_rate=counters.reused / counters.requests if counters.requests else 0.0,
            retired_by_age=counters.retired_by_age,
            pool_timeouts=counters.pool_timeouts,
            pool_wait_count=self.pool_wait.count,
            pool_wait_sum_s=self.pool_wait.sum,
        )

    async def aclose(self) -> None:
        """Close every connection; responses still open fail when next read."""
        await self._client.aclose()

    def __repr__(self) -> str:
        s = self.statistics()
        return (
            f"<ReplicaPool {self.url} in_flight={s.in_flight} active={s.connections_active} "
            f"idle={s.connections_idle} opened={s.opened} closed={s.closed} reused={s.reused}>"
        )
