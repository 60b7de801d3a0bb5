from __future__ import annotations

import re
from pathlib import Path

import pytest

from tidegate.config import (
    DEFAULT_MODEL_ID,
    LOCAL_BATCHING,
    REMOTE_BATCHING,
    AuthConfig,
    BatchingConfig,
    Config,
    ModelConfig,
    check_precisions,
    load_config,
)
from tidegate.engines import Backend, Precision
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


def test_drain_settings_are_read_and_checked(tmp_path: Path) -> None:
    default = load_config(None).server
    assert (default.drain_grace_s, default.shutdown_timeout_s) == (5.0, 30.0)
    server = load_config(write(tmp_path, "[server]\ndrain_grace_s = 0\nshutdown_timeout_s = 2.5\n"
                               )).server
    assert (server.drain_grace_s, server.shutdown_timeout_s) == (0, 2.5)
    for text, message in [
        ("drain_grace_s = -1", "server.drain_grace_s: must be >= 0, got -1"),
        ("shutdown_timeout_s = 0", "server.shutdown_timeout_s: must be > 0, got 0"),
        ("shutdown_timeout_s = 'soon'", "server.shutdown_timeout_s: must be a number, got 'soon'"),
    ]:
        with pytest.raises(ConfigError) as info:
            load_config(write(tmp_path, f"[server]\n{text}\n"))
        assert str(info.value) == message


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
        ("[cache]\neviction = 'lifo'\n", "cache.eviction: must be one of 'lru', 'lfu'"),
        ("[cache]\nfrequency_half_life_s = 0\n", "cache.frequency_half_life_s: must be > 0"),
        ("[cache]\nfrequency_half_life_s = 'long'\n",
         "cache.frequency_half_life_s: must be a number"),
        ("[[models]]\nid = 'a'\nruntime = 'echo'\nintra_op_threads = 2\n",
         r"models\[0\]\.intra_op_threads: applies only to embedding"),
    ],
)
def test_bad_config_names_the_key(tmp_path: Path, text: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        load_config(write(tmp_path, text))


ECHO = "[[models]]\nid = 'm{i}'\nruntime = 'echo'\n"
REMOTE = "[[models]]\nid = 'r'\nruntime = 'remote'\nupstreams = ['http://a:1']\n"


@pytest.mark.parametrize(
    ("models", "message"),
    [
        ("[models.batching]\nmax_batch_size = 0\n",
         "models[2].batching.max_batch_size: must be >= 1, got 0"),
        ("[models.batching]\nmax_wait_ms = -1\n",
         "models[2].batching.max_wait_ms: must be >= 0, got -1"),
        ("[models.batching]\nmax_batch = 3\n",
         "models[2].batching.max_batch: unknown key (known: max_batch_size, max_batch_tokens, "
         "max_concurrent_batches, max_queue_items, max_queue_wait_ms, max_wait_ms, "
         "overload_status, target_p99_ms)"),
        ("[models.generation]\nmax_num_seqs = 0\n",
         "models[2].generation.max_num_seqs: must be >= 1, got 0"),
        ("priority = 'high'\n", "models[2].priority: must be an integer, got 'high'"),
        ("upstreams = ['http://a:1']\n",
         "models[2].upstreams: applies only to remote models, not echo"),
    ],
)
def test_errors_in_a_model_name_its_index_and_key(tmp_path: Path, models: str,
                                                  message: str) -> None:
    text = ECHO.format(i=0) + ECHO.format(i=1) + ECHO.format(i=2) + models
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text))
    assert str(caught.value) == message


@pytest.mark.parametrize(
    ("upstream", "message"),
    [
        ("[models.upstream.pool]\nmax_connections = 0\n",
         "models[1].upstream.pool.max_connections: must be >= 1, got 0"),
        ("[models.upstream.health]\npath = 'health'\n",
         "models[1].upstream.health.path: must start with '/', got 'health'"),
        ("[models.upstream]\nupstreams = ['http://b:2']\n",
         "models[1].upstream.upstreams: unknown key (known: health, pool, retry, timeouts; "
         "upstreams, upstream_model, api_key_env go in models[1] itself)"),
        ("api_key = 'sk-1'\n", "models[1].api_key: is not accepted"),
        ("upstream_model = ''\n", "models[1].upstream_model: must be a non-empty string"),
    ],
)
def test_errors_in_an_upstream_name_its_model_index_and_key(
    tmp_path: Path, upstream: str, message: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, ECHO.format(i=0) + REMOTE + upstream))
    assert str(caught.value).startswith(message)


