"""The journal's two backends, for tests that must hold with either: SQLite in the out dir, or PostgreSQL."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from pathlib import Path

from batch_engine.store.postgres import PostgresJournal, drop_run
from batch_engine.store.sql_journal import SqlJournal
from batch_engine.store.sqlite import SqliteJournal

NAMES = ("sqlite", "postgresql")


@dataclass
class Backend:
    """One backend; with PostgreSQL, a run of this test's own (``run``), dropped afterwards."""

    name: str
    url: str | None = None  #: the database (PostgreSQL only)
    run: str = field(default_factory=lambda: f"test-{uuid.uuid4().hex[:10]}")

    async def open(self, out_dir: Path, *, lease: float = 30.0) -> SqlJournal:
        return await open_backend(self.name, out_dir, self.url, self.run, lease=lease)

    def args(self) -> list[str]:
        """The CLI's arguments choosing this backend."""
        return [] if self.url is None else ["--journal", self.url]

    def drop(self) -> None:
        if self.url is not None:
            drop_run(self.url, self.run)


async def open_backend(
    name: str, out_dir: Path, url: str | None, run: str, *, lease: float = 30.0
) -> SqlJournal:
    if name == "sqlite":
        return await SqliteJournal.open(out_dir)
    assert url is not None
    return await PostgresJournal.open(url, run, out_dir=out_dir, lease=lease)
