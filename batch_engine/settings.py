"""Run settings: the manifest's ``settings:`` block, overridden by command-line flags, validated once."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from batch_engine.errors import UsageError

DEFAULT_BASE_URL = "https://gptproto.com"
DEFAULT_RATE = 2.0
DEFAULT_RATE_MIN = 0.05
DEFAULT_MAX_IN_FLIGHT = 50
DEFAULT_TIMEOUT = 600.0
DEFAULT_POLL_INTERVAL = 3.0
DEFAULT_POLL_INTERVAL_MAX = 15.0
DEFAULT_POLL_RATE = 10.0
DEFAULT_GRACE = 30.0

WEEK = 7 * 24 * 3600  #: seconds


@dataclass(frozen=True)
class Range:
    """The values a number setting may take: ``low`` to ``high``, ``low`` itself excluded if ``open_low``."""

    low: float
    high: float
    open_low: bool = False
    whole: bool = False  #: a whole number (int), not any number

    def __contains__(self, value: object) -> bool:
        if not isinstance(value, int | float) or isinstance(value, bool):
            return False
        if self.whole and not isinstance(value, int):
            return False
        # Comparisons only: exact for ints of any size, False for nan (no float() that could overflow).
        above = value > self.low if self.open_low else value >= self.low
        return above and value <= self.high

    def describe(self) -> str:
        kind = "a whole number" if self.whole else "a number"
        low, high = bound_text(self.low), bound_text(self.high)
        if self.open_low:
            return f"{kind} greater than {low} and at most {high}"
        return f"{kind} from {low} to {high}"


#: The sane range of every number setting; the manifest's field table and its JSON Schema are built from
#: it. Past these, a value only hangs a run (a first poll in 1e300 s) or ends it in a traceback.
SETTING_RANGES: Mapping[str, Range] = {
    "rate": Range(0.001, 10_000),  # submits/s: one per 17 minutes to the largest tiers known
    "rate_min": Range(0.001, 10_000),
    "max_in_flight": Range(1, 10_000, whole=True),  # the largest concurrency tier known
    "timeout": Range(0, WEEK, open_low=True),
    "poll_after": Range(0, WEEK),
    "poll_interval": Range(0.01, 3600),
    "poll_interval_max": Range(0.01, 3600),
    "poll_rate": Range(0.01, 10_000),
    "max_submits": Range(0, 1_000_000_000, whole=True),
    "grace": Range(0, 24 * 3600),
}
_FLAGS = ("adapt", "resubmit_ambiguous")
#: Words a number setting also takes, meaning the same as leaving it out (its default picks the value).
SETTING_WORDS: Mapping[str, tuple[str, ...]] = {"max_in_flight": ("auto",)}


@dataclass(frozen=True, kw_only=True)
class RunSettings:
    """Every knob of a run. Names match the manifest's ``settings:`` keys and the ``--flags``."""

    rate: float = DEFAULT_RATE  #: submits per second; the ceiling when ``adapt`` is on
    rate_min: float = DEFAULT_RATE_MIN  #: the floor adaptation never goes below
    adapt: bool = True  #: slow down on 429 and speed up again after clean submits
    max_in_flight: int | None = None  #: predictions submitted and not finished; absent: rate x latency seen
    timeout: float = DEFAULT_TIMEOUT  #: seconds from submit until a prediction counts as failed
    poll_after: float | None = None  #: seconds from submit to the first poll; None: the model's prior
    poll_interval: float = DEFAULT_POLL_INTERVAL  #: seconds between later polls, at first
    poll_interval_max: float = DEFAULT_POLL_INTERVAL_MAX  #: the cap the poll interval grows to
    poll_rate: float | None = None  #: polls per second, apart from submits; None: 10, or 2 x rate if higher
    max_submits: int | None = None  #: stop submitting after this many paid submits in this run
    grace: float = DEFAULT_GRACE  #: seconds to keep polling after SIGINT/SIGTERM
    resubmit_ambiguous: bool = True  #: resend a submit whose answer was lost (marked possible_duplicate)

    def __post_init__(self) -> None:
        for name, allowed in SETTING_RANGES.items():
            value = getattr(self, name)
            if value is not None and value not in allowed:
                raise UsageError(f"{name} must be {allowed.describe()}, got {shown(value)}")
        for name in _FLAGS:
            if not isinstance(getattr(self, name), bool):
                raise UsageError(f"{name} must be true or false, got {shown(getattr(self, name))}")
        if self.rate_min > self.rate:
            raise UsageError(f"rate_min ({self.rate_min}) must not exceed rate ({self.rate})")
        if self.poll_interval_max < self.poll_interval:
            raise UsageError("poll_interval_max must be at least poll_interval")

    @property
    def polls_per_second(self) -> float:
        """The poll budget: as set, else enough for predictions finishing as fast as submits start."""
        return self.poll_rate if self.poll_rate is not None else max(DEFAULT_POLL_RATE, 2.0 * self.rate)

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def build(cls, manifest_settings: Mapping[str, Any], overrides: Mapping[str, Any]) -> RunSettings:
        """Manifest settings first, then every override that is not None (flags the user gave)."""
        merged = dict(manifest_settings)
        merged.update({k: v for k, v in overrides.items() if v is not None})
        for name, words in SETTING_WORDS.items():  # ``auto`` from the flag overrides a number in the manifest
            if isinstance(merged.get(name), str) and merged[name] in words:
                merged[name] = None
        unknown = sorted(set(merged) - set(cls.field_names()))
        if unknown:
            raise UsageError(f"unknown setting(s): {', '.join(unknown)}")
        try:
            return cls(**merged)
        except TypeError as exc:
            raise UsageError(str(exc)) from exc


