"""The pure decisions of ``tidegate serve --ray``: names, deploy order, each replica's config,
Serve's deployment options from ``[models.scaling]``, and that table's validation."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from tidegate.cluster.wire import (
    app_name,
    calls_per_replica,
    deploy_order,
    deployment_options,
    replica_config,
)
from tidegate.config import Config, ScalingConfig, load_config
from tidegate.errors import ConfigError


def _config(tmp_path: Path, text: str) -> Config:
    path = tmp_path / "tidegate.toml"
    path.write_text(text, encoding="utf-8")
    return load_config(path)


MODELS = """
[[auth.keys]]
id = "a"
hash = "sha256:5e4fbb0ab8ab2b4ee3c9aabd3ec09fd2b1b8e4cb3ed9d6b4b9ff1f52a8d2e8f4"

[[models]]
id = "base"
memory_bytes = 1000

[[models]]
id = "top"
depends_on = ["base"]
preload = "predictive"
[models.scaling]
replicas = 3
num_cpus = 0.5

[[models]]
id = "urgent"
priority = 5
preload = "lazy"

[[models]]
id = "auto"
[models.batching]
max_queue_items = 100
[models.scaling]
min_replicas = 1
max_replicas = 4
target_ongoing_requests = 2.5
upscale_delay_s = 1
"""


def test_app_names_are_safe_and_distinct() -> None:
    assert app_name("all-minilm-l6-v2") == "tidegate.all-minilm-l6-v2"
    assert app_name("m", "team") == "team.m"
    odd = app_name("org/model:v1")
    prefix = "tidegate.org_model_v1-"
    assert odd.startswith(prefix) and len(odd) == len(prefix) + 8
    assert app_name("org/model:v1") != app_name("org_model_v1")


def test_deploy_order_is_dependencies_first_then_priority(tmp_path: Path) -> None:
    config = _config(tmp_path, MODELS)
    assert [m.id for m in deploy_order(config)] == ["urgent", "base", "top", "auto"]


def test_a_replica_config_has_its_model_and_dependencies_eager_without_keys(
        tmp_path: Path) -> None:
    config = _config(tmp_path, MODELS)
    replica = replica_config(config, "top")
    assert [(m.id, m.preload) for m in replica.models] == [("base", "eager"), ("top", "eager")]
    assert config.auth.api_keys and not replica.auth.api_keys
    assert replica.server == config.server


def test_deployment_options_follow_scaling(tmp_path: Path) -> None:
    config = _config(tmp_path, MODELS)
    base, top, urgent, auto = (config.model(i) for i in ("base", "top", "urgent", "auto"))
    assert base and top and urgent and auto
    fixed = deployment_options(config, top)
    assert fixed["num_replicas"] == 3 and "autoscaling_config" not in fixed
    assert fixed["ray_actor_options"] == {"num_cpus": 0.5}
    assert fixed["max_ongoing_requests"] == 4096  # the model's own queue bound
    assert deployment_options(config, base)["ray_actor_options"] == {"num_cpus": 1.0,
                                                                     "memory": 1000}
    lazy = deployment_options(config, urgent)["autoscaling_config"]
    assert (lazy["min_replicas"], lazy["max_replicas"], lazy["initial_replicas"]) == (0, 1, None)
    scaled = deployment_options(config, auto)
    assert "num_replicas" not in scaled
    assert scaled["autoscaling_config"]["min_replicas"] == 1
    assert scaled["autoscaling_config"]["max_replicas"] == 4
    assert scaled["autoscaling_config"]["upscale_delay_s"] == 1
    assert scaled["max_ongoing_requests"] == 100


def test_calls_in_flight_let_the_autoscaler_see_demand_above_target(tmp_path: Path) -> None:
    config = _config(tmp_path, MODELS)
    top, auto = config.model("top"), config.model("auto")
    assert top and auto
    assert calls_per_replica(config, top) == 2
    # Serve wants N+1 replicas only when calls in flight exceed target * N.
    assert calls_per_replica(config, auto) == 3 > auto.scaling.target_ongoing_requests


@pytest.mark.parametrize(("values", "key"), [
    ({"replicas": 2, "min_replicas": 1}, "replicas"),
    ({"min_replicas": 3, "max_replicas": 2}, "min_replicas"),
    ({"min_replicas": 1, "target_ongoing_requests": math.nan}, "target_ongoing_requests"),
    ({"min_replicas": 1, "upscale_delay_s": math.inf}, "upscale_delay_s"),
    ({"replicas": 2, "downscale_delay_s": 5}, "downscale_delay_s"),
    ({"replicas": 0}, "replicas"),
    ({"num_cpus": -1}, "num_cpus"),
    ({"max_queued_requests": 0}, "max_queued_requests"),
])
def test_bad_scaling_is_refused_naming_the_key(values: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        ScalingConfig(**values)  # type: ignore[arg-type]
    assert caught.value.key == key


def test_scaling_errors_name_their_place_in_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"models\[0\]\.scaling\.min_replicas"):
        _config(tmp_path, "[[models]]\nid = \"m\"\n[models.scaling]\nmin_replicas = 3\n"
                          "max_replicas = 1\n")
