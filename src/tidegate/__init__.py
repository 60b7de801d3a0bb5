"""tidegate: a fast model server and inference gateway."""

from __future__ import annotations

from tidegate._version import __version__
from tidegate.config import (
    AuthConfig,
    BatchingConfig,
    CacheConfig,
    Config,
    ModelConfig,
    ServerConfig,
    load_config,
)
from tidegate.errors import (
    AuthenticationRequired,
    ConfigError,
    InvalidRequest,
    ModelNotFound,
    ModelUnavailable,
    Overloaded,
    PayloadTooLarge,
    PermissionDenied,
    RequestError,
    RequestTimeout,
    RuntimeFailure,
    TidegateError,
    UnsupportedMediaType,
)

__all__ = [
    "AuthConfig",
    "AuthenticationRequired",
    "BatchingConfig",
    "CacheConfig",
    "Config",
    "ConfigError",
    "InvalidRequest",
    "ModelConfig",
    "ModelNotFound",
    "ModelUnavailable",
    "Overloaded",
    "PayloadTooLarge",
    "PermissionDenied",
    "RequestError",
    "RequestTimeout",
    "RuntimeFailure",
    "ServerConfig",
    "TidegateError",
    "UnsupportedMediaType",
    "__version__",
    "load_config",
]
