"""The batcher with a real (controllable) runtime behind it: a gate holds each batch so tests
can arrange queues deterministically, by waiting on events instead of sleeping."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import pytest

from tidegate.batching.batcher import Batcher
from tidegate.batching.compute import in_executor, on_loop
from tidegate.config import BatchingConfig
from tidegate.errors import ModelUnavailable, Overloaded, PayloadTooLarge, RuntimeFailure
from tidegate.runtimes.base import Prepared


class GatedDoubler:
    """Doubles each payload; a batch blocks until ``release()``; 'poison' raises."""

    def __init__(self) -> None:
        self.batches: list[list[Any]] = []
        self._gate = threading.Event()
        self._gate.set()
        self._entered = threading.Semaphore(0)

    def hold(self) -> None:
        self._gate.clear()

    def release(self) -> None:
        self._gate.set()

    async def wait_entered(self) -> None:
        assert await asyncio.to_thread(self._entered.acquire, True, 5.0)

    def __call__(self, payloads: list[Any]) -> Sequence[Any]:
        self.batches.append(list(payloads))
        self._entered.release()
        assert self._gate.wait(10)
        if "poison" in payloads:
            raise ValueError("poisoned input")
        if "short" in payloads:
            return []
        return [p * 2 for p in payloads]


def items(*payloads: Any, tokens: int = 1) -> list[Prepared]:
    return [Prepared(tokens, p) for p in payloads]


def run(
    scenario: Callable[[Batcher[Any], GatedDoubler], Awaitable[None]], **config: Any
) -> None:
    async def main() -> None:
        runtime = GatedDoubler()
        batcher: Batcher[Any] = Batcher(
            model="m", compute=in_executor(runtime), config=BatchingConfig(**config)
        )
        await batcher.start()
        try:
            async with asyncio.timeout(20):
                await scenario(batcher, runtime)
        finally:
            runtime.release()
            await batcher.aclose()

    asyncio.run(main())


async def hold_model(batcher: Batcher[Any], runtime: GatedDoubler) -> asyncio.Task[Any]:
    """Occupy the model with one computing batch and return its request."""
    runtime.hold()
    first = asyncio.create_task(batcher.submit(items(100)))
    await runtime.wait_entered()
    return first


async def until_queued(batcher: Batcher[Any], count: int) -> None:
    """Yield to the loop until ``count`` inputs are queued; fail after 5 s."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5.0
    while (queued := batcher.statistics().queued_items) != count:
        assert loop.time() < deadline, f"waited 5 s for {count} queued inputs, have {queued}"
        await asyncio.sleep(0)


def test_lone_request_is_dispatched_at_once_when_idle() -> None:
    async def scenario(batcher: Batcher[Any], runtime: GatedDoubler) -> None:
        # max_wait is 60 s: only the idle rule can serve this within the test timeout.
        assert await batcher.submit(items(1, 2)) == [2, 4]
        assert batcher.statistics().dispatch_reasons["idle"] == 1

    run(scenario, max_wait_ms=60_000)


def test_concurrent_requests_are_coalesced_into_one_batch() -> None:
    async def scenario(batcher: Batcher[Any], runtime: GatedDoubler) -> None:
        first = await hold_model(batcher, runtime)
        waiting = [asyncio.create_task(batcher.submit(items(i))) for i in range(10)]
        await until_queued(batcher, 10)
        runtime.release()
        assert [await t for t in waiting] == [[2 * i] for i in range(10)]
        assert await first == [200]
        assert runtime.batches[1] == list(range(10))
        assert batcher.statistics().batches == 2

    run(scenario)


def test_full_batches_and_split_request_reassembled_in_order() -> None:
    async def scenario(batcher: Batcher[Any], runtime: GatedDoubler) -> None:
        first = await hold_model(batcher, runtime)
        big = asyncio.create_task(batcher.submit(items(*range(10))))
        await until_queued(batcher, 10)
        runtime.release()
        assert await big == [2 * i for i in range(10)]
        await first
        assert [len(b) for b in runtime.batches[1:]] == [4, 4, 2]
        reasons = batcher.statistics().dispatch_reasons
        assert reasons["full"] == 2

    run(scenario, max_batch_size=4)


def test_token_budget_limits_batches() -> None:
    async def scenario(batcher: Batcher[Any], runtime: GatedDoubler) -> None:
        first = await hold_model(batcher, runtime)
        task = asyncio.create_task(batcher.submit(items(*range(6), tokens=40)))
        await until_queued(batcher, 6)
        runtime.release()
        await task
        await first
        assert [len(b) for b in runtime.batches[1:]] == [2, 2, 2]
        assert batcher.statistics().dispatch_reasons["tokens"] >= 2

    run(scenario, max_batch_tokens=100)


