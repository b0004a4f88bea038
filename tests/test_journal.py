"""The journal, on SQLite and on PostgreSQL: round trips, ordering, durability across crashes, group
commit and errors."""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import sys
from collections.abc import AsyncIterator, Mapping
from dataclasses import replace
from pathlib import Path

import anyio
import anyio.lowlevel
import pytest
from anyio.streams.buffered import BufferedByteReceiveStream

from batch_engine.errors import JournalError
from batch_engine.store import transitions
from batch_engine.store.files import JOURNAL_NAME
from batch_engine.store.journal import Journal, SyncResult
from batch_engine.store.sql_journal import SqlJournal
from batch_engine.store.sqlite import SqliteJournal
from batch_engine.store.transitions import TransitionRefused
from batch_engine.values import Item, ItemError, ItemState, Manifest, OutputFile, RunMeta
from tests.backends import Backend

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parents[1]


def manifest_of(*ids: str, fingerprints: Mapping[str, str] | None = None, spec_extra: str = "") -> Manifest:
    """A manifest of ``ids`` in that order; an item's fingerprint is ``fp-<id>`` unless given."""
    fingerprints = fingerprints or {}
    items = tuple(
        Item(
            index=index,
            id=item_id,
            spec={"id": item_id, "prompt": f"edit {item_id}{spec_extra}"},
            request={"prompt": f"edit {item_id}", "size": "1024x1024"},
            fingerprint=fingerprints.get(item_id, f"fp-{item_id}"),
        )
        for index, item_id in enumerate(ids)
    )
    return Manifest(
        item_source=lambda: iter(items),
        count=len(items),
        path="jobs/test.yaml",
        name="test",
        model="openai/gpt-image-2-plus",
        task="image-edit",
        defaults={"size": "1024x1024"},
        settings={},
    )


def ids_of(count: int) -> list[str]:
    return [f"item-{n:05d}" for n in range(count)]


@pytest.fixture
async def journal(tmp_path: Path, backend: Backend) -> AsyncIterator[SqlJournal]:
    async with await backend.open(tmp_path) as opened:
        yield opened


async def test_open_creates_a_wal_database_in_the_out_dir(tmp_path: Path) -> None:
    """Opening creates the out dir and a WAL-mode journal.sqlite in it, empty of items and meta."""
    out_dir = tmp_path / "out" / "run"
    async with await SqliteJournal.open(out_dir) as journal:
        interface: Journal = journal  # mypy checks SqliteJournal against the protocol
        assert journal.path == out_dir / JOURNAL_NAME
        assert interface.where == str(out_dir / JOURNAL_NAME)
        assert journal.meta() is None
        assert list(journal.records()) == []
    with contextlib.closing(sqlite3.connect(out_dir / JOURNAL_NAME)) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)


async def test_every_write_round_trips_through_a_reopen(tmp_path: Path, backend: Backend) -> None:
    """Each write method's change reads back the same, before and after closing and reopening."""
    meta = RunMeta(
        name="test",
        manifest_path="jobs/test.yaml",
        model="openai/gpt-image-2-plus",
        task="image-edit",
        base_url="http://127.0.0.1:1",
        defaults={"size": "1024x1024"},
        settings={"rate": 5},
        started_at=1.5,
        stats={"submits": 3},
    )
    outputs = (OutputFile(path="images/a-1.png", sha256="ab" * 32, url="http://x/a.png", nsfw=False),)
    error = ItemError(kind="content_policy", message="refused", status=400)
    async with await backend.open(tmp_path) as journal:
        await journal.set_meta(meta)
        await journal.sync_manifest(manifest_of("a", "b", "c", "d"))
        assert await journal.mark_submitting("a") == 1
        await journal.mark_submitted("a", prediction_id="pred-a", submitted_at=10.0)
        await journal.mark_succeeded("a", outputs=outputs, completed_at=12.0, inference_ms=1500)
        await journal.mark_submitting("b")
        await journal.mark_failed("b", error=error, completed_at=11.0, prediction_id="pred-b")
        await journal.mark_submitting("c")
        await journal.mark_pending("c", possible_duplicate=True)
        assert await journal.mark_submitting("c") == 2
    async with await backend.open(tmp_path) as journal:
        assert journal.meta() == meta
        a, b, c, d = (journal.get(item_id) for item_id in "abcd")
        assert a is not None
        assert b is not None
        assert c is not None
        assert d is not None
        assert (a.state, a.prediction_id, a.submitted_at) == ("succeeded", "pred-a", 10.0)
        assert a.completed_at == 12.0
        assert (a.outputs, a.inference_ms, a.attempts, a.error) == (outputs, 1500, 1, None)
        assert (a.index, a.fingerprint, a.spec["prompt"]) == (0, "fp-a", "edit a")
        assert a.request == {"prompt": "edit a", "size": "1024x1024"}
        assert (b.state, b.error, b.prediction_id, b.completed_at) == ("failed", error, "pred-b", 11.0)
        assert (c.state, c.attempts, c.possible_duplicate) == ("submitting", 2, True)
        assert (d.state, d.attempts, d.possible_duplicate, d.outputs) == ("pending", 0, False, ())
        assert journal.get("nope") is None


