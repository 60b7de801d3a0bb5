"""Return freed heap memory to the OS once the server goes idle after traffic.

A burst of requests (an overload soak: hundreds of thousands of requests, a thousand
connections) leaves glibc's heaps holding freed memory that it keeps for reuse, so RSS stays
high long after the burst. When no request has been in flight for ``idle_trim_s`` and some
arrived since the last trim, the trimmer runs one ``gc.collect()`` and ``malloc_trim(0)``.
Neither runs while requests are in flight, so serving never pays for it.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import gc
import logging
from collections.abc import Callable
from dataclasses import dataclass

from tidegate.api.drain import Drain

__all__ = ["IdleTrimmer", "malloc_trim"]

log = logging.getLogger("tidegate.memory")


def _load_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    libc = ctypes.CDLL(name)
    trim = getattr(libc, "malloc_trim", None)  # glibc only
    return None if trim is None else trim


_TRIM = _load_trim()


def malloc_trim() -> bool:
    """Collect garbage and release free heap pages; False where libc has no ``malloc_trim``."""
    gc.collect()
    return _TRIM is not None and bool(_TRIM(0))


@dataclass(slots=True)
class IdleTrimmer:
    """Decides when to trim from what the drain counts; :meth:`run` polls it."""

    idle_s: float
    _seen: int = 0
    """``drain.entered`` at the last trim."""
    _idle_since: int | None = None
    """``drain.entered`` when the server was first seen idle, in checks."""
    _idle_checks: int = 0

    def due(self, *, in_flight: int, entered: int, checks_needed: int) -> bool:
        """One check: trim now? Needs traffic since the last trim and ``checks_needed``
        consecutive idle checks with nothing new arriving."""
        if in_flight or entered == self._seen:
            self._idle_checks = 0
            self._idle_since = None
            return False
        if self._idle_since != entered:
            self._idle_since = entered
            self._idle_checks = 0
        self._idle_checks += 1
        if self._idle_checks < checks_needed:
            return False
        self._seen = entered
        self._idle_checks = 0
        return True

    async def run(self, drain: Drain, *, interval_s: float = 0.5) -> None:
        """Poll ``drain`` until cancelled, trimming when :meth:`due`."""
        checks = max(1, round(self.idle_s / interval_s))
        while True:
            await asyncio.sleep(interval_s)
            stats = drain.statistics()
            if self.due(in_flight=stats.in_flight, entered=drain.entered, checks_needed=checks):
                released = await asyncio.to_thread(malloc_trim)
                log.debug("idle: returned freed memory to the OS (%s)", released)
