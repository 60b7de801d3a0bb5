"""The real server, the real MiniLM model, the official openai client and raw HTTP."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest

from tests.serverproc import ServerProcess, run_server
from tidegate.engines import cpu_supports_bf16

pytestmark = pytest.mark.e2e

MODEL = "all-minilm-l6-v2"
CONFIG = """
[server]
max_body_bytes = 65536
max_inputs_per_request = 300

[[models]]
id = "all-minilm-l6-v2"
runtime = "embedding"

[[models]]
id = "echo"
runtime = "echo"
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Iterator[ServerProcess]:
    with run_server(tmp_path_factory.mktemp("api"), CONFIG, cache_dir) as proc:
        yield proc


@pytest.fixture()
def client(server: ServerProcess) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0) as c:
        yield c


@pytest.fixture()
def http(server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


def _cos(a: Any, b: Any) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_openai_client_float_and_base64_agree_with_reference(
    client: openai.OpenAI, reference_model: Any
) -> None:
    texts = ["a cat sits on the mat", "stock markets fell sharply today", "naïve café ☕"]
    as_float = client.embeddings.create(model=MODEL, input=texts, encoding_format="float")
    as_b64 = client.embeddings.create(model=MODEL, input=texts, encoding_format="base64")
    default = client.embeddings.create(model=MODEL, input=texts)  # the client asks for base64
    reference = reference_model.encode(texts, normalize_embeddings=True)
    assert as_float.model == MODEL and as_float.object == "list"
    assert [d.index for d in as_float.data] == [0, 1, 2]
    for i, ref in enumerate(reference):
        assert len(as_float.data[i].embedding) == 384
        assert _cos(as_float.data[i].embedding, ref) >= 0.9999
        # Asked for base64 explicitly, the client hands the string through undecoded.
        decoded = np.frombuffer(base64.b64decode(as_b64.data[i].embedding), dtype="<f4")
        assert np.allclose(decoded, as_float.data[i].embedding, atol=1e-6)
        assert np.allclose(default.data[i].embedding, as_float.data[i].embedding, atol=1e-6)
    assert as_float.usage.prompt_tokens == as_float.usage.total_tokens > len(texts) * 2


def test_base64_is_little_endian_float32(http: httpx.Client) -> None:
    body = {"model": MODEL, "input": "hello", "encoding_format": "base64"}
    raw = http.post("/v1/embeddings", json=body).json()["data"][0]["embedding"]
    floats = http.post("/v1/embeddings", json={**body, "encoding_format": "float"}).json()
    vector = np.frombuffer(base64.b64decode(raw), dtype="<f4")
    assert vector.shape == (384,)
    assert np.allclose(vector, floats["data"][0]["embedding"], atol=1e-7)


def test_single_string_input_and_usage_counts_real_tokens(http: httpx.Client) -> None:
    response = http.post(
        "/v1/embeddings", json={"model": MODEL, "input": "hello world", "user": "someone"}
    )
    assert response.status_code == 200
    payload = response.json()
    assert set(payload) == {"object", "data", "model", "usage"}
    assert payload["data"][0]["object"] == "embedding"
    # [CLS] hello world [SEP]
    assert payload["usage"] == {"prompt_tokens": 4, "total_tokens": 4}


def test_truncation_counts_only_the_tokens_used(http: httpx.Client) -> None:
    long_text = "word " * 1000
    payload = http.post("/v1/embeddings", json={"model": MODEL, "input": long_text}).json()
    assert payload["usage"]["prompt_tokens"] == 256


def test_semantic_sanity(client: openai.OpenAI) -> None:
    texts = ["a cat sits on the mat", "a kitten is sitting on a rug",
             "stock markets fell sharply today"]
    vectors = [d.embedding for d in client.embeddings.create(model=MODEL, input=texts).data]
    assert _cos(vectors[0], vectors[1]) > _cos(vectors[0], vectors[2])


def test_models_list_and_retrieve(client: openai.OpenAI, http: httpx.Client) -> None:
    ids = [m.id for m in client.models.list().data]
    assert ids == [MODEL, "echo"]
    model = client.models.retrieve(MODEL)
    assert model.id == MODEL and model.object == "model" and model.owned_by == "tidegate"
    missing = http.get("/v1/models/nope")
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "model_not_found"


def test_model_object_names_its_engine(http: httpx.Client) -> None:
    card = http.get(f"/v1/models/{MODEL}").json()
    # The default engine here: OpenVINO, bf16 where the CPU has it, kept by the probe.
    expected = "bf16" if cpu_supports_bf16() else "fp32"
    assert (card["backend"], card["precision"]) == ("openvino", expected)
    assert 0.9999 <= card["probe_min_cosine"] <= 1.0
    assert "backend" not in http.get("/v1/models/echo").json()


def test_health(http: httpx.Client) -> None:
    assert http.get("/health/live").status_code == 200
    ready = http.get("/health/ready")
    assert ready.status_code == 200
    assert ready.json()["models"] == {MODEL: "loaded", "echo": "loaded"}


def metric(text: str, name: str, model: str = MODEL) -> float:
    """The value of one Prometheus sample for ``model`` in a /metrics page."""
    prefix = f'{name}{{model="{model}"}} '
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line[len(prefix):])
    raise AssertionError(f"{prefix!r} not in /metrics")


