"""Typed, validated configuration.

Config objects are frozen, keyword-only value objects that validate themselves. The only code
that reads files is :func:`load_config`, called by the CLI at the edge; library code takes the
objects. Unknown keys and bad values raise :class:`~tidegate.errors.ConfigError` naming them by
their full place in the file (``models[2].batching.max_batch_size: must be >= 1, got 0``); each
dataclass names its own fields and :func:`~tidegate.configutil.build_dataclass` adds the place.
Every default is written once: in its field, or, for the batching settings that differ between
local and remote models, in :data:`LOCAL_BATCHING` and :data:`REMOTE_BATCHING`.

One module although above 400 lines: the sections' dataclasses and the one function that reads
the file change together whenever a key is added, moved or renamed.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
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
    place,
    require_table,
)
from tidegate.engines import (
    DEFAULT_MAX_SCORE_ERROR,
    DEFAULT_MIN_COSINE,
    Backend,
    Precision,
    Weights,
)
from tidegate.errors import ConfigError
from tidegate.kinds import RuntimeKind
from tidegate.upstream.config import SECTIONS as UPSTREAM_SECTIONS
from tidegate.upstream.config import UpstreamConfig

__all__ = [
    "BACKENDS",
    "DEFAULT_MODEL_ID",
    "LOCAL_BATCHING",
    "PRECISIONS",
    "REMOTE_BATCHING",
    "ApiKeyConfig",
    "AuthConfig",
    "BatchingConfig",
    "BatchingDefaults",
    "CacheConfig",
    "Config",
    "EvictionMode",
    "GenerationConfig",
    "LogLevel",
    "ModelConfig",
    "RuntimeKind",
    "ScalingConfig",
    "ServerConfig",
    "check_precisions",
    "default_cache_dir",
    "load_config",
]

DEFAULT_MODEL_ID = "all-minilm-l6-v2"
PreloadMode = Literal["eager", "lazy", "predictive"]
EvictionMode = Literal["lru", "lfu"]
LogLevel = Literal["critical", "error", "warning", "info", "debug"]


BACKENDS: Mapping[RuntimeKind, tuple[Backend, ...]] = {
    RuntimeKind.EMBEDDING: (Backend.AUTO, Backend.OPENVINO, Backend.ONNXRUNTIME),
    RuntimeKind.CAUSAL_LM: (Backend.AUTO, Backend.OPENVINO, Backend.TORCH),
    RuntimeKind.CROSS_ENCODER: (Backend.AUTO, Backend.OPENVINO, Backend.ONNXRUNTIME),
}
"""The ``backend`` values each runtime accepts; the others take only ``auto``."""
PRECISIONS: Mapping[RuntimeKind, tuple[Precision, ...]] = {
    RuntimeKind.EMBEDDING: (Precision.AUTO, Precision.FP32, Precision.BF16),
    RuntimeKind.CAUSAL_LM: (Precision.AUTO, Precision.FP32, Precision.BF16),
    RuntimeKind.CROSS_ENCODER: (Precision.AUTO, Precision.FP32, Precision.BF16),
}
"""The ``precision`` values each runtime accepts."""


def check_precisions(config: Config, *, bf16_supported: bool) -> None:
    """Refuse at start-up an explicit ``precision = "bf16"`` that this CPU cannot compute on
    OpenVINO (torch computes bf16 on any CPU, slowly)."""
    if bf16_supported:
        return
    for index, model in enumerate(config.models):
        if model.precision is Precision.BF16 and model.backend is not Backend.TORCH:
            raise ConfigError(
                "'bf16' needs a CPU with bf16 instructions (AVX512-BF16 or AMX) and this one "
                "has none; use 'auto' or 'fp32'", key=f"models[{index}].precision",
            )


def default_cache_dir() -> Path:
    """``$TIDEGATE_CACHE_DIR``, else ``$XDG_CACHE_HOME/tidegate``, else ``~/.cache/tidegate``."""
    explicit = os.environ.get("TIDEGATE_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "tidegate"


@dataclass(frozen=True, kw_only=True, slots=True)
class BatchingDefaults:
    """The batching settings whose default depends on where the model computes."""

    max_wait_ms: float
    max_concurrent_batches: int


LOCAL_BATCHING = BatchingDefaults(max_wait_ms=2.0, max_concurrent_batches=1)
"""A CPU runtime already uses every core for one batch, so one batch computes at a time."""
REMOTE_BATCHING = BatchingDefaults(max_wait_ms=0.5, max_concurrent_batches=8)
"""The upstream batches too; one call at a time would make every request wait for the round
trip ahead of it."""


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
    ``None``: :data:`LOCAL_BATCHING` or :data:`REMOTE_BATCHING`'s, by the model's runtime."""
    max_queue_items: int = 4096
    """Inputs queued beyond this are refused with 429 (or ``overload_status``)."""
    max_queue_wait_ms: float | None = None
    """If set, a request is also refused when it would have its results later than this after
    its arrival (the batch computing now, whole batches ahead and its own, each timed by its
    size as batches run now, slow ones allowed for; README, "Overload and cancellation"): a
    bound in time that tightens by itself when the server slows (a busy CPU), where
    ``max_queue_items`` stays fixed. An idle model takes any request."""
    target_p99_ms: float | None = None
    """If set, the batch size adapts so queue + compute p99 tracks this target."""
    overload_status: Literal[429, 503] = 429
    """HTTP status for a full queue."""
    max_concurrent_batches: int | None = None
    """Batches computing at once. ``None``: :data:`LOCAL_BATCHING` or :data:`REMOTE_BATCHING`'s,
    by the model's runtime."""

    def __post_init__(self) -> None:
        check_integer("max_batch_size", self.max_batch_size)
        check_integer("max_batch_tokens", self.max_batch_tokens)
        if self.max_wait_ms is not None:
            check_number("max_wait_ms", self.max_wait_ms, allow_zero=True)
        check_integer("max_queue_items", self.max_queue_items)
        if self.max_queue_wait_ms is not None:
            check_number("max_queue_wait_ms", self.max_queue_wait_ms)
            if not math.isfinite(self.max_queue_wait_ms):
                raise ConfigError(f"must be finite, got {self.max_queue_wait_ms!r}",
                                  key="max_queue_wait_ms")
        if self.max_concurrent_batches is not None:
            check_integer("max_concurrent_batches", self.max_concurrent_batches)
        if self.target_p99_ms is not None:
            check_number("target_p99_ms", self.target_p99_ms)
        check_choice("overload_status", self.overload_status, (429, 503))

    def resolved(self, *, remote: bool) -> BatchingConfig:
        """This config with the runtime-dependent defaults filled in."""
        defaults = REMOTE_BATCHING if remote else LOCAL_BATCHING
        return dataclasses.replace(
            self,
            max_wait_ms=defaults.max_wait_ms if self.max_wait_ms is None else self.max_wait_ms,
            max_concurrent_batches=defaults.max_concurrent_batches
            if self.max_concurrent_batches is None else self.max_concurrent_batches,
        )

    @property
    def wait_s(self) -> float:
        """``max_wait_ms`` in seconds; an unresolved config counts as a local model's."""
        wait_ms = LOCAL_BATCHING.max_wait_ms if self.max_wait_ms is None else self.max_wait_ms
        return wait_ms / 1000

    @property
    def concurrency(self) -> int:
        """``max_concurrent_batches``; an unresolved config counts as a local model's."""
        if self.max_concurrent_batches is None:
            return LOCAL_BATCHING.max_concurrent_batches
        return self.max_concurrent_batches


