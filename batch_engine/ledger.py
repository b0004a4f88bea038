"""Where the stages record what happened to an item: the journal first, then the run's counters and views."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, TextIO

from batch_engine.report.entries import result_line
from batch_engine.store.files import RESULTS_NAME
from batch_engine.store.journal import Journal
from batch_engine.timeline import Timeline
from batch_engine.ui.progress import ProgressView
from batch_engine.values import ItemError, ItemRecord, ItemState, OutputFile

log = logging.getLogger(__name__)


class Watcher(Protocol):
    """Told of an item's progress once the journal holds it (the gallery's background files)."""

    def sending(self, item_id: str) -> None: ...

    def succeeded(self, outputs: Sequence[OutputFile]) -> None: ...


class Ledger:
    """Records state changes durably and counts them.

    Ordering is the crash-safety contract: every method awaits the journal's commit before it
    touches a counter, a file or the view, so nothing is ever reported that a crash could undo.
    """

    __slots__ = (
        "_clock",
        "_journal",
        "_results",
        "_started",
        "_view",
        "_watcher",
        "failed",
        "first_submit_at",
        "images",
        "last_submit_at",
        "polls",
        "rate_limited",
        "submit_attempts",
        "submits",
        "succeeded",
        "timeline",
    )

    def __init__(
        self,
        journal: Journal,
        *,
        view: ProgressView,
        clock: Callable[[], float] = time.time,
        watcher: Watcher | None = None,
    ) -> None:
        self._journal = journal
        self._view = view
        self._watcher = watcher
        self._clock = clock
        self._started = clock()
        self._results: TextIO | None = None
        counts = journal.counts()
        self.succeeded = counts[ItemState.SUCCEEDED]  #: items succeeded, before and during this run
        self.failed = counts[ItemState.FAILED]
        self.submits = 0  #: accepted submits in this run
        self.submit_attempts = 0  #: submit requests sent in this run
        self.images = 0  #: output files written in this run
        self.polls = 0  #: poll requests sent in this run
        self.rate_limited = 0  #: 429 answers in this run, submits and polls
        self.first_submit_at: float | None = None  #: unix seconds of this run's first accepted submit
        self.last_submit_at: float | None = None  #: ... and of its latest
        self.timeline = Timeline(self._started)

    @property
    def submit_rate(self) -> float | None:
        """Accepted submits per second from this run's first to its latest; None before the second."""
        first, last = self.first_submit_at, self.last_submit_at
        if first is None or last is None or last <= first:
            return None
        return (self.submits - 1) / (last - first)

    def open_results(self, out_dir: Path) -> None:
        """Append a line to ``results.jsonl`` as each item finishes.

        Never rewritten in place: a run killed at any moment leaves every line that was there. An item
        done again appears again (its last line is its current one); the end of the run replaces the file
        atomically with one line per item, in manifest order.
        """
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(out_dir / RESULTS_NAME, flags, 0o666)
        self._results = open(fd, "a", encoding="utf-8")  # noqa: SIM115 - closed by close_results

    def close_results(self) -> None:
        if self._results is not None:
            self._guarded(self._results.close)
            self._results = None

    def meta_of(self, item_id: str) -> Mapping[str, Any]:
        """An item's metadata (``meta:``), for an output path template that uses it."""
        record = self._journal.get(item_id)
        meta = record.spec.get("meta") if record is not None else None
        return meta if isinstance(meta, Mapping) else {}

    def tick(self, series: str) -> None:
        """Count one event in the timeline (``submitted``, ``finished``, ``rate_limited``)."""
        self.timeline.count(series, self._clock())

    def saw_rate_limit(self) -> None:
        self.rate_limited += 1
        self.tick("rate_limited")

    async def submitting(self, item_id: str) -> None:
        await self._journal.mark_submitting(item_id)
        self.submit_attempts += 1
        if self._watcher is not None:
            self._watcher.sending(item_id)

    async def not_accepted(self, item_id: str, *, possible_duplicate: bool = False) -> None:
        await self._journal.mark_pending(item_id, possible_duplicate=possible_duplicate)

    async def submitted(self, item_id: str, prediction_id: str) -> float:
        at = self._clock()
        await self._journal.mark_submitted(item_id, prediction_id=prediction_id, submitted_at=at)
        self.submits += 1
        if self.first_submit_at is None:
            self.first_submit_at = at
        self.last_submit_at = at
        self.timeline.count("submitted", at)
        log.debug("item %s submitted as %s", item_id, prediction_id)
        return at

    def answered(self) -> None:
        """Count a synchronous route's answer: an accepted (billed) submit that has no prediction id; the
        journal records it with the item's outputs (`succeed` with ``answered``)."""
        self.submits += 1
        self.tick("submitted")

    async def succeed(
        self,
        item_id: str,
        outputs: Sequence[OutputFile],
        inference_ms: int | None,
        *,
        durable: Sequence[Path] = (),
        answered: bool = False,
    ) -> None:
        """Record a success; ``durable`` names output files the journal must fsync before its commit;
        ``answered``: a synchronous route's answer, its row still ``submitting``."""
        record = await self._journal.mark_succeeded(
            item_id,
            outputs=outputs,
            completed_at=self._clock(),
            inference_ms=inference_ms,
            durable=durable,
            answered=answered,
        )
        self.succeeded += 1
        self.images += len(outputs)
        self._finished(record)
        if self._watcher is not None:
            self._watcher.succeeded(outputs)

    async def fail(self, item_id: str, error: ItemError, *, prediction_id: str | None = None) -> None:
        record = await self._journal.mark_failed(
            item_id, error=error, completed_at=self._clock(), prediction_id=prediction_id
        )
        self.failed += 1
        log.debug("item %s failed: %s: %s", item_id, error.kind, error.message)
        self._view.item_failed(item_id, error)
        self._finished(record)

    def _finished(self, record: ItemRecord) -> None:
        self.tick("finished")
        if self._results is not None:
            self._guarded(self._results.write, json.dumps(result_line(record)) + "\n")

    def flush_results(self) -> None:
        """Push finished lines to results.jsonl; the engine calls it on every progress tick."""
        if self._results is not None:
            self._guarded(self._results.flush)

    def _guarded(self, write: Callable[..., object], *args: str) -> None:
        """results.jsonl is a view the end of the run rewrites from the journal: a full disk here only
        stops the live copy, it never fails an item whose state the journal already holds."""
        try:
            write(*args)
        except OSError as exc:
            log.error("results.jsonl cannot be written (%s); it is rebuilt from the journal at the end", exc)
            results, self._results = self._results, None
            with contextlib.suppress(OSError):
                if results is not None:
                    results.close()
