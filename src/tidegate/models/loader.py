"""Loading one model: single flight (one load however many requests wait for it), under a
concurrency limit and ``load_timeout_s``, in a thread; its memory measured; failures backed off.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import os
from collections.abc import Callable, Coroutine, Mapping, Sequence
from concurrent.futures import Future as ThreadFuture
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from tidegate.clock import Clock
from tidegate.config import ModelConfig
from tidegate.errors import ModelUnavailable
from tidegate.heap import HeapFreezer
from tidegate.metrics import Metrics
from tidegate.models.cache import ModelCache
from tidegate.models.entry import Entry, ModelState
from tidegate.models.served import ServedModel, served_model
from tidegate.runtimes import AnyRuntime, ModelHandle

__all__ = ["Lease", "Loader", "RuntimeFactory", "Spawn"]

log = logging.getLogger("tidegate.models")

RuntimeFactory = Callable[[ModelConfig, Path, Mapping[str, ModelHandle]], AnyRuntime]
Lease = Callable[[str], AbstractAsyncContextManager[ServedModel]]
"""``lease(model_id)``: hold a model loaded for a block (the manager's :meth:`lease`)."""
Spawn = Callable[[Coroutine[Any, Any, None], str], object]
"""``spawn(coroutine, name)``: run it as a task its owner cancels on shutdown."""

BACKOFF_BASE_S = 1.0
BACKOFF_MAX_S = 60.0
_PAGE = os.sysconf("SC_PAGE_SIZE")


def _rss_bytes() -> int:
    with open("/proc/self/statm", "rb") as fh:
        return int(fh.read().split()[1]) * _PAGE


class _DependencyHandle:
    """Lets a python model call a loaded dependency from its worker thread."""

    def __init__(self, lease: Lease, model_id: str, loop: asyncio.AbstractEventLoop):
        self.id = model_id
        self._lease = lease
        self._loop = loop

    def embed(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        if _on_loop(self._loop):
            raise RuntimeError("ModelHandle.embed must be called from a worker thread")
        future: ThreadFuture[Any] = asyncio.run_coroutine_threadsafe(
            self._embed(texts), self._loop
        )
        return np.stack(future.result())

    async def _embed(self, texts: Sequence[str]) -> list[npt.NDArray[np.float32]]:
        async with self._lease(self.id) as served:
            return (await served.embedder().embed(texts)).vectors


def _close_abandoned(future: asyncio.Future[AnyRuntime]) -> None:
    if not future.cancelled() and future.exception() is None:
        future.result().close()


def _on_loop(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


class Loader:
    """Turns an entry's configuration into a started :class:`ServedModel`, making room in the
    cache first. Every wait (``load_timeout_s``, backoff) is on the injected clock."""

    def __init__(self, cache: ModelCache, metrics: Metrics, *, factory: RuntimeFactory,
                 cache_dir: Path, lease: Lease, spawn: Spawn,
                 heap: HeapFreezer | None = None) -> None:
        self._cache = cache
        self._config = cache.config
        self._clock: Clock = cache.clock
        self._metrics = metrics
        self._factory = factory
        self._cache_dir = cache_dir
        self._lease = lease
        self._spawn = spawn
        self._heap = heap
        self._slots = asyncio.Semaphore(cache.config.max_concurrent_loads)
        self.loading_now = 0
        """Loads running in a thread now."""

    def backing_off(self, entry: Entry) -> bool:
        """Failed, and its retry backoff has not passed yet."""
        return entry.state is ModelState.FAILED and self._clock.now() < entry.retry_at

    async def ensure_loaded(self, entry: Entry, *, reason: str = "request") -> ServedModel:
        """The loaded model: at once if it is, else after its (single, shared) load."""
        if entry.state is ModelState.LOADED and entry.served is not None:
            return entry.served
        if self.backing_off(entry):
            raise ModelUnavailable(
                entry.config.id, f"load failed: {entry.error}",
                retry_after_s=max(1, math.ceil(entry.retry_at - self._clock.now())),
            )
        if entry.state is not ModelState.LOADING or entry.load_future is None:
            entry.state = ModelState.LOADING
            entry.load_future = asyncio.get_running_loop().create_future()
            entry.load_future.add_done_callback(lambda f: f.cancelled() or f.exception())
            self._spawn(self._load(entry, reason), f"load:{entry.config.id}")
        return await asyncio.shield(entry.load_future)

    async def _load(self, entry: Entry, reason: str) -> None:
        model_id = entry.config.id
        assert entry.load_future is not None
        future = entry.load_future
        started = self._clock.now()
        deadline = started + self._config.load_timeout_s
        try:
            async with self._clock.timeout_at(deadline):
                await asyncio.gather(*(
                    self.ensure_loaded(self._cache.entries[d], reason="dependency")
                    for d in entry.config.depends_on
                ))
            try:
                await self._cache.make_room(entry, deadline)  # at the deadline: 503 naming holders
            except ModelUnavailable as no_room:
                # Not the model's fault: no failure backoff, the next request tries again.
                entry.unloaded()
                future.set_exception(no_room)
                self._cache.notify()
                return
            async with self._clock.timeout_at(deadline):
                runtime, measured = await self._run_factory(entry)
            served = served_model(entry.config, runtime, self._metrics)
            served.on_lost = functools.partial(self._runtime_lost, entry)
            await served.start()
        except Exception as exc:
            timed_out = isinstance(exc, TimeoutError)
            detail = (f"load timed out after {self._config.load_timeout_s:g}s" if timed_out
                      else getattr(exc, "reason", None) or f"{type(exc).__name__}: {exc}")
            self._fail(entry, detail, exc)
            future.set_exception(ModelUnavailable(model_id, f"load failed: {detail}"))
            return
        except asyncio.CancelledError:
            self._fail(entry, "cancelled (shutting down)", None)
            future.cancel()
            raise
        seconds = self._clock.now() - started
        entry.loaded(served, measured=max(measured, runtime.memory_bytes), seconds=seconds,
                     preloaded=reason == "predictive", now=self._clock.now())
        stats = self._cache.stats
        stats.loads[reason] = stats.loads.get(reason, 0) + 1
        stats.load_seconds.observe(seconds)
        log.info("model %s loaded in %.2fs (%s, %.1f MiB)", model_id, seconds, reason,
                 entry.measured_bytes / 2**20)
        if self._heap is not None:
            self._heap.model_loaded()  # what the load imported, before its first request
        future.set_result(served)
        self._cache.notify()
        await self._cache.enforce_budget(
            protect={model_id, *self._cache.dependency_closure(model_id)})

    async def _run_factory(self, entry: Entry) -> tuple[AnyRuntime, int]:
        loop = asyncio.get_running_loop()
        handles = {d: _DependencyHandle(self._lease, d, loop) for d in entry.config.depends_on}
        async with self._slots:
            solo = self.loading_now == 0
            self.loading_now += 1
            before = _rss_bytes()
            work = loop.run_in_executor(
                None, self._factory, entry.config, self._cache_dir, handles
            )
            try:
                runtime = await asyncio.shield(work)
            except BaseException:
                # The thread cannot be stopped; close what it loads once it is done.
                work.add_done_callback(_close_abandoned)
                raise
            finally:
                self.loading_now -= 1
            # RSS growth is attributable to this model only when nothing else was loading.
            measured = max(0, _rss_bytes() - before) if solo else 0
        return runtime, measured

    def _runtime_lost(self, entry: Entry, reason: str) -> None:
        """A loaded model's runtime can compute nothing more: unload it and mark it failed, so
        requests get 503 with Retry-After and one after the backoff loads it again. (Its
        engine calls this once, before it stops; an unloaded model's engine has stopped.)"""
        if entry.state is not ModelState.LOADED:
            return
        self._spawn(self._unload_lost(entry, reason), f"lost:{entry.config.id}")

    async def _unload_lost(self, entry: Entry, reason: str) -> None:
        await self._cache.evict([entry], reason="lost")
        self._fail(entry, f"runtime lost: {reason}", None)

    def _fail(self, entry: Entry, detail: str, exc: BaseException | None) -> None:
        entry.failures += 1
        backoff = min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2 ** (entry.failures - 1))
        entry.failed(detail, retry_at=self._clock.now() + backoff)
        self._cache.stats.load_failures += 1
        log.error("model %s failed: %s (a load is allowed again in %.0fs)",
                  entry.config.id, detail, backoff, exc_info=exc)
        self._cache.notify()
