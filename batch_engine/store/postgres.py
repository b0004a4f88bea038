"""The journal on PostgreSQL: one run's rows shared by every worker that works it, on any machine.

Each run (a manifest's ``name``) has a schema of its own, ``be_<name>_<hash>``, listed in
``batch_engine.runs``; in it the journal's tables (the same as SQLite's, `sql_journal.tables`) and two of
PostgreSQL's own: ``workers`` (who works the run, alive until when) and ``pacer`` (the key's one submit
schedule, shared by the workers; see `timing.shared_pace`).

A worker owns the rows it claimed (``items.lease_owner``) as long as its row in ``workers`` is alive: it
renews ``alive_until`` every few seconds (`heartbeat`). Rows of a worker that stopped renewing (kill -9, a
lost node) are *orphans*, which any live worker takes over (`take_orphans`): an accepted prediction is
polled by its new owner, never paid again; a submit whose answer died with its worker follows the
ambiguous-submit policy. Liveness is judged by the database's clock, never a worker's.

Credentials come from the URL, ``PGPASSWORD`` or a pgpass file (libpq reads both); the URL is only ever
shown without its password (`public_dsn`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from batch_engine.errors import JournalError, UsageError
from batch_engine.store.dialect import POSTGRES, Connection, Tx
from batch_engine.store.journal import AMBIGUOUS_SUBMIT_ERROR, decode_record, dumps
from batch_engine.store.sql_journal import (
    COLUMNS,
    SCHEMA_VERSION,
    STEM_INDEX,
    SqlJournal,
    newer_schema,
    put_meta,
    tables,
)
from batch_engine.store.writer import DEFAULT_MAX_BATCH, Writer
from batch_engine.timing.shared_pace import SharedGate
from batch_engine.values import ItemRecord

JOURNAL_ENV = "BATCH_ENGINE_JOURNAL"  #: the journal URL when ``--journal`` is not given
RUNS_SCHEMA = "batch_engine"  #: where the list of runs lives
DEFAULT_LEASE = 30.0  #: seconds a worker's claims outlive its last heartbeat
CONNECT_TIMEOUT = 10  #: seconds to wait for the server before saying it cannot be reached
#: The database's clock, in unix seconds: leases are judged by it, so workers' clocks never matter.
DB_NOW = "extract(epoch from clock_timestamp())"

_ACTIVE = ("pending", "submitting", "submitted")
_ACTIVE_SQL = ", ".join(f"'{state}'" for state in _ACTIVE)


def is_url(text: str) -> bool:
    return text.startswith(("postgresql://", "postgres://"))


def public_dsn(url: str) -> str:
    """The URL as messages show it: user, host, port and database, never a password (nor other options)."""
    from psycopg.conninfo import conninfo_to_dict

    try:
        parts = conninfo_to_dict(url)
    except Exception:  # psycopg's ProgrammingError; never quote the URL, it may hold a password
        return "postgresql://(unreadable URL)"
    user = f"{parts['user']}@" if parts.get("user") else ""
    host = str(parts.get("host") or "localhost")
    port = f":{parts['port']}" if parts.get("port") else ""
    return f"postgresql://{user}{host}{port}/{parts.get('dbname') or ''}"


def journal_password(url: str) -> str | None:
    """The password the URL holds, if any (the logs scrub it), else None."""
    if not url:
        return None
    from psycopg.conninfo import conninfo_to_dict

    try:
        found = conninfo_to_dict(url).get("password")
    except Exception:
        return None
    return str(found) if found else None


def check_url(url: str, where: str) -> str:
    """``url`` if psycopg can read it; else a UsageError naming ``where`` it came from (never the URL)."""
    if not is_url(url):
        raise UsageError(f"{where}: a journal URL starts with postgresql:// (for example postgresql://user@host/db)")
    try:
        import psycopg  # noqa: F401
    except ImportError:
        raise UsageError(
            f"{where}: a PostgreSQL journal needs the postgres extra: pip install 'batch-engine[postgres]'"
        ) from None
    if public_dsn(url) == "postgresql://(unreadable URL)":
        raise UsageError(f"{where}: the journal URL cannot be read; check its spelling (not shown here)")
    return url


def schema_for(run: str) -> str:
    """The run's schema: its name made safe (lower-case letters, digits, ``_``) and a hash of it."""
    slug = re.sub(r"[^a-z0-9]+", "_", run.lower()).strip("_")[:30]
    return f"be_{slug}_{hashlib.sha256(run.encode()).hexdigest()[:10]}"


