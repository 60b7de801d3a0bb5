"""``[[auth.keys]]`` and ``keys_file``: hashes only, every mistake named by its place; and
``tidegate keys create``."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest

from tidegate import cli
from tidegate.auth.keyring import KeyRing, hash_key
from tidegate.clock import FakeClock
from tidegate.config import ApiKeyConfig, AuthConfig, Config, ServerConfig, load_config
from tidegate.errors import ConfigError

HASH = hash_key("tg-one")
OTHER = hash_key("tg-two")
MODELS = '[[models]]\nid = "a"\nruntime = "echo"\n\n[[models]]\nid = "b"\nruntime = "echo"\n'


def write(tmp_path: Path, text: str, name: str = "tidegate.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_inline_keys_and_a_keys_file_are_read(tmp_path: Path) -> None:
    upper = "sha256:" + OTHER.removeprefix("sha256:").upper()  # hex digits in either case
    write(tmp_path, f'[[keys]]\nid = "team-b"\nhash = "{upper}"\ntokens_per_minute = 1000\n',
          "keys.toml")
    config = load_config(write(tmp_path, f'''
[auth]
keys_file = "keys.toml"

[[auth.keys]]
id = "team-a"
hash = "{HASH}"
models = ["a"]
requests_per_minute = 60

{MODELS}'''))
    first, second = config.auth.api_keys
    assert (first.id, first.hash, first.models, first.requests_per_minute) == (
        "team-a", HASH, ("a",), 60)
    assert (second.id, second.hash, second.models, second.tokens_per_minute) == (
        "team-b", OTHER, None, 1000)
    assert config.auth.keys_file == str(tmp_path / "keys.toml")  # relative to the config file


@pytest.mark.parametrize(("entries", "message"), [
    ('id = "x"\nhash = "tg-one"', "auth.keys[0].hash: must be 'sha256:' followed by"),
    ('id = "x"\nhash = "sha256:abc"', "auth.keys[0].hash: must be 'sha256:'"),
    ('id = "x"', "auth.keys[0].hash: is required"),
    (f'id = "x"\nhash = "{HASH}"\nkey = "tg-one"', "auth.keys[0].key: unknown key"),
    (f'id = "x"\nhash = "{HASH}"\nrequests_per_minute = 0',
     "auth.keys[0].requests_per_minute: must be >= 1, got 0"),
    (f'id = "x"\nhash = "{HASH}"\nmodels = ["a", "nope"]',
     "auth.keys[0].models: unknown model 'nope'"),
    (f'id = "x"\nhash = "{HASH}"\n\n[[auth.keys]]\nid = "x"\nhash = "{OTHER}"',
     "auth.keys[1].id: 'x' is configured twice (also auth.keys[0])"),
    (f'id = "x"\nhash = "{HASH}"\n\n[[auth.keys]]\nid = "y"\nhash = "{HASH}"',
     "auth.keys[1].hash: is the same key as auth.keys[0]"),
])
def test_bad_keys_name_their_place_and_never_echo_a_secret(
    tmp_path: Path, entries: str, message: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, f"[[auth.keys]]\n{entries}\n\n{MODELS}"))
    assert str(caught.value).startswith(message)
    assert "tg-one" not in str(caught.value)


def test_keys_file_errors_name_the_file_and_place(tmp_path: Path) -> None:
    keys = write(tmp_path, f'[[keys]]\nid = "x"\nhash = "{HASH}"\nrpm = 3\n', "keys.toml")
    with pytest.raises(ConfigError, match=re.escape(f"{keys}: keys[0].rpm: unknown key")):
        load_config(write(tmp_path, '[auth]\nkeys_file = "keys.toml"\n'))
    write(tmp_path, f'[[keys]]\nid = "x"\nhash = "{HASH}"\n', "keys.toml")
    with pytest.raises(ConfigError, match=re.escape(f"{keys}: keys[0].id: 'x' is configured twice"
                                                    " (also auth.keys[0])")):
        load_config(write(tmp_path, f'[auth]\nkeys_file = "keys.toml"\n[[auth.keys]]\nid = "x"\n'
                                    f'hash = "{OTHER}"\n'))
    with pytest.raises(ConfigError, match=r"^auth\.keys_file: cannot read"):
        load_config(write(tmp_path, '[auth]\nkeys_file = "absent.toml"\n'))
    with pytest.raises(ConfigError, match=r"^auth\.keyfile: unknown key \(known: admin_token"):
        load_config(write(tmp_path, '[auth]\nkeyfile = "keys.toml"\n'))


def test_no_config_object_holds_a_plaintext_key(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, f'[[auth.keys]]\nid = "x"\nhash = "{HASH}"\n'))
    assert "tg-one" not in repr(config)
    assert config.auth.api_keys[0].digest == bytes.fromhex(HASH.removeprefix("sha256:"))


def test_keys_create_prints_a_key_once_and_a_pasteable_entry(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["keys", "create", "--id", "team-a", "--models", "a, b", "--rpm", "5",
                     "--tpm", "900"]) == 0
    out = capsys.readouterr().out
    secret = re.search(r"^    (tg-\S+)$", out, re.M)
    assert secret is not None and len(secret.group(1)) > 40
    entry = out[out.index("\n[[auth.keys]]\n"):]
    config = load_config(write(tmp_path, entry + "\n" + MODELS))
    (key,) = config.auth.api_keys
    assert (key.id, key.models, key.requests_per_minute, key.tokens_per_minute) == (
        "team-a", ("a", "b"), 5, 900)
    assert secret.group(1) not in entry
    assert KeyRing(config.auth.api_keys, clock=FakeClock()).identify(secret.group(1)) is not None
    assert cli.main(["keys", "create", "--id", "team-a"]) == 0
    assert secret.group(1) not in capsys.readouterr().out  # a new random key every time


def test_keys_create_refuses_a_bad_limit(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["keys", "create", "--id", "x", "--rpm", "0"]) == 2
    assert "requests_per_minute: must be >= 1" in capsys.readouterr().err


@pytest.mark.parametrize(("host", "keys", "warns"), [
    ("127.0.0.1", False, False), ("::1", False, False), ("localhost", False, False),
    ("0.0.0.0", False, True), ("10.1.2.3", False, True), ("0.0.0.0", True, False),
])
def test_binding_beyond_loopback_without_keys_warns(
    host: str, keys: bool, warns: bool, caplog: pytest.LogCaptureFixture
) -> None:
    auth_keys = (ApiKeyConfig(id="x", hash=HASH),) if keys else ()
    config = Config(server=ServerConfig(host=host), auth=AuthConfig(keys=auth_keys))
    with caplog.at_level(logging.WARNING, logger="tidegate.server"):
        cli._warn_if_open(config)
    assert ("without API keys" in caplog.text) == warns


def test_keys_create_entry_loads_for_any_unicode_id(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["keys", "create", "--id", "équipe-😀"]) == 0
    out = capsys.readouterr().out
    config = load_config(write(tmp_path, out[out.index("\n[[auth.keys]]\n"):] + "\n" + MODELS))
    assert config.auth.api_keys[0].id == "équipe-😀"


def test_a_non_ascii_key_authenticates_from_its_raw_header_bytes() -> None:
    from starlette.requests import Request

    from tidegate.api.auth import authenticate

    secret = "tg-é-secret"
    ring = KeyRing((ApiKeyConfig(id="u", hash=hash_key(secret)),), clock=FakeClock())
    scope = {"type": "http", "headers": [(b"authorization", f"Bearer {secret}".encode())]}
    assert authenticate(Request(scope), ring).id == "u"


def test_sigterm_during_start_up_is_a_clean_exit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os
    import signal

    real = cli.load_config

    def load_then_terminated(*args: object, **kwargs: object) -> Config:
        os.kill(os.getpid(), signal.SIGTERM)  # arrives while start-up is still reading config
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(cli, "load_config", load_then_terminated)
    before = signal.getsignal(signal.SIGTERM)
    assert cli.main(["serve", "--config", str(write(tmp_path, "[server]\n"))]) == 0
    assert signal.getsignal(signal.SIGTERM) is before  # the handler was put back


def test_protect_metrics_needs_a_credential_to_let_a_scraper_in(tmp_path: Path) -> None:
    assert load_config(None).auth.protect_metrics is False
    with pytest.raises(ConfigError, match=re.escape(
            "auth.protect_metrics: needs an API key ([[auth.keys]] or keys_file) or admin_token")):
        load_config(write(tmp_path, "[auth]\nprotect_metrics = true\n"))
    with pytest.raises(ConfigError, match=re.escape(
            "auth.protect_metrics: must be true or false, got 'yes'")):
        load_config(write(tmp_path, "[auth]\nadmin_token = 't'\nprotect_metrics = 'yes'\n"))
    assert load_config(write(
        tmp_path, "[auth]\nadmin_token = 't'\nprotect_metrics = true\n")).auth.protect_metrics
    write(tmp_path, f'[[keys]]\nid = "team-b"\nhash = "{OTHER}"\n', "keys.toml")
    assert load_config(write(
        tmp_path, '[auth]\nkeys_file = "keys.toml"\nprotect_metrics = true\n'
    )).auth.protect_metrics
