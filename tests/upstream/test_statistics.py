"""The client's typed statistics snapshot, and the /metrics families exported from it."""

from __future__ import annotations

import asyncio

from tests.upstream.faulty_upstream import FaultyUpstream, refused_url, upstream_config
from tidegate.metrics import Metrics
from tidegate.upstream.client import UpstreamClient
from tidegate.upstream.stats import UpstreamStatistics


def sample(text: str, name: str, replica: str) -> float:
    prefix = f'{name}{{model="m",replica="{replica}"}} '
    lines = [line for line in text.splitlines() if line.startswith(prefix)]
    assert len(lines) == 1, f"expected one sample {prefix!r} in /metrics, got {lines}"
    return float(lines[0].removeprefix(prefix))


def test_statistics_snapshot_is_typed_and_exported_per_replica() -> None:
    with FaultyUpstream() as upstream:
        async def scenario() -> UpstreamStatistics:
            dead = refused_url()
            config = upstream_config(dead, upstream.url, health={"eject_after_failures": 1})
            metrics = Metrics()
            async with UpstreamClient(config, model="m") as client:
                metrics.track_upstream("m", client)
                await client.embed_batch(["x"])  # fails on `dead` (ejected), served by upstream
                await client.embed_batch(["y"])  # the kept-alive connection
                stats = client.statistics()
                text = metrics.render().decode()
            assert sample(text, "tidegate_upstream_healthy", dead) == 0.0
            assert sample(text, "tidegate_upstream_healthy", upstream.url) == 1.0
            assert sample(text, "tidegate_upstream_requests_total", upstream.url) == 2.0
            assert sample(text, "tidegate_upstream_connections_reused_total", upstream.url) == 1.0
            assert sample(text, "tidegate_upstream_pool_wait_seconds_count", upstream.url) == 2.0
            return stats

        stats = asyncio.run(asyncio.wait_for(scenario(), 60))
    assert stats.health.healthy == (False, True)
    assert len(stats.replicas) == 2
    served = stats.replicas[1]
    assert (served.requests, served.reused, served.in_flight) == (2, 1, 0)
    assert served.pool_wait.count == 2
    assert served.pool_wait.counts[-1] == 0  # nobody waited past the last bucket
