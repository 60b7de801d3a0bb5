"""The ingress's stream relay (no Ray: a replica stream made of fixed chunks): usage charged
to the key and removed unless asked for, a failure ending the stream in OpenAI's shape, and a
stream that ends early still charged what it delivered."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

import orjson

from tidegate.auth.keyring import ApiKey, hash_key
from tidegate.clock import FakeClock
from tidegate.cluster.ingress import _relay
from tidegate.cluster.wire import ResponseHead
from tidegate.config import ApiKeyConfig
from tidegate.errors import TidegateError, UpstreamBadGateway


def _event(data: object) -> bytes:
    return b"data: " + orjson.dumps(data) + b"\n\n"


DELTA = _event({"choices": [{"index": 0, "delta": {"content": "hi"}}]})
LAST = _event({"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]})
USAGE = _event({"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 3,
                                         "total_tokens": 10}})
DONE = b"data: [DONE]\n\n"


class FixedStream:
    def __init__(self, chunks: Sequence[bytes], fail: TidegateError | None = None) -> None:
        self.head = ResponseHead(200, ((b"content-type", b"text/event-stream"),))
        self._chunks = chunks
        self._fail = fail
        self.closed = False

    async def chunks(self) -> AsyncIterator[bytes]:
        for chunk in self._chunks:
            yield chunk
        if self._fail is not None:
            raise self._fail

    async def aclose(self) -> None:
        self.closed = True


def _key() -> ApiKey:
    return ApiKey(ApiKeyConfig(id="k", hash=hash_key("secret")), FakeClock())


async def _collect(stream: FixedStream, key: ApiKey | None, *, keep_usage: bool,
                   take: int | None = None, prompt_tokens: int = 0) -> list[bytes]:
    relay = _relay(stream, key, keep_usage=keep_usage, prompt_tokens=prompt_tokens)
    out = []
    async for chunk in relay:
        out.append(chunk)
        if take is not None and len(out) == take:
            break
    await relay.aclose()
    return out


def test_the_usage_event_is_charged_and_removed_unless_asked_for() -> None:
    key = _key()
    chunks = [DELTA, DELTA, LAST + USAGE, DONE]
    out = asyncio.run(_collect(FixedStream(chunks), key, keep_usage=False))
    assert out == [DELTA, DELTA, LAST, DONE]
    assert (key.prompt_tokens, key.completion_tokens) == (7, 3)
    kept_key = _key()
    kept = asyncio.run(_collect(FixedStream(chunks), kept_key, keep_usage=True))
    assert b"".join(kept) == b"".join(chunks)
    assert (kept_key.prompt_tokens, kept_key.completion_tokens) == (7, 3)


def test_a_stream_that_ends_early_is_charged_what_it_delivered() -> None:
    key = _key()
    stream = FixedStream([DELTA, DELTA, DELTA, LAST + USAGE, DONE])
    out = asyncio.run(_collect(stream, key, keep_usage=False, take=2))
    assert out == [DELTA, DELTA]
    assert (key.prompt_tokens, key.completion_tokens) == (0, 2)
    assert stream.closed


def test_a_replica_lost_mid_stream_ends_it_with_an_error_event_and_done() -> None:
    lost = UpstreamBadGateway("The replica serving model 'm' was lost mid-stream.",
                              model="m", replica=None)
    stream = FixedStream([DELTA], fail=lost)
    out = asyncio.run(_collect(stream, None, keep_usage=False))
    assert out[0] == DELTA and out[-1] == DONE
    error = orjson.loads(out[1].removeprefix(b"data: "))["error"]
    assert error["code"] == "upstream_error" and "lost mid-stream" in error["message"]
    assert stream.closed


def test_a_stream_that_ends_early_is_charged_the_prompt_its_replica_gave() -> None:
    key = _key()
    stream = FixedStream([DELTA, DELTA, LAST + USAGE, DONE])
    out = asyncio.run(_collect(stream, key, keep_usage=False, take=1, prompt_tokens=11))
    assert out == [DELTA]
    assert (key.prompt_tokens, key.completion_tokens) == (11, 1)
    whole = _key()  # run to its end, the usage event is what counts
    asyncio.run(_collect(FixedStream([DELTA, LAST + USAGE, DONE]), whole, keep_usage=False,
                         prompt_tokens=11))
    assert (whole.prompt_tokens, whole.completion_tokens) == (7, 3)
