"""Ejection and re-admission: state transitions alone, then against real replicas."""

from __future__ import annotations

import asyncio

import pytest

from tests.upstream.faulty_upstream import (
    FakeClock,
    FaultyUpstream,
    refused_url,
    run,
    until,
    upstream_config,
)
from tidegate.errors import UpstreamBadGateway, UpstreamUnavailable
from tidegate.upstream.client import UpstreamClient
from tidegate.upstream.health import ReplicaHealth


def test_passive_failures_eject_only_when_consecutive() -> None:
    replica = ReplicaHealth("http://a")
    replica.record_failure("boom", 1.0, eject_after=3)
    replica.record_failure("boom", 2.0, eject_after=3)
    replica.record_success()
    replica.record_failure("boom", 3.0, eject_after=3)
    replica.record_failure("boom", 4.0, eject_after=3)
    assert replica.healthy
    replica.record_failure("boom again", 5.0, eject_after=3)
    assert not replica.healthy
    assert (replica.ejected_by, replica.ejected_at, replica.last_error) == (
        "passive", 5.0, "boom again")


def test_passive_ejection_can_be_turned_off() -> None:
    replica = ReplicaHealth("http://a")
    for t in range(100):
        replica.record_failure("boom", float(t), eject_after=0)
    assert replica.healthy


def test_checks_eject_and_readmit_after_their_thresholds() -> None:
    replica = ReplicaHealth("http://a")
    thresholds = {"unhealthy_after": 2, "healthy_after": 2}
    replica.record_check(False, "503", 1.0, **thresholds)
    assert replica.healthy
    replica.record_check(False, "503", 2.0, **thresholds)
    assert replica.ejected_by == "active"
    replica.record_check(True, None, 3.0, **thresholds)
    assert not replica.healthy
    replica.record_check(True, None, 4.0, **thresholds)
    assert replica.healthy
    assert replica.ejections == 1


def test_a_passing_check_readmits_a_passively_ejected_replica() -> None:
    replica = ReplicaHealth("http://a")
    replica.record_failure("refused", 1.0, eject_after=1)
    assert not replica.healthy
    replica.record_check(True, None, 2.0, unhealthy_after=2, healthy_after=1)
    assert replica.healthy
    assert replica.failures == 0


def test_passive_ejection_expires_when_active_checks_are_off() -> None:
    replica = ReplicaHealth("http://a")
    replica.record_failure("refused", 10.0, eject_after=1)
    replica.expire_passive_ejection(39.0, 30.0)
    assert not replica.healthy
    replica.expire_passive_ejection(40.0, 30.0)
    assert replica.healthy


def test_active_checks_eject_and_readmit_a_real_replica() -> None:
    with FaultyUpstream("a") as a, FaultyUpstream("b") as b:
        async def scenario() -> None:
            config = upstream_config(a.url, b.url, health={
                "path": "/health/ready", "interval_s": 3600, "unhealthy_after": 2,
            })
            async with UpstreamClient(config, model="m") as client:
                await a.wait_hits("/health/ready", 1)  # start() runs a first round at once
                a.health_status = 503
                await client.health.check_now()
                assert client.health.healthy() == [True, True]
                await client.health.check_now()
                assert client.health.healthy() == [False, True]
                card = client.describe()["replicas"][0]
                assert card["status"] == "ejected"
                assert card["ejected_by"] == "active"
                assert "answered 503" in card["last_error"]
                # Traffic avoids the ejected replica.
                for _ in range(4):
                    await client.embed_batch(["x"])
                assert (a.hits["/v1/embeddings"], b.hits["/v1/embeddings"]) == (0, 4)
                a.health_status = 200
                await client.health.check_now()
                assert client.health.healthy() == [True, True]
                assert client.describe()["status"] == "ready"

        run(scenario)


def test_the_checker_task_runs_periodically_and_stops_on_aclose() -> None:
    with FaultyUpstream() as upstream:
        async def scenario() -> None:
            config = upstream_config(upstream.url, health={"path": "/health", "interval_s": 0.01})
            client = UpstreamClient(config, model="m")
            await client.start()
            try:
                await until(lambda: client.health.statistics().rounds >= 3,
                            what="3 rounds of checks")
            finally:
                await client.aclose()
            rounds = client.health.statistics().rounds
            assert upstream.hits["/health"] >= 3
            for _ in range(20):
                await asyncio.sleep(0)
            assert client.health.statistics().rounds == rounds

        run(scenario)


def test_an_unreachable_replica_fails_its_checks() -> None:
    with FaultyUpstream() as good:
        async def scenario() -> None:
            dead = refused_url()
            config = upstream_config(dead, good.url, health={
                "path": "/health", "interval_s": 3600, "unhealthy_after": 1,
            })
            async with UpstreamClient(config, model="m") as client:
                await until(lambda: client.health.statistics().rounds >= 1,
                            what="a round of checks")
                assert client.health.healthy() == [False, True]
                error = client.describe()["replicas"][0]["last_error"]
                assert "ClientConnectorError: Cannot connect to host" in error

        run(scenario)


def test_consecutive_request_failures_eject_and_a_passing_check_readmits() -> None:
    with FaultyUpstream() as upstream:
        async def scenario() -> None:
            config = upstream_config(upstream.url, health={
                "path": "/health", "interval_s": 3600, "eject_after_failures": 2,
            })
            async with UpstreamClient(config, model="m") as client:
                upstream.status = 500
                upstream.detail = "CUDA error: an illegal memory access was encountered"
                for _ in range(2):
                    with pytest.raises(UpstreamBadGateway, match="illegal memory access"):
                        await client.embed_batch(["x"])
                with pytest.raises(UpstreamUnavailable, match="no healthy upstream replica") as e:
                    await client.embed_batch(["x"])
                assert "ejected (passive)" in str(e.value)
                assert upstream.hits["/v1/embeddings"] == 2
                upstream.status = None
                await client.health.check_now()
                assert await client.embed_batch(["x"])

        run(scenario)


def test_passive_ejection_ends_after_ejection_s_without_active_checks() -> None:
    with FaultyUpstream() as upstream:
        async def scenario() -> None:
            clock = FakeClock()
            config = upstream_config(upstream.url, health={
                "path": None, "eject_after_failures": 1, "ejection_s": 30,
            })
            async with UpstreamClient(config, model="m", clock=clock) as client:
                upstream.status = 502
                with pytest.raises(UpstreamBadGateway):
                    await client.embed_batch(["x"])
                upstream.status = None
                with pytest.raises(UpstreamUnavailable) as caught:
                    await client.embed_batch(["x"])
                assert caught.value.retry_after_s == 30
                clock.now += 30
                assert await client.embed_batch(["x"])

        run(scenario)
