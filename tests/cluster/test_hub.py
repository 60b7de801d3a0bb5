"""The metrics hub on a fake clock: a replica's report is served while fresh and forgotten once
it is older than STALE_AFTER_S (its node died, it was scaled down); reporting again brings it
back; a replica that leaves is gone at once. No Ray: the hub is a plain class Ray makes remote."""

from __future__ import annotations

from tidegate.clock import FakeClock
from tidegate.cluster.hub import STALE_AFTER_S, MetricsHub
from tidegate.cluster.wire import ReplicaReport


def _report(replica: str) -> ReplicaReport:
    return ReplicaReport(replica=replica, model="m", node="n", card={"id": "m"})


def test_a_replica_that_stops_reporting_drops_out_after_the_stale_age() -> None:
    clock = FakeClock()
    hub = MetricsHub(clock)
    hub.report(_report("a"))
    clock.advance(1.0)
    hub.report(_report("b"))
    clock.advance(STALE_AFTER_S - 1.0)  # a is exactly STALE_AFTER_S old: still fresh
    assert [r.replica for r in hub.reports()] == ["a", "b"]
    clock.advance(0.5)
    assert [r.replica for r in hub.reports()] == ["b"]
    hub.report(_report("a"))  # back: reported again
    assert [r.replica for r in hub.reports()] == ["b", "a"]
    hub.leave("b")
    assert [r.replica for r in hub.reports()] == ["a"]
    assert hub.reports(max_age_s=0.0) == [_report("a")]  # reported at this very instant
