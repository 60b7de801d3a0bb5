"""What crosses the process boundary between the ingress and the model replicas, and the pure
decisions about it: Serve application names and each replica's own configuration."""

from __future__ import annotations

import dataclasses
import hashlib
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from tidegate.config import AuthConfig, Config, ModelConfig

__all__ = [
    "APP_PREFIX",
    "Forwarded",
    "Ingress",
    "ReplicaReport",
    "ResponseHead",
    "app_name",
    "calls_per_replica",
    "deploy_order",
    "deployment_options",
    "replica_config",
]

APP_PREFIX = "tidegate"
"""The default name of a deployment (``tidegate serve --ray --ray-app NAME``): its Serve
applications are ``NAME.<model>`` (and ``NAME`` for the ingress, when Serve's proxy is the
ingress), so ``serve status`` shows them together and two deployments can share a cluster."""


class Ingress(StrEnum):
    """Where HTTP requests enter a Ray deployment (``tidegate serve --ray --ingress``)."""

    TIDEGATE = "tidegate"
    """tidegate's own server (uvicorn, httptools) in the ``serve --ray`` process, calling the
    models' deployment handles: the default, measured faster (BENCHMARKS.md)."""
    SERVE = "serve"
    """Serve's HTTP proxy (on the head node) in front of tidegate's ingress app as a
    deployment."""


_SAFE = re.compile(r"[^A-Za-z0-9_.-]")


@dataclass(frozen=True, slots=True)
class Forwarded:
    """One HTTP request, as the ingress hands it to a replica's app."""

    method: str
    path: str
    query_string: bytes
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes


@dataclass(frozen=True, slots=True)
class ResponseHead:
    """A replica's response status and headers (its body follows, whole or as chunks)."""

    status: int
    headers: tuple[tuple[bytes, bytes], ...]


@dataclass(frozen=True, slots=True)
class ReplicaReport:
    """What a replica tells the hub every few seconds: who it is, its model's card as
    ``/v1/models`` shows it, and its metrics in Prometheus text format."""

    replica: str
    model: str
    node: str
    card: Mapping[str, Any]
    metrics: str = ""


def app_name(model_id: str, prefix: str = APP_PREFIX) -> str:
    """The Serve application serving ``model_id``: ``<prefix>.<id>`` with any character Serve
    or a URL would trip on replaced, plus a short hash of the id when one was."""
    safe = _SAFE.sub("_", model_id)
    if safe != model_id:
        safe += "-" + hashlib.sha256(model_id.encode()).hexdigest()[:8]
    return f"{prefix}.{safe}"


def _with_dependencies(config: Config, model_id: str) -> list[ModelConfig]:
    wanted: list[str] = []

    def visit(current: str) -> None:
        model = config.model(current)
        assert model is not None
        for dep in model.depends_on:
            visit(dep)
        if current not in wanted:
            wanted.append(current)

    visit(model_id)
    return [m for m in config.models if m.id in wanted]


def replica_config(config: Config, model_id: str) -> Config:
    """A replica's own config: its model (and the models it depends on, which it loads in
    process first), all eager, with the API keys off (the ingress checks them)."""
    models = tuple(dataclasses.replace(m, preload="eager")
                   for m in _with_dependencies(config, model_id))
    return dataclasses.replace(config, models=models, auth=AuthConfig())


def deploy_order(config: Config) -> list[ModelConfig]:
    """Dependencies before their dependents, then higher ``priority`` first, then file order."""
    ranked = sorted(config.models, key=lambda m: -m.priority)
    done: list[ModelConfig] = []

    def visit(model: ModelConfig) -> None:
        if model in done:
            return
        for dep in model.depends_on:
            found = config.model(dep)
            assert found is not None
            visit(found)
        done.append(model)

    for model in ranked:
        visit(model)
    return done


def _queue_bound(model: ModelConfig) -> int:
    if model.runtime == "causal-lm":
        return model.generation.max_num_seqs + model.generation.max_waiting
    return model.batching.max_queue_items


def calls_per_replica(config: Config, model: ModelConfig) -> int:
    """How many coalesced calls the ingress keeps in flight per replica of ``model``: two (one
    computing, the next on its way), and for an autoscaled model more than its
    ``target_ongoing_requests``, or Serve's autoscaler could never see demand above target."""
    scaling = deployment_options(config, model).get("autoscaling_config")
    if scaling is None:
        return 2
    return max(2, math.floor(float(scaling["target_ongoing_requests"])) + 1)


def deployment_options(config: Config, model: ModelConfig) -> dict[str, Any]:
    """Keyword arguments for ``serve.deployment`` for ``model``'s replicas (see
    :class:`~tidegate.config.ScalingConfig`)."""
    scaling = model.scaling
    actor: dict[str, Any] = {"num_cpus": scaling.num_cpus}
    memory = scaling.memory_bytes if scaling.memory_bytes is not None else model.memory_bytes
    if memory:
        actor["memory"] = memory
    options: dict[str, Any] = {
        "name": "model",
        "ray_actor_options": actor,
        "max_ongoing_requests": scaling.max_ongoing_requests or _queue_bound(model),
        "max_queued_requests": scaling.max_queued_requests,
        "graceful_shutdown_timeout_s": config.server.shutdown_timeout_s,
        "health_check_period_s": 2.0,
        "health_check_timeout_s": 30.0,
    }
    lazy_default = (model.preload == "lazy" and scaling.replicas is None
                    and not scaling.autoscaling)
    if scaling.autoscaling or lazy_default:
        low = 0 if lazy_default else (scaling.min_replicas if scaling.min_replicas is not None
                                      else 1)
        high = 1 if lazy_default else (scaling.max_replicas if scaling.max_replicas is not None
                                       else max(low, 1))
        options["autoscaling_config"] = {
            "min_replicas": low,
            "max_replicas": max(high, low),
            "initial_replicas": low if low else None,
            "target_ongoing_requests": scaling.target_ongoing_requests,
            "upscale_delay_s": scaling.upscale_delay_s,
            "downscale_delay_s": scaling.downscale_delay_s,
            "look_back_period_s": scaling.look_back_period_s,
        }
    else:
        options["num_replicas"] = scaling.replicas or 1
    return options
