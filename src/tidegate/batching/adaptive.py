"""Adaptive batch sizing toward a p99 latency target. Pure: the batcher feeds it observations.

Control rule (evaluated once per window of ``window_batches`` completed batches):

* ``p99`` is the 99th percentile, over the window, of each input's queue wait + batch compute.
* ``p99 > target`` and the window was **compute-bound** (batches left nothing queued behind
  them): shrink the effective batch size multiplicatively (x ``decrease``). Smaller batches
  compute faster, and the queue is not what makes inputs late.
* ``p99 > target`` and the window was **backlogged** (at least half the batches left inputs
  queued): grow the size additively. Here inputs are late because they wait behind full
  batches, and bigger batches drain the queue faster per unit of compute.
* ``p99 < headroom x target``: grow the size additively (+max(1, size/8)), to regain throughput.
* Otherwise hold.

The size stays within ``[1, max_batch_size]``. Multiplicative decrease / additive increase
converges like TCP's AIMD: it settles where p99 sits between ``headroom x target`` and the
target, and follows the load as it changes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

__all__ = ["AdaptiveBatchSize"]


@dataclass(slots=True)
class AdaptiveBatchSize:
    target_s: float
    max_size: int
    window_batches: int = 8
    decrease: float = 0.75
    headroom: float = 0.7
    size: int = field(default=0)
    _latencies: list[float] = field(default_factory=list)
    _batches: int = 0
    _backlogged: int = 0
    adjustments: int = 0

    def __post_init__(self) -> None:
        if self.size <= 0:
            self.size = self.max_size

    def observe(self, latencies_s: list[float], *, backlogged: bool) -> None:
        """Record one completed batch: each input's queue wait + compute, and whether inputs
        were still queued when it was dispatched."""
        self._latencies.extend(latencies_s)
        self._batches += 1
        self._backlogged += backlogged
        if self._batches >= self.window_batches:
            self._evaluate()

    def p99(self) -> float | None:
        if not self._latencies:
            return None
        ordered = sorted(self._latencies)
        return ordered[min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1)]

    def _evaluate(self) -> None:
        p99 = self.p99()
        backlogged = self._backlogged * 2 >= self._batches
        self._latencies.clear()
        self._batches = 0
        self._backlogged = 0
        if p99 is None:
            return
        step = max(1, self.size // 8)
        before = self.size
        if p99 > self.target_s:
            if backlogged:
                self.size = min(self.max_size, self.size + step)
            else:
                self.size = max(1, math.floor(self.size * self.decrease))
        elif p99 < self.headroom * self.target_s:
            self.size = min(self.max_size, self.size + step)
        self.adjustments += self.size != before
