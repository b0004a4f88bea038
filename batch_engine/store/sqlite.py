"""The durable journal: one SQLite row per manifest item, the run's single source of truth.

Every write is ``async`` and returns only once its change is committed to disk, so the engine can
rely on this order: the intent to submit is durable before the POST, the prediction id before
anything else happens to it, an output only once recorded. Reports are rebuilt from the journal.

Writes go through one writer thread with group commit: callers queue an operation and await a
future; the thread applies everything queued in one transaction, commits once (one fsync) and then
resolves every future. A write may name files it records (``durable``): the thread fsyncs them, and
each of their folders once, before that commit, so output files are made durable in groups too.
Reads use their own connection on the caller's thread (WAL readers never block the writer) and are
synchronous.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import queue
import sqlite3
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Protocol, TypeVar, cast

from batch_engine.errors import JournalError
from batch_engine.store.files import JOURNAL_NAME, fsync_path
from batch_engine.values import ErrorKind, ItemError, ItemRecord, ItemState, Manifest, OutputFile, RunMeta

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
DEFAULT_MAX_BATCH = 1000  #: writes applied in one transaction, at most
DEFAULT_READ_BATCH = 1000  #: rows fetched per query by ``records()``
BUSY_TIMEOUT = 30.0  #: seconds a connection waits for a lock held by another connection

_T = TypeVar("_T")
Apply = Callable[[sqlite3.Connection], Any]

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS items (
        item_id TEXT PRIMARY KEY,
        idx INTEGER NOT NULL,
        fingerprint TEXT NOT NULL,
        spec TEXT NOT NULL,
        request TEXT NOT NULL,
        state TEXT NOT NULL DEFAULT 'pending',
        prediction_id TEXT,
        attempts INTEGER NOT NULL DEFAULT 0,
        possible_duplicate INTEGER NOT NULL DEFAULT 0,
        outputs TEXT,
        error TEXT,
        submitted_at REAL,
        completed_at REAL,
        inference_ms INTEGER,
        updated_at REAL NOT NULL
    )""",
    """CREATE INDEX IF NOT EXISTS items_order ON items (idx, item_id)""",
)
_COLUMNS = (
    "idx, item_id, fingerprint, spec, request, state, prediction_id, attempts, possible_duplicate,"
    " outputs, error, submitted_at, completed_at, inference_ms"
)
_PENDING, _SUBMITTING, _SUBMITTED = ItemState.PENDING, ItemState.SUBMITTING, ItemState.SUBMITTED
#: the states each ``mark_*`` accepts an item in; anything else is a bug in the caller
_SOURCES: dict[ItemState, tuple[ItemState, ...]] = {
    ItemState.SUBMITTING: (_PENDING,),  #: a second intent would hide that the first POST may have landed
    ItemState.SUBMITTED: (_SUBMITTING,),
    ItemState.SUCCEEDED: (_SUBMITTED,),
    ItemState.FAILED: (_PENDING, _SUBMITTING, _SUBMITTED),
    ItemState.PENDING: (_PENDING, _SUBMITTING, _SUBMITTED),
}
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
    """What the engine needs of a journal; ``SqliteJournal`` is the local implementation."""

    path: Path

    async def close(self) -> None: ...
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
    async def mark_pending(self, item_id: str, *, possible_duplicate: bool = False) -> None: ...
    async def resolve_ambiguous(self, *, resubmit: bool) -> list[str]: ...
    async def reset_failed(self) -> int: ...
    async def reset_all(self) -> None: ...


