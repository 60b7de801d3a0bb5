"""A model replica on Ray Serve: tidegate's own app (:func:`tidegate.api.app.create_app`) for
one model, its runtime and batcher or generation engine inside, driven in process request by
request. The ingress has already checked the caller's key; the replica's app runs with keys off.

Each request arrives as a :class:`~tidegate.cluster.wire.Forwarded` and runs as one ASGI call:
``forward_unary`` answers ``(head, body)`` in one message, ``forward`` (a Serve streaming
method) yields the head and then each body chunk as the app sends it, so SSE tokens cross to
the ingress one event at a time. When the ingress cancels (its client hung up), the ASGI call
is cancelled, which leaves the generation stream's ``async with`` and frees the sequence's slot
at the engine's next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Sequence
from typing import Any

import orjson
from starlette.types import Message

from tidegate.api.app import create_app
from tidegate.api.common import AppState
from tidegate.cluster.hub import HUB_NAMESPACE, REPORT_INTERVAL_S
from tidegate.cluster.wire import Forwarded, ReplicaReport, ResponseHead, replica_config
from tidegate.config import Config
from tidegate.models.entry import ModelState

__all__ = ["ModelReplica"]

log = logging.getLogger("tidegate.cluster.replica")

_SEND_BUFFER = 64
"""Body chunks a replica holds for a slow ingress before the app's ``send`` waits (the
engine's own stream buffer and ``stream_timeout_s`` then apply, as for a slow HTTP client)."""


