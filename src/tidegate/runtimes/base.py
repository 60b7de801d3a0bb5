"""What the batched runtimes offer the batcher and the API: ``EmbeddingRuntime`` is what every
embedding runtime has (local or remote), ``BatchedRuntime`` a local one that computes a batch in
a thread, ``RerankRuntime`` a local cross-encoder scoring (query, document) pairs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

__all__ = ["BatchedRuntime", "EmbeddingRuntime", "EngineInfo", "Prepared", "RerankRuntime"]


@dataclass(frozen=True, slots=True)
class Prepared:
    """One input made ready for batching: its cost in tokens and what the runtime needs."""

    tokens: int
    payload: Any


@dataclass(frozen=True, slots=True)
class EngineInfo:
    """Which engine computes a local model, in which precision, and what the load-time
    precision probe measured (``GET /v1/models`` shows it)."""

    backend: str
    precision: str
    probe_key: str
    """The card's key for :attr:`probe`: ``probe_min_cosine`` (embeddings) or
    ``probe_max_score_error`` (cross-encoders)."""
    probe: float
    """Reduced precision vs fp32 on the probe set; the exact figure (cosine 1.0, error 0.0)
    when the model computes in fp32."""


class EmbeddingRuntime(Protocol):
    """A model that turns texts into fixed-size vectors. ``prepare`` runs per request (on the
    event loop for a few inputs, in a thread for many); how a batch is computed is up to the
    kind: :class:`BatchedRuntime` locally, ``RemoteRuntime.run_batch_async`` upstream."""

    dimensions: int
    max_input_tokens: int
    memory_bytes: int

    def prepare(self, texts: Sequence[str]) -> list[Prepared]: ...

    def close(self) -> None: ...


@runtime_checkable
class BatchedRuntime(EmbeddingRuntime, Protocol):
    """A local embedding runtime: ``run_batch`` runs in the model's executor thread (on the
    event loop itself when ``inline``) and must not touch the event loop."""

    inline: bool
    """True when a batch costs microseconds: the batcher then runs it on the event loop."""

    def run_batch(
        self, payloads: Sequence[Any]
    ) -> npt.NDArray[np.float32] | list[npt.NDArray[np.float32]]:
        """One vector per payload: a 2-D array's rows, or a list of 1-D arrays."""
        ...


@runtime_checkable
class RerankRuntime(Protocol):
    """A local cross-encoder: ``prepare_pairs`` tokenizes a query with each document (one
    batcher item per pair); ``run_batch``, in the model's executor thread, returns each pair's
    raw logits (a row of ``num_labels``)."""

    inline: bool
    max_input_tokens: int
    memory_bytes: int
    num_labels: int

    def prepare_pairs(self, query: str, documents: Sequence[str]) -> list[Prepared]: ...

    def run_batch(self, payloads: Sequence[Any]) -> npt.NDArray[np.float32]: ...

    def close(self) -> None: ...
