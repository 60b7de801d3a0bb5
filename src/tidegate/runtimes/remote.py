"""Models served by remote OpenAI-compatible replicas (vLLM, llama.cpp, Ollama, tidegate...).

Embedding requests go through the model's batcher like local ones: concurrent single-input
requests become one upstream ``POST /v1/embeddings`` with a list input, split back in order.
Chat and completion requests are relayed (streams chunk by chunk) by the API layer.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from tidegate.config import ModelConfig
from tidegate.runtimes.base import Prepared
from tidegate.upstream.client import UpstreamClient

__all__ = ["RemoteRuntime"]

_DEFAULT_TOKEN_LIMIT = 8192


class RemoteRuntime:
    """The upstream client of one model: an embedding runtime whose batches are computed
    upstream (``run_batch_async``, a coroutine on the event loop).

    Token counts in ``usage`` are estimates (words + 2): the upstream reports usage per batch,
    not per input. ``dimensions`` is learned from the first answer (0 until then).
    """

    def __init__(self, config: ModelConfig) -> None:
        assert config.upstream is not None  # validated by ModelConfig
        self.config = config
        self.upstream = config.upstream
        self._api_key = self.upstream.api_key(os.environ)  # ConfigError if the variable is unset
        self.dimensions = 0
        self.max_input_tokens = config.max_input_tokens or _DEFAULT_TOKEN_LIMIT
        self.memory_bytes = 0
        self._client: UpstreamClient | None = None

    @property
    def client(self) -> UpstreamClient:
        if self._client is None:
            raise RuntimeError("RemoteRuntime.start() was not awaited")
        return self._client

    async def start(self) -> None:
        """Create the pooled client on the event loop and start its health checks."""
        self._client = UpstreamClient(self.upstream, model=self.config.id, api_key=self._api_key)
        await self._client.start()

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()

    def prepare(self, texts: Sequence[str]) -> list[Prepared]:
        limit = self.max_input_tokens
        return [Prepared(min(len(t.split()) + 2, limit), t) for t in texts]

    async def run_batch_async(self, payloads: Sequence[Any]) -> list[npt.NDArray[np.float32]]:
        vectors = await self.client.embed_batch([str(p) for p in payloads])
        rows = [np.asarray(v, dtype=np.float32) for v in vectors]
        if rows:
            self.dimensions = len(rows[0])
        return rows

    def close(self) -> None:
        return None
