"""The OpenAPI 3.1 document served at ``GET /openapi.json``, written as data.

Request schemas follow the hand-written parsers (``api.schemas``, ``api.generation``,
``generation.params``): a body valid here passes their type checks, and each bound they enforce
(``max_inputs_per_request``, ``temperature`` in [0, 2], ...) is stated here; parameters a local
model refuses but a remote one relays (``n`` > 1, ``logit_bias``, tools, ...) say so. Response
schemas describe what the routes encode. ``tests/e2e/test_openapi.py`` checks real responses
against it and fuzzes the live server from it with schemathesis.

The document is built once per app from the config: limits and example model ids are the
server's own.
"""

from __future__ import annotations

from typing import Any

import orjson

from tidegate._version import __version__
from tidegate.api.generation_params import MAX_COMPLETION_LOGPROBS
from tidegate.config import Config
from tidegate.generation.params import MAX_LOGPROBS, MAX_STOP_STRINGS, PENALTY_RANGE, SEED_RANGE
from tidegate.kinds import ModelKind, RuntimeKind

__all__ = ["build_openapi", "encode_openapi"]

JSON = "application/json"
Schema = dict[str, Any]


def _ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def _nullable(schema: Schema) -> Schema:
    return {"anyOf": [schema, {"type": "null"}]}


def _json_content(schema: Schema) -> dict[str, Any]:
    return {JSON: {"schema": schema}}


def _error(description: str, *, retry_after: bool = False, request_id: bool = False
           ) -> dict[str, Any]:
    response: dict[str, Any] = {"description": description,
                                "content": _json_content(_ref("ErrorResponse"))}
    headers: dict[str, Any] = {}
    if retry_after:
        headers["Retry-After"] = {"$ref": "#/components/headers/Retry-After"}
    if request_id:
        headers["X-Request-Id"] = {"$ref": "#/components/headers/X-Request-Id"}
    if headers:
        response["headers"] = headers
    return response


# -- error responses, by status ------------------------------------------------------------------

_ERRORS: dict[str, dict[str, Any]] = {
    "400": _error("Malformed JSON, or a missing, mistyped or out-of-range parameter "
                  "(`param` names it); a model of the wrong kind for this route."),
    "401": _error("API keys are configured and the request's key is missing or unknown "
                  "(`code: invalid_api_key`); admin routes: no `Authorization` header while "
                  "`admin_token` is set; `/metrics` and `/openapi.json` with `[auth] "
                  "protect_metrics`: neither an API key nor the admin token."),
    "403": _error("Admin routes: a wrong admin token, or a non-loopback client while no "
                  "`admin_token` is set."),
    "404": _error("Unknown model (`code: model_not_found`)."),
    "408": _error("The client did not send its request within `header_timeout_s` / "
                  "`body_timeout_s` (`code: request_timeout`); the connection is closed."),
    "413": _error("More inputs than `max_inputs_per_request`, or a body above "
                  "`max_body_bytes` (`code: payload_too_large`)."),
    "415": _error("A Content-Type other than JSON (`code: unsupported_media_type`)."),
    "429": _error("The model's queue is full (`code: overloaded`), or a per-key limit is "
                  "reached; `Retry-After` says when to retry.", retry_after=True),
    "500": _error("A bug: the message carries a request id, also sent as `X-Request-Id`; the "
                  "traceback is in the server's log.", request_id=True),
    "502": _error("A remote model's replica failed (`code: upstream_error`). A replica's own "
                  "4xx is relayed with its status."),
    "503": _error("The model is loading or failed to load (`code: model_unavailable`), its "
                  "queue is full with `overload_status = 503`, no replica is healthy, the "
                  "server is shutting down, or the connection cap is reached.",
                  retry_after=True),
    "504": _error("Not served within `request_timeout_s` (`code: timeout`), or a replica "
                  "stayed silent past its `read_s` (`code: upstream_timeout`)."),
}


def _errors(*statuses: int) -> dict[str, dict[str, Any]]:
    return {str(status): _ERRORS[str(status)] for status in statuses}


# Every inference route: parse the body, lease the model, compute (locally or upstream).
_INFERENCE_ERRORS = (400, 401, 404, 408, 413, 415, 429, 500, 502, 503, 504)


# -- schemas -------------------------------------------------------------------------------------

