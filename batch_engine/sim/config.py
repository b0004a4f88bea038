"""The simulator's knobs (`SimConfig`), the models it serves, and what it counts (`SimStats`)."""

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

_ERROR_STYLES = frozenset({"openai", "flat", "text"})
FIXED_SIZES = frozenset({"1024x1024", "1536x1024", "1024x1536", "auto"})
SIZE_PATTERN = re.compile(r"^([0-9]{1,5})x([0-9]{1,5})$")


@dataclass(frozen=True)
class SimModel:
    """What one known model accepts."""

    tasks: frozenset[str]
    image_field: str = "images"  #: gpt-image-1 takes ``image``
    default_format: str = "url"
    fixed_sizes: bool = False  #: gpt-image-1: only the sizes in ``FIXED_SIZES``


#: The ``model`` names the OpenAI-format route (``POST /v1/images/edits``) takes.
IMAGES_MODELS = frozenset({"gpt-image-2-plus", "gpt-image-1.5-plus"})
#: The sizes it takes (its default is ``auto``).
IMAGES_SIZES = frozenset({"auto", "1536x1024", "1024x1536", "1672x941", "941x1672"})

MODELS: Mapping[str, SimModel] = {
    "openai/gpt-image-2-plus": SimModel(tasks=frozenset({"image-edit"})),
    "openai/gpt-image-2": SimModel(tasks=frozenset({"image-edit", "text-to-image"})),
    "openai/gpt-image-1": SimModel(
        tasks=frozenset({"image-edit"}), image_field="image", default_format="b64_json", fixed_sizes=True
    ),
}


@dataclass(frozen=True, kw_only=True)
class SimConfig:
    """Every knob of the simulator. Same seed and knobs → same decisions, whatever the request order."""

    seed: int = 0  #: feeds every decision's hash
    #: when set, Authorization must be this key or ``Bearer <key>``; when None any non-empty value passes
    api_key: str | None = None
    inference_median: float = 0.2  #: seconds; inference time is lognormal around it
    inference_spread: float = 0.5  #: lognormal sigma; 0: every prediction takes exactly the median
    inference_polls: int | None = None  #: when set, a prediction completes on its Nth poll (time ignored)
    processing_after: float = 0.0  #: fraction of the inference spent in ``created`` before ``processing``
    submit_rate: float | None = None  #: submits per second the key allows (strict GCRA); None: unlimited
    submit_burst: int = 2  #: how many submits may arrive at once under ``submit_rate``
    poll_rate: float | None = None  #: polls per second allowed (a separate bucket); None: unlimited
    poll_burst: int = 5
    retry_after: float | None = None  #: when set, 429s carry ``Retry-After`` (integer seconds if whole)
    html_429: bool = False  #: 429 bodies are a proxy's HTML page instead of JSON
    #: cap on predictions created/processing at once; beyond it a submit gets 429 (not accepted, not billed)
    max_concurrent: int | None = None
    p_500: float = 0.0  #: probability a submit or poll gets 500 (a submit is then NOT accepted)
    p_503: float = 0.0  #: the same with 503
    p_drop_before_accept: float = 0.0  #: submit: connection closed with no answer, nothing created
    p_drop_after_accept: float = 0.0  #: submit: prediction created (billed), then connection closed
    p_failed: float = 0.0  #: a prediction ends failed with an error string
    p_slow: float = 0.0  #: an answer (submit or poll) is delayed by ``slow_seconds``
    slow_seconds: float = 2.0
    p_download_500: float = 0.0  #: an output download gets 500
    p_download_truncated: float = 0.0  #: an output download declares its full length, sends half, closes
    #: an output download arrives at its full length with one byte changed in the middle (a mangling proxy)
    p_download_corrupt: float = 0.0
    content_policy_marker: str = "FORBIDDEN"  #: a prompt containing it gets 400 content policy
    balance: int | None = None  #: after this many accepted submits, further submits get 403
    # Envelope variants: each is something the real API (or its siblings) is known to send.
    urls_as_list: bool = False  #: ``data.urls`` as ``[{"get": ...}]`` instead of ``{"get": ...}``
    camel_case: bool = False  #: ``hasNsfwContents``, ``createdAt`` instead of the snake_case keys
    error_empty_string: bool = False  #: ``data.error`` is ``""`` instead of null when there is no error
    nsfw_null: bool = False  #: ``has_nsfw_contents`` is null
    b64_data_prefix: bool = True  #: b64_json outputs start with ``data:image/png;base64,``
    rfc3339_times: bool = False  #: ``created_at`` as RFC 3339 instead of ``2026-01-01 00:00:00``
    #: "openai": ``{"error": {"message", "type", "code"}}``, "flat": ``{"code", "message"}``, "text": plain
    error_body_style: str = "openai"
    foreign_get_url: bool = False  #: ``data.urls.get`` points at the foreign origin (a key sent there leaks)
    image_scale: float = 1.0  #: outputs are rendered at size * scale (at least 16x16)
    #: with ``enable_sync_mode``: answer while still processing (True) or wait for the end (False)
    sync_early: bool = False
    processing_status: str = "processing"  #: in-progress status; also seen: running, pending, in_progress
    failed_status: str = "failed"  #: terminal failure status; also seen: cancelled, timeout, expired, error
    accept_data_uris: bool = False  #: accept ``data:`` URIs as inputs (one client says they are refused)
    #: fetch every input URL before accepting a submit, as the real API does (and record what it got): a
    #: URL that answers other than 200 (an expired or unsigned link) is a 400 naming the image
    fetch_inputs: bool = False
    input_delay: float = 0.0  #: seconds each of the simulator's own input images takes to serve (a slow host)
    refuse_transparent: bool = False  #: gpt-image-2 models refuse ``background: transparent`` (doubtful)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name.startswith("p_") and not 0.0 <= value <= 1.0:
                raise ValueError(f"SimConfig.{f.name} is a probability: 0..1, got {value}")
        if not self.input_delay >= 0:
            raise ValueError(f"SimConfig.input_delay must be 0 or more, got {self.input_delay}")
        for name in ("submit_rate", "poll_rate", "inference_median", "slow_seconds", "image_scale"):
            value = getattr(self, name)
            if value is not None and not (value > 0 or (name == "inference_median" and value == 0)):
                raise ValueError(f"SimConfig.{name} must be positive, got {value}")
        if self.error_body_style not in _ERROR_STYLES:
            raise ValueError(f"SimConfig.error_body_style must be one of {sorted(_ERROR_STYLES)}")
        for name in ("submit_burst", "poll_burst", "inference_polls", "max_concurrent", "balance"):
            value = getattr(self, name)
            if value is not None and value < (0 if name == "balance" else 1):
                raise ValueError(f"SimConfig.{name} must be at least 1 (balance: 0), got {value}")


