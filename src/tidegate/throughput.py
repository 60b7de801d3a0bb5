"""How fast a queue drains and how long its work takes: a leaf module that imports nothing
from tidegate.

The batcher refuses a request that would have its results later than ``max_queue_wait_ms``
from :class:`BatchCost` (a batch's time by its size) and both it and the generation engine
allow for slow work with :class:`UpperBand`. Both compute ``Retry-After`` from
:class:`DrainRate`. It counts each unit of work from when the server could have started on it
(the previous unit's end, or the work's arrival if the server was idle) to its end, so time the
server spends between units (its event loop busy with other requests, as under an overload)
counts, not only compute. A rate from compute time alone overstated how fast a busy server
drains.
"""

from __future__ import annotations

from collections import deque

__all__ = ["BatchCost", "DrainRate", "RecentQuantile", "UpperBand"]


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


class BatchCost:
    """How long a batch of ``n`` inputs takes: ``fixed_s + n * item_s``, fitted by least
    squares over recent batches (moving averages, ``weight`` per batch, of the sizes, times and
    their products).

    A batch's time is not proportional to its size: on a busy CPU a batch of 14 short inputs
    took 66 ms and one of 53 took 125 ms, so a time per input taken from the small batch
    predicted the large one at 250 ms and one from the large at 34 ms for the small. While the
    batches are all one size there is no slope to fit, and the cost is taken as proportional
    to the size (exact for that size).
    """

    __slots__ = ("_n", "_nn", "_nt", "_slow", "_t", "fixed_s", "item_s", "weight")

    def __init__(self, weight: float = 0.1) -> None:
        self.weight = weight
        self.fixed_s = 0.0
        self.item_s = 0.0
        """Both 0 until a batch was observed."""
        self._slow = UpperBand(start=1.0, low=1.0, high=3.0)
        self._n = self._t = self._nn = self._nt = 0.0

    def observe(self, items: int, seconds: float) -> None:
        if items <= 0 or seconds < 0:
            return
        expected = self.seconds(items)
        if expected > 0:
            self._slow.observe(seconds / expected)
        if self.item_s == 0 and self.fixed_s == 0:
            self._n, self._t, self._nn, self._nt = items, seconds, items * items, items * seconds
        else:
            w = self.weight
            self._n += w * (items - self._n)
            self._t += w * (seconds - self._t)
            self._nn += w * (items * items - self._nn)
            self._nt += w * (items * seconds - self._nt)
        variance = self._nn - self._n * self._n
        slope = (self._nt - self._n * self._t) / variance if variance > 0.25 else -1.0
        if slope >= 0 and slope * self._n <= self._t:
            self.item_s = slope
            self.fixed_s = self._t - slope * self._n
        else:  # one size so far, or a fit that makes no sense (time falling with size)
            self.item_s = self._t / self._n
            self.fixed_s = 0.0
        if self.item_s == 0 and self.fixed_s == 0:
            self.item_s = 1e-9  # measured, if too fast to time

    @property
    def slow(self) -> float:
        """How much slower than the fit a slow batch runs (:class:`UpperBand` of recent batches'
        actual over fitted time, 1 to 3): on a CPU shared with other work batches of one size
        took from 0.7 to 1.5 times their mean, and a bound meant for nearly every request must
        allow for the slow ones."""
        return self._slow.value

    def seconds(self, items: int) -> float:
        """The expected time of a batch of ``items``; 0 before anything was observed."""
        return self.fixed_s + items * self.item_s


class UpperBand:
    """A high but typical value of a stream: its mean plus ``k`` mean absolute deviations, both
    moving averages (``weight`` per value), kept in [``low``, ``high``]. With ``k`` 2 about the
    95th percentile of a normal stream. It moves as fast down as up, within tens of values,
    where a running quantile estimate recovers from a burst of high values only slowly."""

    __slots__ = ("_deviation", "_mean", "high", "k", "low", "weight")

    def __init__(self, *, start: float, low: float, high: float, k: float = 2.0,
                 weight: float = 0.05) -> None:
        self.k = k
        self.weight = weight
        self.low = low
        self.high = high
        self._mean = start
        self._deviation = 0.0

    def observe(self, x: float) -> None:
        w = self.weight
        self._deviation += w * (abs(x - self._mean) - self._deviation)
        self._mean += w * (x - self._mean)

    @property
    def value(self) -> float:
        return min(self.high, max(self.low, self._mean + self.k * self._deviation))


class RecentQuantile:
    """The ``q`` quantile of the last ``size`` values of a stream (``start`` until the first),
    kept in [``low``, ``high``] and sorted anew every ``size // 10`` values.

    For a stream whose tail is long, where a mean and deviation say little about its 99th
    percentile: generated sequences ran 1.0 times their expected time at the median, 1.25 at
    the 90th percentile and 1.6 at the 99th under an overload, and :class:`UpperBand` stood
    near 1.25. It forgets a burst once ``size`` newer values came."""

    __slots__ = ("_every", "_seen", "_values", "high", "low", "q", "value")

    def __init__(self, *, start: float, low: float, high: float, q: float = 0.99,
                 size: int = 200) -> None:
        self.q = q
        self.low = low
        self.high = high
        self.value = start
        self._values: deque[float] = deque(maxlen=max(1, size))
        self._every = max(1, size // 10)
        self._seen = 0

    def observe(self, x: float) -> None:
        self._values.append(x)
        self._seen += 1
        if self._seen == 1 or self._seen % self._every == 0:
            ordered = sorted(self._values)
            at = min(len(ordered) - 1, int(self.q * len(ordered)))
            self.value = min(self.high, max(self.low, ordered[at]))
