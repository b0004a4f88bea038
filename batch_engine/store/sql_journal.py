"""The journal over SQL: one row per manifest item, the run's single source of truth, in SQLite or PostgreSQL.

Every write is ``async`` and returns only once its change is committed to disk, so the engine can
rely on this order: the intent to submit is durable before the POST, the prediction id before
anything else happens to it, an output only once recorded. Reports are rebuilt from the journal.

Writes go through one writer thread with group commit: callers queue an operation and await a
future; the thread applies everything queued in one transaction, commits once (one fsync) and then
resolves every future. A write may name files it records (``durable``): the thread fsyncs them, and
each of their folders once, before that commit, so output files are made durable in groups too.
Reads use their own connection on the caller's thread (WAL readers never block the writer) and are
synchronous. The statements are shared by both databases (`dialect`); `sqlite.SqliteJournal` and
`postgres.PostgresJournal` open their database and lay out its tables.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any, Self, TypeVar

from batch_engine.errors import JournalError, LeaseLost
from batch_engine.store import sync, transitions
from batch_engine.store.dialect import Dialect, Tx
from batch_engine.store.files import stem_key
from batch_engine.store.journal import (
    AMBIGUOUS_SUBMIT_ERROR,
    DEFAULT_READ_BATCH,
    REPOLL_KINDS,
    SyncResult,
    decode_meta,
    decode_record,
    dumps,
)
from batch_engine.store.transitions import Transition, TransitionRefused
from batch_engine.store.writer import Writer
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

_T = TypeVar("_T")

SCHEMA_VERSION = 2  #: 2 added the archive, items.stem_key and the leases of several workers


def tables(dialect: Dialect) -> tuple[str, ...]:
    """The journal's tables and indexes, in the dialect's types; ``stem_key`` gets its unique index apart
    (`STEM_INDEX`), once it is filled in."""
    real, bigint = ("REAL", "INTEGER") if dialect.name == "sqlite" else ("DOUBLE PRECISION", "BIGINT")
    serial = "INTEGER PRIMARY KEY" if dialect.name == "sqlite" else "BIGSERIAL PRIMARY KEY"
    return (
        "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
        f"""CREATE TABLE IF NOT EXISTS items (
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
            submitted_at {real},
            completed_at {real},
            inference_ms {bigint},
            updated_at {real} NOT NULL,
            stem_key TEXT,
            lease_owner TEXT,
            lease_until {real}
        )""",
        "CREATE INDEX IF NOT EXISTS items_order ON items (idx, item_id)",
        "CREATE INDEX IF NOT EXISTS items_fingerprint ON items (fingerprint)",
        "CREATE INDEX IF NOT EXISTS items_state ON items (state, idx)",
        f"""CREATE TABLE IF NOT EXISTS archive (
            id {serial},
            item_id TEXT NOT NULL,
            fingerprint TEXT NOT NULL,
            stem_key TEXT,
            row TEXT NOT NULL,
            reason TEXT NOT NULL,
            archived_at {real} NOT NULL
        )""",
        "CREATE INDEX IF NOT EXISTS archive_item ON archive (item_id, fingerprint)",
    )


#: Created once ``stem_key`` is filled in (a journal of schema 1 gets it from its ids first).
STEM_INDEX = "CREATE UNIQUE INDEX IF NOT EXISTS items_stem ON items (stem_key)"


def newer_schema(where: str, found: int) -> JournalError:
    return JournalError(
        f"the journal {where} was written by a newer batch-engine (journal schema {found}, this "
        f"version reads up to {SCHEMA_VERSION}); upgrade batch-engine or choose another journal"
    )


COLUMNS = (
    "idx, item_id, fingerprint, spec, request, state, prediction_id, attempts, possible_duplicate,"
    " outputs, error, submitted_at, completed_at, inference_ms"
)
_KNOWN_STATES = ", ".join(f"'{state.value}'" for state in ItemState if state is not ItemState.DAMAGED)


class SqlJournal:
    """A journal on one SQL database, with group commit; its subclasses open one (see the module).

    Reads must come from the thread that opened it (the event loop's); writes may come from any task of
    any event loop.
    """

    __slots__ = ("_clock", "_closed", "_dialect", "_out_dir", "_reader", "_writer", "where")

    def __init__(
        self,
        where: str,
        writer: Writer,
        reader: Tx,
        clock: Callable[[], float],
        *,
        out_dir: Path,
    ) -> None:
        self.where = where  #: the database, as messages name it: its file, or its URL without secrets
        self._writer = writer
        self._reader = reader  #: only ever used by the thread that opened the journal
        self._dialect = reader.dialect
        self._clock = clock
        self._out_dir = out_dir  #: where the run's outputs are (a restored success's files are checked)
        self._closed = False

    async def close(self) -> None:
        """Let every queued write commit, stop the writer and close both connections. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            await self._writer.stop()
        finally:
            self._reader.conn.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<{type(self).__name__} {self.where!r} {state} {self._writer!r}>"

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
        return None if row is None else decode_meta(json.loads(row[0]))

    def get(self, item_id: str) -> ItemRecord | None:
        row = self._reader.execute(f"SELECT {COLUMNS} FROM items WHERE item_id = ?", (item_id,)).fetchone()
        return None if row is None else decode_record(row)

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
            f"SELECT {COLUMNS} FROM items WHERE (idx, item_id) > (?, ?){where} ORDER BY idx, item_id LIMIT ?"
        )
        after: tuple[int, str] = (-1, "")
        while True:
            rows = self._reader.execute(sql, (*after, *wanted, batch)).fetchall()
            yield from map(decode_record, rows)
            if len(rows) < batch:
                return
            after = (rows[-1][0], rows[-1][1])

    def versions(self, items: Sequence[Item]) -> dict[str, ItemRecord]:
        """For each item, what a sync would keep of it: its live row when the fingerprint matches, else
        the newest archived version with that fingerprint (it would come back), else nothing."""
        ids = [item.id for item in items]
        marks = ", ".join("?" * len(ids))
        live = {
            r.item_id: r
            for r in map(
                decode_record,
                self._reader.execute(
                    f"SELECT {COLUMNS} FROM items WHERE item_id IN ({marks})", ids
                ).fetchall(),
            )
        }
        found = {}
        for item in items:
            record = live.get(item.id)
            if record is None or record.fingerprint != item.fingerprint:
                record = self._archived(item)
            if record is not None:
                found[item.id] = record
        return found

    def _archived(self, item: Item) -> ItemRecord | None:
        row = self._reader.execute(
            "SELECT row FROM archive WHERE item_id = ? AND fingerprint = ? ORDER BY id DESC LIMIT 1",
            (item.id, item.fingerprint),
        ).fetchone()
        if row is None:
            return None
        version = json.loads(row[0])
        values = [version[column] for column in sync.ARCHIVED_COLUMNS]
        idx, fingerprint, spec, request, state, *rest = values
        return decode_record((idx, item.id, fingerprint, spec, request, state, *rest))

    def counts(self) -> dict[ItemState, int]:
        """Items per state; every state is a key, and a row whose state is no state counts as damaged."""
        found = dict(self._reader.execute("SELECT state, count(*) FROM items GROUP BY state").fetchall())
        counts = {state: found.pop(state.value, 0) for state in ItemState}
        counts[ItemState.DAMAGED] += sum(found.values())
        return counts

    def retired_count(self) -> int:
        """Items no longer in the manifest whose versions the archive keeps."""
        row = self._reader.execute(
            "SELECT count(DISTINCT item_id) FROM archive"
            " WHERE NOT EXISTS (SELECT 1 FROM items i WHERE i.item_id = archive.item_id)"
        ).fetchone()
        return int(row[0])

    def error_kind_counts(self) -> dict[str, int]:
        """Failed items per ``error.kind``."""
        rows = self._reader.execute(
            "SELECT json_extract(error, '$.kind'), count(*) FROM items"
            " WHERE state = 'failed' AND error IS NOT NULL GROUP BY 1 ORDER BY 1"
        ).fetchall()
        return {str(kind): count for kind, count in rows}

    def possible_duplicate_count(self) -> int:
        row = self._reader.execute("SELECT count(*) FROM items WHERE possible_duplicate != 0").fetchone()
        return int(row[0])

    # -- writes: each returns once committed -----------------------------------------------------

    async def set_meta(self, meta: RunMeta) -> None:
        value = dumps({f.name: getattr(meta, f.name) for f in fields(RunMeta)})
        await self._write(lambda tx: put_meta(tx, "run", value), savepoint=False)

    async def sync_manifest(
        self, manifest: Manifest, *, intact: sync.IntactCheck | None = None
    ) -> SyncResult:
        """Make the rows match ``manifest`` (see `sync`): add new items, archive and reset changed
        ones, retire removed ones to the archive, bring archived versions back (a success only when
        ``intact`` finds its outputs; default: in the out dir); one write per chunk."""
        check = intact or sync.files_intact(self._out_dir)
        await self._write(sync.begin)
        total, waiting = sync.SyncCounts(), []
        queued: list[asyncio.Future[tuple[sync.SyncCounts, list[Item]]]] = []
        for chunk in sync.chunks(manifest.iter_items()):
            # The writer applies one chunk while the next is read and built: at most two are queued.
            job = functools.partial(sync.sync_chunk, chunk=chunk, now=self._clock(), intact=check)
            queued.append(self._submit(job))
            if len(queued) > 1:
                waiting += _add_counts(total, await queued.pop(0))
        for done in queued:
            waiting += _add_counts(total, await done)
        now = self._clock()
        total.retired = await self._write(lambda tx: sync.retire_unseen(tx, now))
        if waiting:
            late = functools.partial(sync.add_waiting, waiting=waiting, now=now, intact=check)
            _add_counts(total, (await self._write(late), []))
        return total.result()

    async def adopt(self, records: Sequence[ItemRecord]) -> int:
        """Take rows back from the out dir's own record of a lost journal (see `rebuild`); returns how many.

        Only into a journal with no rows: each comes back as it stood, and the manifest sync that follows
        keeps those whose fingerprint matches and redoes the rest.
        """
        now = self._clock()
        return await self._write(lambda tx: _adopt(tx, records, now))

    def is_empty(self) -> bool:
        """No item, no archived version and no run recorded: a new journal, or a lost one."""
        for table in ("items", "archive"):
            if self._reader.execute(f"SELECT 1 FROM {table} LIMIT 1").fetchone():
                return False
        return self.meta() is None

    async def repair_damaged(self) -> list[str]:
        """Settle rows that cannot be read (hand-edited or corrupted), never paying twice silently;
        returns ``item: what was wrong`` for each, for the log.

        A row with a prediction id goes back to ``submitted`` (polled again, not paid again); one without
        becomes an interrupted submit (``submitting``), which `resolve_ambiguous` then settles by the
        ambiguous-submit policy; a failure whose error record is unreadable stays failed with a readable
        error saying so.
        """
        now = self._clock()
        return await self._write(lambda tx: _repair_damaged(tx, now))

    async def mark_submitting(self, item_id: str) -> int:
        """Record the intent to submit (before the POST); returns the item's new ``attempts``.

        LeaseLost when the journal is shared and another worker holds the item now."""
        sets = "attempts = attempts + 1"
        row = await self._move(item_id, transitions.SUBMIT, sets, (), returning="attempts")
        return int(row[0])

    def owner_condition(self) -> tuple[str, tuple[Any, ...]]:
        """The condition a row must meet for this process to move it: none, with one process per journal
        (a shared journal's worker moves only the rows it holds, while it is alive)."""
        return "", ()

    async def mark_submitted(self, item_id: str, *, prediction_id: str, submitted_at: float) -> None:
        sets = "prediction_id = ?, submitted_at = ?"
        await self._move(
            item_id, transitions.ACCEPTED, sets, (prediction_id, submitted_at), returning="state"
        )

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
        """Record a success; returns the item's final row (the UPDATE returns it: no second query).
        ``answered``: from ``submitting``, a synchronous route's answer (transition ``answered``).

        ``durable``: the output files, written but not yet fsynced; they are fsynced (with their
        folders) before the commit, and an OSError doing so fails this write and nothing else.
        """
        sets = "outputs = ?, completed_at = ?, inference_ms = ?, error = NULL"
        encoded = dumps([output.as_dict() for output in outputs])
        params = (encoded, completed_at, inference_ms)
        move = transitions.ANSWERED if answered else transitions.SUCCEED
        return decode_record(await self._move(item_id, move, sets, params, durable=tuple(durable)))

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
        params = (dumps(error.as_dict()), completed_at, prediction_id)
        return decode_record(await self._move(item_id, transitions.FAIL, sets, params))

    async def mark_pending(self, item_id: str, *, possible_duplicate: bool = False) -> None:
        """Back to pending; a ``possible_duplicate`` flag once set stays set (for the report)."""
        sets = "possible_duplicate = max(possible_duplicate, ?), prediction_id = NULL, submitted_at = NULL"
        await self._move(
            item_id, transitions.NOT_ACCEPTED, sets, (int(possible_duplicate),), returning="state"
        )

    async def resolve_ambiguous(self, *, resubmit: bool) -> list[str]:
        """Settle rows left ``submitting`` by a stopped run: resend them (flagged) or fail them."""
        now = self._clock()
        return await self._write(lambda tx: _resolve_ambiguous(tx, resubmit, now))

    async def reset_failed(self) -> int:
        """Failed items back to work (``--retry-failed``); returns how many.

        An item whose accepted prediction failed on our side (timeout, download, network, balance...)
        goes back to ``submitted`` and is polled again, not paid for again; the rest go back to
        ``pending`` with their attempts kept, an ambiguous submit flagged ``possible_duplicate``.
        """
        now = self._clock()
        return await self._write(lambda tx: _reset_failed(tx, now))

    async def reset_all(self) -> None:
        """Forget every item, the archive and the run meta (``--fresh``); the schema stays."""
        await self._write(_reset_all)

    async def _move(
        self,
        item_id: str,
        transition: Transition,
        sets: str,
        params: tuple[Any, ...],
        *,
        durable: tuple[Path, ...] = (),
        returning: str = COLUMNS,
    ) -> tuple[Any, ...]:
        """Move one item; returns the ``returning`` columns of its new row, for the caller to decode
        (off the writer thread, and only what it needs: JSON columns are not cheap). LeaseLost when the
        item is another worker's now (`owner_condition`)."""
        now = self._clock()
        owned, owned_params = self.owner_condition()
        move = functools.partial(
            _move,
            item_id=item_id,
            transition=transition,
            sets=sets,
            params=params,
            now=now,
            returning=returning,
            owned=owned,
            owned_params=owned_params,
        )
        return await self._write(move, savepoint=False, durable=durable)

    def _submit(self, apply: Callable[[Tx], _T]) -> asyncio.Future[_T]:
        if self._closed:
            raise JournalError(f"the journal {self.where} is closed; no more writes are accepted")
        return self._writer.submit(apply)

    async def _write(
        self,
        apply: Callable[[Tx], _T],
        *,
        savepoint: bool = True,
        durable: tuple[Path, ...] = (),
    ) -> _T:
        if self._closed:
            raise JournalError(f"the journal {self.where} is closed; no more writes are accepted")
        return await self._writer.write(apply, savepoint=savepoint, durable=durable)


