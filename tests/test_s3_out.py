"""The out dir in an object store (``--out s3://bucket/prefix/``): a real S3 server (moto, on loopback), the
simulator, PostgreSQL for a shared journal; workers as subprocesses where a crash or an exit code is the
point.

The store is read back as a user would read it (obstore, with the test's credentials): every output object
whole, with the sha256 the report gives; the reports beside them. The S3 server's log is its own view of
what was PUT; the simulator's counters say what was paid for.
"""

from __future__ import annotations

import hashlib
import io
import json
import signal
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import anyio
import obstore
import pytest
import yaml
from obstore.store import S3Store

from batch_engine.cli import main
from batch_engine.images import verify_image
from batch_engine.sim import Simulator
from batch_engine.store.files import safe_stem
from tests.backends import Backend
from tests.helpers import KEY, Harness, edit_items, fast_settings
from tests.procs import FAST, engine, engine_env, items, run_engine, wait_until, write_manifest
from tests.s3_server import ACCESS_KEY_ID, SECRET_ACCESS_KEY, Bucket
from tests.test_resume import (
    EXIT_OK,
    EXIT_STOPPED,
    EXIT_USAGE,
    KILLED,
    check_server,
    journal_rows,
    sim_config,
)

pytest_plugins = ("tests.helpers", "tests.s3_server")
pytestmark = pytest.mark.anyio

PREFIX = "runs/catalog/"
LEASE = "1.5"  #: seconds: a dead worker's items go to the others this soon after its last heartbeat
#: What must never be in a log line, a report, a journal row or an object.
SECRETS = (SECRET_ACCESS_KEY, ACCESS_KEY_ID, "X-Amz-Signature", "X-Amz-Credential", KEY)


def out_url(bucket: Bucket) -> str:
    return f"s3://{bucket.name}/{PREFIX}"


def store_of(bucket: Bucket) -> S3Store:
    """The prefix's store, with the test's credentials."""
    return S3Store.from_url(out_url(bucket), client_options={"allow_http": True})


def listed(bucket: Bucket, folder: str = "") -> list[str]:
    """The keys under the prefix (and ``folder``), relative to the prefix."""
    store = store_of(bucket)
    return sorted(meta["path"] for chunk in obstore.list(store, folder or None) for meta in chunk)


def stored(bucket: Bucket, relpath: str) -> bytes:
    return bucket.object(PREFIX + relpath)


def stored_report(bucket: Bucket) -> dict[str, Any]:
    report: dict[str, Any] = yaml.safe_load(stored(bucket, "report.yaml"))
    return report


def check_store(bucket: Bucket, specs: Sequence[Mapping[str, Any]], sim: Simulator) -> dict[str, Any]:
    """The promise, read from the store: every item in report.yaml and results.jsonl, each succeeded one's
    objects whole with their sha256, the page there; each body paid once unless marked."""
    report = stored_report(bucket)
    assert [entry["id"] for entry in report["items"]] == [str(spec["id"]) for spec in specs]
    for entry in report["items"]:
        assert entry["status"] in ("succeeded", "failed"), entry
        for output in entry["outputs"]:
            data = stored(bucket, output["path"])
            assert hashlib.sha256(data).hexdigest() == output["sha256"], output["path"]
            verify_image(data)
    lines = [json.loads(line) for line in stored(bucket, "results.jsonl").decode().splitlines()]
    assert {line["id"]: line["status"] for line in lines} == {e["id"]: e["status"] for e in report["items"]}
    assert b"<html" in stored(bucket, "index.html")[:200].lower()
    check_server(sim, specs, report, paid_before={})
    return report


def run_to_store(manifest: Path, bucket: Bucket, work: Path, sim: Simulator, *extra: str) -> list[str]:
    """``run MANIFEST --out s3://... --work-dir WORK`` against ``sim``, fast, at debug."""
    return [
        "run", str(manifest), "--out", out_url(bucket), "--work-dir", str(work), "--base-url", sim.base_url,
        *FAST, *extra,
    ]  # fmt: skip


