"""Typed, validated configuration.

Config objects are frozen, keyword-only value objects that validate themselves. The only code
that reads files is :func:`load_config`, called by the CLI at the edge; library code takes the
objects. Unknown keys and bad values raise :class:`~tidegate.errors.ConfigError` naming them.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from tidegate.configutil import (
    build_dataclass,
    check_choice,
    check_integer,
    check_number,
    require_table,
)
from tidegate.errors import ConfigError
from tidegate.kinds import RuntimeKind
from tidegate.upstream.config import UpstreamConfig

__all__ = [
    "DEFAULT_MODEL_ID",
    "BatchingConfig",
    "CacheConfig",
    "Config",
    "EvictionMode",
    "GenerationConfig",
    "ModelConfig",
    "RuntimeKind",
    "ServerConfig",
    "default_cache_dir",
    "load_config",
]

DEFAULT_MODEL_ID = "all-minilm-l6-v2"
PreloadMode = Literal["eager", "lazy", "predictive"]
EvictionMode = Literal["lru", "lfu"]
LogLevel = Literal["critical", "error", "warning", "info", "debug"]


def default_cache_dir() -> Path:
    """``$TIDEGATE_CACHE_DIR``, else ``$XDG_CACHE_HOME/tidegate``, else ``~/.cache/tidegate``."""
    explicit = os.environ.get("TIDEGATE_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "tidegate"


@dataclass(frozen=True, kw_only=True, slots=True)
class BatchingConfig:
    """How one model's requests are coalesced into batches (see README, "Batching").

    Defaults were chosen by measurement on 2 CPU cores with MiniLM (BENCHMARKS.md): throughput
    saturates near 64 short inputs per batch, and waiting only pays once a batch is computing.
    """

    max_batch_size: int = 64
    """Most inputs in one forward pass."""
    max_batch_tokens: int = 8192
    """Most tokens (sum over inputs) in one forward pass."""
    max_wait_ms: float | None = None
    """How long the oldest queued input may wait for more to join while a batch is computing.
    ``None``: 2 ms for local models, 0.5 ms for remote ones."""
    max_queue_items: int = 4096
    """Inputs queued beyond this are refused with 429 (or ``overload_status``)."""
    target_p99_ms: float | None = None
    """If set, the batch size adapts so queue + compute p99 tracks this target."""
    overload_status: Literal[429, 503] = 429
    """HTTP status for a full queue."""
    max_concurrent_batches: int | None = None
    """Batches computing at once. ``None``: 1 for local models (a CPU runtime already uses every
    core for one batch), 8 for remote ones (the upstream batches too; one call at a time would
    make every request wait for the round trip ahead of it)."""

    def __post_init__(self) -> None:
        check_integer("max_batch_size", self.max_batch_size)
        check_integer("max_batch_tokens", self.max_batch_tokens)
        if self.max_wait_ms is not None:
            check_number("max_wait_ms", self.max_wait_ms, allow_zero=True)
        check_integer("max_queue_items", self.max_queue_items)
        if self.max_concurrent_batches is not None:
            check_integer("max_concurrent_batches", self.max_concurrent_batches)
        if self.target_p99_ms is not None:
            check_number("target_p99_ms", self.target_p99_ms)
        check_choice("overload_status", self.overload_status, (429, 503))

    def resolved(self, *, remote: bool) -> BatchingConfig:
        """This config with the runtime-dependent defaults filled in."""
        return dataclasses.replace(
            self,
            max_wait_ms=(0.5 if remote else 2.0) if self.max_wait_ms is None else self.max_wait_ms,
            max_concurrent_batches=(8 if remote else 1) if self.max_concurrent_batches is None
            else self.max_concurrent_batches,
        )

    @property
    def wait_s(self) -> float:
        return (self.max_wait_ms if self.max_wait_ms is not None else 2.0) / 1000

    @property
    def concurrency(self) -> int:
        return self.max_concurrent_batches or 1


@dataclass(frozen=True, kw_only=True, slots=True)
class GenerationConfig:
    """One causal-LM model's continuous-batching engine (``[models.generation]``)."""

    max_num_seqs: int = 16
    """Sequences in the running decode batch at once."""
    max_prefill_tokens: int = 2048
    """Prompt tokens prefilled per step, over all admitted sequences (one long prompt excepted)."""
    max_waiting: int = 256
    """Sequences waiting for a slot; beyond this, requests get 429 (or ``overload_status``)."""
    stream_buffer: int = 64
    """Deltas buffered per stream before its reader counts as behind."""
    stream_timeout_s: float = 30.0
    """A stream whose reader stays behind this long is aborted and its slot freed."""
    overload_status: Literal[429, 503] = 429
    dtype: Literal["float32", "bfloat16"] = "float32"
    max_context_tokens: int | None = None
    """Context length; ``None`` means the model config's own."""

    def __post_init__(self) -> None:
        check_integer("generation.max_num_seqs", self.max_num_seqs)
        check_integer("generation.max_prefill_tokens", self.max_prefill_tokens)
        check_integer("generation.max_waiting", self.max_waiting)
        check_integer("generation.stream_buffer", self.stream_buffer)
        check_number("generation.stream_timeout_s", self.stream_timeout_s)
        check_choice("generation.overload_status", self.overload_status, (429, 503))
        check_choice("generation.dtype", self.dtype, ("float32", "bfloat16"))
        if self.max_context_tokens is not None:
            check_integer("generation.max_context_tokens", self.max_context_tokens)


