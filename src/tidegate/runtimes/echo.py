"""A runtime with no model: fixed small vectors. It measures the cost of the stack itself."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from tidegate.runtimes.base import Prepared

__all__ = ["EchoRuntime"]


class EchoRuntime:
    """Returns the same unit vector for every input; tokens are counted as whitespace words + 2."""

    inline = True

    def __init__(self, *, dimensions: int = 8, max_input_tokens: int = 512) -> None:
        self.dimensions = dimensions
        self.max_input_tokens = max_input_tokens
        self.memory_bytes = 0
        vector = np.zeros(dimensions, dtype=np.float32)
        vector[0] = 1.0
        self._vector = vector

    def prepare(self, texts: Sequence[str]) -> list[Prepared]:
        limit = self.max_input_tokens
        return [Prepared(min(len(t.split()) + 2, limit), None) for t in texts]

    def run_batch(self, payloads: Sequence[Any]) -> list[npt.NDArray[np.float32]]:
        return [self._vector] * len(payloads)

    def close(self) -> None:
        return None
