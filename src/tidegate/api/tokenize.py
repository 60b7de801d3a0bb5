"""``POST /tokenize`` and ``POST /detokenize``, in vLLM's shapes, for every model with a tokenizer.

A local model answers with its own tokenizer (:mod:`tidegate.runtimes.tokenization`): an
embedding model's without truncation (``count`` may exceed ``max_model_len``, which it would
truncate to), a causal LM's with its chat format for ``messages`` (the ids a chat completion
prompts the model with). Echo and python models have no tokenizer (400). A remote model's body
is relayed to its upstream's own route (vLLM and tidegate serve both), the model renamed, the
answer relayed as it is, a replica's 4xx included.

With API keys configured, a request needs a key and is admitted like any inference request:
counted against ``requests_per_minute``, refused while the key is over either limit, but it
charges no tokens (nothing was computed by the model). Every answer is counted in
``tidegate_route_requests_total{route,model,status}``.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from starlette.requests import Request
from starlette.responses import Response

from tidegate.api.auth import admit, authenticate
from tidegate.api.common import Handler, app_state, endpoint, json_response, read_json_body
from tidegate.api.generation import parse_messages
from tidegate.api.generation_params import optional
from tidegate.api.guard import run_guarded
from tidegate.api.schemas import parse_json_object
from tidegate.errors import InvalidRequest
from tidegate.models.manager import ModelManager
from tidegate.models.served import RemoteModel
from tidegate.runtimes.tokenization import ChatTokenizer, TextTokenizer

__all__ = [
    "DetokenizeRequest",
    "TokenizeRequest",
    "detokenize",
    "parse_detokenize_request",
    "parse_tokenize_request",
    "tokenize",
]

# Longer inputs are tokenized (or decoded) in a thread rather than on the event loop; chat
# messages always are (their template is rendered by Jinja), as in api.generation.
_INLINE_CHARS = 2000
_INLINE_TOKENS = 500

_CHAT_OPTIONS: dict[str, object] = {
    "continue_final_message": False, "chat_template": None, "chat_template_kwargs": {},
    "tools": [],
}
"""vLLM's chat options a local model does not honour, with the value that changes nothing: any
other is a 400 rather than ids that silently differ from what was asked (a remote model relays
them)."""

_MODEL_SCOPE_KEY = "tidegate.model"
"""Where a handler notes the configured model a request names, for its metrics label."""


@dataclass(frozen=True, slots=True)
class TokenizeRequest:
    model: str
    prompt: str | None
    """Exactly one of ``prompt`` and ``messages`` is set."""
    messages: list[dict[str, str]] | None
    add_special_tokens: bool | None
    """None: the default (true for a prompt; for messages, as a chat completion does)."""
    add_generation_prompt: bool
    return_token_strs: bool
    body: dict[str, Any]


@dataclass(frozen=True, slots=True)
class DetokenizeRequest:
    model: str
    tokens: list[int]
    body: dict[str, Any]


R = TypeVar("R", TokenizeRequest, DetokenizeRequest)
T = TypeVar("T")


def _model(data: dict[str, Any]) -> str:
    model = data.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("Missing required parameter: 'model'.", param="model")
    return model


def parse_tokenize_request(body: bytes) -> TokenizeRequest:
    data = parse_json_object(body)
    model = _model(data)
    prompt = optional(data, "prompt", str, "a string")
    messages = None
    if data.get("messages") is not None:
        if prompt is not None:
            raise InvalidRequest("Send either 'prompt' or 'messages', not both.",
                                 param="messages")
        messages = parse_messages(data["messages"])
    elif prompt is None:
        raise InvalidRequest("Missing required parameter: 'prompt' (or 'messages' for a chat).",
                             param="prompt")
    add_special_tokens = optional(data, "add_special_tokens", bool, "a boolean")
    add_generation_prompt = optional(data, "add_generation_prompt", bool, "a boolean")
    return_token_strs = optional(data, "return_token_strs", bool, "a boolean")
    return TokenizeRequest(
        model, prompt, messages, add_special_tokens,
        add_generation_prompt=True if add_generation_prompt is None else add_generation_prompt,
        return_token_strs=bool(return_token_strs), body=data,
    )


def _token_ids(value: object) -> list[int]:
    if not isinstance(value, list):
        raise InvalidRequest("'tokens' must be an array of token ids (non-negative integers).",
                             param="tokens")
    ids = []
    for index, item in enumerate(value):
        token = int(item) if isinstance(item, float) and item.is_integer() else item  # 7.0
        if isinstance(token, bool) or not isinstance(token, int) or token < 0:
            raise InvalidRequest(f"'tokens[{index}]' must be a non-negative integer, got "
                                 f"{item!r}.", param="tokens")
        ids.append(token)
    return ids


def parse_detokenize_request(body: bytes) -> DetokenizeRequest:
    data = parse_json_object(body)
    model = _model(data)
    if data.get("tokens") is None:
        raise InvalidRequest("Missing required parameter: 'tokens'.", param="tokens")
    return DetokenizeRequest(model, _token_ids(data["tokens"]), data)


# -- serving -------------------------------------------------------------------------------------


def _check_chat_options(body: dict[str, Any], model: str) -> None:
    for name, inert in _CHAT_OPTIONS.items():
        value = body.get(name)
        if value is not None and value != inert:
            raise InvalidRequest(f"'{name}' is not supported by local model '{model}' (only "
                                 f"{inert!r}); a remote model relays it.", param=name)


def _check_vocabulary(tokens: Sequence[int], tokenizer: TextTokenizer, model: str) -> None:
    largest = tokenizer.max_token_id
    if not tokens or max(tokens) <= largest:
        return
    index, token = next((i, t) for i, t in enumerate(tokens) if t > largest)
    raise InvalidRequest(f"'tokens[{index}]' is {token}, not in the vocabulary of model "
                         f"'{model}' (ids 0 to {largest}).", param="tokens")


async def _call(large: bool, function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``function(*args, **kwargs)``, in a thread if the input is ``large``."""
    if large:
        return await asyncio.to_thread(function, *args, **kwargs)
    return function(*args, **kwargs)


