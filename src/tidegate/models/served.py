"""A loaded model, ready to serve: one type per :class:`~tidegate.kinds.ModelKind`, made by
:func:`served_model` from the runtime it wraps.

* :class:`EmbeddingModel`: a local embedding runtime behind a batcher.
* :class:`TextGenerationModel`: a causal LM behind the continuous-batching engine.
* :class:`RemoteModel`: upstream replicas; embeddings batched, completions relayed by the API.
* :class:`RerankModel`: a local cross-encoder behind a batcher, one item per (query, document).

Routes ask the model for the capability they need (:meth:`embedder`, :meth:`generator`,
:meth:`tokenizer`, :meth:`chat_tokenizer`, :meth:`reranker`); a model of the wrong kind
answers with a 400 ``wrong_model_type`` error (``param: messages`` for chat messages to an
embedding model).
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
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
from tidegate.runtimes import AnyRuntime, BatchedRuntime, EmbeddingRuntime, RerankRuntime
from tidegate.runtimes.base import Prepared
from tidegate.runtimes.cross_encoder import relevance_scores
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
    "RerankModel",
    "RerankResult",
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


@dataclass(frozen=True, slots=True)
class RerankResult:
    scores: list[float]
    """One per document, in the documents' order."""
    tokens: int
    """The pairs' tokens as the model saw them (the request's usage)."""


def _wrong_type(model_id: str, what: str, cannot: str, use: str) -> InvalidRequest:
    return InvalidRequest(f"Model '{model_id}' is {what}; it {cannot}. Use {use}.",
                          param="model", code="wrong_model_type")


def _no_chat_format(model_id: str, what: str) -> InvalidRequest:
    return InvalidRequest(f"Model '{model_id}' is {what}; it has no chat format. Send 'prompt' "
                          "instead of 'messages'.", param="messages", code="wrong_model_type")


def _local_compute(
    config: ModelConfig, runtime: BatchedRuntime | RerankRuntime
) -> tuple[Compute[Vector], ThreadPoolExecutor | None]:
    """A local runtime's batches: in its own worker threads, or on the loop when ``inline``."""
    if runtime.inline:
        return on_loop(runtime.run_batch), None
    executor = ThreadPoolExecutor(
        max_workers=config.batching.resolved(remote=False).concurrency,
        thread_name_prefix=f"tidegate-{config.id}",
    )
    return in_executor(runtime.run_batch, executor), executor


class _Served(ABC):
    """What every served model has: its config, a lifecycle, and the two capabilities."""

    kind: ClassVar[ModelKind]

    def __init__(self, config: ModelConfig, metrics: Metrics) -> None:
        self.config = config
        self._metrics = metrics
        self.on_lost: Callable[[str], None] | None = None
        """Set by the model cache: called (with the reason) if the runtime can compute nothing
        more, e.g. the process running its model died."""

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
    def reranker(self) -> RerankModel:
        """This model as a cross-encoder; 400 ``wrong_model_type`` if it is not one."""

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

    def reranker(self) -> RerankModel:
        raise _wrong_type(self.id, "an embedding model", "cannot rerank",
                          "/v1/embeddings, or a cross-encoder model for /v1/rerank")

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
        compute, self._executor = _local_compute(config, runtime)
        super().__init__(config, runtime, metrics, compute=compute,
                         batching=config.batching.resolved(remote=False))

    def generator(self) -> TextGenerationModel | RemoteModel:
        raise _wrong_type(self.id, "an embedding model", "cannot generate text",
                          "/v1/embeddings")

    def tokenizer(self) -> TextTokenizer | RemoteModel:
        return _text_tokenizer(self)

    def chat_tokenizer(self) -> ChatTokenizer | RemoteModel:
        self.tokenizer()  # 400 naming the model first if it has no tokenizer at all
        raise _no_chat_format(self.id, "an embedding model")

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
        raise _wrong_type(self.id, "a text-generation model", "does not produce embeddings",
                          "/v1/completions or /v1/chat/completions")

    def generator(self) -> TextGenerationModel | RemoteModel:
        return self

    def tokenizer(self) -> TextTokenizer | RemoteModel:
        return self.runtime

    def chat_tokenizer(self) -> ChatTokenizer | RemoteModel:
        return self.runtime

    def reranker(self) -> RerankModel:
        raise _wrong_type(self.id, "a text-generation model", "cannot rerank",
                          "/v1/completions or /v1/chat/completions")

    async def start(self) -> None:
        from tidegate.generation.engine import GenerationEngine

        self._engine = GenerationEngine(
            self.runtime, model=self.id, config=self.config.generation,
            metrics=self._metrics.for_generation(self.id), on_lost=self._runtime_lost,
        )
        await self._engine.start()
        self._metrics.track_engine(self.id, self._engine.statistics)

    def _runtime_lost(self, reason: str) -> None:
        if self.on_lost is not None:
            self.on_lost(reason)

    async def aclose(self) -> None:
        if self._engine is not None:
            self._metrics.untrack(self.id)
            await self._engine.aclose()
        # Off the loop: an OpenVINO GenAI model's close waits for its pipeline's process.
        await asyncio.to_thread(self.runtime.close)