@dataclass
class PredictionRecord:
    """One accepted prediction, as the simulator sees it. Times are ``time.monotonic()`` seconds."""

    id: str
    model: str
    task: str
    prompt: str
    n: int
    width: int  #: output size, scale applied
    height: int
    response_format: str
    body_sha256: str
    created_at: float
    created_wall: float  #: unix seconds, for the envelope's ``created_at``
    inference_seconds: float
    processing_at: float | None  #: when it turns ``processing`` (None when driven by poll count)
    completed_at: float | None  #: when it finished, or will (time-driven); None while poll-driven and running
    polls_to_complete: int | None  #: set when driven by poll count
    failed: bool
    polls: int = 0  #: polls answered 200
    images: tuple[str, ...] = ()  #: the inputs as received: URLs, or the file names of an images form
    inputs_sha256: tuple[str, ...] = ()  #: the bytes of each input, fetched (``fetch_inputs``) or received
    first_done_seen_at: float | None = None  #: the first poll that reported the final status

    def is_done(self, now: float) -> bool:
        return self.completed_at is not None and now >= self.completed_at


@dataclass
class SimStats:
    """What the simulator has seen and done; mutable, read by tests and benchmarks."""

    submit_requests: int = 0  #: every POST to a submit route (the OpenAI-format one too)
    images_requests: int = 0  #: every POST to the OpenAI-format route, ``/v1/images/edits``
    accepted: int = 0  #: billed submits (and billed requests of the OpenAI-format route)
    #: accepted submits whose canonical body had been accepted before (an images form: the same prompt,
    #: fields and image bytes; a presigned URL without its signature)
    duplicate_bodies: int = 0
    body_counts: dict[str, int] = field(default_factory=dict)  #: sha256 of canonical body → accepted count
    polls: int = 0  #: every GET of a result route (both origins), answered or not
    downloads: int = 0  #: every GET of an output image
    inputs: dict[str, int] = field(default_factory=dict)  #: sample input name → GETs of it
    input_times: list[float] = field(default_factory=list)  #: monotonic time of each input GET
    rate_limited: int = 0  #: 429s sent, all endpoints
    rate_limited_submits: int = 0
    status_counts: dict[int, int] = field(default_factory=dict)  #: HTTP status → error answers sent
    max_concurrent_seen: int = 0
    accepted_times: list[float] = field(default_factory=list)  #: monotonic time of each accepted submit
    rate_limited_times: list[float] = field(default_factory=list)  #: monotonic time of each submit's 429
    key_leaks: int = 0  #: requests with Authorization to the foreign origin or to an output URL
    predictions: dict[str, PredictionRecord] = field(default_factory=dict)
    poll_counts: dict[str, int] = field(default_factory=dict)  #: prediction id → polls answered 200
    dropped: int = 0  #: connections closed with no answer (submits)
    truncated_downloads: int = 0
    corrupt_downloads: int = 0

    def as_dict(self) -> dict[str, Any]:
        """Everything, JSON-ready."""
        return dataclasses.asdict(self)