def _choice(field: str, content: Schema, finish_reason: Schema, logprobs: str) -> Schema:
    """One entry of a completion's ``choices``: its ``text``, ``message`` or ``delta``, and
    the logprobs of its tokens (null unless asked for)."""
    required = ["index", field, "finish_reason"]
    return {"type": "object", "required": required, "properties": {
        "index": {"type": "integer"}, field: content, "logprobs": _nullable(_ref(logprobs)),
        "finish_reason": finish_reason}}


def _local_only(schema: Schema, accepted: str) -> Schema:
    """A parameter the local engine does not honour: a remote model relays it."""
    return _nullable({**schema, "description": f"Local models: only {accepted} (else 400); "
                                               "a remote model relays it to its upstream."})


def _logprob_schemas() -> dict[str, Schema]:
    logprob = {"type": "number", "maximum": 0,
               "description": "Natural log of the probability under the model's raw logits "
                              "(before temperature and penalties); -9999.0 for -inf."}
    utf8 = _nullable({"type": "array", "items": {"type": "integer", "minimum": 0,
                                                   "maximum": 255}})
    properties: Schema = {"token": {"type": "string"}, "logprob": logprob, "bytes": utf8}
    alternative = {"type": "object", "required": ["token", "logprob", "bytes"],
                   "properties": properties}
    return {
        "CompletionLogprobs": {
            "type": "object",
            "required": ["tokens", "token_logprobs", "top_logprobs", "text_offset"],
            "properties": {
                "tokens": {"type": "array", "items": {"type": "string"}},
                "token_logprobs": {"type": "array", "items": logprob},
                "top_logprobs": {"type": "array", "items": {
                    "type": "object", "additionalProperties": logprob}},
                "text_offset": {"type": "array", "items": {"type": "integer", "minimum": 0}},
            },
            "description": "One entry per token, in order; a stream's chunk has its own "
                           "text's tokens. `text_offset` sums the token strings' lengths.",
        },
        "ChatLogprobs": {
            "type": "object",
            "required": ["content"],
            "properties": {"content": _nullable({"type": "array", "items": {
                "type": "object",
                "required": ["token", "logprob", "bytes", "top_logprobs"],
                "properties": {**properties, "top_logprobs": {
                    "type": "array", "maxItems": MAX_LOGPROBS, "items": alternative}},
            }})},
            "description": "One entry per token, in order; a stream's chunk has its own "
                           "text's tokens.",
        },
    }


def _completion(object_name: str, choice: Schema) -> Schema:
    """A completion, chat completion or one of their stream chunks."""
    return {
        "type": "object",
        "required": ["id", "object", "created", "model", "choices"],
        "properties": {
            "id": {"type": "string"},
            "object": {"const": object_name},
            "created": {"type": "integer"},
            "model": {"type": "string"},
            "choices": {"type": "array", "items": choice},
            "usage": _ref("Usage"),
        },
    }


