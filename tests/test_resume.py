"""Nothing lost, nothing paid twice: the engine killed, stopped and rerun as a subprocess (simulated API).

The simulator lives in the test's event loop and outlives every engine process, so its counters are the
server's view of all the runs of a test: what was accepted (billed), how often each request body was.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import sqlite3
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from batch_engine.images import verify_image
from batch_engine.sim import SimConfig, Simulator
from batch_engine.store.postgres import schema_for
from tests.backends import Backend
from tests.procs import (
    TEST_KEY,
    EngineProcess,
    engine,
    engine_env,
    items,
    run_args,
    run_engine,
    wait_until,
    write_manifest,
)

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

EXIT_OK, EXIT_FAILED_ITEMS, EXIT_USAGE, EXIT_STOPPED = 0, 1, 2, 3
KILLED = -signal.SIGKILL
SUBMITTED = " submitted as "  #: the debug line saying an accepted submit's prediction id is journaled
#: small output images: the simulator draws them faster and the tests hash them faster
SMALL = {"api_key": TEST_KEY, "image_scale": 0.05}


def sim_config(**knobs: Any) -> SimConfig:
    return SimConfig(**{**SMALL, **knobs})


# -- what every finished out dir must show ---------------------------------------------------------------


def read_report(out: Path) -> dict[str, Any]:
    report: dict[str, Any] = yaml.safe_load((out / "report.yaml").read_text(encoding="utf-8"))
    return report


def entries_by_id(report: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    return {entry["id"]: entry for entry in report["items"]}


def item_of_body(sim: Simulator, specs: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """The server's body digests → the manifest item each belongs to (prompts are unique per item)."""
    by_prompt = {spec["prompt"]: str(spec["id"]) for spec in specs}
    return {p.body_sha256: by_prompt.get(p.prompt, f"?{p.prompt}") for p in sim.stats.predictions.values()}


def check_out_dir(
    out: Path,
    specs: Sequence[Mapping[str, Any]],
    sim: Simulator,
    *,
    paid_before: Mapping[str, int] | None = None,
) -> dict[str, Any]:
    """Assert the promise on a finished out dir and return its report.yaml.

    Every item succeeded or failed with a reason; every output listed is on disk, whole, with its sha256;
    results.jsonl has one line per item; the server accepted each body at most once (since
    ``paid_before``, a snapshot of ``body_counts``), except bodies of items marked ``possible_duplicate``.
    """
    report = read_report(out)
    ids = [str(spec["id"]) for spec in specs]
    assert [entry["id"] for entry in report["items"]] == ids
    for entry in report["items"]:
        check_entry(out, entry)
    lines = [json.loads(line) for line in (out / "results.jsonl").read_text(encoding="utf-8").splitlines()]
    assert sorted(line["id"] for line in lines) == sorted(ids)
    assert {line["id"]: line["status"] for line in lines} == {e["id"]: e["status"] for e in report["items"]}
    check_server(sim, specs, report, paid_before=paid_before or {})
    return report


