"""Batching through the real server: correctness under concurrency, overload, disconnects."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from tests.e2e.test_embeddings_api import metric, post_until_dispatched
from tests.serverproc import ServerProcess, run_server

pytestmark = pytest.mark.e2e

MODEL = "all-minilm-l6-v2"
SMALL = "minilm-small-queue"
CONFIG = """
[[models]]
id = "all-minilm-l6-v2"
[models.batching]
max_batch_size = 32

[[models]]
id = "minilm-small-queue"
[models.batching]
max_batch_size = 32
max_queue_items = 64
"""
WORDS = [
    "river", "mountain", "quiet", "engine", "violet", "market", "thunder", "paper", "garden",
    "silver", "clock", "window", "bread", "ocean", "pencil", "forest", "lamp", "cloud", "stone",
]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Iterator[ServerProcess]:
    with run_server(tmp_path_factory.mktemp("batching"), CONFIG, cache_dir) as proc:
        yield proc


def sentences(count: int, seed: int, words: int = 12) -> list[str]:
    rng = random.Random(seed)
    return [f"{i} " + " ".join(rng.choice(WORDS) for _ in range(words)) for i in range(count)]


def test_200_concurrent_requests_each_get_their_own_vectors(
    server: ServerProcess, reference_model: Any
) -> None:
    texts = sentences(200, seed=1)
    # Some requests carry several inputs, so batches mix request sizes.
    groups = [texts[i : i + (1 + i % 3)] for i in range(0, 200, 1)][:60] + [[t] for t in texts]

    async def scenario() -> list[list[list[float]]]:
        limits = httpx.Limits(max_connections=200)
        async with httpx.AsyncClient(base_url=server.url, timeout=120, limits=limits) as http:
            responses = await asyncio.gather(*(
                http.post("/v1/embeddings", json={"model": MODEL, "input": group})
                for group in groups
            ))
        failed = [r.text for r in responses if r.status_code != 200]
        assert not failed, failed[:3]
        return [[d["embedding"] for d in r.json()["data"]] for r in responses]

    results = asyncio.run(scenario())
    reference = dict(zip(texts, reference_model.encode(texts, normalize_embeddings=True),
                         strict=True))
    for group, vectors in zip(groups, results, strict=True):
        assert len(vectors) == len(group)
        for text, vector in zip(group, vectors, strict=True):
            expected = reference[text]
            cos = np.dot(vector, expected) / np.linalg.norm(vector) / np.linalg.norm(expected)
            assert cos >= 0.9999, text
    page = httpx.get(server.url + "/metrics").text
    assert metric(page, "tidegate_batch_size_items_count") < len(groups)  # coalesced


def test_overload_is_429_with_retry_after(server: ServerProcess) -> None:
    heavy = sentences(32, seed=2, words=180)  # 32 inputs x 256 tokens: a long batch

    async def scenario() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as http:
            return list(await asyncio.gather(*(
                http.post("/v1/embeddings", json={"model": SMALL, "input": heavy})
                for _ in range(6)
            )))

    responses = asyncio.run(scenario())
    statuses = sorted(r.status_code for r in responses)
    # One computes, 64 inputs (two requests) fill the queue, the rest are refused.
    assert statuses.count(200) >= 3 and statuses.count(429) >= 1, statuses
    refused = next(r for r in responses if r.status_code == 429)
    assert int(refused.headers["retry-after"]) >= 1
    error = refused.json()["error"]
    assert error["code"] == "overloaded" and "limit 64" in error["message"]
    page = httpx.get(server.url + "/metrics").text
    assert metric(page, "tidegate_rejected_requests_total", SMALL) == statuses.count(429)


def test_client_disconnect_withdraws_queued_inputs(server: ServerProcess) -> None:
    heavy = sentences(64, seed=3, words=180)  # two 32-input batches of 256-token inputs

    async def scenario() -> None:
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as http:
            page = (await http.get("/metrics")).text
            withdrawn = metric(page, "tidegate_withdrawn_items_total")
            busy = await post_until_dispatched(http, heavy)
            # The model is busy with `heavy`; this request queues, then its client gives up.
            with pytest.raises(httpx.ReadTimeout):
                await http.post(
                    "/v1/embeddings", json={"model": MODEL, "input": ["never computed"] * 5},
                    timeout=0.2,
                )
            deadline = asyncio.get_running_loop().time() + 10
            while True:
                text = (await http.get("/metrics")).text
                if metric(text, "tidegate_withdrawn_items_total") == withdrawn + 5:
                    break
                assert asyncio.get_running_loop().time() < deadline, "inputs were not withdrawn"
                await asyncio.sleep(0.01)
            assert (await busy).status_code == 200
            assert metric((await http.get("/metrics")).text, "tidegate_queue_depth_items") == 0

    asyncio.run(scenario())


def test_metrics_expose_batching_series(server: ServerProcess) -> None:
    page = httpx.get(server.url + "/metrics").text
    for series in (
        'tidegate_batch_size_items_bucket{le="1.0",model="all-minilm-l6-v2"}',
        'tidegate_batch_size_tokens_bucket{le="16.0",model="all-minilm-l6-v2"}',
        'tidegate_batch_dispatch_total{model="all-minilm-l6-v2",reason="idle"}',
        'tidegate_batch_dispatch_total{model="all-minilm-l6-v2",reason="timeout"}',
        'tidegate_queue_wait_seconds_count{model="all-minilm-l6-v2"}',
        'tidegate_batch_compute_seconds_count{model="all-minilm-l6-v2"}',
        'tidegate_queue_depth_items{model="all-minilm-l6-v2"}',
        'tidegate_rejected_requests_total{model="all-minilm-l6-v2"}',
    ):
        assert series in page, series
