"""``[auth] protect_metrics``: /metrics and /openapi.json are open by default, even with API
keys; with the knob on they need an API key (any, whatever its models) or the admin token."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from tidegate.api.app import create_app
from tidegate.api.openapi import build_openapi
from tidegate.auth.keyring import hash_key
from tidegate.config import ApiKeyConfig, AuthConfig, Config, ModelConfig

KEY = "tg-narrow-0123456789abcdefghijklmn"
ADMIN = "admin-0123456789"
PATHS = ("/metrics", "/openapi.json")


def _statuses(auth: AuthConfig, authorization: str | bytes | None) -> list[int]:
    config = Config(auth=auth, models=(ModelConfig(id="a", runtime="echo"),
                                       ModelConfig(id="b", runtime="echo")))
    headers = {} if authorization is None else {"Authorization": authorization}

    async def main() -> list[int]:
        transport = httpx.ASGITransport(app=create_app(config))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            responses = [await http.get(path, headers=headers) for path in PATHS]
        for response in responses:
            if response.status_code == 401:
                error = response.json()["error"]
                assert error["code"] == "invalid_api_key"
                assert KEY not in response.text and ADMIN not in response.text
        return [response.status_code for response in responses]

    return asyncio.run(main())


KEYS = (ApiKeyConfig(id="narrow", hash=hash_key(KEY), models=("a",)),)


@pytest.mark.parametrize("authorization", [None, "Bearer nope"])
def test_without_protect_metrics_they_are_open_even_with_keys(authorization: str | None) -> None:
    assert _statuses(AuthConfig(keys=KEYS, admin_token=ADMIN), authorization) == [200, 200]


@pytest.mark.parametrize(("authorization", "status"), [
    (None, 401), ("Bearer nope", 401), (f"Basic {KEY}", 401),
    (f"Bearer {KEY}", 200), (f"Bearer {ADMIN}", 200),
])
def test_with_protect_metrics_they_need_an_api_key_or_the_admin_token(
    authorization: str | None, status: int,
) -> None:
    auth = AuthConfig(keys=KEYS, admin_token=ADMIN, protect_metrics=True)
    assert _statuses(auth, authorization) == [status, status]


def test_the_admin_token_alone_protects_them() -> None:
    auth = AuthConfig(admin_token=ADMIN, protect_metrics=True)
    assert _statuses(auth, None) == [401, 401]
    assert _statuses(auth, f"Bearer {ADMIN}") == [200, 200]
    assert _statuses(auth, "Bearer é".encode()) == [401, 401]  # not ASCII: no 500


def test_the_openapi_document_lists_the_401_only_when_protected() -> None:
    models = (ModelConfig(id="a", runtime="echo"),)
    for protect in (False, True):
        auth = AuthConfig(admin_token=ADMIN, protect_metrics=protect)
        paths = build_openapi(Config(auth=auth, models=models))["paths"]
        for path in PATHS:
            assert ("401" in paths[path]["get"]["responses"]) is protect


def test_a_non_ascii_admin_token_is_refused_not_a_server_error() -> None:
    config = Config(auth=AuthConfig(admin_token=ADMIN),
                    models=(ModelConfig(id="a", runtime="echo"),))

    async def main() -> int:
        transport = httpx.ASGITransport(app=create_app(config))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            response = await http.post("/admin/models/a/unload",
                                       headers={"Authorization": "Bearer tökén".encode()})
            return response.status_code

    assert asyncio.run(main()) == 403


def test_a_key_reads_only_its_own_series_and_the_admin_token_reads_all() -> None:
    other = "tg-other-0123456789abcdefghijklmnop"
    keys = (*KEYS, ApiKeyConfig(id="wide", hash=hash_key(other)))
    config = Config(auth=AuthConfig(keys=keys, admin_token=ADMIN, protect_metrics=True),
                    models=(ModelConfig(id="a", runtime="echo"),))

    async def main() -> tuple[str, str, str]:
        app = create_app(config)
        transport = httpx.ASGITransport(app=app)
        async with app.router.lifespan_context(app), \
                httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            await http.post("/v1/embeddings", json={"model": "a", "input": "hi"},
                            headers={"Authorization": f"Bearer {KEY}"})
            await http.post("/v1/embeddings", json={"model": "a", "input": "hi"},
                            headers={"Authorization": f"Bearer {other}"})
            texts = [(await http.get("/metrics", headers={"Authorization": f"Bearer {who}"})).text
                     for who in (KEY, other, ADMIN)]
        return texts[0], texts[1], texts[2]

    narrow, wide, admin = asyncio.run(main())
    assert 'key="narrow"' in narrow and 'key="wide"' not in narrow
    assert 'key="wide"' in wide and 'key="narrow"' not in wide
    assert 'key="narrow"' in admin and 'key="wide"' in admin
    for text in (narrow, wide):  # the rest is whole, the 401 count included
        assert "tidegate_api_key_invalid_total" in text
        assert 'tidegate_batch_size_items_count{model="a"}' in text
