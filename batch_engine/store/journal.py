"""What the engine needs of a journal, and the values and rules every journal shares.

The journal is the run's single source of truth: one row per manifest item. Every write is ``async`` and
returns only once its change is committed, so the engine can rely on this order: the intent to submit is
durable before the POST, the prediction id before anything else happens to it, an output only once
recorded. Reports are rebuilt from it. Every change of state a write makes is one of the named transitions
of `batch_engine.store.transitions`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Protocol, Self

from batch_engine.values import ErrorKind, ItemError, ItemRecord, ItemState, Manifest, OutputFile, RunMeta

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
    changed: int  #: items whose fingerprint changed, reset to pending
    removed: int  #: rows of items no longer in the manifest, deleted
    unchanged: int  #: items whose state was kept


class Journal(Protocol):
    """What the engine, the ledger and the reports need of a journal; ``SqliteJournal`` is the local one.

    Reads are synchronous and come from the thread that opened the journal; writes return once committed.
    """

    path: Path

    async def close(self) -> None: ...
    async def __aenter__(self) -> Self: ...
    async def __aexit__(self, *exc_info: object) -> None: ...
    def meta(self) -> RunMeta | None: ...
    def get(self, item_id: str) -> ItemRecord | None: ...
    def records(
        self, states: Collection[ItemState] | None = None, *, batch: int = DEFAULT_READ_BATCH
    ) -> Iterator[ItemRecord]: ...
    def counts(self) -> dict[ItemState, int]: ...
    def error_kind_counts(self) -> dict[str, int]: ...
    def possible_duplicate_count(self) -> int: ...
    async def set_meta(self, meta: RunMeta) -> None: ...
    async def sync_manifest(self, manifest: Manifest) -> SyncResult: ...
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
    ) -> ItemRecord: ...
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
    async def reset_failed(self) -> int: ...
    async def reset_all(self) -> None: ...


def dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=_plain)


def _plain(value: object) -> object:
    if isinstance(value, Mapping):
        return dict(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def decode_record(row: tuple[Any, ...]) -> ItemRecord:
    idx, item_id, fingerprint, spec, request, state, prediction_id, attempts, duplicate = row[:9]
    outputs, error, submitted_at, completed_at, inference_ms = row[9:]
    return ItemRecord(
        index=idx,
        item_id=item_id,
        fingerprint=fingerprint,
        spec=json.loads(spec),
        request=json.loads(request),
        state=ItemState(state),
        prediction_id=prediction_id,
        attempts=attempts,
        possible_duplicate=bool(duplicate),
        outputs=tuple(OutputFile(**output) for output in json.loads(outputs)) if outputs else (),
        error=ItemError(**json.loads(error)) if error else None,
        submitted_at=submitted_at,
        completed_at=completed_at,
        inference_ms=inference_ms,
    )


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