async def test_set_meta_replaces_the_previous_meta(journal: SqlJournal) -> None:
    """set_meta overwrites: the journal holds one RunMeta, the latest."""
    first = RunMeta(name="a", manifest_path="a.yaml", model="m", task="t", base_url="u")
    await journal.set_meta(first)
    await journal.set_meta(replace(first, stopped_reason="interrupted", finished_at=9.0))
    meta = journal.meta()
    assert meta is not None
    assert (meta.stopped_reason, meta.finished_at) == ("interrupted", 9.0)


async def test_final_marks_return_the_row_as_committed(journal: SqlJournal) -> None:
    """mark_succeeded and mark_failed hand back the item's final row, equal to what a read returns."""
    await journal.sync_manifest(manifest_of("ok", "bad"))
    for item_id in ("ok", "bad"):
        await journal.mark_submitting(item_id)
        await journal.mark_submitted(item_id, prediction_id=f"p-{item_id}", submitted_at=1.0)
    output = OutputFile(path="images/ok-1.png", sha256="ab", url="https://x/1.png", nsfw=False)
    done = await journal.mark_succeeded("ok", outputs=[output], completed_at=2.0, inference_ms=5)
    failed = await journal.mark_failed("bad", error=ItemError("timeout", "late"), completed_at=3.0)
    assert done == journal.get("ok")
    assert failed == journal.get("bad")
    assert (done.state, done.outputs, done.attempts) == (ItemState.SUCCEEDED, (output,), 1)
    assert (failed.prediction_id, failed.error) == ("p-bad", ItemError("timeout", "late"))


async def test_records_come_in_manifest_order(journal: SqlJournal) -> None:
    """records() yields rows in the manifest's current order, also after the manifest is reordered."""
    await journal.sync_manifest(manifest_of("c", "a", "b"))
    assert [r.item_id for r in journal.records()] == ["c", "a", "b"]
    await journal.sync_manifest(manifest_of("b", "c", "a"))
    assert [(r.index, r.item_id) for r in journal.records()] == [(0, "b"), (1, "c"), (2, "a")]


async def test_records_filter_by_state(journal: SqlJournal) -> None:
    """records(states) yields only rows in those states, still in manifest order."""
    await journal.sync_manifest(manifest_of(*"abcde"))
    for item_id in "dbe":
        await journal.mark_submitting(item_id)
    submitting = [r.item_id for r in journal.records({ItemState.SUBMITTING})]
    assert submitting == ["b", "d", "e"]
    assert [r.item_id for r in journal.records([ItemState.PENDING, ItemState.SUBMITTING])] == list("abcde")
    assert list(journal.records(())) == []


async def test_records_are_fetched_batch_by_batch(journal: SqlJournal) -> None:
    """records(batch=n) queries n rows at a time: a write made mid-iteration shows in a later batch."""
    ids = ids_of(95)
    await journal.sync_manifest(manifest_of(*ids))
    stream = journal.records(batch=10)
    first = [next(stream) for _ in range(10)]
    await journal.mark_submitting(ids[50])  # not fetched yet: its batch is queried later
    rest = list(stream)
    assert [r.item_id for r in first + rest] == ids
    assert rest[40].state == ItemState.SUBMITTING


