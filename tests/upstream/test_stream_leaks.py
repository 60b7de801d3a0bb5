"""Cancelled streams give back everything: pool slots, connections and file descriptors."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator

import pytest
from starlette.background import BackgroundTask
from starlette.responses import StreamingResponse
from starlette.types import Message

from tests.upstream.faulty_upstream import FaultyUpstream, until, upstream_config
from tidegate.upstream.client import UpstreamClient

STREAMS = 1000
WAVE = 50


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def abandon(client: UpstreamClient, style: int) -> None:
    """Open a stream that stalls after its first chunk, and walk away from it."""
    body = {"model": "m", "messages": [], "stream": True}
    stream = await client.open_stream("/v1/chat/completions", body)
    if style == 0:  # the route stops iterating and closes the stream
        assert b"tok0" in await anext(stream)
        await stream.aclose()
    elif style == 1:  # the client disconnects while the relay waits for the next chunk
        got_first = asyncio.Event()

        async def relay() -> None:
            async with stream:
                async for _ in stream:
                    got_first.set()

        task = asyncio.create_task(relay())
        await got_first.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    else:  # the relay is cancelled mid-read, and only then closed by its owner
        assert b"tok0" in await anext(stream)
        reader = asyncio.create_task(anext(stream))
        await asyncio.sleep(0)
        reader.cancel()
        with pytest.raises(asyncio.CancelledError):
            await reader
        await stream.aclose()


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts /proc/self/fd")
def test_a_thousand_cancelled_streams_leak_nothing() -> None:
    with FaultyUpstream() as upstream:
        upstream.stall_after = 1
        upstream.stream_chunks = 3

        async def scenario() -> None:
            config = upstream_config(upstream.url, pool={"max_connections": 64})
            async with UpstreamClient(config, model="m") as client:
                baseline = open_fds()
                for wave in range(STREAMS // WAVE):
                    await asyncio.gather(*(
                        abandon(client, (wave * WAVE + i) % 3) for i in range(WAVE)
                    ))
                pool = client.statistics().replicas[0]
                assert pool.in_flight == 0
                assert pool.connections_active == 0
                # A half-read response cannot be reused: every connection was discarded.
                assert pool.opened == STREAMS
                assert pool.closed == STREAMS
                assert pool.connections_idle == 0
                # Both ends (the fake upstream is in this process) release their sockets.
                await until(lambda: open_fds() <= baseline, timeout_s=10,
                            what=f"open descriptors back to {baseline}")
                assert upstream.hits["/v1/chat/completions"] == STREAMS

        asyncio.run(scenario())


def test_a_starlette_relay_closes_the_upstream_when_its_client_disconnects() -> None:
    """The wiring the routes should use: StreamingResponse over the stream, closed on exit."""
    with FaultyUpstream() as upstream:
        upstream.stall_after = 1

        async def scenario() -> None:
            async with UpstreamClient(upstream_config(upstream.url), model="m") as client:
                stream = await client.open_stream(
                    "/v1/chat/completions", {"messages": [], "stream": True}
                )

                async def relay() -> AsyncIterator[bytes]:
                    async with stream:
                        async for chunk in stream:
                            yield chunk

                response = StreamingResponse(
                    relay(), media_type=stream.media_type, background=BackgroundTask(stream.aclose)
                )
                sent: list[Message] = []
                first_chunk_sent = asyncio.Event()

                async def receive() -> Message:
                    await first_chunk_sent.wait()
                    return {"type": "http.disconnect"}

                async def send(message: Message) -> None:
                    sent.append(message)
                    if message.get("body"):
                        first_chunk_sent.set()

                scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}}
                await response(scope, receive, send)
                assert b"tok0" in sent[1]["body"]
                pool = client.statistics().replicas[0]
                assert (pool.in_flight, pool.connections_active, pool.closed) == (0, 0, 1)

        asyncio.run(scenario())
