"""The default journal: ``<out_dir>/journal.sqlite``, SQLite in WAL mode with ``synchronous=FULL``."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from batch_engine.store.dialect import SQLITE, Tx
from batch_engine.store.files import JOURNAL_NAME, stem_key
from batch_engine.store.sql_journal import (
    SCHEMA_VERSION,
    STEM_INDEX,
    SqlJournal,
    newer_schema,
    put_meta,
    tables,
)
from batch_engine.store.writer import DEFAULT_MAX_BATCH, Writer, connect_sqlite


class SqliteJournal(SqlJournal):
    """The journal in ``<out_dir>/journal.sqlite``: open it with ``await SqliteJournal.open(out_dir)``."""

    __slots__ = ("path",)

    def __init__(self, path: Path, *args: Any, **kwargs: Any) -> None:
        super().__init__(str(path), *args, **kwargs)
        self.path = path  #: the journal's file

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

        def connect() -> object:
            conn = connect_sqlite(path)
            if max_pages is not None:
                conn.execute(f"PRAGMA max_page_count = {int(max_pages)}")
            return conn

        writer = Writer(connect, where=str(path), max_batch=max_batch, dialect=SQLITE)
        try:
            await writer.write(lambda tx: _init_schema(tx, path))
            reader = connect_sqlite(path)
            reader.execute("PRAGMA query_only=ON")
        except BaseException:
            await writer.stop()
            raise
        return cls(path, writer, Tx(reader, SQLITE), clock, out_dir=out_dir)


def _init_schema(tx: Tx, path: Path) -> None:
    row = tx.execute("SELECT name FROM sqlite_master WHERE type = 'table' AND name = 'meta'").fetchone()
    found = None
    if row is not None:
        version = tx.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        found = json.loads(version[0]) if version else None
    if isinstance(found, int) and found > SCHEMA_VERSION:
        raise newer_schema(str(path), found)
    if found == 1:
        _migrate_from_1(tx)
    for statement in tables(SQLITE):
        tx.execute(statement)
    tx.execute(STEM_INDEX)
    put_meta(tx, "schema_version", json.dumps(SCHEMA_VERSION))


def _migrate_from_1(tx: Tx) -> None:
    """Schema 1 had no archive, no stem_key and no lease columns; stems come from the ids (a pair of ids
    that only differ in case, which schema 1 allowed, keeps the second without one)."""
    for column in ("stem_key TEXT", "lease_owner TEXT", "lease_until REAL"):
        tx.execute(f"ALTER TABLE items ADD COLUMN {column}")
    tx.execute(STEM_INDEX)
    ids = [row[0] for row in tx.execute("SELECT item_id FROM items")]
    tx.executemany(
        "UPDATE OR IGNORE items SET stem_key = ? WHERE item_id = ?", [(stem_key(i), i) for i in ids]
    )