def connect(url: str, schema: str | None, lease: float = DEFAULT_LEASE) -> Connection:
    """An autocommit connection (transactions are explicit) whose search path is the run's schema.

    A worker frozen (or cut off) inside a transaction must not hold its row locks for good: the server
    ends a session idle in a transaction for a lease, and TCP keepalives find a lost machine in ~25 s.
    """
    import psycopg

    secret = journal_password(url)
    try:
        conn = psycopg.connect(
            url,
            autocommit=True,
            connect_timeout=CONNECT_TIMEOUT,
            application_name="batch-engine",
            keepalives=1,
            keepalives_idle=10,
            keepalives_interval=5,
            keepalives_count=3,
        )
    except psycopg.Error as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if secret:
            message = message.replace(secret, "***")
        raise JournalError(f"cannot reach the journal database {public_dsn(url)}: {message}") from None
    try:
        if schema is not None:
            conn.execute(f'SET search_path TO "{schema}", public')
        conn.execute(f"SET idle_in_transaction_session_timeout = {max(1000, int(lease * 1000))}")
    except BaseException:
        conn.close()
        raise
    return conn


@dataclass(frozen=True)
class Worker:
    """A live worker of the run, as ``workers`` lists it."""

    id: str
    host: str
    pid: int
    started_at: float
    alive_for: float  #: seconds its lease has left, by the database's clock


@dataclass(frozen=True)
class Orphans:
    """What a worker took over from dead ones in one sweep."""

    to_poll: list[ItemRecord]  #: accepted predictions: polled by this worker now
    resent: list[str]  #: submits whose answer died with their worker, back to pending (possible_duplicate)
    failed: list[str]  #: the same, failed as ambiguous (resubmit_ambiguous off)
    released: int  #: pending rows a dead worker had claimed, back for anyone to claim
    dead: list[str]  #: the workers they belonged to


