"""``tidegate serve --ray`` on a simulated three-node cluster: replicas spread over the workers,
answers equal to single-process tidegate's, keys and limits at the ingress, one /metrics, a
client's disconnect cancelling the replica's sequence, and a worker's loss survived."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest

from tests.serverproc import ServerProcess, run_server

# A Ray deployment takes tens of seconds to come up on 2 cores.
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

EMBED = "minilm"
CHAT = "tiny-llama"
KEY = "tg-test-key-ray"
LIMITED = "tg-test-key-limited"
SENTENCES = ["The quick brown fox jumps over the lazy dog.", "tidegate scales out on Ray.",
             "Zürich, déjà vu, 日本語 🙂"]
MESSAGES = [{"role": "user", "content": "The quick brown fox"}]


def _models(llama_dir: Path, *, ray: bool) -> str:
    scaling = ""
    chat_scaling = ""
    if ray:
        # Two replicas of half a CPU each: one per worker, and room on a surviving worker for
        # a lost one's replacement. The tiny chat model asks for no CPU, so it never competes.
        scaling = "[models.scaling]\nreplicas = 2\nnum_cpus = 0.5\n"
        chat_scaling = "[models.scaling]\nreplicas = 1\nnum_cpus = 0\n"
    return f"""
[[models]]
id = "{EMBED}"
runtime = "embedding"
{scaling}
[[models]]
id = "{CHAT}"
runtime = "causal-lm"
source = "{llama_dir}"
backend = "torch"
precision = "fp32"
[models.generation]
max_num_seqs = 4
{chat_scaling}
"""


def _keys() -> str:
    from tidegate.auth.keyring import hash_key

    return f"""
[[auth.keys]]
id = "team-a"
hash = "{hash_key(KEY)}"

[[auth.keys]]
id = "limited"
hash = "{hash_key(LIMITED)}"
models = ["{EMBED}"]
requests_per_minute = 2
"""


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path,
              llama_dir: Path) -> Iterator[ServerProcess]:
    """Single-process tidegate with the same models: the answers the cluster must give."""
    with run_server(tmp_path_factory.mktemp("single"), _models(llama_dir, ray=False),
                    cache_dir) as server:
        yield server


@pytest.fixture(scope="module")
def on_ray(cluster: Any, tmp_path_factory: pytest.TempPathFactory, cache_dir: Path,
           llama_dir: Path, reference: ServerProcess) -> Iterator[ServerProcess]:
    config = "[server]\nrequest_timeout_s = 20\n" + _keys() + _models(llama_dir, ray=True)
    with run_server(tmp_path_factory.mktemp("ray"), config, cache_dir,
                    args=("--ray", cluster.address), wait_s=240) as server:
        yield server


def _client(server: ServerProcess, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=30)


def _cards(server: ServerProcess) -> dict[str, dict[str, Any]]:
    data = httpx.get(server.url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"},
                     timeout=10).json()["data"]
    return {card["id"]: card for card in data}


def _worker_ids(cluster: Any) -> set[str]:
    return {node.node_id for node in cluster.worker_nodes}


def test_two_replicas_run_one_on_each_worker(on_ray: ServerProcess, cluster: Any) -> None:
    card = _cards(on_ray)[EMBED]
    assert card["replicas"] == 2
    assert set(card["replica_nodes"]) == _worker_ids(cluster)
    assert card["status"] == "loaded"


def test_embeddings_match_single_process_tidegate(on_ray: ServerProcess,
                                                  reference: ServerProcess) -> None:
    got = _client(on_ray).embeddings.create(model=EMBED, input=SENTENCES)
    want = _client(reference).embeddings.create(model=EMBED, input=SENTENCES)
    assert got.usage.prompt_tokens == want.usage.prompt_tokens
    for a, b in zip(got.data, want.data, strict=True):
        u, v = np.asarray(a.embedding), np.asarray(b.embedding)
        assert float(u @ v / np.linalg.norm(u) / np.linalg.norm(v)) >= 0.9999


def test_streamed_chat_matches_single_process_tidegate(on_ray: ServerProcess,
                                                       reference: ServerProcess) -> None:
    def stream(server: ServerProcess) -> tuple[str, int, str | None]:
        chunks = list(_client(server).chat.completions.create(
            model=CHAT, messages=MESSAGES, max_tokens=12, temperature=0, stream=True))  # type: ignore[arg-type]
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        reasons = [c.choices[0].finish_reason for c in chunks if c.choices]
        return text, len(chunks), reasons[-1]

    text, count, reason = stream(on_ray)
    assert (text, reason) == stream(reference)[::2]
    assert text and count > 3  # token by token, not one buffered chunk


def test_keys_are_checked_at_the_ingress(on_ray: ServerProcess) -> None:
    url = on_ray.url + "/v1/embeddings"
    body = {"model": EMBED, "input": "hi"}
    missing = httpx.post(url, json=body, timeout=10)
    assert missing.status_code == 401
    assert missing.json()["error"]["code"] == "invalid_api_key"
    limited = {"Authorization": f"Bearer {LIMITED}"}
    forbidden = httpx.post(url, json={"model": CHAT, "input": "hi"}, headers=limited, timeout=10)
    assert forbidden.status_code == 404
    assert forbidden.json()["error"]["code"] == "model_not_found"
    statuses = [httpx.post(url, json=body, headers=limited, timeout=10) for _ in range(3)]
    assert [r.status_code for r in statuses] == [200, 200, 429]
    assert statuses[0].headers["x-ratelimit-limit-requests"] == "2"
    assert statuses[2].json()["error"]["code"] == "rate_limit_exceeded"
    assert "retry-after" in statuses[2].headers
    models = httpx.get(on_ray.url + "/v1/models", headers=limited, timeout=10).json()
    assert [card["id"] for card in models["data"]] == [EMBED]


def _tokens(server: ServerProcess, kind: str | None = None) -> float:
    """team-a's tokens charged (of one kind, or all)."""
    text = httpx.get(server.url + "/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("tidegate_api_key_tokens_total") and 'key="team-a"' in line
               and (kind is None or f'kind="{kind}"' in line))


