"""What an API key is charged for a relayed answer (:mod:`tidegate.api.usage`): the usage the
model reports, found however the stream's bytes were split, removed when the client did not ask
for it, and for a stream that ends early, the content events it delivered."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import orjson

from tidegate.api.generation import _relay_events
from tidegate.api.usage import (
    StreamUsage,
    ask_for_usage,
    charge_answer,
    prompt_tokens_of,
    usage_tokens,
)
from tidegate.auth.keyring import ApiKey, KeyRing, hash_key
from tidegate.clock import FakeClock
from tidegate.config import ApiKeyConfig


def _key() -> ApiKey:
    config = ApiKeyConfig(id="k", hash=hash_key("tg-k"), tokens_per_minute=1000)
    key = KeyRing([config], clock=FakeClock()).identify("tg-k")
    assert key is not None
    return key


def _event(data: object, end: bytes = b"\n\n") -> bytes:
    return b"data: " + orjson.dumps(data) + end


DELTA = _event({"choices": [{"index": 0, "delta": {"content": "hi"}}]})
USAGE = _event({"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 7}})
DONE = b"data: [DONE]\n\n"


def test_usage_tokens_reads_prompt_and_completion_and_ignores_odd_fields() -> None:
    assert usage_tokens({"usage": {"prompt_tokens": 5, "completion_tokens": 7}}) == (5, 7)
    assert usage_tokens({"usage": {"total_tokens": 9}}) == (9, 0)  # a reranker's
    assert usage_tokens({"usage": {"prompt_tokens": "x", "completion_tokens": True}}) == (0, 0)
    assert usage_tokens({"usage": None}) is None
    assert usage_tokens([1]) is None


def test_a_whole_answer_is_charged_its_usage() -> None:
    key = _key()
    charge_answer(key, b'{"usage": {"prompt_tokens": 3, "completion_tokens": 4}}')
    charge_answer(key, b"not json")  # an odd replica is not fatal
    charge_answer(key, b'{"choices": []}')
    stats = key.statistics()
    assert (stats.prompt_tokens, stats.completion_tokens) == (3, 4)


def test_asking_for_usage_keeps_the_other_stream_options() -> None:
    body = {"model": "m", "stream": True, "stream_options": {"other": 1}}
    asked = ask_for_usage(body)
    assert asked["stream_options"] == {"other": 1, "include_usage": True}
    assert body["stream_options"] == {"other": 1}  # the caller's body is left as it was
    assert ask_for_usage({"stream_options": None})["stream_options"] == {"include_usage": True}


def test_kept_usage_is_relayed_byte_for_byte_and_found_across_reads() -> None:
    usage = StreamUsage(strip=False)
    stream = DELTA + USAGE + DONE
    reads = [stream[:10], stream[10:len(DELTA) + 30], stream[len(DELTA) + 30:]]
    relayed = [usage.feed(read) for read in reads] + [usage.close()]
    assert b"".join(relayed) == stream and relayed[:3] == reads
    key = _key()
    usage.charge(key)
    usage.charge(key)  # once
    assert (key.prompt_tokens, key.completion_tokens) == (5, 7)


def test_stripped_usage_is_removed_and_events_relayed_whole() -> None:
    for end in (b"\n\n", b"\r\n\r\n", b"\r\r"):
        delta = _event({"choices": [{"delta": {"content": "a"}}]}, end)
        usage_event = _event({"choices": [], "usage": {"prompt_tokens": 2,
                                                       "completion_tokens": 1}}, end)
        done = b"data: [DONE]" + end
        stream = delta + usage_event + done
        usage = StreamUsage(strip=True)
        relayed = [usage.feed(stream[i:i + 7]) for i in range(0, len(stream), 7)]
        relayed.append(usage.close())
        assert b"".join(relayed) == delta + done, end
        assert all(piece in (b"", delta, done) for piece in relayed), end  # whole events
        assert usage.usage == (2, 1)


def test_usage_on_every_chunk_is_kept_and_the_last_one_counts() -> None:
    running = [_event({"choices": [{"delta": {"content": "x"}}],
                       "usage": {"prompt_tokens": 4, "completion_tokens": n}})
               for n in (1, 2, 3)]
    usage = StreamUsage(strip=True)
    relayed = b"".join(usage.feed(event) for event in running)
    assert relayed == b"".join(running)  # content events are never removed
    assert usage.usage == (4, 3)


def test_a_stream_without_usage_is_charged_its_content_events() -> None:
    text = b'data: {"choices": [{"text": "one", "index": 0}]}\n\n'  # spaced JSON, completions
    usage = StreamUsage(strip=True)
    assert usage.feed(DELTA + DELTA[:5]) == DELTA
    assert usage.feed(DELTA[5:] + text) == DELTA + text
    key = _key()
    usage.charge(key)
    assert (key.prompt_tokens, key.completion_tokens) == (0, 3)


def test_a_long_unfinished_event_is_relayed_not_held() -> None:
    usage = StreamUsage(strip=True)
    blob = b"data: " + b"x" * 70000
    assert usage.feed(blob) == blob
    assert usage.close() == b""


class _Upstream:
    """Just what ``_relay_events`` uses of an upstream stream: a context and its reads."""

    def __init__(self, reads: list[bytes], headers: dict[str, str] | None = None) -> None:
        self.reads = reads
        self.headers = headers or {}
        self.closed = False

    async def __aenter__(self) -> _Upstream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.closed = True

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for read in self.reads:
            yield read


async def _relay(reads: list[bytes], key: ApiKey | None, *, keep_usage: bool,
                 take: int | None = None, headers: dict[str, str] | None = None
                 ) -> tuple[list[bytes], _Upstream]:
    upstream = _Upstream(reads, headers)
    events = _relay_events(contextlib.AsyncExitStack(), upstream,  # type: ignore[arg-type]
                           key, keep_usage=keep_usage)
    out = []
    async for chunk in events:
        out.append(chunk)
        if len(out) == take:
            break
    await events.aclose()
    return out, upstream


def test_a_relayed_stream_is_charged_and_stripped_unless_asked() -> None:
    stream = DELTA + USAGE + DONE
    reads = [stream[:len(DELTA) + 30], stream[len(DELTA) + 30:]]
    key = _key()
    out, _ = asyncio.run(_relay(reads, key, keep_usage=True))
    assert out == reads  # byte for byte
    assert (key.prompt_tokens, key.completion_tokens) == (5, 7)
    stripped_key = _key()
    out, _ = asyncio.run(_relay(reads, stripped_key, keep_usage=False))
    assert b"".join(out) == DELTA + DONE
    assert (stripped_key.prompt_tokens, stripped_key.completion_tokens) == (5, 7)
    unkeyed, _ = asyncio.run(_relay(reads, None, keep_usage=False))
    assert unkeyed == reads  # no key: nothing is read or changed


def test_a_relayed_stream_left_early_is_charged_what_it_delivered() -> None:
    key = _key()
    out, upstream = asyncio.run(_relay([DELTA, DELTA, DELTA, USAGE, DONE], key,
                                       keep_usage=False, take=2))
    assert out == [DELTA, DELTA] and upstream.closed
    assert (key.prompt_tokens, key.completion_tokens) == (0, 2)


def test_the_prompt_tokens_header_is_read_strictly() -> None:
    assert prompt_tokens_of([("Content-Type", "x"), ("X-Tidegate-Prompt-Tokens", " 12 ")]) == 12
    for odd in ("-1", "1e3", "", "١٢", "9" * 12):  # negative, float, empty, not ASCII, huge
        assert prompt_tokens_of([("x-tidegate-prompt-tokens", odd)]) == 0, odd
    assert prompt_tokens_of([]) == 0


def test_a_stream_left_early_is_charged_the_prompt_its_upstream_gave() -> None:
    key = _key()
    out, _ = asyncio.run(_relay([DELTA, DELTA, USAGE, DONE], key, keep_usage=False, take=1,
                                headers={"x-tidegate-prompt-tokens": "9"}))
    assert out == [DELTA]
    assert (key.prompt_tokens, key.completion_tokens) == (9, 1)
