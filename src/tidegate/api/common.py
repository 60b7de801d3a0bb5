"""Pieces every route module shares: app state, JSON responses, the error-mapping wrapper."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import orjson
from starlette.requests import Request
from starlette.responses import Response

from tidegate.api.errors import error_response, unexpected_error_response
from tidegate.config import Config
from tidegate.errors import TidegateError
from tidegate.metrics import Metrics
from tidegate.models.manager import ModelManager

__all__ = ["AppState", "ClientDisconnected", "Handler", "app_state", "endpoint", "json_response"]

Handler = Callable[[Request], Awaitable[Response]]


@dataclass(frozen=True, slots=True)
class AppState:
    config: Config
    manager: ModelManager
    metrics: Metrics


class ClientDisconnected(Exception):
    """The client went away before the response was ready."""


def json_response(data: object, status: int = 200) -> Response:
    return Response(orjson.dumps(data), status_code=status, media_type="application/json")


def app_state(request: Request) -> AppState:
    state: AppState = request.app.state.tidegate
    return state


def endpoint(handler: Handler) -> Handler:
    """Turn tidegate errors into OpenAI-shaped responses and bugs into logged 500s."""

    @functools.wraps(handler)
    async def wrapper(request: Request) -> Response:
        try:
            return await handler(request)
        except TidegateError as exc:
            return error_response(exc)
        except ClientDisconnected:
            return Response(status_code=499)
        except Exception as exc:
            return unexpected_error_response(request, exc)

    return wrapper


