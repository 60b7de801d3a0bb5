"""``tidegate`` command line: argv -> config -> logging -> run. The only process-level effects."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Sequence
from typing import get_args

from tidegate import __version__
from tidegate.config import LogLevel, ServerConfig, check_precisions, load_config
from tidegate.engines import cpu_supports_bf16
from tidegate.errors import ConfigError

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tidegate", description=__doc__)
    parser.add_argument("--version", action="version", version=f"tidegate {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve the configured models over HTTP")
    serve.add_argument(
        "--config", help="path to tidegate.toml (default: ./tidegate.toml if present)"
    )
    defaults = ServerConfig()
    serve.add_argument("--host", help=f"address to bind (default {defaults.host})")
    serve.add_argument("--port", type=int, help=f"port to bind (default {defaults.port})")
    serve.add_argument(
        "--log-level", choices=get_args(LogLevel),
        help=f"log verbosity (default {defaults.log_level})",
    )
    return parser


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # Models are loaded from local directories only; never reach for a hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    config_path = args.config
    if config_path is None and os.path.isfile("tidegate.toml"):
        config_path = "tidegate.toml"
    try:
        config = load_config(
            config_path, host=args.host, port=args.port, log_level=args.log_level
        )
        check_precisions(config, bf16_supported=cpu_supports_bf16())
    except ConfigError as exc:
        print(f"tidegate: configuration error: {exc}", file=sys.stderr)
        return 2
    _configure_logging(config.server.log_level)
    from tidegate.server import serve

    # The server drains on a signal and returns; one before it took over is a normal exit too.
    with contextlib.suppress(KeyboardInterrupt):
        serve(config)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
