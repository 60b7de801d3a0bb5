"""The per-model batcher: a bounded queue of inputs, a worker that forms batches with the pure
policy, and an executor that computes them off the event loop."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from itertools import islice
from typing import Any, Generic, Protocol, TypeVar

from tidegate.batching.adaptive import AdaptiveBatchSize
from tidegate.batching.policy import Decision, DispatchReason, decide
from tidegate.config import BatchingConfig
from tidegate.errors import ModelUnavailable, Overloaded, PayloadTooLarge, RuntimeFailure
from tidegate.metrics import BatchMetrics
from tidegate.runtimes.base import Prepared

__all__ = ["Batcher", "BatcherStatistics"]

log = logging.getLogger("tidegate.batching")

R = TypeVar("R")
R_co = TypeVar("R_co", covariant=True)


class BatchResults(Protocol[R_co]):
    """What ``run_batch`` returns: one result per payload (a list, or an array's rows)."""

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[R_co]: ...


RunBatch = Callable[[Sequence[Any]], BatchResults[R]]


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

    ``run_batch`` is synchronous and runs in ``executor``; it gets the payloads of one batch
    and returns one result per payload, in order. A request larger than a batch is split across
    batches and its results reassembled in order.
    """

    def __init__(
        self,
        *,
        model: str,
        run_batch: RunBatch[R],
        config: BatchingConfig,
        executor: Executor | None = None,
        metrics: BatchMetrics | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.model = model
        self._run_batch = run_batch
        self._config = config
        self._executor = executor
        self._metrics = metrics
        self._clock = clock
        self._queue: deque[_Item] = deque()
        self._queued_tokens = 0
        self._inflight = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._wakeup = asyncio.Event()
        self._worker: asyncio.Task[None] | None = None
        self._closed = False
        self._adaptive = (
            AdaptiveBatchSize(target_s=config.target_p99_ms / 1000, max_size=config.max_batch_size)
            if config.target_p99_ms is not None
            else None
        )
        self._batches = 0
        self._items = 0
        self._reasons: dict[str, int] = {reason.value: 0 for reason in DispatchReason}
        self._rejected = 0
        self._cancelled = 0
        self._failed = 0
        self._rate = 0.0  # EWMA of items/s while computing, for Retry-After

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        if self._worker is None:
            self._worker = asyncio.create_task(self._run(), name=f"batcher:{self.model}")

    async def aclose(self) -> None:
        """Stop taking work, fail what is queued, and wait for running batches to finish."""
        self._closed = True
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
            self._worker = None
        while self._queue:
            item = self._queue.popleft()
            if not item.request.future.done():
                item.request.future.set_exception(ModelUnavailable(self.model, "shutting down"))
        self._queued_tokens = 0
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self._update_depth()

    # -- the public operation ------------------------------------------------------------------

    @property
    def batch_size(self) -> int:
        return self._adaptive.size if self._adaptive else self._config.max_batch_size

    async def submit(self, inputs: Sequence[Prepared]) -> list[R]:
        """Queue ``inputs`` and wait for their results, in order.

        Raises :class:`Overloaded` when the queue cannot take them. If the caller is cancelled
        (client gone, timeout), inputs still queued are withdrawn before dispatch.
        """
        if self._closed:
            raise ModelUnavailable(self.model, "shutting down")
        size = len(inputs)
        if size == 0:
            return []
        limit = self._config.max_queue_items
        if size > limit:
            raise PayloadTooLarge(
                f"{size} inputs exceed model '{self.model}' queue capacity of {limit}",
                limit=limit, actual=size,
            )
        if len(self._queue) + size > limit:
            self._rejected += 1
            if self._metrics:
                self._metrics.rejected.inc()
            raise Overloaded(
                model=self.model, queued=len(self._queue), limit=limit,
                retry_after_s=self._retry_after(), status=self._config.overload_status,
            )
        request = _Request(asyncio.get_running_loop().create_future(), size)
        now = self._clock()
        queue = self._queue
        for index, prepared in enumerate(inputs):
            queue.append(_Item(request, index, prepared, now))
            self._queued_tokens += prepared.tokens
        self._update_depth()
        self._wakeup.set()
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
            inflight_batches=self._inflight,
            effective_batch_size=self.batch_size,
            batches=self._batches,
            items=self._items,
            dispatch_reasons=dict(self._reasons),
            rejected_requests=self._rejected,
            cancelled_items=self._cancelled,
            failed_batches=self._failed,
            items_per_second=self._rate,
        )

    def __repr__(self) -> str:
        s = self.statistics()
        return (
            f"<Batcher model={self.model!r} queued={s.queued_items} inflight={s.inflight_batches}"
            f" batch_size={s.effective_batch_size} batches={s.batches}>"
        )

    # -- internals -----------------------------------------------------------------------------

    def _retry_after(self) -> int:
        if self._rate <= 0:
            return 1
        return max(1, math.ceil(len(self._queue) / self._rate))

    def _update_depth(self) -> None:
        if self._metrics:
            self._metrics.queue_depth.set(len(self._queue))

    def _withdraw(self, request: _Request) -> None:
        if request.pending:
            kept = deque(item for item in self._queue if item.request is not request)
            removed = len(self._queue) - len(kept)
            self._queued_tokens -= sum(i.tokens for i in self._queue if i.request is request)
            self._queue = kept
            self._cancelled += removed
            if self._metrics:
                self._metrics.withdrawn.inc(removed)
            request.pending = 0
            self._update_depth()
        self._wakeup.set()

    def _decide(self) -> Decision:
        queue = self._queue
        return decide(
            now=self._clock(),
            oldest_enqueued_at=queue[0].enqueued_at if queue else None,
            head_tokens=(item.tokens for item in islice(queue, self.batch_size)),
            inflight=self._inflight,
            max_inflight=self._config.max_concurrent_batches,
            batch_size=self.batch_size,
            max_batch_tokens=self._config.max_batch_tokens,
            max_wait_s=self._config.max_wait_ms / 1000,
        )

    async def _run(self) -> None:
        while True:
            decision = self._decide()
            if decision.reason is not None:
                self._dispatch(decision.reason, decision.count)
                continue
            self._wakeup.clear()
            if decision.wake_after_s is None:
                await self._wakeup.wait()
            else:
                try:
                    async with asyncio.timeout(decision.wake_after_s):
                        await self._wakeup.wait()
                except TimeoutError:
                    pass

    def _dispatch(self, reason: DispatchReason, count: int) -> None:
        queue = self._queue
        items = [queue.popleft() for _ in range(count)]
        tokens = 0
        for item in items:
            item.request.pending -= 1
            tokens += item.tokens
        self._queued_tokens -= tokens
        self._inflight += 1
        self._batches += 1
        self._items += count
        self._reasons[reason.value] += 1
        if self._metrics:
            self._metrics.dispatch[reason.value].inc()
            self._metrics.batch_items.observe(count)
            self._metrics.batch_tokens.observe(tokens)
        self._update_depth()
        task = asyncio.create_task(self._execute(items, backlogged=bool(queue)))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _compute(self, items: list[_Item]) -> BatchResults[R]:
        loop = asyncio.get_running_loop()
        results = await loop.run_in_executor(
            self._executor, self._run_batch, [item.payload for item in items]
        )
        if len(results) != len(items):
            raise RuntimeError(f"runtime returned {len(results)} results for {len(items)} inputs")
        return results

    async def _execute(self, items: list[_Item], *, backlogged: bool) -> None:
        started = self._clock()
        try:
            try:
                results = await self._compute(items)
            except Exception as exc:
                self._failed += 1
                await self._isolate_failure(items, exc)
            else:
                self._deliver(items, results)
        finally:
            finished = self._clock()
            self._inflight -= 1
            self._observe(items, started, finished, backlogged)
            self._wakeup.set()

    async def _isolate_failure(self, items: list[_Item], exc: Exception) -> None:
        """A failed batch is re-run request by request, so one bad request fails only itself."""
        groups: dict[int, list[_Item]] = {}
        for item in items:
            groups.setdefault(id(item.request), []).append(item)
        if len(groups) == 1:
            self._fail(items, exc)
            return
        for group in groups.values():
            if group[0].request.future.done():
                continue
            try:
                results = await self._compute(group)
            except Exception as group_exc:
                self._fail(group, group_exc)
            else:
                self._deliver(group, results)

    def _fail(self, items: list[_Item], exc: Exception) -> None:
        request = items[0].request
        log.warning("model %s failed a batch: %r", self.model, exc, exc_info=exc)
        if not request.future.done():
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
        if compute_s > 0:
            rate = len(items) / compute_s
            self._rate = rate if self._rate == 0 else 0.8 * self._rate + 0.2 * rate
        if self._metrics:
            self._metrics.compute.observe(compute_s)
            for item in items:
                self._metrics.queue_wait.observe(started - item.enqueued_at)
        if self._adaptive is not None:
            self._adaptive.observe(
                [finished - item.enqueued_at for item in items], backlogged=backlogged
            )