def job(harness: Harness, specs: Sequence[Mapping[str, Any]]) -> Path:
    """The manifest ``job.yaml`` of ``specs``: the same file each time, as a nightly job edits its own."""
    written = harness.manifest(specs)
    return written.replace(written.with_name("job.yaml"))


def leaked(blobs: Mapping[str, bytes]) -> dict[str, list[str]]:
    """Secret → where it was found (empty when nothing leaked)."""
    found = {secret: [name for name, blob in blobs.items() if secret.encode() in blob] for secret in SECRETS}
    return {secret: names for secret, names in found.items() if names}


def files_under(folder: Path) -> Iterator[tuple[str, bytes]]:
    for path in folder.rglob("*"):
        if path.is_file():
            yield str(path), path.read_bytes()


# -- one process ---------------------------------------------------------------------------------------


@pytest.mark.slow
async def test_a_run_into_the_store_leaves_every_output_and_report_there_and_nothing_secret(
    tmp_path: Path, bucket: Bucket
) -> None:
    """A run into s3://bucket/prefix/ PUTs every output (its bytes' sha256 the report's, named in the
    object's metadata), the reports and the page; the work dir keeps no output; no credential, signature
    or key is in the output, the log, the work dir (the journal with it) or any object."""
    specs = items(12, failing=1)
    async with Simulator(sim_config(inference_polls=2, api_key=KEY)) as sim:
        manifest = write_manifest(tmp_path / "job.yaml", specs, sim=sim)
        work = tmp_path / "work"
        finished = await run_engine(run_to_store(manifest, bucket, work, sim), env=engine_env(KEY))
        assert finished.code == 1, finished.stderr  # the FORBIDDEN item failed, the others succeeded
        report = check_store(bucket, specs, sim)
    assert sim.stats.accepted == len(specs) - 1
    outputs = [output for entry in report["items"] for output in entry["outputs"]]
    assert len(outputs) == len(specs) - 1
    assert listed(bucket, "images") == sorted(output["path"] for output in outputs)
    assert {"report.yaml", "results.jsonl", "failures.yaml", "index.html"} <= set(listed(bucket))
    assert not [p for p in (work / "images").rglob("*") if p.is_file()]  # uploaded, then let go
    assert (work / "journal.sqlite").is_file()
    assert finished.stderr.count("the journal is on this machine only") == 1
    assert f"report.yaml    {out_url(bucket)}report.yaml" in finished.stdout
    blobs = {"stdout": finished.stdout.encode(), "stderr": finished.stderr.encode()}
    blobs |= dict(files_under(work))
    blobs |= {key: stored(bucket, key) for key in listed(bucket)}
    assert leaked(blobs) == {}


async def test_the_page_finds_its_thumbnails_and_input_copies_in_the_store_and_the_work_dir_keeps_none(
    harness: Harness, bucket: Bucket
) -> None:
    """Thumbnails and input copies are uploaded as they are made (or by the end of the run), the page
    shows the thumbnails the store has, and the work dir keeps neither outputs nor thumbnails."""
    sim = await harness.sim(image_scale=1.0)  # 1024 px outputs of ~24 KB: worth a thumbnail
    specs = edit_items(sim, 4)
    paced = fast_settings(rate=5.0, rate_min=1.0)  # the outputs come over a second: thumbnails meanwhile
    outcome = await harness.run(
        harness.manifest(specs), sim, out_url=out_url(bucket), copy_inputs=True, settings=paced
    )
    assert outcome.exit_code == EXIT_OK, outcome.report
    thumbs = listed(bucket, "thumbs")
    assert thumbs, "no thumbnail reached the store"
    assert all(stored(bucket, thumb)[8:12] == b"WEBP" for thumb in thumbs)
    page = stored(bucket, "index.html").decode()
    assert all(thumb in page for thumb in thumbs)
    copies = listed(bucket, "inputs")
    assert copies
    assert all(copy in page for copy in copies)
    for folder in ("images", "thumbs"):
        assert not [path for path in (outcome.out_dir / folder).rglob("*") if path.is_file()], folder


