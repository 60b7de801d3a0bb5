"""The hub: a small Ray actor (this class, made remote by :mod:`~tidegate.cluster.deploy`)
where every replica reports, every :data:`REPORT_INTERVAL_S`, its model's card and its metrics.
The ingress reads it to answer ``/metrics``, ``/v1/models`` and readiness without calling a
replica (which would wake a model scaled to zero). A replica that stops reporting (its node
died, it was scaled down) drops out after :data:`STALE_AFTER_S`."""

from __future__ import annotations

from tidegate.clock import Clock, MonotonicClock
from tidegate.cluster.wire import ReplicaReport

__all__ = ["HUB_NAMESPACE", "REPORT_INTERVAL_S", "STALE_AFTER_S", "MetricsHub", "hub_name"]

REPORT_INTERVAL_S = 1.0
STALE_AFTER_S = 5.0
HUB_NAMESPACE = "tidegate"


def hub_name(application: str) -> str:
    return f"{application}-hub"


class MetricsHub:
    """Reports by replica id, each with the hub's own receive time (so nodes' clocks never
    matter)."""

    def __init__(self, clock: Clock | None = None) -> None:
        self._clock = clock or MonotonicClock()
        self._reports: dict[str, tuple[float, ReplicaReport]] = {}

    def report(self, report: ReplicaReport) -> None:
        self._reports[report.replica] = (self._clock.now(), report)

    def leave(self, replica: str) -> None:
        self._reports.pop(replica, None)

    def reports(self, max_age_s: float = STALE_AFTER_S) -> list[ReplicaReport]:
        """The fresh reports, oldest replica first; stale ones are forgotten."""
        now = self._clock.now()
        for replica in [r for r, (at, _) in self._reports.items() if now - at > max_age_s]:
            del self._reports[replica]
        return [report for _, report in self._reports.values()]
