"""How fast a queue drains: a leaf module that imports nothing from tidegate.

The batcher and the generation engine refuse work their queue would take longer than
``max_queue_wait_ms`` to drain, and compute ``Retry-After``, from :class:`DrainRate`. It counts
each unit of work from when the server could have started on it (the previous unit's end, or
the work's arrival if the server was idle) to its end, so time the server spends between units
(its event loop busy with other requests, as under an overload) counts, not only compute. A rate
from compute time alone overstated how fast a busy server drains.
"""

from __future__ import annotations

__all__ = ["DrainRate"]


class DrainRate:
    """A moving average (EWMA, ``weight`` per observation) of units per second of busy time."""

    __slots__ = ("_last_end", "per_second", "weight")

    def __init__(self, weight: float = 0.2) -> None:
        self.weight = weight
        self.per_second = 0.0
        """0 until something was measured."""
        self._last_end: float | None = None

    def observe(self, units: int, *, ready_at: float, end: float) -> None:
        """``units`` of work, available since ``ready_at``, were done at ``end``."""
        since = ready_at if self._last_end is None else max(self._last_end, ready_at)
        self._last_end = end if self._last_end is None else max(end, self._last_end)
        if end <= since:
            return
        rate = units / (end - since)
        w = self.weight
        self.per_second = rate if self.per_second == 0 else (1 - w) * self.per_second + w * rate

    def idle(self) -> None:
        """The server ran out of work: the next unit counts from its own ``ready_at``."""
        self._last_end = None
