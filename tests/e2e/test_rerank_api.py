"""``/v1/rerank`` and ``/rerank`` on the real server with a tiny random-weight BERT
cross-encoder: scores equal to the runtime's own, order, ``top_n``, both shapes, the errors,
``/v1/models``, metrics by model, and API keys with token usage."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from tests.serverproc import ServerProcess, run_server
from tidegate.auth.keyring import hash_key
from tidegate.engines import Backend
from tidegate.runtimes.cross_encoder import CrossEncoderRuntime, relevance_scores

pytestmark = pytest.mark.e2e

RERANK = "tiny-reranker"
QUERY = "what do cats eat?"
DOCUMENTS = ["Cats are obligate carnivores.", "The stock market fell.", "x",
             "a cat eats fish " * 200, "naïve café"]
CONFIG = """
[server]
max_inputs_per_request = 8

[[models]]
id = "{rerank}"
runtime = "cross-encoder"
source = "{source}"
backend = "onnxruntime"

[[models]]
id = "echo"
runtime = "echo"
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path,
           cross_encoder_dir: Path) -> Iterator[ServerProcess]:
    config = CONFIG.format(rerank=RERANK, source=cross_encoder_dir)
    with run_server(tmp_path_factory.mktemp("rerank"), config, cache_dir) as proc:
        yield proc


@pytest.fixture(scope="module")
def expected(cross_encoder_dir: Path, cache_dir: Path) -> dict[str, Any]:
    """The same backend in process: each document's score, raw logit and pair tokens."""
    runtime = CrossEncoderRuntime(cross_encoder_dir, cache_dir, backend=Backend.ONNXRUNTIME)
    try:
        prepared = runtime.prepare_pairs(QUERY, DOCUMENTS)
        logits = runtime.run_batch([p.payload for p in prepared])
    finally:
        runtime.close()
    return {"scores": relevance_scores(logits, raw=False), "raw": logits[:, 0],
            "tokens": sum(p.tokens for p in prepared)}


def post(server: ServerProcess, path: str, body: dict[str, Any], **headers: str
         ) -> httpx.Response:
    return httpx.post(server.url + path, json=body, headers=headers, timeout=30)


def test_cohere_shape_scores_order_and_top_n(server: ServerProcess,
                                             expected: dict[str, Any]) -> None:
    documents: list[Any] = [*DOCUMENTS[:2], {"text": DOCUMENTS[2]}, *DOCUMENTS[3:]]
    response = post(server, "/v1/rerank", {"model": RERANK, "query": QUERY,
                                           "documents": documents, "return_documents": True})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == RERANK and body["id"].startswith("rerank-")
    assert body["usage"] == {"total_tokens": expected["tokens"]}
    order = list(np.argsort(-expected["scores"], kind="stable"))
    assert [r["index"] for r in body["results"]] == order
    for result in body["results"]:
        assert abs(result["relevance_score"] - expected["scores"][result["index"]]) <= 1e-5
        assert result["document"] == {"text": DOCUMENTS[result["index"]]}

    top = post(server, "/rerank", {"query": QUERY, "documents": DOCUMENTS, "top_n": 2}).json()
    assert [r["index"] for r in top["results"]] == order[:2]
    assert "document" not in top["results"][0] and top["model"] == RERANK


def test_tei_shape_raw_scores_and_return_text(server: ServerProcess,
                                              expected: dict[str, Any]) -> None:
    response = post(server, "/rerank", {"query": QUERY, "texts": DOCUMENTS})
    assert response.status_code == 200, response.text
    results = response.json()
    assert [r["index"] for r in results] == list(np.argsort(-expected["scores"], kind="stable"))
    assert all(set(r) == {"index", "score"} for r in results)
    raw = post(server, "/rerank", {"query": QUERY, "texts": DOCUMENTS, "raw_scores": True,
                                   "return_text": True}).json()
    for result in raw:
        assert abs(result["score"] - expected["raw"][result["index"]]) <= 1e-5
        assert result["text"] == DOCUMENTS[result["index"]]


@pytest.mark.parametrize(("path", "body", "status", "param"), [
    ("/v1/rerank", {"model": RERANK, "query": QUERY, "documents": []}, 400, "documents"),
    ("/rerank", {"query": QUERY, "texts": []}, 400, "texts"),
    ("/rerank", {"query": QUERY, "texts": DOCUMENTS, "truncate": False}, 400, "texts"),
    ("/v1/rerank", {"model": "echo", "query": QUERY, "documents": ["a"]}, 400, "model"),
    ("/v1/rerank", {"model": "nope", "query": QUERY, "documents": ["a"]}, 404, "model"),
    ("/v1/rerank", {"model": RERANK, "query": QUERY, "documents": ["a"] * 9}, 413, None),
    ("/v1/rerank", {"model": RERANK, "documents": ["a"]}, 400, "query"),
    ("/v1/rerank", {"model": RERANK, "query": QUERY, "documents": ["a"], "top_n": 0},
     400, "top_n"),
    ("/v1/rerank", {"model": RERANK, "query": QUERY, "texts": ["a"]}, 400, "documents"),
])
def test_errors_name_the_parameter(server: ServerProcess, path: str, body: dict[str, Any],
                                   status: int, param: str | None) -> None:
    response = post(server, path, body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param
    if body.get("model") == "echo":
        assert error["code"] == "wrong_model_type"


def test_model_card_and_metrics_by_model(server: ServerProcess) -> None:
    card = httpx.get(f"{server.url}/v1/models/{RERANK}").json()
    assert card["kind"] == "rerank" and card["runtime"] == "cross-encoder"
    assert (card["backend"], card["precision"]) == ("onnxruntime", "fp32")
    assert card["probe_max_score_error"] == 0.0 and card["num_labels"] == 1
    assert card["max_input_tokens"] == 512
    post(server, "/rerank", {"query": QUERY, "texts": DOCUMENTS[:3]})
    metrics = httpx.get(server.url + "/metrics").text
    assert f'tidegate_batch_size_items_count{{model="{RERANK}"}}' in metrics


KEY = "tg-rerank-0123456789abcdefghijklmn"


def test_keys_and_several_cross_encoders(tmp_path: Path, cache_dir: Path,
                                         cross_encoder_dir: Path,
                                         cross_encoder_2label_dir: Path) -> None:
    config = f"""
[[auth.keys]]
id = "ranker"
hash = "{hash_key(KEY)}"

[[models]]
id = "one"
runtime = "cross-encoder"
source = "{cross_encoder_dir}"
backend = "onnxruntime"

[[models]]
id = "two"
runtime = "cross-encoder"
source = "{cross_encoder_2label_dir}"
backend = "onnxruntime"
"""
    auth = {"Authorization": f"Bearer {KEY}"}
    with run_server(tmp_path, config, cache_dir) as proc:
        assert post(proc, "/rerank", {"query": QUERY, "texts": ["a"]}).status_code == 401
        several = post(proc, "/rerank", {"query": QUERY, "texts": ["a"]}, **auth)
        assert several.status_code == 400 and several.json()["error"]["param"] == "model"
        assert "one, two" in several.json()["error"]["message"]
        answer = post(proc, "/v1/rerank", {"model": "two", "query": QUERY,
                                           "documents": ["a", "b"]}, **auth)
        assert answer.status_code == 200, answer.text
        assert all(0.0 <= r["relevance_score"] <= 1.0 for r in answer.json()["results"])
        tokens = answer.json()["usage"]["total_tokens"]
        metrics = httpx.get(proc.url + "/metrics").text
        assert f'tidegate_api_key_tokens_total{{key="ranker",kind="prompt"}} {float(tokens)}' \
            in metrics
