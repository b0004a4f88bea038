"""The project's exceptions: one base, and who raises each.

    BatchEngineError
    ├── UsageError              cli, config: a bad flag or environment value (exit 2)
    ├── ManifestError           manifest: every problem found in a manifest, listed (exit 2)
    ├── OutDirLocked            lock: another live run holds the out dir
    ├── JournalError            journal: the journal is unreadable or belongs to another manifest
    ├── InputFailed             staging, routes: a local input file cannot be read or staged; its item fails
    ├── OutputNotSaved          out_store: an output could not be PUT after retries; its item stays submitted
    ├── StagingRefused          staging, out_store: the object store refuses every request (credentials,
    │                           permission, bucket)
    └── ApiError                client: one HTTP exchange went wrong (never raised past the engine)
        ├── RetryLater          5xx, timeout or network error on a request that is safe to repeat
        │   └── NotAccepted     a submit the server certainly never saw (connection refused)
        ├── SlowDown            429: too many requests, or too many concurrent tasks
        ├── ItemRejected        400: invalid request or content policy; this item fails, no retry
        ├── SubmitOutcomeUnknown a submit was sent and its answer lost: it may have been billed
        ├── StopRun             401: the key is missing or invalid; nothing else can succeed
        └── StopSubmitting      403: no permission or no balance; finish what is in flight

aiohttp's exceptions are mapped to these in exactly one place, `client.ApiClient._exchange`.
A failed item is a value (`values.ItemError`), not an exception: only bugs and cancellation
escape the engine's task group.
"""

from __future__ import annotations

from dataclasses import dataclass

from batch_engine.values import ErrorKind


class BatchEngineError(Exception):
    """Base of every error this package raises on purpose."""


class UsageError(BatchEngineError):
    """A command-line flag, environment variable or setting is wrong; the message says how to fix it."""


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a manifest, located as precisely as it can be."""

    file: str
    message: str
    field: str | None = None  #: dotted path of the field, e.g. ``items[3].size`` or ``settings.rate``
    item_index: int | None = None  #: 0-based position in ``items``
    item_id: str | None = None
    line: int | None = None  #: 1-based line in the file (the manifest, or a CSV/JSONL items file), when known
    column: int | None = None  #: 1-based column of a CSV items file

    def __str__(self) -> str:
        where = self.file + (f":{self.line}" if self.line is not None else "")
        where += f":{self.column}" if self.column is not None and self.line is not None else ""
        parts = [where]
        if self.item_index is not None:
            parts.append(f"item {self.item_index}" + (f" ({self.item_id!r})" if self.item_id else ""))
        if self.field:
            parts.append(self.field)
        return ": ".join(parts) + ": " + self.message


class ManifestError(BatchEngineError):
    """A manifest failed validation; ``problems`` lists every problem found, not just the first."""

    def __init__(self, problems: list[Problem], *, more: int = 0) -> None:
        self.problems = problems
        self.more = more  #: problems found beyond those listed (a huge items file can hold millions)
        total = len(problems) + more
        noun = "problem" if total == 1 else "problems"
        lines = "\n".join(f"  {p}" for p in problems)
        tail = f"\n  ... and {more:,} more (fix these first, then validate again)" if more else ""
        super().__init__(f"{total:,} {noun} in the manifest:\n{lines}{tail}")


class OutDirLocked(BatchEngineError):
    """Another live run holds the out dir's lock; the message names it (pid, host, start time)."""


class JournalError(BatchEngineError):
    """The journal cannot be used as it is (corrupt, newer schema, or another job's)."""


class LeaseLost(BatchEngineError):
    """Another worker of a shared run holds the item now (this worker was taken for dead): it is not sent."""

    def __init__(self, item_id: str) -> None:
        super().__init__(f"item {item_id} is held by another worker now; not sending it")
        self.item_id = item_id
class InputFailed(BatchEngineError):
    """A local input file could not be read, or staged in the object store after retries: that item
    fails with kind ``input``, nothing was sent for it, and the others go on."""


class OutputNotSaved(BatchEngineError):
    """An output could not be PUT in the object store of ``--out s3://...`` after retries. Its item is not
    recorded as succeeded: it stays ``submitted``, and the next run polls and saves it again (never pays
    again)."""


class StagingRefused(BatchEngineError):
    """The object store refused credentials or permission, or the bucket is missing: every upload would
    fail the same way, so the run stops (resumable) instead of failing items one by one. Raised for input
    files staged there and for the outputs of ``--out s3://...`` alike."""


class ApiError(BatchEngineError):
    """One exchange with the API failed; ``status`` is the HTTP status (None for network errors).

    ``kind`` is what an item that fails of it is reported as (``ItemError.kind``).
    """

    kind: ErrorKind = ErrorKind.NETWORK

    def __init__(self, message: str, *, status: int | None = None, kind: ErrorKind | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        if kind is not None:
            self.kind = kind


class RetryLater(ApiError):
    """Server trouble or a network fault on a request that is safe to repeat (poll, download)."""

    kind = ErrorKind.SERVER_ERROR


class NotAccepted(RetryLater):
    """A submit that certainly never reached the server (connection refused): safe to resend."""

    kind = ErrorKind.NETWORK


class SlowDown(ApiError):
    """429. ``retry_after`` is the server's Retry-After in seconds, when it sent one."""

    kind = ErrorKind.RATE_LIMITED

    def __init__(self, message: str, *, status: int | None = 429, retry_after: float | None = None) -> None:
        super().__init__(message, status=status)
        self.retry_after = retry_after


class ItemRejected(ApiError):
    """400: the request is invalid (kind ``invalid_request``) or refused by policy (``content_policy``)."""

    kind = ErrorKind.INVALID_REQUEST


class SubmitOutcomeUnknown(ApiError):
    """A submit was sent but its answer was lost (timeout, dropped connection, 5xx): maybe billed."""

    kind = ErrorKind.NETWORK


class StopRun(ApiError):
    """401: the API key is missing or invalid."""


class StopSubmitting(ApiError):
    """403: the key lacks permission or the balance ran out; resumable after a top-up."""