@dataclass(frozen=True, kw_only=True, slots=True)
class GenerationConfig:
    """One causal-LM model's continuous-batching engine (``[models.generation]``)."""

    max_num_seqs: int = 16
    """Sequences in the running decode batch at once."""
    max_prefill_tokens: int = 2048
    """Prompt tokens prefilled per step, over all admitted sequences (one long prompt excepted)."""
    max_waiting: int = 256
    """Sequences waiting for a slot; beyond this, requests get 429 (or ``overload_status``)."""
    max_queue_wait_ms: float | None = None
    """If set, a request is also refused when it is expected to end later than this after its
    arrival: the running and waiting sequences ahead holding the slots for their expected
    tokens (the mean completion so far), then its own (at most its ``max_tokens``), at the step
    time measured now (the gaps between steps included), scaled by the 99th percentile of recent
    sequences' actual over expected time. A request that finds a slot free is taken."""
    stream_buffer: int = 64
    """Deltas buffered per stream before its reader counts as behind."""
    stream_timeout_s: float = 30.0
    """A stream whose reader stays behind this long is aborted and its slot freed."""
    overload_status: Literal[429, 503] = 429
    max_context_tokens: int | None = None
    """Context length; ``None`` means the model config's own."""
    kv_cache_bytes: int | None = None
    """OpenVINO backend: the KV cache, allocated at load and counted in the model's memory.
    ``None``: room for ``max_num_seqs`` sequences of the full context."""
    pipeline_process: bool | None = None
    """OpenVINO backend: run the pipeline in a child process (its step holds the GIL, which in
    the server's own process stops the event loop while it computes). ``None``: a child
    process when the model's ``intra_op_threads`` leaves cores free for the event loop."""

    def __post_init__(self) -> None:
        if self.pipeline_process is not None and not isinstance(self.pipeline_process, bool):
            raise ConfigError(f"must be true or false, got {self.pipeline_process!r}",
                              key="pipeline_process")
        check_integer("max_num_seqs", self.max_num_seqs)
        check_integer("max_prefill_tokens", self.max_prefill_tokens)
        check_integer("max_waiting", self.max_waiting)
        if self.max_queue_wait_ms is not None:
            check_number("max_queue_wait_ms", self.max_queue_wait_ms)
            if not math.isfinite(self.max_queue_wait_ms):
                raise ConfigError(f"must be finite, got {self.max_queue_wait_ms!r}",
                                  key="max_queue_wait_ms")
        check_integer("stream_buffer", self.stream_buffer)
        check_number("stream_timeout_s", self.stream_timeout_s)
        check_choice("overload_status", self.overload_status, (429, 503))
        if self.max_context_tokens is not None:
            check_integer("max_context_tokens", self.max_context_tokens)
        if self.kv_cache_bytes is not None:
            check_integer("kv_cache_bytes", self.kv_cache_bytes)


