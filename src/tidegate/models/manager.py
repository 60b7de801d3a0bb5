"""The set of loaded models as a cache: async single-flight loads under a concurrency limit,
an LRU (or decayed-LFU) cache bounded by bytes and count with leases, dependencies, and
eager/predictive preloading.

Concurrency model: everything here runs on the event loop. Decisions (what to evict, whether a
load may start) are synchronous and change state before the next ``await``, so they need no
lock; the slow parts (loading in a thread, closing a model) happen after, outside any decision.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future as ThreadFuture
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from tidegate.config import Config, ModelConfig
from tidegate.errors import ModelNotFound, ModelUnavailable, RequestTimeout
from tidegate.metrics import CacheMetrics, Metrics
from tidegate.models.entry import Entry, ModelState
from tidegate.models.policy import EntryView, EvictionPolicy, hotter_than, plan_eviction
from tidegate.models.predictor import TransitionPredictor
from tidegate.models.served import ServedModel, served_model
from tidegate.runtimes import AnyRuntime, ModelHandle, create_runtime

__all__ = ["ModelManager", "ModelState", "RuntimeFactory", "ServedModel"]

log = logging.getLogger("tidegate.models")

RuntimeFactory = Callable[[ModelConfig, Path, Mapping[str, ModelHandle]], AnyRuntime]

_BACKOFF_BASE_S = 1.0
_BACKOFF_MAX_S = 60.0
_PAGE = os.sysconf("SC_PAGE_SIZE")


def _rss_bytes() -> int:
    with open("/proc/self/statm", "rb") as fh:
        return int(fh.read().split()[1]) * _PAGE


class _DependencyHandle:
    """Lets a python model call a loaded dependency from its worker thread."""

    def __init__(self, manager: ModelManager, model_id: str, loop: asyncio.AbstractEventLoop):
        self.id = model_id
        self._manager = manager
        self._loop = loop

    def embed(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        if _on_loop(self._loop):
            raise RuntimeError("ModelHandle.embed must be called from a worker thread")
        future: ThreadFuture[Any] = asyncio.run_coroutine_threadsafe(
            self._embed(texts), self._loop
        )
        return np.stack(future.result())

    async def _embed(self, texts: Sequence[str]) -> list[npt.NDArray[np.float32]]:
        async with self._manager.lease(self.id) as served:
            return (await served.embedder().embed(texts)).vectors


def _close_abandoned(future: asyncio.Future[AnyRuntime]) -> None:
    if not future.cancelled() and future.exception() is None:
        future.result().close()


def _on_loop(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


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
        self._manager._release(self._entry)


class ModelManager:
    """Owns every configured model's lifecycle. Requests use :meth:`lease`."""

    def __init__(
        self,
        config: Config,
        metrics: Metrics,
        *,
        runtime_factory: RuntimeFactory = create_runtime,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._config = config
        self._cache = config.cache
        self._policy = EvictionPolicy(mode=config.cache.eviction,
                                      half_life=config.cache.frequency_half_life_s)
        self._metrics = metrics
        self._stats: CacheMetrics = metrics.cache
        self._factory = runtime_factory
        self._clock = clock
        self._cache_dir = config.server.resolved_cache_dir()
        self._entries = {m.id: Entry(config=m, created=int(time.time())) for m in config.models}
        self._stats.describe = self.describe
        self._tasks: set[asyncio.Task[Any]] = set()
        self._load_slots = asyncio.Semaphore(self._cache.max_concurrent_loads)
        self._loading_now = 0
        self._changed = asyncio.Event()
        self._ready = asyncio.Event()
        self._predictor = TransitionPredictor()
        self._has_predictive = any(m.preload == "predictive" for m in config.models)
        self._waiters = 0
        self._closed = False

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Begin eager preloading in the background; returns at once (see :meth:`wait_ready`)."""
        self._spawn(self._preload_eager(), name="preload")

    async def wait_ready(self) -> None:
        await self._ready.wait()

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    async def aclose(self) -> None:
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        # Dependents before their dependencies.
        for entry in sorted(self._entries.values(), key=self._depth, reverse=True):
            if entry.served is not None:
                served, entry.served = entry.served, None
                entry.state = ModelState.UNLOADED
                await served.aclose()

    def _depth(self, entry: Entry) -> int:
        deps = entry.config.depends_on
        return 1 + max((self._depth(self._entries[d]) for d in deps), default=0)

    def _spawn(self, coro: Any, *, name: str) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def _wait_for_change(self, timeout_s: float) -> None:
        """Wait until a lease ends or a model loads or unloads (or ``timeout_s`` passes)."""
        changed = self._changed
        self._waiters += 1
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout_s):
                    await changed.wait()
        finally:
            self._waiters -= 1

    # -- requests ------------------------------------------------------------------------------

    def _entry(self, model_id: str) -> Entry:
        entry = self._entries.get(model_id)
        if entry is None:
            raise ModelNotFound(model_id, available=sorted(self._entries))
        return entry

    def lease(self, model_id: str) -> _Lease:
        """``async with manager.lease(id) as served``: hold the model loaded (loading it if
        needed) for the duration of the block. Raises ModelNotFound at once for an unknown id."""
        return _Lease(self, self._entry(model_id))

    async def _acquire(self, entry: Entry) -> ServedModel:
        if entry.state is ModelState.LOADED:
            self._stats.hits += 1
        else:
            self._stats.misses += 1
        # Counted as a lease while waiting, so the load we wait for is not evicted to make room
        # for another before we get to use it.
        entry.leases += 1
        try:
            served = await self._ensure_loaded(entry)
        except BaseException:
            self._release(entry)
            raise
        entry.requested(self._clock(), half_life=self._policy.half_life)
        if entry.preloaded:
            entry.preloaded = False
            self._stats.preload_hits += 1
        self._predictor.observe(entry.config.id)
        if self._has_predictive:
            self._maybe_preload_next()
        return served

    def _release(self, entry: Entry) -> None:
        entry.leases -= 1
        entry.touch(self._clock())
        if self._waiters:
            self._notify()

    # -- loading -------------------------------------------------------------------------------

    async def _ensure_loaded(self, entry: Entry, *, reason: str = "request") -> ServedModel:
        if entry.state is ModelState.LOADED and entry.served is not None:
            return entry.served
        if entry.state is ModelState.FAILED and self._clock() < entry.retry_at:
            raise ModelUnavailable(
                entry.config.id, f"load failed: {entry.error}",
                retry_after_s=max(1, math.ceil(entry.retry_at - self._clock())),
            )
        if entry.state is not ModelState.LOADING or entry.load_future is None:
            entry.state = ModelState.LOADING
            entry.load_future = asyncio.get_running_loop().create_future()
            entry.load_future.add_done_callback(lambda f: f.cancelled() or f.exception())
            self._spawn(self._load(entry, reason), name=f"load:{entry.config.id}")
        return await asyncio.shield(entry.load_future)

    def _resident(self, exclude: str | None = None) -> list[EntryView]:
        return [e.view() for e in self._entries.values() if e.resident and e.config.id != exclude]

    def _estimate(self, entry: Entry) -> int:
        return entry.measured_bytes or entry.config.memory_bytes or 0

    async def _make_room(self, entry: Entry, deadline: float) -> None:
        """Evict models (in policy order) until ``entry`` fits; wait for leases to end if none
        can go yet."""
        need = self._estimate(entry)
        protect = self._dependency_closure(entry.config.id)
        while True:
            plan = plan_eviction(
                self._resident(exclude=entry.config.id), need_bytes=need,
                max_bytes=self._cache.max_memory_bytes, max_models=self._cache.max_loaded_models,
                now=self._clock(), protect=protect, policy=self._policy,
            )
            if plan.fits:
                entry.reserved_bytes = need  # counted as resident until measured
                entry.resident = True
                await self._evict([self._entries[v] for v in plan.victims],
                                  reason=self._policy.mode)
                return
            remaining = deadline - self._clock()
            if remaining <= 0:
                raise ModelUnavailable(
                    entry.config.id,
                    f"no room to load it ({need} bytes needed; "
                    f"budget {self._cache.max_memory_bytes} bytes, "
                    f"{self._cache.max_loaded_models} models); held by: "
                    + "; ".join(plan.holders),
                )
            await self._wait_for_change(min(remaining, 1.0))

    def _loop_deadline(self, deadline: float) -> float:
        """``deadline`` on this manager's clock, as event-loop time."""
        return asyncio.get_running_loop().time() + (deadline - self._clock())

    def _dependency_closure(self, model_id: str) -> set[str]:
        closure: set[str] = set()
        stack = [model_id]
        while stack:
            for dep in self._entries[stack.pop()].config.depends_on:
                if dep not in closure:
                    closure.add(dep)
                    stack.append(dep)
        return closure

    async def _load(self, entry: Entry, reason: str) -> None:
        model_id = entry.config.id
        assert entry.load_future is not None
        future = entry.load_future
        started = time.perf_counter()
        deadline = self._clock() + self._cache.load_timeout_s
        try:
            async with asyncio.timeout_at(self._loop_deadline(deadline)):
                deps = entry.config.depends_on
                await asyncio.gather(*(self._ensure_loaded(self._entries[d], reason="dependency")
                                       for d in deps))
            try:
                await self._make_room(entry, deadline)  # at the deadline: 503 naming holders
            except ModelUnavailable as no_room:
                # Not the model's fault: no failure backoff, the next request tries again.
                entry.unloaded()
                future.set_exception(no_room)
                self._notify()
                return
            async with asyncio.timeout_at(self._loop_deadline(deadline)):
                runtime, measured = await self._run_factory(entry)
            served = served_model(entry.config, runtime, self._metrics)
            await served.start()
        except Exception as exc:
            timed_out = isinstance(exc, TimeoutError)
            detail = (f"load timed out after {self._cache.load_timeout_s:g}s" if timed_out
                      else getattr(exc, "reason", None) or f"{type(exc).__name__}: {exc}")
            self._fail(entry, detail, exc)
            future.set_exception(ModelUnavailable(model_id, f"load failed: {detail}"))
            return
        except asyncio.CancelledError:
            self._fail(entry, "cancelled (shutting down)", None)
            future.cancel()
            raise
        seconds = time.perf_counter() - started
        entry.loaded(served, measured=max(measured, runtime.memory_bytes), seconds=seconds,
                     preloaded=reason == "predictive", now=self._clock())
        self._stats.loads[reason] = self._stats.loads.get(reason, 0) + 1
        self._stats.load_seconds.observe(seconds)
        log.info("model %s loaded in %.2fs (%s, %.1f MiB)", model_id, seconds, reason,
                 entry.measured_bytes / 2**20)
        future.set_result(served)
        self._notify()
        await self._enforce_budget(protect={model_id, *self._dependency_closure(model_id)})

    async def _run_factory(self, entry: Entry) -> tuple[AnyRuntime, int]:
        loop = asyncio.get_running_loop()
        handles = {d: _DependencyHandle(self, d, loop) for d in entry.config.depends_on}
        async with self._load_slots:
            solo = self._loading_now == 0
            self._loading_now += 1
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
                self._loading_now -= 1
            # RSS growth is attributable to this model only when nothing else was loading.
            measured = max(0, _rss_bytes() - before) if solo else 0
        return runtime, measured

    def _fail(self, entry: Entry, detail: str, exc: BaseException | None) -> None:
        entry.failures += 1
        backoff = min(_BACKOFF_MAX_S, _BACKOFF_BASE_S * 2 ** (entry.failures - 1))
        entry.failed(detail, retry_at=self._clock() + backoff)
        self._stats.load_failures += 1
        log.error("model %s failed to load: %s (retry allowed in %.0fs)",
                  entry.config.id, detail, backoff, exc_info=exc)
        self._notify()

    # -- eviction ------------------------------------------------------------------------------

    async def _evict(self, victims: Sequence[Entry], *, reason: str) -> None:
        closing = []
        for entry in victims:  # state changes first, synchronously, then the slow closes
            if entry.preloaded:
                self._stats.preload_wasted += 1
            self._stats.evictions[reason] = self._stats.evictions.get(reason, 0) + 1
            log.info("evicting model %s (%s; %.1f MiB, idle %.1fs)", entry.config.id, reason,
                     entry.measured_bytes / 2**20, self._clock() - entry.last_used)
            served = entry.unloaded()
            if served is not None:
                closing.append(served)
        for served in closing:
            await served.aclose()
        if victims:
            self._notify()

    async def _enforce_budget(self, protect: set[str]) -> None:
        """After a load measured more than estimated, evict (in policy order) until within
        budget."""
        plan = plan_eviction(
            self._resident(), need_bytes=0, max_bytes=self._cache.max_memory_bytes,
            max_models=None if self._cache.max_loaded_models is None
            else self._cache.max_loaded_models + 1,
            now=self._clock(), protect=protect, policy=self._policy,
        )
        if plan.victims:
            await self._evict([self._entries[v] for v in plan.victims], reason="budget")
        elif not plan.fits:
            log.warning("over the memory budget and nothing can be evicted: %s",
                        "; ".join(plan.holders))

    # -- preloading ----------------------------------------------------------------------------

    async def _preload_eager(self) -> None:
        eager = sorted((e for e in self._entries.values() if e.config.preload == "eager"),
                       key=lambda e: -e.config.priority)
        for index, entry in enumerate(eager, start=1):
            plan = plan_eviction(
                self._resident(), need_bytes=self._estimate(entry),
                max_bytes=self._cache.max_memory_bytes, max_models=self._cache.max_loaded_models,
                now=self._clock(), policy=self._policy,
            )
            if entry.state is not ModelState.LOADED and (not plan.fits or plan.victims):
                entry.skipped = "does not fit the memory budget next to higher-priority models"
                log.warning("[%d/%d] not preloading %s: %s", index, len(eager),
                            entry.config.id, entry.skipped)
                continue
            log.info("[%d/%d] preloading %s (priority %d)", index, len(eager),
                     entry.config.id, entry.config.priority)
            with contextlib.suppress(ModelUnavailable):
                await self._ensure_loaded(entry, reason="eager")
        log.info("preloading done: %s", ", ".join(
            f"{e.config.id}={e.state.value}" for e in eager) or "no eager models")
        if all(e.state is ModelState.LOADED or e.skipped for e in eager):
            self._ready.set()

    def _maybe_preload_next(self) -> None:
        """Preload the likely next model if a load slot is idle and there is free room."""
        if self._closed or self._loading_now or any(
            e.state is ModelState.LOADING for e in self._entries.values()
        ):
            return
        for model_id, probability in self._predictor.predict(k=2):
            entry = self._entries[model_id]
            if (probability < self._cache.predictive_threshold
                    or entry.config.preload != "predictive"
                    or entry.state in (ModelState.LOADED, ModelState.LOADING)
                    or (entry.state is ModelState.FAILED and self._clock() < entry.retry_at)):
                continue
            resident = self._resident()
            plan = plan_eviction(
                resident, need_bytes=self._estimate(entry),
                max_bytes=self._cache.max_memory_bytes, max_models=self._cache.max_loaded_models,
                now=self._clock(),
                # Only models less likely to be next than the candidate may make room for it.
                protect=hotter_than(resident, self._predictor.probability, probability)
                | {self._predictor.last or ""},
                policy=self._policy,
            )
            if plan.fits:
                self._stats.preloads += 1
                log.info("predictive preload of %s (p=%.2f after %s)", model_id, probability,
                         self._predictor.last)
                self._spawn(self._preload(entry, plan.victims), name=f"preload:{model_id}")
                return

    async def _preload(self, entry: Entry, victims: list[str]) -> None:
        await self._evict([self._entries[v] for v in victims if self._entries[v].resident
                           and not self._entries[v].leases], reason="predictive")
        with contextlib.suppress(ModelUnavailable):
            await self._ensure_loaded(entry, reason="predictive")

    # -- admin ---------------------------------------------------------------------------------

    async def load(self, model_id: str) -> dict[str, object]:
        entry = self._entry(model_id)
        entry.skipped = None
        await self._ensure_loaded(entry, reason="admin")
        return self._card(entry)

    async def unload(self, model_id: str) -> dict[str, object]:
        """Unload once in-flight requests finish (and dependents first refuse: 409-like)."""
        entry = self._entry(model_id)
        dependents = [e.config.id for e in self._entries.values()
                      if model_id in e.config.depends_on and e.resident]
        if dependents:
            raise ModelUnavailable(model_id, f"loaded models depend on it: {', '.join(dependents)}")
        deadline = self._clock() + self._cache.load_timeout_s
        while entry.leases or entry.state is ModelState.LOADING:
            if self._clock() >= deadline:
                raise RequestTimeout(model=model_id, timeout_s=self._cache.load_timeout_s)
            await self._wait_for_change(1.0)
        if entry.state is ModelState.LOADED:
            await self._evict([entry], reason="admin")
        return self._card(entry)

    # -- description ---------------------------------------------------------------------------

    def describe(self) -> list[dict[str, object]]:
        """OpenAI model objects, with tidegate's status fields added."""
        return [self._card(entry) for entry in self._entries.values()]

    def describe_one(self, model_id: str) -> dict[str, object]:
        return self._card(self._entry(model_id))

    def _card(self, entry: Entry) -> dict[str, object]:
        return entry.card(now=self._clock())
