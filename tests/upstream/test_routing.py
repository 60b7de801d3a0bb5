"""The pure decisions: replica selection, failure classification, retries and their budget."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import aiohttp
import pytest

from tidegate.upstream.pool import PoolTimeout
from tidegate.upstream.routing import (
    BUDGET_EXHAUSTED,
    Failure,
    ReplicaView,
    RetryBudget,
    classify_exception,
    classify_status,
    decide_retry,
    pick_replica,
)


def views(*outstanding: int, unhealthy: tuple[int, ...] = ()) -> list[ReplicaView]:
    return [ReplicaView(i, i not in unhealthy, n) for i, n in enumerate(outstanding)]


def test_least_outstanding_healthy_replica_wins() -> None:
    assert pick_replica(views(3, 1, 2)) == 1
    assert pick_replica(views(3, 0, 2), start=2) == 1
    assert pick_replica(views(3, 0, 2, unhealthy=(1,))) == 2


def test_ties_rotate_from_start() -> None:
    idle = views(0, 0, 0)
    assert [pick_replica(idle, start=s) for s in range(4)] == [0, 1, 2, 0]
    assert pick_replica(views(1, 0, 0), start=0) == 1


def test_excluded_and_unhealthy_replicas_are_never_picked() -> None:
    assert pick_replica(views(0, 5), exclude={0}) == 1
    assert pick_replica(views(0, 5), exclude={0, 1}) is None
    assert pick_replica(views(0, 0, unhealthy=(0, 1))) is None
    assert pick_replica([]) is None


@pytest.mark.parametrize(("status", "failure"), [
    (200, None), (204, None), (304, None),
    (400, Failure.REJECTED), (401, Failure.REJECTED), (429, Failure.REJECTED),
    (500, Failure.SERVER_ERROR), (501, Failure.SERVER_ERROR),
    (502, Failure.UNAVAILABLE_STATUS), (503, Failure.UNAVAILABLE_STATUS),
    (504, Failure.UNAVAILABLE_STATUS),
])
def test_status_classification(status: int, failure: Failure | None) -> None:
    assert classify_status(status) is failure


def test_exception_classification() -> None:
    assert classify_exception(aiohttp.ConnectionTimeoutError("slow")) is Failure.CONNECT
    assert classify_exception(PoolTimeout("busy")) is Failure.POOL_TIMEOUT
    assert classify_exception(aiohttp.SocketTimeoutError("quiet")) is Failure.TIMEOUT
    assert classify_exception(TimeoutError()) is Failure.TIMEOUT
    assert classify_exception(aiohttp.ServerDisconnectedError()) is Failure.BROKEN
    assert classify_exception(aiohttp.ClientPayloadError("cut")) is Failure.BROKEN
    assert classify_exception(aiohttp.ClientOSError(104, "reset")) is Failure.BROKEN


def test_a_refused_connection_is_a_connect_failure() -> None:
    async def refused() -> BaseException:
        with socket.socket() as placeholder:  # a port nobody listens on
            placeholder.bind(("127.0.0.1", 0))
            port = placeholder.getsockname()[1]
        async with aiohttp.ClientSession() as session:
            try:
                await session.get(f"http://127.0.0.1:{port}/")
            except aiohttp.ClientError as exc:
                return exc
        raise AssertionError("the connection was not refused")

    assert classify_exception(asyncio.run(refused())) is Failure.CONNECT


def test_only_connect_errors_and_unavailable_statuses_are_retryable() -> None:
    assert {f for f in Failure if f.retryable} == {Failure.CONNECT, Failure.UNAVAILABLE_STATUS}
    assert not Failure.REJECTED.counts_against_replica
    assert not Failure.POOL_TIMEOUT.counts_against_replica
    assert Failure.TIMEOUT.counts_against_replica


def test_retry_decision() -> None:
    ok: dict[str, Any] = {
        "retries": 0, "max_retries": 2, "budget_available": True, "alternative": True,
    }
    assert decide_retry(Failure.CONNECT, **ok).retry
    assert decide_retry(Failure.UNAVAILABLE_STATUS, **ok).retry
    assert not decide_retry(Failure.TIMEOUT, **ok).retry
    assert not decide_retry(Failure.BROKEN, **ok).retry
    assert not decide_retry(Failure.SERVER_ERROR, **ok).retry
    assert decide_retry(Failure.CONNECT, **{**ok, "retries": 2}).reason.startswith("2 retries")
    no_alternative = decide_retry(Failure.CONNECT, **{**ok, "alternative": False})
    assert not no_alternative.retry and "no other" in no_alternative.reason
    broke = decide_retry(Failure.CONNECT, **{**ok, "budget_available": False})
    assert not broke.retry and broke.reason == BUDGET_EXHAUSTED


def test_retry_budget_caps_retries_at_a_ratio_of_requests() -> None:
    budget = RetryBudget(ratio=0.25, burst=2)
    retries = 0
    for _ in range(100):  # every request fails and wants a retry
        budget.deposit()
        if budget.can_withdraw():
            budget.withdraw()
            retries += 1
    # 2 tokens of burst spent on the first two requests, then one retry every 4 requests
    # (requests 5, 9, ..., 97).
    assert retries == 2 + 24
    assert budget.tokens < 1