_AUTOSCALING_KNOBS = ("target_ongoing_requests", "upscale_delay_s", "downscale_delay_s",
                      "look_back_period_s")


@dataclass(frozen=True, kw_only=True, slots=True)
class ScalingConfig:
    """One model's replicas on Ray Serve (``[models.scaling]``; ``tidegate serve --ray`` only,
    a single-process server ignores it). Give ``replicas`` for a fixed count, or
    ``min_replicas`` / ``max_replicas`` for Serve's autoscaler; neither: one replica, or for a
    ``preload = "lazy"`` model, 0 to 1 (scaled from zero on its first request)."""

    replicas: int | None = None
    """A fixed number of replicas (no autoscaling)."""
    min_replicas: int | None = None
    """Autoscaling: the fewest replicas (0: scale to zero when idle)."""
    max_replicas: int | None = None
    """Autoscaling: the most replicas."""
    target_ongoing_requests: float = 2.0
    """Autoscaling: the requests in flight per replica the autoscaler steers toward."""
    upscale_delay_s: float = 30.0
    """Autoscaling: how long demand must stay above target before a replica is added."""
    downscale_delay_s: float = 600.0
    """Autoscaling: how long demand must stay below target before a replica is removed."""
    look_back_period_s: float = 30.0
    """Autoscaling: the window over which requests in flight are averaged."""
    num_cpus: float = 1.0
    """CPUs each replica reserves from Ray (a fraction lets replicas share a node's cores)."""
    memory_bytes: int | None = None
    """Memory each replica reserves from Ray; ``None``: the model's ``memory_bytes`` if set."""
    max_ongoing_requests: int | None = None
    """Requests one replica takes at once (beyond it, they wait at the ingress). ``None``:
    the model's own queue bound (``max_queue_items``, or ``max_num_seqs + max_waiting``)."""
    max_queued_requests: int = 1024
    """Requests waiting at the ingress for a replica; beyond it, 503 with Retry-After."""

    def __post_init__(self) -> None:
        if self.replicas is not None:
            check_integer("replicas", self.replicas)
            if self.min_replicas is not None or self.max_replicas is not None:
                raise ConfigError("give either 'replicas' (a fixed count) or 'min_replicas' / "
                                  "'max_replicas' (autoscaling), not both", key="replicas")
        if self.min_replicas is not None:
            check_integer("min_replicas", self.min_replicas, minimum=0)
        if self.max_replicas is not None:
            check_integer("max_replicas", self.max_replicas)
        if (self.min_replicas is not None and self.max_replicas is not None
                and self.min_replicas > self.max_replicas):
            raise ConfigError(f"must be <= max_replicas ({self.max_replicas}), got "
                              f"{self.min_replicas}", key="min_replicas")
        for name in ("target_ongoing_requests", "upscale_delay_s", "downscale_delay_s",
                     "look_back_period_s", "num_cpus"):
            check_number(name, getattr(self, name), allow_zero=name == "num_cpus")
            if not math.isfinite(getattr(self, name)):
                raise ConfigError(f"must be finite, got {getattr(self, name)!r}", key=name)
        if self.replicas is not None:
            defaults = {f.name: f.default for f in dataclasses.fields(ScalingConfig)}
            for name in _AUTOSCALING_KNOBS:
                if getattr(self, name) != defaults[name]:
                    raise ConfigError("applies only to an autoscaled model (min_replicas / "
                                      "max_replicas), not one with a fixed 'replicas'", key=name)
        if self.memory_bytes is not None:
            check_integer("memory_bytes", self.memory_bytes)
        if self.max_ongoing_requests is not None:
            check_integer("max_ongoing_requests", self.max_ongoing_requests)
        check_integer("max_queued_requests", self.max_queued_requests)

    @property
    def autoscaling(self) -> bool:
        return self.min_replicas is not None or self.max_replicas is not None