async def test_counts_cover_every_state_and_error_kinds(journal: SqlJournal) -> None:
    """counts() has every state as a key; error kinds and possible duplicates are counted."""
    assert journal.counts() == dict.fromkeys(ItemState, 0)
    await journal.sync_manifest(manifest_of(*"abcd"))
    await journal.mark_failed("a", error=ItemError(kind="timeout", message="slow"))
    await journal.mark_failed("b", error=ItemError(kind="timeout", message="slow"))
    await journal.mark_failed("c", error=ItemError(kind="download", message="bad"))
    await journal.mark_submitting("d")
    await journal.mark_pending("d", possible_duplicate=True)
    assert journal.counts() == {**dict.fromkeys(ItemState, 0), ItemState.FAILED: 3, ItemState.PENDING: 1}
    assert journal.error_kind_counts() == {"download": 1, "timeout": 2}
    assert journal.possible_duplicate_count() == 1


async def test_sync_manifest_adds_resets_removes_and_keeps(journal: SqlJournal) -> None:
    """A resync adds new items, resets those with a new fingerprint, deletes dropped ones, keeps the rest."""
    assert await journal.sync_manifest(manifest_of("keep", "change", "drop")) == SyncResult(3, 0, 0, 0)
    for item_id in ("keep", "change"):
        await journal.mark_submitting(item_id)
        await journal.mark_submitted(item_id, prediction_id=f"p-{item_id}", submitted_at=1.0)
    await journal.mark_failed("change", error=ItemError(kind="timeout", message="x"), prediction_id="p2")
    result = await journal.sync_manifest(manifest_of("new", "change", "keep", fingerprints={"change": "fp2"}))
    assert result == SyncResult(added=1, changed=1, removed=1, unchanged=1)
    assert [(r.index, r.item_id, r.state) for r in journal.records()] == [
        (0, "new", "pending"),
        (1, "change", "pending"),
        (2, "keep", "submitted"),
    ]
    changed = journal.get("change")
    assert changed is not None
    assert (changed.fingerprint, changed.prediction_id, changed.error) == ("fp2", None, None)
    assert changed.attempts == 0
    assert changed.possible_duplicate is False
    kept = journal.get("keep")
    assert kept is not None
    assert (kept.prediction_id, kept.attempts) == ("p-keep", 1)
    assert journal.get("drop") is None


async def test_sync_manifest_updates_specs_of_unchanged_items(journal: SqlJournal) -> None:
    """An item whose fingerprint is the same keeps its state but takes the manifest's new spec."""
    await journal.sync_manifest(manifest_of("a"))
    await journal.mark_submitting("a")
    assert await journal.sync_manifest(manifest_of("a", spec_extra=" v2")) == SyncResult(0, 0, 0, 1)
    record = journal.get("a")
    assert record is not None
    assert (record.state, record.spec["prompt"]) == (ItemState.SUBMITTING, "edit a v2")


async def test_sync_manifest_handles_100k_items(journal: SqlJournal) -> None:
    """100,000 items are inserted in one go and a second sync finds them all unchanged."""
    manifest = manifest_of(*ids_of(100_000))
    assert await journal.sync_manifest(manifest) == SyncResult(100_000, 0, 0, 0)
    assert await journal.sync_manifest(manifest) == SyncResult(0, 0, 0, 100_000)
    assert journal.counts()[ItemState.PENDING] == 100_000
    assert sum(1 for _ in journal.records()) == 100_000


@pytest.mark.parametrize("resubmit", [True, False])
async def test_resolve_ambiguous_settles_every_submitting_row(journal: SqlJournal, resubmit: bool) -> None:
    """Rows left submitting go back to pending flagged as possible duplicates, or fail as ambiguous_submit."""
    await journal.sync_manifest(manifest_of(*"abcd"))
    for item_id in "dba":
        await journal.mark_submitting(item_id)
    await journal.mark_submitted("a", prediction_id="p-a", submitted_at=1.0)
    assert await journal.resolve_ambiguous(resubmit=resubmit) == ["b", "d"]
    for item_id in "bd":
        record = journal.get(item_id)
        assert record is not None
        assert record.attempts == 1
        if resubmit:
            assert (record.state, record.possible_duplicate, record.error) == ("pending", True, None)
        else:
            assert (record.state, record.possible_duplicate) == ("failed", False)
            assert record.error is not None
            assert record.error.kind == "ambiguous_submit"
            assert "may have accepted" in record.error.message
    assert journal.counts()[ItemState.SUBMITTING] == 0
    assert await journal.resolve_ambiguous(resubmit=resubmit) == []


