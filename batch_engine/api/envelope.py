"""Reading the API's prediction envelope and error bodies, in every variant the API is known to send.

Everything here reads foreign data, so each value is taken only in the type and range it is meant to
have: a prediction id must be one path segment of a conservative alphabet, numbers must be finite and
sane, strings are scrubbed of the API key (``scrub``) and then bounded, and anything else is dropped.
Nothing a server sends makes these functions raise anything but ValueError.
"""

from __future__ import annotations

import enum
import json
import re
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import quote

from batch_engine.values import Prediction

#: Statuses seen in the wild. Anything unknown keeps being polled until the engine's own deadline.
_DONE = frozenset({"completed", "succeeded", "success"})
_FAILED = frozenset({"failed", "cancelled", "canceled", "timeout", "expired", "error"})

#: What a prediction id may be: one path segment (the poll URL is built from it), never ``.`` or ``..``.
PREDICTION_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
MAX_MESSAGE_CHARS = 1000  #: error messages are kept in four files: a 50 MB one is cut, its length noted
MAX_STATUS_CHARS = 64
MAX_FIELD_CHARS = 200  #: ``model``, ``created_at``
MAX_INFERENCE_MS = 7 * 24 * 3600 * 1000  #: a week, the longest timeout a run may set; more is nonsense
#: How much of a body is read for a message: enough for any error sentence, little for a regex to chew.
MESSAGE_SOURCE_BYTES = 64 * 1024
#: Keys shorter than this are no real keys: scrubbing them would rewrite ordinary words.
MIN_SECRET_CHARS = 6

#: ``loads`` of a body that is not JSON (or is JSON nested too deeply to read).
NOT_JSON: Any = object()

Scrub = Callable[[str], str]


class Phase(enum.Enum):
    """What a prediction's status means to the engine."""

    PENDING = "pending"
    DONE = "done"
    FAILED = "failed"


def phase(status: str) -> Phase:
    if status in _DONE:
        return Phase.DONE
    if status in _FAILED:
        return Phase.FAILED
    return Phase.PENDING


def scrubber(secret: str) -> Scrub:
    """A function that replaces ``secret`` (as is and percent-encoded) with ``***`` in a string."""
    forms = tuple({secret, quote(secret, safe="")}) if len(secret) >= MIN_SECRET_CHARS else ()

    def scrub(text: str) -> str:
        for form in forms:
            if form in text:
                text = text.replace(form, "***")
        return text

    return scrub


def _keep(text: str) -> str:
    return text