class RerankModel(_Served):
    """A local cross-encoder: each (query, document) pair is one item of the model's batcher,
    so a request of 100 documents is 100 items, batched with other requests' pairs."""

    kind = ModelKind.RERANK

    def __init__(self, config: ModelConfig, runtime: RerankRuntime, metrics: Metrics) -> None:
        super().__init__(config, metrics)
        self.runtime = runtime
        compute, self._executor = _local_compute(config, runtime)
        self.batcher: Batcher[Vector] = Batcher(
            model=config.id, compute=compute, config=config.batching.resolved(remote=False),
            metrics=metrics.for_batcher(config.id),
        )

    @property
    def max_input_tokens(self) -> int:
        return self.runtime.max_input_tokens

    def embedder(self) -> Embedder[EmbeddingRuntime]:
        raise _wrong_type(self.id, "a cross-encoder (reranking) model",
                          "does not produce embeddings", "/v1/rerank or /rerank")

    def generator(self) -> TextGenerationModel | RemoteModel:
        raise _wrong_type(self.id, "a cross-encoder (reranking) model", "cannot generate text",
                          "/v1/rerank or /rerank")

    def tokenizer(self) -> TextTokenizer | RemoteModel:
        return _text_tokenizer(self)

    def chat_tokenizer(self) -> ChatTokenizer | RemoteModel:
        self.tokenizer()
        raise _no_chat_format(self.id, "a cross-encoder")

    def reranker(self) -> RerankModel:
        return self

    async def rerank(
        self, query: str, documents: Sequence[str], *, raw: bool = False, truncate: bool = True,
        param: str = "documents",
    ) -> RerankResult:
        """Score each document against ``query``: the model's sigmoid / softmax, or its raw
        logit with ``raw``. With ``truncate`` false, a pair over the model's limit is a 400
        naming ``param`` instead of being cut."""
        self.batcher.check_room(len(documents))  # a full queue refuses before tokenizing
        prepared = await self._prepare(query, documents)
        if not truncate:
            self._check_lengths(prepared, param)
        rows = await self.batcher.submit(prepared)
        scores = relevance_scores(np.stack(rows), raw=raw)
        return RerankResult(scores.tolist(), sum(p.tokens for p in prepared))

    async def _prepare(self, query: str, documents: Sequence[str]) -> list[Prepared]:
        if len(documents) <= _INLINE_PREPARE_MAX:
            return self.runtime.prepare_pairs(query, documents)
        return await asyncio.to_thread(self.runtime.prepare_pairs, query, documents)

    def _check_lengths(self, prepared: Sequence[Prepared], param: str) -> None:
        for index, item in enumerate(prepared):
            if item.payload.truncated:
                raise InvalidRequest(
                    f"'{param}'[{index}] with the query exceeds model '{self.id}''s limit of "
                    f"{self.max_input_tokens} tokens; shorten it, or send 'truncate': true.",
                    param=param,
                )

    async def start(self) -> None:
        await self.batcher.start()

    async def aclose(self) -> None:
        await self.batcher.aclose()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
        self.runtime.close()


def _text_tokenizer(model: EmbeddingModel | RerankModel) -> TextTokenizer:
    """A local batched model's tokenizer (its runtime's ``text_tokenizer``), else 400."""
    found = getattr(model.runtime, "text_tokenizer", None)
    if isinstance(found, TextTokenizer):
        return found
    raise InvalidRequest(
        f"Model '{model.id}' ({model.config.runtime.value} runtime) has no tokenizer; "
        "/tokenize and /detokenize serve embedding models, cross-encoders and causal LMs.",
        param="model", code="wrong_model_type",
    )


ServedModel = EmbeddingModel | TextGenerationModel | RemoteModel | RerankModel


def served_model(config: ModelConfig, runtime: AnyRuntime, metrics: Metrics) -> ServedModel:
    """The served type for ``runtime``'s kind (not started: await its ``start()``)."""
    if isinstance(runtime, RerankRuntime):
        return RerankModel(config, runtime, metrics)
    if isinstance(runtime, BatchedRuntime):
        return EmbeddingModel(config, runtime, metrics)
    from tidegate.runtimes.remote import RemoteRuntime

    if isinstance(runtime, RemoteRuntime):
        return RemoteModel(config, runtime, metrics)
    return TextGenerationModel(config, runtime, metrics)
