"""``GET /openapi.json`` against the real server: the document is valid OpenAPI 3.1, real
responses conform to it, and schemathesis fuzzes every non-admin operation from it.

The fuzzing is bounded (a fixed number of examples per operation, derandomized) so it stays well
under a minute; the admin routes are excluded so the run does not unload its own models.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.serverproc import ServerProcess, run_server

pytestmark = pytest.mark.e2e

EMBED = "all-minilm-l6-v2"
GPT2 = "tiny-gpt2"
GPT2_TORCH = "tiny-gpt2-torch"
"""The same model on the torch engine, which reports alternative tokens' logprobs."""
RERANK = "tiny-reranker"
"""The only cross-encoder: it serves the rerank requests that name no model."""
CONFIG = """
[server]
max_body_bytes = 65536
max_inputs_per_request = 16
request_timeout_s = 20

[[models]]
id = "{embed}"
runtime = "embedding"

[[models]]
id = "echo"
runtime = "echo"

[[models]]
id = "{gpt2}"
runtime = "causal-lm"
source = "{gpt2_dir}"

[[models]]
id = "{gpt2_torch}"
runtime = "causal-lm"
source = "{gpt2_dir}"
backend = "torch"

[[models]]
id = "{rerank}"
runtime = "cross-encoder"
source = "{rerank_dir}"
"""
EXAMPLES = 25
"""Generated requests per operation and mode: enough to cover each parameter's types and bounds,
few enough that the whole run stays well under a minute."""
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance, response_headers_conformance]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path,
           gpt2_dir: Path, cross_encoder_dir: Path) -> Iterator[ServerProcess]:
    config = CONFIG.format(embed=EMBED, gpt2=GPT2, gpt2_torch=GPT2_TORCH, gpt2_dir=gpt2_dir,
                           rerank=RERANK, rerank_dir=cross_encoder_dir)
    with run_server(tmp_path_factory.mktemp("openapi"), config, cache_dir) as proc:
        yield proc


@pytest.fixture(scope="module")
def api_schema(server: ServerProcess) -> Any:
    return schemathesis.openapi.from_url(server.url + "/openapi.json")


@pytest.fixture(scope="module")
def document(server: ServerProcess) -> dict[str, Any]:
    with httpx.Client(base_url=server.url) as http:
        response = http.get("/openapi.json")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    data: dict[str, Any] = response.json()
    return data


def test_document_is_valid_openapi_31(api_schema: Any, document: dict[str, Any]) -> None:
    api_schema.validate()  # against the OpenAPI 3.1 meta-schema
    assert document["openapi"] == "3.1.0"
    routes = {(method.upper(), path) for path, item in document["paths"].items()
              for method in item}
    assert routes == {
        ("POST", "/v1/embeddings"), ("POST", "/v1/completions"),
        ("POST", "/v1/chat/completions"), ("GET", "/v1/models"),
        ("GET", "/v1/models/{model_id}"), ("GET", "/health/live"), ("GET", "/health/ready"),
        ("GET", "/health"), ("GET", "/metrics"), ("GET", "/openapi.json"),
        ("POST", "/admin/models/{model_id}/load"), ("POST", "/admin/models/{model_id}/unload"),
        ("POST", "/tokenize"), ("POST", "/detokenize"),
        ("POST", "/v1/rerank"), ("POST", "/rerank"),
    }
    # The limits and examples are the server's own.
    embedding = document["components"]["schemas"]["EmbeddingRequest"]
    assert embedding["properties"]["input"]["anyOf"][1]["maxItems"] == 16
    body = document["paths"]["/v1/embeddings"]["post"]["requestBody"]["content"]
    assert body["application/json"]["example"]["model"] == EMBED


def _validate(api_schema: Any, method: str, path: str, response: httpx.Response,
              **case: Any) -> None:
    """Check one real response against its operation in the document."""
    operation = api_schema[path][method]
    made = operation.Case(**case)
    converted = schemathesis.Response.from_any(response)
    for check in CHECKS:
        made.validate_response(converted, checks=[check])


