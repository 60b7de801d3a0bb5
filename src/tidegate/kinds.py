"""The two kinds every model has, one Enum each (a leaf module: config, runtimes, models and the
API all import it).

``RuntimeKind`` says which runtime computes (the config's ``runtime`` key, spelled as in TOML);
``ModelKind`` says what the loaded model serves (the ``kind`` of its ``/v1/models`` card).
"""

from __future__ import annotations

from enum import StrEnum

__all__ = ["ModelKind", "RuntimeKind"]


class RuntimeKind(StrEnum):
    """The runtime a model config names; ``tidegate.runtimes.create_runtime`` loads each."""

    EMBEDDING = "embedding"
    """A sentence-embedding model directory on ONNX Runtime (default: the bundled MiniLM)."""
    ECHO = "echo"
    """No model: fixed vectors, to measure the stack itself."""
    PYTHON = "python"
    """A user class given as ``module:ClassName``."""
    REMOTE = "remote"
    """OpenAI-compatible upstream replicas."""
    CAUSAL_LM = "causal-lm"
    """A local Hugging Face causal LM on PyTorch."""
    CROSS_ENCODER = "cross-encoder"
    """A local sequence-classification model scoring (query, document) pairs: reranking."""


class ModelKind(StrEnum):
    """What a loaded model serves: each has its own type in ``tidegate.models.served``."""

    EMBEDDING = "embedding"
    """Local vectors, through the model's batcher."""
    GENERATION = "generation"
    """Local text generation, through the continuous-batching engine."""
    REMOTE = "remote"
    """Both, from upstream replicas: vectors batched, completions relayed."""
    RERANK = "rerank"
    """Local relevance scores of (query, document) pairs, through the model's batcher."""
