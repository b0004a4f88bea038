"""Make the journal's rows match a manifest, chunk by chunk, without ever forgetting a paid prediction.

An item new to the journal is added pending, unless the archive holds a version of it with the same
fingerprint (it was removed, or changed and changed back): that version comes back as it was, outputs and
prediction id included. An item whose fingerprint changed is archived as it stood and reset to pending (or
restored from the archive). An item no longer in the manifest is *retired*: moved to the archive, never
deleted. The archive is append-only; only ``--fresh`` empties it.

Each chunk is one write of the journal; the manifest is read once. The ids a sync sees go to a temporary
table of the writer's connection (touching each row would rewrite the whole table), and the rows whose ids it
did not see are the retired ones. The output
file-name stem of every id (``files.stem_key``) is unique among the live rows (an index): a new id whose
files would land on those of an item being retired in the same sync waits until the retired rows have left.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

from batch_engine.errors import ManifestError, Problem
from batch_engine.store import transitions
from batch_engine.store.dialect import Tx
from batch_engine.store.files import safe_stem, stem_key
from batch_engine.store.journal import SyncResult, dumps
from batch_engine.values import GENERATED_ID_PREFIX, Item, OutputFile

CHUNK = 2000  #: manifest items per write of the journal
#: Whether an archived success's outputs are still where it left them, whole (`files_intact` for an out dir,
#: `staging.out_store.OutStore.intact` for an object store): it comes back succeeded only then. Called in
#: the journal's writer thread.
IntactCheck = Callable[[Sequence[OutputFile]], bool]
_LEGACY_ID = re.compile(r"item-[0-9]+")  #: what such an item was called before: its position

#: The columns an archived version keeps, in this order (its ``row`` is a JSON object of them).
ARCHIVED_COLUMNS = (
    "idx",
    "fingerprint",
    "spec",
    "request",
    "state",
    "prediction_id",
    "attempts",
    "possible_duplicate",
    "outputs",
    "error",
    "submitted_at",
    "completed_at",
    "inference_ms",
)
_PENDING = transitions.REQUEST_CHANGED.target.value


@dataclass(slots=True)
class SyncCounts:
    """What a sync has done so far (mutable, inside one ``sync_manifest``)."""

    added: int = 0
    changed: int = 0
    restored: int = 0
    unchanged: int = 0
    retired: int = 0

    def result(self) -> SyncResult:
        return SyncResult(
            added=self.added,
            changed=self.changed,
            removed=self.retired,
            unchanged=self.unchanged,
            restored=self.restored,
        )


def chunks(items: Iterable[Item], size: int = CHUNK) -> Iterator[list[Item]]:
    iterator = iter(items)
    while chunk := list(islice(iterator, size)):
        yield chunk


def begin(tx: Tx) -> None:
    """Start a sync: an empty table of the ids it sees (temporary tables are on disk: see `connect`)."""
    tx.execute(tx.dialect.seen_table())
    tx.execute("DELETE FROM sync_seen")


def sync_chunk(
    tx: Tx, chunk: Sequence[Item], now: float, intact: IntactCheck
) -> tuple[SyncCounts, list[Item]]:
    """Apply one chunk; returns its counts and the new items that must wait for the retirements."""
    counts = SyncCounts()
    ids = [item.id for item in chunk]
    tx.executemany(tx.dialect.insert_ignoring("sync_seen", ("item_id",)), [(i,) for i in ids])
    columns = "item_id, fingerprint, idx, spec, request"
    known = {row[0]: row[1:] for row in _select(tx, columns, "items", ids)}
    fresh = [item for item in chunk if item.id not in known]
    fresh = [item for item in fresh if not _adopt_legacy_id(tx, item, now, counts)]
    for item in chunk:
        old = known.get(item.id)
        if old is not None:
            _sync_known(tx, item, old, now, intact, counts)
    waiting = _add(tx, fresh, now, intact, counts)
    return counts, waiting


def retire_unseen(tx: Tx, now: float) -> int:
    """Archive every row the sync did not see (items removed from the manifest); returns how many."""
    row = tx.dialect.json_object(ARCHIVED_COLUMNS)
    tx.execute(
        f"{_INTO_ARCHIVE} SELECT item_id, fingerprint, stem_key, {row}, 'removed', ?"
        f" FROM items WHERE {_UNSEEN}",
        (now,),
    )
    return int(tx.execute(f"DELETE FROM items WHERE {_UNSEEN}").rowcount)


def add_waiting(tx: Tx, waiting: Sequence[Item], now: float, intact: IntactCheck) -> SyncCounts:
    """Add the new items held back until the retired rows left; a clash now is a real one."""
    counts = SyncCounts()
    still = _add(tx, list(waiting), now, intact, counts)
    if still:
        raise _clash(tx, still[0])
    return counts


# -- one item ---------------------------------------------------------------------------------------


def _sync_known(
    tx: Tx,
    item: Item,
    old: tuple[Any, ...],
    now: float,
    intact: IntactCheck,
    counts: SyncCounts,
) -> None:
    fingerprint, idx, spec, request = old
    spec_text, request_text = dumps(item.spec), dumps(item.request)
    if fingerprint == item.fingerprint:
        counts.unchanged += 1
        if (idx, spec, request) != (item.index, spec_text, request_text):  # moved, or a damaged copy
            tx.execute(
                "UPDATE items SET idx = ?, spec = ?, request = ?, updated_at = ? WHERE item_id = ?",
                (item.index, spec_text, request_text, now, item.id),
            )
        return
    _archive_live(tx, item.id, "changed", now)
    found = _archived_version(tx, item, intact)
    version = found[1] if found is not None else _new_version(item)
    tx.execute(
        f"UPDATE items SET {_SET_ALL}, updated_at = ? WHERE item_id = ?",
        (*version, now, item.id),
    )
    if found is None:
        counts.changed += 1
        return
    counts.restored += 1
    tx.execute("DELETE FROM archive WHERE id = ?", (found[0],))


def _add(
    tx: Tx,
    fresh: list[Item],
    now: float,
    intact: IntactCheck,
    counts: SyncCounts,
) -> list[Item]:
    """Insert new items (restored from the archive where it has them); returns those whose output
    stem is still taken by another live row (inserted later, or refused)."""
    if not fresh:
        return []
    archived = {row[0] for row in _select(tx, "DISTINCT item_id", "archive", [i.id for i in fresh])}
    rows, restored = [], {}
    for item in fresh:
        found = _archived_version(tx, item, intact) if item.id in archived else None
        if found is not None:
            restored[item.id] = found[0]
        version = found[1] if found is not None else _new_version(item)
        rows.append((item.id, stem_key(item.id), *version, now))
    columns = ("item_id", "stem_key", *ARCHIVED_COLUMNS, "updated_at")
    tx.executemany(tx.dialect.insert_ignoring("items", columns), rows)
    inserted = {row[0] for row in _select(tx, "item_id", "items", [i.id for i in fresh])}
    back = [(rowid,) for item_id, rowid in restored.items() if item_id in inserted]
    tx.executemany("DELETE FROM archive WHERE id = ?", back)  # only once the row is live again
    counts.restored += len(back)
    counts.added += len(inserted) - len(back)
    waiting = [item for item in fresh if item.id not in inserted]
    for item in waiting:
        owner = _stem_owner(tx, item.id)
        if owner is not None and owner[1]:  # a live item of this very manifest
            raise _clash(tx, item)
    return waiting


def _adopt_legacy_id(tx: Tx, item: Item, now: float, counts: SyncCounts) -> bool:
    """An item without an id was once called ``item-<position>``; its id now comes from its content. The row
    of the same request under its old name is renamed, not retired: it is not paid for again."""
    if not item.id.startswith(GENERATED_ID_PREFIX):
        return False
    rows = tx.execute(
        f"SELECT item_id FROM items WHERE fingerprint = ? AND {_UNSEEN} AND item_id GLOB 'item-[0-9]*'",
        (item.fingerprint,),
    ).fetchall()
    old = next((row[0] for row in rows if _LEGACY_ID.fullmatch(row[0])), None)
    if old is None:
        return False
    tx.execute(
        "UPDATE items SET item_id = ?, stem_key = ?, idx = ?, spec = ?, request = ?, updated_at = ?"
        " WHERE item_id = ?",
        (item.id, stem_key(item.id), item.index, dumps(item.spec), dumps(item.request), now, old),
    )
    counts.unchanged += 1
    return True


def _new_version(item: Item) -> tuple[Any, ...]:
    """A new item's columns (in ``ARCHIVED_COLUMNS`` order): pending, nothing done yet."""
    head = (item.index, item.fingerprint, dumps(item.spec), dumps(item.request), _PENDING)
    return (*head, None, 0, 0, None, None, None, None, None)


