"""Replica health: passive checks (failures of real requests) and active ones (a periodic GET).

Either kind ejects a replica; ``healthy_after`` consecutive passing checks re-admit it. With
active checks off, a passive ejection ends by itself after ``ejection_s``. State transitions are
plain synchronous methods of :class:`ReplicaHealth`, given the time; :class:`HealthMonitor` owns
the state of every replica, the checking task and its HTTP client.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import aiohttp

from tidegate.upstream.config import HealthConfig
from tidegate.upstream.pool import TRANSPORT_ERRORS, describe_error
from tidegate.upstream.stats import HealthStatistics

__all__ = ["HealthMonitor", "HealthStatistics", "ReplicaHealth"]

log = logging.getLogger("tidegate.upstream")

Ejector = Literal["active", "passive"]


class ReplicaHealth:
    """The health of one replica, changed only by the methods below."""

    __slots__ = (
        "check_failures", "check_passes", "checks", "ejected_at", "ejected_by", "ejections",
        "failures", "last_check_at", "last_error", "url",
    )

    def __init__(self, url: str) -> None:
        self.url = url
        self.ejected_by: Ejector | None = None
        self.ejected_at: float | None = None
        self.failures = 0  # consecutive failed requests
        self.check_failures = 0  # consecutive failed checks
        self.check_passes = 0  # consecutive passing checks
        self.checks = 0
        self.ejections = 0
        self.last_error: str | None = None
        self.last_check_at: float | None = None

    @property
    def healthy(self) -> bool:
        return self.ejected_by is None

    def _eject(self, by: Ejector, now: float) -> None:
        if self.ejected_by is None:
            self.ejections += 1
            self.ejected_at = now
            log.warning("upstream replica %s ejected (%s): %s", self.url, by, self.last_error)
        self.ejected_by = by

    def _admit(self) -> None:
        if self.ejected_by is not None:
            log.warning("upstream replica %s re-admitted", self.url)
        self.ejected_by = None
        self.ejected_at = None
        self.failures = 0

    def record_success(self) -> None:
        """A real request succeeded. It does not re-admit: only checks (or time) do."""
        self.failures = 0

    def record_failure(self, detail: str, now: float, *, eject_after: int) -> None:
        self.failures += 1
        self.last_error = detail
        if eject_after and self.failures >= eject_after:
            self._eject("passive", now)

    def record_check(self, passed: bool, detail: str | None, now: float, *,
                     unhealthy_after: int, healthy_after: int) -> None:
        self.checks += 1
        self.last_check_at = now
        if passed:
            self.check_failures = 0
            self.check_passes += 1
            if not self.healthy and self.check_passes >= healthy_after:
                self._admit()
            return
        self.check_passes = 0
        self.check_failures += 1
        self.last_error = detail
        if self.check_failures >= unhealthy_after:
            self._eject("active", now)

    def expire_passive_ejection(self, now: float, ejection_s: float) -> None:
        if (self.ejected_by == "passive" and self.ejected_at is not None
                and now - self.ejected_at >= ejection_s):
            self._admit()

    def describe(self, now: float) -> dict[str, Any]:
        return {
            "url": self.url,
            "status": "healthy" if self.healthy else "ejected",
            "ejected_by": self.ejected_by,
            "ejected_for_s": None if self.ejected_at is None else round(now - self.ejected_at, 3),
            "consecutive_failures": self.failures,
            "last_error": self.last_error,
        }


class HealthMonitor:
    """Health of every replica of one upstream model, and the task that checks them.

    ``start()`` runs a first round of checks at once, then one every ``interval_s``;
    ``aclose()`` stops the task and closes the checks' HTTP client.
    """

    def __init__(
        self, replicas: Sequence[str], config: HealthConfig, *,
        headers: Mapping[str, str] | None = None, clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._config = config
        self._clock = clock
        self.replicas = [ReplicaHealth(url) for url in replicas]
        self._headers = dict(headers or {})
        # A session of its own (made in start(): aiohttp binds it to the running loop): a
        # replica whose request pool is saturated is busy, not sick, so its checks must not
        # queue behind its requests.
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None
        self._rounds = 0

    @property
    def active(self) -> bool:
        return self._config.path is not None

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        if self.active and self._task is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=len(self.replicas), keepalive_timeout=30.0),
                timeout=aiohttp.ClientTimeout(total=self._config.timeout_s),
                headers=self._headers,
                trust_env=False,
            )
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name="tidegate.upstream.health"
            )

    async def aclose(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    raise
        session, self._session = self._session, None
        if session is not None:
            await asyncio.shield(session.close())

    async def _run(self) -> None:
        while True:
            try:
                await self.check_now()
            except Exception:  # a bug in a check must not end health checking for good
                log.exception("upstream health check round failed")
            await asyncio.sleep(self._config.interval_s)

    # -- checks --------------------------------------------------------------------------------

    async def check_now(self) -> None:
        """Run one round of active checks, all replicas concurrently."""
        path = self._config.path
        if path is None:
            return
        results = await asyncio.gather(*(self._probe(r.url + path) for r in self.replicas))
        now = self._clock()
        for replica, (passed, detail) in zip(self.replicas, results, strict=True):
            replica.record_check(
                passed, detail, now, unhealthy_after=self._config.unhealthy_after,
                healthy_after=self._config.healthy_after,
            )
        self._rounds += 1

    async def _probe(self, url: str) -> tuple[bool, str | None]:
        if self._session is None:
            raise RuntimeError("HealthMonitor.start() was not awaited")
        try:
            async with self._session.get(url, allow_redirects=False) as response:
                status = response.status
                await response.read()
        except TRANSPORT_ERRORS as exc:
            return False, f"health check GET {url} failed: {describe_error(exc)}"
        if 200 <= status < 300:
            return True, None
        return False, f"health check GET {url} answered {status}"

    # -- passive -------------------------------------------------------------------------------

    def record_success(self, index: int) -> None:
        self.replicas[index].record_success()

    def record_failure(self, index: int, detail: str) -> None:
        self.replicas[index].record_failure(
            detail, self._clock(), eject_after=self._config.eject_after_failures
        )

    def healthy(self) -> list[bool]:
        """Which replicas may take requests now."""
        if not self.active:
            now = self._clock()
            for replica in self.replicas:
                replica.expire_passive_ejection(now, self._config.ejection_s)
        return [replica.healthy for replica in self.replicas]

    def describe(self) -> list[dict[str, Any]]:
        self.healthy()
        now = self._clock()
        return [replica.describe(now) for replica in self.replicas]

    def statistics(self) -> HealthStatistics:
        return HealthStatistics(
            rounds=self._rounds,
            healthy=tuple(self.healthy()),
            ejections=tuple(r.ejections for r in self.replicas),
        )