# -- the jobs, run by the writer thread inside its transaction --------------------------------------


def put_meta(tx: Tx, key: str, value: str) -> None:
    tx.execute(tx.dialect.put_meta(), (key, value))


def _move(
    tx: Tx,
    item_id: str,
    transition: Transition,
    sets: str,
    params: tuple[Any, ...],
    now: float,
    returning: str = COLUMNS,
    owned: str = "",
    owned_params: tuple[Any, ...] = (),
) -> tuple[Any, ...]:
    """Move one item by ``transition`` if its state allows; returns the ``returning`` columns of its row
    as it now stands. TransitionRefused when the item is in no source state of the transition; LeaseLost
    when it is, but fails the further condition ``owned`` (another worker holds it)."""
    sql = (
        f"UPDATE items SET state = ?, updated_at = ?, {sets}"
        f" WHERE item_id = ? AND {_in_sources(transition)}{owned} RETURNING {returning}"
    )
    rows = tx.execute(sql, (transition.target.value, now, *params, item_id, *owned_params)).fetchall()
    if not rows:
        row = tx.execute("SELECT state FROM items WHERE item_id = ?", (item_id,)).fetchone()
        state = None if row is None else ItemState(row[0])
        if owned and row is not None:
            held = tx.execute(f"SELECT 1 FROM items WHERE item_id = ?{owned}", (item_id, *owned_params))
            if held.fetchone() is None:
                raise LeaseLost(item_id)
        raise TransitionRefused(item_id, transition, state)
    return tuple(rows[0])


