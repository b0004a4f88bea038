"""What the report files say of an item and of a run: the counts, one results.jsonl line, one report entry."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from batch_engine.values import ItemRecord, ItemState

logger = logging.getLogger(__name__)


class Records(Protocol):
    """A fresh iterator of the journal's records in manifest order, all of them or those in ``states``."""

    def __call__(self, states: Collection[ItemState] | None = None) -> Iterator[ItemRecord]: ...


#: the run summary copied from ``RunStats.as_dict()`` into report.yaml, in this order
SUMMARY_KEYS = (
    "elapsed",
    "images",
    "submits",
    "submit_attempts",
    "rate_limited",
    "polls",
    "predictions_resolved",
    "polls_per_prediction",
    "submit_rate",
    "rate_final",
    "rate_ceiling",
    "run_succeeded",
    "run_failed",
    "in_flight_cap",  #: the in-flight cap at the end (auto or the user's), and the most held at once
    "in_flight_max",
    "held_back_by",  #: the limit the run waited on most: rate, in_flight, rate_limits or polls
    "workers",  #: a shared run: the workers that worked it (listed only then)
    "workers_died",  #: ... and those that died on the way (their counts went with them)
)
#: Listed in report.yaml's header always; ``damaged`` too, but only when some row is.
UNFINISHED_STATES = tuple(s.value for s in ItemState if not s.is_final and s is not ItemState.DAMAGED)


@dataclass(frozen=True)
class Counts:
    """What one pass over the records counts, for the headers of report.yaml and index.html."""

    total: int = 0
    by_state: Mapping[str, int] = field(default_factory=dict)
    by_error_kind: Mapping[str, int] = field(default_factory=dict)  #: failed items only, most common first
    possible_duplicates: int = 0
    images: int = 0  #: output files recorded for all items, across runs

    @property
    def succeeded(self) -> int:
        return self.by_state.get(ItemState.SUCCEEDED.value, 0)

    @property
    def failed(self) -> int:
        return self.by_state.get(ItemState.FAILED.value, 0)

    @property
    def unfinished(self) -> int:
        return self.total - self.succeeded - self.failed


def count_items(records: Iterable[ItemRecord]) -> Counts:
    """Count items by state and by error kind, duplicates and images, in one pass."""
    states: Counter[str] = Counter()
    kinds: Counter[str] = Counter()
    duplicates = images = 0
    for record in records:
        states[record.state.value] += 1
        if record.state is ItemState.FAILED:
            kinds[record.error.kind if record.error else "unknown"] += 1
        duplicates += record.possible_duplicate
        images += len(record.outputs)
    by_kind = dict(sorted(kinds.items(), key=lambda kv: (-kv[1], kv[0])))
    return Counts(sum(states.values()), dict(states), by_kind, duplicates, images)


def iso_utc(timestamp: float | None) -> str | None:
    """Unix seconds as ISO 8601 UTC to the second, e.g. ``2026-01-01T09:30:00Z``; None stays None."""
    if timestamp is None:
        return None
    moment = datetime.fromtimestamp(timestamp, UTC)
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")


def _error(record: ItemRecord) -> dict[str, Any] | None:
    if record.damage is not None:  # a journal row that cannot be read: say what is wrong with it
        message = f"the journal's row is damaged: {record.damage}"
        return {"kind": "damaged", "status": None, "message": message}
    return record.error.as_dict() if record.error else None


def _common(record: ItemRecord) -> dict[str, Any]:
    return {
        "id": record.item_id,
        "status": record.state.value,
        "prediction_id": record.prediction_id,
        "outputs": [output.as_dict() for output in record.outputs],
        "error": _error(record),
        "attempts": record.attempts,
        "possible_duplicate": record.possible_duplicate,
        "fingerprint": record.fingerprint,  # of the request: a lost journal can be rebuilt from this line
        **({"meta": dict(meta)} if isinstance(meta := record.spec.get("meta"), Mapping) and meta else {}),
    }


def result_line(record: ItemRecord) -> dict[str, Any]:
    """One item's JSON object for results.jsonl: flat timings, for programs."""
    return {
        **_common(record),
        "submitted_at": iso_utc(record.submitted_at),
        "completed_at": iso_utc(record.completed_at),
        "inference_ms": record.inference_ms,
    }


def report_entry(record: ItemRecord) -> dict[str, Any]:
    """One item's entry under report.yaml's ``items:``: timings grouped, for people."""
    timings = {
        "submitted": iso_utc(record.submitted_at),
        "completed": iso_utc(record.completed_at),
        "inference_ms": record.inference_ms,
    }
    return {**_common(record), "timings": timings}