@pytest.mark.parametrize("exchange", [
    ("POST", "/v1/embeddings", {"model": EMBED, "input": ["a cat", "a dog"]}, 200, "json"),
    ("POST", "/v1/embeddings", {"model": EMBED, "input": "x", "encoding_format": "base64"},
     200, "json"),
    ("POST", "/v1/embeddings", {"model": "nope", "input": "x"}, 404, "json"),
    ("POST", "/v1/embeddings", {"model": EMBED, "input": []}, 400, "json"),
    ("POST", "/v1/embeddings", {"model": EMBED, "input": ["x"] * 17}, 413, "json"),
    ("POST", "/v1/embeddings", {"model": GPT2, "input": "x"}, 400, "json"),
    ("POST", "/v1/completions", {"model": GPT2, "prompt": "The quick", "max_tokens": 4},
     200, "json"),
    ("POST", "/v1/completions", {"model": GPT2, "prompt": "The quick", "max_tokens": 4,
                                 "stream": True, "stream_options": {"include_usage": True}},
     200, "text/event-stream"),
    ("POST", "/v1/chat/completions", {"model": GPT2, "max_tokens": 4,
                                      "messages": [{"role": "user", "content": "hi"}]},
     200, "json"),
    ("POST", "/v1/chat/completions", {"model": GPT2, "max_tokens": 4, "stream": True,
                                      "messages": [{"role": "user", "content": "hi"}]},
     200, "text/event-stream"),
    ("POST", "/v1/chat/completions", {"model": GPT2, "messages": []}, 400, "json"),
    # Found by fuzzing: a seed torch cannot take was a 500; a float-spelled integer a 400.
    ("POST", "/v1/completions", {"model": GPT2, "prompt": "x", "seed": 2**64}, 400, "json"),
    ("POST", "/v1/completions", {"model": GPT2, "prompt": "x", "max_tokens": 2.0, "seed": 7.0},
     200, "json"),
    ("POST", "/v1/completions", {"model": EMBED, "prompt": "x"}, 400, "json"),
    # Found by fuzzing: float32 turns these into 0, which OpenVINO GenAI refused (a 500).
    ("POST", "/v1/completions", {"model": GPT2, "prompt": "x", "max_tokens": 2,
                                 "top_p": 5e-324, "temperature": 5e-324}, 200, "json"),
    ("POST", "/v1/completions", {"model": GPT2_TORCH, "prompt": "x", "max_tokens": 2,
                                 "top_p": 5e-324, "temperature": 1e-4}, 200, "json"),
    # Logprobs in both shapes, streamed and not; what a local model would ignore is a 400.
    ("POST", "/v1/completions", {"model": GPT2_TORCH, "prompt": "x", "max_tokens": 4,
                                 "logprobs": 3,
                                 "presence_penalty": 1, "min_tokens": 2, "ignore_eos": True},
     200, "json"),
    ("POST", "/v1/completions", {"model": GPT2, "prompt": "x", "max_tokens": 4, "logprobs": 0,
                                 "stream": True}, 200, "text/event-stream"),
    ("POST", "/v1/chat/completions", {"model": GPT2_TORCH, "max_tokens": 4, "logprobs": True,
                                      "top_logprobs": 2, "frequency_penalty": -1,
                                      "messages": [{"role": "user", "content": "hi"}]},
     200, "json"),
    ("POST", "/v1/chat/completions", {"model": GPT2, "max_tokens": 4, "logprobs": True,
                                      "stream": True,
                                      "messages": [{"role": "user", "content": "hi"}]},
     200, "text/event-stream"),
    ("POST", "/v1/chat/completions", {"model": GPT2, "n": 2,
                                      "messages": [{"role": "user", "content": "hi"}]},
     400, "json"),
    ("POST", "/v1/completions", {"model": GPT2, "prompt": "x", "logit_bias": {"1": 5}},
     400, "json"),
    # Tokenizer routes: every kind of model, both inputs, and their errors.
    ("POST", "/tokenize", {"model": EMBED, "prompt": "a cat", "return_token_strs": True},
     200, "json"),
    ("POST", "/tokenize", {"model": GPT2, "prompt": "The quick", "add_special_tokens": False},
     200, "json"),
    ("POST", "/tokenize", {"model": GPT2_TORCH, "add_generation_prompt": False,
                           "messages": [{"role": "user", "content": "hi"}]}, 200, "json"),
    ("POST", "/tokenize", {"model": EMBED, "messages": [{"role": "user", "content": "hi"}]},
     400, "json"),
    ("POST", "/tokenize", {"model": "echo", "prompt": "x"}, 400, "json"),
    ("POST", "/tokenize", {"model": GPT2}, 400, "json"),
    ("POST", "/tokenize", {"model": "nope", "prompt": "x"}, 404, "json"),
    ("POST", "/detokenize", {"model": EMBED, "tokens": [101, 1037, 102]}, 200, "json"),
    ("POST", "/detokenize", {"model": GPT2, "tokens": [1, 2, 3.0]}, 200, "json"),
    ("POST", "/detokenize", {"model": GPT2, "tokens": [10**9]}, 400, "json"),
    ("POST", "/detokenize", {"model": GPT2, "tokens": "1 2"}, 400, "json"),
    ("POST", "/detokenize", {"model": "nope", "tokens": []}, 404, "json"),
    # Reranking: Cohere's shape on both routes, TEI's on /rerank, and their errors.
    ("POST", "/v1/rerank", {"model": RERANK, "query": "q", "documents": ["a", {"text": "b"}],
                            "top_n": 1, "return_documents": True}, 200, "json"),
    ("POST", "/rerank", {"query": "q", "documents": ["a", "b"]}, 200, "json"),
    ("POST", "/rerank", {"query": "q", "texts": ["a", "b"], "raw_scores": True,
                         "return_text": True}, 200, "json"),
    ("POST", "/rerank", {"query": "q", "texts": ["long " * 600], "truncate": False},
     400, "json"),
    ("POST", "/v1/rerank", {"model": RERANK, "query": "q", "documents": []}, 400, "json"),
    ("POST", "/v1/rerank", {"model": EMBED, "query": "q", "documents": ["a"]}, 400, "json"),
    ("POST", "/v1/rerank", {"model": "nope", "query": "q", "documents": ["a"]}, 404, "json"),
    ("POST", "/rerank", {"query": "q", "texts": ["a"] * 17}, 413, "json"),
    ("GET", f"/v1/models/{RERANK}", None, 200, "json"),
    ("GET", "/v1/models", None, 200, "json"),
    ("GET", f"/v1/models/{EMBED}", None, 200, "json"),
    ("GET", f"/v1/models/{GPT2}", None, 200, "json"),
    ("GET", "/v1/models/nope", None, 404, "json"),
    ("GET", "/health/live", None, 200, "json"),
    ("GET", "/health/ready", None, 200, "json"),
    ("GET", "/health", None, 200, "json"),
    ("GET", "/metrics", None, 200, "text/plain"),
])
def test_real_responses_conform(api_schema: Any, server: ServerProcess,
                                exchange: tuple[str, str, Any, int, str]) -> None:
    """A request, its expected status and media type; the response must match the document."""
    method, path, body, status, media = exchange
    with httpx.Client(base_url=server.url, timeout=30) as http:
        response = http.request(method, path, json=body)
    assert response.status_code == status, response.text
    assert media in response.headers["content-type"]
    template = path
    case: dict[str, Any] = {}
    if path.startswith("/v1/models/"):
        template = "/v1/models/{model_id}"
        case["path_parameters"] = {"model_id": path.removeprefix("/v1/models/")}
    if body is not None:
        case["body"] = body
    _validate(api_schema, method, template, response, **case)
    if media == "text/event-stream":
        assert response.text.endswith("data: [DONE]\n\n")


