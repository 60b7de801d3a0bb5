"""Which models exist, their load state, and the loaded ones' runtimes and batchers."""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from tidegate.batching.batcher import Batcher
from tidegate.config import Config, ModelConfig
from tidegate.errors import ModelNotFound, ModelUnavailable
from tidegate.metrics import Metrics
from tidegate.runtimes import EmbeddingRuntime, create_runtime

__all__ = ["EmbeddingResult", "ModelManager", "ModelState", "RuntimeFactory", "ServedModel"]

log = logging.getLogger("tidegate.models")

RuntimeFactory = Callable[[ModelConfig, Path], EmbeddingRuntime]

# Tokenizing a few short inputs costs tens of microseconds: cheaper on the loop than a thread hop.
_INLINE_PREPARE_MAX = 8


class ModelState(enum.StrEnum):
    UNLOADED = "unloaded"
    LOADING = "loading"
    LOADED = "loaded"
    FAILED = "failed"


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


@dataclass(slots=True)
class _Entry:
    config: ModelConfig
    state: ModelState = ModelState.UNLOADED
    served: ServedModel | None = None
    error: str | None = None
    load_seconds: float | None = None
    created: int = 0


class ModelManager:
    """Loads every configured model in the background at start and hands out loaded ones."""

    def __init__(
        self,
        config: Config,
        metrics: Metrics,
        *,
        runtime_factory: RuntimeFactory = create_runtime,
    ) -> None:
        self._config = config
        self._metrics = metrics
        self._factory = runtime_factory
        self._cache_dir = config.server.resolved_cache_dir()
        now = int(time.time())
        self._entries = {m.id: _Entry(config=m, created=now) for m in config.models}
        self._tasks: set[asyncio.Task[None]] = set()
        self._all_loaded = asyncio.Event()

    async def start(self) -> None:
        """Begin loading every model; returns at once (see :meth:`wait_ready`)."""
        for entry in self._entries.values():
            task = asyncio.create_task(self._load(entry), name=f"load:{entry.config.id}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def wait_ready(self) -> None:
        await self._all_loaded.wait()

    @property
    def ready(self) -> bool:
        return self._all_loaded.is_set()

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for entry in self._entries.values():
            if entry.served is not None:
                await entry.served.aclose()
                entry.served = None
                entry.state = ModelState.UNLOADED

    async def _load(self, entry: _Entry) -> None:
        model_id = entry.config.id
        entry.state = ModelState.LOADING
        log.info("loading model %s (%s runtime)", model_id, entry.config.runtime)
        started = time.perf_counter()
        try:
            runtime = await asyncio.to_thread(self._factory, entry.config, self._cache_dir)
            served = ServedModel(entry.config, runtime, self._metrics)
            await served.start()
        except Exception as exc:
            entry.state = ModelState.FAILED
            entry.error = f"{type(exc).__name__}: {exc}"
            log.error("model %s failed to load: %s", model_id, entry.error, exc_info=exc)
            return
        entry.served = served
        entry.state = ModelState.LOADED
        entry.load_seconds = time.perf_counter() - started
        log.info("model %s loaded in %.2fs", model_id, entry.load_seconds)
        if all(e.state is ModelState.LOADED for e in self._entries.values()):
            self._all_loaded.set()

    def get(self, model_id: str) -> ServedModel:
        entry = self._entries.get(model_id)
        if entry is None:
            raise ModelNotFound(model_id, available=sorted(self._entries))
        if entry.served is None:
            reason = entry.error or entry.state.value
            raise ModelUnavailable(model_id, reason)
        return entry.served

    def has(self, model_id: str) -> bool:
        return model_id in self._entries

    def describe(self) -> list[dict[str, object]]:
        """OpenAI model objects, with tidegate's status fields added."""
        return [self._card(entry) for entry in self._entries.values()]

    def describe_one(self, model_id: str) -> dict[str, object]:
        entry = self._entries.get(model_id)
        if entry is None:
            raise ModelNotFound(model_id, available=sorted(self._entries))
        return self._card(entry)

    @staticmethod
    def _card(entry: _Entry) -> dict[str, object]:
        card: dict[str, object] = {
            "id": entry.config.id,
            "object": "model",
            "created": entry.created,
            "owned_by": "tidegate",
            "runtime": entry.config.runtime,
            "status": entry.state.value,
        }
        if entry.error:
            card["error"] = entry.error
        if entry.served is not None:
            card["dimensions"] = entry.served.runtime.dimensions
            card["max_input_tokens"] = entry.served.runtime.max_input_tokens
        return card
