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


def test_max_queue_wait_refuses_what_would_wait_too_long_at_the_rate_now() -> None:
    """A bound in time: the queue's drain time at the measured rate, which falls (and the
    bound tightens) when batches compute slower."""

    async def main() -> None:
        now = [0.0]
        per_item_s = [0.1]

        def compute(payloads: list[Any]) -> list[Any]:
            now[0] += per_item_s[0] * len(payloads)  # the batch's compute time, on the clock
            return [p * 2 for p in payloads]

        batcher: Batcher[Any] = Batcher(
            model="m", compute=on_loop(compute), clock=lambda: now[0],
            config=BatchingConfig(max_queue_wait_ms=500, max_wait_ms=0),
        )
        await batcher.start()
        try:
            batcher.check_room(1000)  # no rate measured yet: only max_queue_items applies
            assert await batcher.submit(items(1, 2)) == [2, 4]  # 10 inputs/s
            batcher.check_room(5)  # 500 ms
            with pytest.raises(Overloaded, match="about 600 ms to compute, limit 500 ms"):
                batcher.check_room(6)
            per_item_s[0] = 0.5  # the CPU got busy: 2 inputs/s
            for _ in range(30):  # the rate's moving average follows
                await batcher.submit(items(1))
            with pytest.raises(Overloaded) as caught:
                batcher.check_room(2)
            assert caught.value.retry_after_s >= 1
            batcher.check_room(1)
        finally:
            await batcher.aclose()

    asyncio.run(main())
