"""A successful upstream response relayed chunk by chunk: what
:meth:`~tidegate.upstream.client.UpstreamClient.open_stream` returns."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import TracebackType

from tidegate.errors import UpstreamError
from tidegate.upstream.pool import TRANSPORT_ERRORS, Exchange

__all__ = ["UpstreamStream"]


class UpstreamStream:
    """A successful upstream response relayed chunk by chunk, as the replica sends them.

    Iterate it (``async for chunk in stream``) and ``aclose()`` it when done or when the client
    goes away (also ``async with stream``); closing mid-body discards the connection and frees
    its pool slot. A failure after the first chunk raises :class:`UpstreamError` from the
    iterator: the status line is already sent, so the route can only end the stream.
    """

    def __init__(
        self, exchange: Exchange, *, fail: Callable[[BaseException, int], UpstreamError],
    ) -> None:
        self._exchange = exchange
        self._fail = fail
        self._first: bytes | None = None
        self._closed = False
        self.relayed_bytes = 0

    @property
    def status_code(self) -> int:
        return self._exchange.status

    @property
    def headers(self) -> Mapping[str, str]:
        return self._exchange.headers

    @property
    def media_type(self) -> str | None:
        return self._exchange.headers.get("content-type")

    @property
    def replica(self) -> str:
        return self._exchange.replica

    async def _prefetch(self) -> None:
        """Read the first chunk, so failures before any byte is relayed are still errors."""
        try:
            self._first = await self._next()
        except StopAsyncIteration:
            self._first = None

    async def _next(self) -> bytes:
        if self._closed:
            raise StopAsyncIteration
        try:
            chunk = await self._exchange.read_chunk()
        except TRANSPORT_ERRORS as exc:
            await self.aclose()
            raise self._fail(exc, self.relayed_bytes) from exc
        except BaseException:  # cancelled: the client went away mid-read
            await self.aclose()
            raise
        if not chunk:  # the end of the body
            await self.aclose()
            raise StopAsyncIteration
        self.relayed_bytes += len(chunk)
        return chunk

    def __aiter__(self) -> UpstreamStream:
        return self

    async def __anext__(self) -> bytes:
        if self._first is not None:
            chunk, self._first = self._first, None
            return chunk
        return await self._next()

    async def aclose(self) -> None:
        self._closed = True
        self._first = None
        await self._exchange.aclose()

    async def __aenter__(self) -> UpstreamStream:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return (f"<UpstreamStream {self.replica} status={self.status_code} "
                f"relayed={self.relayed_bytes} closed={self._closed}>")