async def test_reset_failed_requeues_failed_items_keeping_attempts(journal: SqlJournal) -> None:
    """reset_failed moves failed items to pending, clears their error and keeps their attempts."""
    await journal.sync_manifest(manifest_of(*"abc"))
    await journal.mark_submitting("a")
    await journal.mark_failed("a", error=ItemError(kind="server_error", message="500"), prediction_id="p")
    await journal.mark_failed("b", error=ItemError(kind="invalid_request", message="bad"))
    assert await journal.reset_failed() == 2
    record = journal.get("a")
    assert record is not None
    assert (record.state, record.error, record.attempts, record.prediction_id) == ("pending", None, 1, None)
    assert journal.counts()[ItemState.PENDING] == 3


async def test_reset_failed_polls_accepted_predictions_again_instead_of_paying_twice(
    journal: SqlJournal,
) -> None:
    """An accepted prediction that failed on our side (timeout, download) goes back to submitted,
    its prediction id kept; one the model itself failed goes back to pending."""
    await journal.sync_manifest(manifest_of("late", "lost", "bad"))
    for item_id in ("late", "lost", "bad"):
        await journal.mark_submitting(item_id)
        await journal.mark_submitted(item_id, prediction_id=f"p-{item_id}", submitted_at=1.0)
    await journal.mark_failed("late", error=ItemError(kind="timeout", message="late"))
    await journal.mark_failed("lost", error=ItemError(kind="download", message="gone"))
    await journal.mark_failed("bad", error=ItemError(kind="inference_failed", message="model"))
    assert await journal.reset_failed() == 3
    states = {r.item_id: (r.state, r.prediction_id, r.error) for r in journal.records()}
    assert states == {
        "late": (ItemState.SUBMITTED, "p-late", None),
        "lost": (ItemState.SUBMITTED, "p-lost", None),
        "bad": (ItemState.PENDING, None, None),
    }


async def test_reset_all_forgets_items_and_meta(tmp_path: Path, backend: Backend) -> None:
    """reset_all deletes every row and the run meta; the journal stays usable."""
    async with await backend.open(tmp_path) as journal:
        await journal.set_meta(RunMeta(name="a", manifest_path="a.yaml", model="m", task="t", base_url="u"))
        await journal.sync_manifest(manifest_of(*"ab"))
        await journal.reset_all()
        assert (journal.meta(), list(journal.records())) == (None, [])
    async with await backend.open(tmp_path) as journal:
        assert journal.meta() is None
        assert await journal.sync_manifest(manifest_of("a")) == SyncResult(1, 0, 0, 0)


async def test_mark_pending_never_clears_possible_duplicate(journal: SqlJournal) -> None:
    """Once an item is flagged as a possible duplicate, a later plain mark_pending keeps the flag."""
    await journal.sync_manifest(manifest_of("a"))
    await journal.mark_submitting("a")
    await journal.mark_pending("a", possible_duplicate=True)
    await journal.mark_submitting("a")
    await journal.mark_pending("a")
    record = journal.get("a")
    assert record is not None
    assert record.possible_duplicate
    assert record.state == ItemState.PENDING


async def test_a_move_the_table_refuses_is_an_internal_error(journal: SqlJournal) -> None:
    """Marking an unknown id, or an item in a state its transition does not start from, raises
    TransitionRefused (a bug, not a disk error) naming the item and both states, and changes nothing."""
    await journal.sync_manifest(manifest_of("a"))
    refused = TransitionRefused
    with pytest.raises(refused, match=r"item 'ghost' cannot go to submitted \(accepted\): it is not in"):
        await journal.mark_submitted("ghost", prediction_id="p", submitted_at=1.0)
    with pytest.raises(refused, match=r"'a' cannot go to submitted \(accepted\): it is pending, not sub"):
        await journal.mark_submitted("a", prediction_id="p", submitted_at=1.0)
    with pytest.raises(TransitionRefused, match=r"'a' cannot go to succeeded"):
        await journal.mark_succeeded("a", outputs=(), completed_at=1.0, inference_ms=None)
    await journal.mark_submitting("a")
    with pytest.raises(refused, match=r"'a' cannot go to submitting \(submit\): it is submitting, not"):
        await journal.mark_submitting("a")
    assert not isinstance(TransitionRefused("a", transitions.SUBMIT, None), JournalError)
    await journal.mark_pending("a")
    record = journal.get("a")
    assert record is not None
    assert record.state == ItemState.PENDING


