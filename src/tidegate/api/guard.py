"""Bound a request's work by its timeout and by its client staying connected.

Routes that answer with one body (embeddings, non-streamed completions and chat) await their
work through :func:`run_guarded`: when the client hangs up or ``request_timeout_s`` passes,
the work is cancelled, and its own ``async with``/``finally`` blocks give back what it holds
(queued inputs, a sequence's row, an upstream connection). Streams are raced against the
client by :class:`tidegate.api.sse.EventStreamResponse` instead.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Literal, Protocol, TypeVar

from starlette.requests import Request
from starlette.types import Receive, Scope

from tidegate.api.common import ClientDisconnected
from tidegate.errors import RequestTimeout

__all__ = ["DISCONNECT_EXTENSION", "DisconnectCallbacks", "disconnect_callbacks", "run_guarded"]

T = TypeVar("T")

DISCONNECT_EXTENSION = "tidegate.disconnect"
"""An ASGI scope extension tidegate's own HTTP protocol (:mod:`tidegate.protocol`) offers; its
``"callbacks"`` is the connection's set of zero-argument callbacks, each called once if the
connection is lost. Under other servers (an in-process test client, Ray Serve's proxy) a task
watches ``receive`` instead."""


class DisconnectCallbacks(Protocol):
    """What :data:`DISCONNECT_EXTENSION`'s ``"callbacks"`` holds (a ``set`` is one)."""

    def add(self, callback: Callable[[], None], /) -> None: ...
    def discard(self, callback: Callable[[], None], /) -> None: ...


def disconnect_callbacks(scope: Scope) -> DisconnectCallbacks | None:
    """The connection's disconnect callbacks, if the server offers :data:`DISCONNECT_EXTENSION`."""
    extension = (scope.get("extensions") or {}).get(DISCONNECT_EXTENSION) or {}
    callbacks: DisconnectCallbacks | None = extension.get("callbacks")
    return callbacks


# Without the extension, only requests still waiting after this long get a task that watches for
# the client going away and for the request timeout. Creating that task (and a timeout) for every
# request measured ~10% of the echo runtime's throughput.
_WATCH_AFTER_S = 0.005


class _RequestGuard:
    """Cancels the request's task when its client disconnects or its timeout passes.

    With :data:`DISCONNECT_EXTENSION`, a timer and a callback do it: no task, so nothing is left
    for the cyclic garbage collector. A cancelled watcher task is (its ``CancelledError``'s
    traceback holds its frames, which hold the guard, the request's task and its scope): ~25
    objects per request that waited, which under the overload soak made every full collection
    50-110 ms, about one a second."""

    __slots__ = ("_callbacks", "_deadline", "_handle", "_on_lost", "_receive", "_task",
                 "_watcher", "outcome", "timeout_s")

    def __init__(self, scope: Scope, receive: Receive, timeout_s: float) -> None:
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        self._task = task
        self._receive = receive
        self._watcher: asyncio.Task[None] | None = None
        self._deadline = loop.time() + timeout_s
        self.timeout_s = timeout_s
        self.outcome: Literal["disconnected", "timeout"] | None = None
        self._callbacks = disconnect_callbacks(scope)
        self._on_lost: Callable[[], None] | None = None
        if self._callbacks is None:
            self._handle = loop.call_later(min(_WATCH_AFTER_S, timeout_s), self._start)
        else:
            self._on_lost = self._disconnected
            self._callbacks.add(self._on_lost)
            self._handle = loop.call_at(self._deadline, self._timed_out)

    def _disconnected(self) -> None:
        self._cancel("disconnected")

    def _timed_out(self) -> None:
        self._cancel("timeout")

    def _cancel(self, outcome: Literal["disconnected", "timeout"]) -> None:
        if self.outcome is None:
            self.outcome = outcome
            self._task.cancel()

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
        if self._callbacks is not None and self._on_lost is not None:
            self._callbacks.discard(self._on_lost)
            self._on_lost = None  # no reference cycle through the bound method
        if self._watcher is not None:
            self._watcher.cancel()


async def run_guarded(request: Request, work: Awaitable[T], *, model: str, timeout_s: float) -> T:
    """Await ``work``, cancelling it (which withdraws its queued inputs) if the client
    disconnects (:class:`ClientDisconnected`) or ``timeout_s`` passes (:class:`RequestTimeout`)."""
    guard = _RequestGuard(request.scope, request.receive, timeout_s)
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
