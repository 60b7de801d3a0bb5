"""User models written as plain Python classes, given by import path (``module:ClassName``).

The class contract (see README, "Python models")::

    class MyModel:
        dimensions: int                       # length of each vector
        memory_bytes: int                     # optional: what it holds, if it knows
        def __init__(self, *, dependencies: Mapping[str, ModelHandle], **options): ...
        def embed(self, texts: list[str]) -> Sequence[Sequence[float]]: ...
        def count_tokens(self, text: str) -> int: ...   # optional; default: words + 2
        def close(self) -> None: ...                    # optional

``embed`` runs in the model's worker thread. ``dependencies`` maps each ``depends_on`` id to a
:class:`ModelHandle` whose ``embed`` may be called from there (it goes through that model's
batcher and holds a lease on it while it runs).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from tidegate.runtimes.base import Prepared

__all__ = ["ModelHandle", "PythonModelRuntime", "load_python_model"]


class ModelHandle(Protocol):
    """A loaded dependency, callable from a model's worker thread."""

    id: str

    def embed(self, texts: Sequence[str]) -> npt.NDArray[np.float32]: ...


class PythonModelRuntime:
    """Adapts a user class to the batcher's runtime protocol."""

    inline = False

    def __init__(self, model: Any, *, max_input_tokens: int) -> None:
        self._model = model
        self.dimensions = int(model.dimensions)
        self.memory_bytes = int(getattr(model, "memory_bytes", 0) or 0)
        self.max_input_tokens = max_input_tokens
        counter = getattr(model, "count_tokens", None)
        self._count = counter if callable(counter) else (lambda text: len(text.split()) + 2)

    def prepare(self, texts: Sequence[str]) -> list[Prepared]:
        limit = self.max_input_tokens
        return [Prepared(min(int(self._count(t)), limit), t) for t in texts]

    def run_batch(self, payloads: Sequence[Any]) -> npt.NDArray[np.float32]:
        vectors = np.asarray(self._model.embed(list(payloads)), dtype=np.float32)
        expected = (len(payloads), self.dimensions)
        if vectors.shape != expected:
            raise ValueError(f"embed() returned shape {vectors.shape}, expected {expected}")
        return vectors

    def close(self) -> None:
        closer = getattr(self._model, "close", None)
        if callable(closer):
            closer()


def load_python_model(
    source: str,
    *,
    options: Mapping[str, Any],
    dependencies: Mapping[str, ModelHandle],
    max_input_tokens: int | None,
) -> PythonModelRuntime:
    module_name, _, class_name = source.partition(":")
    module = importlib.import_module(module_name)
    try:
        cls = getattr(module, class_name)
    except AttributeError as exc:
        raise ImportError(f"module '{module_name}' has no class '{class_name}'") from exc
    model = cls(dependencies=dict(dependencies), **dict(options))
    return PythonModelRuntime(model, max_input_tokens=max_input_tokens or 512)
