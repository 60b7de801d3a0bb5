"""UpstreamClient against real replicas: routing, retries, error mapping, relay, embeddings."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import orjson
import pytest

import tidegate
from tests.upstream.faulty_upstream import FaultyUpstream, refused_url, upstream_config, vector_for
from tidegate.errors import (
    TidegateError,
    UpstreamBadGateway,
    UpstreamRejected,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from tidegate.upstream.client import UpstreamClient, UpstreamStream

CHAT = "/v1/chat/completions"
EMBED = "/v1/embeddings"


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    async def main() -> None:
        async with asyncio.timeout(60):
            await scenario()

    asyncio.run(main())


def chat(stream: bool = False) -> dict[str, object]:
    return {"model": "tidegate-id", "messages": [{"role": "user", "content": "hi"}],
            "stream": stream}


async def drain(stream: UpstreamStream) -> list[bytes]:
    async with stream:
        return [chunk async for chunk in stream]


def test_requests_go_to_the_replica_with_fewest_outstanding() -> None:
    with FaultyUpstream("a") as a, FaultyUpstream("b") as b:
        async def scenario() -> None:
            async with UpstreamClient(upstream_config(a.url, b.url), model="m") as client:
                a.hold()
                b.hold()
                # Idle replicas share the load by rotation.
                held = [asyncio.create_task(client.embed_batch(["x"])) for _ in range(2)]
                await a.wait_hits(EMBED, 1)
                await b.wait_hits(EMBED, 1)
                b.release()
                await until_done(held, 1)
                # a still has one outstanding, b none: the next three all go to b.
                for _ in range(3):
                    await client.embed_batch(["y"])
                assert (a.hits[EMBED], b.hits[EMBED]) == (1, 4)
                a.release()
                await asyncio.gather(*held)
                assert [r.in_flight for r in client.statistics().replicas] == [0, 0]

        run(scenario)


async def until_done(tasks: list[asyncio.Task[list[list[float]]]], count: int,
                     timeout_s: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while sum(t.done() for t in tasks) < count:
        left = deadline - asyncio.get_running_loop().time()
        assert left > 0, f"{sum(t.done() for t in tasks)} of {count} tasks done after {timeout_s}s"
        await asyncio.wait(tasks, timeout=left, return_when=asyncio.FIRST_COMPLETED)


def test_connect_errors_are_retried_on_another_replica() -> None:
    with FaultyUpstream() as good:
        async def scenario() -> None:
            dead = refused_url()
            async with UpstreamClient(upstream_config(dead, good.url), model="m") as client:
                vectors = await client.embed_batch(["a", "bb"])  # tried on `dead` first
                assert vectors == [vector_for("a"), vector_for("bb")]
                stats = client.statistics()
                assert stats.retries == 1
                assert stats.failures == {"connect": 1}
                assert client.describe()["replicas"][0]["consecutive_failures"] == 1

        run(scenario)


def test_a_503_is_retried_on_another_replica() -> None:
    with FaultyUpstream("a") as a, FaultyUpstream("b") as b:
        async def scenario() -> None:
            a.status = 503
            async with UpstreamClient(upstream_config(a.url, b.url), model="m") as client:
                answer = await client.request_json(CHAT, chat())
                assert answer["choices"][0]["message"]["content"] == "hello"
                assert (a.hits[CHAT], b.hits[CHAT]) == (1, 1)
                assert client.statistics().retries == 1

        run(scenario)


def test_retries_stop_at_max_retries_and_report_the_last_failure() -> None:
    with FaultyUpstream("a") as a, FaultyUpstream("b") as b, FaultyUpstream("c") as c:
        async def scenario() -> None:
            for replica in (a, b, c):
                replica.status = 502
                replica.detail = f"{replica.name} is restarting"
            config = upstream_config(a.url, b.url, c.url, retry={"max_retries": 1})
            async with UpstreamClient(config, model="m") as client:
                with pytest.raises(UpstreamBadGateway) as caught:
                    await client.request_json(CHAT, chat())
                assert caught.value.status == 502
                assert caught.value.upstream_status == 502
                assert "b is restarting" in str(caught.value)
                assert (a.hits[CHAT], b.hits[CHAT], c.hits[CHAT]) == (1, 1, 0)

        run(scenario)


def test_an_exhausted_retry_budget_stops_retries() -> None:
    with FaultyUpstream("a") as a, FaultyUpstream("b") as b:
        async def scenario() -> None:
            a.status = b.status = 503
            config = upstream_config(a.url, b.url, retry={"budget_burst": 1, "budget_ratio": 0})
            async with UpstreamClient(config, model="m") as client:
                for _ in range(3):
                    with pytest.raises(UpstreamUnavailable):
                        await client.request_json(CHAT, chat())
                stats = client.statistics()
                assert stats.retries == 1
                assert stats.retries_refused_by_budget == 2
                assert a.hits[CHAT] + b.hits[CHAT] == 4

        run(scenario)


def test_upstream_5xx_maps_to_502_with_the_upstreams_detail() -> None:
    with FaultyUpstream() as upstream:
        async def scenario() -> None:
            upstream.status = 500
            upstream.detail = "CUDA out of memory. Tried to allocate 2.00 GiB"
            async with UpstreamClient(upstream_config(upstream.url), model="llama") as client:
                with pytest.raises(UpstreamBadGateway) as caught:
                    await client.request_json(CHAT, chat())
            error = caught.value
            assert isinstance(error, TidegateError)
            assert error.status == 502
            assert error.detail == "CUDA out of memory. Tried to allocate 2.00 GiB"
            assert error.replica == upstream.url
            assert str(error) == (f"Upstream of model 'llama' at {upstream.url} answered 500: "
                                  "CUDA out of memory. Tried to allocate 2.00 GiB")
            assert upstream.hits[CHAT] == 1  # a 500 is not retried

        run(scenario)


def test_upstream_504_and_a_silent_replica_map_to_504() -> None:
    with FaultyUpstream() as upstream:
        async def scenario() -> None:
            config = upstream_config(upstream.url, timeouts={"read_s": 0.2})
            async with UpstreamClient(config, model="m") as client:
                upstream.status = 504
                upstream.detail = "gateway timeout from the replica's own proxy"
                with pytest.raises(UpstreamTimeout, match="own proxy") as caught:
                    await client.request_json(CHAT, chat())
                assert caught.value.status == 504
                upstream.status = None
                upstream.hold()
                with pytest.raises(UpstreamTimeout, match=r"read timeout is 0\.2s") as caught:
                    await client.request_json(CHAT, chat())
                assert caught.value.status == 504
                assert caught.value.upstream_status is None

        run(scenario)


def test_a_connection_dropped_mid_body_maps_to_502_without_retry() -> None:
    with FaultyUpstream("a") as a, FaultyUpstream("b") as b:
        async def scenario() -> None:
            a.drop_body = True
            async with UpstreamClient(upstream_config(a.url, b.url), model="m") as client:
                with pytest.raises(UpstreamBadGateway, match="broke the connection"):
                    await client.request_json(CHAT, chat())
                assert (a.hits[CHAT], b.hits[CHAT]) == (1, 0)

        run(scenario)


def test_client_errors_are_relayed_and_credential_errors_are_tidegates() -> None:
    with FaultyUpstream() as upstream:
        async def scenario() -> None:
            config = upstream_config(upstream.url, api_key_env="TG_UPSTREAM_KEY")
            async with UpstreamClient(config, model="m", api_key="k") as client:
                upstream.status = 400
                upstream.detail = "'messages' must not be empty"
                with pytest.raises(UpstreamRejected) as rejected:
                    await client.request_json(CHAT, chat())
                assert rejected.value.status == 400
                assert str(rejected.value) == "'messages' must not be empty"
                assert rejected.value.code == "injected"
                upstream.status = 401
                with pytest.raises(UpstreamBadGateway, match=r"\$TG_UPSTREAM_KEY") as bad:
                    await client.request_json(CHAT, chat())
                assert bad.value.status == 502
                assert client.health.healthy() == [True]

        run(scenario)


def test_the_api_key_and_upstream_model_name_are_sent() -> None:
    with FaultyUpstream() as upstream:
        async def scenario() -> None:
            config = upstream_config(upstream.url, upstream_model="meta-llama/Llama-3.1-8B")
            async with UpstreamClient(config, model="llama", api_key="sk-test") as client:
                await client.request_json(CHAT, chat())
            assert upstream.last_headers["authorization"] == "Bearer sk-test"
            assert upstream.last_headers["user-agent"] == f"tidegate/{tidegate.__version__}"
            assert upstream.last_body["model"] == "meta-llama/Llama-3.1-8B"
            assert repr(client).count("sk-test") == 0

        run(scenario)


def test_embed_batch_makes_one_request_and_returns_vectors_in_order() -> None:
    with FaultyUpstream() as upstream:
        async def scenario() -> None:
            texts = [f"text number {i}" * (i + 1) for i in range(17)]
            async with UpstreamClient(upstream_config(upstream.url), model="m") as client:
                vectors = await client.embed_batch(texts)
                assert await client.embed_batch([]) == []
            assert vectors == [vector_for(t) for t in texts]
            assert upstream.hits[EMBED] == 1
            assert upstream.last_body["input"] == texts

        run(scenario)


def test_stream_chunks_are_relayed_before_the_upstream_finishes() -> None:
    with FaultyUpstream() as upstream:
        async def scenario() -> None:
            upstream.stream_chunks = 4
            upstream.hold()  # streams pause after their first chunk until released
            async with UpstreamClient(upstream_config(upstream.url), model="m") as client:
                stream = await client.open_stream(CHAT, chat(stream=True))
                assert stream.status_code == 200
                assert stream.media_type is not None
                assert stream.media_type.startswith("text/event-stream")
                first = await anext(stream)
                assert first.startswith(b"data: ") and b"tok0" in first
                assert upstream.finished[CHAT] == 0
                upstream.release()
                rest = await drain(stream)
            events = b"".join([first, *rest]).split(b"\n\n")
            payloads = [e.removeprefix(b"data: ") for e in events if e]
            assert payloads[-1] == b"[DONE]"
            tokens = [orjson.loads(p)["choices"][0]["delta"]["content"] for p in payloads[:-1]]
            assert tokens == ["tok0 ", "tok1 ", "tok2 ", "tok3 "]
            assert upstream.finished[CHAT] == 1

        run(scenario)


def test_a_stream_is_never_retried_once_it_started() -> None:
    with FaultyUpstream("a") as a, FaultyUpstream("b") as b:
        async def scenario() -> None:
            a.drop_after = 2
            async with UpstreamClient(upstream_config(a.url, b.url), model="m") as client:
                stream = await client.open_stream(CHAT, chat(stream=True))
                assert stream.replica == a.url
                received = []
                with pytest.raises(UpstreamBadGateway, match="bytes were relayed") as caught:
                    async for chunk in stream:
                        received.append(chunk)
                assert b"tok1" in b"".join(received)
                assert caught.value.status == 502
                assert (a.hits[CHAT], b.hits[CHAT]) == (1, 0)
                stats = client.statistics()
                assert stats.retries == 0
                assert stats.replicas[0].in_flight == 0

        run(scenario)


def test_a_stream_that_fails_before_its_first_byte_raises_at_open() -> None:
    with FaultyUpstream("a") as a, FaultyUpstream("b") as b:
        async def scenario() -> None:
            a.status = 503
            b.drop_after = 0
            async with UpstreamClient(upstream_config(a.url, b.url), model="m") as client:
                with pytest.raises(UpstreamBadGateway, match="broke the connection") as caught:
                    await client.open_stream(CHAT, chat(stream=True))
                assert "relayed" not in str(caught.value)
                assert (a.hits[CHAT], b.hits[CHAT]) == (1, 1)  # the 503 was retried on b
                assert [r.in_flight for r in client.statistics().replicas] == [0, 0]

        run(scenario)


def test_a_stalled_stream_times_out_with_504() -> None:
    with FaultyUpstream() as upstream:
        async def scenario() -> None:
            upstream.stall_after = 1
            config = upstream_config(upstream.url, timeouts={"read_s": 0.2})
            async with UpstreamClient(config, model="m") as client:
                stream = await client.open_stream(CHAT, chat(stream=True))
                assert b"tok0" in await anext(stream)
                with pytest.raises(UpstreamTimeout):
                    await anext(stream)
                with pytest.raises(StopAsyncIteration):
                    await anext(stream)
                assert client.statistics().replicas[0].in_flight == 0

        run(scenario)


def test_describe_reports_each_replica() -> None:
    with FaultyUpstream() as upstream:
        async def scenario() -> None:
            dead = refused_url()
            config = upstream_config(dead, upstream.url, upstream_model="served-name",
                                     health={"eject_after_failures": 1})
            async with UpstreamClient(config, model="m") as client:
                await client.embed_batch(["x"])
                card = client.describe()
            assert card["status"] == "ready"
            assert card["upstream_model"] == "served-name"
            assert [r["url"] for r in card["replicas"]] == [dead, upstream.url]
            assert [r["status"] for r in card["replicas"]] == ["ejected", "healthy"]
            assert "unreachable" in card["replicas"][0]["last_error"]
            assert card["replicas"][1]["in_flight"] == 0

        run(scenario)


def test_an_upstream_503_keeps_its_retry_after() -> None:
    with FaultyUpstream() as upstream:
        async def scenario() -> None:
            upstream.status = 503
            upstream.retry_after = "7"
            async with UpstreamClient(upstream_config(upstream.url), model="m") as client:
                with pytest.raises(UpstreamUnavailable) as caught:
                    await client.request_json(CHAT, chat())
            assert caught.value.retry_after_s == 7
            assert caught.value.status == 503

        run(scenario)