async def test_a_put_that_keeps_failing_leaves_its_item_to_the_next_run_which_pays_nothing_again(
    harness: Harness, bucket: Bucket
) -> None:
    """An output the store will not take (500 after every retry) is not recorded: its item stays
    submitted, the run stops submitting (out_store, exit 3); the next run polls and saves it, and every
    item is paid exactly once."""
    sim = await harness.sim()
    specs = edit_items(sim, 8)
    manifest = harness.manifest(specs)
    bucket.server.faults.fail_puts.add("images/item-2-")

    stopped = await harness.run(manifest, sim, out_url=out_url(bucket))

    assert stopped.exit_code == EXIT_STOPPED
    assert stopped.report["stopped_reason"] == "out_store"
    assert stopped.statuses["item-2"] == "submitted"
    assert "images/item-2-1.png" not in listed(bucket, "images")
    assert stored_report(bucket)["stopped_reason"] == "out_store"  # the reports went up all the same
    accepted = sim.stats.accepted
    bucket.server.faults.fail_puts.clear()

    resumed = await harness.run(manifest, sim, out_url=out_url(bucket))

    assert resumed.exit_code == EXIT_OK, resumed.report
    assert sim.stats.accepted == len(specs) == accepted + list(stopped.statuses.values()).count("pending")
    assert sim.stats.duplicate_bodies == 0
    assert hashlib.sha256(stored(bucket, "images/item-2-1.png")).hexdigest() == (
        resumed.entry("item-2")["outputs"][0]["sha256"]
    )


@pytest.mark.slow
async def test_refused_credentials_stop_the_run_in_one_line_before_anything_is_sent(
    tmp_path: Path, bucket: Bucket
) -> None:
    """A store refusing the credentials (403 to everything) stops the run before any submit: exit 3, one
    line naming the store, no traceback; once it takes them, the same command runs the job."""
    specs = items(3)
    bucket.server.faults.deny = True
    async with Simulator(sim_config()) as sim:
        manifest = write_manifest(tmp_path / "job.yaml", specs, sim=sim)
        args = run_to_store(manifest, bucket, tmp_path / "work", sim)
        refused = await run_engine([arg for arg in args if arg != "-v"])
        assert refused.code == EXIT_STOPPED, refused.stderr
        said = [line for line in refused.stderr.splitlines() if " INFO " not in line]
        assert len(said) == 1, said
        refusal = f"batch-engine: s3://{bucket.name}/runs/catalog refused to read .batch-engine"
        assert said[0].startswith(refusal), said
        assert "run again to resume (nothing was sent)" in said[0]
        assert sim.stats.submit_requests == 0
        bucket.server.faults.deny = False
        again = await run_engine(args)
        assert again.code == EXIT_OK, again.stderr
        check_store(bucket, specs, sim)


async def test_a_store_that_starts_refusing_mid_run_stops_it_and_a_rerun_saves_the_rest(
    harness: Harness, bucket: Bucket
) -> None:
    """Credentials that stop working while a run goes on (403 from then on) stop it at once (out_store,
    exit 3), every item not in the store left to resume; the next run finishes it, paying nothing twice."""
    sim = await harness.sim(inference_polls=4)
    specs = edit_items(sim, 12)
    manifest = harness.manifest(specs)
    saved = 3

    def succeeded() -> int:
        return list(journal_rows(harness.tmp_path / "out").values()).count("succeeded")

    async def deny_after_some() -> None:
        await wait_until(lambda: succeeded() >= saved, what=f"{saved} items saved")
        bucket.server.faults.deny = True

    outcomes = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(deny_after_some)
        outcomes.append(await harness.run(manifest, sim, out_url=out_url(bucket)))
    [stopped] = outcomes
    assert stopped.exit_code == EXIT_STOPPED
    assert stopped.report["stopped_reason"] == "out_store"
    assert "succeeded" in stopped.statuses.values()
    assert set(stopped.statuses.values()) - {"succeeded"}, "the refusal came after every item was saved"
    bucket.server.faults.deny = False

    resumed = await harness.run(manifest, sim, out_url=out_url(bucket))

    assert resumed.exit_code == EXIT_OK, resumed.report
    assert sim.stats.duplicate_bodies == 0
    assert sim.stats.accepted == len(specs)
    for entry in resumed.entries:
        [output] = entry["outputs"]
        assert hashlib.sha256(stored(bucket, output["path"])).hexdigest() == output["sha256"]