def test_waits_for_more_inputs_while_a_batch_computes_then_times_out() -> None:
    async def scenario(batcher: Batcher[Any], runtime: GatedDoubler) -> None:
        await hold_model(batcher, runtime)
        # A second slot is free, so this input waits max_wait for company, then goes alone.
        second = asyncio.create_task(batcher.submit(items(7)))
        await runtime.wait_entered()
        assert batcher.statistics().dispatch_reasons["timeout"] == 1
        runtime.release()
        assert await second == [14]

    run(scenario, max_concurrent_batches=2, max_wait_ms=20)


def test_full_queue_is_refused_with_overloaded() -> None:
    async def scenario(batcher: Batcher[Any], runtime: GatedDoubler) -> None:
        await hold_model(batcher, runtime)
        queued = asyncio.create_task(batcher.submit(items(*range(5))))
        await until_queued(batcher, 5)
        with pytest.raises(Overloaded) as caught:
            await batcher.submit(items(1))
        assert caught.value.status == 503
        assert caught.value.queued == 5 and caught.value.limit == 5
        assert caught.value.retry_after_s >= 1
        with pytest.raises(PayloadTooLarge):
            await batcher.submit(items(*range(6)))
        assert batcher.statistics().rejected_requests == 1
        # The same refusal before any input is prepared (what the embedding route asks first).
        with pytest.raises(Overloaded):
            batcher.check_room(1)
        batcher.check_room(0)
        assert batcher.statistics().rejected_requests == 2
        runtime.release()
        assert await queued == [0, 2, 4, 6, 8]

    run(scenario, max_queue_items=5, overload_status=503)


def test_cancelled_request_is_withdrawn_before_dispatch() -> None:
    async def scenario(batcher: Batcher[Any], runtime: GatedDoubler) -> None:
        first = await hold_model(batcher, runtime)
        doomed = asyncio.create_task(batcher.submit(items(-1, -2, -3)))
        kept = asyncio.create_task(batcher.submit(items(5)))
        await until_queued(batcher, 4)
        doomed.cancel()
        await asyncio.gather(doomed, return_exceptions=True)
        stats = batcher.statistics()
        assert stats.queued_items == 1 and stats.cancelled_items == 3
        assert stats.queued_tokens == 1
        runtime.release()
        assert await kept == [10]
        await first
        assert all(p >= 0 for batch in runtime.batches for p in batch)

    run(scenario)


def test_cancel_during_compute_drops_results_and_keeps_serving() -> None:
    async def scenario(batcher: Batcher[Any], runtime: GatedDoubler) -> None:
        first = await hold_model(batcher, runtime)
        first.cancel()
        await asyncio.gather(first, return_exceptions=True)
        runtime.release()
        assert await batcher.submit(items(3)) == [6]
        assert batcher.statistics().inflight_batches == 0

    run(scenario)


def test_a_bad_request_fails_only_itself() -> None:
    async def scenario(batcher: Batcher[Any], runtime: GatedDoubler) -> None:
        first = await hold_model(batcher, runtime)
        good = [asyncio.create_task(batcher.submit(items(i))) for i in range(3)]
        bad = asyncio.create_task(batcher.submit(items("poison")))
        await until_queued(batcher, 4)
        runtime.release()
        assert [await t for t in good] == [[0], [2], [4]]
        with pytest.raises(RuntimeFailure, match="poisoned input"):
            await bad
        await first
        assert await batcher.submit(items(21)) == [42]  # the worker survived
        assert batcher.statistics().failed_batches == 1

    run(scenario)


def test_runtime_returning_wrong_count_fails_the_request_not_the_worker() -> None:
    async def scenario(batcher: Batcher[Any], runtime: GatedDoubler) -> None:
        with pytest.raises(RuntimeFailure, match="0 results for 1 inputs"):
            await batcher.submit(items("short"))
        assert await batcher.submit(items(1)) == [2]

    run(scenario)


def test_close_fails_queued_requests() -> None:
    async def main() -> None:
        runtime = GatedDoubler()
        batcher: Batcher[Any] = Batcher(
            model="m", compute=in_executor(runtime), config=BatchingConfig()
        )
        await batcher.start()
        first = await hold_model(batcher, runtime)
        queued = asyncio.create_task(batcher.submit(items(1)))
        await until_queued(batcher, 1)
        closing = asyncio.create_task(batcher.aclose())
        with pytest.raises(ModelUnavailable, match="shutting down"):
            await queued
        runtime.release()
        await closing
        assert await first == [200]
        with pytest.raises(ModelUnavailable):
            await batcher.submit(items(1))

    asyncio.run(main())