def test_streams_are_charged_their_usage_without_showing_it(on_ray: ServerProcess) -> None:
    def tokens() -> float:
        return _tokens(on_ray)

    before = tokens()
    chunks = list(_client(on_ray).chat.completions.create(
        model=CHAT, messages=MESSAGES, max_tokens=5, stream=True))  # type: ignore[arg-type]
    assert all(chunk.usage is None for chunk in chunks)  # not asked for: not shown
    deadline = time.monotonic() + 10
    while tokens() == before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert tokens() > before


def test_one_metrics_page_labels_each_replica(on_ray: ServerProcess) -> None:
    _client(on_ray).embeddings.create(model=EMBED, input=SENTENCES)
    deadline = time.monotonic() + 15
    while True:
        text = httpx.get(on_ray.url + "/metrics", timeout=10).text
        replicas = {line.split('replica="', 1)[1].split('"', 1)[0]
                    for line in text.splitlines()
                    if line.startswith("tidegate_batch_size_items_count")
                    and f'model="{EMBED}"' in line}
        if len(replicas) == 2 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert len(replicas) == 2 and "ingress" not in replicas
    assert 'replica="ingress"' in text  # the ingress's own series (keys, routes)


def test_a_disconnect_cancels_the_replicas_sequence(on_ray: ServerProcess) -> None:
    def finished(reason: str) -> float:
        text = httpx.get(on_ray.url + "/metrics", timeout=10).text
        prefix = "tidegate_generation_finished_total{"
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith(prefix) and f'reason="{reason}"' in line)

    aborted = finished("abort")  # no earlier test here ends a stream early: a settled count
    prompt_before = _tokens(on_ray, "prompt")
    headers = {"Authorization": f"Bearer {KEY}"}
    body = {"model": CHAT, "messages": MESSAGES, "max_tokens": 240, "stream": True,
            "ignore_eos": True}
    with httpx.stream("POST", on_ray.url + "/v1/chat/completions", json=body, headers=headers,
                      timeout=30) as response:
        assert response.status_code == 200
        prompt = int(response.headers["x-tidegate-prompt-tokens"])  # the replica's, relayed
        next(line for line in response.iter_lines() if '"content":"' in line)
    deadline = time.monotonic() + 10
    while finished("abort") == aborted and time.monotonic() < deadline:
        time.sleep(0.1)
    assert finished("abort") == aborted + 1  # cancelled, not run to its 240 tokens
    # Hung up before the usage event, the key is still charged the prompt.
    while _tokens(on_ray, "prompt") == prompt_before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert prompt > 0 and _tokens(on_ray, "prompt") == prompt_before + prompt