class SqliteJournal:
    """The journal in ``<out_dir>/journal.sqlite``: WAL mode, ``synchronous=FULL``, group commit.

    Open it with ``await SqliteJournal.open(out_dir)``. Reads must come from the thread that opened
    it (the event loop's); writes may come from any task of any event loop.
    """

    __slots__ = ("_clock", "_closed", "_reader", "_writer", "path")

    def __init__(
        self, path: Path, writer: _Writer, reader: sqlite3.Connection, clock: Callable[[], float]
    ) -> None:
        self.path = path  #: the database file
        self._writer = writer
        self._reader = reader  #: only ever used by the thread that opened the journal
        self._clock = clock
        self._closed = False

    @classmethod
    async def open(
        cls,
        out_dir: Path,
        *,
        max_batch: int = DEFAULT_MAX_BATCH,
        max_pages: int | None = None,
        clock: Callable[[], float] = time.time,
    ) -> SqliteJournal:
        """Open (creating if needed) the journal of ``out_dir`` and start its writer thread.

        ``max_pages`` caps the database size (SQLite's ``max_page_count``): writes past it fail as
        on a full disk. ``clock`` stamps ``updated_at``.
        """
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / JOURNAL_NAME
        writer = _Writer(path, max_batch=max_batch, max_pages=max_pages)
        try:
            await writer.write(lambda conn: _init_schema(conn, path))
            reader = _connect(path)
            reader.execute("PRAGMA query_only=ON")
        except BaseException:
            await writer.stop()
            raise
        return cls(path, writer, reader, clock)

    async def close(self) -> None:
        """Let every queued write commit, stop the writer and close both connections. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            await self._writer.stop()
        finally:
            self._reader.close()

    async def __aenter__(self) -> SqliteJournal:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<SqliteJournal {str(self.path)!r} {state} {self._writer!r}>"

    @property
    def commit_count(self) -> int:
        """Transactions committed by the writer since ``open``."""
        return self._writer.commits

    @property
    def write_count(self) -> int:
        """Write operations committed since ``open`` (``write_count / commit_count`` = batch size)."""
        return self._writer.writes

    # -- reads ---------------------------------------------------------------------------------

    def meta(self) -> RunMeta | None:
        row = self._reader.execute("SELECT value FROM meta WHERE key = 'run'").fetchone()
        return None if row is None else _run_meta(json.loads(row[0]))

    def get(self, item_id: str) -> ItemRecord | None:
        row = self._reader.execute(f"SELECT {_COLUMNS} FROM items WHERE item_id = ?", (item_id,)).fetchone()
        return None if row is None else _record(row)

    def records(
        self, states: Collection[ItemState] | None = None, *, batch: int = DEFAULT_READ_BATCH
    ) -> Iterator[ItemRecord]:
        """Rows in manifest order, optionally only those in ``states``, fetched ``batch`` at a time.

        Each batch is its own query (keyset paging), so no read transaction stays open between
        batches and writes made meanwhile show up in later batches.
        """
        if batch < 1:
            raise ValueError(f"batch must be at least 1, not {batch}")
        wanted = [] if states is None else [ItemState(s).value for s in states]
        if states is not None and not wanted:
            return iter(())
        return self._pages(wanted, batch)

    def _pages(self, wanted: list[str], batch: int) -> Iterator[ItemRecord]:
        where = f" AND state IN ({', '.join('?' * len(wanted))})" if wanted else ""
        sql = (
            f"SELECT {_COLUMNS} FROM items WHERE (idx, item_id) > (?, ?){where} ORDER BY idx, item_id LIMIT ?"
        )
        after: tuple[int, str] = (-1, "")
        while True:
            rows = self._reader.execute(sql, (*after, *wanted, batch)).fetchall()
            yield from map(_record, rows)
            if len(rows) < batch:
                return
            after = (rows[-1][0], rows[-1][1])

    def counts(self) -> dict[ItemState, int]:
        """Items per state; every state is a key."""
        found = dict(self._reader.execute("SELECT state, count(*) FROM items GROUP BY state").fetchall())
        return {state: found.get(state.value, 0) for state in ItemState}

    def error_kind_counts(self) -> dict[str, int]:
        """Failed items per ``error.kind``."""
        rows = self._reader.execute(
            "SELECT json_extract(error, '$.kind'), count(*) FROM items"
            " WHERE state = 'failed' AND error IS NOT NULL GROUP BY 1 ORDER BY 1"
        ).fetchall()
        return {str(kind): count for kind, count in rows}

    def possible_duplicate_count(self) -> int:
        row = self._reader.execute("SELECT count(*) FROM items WHERE possible_duplicate").fetchone()
        return int(row[0])

    # -- writes: each returns once committed -----------------------------------------------------

    async def set_meta(self, meta: RunMeta) -> None:
        value = _dumps({f.name: getattr(meta, f.name) for f in fields(RunMeta)})
        await self._write(lambda conn: _put_meta(conn, "run", value), savepoint=False)

    async def sync_manifest(self, manifest: Manifest) -> SyncResult:
        """Make the rows match ``manifest``: add new items, reset changed ones, delete removed ones."""
        now = self._clock()
        return await self._write(lambda conn: _sync(conn, manifest, now))

    async def mark_submitting(self, item_id: str) -> int:
        """Record the intent to submit (before the POST); returns the item's new ``attempts``."""
        sets = "attempts = attempts + 1"
        row = await self._move(item_id, ItemState.SUBMITTING, sets, (), returning="attempts")
        return int(row[0])

    async def mark_submitted(self, item_id: str, *, prediction_id: str, submitted_at: float) -> None:
        sets = "prediction_id = ?, submitted_at = ?"
        await self._move(item_id, ItemState.SUBMITTED, sets, (prediction_id, submitted_at), returning="state")

    async def mark_succeeded(
        self,
        item_id: str,
        *,
        outputs: Sequence[OutputFile],
        completed_at: float,
        inference_ms: int | None,
        durable: Sequence[Path] = (),
    ) -> ItemRecord:
        """Record a success; returns the item's final row (the UPDATE returns it: no second query).

        ``durable``: the output files, written but not yet fsynced; they are fsynced (with their
        folders) before the commit, and an OSError doing so fails this write and nothing else.
        """
        sets = "outputs = ?, completed_at = ?, inference_ms = ?, error = NULL"
        encoded = _dumps([output.as_dict() for output in outputs])
        params = (encoded, completed_at, inference_ms)
        return _record(await self._move(item_id, ItemState.SUCCEEDED, sets, params, durable=tuple(durable)))

    async def mark_failed(
        self,
        item_id: str,
        *,
        error: ItemError,
        completed_at: float | None = None,
        prediction_id: str | None = None,
    ) -> ItemRecord:
        """Record a failure; returns the item's final row."""
        sets = "error = ?, completed_at = ?, prediction_id = coalesce(?, prediction_id)"
        params = (_dumps(error.as_dict()), completed_at, prediction_id)
        return _record(await self._move(item_id, ItemState.FAILED, sets, params))

    async def mark_pending(self, item_id: str, *, possible_duplicate: bool = False) -> None:
        """Back to pending; a ``possible_duplicate`` flag once set stays set (for the report)."""
        sets = "possible_duplicate = max(possible_duplicate, ?), prediction_id = NULL, submitted_at = NULL"
        await self._move(item_id, ItemState.PENDING, sets, (int(possible_duplicate),), returning="state")

    async def resolve_ambiguous(self, *, resubmit: bool) -> list[str]:
        """Settle rows left ``submitting`` by a stopped run: resend them (flagged) or fail them."""
        now = self._clock()
        return await self._write(lambda conn: _resolve_ambiguous(conn, resubmit, now))

    async def reset_failed(self) -> int:
        """Failed items back to work (``--retry-failed``); returns how many.

        An item whose accepted prediction failed on our side (timeout, download, network, balance...)
        goes back to ``submitted`` and is polled again, not paid for again; the rest go back to
        ``pending`` with their attempts kept, an ambiguous submit flagged ``possible_duplicate``.
        """
        now = self._clock()
        return await self._write(lambda conn: _reset_failed(conn, now))

    async def reset_all(self) -> None:
        """Forget every item and the run meta (``--fresh``); the schema stays."""
        await self._write(_reset_all)

    async def _move(
        self,
        item_id: str,
        target: ItemState,
        sets: str,
        params: tuple[Any, ...],
        *,
        durable: tuple[Path, ...] = (),
        returning: str = _COLUMNS,
    ) -> tuple[Any, ...]:
        """Move one item; returns the ``returning`` columns of its new row, for the caller to decode
        (off the writer thread, and only what it needs: JSON columns are not cheap)."""
        now = self._clock()
        move = functools.partial(
            _move, item_id=item_id, target=target, sets=sets, params=params, now=now, returning=returning
        )
        return await self._write(move, savepoint=False, durable=durable)

    async def _write(
        self,
        apply: Callable[[sqlite3.Connection], _T],
        *,
        savepoint: bool = True,
        durable: tuple[Path, ...] = (),
    ) -> _T:
        if self._closed:
            raise JournalError(f"the journal {self.path} is closed; no more writes are accepted")
        return await self._writer.write(apply, savepoint=savepoint, durable=durable)