@dataclass(frozen=True, kw_only=True, slots=True)
class ModelConfig:
    """One served model."""

    id: str
    runtime: RuntimeKind = RuntimeKind.EMBEDDING
    source: str | None = None
    """``embedding``: a local model directory (``None``: the bundled all-MiniLM-L6-v2).
    ``causal-lm``, ``cross-encoder``: a local model directory (required).
    ``python``: ``"package.module:ClassName"``."""
    max_input_tokens: int | None = None
    """Truncate inputs to this many tokens; ``None`` means the model's own limit."""
    intra_op_threads: int | None = None
    """Threads one forward pass may use; ``None`` means every core."""
    backend: Backend = Backend.AUTO
    """The engine (see :data:`BACKENDS` for each runtime's choices): embedding models run on
    OpenVINO (``auto`` on x86) or ONNX Runtime; causal LMs on OpenVINO GenAI (``auto``: if the
    model exports and passes the load-time probe) or tidegate's torch engine."""
    precision: Precision = Precision.AUTO
    """``auto``: bf16 where the backend and CPU compute it natively, else fp32."""
    weights: Weights = Weights.ORIGINAL
    """Causal LMs on OpenVINO: ``int8`` stores linear layers' weights in int8 (smaller, faster
    decoding; checked by the load-time probe with a wider tolerance)."""
    min_cosine: float = DEFAULT_MIN_COSINE
    """Reduced precision is kept only if every load-time probe vector stays this close to fp32."""
    max_score_error: float = DEFAULT_MAX_SCORE_ERROR
    """Cross-encoders: reduced precision is kept only if every load-time probe score (raw
    logit) stays within this absolute difference of fp32."""
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
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    """On Ray Serve (``tidegate serve --ray``): this model's replicas and their resources."""

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not self.id.strip():
            raise ConfigError(f"must be a non-empty string, got {self.id!r}", key="id")
        check_choice("runtime", self.runtime, tuple(k.value for k in RuntimeKind))
        object.__setattr__(self, "runtime", RuntimeKind(self.runtime))
        if self.source is not None and not isinstance(self.source, str):
            raise ConfigError(f"must be a string, got {self.source!r}", key="source")
        if self.runtime in ("causal-lm", "cross-encoder") and not self.source:
            raise ConfigError(f"must be a local model directory for {self.runtime}",
                              key="source")
        if self.runtime == "python" and (not self.source or ":" not in self.source):
            raise ConfigError("must be 'module:ClassName' for a python model", key="source")
        if isinstance(self.depends_on, list):
            object.__setattr__(self, "depends_on", tuple(self.depends_on))
        if not all(isinstance(d, str) for d in self.depends_on):
            raise ConfigError("must be a list of model ids", key="depends_on")
        if isinstance(self.priority, bool) or not isinstance(self.priority, int):
            raise ConfigError(f"must be an integer, got {self.priority!r}", key="priority")
        check_choice("preload", self.preload, get_args(PreloadMode))
        if isinstance(self.keep_alive_s, bool) or not isinstance(self.keep_alive_s, int | float) \
                or (self.keep_alive_s < 0 and self.keep_alive_s != -1):
            raise ConfigError(f"must be >= 0 or -1, got {self.keep_alive_s!r}",
                              key="keep_alive_s")
        if self.memory_bytes is not None:
            check_integer("memory_bytes", self.memory_bytes, minimum=0)
        if not isinstance(self.options, Mapping):
            raise ConfigError("must be a table", key="options")
        if self.runtime == "remote" and self.upstream is None:
            raise ConfigError("is required for a remote model: its replicas' base URLs",
                              key="upstreams")
        if self.runtime != "remote" and self.upstream is not None:
            raise ConfigError(f"applies only to remote models, not {self.runtime}",
                              key="upstreams")
        self._check_engine()
        if self.max_input_tokens is not None:
            check_integer("max_input_tokens", self.max_input_tokens)
        if self.intra_op_threads is not None:
            check_integer("intra_op_threads", self.intra_op_threads)
            torch_lm = self.runtime == "causal-lm" and self.backend is Backend.TORCH
            if self.runtime not in ("embedding", "cross-encoder", "causal-lm") or torch_lm:
                raise ConfigError(
                    "applies only to embedding, cross-encoder and causal-lm models on OpenVINO; "
                    "the torch engine uses torch's process-wide thread pool (set "
                    "OMP_NUM_THREADS before starting tidegate)", key="intra_op_threads",
                )


    def _check_engine(self) -> None:
        backends = BACKENDS.get(self.runtime, (Backend.AUTO,))
        check_choice("backend", self.backend, tuple(b.value for b in backends))
        object.__setattr__(self, "backend", Backend(self.backend))
        precisions = PRECISIONS.get(self.runtime, (Precision.AUTO,))
        check_choice("precision", self.precision, tuple(p.value for p in precisions))
        object.__setattr__(self, "precision", Precision(self.precision))
        if self.precision is Precision.BF16 and self.backend is Backend.ONNXRUNTIME:
            raise ConfigError(
                "'bf16' needs backend 'openvino' (or 'auto'); onnxruntime computes in fp32",
                key="precision",
            )
        if self.weights == "int4":
            raise ConfigError("'int4' is not offered (it needs NNCF's calibrated compression); "
                              "use 'int8' or 'original'", key="weights")
        check_choice("weights", self.weights, tuple(w.value for w in Weights))
        object.__setattr__(self, "weights", Weights(self.weights))
        if self.weights is Weights.INT8 and (self.runtime != "causal-lm"
                                             or self.backend is Backend.TORCH):
            raise ConfigError("'int8' applies only to causal-lm models on OpenVINO "
                              "(backend 'auto' or 'openvino')", key="weights")
        if isinstance(self.min_cosine, bool) or not isinstance(self.min_cosine, int | float) \
                or not 0 < self.min_cosine <= 1:
            raise ConfigError(f"must be a number in (0, 1], got {self.min_cosine!r}",
                              key="min_cosine")
        if isinstance(self.max_score_error, bool) \
                or not isinstance(self.max_score_error, int | float) or self.max_score_error <= 0:
            raise ConfigError(f"must be a number > 0, got {self.max_score_error!r}",
                              key="max_score_error")


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
    drain_grace_s: float = 5.0
    """After SIGTERM/SIGINT: seconds the listener stays open, answering 503 ``shutting_down``
    (and readiness 503), so a load balancer stops routing here before connections are refused."""
    shutdown_timeout_s: float = 30.0
    """After SIGTERM/SIGINT: what is still running this long after the signal is cut (a stream
    gets a final error event, any other request 503 ``shutting_down``)."""
    header_timeout_s: float = 10.0
    """A client must send a request's line and headers within this (from the first byte, or from
    connecting, or from the end of the answer before it if that came later); else 408 and the
    connection is closed."""
    body_timeout_s: float = 30.0
    """A client must send a request's whole body within this after its headers; else 408."""
    max_connections: int = 1024
    """Open connections beyond this are answered 503 (``code: too_many_connections``) and closed."""

    def __post_init__(self) -> None:
        if not isinstance(self.host, str) or not self.host:
            raise ConfigError(f"must be a non-empty string, got {self.host!r}", key="host")
        check_integer("port", self.port, minimum=0)
        if self.port > 65535:
            raise ConfigError(f"must be <= 65535, got {self.port}", key="port")
        check_choice("log_level", self.log_level, get_args(LogLevel))
        check_integer("max_body_bytes", self.max_body_bytes)
        check_integer("max_inputs_per_request", self.max_inputs_per_request)
        check_number("request_timeout_s", self.request_timeout_s)
        check_number("drain_grace_s", self.drain_grace_s, allow_zero=True)
        check_number("shutdown_timeout_s", self.shutdown_timeout_s)
        check_number("header_timeout_s", self.header_timeout_s)
        check_number("body_timeout_s", self.body_timeout_s)
        check_integer("max_connections", self.max_connections)
        if not isinstance(self.access_log, bool):
            raise ConfigError(f"must be true or false, got {self.access_log!r}", key="access_log")

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
            check_integer("max_memory_bytes", self.max_memory_bytes)
        if self.max_loaded_models is not None:
            check_integer("max_loaded_models", self.max_loaded_models)
        check_integer("max_concurrent_loads", self.max_concurrent_loads)
        check_number("load_timeout_s", self.load_timeout_s)
        check_number("predictive_threshold", self.predictive_threshold)
        check_choice("eviction", self.eviction, get_args(EvictionMode))
        check_number("frequency_half_life_s", self.frequency_half_life_s)