def check_entry(out: Path, entry: Mapping[str, Any]) -> None:
    assert entry["status"] in ("succeeded", "failed"), entry
    if entry["status"] == "failed":
        assert entry["error"]["kind"], entry
        assert entry["error"]["message"], entry
        return
    assert entry["prediction_id"], entry
    assert entry["outputs"], entry
    for output in entry["outputs"]:
        data = (out / output["path"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == output["sha256"], output["path"]
        verify_image(data)


def check_server(
    sim: Simulator,
    specs: Sequence[Mapping[str, Any]],
    report: Mapping[str, Any],
    *,
    paid_before: Mapping[str, int],
) -> None:
    """Each body was accepted at most once, or twice for an item the report marks possible_duplicate."""
    owners = item_of_body(sim, specs)
    marked = {entry["id"] for entry in report["items"] if entry["possible_duplicate"]}
    counts = {digest: n - paid_before.get(digest, 0) for digest, n in sim.stats.body_counts.items()}
    twice = {owners[digest]: n for digest, n in counts.items() if n > 1}
    assert all(n == 2 for n in twice.values()), twice
    assert set(twice) <= marked, f"paid twice without saying so: {sorted(set(twice) - marked)}"


def states(report: Mapping[str, Any]) -> dict[str, str]:
    return {entry["id"]: entry["status"] for entry in report["items"]}


def unfinished(report: Mapping[str, Any]) -> dict[str, int]:
    return {state: n for state, n in report["unfinished_by_state"].items() if n}


def journal_rows(out: Path, backend: Backend | None = None) -> dict[str, str]:
    """Item id → state in the out dir's journal (or ``backend``'s shared one), read-only; empty when there
    is no journal yet."""
    if backend is not None and backend.url is not None:
        return shared_rows(backend.url, backend.run)
    path = out / "journal.sqlite"
    if not path.exists():
        return {}
    # Not mode=ro: a read-only connection cannot create the -shm file of a WAL journal whose run was
    # killed before it made one, and fails with "attempt to write a readonly database".
    conn = sqlite3.connect(path)
    try:
        conn.execute("PRAGMA query_only = ON")
        if not conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'items'").fetchone():
            return {}  # killed before its schema was committed
        return dict(conn.execute("SELECT item_id, state FROM items").fetchall())
    finally:
        conn.close()


def shared_rows(url: str, run: str) -> dict[str, str]:
    """Item id → state in a run of a PostgreSQL journal; empty before its tables exist."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        table = conn.execute("SELECT to_regclass(%s)", (f'"{schema_for(run)}".items',)).fetchone()
        if table is None or table[0] is None:
            return {}
        rows = conn.execute(f'SELECT item_id, state FROM "{schema_for(run)}".items').fetchall()
        return {str(item): str(state) for item, state in rows}


def journal_states(out: Path, backend: Backend | None = None) -> dict[str, int]:
    """Items per state in the out dir's journal (states with no item left out)."""
    return dict(Counter(journal_rows(out, backend).values()))


def check_intent_before_post(
    out: Path, sim: Simulator, specs: Sequence[Mapping[str, Any]], backend: Backend | None = None
) -> None:
    """Every item whose body the server accepted was journaled as sent (submitting or later) beforehand."""
    rows = journal_rows(out, backend)
    accepted = set(item_of_body(sim, specs).values())
    assert not {item for item in accepted if rows.get(item, "pending") == "pending"}, rows


# -- SIGKILL at many moments ------------------------------------------------------------------------------

COUNT, FAILING = 12, 1
GOOD = COUNT - FAILING  #: items the simulator accepts (the last one breaks the content policy)
States = dict[str, int]


@dataclass(frozen=True)
class Moment:
    """A moment of a run to SIGKILL the engine at, and how the simulator is set up around it."""

    name: str
    reach: Callable[[Simulator, EngineProcess, Path], Awaitable[None]]
    sim: Mapping[str, Any] = field(default_factory=dict)  #: simulator knobs for the first run
    restore: Mapping[str, Any] = field(default_factory=dict)  #: knobs set back before the rerun
    #: what the journal must show right after the kill, so the moment is the one its name says
    expect: Callable[[States], bool] = lambda states: True
    args: tuple[str, ...] = ()  #: extra flags of both runs
    settled: bool = False  #: every accepted submit's answer was recorded: the rerun must resend nothing
    in_flight: bool = False  #: accepted submits were unanswered at the kill: the rerun resends them


async def _at_start(sim: Simulator, proc: EngineProcess, out: Path) -> None:
    if "--journal" in proc.argv:  # no out-dir lock: the run's lock is the database's
        await proc.wait_for_line("manifest ")
        return

    def locked() -> bool:
        lock = out / ".lock"
        return lock.exists() and f'"pid": {proc.pid}' in lock.read_text(encoding="utf-8")

    await wait_until(locked, what="the out dir lock", proc=proc)


async def _journal_ready(sim: Simulator, proc: EngineProcess, out: Path) -> None:
    await proc.wait_for_line("journal: ")


async def _during_submits(sim: Simulator, proc: EngineProcess, out: Path) -> None:
    await wait_until(lambda: sim.stats.accepted >= 4, what="4 accepted submits", proc=proc)


async def _submits_in_flight(sim: Simulator, proc: EngineProcess, out: Path) -> None:
    await wait_until(lambda: sim.stats.accepted >= 2, what="2 accepted submits", proc=proc)
    sim.configure(p_slow=1.0, slow_seconds=30.0)  # accepted, billed, and the answer held back
    slow_from = sim.stats.accepted
    await wait_until(lambda: sim.stats.accepted >= slow_from + 2, what="2 slow submits", proc=proc)


async def _polling(sim: Simulator, proc: EngineProcess, out: Path) -> None:
    def all_polled() -> bool:
        predictions = sim.stats.predictions.values()
        return sim.stats.accepted == GOOD and all(pred.polls >= 1 for pred in predictions)

    # The refused item's answer recorded first, as in `_downloading`: killed while its submit is out, it
    # would be an ambiguous submit, resent and marked a possible duplicate (this failed 1 run in many).
    await proc.wait_for_line("content_policy")
    await wait_until(all_polled, what="every prediction polled", proc=proc)


async def _downloading(sim: Simulator, proc: EngineProcess, out: Path) -> None:
    # The refused item's answer recorded first: killed while its submit is out, it would be an ambiguous
    # submit, which this moment is not about.
    await proc.wait_for_line("content_policy")
    await wait_until(lambda: sim.stats.downloads >= 3, what="3 failed downloads", proc=proc)


async def _last_completed(sim: Simulator, proc: EngineProcess, out: Path) -> None:
    def all_done() -> bool:
        predictions = sim.stats.predictions.values()
        return sim.stats.accepted == GOOD and all(p.first_done_seen_at is not None for p in predictions)

    await wait_until(all_done, what="every prediction seen completed", proc=proc)


async def _writing_reports(sim: Simulator, proc: EngineProcess, out: Path) -> None:
    await proc.wait_for_line("writing the reports")


MOMENTS = [
    Moment("at-start", _at_start, expect=lambda states: not states.get("submitted")),
    Moment(
        "journal-synced-before-any-submit",
        _journal_ready,
        expect=lambda states: sum(states.values()) == COUNT and not states.get("submitted"),
    ),
    Moment(
        "during-submits",
        _during_submits,
        expect=lambda states: states.get("pending", 0) > 0 and states.get("submitted", 0) >= 1,
        args=("--rate", "20"),
    ),
    Moment(
        "submits-in-flight",
        _submits_in_flight,
        expect=lambda states: states.get("submitting", 0) >= 2,
        restore={"p_slow": 0.0},
        in_flight=True,
    ),
    Moment(
        "while-polling",
        _polling,
        expect=lambda states: states.get("submitted") == GOOD,
        sim={"inference_polls": 8},
        settled=True,
    ),
    Moment(
        "while-downloading",
        _downloading,
        expect=lambda states: states.get("submitted") == GOOD,
        sim={"p_download_500": 1.0},
        restore={"p_download_500": 0.0},
        settled=True,
    ),
    Moment(
        "last-prediction-completed",
        _last_completed,
        expect=lambda states: states.get("succeeded", 0) + states.get("submitted", 0) == GOOD,
        settled=True,
    ),
    Moment(
        "writing-reports",
        _writing_reports,
        expect=lambda states: states == {"succeeded": GOOD, "failed": FAILING},
        settled=True,
    ),
]


def plant_half_written_files(out: Path) -> None:
    """Leave what a kill in the middle of saving an image leaves: a temporary file beside the outputs."""
    for folder in ("images", "inputs"):
        (out / folder).mkdir(parents=True, exist_ok=True)
        (out / folder / ".tmp-k1ll3d").write_bytes(b"\x89PNG\r\n\x1a\n half")


@pytest.mark.parametrize("moment", MOMENTS, ids=lambda moment: moment.name)
async def test_sigkill_then_rerun_loses_nothing_and_pays_once(
    tmp_path: Path, moment: Moment, backend: Backend
) -> None:
    """Whenever a SIGKILL lands, a rerun ends every item with a reason and whole outputs, and pays each edit
    once, except resubmits of submits in flight at the kill, which the report marks possible_duplicate;
    with the journal in the out dir or in PostgreSQL."""
    specs = items(COUNT, failing=FAILING)
    async with Simulator(sim_config(**moment.sim)) as sim:
        manifest = write_manifest(tmp_path / "job.yaml", specs, sim=sim, name=backend.run)
        out = tmp_path / "out"
        args = run_args(manifest, out, sim, *moment.args, *backend.args())
        async with engine(args) as proc:
            await moment.reach(sim, proc, out)
            proc.send(signal.SIGKILL)
            assert await proc.wait() == KILLED
        check_intent_before_post(out, sim, specs, backend)
        at_kill = journal_states(out, backend)
        assert moment.expect(at_kill), at_kill
        sim.configure(**moment.restore)
        plant_half_written_files(out)

        rerun = await run_engine(args)

        assert rerun.code == EXIT_FAILED_ITEMS, rerun.stderr
        report = check_out_dir(out, specs, sim)
        assert list(states(report).values()).count("succeeded") == GOOD
        assert not [path.name for path in out.rglob(".tmp-*")]
        if moment.settled:
            assert sim.stats.duplicate_bodies == 0
            assert report["possible_duplicates"] == 0
        if moment.in_flight:
            assert sim.stats.duplicate_bodies >= 2
            assert "possible duplicate" in rerun.stdout


async def _kill_with_submits_in_flight(sim: Simulator, args: Sequence[str], out: Path) -> None:
    async with engine(args) as proc:
        await _submits_in_flight(sim, proc, out)
        proc.send(signal.SIGKILL)
        assert await proc.wait() == KILLED
    sim.configure(p_slow=0.0)


async def test_no_resubmit_ambiguous_fails_submits_in_flight_and_never_resends_them(tmp_path: Path) -> None:
    """With --no-resubmit-ambiguous, submits in flight at a kill fail as ambiguous_submit, never resent."""
    specs = items(COUNT)
    async with Simulator(sim_config()) as sim:
        manifest = write_manifest(tmp_path / "job.yaml", specs, sim=sim)
        out = tmp_path / "out"
        await _kill_with_submits_in_flight(sim, run_args(manifest, out, sim), out)
        accepted_at_kill = set(item_of_body(sim, specs).values())
        at_kill = journal_states(out)
        planned = {
            "done": 0,
            "failed": 0,
            "to_poll": at_kill["submitted"],
            "ambiguous": at_kill["submitting"],
            "to_submit": at_kill["pending"],
        }
        resend = await run_engine(run_args(manifest, out, sim, "--dry-run"))
        fail = await run_engine(run_args(manifest, out, sim, "--dry-run", "--no-resubmit-ambiguous"))
        assert dry_run_counts(resend.stdout) == {**planned, "images_billed": COUNT - at_kill["submitted"]}
        assert dry_run_counts(fail.stdout) == {**planned, "images_billed": at_kill["pending"]}

        rerun = await run_engine(run_args(manifest, out, sim, "--no-resubmit-ambiguous"))

        assert rerun.code == EXIT_FAILED_ITEMS, rerun.stderr
        report = check_out_dir(out, specs, sim)
        ambiguous = [e for e in report["items"] if e["status"] == "failed"]
        assert len(ambiguous) >= 2
        assert {e["error"]["kind"] for e in ambiguous} == {"ambiguous_submit"}
        assert not any(e["possible_duplicate"] for e in report["items"])
        assert sim.stats.duplicate_bodies == 0
        assert set(sim.stats.body_counts.values()) == {1}
        # the ambiguous ones the server did accept were billed once and never sent again
        assert {e["id"] for e in ambiguous} & accepted_at_kill


async def test_retry_failed_after_an_ambiguous_failure_marks_the_resend_possible_duplicate(
    tmp_path: Path,
) -> None:
    """An ambiguous_submit failure sent again with --retry-failed (as its message suggests) is marked
    possible_duplicate: the server may have billed the first send."""
    specs = items(COUNT)
    async with Simulator(sim_config()) as sim:
        manifest = write_manifest(tmp_path / "job.yaml", specs, sim=sim)
        out = tmp_path / "out"
        await _kill_with_submits_in_flight(sim, run_args(manifest, out, sim), out)
        failed = await run_engine(run_args(manifest, out, sim, "--no-resubmit-ambiguous"))
        assert failed.code == EXIT_FAILED_ITEMS, failed.stderr
        ambiguous = {e["id"] for e in read_report(out)["items"] if e["status"] == "failed"}

        retried = await run_engine(run_args(manifest, out, sim, "--retry-failed"))

        assert retried.code == EXIT_OK, retried.stderr
        report = check_out_dir(out, specs, sim)
        assert {e["id"] for e in report["items"] if e["possible_duplicate"]} == ambiguous
        assert sim.stats.duplicate_bodies >= 2  # the ones accepted before the kill were paid twice


async def test_sigkill_while_fresh_forgets_the_old_run_loses_no_output(tmp_path: Path) -> None:
    """A SIGKILL while --fresh deletes the old outputs leaves no succeeded item without its output: a plain
    rerun redoes whatever lost its files."""
    specs = items(3)
    async with Simulator(sim_config()) as sim:
        manifest = write_manifest(tmp_path / "job.yaml", specs, sim=sim)
        out = tmp_path / "out"
        assert (await run_engine(run_args(manifest, out, sim))).code == EXIT_OK
        images = out / "images"
        for k in range(1_000):  # enough files that deleting them takes a moment
            (images / f"old-{k:05d}.png").write_bytes(b"")
        with os.scandir(images) as entries:  # shutil.rmtree deletes in scandir order
            first_deleted = images / next(entries).name

        async with engine(run_args(manifest, out, sim, "--fresh", "--yes")) as proc:
            await wait_until(lambda: not first_deleted.exists(), what="--fresh deleting outputs", proc=proc)
            proc.send(signal.SIGKILL)
            assert await proc.wait() == KILLED
        assert any(images.glob("old-*")), "the kill came after the deletion, not during it"
        rerun = await run_engine(run_args(manifest, out, sim))

        assert rerun.code == EXIT_OK, rerun.stderr
        check_out_dir(out, specs, sim, paid_before={d: 1 for d in sim.stats.body_counts})


async def test_a_prediction_resumed_after_its_deadline_is_polled_before_it_times_out(tmp_path: Path) -> None:
    """A run resumed after a prediction's timeout has passed (the next night) polls it once and saves its
    output if it completed meanwhile, instead of failing a paid edit as timeout unasked."""
    specs = items(3)
    timeout = 1.0
    async with Simulator(sim_config(inference_median=0.3, inference_spread=0.0)) as sim:
        manifest = write_manifest(tmp_path / "job.yaml", specs, sim=sim)
        out = tmp_path / "out"
        args = run_args(manifest, out, sim, "--timeout", str(timeout), "--poll-after", "5")
        async with engine(args) as proc:
            await proc.wait_for_count(SUBMITTED, len(specs))
            proc.send(signal.SIGKILL)
            assert await proc.wait() == KILLED
        submitted = time.time()
        await wait_until(lambda: time.time() > submitted + timeout, what="the timeout to pass")
        polls = sim.stats.polls

        rerun = await run_engine(args)

        assert sim.stats.polls > polls
        assert rerun.code == EXIT_OK, rerun.stderr
        check_out_dir(out, specs, sim)
        assert sim.stats.accepted == len(specs)


# -- graceful stop ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
async def test_signal_stops_submitting_finishes_in_flight_then_rerun_completes(
    tmp_path: Path, signum: signal.Signals
) -> None:
    """SIGINT/SIGTERM: no new submit, predictions in flight finish and are saved, exit 3; a rerun does the
    rest."""
    specs = items(10)
    grace = 8.0
    async with Simulator(sim_config(inference_median=0.6, inference_spread=0.0)) as sim:
        manifest = write_manifest(tmp_path / "job.yaml", specs, sim=sim)
        out = tmp_path / "out"
        args = run_args(manifest, out, sim, "--rate", "5", "--grace", str(grace))
        async with engine(args) as proc:
            await wait_until(lambda: sim.stats.accepted >= 3, what="3 accepted submits", proc=proc)
            proc.send(signum)
            signalled = time.monotonic()
            # Counted from when the engine says it stopped submitting, not from when the signal was sent: on
            # a loaded machine the signal is handled later, and at 5/s each second of that is 5 more submits
            # that were rightly made (a clean clone's suite once saw 3 at the signal, 8 in all).
            await proc.wait_for_line("stopped early: interrupted")
            accepted_at_stop = sim.stats.accepted
            code = await proc.wait()
            stopped_in = time.monotonic() - signalled

        assert code == EXIT_STOPPED, proc.tail()
        # at most the submits already past the check: one on the wire, one waiting for its send turn
        assert sim.stats.accepted <= accepted_at_stop + 2
        assert sim.stats.accepted < len(specs)
        assert stopped_in < grace / 2, f"took {stopped_in:.1f} s to stop with nothing left in flight"
        report = read_report(out)
        assert report["stopped_reason"] == "interrupted"
        done = [e for e in report["items"] if e["status"] == "succeeded"]
        assert len(done) == sim.stats.accepted  # every prediction in flight finished and was downloaded
        for entry in done:
            check_entry(out, entry)
        assert unfinished(report) == {"pending": len(specs) - len(done)}

        rerun = await run_engine(run_args(manifest, out, sim))

        assert rerun.code == EXIT_OK, rerun.stderr
        check_out_dir(out, specs, sim)
        assert sim.stats.duplicate_bodies == 0
        assert sim.stats.accepted == len(specs)


async def test_second_sigint_stops_at_once_and_the_run_resumes(tmp_path: Path) -> None:
    """A second SIGINT stops at once with predictions in flight (exit 3); a rerun polls them, resends none."""
    specs = items(6)
    async with Simulator(sim_config(inference_median=2.5, inference_spread=0.0)) as sim:
        manifest = write_manifest(tmp_path / "job.yaml", specs, sim=sim)
        out = tmp_path / "out"
        args = run_args(manifest, out, sim, "--grace", "30")
        async with engine(args) as proc:
            await proc.wait_for_count(SUBMITTED, len(specs))
            proc.send(signal.SIGINT)
            await proc.wait_for_line("no new submits")
            proc.send(signal.SIGINT)
            code = await proc.wait(within=10)

        assert code == EXIT_STOPPED, proc.tail()
        assert sim.stats.downloads == 0  # it did not wait for the predictions to finish
        report = read_report(out)
        assert report["stopped_reason"] == "interrupted"
        assert unfinished(report) == {"submitted": len(specs)}

        rerun = await run_engine(run_args(manifest, out, sim))

        assert rerun.code == EXIT_OK, rerun.stderr
        check_out_dir(out, specs, sim)
        assert sim.stats.accepted == len(specs)
        assert sim.stats.duplicate_bodies == 0


# -- the out-dir lock ---------------------------------------------------------------------------------------


async def test_second_run_on_a_busy_out_dir_refuses_and_a_stale_lock_is_taken_over(tmp_path: Path) -> None:
    """A run on an out dir another live run holds exits 2 naming that run's pid; once it is SIGKILLed, the
    next run takes the stale lock over, says so, and finishes the job."""
    specs = items(4)
    async with Simulator(sim_config(p_slow=1.0, slow_seconds=30.0)) as sim:  # the first run hangs
        manifest = write_manifest(tmp_path / "job.yaml", specs, sim=sim)
        out = tmp_path / "out"
        args = run_args(manifest, out, sim)
        async with engine(args) as first:
            await wait_until(lambda: sim.stats.accepted >= 1, what="an accepted submit", proc=first)
            second = await run_engine(args)
            assert first.running
            first.send(signal.SIGKILL)
            assert await first.wait() == KILLED
        sim.configure(p_slow=0.0)

        assert second.code == EXIT_USAGE
        assert f"pid {first.pid}" in second.stderr
        assert "in use by another batch-engine run" in second.stderr

        third = await run_engine(args)

        assert third.code == EXIT_OK, third.stderr
        assert f"took over a stale lock left by pid {first.pid}" in third.stderr
        check_out_dir(out, specs, sim)


# -- an edited manifest, --fresh, budgets --------------------------------------------------------------------


async def test_edited_manifest_redoes_changed_adds_new_drops_removed_and_resends_nothing_else(
    tmp_path: Path,
) -> None:
    """Between runs: an edited item is redone, a new one added, a removed one retired, the rest untouched;
    the removed one, put back unchanged, comes back with its outputs and is not paid again."""
    specs = items(5)
    async with Simulator(sim_config()) as sim:
        manifest = tmp_path / "job.yaml"
        out = tmp_path / "out"
        write_manifest(manifest, specs, sim=sim)
        first = await run_engine(run_args(manifest, out, sim))
        assert first.code == EXIT_OK, first.stderr
        before = read_report(out)

        edited = [dict(spec) for spec in specs]
        edited[1]["prompt"] += ", now in blue"
        del edited[2]
        edited.append({"id": "item-new", "prompt": "a new edit"})
        write_manifest(manifest, edited, sim=sim)
        second = await run_engine(run_args(manifest, out, sim))

        assert second.code == EXIT_OK, second.stderr
        synced = "journal: 1 new, 1 changed, 3 unchanged, 0 restored from the archive; 1 retired"
        assert synced in second.stderr
        report = check_out_dir(out, edited, sim)
        assert sim.stats.accepted == len(specs) + 2
        assert set(sim.stats.body_counts.values()) == {1}
        owners = item_of_body(sim, [*specs, *edited])
        sent_again = sorted(owners[pred.body_sha256] for pred in list(sim.stats.predictions.values())[5:])
        assert sent_again == ["item-01", "item-new"]
        old, new = entries_by_id(before), entries_by_id(report)
        assert "item-02" not in new
        for unchanged in ("item-00", "item-03", "item-04"):
            assert new[unchanged]["prediction_id"] == old[unchanged]["prediction_id"]
        assert new["item-01"]["prediction_id"] != old["item-01"]["prediction_id"]
        assert new["item-01"]["outputs"][0]["sha256"] != old["item-01"]["outputs"][0]["sha256"]

        write_manifest(manifest, [*edited, specs[2]], sim=sim)
        third = await run_engine(run_args(manifest, out, sim))
        assert third.code == EXIT_OK, third.stderr
        assert "0 new, 0 changed, 5 unchanged, 1 restored from the archive; 0 retired" in third.stderr
        assert sim.stats.accepted == len(specs) + 2
        back = entries_by_id(read_report(out))["item-02"]
        assert (back["status"], back["prediction_id"]) == ("succeeded", old["item-02"]["prediction_id"])
        assert back["outputs"] == old["item-02"]["outputs"]


async def test_fresh_needs_yes_off_a_terminal_and_then_starts_over(tmp_path: Path) -> None:
    """--fresh without --yes and no terminal refuses and changes nothing; with --yes everything is redone."""
    specs = items(3)
    async with Simulator(sim_config()) as sim:
        manifest = write_manifest(tmp_path / "job.yaml", specs, sim=sim)
        out = tmp_path / "out"
        assert (await run_engine(run_args(manifest, out, sim))).code == EXIT_OK
        first = read_report(out)
        outputs = sorted((out / "images").iterdir())
        for path in outputs:  # spoil every output: only a rewrite makes them whole again
            path.write_bytes(b"stale")

        refused = await run_engine(run_args(manifest, out, sim, "--fresh"))

        assert refused.code == EXIT_USAGE
        assert "--yes" in refused.stderr
        assert sim.stats.submit_requests == len(specs)
        assert read_report(out) == first

        paid = dict(sim.stats.body_counts)
        fresh = await run_engine(run_args(manifest, out, sim, "--fresh", "--yes"))

        assert fresh.code == EXIT_OK, fresh.stderr
        report = check_out_dir(out, specs, sim, paid_before=paid)
        assert sim.stats.accepted == 2 * len(specs)
        assert set(sim.stats.body_counts.values()) == {2}
        assert {e["id"]: e["attempts"] for e in report["items"]} == {s["id"]: 1 for s in specs}
        assert sorted((out / "images").iterdir()) == outputs


async def test_max_submits_stops_after_n_paid_submits_and_a_rerun_completes(tmp_path: Path) -> None:
    """--max-submits N makes exactly N accepted submits in that run, exits 3, and a rerun does the rest."""
    specs = items(7)
    async with Simulator(sim_config()) as sim:
        manifest = write_manifest(tmp_path / "job.yaml", specs, sim=sim)
        out = tmp_path / "out"

        capped = await run_engine(run_args(manifest, out, sim, "--max-submits", "3"), within=10)

        assert capped.code == EXIT_STOPPED, capped.stderr
        assert sim.stats.accepted == 3
        report = read_report(out)
        assert report["stopped_reason"] == "budget"
        assert report["counts"]["succeeded"] == 3
        assert unfinished(report) == {"pending": 4}
        assert "--max-submits" in capped.stdout

        rerun = await run_engine(run_args(manifest, out, sim))

        assert rerun.code == EXIT_OK, rerun.stderr
        check_out_dir(out, specs, sim)
        assert sim.stats.accepted == len(specs)
        assert sim.stats.duplicate_bodies == 0


# -- read-only commands -------------------------------------------------------------------------------------


def dry_run_counts(stdout: str) -> dict[str, int]:
    """``  to submit: 5`` lines of a dry run, as ``{"to_submit": 5}``."""
    counts = {}
    for line in stdout.splitlines():
        key, sep, value = line.strip().partition(": ")
        if sep and value.isdigit():
            counts[key.replace(" ", "_")] = int(value)
    return counts


async def test_dry_run_and_status_read_the_journal_and_send_nothing(tmp_path: Path) -> None:
    """--dry-run says what a run would do and status counts states, before and after a partial run, sending
    nothing and creating no journal."""
    specs = items(6)
    specs[4]["n"] = 3
    async with Simulator(sim_config(inference_median=30.0, inference_spread=0.0)) as sim:
        manifest = write_manifest(tmp_path / "job.yaml", specs, sim=sim)
        out = tmp_path / "out"

        before = await run_engine(run_args(manifest, out, sim, "--dry-run"))

        assert before.code == EXIT_OK, before.stderr
        expected = {"done": 0, "failed": 0, "to_poll": 0, "ambiguous": 0, "to_submit": 6, "images_billed": 8}
        assert dry_run_counts(before.stdout) == expected
        assert "nothing sent" in before.stdout
        assert not (out / "journal.sqlite").exists()
        no_status = await run_engine(["status", str(out)])
        assert no_status.code == EXIT_USAGE
        assert "no journal" in no_status.stderr

        async with engine(run_args(manifest, out, sim, "--max-submits", "2")) as proc:
            await proc.wait_for_count(SUBMITTED, 2)
            proc.send(signal.SIGKILL)
            assert await proc.wait() == KILLED
        seen = (sim.stats.submit_requests, sim.stats.polls, sim.stats.downloads)

        after = await run_engine(run_args(manifest, out, sim, "--dry-run"))
        status = await run_engine(["status", str(out), "--json"], env=engine_env(key=None))
        plain = await run_engine(["status", str(out)], env=engine_env(key=None))

        assert (sim.stats.submit_requests, sim.stats.polls, sim.stats.downloads) == seen
        assert after.code == EXIT_OK, after.stderr
        expected = {"done": 0, "failed": 0, "to_poll": 2, "ambiguous": 0, "to_submit": 4, "images_billed": 6}
        assert dry_run_counts(after.stdout) == expected
        assert status.code == EXIT_OK, status.stderr
        counts = json.loads(status.stdout)["counts"]
        expected = {"pending": 4, "submitting": 0, "submitted": 2, "succeeded": 0, "failed": 0, "total": 6}
        assert counts == expected
        assert plain.code == EXIT_OK
        assert "pending 4" in plain.stdout
        assert "submitted 2" in plain.stdout


def without_thumbnails(page: str) -> str:
    """index.html with its thumbnail sources blanked: `report` may show thumbnails the run had no time for."""
    return re.sub(r'"thumb":"[^"]*"', '"thumb":""', page)


async def test_report_rebuilds_every_view_identical_to_the_runs(tmp_path: Path) -> None:
    """`report OUT_DIR` rebuilds report.yaml, results.jsonl, failures.yaml and index.html exactly as the run
    wrote them (the page may show thumbnails made since)."""
    specs = items(4, failing=1)
    async with Simulator(sim_config()) as sim:
        manifest = write_manifest(tmp_path / "job.yaml", specs, sim=sim)
        out = tmp_path / "out"
        run = await run_engine(run_args(manifest, out, sim))
        assert run.code == EXIT_FAILED_ITEMS, run.stderr
        names = ("report.yaml", "results.jsonl", "failures.yaml", "index.html")
        written = {name: (out / name).read_text(encoding="utf-8") for name in names}
        for name in names:
            (out / name).unlink()
        requests = sim.stats.submit_requests, sim.stats.polls

        rebuilt = await run_engine(["report", str(out)], env=engine_env(key=None))

        assert rebuilt.code == EXIT_OK, rebuilt.stderr
        again = {name: (out / name).read_text(encoding="utf-8") for name in names}
        again["index.html"] = without_thumbnails(again["index.html"])
        assert again == {**written, "index.html": without_thumbnails(written["index.html"])}
        assert all(name in rebuilt.stdout for name in names)
        assert (sim.stats.submit_requests, sim.stats.polls) == requests


# -- the API says stop --------------------------------------------------------------------------------------


async def test_401_mid_run_stops_at_once_and_a_rerun_with_the_right_key_completes(tmp_path: Path) -> None:
    """A key refused mid-run (401) stops the run (exit 3, auth in the report and on the terminal); a rerun
    with the right key finishes without paying anything twice."""
    specs = items(10)
    async with Simulator(sim_config(inference_median=0.3, inference_spread=0.0)) as sim:
        manifest = write_manifest(tmp_path / "job.yaml", specs, sim=sim)
        out = tmp_path / "out"
        args = run_args(manifest, out, sim, "--rate", "5")

        def answers_recorded() -> bool:  # no accepted submit is waiting for its answer to be journaled
            return sim.stats.accepted >= 3 and proc.count(SUBMITTED) == sim.stats.accepted

        async with engine(args) as proc:
            await wait_until(answers_recorded, what="3 accepted submits recorded", proc=proc)
            sim.configure(api_key="the-new-key")
            code = await proc.wait()

        assert code == EXIT_STOPPED, proc.tail()
        assert "401" in proc.stderr
        assert "401" in proc.stdout
        report = read_report(out)
        assert report["stopped_reason"] == "auth"
        assert report["counts"]["unfinished"] > 0

        rerun = await run_engine(args, env=engine_env(key="the-new-key"))

        assert rerun.code == EXIT_OK, rerun.stderr
        check_out_dir(out, specs, sim)
        assert sim.stats.duplicate_bodies == 0


async def test_403_mid_run_stops_submitting_finishes_in_flight_and_resumes_after_a_top_up(
    tmp_path: Path,
) -> None:
    """A balance that runs out (403) stops submits, lets accepted predictions finish and be saved (exit 3,
    balance in the report); after a top-up a rerun completes without paying anything twice."""
    specs = items(8)
    async with Simulator(sim_config(balance=3, inference_median=0.3, inference_spread=0.0)) as sim:
        manifest = write_manifest(tmp_path / "job.yaml", specs, sim=sim)
        out = tmp_path / "out"
        args = run_args(manifest, out, sim)

        stopped = await run_engine(args, within=10)

        assert stopped.code == EXIT_STOPPED, stopped.stderr
        assert "403" in stopped.stderr
        assert "top-up" in stopped.stdout
        report = read_report(out)
        assert report["stopped_reason"] == "balance"
        assert report["counts"]["succeeded"] == 3
        assert unfinished(report) == {"pending": 5}
        for entry in report["items"]:
            if entry["status"] == "succeeded":
                check_entry(out, entry)

        sim.configure(balance=None)
        rerun = await run_engine(args)

        assert rerun.code == EXIT_OK, rerun.stderr
        check_out_dir(out, specs, sim)
        assert sim.stats.accepted == len(specs)
        assert sim.stats.duplicate_bodies == 0


# -- failures.yaml ------------------------------------------------------------------------------------------


async def test_failures_yaml_reruns_exactly_the_failed_items(tmp_path: Path) -> None:
    """`run OUT/failures.yaml --out OTHER` sends the failed items again, and nothing else."""
    specs = items(5)
    for spec in specs[1::2]:
        spec["prompt"] += " FLAKY"
    async with Simulator(sim_config(content_policy_marker="FLAKY")) as sim:
        manifest = write_manifest(tmp_path / "job.yaml", specs, sim=sim)
        out = tmp_path / "out"
        first = await run_engine(run_args(manifest, out, sim))
        assert first.code == EXIT_FAILED_ITEMS, first.stderr
        failed = sorted(e["id"] for e in read_report(out)["items"] if e["status"] == "failed")
        assert failed == ["item-01", "item-03"]
        as_is = await run_engine(run_args(manifest, out, sim, "--dry-run"))
        retry_failed = await run_engine(run_args(manifest, out, sim, "--dry-run", "--retry-failed"))
        plan = {"done": 3, "failed": 2, "to_poll": 0, "ambiguous": 0, "to_submit": 0, "images_billed": 0}
        assert dry_run_counts(as_is.stdout) == plan
        retried = {**plan, "failed": 0, "to_submit": 2, "images_billed": 2}
        assert dry_run_counts(retry_failed.stdout) == retried
        sim.configure(content_policy_marker="FORBIDDEN")  # the refusal was a fluke
        sent = sim.stats.submit_requests

        retry = await run_engine(run_args(out / "failures.yaml", tmp_path / "retry", sim))

        assert retry.code == EXIT_OK, retry.stderr
        report = check_out_dir(tmp_path / "retry", [s for s in specs if s["id"] in failed], sim)
        assert report["name"] == "resume-test-failures"
        assert sim.stats.submit_requests - sent == len(failed)
        assert sim.stats.accepted == len(specs)