@dataclass(slots=True)
class _Job:
    """One queued write and where its caller waits for it."""

    apply: Apply | None  #: None for the stop request
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any]
    #: run ``apply`` in a savepoint, so that a failure undoes its partial changes; a job of one
    #: statement needs none (SQLite undoes a failed statement by itself) and skips the cost
    savepoint: bool = True
    durable: tuple[Path, ...] = ()  #: files to fsync (with their folders) before the commit


@dataclass(slots=True)
class _Outcome:
    job: _Job
    value: Any = None
    error: BaseException | None = None


class _TransactionLost(Exception):
    """SQLite rolled back the whole transaction (e.g. on SQLITE_FULL) while applying ``job``."""

    def __init__(self, job: _Job, cause: Exception) -> None:
        super().__init__(job, cause)
        self.job = job
        self.cause = cause


class _Writer:
    """The one thread that writes the journal, applying queued jobs in group commits.

    Invariant: only the writer thread touches ``_conn``, and a job's future is resolved only after
    the transaction holding its change has committed, or with the error that kept it out. A failing
    job never takes its batch down with it (its partial changes are undone by a savepoint, or by
    SQLite for a one-statement job; if SQLite drops the whole transaction the others are reapplied),
    and no error stops the thread: it ends only on the stop request, which ``stop()`` queues after
    every other job.
    """

    __slots__ = ("_conn", "_max_batch", "_max_pages", "_path", "_queue", "_thread", "commits", "writes")

    def __init__(self, path: Path, *, max_batch: int, max_pages: int | None) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, not {max_batch}")
        self._path = path
        self._max_batch = max_batch
        self._max_pages = max_pages
        self._queue: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._conn: sqlite3.Connection | None = None  #: the writer thread's; opened on first use
        self.commits = 0  #: transactions committed
        self.writes = 0  #: jobs committed
        self._thread = threading.Thread(target=self._run, name=f"journal-writer {path}", daemon=True)
        self._thread.start()

    def __repr__(self) -> str:
        return f"writes={self.writes} commits={self.commits} queued={self._queue.qsize()}"

    async def write(
        self,
        apply: Callable[[sqlite3.Connection], _T],
        *,
        savepoint: bool = True,
        durable: tuple[Path, ...] = (),
    ) -> _T:
        return cast(_T, await self._enqueue(apply, savepoint=savepoint, durable=durable))

    async def stop(self) -> None:
        """Wait for every job queued before this call to commit, then close the connection."""
        await self._enqueue(None)
        self._thread.join()  # already finishing: the stop job is the thread's last act

    def _enqueue(
        self, apply: Apply | None, *, savepoint: bool = True, durable: tuple[Path, ...] = ()
    ) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        job = _Job(apply, loop, loop.create_future(), savepoint, durable)
        self._queue.put(job)
        return job.future

    def _run(self) -> None:
        stop: _Job | None = None
        try:
            while stop is None:
                batch = self._take()
                if batch[-1].apply is None:
                    stop = batch.pop()
                if batch:
                    _settle(self._commit(batch))
        finally:
            self._close()
            if stop is not None:
                _settle([_Outcome(stop)])

    def _take(self) -> list[_Job]:
        """Block for one job, then take whatever else is queued, up to the batch bound."""
        batch = [self._queue.get()]
        while len(batch) < self._max_batch and batch[-1].apply is not None:
            try:
                batch.append(self._queue.get_nowait())
            except queue.Empty:
                break
        return batch

    def _commit(self, batch: list[_Job]) -> list[_Outcome]:
        """Apply ``batch`` in one transaction; a job that made SQLite drop it is left out and the
        rest reapplied (the rollback undid them too), so each round removes one job."""
        batch, refused = _make_durable(batch)
        while batch:
            try:
                done = self._transaction(batch)
            except _TransactionLost as lost:
                refused.append(_Outcome(lost.job, error=_journal_error(lost.cause, self._path)))
                batch = [job for job in batch if job is not lost.job]
            except Exception as exc:
                self._rollback()
                return refused + [_Outcome(job, error=_journal_error(exc, self._path)) for job in batch]
            else:
                return refused + done
        return refused

    def _transaction(self, batch: list[_Job]) -> list[_Outcome]:
        conn = self._connection()
        conn.execute("BEGIN IMMEDIATE")
        outcomes = [self._apply(conn, job) for job in batch]
        conn.execute("COMMIT")
        self.commits += 1
        self.writes += sum(outcome.error is None for outcome in outcomes)
        return outcomes

    def _apply(self, conn: sqlite3.Connection, job: _Job) -> _Outcome:
        assert job.apply is not None
        if job.savepoint:
            conn.execute("SAVEPOINT job")
        try:
            value = job.apply(conn)
        except Exception as exc:
            if not conn.in_transaction:
                raise _TransactionLost(job, exc) from exc
            if job.savepoint:
                conn.execute("ROLLBACK TO job")
                conn.execute("RELEASE job")
            return _Outcome(job, error=_journal_error(exc, self._path))
        if job.savepoint:
            conn.execute("RELEASE job")
        return _Outcome(job, value)

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            self._conn = _connect(self._path)
            if self._max_pages is not None:
                self._conn.execute(f"PRAGMA max_page_count = {int(self._max_pages)}")
        return self._conn

    def _rollback(self) -> None:
        if self._conn is not None and self._conn.in_transaction:
            try:
                self._conn.execute("ROLLBACK")
            except sqlite3.Error:
                logger.exception("journal %s: rollback failed", self._path)

    def _close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def _make_durable(batch: list[_Job]) -> tuple[list[_Job], list[_Outcome]]:
    """fsync the files the batch's jobs name, then each of their folders once, before the commit.

    Returns the jobs to apply and the outcomes of those left out: a job whose file (or folder) could
    not be synced fails with that error (an OSError of its own), so no row ever records a file a
    power loss could take back. Nothing raised here can stop the writer thread.
    """
    if not any(job.durable for job in batch):
        return batch, []
    failed: dict[int, Exception] = {}
    folders: dict[Path, list[_Job]] = {}
    for job in batch:
        try:
            for path in job.durable:
                fsync_path(path)
        except Exception as exc:
            failed[id(job)] = exc
            continue
        for path in job.durable:
            folders.setdefault(path.parent, []).append(job)
    for folder, jobs in folders.items():
        try:
            fsync_path(folder, folder=True)
        except Exception as exc:
            for job in jobs:  # each caller gets an exception of its own: one raised in many tasks
                failed.setdefault(id(job), _copy_error(exc))  # would grow one shared traceback
    if not failed:
        return batch, []
    kept = [job for job in batch if id(job) not in failed]
    return kept, [_Outcome(job, error=failed[id(job)]) for job in batch if id(job) in failed]