_HASH = re.compile(r"sha256:[0-9a-f]{64}")


@dataclass(frozen=True, kw_only=True, slots=True)
class ApiKeyConfig:
    """One API key (``[[auth.keys]]``), known only by the SHA-256 of its secret."""

    id: str
    """The name in logs and metrics (``tidegate_api_key_requests_total{key="team-a"}``)."""
    hash: str
    """``"sha256:<64 hex digits>"``: the SHA-256 of the key (``tidegate keys create``)."""
    models: tuple[str, ...] | None = None
    """The models this key may use; ``None``: every model."""
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    """Prompt + completion tokens, counted after each request from its usage."""

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not self.id.strip() \
                or not self.id.isprintable():
            raise ConfigError(f"must be a non-empty printable string, got {self.id!r}", key="id")
        # Never echo the value: a key pasted here by mistake must not reach the log.
        if not isinstance(self.hash, str) or not _HASH.fullmatch(self.hash.lower()):
            raise ConfigError(
                "must be 'sha256:' followed by the 64 hex digits of the key's SHA-256 (never "
                "the key itself; `tidegate keys create` prints the line)", key="hash",
            )
        object.__setattr__(self, "hash", self.hash.lower())
        if self.models is not None:
            if not isinstance(self.models, list | tuple) or not all(
                isinstance(m, str) and m for m in self.models
            ):
                raise ConfigError("must be a list of model ids", key="models")
            object.__setattr__(self, "models", tuple(self.models))
        if self.requests_per_minute is not None:
            check_integer("requests_per_minute", self.requests_per_minute)
        if self.tokens_per_minute is not None:
            check_integer("tokens_per_minute", self.tokens_per_minute)

    @property
    def digest(self) -> bytes:
        """The SHA-256 of the key, as bytes."""
        return bytes.fromhex(self.hash.removeprefix("sha256:"))


