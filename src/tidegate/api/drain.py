"""Graceful drain: which requests are in flight, whether the server still takes new ones, and
cutting what is left when ``shutdown_timeout_s`` passes.

The app registers each request's task (:meth:`Drain.enter`/:meth:`Drain.leave`: a set add and a
discard on the hot path). :meth:`Drain.begin` (the server calls it on SIGTERM/SIGINT) turns
readiness and new requests to 503 ``shutting_down``. :meth:`Drain.cut` cancels every request
still in flight; the code that awaits on that request's behalf sees :meth:`Drain.was_cut` and
answers with :class:`~tidegate.errors.ShuttingDown` (503 before the status line was sent, a final
SSE error event and ``[DONE]`` after) instead of dropping the connection.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from tidegate.errors import ShuttingDown

__all__ = ["Drain", "DrainStatistics"]


@dataclass(frozen=True, slots=True)
class DrainStatistics:
    draining: bool
    in_flight: int
    """Requests running now (those refused while draining are never in flight)."""
    drained: int
    """Requests in flight when the drain began (or started before it) that completed since."""
    cut: int
    """Requests that were still running when they were cut."""


class Drain:
    """The app's in-flight requests and its draining flag (one per app, one event loop)."""

    __slots__ = ("_cut", "_cut_count", "_drained", "_tasks", "draining",
                 "shutdown_timeout_s")

    def __init__(self, *, shutdown_timeout_s: float) -> None:
        self.shutdown_timeout_s = shutdown_timeout_s
        self.draining = False
        self._tasks: set[asyncio.Task[object]] = set()
        self._cut: set[asyncio.Task[object]] = set()
        self._drained = 0
        self._cut_count = 0

    def __repr__(self) -> str:
        stats = self.statistics()
        return (f"Drain(draining={stats.draining}, in_flight={stats.in_flight}, "
                f"drained={stats.drained}, cut={stats.cut})")

    def enter(self, task: asyncio.Task[object]) -> None:
        self._tasks.add(task)

    def leave(self, task: asyncio.Task[object]) -> None:
        self._tasks.discard(task)
        if not self.draining:
            return
        # A task uvicorn cancelled itself (past its own graceful timeout) is cut too.
        if task in self._cut or task.cancelling():
            self._cut.discard(task)
            self._cut_count += 1
        else:
            self._drained += 1

    def begin(self) -> None:
        """Refuse new requests from now on; those in flight go on."""
        self.draining = True

    def cut(self) -> int:
        """Cancel every request still in flight; returns how many."""
        tasks = [task for task in self._tasks if task not in self._cut and not task.done()]
        for task in tasks:
            self._cut.add(task)
            task.cancel()
        return len(tasks)

    def was_cut(self, task: asyncio.Task[object] | None) -> bool:
        """Whether ``task``'s cancellation is this drain's (not a client's, not a timeout's)."""
        return task is not None and task in self._cut

    def error(self, *, cut: bool) -> ShuttingDown:
        """The error a refused (``cut=False``) or a cut request answers with."""
        return ShuttingDown(cut_after_s=self.shutdown_timeout_s if cut else None)

    def statistics(self) -> DrainStatistics:
        return DrainStatistics(draining=self.draining, in_flight=len(self._tasks),
                               drained=self._drained, cut=self._cut_count)
