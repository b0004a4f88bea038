"""Where a run's state lives: the journal, the out-dir lock, and the files of the out dir."""

from __future__ import annotations

from pathlib import Path

from batch_engine.store.journal import Journal
from batch_engine.store.sqlite import SqliteJournal


async def open_journal(out_dir: Path) -> Journal:
    """The journal of ``out_dir``: ``<out_dir>/journal.sqlite``, created when missing."""
    return await SqliteJournal.open(out_dir)


__all__ = ["Journal", "open_journal"]