async def test_a_lost_work_dir_is_rebuilt_from_the_reports_in_the_store_and_nothing_is_paid_again(
    harness: Harness, bucket: Bucket, debug_log: io.StringIO
) -> None:
    """A new machine (an empty work dir, the SQLite journal gone with the old one) takes back the run
    from the reports in the store: the items whose objects are there stay succeeded, nothing is sent."""
    sim = await harness.sim()
    specs = edit_items(sim, 5)
    manifest = harness.manifest(specs)
    first = await harness.run(manifest, sim, out="work-a", out_url=out_url(bucket))
    assert first.exit_code == EXIT_OK

    again = await harness.run(manifest, sim, out="work-b", out_url=out_url(bucket))

    assert again.exit_code == EXIT_OK, again.report
    assert set(again.statuses.values()) == {"succeeded"}
    assert sim.stats.submit_requests == len(specs)
    assert "report.yaml fetched from" in debug_log.getvalue()
    assert "5 item(s) recovered" in debug_log.getvalue()


async def test_an_archived_success_comes_back_only_if_its_object_is_intact(
    harness: Harness, bucket: Bucket
) -> None:
    """Items removed and brought back: one whose object is still in the store comes back succeeded as it
    was; one whose object was deleted meanwhile is fetched and uploaded again; neither is paid again."""
    sim = await harness.sim()
    specs = edit_items(sim, 3)
    url = out_url(bucket)
    assert (await harness.run(job(harness, specs), sim, out_url=url)).exit_code == EXIT_OK
    assert (await harness.run(job(harness, specs[:1]), sim, out_url=url)).exit_code == EXIT_OK
    obstore.delete(store_of(bucket), "images/item-1-1.png")
    puts_before = bucket.server.puts()

    back = await harness.run(job(harness, specs), sim, out_url=url)

    assert back.exit_code == EXIT_OK, back.report
    assert set(back.statuses.values()) == {"succeeded"}
    assert sim.stats.accepted == len(specs)
    puts = bucket.server.puts() - puts_before
    assert puts[f"/{bucket.name}/{PREFIX}images/item-1-1.png"] == 1  # downloaded and uploaded again
    assert puts[f"/{bucket.name}/{PREFIX}images/item-2-1.png"] == 0  # intact: trusted as it was
    entry = back.entry("item-1")
    assert hashlib.sha256(stored(bucket, "images/item-1-1.png")).hexdigest() == entry["outputs"][0]["sha256"]


@pytest.mark.slow
async def test_fresh_deletes_the_outputs_in_the_store_and_report_uploads_rebuilt_reports(
    harness: Harness, bucket: Bucket
) -> None:
    """--fresh forgets the outputs in the store as it does in a folder (an item gone from the manifest
    leaves no object behind); `batch-engine report WORK_DIR` rebuilds the reports and uploads them, and
    says it made no thumbnails (the pictures are not on this machine)."""
    sim = await harness.sim()
    specs = edit_items(sim, 3)
    url = out_url(bucket)
    assert (await harness.run(job(harness, specs), sim, out_url=url)).exit_code == EXIT_OK
    assert len(listed(bucket, "images")) == 3

    fresh = await harness.run(job(harness, specs[:2]), sim, out_url=url, fresh=True)

    assert fresh.exit_code == EXIT_OK
    assert listed(bucket, "images") == ["images/item-0-1.png", "images/item-1-1.png"]
    obstore.delete(store_of(bucket), ["report.yaml", "index.html"])
    rebuilt = await run_engine(["report", str(fresh.out_dir)], env=engine_env(key=None))
    assert rebuilt.code == EXIT_OK, rebuilt.stderr
    printed = rebuilt.stdout
    assert f"report.yaml: {url}report.yaml" in printed
    assert "thumbnails: none made here" in printed
    assert [entry["id"] for entry in stored_report(bucket)["items"]] == ["item-0", "item-1"]
    assert b"<html" in stored(bucket, "index.html")[:200].lower()


