"""The one exception tree of tidegate.

Every error a caller can see derives from :class:`TidegateError`. Each carries the numbers
that explain it, and ``api.errors`` maps each class to one HTTP status and OpenAI error type::

    TidegateError
    ├── ConfigError            bad tidegate.toml / flags: start-up stops (exit 2)
    ├── RequestError           the client's mistake (4xx)
    │   ├── InvalidRequest     400, names the parameter
    │   ├── AuthenticationRequired 401 (admin routes)
    │   │   └── InvalidApiKey  401 invalid_api_key: /v1 without a valid API key
    │   ├── PermissionDenied   403 (admin routes)
    │   ├── ModelNotFound      404 model_not_found
    │   ├── PayloadTooLarge    413
    │   └── UnsupportedMediaType 415
    ├── Overloaded             429 (or 503) with Retry-After: the queue is full
    ├── RateLimited            429 rate_limit_exceeded: an API key's per-minute limit
    ├── ModelUnavailable       503: the model is loading or failed to load
    ├── ShuttingDown           503 shutting_down: the server is draining (or cut the request)
    ├── RequestTimeout         504: the request waited longer than its timeout
    ├── RuntimeFailure         500: the model raised while computing
    ├── RuntimeLost            503: the runtime can compute nothing more (its process died)
    └── UpstreamError          a remote replica failed (status on the instance)
        ├── UpstreamBadGateway   502: unreachable, broken connection, or its 5xx
        ├── UpstreamTimeout      504: no answer within the read timeout
        ├── UpstreamUnavailable  503: no healthy replica, pool wait timed out, or its 503
        └── UpstreamRejected     its own 4xx, relayed with its status and fields
"""

from __future__ import annotations

__all__ = [
    "AuthenticationRequired",
    "ConfigError",
    "InvalidApiKey",
    "InvalidRequest",
    "ModelNotFound",
    "ModelUnavailable",
    "Overloaded",
    "PayloadTooLarge",
    "PermissionDenied",
    "RateLimited",
    "RequestError",
    "RequestTimeout",
    "RuntimeFailure",
    "RuntimeLost",
    "ShuttingDown",
    "TidegateError",
    "UnsupportedMediaType",
    "UpstreamBadGateway",
    "UpstreamError",
    "UpstreamRejected",
    "UpstreamTimeout",
    "UpstreamUnavailable",
]


class TidegateError(Exception):
    """Base class of every error raised by tidegate."""




class ConfigError(TidegateError):
    """The configuration is invalid. ``key`` is the offending key's full place in the file, when
    there is one, and the message starts with it:
    ``models[2].batching.max_batch_size: must be >= 1, got 0``."""

    def __init__(self, problem: str, *, key: str | None = None) -> None:
        super().__init__(f"{key}: {problem}" if key else problem)
        self.problem = problem
        self.key = key

    def within(self, where: str) -> ConfigError:
        """This error with its key placed under the table ``where`` (``models[2].batching``)."""
        if not where:
            return self
        if not self.key:
            return ConfigError(self.problem, key=where)
        joiner = "" if self.key.startswith("[") else "."
        return ConfigError(self.problem, key=f"{where}{joiner}{self.key}")


class RequestError(TidegateError):
    """The request cannot be served as sent; retrying it unchanged will fail again."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


class InvalidRequest(RequestError):
    """A parameter is missing, of the wrong type or out of range."""


class AuthenticationRequired(RequestError):
    """An admin route was called without credentials while ``admin_token`` is set."""


class InvalidApiKey(AuthenticationRequired):
    """An inference route was called without an API key, or with one that is not configured.
    The message never contains what was sent."""

    def __init__(self, message: str) -> None:
        super().__init__(message, code="invalid_api_key")


class PermissionDenied(RequestError):
    """Wrong credentials, or an admin route called from a non-loopback client without a token."""


class ModelNotFound(RequestError):
    """No model with this id is configured."""

    def __init__(self, model: str, *, available: list[str] | None = None):
        hint = f" Available models: {', '.join(available)}." if available else ""
        super().__init__(
            f"The model '{model}' does not exist.{hint}", param="model", code="model_not_found"
        )
        self.model = model


class PayloadTooLarge(RequestError):
    """The body or the number of inputs is above the configured limit."""

    def __init__(self, message: str, *, limit: int, actual: int | None = None):
        super().__init__(message, code="payload_too_large")
        self.limit = limit
        self.actual = actual


class UnsupportedMediaType(RequestError):
    """The body is not sent as application/json."""

    def __init__(self, content_type: str):
        super().__init__(
            f"Unsupported Content-Type '{content_type or '(none)'}'; send application/json.",
            code="unsupported_media_type",
        )


class Overloaded(TidegateError):
    """The model's queue is full; the client should retry after ``retry_after_s``."""

    def __init__(self, *, model: str, queued: int, limit: int, retry_after_s: int, status: int,
                 wait_ms: float | None = None, wait_limit_ms: float | None = None):
        if wait_limit_ms is None:
            why = f"{queued} inputs queued, limit {limit}"
        else:
            why = (f"{queued} queued ahead, a new request would have its result in about "
                   f"{wait_ms or 0:.0f} ms, limit {wait_limit_ms:g} ms")
        super().__init__(f"Model '{model}' is overloaded: {why}. Retry after {retry_after_s}s.")
        self.model = model
        self.queued = queued
        self.limit = limit
        self.retry_after_s = retry_after_s
        self.status = status