def bounded(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """``text`` cut to ``limit`` characters, saying how long it was; scrub before, never after."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… (cut: {len(text):,} characters in all)"


def usable_id(value: object) -> bool:
    """Whether ``value`` can be a prediction id: see `PREDICTION_ID`; dots alone would climb the URL."""
    return isinstance(value, str) and PREDICTION_ID.fullmatch(value) is not None and value.strip(".") != ""


def shown_id(value: object) -> str:
    """A prediction id as an error message shows it: short, whatever it is."""
    text = value if isinstance(value, str) else type(value).__name__
    return repr(text[:40] + ("…" if len(text) > 40 else ""))


def loads(body: bytes) -> Any:
    """``body`` as JSON, or `NOT_JSON`: invalid, or nested deeper than the parser's recursion limit."""
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        return NOT_JSON


def parse_prediction(payload: Any, *, scrub: Scrub = _keep) -> Prediction:
    """The ``data`` of a success answer as a `Prediction`; ValueError when it has no usable id."""
    data = payload.get("data") if isinstance(payload, Mapping) else None
    if not isinstance(data, Mapping):
        raise ValueError("the answer has no 'data' object")
    raw_id = data.get("id")
    pred_id = scrub(raw_id) if isinstance(raw_id, str) else raw_id
    if not pred_id:
        raise ValueError("the answer has no prediction id (data.id)")
    if not usable_id(pred_id):
        allowed = "1 to 128 of A-Z a-z 0-9 . _ : -, not only dots"
        raise ValueError(f"the prediction id {shown_id(pred_id)} is not usable ({allowed})")
    return Prediction(
        id=pred_id,
        status=_status(data.get("status"), scrub),
        outputs=_outputs(data.get("outputs"), scrub),
        error=_error_text(data.get("error"), scrub),
        nsfw=_nsfw(_pick(data, "has_nsfw_contents", "hasNsfwContents")),
        inference_ms=_inference_ms(data),
        model=_field(data.get("model"), scrub),
        created_at=_field(_pick(data, "created_at", "createdAt"), scrub),
    )


def error_message(payload: Any, body: bytes, *, scrub: Scrub = _keep) -> str:
    """The most useful sentence in an error body: ``error.message``, then ``message``, then the text.

    ``payload`` is ``loads(body)``: the body is parsed once, by the caller.
    """
    if isinstance(payload, Mapping):
        err = payload.get("error")
        found = _text(err.get("message")) if isinstance(err, Mapping) else None
        found = found or (err if isinstance(err, str) else None) or _text(payload.get("message"))
        if found:
            return bounded(scrub(found))
    return _plain(scrub(body[:MESSAGE_SOURCE_BYTES].decode("utf-8", errors="replace")))


def body_code(payload: Any) -> int | None:
    """A ``code`` in a JSON body that is not a success envelope (``{"code": 429, ...}``), if it is an HTTP
    status (100-599); anything else (``1e999``, ``"x"``, a list) is no code."""
    if not isinstance(payload, Mapping) or isinstance(payload.get("data"), Mapping):
        return None
    code = payload.get("code")
    if isinstance(code, str):
        code = int(code) if _STATUS_TEXT.fullmatch(code) else None
    elif isinstance(code, float):
        code = int(code) if code.is_integer() else None  # False for inf and nan
    if isinstance(code, int) and not isinstance(code, bool) and 100 <= code <= 599:
        return code
    return None


_STATUS_TEXT = re.compile(r"\s*[0-9]{3}\s*")


def _pick(data: Mapping[str, Any], *names: str) -> Any:
    for name in names:
        if name in data:
            return data[name]
    return None


def _text(value: Any) -> str | None:
    """A string, or a number written out; containers and everything else are no text."""
    if isinstance(value, str):
        return value or None
    if isinstance(value, int | float) and not isinstance(value, bool):
        return repr(value)  # json.loads never makes an int too long to write
    return None


def _status(value: Any, scrub: Scrub) -> str:
    if value is None or value == "":
        return "created"
    if not isinstance(value, str):
        return "unknown"  # polled again, as any status the engine does not know, until the deadline
    return scrub(value).strip().lower()[:MAX_STATUS_CHARS]


def _outputs(value: Any, scrub: Scrub) -> tuple[str, ...]:
    if isinstance(value, str):  # one output sent bare, not in a list
        value = [value]
    if not isinstance(value, list):
        return ()
    return tuple(scrub(o) for o in value if isinstance(o, str) and o)


def _error_text(value: Any, scrub: Scrub) -> str | None:
    if value is None or value == "":
        return None
    if isinstance(value, Mapping):
        text = _text(value.get("message")) or _compact(value)
    else:
        text = _text(value) or _compact(value)
    return bounded(scrub(text))


def _compact(value: Any) -> str:
    """An error object with no message, written out as JSON (or said to be unreadable)."""
    try:
        return json.dumps(value, ensure_ascii=False)
    except (ValueError, TypeError, RecursionError):
        return "(an error value that cannot be shown)"


def _nsfw(value: Any) -> tuple[bool | None, ...]:
    if not isinstance(value, list):
        return ()
    return tuple(v if isinstance(v, bool) else None for v in value)


def _inference_ms(data: Mapping[str, Any]) -> int | None:
    """Milliseconds of inference, when a number in (0, a week]: 1e999 or 1e30 (past SQLite's INTEGER)
    say nothing true, so they are dropped rather than clamped to a made-up figure."""
    timings = data.get("timings")
    candidates = [timings.get("inference") if isinstance(timings, Mapping) else None]
    candidates.append(_pick(data, "executionTime", "execution_time"))
    for value in candidates:
        if isinstance(value, int | float) and not isinstance(value, bool) and 0 < value <= MAX_INFERENCE_MS:
            return int(value)
    return None


def _field(value: Any, scrub: Scrub) -> str | None:
    text = _text(value)
    return scrub(text)[:MAX_FIELD_CHARS] if text else None


_TAGS = re.compile(r"<[^>]+>")
_SPACE = re.compile(r"\s+")


def _plain(text: str, limit: int = 300) -> str:
    """A proxy's HTML page reduced to its words, and bounded: error messages end up in reports."""
    words = _SPACE.sub(" ", _TAGS.sub(" ", text)).strip()
    return words[:limit] + ("…" if len(words) > limit else "") if words else "(empty body)"
