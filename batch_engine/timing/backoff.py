"""Retry delays: backoff as pure functions, ``Retry-After`` parsing, and one operation's retry state.

The delay maths is the "full jitter" scheme of Marc Brooker, "Exponential Backoff And Jitter" (AWS
Architecture Blog, 2015): sleep ``random.uniform(0, min(maximum, initial * 2**attempt))``. Among the
schemes compared there it spreads competing clients best, so retries from thousands of items do not
arrive in waves. A server's ``Retry-After`` (RFC 9110 §10.2.3) replaces the jitter when present, as
stamina's ``wait`` hook lets a caller return the delay itself.
"""

from __future__ import annotations

import math
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

DEFAULT_ATTEMPTS = 8
DEFAULT_INITIAL = 0.5
DEFAULT_MAXIMUM = 30.0
DEFAULT_TOTAL = 300.0
DEFAULT_RETRY_AFTER_MAX = 60.0

# RFC 9110 allows only 1*DIGIT; fractions are accepted because some servers send them. A regex rather
# than float() so that "inf", "nan", "1e9" and "-1" are refused.
_DELTA_SECONDS = re.compile(r"\d+(\.\d+)?")
# 2**63 times any sane ``initial`` is far above any ``maximum``: the cap then holds without overflow.
_MAX_EXPONENT = 63


@dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    """How often and how long one operation (a poll, a download) is retried."""

    attempts: int = DEFAULT_ATTEMPTS  #: tries in all, the first one included
    initial: float = DEFAULT_INITIAL  #: seconds: the jitter range of the first retry
    maximum: float = DEFAULT_MAXIMUM  #: seconds: the cap of one jittered delay
    total: float = DEFAULT_TOTAL  #: seconds: no retry starts once this much time has passed

    def __post_init__(self) -> None:
        if isinstance(self.attempts, bool) or not isinstance(self.attempts, int) or self.attempts < 1:
            raise ValueError(f"attempts must be an integer of at least 1, got {self.attempts!r}")
        for name in ("initial", "maximum", "total"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number of seconds > 0, got {value!r}")
        if self.maximum < self.initial:
            raise ValueError(f"maximum ({self.maximum}) must be at least initial ({self.initial})")


def full_jitter(attempt: int, *, initial: float, maximum: float, rand: float) -> float:
    """The delay before retry number ``attempt`` (0-based): ``rand * min(maximum, initial * 2**attempt)``.

    ``rand`` is a draw from [0, 1), passed in so that the function stays pure.
    """
    if attempt < 0:
        raise ValueError(f"attempt must be 0 or more, got {attempt}")
    if not 0.0 <= rand < 1.0:
        raise ValueError(f"rand must be in [0, 1), got {rand}")
    ceiling = min(maximum, initial * 2.0 ** min(attempt, _MAX_EXPONENT))
    return rand * ceiling


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header: delta-seconds or an HTTP-date; None if unusable.

    A date already past means "now" (0.0); a negative number or anything unparsable gives None.
    """
    if value is None:
        return None
    text = value.strip()
    if _DELTA_SECONDS.fullmatch(text):
        return float(text)
    return _seconds_until_http_date(text, now=now)


def _seconds_until_http_date(text: str, *, now: datetime | None) -> float | None:
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # "-0000" parses naive; HTTP-dates are always GMT
        when = when.replace(tzinfo=UTC)
    reference = now if now is not None else datetime.now(UTC)
    if reference.tzinfo is None:
        reference = reference.replace(tzinfo=UTC)
    return max(0.0, (when - reference).total_seconds())


def clamp_retry_after(seconds: float, *, maximum: float = DEFAULT_RETRY_AFTER_MAX) -> float:
    """``seconds`` bounded to [0, maximum]: a server's hint is honoured, within reason."""
    if math.isnan(seconds):
        return maximum
    return min(max(seconds, 0.0), maximum)


class Retrying:
    """One operation's retry state: how many tries were made and how long it has been going.

    Call :meth:`next_delay` after each failed try; sleep what it returns, or give up on None.
    """

    __slots__ = ("_clock", "_rand", "_started", "policy", "tries")

    policy: RetryPolicy
    tries: int  #: tries made so far; invariant: 1 <= tries <= policy.attempts once next_delay was called

    def __init__(
        self,
        policy: RetryPolicy | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.policy = policy if policy is not None else RetryPolicy()
        self.tries = 0
        self._clock = clock
        self._rand = rand
        self._started = clock()

    @property
    def elapsed(self) -> float:
        """Seconds since the operation began (this object was made)."""
        return self._clock() - self._started

    def next_delay(self, hint: float | None = None) -> float | None:
        """The delay before the next try, or None when tries or time are used up.

        ``hint`` is a server's ``Retry-After`` in seconds: clamped, it replaces the jitter, because
        retrying sooner than the server asked only earns another refusal.
        """
        self.tries = min(self.tries + 1, self.policy.attempts)
        if self.tries == self.policy.attempts:
            return None
        delay = clamp_retry_after(hint) if hint is not None else self._jittered()
        if self.elapsed + delay > self.policy.total:
            return None
        return delay

    def _jittered(self) -> float:
        p = self.policy
        return full_jitter(self.tries - 1, initial=p.initial, maximum=p.maximum, rand=self._rand())

    def __repr__(self) -> str:
        p = self.policy
        return (
            f"<Retrying tries={self.tries}/{p.attempts} elapsed={self.elapsed:.3f}s/{p.total:g}s"
            f" initial={p.initial:g}s maximum={p.maximum:g}s>"
        )


#: The policy polls, downloads and refused submits use unless told otherwise.
DEFAULT_POLICY = RetryPolicy()
