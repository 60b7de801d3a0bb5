"""The ingress's coalescing of requests into replica calls (no Ray: a fake ``send``)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from tidegate.cluster.coalesce import Coalescer, QueueFull


class Replica:
    """A ``send`` whose calls the test releases one by one."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.arrived = asyncio.Event()
        self.release: asyncio.Queue[Exception | None] = asyncio.Queue()

    async def send(self, items: Sequence[str]) -> list[str]:
        self.calls.append(list(items))
        self.arrived.set()
        outcome = await self.release.get()
        if outcome is not None:
            raise outcome
        return [item.upper() for item in items]


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def _a_lone_request_goes_at_once_and_later_ones_ride_together() -> None:
    replica = Replica()
    coalescer = Coalescer(replica.send, max_items=64, max_in_flight=lambda: 1)
    first = asyncio.ensure_future(coalescer.submit("a"))
    await replica.arrived.wait()
    assert replica.calls == [["a"]]
    rest = [asyncio.ensure_future(coalescer.submit(x)) for x in "bcd"]
    await _settle()
    assert replica.calls == [["a"]]  # waiting for the call in flight
    replica.release.put_nowait(None)
    assert await first == "A"
    await _settle()
    assert replica.calls == [["a"], ["b", "c", "d"]]
    replica.release.put_nowait(None)
    assert await asyncio.gather(*rest) == ["B", "C", "D"]
    assert coalescer.calls == 2


async def _calls_hold_at_most_max_items_and_run_up_to_max_in_flight() -> None:
    replica = Replica()
    coalescer = Coalescer(replica.send, max_items=2, max_in_flight=lambda: 2)
    futures = [asyncio.ensure_future(coalescer.submit(x)) for x in "abcde"]
    await _settle()
    assert replica.calls == [["a"], ["b"]]  # each went at once while a call was free
    for _ in range(4):
        replica.release.put_nowait(None)
    assert await asyncio.gather(*futures) == list("ABCDE")
    assert replica.calls == [["a"], ["b"], ["c", "d"], ["e"]]


async def _a_failed_call_fails_each_of_its_requests_only() -> None:
    replica = Replica()
    coalescer = Coalescer(replica.send, max_items=2, max_in_flight=lambda: 1)
    futures = [asyncio.ensure_future(coalescer.submit(x)) for x in "abc"]
    await _settle()
    assert replica.calls == [["a"]]
    replica.release.put_nowait(RuntimeError("replica lost"))
    await _settle()
    assert replica.calls == [["a"], ["b", "c"]]
    replica.release.put_nowait(RuntimeError("replica lost again"))
    replica.release.put_nowait(None)
    d = asyncio.ensure_future(coalescer.submit("d"))
    results = await asyncio.gather(*futures, d, return_exceptions=True)
    assert [str(r) for r in results] == ["replica lost", "replica lost again",
                                         "replica lost again", "D"]


async def _a_request_whose_caller_gave_up_is_not_sent() -> None:
    replica = Replica()
    coalescer = Coalescer(replica.send, max_items=8, max_in_flight=lambda: 1)
    first = asyncio.ensure_future(coalescer.submit("a"))
    await replica.arrived.wait()
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0):
            await coalescer.submit("b")
    kept = asyncio.ensure_future(coalescer.submit("c"))
    replica.release.put_nowait(None)
    replica.release.put_nowait(None)
    assert (await first, await kept) == ("A", "C")
    assert replica.calls == [["a"], ["c"]]


async def _past_max_pending_a_request_is_refused_at_once() -> None:
    replica = Replica()
    coalescer = Coalescer(replica.send, max_items=8, max_in_flight=lambda: 1, max_pending=2)
    first = asyncio.ensure_future(coalescer.submit("a"))
    await replica.arrived.wait()
    waiting = [asyncio.ensure_future(coalescer.submit(x)) for x in "bc"]
    await _settle()
    with pytest.raises(QueueFull) as caught:
        await coalescer.submit("d")
    assert caught.value.pending == 2
    replica.release.put_nowait(None)
    replica.release.put_nowait(None)
    assert [await first, *await asyncio.gather(*waiting)] == ["A", "B", "C"]


def test_past_max_pending_a_request_is_refused_at_once() -> None:
    asyncio.run(_past_max_pending_a_request_is_refused_at_once())


def test_a_lone_request_goes_at_once_and_later_ones_ride_together() -> None:
    asyncio.run(_a_lone_request_goes_at_once_and_later_ones_ride_together())


def test_calls_hold_at_most_max_items_and_run_up_to_max_in_flight() -> None:
    asyncio.run(_calls_hold_at_most_max_items_and_run_up_to_max_in_flight())


def test_a_failed_call_fails_each_of_its_requests_only() -> None:
    asyncio.run(_a_failed_call_fails_each_of_its_requests_only())


def test_a_request_whose_caller_gave_up_is_not_sent() -> None:
    asyncio.run(_a_request_whose_caller_gave_up_is_not_sent())
