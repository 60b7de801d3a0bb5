"""Shared fixtures: one ONNX export per test session, and real server processes."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tidegate cache for the whole session, so MiniLM is exported to ONNX only once."""
    return tmp_path_factory.mktemp("tidegate-cache")


@pytest.fixture(scope="session")
def model_dir() -> Path:
    from tidegate.runtimes.embedding import bundled_model_dir

    return bundled_model_dir()


@pytest.fixture(scope="session")
def minilm(model_dir: Path, cache_dir: Path) -> Iterator[object]:
    from tidegate.runtimes.embedding import OnnxEmbeddingRuntime

    runtime = OnnxEmbeddingRuntime(model_dir, cache_dir)
    yield runtime
    runtime.close()


@pytest.fixture(scope="session")
def reference_model(model_dir: Path) -> object:
    """sentence-transformers fp32 on PyTorch: the reference our runtime must match."""
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(model_dir), device="cpu")