def test_upstream_keys_have_one_spelling(tmp_path: Path) -> None:
    text = REMOTE + "upstream_model = 'served'\napi_key_env = 'KEY'\n" \
        "[models.upstream.retry]\nmax_retries = 1\n"
    (model,) = load_config(write(tmp_path, text)).models
    assert model.upstream is not None
    assert model.upstream.upstreams == ("http://a:1",)
    assert model.upstream.upstream_model == "served"
    assert model.upstream.api_key_env == "KEY"
    assert model.upstream.retry.max_retries == 1
    bad = REMOTE.replace("upstreams = ['http://a:1']\n", "")
    with pytest.raises(ConfigError, match=re.escape("models[0].upstreams: is required")):
        load_config(write(tmp_path, bad))


def test_cross_model_errors_name_the_model_by_index(tmp_path: Path) -> None:
    twice = ECHO.format(i=0) + ECHO.format(i=0)
    with pytest.raises(ConfigError, match=re.escape("models[1].id: 'm0' is configured twice")):
        load_config(write(tmp_path, twice))
    unknown = ECHO.format(i=0) + "depends_on = ['nope']\n"
    with pytest.raises(ConfigError, match=re.escape("models[0].depends_on: unknown model 'nope'")):
        load_config(write(tmp_path, unknown))


def test_admin_token_is_read_from_auth(tmp_path: Path) -> None:
    assert load_config(None).auth == AuthConfig(admin_token=None)
    config = load_config(write(tmp_path, "[auth]\nadmin_token = 's3cret'\n"))
    assert config.auth.admin_token == "s3cret"
    with pytest.raises(ConfigError, match=re.escape("auth.admin_token: must be a non-empty")):
        load_config(write(tmp_path, "[auth]\nadmin_token = ''\n"))
    with pytest.raises(ConfigError, match=re.escape("auth.tokens: unknown key")):
        load_config(write(tmp_path, "[auth]\ntokens = []\n"))


def test_admin_token_in_cache_says_where_it_moved(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, "[cache]\nadmin_token = 's3cret'\n"))
    assert str(caught.value) == (
        "cache.admin_token: has moved to [auth] admin_token; move the line there"
    )


def test_batching_defaults_resolve_by_runtime_in_one_place() -> None:
    unset = BatchingConfig()
    local, remote = unset.resolved(remote=False), unset.resolved(remote=True)
    assert (local.max_wait_ms, local.max_concurrent_batches) == (
        LOCAL_BATCHING.max_wait_ms, LOCAL_BATCHING.max_concurrent_batches)
    assert (remote.max_wait_ms, remote.max_concurrent_batches) == (
        REMOTE_BATCHING.max_wait_ms, REMOTE_BATCHING.max_concurrent_batches)
    assert (unset.wait_s, unset.concurrency) == (local.wait_s, local.concurrency)
    given = BatchingConfig(max_wait_ms=7.0, max_concurrent_batches=3).resolved(remote=True)
    assert (given.max_wait_ms, given.max_concurrent_batches) == (7.0, 3)


def readme_toml_blocks() -> list[str]:
    readme = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")
    return re.findall(r"```toml\n(.*?)```", readme, flags=re.DOTALL)


def test_the_readme_config_blocks_load(tmp_path: Path) -> None:
    blocks = readme_toml_blocks()
    assert len(blocks) >= 2
    for block in blocks:
        load_config(write(tmp_path, block))
    full = load_config(write(tmp_path, blocks[0]))
    assert full.auth.admin_token == "change-me"
    defaults = Config()
    # The README's first block shows the defaults, except where it says otherwise.
    for section in ("server", "cache"):
        for key, value in vars_of(getattr(full, section)).items():
            default = vars_of(getattr(defaults, section))[key]
            if value != default:
                assert key in SHOWN_NOT_DEFAULT, f"README [{section}] {key} = {value!r}, " \
                    f"but the default is {default!r}"


SHOWN_NOT_DEFAULT = {"cache_dir", "max_memory_bytes", "max_loaded_models"}