def _schemas(config: Config) -> dict[str, Schema]:
    max_inputs = config.server.max_inputs_per_request
    text = {"type": "string", "minLength": 1}
    usage = {
        "type": "object",
        "required": ["prompt_tokens", "completion_tokens", "total_tokens"],
        "properties": {name: {"type": "integer", "minimum": 0}
                       for name in ("prompt_tokens", "completion_tokens", "total_tokens")},
    }
    finish_reason = _nullable({"type": "string", "enum": ["stop", "length"]})
    text_choice = _choice("text", {"type": "string"}, finish_reason, "CompletionLogprobs")
    penalty = {"type": "number", "minimum": PENALTY_RANGE[0], "maximum": PENALTY_RANGE[1]}
    sampling: dict[str, Schema] = {
        "max_tokens": _nullable({"type": "integer", "minimum": 1}),
        "max_completion_tokens": _nullable({"type": "integer", "minimum": 1,
                                            "description": "Takes precedence over max_tokens."}),
        "temperature": _nullable({"type": "number", "minimum": 0, "maximum": 2,
                                  "description": "0 is greedy decoding."}),
        "top_p": _nullable({"type": "number", "exclusiveMinimum": 0, "maximum": 1}),
        "stop": _nullable({"anyOf": [
            {"type": "string"},
            {"type": "array", "maxItems": MAX_STOP_STRINGS, "items": text},
        ]}),
        "seed": _nullable({"type": "integer", "minimum": SEED_RANGE[0],
                           "maximum": SEED_RANGE[1]}),
        "presence_penalty": _nullable({**penalty, "description":
                                       "Subtracted from the logit of each token generated "
                                       "so far (OpenAI's)."}),
        "frequency_penalty": _nullable({**penalty, "description":
                                        "Subtracted from each token's logit once per time it "
                                        "was generated so far (OpenAI's)."}),
        "min_tokens": _nullable({"type": "integer", "minimum": 0, "description":
                                 "End-of-sequence tokens are masked until this many tokens "
                                 "were generated (at most max_tokens); stop strings still "
                                 "apply (vLLM's extension)."}),
        "ignore_eos": _nullable({"type": "boolean", "description":
                                 "Generate past end-of-sequence tokens, masking none "
                                 "(vLLM's extension)."}),
        "n": _local_only({"type": "integer", "minimum": 1}, "1"),
        "logit_bias": _local_only({"type": "object", "additionalProperties": {
            "type": "number"}}, "an empty object"),
        "response_format": _local_only({"type": "object", "properties": {
            "type": {"type": "string"}}}, '`{"type": "text"}`'),
        "top_k": _local_only({"type": "integer"}, "-1 or 0 (off)"),
        "min_p": _local_only({"type": "number"}, "0 (off)"),
        "repetition_penalty": _local_only({"type": "number"}, "1 (off)"),
        "stream": _nullable({"type": "boolean"}),
        "stream_options": _nullable({
            "type": "object",
            "properties": {"include_usage": _nullable({"type": "boolean"})},
        }),
        "user": _nullable({"type": "string"}),
    }
    text_part = {
        "type": "object",
        "required": ["type", "text"],
        "properties": {"type": {"const": "text"}, "text": {"type": "string"}},
    }
    return {
        "Error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": _nullable({"type": "string"}),
                "code": _nullable({"type": "string"}),
            },
        },
        "ErrorResponse": {
            "type": "object",
            "required": ["error"],
            "properties": {"error": _ref("Error")},
            "description": "OpenAI's error shape.",
        },
        "EmbeddingRequest": {
            "type": "object",
            "required": ["model", "input"],
            "properties": {
                "model": {"type": "string"},
                "input": {"anyOf": [
                    text,
                    {"type": "array", "minItems": 1, "maxItems": max_inputs, "items": text},
                ], "description": "A string or a list of strings (token arrays: 400)."},
                "encoding_format": _nullable({"type": "string", "enum": ["float", "base64"]}),
                "dimensions": _nullable({"type": "integer", "minimum": 1, "description":
                                         "Only the model's own dimensions are accepted."}),
                "user": _nullable({"type": "string"}),
            },
        },
        "Embedding": {
            "type": "object",
            "required": ["object", "index", "embedding"],
            "properties": {
                "object": {"const": "embedding"},
                "index": {"type": "integer", "minimum": 0},
                "embedding": {"anyOf": [
                    {"type": "array", "items": {"type": "number"}},
                    {"type": "string", "contentEncoding": "base64",
                     "description": "Little-endian float32 (encoding_format: base64)."},
                ]},
            },
        },
        "EmbeddingResponse": {
            "type": "object",
            "required": ["object", "data", "model", "usage"],
            "properties": {
                "object": {"const": "list"},
                "data": {"type": "array", "items": _ref("Embedding")},
                "model": {"type": "string"},
                "usage": {
                    "type": "object",
                    "required": ["prompt_tokens", "total_tokens"],
                    "properties": {"prompt_tokens": {"type": "integer", "minimum": 0},
                                   "total_tokens": {"type": "integer", "minimum": 0}},
                },
            },
        },
        "CompletionRequest": {
            "type": "object",
            "required": ["model", "prompt"],
            "properties": {
                "model": text,
                "prompt": {"anyOf": [
                    text,
                    {"type": "array", "minItems": 1, "maxItems": 1, "items": text},
                ], "description": "One non-empty prompt per request."},
                **sampling,
                "logprobs": _nullable({
                    "type": "integer", "minimum": 0, "maximum": MAX_COMPLETION_LOGPROBS,
                    "description": "Report each token's logprob and this many likeliest "
                                   "alternatives (legacy shape)."}),
                "best_of": _local_only({"type": "integer", "minimum": 1}, "1"),
                "echo": _local_only({"type": "boolean"}, "false"),
                "suffix": _local_only({"type": "string"}, "an empty string"),
            },
        },
        "ChatMessage": {
            "type": "object",
            "required": ["role"],
            "properties": {
                "role": {"type": "string"},
                "content": {"anyOf": [
                    {"type": "string"},
                    {"type": "array", "items": text_part},
                ], "description": "Text, or a list of text parts."},
            },
        },
        "ChatCompletionRequest": {
            "type": "object",
            "required": ["model", "messages"],
            "properties": {
                "model": text,
                "messages": {"type": "array", "minItems": 1, "items": _ref("ChatMessage")},
                **sampling,
                "logprobs": _nullable({"type": "boolean", "description":
                                       "Report each token's logprob."}),
                "top_logprobs": _nullable({
                    "type": "integer", "minimum": 0, "maximum": MAX_LOGPROBS,
                    "description": "With `logprobs: true`: this many likeliest alternatives per "
                                   "token (a model may allow fewer: 400)."}),
                "tools": _local_only({"type": "array", "items": {"type": "object"}},
                                     "an empty list"),
                "tool_choice": _local_only({"anyOf": [{"type": "string"}, {"type": "object"}]},
                                           '`"none"` or `"auto"`'),
                "functions": _local_only({"type": "array", "items": {"type": "object"}},
                                         "an empty list"),
                "function_call": _local_only({"anyOf": [{"type": "string"},
                                                        {"type": "object"}]},
                                             '`"none"` or `"auto"`'),
            },
        },
        "Usage": usage,
        **_logprob_schemas(),
        "Completion": _completion("text_completion", text_choice),
        "ChatCompletion": _completion("chat.completion", _choice("message", {
            "type": "object",
            "required": ["role", "content"],
            "properties": {"role": {"const": "assistant"},
                           "content": _nullable({"type": "string"})},
        }, finish_reason, "ChatLogprobs")),
        "CompletionChunk": _completion("text_completion", text_choice),
        "ChatCompletionChunk": _completion("chat.completion.chunk", _choice("delta", {
            "type": "object", "properties": {
                "role": {"const": "assistant"}, "content": {"type": "string"}},
        }, finish_reason, "ChatLogprobs")),
        "Model": {
            "type": "object",
            "required": ["id", "object", "created", "owned_by", "runtime", "status"],
            "properties": {
                "id": {"type": "string"},
                "object": {"const": "model"},
                "created": {"type": "integer"},
                "owned_by": {"type": "string"},
                "runtime": {"type": "string", "enum": [kind.value for kind in RuntimeKind]},
                "status": {"type": "string",
                           "enum": ["unloaded", "loading", "loaded", "failed"]},
                "memory_bytes": _nullable({"type": "integer"}),
                "last_used": _nullable({"type": "number"}),
                "depends_on": {"type": "array", "items": {"type": "string"}},
                "error": {"type": "string"},
                "skipped": {"type": "string"},
                "kind": {"type": "string", "enum": [kind.value for kind in ModelKind]},
                "load_seconds": {"type": "number"},
                "dimensions": {"type": "integer"},
                "max_input_tokens": _nullable({"type": "integer"}),
                "context_length": {"type": "integer"},
                "backend": {"type": "string"},
                "precision": {"type": "string"},
                "probe_min_cosine": {"type": "number"},
                "probe_max_score_error": {"type": "number",
                                          "description": "Cross-encoders: bf16 vs fp32 raw "
                                                         "scores on the load-time probe."},
                "num_labels": {"type": "integer", "description": "Cross-encoders: 1 or 2."},
                "upstream": {"type": "object", "description": "Replicas and their health."},
            },
        },
        "ModelList": {
            "type": "object",
            "required": ["object", "data"],
            "properties": {"object": {"const": "list"},
                           "data": {"type": "array", "items": _ref("Model")}},
        },
        "Live": {
            "type": "object",
            "required": ["status"],
            "properties": {"status": {"const": "ok"}},
        },
        "Readiness": {
            "type": "object",
            "required": ["status", "models"],
            "properties": {
                "status": {"type": "string", "description": "`ready`, else why not."},
                "models": {"type": "object",
                           "additionalProperties": {"type": "string"},
                           "description": "Each model's status."},
            },
        },
        **_tokenizer_schemas(),
    }


