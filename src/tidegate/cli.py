"""``tidegate`` command line: argv -> config -> logging -> run. The only process-level effects."""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import logging
import os
import re
import secrets
import signal
import sys
from collections.abc import Sequence
from typing import get_args

from tidegate import __version__
from tidegate.auth.keyring import hash_key
from tidegate.config import (
    ApiKeyConfig,
    Config,
    LogLevel,
    ServerConfig,
    check_precisions,
    load_config,
)
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
    serve.add_argument(
        "--ray", nargs="?", const="", metavar="ADDRESS",
        help="deploy on Ray Serve (pip install 'tidegate[ray]'): 'auto' or a cluster address "
             "joins a running cluster; without one, a local single-node Ray is started")
    serve.add_argument(
        "--ingress", choices=["tidegate", "serve"], default="tidegate",
        help="with --ray: where requests enter: tidegate's own server in this process "
             "(default, measured faster) or Serve's HTTP proxy")
    serve.add_argument(
        "--ray-app", default="tidegate", metavar="NAME",
        help="with --ray: the deployment's name; its Serve applications are NAME.<model> "
             "(default tidegate); give each deployment sharing a cluster its own")
    keys = commands.add_parser("keys", help="manage API keys").add_subparsers(
        dest="keys_command", required=True)
    create = keys.add_parser(
        "create", help="print a new random API key (once) and the config lines to paste")
    create.add_argument("--id", required=True, help="the key's name in logs and metrics")
    create.add_argument("--models", help="comma-separated model ids it may use (default: all)")
    create.add_argument("--rpm", type=int, help="requests_per_minute")
    create.add_argument("--tpm", type=int, help="tokens_per_minute")
    exporter = commands.add_parser(
        "install-exporter",
        help="install optimum-intel (with the transformers it supports) into its own directory, "
             "for exporting causal LMs to OpenVINO GenAI")
    exporter.add_argument("--target", help="directory (default: <environment>/tidegate-exporter)")
    return parser


def _install_exporter(args: argparse.Namespace) -> int:
    from pathlib import Path
    from subprocess import CalledProcessError

    from tidegate.runtimes.genai_export import EXPORTER_REQUIREMENTS, install_exporter

    try:
        target = install_exporter(Path(args.target) if args.target else None)
    except CalledProcessError as exc:
        print(f"tidegate: pip failed ({exc.returncode}) installing "
              f"{' '.join(EXPORTER_REQUIREMENTS)}", file=sys.stderr)
        return 1
    print(f"OpenVINO exporter ready in {target}")
    return 0


def _create_key(args: argparse.Namespace) -> int:
    """Print a new key and its ``[[auth.keys]]`` entry; only the entry's hash is ever stored."""
    secret = "tg-" + secrets.token_urlsafe(32)
    models = None if args.models is None else tuple(
        m.strip() for m in args.models.split(",") if m.strip())
    try:
        entry = ApiKeyConfig(id=args.id, hash=hash_key(secret), models=models,
                             requests_per_minute=args.rpm, tokens_per_minute=args.tpm)
    except ConfigError as exc:
        print(f"tidegate: {exc}", file=sys.stderr)
        return 2
    # TOML basic strings take any Unicode: no surrogate-pair escapes, which TOML refuses.
    lines = ["[[auth.keys]]", f"id = {json.dumps(entry.id, ensure_ascii=False)}",
             f'hash = "{entry.hash}"']
    if entry.models is not None:
        lines.append("models = [" + ", ".join(json.dumps(m, ensure_ascii=False)
                                                for m in entry.models) + "]")
    if entry.requests_per_minute is not None:
        lines.append(f"requests_per_minute = {entry.requests_per_minute}")
    if entry.tokens_per_minute is not None:
        lines.append(f"tokens_per_minute = {entry.tokens_per_minute}")
    print(f"API key for {entry.id!r} (shown only now; tidegate keeps only its hash):\n\n"
          f"    {secret}\n\n"
          "Add to tidegate.toml (in a keys_file, write [[keys]] instead of [[auth.keys]]):\n\n"
          + "\n".join(lines))
    return 0


def _warn_if_open(config: Config) -> None:
    """Anyone who can reach a non-loopback address may use every model without keys."""
    host = config.server.host
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback and not config.auth.api_keys:
        logging.getLogger("tidegate.server").warning(
            "binding %s without API keys: anyone who can reach it may use every model; "
            "add [[auth.keys]] (tidegate keys create --id NAME)", host)


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "keys":
        return _create_key(args)
    if args.command == "install-exporter":
        return _install_exporter(args)
    # Until the server takes over the signals, SIGTERM stops start-up cleanly (exit 0), as
    # SIGINT does, instead of killing the process mid-import.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        with contextlib.suppress(KeyboardInterrupt):
            return _serve(args)
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous)


def _serve(args: argparse.Namespace) -> int:
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
    _warn_if_open(config)
    if args.ray is not None:
        return _serve_on_ray(config, args)
    from tidegate.server import serve

    # The server drains on a signal and returns; one before it took over is a normal exit too.
    serve(config)
    return 0


def _serve_on_ray(config: Config, args: argparse.Namespace) -> int:
    try:
        import ray  # noqa: F401
        from ray import serve  # noqa: F401
    except ImportError:
        print("tidegate: --ray needs Ray Serve: pip install 'tidegate[ray]'", file=sys.stderr)
        return 2
    from tidegate.cluster.deploy import serve_on_ray
    from tidegate.cluster.wire import Ingress

    if not re.fullmatch(r"[A-Za-z0-9_-]+", args.ray_app):
        print(f"tidegate: --ray-app must be letters, digits, '_' or '-', got {args.ray_app!r}",
              file=sys.stderr)
        return 2
    try:
        serve_on_ray(config, address=args.ray or None, ingress=Ingress(args.ingress),
                     prefix=args.ray_app)
    except ConfigError as exc:
        print(f"tidegate: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
