"""The model cache through the real server: python-runtime models that really sleep and really
allocate, plus MiniLM as a real dependency."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.serverproc import ServerProcess, run_server

pytestmark = pytest.mark.e2e

BLOB = "tests.models.fixture_models:Blob"


def blob(name: str, log: Path, *, preload: str = "lazy", extra: str = "", **options: object) -> str:
    opts = ", ".join(f"{k} = {v!r}" if not isinstance(v, str) else f'{k} = "{v}"'
                     for k, v in {"name": name, "log": str(log), **options}.items())
    return f"""
[[models]]
id = "{name}"
runtime = "python"
source = "{BLOB}"
preload = "{preload}"
{extra}
options = {{ {opts} }}
"""


def events(log: Path) -> list[str]:
    if not log.exists():
        return []
    return [" ".join(line.split()[:2]) for line in log.read_text().splitlines()]


def embed(http: httpx.Client, model: str, text: str = "hello") -> httpx.Response:
    return http.post("/v1/embeddings", json={"model": model, "input": text})


def cards(http: httpx.Client) -> dict[str, dict[str, object]]:
    return {m["id"]: m for m in http.get("/v1/models").json()["data"]}


@pytest.fixture(scope="module")
def budget_server(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path
                  ) -> Iterator[tuple[ServerProcess, Path]]:
    tmp = tmp_path_factory.mktemp("cache")
    log = tmp / "events.log"
    flag = tmp / "broken.flag"
    flag.touch()
    config = """
[cache]
max_memory_bytes = 94371840   # 90 MiB
max_concurrent_loads = 2
load_timeout_s = 5
""" + "".join([
        blob("a", log, allocate_mb=40),
        blob("b", log, allocate_mb=40),
        blob("c", log, allocate_mb=40),
        blob("slow", log, load_seconds=0.5),
        blob("broken", log, fail_if_exists=str(flag)),
        blob("sluggish", log, load_seconds=20),
        blob("busy", log, allocate_mb=40, embed_seconds=1.5),
    ])
    with run_server(tmp, config, cache_dir) as server:
        yield server, log


def test_concurrent_first_requests_trigger_one_load(budget_server: tuple[ServerProcess, Path]
                                                     ) -> None:
    server, log = budget_server

    async def scenario() -> list[int]:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
            responses = await asyncio.gather(*(
                http.post("/v1/embeddings", json={"model": "slow", "input": f"t{i}"})
                for i in range(12)
            ))
        return [r.status_code for r in responses]

    assert asyncio.run(scenario()) == [200] * 12
    assert events(log).count("load-start slow") == 1


def test_lru_eviction_under_the_byte_budget(budget_server: tuple[ServerProcess, Path]) -> None:
    server, log = budget_server
    with httpx.Client(base_url=server.url, timeout=30) as http:
        for model in ("a", "b", "a", "c"):  # b is least recently used when c needs room
            assert embed(http, model).status_code == 200
        state = cards(http)
        assert state["b"]["status"] == "unloaded"
        assert state["a"]["status"] == state["c"]["status"] == "loaded"
        assert int(state["a"]["memory_bytes"]) >= 40 << 20  # measured, not estimated
        assert "closed b" in events(log)
        page = http.get("/metrics").text
        # c's size was unknown until measured, so room was made right after its load.
        assert 'tidegate_model_evictions_total{reason="budget"}' in page


def test_in_use_model_is_never_evicted(budget_server: tuple[ServerProcess, Path]) -> None:
    server, log = budget_server

    async def scenario() -> None:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
            first = asyncio.create_task(
                http.post("/v1/embeddings", json={"model": "busy", "input": "x"}))
            while "embed-start busy" not in events(log):
                await asyncio.sleep(0.01)
            # busy (40 MiB, leased) + one more 40 MiB model fit; the third must wait for room
            # that only evicting an idle model can make, never busy.
            others = await asyncio.gather(*(
                http.post("/v1/embeddings", json={"model": m, "input": "y"})
                for m in ("a", "b")
            ))
            assert [r.status_code for r in others] == [200, 200]
            assert (await first).status_code == 200

    asyncio.run(scenario())
    lines = events(log)
    assert "closed busy" not in lines[: lines.index("embed-end busy")]


def test_failed_load_is_503_with_reason_then_recovers(
    budget_server: tuple[ServerProcess, Path], tmp_path: Path
) -> None:
    server, log = budget_server
    flag = Path(str(log).replace("events.log", "broken.flag"))
    with httpx.Client(base_url=server.url, timeout=30) as http:
        failed = embed(http, "broken")
        assert failed.status_code == 503
        assert "cannot load while" in failed.json()["error"]["message"]
        assert int(failed.headers["retry-after"]) >= 1
        assert cards(http)["broken"]["status"] == "failed"
        assert embed(http, "a").status_code == 200  # other models are unaffected
        flag.unlink()
        # The retry backoff after one failure is 1 s; poll (bounded) until it has passed.
        for _ in range(100):
            response = embed(http, "broken")
            if response.status_code != 503:
                break
            time.sleep(0.05)
        assert response.status_code == 200
        assert cards(http)["broken"]["status"] == "loaded"


def test_load_timeout_marks_the_model_failed(budget_server: tuple[ServerProcess, Path]) -> None:
    server, _ = budget_server
    with httpx.Client(base_url=server.url, timeout=30) as http:
        response = embed(http, "sluggish")
        assert response.status_code == 503
        assert "timed out after 5s" in response.json()["error"]["message"]
        assert cards(http)["sluggish"]["status"] == "failed"


def test_ready_recovers_once_a_failed_eager_model_loads(tmp_path: Path, cache_dir: Path) -> None:
    log = tmp_path / "events.log"
    flag = tmp_path / "broken.flag"
    flag.touch()
    config = blob("broken", log, preload="eager", fail_if_exists=str(flag)) \
        + blob("fine", log, preload="eager")
    with run_server(tmp_path, config, cache_dir, wait="/health/live") as server, \
            httpx.Client(base_url=server.url, timeout=30) as http:
        for _ in range(200):  # bounded: the eager preload is two instant loads
            if "preloading done" in server.log():
                break
            time.sleep(0.05)
        not_ready = http.get("/health/ready")
        assert not_ready.status_code == 503
        assert not_ready.json()["models"] == {"broken": "failed", "fine": "loaded"}
        flag.unlink()
        # Loopback admin load; the retry backoff after one failure is 1 s: poll, bounded.
        for _ in range(100):
            loaded = http.post("/admin/models/broken/load")
            if loaded.status_code != 503:
                break
            time.sleep(0.05)
        assert loaded.status_code == 200, loaded.text
        ready = http.get("/health/ready")
        assert ready.status_code == 200
        assert ready.json() == {"status": "ready", "models": {"broken": "loaded", "fine": "loaded"}}


@pytest.fixture(scope="module")
def dependency_server(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path
                      ) -> Iterator[tuple[ServerProcess, Path]]:
    tmp = tmp_path_factory.mktemp("deps")
    log = tmp / "events.log"
    config = f"""
