"""Bound a request's work by its timeout and by its client staying connected.

Routes that answer with one body (embeddings, non-streamed completions and chat) await their
work through :func:`run_guarded`: when the client hangs up or ``request_timeout_s`` passes,
the work is cancelled, and its own ``async with``/``finally`` blocks give back what it holds
(queued inputs, a sequence's row, an upstream connection). Streams are raced against the
client by :class:`tidegate.api.sse.EventStreamResponse` instead.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Literal, TypeVar

from starlette.requests import Request
from starlette.types import Receive

from tidegate.api.common import ClientDisconnected
from tidegate.errors import RequestTimeout

__all__ = ["run_guarded"]

T = TypeVar("T")

# Most requests finish within a few milliseconds; only those still waiting after this long get a
# task that watches for the client going away and for the request timeout. Creating that task
# (and a timeout) for every request measured ~10% of the echo runtime's throughput.
_WATCH_AFTER_S = 0.005


class _RequestGuard:
    """Cancels the request's task when its client disconnects or its timeout passes."""

    __slots__ = ("_deadline", "_handle", "_receive", "_task", "_watcher", "outcome", "timeout_s")

    def __init__(self, receive: Receive, timeout_s: float) -> None:
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        self._task = task
        self._receive = receive
        self._watcher: asyncio.Task[None] | None = None
        self._deadline = loop.time() + timeout_s
        self.timeout_s = timeout_s
        self.outcome: Literal["disconnected", "timeout"] | None = None
        self._handle = loop.call_later(min(_WATCH_AFTER_S, timeout_s), self._start)

    def _start(self) -> None:
        self._watcher = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        try:
            async with asyncio.timeout_at(self._deadline):
                while (await self._receive())["type"] != "http.disconnect":
                    pass
            self.outcome = "disconnected"
        except TimeoutError:
            self.outcome = "timeout"
        self._task.cancel()

    def close(self) -> None:
        self._handle.cancel()
        if self._watcher is not None:
            self._watcher.cancel()


async def run_guarded(request: Request, work: Awaitable[T], *, model: str, timeout_s: float) -> T:
    """Await ``work``, cancelling it (which withdraws its queued inputs) if the client
    disconnects (:class:`ClientDisconnected`) or ``timeout_s`` passes (:class:`RequestTimeout`)."""
    guard = _RequestGuard(request.receive, timeout_s)
    try:
        return await work
    except asyncio.CancelledError:
        if guard.outcome is None or guard._task.uncancel() > 0:
            raise
        if guard.outcome == "timeout":
            raise RequestTimeout(model=model, timeout_s=timeout_s) from None
        raise ClientDisconnected() from None
    finally:
        guard.close()