def test_error_statuses_conform(api_schema: Any, server: ServerProcess) -> None:
    """Errors that need a hand-made request: a wrong Content-Type, a body too large,
    malformed JSON."""
    with httpx.Client(base_url=server.url, timeout=30) as http:
        cases = [
            (http.post("/v1/embeddings", content=b"x", headers={"content-type": "text/plain"}),
             415),
            (http.post("/v1/embeddings", content=b"{" * 70000,
                       headers={"content-type": "application/json"}), 413),
            (http.post("/v1/completions", content=b"{not json",
                       headers={"content-type": "application/json"}), 400),
        ]
    for response, status in cases:
        assert response.status_code == status
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        path = str(response.request.url.path)
        _validate(api_schema, "POST", path, response)


FUZZED = ["POST /v1/embeddings", "POST /v1/completions", "POST /v1/chat/completions",
          "POST /v1/rerank", "POST /rerank",
          "GET /v1/models", "GET /v1/models/{model_id}", "GET /health/live",
          "GET /health/ready", "GET /health", "GET /metrics", "GET /openapi.json",
          "POST /tokenize", "POST /detokenize"]


def test_fuzzed_operations_are_every_non_admin_route(api_schema: Any) -> None:
    labels = {result.ok().label for result in api_schema.get_all_operations()}
    assert labels - set(FUZZED) == {"POST /admin/models/{model_id}/load",
                                    "POST /admin/models/{model_id}/unload"}


# Invalid requests (wrong types, missing fields, out-of-range values) are made from request
# bodies; the GET routes take nothing that can be made invalid but their path.
# Most generated model names do not exist (404): most requests name a served model instead (of the
# right kind, mostly), so their bodies reach the models' own checks and computations.
MODELS = {"/v1/embeddings": [EMBED, "echo", EMBED, GPT2, None],
          "/v1/completions": [GPT2, GPT2, GPT2, EMBED, None],
          "/v1/chat/completions": [GPT2, GPT2, GPT2, EMBED, None],
          "/tokenize": [GPT2, GPT2_TORCH, EMBED, "echo", None],
          "/detokenize": [GPT2, EMBED, GPT2_TORCH, "echo", None],
          "/v1/rerank": [RERANK, RERANK, RERANK, EMBED, None],
          "/rerank": [RERANK, RERANK, RERANK, GPT2, None]}
RUNS = [(label, GenerationMode.POSITIVE) for label in FUZZED] + [
    (label, GenerationMode.NEGATIVE) for label in FUZZED if label.startswith("POST")]


@pytest.mark.parametrize(("label", "mode"), RUNS)
def test_schemathesis(api_schema: Any, label: str, mode: GenerationMode) -> None:
    """No 500, no undocumented status, every response conforms to the document: schemathesis
    generates requests from the document (valid ones, then invalid ones) for each operation."""
    method, path = label.split(" ", 1)
    operation = api_schema[path][method]

    @given(case=operation.as_strategy(generation_mode=mode),
           model=st.sampled_from(MODELS.get(path, [None])))
    @settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
              suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate])
    def fuzz(case: Any, model: str | None) -> None:
        if model is not None and isinstance(case.body, dict) and "model" in case.body:
            case.body["model"] = model
        case.call_and_validate(checks=CHECKS, timeout=30)

    fuzz()

