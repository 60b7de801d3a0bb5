"""Tiny random-weight causal LMs, built offline once per session and loaded through the real
runtime: a GPT-2 and a Llama, sharing a byte-level BPE tokenizer trained on a few sentences."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from tidegate.config import GenerationConfig
from tidegate.generation.engine import GenerationEngine, GenerationModel
from tidegate.runtimes.causal_lm import CausalLMRuntime


@pytest.fixture(scope="session")
def gpt2(gpt2_dir: Path) -> CausalLMRuntime:
    return CausalLMRuntime(gpt2_dir)


@pytest.fixture(scope="session")
def llama(llama_dir: Path) -> CausalLMRuntime:
    return CausalLMRuntime(llama_dir)


Scenario = Callable[[GenerationEngine], Awaitable[None]]


def run_engine(runtime: GenerationModel, scenario: Scenario, **options: Any) -> None:
    """Start an engine on ``runtime``, run ``scenario`` against it, close it. ``options`` go to
    the engine (``clock``, ``on_step``) or its :class:`GenerationConfig`."""
    engine_keys = {"clock", "on_step"}
    engine_options = {k: v for k, v in options.items() if k in engine_keys}
    config = GenerationConfig(**{k: v for k, v in options.items() if k not in engine_keys})

    async def main() -> None:
        engine = GenerationEngine(runtime, model="tiny", config=config, **engine_options)
        await engine.start()
        try:
            async with asyncio.timeout(60):
                await scenario(engine)
        finally:
            await engine.aclose()

    asyncio.run(main())
