"""Run settings: the manifest's ``settings:`` block, overridden by command-line flags, validated once."""

from __future__ import annotations

import dataclasses
import math
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


@dataclass(frozen=True, kw_only=True)
class RunSettings:
    """Every knob of a run. Names match the manifest's ``settings:`` keys and the ``--flags``."""

    rate: float = DEFAULT_RATE  #: submits per second; the ceiling when ``adapt`` is on
    rate_min: float = DEFAULT_RATE_MIN  #: the floor adaptation never goes below
    adapt: bool = True  #: slow down on 429 and speed up again after clean submits
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT  #: predictions submitted and not yet finished
    timeout: float = DEFAULT_TIMEOUT  #: seconds from submit until a prediction counts as failed
    poll_after: float | None = None  #: seconds from submit to the first poll; None: the model's prior
    poll_interval: float = DEFAULT_POLL_INTERVAL  #: seconds between later polls, at first
    poll_interval_max: float = DEFAULT_POLL_INTERVAL_MAX  #: the cap the poll interval grows to
    poll_rate: float | None = None  #: polls per second, apart from submits; None: 10, or 2 x rate if higher
    max_submits: int | None = None  #: stop submitting after this many paid submits in this run
    grace: float = DEFAULT_GRACE  #: seconds to keep polling after SIGINT/SIGTERM
    resubmit_ambiguous: bool = True  #: resend a submit whose answer was lost (marked possible_duplicate)

    def __post_init__(self) -> None:
        for name in ("rate", "rate_min", "poll_interval", "poll_interval_max", "timeout"):
            _require(name, getattr(self, name), minimum=0.0, inclusive=False)
        if self.poll_rate is not None:
            _require("poll_rate", self.poll_rate, minimum=0.0, inclusive=False)
        for name in ("poll_after", "grace"):
            value = getattr(self, name)
            if value is not None:
                _require(name, value, minimum=0.0, inclusive=True)
        if self.max_in_flight < 1:
            raise UsageError(f"max_in_flight must be at least 1, got {self.max_in_flight}")
        if self.max_submits is not None and self.max_submits < 0:
            raise UsageError(f"max_submits must be 0 or more, got {self.max_submits}")
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
        unknown = sorted(set(merged) - set(cls.field_names()))
        if unknown:
            raise UsageError(f"unknown setting(s): {', '.join(unknown)}")
        try:
            return cls(**merged)
        except TypeError as exc:
            raise UsageError(str(exc)) from exc


def _require(name: str, value: float, *, minimum: float, inclusive: bool) -> None:
    ok = value >= minimum if inclusive else value > minimum
    if not ok or math.isnan(value) or math.isinf(value):
        bound = f">= {minimum}" if inclusive else f"> {minimum}"
        raise UsageError(f"{name} must be a finite number {bound}, got {value}")


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