@dataclass(frozen=True, kw_only=True, slots=True)
class AuthConfig:
    """Who may call what (``[auth]``)."""

    admin_token: str | None = None
    """If set, /admin routes need ``Authorization: Bearer <token>``; otherwise loopback only."""
    keys: tuple[ApiKeyConfig, ...] = ()
    """``[[auth.keys]]``. With any key (here or in ``keys_file``), every ``/v1`` route needs
    ``Authorization: Bearer <key>``."""
    keys_file: str | None = None
    """A TOML file of ``[[keys]]`` entries, read at start-up (relative: to the config file)."""
    file_keys: tuple[ApiKeyConfig, ...] = ()
    """The entries read from ``keys_file`` (:func:`load_config` fills it)."""
    protect_metrics: bool = False
    """If true, ``/metrics`` and ``/openapi.json`` need ``Authorization: Bearer`` with an API key
    or the admin token (401 otherwise), and one of them must be configured. Off by default, as
    in vLLM and TEI: many Prometheus scrapers cannot send a token. The metrics name key ids and
    model ids, never a key."""

    def __post_init__(self) -> None:
        if self.admin_token is not None and (
            not isinstance(self.admin_token, str) or not self.admin_token
        ):
            raise ConfigError(f"must be a non-empty string, got {self.admin_token!r}",
                              key="admin_token")
        if not isinstance(self.protect_metrics, bool):
            raise ConfigError(f"must be true or false, got {self.protect_metrics!r}",
                              key="protect_metrics")
        if self.protect_metrics and self.admin_token is None and not self.api_keys:
            raise ConfigError("needs an API key ([[auth.keys]] or keys_file) or admin_token "
                              "to let a scraper in", key="protect_metrics")
        if self.file_keys and self.keys_file is None:
            raise ConfigError("file_keys come from keys_file, which is not set", key="keys_file")
        ids: dict[str, str] = {}
        hashes: dict[str, str] = {}
        for where, key in self.places():
            if key.id in ids:
                raise ConfigError(f"{key.id!r} is configured twice (also {ids[key.id]})",
                                  key=f"{where}.id")
            if key.hash in hashes:
                raise ConfigError(f"is the same key as {hashes[key.hash]}", key=f"{where}.hash")
            ids[key.id] = hashes[key.hash] = where

    @property
    def api_keys(self) -> tuple[ApiKeyConfig, ...]:
        """Every API key: ``[[auth.keys]]``, then ``keys_file``'s."""
        return self.keys + self.file_keys

    def places(self) -> list[tuple[str, ApiKeyConfig]]:
        """Each key with its place, for messages (``auth.keys[0]``, ``keys.toml: keys[1]``)."""
        return [(f"auth.keys[{i}]", k) for i, k in enumerate(self.keys)] + [
            (f"{self.keys_file}: keys[{i}]", k) for i, k in enumerate(self.file_keys)
        ]


