"""Loading models before requests ask for them: ``eager`` ones at start (which decides
readiness), ``predictive`` ones when the request sequence says they are likely next."""

from __future__ import annotations

import contextlib
import logging

from tidegate.errors import ModelUnavailable
from tidegate.models.cache import ModelCache
from tidegate.models.entry import Entry, ModelState
from tidegate.models.loader import Loader, Spawn
from tidegate.models.policy import hotter_than
from tidegate.models.predictor import TransitionPredictor

__all__ = ["Preloader"]

log = logging.getLogger("tidegate.models")


class Preloader:
    def __init__(self, cache: ModelCache, loader: Loader, *, spawn: Spawn) -> None:
        self._cache = cache
        self._loader = loader
        self._spawn = spawn
        self._predictor = TransitionPredictor()
        self._eager = sorted(
            (e for e in cache.entries.values() if e.config.preload == "eager"),
            key=lambda e: -e.config.priority,
        )
        self._has_predictive = any(
            e.config.preload == "predictive" for e in cache.entries.values()
        )
        self._skipped: set[str] = set()
        """Eager models the start-up pass skipped (kept: an admin load clears ``skipped``)."""
        self.closed = False

    @property
    def ready(self) -> bool:
        """Every eager model has loaded at least once since start (or was skipped for want of
        room) and none is failed now. One evicted since does not count against it."""
        return all((e.ever_loaded or e.config.id in self._skipped)
                   and e.state is not ModelState.FAILED for e in self._eager)

    async def preload_eager(self) -> None:
        """Load the eager models in priority order, skipping those that do not fit."""
        eager = self._eager
        for index, entry in enumerate(eager, start=1):
            plan = self._cache.plan(self._cache.resident(),
                                    need_bytes=self._cache.estimate(entry))
            if entry.state is not ModelState.LOADED and (not plan.fits or plan.victims):
                entry.skipped = "does not fit the memory budget next to higher-priority models"
                self._skipped.add(entry.config.id)
                log.warning("[%d/%d] not preloading %s: %s", index, len(eager),
                            entry.config.id, entry.skipped)
                continue
            log.info("[%d/%d] preloading %s (priority %d)", index, len(eager),
                     entry.config.id, entry.config.priority)
            with contextlib.suppress(ModelUnavailable):
                await self._loader.ensure_loaded(entry, reason="eager")
        log.info("preloading done: %s", ", ".join(
            f"{e.config.id}={e.state.value}" for e in eager) or "no eager models")
        self._cache.notify()  # skipped models count as settled for readiness

    def observe(self, entry: Entry) -> None:
        """A request got ``entry``: learn the transition, maybe preload the likely next."""
        self._predictor.observe(entry.config.id)
        if self._has_predictive:
            self._maybe_preload_next()

    def _maybe_preload_next(self) -> None:
        """Preload the likely next model if a load slot is idle and there is free room."""
        entries = self._cache.entries
        if self.closed or self._loader.loading_now or any(
            e.state is ModelState.LOADING for e in entries.values()
        ):
            return
        for model_id, probability in self._predictor.predict(k=2):
            entry = entries[model_id]
            if (probability < self._cache.config.predictive_threshold
                    or entry.config.preload != "predictive"
                    or entry.state in (ModelState.LOADED, ModelState.LOADING)
                    or self._loader.backing_off(entry)):
                continue
            resident = self._cache.resident()
            plan = self._cache.plan(
                resident, need_bytes=self._cache.estimate(entry),
                # Only models less likely to be next than the candidate may make room for it.
                protect=hotter_than(resident, self._predictor.probability, probability)
                | {self._predictor.last or ""},
            )
            if plan.fits:
                self._cache.stats.preloads += 1
                log.info("predictive preload of %s (p=%.2f after %s)", model_id, probability,
                         self._predictor.last)
                self._spawn(self._preload(entry, plan.victims), f"preload:{model_id}")
                return

    async def _preload(self, entry: Entry, victims: list[str]) -> None:
        entries = self._cache.entries
        await self._cache.evict([entries[v] for v in victims
                                 if entries[v].resident and not entries[v].leases],
                                reason="predictive")
        with contextlib.suppress(ModelUnavailable):
            await self._loader.ensure_loaded(entry, reason="predictive")
