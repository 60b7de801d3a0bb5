"""Per-minute limits as token buckets: pure arithmetic on times the caller passes in.

A bucket holds up to ``per_minute`` units and refills continuously at ``per_minute / 60`` per
second, so an idle key gets its full minute back after 60 s and a busy one is held to its rate.
Token use is only known after a request, so :meth:`Bucket.spend` may take the level below zero:
the key then waits until the debt is repaid before its next request is admitted.

No awaits, no clock of its own: :class:`~tidegate.auth.keyring.KeyRing` reads its injected
:class:`~tidegate.clock.Clock` and passes ``now``, which keeps every decision testable on a
:class:`~tidegate.clock.FakeClock`.
"""

from __future__ import annotations

import math

__all__ = ["Bucket", "format_duration"]


class Bucket:
    """``per_minute`` units, refilled continuously."""

    __slots__ = ("_level", "_updated", "per_minute")

    def __init__(self, per_minute: int, now: float) -> None:
        self.per_minute = per_minute
        self._level = float(per_minute)
        self._updated = now

    def __repr__(self) -> str:
        return f"Bucket(per_minute={self.per_minute}, level={self._level:.3f})"

    def level(self, now: float) -> float:
        """Units available at ``now`` (negative while in debt)."""
        if now > self._updated:
            refill = (now - self._updated) * self.per_minute / 60.0
            self._level = min(float(self.per_minute), self._level + refill)
            self._updated = now
        return self._level

    def wait_s(self, now: float, needed: float = 1.0) -> float:
        """Seconds until ``needed`` units are available (0 if they are now)."""
        missing = needed - self.level(now)
        return max(0.0, missing * 60.0 / self.per_minute)

    def spend(self, amount: float, now: float) -> None:
        """Take ``amount`` units; the level may go negative (a debt repaid by refilling)."""
        self._level = self.level(now) - amount

    def remaining(self, now: float) -> int:
        return max(0, math.floor(self.level(now)))

    def reset_s(self, now: float) -> float:
        """Seconds until the bucket is full again."""
        return (self.per_minute - self.level(now)) * 60.0 / self.per_minute


def format_duration(seconds: float) -> str:
    """OpenAI's ``x-ratelimit-reset-*`` format: ``"20ms"``, ``"1.5s"``, ``"6m0s"``."""
    millis = math.ceil(seconds * 1000)
    if millis < 1000:
        return f"{millis}ms"
    minutes, millis = divmod(millis, 60_000)
    secs = f"{millis / 1000:.3f}".rstrip("0").rstrip(".")
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"
