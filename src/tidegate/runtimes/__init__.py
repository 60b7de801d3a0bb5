"""Runtimes: the code that actually computes. ``create_runtime`` maps a config to one through
one table, ``LOADERS``, with an entry per :class:`~tidegate.kinds.RuntimeKind`: a new runtime
(or a backend of one) is a new loader there. Heavy imports (onnxruntime, torch, aiohttp) happen
inside the loaders, so a server loads only what its models use."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Union

from tidegate.config import ModelConfig
from tidegate.engines import Backend, Precision, Weights, cpu_supports_bf16
from tidegate.kinds import RuntimeKind
from tidegate.runtimes.base import BatchedRuntime, EmbeddingRuntime, Prepared, RerankRuntime
from tidegate.runtimes.echo import EchoRuntime
from tidegate.runtimes.python import ModelHandle, load_python_model

if TYPE_CHECKING:
    from tidegate.runtimes.causal_lm import CausalLMRuntime
    from tidegate.runtimes.genai_lm import GenaiLMRuntime
    from tidegate.runtimes.remote import RemoteRuntime

__all__ = [
    "LOADERS",
    "AnyRuntime",
    "BatchedRuntime",
    "EmbeddingRuntime",
    "Loader",
    "ModelHandle",
    "Prepared",
    "RerankRuntime",
    "create_runtime",
]

AnyRuntime = Union[
    BatchedRuntime, RerankRuntime, "CausalLMRuntime", "GenaiLMRuntime", "RemoteRuntime"
]

log = logging.getLogger("tidegate.runtimes")
Loader = Callable[[ModelConfig, Path, Mapping[str, ModelHandle]], AnyRuntime]
"""``(model config, cache directory, loaded dependencies) -> runtime``; blocking."""


def _load_embedding(
    model: ModelConfig, cache_dir: Path, _: Mapping[str, ModelHandle]
) -> AnyRuntime:
    from tidegate.runtimes.embedding import TextEmbeddingRuntime, bundled_model_dir

    model_dir = Path(model.source).expanduser() if model.source else bundled_model_dir()
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model source {model_dir} is not a directory")
    return TextEmbeddingRuntime(
        model_dir, cache_dir, model_id=model.id, backend=model.backend,
        precision=model.precision, min_cosine=model.min_cosine,
        max_input_tokens=model.max_input_tokens,
        intra_op_threads=model.intra_op_threads,
    )


def _load_cross_encoder(
    model: ModelConfig, cache_dir: Path, _: Mapping[str, ModelHandle]
) -> AnyRuntime:
    from tidegate.runtimes.cross_encoder import CrossEncoderRuntime

    assert model.source is not None  # validated by ModelConfig
    model_dir = Path(model.source).expanduser()
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model source {model_dir} is not a directory")
    return CrossEncoderRuntime(
        model_dir, cache_dir, model_id=model.id, backend=model.backend,
        precision=model.precision, max_score_error=model.max_score_error,
        max_input_tokens=model.max_input_tokens, intra_op_threads=model.intra_op_threads,
    )


def _load_echo(model: ModelConfig, _: Path, __: Mapping[str, ModelHandle]) -> AnyRuntime:
    return EchoRuntime(max_input_tokens=model.max_input_tokens or 512)


def _load_python(
    model: ModelConfig, _: Path, dependencies: Mapping[str, ModelHandle]
) -> AnyRuntime:
    assert model.source is not None  # validated by ModelConfig
    return load_python_model(
        model.source, options=model.options, dependencies=dependencies,
        max_input_tokens=model.max_input_tokens,
    )


def _load_remote(model: ModelConfig, _: Path, __: Mapping[str, ModelHandle]) -> AnyRuntime:
    from tidegate.runtimes.remote import RemoteRuntime

    return RemoteRuntime(model)


def pipeline_in_child(model: ModelConfig) -> bool:
    """Whether an OpenVINO GenAI model's pipeline runs in a child process: as
    ``[models.generation] pipeline_process`` says, else when ``intra_op_threads`` leaves cores
    to the event loop. Measured on 2 cores, 16 clients of the tiny test GPT-2: with one compute
    thread the child served 10-20% more, and the event loop 3.8x the other requests; with
    both cores computing, in process served 10-15% more (the loop, held off by the GIL during
    steps, then leaves the compute its cores)."""
    if model.generation.pipeline_process is not None:
        return model.generation.pipeline_process
    threads = model.intra_op_threads
    usable = (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
              else os.cpu_count() or 1)
    return threads is not None and threads < usable


def _load_causal_lm(model: ModelConfig, cache_dir: Path, _: Mapping[str, ModelHandle]
                    ) -> AnyRuntime:
    """OpenVINO GenAI (``openvino``, or ``auto`` when the model exports and passes the probe),
    else tidegate's torch engine (``torch``, or ``auto`` with a warning naming the reason)."""
    from tidegate.runtimes.causal_lm import CausalLMRuntime, Dtype

    assert model.source is not None  # validated by ModelConfig
    model_dir = Path(model.source).expanduser()
    if model.backend is not Backend.TORCH:
        from tidegate.runtimes.genai_lm import GenaiLMRuntime

        precision = model.precision
        if precision is Precision.AUTO:
            precision = Precision.BF16 if cpu_supports_bf16() else Precision.FP32
        try:
            return GenaiLMRuntime(model_dir, cache_dir, precision=precision,
                                  generation=model.generation, threads=model.intra_op_threads,
                                  weights=model.weights,
                                  in_process=not pipeline_in_child(model))
        except Exception as exc:
            if model.backend is Backend.OPENVINO or isinstance(exc, FileNotFoundError):
                raise
            kept = "" if model.weights is Weights.ORIGINAL else " with its original weights"
            log.warning("model %s: serving it on the torch engine%s, not OpenVINO GenAI: %s",
                        model.id, kept, exc)
    # The torch engine's auto precision is fp32: measured faster there than bf16 on CPUs
    # without AMX (BENCHMARKS.md).
    dtype: Dtype = "bfloat16" if model.precision is Precision.BF16 else "float32"
    return CausalLMRuntime(
        model_dir, dtype=dtype, max_context_tokens=model.generation.max_context_tokens,
    )


LOADERS: Mapping[RuntimeKind, Loader] = {
    RuntimeKind.EMBEDDING: _load_embedding,
    RuntimeKind.ECHO: _load_echo,
    RuntimeKind.PYTHON: _load_python,
    RuntimeKind.REMOTE: _load_remote,
    RuntimeKind.CAUSAL_LM: _load_causal_lm,
    RuntimeKind.CROSS_ENCODER: _load_cross_encoder,
}


def create_runtime(
    model: ModelConfig, cache_dir: Path, dependencies: Mapping[str, ModelHandle]
) -> AnyRuntime:
    """Load the runtime ``model`` names. Blocking: call it off the event loop."""
    return LOADERS[model.runtime](model, cache_dir, dependencies)