@dataclass(frozen=True, kw_only=True, slots=True)
class ModelConfig:
    """One served model."""

    id: str
    runtime: RuntimeKind = RuntimeKind.EMBEDDING
    source: str | None = None
    """``embedding``: a local model directory (``None``: the bundled all-MiniLM-L6-v2).
    ``python``: ``"package.module:ClassName"``."""
    max_input_tokens: int | None = None
    """Truncate inputs to this many tokens; ``None`` means the model's own limit."""
    intra_op_threads: int | None = None
    """Threads one forward pass may use; ``None`` means every core."""
    depends_on: tuple[str, ...] = ()
    """Models loaded before this one and kept loaded while it is."""
    priority: int = 0
    """Eager preloading order (higher first)."""
    preload: PreloadMode = "eager"
    """``eager``: load at start; ``lazy``: on first request; ``predictive``: also when the
    request history predicts it is next."""
    keep_alive_s: float = 0.0
    """Idle seconds before the model may be evicted; -1 means never evict."""
    memory_bytes: int | None = None
    """Estimated size, used to make room before loading; the measured size replaces it."""
    options: Mapping[str, Any] = field(default_factory=dict)
    """Keyword arguments for a ``python`` model's class."""
    upstream: UpstreamConfig | None = None
    """For ``remote`` models: the replicas and how to reach them."""
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    """For ``causal-lm`` models: the engine's limits."""
    batching: BatchingConfig = field(default_factory=BatchingConfig)

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not self.id.strip():
            raise ConfigError(f"models.id must be a non-empty string, got {self.id!r}")
        where = f"models[{self.id}]"
        check_choice(f"{where}.runtime", self.runtime, tuple(k.value for k in RuntimeKind))
        object.__setattr__(self, "runtime", RuntimeKind(self.runtime))
        if self.source is not None and not isinstance(self.source, str):
            raise ConfigError(f"{where}.source must be a string")
        if self.runtime == "causal-lm" and not self.source:
            raise ConfigError(f"{where}.source must be a local model directory for causal-lm")
        if self.runtime == "python" and (not self.source or ":" not in self.source):
            raise ConfigError(f"{where}.source must be 'module:ClassName' for a python model")
        if isinstance(self.depends_on, list):
            object.__setattr__(self, "depends_on", tuple(self.depends_on))
        if not all(isinstance(d, str) for d in self.depends_on):
            raise ConfigError(f"{where}.depends_on must be a list of model ids")
        if isinstance(self.priority, bool) or not isinstance(self.priority, int):
            raise ConfigError(f"{where}.priority must be an integer")
        check_choice(f"{where}.preload", self.preload, get_args(PreloadMode))
        if isinstance(self.keep_alive_s, bool) or not isinstance(self.keep_alive_s, int | float) \
                or (self.keep_alive_s < 0 and self.keep_alive_s != -1):
            raise ConfigError(f"{where}.keep_alive_s must be >= 0 or -1, got {self.keep_alive_s!r}")
        if self.memory_bytes is not None:
            check_integer(f"{where}.memory_bytes", self.memory_bytes, minimum=0)
        if not isinstance(self.options, Mapping):
            raise ConfigError(f"{where}.options must be a table")
        if (self.runtime == "remote") != (self.upstream is not None):
            raise ConfigError(f"{where}: 'upstreams' is required for, and only for, remote models")
        if self.max_input_tokens is not None:
            check_integer(f"models[{self.id}].max_input_tokens", self.max_input_tokens)
        if self.intra_op_threads is not None:
            check_integer(f"models[{self.id}].intra_op_threads", self.intra_op_threads)
            if self.runtime != "embedding":
                raise ConfigError(
                    f"{where}.intra_op_threads applies only to embedding (ONNX Runtime) models; "
                    "causal-lm models use torch's process-wide thread pool (set "
                    "OMP_NUM_THREADS before starting tidegate)"
                )


