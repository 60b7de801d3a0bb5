"""Real ``python``-runtime models for the model-cache tests: each really allocates its memory
and appends a line to a log file per load/close. A load or an embed can be held (the e2e tests
sleep ``load_seconds``/``embed_seconds``, or hold each embed until the test creates the file
``embed_until``; the unit tests block on a named :func:`gate`, opened by the test, so that no
test waits on real time)."""

from __future__ import annotations

import itertools
import os
import threading
import time
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np


def _log(path: str | None, line: str) -> None:
    if path:
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(f"{line} {time.monotonic():.6f} {os.getpid()}\n")


LIVE: weakref.WeakValueDictionary[str, Blob] = weakref.WeakValueDictionary()
"""Every :class:`Blob` not yet freed, by name."""

_GATES: dict[str, threading.Event] = {}
_GATE_IDS = itertools.count()
_GATE_LIMIT_S = 60.0


def gate() -> tuple[str, threading.Event]:
    """A new gate: its name (for a model's ``load_gate``/``embed_gate`` option) and its event."""
    name = f"gate{next(_GATE_IDS)}"
    _GATES[name] = threading.Event()
    return name, _GATES[name]


def open_all_gates() -> None:
    """Let every held load and embed finish (a test's cleanup: threads cannot be cancelled)."""
    for event in _GATES.values():
        event.set()


def _pass(name: str | None) -> None:
    if name and not _GATES[name].wait(_GATE_LIMIT_S):
        raise RuntimeError(f"gate {name} was not opened within {_GATE_LIMIT_S}s")


def _wait_for_file(path: Path) -> None:
    """Block (this is the model's worker thread) until another process creates ``path``."""
    deadline = time.monotonic() + _GATE_LIMIT_S
    while not path.exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{path} was not created within {_GATE_LIMIT_S}s")
        time.sleep(0.01)


class Blob:
    """An embedder of ``dimensions`` dims that holds ``allocate_mb`` MiB of touched memory."""

    def __init__(
        self,
        *,
        dependencies: Mapping[str, Any],
        name: str = "blob",
        load_seconds: float = 0.0,
        embed_seconds: float = 0.0,
        allocate_mb: int = 0,
        dimensions: int = 4,
        fail_if_exists: str | None = None,
        log: str | None = None,
        load_gate: str | None = None,
        embed_gate: str | None = None,
        embed_until: str | None = None,
        cyclic: bool = False,
    ) -> None:
        self._name = name
        self._self = self if cyclic else None  # only the cyclic collector can free it
        self._log = log
        _log(log, f"load-start {name}")
        time.sleep(load_seconds)
        _pass(load_gate)
        if fail_if_exists and Path(fail_if_exists).exists():
            _log(log, f"load-failed {name}")
            raise RuntimeError(f"{name} cannot load while {fail_if_exists} exists")
        self._memory = np.ones(allocate_mb << 20, dtype=np.uint8)  # touched: really resident
        self.dimensions = dimensions
        self._embed_seconds = embed_seconds
        self._embed_gate = embed_gate
        self._embed_until = Path(embed_until) if embed_until else None
        LIVE[name] = self
        _log(log, f"loaded {name}")

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        _log(self._log, f"embed-start {self._name}")
        time.sleep(self._embed_seconds)
        _pass(self._embed_gate)
        if self._embed_until is not None:
            _wait_for_file(self._embed_until)
        _log(self._log, f"embed-end {self._name}")
        return [[float(len(t))] + [0.0] * (self.dimensions - 1) for t in texts]

    def close(self) -> None:
        _log(self._log, f"closed {self._name}")
        del self._memory


class Reranker:
    """Scores texts with its ``embedder`` dependency: returns that model's first 4 dims."""

    dimensions = 4

    def __init__(self, *, dependencies: Mapping[str, Any], log: str | None = None) -> None:
        self._embedder = dependencies["embedder"]
        self._log = log
        _log(log, "loaded reranker")

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        return np.asarray(self._embedder.embed(texts))[:, :4] * 2.0