def _archive_live(tx: Tx, item_id: str, reason: str, now: float) -> None:
    """Keep the row as it stands in the archive, when it holds anything a run did (not just pending)."""
    row = tx.dialect.json_object(ARCHIVED_COLUMNS)
    tx.execute(
        f"{_INTO_ARCHIVE} SELECT item_id, fingerprint, stem_key, {row}, ?, ? FROM items"
        f" WHERE item_id = ? AND (state != '{_PENDING}' OR attempts > 0 OR prediction_id IS NOT NULL)",
        (reason, now, item_id),
    )


def _archived_version(tx: Tx, item: Item, intact: IntactCheck) -> tuple[int, tuple[Any, ...]] | None:
    """The newest archived version of ``item`` with its fingerprint: its archive rowid and the row's
    columns in ``ARCHIVED_COLUMNS`` order (the manifest's index, spec and request); None if none.

    A version that succeeded comes back succeeded only if ``intact`` finds its files still there with
    their sha256 (another item may have overwritten them meanwhile); else it comes back ``submitted``, so
    its paid prediction is polled and downloaded again, never paid again.
    """
    found = tx.execute(
        "SELECT id, row FROM archive WHERE item_id = ? AND fingerprint = ? ORDER BY id DESC LIMIT 1",
        (item.id, item.fingerprint),
    ).fetchone()
    if found is None:
        return None
    row = json.loads(found[1])
    row["idx"], row["spec"], row["request"] = item.index, dumps(item.spec), dumps(item.request)
    if row["state"] == transitions.SUCCEED.target.value and not _outputs_intact(row["outputs"], intact):
        row["state"], row["outputs"], row["completed_at"] = transitions.ACCEPTED.target.value, None, None
    return found[0], tuple(row[column] for column in ARCHIVED_COLUMNS)


