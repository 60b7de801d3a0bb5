"""API keys in front of a remote model: a relayed stream is charged its usage whether or not
the client asked for it, the usage chunk reaches only a client that asked, and a client that
hangs up mid-stream is still charged what it got. The upstream is a real HTTP server
(:class:`FaultyUpstream`); the client is the official openai package."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.serverproc import ServerProcess, run_server
from tests.upstream.faulty_upstream import STREAM_PROMPT_TOKENS, FaultyUpstream
from tidegate.auth.keyring import hash_key

pytestmark = pytest.mark.e2e

PLAIN = "tg-plain-0123456789abcdefghijklmno"    # never asks for usage
ASKS = "tg-asks-0123456789abcdefghijklmnop"     # asks for usage
HANGUP = "tg-hangup-0123456789abcdefghijklmn"   # hangs up mid-stream


@pytest.fixture(scope="module")
def upstream() -> Iterator[FaultyUpstream]:
    with FaultyUpstream("keys") as up:
        yield up


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path,
            upstream: FaultyUpstream) -> Iterator[ServerProcess]:
    config = f"""
[auth]
[[auth.keys]]
id = "plain"
hash = "{hash_key(PLAIN)}"
tokens_per_minute = 100000

[[auth.keys]]
id = "asks"
hash = "{hash_key(ASKS)}"

[[auth.keys]]
id = "hangup"
hash = "{hash_key(HANGUP)}"

[[models]]
id = "remote-chat"
runtime = "remote"
upstreams = ["{upstream.url}"]
upstream_model = "fake"
[models.upstream.health]
interval_s = 0.2
"""
    with run_server(tmp_path_factory.mktemp("gateway-keys"), config, cache_dir) as proc:
        yield proc


def _tokens(server: ServerProcess, key: str) -> tuple[float, float]:
    text = httpx.get(server.url + "/metrics").text
    found = dict(re.findall(rf'^tidegate_api_key_tokens_total\{{key="{key}",kind="(\w+)"\}} '
                            r"(\S+)$", text, re.M))
    return float(found.get("prompt", 0)), float(found.get("completion", 0))


def _stream(server: ServerProcess, key: str, **extra: object) -> list[object]:
    with openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0) as client:
        return list(client.chat.completions.create(
            model="remote-chat", messages=[{"role": "user", "content": "hi"}], stream=True,
            **extra))  # type: ignore[call-overload]


def test_a_stream_is_charged_its_usage_though_the_client_did_not_ask(
    gateway: ServerProcess, upstream: FaultyUpstream
) -> None:
    chunks = _stream(gateway, PLAIN)
    assert upstream.last_body["stream_options"] == {"include_usage": True}
    assert all(chunk.choices for chunk in chunks)  # type: ignore[attr-defined]
    assert all(chunk.usage is None for chunk in chunks)  # type: ignore[attr-defined]
    text = "".join(c.choices[0].delta.content or "" for c in chunks)  # type: ignore[attr-defined]
    assert text == "tok0 tok1 tok2 "
    assert _tokens(gateway, "plain") == (STREAM_PROMPT_TOKENS, upstream.stream_chunks)


def test_a_client_that_asks_gets_the_usage_chunk_and_is_charged_once(
    gateway: ServerProcess, upstream: FaultyUpstream
) -> None:
    chunks = _stream(gateway, ASKS, stream_options={"include_usage": True})
    last = chunks[-1]
    assert last.usage is not None and last.choices == []  # type: ignore[attr-defined]
    assert last.usage.prompt_tokens == STREAM_PROMPT_TOKENS  # type: ignore[attr-defined]
    assert _tokens(gateway, "asks") == (STREAM_PROMPT_TOKENS, upstream.stream_chunks)


def test_a_client_that_hangs_up_mid_stream_is_charged_what_it_got(
    gateway: ServerProcess, upstream: FaultyUpstream
) -> None:
    upstream.stall_after = 2  # two content chunks, then nothing until the client leaves
    body = {"model": "remote-chat", "stream": True,
            "messages": [{"role": "user", "content": "hi"}]}
    try:
        with httpx.stream("POST", gateway.url + "/v1/chat/completions", json=body, timeout=30,
                          headers={"Authorization": f"Bearer {HANGUP}"}) as response:
            assert response.status_code == 200
            events = 0
            for line in response.iter_lines():
                events += line.startswith("data: ")
                if events == 2:
                    break  # hang up while the upstream stalls: no usage chunk came
        deadline = time.monotonic() + 20
        while _tokens(gateway, "hangup") != (0, 2):
            assert time.monotonic() < deadline, f"not charged: {_tokens(gateway, 'hangup')}"
            time.sleep(0.05)  # polling the server's metrics, bounded by the deadline
    finally:
        upstream.stall_after = None
