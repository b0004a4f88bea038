"""The first promise against a hostile out dir: shared file names, a second manifest, a lost or edited
journal, planted symlinks. Nothing paid is forgotten, nothing is paid twice, nothing outside is touched."""

from __future__ import annotations

import hashlib
import json
import sqlite3
from pathlib import Path

import pytest

from batch_engine.errors import JournalError, ManifestError, UsageError
from batch_engine.ledger import Ledger
from batch_engine.manifest import load_manifest
from batch_engine.store.out_dir import OutDirTaken
from batch_engine.store.sqlite import SqliteJournal
from batch_engine.ui.progress import QuietView
from batch_engine.values import ItemState
from tests.helpers import Harness, check_settled, edit_item

pytest_plugins = ("tests.helpers",)
pytestmark = pytest.mark.anyio


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def sql(out: Path, statement: str, *params: object) -> None:
    conn = sqlite3.connect(out / "journal.sqlite")
    try:
        conn.execute(statement, params)
        conn.commit()
    finally:
        conn.close()


async def test_an_id_and_the_safe_name_of_another_never_share_a_file(harness: Harness) -> None:
    """Ids 'a b' and 'a_b-c8687a08' (once the safe name of 'a b') both succeed into files of their own,
    each matching the sha256 the report records."""
    sim = await harness.sim()
    manifest = harness.manifest([edit_item(sim, "a b"), edit_item(sim, "a_b-c8687a08")])
    outcome = await harness.run(manifest, sim)
    check_settled(outcome, ["a b", "a_b-c8687a08"])
    paths = [entry["outputs"][0]["path"] for entry in outcome.entries]
    assert len(set(paths)) == 2
    for entry in outcome.entries:
        output = entry["outputs"][0]
        assert sha256(outcome.out_dir / output["path"]) == output["sha256"]


async def test_ids_that_differ_only_in_case_are_refused_by_validate(harness: Harness) -> None:
    """'SKU-1' and 'sku-1' would share a file on macOS or Windows: validate names both and sends nothing."""
    items = [{"id": "SKU-1", "prompt": "p", "images": ["https://e.x/a.png"]}]
    items.append({"id": "sku-1", "prompt": "q", "images": ["https://e.x/b.png"]})
    with pytest.raises(ManifestError) as caught:
        load_manifest(harness.manifest(items))
    [problem] = caught.value.problems
    assert (problem.item_id, problem.field) == ("sku-1", "items[1].id")
    assert "'SKU-1'" in problem.message
    assert "case-insensitive" in problem.message


async def test_a_second_manifest_of_the_same_name_is_refused_then_retires_not_deletes(
    harness: Harness,
) -> None:
    """Another manifest file into an out dir holding a run is refused; with take_over the first's items are
    retired, and when the first runs there again its items come back without a single new submit."""
    sim = await harness.sim()
    first = harness.manifest([edit_item(sim, f"a-{k}") for k in range(3)])
    second = harness.manifest([edit_item(sim, f"b-{k}") for k in range(2)])
    await harness.run(first, sim)
    with pytest.raises(OutDirTaken, match=r"holds the run of another manifest, .*manifest-1\.yaml"):
        await harness.run(second, sim)
    assert sim.stats.accepted == 3
    await harness.run(second, sim, take_over=True)
    assert sim.stats.accepted == 5
    back = await harness.run(first, sim, take_over=True)
    assert sim.stats.accepted == 5
    check_settled(back, ["a-0", "a-1", "a-2"])


async def test_an_empty_journal_beside_outputs_is_rebuilt_before_anything_is_sent(harness: Harness) -> None:
    """journal.sqlite truncated to 0 bytes: the run takes every item back from results.jsonl (prediction
    ids, outputs) and pays for nothing again."""
    sim = await harness.sim()
    manifest = harness.manifest([edit_item(sim, f"a-{k}") for k in range(4)])
    first = await harness.run(manifest, sim)
    (first.out_dir / "journal.sqlite").write_bytes(b"")
    for extra in ("journal.sqlite-wal", "journal.sqlite-shm"):
        (first.out_dir / extra).unlink(missing_ok=True)
    again = await harness.run(manifest, sim)
    assert sim.stats.accepted == 4
    check_settled(again, ["a-0", "a-1", "a-2", "a-3"])
    assert [e["prediction_id"] for e in again.entries] == [e["prediction_id"] for e in first.entries]