def _outputs_intact(outputs: str | None, intact: IntactCheck) -> bool:
    try:
        listed = [OutputFile(str(o["path"]), str(o["sha256"])) for o in json.loads(outputs or "[]")]
    except (ValueError, KeyError, TypeError):
        return False
    return bool(listed) and intact(listed)


def files_intact(out_dir: Path) -> IntactCheck:
    """The check of a local out dir: every output's file is there, with its sha256."""

    def intact(outputs: Sequence[OutputFile]) -> bool:
        try:
            return all(_sha256(out_dir / output.path) == output.sha256 for output in outputs)
        except OSError:
            return False

    return intact


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _stem_owner(tx: Tx, item_id: str) -> tuple[str, bool] | None:
    """The live row holding ``item_id``'s output stem, and whether this sync has seen it (it stays)."""
    row = tx.execute(
        "SELECT item_id, EXISTS (SELECT 1 FROM sync_seen s WHERE s.item_id = items.item_id) FROM items"
        " WHERE stem_key = ?",
        (stem_key(item_id),),
    ).fetchone()
    return None if row is None else (row[0], bool(row[1]))


def _clash(tx: Tx, item: Item) -> ManifestError:
    owner = _stem_owner(tx, item.id)
    other = owner[0] if owner else "another item"
    message = (
        f"id {item.id!r} would write the same output files as item {other!r}"
        f" (images/{safe_stem(item.id)}-1...) on a case-insensitive file system (macOS, Windows); rename one"
    )
    return ManifestError([Problem("journal", message, "id", item.index, item.id)])


def _select(tx: Tx, columns: str, table: str, ids: Sequence[str]) -> list[tuple[Any, ...]]:
    if not ids:
        return []
    marks = ", ".join("?" * len(ids))
    rows: list[tuple[Any, ...]] = tx.execute(
        f"SELECT {columns} FROM {table} WHERE item_id IN ({marks})", tuple(ids)
    ).fetchall()
    return rows


#: An anti-join, not ``NOT IN``: PostgreSQL runs ``NOT IN`` over a million ids as a scan per row.
_UNSEEN = "NOT EXISTS (SELECT 1 FROM sync_seen s WHERE s.item_id = items.item_id)"
_INTO_ARCHIVE = "INSERT INTO archive (item_id, fingerprint, stem_key, row, reason, archived_at)"
_SET_ALL = ", ".join(f"{column} = ?" for column in ARCHIVED_COLUMNS)
