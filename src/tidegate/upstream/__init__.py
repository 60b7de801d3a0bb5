"""Remote OpenAI-compatible replicas: pooled connections, health checks, replica selection.

:class:`UpstreamClient` is the entry point; the rest is exported for configuration, statistics
and error mapping.
"""

from __future__ import annotations

from tidegate.upstream.client import UpstreamClient, UpstreamStatistics, UpstreamStream
from tidegate.upstream.config import (
    HealthConfig,
    PoolConfig,
    RetryConfig,
    UpstreamConfig,
    UpstreamTimeouts,
)
from tidegate.upstream.health import HealthStatistics
from tidegate.upstream.pool import PoolStatistics

__all__ = [
    "HealthConfig",
    "HealthStatistics",
    "PoolConfig",
    "PoolStatistics",
    "RetryConfig",
    "UpstreamClient",
    "UpstreamConfig",
    "UpstreamStatistics",
    "UpstreamStream",
    "UpstreamTimeouts",
]