class RateLimited(TidegateError):
    """An API key used up its ``requests_per_minute`` or ``tokens_per_minute``; retry after
    ``retry_after_s``. ``headers`` are the ``x-ratelimit-*`` headers of the refusal."""

    def __init__(self, *, key_id: str, limit: str, per_minute: int, retry_after_s: int,
                 headers: dict[str, str]) -> None:
        super().__init__(
            f"Rate limit reached for API key '{key_id}' on {limit} per minute: limit "
            f"{per_minute}. Retry after {retry_after_s}s."
        )
        self.key_id = key_id
        self.limit = limit
        self.per_minute = per_minute
        self.retry_after_s = retry_after_s
        self.headers = headers


class ModelUnavailable(TidegateError):
    """The model exists but cannot serve now (still loading, or its load failed)."""

    def __init__(self, model: str, reason: str, *, retry_after_s: int = 1):
        super().__init__(f"Model '{model}' is not available: {reason}")
        self.model = model
        self.reason = reason
        self.retry_after_s = retry_after_s


class ShuttingDown(TidegateError):
    """The server is shutting down: it takes no new requests, and cuts those still running when
    ``shutdown_timeout_s`` (``cut_after_s``) passes. Retry on another replica."""

    def __init__(self, *, cut_after_s: float | None = None, retry_after_s: int = 1) -> None:
        if cut_after_s is None:
            message = ("The server is shutting down and takes no new requests; "
                       "retry on another replica.")
        else:
            message = (f"The server is shutting down and cut this request before it finished "
                       f"(shutdown_timeout_s = {cut_after_s:g}); retry it on another replica.")
        super().__init__(message)
        self.cut_after_s = cut_after_s
        self.retry_after_s = retry_after_s


class RequestTimeout(TidegateError):
    """The request was not served within its timeout; its queued work was withdrawn."""

    def __init__(self, *, model: str, timeout_s: float):
        super().__init__(f"Request to model '{model}' timed out after {timeout_s:g}s.")
        self.model = model
        self.timeout_s = timeout_s


class RuntimeLost(TidegateError):
    """Raised by a runtime that can compute nothing more (the process running its model died).
    The model's engine ends its requests with :class:`ModelUnavailable` and the model cache
    marks the model failed, to be loaded again after its backoff."""


class RuntimeFailure(TidegateError):
    """The model's runtime raised while computing this request."""

    def __init__(self, model: str, detail: str):
        super().__init__(f"Model '{model}' failed while computing: {detail}")
        self.model = model
        self.detail = detail


class UpstreamError(TidegateError):
    """A remote replica failed to serve a request; ``status`` is what tidegate should answer."""

    status = 502

    def __init__(self, message: str, *, model: str, replica: str | None,
                 upstream_status: int | None = None, detail: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.model = model
        self.replica = replica
        self.upstream_status = upstream_status
        self.detail = detail


class UpstreamBadGateway(UpstreamError):
    """502: the replica could not be reached, broke the connection, or answered 5xx."""


class UpstreamTimeout(UpstreamError):
    """504: the replica sent nothing within the read timeout, or answered 504 itself."""

    status = 504


class UpstreamUnavailable(UpstreamError):
    """503: no healthy replica, no free connection within the pool-wait timeout, or 503."""

    status = 503

    def __init__(self, message: str, *, model: str, replica: str | None,
                 upstream_status: int | None = None, detail: str | None = None,
                 retry_after_s: int = 1) -> None:
        super().__init__(message, model=model, replica=replica,
                         upstream_status=upstream_status, detail=detail)
        self.retry_after_s = retry_after_s


class UpstreamRejected(UpstreamError):
    """The replica refused the request itself (4xx); relay its status and error fields."""

    def __init__(self, message: str, *, model: str, replica: str, upstream_status: int,
                 detail: str, type_: str | None, param: str | None, code: str | None) -> None:
        super().__init__(message, model=model, replica=replica,
                         upstream_status=upstream_status, detail=detail)
        self.status = upstream_status
        self.type = type_
        self.param = param
        self.code = code
