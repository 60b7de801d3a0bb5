"""The ASGI application: thin routes that parse, call the model manager, and encode."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from tidegate.api import admin, generation, rerank, tokenize
from tidegate.api.auth import admit, authenticate, authorize_reader, check_model
from tidegate.api.common import (
    AppState,
    Handler,
    app_state,
    endpoint,
    json_response,
    read_json_body,
)
from tidegate.api.drain import Drain
from tidegate.api.errors import error_response, http_error_handler
from tidegate.api.guard import run_guarded
from tidegate.api.openapi import encode_openapi
from tidegate.api.schemas import (
    EmbeddingRequest,
    encode_embedding_response,
    parse_embedding_request,
)
from tidegate.auth.keyring import KeyRing
from tidegate.clock import MonotonicClock
from tidegate.config import Config, ServerConfig
from tidegate.heap import HeapFreezer
from tidegate.metrics import Metrics
from tidegate.models.manager import ModelManager, RuntimeFactory
from tidegate.models.served import EmbeddingResult
from tidegate.runtimes import create_runtime

__all__ = ["AppState", "TidegateApp", "create_app", "openapi_route"]



async def _embed(manager: ModelManager, parsed: EmbeddingRequest) -> tuple[str, EmbeddingResult]:
    async with manager.lease(parsed.model) as model:
        embedder = model.embedder()  # 400 for a text-generation model
        if parsed.dimensions is not None:
            embedder.check_dimensions(parsed.dimensions)
        return model.id, await embedder.embed(parsed.inputs)


@endpoint
async def create_embeddings(request: Request) -> Response:
    state = app_state(request)
    key = None if state.keys is None else authenticate(request, state.keys)
    server = state.config.server
    body = await read_json_body(request, server.max_body_bytes)
    parsed = parse_embedding_request(body, max_inputs=server.max_inputs_per_request)
    headers = None if key is None else admit(key, parsed.model)
    model_id, result = await run_guarded(
        request, _embed(state.manager, parsed), model=parsed.model,
        timeout_s=server.request_timeout_s,
    )
    if key is not None:
        key.record(result.prompt_tokens)
    content = encode_embedding_response(
        model=model_id,
        vectors=result.vectors,
        prompt_tokens=result.prompt_tokens,
        encoding_format=parsed.encoding_format,
    )
    return Response(content, media_type="application/json", headers=headers)


@endpoint
async def list_models(request: Request) -> Response:
    state = app_state(request)
    models = state.manager.describe()
    if state.keys is not None:
        key = authenticate(request, state.keys)
        models = [model for model in models if key.allows(str(model["id"]))]
    return json_response({"object": "list", "data": models})


@endpoint
async def retrieve_model(request: Request) -> Response:
    state = app_state(request)
    model_id = request.path_params["model_id"]
    if state.keys is not None:
        check_model(authenticate(request, state.keys), model_id)
    return json_response(state.manager.describe_one(model_id))


async def health_live(request: Request) -> Response:
    return json_response({"status": "ok"})


async def health_ready(request: Request) -> Response:
    state = app_state(request)
    manager = state.manager
    models = {model.id: model.status.value for model in manager.snapshots()}
    if state.drain.draining:
        return json_response({"status": "shutting_down", "models": models}, status=503)
    if manager.ready:
        return json_response({"status": "ready", "models": models})
    return json_response({"status": "not_ready", "models": models}, status=503)


def _check_reader(state: AppState, request: Request) -> str | None:
    """Under ``[auth] protect_metrics``, who reads: the id of the API key sent (it then sees its
    own key's series only), or None for the admin token; anyone without it."""
    auth = state.config.auth
    if auth.protect_metrics:
        return authorize_reader(request, state.keys, auth.admin_token)
    return None


@endpoint
async def metrics(request: Request) -> Response:
    state = app_state(request)
    key_id = _check_reader(state, request)
    return Response(state.metrics.render(key_id=key_id), media_type=state.metrics.content_type)


def openapi_route(document: bytes) -> Handler:
    @endpoint
    async def openapi(request: Request) -> Response:
        _check_reader(app_state(request), request)
        return Response(document, media_type="application/json")

    return openapi


class TidegateApp(Starlette):
    """Starlette, with the hot routes dispatched straight to their handlers.

    ``POST /v1/embeddings``, ``/v1/completions`` and ``/v1/chat/completions`` skip Starlette's
    middleware stack and router (about 20% of the echo runtime's per-request time). That is
    safe because their handlers are ``@endpoint``s: every exception already becomes an error
    response. Other methods and paths (405s, 404s included) take the regular route.

    Every HTTP request passes the drain first: while the server runs, its task is registered as
    in flight (a set add and discard); once draining, it is refused with 503 ``shutting_down``,
    health probes and metrics excepted.
    """

    def __init__(self, *, fast_routes: dict[tuple[str, str], Handler], drain: Drain,
                 server: ServerConfig, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._fast_routes = fast_routes
        self._drain = drain
        self._server = server

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await super().__call__(scope, receive, send)
            return
        drain = self._drain
        if drain.draining:
            if scope["path"] in _WHILE_DRAINING:  # probes and scrapes, not counted as in flight
                await self._dispatch(scope, receive, send)
            else:
                await _refuse(drain, self._server, scope, receive, send)
            return
        task = asyncio.current_task()
        assert task is not None
        drain.enter(task)
        try:
            await self._dispatch(scope, receive, send)
        finally:
            drain.leave(task)

    async def _dispatch(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not scope.get("root_path"):
            handler = self._fast_routes.get((scope["method"], scope["path"]))
            if handler is not None:
                scope["app"] = self
                response = await handler(Request(scope, receive, send))
                await response(scope, receive, send)
                return
        await super().__call__(scope, receive, send)


_DRAIN_BODY_WAIT_S = 1.0
"""While draining, how long a refused request's body may still take to arrive."""

_WHILE_DRAINING = frozenset({"/health/live", "/health/ready", "/health", "/metrics"})
"""Paths still served while draining: readiness must be seen to fail, liveness to hold."""


async def _refuse(drain: Drain, server: ServerConfig, scope: Scope, receive: Receive,
                  send: Send) -> None:
    """503 shutting_down, closing the connection so the client's next try goes elsewhere.

    The body still arriving is read first: closing a connection with bytes unread makes the
    kernel reset it, and a client reset while still sending may never read the 503. A client
    that stops sending is answered after ``_DRAIN_BODY_WAIT_S`` (at most half of
    ``body_timeout_s``, so the 503 comes before the protocol's 408)."""
    await _discard_body(scope, receive, max_bytes=server.max_body_bytes,
                        timeout_s=min(_DRAIN_BODY_WAIT_S, server.body_timeout_s / 2))
    response = error_response(drain.error(cut=False))
    response.headers["Connection"] = "close"
    await response(scope, receive, send)


async def _discard_body(scope: Scope, receive: Receive, *, max_bytes: int,
                        timeout_s: float) -> None:
    """Read and drop the request's body: until its end, past ``max_bytes``, or ``timeout_s``
    (the protocol's body_timeout_s also bounds it), whichever comes first."""
    for name, value in scope["headers"]:
        if name == b"expect" and value.lower() == b"100-continue":
            return  # the client sends no body until told to: nothing is arriving
    received = 0
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout_s):
            while received <= max_bytes:
                message = await receive()
                if message["type"] != "http.request" or not message.get("more_body", False):
                    return
                received += len(message.get("body", b""))


def create_app(config: Config, *, runtime_factory: RuntimeFactory = create_runtime,
               heap: HeapFreezer | None = None) -> TidegateApp:
    """Build the app. Models start loading when the app starts (ASGI lifespan). ``heap``: the
    serving process's freezer, told of every model load and unload (``tidegate serve``)."""
    app_metrics = Metrics()
    drain = Drain(shutdown_timeout_s=config.server.shutdown_timeout_s)
    model_manager = ModelManager(config, app_metrics, runtime_factory=runtime_factory,
                                 heap=heap)
    keys = None
    if config.auth.api_keys:
        keys = KeyRing(config.auth.api_keys, clock=MonotonicClock())
        app_metrics.track_keys(keys.statistics)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await model_manager.start()
        try:
            yield
        finally:
            await model_manager.aclose()

    routes = [
        Route("/v1/embeddings", create_embeddings, methods=["POST"]),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/models/{model_id:path}", retrieve_model, methods=["GET"]),
        Route("/health/live", health_live, methods=["GET"]),
        Route("/health/ready", health_ready, methods=["GET"]),
        # /health is what vLLM and llama.cpp serve: lets tidegate be another gateway's upstream.
        Route("/health", health_ready, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/openapi.json", openapi_route(encode_openapi(config)), methods=["GET"]),
        Route("/v1/completions", generation.completions, methods=["POST"]),
        Route("/v1/chat/completions", generation.chat_completions, methods=["POST"]),
        # vLLM's tokenizer routes, at its paths (no /v1).
        Route("/tokenize", tokenize.tokenize, methods=["POST"]),
        Route("/detokenize", tokenize.detokenize, methods=["POST"]),
        Route("/admin/models/{model_id:path}/load", admin.admin_load, methods=["POST"]),
        Route("/admin/models/{model_id:path}/unload", admin.admin_unload, methods=["POST"]),
    ]
    routes += [
        Route("/v1/rerank", rerank.v1_rerank, methods=["POST"]),
        Route("/rerank", rerank.rerank, methods=["POST"]),
    ]
    handlers: dict[Any, Any] = {HTTPException: http_error_handler}
    fast_routes: dict[tuple[str, str], Handler] = {
        ("POST", "/v1/embeddings"): create_embeddings,
        ("POST", "/v1/completions"): generation.completions,
        ("POST", "/v1/chat/completions"): generation.chat_completions,
    }
    app = TidegateApp(routes=routes, exception_handlers=handlers, lifespan=lifespan,
                      fast_routes=fast_routes, drain=drain, server=config.server)
    app.state.tidegate = AppState(config=config, manager=model_manager, metrics=app_metrics,
                                  drain=drain, keys=keys)
    return app