[auth]
admin_token = "s3cret"

[[models]]
id = "embedder"
runtime = "embedding"
preload = "lazy"

[[models]]
id = "reranker"
runtime = "python"
source = "tests.models.fixture_models:Reranker"
depends_on = ["embedder"]
preload = "lazy"
options = {{ log = "{log}" }}
""" + blob("first", log, preload="eager", extra="priority = 10") \
        + blob("second", log, preload="eager", extra="priority = 5") \
        + blob("next", log, preload="predictive")
    with run_server(tmp, config, cache_dir) as server:
        yield server, log


def test_eager_preload_in_priority_order_before_ready(
    dependency_server: tuple[ServerProcess, Path]
) -> None:
    server, log = dependency_server
    loads = [e for e in events(log) if e.startswith("loaded")]
    assert loads[:2] == ["loaded first", "loaded second"]
    assert "[1/2] preloading first" in server.log()
    with httpx.Client(base_url=server.url) as http:
        state = cards(http)
        assert state["embedder"]["status"] == "unloaded"  # lazy
        assert http.get("/health/ready").status_code == 200


def test_dependency_loads_first_and_is_called(
    dependency_server: tuple[ServerProcess, Path]
) -> None:
    server, _ = dependency_server
    with httpx.Client(base_url=server.url, timeout=60) as http:
        reranked = embed(http, "reranker", "a cat sits on the mat")
        assert reranked.status_code == 200, reranked.text
        direct = embed(http, "embedder", "a cat sits on the mat").json()["data"][0]["embedding"]
        scores = reranked.json()["data"][0]["embedding"]
        assert scores == pytest.approx([2 * v for v in direct[:4]], rel=1e-5)
        log_text = server.log()
        assert log_text.index("model embedder loaded") < log_text.index("model reranker loaded")
        # A dependency of a loaded model cannot be unloaded before it.
        auth = {"Authorization": "Bearer s3cret"}
        refused = http.post("/admin/models/embedder/unload", headers=auth)
        assert refused.status_code == 503 and "reranker" in refused.text


def test_admin_auth_load_and_unload(dependency_server: tuple[ServerProcess, Path]) -> None:
    server, _ = dependency_server
    with httpx.Client(base_url=server.url, timeout=60) as http:
        assert http.post("/admin/models/next/load").status_code == 401
        wrong = http.post("/admin/models/next/load", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 403
        auth = {"Authorization": "Bearer s3cret"}
        loaded = http.post("/admin/models/next/load", headers=auth)
        assert loaded.status_code == 200 and loaded.json()["status"] == "loaded"
        unloaded = http.post("/admin/models/next/unload", headers=auth)
        assert unloaded.status_code == 200 and unloaded.json()["status"] == "unloaded"
        assert http.post("/admin/models/nope/load", headers=auth).status_code == 404


def test_predictive_preload_after_a_learned_pattern(
    dependency_server: tuple[ServerProcess, Path]
) -> None:
    server, _ = dependency_server
    with httpx.Client(base_url=server.url, timeout=60) as http:
        for _ in range(3):  # teach first -> next
            assert embed(http, "first").status_code == 200
            assert embed(http, "next").status_code == 200
            auth = {"Authorization": "Bearer s3cret"}
            assert http.post("/admin/models/next/unload", headers=auth).status_code == 200
        assert embed(http, "first").status_code == 200
        deadline = 200
        while cards(http)["next"]["status"] != "loaded" and deadline:
            deadline -= 1
            http.get("/health/live")
        assert cards(http)["next"]["status"] == "loaded"  # preloaded before being asked for
        assert embed(http, "next").status_code == 200
        page = http.get("/metrics").text
        hits = next(line for line in page.splitlines()
                    if line.startswith("tidegate_preload_hits_total "))
        assert float(hits.split()[1]) >= 1


def test_dependency_cycle_stops_start_up(tmp_path: Path) -> None:
    config = tmp_path / "tidegate.toml"
    config.write_text("""
[[models]]
id = "x"
depends_on = ["y"]
[[models]]
id = "y"
depends_on = ["x"]
""")
    result = subprocess.run(
        [sys.executable, "-m", "tidegate", "serve", "--config", str(config)],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 2
    assert "dependency cycle: x -> y -> x" in result.stderr
