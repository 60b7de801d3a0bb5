"""The clocks: FakeClock wakes exactly the waits its advance reaches; MonotonicClock is real."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from tidegate.clock import Clock, FakeClock, MonotonicClock


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    async def main() -> None:
        async with asyncio.timeout(10):
            await scenario()

    asyncio.run(main())


def test_fake_sleep_wakes_when_time_reaches_its_deadline() -> None:
    async def scenario() -> None:
        clock = FakeClock(100.0)
        woke: list[str] = []

        async def sleeper(name: str, seconds: float) -> None:
            await clock.sleep(seconds)
            woke.append(name)

        tasks = [asyncio.create_task(sleeper(n, s)) for n, s in (("b", 2.0), ("a", 1.0))]
        await clock.until_waiting(2)
        clock.advance(0.5)
        await asyncio.sleep(0)
        assert woke == [] and clock.waiting == 2
        clock.advance(1.5)  # reaches both deadlines: woken in deadline order
        await asyncio.gather(*tasks)
        assert woke == ["a", "b"] and clock.waiting == 0 and clock.now() == 102.0

    run(scenario)


def test_fake_timeout_raises_timeout_error_and_cancels_the_block() -> None:
    async def scenario() -> None:
        clock = FakeClock()
        never = asyncio.Event()
        waiting = asyncio.create_task(clock.wait_for(never.wait(), 5.0))
        await clock.until_waiting()
        clock.advance(4.999)
        await asyncio.sleep(0)
        assert not waiting.done()
        clock.advance(0.001)
        with pytest.raises(TimeoutError):
            await waiting
        assert clock.waiting == 0

    run(scenario)


def test_fake_wait_for_returns_the_result_and_drops_its_timer() -> None:
    async def scenario() -> None:
        clock = FakeClock()
        done = asyncio.Event()
        waiting = asyncio.create_task(clock.wait_for(done.wait(), 5.0))
        await clock.until_waiting()
        done.set()
        assert await waiting is True
        assert clock.waiting == 0
        clock.advance(10)  # the finished wait's timer must not fire into anything

    run(scenario)


def test_fake_deadline_in_the_past_expires_at_once() -> None:
    async def scenario() -> None:
        clock = FakeClock(10.0)
        with pytest.raises(TimeoutError):
            async with clock.timeout_at(10.0):
                await asyncio.Event().wait()
        await clock.sleep_until(5.0)  # already passed: returns

    run(scenario)


def test_fake_time_only_moves_forward() -> None:
    with pytest.raises(ValueError, match="forward"):
        FakeClock().advance(-1)
    assert FakeClock(3.0, wall_at_zero=1000.0).wall() == 1003.0


def test_monotonic_clock_waits_in_real_time() -> None:
    async def scenario() -> None:
        clock: Clock = MonotonicClock()
        start = clock.now()
        with pytest.raises(TimeoutError):
            await clock.wait_for(asyncio.Event().wait(), 0.01)
        await clock.sleep(0.01)
        assert clock.now() - start >= 0.02

    run(scenario)
