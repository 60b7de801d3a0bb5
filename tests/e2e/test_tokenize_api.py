"""``POST /tokenize`` and ``POST /detokenize`` through the real server: the bundled embedding
model and small causal LMs against their own tokenizers, chat messages against what a chat
completion prompts with, errors, a remote model relayed to a real tidegate upstream, and the
per-route metrics."""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import CORPUS, EOS, build_tokenizer
from tests.serverproc import ServerProcess, run_server

pytestmark = pytest.mark.e2e

EMBED = "all-minilm-l6-v2"
GPT2 = "tiny-gpt2"
LLAMA = "tiny-llama"
CHAT = "tiny-chat"
REMOTE = "remote-gpt2"
TEMPLATE = ("{{ bos_token }}{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")
MESSAGES = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"}]
TEXT = CORPUS[1] + " " + CORPUS[2]  # accents, CJK and emoji: multi-byte characters split by BPE


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory: pytest.TempPathFactory, gpt2_dir: Path) -> Path:
    """tiny-gpt2 with a tokenizer that adds a BOS token and has a chat template (which writes
    its own BOS)."""
    from tokenizers import processors

    path = tmp_path_factory.mktemp("chat")
    shutil.copytree(gpt2_dir, path, dirs_exist_ok=True)
    tokenizer = build_tokenizer()
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{EOS} $A", special_tokens=[(EOS, tokenizer.bos_token_id)])
    tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path,
             gpt2_dir: Path) -> Iterator[ServerProcess]:
    config = f"""
[[models]]
id = "{GPT2}"
runtime = "causal-lm"
source = "{gpt2_dir}"
backend = "torch"
"""
    with run_server(tmp_path_factory.mktemp("tok-upstream"), config, cache_dir) as proc:
        yield proc


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path, gpt2_dir: Path,
           llama_dir: Path, chat_dir: Path, *, upstream: ServerProcess
           ) -> Iterator[ServerProcess]:
    lms = "".join(f"""
[[models]]
id = "{model}"
runtime = "causal-lm"
source = "{source}"
backend = "torch"
""" for model, source in ((GPT2, gpt2_dir), (LLAMA, llama_dir), (CHAT, chat_dir)))
    config = f"""
[[models]]
id = "{EMBED}"
runtime = "embedding"

[[models]]
id = "echo"
runtime = "echo"
{lms}
[[models]]
id = "{REMOTE}"
runtime = "remote"
upstreams = ["{upstream.url}"]
upstream_model = "{GPT2}"
[models.upstream.health]
path = "/health/ready"
interval_s = 0.2
"""
    with run_server(tmp_path_factory.mktemp("tok"), config, cache_dir) as proc:
        yield proc


@pytest.fixture(scope="module")
def http(server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30) as client:
        yield client


def tokenize(http: httpx.Client, model: str, **body: Any) -> dict[str, Any]:
    response = http.post("/tokenize", json={"model": model, **body})
    assert response.status_code == 200, response.text
    data: dict[str, Any] = response.json()
    assert data["count"] == len(data["tokens"])
    return data


def detokenize(http: httpx.Client, model: str, tokens: list[int]) -> str:
    response = http.post("/detokenize", json={"model": model, "tokens": tokens})
    assert response.status_code == 200, response.text
    assert set(response.json()) == {"prompt"}
    text: str = response.json()["prompt"]
    return text


