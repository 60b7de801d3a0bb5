"""The serving process freezes its start-up heap; what is made later is still collected."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from tidegate.server import freeze_startup_heap


class _Node:
    def __init__(self) -> None:
        self.other: _Node | None = None


@pytest.fixture
def unfrozen() -> Iterator[None]:
    gc.unfreeze()
    try:
        yield
    finally:
        gc.unfreeze()


@pytest.mark.usefixtures("unfrozen")
def test_objects_alive_at_start_leave_the_collectors_walk() -> None:
    before = [object(), {"startup": True}]
    frozen = freeze_startup_heap()
    assert frozen == gc.get_freeze_count() > 0
    tracked = {id(obj) for obj in gc.get_objects()}
    assert id(before[1]) not in tracked and id(before) not in tracked


@pytest.mark.usefixtures("unfrozen")
def test_cycles_made_after_the_freeze_are_still_collected() -> None:
    freeze_startup_heap()
    first, second = _Node(), _Node()
    first.other, second.other = second, first
    gone = weakref.ref(first)
    del first, second
    gc.collect()
    assert gone() is None
