"""``/tokenize`` and ``/detokenize`` bodies: each parameter has the type the OpenAPI document gives
it (null means the default), a bad one is a 400 naming it; and, in-process, what the routes answer
before any tokenizer runs (the real tokenizers are tested end to end in
tests/e2e/test_tokenize_api.py)."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import httpx
import orjson
import pytest

from tests.models.fixture_models import gate, open_all_gates
from tests.models.test_manager import BLOB, until
from tidegate.api.app import create_app
from tidegate.api.tokenize import parse_detokenize_request, parse_tokenize_request
from tidegate.config import Config, ModelConfig
from tidegate.errors import InvalidRequest

CHAT = [{"role": "user", "content": "hi"}]


def tokenize_body(**fields: Any) -> Any:
    return parse_tokenize_request(orjson.dumps({"model": "m", **fields}))


def detokenize_body(**fields: Any) -> Any:
    return parse_detokenize_request(orjson.dumps({"model": "m", **fields}))


def test_a_prompt_with_the_defaults() -> None:
    parsed = tokenize_body(prompt="Hello", messages=None, add_special_tokens=None,
                           return_token_strs=None, add_generation_prompt=None)
    assert (parsed.model, parsed.prompt, parsed.messages) == ("m", "Hello", None)
    assert parsed.add_special_tokens is None  # true for a prompt, decided when serving
    assert parsed.add_generation_prompt is True
    assert parsed.return_token_strs is False
    assert tokenize_body(prompt="").prompt == ""  # an empty prompt has tokens too (or none)


def test_messages_with_every_option() -> None:
    parsed = tokenize_body(messages=[{"role": "user", "content": [{"type": "text", "text": "a"},
                                                                  {"type": "text", "text": "b"}]}],
                           add_special_tokens=True, add_generation_prompt=False,
                           return_token_strs=True)
    assert parsed.prompt is None and parsed.messages == [{"role": "user", "content": "ab"}]
    assert parsed.add_special_tokens is True
    assert parsed.add_generation_prompt is False and parsed.return_token_strs is True
    assert parsed.body["add_generation_prompt"] is False  # a remote model gets the body as sent


@pytest.mark.parametrize(("fields", "param"), [
    ({}, "prompt"),
    ({"prompt": None, "messages": None}, "prompt"),
    ({"prompt": "x", "messages": CHAT}, "messages"),
    ({"prompt": 1}, "prompt"),
    ({"prompt": ["x"]}, "prompt"),
    ({"messages": []}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({"messages": [{"content": "no role"}]}, "messages"),
    ({"prompt": "x", "add_special_tokens": 1}, "add_special_tokens"),
    ({"prompt": "x", "add_special_tokens": "false"}, "add_special_tokens"),
    ({"prompt": "x", "return_token_strs": 0}, "return_token_strs"),
    ({"messages": CHAT, "add_generation_prompt": "yes"}, "add_generation_prompt"),
    ({"model": "", "prompt": "x"}, "model"),
    ({"model": 3, "prompt": "x"}, "model"),
])
def test_bad_tokenize_bodies_name_the_parameter(fields: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        tokenize_body(**fields)
    assert caught.value.param == param


def test_token_ids_also_spelled_as_floats() -> None:
    assert detokenize_body(tokens=[0, 5, 7.0]).tokens == [0, 5, 7]
    assert detokenize_body(tokens=[]).tokens == []


@pytest.mark.parametrize(("fields", "message"), [
    ({}, "Missing required parameter: 'tokens'"),
    ({"tokens": None}, "Missing required parameter: 'tokens'"),
    ({"tokens": "1 2"}, "must be an array"),
    ({"tokens": [1, -1]}, r"'tokens\[1\]' must be a non-negative integer, got -1"),
    ({"tokens": [True]}, r"'tokens\[0\]'"),
    ({"tokens": [1.5]}, r"'tokens\[0\]'"),
    ({"tokens": [[1]]}, r"'tokens\[0\]'"),
])
def test_bad_token_lists_are_400_naming_tokens(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidRequest, match=message) as caught:
        detokenize_body(**fields)
    assert caught.value.param == "tokens"


# -- in-process: the app, without a tokenizer -----------------------------------------------------


def _app() -> Any:
    return create_app(Config(models=(ModelConfig(id="echo", runtime="echo"),)))


async def _exchange(app: Any, *requests: tuple[str, dict[str, Any]]) -> list[httpx.Response]:
    transport = httpx.ASGITransport(app=app)
    async with app.router.lifespan_context(app), \
            httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        return [await http.post(path, json=body) for path, body in requests]


def test_errors_and_their_metrics() -> None:
    app = _app()
    responses = asyncio.run(_exchange(
        app,
        ("/tokenize", {"model": "echo", "prompt": "hi"}),
        ("/detokenize", {"model": "echo", "tokens": [1]}),
        ("/tokenize", {"model": "nope", "prompt": "hi"}),
        ("/detokenize", {"model": "echo"}),
    ))
    statuses = [(r.status_code, r.json()["error"]["param"], r.json()["error"]["code"])
                for r in responses]
    assert statuses == [(400, "model", "wrong_model_type"), (400, "model", "wrong_model_type"),
                        (404, "model", "model_not_found"), (400, "tokens", None)]
    assert "has no tokenizer" in responses[0].json()["error"]["message"]
    text = app.state.tidegate.metrics.render().decode()
    counted = dict(re.findall(r"^tidegate_route_requests_total\{(.*?)\} (\S+)$", text, re.M))
    # Only configured models become labels.
    assert counted == {'model="echo",route="/tokenize",status="400"': "1.0",
                       'model="echo",route="/detokenize",status="400"': "1.0",
                       'model="",route="/tokenize",status="404"': "1.0",
                       'model="",route="/detokenize",status="400"': "1.0"}
    snapshot = app.state.tidegate.manager.snapshot("echo")
    assert snapshot.leases == 0  # every lease was given back


def test_while_draining_both_routes_are_refused() -> None:
    app = _app()
    app.state.tidegate.drain.begin()
    responses = asyncio.run(_exchange(app, ("/tokenize", {"model": "echo", "prompt": "x"}),
                                      ("/detokenize", {"model": "echo", "tokens": [1]})))
    for response in responses:
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "shutting_down"


def test_a_request_cancelled_while_its_model_loads_gives_its_lease_back() -> None:
    name, release = gate()
    app = create_app(Config(models=(ModelConfig(
        id="slow", runtime="python", source=BLOB, preload="lazy",
        options={"load_gate": name}),)))
    manager = app.state.tidegate.manager

    async def main() -> None:
        transport = httpx.ASGITransport(app=app)
        async with app.router.lifespan_context(app), \
                httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            body = {"model": "slow", "prompt": "x"}
            waiting = asyncio.create_task(http.post("/tokenize", json=body))
            await until(lambda: manager.snapshot("slow").leases == 1, "the load to be waited on")
            waiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiting
            assert manager.snapshot("slow").leases == 0
            release.set()  # the load goes on; the next request uses the model
            answer = await http.post("/tokenize", json=body)
            assert answer.status_code == 400  # a python model has no tokenizer
            assert manager.snapshot("slow").leases == 0

    try:
        asyncio.run(main())
    finally:
        open_all_gates()
