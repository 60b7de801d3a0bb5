"""Pieces every route module shares: app state, JSON responses, the error-mapping wrapper."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import orjson
from starlette.requests import Request
from starlette.responses import Response

from tidegate.api.drain import Drain
from tidegate.api.errors import error_response, unexpected_error_response
from tidegate.auth.keyring import KeyRing
from tidegate.config import Config
from tidegate.errors import (
    InvalidRequest,
    PayloadTooLarge,
    TidegateError,
    UnsupportedMediaType,
)
from tidegate.metrics import Metrics
from tidegate.models.manager import ModelManager

__all__ = [
    "AppState",
    "ClientDisconnected",
    "Handler",
    "app_state",
    "endpoint",
    "json_response",
    "read_json_body",
]

Handler = Callable[[Request], Awaitable[Response]]


@dataclass(frozen=True, slots=True)
class AppState:
    config: Config
    manager: ModelManager
    metrics: Metrics
    drain: Drain
    """Requests in flight, and whether the server is shutting down."""
    keys: KeyRing | None = None
    """The API keys; ``None`` when none is configured (the ``/v1`` routes are open)."""


class ClientDisconnected(Exception):
    """The client went away before the response was ready."""


def json_response(data: object, status: int = 200) -> Response:
    return Response(orjson.dumps(data), status_code=status, media_type="application/json")


def app_state(request: Request) -> AppState:
    state: AppState = request.app.state.tidegate
    return state


def endpoint(handler: Handler) -> Handler:
    """Turn tidegate errors into OpenAI-shaped responses, bugs into logged 500s, and a
    cancellation by the drain into 503 ``shutting_down``."""

    @functools.wraps(handler)
    async def wrapper(request: Request) -> Response:
        try:
            return await handler(request)
        except TidegateError as exc:
            return error_response(exc)
        except ClientDisconnected:
            return Response(status_code=499)
        except asyncio.CancelledError:
            # The drain cut this request at shutdown_timeout_s: answer instead of vanishing.
            task = asyncio.current_task()
            drain = app_state(request).drain
            if not drain.was_cut(task):
                raise
            assert task is not None
            task.uncancel()
            return error_response(drain.error(cut=True))
        except Exception as exc:
            return unexpected_error_response(request, exc)

    return wrapper


def _headers(request: Request) -> tuple[str | None, bytes | None]:
    """Content-Type and Content-Length from the raw ASGI headers (no Headers object)."""
    content_type: str | None = None
    length: bytes | None = None
    for key, value in request.scope["headers"]:
        if key == b"content-type":
            content_type = value.decode("latin-1")
        elif key == b"content-length":
            length = value
    return content_type, length


async def read_json_body(request: Request, max_bytes: int) -> bytes:
    content_type, declared = _headers(request)
    if content_type is not None:
        media = content_type.split(";", 1)[0].strip().lower()
        if media != "application/json" and not media.endswith("+json"):
            raise UnsupportedMediaType(media)
    if declared is not None:
        try:
            length = int(declared)
        except ValueError as exc:
            raise InvalidRequest(f"Invalid Content-Length header: {declared!r}") from exc
        if length > max_bytes:
            raise PayloadTooLarge(
                f"Request body of {length} bytes exceeds the limit of {max_bytes} bytes.",
                limit=max_bytes, actual=length,
            )
    receive = request.receive
    body = b""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnected()
        chunk: bytes = message.get("body", b"")
        if chunk:
            if len(body) + len(chunk) > max_bytes:
                raise PayloadTooLarge(
                    f"Request body exceeds the limit of {max_bytes} bytes.", limit=max_bytes
                )
            body = body + chunk if body else chunk
        if not message.get("more_body", False):
            return body
