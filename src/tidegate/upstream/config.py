"""Configuration of a model served by remote OpenAI-compatible replicas.

Frozen, keyword-only, self-validating value objects, like :mod:`tidegate.config`; field names
are the TOML keys. The API key is never part of the configuration: ``api_key_env`` names the
environment variable that holds it, and :meth:`UpstreamConfig.api_key` reads it at the edge,
from the mapping it is given. This module imports no HTTP client, so the configuration loads
without one.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from tidegate.configutil import (
    build_dataclass,
    check_integer,
    check_number,
    place,
    require_table,
)
from tidegate.errors import ConfigError

__all__ = [
    "HealthConfig",
    "PoolConfig",
    "RetryConfig",
    "UpstreamConfig",
    "UpstreamTimeouts",
]

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True, kw_only=True, slots=True)
class UpstreamTimeouts:
    """Seconds allowed for each phase of one attempt on one replica."""

    connect_s: float = 5.0
    read_s: float = 120.0
    """Longest silence from the replica once the request is being sent (so it also bounds
    sending the body) and between two reads; a stream that stalls longer fails with 504."""
    pool_s: float = 5.0
    """Longest wait for a free connection to one replica before answering 503."""

    def __post_init__(self) -> None:
        for name in ("connect_s", "read_s", "pool_s"):
            check_number(name, getattr(self, name))


@dataclass(frozen=True, kw_only=True, slots=True)
class PoolConfig:
    """The connection pool kept to each replica."""

    max_connections: int = 100
    """Most connections (so most concurrent requests, over HTTP/1.1) to one replica."""
    keepalive_expiry_s: float = 60.0
    """An idle connection is closed after this long; 0 closes every connection after its
    request (no keep-alive)."""
    max_connection_age_s: float | None = 300.0
    """A connection older than this is closed once its current request ends, so load moves to
    new replica processes behind a DNS name or load balancer; ``None`` keeps connections."""

    def __post_init__(self) -> None:
        check_integer("max_connections", self.max_connections, minimum=1)
        check_number("keepalive_expiry_s", self.keepalive_expiry_s, allow_zero=True)
        if self.max_connection_age_s is not None:
            check_number("max_connection_age_s", self.max_connection_age_s)


@dataclass(frozen=True, kw_only=True, slots=True)
class HealthConfig:
    """Active checks (a periodic GET) and passive ones (failures of real requests)."""

    path: str | None = "/health"
    """Checked with GET every ``interval_s``; 2xx passes. E.g. ``/health``, ``/health/ready``,
    ``/v1/models``. ``None`` turns active checks off."""
    interval_s: float = 5.0
    timeout_s: float = 2.0
    unhealthy_after: int = 2
    """Consecutive failed checks that eject a replica."""
    healthy_after: int = 1
    """Consecutive passing checks that re-admit an ejected replica."""
    eject_after_failures: int = 5
    """Consecutive failed requests (connect errors, timeouts, 5xx) that eject a replica;
    0 turns passive ejection off."""
    ejection_s: float = 30.0
    """With active checks off, how long a passively ejected replica stays out."""

    def __post_init__(self) -> None:
        if self.path is not None and (not isinstance(self.path, str) or
                                      not self.path.startswith("/")):
            raise ConfigError(f"must start with '/', got {self.path!r}", key="path")
        check_number("interval_s", self.interval_s)
        check_number("timeout_s", self.timeout_s)
        check_integer("unhealthy_after", self.unhealthy_after, minimum=1)
        check_integer("healthy_after", self.healthy_after, minimum=1)
        check_integer("eject_after_failures", self.eject_after_failures, minimum=0)
        check_number("ejection_s", self.ejection_s)


@dataclass(frozen=True, kw_only=True, slots=True)
class RetryConfig:
    """Retries of connect errors and 502/503/504, each on another replica.

    The budget is a token bucket: every request adds ``budget_ratio`` tokens (up to
    ``budget_burst``), every retry spends one. Retries therefore add at most ``budget_ratio``
    extra load when every replica is failing, instead of multiplying it.
    """

    max_retries: int = 2
    budget_ratio: float = 0.2
    budget_burst: float = 10.0

    def __post_init__(self) -> None:
        check_integer("max_retries", self.max_retries, minimum=0)
        check_number("budget_ratio", self.budget_ratio, allow_zero=True)
        check_number("budget_burst", self.budget_burst, allow_zero=True)


def _normalized_replica(url: object, key: str) -> str:
    if not isinstance(url, str):
        raise ConfigError(f"must be a URL string, got {url!r}", key=key)
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{url!r} must be an http:// or https:// URL with a host", key=key)
    if parts.username is not None or parts.password is not None:
        raise ConfigError(
            f"{url!r} has credentials in its URL; put the key in an environment variable and "
            "name it in api_key_env", key=key,
        )
    if parts.query or parts.fragment:
        raise ConfigError(f"{url!r} must not have a query or fragment", key=key)
    try:
        parts.port  # noqa: B018 - validates the port number
    except ValueError as exc:
        raise ConfigError(f"{url!r} has an invalid port", key=key) from exc
    return url.rstrip("/")


@dataclass(frozen=True, kw_only=True, slots=True)
class UpstreamConfig:
    """One model served by one or more remote OpenAI-compatible replicas."""

    upstreams: tuple[str, ...]
    """The replicas' base URLs, e.g. ``http://10.0.0.5:8000``; request paths (``/v1/...``) are
    appended."""
    upstream_model: str | None = None
    """The model name the replicas know; ``None`` means tidegate's model id."""
    api_key_env: str | None = None
    """The environment variable holding the replicas' API key (sent as a Bearer token)."""
    timeouts: UpstreamTimeouts = field(default_factory=UpstreamTimeouts)
    pool: PoolConfig = field(default_factory=PoolConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    retry: RetryConfig = field(default_factory=RetryConfig)

    def __post_init__(self) -> None:
        if isinstance(self.upstreams, str) or not isinstance(self.upstreams, tuple | list):
            raise ConfigError(f"must be a list of URLs, got {self.upstreams!r}", key="upstreams")
        if not self.upstreams:
            raise ConfigError("must name at least one replica URL", key="upstreams")
        normalized = tuple(_normalized_replica(url, f"upstreams[{i}]")
                           for i, url in enumerate(self.upstreams))
        duplicates = sorted({url for url in normalized if normalized.count(url) > 1})
        if duplicates:
            raise ConfigError(f"replica listed twice: {', '.join(duplicates)}", key="upstreams")
        object.__setattr__(self, "upstreams", normalized)
        if self.upstream_model is not None and (
            not isinstance(self.upstream_model, str) or not self.upstream_model.strip()
        ):
            raise ConfigError(f"must be a non-empty string, got {self.upstream_model!r}",
                              key="upstream_model")
        if self.api_key_env is not None and (
            not isinstance(self.api_key_env, str) or not _ENV_NAME.fullmatch(self.api_key_env)
        ):
            raise ConfigError(
                "must name an environment variable (e.g. 'VLLM_API_KEY'), not hold the key "
                "itself", key="api_key_env",
            )

    def api_key(self, environ: Mapping[str, str]) -> str | None:
        """The API key from ``environ`` (pass ``os.environ`` at the edge), or ``None``.

        Raises :class:`ConfigError` if ``api_key_env`` is set but the variable is unset or empty.
        """
        if self.api_key_env is None:
            return None
        key = environ.get(self.api_key_env, "")
        if not key:
            raise ConfigError(
                f"environment variable {self.api_key_env} (api_key_env) is not set; "
                "export the upstream's API key in it"
            )
        return key

    @classmethod
    def from_mapping(cls, data: object, *, where: str = "",
                     sections_at: str | None = None) -> UpstreamConfig:
        """Build from a TOML table, refusing unknown keys (and a literal ``api_key``).

        ``where`` is the table's place in the file, for messages; ``sections_at`` is where the
        section tables (``timeouts``, ``pool``, ``health``, ``retry``) sit, when elsewhere (a
        model's sections are under ``models[i].upstream``).
        """
        table = require_table(data, where)
        sections_at = where if sections_at is None else sections_at
        if "api_key" in table:
            raise ConfigError(
                "is not accepted: API keys do not belong in config files. Export the key in an "
                f"environment variable and set {place(where, 'api_key_env')} to its name.",
                key=place(where, "api_key"),
            )
        values = dict(table)
        for key, kind in SECTIONS.items():
            if key in values:
                values[key] = build_dataclass(kind, values[key], place(sections_at, key))
        if isinstance(values.get("upstreams"), list):
            values["upstreams"] = tuple(values["upstreams"])
        config: UpstreamConfig = build_dataclass(cls, values, where)
        return config


SECTIONS: dict[str, type[Any]] = {
    "timeouts": UpstreamTimeouts, "pool": PoolConfig, "health": HealthConfig, "retry": RetryConfig,
}
"""The section tables of an upstream, by key."""
