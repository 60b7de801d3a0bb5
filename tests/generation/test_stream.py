"""A stream's two readings: text deltas, or :class:`Delta` objects with their tokens."""

from __future__ import annotations

import asyncio

from tidegate.generation import Delta, GenerationResult, GenerationStream, TokenLogprob


def stream(capacity: int = 8) -> GenerationStream:
    return GenerationStream("r", prompt_tokens=1, capacity=capacity, on_cancel=lambda: None)


def finish(s: GenerationStream) -> None:
    s.finish(GenerationResult(request_id="r", text="", token_ids=(), finish_reason="stop",
                              prompt_tokens=1))


def test_plain_text_reads_as_deltas_without_tokens() -> None:
    async def main() -> None:
        s = stream()
        s.push("ab", 0.0)
        s.push("", 0.0)  # nothing to send
        s.push("c", 0.0)
        finish(s)
        assert [d async for d in s.deltas()] == [Delta("ab"), Delta("c")]

    asyncio.run(main())


def test_deltas_are_coalesced_with_their_tokens_when_the_reader_falls_behind() -> None:
    one, two, three = (TokenLogprob(-float(i)) for i in range(1, 4))

    async def main() -> None:
        s = stream(capacity=1)
        s.push(Delta("a", (1,), (one,)), 0.0)
        s.push(Delta("", (), ()), 1.0)  # no text, no token: nothing to send
        s.push(Delta("", (2,), (two,)), 1.0)  # a token without text still goes out
        s.push(Delta("c", (3,), (three,)), 2.0)
        assert s.blocked_since == 1.0
        finish(s)
        assert [d async for d in s.deltas()] == [
            Delta("a", (1,), (one,)), Delta("c", (2, 3), (two, three))]

    asyncio.run(main())


def test_a_delta_stream_also_reads_as_text() -> None:
    async def main() -> None:
        s = stream()
        s.push(Delta("a", (1,), (TokenLogprob(-1.0),)), 0.0)
        s.push(Delta("b", (2,), (TokenLogprob(-2.0),)), 0.0)
        finish(s)
        assert [text async for text in s] == ["a", "b"]

    asyncio.run(main())