def vars_of(section: object) -> dict[str, object]:
    return {name: getattr(section, name) for name in section.__slots__}  # type: ignore[attr-defined]


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


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ("backend = 'tensorrt'\n",
         "models[0].backend: must be one of 'auto', 'openvino', 'onnxruntime', got 'tensorrt'"),
        ("precision = 'fp16'\n",
         "models[0].precision: must be one of 'auto', 'fp32', 'bf16', got 'fp16'"),
        ("backend = 'onnxruntime'\nprecision = 'bf16'\n",
         "models[0].precision: 'bf16' needs backend 'openvino' (or 'auto'); onnxruntime "
         "computes in fp32"),
        ("min_cosine = 1.5\n", "models[0].min_cosine: must be a number in (0, 1], got 1.5"),
        ("runtime = 'echo'\nbackend = 'openvino'\n",
         "models[0].backend: must be one of 'auto', got 'openvino'"),
        ("runtime = 'causal-lm'\nsource = '/m'\nbackend = 'onnxruntime'\n",
         "models[0].backend: must be one of 'auto', 'openvino', 'torch', got 'onnxruntime'"),
        ("runtime = 'causal-lm'\nsource = '/m'\nprecision = 'fp16'\n",
         "models[0].precision: must be one of 'auto', 'fp32', 'bf16', got 'fp16'"),
        ("runtime = 'causal-lm'\nsource = '/m'\nweights = 'int4'\n",
         "models[0].weights: 'int4' is not offered (it needs NNCF's calibrated compression); "
         "use 'int8' or 'original'"),
        ("runtime = 'causal-lm'\nsource = '/m'\nbackend = 'torch'\nweights = 'int8'\n",
         "models[0].weights: 'int8' applies only to causal-lm models on OpenVINO (backend "
         "'auto' or 'openvino')"),
        ("weights = 'int8'\n",
         "models[0].weights: 'int8' applies only to causal-lm models on OpenVINO (backend "
         "'auto' or 'openvino')"),
        ("runtime = 'causal-lm'\nsource = '/m'\nbackend = 'torch'\nintra_op_threads = 2\n",
         "models[0].intra_op_threads: applies only to embedding, cross-encoder and causal-lm "
         "models on OpenVINO; the torch engine uses torch's process-wide thread pool (set "
         "OMP_NUM_THREADS before starting tidegate)"),
    ],
)
def test_bad_backend_or_precision_names_the_key_and_the_choices(
    tmp_path: Path, model: str, message: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, "[[models]]\nid = 'm'\n" + model))
    assert str(caught.value) == message


def test_backend_and_precision_are_read(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, "[[models]]\nid = 'm'\nbackend = 'openvino'\n"
                                         "precision = 'bf16'\nmin_cosine = 0.999\n"))
    model = config.models[0]
    assert (model.backend, model.precision, model.min_cosine) == (
        Backend.OPENVINO, Precision.BF16, 0.999)
    default = load_config(None).models[0]
    assert (default.backend, default.precision, default.min_cosine) == (
        Backend.AUTO, Precision.AUTO, 0.9999)


def test_generation_dtype_is_now_the_models_precision(tmp_path: Path) -> None:
    path = write(tmp_path, "[[models]]\nid = 'g'\nruntime = 'causal-lm'\nsource = '/m'\n"
                           "[models.generation]\ndtype = 'bfloat16'\n")
    with pytest.raises(ConfigError, match=r"^models\[0\]\.generation\.dtype: was replaced by "
                                          r"the model's 'precision'"):
        load_config(path)
    config = load_config(write(tmp_path, "[[models]]\nid = 'g'\nruntime = 'causal-lm'\n"
                                         "source = '/m'\nbackend = 'openvino'\n"
                                         "precision = 'fp32'\n[models.generation]\n"
                                         "kv_cache_bytes = 1048576\n"))
    model = config.models[0]
    assert (model.backend, model.precision) == (Backend.OPENVINO, Precision.FP32)
    assert model.generation.kv_cache_bytes == 1048576


def test_bf16_on_a_cpu_without_it_is_a_start_up_error(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, "[[models]]\nid = 'a'\n[[models]]\nid = 'b'\n"
                                         "precision = 'bf16'\n"))
    check_precisions(config, bf16_supported=True)
    with pytest.raises(ConfigError, match=r"^models\[1\]\.precision: 'bf16' needs a CPU"):
        check_precisions(config, bf16_supported=False)
    check_precisions(load_config(None), bf16_supported=False)  # auto is fine anywhere


def test_pipeline_process_is_true_false_or_unset(tmp_path: Path) -> None:
    base = '[[models]]\nid = "g"\nruntime = "causal-lm"\nsource = "/m"\n[models.generation]\n'
    assert load_config(write(tmp_path, base)).models[0].generation.pipeline_process is None
    assert load_config(write(tmp_path, base + "pipeline_process = true\n")
                       ).models[0].generation.pipeline_process is True
    with pytest.raises(ConfigError, match=re.escape(
            "models[0].generation.pipeline_process: must be true or false, got 'yes'")):
        load_config(write(tmp_path, base + "pipeline_process = 'yes'\n"))
