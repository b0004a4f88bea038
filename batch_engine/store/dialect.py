"""The few ways the journal's SQL differs between SQLite and PostgreSQL, in one place.

The journal's statements are written once, in SQLite's spelling (``?`` placeholders, ``json_extract``,
``max(a, b)``...), and each dialect turns a statement into its own (`Dialect.sql`), builds what no common
spelling covers (an insert that ignores a conflict, a row as JSON), and knows its connection's state and
errors. Everything else (the tables, the transitions, the sync, the archive) is shared.
"""

from __future__ import annotations

import functools
import re
import sqlite3
from collections.abc import Sequence
from typing import Any, Protocol

from batch_engine.errors import JournalError

#: A DB-API connection as the journal uses it: sqlite3's, or psycopg's (autocommit, explicit BEGIN).
Connection = Any


class Dialect(Protocol):
    """What the shared journal code asks of a database."""

    name: str
    #: appended to a claim's row selection: PostgreSQL's ``FOR UPDATE SKIP LOCKED`` lets several workers
    #: claim at once without waiting on each other; SQLite has one writer and needs nothing
    skip_locked: str
    #: a statement that fails rolls back the whole transaction (PostgreSQL), not itself alone (SQLite):
    #: every write then runs in a savepoint of its own
    needs_savepoints: bool

    def sql(self, text: str) -> str: ...
    def begin(self) -> str: ...
    def seen_table(self) -> str: ...
    # The builders below answer in SQLite's spelling too (``?``): `sql` turns them into the dialect's.
    def insert_ignoring(self, table: str, columns: Sequence[str]) -> str: ...
    def put_meta(self) -> str: ...
    def json_object(self, columns: Sequence[str]) -> str: ...
    def usable(self, conn: Connection) -> bool: ...
    def error(self, exc: BaseException, where: str) -> BaseException: ...


class SqliteDialect:
    """SQLite's own spelling: statements pass through unchanged."""

    name = "sqlite"
    skip_locked = ""
    needs_savepoints = False

    def sql(self, text: str) -> str:
        return text

    def begin(self) -> str:
        return "BEGIN IMMEDIATE"

    def seen_table(self) -> str:
        return "CREATE TEMP TABLE IF NOT EXISTS sync_seen (item_id TEXT PRIMARY KEY) WITHOUT ROWID"

    def insert_ignoring(self, table: str, columns: Sequence[str]) -> str:
        marks = ", ".join("?" * len(columns))
        return f"INSERT OR IGNORE INTO {table} ({', '.join(columns)}) VALUES ({marks})"

    def put_meta(self) -> str:
        return "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)"

    def json_object(self, columns: Sequence[str]) -> str:
        return "json_object(" + ", ".join(f"'{column}', {column}" for column in columns) + ")"

    def usable(self, conn: Connection) -> bool:
        return bool(conn.in_transaction)

    def error(self, exc: BaseException, where: str) -> BaseException:
        """SQLite's exceptions as ``JournalError`` (a full disk said so); anything else passes through."""
        if not isinstance(exc, sqlite3.Error):
            return exc
        code = getattr(exc, "sqlite_errorcode", 0) & 0xFF
        if code == sqlite3.SQLITE_FULL or "database or disk is full" in str(exc):
            message = (
                f"cannot write the journal {where}: the disk is full ({exc}); free some space, then run "
                "again to resume"
            )
        elif code in (sqlite3.SQLITE_NOTADB, sqlite3.SQLITE_CORRUPT):
            message = f"the journal {where} is unreadable ({exc}); move it aside or choose another out dir"
        else:
            message = f"journal {where}: {exc}"
        return _journal_error(message, exc)


class PostgresDialect:
    """PostgreSQL: ``%s`` placeholders, ``greatest``, ``->>`` for JSON, regular expressions for GLOB."""

    name = "postgresql"
    skip_locked = " FOR UPDATE SKIP LOCKED"
    needs_savepoints = True

    def sql(self, text: str) -> str:
        return _postgres_sql(text)

    def begin(self) -> str:
        return "BEGIN"

    def seen_table(self) -> str:
        return "CREATE TEMP TABLE IF NOT EXISTS sync_seen (item_id TEXT PRIMARY KEY)"

    def insert_ignoring(self, table: str, columns: Sequence[str]) -> str:
        marks = ", ".join("?" * len(columns))
        return f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks}) ON CONFLICT DO NOTHING"

    def put_meta(self) -> str:
        upsert = "ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value"
        return f"INSERT INTO meta (key, value) VALUES (?, ?) {upsert}"

    def json_object(self, columns: Sequence[str]) -> str:
        return "json_build_object(" + ", ".join(f"'{column}', {column}" for column in columns) + ")::text"

    def usable(self, conn: Connection) -> bool:
        from psycopg.pq import TransactionStatus

        return bool(conn.info.transaction_status == TransactionStatus.INTRANS)

    def error(self, exc: BaseException, where: str) -> BaseException:
        """psycopg's exceptions as ``JournalError``, never quoting a password (libpq's messages do not)."""
        import psycopg

        if not isinstance(exc, psycopg.Error):
            return exc
        if isinstance(exc, psycopg.OperationalError):
            return _journal_error(f"cannot reach the journal database {where}: {_first_line(exc)}", exc)
        return _journal_error(f"journal database {where}: {_first_line(exc)}", exc)


_JSON_FIELD = re.compile(r"json_extract\((\w+), '\$\.(\w+)'\)")
_JSON_VALID = re.compile(r"json_valid\((\w+)\)")
_GLOB = re.compile(r"(\w+) GLOB '([^']*)'")


@functools.cache
def _postgres_sql(text: str) -> str:
    """A statement in SQLite's spelling, in PostgreSQL's: placeholders, JSON, ``max``, ``GLOB``."""
    text = text.replace("%", "%%").replace("?", "%s")
    text = _JSON_FIELD.sub(r"(\1::json ->> '\2')", text)
    text = _JSON_VALID.sub(r"be_json_valid(\1)", text)
    text = _GLOB.sub(lambda m: f"{m[1]} ~ '^{_glob_regex(m[2])}$'", text)
    return text.replace("max(possible_duplicate,", "greatest(possible_duplicate,")


def _glob_regex(pattern: str) -> str:
    kept = "[]-"  # a character class stays one
    return "".join(
        ".*" if c == "*" else "." if c == "?" else c if c in kept else re.escape(c) for c in pattern
    )


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def _journal_error(message: str, cause: BaseException) -> JournalError:
    error = JournalError(message)
    error.__cause__ = cause
    return error


SQLITE = SqliteDialect()
POSTGRES = PostgresDialect()


class Tx:
    """A connection as the journal's code uses it: statements in SQLite's spelling, turned into the
    dialect's on the way; ``executemany`` on either database."""

    __slots__ = ("conn", "dialect")

    def __init__(self, conn: Connection, dialect: Dialect) -> None:
        self.conn = conn
        self.dialect = dialect

    def execute(self, text: str, params: Sequence[Any] = ()) -> Any:
        return self.conn.execute(self.dialect.sql(text), tuple(params))

    def executemany(self, text: str, rows: Sequence[Sequence[Any]]) -> Any:
        if not rows:
            return _NoRows()
        if self.dialect is SQLITE:
            return self.conn.executemany(text, rows)
        cursor = self.conn.cursor()
        cursor.executemany(self.dialect.sql(text), rows)
        return cursor


class _NoRows:
    rowcount = 0
