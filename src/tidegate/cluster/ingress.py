"""The HTTP front of a Ray Serve application: tidegate's ASGI app with the models replaced by
their replicas' handles (:class:`Replicas`).

It does what needs the whole application: API keys and their limits (checked here, so they
are global for one ingress), choosing the model's deployment, one ``/metrics`` and one
``/v1/models`` (from the replicas' reports to the hub), readiness, and the drain. Everything
about a model (parsing its parameters, batching, generation, its errors) happens in its
replica, in tidegate's own code, and its answer is relayed as it comes: a body whole, a stream
chunk by chunk. A stream's client hanging up closes the replica's stream, which cancels the
sequence there.

With API keys, a stream is asked for its usage (``stream_options.include_usage``) so the key is
charged what the model reports; the usage event is dropped again if the client did not ask.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import orjson
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tidegate.api import admin
from tidegate.api.app import TidegateApp, openapi_route
from tidegate.api.auth import admit, authenticate, authorize_reader, check_model
from tidegate.api.common import Handler, endpoint, json_response, read_json_body
from tidegate.api.drain import Drain
from tidegate.api.errors import error_response, http_error_handler
from tidegate.api.openapi import encode_openapi
from tidegate.api.rerank import resolve_model
from tidegate.api.schemas import parse_json_object
from tidegate.api.sse import DONE, EventStreamResponse
from tidegate.api.usage import (
    PROMPT_TOKENS_HEADER,
    StreamUsage,
    ask_for_usage,
    charge_answer,
    prompt_tokens_of,
)
from tidegate.auth.keyring import ApiKey, KeyRing
from tidegate.clock import MonotonicClock
from tidegate.cluster.promtext import ExpositionError, merge_expositions
from tidegate.cluster.wire import Forwarded, ReplicaReport, ResponseHead, deployment_options
from tidegate.config import Config
from tidegate.errors import InvalidRequest, ModelNotFound, TidegateError
from tidegate.metrics import Metrics

__all__ = ["IngressState", "ReplicaStream", "Replicas", "create_ingress_app"]

log = logging.getLogger("tidegate.cluster.ingress")

_TIMEOUT_MARGIN_S = 5.0
"""The replica times a request out itself (``request_timeout_s``, 504); the ingress waits this
much longer before giving up on a replica that does not answer at all."""

_FORWARDED_HEADERS = frozenset({b"content-type", b"accept", b"x-request-id"})
_DROPPED_HEADERS = frozenset({b"content-length", b"connection", b"transfer-encoding",
                              b"keep-alive"})


class ReplicaStream(Protocol):
    """A streamed answer from one replica: its head, then its chunks."""

    head: ResponseHead

    def chunks(self) -> AsyncIterator[bytes]: ...

    async def aclose(self) -> None:
        """Stop the replica's stream (cancels its request there)."""


class Replicas(Protocol):
    """The models' deployments, as the ingress reaches them (:mod:`tidegate.cluster.deploy`
    implements it on Serve's handles). Failures are :class:`~tidegate.errors.TidegateError`\\ s
    (5xx in OpenAI's shape), never hangs: each call is bounded by ``timeout_s``."""

    async def call(self, model: str, request: Forwarded, timeout_s: float, *,
                   coalesce: bool = True) -> tuple[ResponseHead, bytes]:
        """A whole answer. ``coalesce``: it may travel with other requests for the model in
        one call (not for generation, whose answers take as long as the longest)."""

    async def stream(self, model: str, request: Forwarded, timeout_s: float
                     ) -> ReplicaStream: ...

    async def reports(self) -> Sequence[ReplicaReport]: ...

    async def set_loaded(self, model: str, loaded: bool) -> None:
        """The admin's load (its ``[models.scaling]`` replicas) or unload (none)."""


@dataclass(frozen=True, slots=True)
class IngressState:
    config: Config
    replicas: Replicas
    metrics: Metrics
    drain: Drain
    keys: KeyRing | None = None
    awaited: frozenset[str] = frozenset()
    """The models ``/health/ready`` waits for (not those that may scale to zero)."""


def _state(request: Request) -> IngressState:
    state: IngressState = request.app.state.tidegate
    return state


# -- choosing the model --------------------------------------------------------------------------

_GENERATION_ROUTES = frozenset({"/v1/completions", "/v1/chat/completions"})
_RERANK_ROUTES = frozenset({"/v1/rerank", "/rerank"})


def _model_of(config: Config, path: str, data: dict[str, Any]) -> str:
    """The model a request is for: its ``model``, or the one the route implies when the
    single-process server would pick it too (the only cross-encoder for reranking)."""
    model = data.get("model")
    if isinstance(model, str) and model:
        return model
    if path in _RERANK_ROUTES and model is None:
        return resolve_model(config, None)
    raise InvalidRequest("Missing required parameter: 'model'.", param="model")


def _check_known(config: Config, key: ApiKey | None, model: str) -> None:
    if config.model(model) is None:
        ids = [m.id for m in config.models if key is None or key.allows(m.id)]
        raise ModelNotFound(model, available=ids)