def bound_text(bound: float) -> str:
    """A range's end as a person reads it: ``604,800``, ``0.001``."""
    return f"{int(bound):,}" if float(bound).is_integer() else f"{bound:g}"


def shown(value: object) -> str:
    """A value as a message quotes it: a whole number too long to print (Python refuses past 4,300
    digits) is described by its length instead."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return f"a whole number of about {int(value.bit_length() * 0.30103) + 1:,} digits"
    if isinstance(value, str):
        return repr(value if len(value) <= 40 else value[:40] + "…")
    if isinstance(value, int | float | bool) or value is None:
        return repr(value)
    return f"a {type(value).__name__}"


#: The two routes a local input file can take to the API.
ROUTE_PREDICTIONS = "predictions"  #: staged to the user's object store, sent as a URL to the prediction API
ROUTE_OPENAI_IMAGES = "openai-images"  #: sent as a file to the OpenAI-format endpoint /v1/images/edits
DEFAULT_UPLOAD_CONCURRENCY = 8
URL_TTL_MARGIN = 900.0  #: seconds a presigned URL outlives the prediction timeout, by default
MAX_URL_TTL = 7 * 24 * 3600.0  #: S3 signs URLs for at most a week


@dataclass(frozen=True, kw_only=True)
class InputsSettings:
    """How local input files reach the API: the manifest's ``settings.inputs``.

    ``upload`` stages each file once, keyed by its sha256, under an ``s3://bucket/prefix/`` of the user's
    object store (any S3-compatible one; credentials from the standard AWS chain, never the manifest) and
    sends a presigned URL, or ``public_base_url`` + the key when the bucket is public. ``route:
    openai-images`` sends the files themselves to the vendor's OpenAI-format endpoint instead.
    """

    upload: str | None = None  #: s3://bucket/prefix/ where local inputs are staged
    url_ttl: float | None = None  #: seconds a presigned URL stays valid; default: timeout + 15 minutes
    public_base_url: str | None = None  #: the bucket is public: URLs are this + the object key, unsigned
    route: str = ROUTE_PREDICTIONS  #: predictions (local files staged by upload) or openai-images
    upload_concurrency: int = DEFAULT_UPLOAD_CONCURRENCY  #: uploads at once

    def __post_init__(self) -> None:
        if self.route == ROUTE_OPENAI_IMAGES and (self.upload or self.public_base_url):
            raise UsageError("inputs: route openai-images sends the files themselves; remove upload")
        if self.route == ROUTE_PREDICTIONS and not self.upload:
            raise UsageError(
                "inputs: name a route for local files: upload: s3://bucket/prefix/ (staged, sent as URLs) "
                "or route: openai-images (sent as files)"
            )
        if self.public_base_url and self.url_ttl is not None:
            raise UsageError("inputs: url_ttl is for presigned URLs; a public_base_url is never signed")

    def ttl(self, timeout: float) -> float:
        """Seconds a presigned URL must stay valid: ``url_ttl``, else the prediction timeout + a margin."""
        chosen = self.url_ttl if self.url_ttl is not None else timeout + URL_TTL_MARGIN
        return min(chosen, MAX_URL_TTL)

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))