def _default_models() -> tuple[ModelConfig, ...]:
    return (ModelConfig(id=DEFAULT_MODEL_ID),)


@dataclass(frozen=True, kw_only=True, slots=True)
class Config:
    """Everything ``tidegate serve`` needs."""

    server: ServerConfig = field(default_factory=ServerConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    models: tuple[ModelConfig, ...] = field(default_factory=_default_models)

    def __post_init__(self) -> None:
        if not self.models:
            raise ConfigError("at least one [[models]] entry is required", key="models")
        first: dict[str, int] = {}
        for index, model in enumerate(self.models):
            if model.id in first:
                raise ConfigError(
                    f"{model.id!r} is configured twice (also models[{first[model.id]}])",
                    key=f"models[{index}].id",
                )
            first[model.id] = index
        for index, model in enumerate(self.models):
            for dep in model.depends_on:
                if dep not in first:
                    raise ConfigError(f"unknown model {dep!r}", key=f"models[{index}].depends_on")
        cycle = _find_cycle({m.id: m.depends_on for m in self.models})
        if cycle:
            raise ConfigError(f"dependency cycle: {' -> '.join(cycle)}", key="models")
        for where, key in self.auth.places():
            for model_id in key.models or ():
                if model_id not in first:
                    raise ConfigError(f"unknown model {model_id!r}", key=f"{where}.models")

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


_UPSTREAM_KEYS = ("upstreams", "upstream_model", "api_key_env", "api_key")
"""A remote model's upstream keys that sit in its own table (its sections are under
``[models.upstream]``)."""


def _build_model(data: object, index: int) -> ModelConfig:
    where = f"models[{index}]"
    values = dict(require_table(data, where))
    sections = dict(require_table(values.pop("upstream", {}), f"{where}.upstream"))
    misplaced = sorted(set(sections) - set(UPSTREAM_SECTIONS))
    if misplaced:
        raise ConfigError(f"unknown key (known: {', '.join(sorted(UPSTREAM_SECTIONS))}; "
                          f"{', '.join(k for k in _UPSTREAM_KEYS if k != 'api_key')} go in "
                          f"{where} itself)", key=f"{where}.upstream.{misplaced[0]}")
    upstream = {key: values.pop(key) for key in _UPSTREAM_KEYS if key in values}
    if upstream or sections:
        if "upstreams" not in upstream:
            raise ConfigError("is required with any other upstream setting",
                              key=place(where, "upstreams"))
        values["upstream"] = UpstreamConfig.from_mapping(
            {**upstream, **sections}, where=where, sections_at=f"{where}.upstream"
        )
    if "batching" in values:
        values["batching"] = build_dataclass(
            BatchingConfig, values["batching"], f"{where}.batching"
        )
    if "scaling" in values:
        values["scaling"] = build_dataclass(ScalingConfig, values["scaling"], f"{where}.scaling")
    if "generation" in values:
        if isinstance(values["generation"], Mapping) and "dtype" in values["generation"]:
            raise ConfigError(
                "was replaced by the model's 'precision' (\"fp32\" or \"bf16\", beside "
                "'backend' in [[models]]); move it there", key=f"{where}.generation.dtype")
        values["generation"] = build_dataclass(
            GenerationConfig, values["generation"], f"{where}.generation"
        )
    model: ModelConfig = build_dataclass(ModelConfig, values, where)
    return model


def _check_moved_keys(raw: Mapping[str, Any]) -> None:
    cache = raw.get("cache")
    if isinstance(cache, Mapping) and "admin_token" in cache:
        raise ConfigError("has moved to [auth] admin_token; move the line there",
                          key="cache.admin_token")


_AUTH_KEYS = ("admin_token", "keys", "keys_file", "protect_metrics")


def _build_keys(entries: object, where: str) -> tuple[ApiKeyConfig, ...]:
    if not isinstance(entries, list):
        raise ConfigError("must be an array of tables", key=where)
    return tuple(build_dataclass(ApiKeyConfig, entry, f"{where}[{i}]")
                 for i, entry in enumerate(entries))


def _build_auth(data: object, config_path: Path | None) -> AuthConfig:
    values = dict(require_table(data, "auth"))
    unknown = sorted(set(values) - set(_AUTH_KEYS))
    if unknown:
        raise ConfigError(f"unknown key (known: {', '.join(_AUTH_KEYS)})", key=f"auth.{unknown[0]}")
    values["keys"] = _build_keys(values.get("keys", []), "auth.keys")
    keys_file = values.get("keys_file")
    if keys_file is not None:
        if not isinstance(keys_file, str) or not keys_file:
            raise ConfigError(f"must be a path, got {keys_file!r}", key="auth.keys_file")
        resolved = Path(keys_file)
        if not resolved.is_absolute() and config_path is not None:
            resolved = config_path.parent / resolved
        values["keys_file"] = str(resolved)
        try:
            raw = tomllib.loads(resolved.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"cannot read {resolved}: {exc.strerror}",
                              key="auth.keys_file") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{resolved} is not valid TOML: {exc}", key="auth.keys_file") from exc
        unknown = sorted(set(raw) - {"keys"})
        if unknown:
            raise ConfigError("unknown top-level key (known: keys)",
                              key=f"{resolved}: {unknown[0]}")
        values["file_keys"] = _build_keys(raw.get("keys", []), f"{resolved}: keys")
    try:
        return AuthConfig(**values)
    except ConfigError as exc:
        # The keys' own messages already carry their full place.
        if exc.key in ("admin_token", "protect_metrics"):
            raise exc.within("auth") from exc
        raise


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
    unknown = sorted(set(raw) - {"server", "cache", "auth", "models"})
    if unknown:
        raise ConfigError("unknown top-level key (known: auth, cache, models, server)",
                          key=unknown[0])
    _check_moved_keys(raw)
    server_table = dict(require_table(raw.get("server", {}), "server"))
    server_table.update({k: v for k, v in server_overrides.items() if v is not None})
    sections: dict[str, Any] = {
        "server": build_dataclass(ServerConfig, server_table, "server"),
        "cache": build_dataclass(CacheConfig, raw.get("cache", {}), "cache"),
        "auth": _build_auth(raw.get("auth", {}), None if path is None else Path(path)),
    }
    models_raw = raw.get("models")
    if models_raw is None:
        return Config(**sections)
    if not isinstance(models_raw, list):
        raise ConfigError("must be an array of tables ([[models]])", key="models")
    models = tuple(_build_model(m, i) for i, m in enumerate(models_raw))
    return Config(**sections, models=models)
