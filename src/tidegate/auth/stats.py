"""Statistics snapshots of the API keys: frozen, typed, labelled by key id (never the key)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["KeyRingStatistics", "KeyStatistics"]


@dataclass(frozen=True, slots=True)
class KeyStatistics:
    """One API key's use since start-up."""

    id: str
    requests: int
    """Requests admitted."""
    rate_limited_requests: int
    """Requests refused by ``requests_per_minute``."""
    rate_limited_tokens: int
    """Requests refused by ``tokens_per_minute``."""
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True, slots=True)
class KeyRingStatistics:
    keys: tuple[KeyStatistics, ...]
    invalid: int
    """Requests refused with 401: no key, or one that is not configured."""
