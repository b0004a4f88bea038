"""Retry delays: backoff as pure functions, ``Retry-After`` parsing, and the retry policy of a run.

The delay maths is the "full jitter" scheme of Marc Brooker, "Exponential Backoff And Jitter" (AWS
Architecture Blog, 2015): sleep ``random.uniform(0, min(maximum, initial * 2**attempt))``. Among the
schemes compared there it spreads competing clients best, so retries from thousands of items do not
arrive in waves. A server's ``Retry-After`` (RFC 9110 §10.2.3) replaces the jitter when present, as
stamina's ``wait`` hook lets a caller return the delay itself.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

DEFAULT_ATTEMPTS = 8
DEFAULT_INITIAL = 0.5
DEFAULT_MAXIMUM = 30.0
DEFAULT_RETRY_AFTER_MAX = 60.0

# RFC 9110 allows only 1*DIGIT; fractions are accepted because some servers send them. A regex rather
# than float() so that "inf", "nan", "1e9" and "-1" are refused.
_DELTA_SECONDS = re.compile(r"\d+(\.\d+)?")
# 2**63 times any sane ``initial`` is far above any ``maximum``: the cap then holds without overflow.
_MAX_EXPONENT = 63


@dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    """How often one operation (a poll, a download, a refused or lost submit) is tried, and how far apart."""

    attempts: int = DEFAULT_ATTEMPTS  #: tries in all, the first one included
    initial: float = DEFAULT_INITIAL  #: seconds: the jitter range of the first retry
    maximum: float = DEFAULT_MAXIMUM  #: seconds: the cap of one jittered delay

    def __post_init__(self) -> None:
        if isinstance(self.attempts, bool) or not isinstance(self.attempts, int) or self.attempts < 1:
            raise ValueError(f"attempts must be an integer of at least 1, got {self.attempts!r}")
        for name in ("initial", "maximum"):
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


#: The policy polls, downloads and refused submits use unless told otherwise.
DEFAULT_POLICY = RetryPolicy()
