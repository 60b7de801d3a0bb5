from __future__ import annotations

import pytest

from tidegate.errors import ConfigError
from tidegate.upstream.config import PoolConfig, UpstreamConfig


def test_from_mapping_builds_nested_sections_and_normalizes_urls() -> None:
    config = UpstreamConfig.from_mapping({
        "replicas": ["http://127.0.0.1:9001/", "https://gpu-2.internal:8443/openai"],
        "model": "meta-llama/Llama-3.1-8B-Instruct",
        "api_key_env": "VLLM_API_KEY",
        "timeouts": {"connect_s": 1, "read_s": 30, "pool_s": 0.5},
        "pool": {"max_connections": 8, "max_connection_age_s": 60},
        "health": {"path": "/health/ready", "interval_s": 2},
        "retry": {"max_retries": 1, "budget_ratio": 0.1},
    })
    assert config.replicas == ("http://127.0.0.1:9001", "https://gpu-2.internal:8443/openai")
    assert config.pool.max_connections == 8
    assert config.timeouts.pool_s == 0.5
    assert config.health.path == "/health/ready"
    assert config.retry.max_retries == 1


@pytest.mark.parametrize(("table", "message"), [
    ({"replicas": []}, "at least one"),
    ({"replicas": "http://a:1"}, "list of URLs"),
    ({"replicas": ["ftp://a:1"]}, "http:// or https://"),
    ({"replicas": ["http://user:pw@a:1"]}, "credentials"),
    ({"replicas": ["http://a:1", "http://a:1/"]}, "listed twice"),
    ({"replicas": ["http://a:1"], "api_key": "sk-123"}, "do not belong in config files"),
    ({"replicas": ["http://a:1"], "api_key_env": "sk-123"}, "name an environment variable"),
    ({"replicas": ["http://a:1"], "pool": {"max_conns": 3}}, "unknown key in upstream.pool"),
    ({"replicas": ["http://a:1"], "health": {"path": "health"}}, "must start with '/'"),
    ({"replicas": ["http://a:1"], "timeouts": {"pool_s": 0}}, "pool_s must be > 0"),
    ({"replicas": ["http://a:1"], "retry": {"max_retries": -1}}, "max_retries must be >= 0"),
])
def test_invalid_tables_are_refused_with_the_key_named(table: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        UpstreamConfig.from_mapping(table)


def test_api_key_is_read_from_the_named_variable_only() -> None:
    config = UpstreamConfig(replicas=("http://a:1",), api_key_env="TG_TEST_KEY")
    assert config.api_key({"TG_TEST_KEY": "secret"}) == "secret"
    with pytest.raises(ConfigError, match=r"TG_TEST_KEY .* is not set"):
        config.api_key({})
    assert UpstreamConfig(replicas=("http://a:1",)).api_key({"TG_TEST_KEY": "x"}) is None
    assert "secret" not in repr(config)


def test_config_objects_are_frozen_and_keyword_only() -> None:
    with pytest.raises(TypeError):
        PoolConfig(8)  # type: ignore[call-arg]
    with pytest.raises(AttributeError):
        PoolConfig().max_connections = 3  # type: ignore[misc]