def _tokenizer_schemas() -> dict[str, Schema]:
    """``/tokenize`` and ``/detokenize`` (vLLM's shapes), as ``api.tokenize`` parses them."""
    token_ids = {"type": "array", "items": {"type": "integer", "minimum": 0}}
    common: Schema = {
        "model": {"type": "string", "minLength": 1},
        "add_special_tokens": _nullable({"type": "boolean", "description":
                                         "Default: true for a prompt; for messages, as a chat "
                                         "completion (none with a chat template)."}),
        "return_token_strs": _nullable({"type": "boolean", "description":
                                        "Add `token_strs`: each id's vocabulary entry."}),
    }
    return {
        "TokenizePromptRequest": {
            "type": "object",
            "required": ["model", "prompt"],
            "properties": {**common, "prompt": {"type": "string"}},
        },
        "TokenizeChatRequest": {
            "type": "object",
            "required": ["model", "messages"],
            "properties": {
                **common,
                "messages": {"type": "array", "minItems": 1, "items": _ref("ChatMessage"),
                             "description": "Causal LMs only (an embedding model: 400)."},
                "add_generation_prompt": _nullable({"type": "boolean", "description":
                                                    "Open the assistant's turn (default)."}),
                "continue_final_message": _local_only({"type": "boolean"}, "false"),
                "chat_template": _local_only({"type": "string"}, "null"),
                "chat_template_kwargs": _local_only({"type": "object"}, "an empty object"),
                "tools": _local_only({"type": "array", "items": {"type": "object"}},
                                     "an empty list"),
            },
        },
        "TokenizeRequest": {"oneOf": [_ref("TokenizePromptRequest"),
                                      _ref("TokenizeChatRequest")],
                            "description": "A `prompt`, or chat `messages`, not both."},
        "TokenizeResponse": {
            "type": "object",
            "required": ["count", "max_model_len", "tokens"],
            "properties": {
                "count": {"type": "integer", "minimum": 0},
                "max_model_len": {"type": "integer", "minimum": 1, "description":
                                  "A causal LM's context length; an embedding model's "
                                  "max_input_tokens (longer inputs are truncated when "
                                  "embedded, not here)."},
                "tokens": token_ids,
                "token_strs": {"type": "array", "items": {"type": "string"}},
            },
        },
        "DetokenizeRequest": {
            "type": "object",
            "required": ["model", "tokens"],
            "properties": {"model": {"type": "string", "minLength": 1},
                           "tokens": {**token_ids, "description":
                                      "Ids within the model's vocabulary (else 400)."}},
        },
        "DetokenizeResponse": {
            "type": "object",
            "required": ["prompt"],
            "properties": {"prompt": {"type": "string", "description":
                                      "The text, special tokens written out."}},
        },
    }


