"""tidegate: a fast model server and inference gateway."""

from __future__ import annotations

from tidegate.config import BatchingConfig, Config, ModelConfig, ServerConfig, load_config
from tidegate.errors import (
    ConfigError,
    InvalidRequest,
    ModelNotFound,
    ModelUnavailable,
    Overloaded,
    PayloadTooLarge,
    RequestError,
    RequestTimeout,
    RuntimeFailure,
    TidegateError,
    UnsupportedMediaType,
)

__version__ = "0.1.0"

__all__ = [
    "BatchingConfig",
    "Config",
    "ConfigError",
    "InvalidRequest",
    "ModelConfig",
    "ModelNotFound",
    "ModelUnavailable",
    "Overloaded",
    "PayloadTooLarge",
    "RequestError",
    "RequestTimeout",
    "RuntimeFailure",
    "ServerConfig",
    "TidegateError",
    "UnsupportedMediaType",
    "__version__",
    "load_config",
]