def _copy_error(exc: Exception) -> Exception:
    if isinstance(exc, OSError):
        return OSError(exc.errno, exc.strerror, exc.filename)
    return JournalError(f"cannot sync an output folder: {exc}")


def _settle(outcomes: list[_Outcome]) -> None:
    """Hand each outcome to its caller's event loop: one wake-up per loop per batch."""
    by_loop: defaultdict[asyncio.AbstractEventLoop, list[_Outcome]] = defaultdict(list)
    for outcome in outcomes:
        by_loop[outcome.job.loop].append(outcome)
    for loop, group in by_loop.items():
        try:
            loop.call_soon_threadsafe(_resolve, group)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            logger.debug("journal: %d results for a closed event loop dropped", len(group))


def _resolve(outcomes: list[_Outcome]) -> None:
    for outcome in outcomes:
        future = outcome.job.future
        if future.done():  # the caller was cancelled; its write happened (or failed) regardless
            continue
        if outcome.error is None:
            future.set_result(outcome.value)
        else:
            future.set_exception(outcome.error)


def _journal_error(exc: BaseException, path: Path) -> BaseException:
    """Map SQLite's exceptions to ``JournalError``; anything else (a bug) passes through as is."""
    if not isinstance(exc, sqlite3.Error):
        return exc
    code = getattr(exc, "sqlite_errorcode", 0) & 0xFF
    if code == sqlite3.SQLITE_FULL or "database or disk is full" in str(exc):
        message = (
            f"cannot write the journal {path}: the disk is full ({exc}); free some space, then run "
            "again to resume"
        )
    elif code in (sqlite3.SQLITE_NOTADB, sqlite3.SQLITE_CORRUPT):
        message = f"the journal {path} is unreadable ({exc}); move it aside or choose another out dir"
    else:
        message = f"journal {path}: {exc}"
    error = JournalError(message)
    error.__cause__ = exc
    return error


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = FULL")
    except BaseException:
        conn.close()
        raise
    return conn


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=_plain)


