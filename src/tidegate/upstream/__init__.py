"""Remote OpenAI-compatible replicas: pooled connections, health checks, replica selection.

The client is :class:`tidegate.upstream.client.UpstreamClient`. This package exports only what
needs no HTTP client: the configuration (which :mod:`tidegate.config` reads) and the statistics
snapshots (which :mod:`tidegate.metrics` reads), so importing either does not import aiohttp.
"""

from __future__ import annotations

from tidegate.upstream.config import (
    HealthConfig,
    PoolConfig,
    RetryConfig,
    UpstreamConfig,
    UpstreamTimeouts,
)
from tidegate.upstream.stats import HealthStatistics, PoolStatistics, UpstreamStatistics

__all__ = [
    "HealthConfig",
    "HealthStatistics",
    "PoolConfig",
    "PoolStatistics",
    "RetryConfig",
    "UpstreamConfig",
    "UpstreamStatistics",
    "UpstreamTimeouts",
]
