"""Which keys of a manifest's items must be unique (ids, output files), checked without holding them all.

A million ids would cost about 100 MB as Python strings; here they go to a scratch SQLite file with a
unique index, so checking them costs the same memory at any size. The first item to use a key owns it; a
later one learns who (its position, id and place), for the problem message.
"""

from __future__ import annotations

import sqlite3
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType


@dataclass(frozen=True)
class Owner:
    """The first item that used a key."""

    position: int
    item_id: str
    where: str  #: e.g. ``catalog.csv:12`` or ``job.yaml:40``


class UniqueKeys:
    """``with UniqueKeys() as keys:``, then ``keys.claim(kind, key, ...)`` per key; a temp file, removed."""

    __slots__ = ("_conn", "_dir")

    def __init__(self) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="batch-engine-keys-")
        self._conn = sqlite3.connect(Path(self._dir.name) / "keys.sqlite", isolation_level=None)
        self._conn.execute("PRAGMA journal_mode = OFF")
        self._conn.execute("PRAGMA synchronous = OFF")
        self._conn.execute(
            "CREATE TABLE keys (kind TEXT, key TEXT, position INTEGER, item_id TEXT, place TEXT,"
            " PRIMARY KEY (kind, key)) WITHOUT ROWID"
        )
        self._conn.execute("BEGIN")

    def __enter__(self) -> UniqueKeys:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._conn.close()
        self._dir.cleanup()

    def claim(self, kind: str, key: str, *, position: int, item_id: str, where: str) -> Owner | None:
        """Take ``key`` for this item; None when it was free, else the item that holds it."""
        taken = self._conn.execute(
            "INSERT INTO keys VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING RETURNING 1",
            (kind, key, position, item_id, where),
        ).fetchone()
        if taken is not None:
            return None
        row = self._conn.execute(
            "SELECT position, item_id, place FROM keys WHERE kind = ? AND key = ?", (kind, key)
        ).fetchone()
        return Owner(row[0], row[1], row[2])
