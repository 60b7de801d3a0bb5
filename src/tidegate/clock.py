"""One clock per component: it tells the time and it waits.

Code that keeps deadlines, measures durations or backs off takes a :class:`Clock` instead of
reading ``time.monotonic``, ``loop.time`` or ``time.time`` and calling ``asyncio.timeout``
itself. Then its tests run on a :class:`FakeClock`: time moves only when the test advances it,
and every wait whose deadline it passes wakes, so timeouts and backoffs take no real time.

A leaf module: it imports nothing from tidegate.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
import time
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from types import TracebackType
from typing import Protocol, TypeVar

__all__ = ["Clock", "FakeClock", "MonotonicClock"]

T = TypeVar("T")


class Clock(Protocol):
    """Monotonic time in seconds, plus waiting on that time.

    ``now()`` only has meaning in differences and deadlines (``deadline = clock.now() + 5``);
    ``wall()`` is for timestamps shown to people (API fields), never for arithmetic with
    ``now()``. The waits must run on the event loop.
    """

    def now(self) -> float:
        """Monotonic seconds."""
        ...

    def wall(self) -> float:
        """Seconds since the epoch, for display."""
        ...

    async def sleep_until(self, deadline: float) -> None:
        """Return once ``now() >= deadline`` (at once if it already is)."""
        ...

    def timeout_at(self, deadline: float) -> AbstractAsyncContextManager[object]:
        """``async with clock.timeout_at(deadline):`` cancels the block at ``deadline`` and
        raises :class:`TimeoutError` in its place, as ``asyncio.timeout_at`` does."""
        ...

    async def sleep(self, seconds: float) -> None:
        await self.sleep_until(self.now() + seconds)

    async def wait_for(self, awaitable: Awaitable[T], seconds: float) -> T:
        """``awaitable``'s result, or :class:`TimeoutError` after ``seconds``."""
        async with self.timeout_at(self.now() + seconds):
            return await awaitable


class MonotonicClock(Clock):
    """Real time: ``time.monotonic`` (what asyncio's loop uses), waits on the running loop."""

    def now(self) -> float:
        return time.monotonic()

    def wall(self) -> float:
        return time.time()

    async def sleep_until(self, deadline: float) -> None:
        await asyncio.sleep(max(0.0, deadline - self.now()))

    def timeout_at(self, deadline: float) -> AbstractAsyncContextManager[object]:
        # The loop's time need not be time.monotonic (uvloop keeps its own): convert.
        loop = asyncio.get_running_loop()
        return asyncio.timeout_at(loop.time() + (deadline - self.now()))


class _Timer:
    __slots__ = ("callback", "cancelled")

    def __init__(self, callback: Callable[[], object]) -> None:
        self.callback = callback
        self.cancelled = False


class FakeClock(Clock):
    """Time that moves only by :meth:`advance`; deterministic, for tests.

    Waiting on it (:meth:`sleep_until`, :meth:`timeout_at`, :meth:`wait_for`) registers a timer;
    :meth:`advance` fires, in deadline order, every timer its new time reaches. A test that must
    know the code under test is waiting before it advances awaits :meth:`until_waiting`.
    """

    def __init__(self, now: float = 0.0, *, wall_at_zero: float = 1_700_000_000.0) -> None:
        self._now = now
        self._wall_at_zero = wall_at_zero
        self._timers: list[tuple[float, int, _Timer]] = []
        self._order = itertools.count()
        self._pending = 0
        self._registered = asyncio.Event()

    def __repr__(self) -> str:
        return f"FakeClock(now={self._now}, waiting={self._pending})"

    def now(self) -> float:
        return self._now

    def wall(self) -> float:
        return self._wall_at_zero + self._now

    @property
    def waiting(self) -> int:
        """How many waits on this clock are pending."""
        return self._pending

    def advance(self, seconds: float) -> None:
        """Move time forward and wake every wait whose deadline that reaches."""
        if seconds < 0:
            raise ValueError(f"time only moves forward; got advance({seconds})")
        self._now += seconds
        while self._timers and self._timers[0][0] <= self._now:
            _, _, timer = heapq.heappop(self._timers)
            if not timer.cancelled:
                self._cancel(timer)
                timer.callback()

    async def until_waiting(self, count: int = 1) -> None:
        """Return once at least ``count`` waits are pending (bound it with a timeout)."""
        while self._pending < count:
            registered = self._registered
            await registered.wait()

    async def sleep_until(self, deadline: float) -> None:
        if deadline <= self._now:
            await asyncio.sleep(0)
            return
        woken: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def wake() -> None:
            if not woken.done():
                woken.set_result(None)

        timer = self._add(deadline, wake)
        try:
            await woken
        finally:
            self._cancel(timer)

    def timeout_at(self, deadline: float) -> AbstractAsyncContextManager[object]:
        return _FakeTimeout(self, deadline)

    def _add(self, deadline: float, callback: Callable[[], object]) -> _Timer:
        timer = _Timer(callback)
        heapq.heappush(self._timers, (deadline, next(self._order), timer))
        self._pending += 1
        self._registered.set()
        self._registered = asyncio.Event()
        return timer

    def _cancel(self, timer: _Timer) -> None:
        if not timer.cancelled:
            timer.cancelled = True
            self._pending -= 1


class _FakeTimeout:
    """:meth:`FakeClock.timeout_at`: an ``asyncio.Timeout`` with no deadline of its own, expired
    by the fake clock's timer."""

    def __init__(self, clock: FakeClock, deadline: float) -> None:
        self._clock = clock
        self._deadline = deadline
        self._scope = asyncio.timeout(None)
        self._timer: _Timer | None = None

    async def __aenter__(self) -> _FakeTimeout:
        await self._scope.__aenter__()
        if self._deadline <= self._clock.now():
            self._expire()
        else:
            self._timer = self._clock._add(self._deadline, self._expire)
        return self

    def _expire(self) -> None:
        self._scope.reschedule(-math.inf)  # before the loop's now: fires on the next iteration

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> bool | None:
        if self._timer is not None:
            self._clock._cancel(self._timer)
        await self._scope.__aexit__(exc_type, exc, tb)
        return None
