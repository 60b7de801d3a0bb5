"""Request timeouts through the real server: 504, and queued inputs withdrawn."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from tests.e2e.test_embeddings_api import metric
from tests.serverproc import run_server

pytestmark = pytest.mark.e2e


def test_timed_out_request_is_504_and_its_queued_inputs_are_dropped(
    tmp_path: Path, cache_dir: Path
) -> None:
    log = tmp_path / "events.log"
    config = f"""
[server]
request_timeout_s = 0.5

[[models]]
id = "slow"
runtime = "python"
source = "tests.models.fixture_models:Blob"
options = {{ name = "slow", embed_seconds = 1.5, log = "{log}" }}
[models.batching]
max_batch_size = 1
"""
    with run_server(tmp_path, config, cache_dir) as server:

        async def scenario() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
                first = asyncio.create_task(
                    http.post("/v1/embeddings", json={"model": "slow", "input": "one"}))
                while "embed-start" not in (log.read_text() if log.exists() else ""):
                    await asyncio.sleep(0.01)
                second = await http.post(
                    "/v1/embeddings", json={"model": "slow", "input": ["two", "three"]})
                return [await first, second]

        first, second = asyncio.run(scenario())
        for response in (first, second):
            assert response.status_code == 504
            assert response.json()["error"]["code"] == "timeout"
            assert "timed out after 0.5s" in response.json()["error"]["message"]
        page = httpx.get(server.url + "/metrics").text
        assert metric(page, "tidegate_withdrawn_items_total", "slow") == 2
        # The computing batch finished in its thread; its result was dropped, the model lives on.
        assert log.read_text().count("embed-start") == 1
