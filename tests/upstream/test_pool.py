"""The per-replica pool against a real HTTP server: reuse, counting, max age, pool wait."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from tests.upstream.faulty_upstream import FakeClock, FaultyUpstream, run, upstream_config
from tidegate.errors import UpstreamUnavailable
from tidegate.upstream.client import UpstreamClient
from tidegate.upstream.config import PoolConfig, UpstreamTimeouts
from tidegate.upstream.pool import ReplicaPool


@contextlib.asynccontextmanager
async def replica_pool(upstream: FaultyUpstream, clock: FakeClock | None = None,
                       **options: Any) -> AsyncIterator[ReplicaPool]:
    """A pool to ``upstream`` with ``PoolConfig(**options)``, closed on exit."""
    extra = {} if clock is None else {"clock": clock}
    pool = ReplicaPool(upstream.url, pool=PoolConfig(**options), timeouts=UpstreamTimeouts(),
                       **extra)
    try:
        yield pool
    finally:
        await pool.aclose()


async def get(pool: ReplicaPool, path: str = "/v1/models") -> bytes:
    exchange = await pool.open("GET", path)
    try:
        return await exchange.read()
    finally:
        await exchange.aclose()


def test_sequential_requests_reuse_one_connection() -> None:
    with FaultyUpstream() as upstream:
        async def scenario() -> None:
            async with replica_pool(upstream) as pool:
                for _ in range(5):
                    assert b"fake" in await get(pool)
                s = pool.statistics()
                assert (s.opened, s.requests, s.reused, s.closed) == (1, 5, 4, 0)
                assert s.reuse_rate == pytest.approx(0.8)
                assert (s.in_flight, s.connections_active, s.connections_idle) == (0, 0, 1)
                assert s.pool_wait.count == 5
            assert pool.statistics().closed == 1

        run(scenario)


def test_concurrent_requests_open_connections_and_count_in_flight() -> None:
    with FaultyUpstream() as upstream:
        async def scenario() -> None:
            pool = ReplicaPool(upstream.url, pool=PoolConfig(), timeouts=UpstreamTimeouts())
            upstream.hold()
            body = b'{"model": "m", "messages": []}'
            tasks = [asyncio.create_task(pool.open("POST", "/v1/chat/completions", content=body))
                     for _ in range(3)]
            await upstream.wait_hits("/v1/chat/completions", 3)
            s = pool.statistics()
            assert (s.in_flight, s.connections_active, s.opened) == (3, 3, 3)
            upstream.release()
            for exchange in await asyncio.gather(*tasks):
                await exchange.read()
                await exchange.aclose()
            s = pool.statistics()
            assert (s.in_flight, s.connections_active, s.connections_idle) == (0, 0, 3)
            await pool.aclose()
            assert pool.statistics().closed == 3

        run(scenario)


def test_connections_older_than_max_age_are_retired_and_replaced() -> None:
    with FaultyUpstream() as upstream:
        async def scenario() -> None:
            clock = FakeClock(1000.0)
            async with replica_pool(upstream, max_connection_age_s=10, clock=clock) as pool:
                await get(pool)
                await get(pool)
                assert (pool.statistics().opened, pool.statistics().reused) == (1, 1)
                clock.now += 10.5
                await get(pool)
                s = pool.statistics()
                assert (s.opened, s.closed, s.retired_by_age, s.reused) == (2, 1, 1, 1)
                await get(pool)  # the new connection is young: reused
                assert pool.statistics().reused == 2

        run(scenario)


def test_an_old_connection_finishes_its_request_before_it_is_retired() -> None:
    with FaultyUpstream() as upstream:
        async def scenario() -> None:
            clock = FakeClock(1000.0)
            async with replica_pool(upstream, max_connection_age_s=10, clock=clock) as pool:
                upstream.hold()
                body = b'{"model": "m", "input": ["a"]}'
                request = asyncio.create_task(pool.open("POST", "/v1/embeddings", content=body))
                await upstream.wait_hits("/v1/embeddings", 1)
                clock.now += 60  # far past max age, mid-request
                assert pool.statistics().closed == 0
                upstream.release()
                exchange = await request
                assert exchange.status == 200
                assert b"embedding" in await exchange.read()
                await exchange.aclose()
                # Retired as soon as its response was closed, not left idle in the pool.
                s = pool.statistics()
                assert (s.closed, s.retired_by_age, s.connections_idle) == (1, 1, 0)
                await get(pool)
                assert pool.statistics().opened == 2

        run(scenario)


def test_pool_wait_timeout_is_a_clear_503_and_is_not_retried() -> None:
    with FaultyUpstream("a") as a, FaultyUpstream("b") as b:
        async def scenario() -> None:
            config = upstream_config(a.url, b.url, pool={"max_connections": 1},
                                     timeouts={"pool_s": 0.2})
            async with UpstreamClient(config, model="m") as client:
                a.hold()
                b.hold()
                first = [asyncio.create_task(client.embed_batch(["x"])) for _ in range(2)]
                await a.wait_hits("/v1/embeddings", 1)
                await b.wait_hits("/v1/embeddings", 1)
                with pytest.raises(UpstreamUnavailable) as caught:
                    await client.embed_batch(["y"])
                error = caught.value
                assert error.status == 503
                assert "all 1 connections stayed busy for 0.2s" in str(error)
                assert "upstream.timeouts.pool_s" in str(error)
                assert error.retry_after_s == 1
                a.release()
                b.release()
                assert len(await asyncio.gather(*first)) == 2
                stats = client.statistics()
                assert stats.retries == 0
                assert sum(r.pool_timeouts for r in stats.replicas) == 1
                # Saturation is not sickness: nobody was ejected.
                assert all(stats.health.healthy)

        run(scenario)


def test_pool_wait_is_measured() -> None:
    with FaultyUpstream() as upstream:
        async def scenario() -> None:
            async with replica_pool(upstream, max_connections=1) as pool:
                upstream.hold()
                body = b'{"model": "m", "input": ["a"]}'
                first = asyncio.create_task(pool.open("POST", "/v1/embeddings", content=body))
                await upstream.wait_hits("/v1/embeddings", 1)
                second = asyncio.create_task(get(pool))
                await asyncio.sleep(0)  # let the second request queue for the connection
                assert pool.statistics().in_flight == 2
                upstream.release()
                exchange = await first
                await exchange.read()
                await exchange.aclose()
                await second
                s = pool.statistics()
                assert s.pool_wait.count == 2
                assert s.pool_wait.sum > 0
                assert (s.opened, s.reused) == (1, 1)

        run(scenario)


def test_keepalive_expiry_zero_closes_every_connection_after_its_request() -> None:
    with FaultyUpstream() as upstream:
        async def scenario() -> None:
            async with replica_pool(upstream, keepalive_expiry_s=0) as pool:
                for _ in range(3):
                    assert b"fake" in await get(pool)
                s = pool.statistics()
                assert (s.opened, s.reused, s.closed, s.connections_idle) == (3, 0, 3, 0)

        run(scenario)


def test_a_closed_pool_refuses_requests_instead_of_reopening() -> None:
    with FaultyUpstream() as upstream:
        async def scenario() -> None:
            pool = ReplicaPool(upstream.url, pool=PoolConfig(), timeouts=UpstreamTimeouts())
            await get(pool)
            await pool.aclose()
            with pytest.raises(aiohttp.ClientConnectionError, match="is closed"):
                await get(pool)
            s = pool.statistics()
            assert (s.in_flight, s.opened, s.closed) == (0, 1, 1)

        run(scenario)


def test_a_replica_url_with_a_path_prefix_keeps_it() -> None:
    with FaultyUpstream(prefix="/openai") as upstream:
        async def scenario() -> None:
            async with replica_pool(upstream) as pool:
                assert upstream.url.endswith("/openai")
                assert b"fake" in await get(pool)

        run(scenario)