@dataclass(frozen=True, kw_only=True, slots=True)
class ServerConfig:
    """The HTTP front."""

    host: str = "127.0.0.1"
    port: int = 8000
    log_level: LogLevel = "info"
    max_body_bytes: int = 8 * 1024 * 1024
    max_inputs_per_request: int = 2048
    request_timeout_s: float = 60.0
    """A request still queued or computing after this gets 504 and its queued inputs are dropped."""
    cache_dir: str | None = None
    """Where exported model graphs are kept; ``None`` means :func:`default_cache_dir`."""
    access_log: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.host, str) or not self.host:
            raise ConfigError(f"server.host must be a non-empty string, got {self.host!r}")
        check_integer("server.port", self.port, minimum=0)
        if self.port > 65535:
            raise ConfigError(f"server.port must be <= 65535, got {self.port}")
        check_choice("server.log_level", self.log_level, get_args(LogLevel))
        check_integer("server.max_body_bytes", self.max_body_bytes)
        check_integer("server.max_inputs_per_request", self.max_inputs_per_request)
        check_number("server.request_timeout_s", self.request_timeout_s)
        if not isinstance(self.access_log, bool):
            raise ConfigError(f"server.access_log must be true or false, got {self.access_log!r}")

    def resolved_cache_dir(self) -> Path:
        return Path(self.cache_dir) if self.cache_dir else default_cache_dir()


@dataclass(frozen=True, kw_only=True, slots=True)
class CacheConfig:
    """The set of loaded models as a cache (``[cache]``)."""

    max_memory_bytes: int | None = None
    """Budget for the measured size of all loaded models; ``None``: unbounded."""
    max_loaded_models: int | None = None
    max_concurrent_loads: int = 2
    load_timeout_s: float = 300.0
    admin_token: str | None = None
    """If set, /admin routes need ``Authorization: Bearer <token>``; otherwise loopback only."""
    predictive_threshold: float = 0.3
    """A ``predictive`` model is preloaded when P(next | current) is at least this."""
    eviction: EvictionMode = "lru"
    """Which idle model goes first when room is needed. ``lru``: the least recently used.
    ``lfu``: the one with the lowest request count, decayed exponentially with
    ``frequency_half_life_s`` (ties: the least recently used); under skewed, stable popularity it
    keeps the popular models loaded through bursts of one-off requests. Leases, keep-alive and
    dependencies protect models the same way under both."""
    frequency_half_life_s: float = 600.0
    """For ``lfu``: seconds over which a model's request count halves, so a model that was
    popular and is no longer becomes evictable."""

    def __post_init__(self) -> None:
        if self.max_memory_bytes is not None:
            check_integer("cache.max_memory_bytes", self.max_memory_bytes)
        if self.max_loaded_models is not None:
            check_integer("cache.max_loaded_models", self.max_loaded_models)
        check_integer("cache.max_concurrent_loads", self.max_concurrent_loads)
        check_number("cache.load_timeout_s", self.load_timeout_s)
        if self.admin_token is not None and (
            not isinstance(self.admin_token, str) or not self.admin_token
        ):
            raise ConfigError("cache.admin_token must be a non-empty string")
        check_number("cache.predictive_threshold", self.predictive_threshold)
        check_choice("cache.eviction", self.eviction, get_args(EvictionMode))
        check_number("cache.frequency_half_life_s", self.frequency_half_life_s)