# Importing ray.serve here (to read its status) trips pydantic deprecations in Ray's own models.
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_a_second_deployment_gets_its_own_name_and_is_removed_on_sigint(
        on_ray: ServerProcess, cluster: Any, tmp_path: Path, cache_dir: Path) -> None:
    config = '[[models]]\nid = "solo"\n[models.scaling]\nnum_cpus = 0\n'
    clash = tmp_path / "clash"
    clash.mkdir()
    with run_server(clash, config, cache_dir, args=("--ray", cluster.address),
                    wait=None) as server:
        assert server.proc.wait(timeout=120) == 2  # on_ray already runs as "tidegate"
    assert "another 'tidegate serve --ray' runs under the name 'tidegate'" in server.log()
    with run_server(tmp_path, config, cache_dir,
                    args=("--ray", cluster.address, "--ray-app", "second"),
                    wait_s=240) as server:
        assert httpx.post(server.url + "/v1/embeddings", json={"model": "solo", "input": "x"},
                          timeout=30).status_code == 200
        assert server.stop() == 0
    assert "applications removed" in server.log()
    import ray
    from ray import serve

    ray.init(address=cluster.address)
    applications = serve.status().applications
    assert "second.solo" not in applications
    assert "tidegate.minilm" in applications  # the other deployment is untouched
    assert _cards(on_ray)[EMBED]["replicas"] == 2


def test_losing_a_worker_fails_requests_only_with_5xx_then_recovers(
        on_ray: ServerProcess, cluster: Any) -> None:
    """Runs last: it takes a worker away from the module's cluster."""
    card = _cards(on_ray)[EMBED]
    victim = next(n for n in cluster.worker_nodes if n.node_id in card["replica_nodes"])
    survivor = next(n for n in cluster.worker_nodes if n is not victim)
    outcomes: list[tuple[float, int | str, dict[str, Any] | None]] = []
    stop = threading.Event()

    def loop() -> None:
        with httpx.Client(timeout=25, headers={"Authorization": f"Bearer {KEY}"}) as http:
            while not stop.is_set():
                started = time.monotonic()
                try:
                    r = http.post(on_ray.url + "/v1/embeddings",
                                  json={"model": EMBED, "input": SENTENCES[:1]})
                    outcomes.append((started, r.status_code,
                                     r.json() if r.status_code != 200 else None))
                except httpx.TimeoutException:
                    outcomes.append((started, "timeout", None))

    worker = threading.Thread(target=loop)
    worker.start()
    try:
        while len(outcomes) < 5:
            time.sleep(0.05)
        removed_at = time.monotonic()
        cluster.remove_node(victim)
        # Recovered: Serve restarted the lost replica on the survivor, and both answer.
        deadline = removed_at + 120
        while time.monotonic() < deadline:
            card = _cards(on_ray)[EMBED]
            if card["replicas"] == 2 and set(card["replica_nodes"]) == {survivor.node_id}:
                break
            time.sleep(0.5)
        assert card["replica_nodes"] == [survivor.node_id] * 2
        recovered_at = time.monotonic()
        while not any(t > recovered_at for t, _, _ in outcomes[-20:]) or \
                sum(t > recovered_at for t, _, _ in outcomes) < 20:
            time.sleep(0.1)
    finally:
        stop.set()
        worker.join()
    for _, status, body in outcomes:
        assert status != "timeout"
        if status != 200:
            assert isinstance(status, int) and status >= 500, (status, body)
            assert body is not None and body["error"]["message"], body
    assert all(status == 200 for t, status, _ in outcomes if t > recovered_at)
    assert sum(status == 200 for _, status, _ in outcomes) >= 25
