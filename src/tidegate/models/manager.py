"""The model manager: what the API uses of the model cache. Requests take leases, admins load
and unload, the health check reads readiness, everyone reads snapshots.

It wires three parts, each with its own reason to change: :class:`~tidegate.models.cache.
ModelCache` (entries, room, eviction), :class:`~tidegate.models.loader.Loader` (single-flight
loads, timeouts, backoff, memory measurement) and :class:`~tidegate.models.preloader.Preloader`
(eager and predictive preloading, readiness). All of them tell and wait for time on one injected
:class:`~tidegate.clock.Clock`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

from tidegate.clock import Clock, MonotonicClock
from tidegate.config import Config
from tidegate.errors import ModelUnavailable, RequestTimeout
from tidegate.heap import HeapFreezer
from tidegate.metrics import Metrics
from tidegate.models.cache import ModelCache
from tidegate.models.entry import Entry, ModelSnapshot, ModelState
from tidegate.models.loader import Loader, RuntimeFactory
from tidegate.models.preloader import Preloader
from tidegate.models.served import ServedModel
from tidegate.runtimes import create_runtime

__all__ = ["ModelManager", "ModelSnapshot", "ModelState", "RuntimeFactory", "ServedModel"]


class _Lease:
    """The async context manager :meth:`ModelManager.lease` returns (a class, not a generator:
    this is on every request's path)."""

    __slots__ = ("_entry", "_manager")

    def __init__(self, manager: ModelManager, entry: Entry) -> None:
        self._manager = manager
        self._entry = entry

    async def __aenter__(self) -> ServedModel:
        return await self._manager._acquire(self._entry)

    async def __aexit__(self, *exc_info: object) -> None:
        self._manager._cache.release(self._entry)


class ModelManager:
    """Owns every configured model's lifecycle. Requests use :meth:`lease`."""

    def __init__(
        self,
        config: Config,
        metrics: Metrics,
        *,
        runtime_factory: RuntimeFactory = create_runtime,
        clock: Clock | None = None,
        heap: HeapFreezer | None = None,
    ) -> None:
        self._clock = clock or MonotonicClock()
        self._cache = ModelCache(config.models, config.cache, metrics.cache, self._clock,
                                 heap=heap)
        self._stats = metrics.cache
        self._stats.models = self.snapshots
        self._tasks: set[asyncio.Task[Any]] = set()
        self._loader = Loader(self._cache, metrics, factory=runtime_factory,
                              cache_dir=config.server.resolved_cache_dir(), lease=self.lease,
                              spawn=self._spawn, heap=heap)
        self._preloader = Preloader(self._cache, self._loader, spawn=self._spawn)

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Begin eager preloading in the background; returns at once (see :meth:`wait_ready`)."""
        self._spawn(self._preloader.preload_eager(), "preload")

    @property
    def ready(self) -> bool:
        """Every eager model has loaded at least once since start (or did not fit the budget)
        and none is failed now."""
        return self._preloader.ready

    async def wait_ready(self) -> None:
        while not self.ready:
            await self._cache.wait_for_change(60.0)

    async def aclose(self) -> None:
        self._preloader.closed = True
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        # Dependents before their dependencies.
        for entry in sorted(self._cache.entries.values(), key=self._cache.depth, reverse=True):
            if entry.served is not None:
                served, entry.served = entry.served, None
                entry.state = ModelState.UNLOADED
                await served.aclose()

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- requests ------------------------------------------------------------------------------

    def lease(self, model_id: str) -> _Lease:
        """``async with manager.lease(id) as served``: hold the model loaded (loading it if
        needed) for the duration of the block. Raises ModelNotFound at once for an unknown id."""
        return _Lease(self, self._cache.entry(model_id))

    async def _acquire(self, entry: Entry) -> ServedModel:
        if entry.state is ModelState.LOADED:
            self._stats.hits += 1
        else:
            self._stats.misses += 1
        # Counted as a lease while waiting, so the load we wait for is not evicted to make room
        # for another before we get to use it.
        entry.leases += 1
        try:
            served = await self._loader.ensure_loaded(entry)
        except BaseException:
            self._cache.release(entry)
            raise
        self._cache.requested(entry)
        if entry.preloaded:
            entry.preloaded = False
            self._stats.preload_hits += 1
        self._preloader.observe(entry)
        return served

    # -- admin ---------------------------------------------------------------------------------

    async def load(self, model_id: str) -> dict[str, object]:
        entry = self._cache.entry(model_id)
        entry.skipped = None
        await self._loader.ensure_loaded(entry, reason="admin")
        return entry.snapshot().model_object()

    async def unload(self, model_id: str) -> dict[str, object]:
        """Unload once in-flight requests finish (and dependents first refuse: 409-like)."""
        entry = self._cache.entry(model_id)
        dependents = [e.config.id for e in self._cache.entries.values()
                      if model_id in e.config.depends_on and e.resident]
        if dependents:
            raise ModelUnavailable(model_id, f"loaded models depend on it: {', '.join(dependents)}")
        timeout_s = self._cache.config.load_timeout_s
        deadline = self._clock.now() + timeout_s
        while entry.leases or entry.state is ModelState.LOADING:
            if self._clock.now() >= deadline:
                raise RequestTimeout(model=model_id, timeout_s=timeout_s)
            await self._cache.wait_for_change(min(1.0, deadline - self._clock.now()))
        if entry.state is ModelState.LOADED:
            await self._cache.evict([entry], reason="admin")
        return entry.snapshot().model_object()

    # -- description ---------------------------------------------------------------------------

    def snapshots(self) -> list[ModelSnapshot]:
        """Every configured model's state now, in configuration order."""
        return self._cache.snapshots()

    def snapshot(self, model_id: str) -> ModelSnapshot:
        return self._cache.entry(model_id).snapshot()

    def describe(self) -> list[dict[str, object]]:
        """OpenAI model objects, with tidegate's status fields added."""
        return [s.model_object() for s in self.snapshots()]

    def describe_one(self, model_id: str) -> dict[str, object]:
        return self.snapshot(model_id).model_object()
