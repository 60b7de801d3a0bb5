"""The per-minute token buckets and API-key admission, on a fake clock."""

from __future__ import annotations

import pytest

from tidegate.auth.keyring import KeyRing, hash_key
from tidegate.auth.limits import Bucket, format_duration
from tidegate.clock import FakeClock
from tidegate.config import ApiKeyConfig
from tidegate.errors import RateLimited


def ring(clock: FakeClock, **limits: int | None) -> KeyRing:
    config = ApiKeyConfig(id="team-a", hash=hash_key("tg-secret"), **limits)  # type: ignore[arg-type]
    return KeyRing([config], clock=clock)


def test_a_bucket_refills_continuously_up_to_its_size() -> None:
    bucket = Bucket(60, now=0.0)
    bucket.spend(60, now=0.0)
    assert bucket.remaining(0.0) == 0 and bucket.wait_s(0.0) == pytest.approx(1.0)
    assert bucket.remaining(30.0) == 30
    assert bucket.reset_s(30.0) == pytest.approx(30.0)
    assert bucket.remaining(600.0) == 60  # never above its size


def test_a_bucket_in_debt_waits_until_the_debt_is_repaid() -> None:
    bucket = Bucket(100, now=0.0)
    bucket.spend(250, now=0.0)  # usage is known only after the request
    assert bucket.level(0.0) == -150
    assert bucket.wait_s(0.0) == pytest.approx(151 * 60 / 100)


@pytest.mark.parametrize(("seconds", "text"), [
    (0.0201, "21ms"), (1.0, "1s"), (1.5, "1.5s"), (59.9984, "59.999s"), (59.9994, "1m0s"),
    (360.0, "6m0s"), (61.25, "1m1.25s"),
])
def test_reset_durations_read_like_openais(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


def test_requests_per_minute_refuses_then_resets_after_its_window() -> None:
    clock = FakeClock()
    key = ring(clock, requests_per_minute=2).identify("tg-secret")
    assert key is not None
    first = key.admit()
    assert first["x-ratelimit-limit-requests"] == "2"
    assert first["x-ratelimit-remaining-requests"] == "1"
    assert key.admit()["x-ratelimit-remaining-requests"] == "0"
    with pytest.raises(RateLimited) as refused:
        key.admit()
    assert refused.value.limit == "requests" and refused.value.retry_after_s == 30
    assert refused.value.headers["Retry-After"] == "30"
    assert refused.value.headers["x-ratelimit-remaining-requests"] == "0"
    assert refused.value.headers["x-ratelimit-reset-requests"] == "1m0s"
    assert "tg-secret" not in str(refused.value)
    clock.advance(30)  # one request's worth
    key.admit()
    with pytest.raises(RateLimited):
        key.admit()
    clock.advance(60)  # a whole window: the full limit again
    assert key.admit()["x-ratelimit-remaining-requests"] == "1"
    key.admit()
    stats = key.statistics()
    assert (stats.requests, stats.rate_limited_requests) == (5, 2)


def test_tokens_per_minute_counts_usage_after_the_request() -> None:
    clock = FakeClock()
    key = ring(clock, tokens_per_minute=100).identify("tg-secret")
    assert key is not None
    headers = key.admit()
    assert "x-ratelimit-limit-requests" not in headers
    assert headers["x-ratelimit-remaining-tokens"] == "100"
    key.record(70, 50)  # over the limit: this request is served, the next waits
    with pytest.raises(RateLimited) as refused:
        key.admit()
    assert refused.value.limit == "tokens"
    assert refused.value.retry_after_s == 13  # 21 tokens at 100/min
    clock.advance(13)
    assert key.admit()["x-ratelimit-remaining-tokens"] == "1"
    stats = key.statistics()
    assert (stats.prompt_tokens, stats.completion_tokens, stats.rate_limited_tokens) == (70, 50, 1)


def test_a_refusal_spends_nothing() -> None:
    clock = FakeClock()
    key = ring(clock, requests_per_minute=1, tokens_per_minute=10).identify("tg-secret")
    assert key is not None
    key.admit()
    key.record(10)
    for _ in range(3):
        with pytest.raises(RateLimited):
            key.admit()
    clock.advance(60)
    key.admit()


def test_keys_are_found_by_hash_only() -> None:
    clock = FakeClock()
    keys = ring(clock)
    assert keys.identify("tg-secret") is not None
    assert keys.identify("tg-secreT") is None
    assert keys.identify(None) is None
    assert keys.identify("") is None
    assert keys.statistics().invalid == 3
    assert "tg-secret" not in repr(keys) and "tg-secret" not in repr(keys.identify("tg-secret"))


def test_no_limits_means_no_headers() -> None:
    key = ring(FakeClock()).identify("tg-secret")
    assert key is not None
    assert key.admit() == {}
    key.record(10**6)
    assert key.admit() == {}
