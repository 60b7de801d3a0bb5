"""API keys on the real server: 401 / 200 / 404 / 429 with OpenAI's headers, per-key metrics,
and no key in any response, metric or log line."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.serverproc import ServerProcess, run_server
from tidegate.auth.keyring import hash_key

pytestmark = pytest.mark.e2e

FULL = "tg-full-0123456789abcdefghijklmnop"    # every model, no limits
NARROW = "tg-narrow-0123456789abcdefghijklmn"  # echo-a only
RPM = "tg-rpm-0123456789abcdefghijklmnopqr"    # 2 requests per minute
TPM = "tg-tpm-0123456789abcdefghijklmnopqr"    # 20 tokens per minute
GEN = "tg-gen-0123456789abcdefghijklmnopqr"    # generation usage, 10000 tokens per minute
HANGUP = "tg-hangup-0123456789abcdefghijklmn"  # streams then hangs up
TOK = "tg-tok-0123456789abcdefghijklmnopqr"    # tokenizer routes: 100 requests, 5 tokens a minute
SECRETS = (FULL, NARROW, RPM, TPM, GEN, HANGUP, TOK)
GPT2 = "tiny-gpt2"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path,
           gpt2_dir: Path, endless_dir: Path) -> Iterator[ServerProcess]:
    tmp = tmp_path_factory.mktemp("keys")
    (tmp / "keys.toml").write_text(
        f'[[keys]]\nid = "gen"\nhash = "{hash_key(GEN)}"\ntokens_per_minute = 10000\n',
        encoding="utf-8")
    config = f"""
[server]
log_level = "debug"
access_log = true

[auth]
keys_file = "keys.toml"

[[auth.keys]]
id = "full"
hash = "{hash_key(FULL)}"

[[auth.keys]]
id = "narrow"
hash = "{hash_key(NARROW)}"
models = ["echo-a"]

[[auth.keys]]
id = "rpm"
hash = "{hash_key(RPM)}"
requests_per_minute = 2

[[auth.keys]]
id = "tpm"
hash = "{hash_key(TPM)}"
tokens_per_minute = 20

[[models]]
id = "echo-a"
runtime = "echo"

[[models]]
id = "echo-b"
runtime = "echo"

[[auth.keys]]
id = "hangup"
hash = "{hash_key(HANGUP)}"
tokens_per_minute = 100000

[[auth.keys]]
id = "tok"
hash = "{hash_key(TOK)}"
requests_per_minute = 100
tokens_per_minute = 5

[[models]]
id = "{GPT2}"
runtime = "causal-lm"
source = "{gpt2_dir}"