def _in_sources(transition: Transition) -> str:
    """The SQL condition ``state IN (...)`` of a transition's sources (values from the enum, never input)."""
    return "state IN (" + ", ".join(f"'{state.value}'" for state in sorted(transition.sources)) + ")"


def _add_counts(total: sync.SyncCounts, done: tuple[sync.SyncCounts, list[Item]]) -> list[Item]:
    """Add a chunk's counts to the sync's; returns the chunk's items waiting for the retirements."""
    more, waiting = done
    total.added += more.added
    total.changed += more.changed
    total.restored += more.restored
    total.unchanged += more.unchanged
    return waiting


def _adopt(tx: Tx, records: Sequence[ItemRecord], now: float) -> int:
    if tx.execute("SELECT 1 FROM items LIMIT 1").fetchone():
        raise JournalError("refusing to adopt rows into a journal that already holds items")
    rows = [
        (
            record.item_id,
            stem_key(record.item_id),
            record.index,
            record.fingerprint,
            dumps(record.spec),
            dumps(record.request),
            record.state.value,
            record.prediction_id,
            record.attempts,
            int(record.possible_duplicate),
            dumps([output.as_dict() for output in record.outputs]) if record.outputs else None,
            dumps(record.error.as_dict()) if record.error else None,
            record.submitted_at,
            record.completed_at,
            record.inference_ms,
            now,
        )
        for record in records
    ]
    columns = ("item_id", "stem_key", *sync.ARCHIVED_COLUMNS, "updated_at")
    return int(tx.executemany(tx.dialect.insert_ignoring("items", columns), rows).rowcount)


