"""One loader per runtime kind, and the served type each kind of runtime gets."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tidegate.config import ModelConfig
from tidegate.errors import InvalidRequest
from tidegate.kinds import ModelKind, RuntimeKind
from tidegate.metrics import Metrics
from tidegate.models.served import EmbeddingModel, served_model
from tidegate.runtimes import LOADERS, BatchedRuntime, create_runtime
from tidegate.runtimes.echo import EchoRuntime


def test_every_runtime_kind_has_a_loader() -> None:
    assert set(LOADERS) == set(RuntimeKind)


def test_config_strings_become_the_enum() -> None:
    config = ModelConfig(id="m", runtime="causal-lm", source="/nowhere")  # type: ignore[arg-type]
    assert config.runtime is RuntimeKind.CAUSAL_LM
    assert ModelConfig(id="e").runtime is RuntimeKind.EMBEDDING


def test_echo_is_a_batched_runtime_served_as_an_embedding_model(tmp_path: Path) -> None:
    config = ModelConfig(id="echo", runtime=RuntimeKind.ECHO, max_input_tokens=64)
    runtime = create_runtime(config, tmp_path, {})
    assert isinstance(runtime, EchoRuntime) and isinstance(runtime, BatchedRuntime)
    assert runtime.max_input_tokens == 64

    async def main() -> None:
        served = served_model(config, runtime, Metrics())
        assert isinstance(served, EmbeddingModel) and served.kind is ModelKind.EMBEDDING
        await served.start()
        try:
            result = await served.embedder().embed(["a b", "c"])
            assert len(result.vectors) == 2 and result.prompt_tokens == 4 + 3
            served.check_dimensions(8)
            with pytest.raises(InvalidRequest, match="8-dimensional"):
                served.check_dimensions(4)
            with pytest.raises(InvalidRequest, match="cannot generate text") as caught:
                served.generator()
            assert caught.value.code == "wrong_model_type"
        finally:
            await served.aclose()

    asyncio.run(main())