[[models]]
id = "endless"
runtime = "causal-lm"
source = "{endless_dir}"
"""
    with run_server(tmp, config, cache_dir) as proc:
        yield proc


def client(server: ServerProcess, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)


def embed(server: ServerProcess, key: str | None, model: str = "echo-a",
          text: str = "hello") -> httpx.Response:
    headers = {} if key is None else {"Authorization": f"Bearer {key}"}
    return httpx.post(server.url + "/v1/embeddings", headers=headers, timeout=30,
                      json={"model": model, "input": text})


def test_missing_or_unknown_key_is_401_invalid_api_key(server: ServerProcess) -> None:
    for key in (None, FULL + "x", "Basic " + FULL):
        response = embed(server, key)
        assert response.status_code == 401
        assert response.headers["www-authenticate"] == "Bearer"
        error = response.json()["error"]
        assert error["code"] == "invalid_api_key" and error["type"] == "invalid_request_error"
        assert FULL not in response.text
    for path in ("/v1/models", "/v1/models/echo-a"):
        assert httpx.get(server.url + path).status_code == 401
    for route in ("/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"):
        assert httpx.post(server.url + route, json={}).status_code == 401  # before the body
    with client(server, "tg-wrong") as c, pytest.raises(openai.AuthenticationError) as caught:
        c.embeddings.create(model="echo-a", input="hi")
    assert caught.value.code == "invalid_api_key"
    # Health, metrics and admin are not inference routes (admin keeps its own rule).
    assert httpx.get(server.url + "/health/ready").status_code == 200
    assert httpx.get(server.url + "/metrics").status_code == 200
    assert httpx.post(server.url + "/admin/models/echo-b/load").status_code == 200


def test_a_valid_key_is_served_through_the_openai_client(server: ServerProcess) -> None:
    with client(server, FULL) as c:
        result = c.embeddings.create(model="echo-b", input=["a b", "c"])
        assert len(result.data) == 2
        assert {m.id for m in c.models.list()} == {"echo-a", "echo-b", GPT2, "endless"}
        raw = c.embeddings.with_raw_response.create(model="echo-a", input="x")
        assert not any(h.startswith("x-ratelimit") for h in raw.headers)  # no limits set


def test_a_key_sees_and_uses_only_its_models(server: ServerProcess) -> None:
    with client(server, NARROW) as c:
        assert [m.id for m in c.models.list()] == ["echo-a"]
        assert c.embeddings.create(model="echo-a", input="hi").model == "echo-a"
        with pytest.raises(openai.NotFoundError) as caught:
            c.embeddings.create(model="echo-b", input="hi")
        assert caught.value.code == "model_not_found"
        with pytest.raises(openai.NotFoundError):
            c.models.retrieve("echo-b")
        with pytest.raises(openai.NotFoundError):
            c.completions.create(model=GPT2, prompt="hi", max_tokens=2)
    # Exactly as an unknown model: the same body, naming only the key's own models.
    forbidden, unknown = embed(server, NARROW, "echo-b"), embed(server, NARROW, "nope")
    assert forbidden.status_code == unknown.status_code == 404
    assert forbidden.text.replace("echo-b", "nope") == unknown.text
    assert "echo-b" not in forbidden.text.replace("'echo-b'", "")


def test_requests_per_minute_answers_429_with_openais_headers(server: ServerProcess) -> None:
    first = embed(server, RPM)
    assert first.status_code == 200
    assert first.headers["x-ratelimit-limit-requests"] == "2"
    assert first.headers["x-ratelimit-remaining-requests"] == "1"
    assert re.fullmatch(r"\d+(\.\d+)?m?s", first.headers["x-ratelimit-reset-requests"])
    assert embed(server, RPM).status_code == 200
    refused = embed(server, RPM)
    assert refused.status_code == 429
    error = refused.json()["error"]
    assert error["code"] == "rate_limit_exceeded" and error["type"] == "requests"
    assert 1 <= int(refused.headers["retry-after"]) <= 30
    assert refused.headers["x-ratelimit-limit-requests"] == "2"
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    with client(server, RPM) as c, pytest.raises(openai.RateLimitError) as caught:
        c.embeddings.create(model="echo-a", input="hi")
    assert caught.value.code == "rate_limit_exceeded"
    assert embed(server, FULL).status_code == 200  # other keys are unaffected


def test_tokens_per_minute_counts_usage_after_the_request(server: ServerProcess) -> None:
    ten_words = " ".join(["word"] * 10)  # the echo runtime counts 12 tokens
    first = embed(server, TPM, text=ten_words)
    assert first.status_code == 200
    assert first.headers["x-ratelimit-remaining-tokens"] == "20"  # counted after the request
    second = embed(server, TPM, text=ten_words)  # 8 left: admitted, then in debt
    assert second.status_code == 200 and second.headers["x-ratelimit-remaining-tokens"] == "8"
    refused = embed(server, TPM)
    assert refused.status_code == 429
    assert refused.json()["error"]["type"] == "tokens"
    assert refused.headers["x-ratelimit-limit-tokens"] == "20"
    assert refused.headers["x-ratelimit-remaining-tokens"] == "0"
    assert int(refused.headers["retry-after"]) >= 1


def test_tokenizer_routes_count_as_requests_but_charge_no_tokens(server: ServerProcess) -> None:
    headers = {"Authorization": f"Bearer {TOK}"}
    long = " ".join(["word"] * 50)  # far more tokens than the key's 5 a minute
    for expected_left in (99, 98, 97):
        response = httpx.post(server.url + "/tokenize", headers=headers, timeout=30,
                              json={"model": GPT2, "prompt": long})
        assert response.status_code == 200, response.text
        assert response.json()["count"] > 5
        assert response.headers["x-ratelimit-remaining-requests"] == str(expected_left)
        assert response.headers["x-ratelimit-remaining-tokens"] == "5"
    back = httpx.post(server.url + "/detokenize", headers=headers, timeout=30,
                      json={"model": GPT2, "tokens": response.json()["tokens"]})
    assert back.status_code == 200 and back.json()["prompt"] == long
    unknown = httpx.post(server.url + "/tokenize", headers=headers,
                         json={"model": "nope", "prompt": "x"})
    assert unknown.status_code == 404  # admitted first, as on every route: counted too
    assert samples(server, "tidegate_api_key_requests_total")['key="tok"'] == 5
    assert samples(server, "tidegate_api_key_tokens_total")['key="tok",kind="prompt"'] == 0
    # A key's models apply as on every route: another model is unknown to it.
    narrow = {"Authorization": f"Bearer {NARROW}"}
    hidden = httpx.post(server.url + "/tokenize", headers=narrow,
                        json={"model": GPT2, "prompt": "x"})
    assert hidden.status_code == 404 and hidden.json()["error"]["code"] == "model_not_found"
    echo = httpx.post(server.url + "/tokenize", headers=narrow,
                      json={"model": "echo-a", "prompt": "x"})
    assert echo.status_code == 400 and echo.json()["error"]["code"] == "wrong_model_type"


def samples(server: ServerProcess, name: str) -> dict[str, float]:
    text = httpx.get(server.url + "/metrics").text
    return {labels: float(value) for labels, value in
            re.findall(rf"^{name}\{{(.*?)\}} (\S+)$", text, re.M)}


def test_generation_usage_counts_per_key_in_metrics(server: ServerProcess) -> None:
    with client(server, GEN) as c:
        whole = c.completions.create(model=GPT2, prompt="the fox", max_tokens=4, temperature=0)
        chunks = list(c.chat.completions.create(
            model=GPT2, messages=[{"role": "user", "content": "hi"}], max_tokens=3,
            stream=True, stream_options={"include_usage": True}))
    assert whole.usage is not None
    usage = chunks[-1].usage
    assert usage is not None
    tokens = samples(server, "tidegate_api_key_tokens_total")
    assert tokens['key="gen",kind="prompt"'] == whole.usage.prompt_tokens + usage.prompt_tokens
    assert tokens['key="gen",kind="completion"'] == (
        whole.usage.completion_tokens + usage.completion_tokens)
    assert samples(server, "tidegate_api_key_requests_total")['key="gen"'] == 2


def test_a_stream_cut_short_by_its_client_is_still_charged(server: ServerProcess) -> None:
    body = {"model": "endless", "prompt": "the fox", "max_tokens": 100000, "stream": True}
    headers = {"Authorization": f"Bearer {HANGUP}"}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, headers=headers,
                      timeout=30) as response:
        assert response.status_code == 200
        prompt = int(response.headers["x-tidegate-prompt-tokens"])
        events = 0
        for line in response.iter_lines():
            events += line.startswith("data: ")
            if events >= 5:
                break  # hang up mid-stream: no usage chunk, no [DONE]
    deadline = time.monotonic() + 20
    while True:
        tokens = samples(server, "tidegate_api_key_tokens_total")
        if tokens.get('key="hangup",kind="completion"', 0) >= 4:
            break
        assert time.monotonic() < deadline, f"the hung-up stream was not charged: {tokens}"
        time.sleep(0.05)  # polling the server's metrics, bounded by the deadline
    assert prompt >= 1 and tokens['key="hangup",kind="prompt"'] == prompt


def test_metrics_are_labelled_by_id_and_no_key_appears_anywhere(server: ServerProcess) -> None:
    embed(server, FULL)
    embed(server, "tg-never-configured")
    requests = samples(server, "tidegate_api_key_requests_total")
    ids = ("full", "narrow", "rpm", "tpm", "gen", "hangup", "tok")
    assert set(requests) == {f'key="{k}"' for k in ids}
    assert requests['key="full"'] >= 1
    limited = samples(server, "tidegate_api_key_rate_limited_total")
    assert limited['key="rpm",limit="requests"'] >= 1
    text = httpx.get(server.url + "/metrics").text
    assert re.search(r"^tidegate_api_key_invalid_total [1-9]", text, re.M)
    log = server.log()
    assert "tidegate_api_key" not in log and "/v1/embeddings" in log  # the access log ran
    for secret in (*SECRETS, "tg-never-configured", "tg-wrong"):
        assert secret not in text
        assert secret not in log
