"""What a batched runtime offers the batcher and the API."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

__all__ = ["EmbeddingRuntime", "Prepared"]


@dataclass(frozen=True, slots=True)
class Prepared:
    """One input made ready for batching: its cost in tokens and what the runtime needs."""

    tokens: int
    payload: Any


@runtime_checkable
class EmbeddingRuntime(Protocol):
    """A model that turns texts into fixed-size vectors, a batch at a time.

    ``prepare`` runs per request (on the event loop for a few inputs, in a thread for many);
    ``run_batch`` runs in the model's executor thread and must not touch the event loop.
    """

    kind: str
    inline: bool
    """True when a batch costs microseconds: the batcher then runs it on the event loop."""
    dimensions: int
    max_input_tokens: int
    memory_bytes: int

    def prepare(self, texts: Sequence[str]) -> list[Prepared]: ...

    def run_batch(
        self, payloads: Sequence[Any]
    ) -> npt.NDArray[np.float32] | list[npt.NDArray[np.float32]]:
        """One vector per payload: a 2-D array's rows, or a list of 1-D arrays."""
        ...

    def close(self) -> None: ...
