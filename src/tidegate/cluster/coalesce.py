"""Requests for one model, sent to its replicas as few calls as possible.

A call through a Serve handle costs about as much CPU as a small model's forward pass
(serialization, routing, the replica's bookkeeping), so one call per HTTP request would spend
most of a machine on the transport. The ingress therefore coalesces, with the batcher's
policy: when no call is in flight a request goes at once (no added latency for a lone client);
while ``max_in_flight`` calls are out, the requests that arrive wait and leave together in the
next call, up to ``max_items``. The replica runs a call's requests concurrently, so its own
batcher still forms the model's batches.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

__all__ = ["Coalescer", "QueueFull"]

T = TypeVar("T")
R = TypeVar("R")


class QueueFull(Exception):
    """``max_pending`` requests already wait for a call."""

    def __init__(self, pending: int) -> None:
        super().__init__(f"{pending} requests already wait")
        self.pending = pending


class Coalescer(Generic[T, R]):
    """``await submit(item)`` returns ``send``'s answer for it; ``send`` takes a list of items
    and returns one answer per item, in order, or raises (every item of the call gets it)."""

    def __init__(self, send: Callable[[Sequence[T]], Awaitable[Sequence[R]]], *,
                 max_items: int, max_in_flight: Callable[[], int],
                 max_pending: int | None = None) -> None:
        self._send = send
        self._max_pending = max_pending
        self._max_items = max_items
        self._max_in_flight = max_in_flight
        self._pending: deque[tuple[T, asyncio.Future[R]]] = deque()
        self._in_flight = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self.calls = 0
        """Calls sent so far (for tests and statistics)."""

    async def submit(self, item: T) -> R:
        """``item``'s answer; :class:`QueueFull` at once if ``max_pending`` items wait."""
        if self._max_pending is not None and len(self._pending) >= self._max_pending:
            raise QueueFull(len(self._pending))
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._pending.append((item, future))
        self._dispatch()
        return await future

    def _dispatch(self) -> None:
        while self._pending and self._in_flight < max(1, self._max_in_flight()):
            batch: list[tuple[T, asyncio.Future[R]]] = []
            while self._pending and len(batch) < self._max_items:
                entry = self._pending.popleft()
                if not entry[1].done():  # its caller gave up (timed out) while it waited
                    batch.append(entry)
            if not batch:
                return
            self._in_flight += 1
            self.calls += 1
            task = asyncio.get_running_loop().create_task(self._call(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _call(self, batch: list[tuple[T, asyncio.Future[R]]]) -> None:
        try:
            answers = await self._send([item for item, _ in batch])
        except asyncio.CancelledError:
            for _, future in batch:
                future.cancel()
            raise
        except Exception as exc:
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
        else:
            for (_, future), answer in zip(batch, answers, strict=True):
                if not future.done():
                    future.set_result(answer)
        finally:
            self._in_flight -= 1
            self._dispatch()
