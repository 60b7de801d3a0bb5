"""A loaded model, ready to serve: its runtime plus what sits in front of it — a batcher
(embedding and remote models) or a continuous-batching engine (causal LMs)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, cast

import numpy as np
import numpy.typing as npt

from tidegate.batching.batcher import Batcher
from tidegate.config import ModelConfig
from tidegate.errors import InvalidRequest
from tidegate.metrics import Metrics
from tidegate.runtimes import AnyRuntime, EmbeddingRuntime

if TYPE_CHECKING:
    from tidegate.generation.engine import GenerationEngine
    from tidegate.runtimes.causal_lm import CausalLMRuntime
    from tidegate.runtimes.remote import RemoteRuntime
    from tidegate.upstream.client import UpstreamClient

__all__ = ["EmbeddingResult", "ServedModel"]

# Tokenizing a few short inputs costs tens of microseconds: cheaper on the loop than a thread hop.
_INLINE_PREPARE_MAX = 8

ModelKind = Literal["embedding", "generation", "remote"]


@dataclass(frozen=True, slots=True)
class EmbeddingResult:
    vectors: list[npt.NDArray[np.float32]]
    prompt_tokens: int


class ServedModel:
    """A loaded model. ``kind`` says what it serves: ``embedding`` (local vectors),
    ``generation`` (a local causal LM) or ``remote`` (upstream replicas: both, relayed)."""

    def __init__(self, config: ModelConfig, runtime: AnyRuntime, metrics: Metrics) -> None:
        self.config = config
        self.runtime = runtime
        self._metrics = metrics
        self._executor: ThreadPoolExecutor | None = None
        self.batcher: Batcher[npt.NDArray[np.float32]] | None = None
        self._engine: GenerationEngine | None = None
        self.kind: ModelKind
        if runtime.kind == "causal-lm":
            self.kind = "generation"
        elif runtime.kind == "remote":
            self.kind = "remote"
            remote = cast("RemoteRuntime", runtime)
            self.batcher = Batcher(
                model=config.id, run_batch_async=remote.run_batch_async,
                config=config.batching.resolved(remote=True),
                metrics=metrics.for_batcher(config.id),
            )
        else:
            self.kind = "embedding"
            local = cast(EmbeddingRuntime, runtime)
            batching = config.batching.resolved(remote=False)
            self._executor = ThreadPoolExecutor(
                max_workers=batching.concurrency, thread_name_prefix=f"tidegate-{config.id}"
            )
            self.batcher = Batcher(
                model=config.id, run_batch=local.run_batch, config=batching,
                executor=self._executor, inline=local.inline,
                metrics=metrics.for_batcher(config.id),
            )

    @property
    def id(self) -> str:
        return self.config.id

    @property
    def engine(self) -> GenerationEngine:
        if self._engine is None:
            raise InvalidRequest(
                f"Model '{self.id}' is an embedding model; it cannot generate text. "
                "Use /v1/embeddings.", param="model", code="wrong_model_type",
            )
        return self._engine

    @property
    def upstream(self) -> UpstreamClient:
        from tidegate.runtimes.remote import RemoteRuntime

        assert isinstance(self.runtime, RemoteRuntime)
        return self.runtime.client

    @property
    def causal_lm(self) -> CausalLMRuntime:
        from tidegate.runtimes.causal_lm import CausalLMRuntime

        assert isinstance(self.runtime, CausalLMRuntime)
        return self.runtime

    async def start(self) -> None:
        if self.kind == "remote":
            await cast("RemoteRuntime", self.runtime).start()
            self._metrics.track_upstream(self.id, self.upstream)
        if self.batcher is not None:
            await self.batcher.start()
        if self.kind == "generation":
            from tidegate.generation.engine import GenerationEngine

            self._engine = GenerationEngine(
                self.causal_lm, model=self.id, config=self.config.generation,
                metrics=self._metrics.for_generation(self.id),
            )
            await self._engine.start()
            self._metrics.track_engine(self.id, self._engine.statistics)

    async def aclose(self) -> None:
        if self._engine is not None:
            self._metrics.untrack(self.id)
            await self._engine.aclose()
        if self.batcher is not None:
            await self.batcher.aclose()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
        if self.kind == "remote":
            self._metrics.untrack(self.id)
            await cast("RemoteRuntime", self.runtime).aclose()
        self.runtime.close()

    @property
    def dimensions(self) -> int:
        """The vector length (0 for a remote model until its first answer)."""
        return int(getattr(self.runtime, "dimensions", 0))

    async def embed(self, texts: Sequence[str]) -> EmbeddingResult:
        if self.batcher is None:
            raise InvalidRequest(
                f"Model '{self.id}' is a text-generation model; it does not produce embeddings. "
                "Use /v1/completions or /v1/chat/completions.", param="model",
                code="wrong_model_type",
            )
        runtime = cast(EmbeddingRuntime, self.runtime)
        if len(texts) <= _INLINE_PREPARE_MAX:
            prepared = runtime.prepare(texts)
        else:
            prepared = await asyncio.to_thread(runtime.prepare, texts)
        vectors = await self.batcher.submit(prepared)
        return EmbeddingResult(vectors, sum(p.tokens for p in prepared))