def test_without_the_s3_extra_an_object_store_out_says_what_to_install(
    tmp_path: Path, bucket: Bucket, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without obstore, --out s3://... is refused in one line naming the extra (exit 2), nothing sent;
    status of an s3 URL says where the journal is instead."""
    manifest = write_manifest(tmp_path / "job.yaml", items(1))
    for name in ("obstore", "obstore.store", "obstore.exceptions"):
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setenv("GPTPROTO_API_KEY", KEY)
    assert main(["run", str(manifest), "--out", out_url(bucket)]) == EXIT_USAGE
    said = capsys.readouterr().err.strip().splitlines()
    assert said[-1].startswith("batch-engine: --out needs obstore"), said
    assert "pip install 'batch-engine[s3]'" in said[-1]
    assert main(["status", out_url(bucket)]) == EXIT_USAGE
    assert "holds no journal: name the run's work dir" in capsys.readouterr().err


def test_an_out_is_a_folder_or_an_s3_url_and_a_dry_run_names_the_work_dir(
    tmp_path: Path, bucket: Bucket, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Another scheme than s3:// is refused in one line; --work-dir without an object store too; a dry run
    into the store names it and the work dir, by default under $XDG_CACHE_HOME/batch-engine/<name>, and
    sends nothing."""
    manifest = write_manifest(tmp_path / "job.yaml", items(2), name="night ly")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    with pytest.raises(SystemExit) as exited:
        main(["run", str(manifest), "--out", "gs://bucket/x/"])
    assert exited.value.code == EXIT_USAGE
    assert "an out is a folder or an s3://bucket/prefix/ URL" in capsys.readouterr().err
    work = ["--work-dir", str(tmp_path / "w")]
    assert main(["run", str(manifest), "--out", str(tmp_path / "o"), *work, "--dry-run"]) == EXIT_USAGE
    assert "--work-dir goes with --out s3://" in capsys.readouterr().err
    assert main(["run", str(manifest), "--out", out_url(bucket), "--dry-run", "--json-logs"]) == EXIT_OK
    planned = json.loads(capsys.readouterr().out)
    assert planned["out_dir"] == out_url(bucket)
    assert planned["work_dir"] == str(tmp_path / "cache" / "batch-engine" / safe_stem("night ly"))
    assert planned["to_submit"] == 2
    assert bucket.server.requests == []  # a dry run touches nothing


@pytest.mark.slow
async def test_a_prefix_holding_another_manifests_run_is_refused_unless_taken_over(
    tmp_path: Path, bucket: Bucket
) -> None:
    """A second manifest sent into the prefix of another's run is refused in one line (exit 2), as a local
    out dir refuses it, before anything is sent; with --take-over it runs."""
    async with Simulator(sim_config(inference_polls=1, api_key=KEY)) as sim:
        first = write_manifest(tmp_path / "first.yaml", items(2), sim=sim, name="first")
        other = write_manifest(tmp_path / "other.yaml", items(2, prefix="other"), sim=sim, name="other")
        done = await run_engine(run_to_store(first, bucket, tmp_path / "w1", sim), env=engine_env(KEY))
        assert done.code == EXIT_OK, done.stderr
        accepted = sim.stats.accepted
        refused = await run_engine(run_to_store(other, bucket, tmp_path / "w2", sim), env=engine_env(KEY))
        assert refused.code == EXIT_USAGE, refused.stderr
        assert "holds the run of manifest 'first', not 'other'" in refused.stderr.strip().splitlines()[-1]
        assert sim.stats.accepted == accepted
        taken = run_to_store(other, bucket, tmp_path / "w2", sim, "--take-over")
        assert (await run_engine(taken, env=engine_env(KEY))).code == EXIT_OK
        assert [e["id"] for e in stored_report(bucket)["items"]] == ["other-00", "other-01"]


@pytest.mark.slow
async def test_a_refused_run_into_the_store_exits_2_every_time_never_aborted(
    tmp_path: Path, bucket: Bucket
) -> None:
    """The object store's client runs a Rust runtime; its teardown at interpreter exit aborted the CLI
    (SIGABRT, exit -6, after it had printed its refusal) in about 1 exit in 8. Twelve refusals in a row
    all exit 2 (the old code passed this about 1 time in 5)."""
    async with Simulator(sim_config(inference_polls=1, api_key=KEY)) as sim:
        first = write_manifest(tmp_path / "first.yaml", items(1), sim=sim, name="first")
        other = write_manifest(tmp_path / "other.yaml", items(1, prefix="other"), sim=sim, name="other")
        done = await run_engine(run_to_store(first, bucket, tmp_path / "w1", sim), env=engine_env(KEY))
        assert done.code == EXIT_OK, done.stderr
        codes = [
            (await run_engine(run_to_store(other, bucket, tmp_path / f"w{k}", sim), env=engine_env(KEY))).code
            for k in range(2, 14)
        ]
    assert codes == [EXIT_USAGE] * 12


# -- several workers ------------------------------------------------------------------------------------


@pytest.fixture
def shared(pg_url: str) -> Iterator[Backend]:
    chosen = Backend("postgresql", pg_url)
    yield chosen
    chosen.drop()


@pytest.mark.slow
async def test_two_workers_one_killed_and_started_again_share_the_run_and_the_bucket(
    tmp_path: Path, bucket: Bucket, shared: Backend
) -> None:
    """Two workers (work dirs of their own, as on two machines) share a run through PostgreSQL and the
    bucket; one is SIGKILLed mid-run and started again: each item once in the report, no body paid twice
    unless marked, every output in the store whole; `report --journal` rebuilds the page into the store."""
    specs = items(30)
    async with Simulator(sim_config(inference_polls=3)) as sim:
        manifest = write_manifest(tmp_path / "job.yaml", specs, sim=sim, name=shared.run)

        def worker(work: str) -> list[str]:
            args = run_to_store(manifest, bucket, tmp_path / work, sim, *shared.args(), "--lease", LEASE)
            return [*args, "--rate", "30"]

        def images() -> int:
            return sum(path.startswith(f"/{bucket.name}/{PREFIX}images/") for path in bucket.server.puts())

        async with engine(worker("a")) as a, engine(worker("b")) as b:
            await wait_until(lambda: images() >= 6, what="6 outputs in the store", proc=b)
            a.send(signal.SIGKILL)
            assert await a.wait() == KILLED
            assert images() < len(specs), "killed after the run's end, not in the middle of it"
            async with engine(worker("a")) as again:
                codes = [await b.wait(), await again.wait()]
        assert codes == [EXIT_OK, EXIT_OK], [b.tail(), again.tail()]
        report = check_store(bucket, specs, sim)
        assert set(entry["status"] for entry in report["items"]) == {"succeeded"}
        assert not (tmp_path / "a" / "journal.sqlite").exists()
        env = engine_env(key=None)
        obstore.delete(store_of(bucket), "index.html")
        args = ["report", "--journal", shared.url or "", shared.run, "--work-dir", str(tmp_path / "r")]
        rebuilt = await run_engine(args, env=env)
        assert rebuilt.code == EXIT_OK, rebuilt.stderr
        assert f"index.html: {out_url(bucket)}index.html" in rebuilt.stdout
        assert stored_report(bucket)["items"] == report["items"]

