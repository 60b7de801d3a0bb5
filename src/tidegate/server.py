"""Run the app under uvicorn (uvloop + httptools) with a clean lifecycle."""

from __future__ import annotations

import logging

import uvicorn

from tidegate.api.app import create_app
from tidegate.config import Config
from tidegate.protocol import http_protocol

__all__ = ["serve"]

log = logging.getLogger("tidegate.server")


def serve(config: Config) -> None:
    """Serve until SIGINT/SIGTERM. Models load in the background; /health/live answers at once."""
    server = config.server
    app = create_app(config)
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
        timeout_graceful_shutdown=10,
    )
    log.info("tidegate listening on http://%s:%d", server.host, server.port)
    uvicorn.Server(uv_config).run()
