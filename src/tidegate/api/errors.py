"""Map tidegate's exceptions to OpenAI-shaped JSON error responses."""

from __future__ import annotations

import logging

import orjson
from starlette.requests import Request
from starlette.responses import Response

from tidegate.api.ids import new_id
from tidegate.errors import (
    AuthenticationRequired,
    InvalidApiKey,
    InvalidRequest,
    ModelNotFound,
    ModelUnavailable,
    Overloaded,
    PayloadTooLarge,
    PermissionDenied,
    RateLimited,
    RequestError,
    RequestTimeout,
    RuntimeFailure,
    RuntimeLost,
    ShuttingDown,
    TidegateError,
    UnsupportedMediaType,
    UpstreamError,
    UpstreamRejected,
    UpstreamUnavailable,
)

__all__ = ["error_body", "error_response", "http_error_handler", "unexpected_error_response"]

log = logging.getLogger("tidegate.api")

_STATUS: dict[type[TidegateError], tuple[int, str]] = {
    InvalidRequest: (400, "invalid_request_error"),
    AuthenticationRequired: (401, "authentication_error"),
    InvalidApiKey: (401, "invalid_request_error"),  # OpenAI's type for invalid_api_key
    PermissionDenied: (403, "permission_error"),
    ModelNotFound: (404, "invalid_request_error"),
    PayloadTooLarge: (413, "invalid_request_error"),
    UnsupportedMediaType: (415, "invalid_request_error"),
    ModelUnavailable: (503, "service_unavailable"),
    RequestTimeout: (504, "timeout"),
    RuntimeFailure: (500, "server_error"),
    RuntimeLost: (503, "service_unavailable"),
}


def error_body(
    message: str, *, type_: str, param: str | None = None, code: str | None = None
) -> bytes:
    return orjson.dumps(
        {"error": {"message": message, "type": type_, "param": param, "code": code}}
    )


def _json(status: int, body: bytes, headers: dict[str, str] | None = None) -> Response:
    return Response(body, status_code=status, media_type="application/json", headers=headers)


def error_response(exc: TidegateError) -> Response:
    """The response for an error tidegate raised on purpose."""
    if isinstance(exc, Overloaded):
        body = error_body(str(exc), type_="rate_limit_exceeded", code="overloaded")
        return _json(exc.status, body, {"Retry-After": str(exc.retry_after_s)})
    if isinstance(exc, UpstreamError):
        return _upstream_response(exc)
    if isinstance(exc, RateLimited):  # OpenAI's type names the limit: "requests" or "tokens"
        body = error_body(str(exc), type_=exc.limit, code="rate_limit_exceeded")
        return _json(429, body, exc.headers)
    status, type_ = _STATUS.get(type(exc), (500, "server_error"))
    if isinstance(exc, RequestError):
        headers = {"WWW-Authenticate": "Bearer"} if isinstance(exc, InvalidApiKey) else None
        body = error_body(exc.message, type_=type_, param=exc.param, code=exc.code)
        return _json(status, body, headers)
    if isinstance(exc, ModelUnavailable):
        body = error_body(str(exc), type_=type_, param="model", code="model_unavailable")
        return _json(status, body, {"Retry-After": str(exc.retry_after_s)})
    if isinstance(exc, ShuttingDown):
        body = error_body(str(exc), type_="service_unavailable", code="shutting_down")
        return _json(503, body, {"Retry-After": str(exc.retry_after_s)})
    code = "timeout" if isinstance(exc, RequestTimeout) else None
    return _json(status, error_body(str(exc), type_=type_, code=code))


def _upstream_response(exc: UpstreamError) -> Response:
    """A replica's failure: its own 4xx relayed as is; ours (502/503/504) with its detail."""
    if isinstance(exc, UpstreamRejected):
        body = error_body(exc.detail or exc.message, type_=exc.type or "invalid_request_error",
                          param=exc.param, code=exc.code)
        return _json(exc.status, body)
    code = {502: "upstream_error", 503: "upstream_unavailable", 504: "upstream_timeout"}
    body = error_body(exc.message, type_="upstream_error", code=code.get(exc.status))
    headers = ({"Retry-After": str(exc.retry_after_s)}
               if isinstance(exc, UpstreamUnavailable) else None)
    return _json(exc.status, body, headers)


def unexpected_error_response(request: Request, exc: BaseException) -> Response:
    """A 500 for a bug: the traceback goes to the log under a request id, never to the client."""
    request_id = request.headers.get("x-request-id") or new_id()
    log.error(
        "unhandled error in %s %s (request id %s)",
        request.method, request.url.path, request_id, exc_info=exc,
    )
    body = error_body(
        f"The server had an error while processing your request (request id {request_id}).",
        type_="server_error",
        code="internal_error",
    )
    return _json(500, body, {"X-Request-Id": request_id})


async def http_error_handler(request: Request, exc: Exception) -> Response:
    """Starlette's own 404/405 (unknown route, wrong method) in the OpenAI error shape."""
    status = getattr(exc, "status_code", 500)
    headers = dict(getattr(exc, "headers", None) or {})
    if status == 404:
        message = f"Unknown route: {request.method} {request.url.path}"
        code = "not_found"
    elif status == 405:
        message = f"Method {request.method} is not allowed on {request.url.path}"
        code = "method_not_allowed"
    else:
        message = str(getattr(exc, "detail", "")) or "HTTP error"
        code = None
    return _json(status, error_body(message, type_="invalid_request_error", code=code), headers)