def _plain(value: object) -> object:
    if isinstance(value, Mapping):
        return dict(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _record(row: tuple[Any, ...]) -> ItemRecord:
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


def _run_meta(data: Mapping[str, Any]) -> RunMeta:
    known = {f.name for f in fields(RunMeta)}
    return RunMeta(**{key: value for key, value in data.items() if key in known})


# -- the jobs, run by the writer thread inside its transaction --------------------------------------


def _init_schema(conn: sqlite3.Connection, path: Path) -> None:
    for statement in _SCHEMA:
        conn.execute(statement)
    row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    if row is None:
        _put_meta(conn, "schema_version", json.dumps(SCHEMA_VERSION))
    elif json.loads(row[0]) > SCHEMA_VERSION:
        raise JournalError(
            f"the journal {path} was written by a newer batch-engine (journal schema "
            f"{json.loads(row[0])}, this version reads up to {SCHEMA_VERSION}); upgrade batch-engine "
            "or choose another out dir"
        )


def _put_meta(conn: sqlite3.Connection, key: str, value: str) -> None:
    conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))


def _move(
    conn: sqlite3.Connection,
    item_id: str,
    target: ItemState,
    sets: str,
    params: tuple[Any, ...],
    now: float,
    returning: str = _COLUMNS,
) -> tuple[Any, ...]:
    """Move one item to ``target`` if it is in an accepted state; returns the ``returning`` columns of
    its row as it now stands."""
    sources = _SOURCES[target]
    sql = (
        f"UPDATE items SET state = ?, updated_at = ?, {sets}"
        f" WHERE item_id = ? AND state IN ({', '.join('?' * len(sources))}) RETURNING {returning}"
    )
    rows = conn.execute(sql, (target.value, now, *params, item_id, *sources)).fetchall()
    if not rows:
        raise _refusal(conn, item_id, target)
    return tuple(rows[0])


