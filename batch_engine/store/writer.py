"""The journal's writer thread: writes applied in group commits, each caller woken once committed.

Callers queue an operation and await a future; the thread applies everything queued in one transaction,
commits once (one fsync) and then resolves every future. A write may name files it records (``durable``):
the thread fsyncs them, and each of their folders once, before that commit, so output files are made
durable in groups too. The thread owns one connection of any database the journal speaks (`dialect`):
SQLite's file, or a PostgreSQL server.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import sqlite3
import threading
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

from batch_engine.errors import JournalError
from batch_engine.store.dialect import SQLITE, Connection, Dialect, Tx
from batch_engine.store.files import fsync_path

logger = logging.getLogger(__name__)

DEFAULT_MAX_BATCH = 1000  #: writes applied in one transaction, at most
BUSY_TIMEOUT = 30.0  #: seconds a connection waits for a lock held by another connection

_T = TypeVar("_T")
Apply = Callable[[Tx], Any]


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
    """The database rolled back the whole transaction (SQLite on SQLITE_FULL) while applying ``job``."""

    def __init__(self, job: _Job, cause: Exception) -> None:
        super().__init__(job, cause)
        self.job = job
        self.cause = cause


class Writer:
    """The one thread that writes the journal, applying queued jobs in group commits.

    Invariant: only the writer thread touches ``_conn``, and a job's future is resolved only after
    the transaction holding its change has committed, or with the error that kept it out. A failing
    job never takes its batch down with it (its partial changes are undone by a savepoint, or by
    SQLite for a one-statement job; if SQLite drops the whole transaction the others are reapplied),
    and no error stops the thread: it ends only on the stop request, which ``stop()`` queues after
    every other job.
    """

    __slots__ = (
        "_conn",
        "_connect",
        "_dialect",
        "_max_batch",
        "_queue",
        "_thread",
        "_where",
        "commits",
        "writes",
    )

    def __init__(
        self,
        connect: Callable[[], Connection],
        *,
        where: str,
        max_batch: int,
        dialect: Dialect = SQLITE,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, not {max_batch}")
        self._connect = connect  #: opens the writer's connection, on first use, in the writer thread
        self._where = where  #: the journal as messages name it (a path, or a database URL without secrets)
        self._max_batch = max_batch
        self._dialect = dialect
        self._queue: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._conn: Connection | None = None  #: the writer thread's; opened on first use
        self.commits = 0  #: transactions committed
        self.writes = 0  #: jobs committed
        self._thread = threading.Thread(target=self._run, name=f"journal-writer {where}", daemon=True)
        self._thread.start()

    def __repr__(self) -> str:
        return f"writes={self.writes} commits={self.commits} queued={self._queue.qsize()}"

    async def write(
        self,
        apply: Callable[[Tx], _T],
        *,
        savepoint: bool = True,
        durable: tuple[Path, ...] = (),
    ) -> _T:
        return cast(_T, await self._enqueue(apply, savepoint=savepoint, durable=durable))

    def submit(self, apply: Callable[[Tx], _T]) -> asyncio.Future[_T]:
        """Queue a write now and return its future, so the caller can prepare the next meanwhile; writes
        are applied in the order they were queued."""
        return cast(asyncio.Future[_T], self._enqueue(apply))

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
                refused.append(_Outcome(lost.job, error=self._dialect.error(lost.cause, self._where)))
                batch = [job for job in batch if job is not lost.job]
            except Exception as exc:
                self._rollback()
                return refused + [_Outcome(job, error=self._dialect.error(exc, self._where)) for job in batch]
            else:
                return refused + done
        return refused

    def _transaction(self, batch: list[_Job]) -> list[_Outcome]:
        conn = self._connection()
        conn.execute(self._dialect.begin())
        outcomes = [self._apply(conn, job) for job in batch]
        conn.execute("COMMIT")
        self.commits += 1
        self.writes += sum(outcome.error is None for outcome in outcomes)
        return outcomes

    def _apply(self, conn: Connection, job: _Job) -> _Outcome:
        assert job.apply is not None
        savepoint = job.savepoint or self._dialect.needs_savepoints
        if savepoint:
            conn.execute("SAVEPOINT job")
        try:
            value = job.apply(Tx(conn, self._dialect))
        except Exception as exc:
            if savepoint:
                self._undo(conn, job, exc)
            elif not self._dialect.usable(conn):
                raise _TransactionLost(job, exc) from exc
            return _Outcome(job, error=self._dialect.error(exc, self._where))
        if savepoint:
            conn.execute("RELEASE job")
        return _Outcome(job, value)

    def _undo(self, conn: Connection, job: _Job, exc: Exception) -> None:
        """Undo a failed job's changes (its savepoint); _TransactionLost when the database dropped the
        whole transaction instead (SQLite on a full disk)."""
        try:
            conn.execute("ROLLBACK TO job")
            conn.execute("RELEASE job")
        except Exception as lost:
            raise _TransactionLost(job, exc) from lost

    def _connection(self) -> Connection:
        if self._conn is None:
            self._conn = self._connect()
        return self._conn

    def _rollback(self) -> None:
        if self._conn is None:
            return
        try:
            self._conn.execute("ROLLBACK")
        except Exception:  # no transaction to roll back, or the connection is gone: nothing to undo
            logger.debug("journal %s: rollback failed", self._where, exc_info=True)
            if self._dialect.name != "sqlite":  # a server's connection that broke: the next batch reconnects
                try:
                    self._close()
                except Exception:
                    self._conn = None

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


def connect_sqlite(path: Path) -> sqlite3.Connection:
    """A connection to the SQLite journal at ``path``: WAL, full sync, temporary tables on disk."""
    conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("PRAGMA temp_store = FILE")  # a sync's table of a million seen ids must not cost memory
    except BaseException:
        conn.close()
        raise
    return conn
