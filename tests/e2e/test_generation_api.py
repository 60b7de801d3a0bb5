"""Completions and chat through the real server: the official openai client, SSE streams,
continuous batching, disconnects, and bad input."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.e2e.test_embeddings_api import metric
from tests.serverproc import ServerProcess, run_server

pytestmark = pytest.mark.e2e

GPT2 = "tiny-gpt2"
LLAMA = "tiny-llama"
ENDLESS = "tiny-endless"


@pytest.fixture(scope="module", params=["openvino", "torch"])
def backend(request: pytest.FixtureRequest) -> str:
    """Every test here runs against both local engines (fp32, so greedy text is exact)."""
    return str(request.param)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path, gpt2_dir: Path,
           llama_dir: Path, endless_dir: Path, *, backend: str) -> Iterator[ServerProcess]:
    engine = f'backend = "{backend}"\nprecision = "fp32"'
    config = f"""
[[models]]
id = "{GPT2}"
runtime = "causal-lm"
source = "{gpt2_dir}"
{engine}
[models.generation]
max_num_seqs = 8
max_waiting = 4

[[models]]
id = "{LLAMA}"
runtime = "causal-lm"
source = "{llama_dir}"
{engine}

[[models]]
id = "{ENDLESS}"
runtime = "causal-lm"
source = "{endless_dir}"
{engine}

[[models]]
id = "echo"
runtime = "echo"
"""
    with run_server(tmp_path_factory.mktemp("gen"), config, cache_dir) as proc:
        yield proc


@pytest.fixture()
def client(server: ServerProcess) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0) as c:
        yield c


def reference_greedy(model_dir: Path, prompt: str, max_tokens: int) -> str:
    """The same model run alone with ``model.generate`` (greedy)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    ids = tokenizer(prompt, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=max_tokens, do_sample=False,
                         pad_token_id=tokenizer.eos_token_id)
    text: str = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    return text


def test_models_show_their_backend_and_precision(server: ServerProcess, backend: str) -> None:
    cards = httpx.get(server.url + "/v1/models").json()["data"]
    local = [card for card in cards if card["id"] in (GPT2, LLAMA, ENDLESS)]
    assert len(local) == 3
    for card in local:
        assert (card["backend"], card["precision"], card["weights"]) == (
            backend, "fp32", "original")


