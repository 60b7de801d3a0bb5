"""Generation parameters through the real server and the official openai client: logprobs in
chat's and completions' shapes (streamed and not), penalties and vLLM's extensions accepted,
400s for what a local model would silently ignore, and a remote model's body relayed unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import torch

from tests.serverproc import ServerProcess, run_server
from tests.upstream.faulty_upstream import FaultyUpstream
from tidegate.runtimes.causal_lm import default_chat_prompt

pytestmark = pytest.mark.e2e

GPT2 = "tiny-gpt2"
LLAMA = "tiny-llama"
RELAY = "relay"
CHAT: Any = [{"role": "user", "content": "The quick brown fox"}]


@pytest.fixture(scope="module")
def upstream() -> Iterator[FaultyUpstream]:
    with FaultyUpstream("relayed") as faulty:
        yield faulty


@pytest.fixture(scope="module", params=["openvino", "torch"])
def backend(request: pytest.FixtureRequest) -> str:
    """Both local engines, in fp32 (logprobs are compared with transformers' own)."""
    return str(request.param)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path, gpt2_dir: Path,
           llama_dir: Path, upstream: FaultyUpstream, *, backend: str
           ) -> Iterator[ServerProcess]:
    config = f"""
[[models]]
id = "{GPT2}"
runtime = "causal-lm"
source = "{gpt2_dir}"
backend = "{backend}"
precision = "fp32"

[[models]]
id = "{LLAMA}"
runtime = "causal-lm"
source = "{llama_dir}"
backend = "{backend}"
precision = "fp32"

[[models]]
id = "{RELAY}"
runtime = "remote"
upstreams = ["{upstream.url}"]
upstream_model = "fake"
[models.upstream.retry]
max_retries = 0
"""
    with run_server(tmp_path_factory.mktemp("gen-params"), config, cache_dir) as proc:
        yield proc


@pytest.fixture()
def client(server: ServerProcess) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0) as c:
        yield c


class Reference:
    """The model run in this process: the tokens the server must report and their logprobs."""

    def __init__(self, model_dir: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir)

    def token(self, token_id: int) -> str:
        text: str = self.tokenizer.decode([token_id], skip_special_tokens=False)
        return text

    def continuation(self, prompt_ids: list[int], count: int) -> tuple[list[int], torch.Tensor]:
        """Greedy tokens after ``prompt_ids`` and the log_softmax of each one's logits."""
        ids = torch.tensor([prompt_ids])
        with torch.inference_mode():
            out = self.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                      max_new_tokens=count, pad_token_id=0)
            tokens: list[int] = out[0, len(prompt_ids):].tolist()
            logits = self.model(input_ids=out[:, :-1]).logits[0, len(prompt_ids) - 1:]
        return tokens, torch.log_softmax(logits.float(), dim=-1)


def check_chat_entries(content: list[Any], reference: Reference, prompt_ids: list[int],
                       top: int) -> None:
    tokens, logprobs = reference.continuation(prompt_ids, len(content))
    assert [entry.token for entry in content] == [reference.token(t) for t in tokens]
    for entry, token, row in zip(content, tokens, logprobs, strict=True):
        assert abs(entry.logprob - row[token].item()) < 1e-4
        assert entry.bytes == list(entry.token.encode())
        assert len(entry.top_logprobs) == top
        values = [alt.logprob for alt in entry.top_logprobs]
        assert values == sorted(values, reverse=True)
        assert [alt.token for alt in entry.top_logprobs] == [
            reference.token(t) for t in row.topk(top).indices.tolist()]
        if top:
            assert entry.top_logprobs[0].token == entry.token  # greedy: the likeliest one


def alternatives(backend: str) -> int:
    """OpenVINO GenAI's pipeline reports only the chosen token's logprob."""
    return 0 if backend == "openvino" else 3