# -- operations ----------------------------------------------------------------------------------

def _body(name: str, example: dict[str, Any] | None) -> dict[str, Any]:
    media: dict[str, Any] = {"schema": _ref(name)}
    if example is not None:
        media["example"] = example
    return {"required": True, "content": {JSON: media}}


def _event(chunk: str) -> Schema:
    """One server-sent event of a stream (OpenAPI 3.1: a ``text/event-stream`` schema describes
    each event): a chunk, an error after the stream began, or the final ``[DONE]``."""
    return {
        "type": "object",
        "required": ["data"],
        "properties": {"data": {"anyOf": [
            {"const": "[DONE]"},
            {"type": "string", "contentMediaType": JSON,
             "contentSchema": {"anyOf": [_ref(chunk), _ref("ErrorResponse")]}},
        ]}},
        "description": "`data: {chunk}` events (with `stream_options.include_usage`, a last "
                       "chunk with `usage` and no choices), then `data: [DONE]`. An error "
                       "after the stream began is a `data: {\"error\": {...}}` event.",
    }


def _ok(description: str, schema: Schema, media: str = JSON) -> dict[str, Any]:
    return {"description": description, "content": {media: {"schema": schema}}}


_MODEL_ID = {"name": "model_id", "in": "path", "required": True, "schema": {"type": "string"},
             "description": "A configured model's id."}


