"""The ModelManager in-process, with real python-runtime models (real sleeps, real memory)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from starlette.requests import Request

from tests.upstream.faulty_upstream import FakeClock
from tidegate.api.admin import authorize
from tidegate.config import CacheConfig, Config, EvictionMode, ModelConfig
from tidegate.errors import ModelUnavailable, PermissionDenied
from tidegate.metrics import Metrics
from tidegate.models.manager import ModelManager

BLOB = "tests.models.fixture_models:Blob"


def model(name: str, **options: Any) -> ModelConfig:
    extra = {k: options.pop(k) for k in ("keep_alive_s", "memory_bytes") if k in options}
    return ModelConfig(id=name, runtime="python", source=BLOB, preload="lazy",
                       options={"name": name, **options}, **extra)


def run(config: Config, scenario: Callable[[ModelManager], Awaitable[None]], *,
        clock: Callable[[], float] = time.monotonic) -> None:
    async def main() -> None:
        manager = ModelManager(config, Metrics(), clock=clock)
        await manager.start()
        try:
            async with asyncio.timeout(30):
                await scenario(manager)
        finally:
            await manager.aclose()

    asyncio.run(main())


async def use(manager: ModelManager, name: str) -> None:
    async with manager.lease(name) as served:
        await served.embed(["x"])


def test_no_room_while_leased_is_503_naming_the_holder() -> None:
    config = Config(
        cache=CacheConfig(max_loaded_models=1, load_timeout_s=0.5),
        models=(model("held", embed_seconds=2.0), model("other")),
    )

    async def scenario(manager: ModelManager) -> None:
        holding = asyncio.create_task(use(manager, "held"))
        while manager.describe_one("held")["status"] != "loaded":
            await asyncio.sleep(0.01)
        with pytest.raises(ModelUnavailable) as caught:
            await use(manager, "other")
        assert "held by: held" in caught.value.reason
        assert "request(s) in flight" in caught.value.reason
        await holding

    run(config, scenario)


def test_load_waits_for_a_lease_to_end_then_evicts() -> None:
    config = Config(
        cache=CacheConfig(max_loaded_models=1, load_timeout_s=10),
        models=(model("held", embed_seconds=0.3), model("other")),
    )

    async def scenario(manager: ModelManager) -> None:
        holding = asyncio.create_task(use(manager, "held"))
        while manager.describe_one("held")["status"] != "loaded":
            await asyncio.sleep(0.01)
        await use(manager, "other")
        assert holding.done()  # other could only load once held's lease ended
        assert manager.describe_one("held")["status"] == "unloaded"

    run(config, scenario)


def test_memory_is_measured_not_estimated() -> None:
    config = Config(models=(model("big", allocate_mb=30, memory_bytes=1),))

    async def scenario(manager: ModelManager) -> None:
        await use(manager, "big")
        assert int(manager.describe_one("big")["memory_bytes"]) >= 30 << 20  # type: ignore[call-overload]

    run(config, scenario)


@pytest.mark.parametrize("eviction", ["lru", "lfu"])
def test_keep_alive_protects_an_idle_model(eviction: EvictionMode) -> None:
    config = Config(
        cache=CacheConfig(max_loaded_models=1, load_timeout_s=0.3, eviction=eviction),
        models=(model("kept", keep_alive_s=60), model("other")),
    )

    async def scenario(manager: ModelManager) -> None:
        await use(manager, "kept")
        with pytest.raises(ModelUnavailable, match="kept alive"):
            await use(manager, "other")

    run(config, scenario)


def status(manager: ModelManager, *names: str) -> list[object]:
    return [manager.describe_one(name)["status"] for name in names]


@pytest.mark.parametrize(("eviction", "hot_after"), [("lru", "unloaded"), ("lfu", "loaded")])
def test_lfu_keeps_the_frequently_used_model_through_one_off_loads(
    eviction: EvictionMode, hot_after: str
) -> None:
    clock = FakeClock()
    config = Config(
        cache=CacheConfig(max_loaded_models=2, eviction=eviction),
        models=(model("hot"), *(model(f"once{i}") for i in range(4))),
    )

    async def scenario(manager: ModelManager) -> None:
        for _ in range(3):
            await use(manager, "hot")
            clock.now += 1
        for i in range(4):
            await use(manager, f"once{i}")
            clock.now += 1
        assert status(manager, "hot", "once3") == [hot_after, "loaded"]

    run(config, scenario, clock=clock)


def test_lfu_request_count_survives_an_unload() -> None:
    clock = FakeClock()
    config = Config(
        cache=CacheConfig(max_loaded_models=2, eviction="lfu"),
        models=(model("hot"), model("once0"), model("once1")),
    )

    async def scenario(manager: ModelManager) -> None:
        for _ in range(3):
            await use(manager, "hot")
            clock.now += 1
        await manager.unload("hot")
        await use(manager, "hot")  # reloaded: 4 requests, not 1
        clock.now += 1
        await use(manager, "once0")
        clock.now += 1
        await use(manager, "once1")
        assert status(manager, "hot", "once0", "once1") == ["loaded", "unloaded", "loaded"]

    run(config, scenario, clock=clock)


def test_lfu_counts_decay_with_the_configured_half_life() -> None:
    clock = FakeClock()
    config = Config(
        cache=CacheConfig(max_loaded_models=2, eviction="lfu", frequency_half_life_s=60),
        models=(model("old"), model("new"), model("once")),
    )

    async def scenario(manager: ModelManager) -> None:
        for _ in range(4):
            await use(manager, "old")
        clock.now += 180  # three half-lives: old's 4 requests count 0.5 (3.2 at the default 600 s)
        for _ in range(2):
            await use(manager, "new")
        await use(manager, "once")
        assert status(manager, "old", "new", "once") == ["unloaded", "loaded", "loaded"]

    run(config, scenario, clock=clock)


def test_unload_waits_for_in_flight_requests(tmp_path: Path) -> None:
    log = tmp_path / "events.log"
    config = Config(models=(model("m", embed_seconds=0.3, log=str(log)),))

    async def scenario(manager: ModelManager) -> None:
        request = asyncio.create_task(use(manager, "m"))
        while "embed-start" not in (log.read_text() if log.exists() else ""):
            await asyncio.sleep(0.01)
        card = await manager.unload("m")
        assert card["status"] == "unloaded"
        await request  # finished normally, before the unload
        lines = log.read_text().split("\n")
        assert [line.split()[0] for line in lines if line][-2:] == ["embed-end", "closed"]

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