def error(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()["error"]
    return body


def test_embedding_model_round_trip_without_truncation(http: httpx.Client,
                                                        model_dir: Path) -> None:
    from tokenizers import Tokenizer

    own = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    own.no_truncation()
    own.no_padding()
    text = "a cat sits on the mat."
    plain = tokenize(http, EMBED, prompt=text, add_special_tokens=False)
    assert plain["tokens"] == own.encode(text, add_special_tokens=False).ids
    assert plain["max_model_len"] == 256
    assert detokenize(http, EMBED, plain["tokens"]) == text
    full = tokenize(http, EMBED, prompt=text, return_token_strs=True)  # special tokens: default
    assert full["tokens"] == own.encode(text).ids == [101, *plain["tokens"], 102]
    assert full["token_strs"] == ["[CLS]", "a", "cat", "sits", "on", "the", "mat", ".", "[SEP]"]
    assert detokenize(http, EMBED, full["tokens"]) == f"[CLS] {text} [SEP]"
    long = tokenize(http, EMBED, prompt="long " * 600)
    assert (long["count"], long["max_model_len"]) == (602, 256)  # embedding would truncate


@pytest.mark.parametrize("model", [GPT2, LLAMA])
def test_causal_lm_round_trip_matches_its_tokenizer(http: httpx.Client, model: str,
                                                    gpt2_dir: Path, llama_dir: Path) -> None:
    from transformers import AutoTokenizer

    own = AutoTokenizer.from_pretrained(gpt2_dir if model == GPT2 else llama_dir)
    data = tokenize(http, model, prompt=TEXT, return_token_strs=True)
    assert data["tokens"] == own(TEXT)["input_ids"]
    assert data["token_strs"] == own.convert_ids_to_tokens(data["tokens"])
    assert data["max_model_len"] == 256
    assert detokenize(http, model, data["tokens"]) == TEXT
    # Long prompts are tokenized off the event loop, with the same ids.
    long = "The quick brown fox jumps. " * 400
    assert tokenize(http, model, prompt=long)["tokens"] == own(long)["input_ids"]
    assert detokenize(http, model, own(long)["input_ids"]) == long


def test_add_special_tokens_false_vs_true(http: httpx.Client) -> None:
    bos = tokenize(http, CHAT, prompt=EOS, add_special_tokens=False)["tokens"]
    assert len(bos) == 1
    plain = tokenize(http, CHAT, prompt="the fox", add_special_tokens=False)["tokens"]
    assert tokenize(http, CHAT, prompt="the fox")["tokens"] == bos + plain  # default: true
    assert tokenize(http, CHAT, prompt="the fox", add_special_tokens=True)["tokens"] == (
        bos + plain)
    assert detokenize(http, CHAT, bos + plain) == EOS + "the fox"  # special tokens written out


def test_messages_are_tokenized_as_chat_completions_prompts_them(
        http: httpx.Client, chat_dir: Path, gpt2_dir: Path) -> None:
    from tidegate.runtimes.causal_lm import CausalLMRuntime

    for model, source in ((CHAT, chat_dir), (GPT2, gpt2_dir)):  # a template; the default format
        runtime = CausalLMRuntime(source)
        assert runtime.has_chat_template == (model == CHAT)
        data = tokenize(http, model, messages=MESSAGES)
        assert data["tokens"] == runtime.encode_chat(MESSAGES)
        chat = http.post("/v1/chat/completions", json={"model": model, "messages": MESSAGES,
                                                       "max_tokens": 1})
        assert chat.json()["usage"]["prompt_tokens"] == data["count"]
        closed = tokenize(http, model, messages=MESSAGES, add_generation_prompt=False)
        assert closed["tokens"] == runtime.tokenize_chat(MESSAGES, add_generation_prompt=False)
        assert closed["count"] < data["count"]
    # The template writes its own BOS; asking for special tokens adds the tokenizer's too.
    templated = tokenize(http, CHAT, messages=MESSAGES)["tokens"]
    assert detokenize(http, CHAT, templated) == f"{EOS}<system>Be terse.<user>Hi<assistant>"
    doubled = tokenize(http, CHAT, messages=MESSAGES, add_special_tokens=True)["tokens"]
    assert doubled == templated[:1] + templated


def test_errors(http: httpx.Client) -> None:
    for path, body in (("/tokenize", {"prompt": "x"}), ("/detokenize", {"tokens": [1]})):
        unknown = error(http.post(path, json={"model": "nope", **body}), 404)
        assert unknown["code"] == "model_not_found"
        echo = error(http.post(path, json={"model": "echo", **body}), 400)
        assert (echo["param"], echo["code"]) == ("model", "wrong_model_type")
        assert "has no tokenizer" in echo["message"]
    vocabulary = {GPT2: len(build_tokenizer()), EMBED: 30522}
    for model, size in vocabulary.items():
        outside = error(http.post("/detokenize", json={"model": model,
                                                       "tokens": [1, size - 1, size]}), 400)
        assert outside["param"] == "tokens"
        assert f"'tokens[2]' is {size}" in outside["message"]
        assert f"ids 0 to {size - 1}" in outside["message"]
    negative = error(http.post("/detokenize", json={"model": GPT2, "tokens": [-1]}), 400)
    assert negative["param"] == "tokens"
    messages = error(http.post("/tokenize", json={"model": EMBED, "messages": MESSAGES}), 400)
    assert messages["param"] == "messages"
    missing = error(http.post("/tokenize", json={"model": GPT2}), 400)
    assert missing["param"] == "prompt"
    unhonoured = error(http.post("/tokenize", json={"model": CHAT, "messages": MESSAGES,
                                                    "continue_final_message": True}), 400)
    assert unhonoured["param"] == "continue_final_message"
    malformed = error(http.post("/tokenize", content=b"{", headers={
        "content-type": "application/json"}), 400)
    assert malformed["type"] == "invalid_request_error"


def test_a_remote_model_relays_to_its_upstream(http: httpx.Client,
                                               upstream: ServerProcess) -> None:
    with httpx.Client(base_url=upstream.url, timeout=30) as direct:
        for body in ({"prompt": TEXT, "return_token_strs": True},
                     {"messages": MESSAGES, "add_generation_prompt": False}):
            relayed = tokenize(http, REMOTE, **body)
            assert relayed == tokenize(direct, GPT2, **body)
        ids = tokenize(direct, GPT2, prompt=TEXT)["tokens"]
        assert detokenize(http, REMOTE, ids) == TEXT
    # The upstream's own 400 is relayed as it is.
    outside = error(http.post("/detokenize", json={"model": REMOTE, "tokens": [10**6]}), 400)
    assert outside["param"] == "tokens"
    assert f"model '{GPT2}'" in outside["message"]  # the upstream's name for it


def route_requests(server: ServerProcess) -> dict[tuple[str, str, str], float]:
    text = httpx.get(server.url + "/metrics").text
    counts = {}
    for labels, value in re.findall(r"^tidegate_route_requests_total\{(.*?)\} (\S+)$", text,
                                    re.M):
        named = dict(re.findall(r'(\w+)="(.*?)"', labels))
        counts[named["route"], named["model"], named["status"]] = float(value)
    return counts


def test_requests_are_counted_by_route_model_and_status(http: httpx.Client,
                                                        server: ServerProcess) -> None:
    before = route_requests(server)
    tokenize(http, GPT2, prompt="x")
    detokenize(http, GPT2, [1])
    http.post("/detokenize", json={"model": GPT2, "tokens": [10**6]})
    http.post("/tokenize", json={"model": "never-configured", "prompt": "x"})
    after = route_requests(server)
    for key in (("/tokenize", GPT2, "200"), ("/detokenize", GPT2, "200"),
                ("/detokenize", GPT2, "400"), ("/tokenize", "", "404")):
        assert after[key] == before.get(key, 0) + 1, key
    assert not any(model == "never-configured" for _, model, _ in after)