# -- relaying ------------------------------------------------------------------------------------


def _response_headers(head: ResponseHead, extra: dict[str, str] | None) -> dict[str, str]:
    headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in head.headers
               if k.lower() not in _DROPPED_HEADERS}
    if extra:
        headers.update(extra)
    return headers


async def _relay(stream: ReplicaStream, key: ApiKey | None, *, keep_usage: bool,
                 prompt_tokens: int = 0) -> AsyncIterator[bytes]:
    """The replica's chunks as they come; an error mid-stream ends it with an error event and
    ``[DONE]``. Leaving early (the client hung up, the drain cut it) closes the replica's
    stream. A key is charged the usage the model reports, or, for a stream that ends before
    it (hung up, cut, failed), ``prompt_tokens`` (as the replica's head gave them) and one
    completion token per content event it got (:class:`tidegate.api.usage.StreamUsage`)."""
    usage = None if key is None else StreamUsage(strip=not keep_usage,
                                                 prompt_tokens=prompt_tokens)
    try:
        async for received in stream.chunks():
            chunk = received if usage is None else usage.feed(received)
            if chunk:
                yield chunk
        if usage is not None and (rest := usage.close()):
            yield rest
    except TidegateError as exc:
        yield b"data: " + bytes(error_response(exc).body) + b"\n\n"
        yield DONE
    finally:
        if usage is not None:
            usage.charge(key)
        await stream.aclose()


def _forwarded(request: Request, body: bytes) -> Forwarded:
    headers = tuple((k, v) for k, v in request.scope["headers"] if k in _FORWARDED_HEADERS)
    return Forwarded(request.scope["method"], request.scope["path"],
                     request.scope.get("query_string", b""), headers, body)


async def _relay_request(request: Request) -> Response:
    state = _state(request)
    config = state.config
    server = config.server
    key = None if state.keys is None else authenticate(request, state.keys)
    body = await read_json_body(request, server.max_body_bytes)
    data = parse_json_object(body)
    path = request.scope["path"]
    model = _model_of(config, path, data)
    if key is not None:
        check_model(key, model)
    _check_known(config, key, model)
    headers = None if key is None else admit(key, model)
    request.scope["tidegate.model"] = model
    timeout_s = server.request_timeout_s + _TIMEOUT_MARGIN_S
    streamed = path in _GENERATION_ROUTES and data.get("stream") is True
    if not streamed:
        head, content = await state.replicas.call(model, _forwarded(request, body), timeout_s,
                                                  coalesce=path not in _GENERATION_ROUTES)
        if key is not None and head.status < 300:
            charge_answer(key, content)
        return Response(content, status_code=head.status,
                        headers=_response_headers(head, headers))
    options = data.get("stream_options")
    asked = isinstance(options, dict) and options.get("include_usage") is True
    if key is not None and not asked:
        body = orjson.dumps(ask_for_usage(data))
    stream = await state.replicas.stream(model, _forwarded(request, body), timeout_s)
    if stream.head.status >= 300:  # refused before streaming: a plain error body
        parts = [chunk async for chunk in stream.chunks()]
        await stream.aclose()
        return Response(b"".join(parts), status_code=stream.head.status,
                        headers=_response_headers(stream.head, headers))
    media = dict(stream.head.headers).get(b"content-type", b"text/event-stream")
    prompt = prompt_tokens_of((name.decode("latin-1"), value.decode("latin-1"))
                              for name, value in stream.head.headers)
    relayed = dict(headers or {})
    if prompt:
        relayed[PROMPT_TOKENS_HEADER] = str(prompt)
    response = EventStreamResponse(_relay(stream, key, keep_usage=asked, prompt_tokens=prompt),
                                   media_type=media.decode("latin-1"), headers=relayed,
                                   drain=state.drain)
    return response  # type: ignore[return-value]


@endpoint
async def _relay_endpoint(request: Request) -> Response:
    return await _relay_request(request)


async def relay(request: Request) -> Response:
    """Relay one inference request to its model's replicas, counted by route, model, status."""
    response = await _relay_endpoint(request)
    status = getattr(response, "status_code", 200)  # a stream: 200
    _state(request).metrics.routes.count(request.scope["path"],
                                         request.scope.get("tidegate.model", ""), status)
    return response


# -- the application's own routes ----------------------------------------------------------------


def _cards(config: Config, reports: Sequence[ReplicaReport]) -> list[dict[str, Any]]:
    """Each model's card: the freshest replica's, with how many replicas report and the Ray
    nodes they run on; a model with no
    replica reporting (scaled to zero, or all down) gets one from the config."""
    by_model: dict[str, list[ReplicaReport]] = {}
    for report in reports:
        by_model.setdefault(report.model, []).append(report)
    cards = []
    for model in config.models:
        found = by_model.get(model.id, [])
        if found:
            card = dict(found[-1].card)
        else:
            card = {"id": model.id, "object": "model", "created": 0, "owned_by": "tidegate",
                    "runtime": model.runtime.value, "status": "unloaded"}
        card["replicas"] = len(found)
        card["replica_nodes"] = sorted(report.node for report in found)
        cards.append(card)
    return cards


