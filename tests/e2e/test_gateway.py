"""The upstream gateway end to end: a real tidegate (MiniLM) as upstream, a fault-injecting
upstream, and the official openai client pointed at the gateway."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest

from tests.e2e.test_embeddings_api import metric
from tests.serverproc import ServerProcess, run_server
from tests.upstream.faulty_upstream import FaultyUpstream, refused_url, vector_for

pytestmark = pytest.mark.e2e

MINILM = "all-minilm-l6-v2"


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path
             ) -> Iterator[ServerProcess]:
    with run_server(tmp_path_factory.mktemp("upstream"), "", cache_dir) as proc:
        yield proc


@pytest.fixture(scope="module")
def faulty() -> Iterator[tuple[FaultyUpstream, FaultyUpstream]]:
    with FaultyUpstream("one") as one, FaultyUpstream("two") as two:
        yield one, two


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path, upstream: ServerProcess,
            faulty: tuple[FaultyUpstream, FaultyUpstream]) -> Iterator[ServerProcess]:
    one, two = faulty
    config = f"""
[[models]]
id = "{MINILM}"
runtime = "remote"
upstreams = ["{upstream.url}"]
[models.upstream.health]
path = "/health/ready"
interval_s = 0.2

[[models]]
id = "faulty"
runtime = "remote"
upstreams = ["{one.url}", "{two.url}"]
upstream_model = "fake"
api_key_env = "TIDEGATE_TEST_UPSTREAM_KEY"
[models.upstream.health]
interval_s = 0.2
[models.batching]
max_batch_size = 64

