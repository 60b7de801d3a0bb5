"""Usage found in relayed SSE chunks is what a key's tokens_per_minute is charged."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from tidegate.api.generation import _chunk_usage, _record_usage, _relay_events
from tidegate.auth.keyring import KeyRing, hash_key
from tidegate.clock import FakeClock
from tidegate.config import ApiKeyConfig


def test_the_last_usage_in_a_relayed_chunk_is_found() -> None:
    chunk = (b'data: {"choices":[{"delta":{"content":"hi"}}]}\n\n'
             b'data: {"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":7}}\n\n'
             b"data: [DONE]\n\n")
    assert _chunk_usage(chunk) == {"prompt_tokens": 5, "completion_tokens": 7}
    assert _chunk_usage(b'data: {"usage": null, "text": "\\"usage\\""}\n\n') is None
    assert _chunk_usage(b'data: {"usage": {"prompt_tok') is None  # the rest comes next read


def test_recorded_usage_is_charged_to_the_key() -> None:
    config = ApiKeyConfig(id="k", hash=hash_key("tg-k"), tokens_per_minute=10)
    key = KeyRing([config], clock=FakeClock()).identify("tg-k")
    assert key is not None
    _record_usage(key, {"prompt_tokens": 5, "completion_tokens": 7})
    _record_usage(key, {"prompt_tokens": "x"})  # a replica's odd usage is ignored, not fatal
    _record_usage(key, None)
    stats = key.statistics()
    assert (stats.prompt_tokens, stats.completion_tokens) == (5, 7)


class _Upstream:
    """Just what ``_relay_events`` uses of an upstream stream: a context and its reads."""

    def __init__(self, reads: list[bytes]) -> None:
        self.reads = reads

    async def __aenter__(self) -> _Upstream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for read in self.reads:
            yield read


def test_a_relayed_stream_charges_usage_split_across_reads() -> None:
    asyncio.run(_relay_split_usage())


async def _relay_split_usage() -> None:
    config = ApiKeyConfig(id="k", hash=hash_key("tg-k"))
    key = KeyRing([config], clock=FakeClock()).identify("tg-k")
    assert key is not None
    event = b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":4}}\n\n'
    reads = [b'data: {"choices":[{"delta":{}}]}\n\n' + event[:30], event[30:], b"data: [DONE]\n\n"]
    relayed = [c async for c in _relay_events(contextlib.AsyncExitStack(), _Upstream(reads), key)]
    assert relayed == reads  # byte for byte
    stats = key.statistics()
    assert (stats.prompt_tokens, stats.completion_tokens) == (3, 4)
