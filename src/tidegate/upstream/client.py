"""The client of one upstream model: JSON requests with retries, relayed streams, coalesced
embeddings, health and statistics.

An attempt goes to the healthy replica with the fewest outstanding requests
(:func:`~tidegate.upstream.routing.pick_replica`). Connect errors and 502/503/504 are retried on
another replica while the retry budget allows; nothing is retried once the replica has started
sending a successful body, so a relayed stream is never restarted. Failures surface as
:class:`UpstreamError` subclasses carrying the HTTP status tidegate should answer and the
replica's own detail. Relayed streams are :class:`~tidegate.upstream.stream.UpstreamStream`.

One module at about 400 lines: JSON requests, streams and coalesced embeddings share one attempt
loop (pick, open, classify, retry) and one failure mapping, which change together.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from types import TracebackType
from typing import Any

import orjson

from tidegate._version import __version__
from tidegate.errors import (
    UpstreamBadGateway,
    UpstreamError,
    UpstreamRejected,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from tidegate.upstream.config import UpstreamConfig
from tidegate.upstream.health import HealthMonitor
from tidegate.upstream.pool import (
    TRANSPORT_ERRORS,
    Exchange,
    ReplicaPool,
    describe_error,
)
from tidegate.upstream.routing import (
    BUDGET_EXHAUSTED,
    Failure,
    ReplicaView,
    RetryBudget,
    classify_exception,
    classify_status,
    decide_retry,
    pick_replica,
)
from tidegate.upstream.stats import UpstreamStatistics
from tidegate.upstream.stream import UpstreamStream

__all__ = [
    "UpstreamBadGateway",
    "UpstreamClient",
    "UpstreamError",
    "UpstreamRejected",
    "UpstreamStatistics",
    "UpstreamStream",
    "UpstreamTimeout",
    "UpstreamUnavailable",
]

log = logging.getLogger("tidegate.upstream")

_JSON_HEADERS = {"content-type": "application/json"}
_MAX_ERROR_BODY = 64 * 1024
_MAX_DETAIL_CHARS = 500


USER_AGENT = f"tidegate/{__version__}"
"""Sent upstream on every request and health check (instead of aiohttp's own)."""


def _error_fields(body: bytes) -> tuple[str, dict[str, Any]]:
    """The replica's own error message (OpenAI, FastAPI or plain text) and its error object."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        text = body.decode("utf-8", "replace").strip()
        return (text[:_MAX_DETAIL_CHARS] or "(empty body)"), {}
    error = data.get("error") if isinstance(data, dict) else None
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return error["message"][:_MAX_DETAIL_CHARS], error
    if isinstance(error, str):
        return error[:_MAX_DETAIL_CHARS], {}
    for key in ("detail", "message"):
        if isinstance(data, dict) and key in data:
            value = data[key]
            text = value if isinstance(value, str) else orjson.dumps(value).decode()
            return text[:_MAX_DETAIL_CHARS], {}
    return body.decode("utf-8", "replace")[:_MAX_DETAIL_CHARS], {}


def _retry_after(headers: Mapping[str, str]) -> int:
    try:
        return max(1, math.ceil(float(headers.get("retry-after", "1"))))
    except ValueError:
        return 1


# -- the client --------------------------------------------------------------------------------


class UpstreamClient:
    """Serve one tidegate model from remote OpenAI-compatible replicas.

    ``api_key`` is resolved by the caller (``config.api_key(os.environ)``) and sent as a Bearer
    token. ``model`` is tidegate's model id; the replicas are told ``config.upstream_model``
    (or it).
    Use as ``async with UpstreamClient(...) as client`` or call ``start()`` / ``aclose()``.
    """

    def __init__(
        self, config: UpstreamConfig, *, model: str, api_key: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.model = model
        self.upstream_model = config.upstream_model or model
        headers = {"user-agent": USER_AGENT}
        if api_key:
            headers["authorization"] = f"Bearer {api_key}"
        self._pools = [
            ReplicaPool(url, pool=config.pool, timeouts=config.timeouts, headers=headers,
                        clock=clock)
            for url in config.upstreams
        ]
        self.health = HealthMonitor(config.upstreams, config.health, headers=headers, clock=clock)
        self._budget = RetryBudget(ratio=config.retry.budget_ratio,
                                   burst=config.retry.budget_burst)
        self._rotation = 0
        self._requests = 0
        self._retries = 0
        self._refused_by_budget = 0
        self._failures: collections.Counter[Failure] = collections.Counter()

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        await self.health.start()

    async def aclose(self) -> None:
        try:
            await self.health.aclose()
        finally:
            await asyncio.shield(asyncio.gather(*(pool.aclose() for pool in self._pools)))

    async def __aenter__(self) -> UpstreamClient:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.aclose()

    # -- operations ----------------------------------------------------------------------------

    async def request_json(
        self, path: str, payload: Mapping[str, Any] | None = None, *, method: str = "POST"
    ) -> Any:
        """Send ``payload`` (its ``model`` set to the upstream's name) and return the parsed
        JSON answer. Raises :class:`UpstreamError` subclasses."""
        index, exchange = await self._open(method, path, self._encode(payload))
        try:
            body = await exchange.read()
        except TRANSPORT_ERRORS as exc:
            raise self._after_headers_failure(index, exc, 0) from exc
        finally:
            await exchange.aclose()
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            snippet = body[:200].decode("utf-8", "replace")
            raise UpstreamBadGateway(
                f"Upstream of model '{self.model}' at {exchange.replica} answered "
                f"{exchange.status} with a body that is not JSON: {snippet!r}",
                model=self.model, replica=exchange.replica, detail=snippet,
            ) from exc

    async def open_stream(
        self, path: str, payload: Mapping[str, Any], *, method: str = "POST"
    ) -> UpstreamStream:
        """Send ``payload`` and return its response body as a stream of byte chunks.

        Returns once the first chunk has arrived (or the body ended), so every failure before
        a byte could reach the client raises here and can still become an error response.
        """
        index, exchange = await self._open(method, path, self._encode(payload))
        stream = UpstreamStream(
            exchange, fail=lambda exc, relayed: self._after_headers_failure(index, exc, relayed)
        )
        try:
            await stream._prefetch()
        except BaseException:
            await stream.aclose()
            raise
        return stream

    async def embed_batch(self, texts: Sequence[str]) -> list[list[float]]:
        """Embed ``texts`` with ONE ``POST /v1/embeddings`` and return the vectors in order."""
        if not texts:
            return []
        data = await self.request_json(
            "/v1/embeddings", {"input": list(texts), "encoding_format": "float"}
        )
        return self._vectors_in_order(data, len(texts))

    @property
    def pools(self) -> Sequence[ReplicaPool]:
        """One pool per replica, in configuration order."""
        return tuple(self._pools)

    def describe(self) -> dict[str, Any]:
        """Health of every replica, for ``/v1/models`` and ``/health/ready``."""
        replicas = self.health.describe()
        for card, pool in zip(replicas, self._pools, strict=True):
            card["in_flight"] = pool.in_flight
        ready = any(card["status"] == "healthy" for card in replicas)
        return {
            "status": "ready" if ready else "unavailable",
            "upstream_model": self.upstream_model,
            "replicas": replicas,
        }

    def statistics(self) -> UpstreamStatistics:
        return UpstreamStatistics(
            requests=self._requests,
            retries=self._retries,
            retries_refused_by_budget=self._refused_by_budget,
            retry_budget_tokens=self._budget.tokens,
            failures={failure.value: n for failure, n in self._failures.items()},
            replicas=tuple(pool.statistics() for pool in self._pools),
            health=self.health.statistics(),
        )

    def __repr__(self) -> str:
        return (f"<UpstreamClient model={self.model!r} replicas={len(self._pools)} "
                f"requests={self._requests} retries={self._retries}>")

    # -- internals -----------------------------------------------------------------------------

    def _encode(self, payload: Mapping[str, Any] | None) -> bytes | None:
        if payload is None:
            return None
        return orjson.dumps({**payload, "model": self.upstream_model})

    def _pick(self, tried: Sequence[int], start: int) -> int | None:
        healthy = self.health.healthy()
        views = [ReplicaView(i, healthy[i], pool.in_flight) for i, pool in enumerate(self._pools)]
        return pick_replica(views, exclude=tried, start=start)

    async def _open(self, method: str, path: str, content: bytes | None) -> tuple[int, Exchange]:
        """One request, retried on other replicas while allowed: an exchange with a 1xx-3xx
        status, or the mapped error of the last attempt."""
        self._requests += 1
        self._budget.deposit()
        start = self._rotation % len(self._pools)
        self._rotation += 1
        headers = _JSON_HEADERS if content is not None else None
        tried: list[int] = []
        index = self._pick(tried, start)
        if index is None:
            raise self._no_healthy_replica()
        while True:
            pool = self._pools[index]
            tried.append(index)
            try:
                exchange = await pool.open(method, path, content=content, headers=headers)
            except TRANSPORT_ERRORS as exc:
                failure = classify_exception(exc)
                error: UpstreamError = self._exception_error(failure, exc, pool.url)
                error.__cause__ = exc
            else:
                status_failure = classify_status(exchange.status)
                if status_failure is None:
                    self.health.record_success(index)
                    return index, exchange
                failure = status_failure
                error = await self._status_error(exchange)
            self._record_failure(index, failure, error)
            next_index = self._pick(tried, start)
            decision = decide_retry(
                failure, retries=len(tried) - 1, max_retries=self.config.retry.max_retries,
                budget_available=self._budget.can_withdraw(), alternative=next_index is not None,
            )
            if not decision.retry or next_index is None:
                if failure.retryable:
                    log.info("not retrying %s %s for model %s: %s (%s)",
                             method, path, self.model, error, decision.reason)
                    if decision.reason == BUDGET_EXHAUSTED:
                        self._refused_by_budget += 1
                raise error
            self._budget.withdraw()
            self._retries += 1
            log.info("retrying %s %s for model %s on %s after: %s",
                     method, path, self.model, self._pools[next_index].url, error)
            index = next_index

    def _record_failure(self, index: int, failure: Failure, error: UpstreamError) -> None:
        self._failures[failure] += 1
        if failure.counts_against_replica:
            self.health.record_failure(index, error.message)

    def _prefix(self, replica: str) -> str:
        return f"Upstream of model '{self.model}' at {replica}"

    def _exception_error(self, failure: Failure, exc: BaseException, replica: str,
                         suffix: str = "") -> UpstreamError:
        timeouts = self.config.timeouts
        reason = describe_error(exc) + suffix
        common: dict[str, Any] = {"model": self.model, "replica": replica, "detail": reason}
        if failure is Failure.POOL_TIMEOUT:
            limit = self.config.pool.max_connections
            return UpstreamUnavailable(
                f"{self._prefix(replica)} is saturated: all {limit} connections stayed busy "
                f"for {timeouts.pool_s:g}s (upstream.timeouts.pool_s). Retry later, or raise "
                "upstream.pool.max_connections or add replicas.",
                retry_after_s=max(1, math.ceil(timeouts.pool_s)), **common,
            )
        if failure is Failure.CONNECT:
            return UpstreamBadGateway(f"{self._prefix(replica)} is unreachable: {reason}",
                                      **common)
        if failure is Failure.TIMEOUT:
            return UpstreamTimeout(
                f"{self._prefix(replica)} timed out ({reason}); read timeout is "
                f"{timeouts.read_s:g}s (upstream.timeouts.read_s).", **common,
            )
        return UpstreamBadGateway(f"{self._prefix(replica)} broke the connection: {reason}",
                                  **common)

    async def _status_error(self, exchange: Exchange) -> UpstreamError:
        """Read (a bounded part of) an error answer and close the exchange."""
        body = b""
        try:
            while len(body) < _MAX_ERROR_BODY and (chunk := await exchange.read_chunk()):
                body += chunk
        except TRANSPORT_ERRORS as exc:
            body = f"(error body unreadable: {type(exc).__name__})".encode()
        finally:
            await exchange.aclose()
        detail, fields = _error_fields(body)
        status = exchange.status
        replica = exchange.replica
        common: dict[str, Any] = {
            "model": self.model, "replica": replica, "upstream_status": status, "detail": detail,
        }
        message = f"{self._prefix(replica)} answered {status}: {detail}"
        if status == 504:
            return UpstreamTimeout(message, **common)
        if status == 503:
            return UpstreamUnavailable(message, retry_after_s=_retry_after(exchange.headers),
                                       **common)
        if status >= 500:
            return UpstreamBadGateway(message, **common)
        if status in (401, 403, 407):
            hint = (f"check the key in ${self.config.api_key_env}" if self.config.api_key_env
                    else "set upstream.api_key_env to the variable holding its API key")
            return UpstreamBadGateway(
                f"{self._prefix(replica)} refused tidegate's credentials ({status}: {detail}); "
                f"{hint}.", **common,
            )
        return UpstreamRejected(
            detail, model=self.model, replica=replica, upstream_status=status, detail=detail,
            type_=fields.get("type"), param=fields.get("param"), code=fields.get("code"),
        )

    def _after_headers_failure(self, index: int, exc: BaseException,
                               relayed: int) -> UpstreamError:
        """A failure while reading a successful body: never retried."""
        failure = classify_exception(exc)
        suffix = f" (after {relayed} bytes were relayed)" if relayed else ""
        error = self._exception_error(failure, exc, self._pools[index].url, suffix)
        self._record_failure(index, failure, error)
        return error

    def _no_healthy_replica(self) -> UpstreamUnavailable:
        cards = self.health.describe()
        reasons = "; ".join(
            f"{card['url']} ejected ({card['ejected_by']}): {card['last_error']}" for card in cards
        )
        health = self.config.health
        retry_after = health.interval_s if health.path is not None else health.ejection_s
        return UpstreamUnavailable(
            f"Model '{self.model}' has no healthy upstream replica: {reasons}",
            model=self.model, replica=None, retry_after_s=max(1, math.ceil(retry_after)),
        )

    def _vectors_in_order(self, data: Any, expected: int) -> list[list[float]]:
        items = data.get("data") if isinstance(data, dict) else None
        vectors: list[list[float] | None] = [None] * expected
        if isinstance(items, list):
            for item in items:
                index = item.get("index") if isinstance(item, dict) else None
                if isinstance(index, int) and 0 <= index < expected:
                    vectors[index] = item.get("embedding")
        if (not isinstance(items, list) or len(items) != expected
                or any(not isinstance(v, list) for v in vectors)):
            got = len(items) if isinstance(items, list) else "no"
            raise UpstreamBadGateway(
                f"Upstream of model '{self.model}' returned {got} embeddings for {expected} "
                "inputs, or embeddings without a valid 'index'.",
                model=self.model, replica=None,
            )
        return [v for v in vectors if v is not None]
