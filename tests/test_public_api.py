from __future__ import annotations

import tidegate
from tidegate import errors


def test_public_api_is_curated() -> None:
    assert sorted(tidegate.__all__) == sorted([
        "AuthConfig", "AuthenticationRequired", "BatchingConfig", "CacheConfig", "Config",
        "ConfigError", "InvalidRequest", "ModelConfig", "PermissionDenied",
        "ModelNotFound", "ModelUnavailable", "Overloaded", "PayloadTooLarge", "RequestError",
        "RequestTimeout", "RuntimeFailure", "ServerConfig", "TidegateError",
        "UnsupportedMediaType", "__version__", "load_config",
    ])
    for name in tidegate.__all__:
        assert hasattr(tidegate, name)


def test_every_error_derives_from_tidegate_error() -> None:
    for name in errors.__all__:
        assert issubclass(getattr(errors, name), errors.TidegateError)
