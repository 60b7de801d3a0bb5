"""A bare Starlette echo server: the floor under tidegate's echo runtime.

No tidegate code: ``POST /v1/embeddings`` reads the body, parses it with orjson and answers with
the JSON tidegate's echo runtime returns (unit 8-dim vectors, whitespace-word + 2 token
counts), under uvicorn with uvloop + httptools and no access log, as tidegate runs. The ratio
of tidegate-echo to this server's requests/s is what tidegate's own request path costs.

Run alone with ``python -m bench.bare_echo --port 8001``.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import orjson
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from bench.http_load import HOST, ServerProcess, free_port, managed_server

__all__ = ["bare_echo_server", "create_app"]

_DIMENSIONS = 8
_VECTOR = [1.0] + [0.0] * (_DIMENSIONS - 1)


async def embeddings(request: Request) -> Response:
    data = orjson.loads(await request.body())
    raw = data["input"]
    inputs = [raw] if isinstance(raw, str) else raw
    tokens = sum(len(text.split()) + 2 for text in inputs)
    payload = {
        "object": "list",
        "data": [
            {"object": "embedding", "index": index, "embedding": _VECTOR}
            for index in range(len(inputs))
        ],
        "model": data["model"],
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }
    return Response(orjson.dumps(payload), media_type="application/json")


async def ready(request: Request) -> Response:
    return Response(b'{"status":"ready"}', media_type="application/json")


def create_app() -> Starlette:
    return Starlette(
        routes=[
            Route("/v1/embeddings", embeddings, methods=["POST"]),
            Route("/health/ready", ready, methods=["GET"]),
        ]
    )


@contextlib.contextmanager
def bare_echo_server(*, workdir: Path, name: str = "bare-echo") -> Iterator[ServerProcess]:
    """This module's server as a subprocess on a free port, ready to take load."""
    port = free_port()
    command = [sys.executable, "-m", "bench.bare_echo", "--port", str(port)]
    with managed_server(
        command, port=port, log_path=workdir / f"{name}.log", ready_timeout_s=30.0
    ) as server:
        yield server


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bare_echo", description=__doc__)
    parser.add_argument("--host", default=HOST)
    parser.add_argument("--port", type=int, default=8001)
    args = parser.parse_args(argv)
    uvicorn.run(
        create_app(),
        host=args.host,
        port=args.port,
        loop="uvloop",
        http="httptools",
        lifespan="off",
        access_log=False,
        log_level="warning",
        server_header=False,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
