"""Runtimes: the code that actually computes. ``create_runtime`` maps a config to one."""

from __future__ import annotations

from pathlib import Path

from tidegate.config import ModelConfig
from tidegate.runtimes.base import EmbeddingRuntime, Prepared
from tidegate.runtimes.echo import EchoRuntime

__all__ = ["EmbeddingRuntime", "Prepared", "create_runtime"]


def create_runtime(model: ModelConfig, cache_dir: Path) -> EmbeddingRuntime:
    """Load the runtime ``model`` names. Blocking: call it off the event loop."""
    if model.runtime == "echo":
        return EchoRuntime(max_input_tokens=model.max_input_tokens or 512)
    from tidegate.runtimes.embedding import OnnxEmbeddingRuntime, bundled_model_dir

    model_dir = Path(model.source).expanduser() if model.source else bundled_model_dir()
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model source {model_dir} is not a directory")
    return OnnxEmbeddingRuntime(
        model_dir,
        cache_dir,
        max_input_tokens=model.max_input_tokens,
        intra_op_threads=model.intra_op_threads,
    )
