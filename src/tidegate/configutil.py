"""Building frozen config dataclasses from TOML tables: shared by every config module.

A config dataclass validates its own fields and names them relative to itself
(``max_batch_size: must be >= 1, got 0``); :func:`build_dataclass`, given the table's place in
the file, turns that into the full place (``models[2].batching.max_batch_size``), so every
message names where to look whichever table the dataclass sits in.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from tidegate.errors import ConfigError

__all__ = [
    "build_dataclass",
    "check_choice",
    "check_integer",
    "check_number",
    "place",
    "require_table",
]


def place(where: str, key: str) -> str:
    """The full place of ``key`` in the table at ``where`` (``""`` is the file's top level)."""
    return f"{where}.{key}" if where else key


def require_table(data: object, where: str) -> Mapping[str, Any]:
    if not isinstance(data, Mapping):
        raise ConfigError(f"must be a table, got {type(data).__name__}", key=where or None)
    return data


def build_dataclass(cls: type[Any], data: object, where: str) -> Any:
    """Instantiate a config dataclass from the TOML table at ``where``, refusing unknown keys
    and naming every bad key by its full place."""
    table = require_table(data, where)
    fields = dataclasses.fields(cls)
    known = sorted(f.name for f in fields)
    unknown = sorted(set(table) - set(known))
    if unknown:
        others = f"; also unknown: {', '.join(unknown[1:])}" if len(unknown) > 1 else ""
        raise ConfigError(f"unknown key{others} (known: {', '.join(known)})",
                          key=place(where, unknown[0]))
    for field in fields:
        required = (field.default is dataclasses.MISSING
                    and field.default_factory is dataclasses.MISSING)
        if required and field.name not in table:
            raise ConfigError("is required", key=place(where, field.name))
    try:
        return cls(**table)
    except ConfigError as exc:
        raise exc.within(where) from exc


def check_number(key: str, value: object, *, allow_zero: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"must be a number, got {value!r}", key=key)
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"must be {'>= 0' if allow_zero else '> 0'}, got {value!r}", key=key)


def check_integer(key: str, value: object, *, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"must be an integer, got {value!r}", key=key)
    if value < minimum:
        raise ConfigError(f"must be >= {minimum}, got {value!r}", key=key)


def check_choice(key: str, value: object, choices: tuple[Any, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"must be one of {', '.join(map(repr, choices))}, got {value!r}",
                          key=key)