def test_alternatives_are_reported_or_refused_by_name(
        client: openai.OpenAI, backend: str) -> None:
    """torch reports alternative tokens; OpenVINO's pipeline cannot, and says so."""
    if backend != "openvino":
        chat = client.chat.completions.create(model=LLAMA, messages=CHAT, max_tokens=2,
                                              logprobs=True, top_logprobs=1)
        assert chat.choices[0].logprobs is not None and chat.choices[0].logprobs.content
        assert all(len(e.top_logprobs) == 1 for e in chat.choices[0].logprobs.content)
        return
    with pytest.raises(openai.BadRequestError) as chat_error:
        client.chat.completions.create(model=LLAMA, messages=CHAT, max_tokens=2,
                                       logprobs=True, top_logprobs=1)
    assert chat_error.value.body["param"] == "top_logprobs"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as legacy:
        client.completions.create(model=GPT2, prompt="x", max_tokens=2, logprobs=1)
    assert legacy.value.body["param"] == "logprobs"  # type: ignore[index]


def test_chat_logprobs_streamed_and_not(client: openai.OpenAI, llama_dir: Path,
                                        backend: str) -> None:
    reference = Reference(llama_dir)
    assert not reference.tokenizer.chat_template  # so the server uses the default format
    prompt_ids = reference.tokenizer(default_chat_prompt(CHAT))["input_ids"]
    top = alternatives(backend)
    options: Any = {"model": LLAMA, "messages": CHAT, "max_tokens": 12, "temperature": 0,
                    "logprobs": True, "top_logprobs": top}
    whole = client.chat.completions.create(**options)
    choice = whole.choices[0]
    assert choice.logprobs is not None and choice.logprobs.content is not None
    content = choice.logprobs.content
    assert whole.usage is not None and len(content) == whole.usage.completion_tokens
    check_chat_entries(content, reference, prompt_ids, top)
    chunks = list(client.chat.completions.create(**options, stream=True))
    streamed = [entry for chunk in chunks if chunk.choices and chunk.choices[0].logprobs
                for entry in chunk.choices[0].logprobs.content or []]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in content]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    # A chunk with text carries the logprobs of the tokens that text completes.
    for chunk in chunks:
        if chunk.choices and chunk.choices[0].delta.content:
            assert chunk.choices[0].logprobs and chunk.choices[0].logprobs.content
    without = client.chat.completions.create(model=LLAMA, messages=CHAT, max_tokens=4)
    assert without.choices[0].logprobs is None


def test_completion_logprobs_in_the_legacy_shape(client: openai.OpenAI, gpt2_dir: Path,
                                                backend: str) -> None:
    reference = Reference(gpt2_dir)
    prompt = "The quick brown fox"
    k = min(2, alternatives(backend))
    options: Any = {"model": GPT2, "prompt": prompt, "max_tokens": 10, "temperature": 0,
                    "logprobs": k}
    whole = client.completions.create(**options)
    logprobs = whole.choices[0].logprobs
    assert logprobs is not None and logprobs.tokens is not None
    assert logprobs.token_logprobs is not None and logprobs.top_logprobs is not None
    tokens, expected = reference.continuation(reference.tokenizer(prompt)["input_ids"],
                                              len(logprobs.tokens))
    assert logprobs.tokens == [reference.token(t) for t in tokens]
    for got, token, row, top in zip(logprobs.token_logprobs, tokens, expected,
                                    logprobs.top_logprobs, strict=True):
        assert abs(got - row[token].item()) < 1e-4
        # Keyed by string: alternatives that decode alike (bytes of a split character: "\ufffd")
        # collapse into the likeliest.
        expected_top: dict[str, float] = {}
        best = row.topk(k)
        for alt, value in zip(best.indices.tolist(), best.values.tolist(), strict=True):
            expected_top.setdefault(reference.token(alt), value)
        assert list(top) == list(expected_top)
        assert all(abs(top[key] - value) < 1e-4 for key, value in expected_top.items())
    lengths = [len(token) for token in logprobs.tokens]
    assert logprobs.text_offset == [sum(lengths[:i]) for i in range(len(lengths))]
    chunks = list(client.completions.create(**options, stream=True))
    streamed: list[str] = []
    offsets: list[int] = []
    for chunk in chunks:
        if chunk.choices and chunk.choices[0].logprobs:
            streamed += chunk.choices[0].logprobs.tokens or []
            offsets += chunk.choices[0].logprobs.text_offset or []
    assert streamed == logprobs.tokens and offsets == logprobs.text_offset
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text


