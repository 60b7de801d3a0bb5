"""Run the app under uvicorn (uvloop + httptools) with a clean lifecycle and a graceful drain.

On SIGTERM or SIGINT, in order:

1. readiness and every new request answer 503 ``shutting_down`` (:class:`Drain`), while the
   listener stays open ``drain_grace_s``, so a load balancer sees the 503 and stops routing here;
2. uvicorn's own shutdown closes the listener and the idle connections and waits for the
   requests in flight;
3. ``shutdown_timeout_s`` after the signal, whatever still runs is cut: 503, or a final SSE
   error event and ``[DONE]`` for a stream;
4. the app's lifespan unloads the models and closes the upstream pools, the log says how many
   requests were drained and cut, and :func:`serve` returns: the process exits 0 by itself.

A second signal ends the grace and cuts what is in flight at once; a third stops waiting at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import signal
import socket
from types import FrameType

import uvicorn

from tidegate.api.app import TidegateApp, create_app
from tidegate.api.common import AppState
from tidegate.api.drain import Drain
from tidegate.config import Config, ServerConfig
from tidegate.heap import HeapFreezer
from tidegate.protocol import http_protocol

__all__ = ["serve"]

log = logging.getLogger("tidegate.server")

_UVICORN_MARGIN_S = 5.0
"""After our cut, how long uvicorn still waits before cancelling a request that ignored it."""


class _DrainingServer(uvicorn.Server):
    """uvicorn's server, with the signal handling replaced by the drain above."""

    def __init__(self, config: uvicorn.Config, drain: Drain, settings: ServerConfig) -> None:
        super().__init__(config)
        self._drain = drain
        self._grace_s = settings.drain_grace_s
        self._timeout_s = settings.shutdown_timeout_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._signals = 0
        self._deadline: float | None = None
        self._hurry = asyncio.Event()  # a second signal: no more grace, cut now
        self._grace: asyncio.Task[None] | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # A signal handler, run between two bytecodes of the loop's thread: hand over to the
        # loop. Unlike uvicorn's, it does not re-raise the signal after shutdown, so the process
        # exits 0 once drained.
        self._signals += 1
        if self._signals >= 3:
            self.force_exit = True
        if self._loop is None:  # still starting up: shut down as soon as it has
            self.should_exit = True
            return
        self._loop.call_soon_threadsafe(self._on_signal, signal.Signals(sig).name)

    def _on_signal(self, name: str) -> None:
        if self._deadline is None:
            self._begin(f"{name} received")
            self._grace = asyncio.get_running_loop().create_task(self._hold_listener())
        elif not self._hurry.is_set():
            log.warning("%s received again: ending the grace and cutting the %d requests in "
                        "flight now", name, self._drain.statistics().in_flight)
            self._hurry.set()

    def _begin(self, why: str) -> None:
        self._deadline = asyncio.get_running_loop().time() + self._timeout_s
        self._drain.begin()
        log.info(
            "%s: draining. Readiness and new requests get 503 shutting_down; %d requests in "
            "flight; the listener closes in %gs; what still runs in %gs is cut",
            why, self._drain.statistics().in_flight, self._grace_s, self._timeout_s,
        )

    async def _hold_listener(self) -> None:
        """Keep accepting (and refusing) for the grace, then let uvicorn shut down."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._hurry.wait(), self._grace_s)
        self.should_exit = True

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        if self._deadline is None:  # exiting without a signal (or one during start-up)
            self._begin("shutting down")
        assert self._deadline is not None
        loop = asyncio.get_running_loop()
        remaining = max(0.0, self._deadline - loop.time())
        self.config.timeout_graceful_shutdown = math.ceil(remaining + _UVICORN_MARGIN_S)
        cutter = loop.create_task(self._cut_after(remaining))
        try:
            await super().shutdown(sockets)
        finally:
            for task in (cutter, self._grace):
                if task is not None:
                    task.cancel()
            await asyncio.gather(cutter, *([self._grace] if self._grace else []),
                                 return_exceptions=True)
        stats = self._drain.statistics()
        log.info("shutdown complete: %d requests drained, %d cut", stats.drained, stats.cut)

    async def _cut_after(self, remaining_s: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._hurry.wait(), remaining_s)
        count = self._drain.cut()
        if count:
            log.warning("cutting %d requests still in flight (shutdown_timeout_s = %g)",
                        count, self._timeout_s)


def serve(config: Config, *, app: TidegateApp | None = None) -> None:
    """Serve until SIGINT/SIGTERM, then drain (see the module's docstring) and return.
    Models load in the background; /health/live answers at once. ``app``: another tidegate
    app to serve (the Ray ingress); by default, the single-process one for ``config``."""
    server = config.server
    heap = HeapFreezer()
    if app is None:
        app = create_app(config, heap=heap)
    state: AppState = app.state.tidegate
    uv_config = uvicorn.Config(
        app,
        host=server.host,
        port=server.port,
        loop="uvloop",
        http=http_protocol(server),  # httptools, with header/body deadlines and a connection cap
        lifespan="on",
        log_config=None,  # the CLI configured logging
        log_level=server.log_level,
        access_log=server.access_log,
        server_header=False,
        timeout_graceful_shutdown=math.ceil(server.shutdown_timeout_s + _UVICORN_MARGIN_S),
    )
    log.info("tidegate listening on http://%s:%d", server.host, server.port)
    heap.freeze()  # the start-up heap (imports, the app); each model load freezes again
    _DrainingServer(uv_config, state.drain, server).run()