class PostgresJournal(SqlJournal):
    """The journal of run ``run`` in a PostgreSQL database: ``await PostgresJournal.open(url, run, ...)``.

    Every write is a transaction of the writer's connection (group commit, as with SQLite); reads come from a
    connection of their own. The lease methods are this backend's alone: they let several workers share
    the run.
    """

    __slots__ = ("_registered", "lease", "run", "schema", "url", "worker")

    def __init__(self, *args: Any, url: str, run: str, lease: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.url = url  #: never shown: it may hold a password (``path`` is the public form)
        self.run = run
        self.schema = schema_for(run)
        self.lease = lease
        self.worker = f"{socket.gethostname()[:40]}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self._registered = False  #: in the run's list of workers: it sends only what it claimed

    @classmethod
    async def open(
        cls,
        url: str,
        run: str,
        *,
        out_dir: Path,
        lease: float = DEFAULT_LEASE,
        max_batch: int = DEFAULT_MAX_BATCH,
        clock: Callable[[], float] = time.time,
        create: bool = True,
    ) -> PostgresJournal:
        """Open (creating it if ``create``) the journal of ``run`` and start its writer thread.

        ``create=False`` (status, report) is a JournalError naming the runs there are when ``run`` has none.
        """
        import anyio

        schema = schema_for(run)
        shown = public_dsn(url)
        where = f"{shown} (run {run!r})"
        if not create:
            await anyio.to_thread.run_sync(_check_run_exists, url, run, shown)
        writer = Writer(
            lambda: connect(url, schema, lease), where=where, max_batch=max_batch, dialect=POSTGRES
        )
        try:
            await writer.write(lambda tx: _init_schema(tx, run, schema, where))
            reader = await anyio.to_thread.run_sync(connect, url, schema)
        except BaseException:
            await writer.stop()
            raise
        return cls(
            where, writer, Tx(reader, POSTGRES), clock, out_dir=out_dir, url=url, run=run, lease=lease
        )

    # -- the workers of the run -------------------------------------------------------------------

    def gate(self) -> SharedGate:
        """The run's shared submit schedule (`timing.shared_pace`), on a connection of its own."""
        url, schema, lease = self.url, self.schema, self.lease

        def connect_gate() -> Connection:
            conn = connect(url, schema, lease)
            conn.execute("SET synchronous_commit = off")  # a schedule lost in a crash costs nothing
            return conn

        return SharedGate(connect_gate, now_sql=DB_NOW)

    def live_workers(self) -> list[Worker]:
        rows = self._reader.execute(
            f"SELECT id, host, pid, started_at, alive_until - {DB_NOW} FROM workers"
            f" WHERE alive_until > {DB_NOW} ORDER BY started_at"
        ).fetchall()
        return [Worker(str(r[0]), str(r[1]), int(r[2]), float(r[3]), float(r[4])) for r in rows]

    def digest(self) -> str | None:
        row = self._reader.execute("SELECT value FROM meta WHERE key = 'digest'").fetchone()
        return None if row is None else str(json.loads(row[0]))

    async def register(self, *, digest: str | None, starting: bool) -> None:
        """Enter the run's list of workers, alive for one lease; ``starting``: this worker starts a new round
        of the run (no other is alive), so the last round's workers are forgotten and ``digest`` recorded."""
        me, lease = self.worker, self.lease

        def apply(tx: Tx) -> None:
            if starting:
                tx.execute(f"DELETE FROM workers WHERE alive_until <= {DB_NOW}")
                if digest is not None:
                    put_meta(tx, "digest", json.dumps(digest))
            tx.execute(
                "INSERT INTO workers (id, host, pid, started_at, alive_until)"
                f" VALUES (?, ?, ?, {DB_NOW}, {DB_NOW} + ?)",
                (me, socket.gethostname()[:200], os.getpid(), lease),
            )

        await self._write(apply)
        self._registered = True

    async def expire(self, workers: list[str]) -> None:
        """Take ``workers`` for dead now (their processes are known to be gone): their rows are orphans."""

        def apply(tx: Tx) -> None:
            marks = ", ".join("?" * len(workers))
            tx.execute(f"UPDATE workers SET alive_until = 0 WHERE id IN ({marks}) AND stats IS NULL", workers)

        if workers:
            await self._write(apply)

    async def forget_leases(self) -> int:
        """A new round of the run (no worker alive): every row's owner is gone; returns how many rows had
        one (accepted predictions among them are then taken over and polled)."""

        def apply(tx: Tx) -> int:
            forgotten = tx.execute("UPDATE items SET lease_owner = NULL WHERE lease_owner IS NOT NULL")
            return int(forgotten.rowcount)

        return await self._write(apply)

    async def heartbeat(self) -> float:
        """Renew this worker's lease; returns the seconds it now has. JournalError when the run has dropped
        this worker (it was taken for dead: its rows belong to others now)."""
        me, lease = self.worker, self.lease

        def apply(tx: Tx) -> float:
            row = tx.execute(
                f"UPDATE workers SET alive_until = {DB_NOW} + ? WHERE id = ? AND alive_until > {DB_NOW}"
                " RETURNING alive_until",
                (lease, me),
            ).fetchone()
            if row is None:
                raise JournalError(
                    f"the journal {self.where} took this worker for dead (no heartbeat for {lease:.0f} s) "
                    "and "
                    "gave its items to other workers; it stops here"
                )
            return lease

        return float(await self._write(apply))

    async def claim_pending(self, limit: int) -> list[ItemRecord]:
        """Take up to ``limit`` pending items nobody holds, in manifest order, without waiting on rows other
        workers are claiming at the same moment (``SKIP LOCKED``)."""
        me = self.worker

        def apply(tx: Tx) -> list[tuple[Any, ...]]:
            return list(
                tx.execute(
                    f"UPDATE items SET lease_owner = ? WHERE item_id IN (SELECT item_id FROM items"
                    " WHERE state = 'pending' AND lease_owner IS NULL ORDER BY idx"
                    f" LIMIT ?{POSTGRES.skip_locked})"
                    f" RETURNING {COLUMNS}",
                    (me, limit),
                ).fetchall()
            )

        rows = await self._write(apply)
        return sorted(map(decode_record, rows), key=lambda record: (record.index, record.item_id))

    async def take_orphans(self, *, limit: int, resubmit_ambiguous: bool) -> Orphans:
        """Take over the rows of workers whose lease lapsed: up to ``limit`` accepted predictions to poll,
        their interrupted submits settled by the ambiguous-submit policy, their pending claims released."""
        me = self.worker

        def apply(tx: Tx) -> Orphans:
            return _take_orphans(tx, me, limit, resubmit_ambiguous)

        return await self._write(apply)

    async def release(self) -> int:
        """Give back what this worker holds but has not finished (a stop): its pending claims, and its
        accepted predictions, which the next live worker polls. Returns how many rows."""
        me = self.worker

        def apply(tx: Tx) -> int:
            return int(
                tx.execute(
                    f"UPDATE items SET lease_owner = NULL WHERE lease_owner = ? AND state IN ({_ACTIVE_SQL})",
                    (me,),
                ).rowcount
            )

        return await self._write(apply)

    async def leave(self, stats: dict[str, Any]) -> list[dict[str, Any]]:
        """Leave the run, recording this worker's figures. Returns every figure of the round's workers when
        no other is alive any more (this worker writes the reports), else an empty list."""
        me = self.worker

        def apply(tx: Tx) -> list[dict[str, Any]]:
            tx.execute("SELECT pg_advisory_xact_lock(hashtext(current_schema()))")
            tx.execute("UPDATE workers SET alive_until = 0, stats = ? WHERE id = ?", (dumps(stats), me))
            alive = tx.execute(f"SELECT count(*) FROM workers WHERE alive_until > {DB_NOW}").fetchone()
            if int(alive[0]):
                return []
            rows = tx.execute("SELECT stats FROM workers WHERE stats IS NOT NULL ORDER BY started_at")
            return [json.loads(row[0]) for row in rows]

        return await self._write(apply)

    def unfinished(self, *, besides_mine: bool) -> int:
        """Items not yet succeeded or failed; ``besides_mine``: leaving out those this worker holds (what the
        run still waits for from others, or from nobody: orphans)."""
        mine = " AND (lease_owner IS NULL OR lease_owner != ?)" if besides_mine else ""
        row = self._reader.execute(
            f"SELECT count(*) FROM items WHERE state IN ({_ACTIVE_SQL}){mine}",
            (self.worker,) if besides_mine else (),
        ).fetchone()
        return int(row[0])

    def owned_by_others(self) -> int:
        """Rows a live worker other than this one holds."""
        row = self._reader.execute(
            f"SELECT count(*) FROM items i JOIN workers w ON w.id = i.lease_owner"
            f" WHERE i.state IN ({_ACTIVE_SQL}) AND w.id != ? AND w.alive_until > {DB_NOW}",
            (self.worker,),
        ).fetchone()
        return int(row[0])

    def owner_condition(self) -> tuple[str, tuple[Any, ...]]:
        """Once registered, a worker sends only what it holds, and only while the run takes it for alive:
        one taken for dead (its claims given to others) is fenced off by the database itself."""
        if not self._registered:
            return "", ()
        alive = f"EXISTS (SELECT 1 FROM workers WHERE id = ? AND alive_until > {DB_NOW})"
        return f" AND lease_owner = ? AND {alive}", (self.worker, self.worker)


def _take_orphans(tx: Tx, me: str, limit: int, resubmit_ambiguous: bool) -> Orphans:
    dead = [
        str(row[0])
        for row in tx.execute(f"SELECT id FROM workers WHERE alive_until <= {DB_NOW} AND stats IS NULL")
    ]
    # Rows whose owner is no live worker: a dead one's, or released (NULL) by one that stopped.
    orphan = (
        f"(lease_owner IS NULL OR NOT EXISTS (SELECT 1 FROM workers w WHERE w.id = items.lease_owner"
        f" AND w.alive_until > {DB_NOW}))"
    )
    released = int(
        tx.execute(
            "UPDATE items SET lease_owner = NULL WHERE state = 'pending' AND lease_owner IS NOT NULL"
            f" AND {orphan}"
        ).rowcount
    )
    ambiguous = [
        str(row[0])
        for row in tx.execute(
            f"SELECT item_id FROM items WHERE state = 'submitting' AND {orphan} ORDER BY idx"
            f"{POSTGRES.skip_locked}"
        )
    ]
    resent: list[str] = []
    failed: list[str] = []
    if ambiguous:
        marks = ", ".join("?" * len(ambiguous))
        if resubmit_ambiguous:
            tx.execute(
                "UPDATE items SET state = 'pending', lease_owner = NULL, possible_duplicate = 1,"
                f" updated_at = {DB_NOW} WHERE item_id IN ({marks})",
                ambiguous,
            )
            resent = ambiguous
        else:
            tx.execute(
                "UPDATE items SET state = 'failed', lease_owner = NULL, error = ?,"
                f" updated_at = {DB_NOW} WHERE item_id IN ({marks})",
                (dumps(AMBIGUOUS_SUBMIT_ERROR.as_dict()), *ambiguous),
            )
            failed = ambiguous
    rows = tx.execute(
        f"UPDATE items SET lease_owner = ? WHERE item_id IN (SELECT item_id FROM items"
        f" WHERE state = 'submitted' AND {orphan} ORDER BY idx LIMIT ?{POSTGRES.skip_locked})"
        f" RETURNING {COLUMNS}",
        (me, limit),
    ).fetchall()
    if dead:
        tx.execute(
            f"UPDATE workers SET stats = ? WHERE id IN ({', '.join('?' * len(dead))})",
            (dumps({"died": True}), *dead),
        )
    to_poll = sorted(map(decode_record, rows), key=lambda record: (record.index, record.item_id))
    return Orphans(to_poll, resent, failed, released, dead)


def _check_run_exists(url: str, run: str, shown: str) -> None:
    conn = connect(url, None)
    try:
        exists = conn.execute("SELECT to_regclass(%s)", (f"{RUNS_SCHEMA}.runs",)).fetchone()
        names: list[str] = []
        if exists and exists[0] is not None:
            names = [str(r[0]) for r in conn.execute(f"SELECT name FROM {RUNS_SCHEMA}.runs ORDER BY name")]
    finally:
        conn.close()
    if run not in names:
        known = ", ".join(names[:20]) if names else "none"
        raise UsageError(f"the journal database {shown} has no run named {run!r} (runs there: {known})")


def run_names(url: str) -> list[str]:
    """The runs a journal database holds (for ``status`` without a name)."""
    conn = connect(url, None)
    try:
        exists = conn.execute("SELECT to_regclass(%s)", (f"{RUNS_SCHEMA}.runs",)).fetchone()
        if not exists or exists[0] is None:
            return []
        return [str(r[0]) for r in conn.execute(f"SELECT name FROM {RUNS_SCHEMA}.runs ORDER BY name")]
    finally:
        conn.close()


_JSON_VALID_FUNCTION = """CREATE OR REPLACE FUNCTION be_json_valid(value TEXT) RETURNS BOOLEAN
LANGUAGE plpgsql IMMUTABLE AS $body$
BEGIN
    PERFORM value::json;
    RETURN TRUE;
EXCEPTION WHEN others THEN
    RETURN FALSE;
END
$body$"""


def _init_schema(tx: Tx, run: str, schema: str, where: str) -> None:
    # One worker at a time lays out a run (CREATE ... IF NOT EXISTS races with itself otherwise).
    tx.execute("SELECT pg_advisory_xact_lock(hashtext(?))", (f"batch-engine:{schema}",))
    tx.execute(f"CREATE SCHEMA IF NOT EXISTS {RUNS_SCHEMA}")
    tx.execute(
        f"CREATE TABLE IF NOT EXISTS {RUNS_SCHEMA}.runs (name TEXT PRIMARY KEY, schema_name TEXT NOT NULL"
        " UNIQUE, created_at DOUBLE PRECISION NOT NULL)"
    )
    tx.execute(
        f"INSERT INTO {RUNS_SCHEMA}.runs (name, schema_name, created_at) VALUES (?, ?, {DB_NOW})"
        " ON CONFLICT (name) DO NOTHING",
        (run, schema),
    )
    tx.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
    found = None
    if tx.execute("SELECT to_regclass('meta')").fetchone()[0] is not None:
        version = tx.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        found = json.loads(version[0]) if version else None
    if isinstance(found, int) and found > SCHEMA_VERSION:
        raise newer_schema(where, found)
    if found == SCHEMA_VERSION:  # laid out already: no DDL, which would wait on live workers' row locks
        return
    tx.execute(_JSON_VALID_FUNCTION)
    for statement in tables(POSTGRES):
        tx.execute(statement)
    tx.execute(STEM_INDEX)
    tx.execute(
        "CREATE TABLE IF NOT EXISTS workers (id TEXT PRIMARY KEY, host TEXT NOT NULL, pid INTEGER NOT NULL,"
        " started_at DOUBLE PRECISION NOT NULL, alive_until DOUBLE PRECISION NOT NULL, stats TEXT)"
    )
    tx.execute("CREATE INDEX IF NOT EXISTS items_owner ON items (lease_owner) WHERE lease_owner IS NOT NULL")
    tx.execute(
        "CREATE TABLE IF NOT EXISTS pacer (id INTEGER PRIMARY KEY, tat DOUBLE PRECISION NOT NULL,"
        " paused_until DOUBLE PRECISION NOT NULL, cuts INTEGER NOT NULL DEFAULT 0, cut_rate DOUBLE PRECISION)"
    )
    tx.execute("INSERT INTO pacer (id, tat, paused_until) VALUES (1, 0, 0) ON CONFLICT (id) DO NOTHING")
    put_meta(tx, "schema_version", json.dumps(SCHEMA_VERSION))


def drop_run(url: str, run: str) -> None:
    """Forget a run entirely (tests, and ``--fresh`` with no live worker does not drop: it empties)."""
    conn = connect(url, None)
    try:
        schema = schema_for(run)
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        exists = conn.execute("SELECT to_regclass(%s)", (f"{RUNS_SCHEMA}.runs",)).fetchone()
        if exists and exists[0] is not None:
            conn.execute(f"DELETE FROM {RUNS_SCHEMA}.runs WHERE name = %s", (run,))
    finally:
        conn.close()
