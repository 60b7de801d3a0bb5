"""Keep the serving process's long-lived objects out of the cyclic garbage collector's walk.

CPython's full collection walks every object it tracks, holding the GIL: the event loop and
every worker thread stop for its whole length. A serving process tracks a few hundred thousand
long-lived objects (the modules, classes and functions of OpenVINO, transformers and torch,
which a model's load imports), and under load a full collection comes every few seconds. Under
the overload soak on 2 cores (``bench/soak.py``) they paused the generation server ~200 ms
every ~7 s, with ~370,000 objects that the start-up freeze had not seen because models load
after it: one in 100 admitted requests waited out a pause.

:class:`HeapFreezer` moves the objects alive at a quiet moment into CPython's permanent
generation (``gc.freeze``), which the collector skips; reference counting still frees them.

* at start, before serving (:meth:`HeapFreezer.freeze`);
* after each model load, when the load's imports have joined the heap
  (:meth:`HeapFreezer.model_loaded`);
* after each unload, the frozen objects go back to the collector for one full collection
  before the next freeze (:meth:`HeapFreezer.model_unloaded`), so an unloaded model caught in a
  reference cycle (and whatever native memory it holds) is freed rather than kept frozen.

Each of these is one full collection (~100 ms per 200,000 objects measured here), paid at a
load or an unload instead of every few seconds under load. An object that was alive at a
freeze and later becomes cyclic garbage waits for the next unload to be collected; objects that
die by reference count (nearly all) are freed at once as usual.

A leaf module: it imports nothing from tidegate.
"""

from __future__ import annotations

import gc
import logging
import time

__all__ = ["HeapFreezer"]

log = logging.getLogger("tidegate.heap")


class HeapFreezer:
    """Freezes the heap at start and after each model load; see the module docstring.

    Only the serving process uses one (``tidegate serve``): freezing an interpreter's heap is a
    process-wide decision, so in-process users of the app (tests, embedding tidegate) pass
    none and keep CPython's default behaviour."""

    def __init__(self) -> None:
        self.freezes = 0
        self.last_pause_s = 0.0
        """How long the last freeze (its full collection included) held the interpreter."""

    def freeze(self) -> int:
        """Collect once, then freeze every object alive now; returns how many are frozen."""
        started = time.perf_counter()
        gc.collect()
        gc.freeze()
        self.last_pause_s = time.perf_counter() - started
        self.freezes += 1
        frozen = gc.get_freeze_count()
        log.debug("heap frozen: %d objects, %.0f ms", frozen, self.last_pause_s * 1000)
        return frozen

    def model_loaded(self) -> None:
        """A model finished loading: freeze what its load added (mostly imported modules)."""
        self.freeze()

    def model_unloaded(self) -> None:
        """A model was unloaded: give the frozen objects back to the collector for one full
        collection (the model's own cycles among them), then freeze what survives."""
        gc.unfreeze()
        self.freeze()