async def test_one_failing_write_does_not_affect_the_others_in_its_batch(journal: SqlJournal) -> None:
    """Writes queued together with a failing one still commit; only the failing caller gets the error."""
    ids = ids_of(50)
    await journal.sync_manifest(manifest_of(*ids))
    errors: list[Exception] = []

    async def refused() -> None:
        try:
            await journal.mark_submitting("ghost")
        except TransitionRefused as exc:
            errors.append(exc)

    async with anyio.create_task_group() as tg:
        for item_id in ids[:25]:
            tg.start_soon(journal.mark_submitting, item_id)
        tg.start_soon(refused)
        for item_id in ids[25:]:
            tg.start_soon(journal.mark_submitting, item_id)
    assert len(errors) == 1
    assert "ghost" in str(errors[0])
    assert journal.counts()[ItemState.SUBMITTING] == 50


async def test_a_success_commits_only_once_its_output_files_are_synced(
    journal: SqlJournal, tmp_path: Path
) -> None:
    """A success naming its output files commits when they can be fsynced; one whose file is gone
    gets the OSError, stays submitted, and takes none of the other successes in its batch with it."""
    ids = ids_of(20)
    await journal.sync_manifest(manifest_of(*ids))
    images = tmp_path / "images"
    images.mkdir()
    for n, item_id in enumerate(ids):
        await journal.mark_submitting(item_id)
        await journal.mark_submitted(item_id, prediction_id=f"p-{n}", submitted_at=1.0)
        if item_id != "item-00007":
            (images / f"{item_id}-1.png").write_bytes(b"png")
    errors: list[OSError] = []

    async def succeed(item_id: str) -> None:
        output = OutputFile(path=f"images/{item_id}-1.png", sha256="0" * 64)
        try:
            await journal.mark_succeeded(
                item_id, outputs=[output], completed_at=2.0, inference_ms=5, durable=[tmp_path / output.path]
            )
        except OSError as exc:
            errors.append(exc)

    async with anyio.create_task_group() as tg:
        for item_id in ids:
            tg.start_soon(succeed, item_id)
    assert [exc.filename for exc in errors] == [str(images / "item-00007-1.png")]
    assert journal.counts()[ItemState.SUCCEEDED] == 19
    missing = journal.get("item-00007")
    assert missing is not None
    assert (missing.state, missing.prediction_id, missing.outputs) == (ItemState.SUBMITTED, "p-7", ())


async def test_a_bug_in_a_write_reaches_its_caller_and_the_writer_survives(journal: SqlJournal) -> None:
    """An unexpected exception inside the writer thread is raised to the caller, and later writes work."""
    broken = replace(manifest_of("a"), item_source=lambda: iter([Item(0, "a", {"x": object()}, {}, "fp")]))
    with pytest.raises(TypeError, match="object is not JSON serialisable"):
        await journal.sync_manifest(broken)
    assert await journal.sync_manifest(manifest_of("a")) == SyncResult(1, 0, 0, 0)


async def test_full_disk_is_reported_as_journal_error(tmp_path: Path) -> None:
    """When SQLite reports 'database or disk is full' the caller gets a JournalError saying so."""
    async with await SqliteJournal.open(tmp_path, max_pages=12) as journal:
        await journal.sync_manifest(manifest_of(*"abc"))
        huge = RunMeta(name="x" * 200_000, manifest_path="m", model="m", task="t", base_url="u")
        failures: list[JournalError] = []

        async def too_big() -> None:
            try:
                await journal.set_meta(huge)
            except JournalError as exc:
                failures.append(exc)

        async with anyio.create_task_group() as tg:
            tg.start_soon(journal.mark_submitting, "a")
            tg.start_soon(too_big)
            tg.start_soon(journal.mark_submitting, "b")
        assert len(failures) == 1
        assert "the disk is full" in str(failures[0])
        assert "database or disk is full" in str(failures[0])
        assert journal.meta() is None
        assert journal.counts()[ItemState.SUBMITTING] == 2  # the writes batched with it still landed
        await journal.mark_submitting("c")