@endpoint
async def list_models(request: Request) -> Response:
    state = _state(request)
    key = None if state.keys is None else authenticate(request, state.keys)
    cards = _cards(state.config, await state.replicas.reports())
    if key is not None:
        cards = [card for card in cards if key.allows(str(card["id"]))]
    return json_response({"object": "list", "data": cards})


@endpoint
async def retrieve_model(request: Request) -> Response:
    state = _state(request)
    model_id = request.path_params["model_id"]
    key = None if state.keys is None else authenticate(request, state.keys)
    if key is not None:
        check_model(key, model_id)
    _check_known(state.config, key, model_id)
    cards = _cards(state.config, await state.replicas.reports())
    return json_response(next(card for card in cards if card["id"] == model_id))


async def health_live(request: Request) -> Response:
    return json_response({"status": "ok"})


def _awaited_by_readiness(config: Config) -> frozenset[str]:
    """The models readiness waits for: all but those that may scale to zero."""
    awaited = set()
    for model in config.models:
        scaling = deployment_options(config, model).get("autoscaling_config")
        if scaling is None or scaling["min_replicas"] > 0:
            awaited.add(model.id)
    return frozenset(awaited)


async def health_ready(request: Request) -> Response:
    state = _state(request)
    reports = await state.replicas.reports()
    running: dict[str, int] = {}
    for report in reports:
        running[report.model] = running.get(report.model, 0) + 1
    models = {m.id: running.get(m.id, 0) for m in state.config.models}
    if state.drain.draining:
        return json_response({"status": "shutting_down", "replicas": models}, status=503)
    ready = all(models[model] for model in state.awaited)
    return json_response({"status": "ready" if ready else "not_ready", "replicas": models},
                         status=200 if ready else 503)


@endpoint
async def metrics(request: Request) -> Response:
    state = _state(request)
    key_id = None  # an API key reads its own per-key series only (keys live at the ingress)
    if state.config.auth.protect_metrics:
        key_id = authorize_reader(request, state.keys, state.config.auth.admin_token)
    parts = [("ingress", state.metrics.render(key_id=key_id).decode())]
    parts += [(report.replica, report.metrics) for report in await state.replicas.reports()]
    while True:
        try:
            text = merge_expositions(parts)
            break
        except ExpositionError as exc:  # one replica's text is broken: serve the others
            log.warning("dropping replica %s's metrics: %s", exc.source, exc)
            parts = [part for part in parts if part[0] != exc.source]
    return Response(text, media_type=state.metrics.content_type)


async def _admin(request: Request, *, loaded: bool) -> Response:
    """Load or unload a model across the cluster: its deployment redeployed with its
    ``[models.scaling]`` replicas, or with none (its requests then get 503 at once)."""
    state = _state(request)
    admin.authorize(request, state.config.auth.admin_token)
    model_id = request.path_params["model_id"]
    _check_known(state.config, None, model_id)
    await state.replicas.set_loaded(model_id, loaded)
    cards = _cards(state.config, await state.replicas.reports())
    return json_response(next(card for card in cards if card["id"] == model_id))


@endpoint
async def admin_load(request: Request) -> Response:
    return await _admin(request, loaded=True)


@endpoint
async def admin_unload(request: Request) -> Response:
    return await _admin(request, loaded=False)


def create_ingress_app(config: Config, replicas: Replicas, *,
                       metrics_factory: Callable[[], Metrics] = Metrics) -> TidegateApp:
    """The ingress app for ``config``'s models, reached through ``replicas``."""
    app_metrics = metrics_factory()
    drain = Drain(shutdown_timeout_s=config.server.shutdown_timeout_s)
    keys = None
    if config.auth.api_keys:
        keys = KeyRing(config.auth.api_keys, clock=MonotonicClock())
        app_metrics.track_keys(keys.statistics)
    inference = ("/v1/embeddings", "/v1/completions", "/v1/chat/completions", "/v1/rerank",
                 "/rerank", "/tokenize", "/detokenize")
    routes = [Route(path, relay, methods=["POST"]) for path in inference]
    routes += [
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/models/{model_id:path}", retrieve_model, methods=["GET"]),
        Route("/health/live", health_live, methods=["GET"]),
        Route("/health/ready", health_ready, methods=["GET"]),
        Route("/health", health_ready, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/openapi.json", openapi_route(encode_openapi(config)), methods=["GET"]),
        Route("/admin/models/{model_id:path}/load", admin_load, methods=["POST"]),
        Route("/admin/models/{model_id:path}/unload", admin_unload, methods=["POST"]),
    ]
    fast: dict[tuple[str, str], Handler] = {("POST", path): relay for path in inference}
    app = TidegateApp(routes=routes, fast_routes=fast, drain=drain, server=config.server,
                      exception_handlers={HTTPException: http_error_handler})
    app.state.tidegate = IngressState(config=config, replicas=replicas, metrics=app_metrics,
                                      drain=drain, keys=keys,
                                      awaited=_awaited_by_readiness(config))
    return app