def _refusal(conn: sqlite3.Connection, item_id: str, target: ItemState) -> JournalError:
    row = conn.execute("SELECT state FROM items WHERE item_id = ?", (item_id,)).fetchone()
    if row is None:
        return JournalError(f"cannot mark item {item_id!r} {target}: the journal has no such item")
    expected = " or ".join(state.value for state in _SOURCES[target])
    return JournalError(f"cannot mark item {item_id!r} {target}: it is {row[0]}, not {expected}")


def _sync(conn: sqlite3.Connection, manifest: Manifest, now: float) -> SyncResult:
    known = {row[0]: row[1:] for row in conn.execute("SELECT item_id, fingerprint, idx, spec FROM items")}
    added: list[tuple[Any, ...]] = []
    changed: list[tuple[Any, ...]] = []
    moved: list[tuple[Any, ...]] = []
    for item in manifest.items:
        spec = _dumps(item.spec)
        old = known.pop(item.id, None)
        if old is None:
            added.append((item.id, item.index, item.fingerprint, spec, _dumps(item.request), now))
        elif old[0] != item.fingerprint:
            changed.append((item.index, item.fingerprint, spec, _dumps(item.request), now, item.id))
        elif (old[1], old[2]) != (item.index, spec):
            moved.append((item.index, spec, now, item.id))
    conn.executemany(
        "INSERT INTO items (item_id, idx, fingerprint, spec, request, updated_at) VALUES (?, ?, ?, ?, ?, ?)",
        added,
    )
    conn.executemany(
        "UPDATE items SET idx = ?, fingerprint = ?, spec = ?, request = ?, updated_at = ?,"
        " state = 'pending', prediction_id = NULL, attempts = 0, possible_duplicate = 0, outputs = NULL,"
        " error = NULL, submitted_at = NULL, completed_at = NULL, inference_ms = NULL WHERE item_id = ?",
        changed,
    )
    conn.executemany("UPDATE items SET idx = ?, spec = ?, updated_at = ? WHERE item_id = ?", moved)
    conn.executemany("DELETE FROM items WHERE item_id = ?", [(item_id,) for item_id in known])
    unchanged = len(manifest.items) - len(added) - len(changed)
    return SyncResult(added=len(added), changed=len(changed), removed=len(known), unchanged=unchanged)