async def test_five_hundred_concurrent_writes_all_land_in_fewer_commits(journal: SqlJournal) -> None:
    """500 tasks writing at once all commit, and group commit needs fewer transactions than writes."""
    ids = ids_of(500)
    await journal.sync_manifest(manifest_of(*ids))
    commits_before, writes_before = journal.commit_count, journal.write_count
    attempts: list[int] = []

    async def submit(item_id: str) -> None:
        attempts.append(await journal.mark_submitting(item_id))

    async with anyio.create_task_group() as tg:
        for item_id in ids:
            tg.start_soon(submit, item_id)
    assert attempts == [1] * 500
    assert journal.counts()[ItemState.SUBMITTING] == 500
    assert journal.write_count - writes_before == 500
    assert journal.commit_count - commits_before < 500


async def test_close_lets_queued_writes_commit_first(tmp_path: Path, backend: Backend) -> None:
    """Writes already queued when close() is called commit before it returns; later writes are refused."""
    ids = ids_of(100)
    journal = await backend.open(tmp_path)
    await journal.sync_manifest(manifest_of(*ids))
    async with anyio.create_task_group() as tg:
        for item_id in ids:
            tg.start_soon(journal.mark_submitting, item_id)
        await anyio.lowlevel.checkpoint()  # every task has queued its write and now waits on it
        await journal.close()
    await journal.close()  # idempotent
    with pytest.raises(JournalError, match="is closed"):
        await journal.mark_submitting(ids[0])
    async with await backend.open(tmp_path) as reopened:
        assert reopened.counts()[ItemState.SUBMITTING] == 100


async def test_a_cancelled_caller_does_not_disturb_the_queue(journal: SqlJournal) -> None:
    """A write whose caller is cancelled after queueing it is still applied, in order, and others proceed."""
    await journal.sync_manifest(manifest_of("a"))
    async with anyio.create_task_group() as tg:
        tg.start_soon(journal.mark_submitting, "a")
        await anyio.lowlevel.checkpoint()
        tg.cancel_scope.cancel()
    await journal.mark_submitted("a", prediction_id="p", submitted_at=1.0)
    record = journal.get("a")
    assert record is not None
    assert (record.state, record.attempts) == (ItemState.SUBMITTED, 1)


async def test_newer_schema_is_refused(tmp_path: Path) -> None:
    """A journal written by a newer schema version is refused with a JournalError naming both versions."""
    async with await SqliteJournal.open(tmp_path):
        pass
    with contextlib.closing(sqlite3.connect(tmp_path / JOURNAL_NAME)) as conn, conn:
        conn.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    with pytest.raises(JournalError, match=r"newer batch-engine \(journal schema 99, this version reads"):
        await SqliteJournal.open(tmp_path)


async def test_a_file_that_is_not_a_database_is_refused(tmp_path: Path) -> None:
    """A journal.sqlite that is not an SQLite database raises JournalError when opened."""
    (tmp_path / JOURNAL_NAME).write_bytes(b"not a database, just some text" * 200)
    with pytest.raises(JournalError, match="is unreadable"):
        await SqliteJournal.open(tmp_path)


#: opens the journal, says "ready", then marks items submitting from many tasks, printing each ack
WRITER_CHILD = """
import sys
from pathlib import Path

import anyio

from tests.backends import open_backend
from tests.test_journal import ids_of, manifest_of


async def main() -> None:
    ids = ids_of(int(sys.argv[2]))
    url = sys.argv[4] if len(sys.argv) > 4 else None
    journal = await open_backend(sys.argv[3], Path(sys.argv[1]), url, sys.argv[5] if url else "")
    await journal.sync_manifest(manifest_of(*ids))
    print("ready", flush=True)

    async def mark(item_id: str) -> None:
        await journal.mark_submitting(item_id)
        sys.stdout.write(f"ack {item_id}\\n")  # one write: the line is whole or absent
        sys.stdout.flush()

    async with anyio.create_task_group() as tg:
        for item_id in ids:
            tg.start_soon(mark, item_id)
    print("done", flush=True)
    await anyio.sleep_forever()


anyio.run(main)
"""


