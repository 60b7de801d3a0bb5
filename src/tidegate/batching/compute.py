"""How a batch is computed: the batcher awaits one callable, ``Compute``, and these adapters
make one from what each kind of runtime offers.

* :func:`in_executor`: a synchronous ``run_batch`` in the model's worker threads (the default).
* :func:`on_loop`: a synchronous ``run_batch`` that costs microseconds (the echo runtime's), run
  at once on the event loop; the future it returns is already done, so the batcher delivers
  the results in the same event-loop step, as if it had called ``run_batch`` itself.
* A remote model's ``run_batch_async`` is a ``Compute`` already (a coroutine on the loop).

Each costs one future per batch, and no coroutine frame: the embedding path is hot.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator, Sequence
from concurrent.futures import Executor
from typing import Any, Protocol, TypeVar

__all__ = ["BatchResults", "Compute", "RunBatch", "in_executor", "on_loop"]

R = TypeVar("R")
R_co = TypeVar("R_co", covariant=True)


class BatchResults(Protocol[R_co]):
    """What computing a batch gives: one result per payload (a list, or an array's rows)."""

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[R_co]: ...


RunBatch = Callable[[Sequence[Any]], BatchResults[R]]
"""A synchronous batch computation: the payloads of one batch in, one result each out."""
Compute = Callable[[Sequence[Any]], Awaitable[BatchResults[R]]]
"""What the batcher awaits for each batch."""


def in_executor(run_batch: RunBatch[R], executor: Executor | None = None) -> Compute[R]:
    """Run ``run_batch`` in ``executor`` (``None``: the loop's default executor)."""

    def compute(payloads: Sequence[Any]) -> asyncio.Future[BatchResults[R]]:
        return asyncio.get_running_loop().run_in_executor(executor, run_batch, payloads)

    return compute


def on_loop(run_batch: RunBatch[R]) -> Compute[R]:
    """Run ``run_batch`` right away on the event loop: only for batches that take microseconds."""

    def compute(payloads: Sequence[Any]) -> asyncio.Future[BatchResults[R]]:
        future: asyncio.Future[BatchResults[R]] = asyncio.get_running_loop().create_future()
        try:
            future.set_result(run_batch(payloads))
        except Exception as exc:
            future.set_exception(exc)
        return future

    return compute
