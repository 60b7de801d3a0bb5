"""Statistics snapshots of an upstream client: frozen, typed, and free of the HTTP client.

:mod:`tidegate.metrics` reads these when ``/metrics`` is scraped; keeping them apart from the
pool, health and client modules lets it (and anything else) use them without importing aiohttp.
"""

from __future__ import annotations

from dataclasses import dataclass

from tidegate.histogram import HistogramSnapshot

__all__ = ["HealthStatistics", "PoolStatistics", "UpstreamStatistics"]


@dataclass(frozen=True, slots=True)
class PoolStatistics:
    """The connection pool to one replica."""

    url: str
    in_flight: int
    """Requests sent (or waiting for a connection) whose responses are not closed yet
    (routing's "outstanding")."""
    connections_active: int
    """Connections serving a request (or connecting) now."""
    connections_idle: int
    opened: int
    closed: int
    requests: int
    """Requests handed a connection (first uses plus reuses)."""
    reused: int
    reuse_rate: float
    retired_by_age: int
    pool_timeouts: int
    pool_wait: HistogramSnapshot
    """Seconds each request waited for a free connection (0 when one was free)."""


@dataclass(frozen=True, slots=True)
class HealthStatistics:
    """The health of every replica, in configuration order."""

    rounds: int
    """Completed rounds of active checks."""
    healthy: tuple[bool, ...]
    """Which replicas may take requests now."""
    ejections: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class UpstreamStatistics:
    """One upstream client: its requests, its retries, and each replica's pool and health."""

    requests: int
    retries: int
    retries_refused_by_budget: int
    retry_budget_tokens: float
    failures: dict[str, int]
    """Failed attempts by :class:`~tidegate.upstream.routing.Failure` value."""
    replicas: tuple[PoolStatistics, ...]
    """One per replica, in configuration order."""
    health: HealthStatistics