def _examples(config: Config) -> tuple[str | None, str | None]:
    """An embedding and a generation model's id, for the request examples."""
    embedding = {RuntimeKind.EMBEDDING, RuntimeKind.ECHO, RuntimeKind.PYTHON, RuntimeKind.REMOTE}
    generation = {RuntimeKind.CAUSAL_LM, RuntimeKind.REMOTE}
    embed = next((m.id for m in config.models if m.runtime in embedding), None)
    generate = next((m.id for m in config.models if m.runtime in generation), None)
    return embed, generate


def _paths(config: Config) -> dict[str, Any]:
    embed_model, generate_model = _examples(config)
    embed_example = (None if embed_model is None
                     else {"model": embed_model, "input": ["a cat sits on the mat", "hello"]})
    completion_example = (None if generate_model is None else
                          {"model": generate_model, "prompt": "Once upon", "max_tokens": 8})
    chat_example = (None if generate_model is None else
                    {"model": generate_model, "max_tokens": 8,
                     "messages": [{"role": "user", "content": "Hi"}]})
    def generation_op(operation_id: str, summary: str, request: str, response: str,
                      chunk: str, *, example: dict[str, Any] | None) -> dict[str, Any]:
        return {"post": {
            "summary": summary,
            "operationId": operation_id,
            "tags": ["inference"],
            "requestBody": _body(request, example),
            "responses": {
                "200": {"description": "The whole answer (`stream` false), or its SSE stream.",
                        "headers": {"X-Tidegate-Prompt-Tokens": {
                            "$ref": "#/components/headers/X-Tidegate-Prompt-Tokens"}},
                        "content": {JSON: {"schema": _ref(response)},
                                    "text/event-stream": {"schema": _event(chunk)}}},
                **_errors(*_INFERENCE_ERRORS),
            },
        }}

    model_errors = _errors(404, 500)
    reader_errors = _errors(401) if config.auth.protect_metrics else {}
    return {
        "/v1/embeddings": {"post": {
            "summary": "Embed one text or a list of texts",
            "operationId": "createEmbedding",
            "tags": ["inference"],
            "requestBody": _body("EmbeddingRequest", embed_example),
            "responses": {"200": _ok("The vectors, in input order.", _ref("EmbeddingResponse")),
                          **_errors(*_INFERENCE_ERRORS)},
        }},
        "/v1/completions": generation_op(
            "createCompletion", "Complete a prompt", "CompletionRequest", "Completion",
            "CompletionChunk", example=completion_example),
        "/v1/chat/completions": generation_op(
            "createChatCompletion", "Answer a chat", "ChatCompletionRequest", "ChatCompletion",
            "ChatCompletionChunk", example=chat_example),
        "/v1/models": {"get": {
            "summary": "List the configured models, with their cache status",
            "operationId": "listModels",
            "tags": ["models"],
            "responses": {"200": _ok("Every model the caller may use.", _ref("ModelList")),
                          **_errors(401, 500)},
        }},
        "/v1/models/{model_id}": {"get": {
            "summary": "One model's object",
            "operationId": "retrieveModel",
            "tags": ["models"],
            "parameters": [_MODEL_ID],
            "responses": {"200": _ok("The model object.", _ref("Model")),
                          **_errors(401), **model_errors},
        }},
        "/health/live": {"get": {
            "summary": "Liveness: 200 once the process serves",
            "operationId": "healthLive",
            "tags": ["health"],
            "responses": {"200": _ok("Serving.", _ref("Live"))},
        }},
        "/health/ready": {"get": {
            "summary": "Readiness: 200 once every eager model has loaded and none failed",
            "operationId": "healthReady",
            "tags": ["health"],
            "responses": {"200": _ok("Ready.", _ref("Readiness")),
                          "503": _ok("Not ready (or shutting down).", _ref("Readiness"))},
        }},
        "/health": {"get": {
            "summary": "Readiness, at the path vLLM and llama.cpp use",
            "operationId": "health",
            "tags": ["health"],
            "responses": {"200": _ok("Ready.", _ref("Readiness")),
                          "503": _ok("Not ready (or shutting down).", _ref("Readiness"))},
        }},
        "/metrics": {"get": {
            "summary": "Prometheus metrics",
            "operationId": "metrics",
            "tags": ["health"],
            "responses": {"200": _ok("The text exposition format.", {"type": "string"},
                                     media="text/plain"), **reader_errors},
        }},
        "/openapi.json": {"get": {
            "summary": "This document",
            "operationId": "openapi",
            "tags": ["health"],
            "responses": {"200": _ok("OpenAPI 3.1.", {"type": "object"}), **reader_errors},
        }},
        **_tokenizer_paths(config),
        "/admin/models/{model_id}/load": {"post": {
            "summary": "Load a model now (waits for the load)",
            "operationId": "adminLoad",
            "tags": ["admin"],
            "parameters": [_MODEL_ID],
            "security": [{"adminToken": []}, {}],
            "responses": {"200": _ok("The loaded model's object.", _ref("Model")),
                          **_errors(401, 403, 404, 500, 503, 504)},
        }},
        "/admin/models/{model_id}/unload": {"post": {
            "summary": "Unload a model once its in-flight requests finish",
            "operationId": "adminUnload",
            "tags": ["admin"],
            "parameters": [_MODEL_ID],
            "security": [{"adminToken": []}, {}],
            "responses": {"200": _ok("The model's object, now unloaded.", _ref("Model")),
                          **_errors(401, 403, 404, 500, 503, 504)},
        }},
    }


