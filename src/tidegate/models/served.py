"""A loaded model, ready to serve: one type per :class:`~tidegate.kinds.ModelKind`, made by
:func:`served_model` from the runtime it wraps.

* :class:`EmbeddingModel`: a local embedding runtime behind a batcher.
* :class:`TextGenerationModel`: a causal LM behind the continuous-batching engine.
* :class:`RemoteModel`: upstream replicas; embeddings batched, completions relayed by the API.

Routes ask the model for the capability they need (:meth:`embedder`, :meth:`generator`,
:meth:`tokenizer`, :meth:`chat_tokenizer`); a model of the wrong kind answers with a 400
``wrong_model_type`` error (``param: messages`` for chat messages to an embedding model).
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Generic, TypeVar

import numpy as np
import numpy.typing as npt

from tidegate.batching.batcher import Batcher
from tidegate.batching.compute import Compute, in_executor, on_loop
from tidegate.config import BatchingConfig, ModelConfig
from tidegate.errors import InvalidRequest
from tidegate.kinds import ModelKind
from tidegate.metrics import Metrics
from tidegate.runtimes import AnyRuntime, BatchedRuntime, EmbeddingRuntime
from tidegate.runtimes.tokenization import ChatTokenizer, TextTokenizer

if TYPE_CHECKING:
    from tidegate.generation.engine import GenerationEngine
    from tidegate.runtimes.causal_lm import CausalLMRuntime
    from tidegate.runtimes.genai_lm import GenaiLMRuntime
    from tidegate.runtimes.remote import RemoteRuntime
    from tidegate.upstream.client import UpstreamClient

__all__ = [
    "Embedder",
    "EmbeddingModel",
    "EmbeddingResult",
    "RemoteModel",
    "ServedModel",
    "TextGenerationModel",
    "served_model",
]

# Tokenizing a few short inputs costs tens of microseconds: cheaper on the loop than a thread hop.
_INLINE_PREPARE_MAX = 8

Vector = npt.NDArray[np.float32]
RT_co = TypeVar("RT_co", bound=EmbeddingRuntime, covariant=True)


@dataclass(frozen=True, slots=True)
class EmbeddingResult:
    vectors: list[Vector]
    prompt_tokens: int


class _Served(ABC):
    """What every served model has: its config, a lifecycle, and the two capabilities."""

    kind: ClassVar[ModelKind]

    def __init__(self, config: ModelConfig, metrics: Metrics) -> None:
        self.config = config
        self._metrics = metrics

    @property
    def id(self) -> str:
        return self.config.id

    @abstractmethod
    def embedder(self) -> Embedder[EmbeddingRuntime]:
        """This model as a source of embeddings; 400 ``wrong_model_type`` if it is not one."""

    @abstractmethod
    def generator(self) -> TextGenerationModel | RemoteModel:
        """This model as a text generator; 400 ``wrong_model_type`` if it is not one."""

    @abstractmethod
    def tokenizer(self) -> TextTokenizer | RemoteModel:
        """This model's own tokenizer (a remote model: its upstream's, through the API);
        400 ``wrong_model_type`` if it has none."""

    @abstractmethod
    def chat_tokenizer(self) -> ChatTokenizer | RemoteModel:
        """This model's tokenizer with its chat format; 400 if it has none."""

    @abstractmethod
    async def start(self) -> None: ...

    @abstractmethod
    async def aclose(self) -> None: ...


class Embedder(_Served, Generic[RT_co]):
    """A model that serves embeddings through its batcher (local or remote)."""

    def __init__(
        self, config: ModelConfig, runtime: RT_co, metrics: Metrics, *, compute: Compute[Vector],
        batching: BatchingConfig,
    ) -> None:
        super().__init__(config, metrics)
        self.runtime = runtime
        self.batcher: Batcher[Vector] = Batcher(
            model=config.id, compute=compute, config=batching,
            metrics=metrics.for_batcher(config.id),
        )

    def embedder(self) -> Embedder[EmbeddingRuntime]:
        return self

    @property
    def dimensions(self) -> int:
        """The vector length (0 for a remote model until its first answer)."""
        return self.runtime.dimensions

    @property
    def max_input_tokens(self) -> int:
        return self.runtime.max_input_tokens

    @abstractmethod
    def check_dimensions(self, requested: int) -> None:
        """Refuse (400) a request's ``dimensions`` that this model cannot honour."""

    async def embed(self, texts: Sequence[str]) -> EmbeddingResult:
        runtime = self.runtime
        self.batcher.check_room(len(texts))  # a full queue refuses before tokenizing
        if len(texts) <= _INLINE_PREPARE_MAX:
            prepared = runtime.prepare(texts)
        else:
            prepared = await asyncio.to_thread(runtime.prepare, texts)
        vectors = await self.batcher.submit(prepared)
        return EmbeddingResult(vectors, sum(p.tokens for p in prepared))


