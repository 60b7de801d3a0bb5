"""Runtimes: the code that actually computes. ``create_runtime`` maps a config to one."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Union

from tidegate.config import ModelConfig
from tidegate.runtimes.base import EmbeddingRuntime, Prepared
from tidegate.runtimes.echo import EchoRuntime
from tidegate.runtimes.python import ModelHandle, load_python_model

if TYPE_CHECKING:
    from tidegate.runtimes.causal_lm import CausalLMRuntime
    from tidegate.runtimes.remote import RemoteRuntime

__all__ = ["AnyRuntime", "EmbeddingRuntime", "ModelHandle", "Prepared", "create_runtime"]

AnyRuntime = Union[EmbeddingRuntime, "CausalLMRuntime", "RemoteRuntime"]


def create_runtime(
    model: ModelConfig, cache_dir: Path, dependencies: Mapping[str, ModelHandle]
) -> AnyRuntime:
    """Load the runtime ``model`` names. Blocking: call it off the event loop."""
    if model.runtime == "remote":
        from tidegate.runtimes.remote import RemoteRuntime

        return RemoteRuntime(model)
    if model.runtime == "causal-lm":
        from tidegate.runtimes.causal_lm import CausalLMRuntime

        assert model.source is not None  # validated by ModelConfig
        return CausalLMRuntime(
            Path(model.source).expanduser(), dtype=model.generation.dtype,
            max_context_tokens=model.generation.max_context_tokens,
        )
    if model.runtime == "echo":
        return EchoRuntime(max_input_tokens=model.max_input_tokens or 512)
    if model.runtime == "python":
        assert model.source is not None  # validated by ModelConfig
        return load_python_model(
            model.source, options=model.options, dependencies=dependencies,
            max_input_tokens=model.max_input_tokens,
        )
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
