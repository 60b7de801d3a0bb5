"""The ModelManager in-process, with real python-runtime models (real sleeps, real memory)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from starlette.requests import Request

from tidegate.api.admin import authorize
from tidegate.config import CacheConfig, Config, ModelConfig
from tidegate.errors import ModelUnavailable, PermissionDenied
from tidegate.metrics import Metrics
from tidegate.models.manager import ModelManager

BLOB = "tests.models.fixture_models:Blob"


def model(name: str, **options: Any) -> ModelConfig:
    extra = {k: options.pop(k) for k in ("keep_alive_s", "memory_bytes") if k in options}
    return ModelConfig(id=name, runtime="python", source=BLOB, preload="lazy",
                       options={"name": name, **options}, **extra)


def run(config: Config, scenario: Callable[[ModelManager], Awaitable[None]]) -> None:
    async def main() -> None:
        manager = ModelManager(config, Metrics())
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


def test_keep_alive_protects_an_idle_model() -> None:
    config = Config(
        cache=CacheConfig(max_loaded_models=1, load_timeout_s=0.3),
        models=(model("kept", keep_alive_s=60), model("other")),
    )

    async def scenario(manager: ModelManager) -> None:
        await use(manager, "kept")
        with pytest.raises(ModelUnavailable, match="kept alive"):
            await use(manager, "other")

    run(config, scenario)


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