def _tokenizer_paths(config: Config) -> dict[str, Any]:
    tokenized = {RuntimeKind.EMBEDDING, RuntimeKind.CAUSAL_LM, RuntimeKind.REMOTE}
    model = next((m.id for m in config.models if m.runtime in tokenized), None)
    tokenize_example = None if model is None else {"model": model, "prompt": "Hello world"}
    detokenize_example = None if model is None else {"model": model, "tokens": [1, 2, 3]}
    return {
        "/tokenize": {"post": {
            "summary": "Tokenize a prompt or chat messages with the model's own tokenizer",
            "operationId": "tokenize",
            "tags": ["tokenizer"],
            "requestBody": _body("TokenizeRequest", tokenize_example),
            "responses": {"200": _ok("The token ids (a remote model: its upstream's answer).",
                                     _ref("TokenizeResponse")),
                          **_errors(*_INFERENCE_ERRORS)},
        }},
        "/detokenize": {"post": {
            "summary": "Turn token ids back into text with the model's own tokenizer",
            "operationId": "detokenize",
            "tags": ["tokenizer"],
            "requestBody": _body("DetokenizeRequest", detokenize_example),
            "responses": {"200": _ok("The text (a remote model: its upstream's answer).",
                                     _ref("DetokenizeResponse")),
                          **_errors(*_INFERENCE_ERRORS)},
        }},
    }


# -- reranking -----------------------------------------------------------------------------------

def _rerank_schemas(config: Config) -> dict[str, Schema]:
    max_inputs = config.server.max_inputs_per_request
    model = {"type": "string", "description": "A cross-encoder model. Optional when exactly one "
                                              "is configured (it then serves)."}
    document = {"anyOf": [{"type": "string"},
                          {"type": "object", "required": ["text"],
                           "properties": {"text": {"type": "string"}}}]}
    score = {"type": "number", "description": "The model's sigmoid (1 label) or softmax's last "
                                              "column (2 labels); TEI's raw_scores: the logit."}
    index = {"type": "integer", "minimum": 0, "description": "The document's position."}
    return {
        "RerankRequest": {
            "type": "object",
            "required": ["query", "documents"],
            "properties": {
                "model": _nullable(model),
                "query": {"type": "string"},
                "documents": {"type": "array", "minItems": 1, "maxItems": max_inputs,
                              "items": document},
                "top_n": _nullable({"type": "integer", "minimum": 1}),
                "return_documents": _nullable({"type": "boolean"}),
            },
            "description": "Cohere / Jina's shape. Each (query, document) pair is cut to the "
                           "model's limit (the document, not the query, where possible).",
        },
        "RerankResponse": {
            "type": "object",
            "required": ["id", "model", "results", "usage"],
            "properties": {
                "id": {"type": "string"},
                "model": {"type": "string"},
                "results": {"type": "array", "description": "Best first; `top_n` of them.",
                            "items": {
                                "type": "object",
                                "required": ["index", "relevance_score"],
                                "properties": {
                                    "index": index,
                                    "relevance_score": score,
                                    "document": {"type": "object", "required": ["text"],
                                                 "properties": {"text": {"type": "string"}}},
                                },
                            }},
                "usage": {"type": "object", "required": ["total_tokens"],
                          "properties": {"total_tokens": {"type": "integer", "minimum": 0}}},
            },
        },
        "TeiRerankRequest": {
            "type": "object",
            "required": ["query", "texts"],
            "properties": {
                "model": _nullable(model),
                "query": {"type": "string"},
                "texts": {"type": "array", "minItems": 1, "maxItems": max_inputs,
                          "items": {"type": "string"}},
                "raw_scores": _nullable({"type": "boolean"}),
                "return_text": _nullable({"type": "boolean"}),
                "truncate": _nullable({"type": "boolean", "description":
                                       "Default true; false: a pair over the model's limit is "
                                       "a 400 naming `texts`."}),
            },
            "description": "Hugging Face TEI's shape (a body with `texts` and no `documents`).",
        },
        "TeiRerankResponse": {
            "type": "array", "description": "Best first.",
            "items": {"type": "object", "required": ["index", "score"],
                      "properties": {"index": index, "score": score,
                                     "text": {"type": "string"}}},
        },
    }