def _default_models() -> tuple[ModelConfig, ...]:
    return (ModelConfig(id=DEFAULT_MODEL_ID),)


@dataclass(frozen=True, kw_only=True, slots=True)
class Config:
    """Everything ``tidegate serve`` needs."""

    server: ServerConfig = field(default_factory=ServerConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    models: tuple[ModelConfig, ...] = field(default_factory=_default_models)

    def __post_init__(self) -> None:
        if not self.models:
            raise ConfigError("at least one [[models]] entry is required")
        seen: set[str] = set()
        for model in self.models:
            if model.id in seen:
                raise ConfigError(f"model id '{model.id}' is configured twice")
            seen.add(model.id)
        for model in self.models:
            for dep in model.depends_on:
                if dep not in seen:
                    raise ConfigError(f"model '{model.id}' depends on unknown model '{dep}'")
        cycle = _find_cycle({m.id: m.depends_on for m in self.models})
        if cycle:
            raise ConfigError(f"dependency cycle: {' -> '.join(cycle)}")

    def model(self, model_id: str) -> ModelConfig | None:
        return next((m for m in self.models if m.id == model_id), None)


def _find_cycle(graph: Mapping[str, Sequence[str]]) -> list[str] | None:
    """A dependency cycle as a path that starts and ends at the same id, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for dep in graph.get(node, ()):
            if state.get(dep) == 1:
                return [*path[path.index(dep):], dep]
            if dep not in state and (found := visit(dep)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in graph:
        if node not in state and (found := visit(node)):
            return found
    return None


def _build_model(data: object, index: int) -> ModelConfig:
    if not isinstance(data, Mapping):
        raise ConfigError(f"models[{index}] must be a table")
    values = dict(data)
    upstream = dict(require_table(values.pop("upstream", {}), f"models[{index}].upstream"))
    for key, target in (("upstreams", "replicas"), ("upstream_model", "model"),
                        ("api_key_env", "api_key_env"), ("api_key", "api_key")):
        if key in values:
            upstream[target] = values.pop(key)
    if upstream:
        values["upstream"] = UpstreamConfig.from_mapping(upstream, where=f"models[{index}]")
    if "batching" in values:
        values["batching"] = build_dataclass(
            BatchingConfig, values["batching"], f"models[{index}].batching"
        )
    if "generation" in values:
        values["generation"] = build_dataclass(
            GenerationConfig, values["generation"], f"models[{index}].generation"
        )
    model: ModelConfig = build_dataclass(ModelConfig, values, f"models[{index}]")
    return model


def load_config(path: str | Path | None = None, **server_overrides: Any) -> Config:
    """Read ``tidegate.toml`` (if given) and apply CLI overrides (``None`` values are ignored)."""
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise ConfigError(f"config file not found: {path}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
    unknown = sorted(set(raw) - {"server", "cache", "models"})
    if unknown:
        raise ConfigError(f"unknown top-level key(s) in config: {', '.join(unknown)}")
    server_table = dict(raw.get("server", {}))
    server_table.update({k: v for k, v in server_overrides.items() if v is not None})
    server: ServerConfig = build_dataclass(ServerConfig, server_table, "[server]")
    cache: CacheConfig = build_dataclass(CacheConfig, raw.get("cache", {}), "[cache]")
    models_raw = raw.get("models")
    if models_raw is None:
        return Config(server=server, cache=cache)
    if not isinstance(models_raw, list):
        raise ConfigError("models must be an array of tables ([[models]])")
    models = tuple(_build_model(m, i) for i, m in enumerate(models_raw))
    return Config(server=server, cache=cache, models=models)