class EmbeddingModel(Embedder[BatchedRuntime]):
    """A local embedding runtime; its batches run in the model's own worker threads (or on the
    event loop for an ``inline`` runtime)."""

    kind = ModelKind.EMBEDDING

    def __init__(self, config: ModelConfig, runtime: BatchedRuntime, metrics: Metrics) -> None:
        batching = config.batching.resolved(remote=False)
        self._executor: ThreadPoolExecutor | None = None
        if runtime.inline:
            compute: Compute[Vector] = on_loop(runtime.run_batch)
        else:
            self._executor = ThreadPoolExecutor(
                max_workers=batching.concurrency, thread_name_prefix=f"tidegate-{config.id}"
            )
            compute = in_executor(runtime.run_batch, self._executor)
        super().__init__(config, runtime, metrics, compute=compute, batching=batching)

    def generator(self) -> TextGenerationModel | RemoteModel:
        raise InvalidRequest(
            f"Model '{self.id}' is an embedding model; it cannot generate text. "
            "Use /v1/embeddings.", param="model", code="wrong_model_type",
        )

    def tokenizer(self) -> TextTokenizer | RemoteModel:
        runtime = self.runtime
        if isinstance(runtime, TextTokenizer):
            return runtime
        raise InvalidRequest(
            f"Model '{self.id}' ({self.config.runtime.value} runtime) has no tokenizer; "
            "/tokenize and /detokenize serve embedding models and causal LMs.",
            param="model", code="wrong_model_type",
        )

    def chat_tokenizer(self) -> ChatTokenizer | RemoteModel:
        self.tokenizer()  # 400 naming the model first if it has no tokenizer at all
        raise InvalidRequest(
            f"Model '{self.id}' is an embedding model; it has no chat format. "
            "Send 'prompt' instead of 'messages'.", param="messages", code="wrong_model_type",
        )

    def check_dimensions(self, requested: int) -> None:
        if requested != self.dimensions:
            raise InvalidRequest(
                f"Model '{self.id}' produces {self.dimensions}-dimensional embeddings and does "
                f"not support 'dimensions'={requested}.", param="dimensions",
            )

    async def start(self) -> None:
        await self.batcher.start()

    async def aclose(self) -> None:
        await self.batcher.aclose()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
        self.runtime.close()


class RemoteModel(Embedder["RemoteRuntime"]):
    """Upstream replicas: embedding requests batched into one upstream call per batch,
    completions and chat relayed by the API through :attr:`upstream`."""

    kind = ModelKind.REMOTE

    def __init__(self, config: ModelConfig, runtime: RemoteRuntime, metrics: Metrics) -> None:
        super().__init__(
            config, runtime, metrics, compute=runtime.run_batch_async,
            batching=config.batching.resolved(remote=True),
        )

    @property
    def upstream(self) -> UpstreamClient:
        return self.runtime.client

    def generator(self) -> TextGenerationModel | RemoteModel:
        return self

    def tokenizer(self) -> TextTokenizer | RemoteModel:
        return self

    def chat_tokenizer(self) -> ChatTokenizer | RemoteModel:
        return self

    def check_dimensions(self, requested: int) -> None:
        # Requests to a remote model are coalesced into one upstream call per batch, so a
        # per-request 'dimensions' cannot be honoured; refusing beats answering silently
        # with another size.
        raise InvalidRequest(
            f"'dimensions' is not supported for remote model '{self.id}'.", param="dimensions",
        )

    async def start(self) -> None:
        await self.runtime.start()
        self._metrics.track_upstream(self.id, self.upstream)
        await self.batcher.start()

    async def aclose(self) -> None:
        await self.batcher.aclose()
        self._metrics.untrack(self.id)
        await self.runtime.aclose()
        self.runtime.close()


class TextGenerationModel(_Served):
    """A local causal LM served by its continuous-batching engine (created by :meth:`start`)."""

    kind = ModelKind.GENERATION

    def __init__(self, config: ModelConfig, runtime: CausalLMRuntime | GenaiLMRuntime,
                 metrics: Metrics) -> None:
        super().__init__(config, metrics)
        self.runtime = runtime
        self._engine: GenerationEngine | None = None

    @property
    def engine(self) -> GenerationEngine:
        if self._engine is None:
            raise RuntimeError(f"model {self.id} was not started")
        return self._engine

    def embedder(self) -> Embedder[EmbeddingRuntime]:
        raise InvalidRequest(
            f"Model '{self.id}' is a text-generation model; it does not produce embeddings. "
            "Use /v1/completions or /v1/chat/completions.", param="model",
            code="wrong_model_type",
        )

    def generator(self) -> TextGenerationModel | RemoteModel:
        return self

    def tokenizer(self) -> TextTokenizer | RemoteModel:
        return self.runtime

    def chat_tokenizer(self) -> ChatTokenizer | RemoteModel:
        return self.runtime

    async def start(self) -> None:
        from tidegate.generation.engine import GenerationEngine

        self._engine = GenerationEngine(
            self.runtime, model=self.id, config=self.config.generation,
            metrics=self._metrics.for_generation(self.id),
        )
        await self._engine.start()
        self._metrics.track_engine(self.id, self._engine.statistics)

    async def aclose(self) -> None:
        if self._engine is not None:
            self._metrics.untrack(self.id)
            await self._engine.aclose()
        self.runtime.close()


ServedModel = EmbeddingModel | TextGenerationModel | RemoteModel


def served_model(config: ModelConfig, runtime: AnyRuntime, metrics: Metrics) -> ServedModel:
    """The served type for ``runtime``'s kind (not started: await its ``start()``)."""
    if isinstance(runtime, BatchedRuntime):
        return EmbeddingModel(config, runtime, metrics)
    from tidegate.runtimes.remote import RemoteRuntime

    if isinstance(runtime, RemoteRuntime):
        return RemoteModel(config, runtime, metrics)
    return TextGenerationModel(config, runtime, metrics)