def test_adaptive_target_is_wired_to_the_batch_size() -> None:
    async def scenario(batcher: Batcher[Any], runtime: GatedDoubler) -> None:
        assert batcher.batch_size == 32
        assert "batch_size=32" in repr(batcher)

    run(scenario, max_batch_size=32, target_p99_ms=5)


def test_inline_runtime_serves_on_the_loop_and_isolates_failures() -> None:
    def doubler(payloads: Sequence[Any]) -> list[Any]:
        if "poison" in payloads:
            raise ValueError("poisoned input")
        return [p * 2 for p in payloads]

    async def main() -> None:
        batcher: Batcher[Any] = Batcher(
            model="m", compute=on_loop(doubler), config=BatchingConfig()
        )
        await batcher.start()
        results = await asyncio.gather(
            batcher.submit(items(1, 2)), batcher.submit(items("poison")), batcher.submit(items(3)),
            return_exceptions=True,
        )
        assert results[0] == [2, 4] and results[2] == [6]
        assert isinstance(results[1], RuntimeFailure)
        assert batcher.statistics().inflight_batches == 0
        await batcher.aclose()

    asyncio.run(main())


def test_on_loop_compute_answers_without_yielding_to_the_loop() -> None:
    """The echo runtime's fast path: an idle model computes and delivers within ``submit``."""

    async def main() -> None:
        batcher: Batcher[Any] = Batcher(
            model="m", compute=on_loop(lambda payloads: [p * 2 for p in payloads]),
            config=BatchingConfig(),
        )
        await batcher.start()
        submit = batcher.submit(items(1, 2))
        with pytest.raises(StopIteration) as finished:
            submit.send(None)  # one step of the coroutine: it must not suspend
        assert finished.value.value == [2, 4]
        stats = batcher.statistics()
        assert stats.batches == 1 and stats.inflight_batches == 0
        await batcher.aclose()

    asyncio.run(main())


class TimedModel:
    """Batches of n inputs take 0.05 + 0.01 n s on a fake clock; ``hold()`` keeps the next
    batches computing (the clock still) until ``release()``."""

    def __init__(self) -> None:
        self.now = 0.0
        self.gate = asyncio.Event()
        self.gate.set()
        self.started = 0

    def clock(self) -> float:
        return self.now

    async def compute(self, payloads: Sequence[Any]) -> list[Any]:
        self.started += 1
        await self.gate.wait()
        self.now += 0.05 + 0.01 * len(payloads)
        return [p * 2 for p in payloads]


def test_max_queue_wait_refuses_what_would_end_too_late() -> None:
    """A bound on the time to a result: the batch computing now, whole batches ahead, the
    input's own batch by its size (a batch's cost fitted from the batches so far), and the
    wait of inputs already in the batch it joins. An idle model takes anything."""

    async def main() -> None:
        model = TimedModel()
        batcher: Batcher[Any] = Batcher(
            model="m", compute=model.compute, clock=model.clock,
            config=BatchingConfig(max_queue_wait_ms=450, max_wait_ms=0, max_batch_size=20),
        )
        await batcher.start()
        try:
            batcher.check_room(1000)  # no batch timed yet: only max_queue_items applies
            for _ in range(40):  # batches of 5 and of 20: 0.1 s and 0.25 s
                assert await batcher.submit(items(*range(5))) == [2 * i for i in range(5)]
                await batcher.submit(items(*range(20)))
            batcher.check_room(60)  # idle: a batch of 0.65 s is taken all the same
            model.gate.clear()
            running = asyncio.create_task(batcher.submit(items(*range(20))))
            while model.started < 81:
                await asyncio.sleep(0)
            # behind the running batch (0.25 s): 10 inputs end after 0.25 + 0.15 s
            batcher.check_room(10)
            queued = asyncio.create_task(batcher.submit(items(*range(10))))
            await until_queued(batcher, 10)
            model.now += 0.2  # the running batch has 0.05 s left
            # 4 more join the queued batch: 0.05 + 0.19 s from now, but its first inputs
            # have waited 0.2 s already: 440 ms
            batcher.check_room(4)
            with pytest.raises(Overloaded,
                               match=r"10 queued ahead, .* result in about 50\d ms, "
                                     r"limit 450 ms") as caught:
                batcher.check_room(10)  # 0.2 + 0.05 + 0.25 s for the inputs queued first
            assert caught.value.retry_after_s >= 1
            # 10 to fill the queued batch and 1 in the next one: 0.2 + 0.05 + 0.25 s too
            with pytest.raises(Overloaded):
                batcher.check_room(11)
            model.gate.set()
            assert len(await running) == 20 and len(await queued) == 10
        finally:
            model.gate.set()
            await batcher.aclose()

    asyncio.run(main())
