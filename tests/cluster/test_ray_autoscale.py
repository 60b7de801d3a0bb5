"""On a fresh cluster: Serve's HTTP proxy as the ingress (``--ingress serve``), then Serve's
autoscaler on a tidegate model: sustained load takes it from one replica to two, idleness
brings it back to ``min_replicas``."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.serverproc import ServerProcess, run_server

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

MODEL = "minilm-auto"
CONFIG = f"""
[[models]]
id = "{MODEL}"
runtime = "embedding"
[models.scaling]
min_replicas = 1
max_replicas = 2
target_ongoing_requests = 1
upscale_delay_s = 1
downscale_delay_s = 3
look_back_period_s = 1
num_cpus = 0.5
"""


@pytest.fixture(scope="module")
def on_ray(cluster: Any, tmp_path_factory: pytest.TempPathFactory,
           cache_dir: Path) -> Iterator[ServerProcess]:
    with run_server(tmp_path_factory.mktemp("autoscale"), CONFIG, cache_dir,
                    args=("--ray", cluster.address), wait_s=240) as server:
        yield server


def test_serves_proxy_can_be_the_ingress(cluster: Any, tmp_path: Path, cache_dir: Path) -> None:
    """First in this module: Serve's HTTP settings are fixed by whoever starts Serve."""
    config = '[[models]]\nid = "via-proxy"\n[models.scaling]\nnum_cpus = 0\n'
    args = ("--ray", cluster.address, "--ingress", "serve", "--ray-app", "proxied")
    with run_server(tmp_path, config, cache_dir, args=args, wait_s=240) as server:
        answer = httpx.post(server.url + "/v1/embeddings",
                            json={"model": "via-proxy", "input": ["one", "two"]}, timeout=30)
        assert answer.status_code == 200
        assert [len(item["embedding"]) for item in answer.json()["data"]] == [384, 384]
        missing = httpx.post(server.url + "/v1/embeddings", json={"model": "nope", "input": "x"},
                             timeout=30)
        assert missing.status_code == 404
        assert missing.json()["error"]["code"] == "model_not_found"
        card = httpx.get(server.url + "/v1/models/via-proxy", timeout=10).json()
        assert card["replicas"] == 1 and card["status"] == "loaded"
        assert server.stop() == 0
    assert "applications removed" in server.log()


def test_a_lazy_model_starts_at_zero_replicas_wakes_on_a_request_and_obeys_the_admin(
        cluster: Any, tmp_path: Path, cache_dir: Path) -> None:
    config = '[[models]]\nid = "sleepy"\npreload = "lazy"\n[models.scaling]\nnum_cpus = 0\n'
    args = ("--ray", cluster.address, "--ray-app", "lazy")
    with run_server(tmp_path, config, cache_dir, args=args, wait_s=240) as server:
        ready = httpx.get(server.url + "/health/ready", timeout=10).json()
        assert ready == {"status": "ready", "replicas": {"sleepy": 0}}  # need not wait for it
        card = httpx.get(server.url + "/v1/models/sleepy", timeout=10).json()
        assert (card["replicas"], card["status"]) == (0, "unloaded")
        answer = httpx.post(server.url + "/v1/embeddings",
                            json={"model": "sleepy", "input": "wake up"}, timeout=60)
        assert answer.status_code == 200
        deadline = time.monotonic() + 10  # the new replica's first report
        while _replicas_of(server, "sleepy") != 1 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _replicas_of(server, "sleepy") == 1
        # The admin routes: unload takes every replica away (requests get 503 at once),
        # load deploys them again.
        unloaded = httpx.post(server.url + "/admin/models/sleepy/unload", timeout=120)
        assert unloaded.status_code == 200, unloaded.text
        refused = httpx.post(server.url + "/v1/embeddings",
                             json={"model": "sleepy", "input": "x"}, timeout=30)
        assert refused.status_code == 503 and "retry-after" in refused.headers
        assert "POST /admin/models/sleepy/load" in refused.json()["error"]["message"]
        deadline = time.monotonic() + 30
        while _replicas_of(server, "sleepy") != 0 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _replicas_of(server, "sleepy") == 0
        loaded = httpx.post(server.url + "/admin/models/sleepy/load", timeout=120)
        assert loaded.status_code == 200, loaded.text
        assert httpx.post(server.url + "/v1/embeddings", json={"model": "sleepy", "input": "x"},
                          timeout=60).status_code == 200
        assert httpx.post(server.url + "/admin/models/nope/load",
                          timeout=10).status_code == 404


def _replicas_of(server: ServerProcess, model: str) -> int:
    card = httpx.get(f"{server.url}/v1/models/{model}", timeout=10).json()
    return int(card["replicas"])


def _replicas(server: ServerProcess) -> int:
    card = httpx.get(f"{server.url}/v1/models/{MODEL}", timeout=10).json()
    return int(card["replicas"])


def _wait_for(server: ServerProcess, count: int, timeout_s: float) -> list[int]:
    seen = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        seen.append(_replicas(server))
        if seen[-1] == count:
            break
        time.sleep(0.5)
    return seen


def test_load_scales_up_to_max_and_idleness_back_to_min(on_ray: ServerProcess) -> None:
    assert _replicas(on_ray) == 1
    stop = threading.Event()
    answered: list[int] = []

    def client() -> None:
        texts = ["a sentence long enough to keep a replica busy for a moment"] * 32
        with httpx.Client(timeout=30) as http:
            while not stop.is_set():
                r = http.post(on_ray.url + "/v1/embeddings", json={"model": MODEL, "input": texts})
                answered.append(r.status_code)

    clients = [threading.Thread(target=client) for _ in range(6)]
    for thread in clients:
        thread.start()
    try:
        seen = _wait_for(on_ray, 2, timeout_s=90)
    finally:
        stop.set()
        for thread in clients:
            thread.join()
    assert seen[-1] == 2, seen
    assert answered and set(answered) == {200}
    seen = _wait_for(on_ray, 1, timeout_s=90)
    assert seen[-1] == 1, seen