async def test_a_lost_journal_with_no_fingerprints_to_go_by_is_refused(harness: Harness) -> None:
    """Outputs and a results.jsonl that say nothing of their requests (an older version's) stop the run
    before it sends anything, naming what was found; nothing is guessed and nothing is paid."""
    sim = await harness.sim()
    manifest = harness.manifest([edit_item(sim, "a"), edit_item(sim, "b")])
    first = await harness.run(manifest, sim)
    results = first.out_dir / "results.jsonl"
    lines = [json.loads(line) for line in results.read_text().splitlines()]
    results.write_text(
        "".join(json.dumps({k: v for k, v in line.items() if k != "fingerprint"}) + "\n" for line in lines)
    )
    (first.out_dir / "report.yaml").unlink()
    (first.out_dir / "journal.sqlite").unlink()
    with pytest.raises(JournalError, match=r"2 output file\(s\) in .*images.*pay for every item again"):
        await harness.run(manifest, sim)
    assert sim.stats.accepted == 2


async def test_results_jsonl_is_appended_to_never_rewritten_in_place(harness: Harness) -> None:
    """Opening a run's results.jsonl keeps every line already there (a kill at that moment loses none)."""
    out = harness.tmp_path / "out"
    out.mkdir()
    (out / "results.jsonl").write_text('{"id": "earlier"}\n')
    async with await SqliteJournal.open(out) as journal:
        ledger = Ledger(journal, view=QuietView())
        ledger.open_results(out)
        ledger.close_results()
    assert (out / "results.jsonl").read_text() == '{"id": "earlier"}\n'


@pytest.mark.parametrize("name", ["results.jsonl", ".lock", "images", "journal.sqlite"])
async def test_a_planted_symlink_is_refused_and_its_target_untouched(harness: Harness, name: str) -> None:
    """A symlink where the run would write (results.jsonl, .lock, images/, the journal) refuses the run;
    the file or folder it points at is left exactly as it was."""
    sim = await harness.sim()
    manifest = harness.manifest([edit_item(sim, "a")])
    outside = harness.tmp_path / "outside"
    outside.mkdir()
    (outside / "precious").write_text("keep")
    (outside / ".tmp-precious").write_text("keep too")
    out = harness.tmp_path / "out"
    out.mkdir()
    target = outside if name == "images" else outside / "precious"
    (out / name).symlink_to(target)
    with pytest.raises(UsageError, match=rf"{name} is a symlink.*never writes or deletes through a link"):
        await harness.run(manifest, sim)
    assert (outside / "precious").read_text() == "keep"
    assert (outside / ".tmp-precious").read_text() == "keep too"
    assert sim.stats.submit_requests == 0


async def test_damaged_journal_rows_are_repaired_without_paying_twice(harness: Harness) -> None:
    """Hand-edited rows (a state that is no state, outputs that are not JSON, an error with an unknown key)
    neither crash the run nor vanish: a row with a prediction id is polled again, not resubmitted; one
    without is resent and flagged possible_duplicate; the unreadable error keeps its item failed."""
    sim = await harness.sim()
    manifest = harness.manifest([edit_item(sim, f"a-{k}") for k in range(4)])
    first = await harness.run(manifest, sim)
    out = first.out_dir
    sql(out, "UPDATE items SET state = 'bogus' WHERE item_id = 'a-0'")
    sql(out, "UPDATE items SET state = 'bogus', prediction_id = NULL WHERE item_id = 'a-1'")
    sql(out, "UPDATE items SET outputs = 'not json' WHERE item_id = 'a-2'")
    sql(
        out,
        """UPDATE items SET state = 'failed', error = '{"kind": "x", "message": "m", "surprise": 1}'
                WHERE item_id = 'a-3'""",
    )
    again = await harness.run(manifest, sim)
    assert sim.stats.accepted == 5  # only a-1, which had no prediction id to poll
    assert again.statuses == {"a-0": "succeeded", "a-1": "succeeded", "a-2": "succeeded", "a-3": "failed"}
    assert again.duplicates() == ["a-1"]
    assert again.entry("a-0")["prediction_id"] == first.entry("a-0")["prediction_id"]
    assert again.entry("a-3")["error"]["message"] == "m"


async def test_a_damaged_row_is_counted_and_reported_by_name(harness: Harness) -> None:
    """Before any run repairs it, a damaged row shows in the journal's counts and reads back as damaged,
    saying what is wrong, instead of crashing the reader or dropping out of the total."""
    sim = await harness.sim()
    manifest = harness.manifest([edit_item(sim, "a"), edit_item(sim, "b")])
    first = await harness.run(manifest, sim)
    sql(first.out_dir, "UPDATE items SET state = 'bogus', outputs = 'not json' WHERE item_id = 'b'")
    async with await SqliteJournal.open(first.out_dir) as journal:
        counts = journal.counts()
        records = {record.item_id: record for record in journal.records()}
    assert sum(counts.values()) == 2
    assert counts[ItemState.DAMAGED] == 1
    damaged = records["b"]
    assert damaged.state == "damaged"
    assert damaged.damage is not None
    assert "state 'bogus' is not a state" in damaged.damage
    assert "outputs is not JSON" in damaged.damage
