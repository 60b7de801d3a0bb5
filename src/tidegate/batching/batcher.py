"""The per-model batcher: a bounded queue of inputs, a pump that forms batches with the pure
policy, and one compute callable that it awaits for each batch (see
:mod:`tidegate.batching.compute` for the adapters: worker threads, the event loop, upstream).

The pump is event-driven rather than a worker task: it runs when an input arrives, when a batch
finishes, and when a ``max_wait`` timer fires. An arrival at an idle model is therefore
dispatched within the same event-loop step, with no task switch on the critical path.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import islice
from typing import Any, Generic, TypeVar

from tidegate.batching.adaptive import AdaptiveBatchSize
from tidegate.batching.compute import BatchResults, Compute
from tidegate.batching.policy import Decision, DispatchReason, batch_ends_s, decide
from tidegate.batching.stats import BatchMetrics, nothing_queued
from tidegate.config import BatchingConfig
from tidegate.errors import (
    ModelUnavailable,
    Overloaded,
    PayloadTooLarge,
    RuntimeFailure,
    TidegateError,
)
from tidegate.runtimes.base import Prepared
from tidegate.throughput import BatchCost, DrainRate

__all__ = ["Batcher", "BatcherStatistics"]

log = logging.getLogger("tidegate.batching")

R = TypeVar("R")

_NOTHING_QUEUED = Decision(None)


class _Request:
    __slots__ = ("future", "pending", "remaining", "results")

    def __init__(self, future: asyncio.Future[list[Any]], size: int) -> None:
        self.future = future
        self.results: list[Any] = [None] * size
        self.remaining = size  # inputs without a result yet
        self.pending = size  # inputs still in the queue


class _Item:
    __slots__ = ("enqueued_at", "index", "payload", "request", "tokens")

    def __init__(self, request: _Request, index: int, prepared: Prepared, now: float) -> None:
        self.request = request
        self.index = index
        self.tokens = prepared.tokens
        self.payload = prepared.payload
        self.enqueued_at = now


@dataclass(frozen=True, slots=True)
class BatcherStatistics:
    queued_items: int
    queued_tokens: int
    inflight_batches: int
    effective_batch_size: int
    batches: int
    items: int
    dispatch_reasons: dict[str, int]
    rejected_requests: int
    cancelled_items: int
    failed_batches: int
    items_per_second: float


class Batcher(Generic[R]):
    """Coalesce inputs from concurrent requests into batches for one model.

    ``compute`` gets the payloads of one batch and returns an awaitable of one result per
    payload, in order. A request larger than a batch is split across batches and its results
    reassembled in order.
    """

    def __init__(
        self,
        *,
        model: str,
        compute: Compute[R],
        config: BatchingConfig,
        metrics: BatchMetrics | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.model = model
        self._compute = compute
        self._config = config
        self._metrics = metrics = metrics or BatchMetrics()
        metrics.queue_depth = self._queue_depth
        self._clock = clock
        self._queue: deque[_Item] = deque()
        self._queued_tokens = 0
        self._pending: set[asyncio.Future[Any]] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._pumping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self._adaptive = (
            AdaptiveBatchSize(target_s=config.target_p99_ms / 1000, max_size=config.max_batch_size)
            if config.target_p99_ms is not None
            else None
        )
        self._batches = 0
        self._items = 0
        self._failed = 0
        self._drain = DrainRate()
        """Items per second the queue drains at: Retry-After."""
        self._cost = BatchCost()
        """A batch's time from dispatch to results by its size: ``max_queue_wait_ms``."""
        self._running: dict[int, tuple[int, float]] = {}
        """Each batch computing now, by number: its inputs and when it was dispatched (their
        count is the batches in flight, for dispatch)."""

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()

    async def aclose(self) -> None:
        """Stop taking work, fail what is queued, and wait for running batches to finish."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while self._queue:
            item = self._queue.popleft()
            if not item.request.future.done():
                item.request.future.set_exception(ModelUnavailable(self.model, "shutting down"))
        self._queued_tokens = 0
        while self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)
        # The model's metrics outlive it: they must not keep this batcher (and through its
        # compute, the unloaded runtime) alive.
        if self._metrics.queue_depth == self._queue_depth:
            self._metrics.queue_depth = nothing_queued

    # -- the public operation ------------------------------------------------------------------

    @property
    def batch_size(self) -> int:
        return self._adaptive.size if self._adaptive else self._config.max_batch_size

    def check_room(self, size: int) -> None:
        """Raise what :meth:`submit` would for ``size`` inputs if the queue cannot take them now
        (:class:`Overloaded`, :class:`PayloadTooLarge`), so a caller can refuse a request before
        preparing its inputs: under overload, refusing must cost less than serving."""
        if self._closed:
            raise ModelUnavailable(self.model, "shutting down")
        limit = self._config.max_queue_items
        if size > limit:
            raise PayloadTooLarge(
                f"{size} inputs exceed model '{self.model}' queue capacity of {limit}",
                limit=limit, actual=size,
            )
        if len(self._queue) + size > limit:
            self._metrics.rejected += 1
            raise Overloaded(
                model=self.model, queued=len(self._queue), limit=limit,
                retry_after_s=self._retry_after(), status=self._config.overload_status,
            )
        wait_limit_ms = self._config.max_queue_wait_ms
        if wait_limit_ms is None or not (self._queue or self._running):
            return  # an idle model takes a request, however slow its batches have been
        latency_s = self._expected_latency_s(size)
        if latency_s is not None:
            wait_ms = 1000 * latency_s
            if wait_ms > wait_limit_ms:
                self._metrics.rejected += 1
                raise Overloaded(
                    model=self.model, queued=len(self._queue), limit=limit,
                    retry_after_s=self._retry_after(), status=self._config.overload_status,
                    wait_ms=wait_ms, wait_limit_ms=wait_limit_ms,
                )

    async def submit(self, inputs: Sequence[Prepared]) -> list[R]:
        """Queue ``inputs`` and wait for their results, in order.

        Raises :class:`Overloaded` when the queue cannot take them. If the caller is cancelled
        (client gone, timeout), inputs still queued are withdrawn before dispatch.
        """
        size = len(inputs)
        self.check_room(size)
        if size == 0:
            return []
        request = _Request(asyncio.get_running_loop().create_future(), size)
        now = self._clock()
        queue = self._queue
        for index, prepared in enumerate(inputs):
            queue.append(_Item(request, index, prepared, now))
            self._queued_tokens += prepared.tokens
        self._pump()
        try:
            results: list[R] = await request.future
        except asyncio.CancelledError:
            self._withdraw(request)
            raise
        return results

    def statistics(self) -> BatcherStatistics:
        return BatcherStatistics(
            queued_items=len(self._queue),
            queued_tokens=self._queued_tokens,
            inflight_batches=len(self._running),
            effective_batch_size=self.batch_size,
            batches=self._batches,
            items=self._items,
            dispatch_reasons=dict(self._metrics.dispatch),
            rejected_requests=self._metrics.rejected,
            cancelled_items=self._metrics.withdrawn,
            failed_batches=self._failed,
            items_per_second=self._drain.per_second,
        )

    def __repr__(self) -> str:
        s = self.statistics()
        return (
            f"<Batcher model={self.model!r} queued={s.queued_items} inflight={s.inflight_batches}"
            f" batch_size={s.effective_batch_size} batches={s.batches}>"
        )

    # -- internals -----------------------------------------------------------------------------

    def _retry_after(self) -> int:
        rate = self._drain.per_second
        if rate <= 0:
            return 1
        return max(1, math.ceil(len(self._queue) / rate))

    def _queue_depth(self) -> int:
        return len(self._queue)

    def _expected_latency_s(self, size: int) -> float | None:
        """The longest a queued input would wait for its result, from its arrival, if ``size``
        more joined the queue now; ``None`` before a batch was timed.

        The new inputs' own batches are predicted (:func:`batch_ends_s`), and a batch they
        join already holding inputs counts from its oldest input's arrival: an input admitted
        when its batch was small must not see that batch grow past the bound afterwards.
        """
        cost = self._cost
        if cost.item_s <= 0 and cost.fixed_s <= 0:
            return None
        now = self._clock()
        slow = cost.slow
        queue = self._queue
        queued = len(queue)
        size_of_batch = max(1, self.batch_size)
        inflight = [(items, now - started) for items, started in self._running.values()]
        first = queued // size_of_batch
        last = (queued + max(1, size) - 1) // size_of_batch
        worst = 0.0
        for batch in {first, last}:
            items = min(size_of_batch, queued + size - batch * size_of_batch)
            ends_s = batch_ends_s(
                batch=batch, items=items, batch_size=size_of_batch,
                max_inflight=self._config.concurrency, fixed_s=cost.fixed_s * slow,
                item_s=cost.item_s * slow, inflight=inflight,
            )
            head = batch * size_of_batch
            waited_s = now - queue[head].enqueued_at if head < queued else 0.0
            worst = max(worst, waited_s + ends_s)
        return worst

    def _withdraw(self, request: _Request) -> None:
        if request.pending:
            kept = deque(item for item in self._queue if item.request is not request)
            removed = len(self._queue) - len(kept)
            self._queued_tokens -= sum(i.tokens for i in self._queue if i.request is request)
            self._queue = kept
            self._metrics.withdrawn += removed
            request.pending = 0

    def _decide(self) -> Decision:
        queue = self._queue
        return decide(
            now=self._clock(),
            oldest_enqueued_at=queue[0].enqueued_at if queue else None,
            head_tokens=(item.tokens for item in islice(queue, self.batch_size)),
            inflight=len(self._running),
            max_inflight=self._config.concurrency,
            batch_size=self.batch_size,
            max_batch_tokens=self._config.max_batch_tokens,
            max_wait_s=self._config.wait_s,
        )

    def _pump(self) -> None:
        """Dispatch every batch the policy allows now; arm a timer for the next deadline."""
        if self._pumping or self._closed:
            return
        self._pumping = True
        decision = _NOTHING_QUEUED
        try:
            while self._queue:  # an empty queue needs no decision (and no timer)
                decision = self._decide()
                if decision.reason is None:
                    break
                self._dispatch(decision.reason, decision.count)
                decision = _NOTHING_QUEUED
        finally:
            self._pumping = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if decision.wake_after_s is not None:
            loop = self._loop or asyncio.get_running_loop()
            self._timer = loop.call_later(decision.wake_after_s, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._pump()

    def _dispatch(self, reason: DispatchReason, count: int) -> None:
        queue = self._queue
        items = [queue.popleft() for _ in range(count)]
        tokens = 0
        for item in items:
            item.request.pending -= 1
            tokens += item.tokens
        self._queued_tokens -= tokens
        self._batches += 1
        self._items += count
        metrics = self._metrics
        metrics.dispatch[reason.value] += 1
        metrics.batch_items.observe(count)
        metrics.batch_tokens.observe(tokens)
        backlogged = bool(queue)
        started = self._clock()
        batch = self._batches
        self._running[batch] = (count, started)
        future = asyncio.ensure_future(self._compute([item.payload for item in items]))
        if future.done():  # computed on the loop (``on_loop``): deliver in this same step
            self._on_computed(future, items, started, backlogged, batch)
            return
        self._pending.add(future)
        future.add_done_callback(
            lambda done: self._on_computed(done, items, started, backlogged, batch)
        )

    @staticmethod
    def _checked(results: BatchResults[R], items: list[_Item]) -> BatchResults[R]:
        if len(results) != len(items):
            raise RuntimeError(f"runtime returned {len(results)} results for {len(items)} inputs")
        return results

    def _on_computed(
        self, done: asyncio.Future[Any], items: list[_Item], started: float, backlogged: bool,
        batch: int,
    ) -> None:
        self._pending.discard(done)
        try:
            results = self._checked(done.result(), items)
        except Exception as exc:
            self._failed += 1
            task = asyncio.ensure_future(self._isolate(items, exc))
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)
            task.add_done_callback(lambda _: self._finish(items, started, backlogged, batch))
            return
        except asyncio.CancelledError as exc:  # the executor was shut down under us
            for group in self._by_request(items):
                self._fail(group, exc)
        else:
            self._deliver(items, results)
        self._finish(items, started, backlogged, batch)

    def _finish(self, items: list[_Item], started: float, backlogged: bool, batch: int) -> None:
        self._running.pop(batch, None)
        self._observe(items, started, self._clock(), backlogged)
        self._pump()

    @staticmethod
    def _by_request(items: list[_Item]) -> list[list[_Item]]:
        groups: dict[int, list[_Item]] = {}
        for item in items:
            groups.setdefault(id(item.request), []).append(item)
        return list(groups.values())

    async def _isolate(self, items: list[_Item], exc: Exception) -> None:
        """A failed batch is re-run request by request, so one bad request fails only itself."""
        groups = self._by_request(items)
        if len(groups) == 1:
            self._fail(items, exc)
            return
        for group in groups:
            if group[0].request.future.done():
                continue
            try:
                results = await self._compute([item.payload for item in group])
                self._deliver(group, self._checked(results, group))
            except Exception as group_exc:
                self._fail(group, group_exc)

    def _fail(self, items: list[_Item], exc: BaseException) -> None:
        request = items[0].request
        log.warning("model %s failed a batch: %r", self.model, exc, exc_info=exc)
        if request.future.done():
            return
        if isinstance(exc, TidegateError):  # already says what went wrong (an upstream's 502)
            request.future.set_exception(exc)
            return
        failure = RuntimeFailure(self.model, f"{type(exc).__name__}: {exc}")
        failure.__cause__ = exc
        request.future.set_exception(failure)

    @staticmethod
    def _deliver(items: list[_Item], results: BatchResults[R]) -> None:
        for item, result in zip(items, results, strict=True):
            request = item.request
            if request.future.done():  # cancelled or failed: drop the result
                continue
            request.results[item.index] = result
            request.remaining -= 1
            if request.remaining == 0:
                request.future.set_result(request.results)

    def _observe(
        self, items: list[_Item], started: float, finished: float, backlogged: bool
    ) -> None:
        compute_s = finished - started
        self._drain.observe(len(items), ready_at=min(item.enqueued_at for item in items),
                            end=finished)
        self._cost.observe(len(items), compute_s)
        self._metrics.compute.observe(compute_s)
        queue_wait = self._metrics.queue_wait
        for item in items:
            queue_wait.observe(started - item.enqueued_at)
        if self._adaptive is not None:
            self._adaptive.observe(
                [finished - item.enqueued_at for item in items], backlogged=backlogged
            )