async def post_until_dispatched(
    http: httpx.AsyncClient, inputs: list[str], *, timeout_s: float = 30.0
) -> asyncio.Task[httpx.Response]:
    """Start embedding ``inputs`` with MODEL (otherwise idle) and return the request's task once
    /metrics shows its first batch dispatched; fail if it finishes first or after ``timeout_s``."""
    batches = "tidegate_batch_size_items_count"
    before = metric((await http.get("/metrics")).text, batches)
    busy = asyncio.create_task(http.post("/v1/embeddings", json={"model": MODEL, "input": inputs}))
    deadline = asyncio.get_running_loop().time() + timeout_s
    while metric((await http.get("/metrics")).text, batches) == before:
        assert not busy.done(), f"the request finished before its batch was seen: {await busy}"
        assert asyncio.get_running_loop().time() < deadline, \
            f"no batch of {MODEL} dispatched within {timeout_s:g}s"
        await asyncio.sleep(0.005)
    return busy


def test_live_answers_while_a_128_input_request_computes(server: ServerProcess) -> None:
    texts = [f"sentence number {i} " + "with many filler words " * 15 for i in range(128)]

    async def scenario() -> None:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as http:
            # /metrics itself is served by the event loop: wait until the first batch of the
            # big request was dispatched to the model.
            big = await post_until_dispatched(http, texts)
            live = await http.get("/health/live")
            assert live.status_code == 200
            assert not big.done(), "the 128-input request finished before /health/live answered"
            response = await big
            assert response.status_code == 200
            assert len(response.json()["data"]) == 128

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"input": "x"}, "model"),
        ({"model": MODEL}, "input"),
        ({"model": 3, "input": "x"}, "model"),
        ({"model": MODEL, "input": 5}, "input"),
        ({"model": MODEL, "input": []}, "input"),
        ({"model": MODEL, "input": ""}, "input"),
        ({"model": MODEL, "input": ["ok", ""]}, "input"),
        ({"model": MODEL, "input": ["ok", None]}, "input"),
        ({"model": MODEL, "input": [[1, 2, 3]]}, "input"),
        ({"model": MODEL, "input": "x", "encoding_format": "int8"}, "encoding_format"),
        ({"model": MODEL, "input": "x", "dimensions": 12}, "dimensions"),
        ({"model": MODEL, "input": "x", "user": 7}, "user"),
    ],
)
def test_bad_parameters_are_400_naming_the_parameter(
    http: httpx.Client, body: dict[str, Any], param: str
) -> None:
    response = http.post("/v1/embeddings", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"
    assert set(error) == {"message", "type", "param", "code"}


def test_malformed_json_is_400(http: httpx.Client) -> None:
    response = http.post(
        "/v1/embeddings", content=b'{"model": ', headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    assert "not valid JSON" in response.json()["error"]["message"]


def test_non_object_json_is_400(http: httpx.Client) -> None:
    response = http.post("/v1/embeddings", json=["model", "input"])
    assert response.status_code == 400


def test_unknown_model_is_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.embeddings.create(model="no-such-model", input="x")
    assert caught.value.code == "model_not_found"


def test_too_many_inputs_is_413(http: httpx.Client) -> None:
    response = http.post("/v1/embeddings", json={"model": "echo", "input": ["x"] * 301})
    assert response.status_code == 413
    assert "300" in response.json()["error"]["message"]


def test_body_too_large_is_413(http: httpx.Client) -> None:
    response = http.post("/v1/embeddings", json={"model": MODEL, "input": "x" * 70_000})
    assert response.status_code == 413


def test_body_too_large_without_content_length_is_413(http: httpx.Client) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"model": "echo", "input": "'
        for _ in range(20):
            yield b"y" * 8192
        yield b'"}'

    response = http.post(
        "/v1/embeddings", content=chunks(), headers={"content-type": "application/json"}
    )
    assert response.status_code == 413


def test_non_json_content_type_is_415(http: httpx.Client) -> None:
    response = http.post(
        "/v1/embeddings", content=b"model=x", headers={"content-type": "text/plain"}
    )
    assert response.status_code == 415
    assert response.json()["error"]["code"] == "unsupported_media_type"


def test_unknown_route_is_404_json(http: httpx.Client) -> None:
    response = http.get("/v1/nothing-here")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"


def test_wrong_method_is_405_json(http: httpx.Client) -> None:
    response = http.get("/v1/embeddings")
    assert response.status_code == 405
    assert response.json()["error"]["code"] == "method_not_allowed"


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_generating_with_an_embedding_model_is_400_wrong_model_type(
    http: httpx.Client, path: str
) -> None:
    body = {"model": "echo", "prompt": "hi", "messages": [{"role": "user", "content": "hi"}]}
    response = http.post(path, json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "wrong_model_type" and error["param"] == "model"
    assert error["message"] == (
        "Model 'echo' is an embedding model; it cannot generate text. Use /v1/embeddings."
    )
