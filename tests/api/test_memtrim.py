"""The idle memory trimmer's decision, and the trim itself on this libc."""

from __future__ import annotations

import sys

from tidegate.api.memtrim import IdleTrimmer, malloc_trim


def test_trims_once_after_traffic_when_idle_long_enough() -> None:
    trimmer = IdleTrimmer(idle_s=1.0)
    assert not trimmer.due(in_flight=0, entered=0, checks_needed=2)  # no traffic yet
    assert not trimmer.due(in_flight=3, entered=5, checks_needed=2)  # busy
    assert not trimmer.due(in_flight=0, entered=5, checks_needed=2)  # idle: 1 check
    assert trimmer.due(in_flight=0, entered=5, checks_needed=2)      # idle: 2 checks
    assert not trimmer.due(in_flight=0, entered=5, checks_needed=2)  # nothing new since
    assert not trimmer.due(in_flight=0, entered=6, checks_needed=2)  # new traffic, 1 check
    assert not trimmer.due(in_flight=0, entered=7, checks_needed=2)  # more arrived: restart
    assert trimmer.due(in_flight=0, entered=7, checks_needed=2)


def test_a_request_in_flight_resets_the_idle_count() -> None:
    trimmer = IdleTrimmer(idle_s=1.0)
    assert not trimmer.due(in_flight=0, entered=2, checks_needed=2)
    assert not trimmer.due(in_flight=1, entered=2, checks_needed=2)
    assert not trimmer.due(in_flight=0, entered=2, checks_needed=2)
    assert trimmer.due(in_flight=0, entered=2, checks_needed=2)


def test_malloc_trim_runs_on_glibc() -> None:
    released = malloc_trim()
    assert isinstance(released, bool)
    if sys.platform == "linux":
        import ctypes.util

        assert ctypes.util.find_library("c") is not None
