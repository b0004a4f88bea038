"""Backoff maths, Retry-After parsing and the retry policy: pure, no event loop."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from batch_engine.timing.backoff import (
    DEFAULT_RETRY_AFTER_MAX,
    RetryPolicy,
    clamp_retry_after,
    full_jitter,
    parse_retry_after,
)

NOW = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)


def test_policy_defaults() -> None:
    """The default policy is 8 tries, 0.5 s first jitter range, 30 s cap."""
    policy = RetryPolicy()
    assert (policy.attempts, policy.initial, policy.maximum) == (8, 0.5, 30.0)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"attempts": 0}, "attempts"),
        ({"attempts": 2.5}, "attempts"),
        ({"initial": 0.0}, "initial"),
        ({"maximum": float("inf")}, "maximum"),
        ({"initial": 5.0, "maximum": 1.0}, "maximum"),
    ],
)
def test_policy_rejects_bad_values_naming_the_field(kwargs: dict[str, float], field: str) -> None:
    """A bad policy value raises ValueError whose message starts with the field's name."""
    with pytest.raises(ValueError, match=rf"^{field}"):
        RetryPolicy(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("attempt", "rand", "expected"),
    [(0, 0.5, 0.25), (1, 0.5, 0.5), (3, 0.999, 3.996), (10, 0.5, 5.0), (10_000, 0.5, 5.0), (2, 0.0, 0.0)],
)
def test_full_jitter_is_rand_times_capped_exponential(attempt: int, rand: float, expected: float) -> None:
    """full_jitter is rand * min(maximum, initial * 2**attempt), with no overflow for huge attempts."""
    assert full_jitter(attempt, initial=0.5, maximum=10.0, rand=rand) == pytest.approx(expected)


@pytest.mark.parametrize(("attempt", "rand"), [(-1, 0.5), (0, 1.0), (0, -0.1)])
def test_full_jitter_rejects_out_of_range_inputs(attempt: int, rand: float) -> None:
    """A negative attempt or a rand outside [0, 1) is a caller's bug and raises ValueError."""
    with pytest.raises(ValueError, match=r"attempt|rand"):
        full_jitter(attempt, initial=1.0, maximum=10.0, rand=rand)


@pytest.mark.parametrize(
    ("value", "expected"),
    [("1", 1.0), ("1.5", 1.5), (" 120 ", 120.0), ("0", 0.0)],
)
def test_parse_retry_after_delta_seconds(value: str, expected: float) -> None:
    """Delta-seconds, whole or fractional, parse to seconds."""
    assert parse_retry_after(value) == expected


@pytest.mark.parametrize("value", [None, "", "-1", "soon", "inf", "nan", "1e3", "Tue, 99 Foo 2026"])
def test_parse_retry_after_refuses_garbage(value: str | None) -> None:
    """Missing, negative, non-finite or unparsable values give None."""
    assert parse_retry_after(value) is None


def test_parse_retry_after_http_date_in_the_future() -> None:
    """An HTTP-date gives the seconds from ``now`` until it."""
    assert parse_retry_after("Thu, 01 Jan 2026 12:00:30 GMT", now=NOW) == 30.0


def test_parse_retry_after_http_date_in_the_past_is_zero() -> None:
    """An HTTP-date already past means retry now."""
    assert parse_retry_after("Thu, 01 Jan 2026 11:00:00 GMT", now=NOW) == 0.0


def test_parse_retry_after_http_date_defaults_to_the_real_now() -> None:
    """Without ``now`` the date is measured from the current UTC time."""
    soon = datetime.now(UTC) + timedelta(seconds=120)
    seconds = parse_retry_after(soon.strftime("%a, %d %b %Y %H:%M:%S GMT"))
    assert seconds is not None
    assert 100.0 < seconds <= 120.0


@pytest.mark.parametrize(
    ("seconds", "expected"),
    [(5.0, 5.0), (-3.0, 0.0), (1e9, DEFAULT_RETRY_AFTER_MAX), (float("nan"), DEFAULT_RETRY_AFTER_MAX)],
)
def test_clamp_retry_after_bounds_to_zero_and_maximum(seconds: float, expected: float) -> None:
    """clamp_retry_after keeps a hint within [0, maximum]."""
    assert clamp_retry_after(seconds) == expected


def test_clamp_retry_after_custom_maximum() -> None:
    """The maximum is a parameter."""
    assert clamp_retry_after(90.0, maximum=10.0) == 10.0
