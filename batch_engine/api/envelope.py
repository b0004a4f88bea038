"""Reading the API's prediction envelope and error bodies, in every variant the API is known to send."""

from __future__ import annotations

import enum
import json
import re
from collections.abc import Mapping
from typing import Any

from batch_engine.values import Prediction

#: Statuses seen in the wild. Anything unknown keeps being polled until the engine's own deadline.
_DONE = frozenset({"completed", "succeeded", "success"})
_FAILED = frozenset({"failed", "cancelled", "canceled", "timeout", "expired", "error"})


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


def parse_prediction(payload: Any) -> Prediction:
    """The ``data`` of a success answer as a `Prediction`; ValueError when it has no usable id."""
    data = payload.get("data") if isinstance(payload, Mapping) else None
    if not isinstance(data, Mapping):
        raise ValueError("the answer has no 'data' object")
    pred_id = data.get("id")
    if not isinstance(pred_id, str) or not pred_id:
        raise ValueError("the answer has no prediction id (data.id)")
    outputs = data.get("outputs") or []
    if isinstance(outputs, str):  # one output sent bare, not in a list
        outputs = [outputs]
    return Prediction(
        id=pred_id,
        status=str(data.get("status") or "created").strip().lower(),
        outputs=tuple(o for o in outputs if isinstance(o, str) and o),
        error=_error_text(data.get("error")),
        nsfw=_nsfw(_pick(data, "has_nsfw_contents", "hasNsfwContents")),
        inference_ms=_inference_ms(data),
        model=data.get("model") if isinstance(data.get("model"), str) else None,
        created_at=_str_or_none(_pick(data, "created_at", "createdAt")),
    )


def error_message(body: bytes) -> str:
    """The most useful sentence in an error body: ``error.message``, then ``message``, then the text."""
    text = body.decode("utf-8", errors="replace").strip()
    try:
        payload = json.loads(text)
    except ValueError:
        return _plain(text)
    if isinstance(payload, Mapping):
        err = payload.get("error")
        if isinstance(err, Mapping) and err.get("message"):
            return str(err["message"])
        if isinstance(err, str) and err:
            return err
        if payload.get("message"):
            return str(payload["message"])
    return _plain(text)


def body_code(body: bytes) -> int | None:
    """A numeric ``code`` in a JSON body that is not a success envelope (``{"code": 429, ...}``)."""
    try:
        payload = json.loads(body)
    except ValueError:
        return None
    if not isinstance(payload, Mapping) or isinstance(payload.get("data"), Mapping):
        return None
    code = payload.get("code")
    if isinstance(code, Mapping):
        return None
    try:
        return int(code) if code is not None else None
    except (TypeError, ValueError):
        return None


def _pick(data: Mapping[str, Any], *names: str) -> Any:
    for name in names:
        if name in data:
            return data[name]
    return None


def _error_text(value: Any) -> str | None:
    if value is None or value == "":
        return None
    if isinstance(value, Mapping):
        return str(value.get("message") or json.dumps(value))
    return str(value)


def _nsfw(value: Any) -> tuple[bool | None, ...]:
    if not isinstance(value, list):
        return ()
    return tuple(v if isinstance(v, bool) else None for v in value)


def _inference_ms(data: Mapping[str, Any]) -> int | None:
    timings = data.get("timings")
    candidates = [timings.get("inference") if isinstance(timings, Mapping) else None]
    candidates.append(_pick(data, "executionTime", "execution_time"))
    for value in candidates:
        if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
            return int(value)
    return None


def _str_or_none(value: Any) -> str | None:
    return str(value) if value not in (None, "") else None


_TAGS = re.compile(r"<[^>]+>")
_SPACE = re.compile(r"\s+")


def _plain(text: str, limit: int = 300) -> str:
    """A proxy's HTML page reduced to its words, and bounded: error messages end up in reports."""
    words = _SPACE.sub(" ", _TAGS.sub(" ", text)).strip()
    return words[:limit] + ("…" if len(words) > limit else "") if words else "(empty body)"