def _resolve_ambiguous(conn: sqlite3.Connection, resubmit: bool, now: float) -> list[str]:
    query = "SELECT item_id FROM items WHERE state = 'submitting' ORDER BY idx, item_id"
    ids = [row[0] for row in conn.execute(query)]
    if resubmit:
        sql = "UPDATE items SET state = 'pending', possible_duplicate = 1, updated_at = ?"
        conn.execute(f"{sql} WHERE state = 'submitting'", (now,))
    else:
        sql = "UPDATE items SET state = 'failed', error = ?, updated_at = ?"
        error = _dumps(AMBIGUOUS_SUBMIT_ERROR.as_dict())
        conn.execute(f"{sql} WHERE state = 'submitting'", (error, now))
    return ids


#: Failures of a prediction that was accepted and may yet be (or have been) completed: --retry-failed
#: polls it again instead of paying for a new one.
_REPOLL_KINDS = (
    ErrorKind.TIMEOUT,
    ErrorKind.DOWNLOAD,
    ErrorKind.NETWORK,
    ErrorKind.SERVER_ERROR,
    ErrorKind.BALANCE,
    ErrorKind.RATE_LIMITED,
    ErrorKind.DISK,
)


def _reset_failed(conn: sqlite3.Connection, now: float) -> int:
    repoll = conn.execute(
        "UPDATE items SET state = 'submitted', error = NULL, outputs = NULL, completed_at = NULL,"
        " inference_ms = NULL, updated_at = ?"
        f" WHERE state = 'failed' AND prediction_id IS NOT NULL AND submitted_at IS NOT NULL"
        f" AND json_extract(error, '$.kind') IN ({', '.join('?' * len(_REPOLL_KINDS))})",
        (now, *(kind.value for kind in _REPOLL_KINDS)),
    ).rowcount
    # An ambiguous submit may have been billed: sending it again must say so in the report.
    cursor = conn.execute(
        "UPDATE items SET state = 'pending', error = NULL, prediction_id = NULL, outputs = NULL,"
        " submitted_at = NULL, completed_at = NULL, inference_ms = NULL, updated_at = ?,"
        " possible_duplicate = max(possible_duplicate, coalesce(json_extract(error, '$.kind') = ?, 0))"
        " WHERE state = 'failed'",
        (now, ErrorKind.AMBIGUOUS_SUBMIT.value),
    )
    return repoll + cursor.rowcount


def _reset_all(conn: sqlite3.Connection) -> None:
    conn.execute("DELETE FROM items")
    conn.execute("DELETE FROM meta WHERE key != 'schema_version'")
