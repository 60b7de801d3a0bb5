"""``POST /v1/rerank`` and ``POST /rerank``: a query's documents scored by a cross-encoder.

Two request shapes, told apart by their list's name:

* Cohere / Jina (``documents``), on both routes, as Infinity and vLLM accept it: ``model``,
  ``query``, ``documents`` (strings or ``{"text": ...}``), ``top_n``, ``return_documents``;
  the answer is ``{"id", "model", "results": [{"index", "relevance_score", "document"?}],
  "usage": {"total_tokens"}}``.
* Hugging Face TEI (``texts``), on ``/rerank``: ``query``, ``texts``, ``raw_scores``,
  ``return_text``, ``truncate``; the answer is a list of ``{"index", "score", "text"?}``.

Both are sorted by score, best first. ``model`` may be left out (TEI never sends it): the only
configured cross-encoder then serves. Each (query, document) pair is one item of the model's
batcher (``models.served.RerankModel``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import orjson
from starlette.requests import Request
from starlette.responses import Response

from tidegate.api.auth import admit, authenticate
from tidegate.api.common import app_state, endpoint, read_json_body
from tidegate.api.generation_params import optional
from tidegate.api.guard import run_guarded
from tidegate.api.ids import new_id
from tidegate.api.schemas import parse_json_object
from tidegate.config import Config
from tidegate.errors import InvalidRequest, PayloadTooLarge
from tidegate.kinds import RuntimeKind
from tidegate.models.manager import ModelManager
from tidegate.models.served import RerankResult

__all__ = ["RerankRequest", "parse_rerank_request", "rerank", "v1_rerank"]

Shape = Literal["cohere", "tei"]


@dataclass(frozen=True, slots=True)
class RerankRequest:
    shape: Shape
    model: str | None
    query: str
    documents: list[str]
    top_n: int | None = None
    return_documents: bool = False
    """Cohere's ``return_documents`` or TEI's ``return_text``."""
    raw_scores: bool = False
    truncate: bool = True

    @property
    def documents_param(self) -> str:
        return "texts" if self.shape == "tei" else "documents"


def _flag(data: dict[str, Any], name: str, default: bool) -> bool:
    value = optional(data, name, bool, "a boolean")
    return default if value is None else value


def _documents(value: object, param: str, max_inputs: int, *, objects: bool) -> list[str]:
    kinds = "strings or objects with a 'text' string" if objects else "strings"
    if not isinstance(value, list):
        raise InvalidRequest(f"'{param}' must be an array of {kinds}.", param=param)
    if not value:
        raise InvalidRequest(f"'{param}' must not be an empty array.", param=param)
    if len(value) > max_inputs:
        raise PayloadTooLarge(
            f"'{param}' has {len(value)} items; at most {max_inputs} are allowed per request.",
            limit=max_inputs, actual=len(value),
        )
    texts = []
    for index, entry in enumerate(value):
        item = entry.get("text") if objects and isinstance(entry, dict) else entry
        if not isinstance(item, str):
            raise InvalidRequest(f"'{param}[{index}]' must be one of the {kinds}.", param=param)
        texts.append(item)
    return texts


def _top_n(data: dict[str, Any]) -> int | None:
    value = data.get("top_n")
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # JSON Schema's integers include 3.0
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise InvalidRequest(f"'top_n' must be a positive integer, got {value!r}.",
                             param="top_n")
    return value


def parse_rerank_request(body: bytes, *, max_inputs: int, tei: bool) -> RerankRequest:
    """Parse either shape (``tei``: the route takes TEI's too, when the body has ``texts``)."""
    data = parse_json_object(body)
    model = optional(data, "model", str, "a string")
    query = data.get("query")
    if not isinstance(query, str):
        what = "Missing required parameter" if query is None else "Invalid type for"
        raise InvalidRequest(f"{what}: 'query' (a string).", param="query")
    if tei and "texts" in data and "documents" not in data:
        return RerankRequest(
            "tei", model, query, _documents(data["texts"], "texts", max_inputs, objects=False),
            return_documents=_flag(data, "return_text", False),
            raw_scores=_flag(data, "raw_scores", False), truncate=_flag(data, "truncate", True),
        )
    if "documents" not in data:
        wanted = "'documents' (or TEI's 'texts')" if tei else "'documents'"
        raise InvalidRequest(f"Missing required parameter: {wanted}.", param="documents")
    return RerankRequest(
        "cohere", model, query,
        _documents(data["documents"], "documents", max_inputs, objects=True),
        top_n=_top_n(data), return_documents=_flag(data, "return_documents", False),
    )


def resolve_model(config: Config, requested: str | None) -> str:
    """The model a request names, or the only configured cross-encoder when it names none."""
    if requested is not None:
        return requested
    rerankers = [m.id for m in config.models if m.runtime is RuntimeKind.CROSS_ENCODER]
    if len(rerankers) == 1:
        return rerankers[0]
    found = f"{len(rerankers)} are: {', '.join(rerankers)}" if rerankers else "none is"
    raise InvalidRequest(
        f"Missing parameter 'model': it may be left out only when exactly one cross-encoder "
        f"model is configured, and {found}.", param="model",
    )


async def _rerank(manager: ModelManager, model_id: str, parsed: RerankRequest
                  ) -> tuple[str, RerankResult]:
    async with manager.lease(model_id) as model:
        reranker = model.reranker()  # 400 for an embedding or generation model
        result = await reranker.rerank(
            parsed.query, parsed.documents, raw=parsed.raw_scores, truncate=parsed.truncate,
            param=parsed.documents_param,
        )
        return model.id, result


def encode_rerank_response(parsed: RerankRequest, model: str, result: RerankResult) -> bytes:
    order = sorted(range(len(result.scores)), key=result.scores.__getitem__, reverse=True)
    if parsed.shape == "tei":
        return orjson.dumps([
            {"index": i, "score": result.scores[i],
             **({"text": parsed.documents[i]} if parsed.return_documents else {})}
            for i in order
        ])
    if parsed.top_n is not None:
        order = order[: parsed.top_n]
    results = [
        {"index": i, "relevance_score": result.scores[i],
         **({"document": {"text": parsed.documents[i]}} if parsed.return_documents else {})}
        for i in order
    ]
    return orjson.dumps({"id": new_id("rerank"), "model": model, "results": results,
                         "usage": {"total_tokens": result.tokens}})


async def _serve(request: Request, *, tei: bool) -> Response:
    state = app_state(request)
    key = None if state.keys is None else authenticate(request, state.keys)
    server = state.config.server
    body = await read_json_body(request, server.max_body_bytes)
    parsed = parse_rerank_request(body, max_inputs=server.max_inputs_per_request, tei=tei)
    model_id = resolve_model(state.config, parsed.model)
    headers = None if key is None else admit(key, model_id)
    served_id, result = await run_guarded(
        request, _rerank(state.manager, model_id, parsed), model=model_id,
        timeout_s=server.request_timeout_s,
    )
    if key is not None:
        key.record(result.tokens)
    return Response(encode_rerank_response(parsed, served_id, result),
                    media_type="application/json", headers=headers)


@endpoint
async def v1_rerank(request: Request) -> Response:
    """Cohere / Jina's shape."""
    return await _serve(request, tei=False)


@endpoint
async def rerank(request: Request) -> Response:
    """Cohere's shape or TEI's (``texts``)."""
    return await _serve(request, tei=True)
