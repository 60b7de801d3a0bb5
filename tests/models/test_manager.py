"""The ModelManager in-process, with real python-runtime models (real threads, real memory) on
a fake clock: timeouts, backoffs and keep-alives pass when the test advances the clock, and a
slow load or request is one held on a gate that the test opens. No test waits on real time."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from starlette.requests import Request

from tests.models.fixture_models import gate, open_all_gates
from tidegate.api.admin import authorize
from tidegate.clock import FakeClock
from tidegate.config import CacheConfig, Config, EvictionMode, ModelConfig, PreloadMode
from tidegate.errors import ModelUnavailable, PermissionDenied
from tidegate.metrics import Metrics
from tidegate.models.manager import ModelManager, ModelState

BLOB = "tests.models.fixture_models:Blob"

Scenario = Callable[[ModelManager, FakeClock], Awaitable[None]]


def model(name: str, *, preload: PreloadMode = "lazy", **options: Any) -> ModelConfig:
    extra = {k: options.pop(k) for k in ("keep_alive_s", "memory_bytes") if k in options}
    return ModelConfig(id=name, runtime="python", source=BLOB, preload=preload,
                       options={"name": name, **options}, **extra)


def run(config: Config, scenario: Scenario) -> None:
    async def main() -> None:
        clock = FakeClock()
        manager = ModelManager(config, Metrics(), clock=clock)
        await manager.start()
        try:
            async with asyncio.timeout(30):
                await scenario(manager, clock)
        finally:
            open_all_gates()
            await manager.aclose()

    asyncio.run(main())


async def until(condition: Callable[[], bool], what: str, limit_s: float = 10.0) -> None:
    """Poll ``condition`` (state a worker thread changes) until true, at most ``limit_s``."""
    try:
        async with asyncio.timeout(limit_s):
            while not condition():
                await asyncio.sleep(0.002)
    except TimeoutError:
        raise AssertionError(f"gave up after {limit_s}s waiting for {what}") from None


def leased(manager: ModelManager, name: str) -> Callable[[], bool]:
    def check() -> bool:
        snapshot = manager.snapshot(name)
        return snapshot.loaded and snapshot.leases > 0
    return check


async def use(manager: ModelManager, name: str) -> None:
    async with manager.lease(name) as served:
        await served.embed(["x"])


def status(manager: ModelManager, *names: str) -> list[str]:
    return [manager.snapshot(name).status.value for name in names]


def test_no_room_while_leased_is_503_naming_the_holder() -> None:
    held, release = gate()
    config = Config(
        cache=CacheConfig(max_loaded_models=1, load_timeout_s=0.5),
        models=(model("held", embed_gate=held), model("other")),
    )

    async def scenario(manager: ModelManager, clock: FakeClock) -> None:
        holding = asyncio.create_task(use(manager, "held"))
        await until(leased(manager, "held"), "held to be loaded and in use")
        other = asyncio.create_task(use(manager, "other"))
        await clock.until_waiting()  # other's load waits for room
        clock.advance(0.5)
        with pytest.raises(ModelUnavailable) as caught:
            await other
        assert "held by: held" in caught.value.reason
        assert "request(s) in flight" in caught.value.reason
        release.set()
        await holding

    run(config, scenario)


def test_load_waits_for_a_lease_to_end_then_evicts() -> None:
    held, release = gate()
    config = Config(
        cache=CacheConfig(max_loaded_models=1, load_timeout_s=10),
        models=(model("held", embed_gate=held), model("other")),
    )

    async def scenario(manager: ModelManager, clock: FakeClock) -> None:
        holding = asyncio.create_task(use(manager, "held"))
        await until(leased(manager, "held"), "held to be loaded and in use")
        other = asyncio.create_task(use(manager, "other"))
        await clock.until_waiting()
        assert not other.done()
        release.set()
        await other
        assert holding.done()  # other could only load once held's lease ended
        assert status(manager, "held", "other") == ["unloaded", "loaded"]

    run(config, scenario)


def test_load_timeout_fails_the_model_then_backs_off() -> None:
    loading, release = gate()
    config = Config(cache=CacheConfig(load_timeout_s=0.5),
                    models=(model("slow", load_gate=loading),))

    async def scenario(manager: ModelManager, clock: FakeClock) -> None:
        first = asyncio.create_task(use(manager, "slow"))
        await clock.until_waiting()  # the load's timeout
        clock.advance(0.5)
        with pytest.raises(ModelUnavailable, match=r"load timed out after 0\.5s"):
            await first
        assert manager.snapshot("slow").status is ModelState.FAILED
        release.set()  # the abandoned load finishes in its thread (and is closed)
        with pytest.raises(ModelUnavailable, match="timed out") as backing_off:
            await use(manager, "slow")  # within the 1 s backoff: no new load
        assert backing_off.value.retry_after_s == 1
        clock.advance(1.0)
        await use(manager, "slow")
        assert status(manager, "slow") == ["loaded"]

    run(config, scenario)


def test_memory_is_measured_not_estimated() -> None:
    config = Config(models=(model("big", allocate_mb=30, memory_bytes=1),))

    async def scenario(manager: ModelManager, clock: FakeClock) -> None:
        await use(manager, "big")
        assert (manager.snapshot("big").memory_bytes or 0) >= 30 << 20

    run(config, scenario)


@pytest.mark.parametrize("eviction", ["lru", "lfu"])
def test_keep_alive_protects_an_idle_model(eviction: EvictionMode) -> None:
    config = Config(
        cache=CacheConfig(max_loaded_models=1, load_timeout_s=0.3, eviction=eviction),
        models=(model("kept", keep_alive_s=60), model("other")),
    )

    async def scenario(manager: ModelManager, clock: FakeClock) -> None:
        await use(manager, "kept")
        other = asyncio.create_task(use(manager, "other"))
        await clock.until_waiting()
        clock.advance(0.3)
        with pytest.raises(ModelUnavailable, match="kept alive"):
            await other

    run(config, scenario)


@pytest.mark.parametrize(("eviction", "hot_after"), [("lru", "unloaded"), ("lfu", "loaded")])
def test_lfu_keeps_the_frequently_used_model_through_one_off_loads(
    eviction: EvictionMode, hot_after: str
) -> None:
    config = Config(
        cache=CacheConfig(max_loaded_models=2, eviction=eviction),
        models=(model("hot"), *(model(f"once{i}") for i in range(4))),
    )

    async def scenario(manager: ModelManager, clock: FakeClock) -> None:
        for _ in range(3):
            await use(manager, "hot")
            clock.advance(1)
        for i in range(4):
            await use(manager, f"once{i}")
            clock.advance(1)
        assert status(manager, "hot", "once3") == [hot_after, "loaded"]

    run(config, scenario)


def test_lfu_request_count_survives_an_unload() -> None:
    config = Config(
        cache=CacheConfig(max_loaded_models=2, eviction="lfu"),
        models=(model("hot"), model("once0"), model("once1")),
    )

    async def scenario(manager: ModelManager, clock: FakeClock) -> None:
        for _ in range(3):
            await use(manager, "hot")
            clock.advance(1)
        await manager.unload("hot")
        await use(manager, "hot")  # reloaded: 4 requests, not 1
        clock.advance(1)
        await use(manager, "once0")
        clock.advance(1)
        await use(manager, "once1")
        assert status(manager, "hot", "once0", "once1") == ["loaded", "unloaded", "loaded"]

    run(config, scenario)


def test_lfu_counts_decay_with_the_configured_half_life() -> None:
    config = Config(
        cache=CacheConfig(max_loaded_models=2, eviction="lfu", frequency_half_life_s=60),
        models=(model("old"), model("new"), model("once")),
    )

    async def scenario(manager: ModelManager, clock: FakeClock) -> None:
        for _ in range(4):
            await use(manager, "old")
        clock.advance(180)  # three half-lives: old's 4 requests count 0.5 (3.2 at the default)
        for _ in range(2):
            await use(manager, "new")
        await use(manager, "once")
        assert status(manager, "old", "new", "once") == ["unloaded", "loaded", "loaded"]

    run(config, scenario)


def test_unload_waits_for_in_flight_requests(tmp_path: Path) -> None:
    log = tmp_path / "events.log"
    embedding, release = gate()
    config = Config(models=(model("m", embed_gate=embedding, log=str(log)),))

    async def scenario(manager: ModelManager, clock: FakeClock) -> None:
        request = asyncio.create_task(use(manager, "m"))
        await until(leased(manager, "m"), "m to be loaded and in use")
        unloading = asyncio.create_task(manager.unload("m"))
        await clock.until_waiting()  # for the lease to end
        assert not unloading.done()
        release.set()
        card = await unloading
        assert card["status"] == "unloaded"
        await request  # finished normally, before the unload
        lines = log.read_text().split("\n")
        assert [line.split()[0] for line in lines if line][-2:] == ["embed-end", "closed"]

    run(config, scenario)


def test_ready_recovers_once_a_failed_eager_model_loads(tmp_path: Path) -> None:
    """Ready: every eager model has loaded once since start and none is failed now."""
    broken = tmp_path / "broken.flag"
    broken.touch()
    config = Config(models=(model("e", preload="eager", fail_if_exists=str(broken)),
                            model("fine", preload="eager"), model("lazy")))

    async def scenario(manager: ModelManager, clock: FakeClock) -> None:
        await until(lambda: status(manager, "e", "fine") == ["failed", "loaded"],
                    "the eager preload to finish")
        assert not manager.ready
        broken.unlink()
        clock.advance(1.0)  # past the retry backoff
        await manager.load("e")
        assert manager.ready
        await manager.unload("e")
        assert manager.ready  # evicted after loading once: still ready
        broken.touch()
        with pytest.raises(ModelUnavailable):
            await use(manager, "e")
        assert not manager.ready  # failed now
        broken.unlink()
        clock.advance(1.0)
        await use(manager, "e")
        assert manager.ready

    run(config, scenario)


def test_wait_ready_returns_once_eager_models_load() -> None:
    loading, release = gate()
    config = Config(models=(model("e", preload="eager", load_gate=loading),))

    async def scenario(manager: ModelManager, clock: FakeClock) -> None:
        waiting = asyncio.create_task(manager.wait_ready())
        await until(lambda: status(manager, "e") == ["loading"], "the eager load to start")
        assert not waiting.done() and not manager.ready
        release.set()
        await waiting
        assert manager.ready

    run(config, scenario)


def _request(host: str, headers: dict[str, str] | None = None) -> Request:
    raw = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    return Request({"type": "http", "client": (host, 1234), "headers": raw, "method": "POST",
                    "path": "/admin/models/x/load"})


def test_admin_without_token_is_loopback_only() -> None:
    authorize(_request("127.0.0.1"), None)
    authorize(_request("::1"), None)
    with pytest.raises(PermissionDenied):
        authorize(_request("10.1.2.3"), None)
    authorize(_request("10.1.2.3", {"Authorization": "Bearer t"}), "t")