class ModelReplica:
    """One replica of one model (made a Serve deployment by :mod:`tidegate.cluster.deploy`)."""

    # Serve awaits an async constructor (Ray actors accept one).
    async def __init__(self, config: Config, model_id: str, hub: str | None) -> None:  # type: ignore[misc]
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        self._model_id = model_id
        self._config = replica_config(config, model_id)
        self._app = create_app(self._config)
        self._state: AppState = self._app.state.tidegate
        self._lifespan = self._app.router.lifespan_context(self._app)
        await self._lifespan.__aenter__()
        manager = self._state.manager
        timeout_s = self._config.cache.load_timeout_s
        try:
            await asyncio.wait_for(manager.wait_ready(), timeout_s)
        except TimeoutError:
            await self._lifespan.__aexit__(None, None, None)
            raise RuntimeError(f"model {model_id!r} did not load within {timeout_s:g}s "
                               "([cache] load_timeout_s)") from None
        snapshot = manager.snapshot(model_id)
        if snapshot.status is not ModelState.LOADED:
            await self._lifespan.__aexit__(None, None, None)
            raise RuntimeError(f"model {model_id!r} failed to load: {snapshot.error}")
        self._identity = _identity()
        self._hub = _find_hub(hub)
        self._closed = False
        self._reporter = asyncio.get_running_loop().create_task(self._report_forever())

    # -- requests ---------------------------------------------------------------------------

    async def forward_unary(self, request: Forwarded) -> tuple[ResponseHead, bytes]:
        """A whole response: its head and its body joined."""
        head: ResponseHead | None = None
        parts: list[bytes] = []
        async for item in self._drive(request):
            if isinstance(item, ResponseHead):
                head = item
            else:
                parts.append(item)
        assert head is not None
        return head, b"".join(parts)

    async def forward_many(self, requests: Sequence[Forwarded]
                           ) -> list[tuple[ResponseHead, bytes]]:
        """Several whole responses, computed concurrently (the ingress coalesces requests into
        one call; the model's batcher batches them here as it would separate ones)."""
        answers = await asyncio.gather(*(self.forward_unary(r) for r in requests),
                                       return_exceptions=True)
        return [answer if not isinstance(answer, BaseException) else _failed(answer)
                for answer in answers]

    async def forward(self, request: Forwarded) -> AsyncIterator[ResponseHead | bytes]:
        """The head, then each body chunk as the app sends it (Serve streams each yield)."""
        async for item in self._drive(request):
            yield item

    async def _drive(self, request: Forwarded) -> AsyncIterator[ResponseHead | bytes]:
        scope: dict[str, Any] = {
            "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1", "method": request.method, "scheme": "http",
            "path": request.path, "raw_path": request.path.encode(), "root_path": "",
            "query_string": request.query_string, "headers": list(request.headers),
            # The ingress is the client: loopback, so the replica's own checks trust it.
            "client": ("127.0.0.1", 0), "server": None,
        }
        sent: asyncio.Queue[Message | None] = asyncio.Queue(_SEND_BUFFER)
        gone = asyncio.Event()
        delivered = False

        async def receive() -> Message:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": request.body, "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message: Message) -> None:
            await sent.put(message)

        async def run() -> None:
            try:
                await self._app(scope, receive, send)
            except asyncio.CancelledError:  # the ingress left: nobody reads the end marker
                with contextlib.suppress(asyncio.QueueFull):
                    sent.put_nowait(None)
                raise
            except Exception:
                await sent.put(None)
                raise
            await sent.put(None)  # waits for room, as the app's own sends do

        task = asyncio.get_running_loop().create_task(run())
        try:
            while True:
                message = await sent.get()
                if message is None:
                    break
                if message["type"] == "http.response.start":
                    yield ResponseHead(message["status"], tuple(
                        (bytes(k), bytes(v)) for k, v in message.get("headers", ())))
                elif message["type"] == "http.response.body":
                    if message.get("body"):
                        yield bytes(message["body"])
                    if not message.get("more_body", False):
                        break
        except BaseException:  # the ingress left (cancelled, or closed the stream)
            gone.set()  # the app's next receive() sees the client leave
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            raise
        gone.set()
        await task  # the app's own ending after its last byte (a bug in it: Serve reports it)

    # -- health and reports ----------------------------------------------------------------

    def check_health(self) -> None:
        """Serve's health check: the model must still be loaded."""
        snapshot = self._state.manager.snapshot(self._model_id)
        if snapshot.status is not ModelState.LOADED:
            raise RuntimeError(f"model {self._model_id!r} is {snapshot.status.value}")

    def report(self) -> ReplicaReport:
        return ReplicaReport(
            replica=self._identity[0], model=self._model_id, node=self._identity[1],
            card=self._state.manager.describe_one(self._model_id),
            metrics=self._state.metrics.render().decode(),
        )

    async def _report_forever(self) -> None:
        if self._hub is None:
            return
        while True:
            try:
                await self._hub.report.remote(self.report())
            except Exception as exc:  # the hub is gone (the application is being removed)
                log.debug("report to the hub failed: %s", exc)
            await asyncio.sleep(REPORT_INTERVAL_S)

    async def __del__(self) -> None:
        """Serve's shutdown of this replica: stop reporting, unload the model. (Serve awaits a
        coroutine ``__del__``, its only shutdown hook for a replica; ``_closed`` makes the
        garbage collector's later call a no-op.)"""
        if self._closed:
            return
        self._closed = True
        self._reporter.cancel()
        await asyncio.gather(self._reporter, return_exceptions=True)
        if self._hub is not None:
            with contextlib.suppress(Exception):
                await self._hub.leave.remote(self._identity[0])
        await self._lifespan.__aexit__(None, None, None)


def _failed(exc: BaseException) -> tuple[ResponseHead, bytes]:
    """A 500 in OpenAI's shape for one request of a coalesced call that raised (a bug: the
    app answers every error it knows itself), so the others still get their answers."""
    log.error("a forwarded request failed in the replica", exc_info=exc)
    body = orjson.dumps({"error": {"message": "The server had an error while processing your "
                                   "request.", "type": "server_error", "param": None,
                                   "code": "internal_error"}})
    return ResponseHead(500, ((b"content-type", b"application/json"),)), body


def _identity() -> tuple[str, str]:
    """This replica's Serve id and its Ray node id."""
    import ray
    from ray import serve

    context = serve.get_replica_context()
    return (context.replica_id.unique_id,
            ray.get_runtime_context().get_node_id())


def _find_hub(name: str | None) -> Any:
    if name is None:
        return None
    import ray

    try:
        return ray.get_actor(name, namespace=HUB_NAMESPACE)
    except ValueError:
        log.warning("no metrics hub %r: this replica's metrics and card are not reported", name)
        return None