def _repair_damaged(tx: Tx, now: float) -> list[str]:
    rows = tx.execute(
        f"SELECT {COLUMNS} FROM items WHERE state NOT IN ({_KNOWN_STATES})"
        " OR (outputs IS NOT NULL AND NOT json_valid(outputs))"
        " OR (error IS NOT NULL AND NOT json_valid(error))"
    ).fetchall()
    found = []
    for row in rows:
        record = decode_record(row)
        found.append(f"{record.item_id}: {record.damage}")
        state = row[5]
        if state == ItemState.FAILED.value and record.damage and record.damage.startswith("error"):
            error = record.error or ItemError("unknown", "unreadable")
            tx.execute(
                "UPDATE items SET error = ?, updated_at = ? WHERE item_id = ?",
                (dumps(error.as_dict()), now, record.item_id),
            )
        elif record.prediction_id:
            tx.execute(
                "UPDATE items SET state = ?, outputs = NULL, error = NULL, completed_at = NULL,"
                " submitted_at = coalesce(submitted_at, ?), updated_at = ? WHERE item_id = ?",
                (ItemState.SUBMITTED.value, now, now, record.item_id),
            )
        else:
            tx.execute(
                "UPDATE items SET state = ?, outputs = NULL, error = NULL, updated_at = ? WHERE item_id = ?",
                (ItemState.SUBMITTING.value, now, record.item_id),
            )
    return found


