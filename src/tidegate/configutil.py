"""Building frozen config dataclasses from TOML tables: shared by every config module."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from tidegate.errors import ConfigError

__all__ = ["build_dataclass", "require_table"]


def require_table(data: object, where: str) -> Mapping[str, Any]:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where} must be a table, got {type(data).__name__}")
    return data


def build_dataclass(cls: type[Any], data: object, where: str) -> Any:
    """Instantiate a config dataclass from a TOML table, refusing unknown keys by name."""
    table = require_table(data, where)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(table) - known)
    if unknown:
        raise ConfigError(
            f"unknown key{'s' if len(unknown) > 1 else ''} in {where}: {', '.join(unknown)} "
            f"(known: {', '.join(sorted(known))})"
        )
    try:
        return cls(**table)
    except TypeError as exc:
        raise ConfigError(f"{where}: {exc}") from exc
