"""Pure decisions of the upstream client: which replica serves an attempt, what a failure is,
and whether it may be retried. Nothing here awaits; the client acts on the answers.
"""

from __future__ import annotations

import enum
from collections.abc import Collection, Sequence
from dataclasses import dataclass

import aiohttp

from tidegate.upstream.pool import PoolTimeout

__all__ = [
    "BUDGET_EXHAUSTED",
    "Failure",
    "ReplicaView",
    "RetryBudget",
    "RetryDecision",
    "classify_exception",
    "classify_status",
    "decide_retry",
    "pick_replica",
]


@dataclass(frozen=True, slots=True)
class ReplicaView:
    """What selection needs to know about one replica at this instant."""

    index: int
    healthy: bool
    outstanding: int
    """Requests sent to it whose responses have not been closed yet."""


def pick_replica(
    replicas: Sequence[ReplicaView], *, exclude: Collection[int] = (), start: int = 0
) -> int | None:
    """The healthy, not-yet-tried replica with the fewest outstanding requests, or ``None``.

    Ties go to the first replica at or after ``start`` (in ring order), so a caller rotating
    ``start`` spreads an idle fleet's requests evenly instead of always loading the first.
    """
    count = len(replicas)
    best: ReplicaView | None = None
    best_key = (0, 0)
    for view in replicas:
        if not view.healthy or view.index in exclude:
            continue
        key = (view.outstanding, (view.index - start) % count)
        if best is None or key < best_key:
            best, best_key = view, key
    return None if best is None else best.index


class Failure(enum.Enum):
    """How an attempt on one replica failed."""

    CONNECT = "connect"
    """No connection could be made (refused, unreachable, connect timeout)."""
    UNAVAILABLE_STATUS = "unavailable_status"
    """The replica answered 502, 503 or 504: it is overloaded, restarting or behind a proxy."""
    SERVER_ERROR = "server_error"
    """The replica answered another 5xx."""
    TIMEOUT = "timeout"
    """No bytes within the read (or write) timeout once the request was sent."""
    BROKEN = "broken"
    """The connection dropped or the replica spoke broken HTTP."""
    POOL_TIMEOUT = "pool_timeout"
    """Every connection to the replica stayed busy for the pool-wait timeout (local)."""
    REJECTED = "rejected"
    """The replica refused the request itself (4xx); the replica is fine."""

    @property
    def retryable(self) -> bool:
        """Only failures where the replica cannot have done the work are retried."""
        return self in (Failure.CONNECT, Failure.UNAVAILABLE_STATUS)

    @property
    def counts_against_replica(self) -> bool:
        """Whether this failure is evidence that the replica is unhealthy (passive checks)."""
        return self not in (Failure.POOL_TIMEOUT, Failure.REJECTED)


def classify_status(status: int) -> Failure | None:
    """``None`` for a success (1xx-3xx); otherwise what kind of failure the status is."""
    if status in (502, 503, 504):
        return Failure.UNAVAILABLE_STATUS
    if status >= 500:
        return Failure.SERVER_ERROR
    if status >= 400:
        return Failure.REJECTED
    return None


def classify_exception(exc: BaseException) -> Failure:
    """What a transport failure (one of ``pool.TRANSPORT_ERRORS``) means."""
    if isinstance(exc, PoolTimeout):
        return Failure.POOL_TIMEOUT
    if isinstance(exc, aiohttp.ClientConnectorError | aiohttp.ConnectionTimeoutError):
        return Failure.CONNECT
    if isinstance(exc, TimeoutError):
        return Failure.TIMEOUT
    return Failure.BROKEN


class RetryBudget:
    """A token bucket that caps retries at a fraction of requests (see ``RetryConfig``)."""

    __slots__ = ("_burst", "_ratio", "tokens")

    def __init__(self, *, ratio: float, burst: float) -> None:
        self._ratio = ratio
        self._burst = burst
        self.tokens = burst

    def deposit(self) -> None:
        """Record one original request."""
        self.tokens = min(self._burst, self.tokens + self._ratio)

    def can_withdraw(self) -> bool:
        return self.tokens >= 1.0

    def withdraw(self) -> None:
        self.tokens -= 1.0


BUDGET_EXHAUSTED = "retry budget exhausted"


@dataclass(frozen=True, slots=True)
class RetryDecision:
    retry: bool
    reason: str
    """Why not, for the log and the error message (empty when retrying)."""


def decide_retry(
    failure: Failure, *, retries: int, max_retries: int, budget_available: bool,
    alternative: bool,
) -> RetryDecision:
    """Whether a failed attempt is retried (on another replica).

    Called only while nothing has been relayed to the client; once a stream has started, the
    client never asks.
    """
    if not failure.retryable:
        return RetryDecision(False, "not retryable")
    if retries >= max_retries:
        return RetryDecision(False, f"{retries} retries already made (max_retries)")
    if not alternative:
        return RetryDecision(False, "no other healthy replica to retry on")
    if not budget_available:
        return RetryDecision(False, BUDGET_EXHAUSTED)
    return RetryDecision(True, "")