def _resolve_ambiguous(tx: Tx, resubmit: bool, now: float) -> list[str]:
    move = transitions.RESEND_AMBIGUOUS if resubmit else transitions.FAIL_AMBIGUOUS
    query = f"SELECT item_id FROM items WHERE {_in_sources(move)} ORDER BY idx, item_id"
    ids = [row[0] for row in tx.execute(query)]
    params: tuple[str, ...] = ()
    if resubmit:
        sets = "possible_duplicate = 1"
    else:
        sets, params = "error = ?", (dumps(AMBIGUOUS_SUBMIT_ERROR.as_dict()),)
    sql = f"UPDATE items SET state = ?, updated_at = ?, {sets} WHERE {_in_sources(move)}"
    tx.execute(sql, (move.target.value, now, *params))
    return ids


def _reset_failed(tx: Tx, now: float) -> int:
    repoll, resend = transitions.REPOLL_FAILED, transitions.RESEND_FAILED
    kinds = ", ".join("?" * len(REPOLL_KINDS))
    polled_again = tx.execute(
        "UPDATE items SET state = ?, error = NULL, outputs = NULL, completed_at = NULL,"
        f" inference_ms = NULL, updated_at = ? WHERE {_in_sources(repoll)}"
        " AND prediction_id IS NOT NULL AND submitted_at IS NOT NULL"
        f" AND json_extract(error, '$.kind') IN ({kinds})",
        (repoll.target.value, now, *(kind.value for kind in REPOLL_KINDS)),
    ).rowcount
    # An ambiguous submit may have been billed: sending it again must say so in the report.
    sent_again = tx.execute(
        "UPDATE items SET state = ?, error = NULL, prediction_id = NULL, outputs = NULL,"
        " submitted_at = NULL, completed_at = NULL, inference_ms = NULL, updated_at = ?,"
        " possible_duplicate = CASE WHEN json_extract(error, '$.kind') = ? THEN 1 ELSE possible_duplicate END"
        f" WHERE {_in_sources(resend)}",
        (resend.target.value, now, ErrorKind.AMBIGUOUS_SUBMIT.value),
    ).rowcount
    return int(polled_again) + int(sent_again)


def _reset_all(tx: Tx) -> None:
    tx.execute("DELETE FROM items")
    tx.execute("DELETE FROM archive")
    tx.execute("DELETE FROM meta WHERE key != 'schema_version'")