def test_penalties_and_vllm_extensions_are_honoured(client: openai.OpenAI) -> None:
    common: Any = {"model": GPT2, "prompt": "The quick", "max_tokens": 12, "temperature": 0}
    plain = client.completions.create(**common, extra_body={"ignore_eos": True})
    assert plain.usage is not None and plain.usage.completion_tokens == 12
    assert plain.choices[0].finish_reason == "length"
    penalized = client.completions.create(**common, presence_penalty=2, frequency_penalty=2,
                                          extra_body={"min_tokens": 12, "ignore_eos": None})
    assert penalized.choices[0].text != plain.choices[0].text
    assert penalized.usage is not None and penalized.usage.completion_tokens == 12
    nulls = client.chat.completions.create(
        model=GPT2, messages=CHAT, max_tokens=2, presence_penalty=None,
        frequency_penalty=None, logprobs=None, top_logprobs=None, n=1, logit_bias={},
        extra_body={"min_tokens": None, "ignore_eos": None, "echo": False, "top_k": -1})
    assert nulls.choices[0].logprobs is None


@pytest.mark.parametrize(("path", "fields", "param"), [
    ("/v1/completions", {"n": 2}, "n"),
    ("/v1/chat/completions", {"n": 3}, "n"),
    ("/v1/completions", {"best_of": 2}, "best_of"),
    ("/v1/completions", {"echo": True}, "echo"),
    ("/v1/completions", {"suffix": "!"}, "suffix"),
    ("/v1/completions", {"logit_bias": {"5": 10}}, "logit_bias"),
    ("/v1/chat/completions", {"logit_bias": {"5": 10}}, "logit_bias"),
    ("/v1/chat/completions", {"tools": [{"type": "function", "function": {"name": "f"}}]},
     "tools"),
    ("/v1/chat/completions", {"tool_choice": "required"}, "tool_choice"),
    ("/v1/chat/completions", {"functions": [{"name": "f"}]}, "functions"),
    ("/v1/chat/completions", {"function_call": {"name": "f"}}, "function_call"),
    ("/v1/chat/completions", {"response_format": {"type": "json_object"}}, "response_format"),
    ("/v1/chat/completions", {"top_k": 5}, "top_k"),
    ("/v1/chat/completions", {"top_logprobs": 2}, "top_logprobs"),
    ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("/v1/completions", {"logprobs": 6}, "logprobs"),
    ("/v1/completions", {"presence_penalty": 3}, "presence_penalty"),
    ("/v1/completions", {"min_tokens": 5, "max_tokens": 2}, "min_tokens"),
    ("/v1/completions", {"ignore_eos": "yes"}, "ignore_eos"),
])
def test_what_a_local_model_would_ignore_is_400(server: ServerProcess, path: str,
                                                fields: dict[str, Any], param: str) -> None:
    body = {"model": GPT2, "max_tokens": 2, **fields}
    body.update({"prompt": "x"} if path == "/v1/completions" else {"messages": CHAT})
    response = httpx.post(server.url + path, json=body, timeout=30)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


@pytest.mark.parametrize(("path", "fields"), [
    ("/v1/chat/completions", {"messages": CHAT, "n": 2, "logit_bias": {"5": 10},
                              "tools": [{"type": "function", "function": {"name": "f"}}],
                              "response_format": {"type": "json_object"}, "top_k": 5,
                              "logprobs": True, "top_logprobs": 20}),
    ("/v1/completions", {"prompt": "x", "n": 2, "best_of": 3, "echo": True, "suffix": "!",
                         "logit_bias": {"5": 10}, "logprobs": 5}),
])
def test_a_remote_model_gets_the_body_unchanged(server: ServerProcess, upstream: FaultyUpstream,
                                                path: str, fields: dict[str, Any]) -> None:
    body = {"model": RELAY, **fields}
    response = httpx.post(server.url + path, json=body, timeout=30)
    assert response.status_code == 200, response.text
    assert response.json()["model"] == RELAY
    assert upstream.last_body == {**body, "model": "fake"}
