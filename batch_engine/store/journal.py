"""What the engine needs of a journal, and the values and rules every journal shares.

The journal is the run's single source of truth: one row per manifest item. Every write is ``async`` and
returns only once its change is committed, so the engine can rely on this order: the intent to submit is
durable before the POST, the prediction id before anything else happens to it, an output only once
recorded. Reports are rebuilt from it. Every change of state a write makes is one of the named transitions
of `batch_engine.store.transitions`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Protocol, Self

from batch_engine.values import (
    ErrorKind,
    Item,
    ItemError,
    ItemRecord,
    ItemState,
    Manifest,
    OutputFile,
    RunMeta,
)

logger = logging.getLogger(__name__)

DEFAULT_READ_BATCH = 1000  #: rows fetched per query by ``records()``

AMBIGUOUS_SUBMIT_ERROR = ItemError(
    kind=ErrorKind.AMBIGUOUS_SUBMIT.value,
    message=(
        "the submit was sent but its answer was lost (the run stopped before it arrived): the server may "
        "have accepted and billed it, so it was not resent; check the provider's dashboard, or run again "
        "with --retry-failed to send it anyway"
    ),
)


@dataclass(frozen=True)
class SyncResult:
    """What ``sync_manifest`` did to the journal's rows."""

    added: int  #: new items, inserted pending
    changed: int  #: items whose fingerprint changed: the old version archived, the item reset to pending
    removed: int  #: items no longer in the manifest: retired to the archive (never deleted)
    unchanged: int  #: items whose state was kept
    restored: int = 0  #: items back from the archive as they were (outputs, prediction id); not counted above


class Journal(Protocol):
    """What the engine, the ledger and the reports need of a journal; ``SqliteJournal`` is the local one.

    Reads are synchronous and come from the thread that opened the journal; writes return once committed.
    """

    where: str  #: the journal as messages name it: its file, or its database URL without secrets

    async def close(self) -> None: ...
    async def __aenter__(self) -> Self: ...
    async def __aexit__(self, *exc_info: object) -> None: ...
    def meta(self) -> RunMeta | None: ...
    def get(self, item_id: str) -> ItemRecord | None: ...
    def records(
        self, states: Collection[ItemState] | None = None, *, batch: int = DEFAULT_READ_BATCH
    ) -> Iterator[ItemRecord]: ...
    def counts(self) -> dict[ItemState, int]: ...
    def versions(self, items: Sequence[Item]) -> dict[str, ItemRecord]: ...
    def error_kind_counts(self) -> dict[str, int]: ...
    def possible_duplicate_count(self) -> int: ...
    async def set_meta(self, meta: RunMeta) -> None: ...
    async def sync_manifest(
        self, manifest: Manifest, *, intact: Callable[[Sequence[OutputFile]], bool] | None = None
    ) -> SyncResult:
        """Make the rows match the manifest; an archived success comes back only when ``intact`` finds
        its outputs (default: in the out dir, with their sha256)."""
    async def mark_submitting(self, item_id: str) -> int: ...
    async def mark_submitted(self, item_id: str, *, prediction_id: str, submitted_at: float) -> None: ...
    async def mark_succeeded(
        self,
        item_id: str,
        *,
        outputs: Sequence[OutputFile],
        completed_at: float,
        inference_ms: int | None,
        durable: Sequence[Path] = (),
        answered: bool = False,
    ) -> ItemRecord:
        """Record a success: from ``submitted`` (transition ``succeed``), or with ``answered`` from
        ``submitting``, a synchronous route's answer that had no prediction id (``answered``)."""
    async def mark_failed(
        self,
        item_id: str,
        *,
        error: ItemError,
        completed_at: float | None = None,
        prediction_id: str | None = None,
    ) -> ItemRecord: ...
    async def mark_pending(self, item_id: str, *, possible_duplicate: bool = False) -> None:
        """The submit was not accepted, or its answer was lost and it is sent again (transition
        ``not_accepted``)."""

    async def resolve_ambiguous(self, *, resubmit: bool) -> list[str]: ...
    async def repair_damaged(self) -> list[str]: ...
    async def adopt(self, records: Sequence[ItemRecord]) -> int: ...
    def is_empty(self) -> bool: ...
    def retired_count(self) -> int: ...
    async def reset_failed(self) -> int: ...
    async def reset_all(self) -> None: ...


def dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=_plain)


def _plain(value: object) -> object:
    if isinstance(value, Mapping):
        return dict(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def decode_record(row: tuple[Any, ...]) -> ItemRecord:
    """A journal row as an ``ItemRecord``; a row that cannot be read comes back ``damaged``, saying why.

    Never raises: a hand-edited or corrupted value must not stop a run or a report, nor disappear.
    """
    idx, item_id, fingerprint, spec, request, state, prediction_id, attempts, duplicate = row[:9]
    outputs, error, submitted_at, completed_at, inference_ms = row[9:]
    damage: list[str] = []
    record = ItemRecord(
        index=idx if isinstance(idx, int) else -1,
        item_id=str(item_id),
        fingerprint=str(fingerprint),
        spec=_mapping(spec, "spec", damage),
        request=_mapping(request, "request", damage),
        state=_state(state, damage),
        prediction_id=prediction_id if isinstance(prediction_id, str) else None,
        attempts=attempts if isinstance(attempts, int) else 0,
        possible_duplicate=bool(duplicate),
        outputs=_outputs(outputs, damage),
        error=_error(error, damage),
        submitted_at=_number(submitted_at),
        completed_at=_number(completed_at),
        inference_ms=inference_ms if isinstance(inference_ms, int) else None,
    )
    if not damage:
        return record
    return dataclasses.replace(record, state=ItemState.DAMAGED, damage="; ".join(damage))


def _loads(text: Any, what: str, damage: list[str]) -> Any:
    try:
        return json.loads(text)
    except (TypeError, ValueError):
        damage.append(f"{what} is not JSON: {str(text)[:60]!r}")
        return None


def _mapping(text: Any, what: str, damage: list[str]) -> Mapping[str, Any]:
    value = _loads(text, what, damage)
    if isinstance(value, Mapping):
        return value
    if value is not None:
        damage.append(f"{what} is not a mapping")
    return {}


def _state(value: Any, damage: list[str]) -> ItemState:
    try:
        state = ItemState(value)
    except ValueError:
        state = ItemState.DAMAGED
    if state is ItemState.DAMAGED:
        damage.append(f"state {str(value)[:40]!r} is not a state")
    return state


def _outputs(text: Any, damage: list[str]) -> tuple[OutputFile, ...]:
    if text is None:
        return ()
    listed = _loads(text, "outputs", damage)
    try:
        return tuple(
            OutputFile(str(o["path"]), str(o["sha256"]), o.get("url"), o.get("nsfw")) for o in listed
        )
    except (TypeError, KeyError, AttributeError):
        if listed is not None:
            damage.append("outputs is not a list of {path, sha256, ...}")
        return ()


def _error(text: Any, damage: list[str]) -> ItemError | None:
    if text is None:
        return None
    value = _loads(text, "error", damage)
    if not isinstance(value, Mapping):
        return ItemError(
            "unknown", f"the journal's record of this error could not be read: {str(text)[:200]!r}"
        )
    status = value.get("status")
    return ItemError(
        str(value.get("kind") or "unknown"),
        str(value.get("message") or ""),
        status if isinstance(status, int) and not isinstance(status, bool) else None,
    )


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def decode_meta(data: Mapping[str, Any]) -> RunMeta:
    known = {f.name for f in fields(RunMeta)}
    return RunMeta(**{key: value for key, value in data.items() if key in known})


#: Failures of a prediction that was accepted and may yet be (or have been) completed: --retry-failed
#: polls it again instead of paying for a new one.
REPOLL_KINDS = (
    ErrorKind.TIMEOUT,
    ErrorKind.DOWNLOAD,
    ErrorKind.NETWORK,
    ErrorKind.SERVER_ERROR,
    ErrorKind.RATE_LIMITED,
)
