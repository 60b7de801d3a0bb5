"""A loaded model: its runtime and the batcher in front of it."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from tidegate.batching.batcher import Batcher
from tidegate.config import ModelConfig
from tidegate.metrics import Metrics
from tidegate.runtimes import EmbeddingRuntime

__all__ = ["EmbeddingResult", "ServedModel"]

# Tokenizing a few short inputs costs tens of microseconds: cheaper on the loop than a thread hop.
_INLINE_PREPARE_MAX = 8


@dataclass(frozen=True, slots=True)
class EmbeddingResult:
    vectors: list[npt.NDArray[np.float32]]
    prompt_tokens: int


class ServedModel:
    """A loaded model: its runtime and the batcher in front of it."""

    def __init__(self, config: ModelConfig, runtime: EmbeddingRuntime, metrics: Metrics) -> None:
        self.config = config
        self.runtime = runtime
        self._executor = ThreadPoolExecutor(
            max_workers=config.batching.max_concurrent_batches,
            thread_name_prefix=f"tidegate-{config.id}",
        )
        self.batcher: Batcher[npt.NDArray[np.float32]] = Batcher(
            model=config.id,
            run_batch=runtime.run_batch,
            config=config.batching,
            executor=self._executor,
            inline=runtime.inline,
            metrics=metrics.for_batcher(config.id),
        )

    @property
    def id(self) -> str:
        return self.config.id

    async def start(self) -> None:
        await self.batcher.start()

    async def aclose(self) -> None:
        await self.batcher.aclose()
        self._executor.shutdown(wait=True)
        self.runtime.close()

    async def embed(self, texts: Sequence[str]) -> EmbeddingResult:
        if len(texts) <= _INLINE_PREPARE_MAX:
            prepared = self.runtime.prepare(texts)
        else:
            prepared = await asyncio.to_thread(self.runtime.prepare, texts)
        vectors = await self.batcher.submit(prepared)
        return EmbeddingResult(vectors, sum(p.tokens for p in prepared))
