from __future__ import annotations

import pytest

from tidegate.errors import ConfigError
from tidegate.upstream.config import PoolConfig, UpstreamConfig


def test_from_mapping_builds_nested_sections_and_normalizes_urls() -> None:
    config = UpstreamConfig.from_mapping({
        "upstreams": ["http://127.0.0.1:9001/", "https://gpu-2.internal:8443/openai"],
        "upstream_model": "meta-llama/Llama-3.1-8B-Instruct",
        "api_key_env": "VLLM_API_KEY",
        "timeouts": {"connect_s": 1, "read_s": 30, "pool_s": 0.5},
        "pool": {"max_connections": 8, "max_connection_age_s": 60},
        "health": {"path": "/health/ready", "interval_s": 2},
        "retry": {"max_retries": 1, "budget_ratio": 0.1},
    })
    assert config.upstreams == ("http://127.0.0.1:9001", "https://gpu-2.internal:8443/openai")
    assert config.pool.max_connections == 8
    assert config.timeouts.pool_s == 0.5
    assert config.health.path == "/health/ready"
    assert config.retry.max_retries == 1


@pytest.mark.parametrize(("table", "message"), [
    ({"upstreams": []}, "at least one"),
    ({"upstreams": "http://a:1"}, "list of URLs"),
    ({"upstreams": ["ftp://a:1"]}, "http:// or https://"),
    ({"upstreams": ["http://user:pw@a:1"]}, "credentials"),
    ({"upstreams": ["http://a:1", "http://a:1/"]}, "listed twice"),
    ({"upstreams": ["http://a:1"], "api_key": "sk-123"}, "do not belong in config files"),
    ({"upstreams": ["http://a:1"], "api_key_env": "sk-123"}, "name an environment variable"),
    ({"upstreams": ["http://a:1"], "pool": {"max_conns": 3}}, r"^pool\.max_conns: unknown key"),
    ({"upstreams": ["http://a:1"], "health": {"path": "health"}}, "must start with '/'"),
    ({"upstreams": ["http://a:1"], "timeouts": {"pool_s": 0}}, r"^timeouts\.pool_s: must be > 0"),
    ({"upstreams": ["http://a:1"], "retry": {"max_retries": -1}},
     r"^retry\.max_retries: must be >= 0"),
    ({"upstreams": ["http://a:1", 7]}, r"^upstreams\[1\]: must be a URL string"),
    ({"upstream_model": "x"}, "^upstreams: is required"),
])
def test_invalid_tables_are_refused_with_the_key_named(table: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        UpstreamConfig.from_mapping(table)


def test_errors_name_the_full_place_when_given_one() -> None:
    with pytest.raises(ConfigError) as caught:
        UpstreamConfig.from_mapping({"upstreams": ["http://a:1"], "pool": {"max_connections": 0}},
                                    where="models[3]", sections_at="models[3].upstream")
    assert str(caught.value) == "models[3].upstream.pool.max_connections: must be >= 1, got 0"
    assert caught.value.key == "models[3].upstream.pool.max_connections"
    with pytest.raises(ConfigError, match=r"^models\[3\]\.upstreams: must name at least one"):
        UpstreamConfig.from_mapping({"upstreams": []}, where="models[3]")


def test_api_key_is_read_from_the_named_variable_only() -> None:
    config = UpstreamConfig(upstreams=("http://a:1",), api_key_env="TG_TEST_KEY")
    assert config.api_key({"TG_TEST_KEY": "secret"}) == "secret"
    with pytest.raises(ConfigError, match=r"TG_TEST_KEY .* is not set"):
        config.api_key({})
    assert UpstreamConfig(upstreams=("http://a:1",)).api_key({"TG_TEST_KEY": "x"}) is None
    assert "secret" not in repr(config)


def test_config_objects_are_frozen_and_keyword_only() -> None:
    with pytest.raises(TypeError):
        PoolConfig(8)  # type: ignore[call-arg]
    with pytest.raises(AttributeError):
        PoolConfig().max_connections = 3  # type: ignore[misc]