def test_completion_matches_generate_and_streams_identically(
    client: openai.OpenAI, gpt2_dir: Path
) -> None:
    prompt = "The quick brown fox"
    whole = client.completions.create(model=GPT2, prompt=prompt, max_tokens=12, temperature=0)
    assert whole.object == "text_completion" and whole.model == GPT2
    assert whole.choices[0].finish_reason in ("stop", "length")
    assert whole.usage is not None and whole.usage.completion_tokens <= 12
    assert whole.usage.prompt_tokens > 0
    assert whole.choices[0].text == reference_greedy(gpt2_dir, prompt, 12)
    chunks = list(client.completions.create(
        model=GPT2, prompt=prompt, max_tokens=12, temperature=0, stream=True,
        stream_options={"include_usage": True},
    ))
    streamed = "".join(c.choices[0].text for c in chunks if c.choices)
    assert streamed == whole.choices[0].text
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_chat_streaming_with_the_openai_client(client: openai.OpenAI) -> None:
    messages: Any = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    whole = client.chat.completions.create(model=LLAMA, messages=messages, max_tokens=10,
                                           temperature=0)
    assert whole.object == "chat.completion"
    assert whole.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(model=LLAMA, messages=messages, max_tokens=10,
                                            temperature=0, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_raw_sse_framing_ends_with_done(server: ServerProcess) -> None:
    body = {"model": GPT2, "prompt": "tidegate", "max_tokens": 5, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=30) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = b"".join(response.iter_bytes())
    events = raw.split(b"\n\n")
    assert events[-1] == b"" and events[-2] == b"data: [DONE]"
    assert all(e.startswith(b"data: ") for e in events[:-1])


def test_seed_reproducible_sampling(client: openai.OpenAI) -> None:
    def sample(seed: int) -> str:
        return client.completions.create(model=GPT2, prompt="Café", max_tokens=10,
                                         temperature=1.0, seed=seed).choices[0].text

    assert sample(7) == sample(7)


def test_stop_string(client: openai.OpenAI) -> None:
    # The endless model cannot end early, so its free run always has text to cut at.
    def complete(**stop: Any) -> Any:
        return client.completions.create(model=ENDLESS, prompt="The", max_tokens=20,
                                         temperature=0, **stop).choices[0]

    text = complete().text
    assert len(text) >= 4, f"20 tokens decoded to {text!r}"
    stop = text[2:4]
    cut = complete(stop=[stop])
    assert cut.text == text[: text.index(stop)]
    assert cut.finish_reason == "stop"


def test_disconnect_frees_the_slot(server: ServerProcess) -> None:
    body = {"model": ENDLESS, "prompt": "The", "max_tokens": 1_000_000, "temperature": 1.0,
            "seed": 1, "stream": True}

    async def scenario() -> None:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
            async with http.stream("POST", "/v1/completions", json=body) as response:
                async for _ in response.aiter_bytes():
                    break  # read one chunk, then hang up
            try:
                async with asyncio.timeout(10):
                    while True:
                        page = (await http.get("/metrics")).text
                        if metric(page, "tidegate_generation_running", ENDLESS) == 0:
                            break
                        await asyncio.sleep(0.01)
            except TimeoutError:
                raise AssertionError("the stream's sequence outlived its client by 10s") from None
            finished = [line for line in page.splitlines()
                        if line.startswith("tidegate_generation_finished_total")
                        and 'reason="abort"' in line and ENDLESS in line]
            assert finished and float(finished[0].split()[-1]) >= 1

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/completions", {"prompt": "x", "max_tokens": 0}, "max_tokens"),
        ("/v1/completions", {"prompt": "x", "temperature": 3}, "temperature"),
        ("/v1/completions", {"prompt": "x", "top_p": 0}, "top_p"),
        ("/v1/completions", {"prompt": "x", "n": 2}, "n"),
        ("/v1/completions", {}, "prompt"),
        ("/v1/chat/completions", {"messages": []}, "messages"),
        ("/v1/chat/completions", {"messages": [{"content": "no role"}]}, "messages"),
    ],
)
def test_bad_input_is_400(server: ServerProcess, path: str, body: dict[str, Any],
                          param: str) -> None:
    response = httpx.post(server.url + path, json={"model": GPT2, **body}, timeout=30)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_prompt_longer_than_the_context_is_400_naming_the_limit(server: ServerProcess) -> None:
    response = httpx.post(server.url + "/v1/completions",
                          json={"model": GPT2, "prompt": "fox " * 400}, timeout=30)
    assert response.status_code == 400
    assert "256" in response.json()["error"]["message"]


def test_wrong_model_kind_is_400(server: ServerProcess) -> None:
    embed = httpx.post(server.url + "/v1/embeddings", json={"model": GPT2, "input": "x"})
    assert embed.status_code == 400 and "generation" in embed.json()["error"]["message"]
    generate = httpx.post(server.url + "/v1/completions", json={"model": "echo", "prompt": "x"})
    assert generate.status_code == 400 and "embedding" in generate.json()["error"]["message"]
    missing = httpx.post(server.url + "/v1/completions", json={"model": "nope", "prompt": "x"})
    assert missing.status_code == 404


def test_generation_metrics_are_exported(server: ServerProcess) -> None:
    page = httpx.get(server.url + "/metrics").text
    for name in ("tidegate_generation_ttft_seconds_count", "tidegate_generation_waiting",
                 "tidegate_generation_inter_token_seconds_count",
                 "tidegate_generation_tokens_per_second"):
        assert f'{name}{{model="{GPT2}"}}' in page, name


def test_admission_beyond_the_limits_is_429(server: ServerProcess) -> None:
    body = {"model": GPT2, "prompt": "The", "max_tokens": 200, "temperature": 1.0, "seed": 3}

    async def scenario() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as http:
            return list(await asyncio.gather(*(
                http.post("/v1/completions", json=body) for _ in range(24))))

    responses = asyncio.run(scenario())
    statuses = [r.status_code for r in responses]
    # At most 4 may wait for a slot (max_waiting); arrivals beyond that are refused at once.
    assert statuses.count(429) >= 1 and statuses.count(200) >= 4, statuses
    assert statuses.count(200) + statuses.count(429) == len(statuses)
    refused = next(r for r in responses if r.status_code == 429)
    assert int(refused.headers["retry-after"]) >= 1
    assert refused.json()["error"]["code"] == "overloaded"
