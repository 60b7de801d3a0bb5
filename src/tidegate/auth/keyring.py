"""The configured API keys, looked up by the SHA-256 of what a client presents.

Only hashes are kept: a presented key is hashed and the digest looked up, so the time a lookup
takes says nothing about how much of a real key was guessed, and nothing here can reveal a key.
Each key's limits are :class:`~tidegate.auth.limits.Bucket`s read at the injected clock's time;
admission decides synchronously (no awaits), so concurrent requests cannot both take the last
unit.
"""

from __future__ import annotations

import hashlib
import hmac
import math
from collections.abc import Sequence

from tidegate.auth.limits import Bucket, format_duration
from tidegate.auth.stats import KeyRingStatistics, KeyStatistics
from tidegate.clock import Clock
from tidegate.config import ApiKeyConfig
from tidegate.errors import RateLimited

__all__ = ["ApiKey", "KeyRing", "hash_key"]


def hash_key(secret: str) -> str:
    """The ``hash`` value of an API key: ``"sha256:<hex>"``."""
    return "sha256:" + hashlib.sha256(secret.encode("utf-8")).hexdigest()


class ApiKey:
    """One configured key: its allowed models, its limits and its counters."""

    __slots__ = ("_clock", "_digest", "_requests", "_tokens", "completion_tokens", "id",
                 "models", "prompt_tokens", "rate_limited_requests", "rate_limited_tokens",
                 "requests")

    def __init__(self, config: ApiKeyConfig, clock: Clock) -> None:
        now = clock.now()
        self.id = config.id
        self.models = None if config.models is None else frozenset(config.models)
        self._clock = clock
        self._digest = config.digest
        self._requests = (None if config.requests_per_minute is None
                          else Bucket(config.requests_per_minute, now))
        self._tokens = (None if config.tokens_per_minute is None
                        else Bucket(config.tokens_per_minute, now))
        self.requests = 0
        self.rate_limited_requests = 0
        self.rate_limited_tokens = 0
        self.prompt_tokens = 0
        self.completion_tokens = 0

    def __repr__(self) -> str:  # the id only: never the digest
        return f"ApiKey(id={self.id!r}, requests={self.requests})"

    def matches(self, digest: bytes) -> bool:
        return hmac.compare_digest(self._digest, digest)

    def allows(self, model: str) -> bool:
        return self.models is None or model in self.models

    def admit(self) -> dict[str, str]:
        """Count one request against the limits and return the ``x-ratelimit-*`` headers
        (empty without limits), or raise :class:`RateLimited` and count nothing."""
        now = self._clock.now()
        requests, tokens = self._requests, self._tokens
        waits = {
            "requests": 0.0 if requests is None else requests.wait_s(now),
            "tokens": 0.0 if tokens is None else tokens.wait_s(now),
        }
        refused = next((limit for limit, wait in waits.items() if wait > 0), None)
        if refused is not None:
            bucket = requests if refused == "requests" else tokens
            assert bucket is not None
            if refused == "requests":
                self.rate_limited_requests += 1
            else:
                self.rate_limited_tokens += 1
            retry_after_s = max(1, math.ceil(max(waits.values())))
            headers = self._headers(now)
            headers["Retry-After"] = str(retry_after_s)
            raise RateLimited(key_id=self.id, limit=refused, per_minute=bucket.per_minute,
                              retry_after_s=retry_after_s, headers=headers)
        self.requests += 1
        if requests is not None:
            requests.spend(1, now)
        return self._headers(now)

    def record(self, prompt_tokens: int, completion_tokens: int = 0) -> None:
        """A request's usage, once known: counted, and spent from ``tokens_per_minute``."""
        self.prompt_tokens += prompt_tokens
        self.completion_tokens += completion_tokens
        if self._tokens is not None:
            self._tokens.spend(prompt_tokens + completion_tokens, self._clock.now())

    def _headers(self, now: float) -> dict[str, str]:
        headers: dict[str, str] = {}
        for kind, bucket in (("requests", self._requests), ("tokens", self._tokens)):
            if bucket is not None:
                headers[f"x-ratelimit-limit-{kind}"] = str(bucket.per_minute)
                headers[f"x-ratelimit-remaining-{kind}"] = str(bucket.remaining(now))
                headers[f"x-ratelimit-reset-{kind}"] = format_duration(bucket.reset_s(now))
        return headers

    def statistics(self) -> KeyStatistics:
        return KeyStatistics(
            id=self.id, requests=self.requests,
            rate_limited_requests=self.rate_limited_requests,
            rate_limited_tokens=self.rate_limited_tokens,
            prompt_tokens=self.prompt_tokens, completion_tokens=self.completion_tokens,
        )


class KeyRing:
    """Every configured key, by digest."""

    def __init__(self, keys: Sequence[ApiKeyConfig], *, clock: Clock) -> None:
        self._keys = {key.digest: ApiKey(key, clock) for key in keys}
        self.invalid = 0

    def __repr__(self) -> str:
        return f"KeyRing(keys={[key.id for key in self._keys.values()]})"

    def identify(self, secret: str | None) -> ApiKey | None:
        """The key whose secret this is; ``None`` (counted as invalid) for none or unknown."""
        if secret:
            digest = hashlib.sha256(secret.encode("utf-8", "surrogateescape")).digest()
            key = self._keys.get(digest)
            if key is not None and key.matches(digest):
                return key
        self.invalid += 1
        return None

    def statistics(self) -> KeyRingStatistics:
        return KeyRingStatistics(
            keys=tuple(key.statistics() for key in self._keys.values()), invalid=self.invalid
        )
