"""Every figure says its scope: this run, or the out dir's history; the page and report list each run."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from batch_engine.ledger import Ledger
from batch_engine.store.sqlite import SqliteJournal
from batch_engine.timeline import MAX_BUCKETS, Timeline
from batch_engine.ui.progress import QuietView, make_view
from batch_engine.ui.summary import format_summary
from batch_engine.values import Snapshot
from tests.helpers import Harness, edit_items, fast_settings
from tests.test_journal import manifest_of

pytest_plugins = ("tests.helpers",)


class RecordingView(QuietView):
    """A view that keeps every snapshot it is shown."""

    def __init__(self) -> None:
        self.snapshots: list[Snapshot] = []

    def update(self, snapshot: Snapshot) -> None:
        self.snapshots.append(snapshot)


@pytest.mark.anyio
async def test_a_resumed_run_counts_itself_apart_from_the_out_dirs_history(harness: Harness) -> None:
    """After a run stopped by its budget, the resume's summary, live counts, report and page give this
    run's work and the out dir's totals apart, and both runs are listed with how each ended."""
    sim = await harness.sim()
    manifest = harness.manifest(edit_items(sim, 7))
    await harness.run(manifest, sim, settings=fast_settings(max_submits=3))
    view = RecordingView()

    resumed = await harness.run(manifest, sim, view=view)

    stats = resumed.result.stats
    assert (stats.submits, stats.run_succeeded, stats.run_failed) == (4, 4, 0)
    assert stats.by_state["succeeded"] == 7
    last = view.snapshots[-1]
    assert (last.done_before, last.submitted, last.succeeded, last.finished) == (3, 4, 4, 7)
    summary = format_summary(stats, report_paths={}, out_dir=resumed.out_dir)
    assert "this run: 4 submitted, 4 succeeded, 0 failed, 4 images written" in summary
    assert "in this out dir (all runs): 7 succeeded, 0 failed" in summary
    runs = resumed.report["runs"]
    assert [(run["submits"], run["succeeded"], run["stopped_reason"]) for run in runs] == [
        (3, 3, "budget"),
        (4, 4, None),
    ]
    assert all(run["started"] and run["finished"] for run in runs)
    assert (resumed.report["run"]["run_succeeded"], resumed.report["counts"]["succeeded"]) == (4, 7)
    page = (resumed.out_dir / "index.html").read_text(encoding="utf-8")
    assert page.split('id="runs"')[1].split("</table>")[0].count("<tr>") == 3  # a head and two runs


@pytest.mark.anyio
async def test_report_yaml_says_what_results_jsonl_holds_after_a_stop(harness: Harness) -> None:
    """After a run that stopped early, report.yaml's first line says how many items results.jsonl holds
    (the finished ones), not that it holds the same items."""
    sim = await harness.sim()
    manifest = harness.manifest(edit_items(sim, 5))
    outcome = await harness.run(manifest, sim, settings=fast_settings(max_submits=2))

    first = (outcome.out_dir / "report.yaml").read_text(encoding="utf-8").splitlines()[0]
    assert len(outcome.results) == 2
    assert "results.jsonl has a line for each of the 2 finished ones" in first
    assert "the same items" not in first


@pytest.mark.anyio
async def test_the_manifest_is_named_by_its_absolute_path(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A manifest given relative to the current folder is recorded by its absolute path, so the report
    and failures.yaml's comment mean the same wherever they are read."""
    sim = await harness.sim()
    manifest = harness.manifest(edit_items(sim, 1))
    monkeypatch.chdir(manifest.parent)

    outcome = await harness.run(Path(manifest.name), sim)

    assert outcome.report["manifest"] == str(manifest)


@pytest.mark.anyio
async def test_the_submit_rate_counts_the_time_spent_submitting_only(tmp_path: Path) -> None:
    """Three submits half a second apart are 2 a second, however long their predictions then take."""
    now = [1000.0]
    async with await SqliteJournal.open(tmp_path) as journal:
        await journal.sync_manifest(manifest_of("a", "b", "c"))
        ledger = Ledger(journal, view=QuietView(), clock=lambda: now[0])
        assert ledger.submit_rate is None
        for item_id in ("a", "b", "c"):
            await ledger.submitting(item_id)
            await ledger.submitted(item_id, f"pred-{item_id}")
            now[0] += 0.5
        now[0] += 600.0  # the predictions take ten minutes
        assert ledger.submit_rate == pytest.approx(2.0)


def test_a_short_run_is_drawn_second_by_second() -> None:
    """A 14-second run is counted in 14 one-second buckets, not in a single minute."""
    timeline = Timeline(start=0.0)
    for second in range(14):
        timeline.count("finished", second + 0.5)
    assert timeline.step == 1.0
    assert timeline.series["finished"] == [1] * 14
    assert len(timeline.series["submitted"]) == 14


def test_a_long_run_keeps_at_most_max_buckets_of_a_doubled_step() -> None:
    """Ten hours of events fit in at most MAX_BUCKETS buckets; every event is still counted."""
    timeline = Timeline(start=0.0)
    for minute in range(600):
        timeline.count("submitted", minute * 60.0)
        timeline.count("rate_limited", minute * 60.0 + 1)
    assert len(timeline.series["submitted"]) <= MAX_BUCKETS
    assert timeline.step == 256.0
    assert sum(timeline.series["submitted"]) == 600
    assert sum(timeline.series["rate_limited"]) == 600
    assert len({len(counts) for counts in timeline.series.values()}) == 1


@pytest.mark.anyio
async def test_the_json_progress_line_keeps_the_two_scopes_apart(harness: Harness) -> None:
    """The JSON progress events of a resumed run count this run's items, with done_before beside them."""
    sim = await harness.sim()
    manifest = harness.manifest(edit_items(sim, 4))
    await harness.run(manifest, sim, settings=fast_settings(max_submits=1))
    stream = io.StringIO()

    await harness.run(manifest, sim, view=make_view(mode="json", stream=stream, log_every=0))

    last = json.loads(stream.getvalue().splitlines()[-1])
    assert (last["done_before"], last["succeeded"], last["finished"], last["total"]) == (1, 3, 4, 4)
