"""``POST /v1/completions`` and ``POST /v1/chat/completions``, OpenAI's format, streaming or not.

A local causal LM is served by its continuous-batching engine, which refuses what it cannot
honour (:mod:`tidegate.api.generation_params`); a remote model's body is relayed to its upstream
unchanged but for the model's name and, with an API key, a stream's request for its usage
(:mod:`tidegate.api.usage`); streams go chunk by chunk, never buffered whole. Logprobs, when
asked for, go out with the text they belong to (:mod:`tidegate.api.logprobs`). A non-streamed
answer is bounded by ``request_timeout_s`` and cancelled when its client hangs up
(:func:`tidegate.api.guard.run_guarded`); a stream races its client in
:class:`tidegate.api.sse.EventStreamResponse`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from tidegate.api.auth import admit, authenticate
from tidegate.api.common import app_state, endpoint, json_response, read_json_body
from tidegate.api.drain import Drain
from tidegate.api.errors import error_response
from tidegate.api.generation_params import Endpoint, check_local, optional, sampling_params
from tidegate.api.guard import run_guarded
from tidegate.api.ids import new_id
from tidegate.api.logprobs import LogprobEncoder
from tidegate.api.schemas import parse_json_object
from tidegate.api.sse import DONE, EventStreamResponse, sse_event
from tidegate.api.usage import (
    PROMPT_TOKENS_HEADER,
    StreamUsage,
    ask_for_usage,
    prompt_tokens_of,
    usage_tokens,
)
from tidegate.auth.keyring import ApiKey
from tidegate.errors import InvalidRequest, RequestTimeout, TidegateError
from tidegate.generation.params import SamplingParams
from tidegate.generation.stream import Delta, GenerationResult, GenerationStream
from tidegate.models.manager import ModelManager
from tidegate.models.served import RemoteModel, TextGenerationModel
from tidegate.upstream.client import UpstreamStream

__all__ = ["chat_completions", "completions", "parse_messages"]

_FINISH = {"stop": "stop", "length": "length", "abort": "stop"}


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    model: str
    endpoint: Endpoint
    prompt: str | None
    messages: list[dict[str, str]] | None
    params: SamplingParams
    stream: bool
    include_usage: bool
    body: dict[str, Any]


def _text_content(content: object, index: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
        parts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text"
                    and isinstance(part.get("text"), str)):
                raise InvalidRequest(f"messages[{index}].content: only text parts are supported.",
                                     param="messages")
            parts.append(part["text"])
        return "".join(parts)
    raise InvalidRequest(f"messages[{index}].content must be a string.", param="messages")


def parse_messages(value: object) -> list[dict[str, str]]:
    """Chat messages as ``role``/``content`` strings; 400 naming ``messages``."""
    if not isinstance(value, list) or not value:
        raise InvalidRequest("'messages' must be a non-empty array.", param="messages")
    messages = []
    for index, message in enumerate(value):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise InvalidRequest(f"messages[{index}] must be an object with a 'role'.",
                                 param="messages")
        messages.append({"role": message["role"],
                         "content": _text_content(message.get("content", ""), index)})
    return messages


def _prompt(value: object) -> str:
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if not isinstance(value, str):
        raise InvalidRequest("'prompt' must be a string (one prompt per request).",
                             param="prompt")
    if not value:  # as the OpenAPI document says: a model without a BOS token has no input
        raise InvalidRequest("'prompt' must not be empty.", param="prompt")
    return value


def parse_generation_request(body: bytes, endpoint: Endpoint) -> GenerationRequest:
    data = parse_json_object(body)
    model = data.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("Missing required parameter: 'model'.", param="model")
    prompt = messages = None
    if endpoint == "chat":
        messages = parse_messages(data.get("messages"))
    else:
        if "prompt" not in data:
            raise InvalidRequest("Missing required parameter: 'prompt'.", param="prompt")
        prompt = _prompt(data["prompt"])
    params = sampling_params(data, endpoint)
    # null means the default; any other value must have the parameter's type (as the OpenAPI
    # document says), never be read for its truthiness.
    stream = optional(data, "stream", bool, "a boolean") or False
    options = optional(data, "stream_options", dict, "an object") or {}
    include_usage = optional(options, "include_usage", bool, "a boolean", "stream_options")
    optional(data, "user", str, "a string")
    return GenerationRequest(model, endpoint, prompt, messages, params, stream,
                             bool(include_usage), data)


# -- encoding ------------------------------------------------------------------------------------


class _Encoder:
    """OpenAI's response and chunk shapes for one request."""

    def __init__(self, request: GenerationRequest, model: str,
                 logprobs: LogprobEncoder | None = None) -> None:
        self.request = request
        self.model = model
        self.logprobs = logprobs
        """Set when the request asked for logprobs: then chunks are made by logprob_delta."""
        prefix = "chatcmpl" if request.endpoint == "chat" else "cmpl"
        self.id = new_id(prefix)
        self.created = int(time.time())
        chat = request.endpoint == "chat"
        self.object = "chat.completion.chunk" if chat else "text_completion"
        # Text chunks differ only in their text: the event around it is encoded once.
        marker = orjson.dumps("\x00")
        template = self._chunk(self._text_choice("\x00"))
        self._delta_parts = template.split(marker) if template.count(marker) == 1 else None

    def _chunk(self, choice: dict[str, Any], usage: dict[str, int] | None = None) -> bytes:
        data: dict[str, Any] = {"id": self.id, "object": self.object, "created": self.created,
                                "model": self.model, "choices": [choice] if choice else []}
        if usage is not None:
            data["usage"] = usage
        return sse_event(data)

    def first(self) -> bytes | None:
        if self.request.endpoint != "chat":
            return None
        return self._chunk({"index": 0, "delta": {"role": "assistant", "content": ""},
                            "logprobs": None, "finish_reason": None})

    def _text_choice(self, text: str, logprobs: dict[str, Any] | None = None
                     ) -> dict[str, Any]:
        if self.request.endpoint == "chat":
            return {"index": 0, "delta": {"content": text}, "logprobs": logprobs,
                    "finish_reason": None}
        return {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": None}

    def delta(self, text: str) -> bytes:
        """``_chunk(_text_choice(text))``, from the template."""
        if self._delta_parts is None:  # the model's name holds the marker
            return self._chunk(self._text_choice(text))
        head, tail = self._delta_parts
        return head + orjson.dumps(text) + tail

    def logprob_delta(self, delta: Delta) -> bytes:
        """A chunk with ``delta``'s text and the logprobs of the tokens it completes."""
        assert self.logprobs is not None
        logprobs = self.logprobs.encode(delta.token_ids, delta.logprobs)
        return self._chunk(self._text_choice(delta.text, logprobs))

    def _result_logprobs(self, result: GenerationResult) -> dict[str, Any] | None:
        if self.logprobs is None or result.logprobs is None:
            return None
        reported = result.logprobs
        return self.logprobs.encode(result.token_ids[: len(reported)], reported)

    def last(self, result: GenerationResult) -> list[bytes]:
        reason = _FINISH.get(result.finish_reason, "stop")
        if self.request.endpoint == "chat":
            choice = {"index": 0, "delta": {}, "logprobs": None, "finish_reason": reason}
        else:
            choice = {"index": 0, "text": "", "logprobs": None, "finish_reason": reason}
        chunks = [self._chunk(choice)]
        if self.request.include_usage:
            chunks.append(self._chunk({}, usage=_usage(result)))
        return chunks

    def whole(self, result: GenerationResult) -> bytes:
        reason = _FINISH.get(result.finish_reason, "stop")
        if self.request.endpoint == "chat":
            choice: dict[str, Any] = {
                "index": 0, "message": {"role": "assistant", "content": result.text},
                "logprobs": self._result_logprobs(result), "finish_reason": reason,
            }
            kind = "chat.completion"
        else:
            choice = {"index": 0, "text": result.text,
                      "logprobs": self._result_logprobs(result), "finish_reason": reason}
            kind = "text_completion"
        return orjson.dumps({"id": self.id, "object": kind, "created": self.created,
                             "model": self.model, "choices": [choice], "usage": _usage(result)})


def _usage(result: GenerationResult) -> dict[str, int]:
    return {"prompt_tokens": result.prompt_tokens,
            "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens}


def _error_event(exc: TidegateError) -> bytes:
    """A failure after the stream began (the status is already sent): an error event."""
    return b"data: " + bytes(error_response(exc).body) + b"\n\n"


# -- serving -------------------------------------------------------------------------------------

# Prompts longer than this are tokenized in a thread rather than on the event loop.
_INLINE_TOKENIZE_CHARS = 2000


async def _local_events(
    stack: contextlib.AsyncExitStack[Any], stream: GenerationStream, encoder: _Encoder,
    key: ApiKey | None,
) -> AsyncIterator[bytes]:
    """SSE chunks for one local sequence. Leaving early (the client went away) exits
    ``async with stream``, which cancels the sequence and frees its slot; ``stack`` holds the
    model's lease until then."""
    emitted = 0  # deltas (or tokens) sent: what a key is charged if the stream ends early
    charged = key is None
    try:
        async with stack, stream:
            first = encoder.first()
            if first:
                yield first
            try:
                if encoder.logprobs is None:
                    async for text in stream:
                        emitted += 1
                        yield encoder.delta(text)
                else:
                    async for delta in stream.deltas():
                        emitted += len(delta.token_ids)
                        yield encoder.logprob_delta(delta)
            except TidegateError as exc:
                yield _error_event(exc)
                return
            assert stream.result is not None
            if key is not None:
                key.record(stream.result.prompt_tokens, stream.result.completion_tokens)
                charged = True
            for chunk in encoder.last(stream.result):
                yield chunk
            yield DONE
    finally:
        # A client that hangs up (or a stream cut or failed) still pays for what it got.
        if not charged and key is not None:
            key.record(stream.prompt_tokens, emitted)


@dataclass(frozen=True, slots=True)
class _Context:
    """What a generation's response needs besides the model: the drain (a stream still running
    at the shutdown deadline is cut), the API key its usage is counted against, and that key's
    rate-limit headers."""

    drain: Drain
    key: ApiKey | None = None
    headers: dict[str, str] | None = None


async def _serve_local(request: GenerationRequest, model: TextGenerationModel,
                       stack: contextlib.AsyncExitStack[Any], context: _Context
                       ) -> Response | EventStreamResponse:
    engine = model.engine
    runtime = model.runtime
    limit = getattr(runtime, "max_top_logprobs", None)
    check_local(request.body, request.endpoint, request.params, model=model.id,
                max_top_logprobs=limit if isinstance(limit, int) else None)
    engine.check_room(request.params.max_tokens)  # a full queue refuses before tokenizing
    if request.messages is not None:
        prompt_ids = await asyncio.to_thread(runtime.encode_chat, request.messages)
    else:
        assert request.prompt is not None
        if len(request.prompt) > _INLINE_TOKENIZE_CHARS:
            prompt_ids = await asyncio.to_thread(runtime.encode, request.prompt)
        else:
            prompt_ids = runtime.encode(request.prompt)
    stream = engine.submit(prompt_ids, request.params)
    logprobs = (None if request.params.logprobs is None
                else LogprobEncoder(runtime.decoder, request.endpoint))
    encoder = _Encoder(request, model.id, logprobs)
    if request.stream:
        headers = {**(context.headers or {}), PROMPT_TOKENS_HEADER: str(len(prompt_ids))}
        return EventStreamResponse(_local_events(stack.pop_all(), stream, encoder, context.key),
                                   headers=headers, drain=context.drain)
    async with stream:
        result = await stream.collect()
    if context.key is not None:
        context.key.record(result.prompt_tokens, result.completion_tokens)
    return Response(encoder.whole(result), media_type="application/json",
                    headers=context.headers)


async def _relay_events(stack: contextlib.AsyncExitStack[Any], upstream_stream: UpstreamStream,
                        key: ApiKey | None, *, keep_usage: bool) -> AsyncIterator[bytes]:
    """The upstream's bytes as they arrive; leaving early closes the upstream stream, which
    returns or discards its connection. With an API key the stream was asked for its usage,
    which is charged to the key (:class:`tidegate.api.usage.StreamUsage`) and, unless the
    client asked for it too (``keep_usage``), not relayed."""
    usage = None if key is None else StreamUsage(
        strip=not keep_usage, prompt_tokens=prompt_tokens_of(upstream_stream.headers.items()))
    try:
        async with stack, upstream_stream:
            async for chunk in upstream_stream:
                relayed = chunk if usage is None else usage.feed(chunk)
                if relayed:
                    yield relayed
            if usage is not None and (rest := usage.close()):
                yield rest
    finally:  # also when the client hangs up, before the usage event or after it
        if usage is not None:
            usage.charge(key)


async def _serve_remote(request: GenerationRequest, model: RemoteModel,
                        stack: contextlib.AsyncExitStack[Any], context: _Context
                        ) -> Response | EventStreamResponse:
    client = model.upstream
    body = {**request.body, "model": client.upstream_model}
    path = "/v1/chat/completions" if request.endpoint == "chat" else "/v1/completions"
    if request.stream:
        if context.key is not None and not request.include_usage:
            body = ask_for_usage(body)
        upstream_stream = await client.open_stream(path, body)
        events = _relay_events(stack.pop_all(), upstream_stream, context.key,
                               keep_usage=request.include_usage)
        return EventStreamResponse(events,
                                   media_type=upstream_stream.media_type or "text/event-stream",
                                   headers=context.headers, drain=context.drain)
    data = await client.request_json(path, body)
    if isinstance(data, dict) and "model" in data:
        data["model"] = model.id  # clients asked for tidegate's name, not the replica's
    if context.key is not None and (found := usage_tokens(data)) is not None:
        context.key.record(*found)
    response = json_response(data)
    if context.headers:
        response.headers.update(context.headers)
    return response


async def _serve(manager: ModelManager, request: GenerationRequest, context: _Context, *,
                 lease_timeout_s: float | None) -> Response | EventStreamResponse:
    async with contextlib.AsyncExitStack() as stack:
        try:
            async with asyncio.timeout(lease_timeout_s):
                model = await stack.enter_async_context(manager.lease(request.model))
        except TimeoutError:
            assert lease_timeout_s is not None
            raise RequestTimeout(model=request.model, timeout_s=lease_timeout_s) from None
        generator = model.generator()  # 400 for an embedding model
        if isinstance(generator, RemoteModel):
            return await _serve_remote(request, generator, stack, context)
        return await _serve_local(request, generator, stack, context)
    raise AssertionError("unreachable")


async def _generate(request: Request, endpoint: Endpoint) -> Response | EventStreamResponse:
    state = app_state(request)
    key = None if state.keys is None else authenticate(request, state.keys)
    server = state.config.server
    parsed = parse_generation_request(
        await read_json_body(request, server.max_body_bytes), endpoint
    )
    headers = None if key is None else admit(key, parsed.model)
    timeout_s = server.request_timeout_s
    context = _Context(drain=state.drain, key=key, headers=headers)
    if parsed.stream:
        # Only getting the model is timed: the stream then races the client itself, and a
        # reader that falls behind is dropped after stream_timeout_s.
        return await _serve(state.manager, parsed, context, lease_timeout_s=timeout_s)
    # The whole answer is timed, and a client that hangs up cancels it: leaving the stream's
    # (or the upstream exchange's) ``async with`` frees the sequence at the next step.
    work = _serve(state.manager, parsed, context, lease_timeout_s=None)
    return await run_guarded(request, work, model=parsed.model, timeout_s=timeout_s)


@endpoint
async def completions(request: Request) -> Response:
    return await _generate(request, "completion")  # type: ignore[return-value]


@endpoint
async def chat_completions(request: Request) -> Response:
    return await _generate(request, "chat")  # type: ignore[return-value]
