"""The configured models as a cache bounded by bytes and count: entries, leases, and choosing
and evicting victims (LRU or decayed LFU, :mod:`tidegate.models.policy`).

Everything here runs on the event loop. Decisions (which victims, whether a load fits) are
synchronous and change state before the next ``await``, so they need no lock; closing a
victim happens after, outside the decision.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Collection, Sequence

from tidegate.clock import Clock
from tidegate.config import CacheConfig, ModelConfig
from tidegate.errors import ModelNotFound, ModelUnavailable
from tidegate.heap import HeapFreezer
from tidegate.metrics import CacheMetrics
from tidegate.models.entry import Entry, ModelSnapshot
from tidegate.models.policy import EntryView, EvictionPlan, EvictionPolicy, plan_eviction
from tidegate.models.served import ServedModel

__all__ = ["ModelCache"]

log = logging.getLogger("tidegate.models")


class ModelCache:
    """Every configured model's :class:`Entry`, and the room they take."""

    def __init__(self, models: Sequence[ModelConfig], config: CacheConfig, stats: CacheMetrics,
                 clock: Clock, *, heap: HeapFreezer | None = None) -> None:
        self.config = config
        self._heap = heap
        self.policy = EvictionPolicy(mode=config.eviction, half_life=config.frequency_half_life_s)
        self.stats = stats
        self.clock = clock
        created = int(clock.wall())
        self.entries = {m.id: Entry(config=m, created=created) for m in models}
        self._changed = asyncio.Event()
        self._waiters = 0

    def entry(self, model_id: str) -> Entry:
        entry = self.entries.get(model_id)
        if entry is None:
            raise ModelNotFound(model_id, available=sorted(self.entries))
        return entry

    def snapshots(self) -> list[ModelSnapshot]:
        return [entry.snapshot() for entry in self.entries.values()]

    # -- change notification -------------------------------------------------------------------

    def notify(self) -> None:
        """A lease ended, or a model loaded, failed or unloaded."""
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait_for_change(self, timeout_s: float) -> None:
        """Wait until the next :meth:`notify` (or until ``timeout_s`` passes)."""
        changed = self._changed
        self._waiters += 1
        try:
            with contextlib.suppress(TimeoutError):
                await self.clock.wait_for(changed.wait(), timeout_s)
        finally:
            self._waiters -= 1

    # -- leases --------------------------------------------------------------------------------

    def requested(self, entry: Entry) -> None:
        """A request got the model: count it (for ``lfu``) and mark it used."""
        entry.requested(self.clock.now(), self.clock.wall(), half_life=self.policy.half_life)

    def release(self, entry: Entry) -> None:
        entry.leases -= 1
        entry.touch(self.clock.now(), self.clock.wall())
        if self._waiters:
            self.notify()

    # -- room ----------------------------------------------------------------------------------

    def resident(self, exclude: str | None = None) -> list[EntryView]:
        return [e.view() for e in self.entries.values() if e.resident and e.config.id != exclude]

    @staticmethod
    def estimate(entry: Entry) -> int:
        return entry.measured_bytes or entry.config.memory_bytes or 0

    def dependency_closure(self, model_id: str) -> set[str]:
        closure: set[str] = set()
        stack = [model_id]
        while stack:
            for dep in self.entries[stack.pop()].config.depends_on:
                if dep not in closure:
                    closure.add(dep)
                    stack.append(dep)
        return closure

    def depth(self, entry: Entry) -> int:
        """1 for a model without dependencies, else one more than its deepest dependency."""
        deps = entry.config.depends_on
        return 1 + max((self.depth(self.entries[d]) for d in deps), default=0)

    def plan(self, resident: Sequence[EntryView], *, need_bytes: int,
             protect: Collection[str] = ()) -> EvictionPlan:
        """What to evict so that ``need_bytes`` and one more model fit the budget."""
        return plan_eviction(
            resident, need_bytes=need_bytes, max_bytes=self.config.max_memory_bytes,
            max_models=self.config.max_loaded_models, now=self.clock.now(), protect=protect,
            policy=self.policy,
        )

    async def make_room(self, entry: Entry, deadline: float) -> None:
        """Evict models (in policy order) until ``entry`` fits; wait for leases to end if none
        can go yet. At ``deadline``: :class:`ModelUnavailable` naming what holds the room."""
        need = self.estimate(entry)
        protect = self.dependency_closure(entry.config.id)
        while True:
            plan = self.plan(self.resident(exclude=entry.config.id), need_bytes=need,
                             protect=protect)
            if plan.fits:
                entry.reserved_bytes = need  # counted as resident until measured
                entry.resident = True
                await self.evict([self.entries[v] for v in plan.victims],
                                 reason=self.policy.mode)
                return
            remaining = deadline - self.clock.now()
            if remaining <= 0:
                raise ModelUnavailable(
                    entry.config.id,
                    f"no room to load it ({need} bytes needed; "
                    f"budget {self.config.max_memory_bytes} bytes, "
                    f"{self.config.max_loaded_models} models); held by: "
                    + "; ".join(plan.holders),
                )
            await self.wait_for_change(min(remaining, 1.0))

    async def evict(self, victims: Sequence[Entry], *, reason: str) -> None:
        # State changes first, synchronously, then the slow closes.
        closing = [served for served in (self._unload(entry, reason) for entry in victims)
                   if served is not None]
        unloaded = bool(closing)
        while closing:  # popped, so no reference here outlives its close
            await closing.pop(0).aclose()
        if unloaded and self._heap is not None:
            self._heap.model_unloaded()
        if victims:
            self.notify()

    def _unload(self, entry: Entry, reason: str) -> ServedModel | None:
        if entry.preloaded:
            self.stats.preload_wasted += 1
        self.stats.evictions[reason] = self.stats.evictions.get(reason, 0) + 1
        log.info("evicting model %s (%s; %.1f MiB, idle %.1fs)", entry.config.id, reason,
                 entry.measured_bytes / 2**20, self.clock.now() - entry.last_used)
        return entry.unloaded()

    async def enforce_budget(self, protect: set[str]) -> None:
        """After a load measured more than estimated, evict (in policy order) until within
        budget."""
        max_models = self.config.max_loaded_models
        plan = plan_eviction(
            self.resident(), need_bytes=0, max_bytes=self.config.max_memory_bytes,
            max_models=None if max_models is None else max_models + 1,
            now=self.clock.now(), protect=protect, policy=self.policy,
        )
        if plan.victims:
            await self.evict([self.entries[v] for v in plan.victims], reason="budget")
        elif not plan.fits:
            log.warning("over the memory budget and nothing can be evicted: %s",
                        "; ".join(plan.holders))