async def _prompt_ids(tokenizer: TextTokenizer, parsed: TokenizeRequest) -> list[int]:
    assert parsed.prompt is not None
    special = True if parsed.add_special_tokens is None else parsed.add_special_tokens
    return await _call(len(parsed.prompt) > _INLINE_CHARS, tokenizer.tokenize, parsed.prompt,
                       add_special_tokens=special)


async def _chat_ids(tokenizer: ChatTokenizer, parsed: TokenizeRequest) -> list[int]:
    assert parsed.messages is not None
    return await asyncio.to_thread(
        tokenizer.tokenize_chat, parsed.messages,
        add_generation_prompt=parsed.add_generation_prompt,
        add_special_tokens=parsed.add_special_tokens,
    )


async def _relay(model: RemoteModel, path: str, body: dict[str, Any]) -> Response:
    return json_response(await model.upstream.request_json(path, body))


async def _tokenize(request: Request, manager: ModelManager, parsed: TokenizeRequest
                    ) -> Response:
    lease = manager.lease(parsed.model)  # 404 for an unknown model
    request.scope[_MODEL_SCOPE_KEY] = parsed.model
    async with lease as model:
        tokenizer: TextTokenizer
        if parsed.messages is not None:
            chat = model.chat_tokenizer()  # 400 naming 'messages' for an embedding model
            if isinstance(chat, RemoteModel):
                return await _relay(chat, "/tokenize", parsed.body)
            _check_chat_options(parsed.body, model.id)
            tokenizer, ids = chat, await _chat_ids(chat, parsed)
        else:
            plain = model.tokenizer()
            if isinstance(plain, RemoteModel):
                return await _relay(plain, "/tokenize", parsed.body)
            tokenizer, ids = plain, await _prompt_ids(plain, parsed)
        data: dict[str, Any] = {"count": len(ids), "max_model_len": tokenizer.max_model_len,
                                "tokens": ids}
        if parsed.return_token_strs:
            data["token_strs"] = await _call(len(ids) > _INLINE_TOKENS, tokenizer.token_strs, ids)
        return json_response(data)


async def _detokenize(request: Request, manager: ModelManager, parsed: DetokenizeRequest
                      ) -> Response:
    lease = manager.lease(parsed.model)
    request.scope[_MODEL_SCOPE_KEY] = parsed.model
    async with lease as model:
        tokenizer = model.tokenizer()
        if isinstance(tokenizer, RemoteModel):
            return await _relay(tokenizer, "/detokenize", parsed.body)
        _check_vocabulary(parsed.tokens, tokenizer, model.id)
        text = await _call(len(parsed.tokens) > _INLINE_TOKENS, tokenizer.detokenize,
                           parsed.tokens)
        return json_response({"prompt": text})


def _counted(route: str, handler: Handler) -> Handler:
    """``handler`` (an ``@endpoint``: it always answers), its answers counted by status."""

    @functools.wraps(handler)
    async def counted(request: Request) -> Response:
        response = await handler(request)
        model = request.scope.get(_MODEL_SCOPE_KEY, "")
        app_state(request).metrics.routes.count(route, model, response.status_code)
        return response

    return counted


async def _serve(request: Request, parse: Callable[[bytes], R],
                 serve: Callable[[Request, ModelManager, R], Awaitable[Response]]) -> Response:
    state = app_state(request)
    key = None if state.keys is None else authenticate(request, state.keys)
    server = state.config.server
    parsed = parse(await read_json_body(request, server.max_body_bytes))
    headers = None if key is None else admit(key, parsed.model)
    # Bounded like any request: the lease may wait for the model to load.
    response = await run_guarded(request, serve(request, state.manager, parsed),
                                 model=parsed.model, timeout_s=server.request_timeout_s)
    if headers:
        response.headers.update(headers)
    return response


@endpoint
async def _tokenize_endpoint(request: Request) -> Response:
    return await _serve(request, parse_tokenize_request, _tokenize)


@endpoint
async def _detokenize_endpoint(request: Request) -> Response:
    return await _serve(request, parse_detokenize_request, _detokenize)


tokenize = _counted("/tokenize", _tokenize_endpoint)
detokenize = _counted("/detokenize", _detokenize_endpoint)