def _rerank_paths(config: Config) -> dict[str, Any]:
    reranker = next((m.id for m in config.models if m.runtime is RuntimeKind.CROSS_ENCODER),
                    None)
    example = (None if reranker is None else
               {"model": reranker, "query": "what do cats eat?", "top_n": 1,
                "documents": ["Cats are carnivores.", "The stock market fell."]})
    cohere = {"schema": _ref("RerankRequest")}
    if example is not None:
        cohere["example"] = example
    errors = _errors(*_INFERENCE_ERRORS)
    return {
        "/v1/rerank": {"post": {
            "summary": "Score documents against a query with a cross-encoder (Cohere / Jina)",
            "operationId": "createRerank",
            "tags": ["inference"],
            "requestBody": {"required": True, "content": {JSON: cohere}},
            "responses": {"200": _ok("The documents' scores, best first.",
                                     _ref("RerankResponse")), **errors},
        }},
        "/rerank": {"post": {
            "summary": "Rerank in Cohere's shape (`documents`) or TEI's (`texts`)",
            "operationId": "rerank",
            "tags": ["inference"],
            "requestBody": {"required": True, "content": {JSON: {"schema": {"anyOf": [
                _ref("RerankRequest"), _ref("TeiRerankRequest")]}}}},
            "responses": {"200": _ok("Cohere's object for `documents`, TEI's list for `texts`.",
                                     {"anyOf": [_ref("RerankResponse"),
                                                _ref("TeiRerankResponse")]}), **errors},
        }},
    }


def build_openapi(config: Config) -> dict[str, Any]:
    """The document for a server with this config."""
    return {
        "openapi": "3.1.0",
        "jsonSchemaDialect": "https://spec.openapis.org/oas/3.1/dialect/base",
        "info": {
            "title": "tidegate",
            "version": __version__,
            "description": (
                "An OpenAI-compatible model server and gateway. Errors use OpenAI's shape, "
                "`{\"error\": {\"message\", \"type\", \"param\", \"code\"}}`; an unknown route "
                "is 404 (`code: not_found`) and a wrong method 405 (`code: "
                "method_not_allowed`, with `Allow`), in the same shape."
            ),
        },
        "paths": {**_paths(config), **_rerank_paths(config)},
        "components": {
            "schemas": {**_schemas(config), **_rerank_schemas(config)},
            "headers": {
                "Retry-After": {"description": "Seconds to wait before retrying.",
                                "schema": {"type": "string"}},
                "X-Request-Id": {"description": "The id the log's traceback is filed under.",
                                 "schema": {"type": "string"}},
                "X-Tidegate-Prompt-Tokens": {
                    "description": "A local model's stream: its prompt's tokens (what a key is "
                                   "charged for the prompt if the stream ends early).",
                    "schema": {"type": "string", "pattern": "^[0-9]+$"}},
            },
            "securitySchemes": {
                "adminToken": {"type": "http", "scheme": "bearer",
                               "description": "`[auth] admin_token`; without one, admin "
                                              "routes serve loopback clients only."},
            },
        },
        "tags": [{"name": name}
                 for name in ("inference", "tokenizer", "models", "health", "admin")],
    }


def encode_openapi(config: Config) -> bytes:
    return orjson.dumps(build_openapi(config))