async def test_acknowledged_writes_survive_sigkill(tmp_path: Path, backend: Backend) -> None:
    """Every write a SIGKILLed process saw return is in the journal when it is reopened."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-c", WRITER_CHILD, str(tmp_path), "3000", backend.name]
    command += [backend.url, backend.run] if backend.url else []
    async with await anyio.open_process(command, env=env, cwd=ROOT, stderr=None) as child:
        assert child.stdout is not None
        lines = BufferedByteReceiveStream(child.stdout)
        assert await lines.receive_until(b"\n", 100) == b"ready"
        acked: list[str] = []
        while len(acked) < 200:  # kill while writes are still streaming in
            acked.append((await lines.receive_until(b"\n", 100)).decode().split()[1])
        os.kill(child.pid, signal.SIGKILL)
        rest = b""
        with contextlib.suppress(anyio.EndOfStream, anyio.IncompleteRead):
            while True:
                rest += await lines.receive(65536)
        await child.wait()
    complete_lines = rest.decode().split("\n")[:-1]  # the kill may have cut the last one short
    acked += [line.removeprefix("ack ") for line in complete_lines if line.startswith("ack ")]
    async with await backend.open(tmp_path) as journal:
        for item_id in acked:
            record = journal.get(item_id)
            assert record is not None
            assert (record.state, record.attempts) == (ItemState.SUBMITTING, 1), item_id
        assert journal.counts()[ItemState.SUBMITTING] >= len(acked)


#: The items table of journal schema 1 (batch-engine before the archive and shared runs), as it was.
SCHEMA_1 = """CREATE TABLE items (
    item_id TEXT PRIMARY KEY, idx INTEGER NOT NULL, fingerprint TEXT NOT NULL, spec TEXT NOT NULL,
    request TEXT NOT NULL, state TEXT NOT NULL DEFAULT 'pending', prediction_id TEXT,
    attempts INTEGER NOT NULL DEFAULT 0, possible_duplicate INTEGER NOT NULL DEFAULT 0, outputs TEXT,
    error TEXT, submitted_at REAL, completed_at REAL, inference_ms INTEGER, updated_at REAL NOT NULL
)"""


async def test_a_schema_1_journal_is_migrated_in_place_and_keeps_every_row(tmp_path: Path) -> None:
    """A journal written before the archive and the leases opens as schema 2 with every row as it was: the
    succeeded item keeps its outputs, the submitted one its prediction id (polled, not paid again), and a
    sync afterwards changes nothing of them."""
    outputs = '[{"path": "images/a.png", "sha256": "' + "ab" * 32 + '"}]'
    with contextlib.closing(sqlite3.connect(tmp_path / JOURNAL_NAME)) as conn, conn:
        conn.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        conn.execute(SCHEMA_1)
        conn.execute("INSERT INTO meta VALUES ('schema_version', '1')")
        rows = [
            ("a", 0, "fp-a", "succeeded", None, outputs),
            ("b", 1, "fp-b", "submitted", "pred-b", None),
            ("c", 2, "fp-c", "pending", None, None),
        ]
        for item_id, idx, fingerprint, state, prediction, files in rows:
            conn.execute(
                "INSERT INTO items (item_id, idx, fingerprint, spec, request, state, prediction_id, outputs,"
                " submitted_at, updated_at) VALUES (?, ?, ?, '{}', '{}', ?, ?, ?, 5.0, 1.0)",
                (item_id, idx, fingerprint, state, prediction, files),
            )
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.png").write_bytes(b"x")
    async with await SqliteJournal.open(tmp_path) as journal:
        a, b = journal.get("a"), journal.get("b")
        assert a is not None
        assert b is not None
        assert (a.state, a.outputs[0].path) == (ItemState.SUCCEEDED, "images/a.png")
        assert (b.state, b.prediction_id) == (ItemState.SUBMITTED, "pred-b")
        assert await journal.sync_manifest(manifest_of("a", "b", "c")) == SyncResult(0, 0, 0, 3)
        await journal.mark_submitting("c")
        assert journal.counts()[ItemState.SUBMITTING] == 1
    with contextlib.closing(sqlite3.connect(tmp_path / JOURNAL_NAME)) as conn:
        assert conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() == ("2",)
        stems = dict(conn.execute("SELECT item_id, stem_key FROM items").fetchall())
        assert all(stems.values()), stems
