from __future__ import annotations

from pathlib import Path

import pytest

from tidegate.config import DEFAULT_MODEL_ID, BatchingConfig, Config, ModelConfig, load_config
from tidegate.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "tidegate.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_serve_the_bundled_model_on_loopback() -> None:
    config = load_config(None)
    assert config.server.host == "127.0.0.1"
    assert config.server.port == 8000
    assert config.server.max_inputs_per_request == 2048
    assert config.server.max_body_bytes == 8 * 1024 * 1024
    assert [m.id for m in config.models] == [DEFAULT_MODEL_ID]


def test_cli_overrides_win_over_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[server]\nport = 9000\nhost = '0.0.0.0'\n")
    config = load_config(path, port=9100, host=None)
    assert config.server.port == 9100
    assert config.server.host == "0.0.0.0"


def test_models_and_batching_are_read(tmp_path: Path) -> None:
    path = write(tmp_path, """
[[models]]
id = "a"
runtime = "echo"
[models.batching]
max_batch_size = 8
target_p99_ms = 50
overload_status = 503
""")
    (model,) = load_config(path).models
    assert model == ModelConfig(
        id="a", runtime="echo",
        batching=BatchingConfig(max_batch_size=8, target_p99_ms=50, overload_status=503),
    )


def test_cache_eviction_policy_is_read(tmp_path: Path) -> None:
    default = load_config(None).cache
    assert (default.eviction, default.frequency_half_life_s) == ("lru", 600.0)
    path = write(tmp_path, "[cache]\neviction = 'lfu'\nfrequency_half_life_s = 3600\n")
    cache = load_config(path).cache
    assert (cache.eviction, cache.frequency_half_life_s) == ("lfu", 3600)


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("[server]\nprot = 1\n", "prot"),
        ("[servr]\n", "servr"),
        ("[[models]]\nid = 'a'\nsauce = 'x'\n", "sauce"),
        ("[[models]]\nid = 'a'\n[models.batching]\nmax_batch = 3\n", "max_batch"),
        ("[server]\nport = 'eighty'\n", "server.port"),
        ("[server]\nport = 70000\n", "server.port"),
        ("[server]\nlog_level = 'loud'\n", "server.log_level"),
        ("[[models]]\nid = 'a'\nruntime = 'magic'\n", "runtime"),
        ("[[models]]\nid = 'a'\n[models.batching]\nmax_batch_size = 0\n", "max_batch_size"),
        ("[[models]]\nid = 'a'\n[models.batching]\noverload_status = 500\n", "overload_status"),
        ("[[models]]\nid = 'a'\n[[models]]\nid = 'a'\n", "twice"),
        ("[[models]]\nruntime = 'echo'\n", "id"),
        ("not toml at all [", "not valid TOML"),
        ("[cache]\neviction = 'lifo'\n", "cache.eviction must be one of 'lru', 'lfu'"),
        ("[cache]\nfrequency_half_life_s = 0\n", "cache.frequency_half_life_s must be > 0"),
        ("[cache]\nfrequency_half_life_s = 'long'\n",
         "cache.frequency_half_life_s must be a number"),
        ("[[models]]\nid = 'a'\nruntime = 'echo'\nintra_op_threads = 2\n",
         "intra_op_threads applies only to embedding"),
    ],
)
def test_bad_config_names_the_key(tmp_path: Path, text: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        load_config(write(tmp_path, text))


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "absent.toml")


def test_config_objects_are_frozen_and_keyword_only() -> None:
    config = Config()
    with pytest.raises(AttributeError):
        config.server = config.server  # type: ignore[misc]
    with pytest.raises(TypeError):
        BatchingConfig(8)  # type: ignore[misc]


def test_cli_reports_config_errors_and_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tidegate.cli import main

    path = write(tmp_path, "[server]\nbogus = 1\n")
    assert main(["serve", "--config", str(path)]) == 2
    assert "bogus" in capsys.readouterr().err