[[models]]
id = "dead"
runtime = "remote"
upstreams = ["{refused_url()}"]
[models.upstream.health]
path = "/health"
interval_s = 60
"""
    os.environ["TIDEGATE_TEST_UPSTREAM_KEY"] = "sk-test"
    with run_server(tmp_path_factory.mktemp("gateway"), config, cache_dir) as proc:
        yield proc


def test_openai_client_through_the_gateway_equals_direct(
    gateway: ServerProcess, upstream: ServerProcess
) -> None:
    texts = ["a cat sits on the mat", "stock markets fell sharply today"]
    with openai.OpenAI(base_url=gateway.url + "/v1", api_key="x", max_retries=0) as via, \
            openai.OpenAI(base_url=upstream.url + "/v1", api_key="x", max_retries=0) as direct:
        relayed = via.embeddings.create(model=MINILM, input=texts)
        reference = direct.embeddings.create(model=MINILM, input=texts)
    for got, want in zip(relayed.data, reference.data, strict=True):
        assert np.allclose(got.embedding, want.embedding, atol=1e-6)
    assert relayed.model == MINILM


def test_dimensions_is_refused_for_remote_models(gateway: ServerProcess) -> None:
    response = httpx.post(gateway.url + "/v1/embeddings", timeout=30,
                          json={"model": MINILM, "input": "x", "dimensions": 128})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "dimensions"


def test_models_show_upstream_health(gateway: ServerProcess) -> None:
    cards = {m["id"]: m for m in httpx.get(gateway.url + "/v1/models").json()["data"]}
    replicas = cards[MINILM]["upstream"]["replicas"]
    assert replicas[0]["status"] == "healthy"
    assert cards["faulty"]["upstream"]["upstream_model"] == "fake"


def test_single_requests_are_coalesced_into_list_calls(
    gateway: ServerProcess, faulty: tuple[FaultyUpstream, FaultyUpstream]
) -> None:
    one, two = faulty
    before = one.hits["/v1/embeddings"] + two.hits["/v1/embeddings"]
    sent = one.inputs_received + two.inputs_received
    texts = [f"text number {i}" for i in range(60)]
    one.hold()
    two.hold()

    async def scenario() -> list[list[float]]:
        async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as http:
            tasks = [asyncio.create_task(
                http.post("/v1/embeddings", json={"model": "faulty", "input": t}))
                for t in texts]
            await one.wait_hits("/v1/embeddings", one.hits["/v1/embeddings"] + 1)
            # Release only once every request reached the gateway: held in an upstream call
            # or queued behind the calls in flight.
            async with asyncio.timeout(20):
                while True:
                    page = (await http.get("/metrics")).text
                    queued = metric(page, "tidegate_queue_depth_items", "faulty")
                    if queued + one.inputs_received + two.inputs_received - sent >= len(texts):
                        break
                    await asyncio.sleep(0.01)
            one.release()
            two.release()
            responses = await asyncio.gather(*tasks)
        return [r.json()["data"][0]["embedding"] for r in responses]

    vectors = asyncio.run(scenario())
    assert vectors == [vector_for(t) for t in texts]  # each request got its own, in order
    calls = one.hits["/v1/embeddings"] + two.hits["/v1/embeddings"] - before
    assert calls < len(texts) / 4
    assert one.last_headers.get("authorization") == "Bearer sk-test"


def test_retry_on_503_goes_to_the_other_replica(
    gateway: ServerProcess, faulty: tuple[FaultyUpstream, FaultyUpstream]
) -> None:
    one, _ = faulty
    one.status = 503
    try:
        with openai.OpenAI(base_url=gateway.url + "/v1", api_key="x", max_retries=0) as client:
            for _ in range(4):
                reply = client.chat.completions.create(
                    model="faulty", messages=[{"role": "user", "content": "hi"}])
                assert reply.choices[0].message.content == "hello"
                assert reply.model == "faulty"  # tidegate's name, not the replica's "fake"
    finally:
        one.status = None


def test_upstream_errors_map_to_502_with_detail(
    gateway: ServerProcess, faulty: tuple[FaultyUpstream, FaultyUpstream]
) -> None:
    one, two = faulty
    one.status = two.status = 500
    one.detail = two.detail = "the GPU caught fire"
    try:
        response = httpx.post(gateway.url + "/v1/chat/completions", timeout=30, json={
            "model": "faulty", "messages": [{"role": "user", "content": "hi"}]})
    finally:
        one.status = two.status = None
    assert response.status_code == 502
    assert "the GPU caught fire" in response.json()["error"]["message"]
    dead = httpx.post(gateway.url + "/v1/embeddings", json={"model": "dead", "input": "x"},
                      timeout=30)
    assert dead.status_code in (502, 503)


def test_stream_relayed_with_the_openai_client(gateway: ServerProcess) -> None:
    with openai.OpenAI(base_url=gateway.url + "/v1", api_key="x", max_retries=0) as client:
        chunks = list(client.chat.completions.create(
            model="faulty", messages=[{"role": "user", "content": "hi"}], stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "tok0 tok1 tok2 "


def test_stream_disconnect_returns_the_upstream_connection(
    gateway: ServerProcess, faulty: tuple[FaultyUpstream, FaultyUpstream]
) -> None:
    one, two = faulty
    one.stall_after = two.stall_after = 1
    body = {"model": "faulty", "stream": True, "messages": [{"role": "user", "content": "hi"}]}

    async def scenario() -> None:
        async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as http:
            for _ in range(20):
                async with http.stream("POST", "/v1/chat/completions", json=body) as response:
                    async for _ in response.aiter_bytes():
                        break  # first chunk arrived; hang up while the upstream stalls
            for _ in range(500):
                page = (await http.get("/metrics")).text
                in_use = sum(float(line.split()[-1]) for line in page.splitlines()
                             if line.startswith('tidegate_upstream_in_use{model="faulty"'))
                if in_use == 0:
                    return
                await asyncio.sleep(0.01)
            raise AssertionError(f"upstream connections still in use: {in_use}")

    try:
        asyncio.run(scenario())
    finally:
        one.stall_after = two.stall_after = None


def test_connection_reuse_under_steady_load(gateway: ServerProcess) -> None:
    async def scenario() -> None:
        async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as http:
            for _ in range(25):
                await asyncio.gather(*(http.post(
                    "/v1/embeddings", json={"model": MINILM, "input": f"hello {i}"})
                    for i in range(8)))

    asyncio.run(scenario())
    page = httpx.get(gateway.url + "/metrics").text

    def total(name: str) -> float:
        prefix = f'{name}{{model="{MINILM}"'
        return sum(float(line.split()[-1]) for line in page.splitlines()
                   if line.startswith(prefix))

    opened = total("tidegate_upstream_connections_opened_total")
    requests = total("tidegate_upstream_requests_total")
    # At most max_concurrent_batches (8 for remote models) upstream calls are ever in flight,
    # so no more connections than that are opened; every later call reuses one.
    assert opened <= 8, (opened, requests)
    assert requests >= 25 and 1 - opened / requests >= 0.85, (opened, requests)
    assert metric(page, "tidegate_batch_size_items_count", MINILM) > 0
