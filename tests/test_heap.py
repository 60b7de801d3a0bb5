"""The serving process freezes its heap at start and after each model load: what is alive
then leaves the cyclic collector's walk, what is made later is still collected, and an unloaded
model is freed even from a reference cycle."""

from __future__ import annotations

import asyncio
import gc
import weakref
from collections.abc import Iterator

import pytest

from tests.models.fixture_models import LIVE
from tidegate.config import Config, ModelConfig
from tidegate.heap import HeapFreezer
from tidegate.metrics import Metrics
from tidegate.models.manager import ModelManager


class _Node:
    def __init__(self) -> None:
        self.other: _Node | None = None


def _cycle() -> weakref.ref[_Node]:
    first, second = _Node(), _Node()
    first.other, second.other = second, first
    return weakref.ref(first)


@pytest.fixture(autouse=True)
def unfrozen() -> Iterator[None]:
    gc.unfreeze()
    try:
        yield
    finally:
        gc.unfreeze()


def test_objects_alive_at_a_freeze_leave_the_collectors_walk() -> None:
    before = [object(), {"startup": True}]
    frozen = HeapFreezer().freeze()
    assert frozen > 0
    tracked = {id(obj) for obj in gc.get_objects()}
    assert id(before[1]) not in tracked and id(before) not in tracked


def test_cycles_made_after_a_freeze_are_still_collected() -> None:
    HeapFreezer().freeze()
    gone = _cycle()
    gc.collect()
    assert gone() is None


def test_an_unload_collects_cycles_that_were_frozen() -> None:
    heap = HeapFreezer()
    holder = [_Node(), _Node()]
    holder[0].other, holder[1].other = holder[1], holder[0]
    gone = weakref.ref(holder[0])
    heap.freeze()
    holder.clear()  # now cyclic garbage, but frozen: a plain collection leaves it
    gc.collect()
    assert gone() is not None
    heap.model_unloaded()
    assert gone() is None
    assert heap.freezes == 2 and heap.last_pause_s > 0


def test_the_manager_freezes_after_a_load_and_frees_an_unloaded_cyclic_model() -> None:
    config = Config(models=(ModelConfig(
        id="cyclic", runtime="python", source="tests.models.fixture_models:Blob",
        options={"name": "cyclic-heap", "cyclic": True}),))
    heap = HeapFreezer()

    async def scenario() -> None:
        manager = ModelManager(config, Metrics(), heap=heap)
        await manager.start()
        try:
            await manager.wait_ready()  # the start-up preload is done with the model too
            await asyncio.sleep(0)
            model = LIVE["cyclic-heap"]
            assert heap.freezes == 1
            assert id(model) not in {id(obj) for obj in gc.get_objects()}  # frozen
            del model
            await manager.unload("cyclic")
            assert heap.freezes == 2
            assert "cyclic-heap" not in LIVE  # freed, though in a cycle and frozen at load
        finally:
            await manager.aclose()

    asyncio.run(scenario())
