"""The engine: the one module that knows every stage; it wires them, runs them and writes the reports."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import shutil
import signal
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
from anyio.streams.memory import MemoryObjectSendStream

from batch_engine import settings as defaults
from batch_engine.api.catalogue import spec_for, submit_path
from batch_engine.api.client import ApiClient, ClientConfig, public_url
from batch_engine.control import RunControl, StopReason
from batch_engine.crew import Crew, manifest_digest
from batch_engine.errors import JournalError, OutputNotSaved, StagingRefused
from batch_engine.ledger import Ledger
from batch_engine.report.gallery_files import (
    COPIES_GRACE,
    THUMBS_DIR,
    GalleryFiles,
    folder_listing,
    page_files,
    unlink_copies,
)
from batch_engine.report.write import REPORT_FILES, write_reports
from batch_engine.settings import ROUTE_OPENAI_IMAGES, RunSettings
from batch_engine.stages.context import StageContext
from batch_engine.stages.poll import Poller, PollQueue
from batch_engine.stages.routes import ImagesRoute, PredictionsRoute, Route
from batch_engine.stages.sink import Sink, SinkPlan
from batch_engine.stages.submit import SubmitPlan, Submitter
from batch_engine.staging.out_store import OutStore
from batch_engine.staging.s3 import S3Inputs, Signer, open_store, sign_get
from batch_engine.store import Journal, open_journal, sync
from batch_engine.store.files import (
    IMAGES_DIR,
    INPUTS_DIR,
    JOURNAL_NAME,
    RESULTS_NAME,
    OutputTemplate,
    remove_temp_files,
)
from batch_engine.store.lock import OutDirLock
from batch_engine.store.out_dir import check_owner, recover_lost_journal, refuse_links
from batch_engine.store.postgres import DEFAULT_LEASE, PostgresJournal
from batch_engine.store.rebuild import REPORT_NAME
from batch_engine.timing.backoff import DEFAULT_POLICY, RetryPolicy
from batch_engine.timing.due_queue import DueQueue
from batch_engine.timing.in_flight import AutoCap
from batch_engine.timing.pacing import DEFAULT_PAUSE_INITIAL, PollBudget, SubmitPacer
from batch_engine.timing.poll_plan import PollPlanner
from batch_engine.ui.progress import ProgressView, RecentRate
from batch_engine.values import (
    MAX_RUNS,
    Item,
    ItemRecord,
    ItemState,
    Manifest,
    Resolved,
    RunMeta,
    RunStats,
    Snapshot,
    Tracked,
    run_entry,
)

log = logging.getLogger(__name__)

TICK_SECONDS = 0.25
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@dataclass(frozen=True, kw_only=True)
class RunOptions:
    """How to run a manifest: where to write, which API, which settings."""

    out_dir: Path  #: the out dir; with ``out_url``, the local work dir the run writes in before uploading
    settings: RunSettings
    client: ClientConfig
    fresh: bool = False  #: forget the journal and outputs first (the CLI asks before)
    retry_failed: bool = False  #: send items that failed in an earlier run again
    take_over: bool = False  #: let this manifest take over an out dir that holds another manifest's run
    handle_signals: bool = False  #: SIGINT/SIGTERM: stop submitting, grace period, then stop
    copy_inputs: bool = True  #: keep local copies of input images for index.html
    input_source: Callable[[str], str] = str  #: where an input URL is fetched from (the simulator maps it)
    retry: RetryPolicy = DEFAULT_POLICY  #: polls, downloads and refused submits
    pause_initial: float = DEFAULT_PAUSE_INITIAL  #: first pause after a 429 without Retry-After
    sleep: Callable[[float], Awaitable[None]] = anyio.sleep  #: how the stages wait out a retry delay
    sign_inputs: Signer = sign_get  #: presigns the URLs of staged input files (tests watch it)
    submit_workers: int = 64
    poll_workers: int = 32
    download_workers: int = 16
    started_at: float | None = None  #: unix seconds the process started (the CLI's); None: now
    #: a PostgreSQL journal shared by every worker of the run (``--journal``); None: the out dir's SQLite
    journal_url: str | None = None
    lease: float = DEFAULT_LEASE  #: seconds a worker's claims outlive its last heartbeat (shared journal)
    #: ``s3://bucket/prefix/``: the out dir is in this object store (see `staging.out_store`); None: local
    out_url: str | None = None


@dataclass(frozen=True)
class RunResult:
    stats: RunStats
    exit_code: int
    report_paths: dict[str, Path | str]  #: file name → its path, or its URL in an object store


def exit_code(stats: RunStats) -> int:
    """0: all succeeded; 1: finished with failures; 3: stopped early (auth, balance, interrupt, budget)."""
    if stats.stopped_reason is not None:
        return 3
    unfinished = stats.total - stats.by_state.get("succeeded", 0) - stats.by_state.get("failed", 0)
    return 1 if stats.by_state.get("failed", 0) or unfinished else 0


async def run_manifest(manifest: Manifest, options: RunOptions, *, view: ProgressView) -> RunResult:
    """Run (or resume) a manifest into its out dir, holding the out dir's lock throughout; with a shared
    journal, work the run alongside every other worker started with it (see `crew`).

    With ``out_url``, the object store is tried first (`OutStore.probe`): StagingRefused, before anything
    is sent or changed, when it will not take the outputs."""
    options.out_dir.mkdir(parents=True, exist_ok=True)
    refuse_links(options.out_dir)
    if options.journal_url is not None:
        store = await _out_store(options, manifest.name)
        return await _run_shared(manifest, options, options.journal_url, store, view=view)
    with OutDirLock(options.out_dir) as lock:
        if lock.stale_owner:
            log.warning(
                "took over a stale lock left by pid %s (no longer running)", lock.stale_owner.get("pid")
            )
        store = await _out_store(options, manifest.name)
        if store is not None:
            log.warning(
                "the journal is on this machine only (%s): if the machine is lost, the next run rebuilds it "
                "from the reports in %s, and pays again for what was in flight; to share the run and "
                "survive a lost machine, give every worker --journal postgresql://...",
                options.out_dir / JOURNAL_NAME,
                store.location,
            )
        _remove_leftovers(options.out_dir)
        async with await open_journal(options.out_dir) as journal, ApiClient(options.client) as client:
            if options.fresh:
                # The journal first: killed in between, the next run redoes items whose files are still
                # there, rather than trusting a journal whose outputs are gone.
                await journal.reset_all()
                await _forget_outputs(options.out_dir, store)
            engine = Engine(manifest, options, journal=journal, client=client, view=view, store=store)
            return await engine.run()


async def _out_store(options: RunOptions, name: str) -> OutStore | None:
    """The object store of ``--out s3://...``, once it took the probe for run ``name``; None for a local
    out dir."""
    if options.out_url is None:
        return None
    store = OutStore(options.out_url, retry=options.retry, sleep=options.sleep)
    await store.probe(name, take_over=options.take_over)
    log.info("outputs go to %s (work dir %s)", store.location, options.out_dir)
    return store


async def _run_shared(
    manifest: Manifest, options: RunOptions, url: str, store: OutStore | None, *, view: ProgressView
) -> RunResult:
    """One worker of a run shared through PostgreSQL: no out-dir lock (the run's database lock and the
    workers' leases take its place), the journal named by the manifest's ``name``."""
    journal = await PostgresJournal.open(url, manifest.name, out_dir=options.out_dir, lease=options.lease)
    async with journal, ApiClient(options.client) as client:
        crew = Crew(journal, resubmit_ambiguous=options.settings.resubmit_ambiguous)
        engine = Engine(manifest, options, journal=journal, client=client, view=view, crew=crew, store=store)
        return await engine.run()


@contextlib.contextmanager
def _interruptible(enabled: bool) -> Iterator[None]:
    """While the reports are written, SIGINT and SIGTERM raise KeyboardInterrupt (the CLI then names
    `batch-engine report`) instead of a SIGTERM killing the process without a word."""
    if not enabled:
        yield
        return
    saved = {signum: signal.signal(signum, signal.default_int_handler) for signum in _STOP_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)


def _remove_leftovers(out_dir: Path) -> None:
    """Delete the half-written temporary files of a run that was killed; holding the lock, no run writes."""
    for folder in (out_dir, out_dir / IMAGES_DIR, out_dir / INPUTS_DIR, out_dir / THUMBS_DIR):
        remove_temp_files(folder)


async def _forget_outputs(out_dir: Path, store: OutStore | None) -> None:
    """``--fresh``: the outputs, thumbnails and reports go, from the out dir (the work dir) and the store."""
    await anyio.to_thread.run_sync(_forget_files, out_dir)
    if store is not None:
        forgotten = await store.forget()
        log.info("--fresh: %d object(s) deleted from %s, and the reports", forgotten, store.location)


def _forget_files(out_dir: Path) -> None:
    for folder in (IMAGES_DIR, THUMBS_DIR):
        shutil.rmtree(out_dir / folder, ignore_errors=True)
    for name in (*REPORT_FILES, RESULTS_NAME):
        (out_dir / name).unlink(missing_ok=True)


class Engine:
    """Prepares the journal, runs feeder → submitters → pollers → sink in one task group, reports."""

    def __init__(
        self,
        manifest: Manifest,
        options: RunOptions,
        *,
        journal: Journal,
        client: ApiClient,
        view: ProgressView,
        crew: Crew | None = None,
        store: OutStore | None = None,
    ) -> None:
        settings = options.settings
        self._crew = crew  #: this worker's part in a shared run; None when the run is this process's alone
        self._store = store  #: the object store the out dir is in; None: the out dir is local
        self._manifest = manifest
        self._manifest_path = str(Path(manifest.path).resolve())  #: as the journal remembers it
        self._options = options
        self._settings = settings
        self._journal = journal
        self._client = client
        self._view = view
        self._control = RunControl(
            max_in_flight=settings.max_in_flight,
            max_submits=settings.max_submits,
            # unless the user set a cap: Little's law from the rate and the model's typical time, then
            # from the hold times this run sees (`timing.in_flight`)
            auto=AutoCap(rate=settings.rate, prior=spec_for(manifest.model).expected_seconds),
        )
        self._pacer = SubmitPacer(
            rate=settings.rate,
            rate_min=settings.rate_min,
            adapt=settings.adapt,
            pause_initial=options.pause_initial,
        )
        self._poll_budget = PollBudget(rate=settings.polls_per_second, pause_initial=options.pause_initial)
        self._planner = PollPlanner(
            poll_after=settings.poll_after,
            prior=spec_for(manifest.model).expected_seconds,
            interval=settings.poll_interval,
            interval_max=settings.poll_interval_max,
            # a user's --poll-interval wins over the learned steps
            fixed_steps=(settings.poll_interval, settings.poll_interval_max)
            != (defaults.DEFAULT_POLL_INTERVAL, defaults.DEFAULT_POLL_INTERVAL_MAX),
        )
        self._queue = PollQueue(self._planner, DueQueue())
        self._retry = options.retry
        self._started = options.started_at or time.time()
        self._ledger: Ledger | None = None
        self._gallery = GalleryFiles(
            client,
            options.out_dir,
            resolve=options.input_source,
            copy_inputs=options.copy_inputs,
            publish=None if store is None else functools.partial(store.put_files, options.out_dir),
            discard_outputs=store is not None,  # the work dir keeps no output once it is in the store
        )
        self._before = (0, 0)  #: items succeeded and failed when this run began
        self._finish_rate = RecentRate()
        self._inputs = self._staging()  #: None unless local files are staged in an object store
        self._plan = self._submit_plan()  #: shared by every submitter
        self._outputs = OutputTemplate(manifest.output)

    async def run(self) -> RunResult:
        meta = await self._prepare()
        ledger = self._ledger = Ledger(self._journal, view=self._view, watcher=self._gallery)
        self._before = (ledger.succeeded, ledger.failed)
        if self._crew is None:  # a shared run's results.jsonl is written once, by the last worker
            ledger.open_results(self._options.out_dir)
        self._view.start()
        try:
            await self._run_stages()
        finally:
            if self._inputs is not None:
                inputs = self._inputs
                log.info(
                    "input files: %d uploaded to %s (%d bytes), %d already there",
                    inputs.uploaded,
                    inputs.location,
                    inputs.uploaded_bytes,
                    inputs.found,
                )
            self._view.update(self._snapshot())
            self._view.stop()
            self._gallery.discard_left()
            ledger.close_results()
            if self._plan.gate is not None:
                self._plan.gate.close()
            with anyio.CancelScope(shield=True), _interruptible(self._options.handle_signals):
                stats, paths = await self._finish(meta)
        return RunResult(stats=stats, exit_code=exit_code(stats), report_paths=paths)

    async def _finish(self, meta: RunMeta) -> tuple[RunStats, dict[str, Path | str]]:
        """Record the run's figures and write the reports; a full disk here is a "disk" stop, not a crash."""
        crew, control = self._crew, self._control
        if crew is not None and control.reason is StopReason.DISK and crew.taken_for_dead():
            # The journal's error was the database ending the session of a worker it took for dead.
            log.error("this worker was taken for dead (no lease renewal for %.0f s): it stops", crew.lease)
            control.reason = StopReason.LEASE
        stats = self._stats()
        log.debug("writing the reports from the journal")
        try:
            now, done = time.time(), stats.as_dict()
            finished = dataclasses.replace(
                meta,
                finished_at=now,
                stopped_reason=stats.stopped_reason,
                stats=done,
                inputs_not_copied=self._gallery.not_copied_since(meta.inputs_not_copied),
                runs=[*meta.runs[:-1], run_entry(self._started, now, done)],
            )
            if self._crew is not None:
                combined = await self._crew.leave(self._worker_figures(stats))
                if combined is None:
                    log.info("the other workers are still at work: the last to finish writes the reports")
                    return stats, {}
                finished = self._combined(finished, combined)
                # The last worker alive: nobody writes into the out dir now, so nothing half-written stays.
                await anyio.to_thread.run_sync(_remove_leftovers, self._options.out_dir)
            await self._journal.set_meta(finished)
            return stats, await self._write_reports(finished)
        except (JournalError, OSError):
            rebuild = "OUT_DIR" if self._crew is None else f"--journal URL {self._manifest.name}"
            log.exception("the reports could not be written; `batch-engine report %s` rebuilds them", rebuild)
            self._control.stop_submitting(StopReason.DISK)
            return self._stats(), {}
        except (OutputNotSaved, StagingRefused) as exc:
            log.error(
                "the reports are in %s but could not be uploaded (%s); `batch-engine report` uploads them",
                self._options.out_dir,
                exc,
            )
            self._control.stop_submitting(StopReason.OUT_STORE)
            return self._stats(), {}

    def _worker_figures(self, stats: RunStats) -> dict[str, Any]:
        """This worker's figures, as the last worker of a shared run adds them up."""
        ledger = self._ledger
        assert ledger is not None
        return {
            **stats.as_dict(),
            "started_at": self._started,
            "first_submit_at": ledger.first_submit_at,
            "last_submit_at": ledger.last_submit_at,
            "timeline_start": ledger.timeline.start,
        }

    def _combined(self, meta: RunMeta, combined: dict[str, Any]) -> RunMeta:
        """The run's meta with every worker's figures added up (see `crew.combine`)."""
        done = {key: value for key, value in combined.items() if key in meta.stats}
        done["workers"] = combined.get("workers", 1)
        done["workers_died"] = combined.get("workers_died", 0)
        runs = [*meta.runs[:-1], run_entry(meta.started_at or self._started, time.time(), done)]
        return dataclasses.replace(meta, stats=done, runs=runs)

    async def _prepare(self) -> RunMeta:
        crew = self._crew
        if crew is None:
            return await self._prepare_run()
        settings = dataclasses.asdict(self._settings)
        digest = await anyio.to_thread.run_sync(manifest_digest, self._manifest, settings)
        async with crew.entering(digest, fresh=self._options.fresh) as starting:
            if not starting:
                meta = self._journal.meta()
                if meta is None:
                    raise JournalError(f"the shared journal {self._journal.where} has no run recorded")
                return meta
            await anyio.to_thread.run_sync(_remove_leftovers, self._options.out_dir)
            if self._options.fresh:
                await self._journal.reset_all()
                await _forget_outputs(self._options.out_dir, self._store)
            left = await crew.journal.forget_leases()
            if left:  # workers of the last round died or froze with these: said, as a takeover mid-round is
                log.warning(
                    "%d item(s) held by workers that stopped renewing their lease: taking over their items",
                    left,
                )
            return await self._prepare_run()

    async def _prepare_run(self) -> RunMeta:
        journal = self._journal
        store = self._store
        if self._crew is None:  # a shared run: every worker has its own path to the manifest
            check_owner(journal.meta(), self._manifest_path, take_over=self._options.take_over)
            await self._recover_lost_journal()
        sync = await journal.sync_manifest(self._manifest, intact=None if store is None else store.intact)
        log.info(
            "journal: %d new, %d changed, %d unchanged, %d restored from the archive; %d retired (kept in "
            "the archive: they come back with their outputs if they return unchanged)",
            sync.added,
            sync.changed,
            sync.unchanged,
            sync.restored,
            sync.removed,
        )
        repaired = await journal.repair_damaged()
        if repaired:
            shown = "; ".join(repaired[:10]) + (
                f"; and {len(repaired) - 10} more" if len(repaired) > 10 else ""
            )
            log.warning(
                "%d damaged journal row(s) repaired (never paid twice silently): %s", len(repaired), shown
            )
        if self._options.retry_failed:
            log.info("retrying %d failed item(s)", await journal.reset_failed())
        ambiguous = await journal.resolve_ambiguous(resubmit=self._settings.resubmit_ambiguous)
        if ambiguous:
            action = (
                "sending them again (possible_duplicate)"
                if self._settings.resubmit_ambiguous
                else "failing them"
            )
            log.warning("%d submit(s) were in flight when the last run died; %s", len(ambiguous), action)
        previous = journal.meta()
        meta = RunMeta(
            name=self._manifest.name,
            manifest_path=self._manifest_path,
            model=self._manifest.model,
            task=self._manifest.task,
            base_url=public_url(self._options.client.base_url),
            defaults=dict(self._manifest.defaults),
            settings=dict(self._manifest.settings),
            started_at=self._started,
            output=self._manifest.output,
            inputs_not_copied=previous.inputs_not_copied if previous else {},
            out=self._options.out_url or str(self._options.out_dir.resolve()),
            runs=[*(previous.history() if previous else []), run_entry(self._started)][-MAX_RUNS:],
        )
        await journal.set_meta(meta)
        return meta

    async def _recover_lost_journal(self) -> None:
        """A journal missing or empty beside an earlier run's record is rebuilt from it (see `rebuild`).
        With an object store, that record is the reports there: on a new machine, the work dir has none."""
        journal, out_dir, store = self._journal, self._options.out_dir, self._store
        if store is not None and journal.is_empty():
            for name in (REPORT_NAME, RESULTS_NAME):
                if not (out_dir / name).exists() and await store.fetch(name, out_dir):
                    log.info("the journal is empty: %s fetched from %s to rebuild it", name, store.location)
        await recover_lost_journal(journal, out_dir, found=None if store is None else store.found)

    async def _run_stages(self) -> None:
        opts = self._options
        async with anyio.create_task_group() as outer:
            outer.start_soon(self._tick)
            outer.start_soon(self._gallery_files)
            if opts.handle_signals:
                outer.start_soon(self._signals, outer)
            async with anyio.create_task_group() as tg:
                self._control.watch(tg.cancel_scope)
                if self._crew is not None:
                    outer.start_soon(self._crew_duties, tg)
                send_done, recv_done = anyio.create_memory_object_stream[Resolved](opts.download_workers * 2)
                tg.start_soon(self._produce, send_done.clone())
                for _ in range(opts.poll_workers):
                    tg.start_soon(self._poller().run, send_done.clone())
                for _ in range(opts.download_workers):
                    tg.start_soon(self._sink().run, recv_done.clone())
                send_done.close()
                recv_done.close()
                tg.start_soon(self._close_when_settled)
            await self._let_copies_finish()
            outer.cancel_scope.cancel()

    async def _let_copies_finish(self) -> None:
        """A run that ended with no stop lets the page's input copies queued finish (they trail the submits:
        a quick run ends before its last ones), for ``COPIES_GRACE`` seconds at most; any stop ends it."""
        control, left = self._control, self._gallery.copies_left
        if control.reason is not None or not left:
            return
        log.info("finishing %d input copies for the report's page (at most %.0f s)", left, COPIES_GRACE)
        with anyio.move_on_after(COPIES_GRACE) as scope:
            control.watch(scope)  # `stop_now`
            async with anyio.create_task_group() as tg:

                async def on_stop() -> None:
                    await control.submitting_closed.wait()
                    tg.cancel_scope.cancel()

                tg.start_soon(on_stop)
                await self._gallery.finish_copies()
                tg.cancel_scope.cancel()
        if left := self._gallery.copies_left:
            log.info("%d input copies not made: the page links those inputs by URL", left)

    async def _crew_duties(self, stages: anyio.abc.TaskGroup) -> None:
        """A shared run's worker: renew the lease, take over dead workers' predictions, stop at once when
        the lease could not be renewed (others have its items by now)."""
        crew = self._crew
        assert crew is not None

        async def orphans() -> None:
            if self._control.submitting_closed.is_set():
                return  # stopping: no new work (what this worker holds is given back as it leaves)
            records = await crew.orphans(max(0, self._control.free_slots))
            for record in records:
                stages.start_soon(self._resume, record, time.monotonic())

        async with anyio.create_task_group() as tg:
            tg.start_soon(crew.keep_alive, orphans)
            await crew.lapsed.wait()
            self._control.stop_now(StopReason.LEASE)
            tg.cancel_scope.cancel()

    async def _produce(self, done: MemoryObjectSendStream[Resolved]) -> None:
        """Resume predictions already submitted, then submit the pending items until done or stopped."""
        async with done:
            shared = self._crew is not None
            if not shared:  # a shared run's worker takes them over in its sweeps (`_crew_duties`)
                await self._resume_submitted()
            # A shared run's worker claims an item only when a submitter is free to take it at once: items
            # held in a buffer would wait here while other workers have nothing to do.
            send_items, recv_items = anyio.create_memory_object_stream[ItemRecord](
                0 if shared else self._options.submit_workers
            )
            with anyio.CancelScope() as scope:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._cancel_when_closed, scope)
                    async with anyio.create_task_group() as workers:
                        workers.start_soon(self._feed_shared if shared else self._feed, send_items)
                        for _ in range(self._options.submit_workers):
                            workers.start_soon(self._submitter().run, recv_items.clone(), done.clone())
                        recv_items.close()
                    scope.cancel()
        self._control.finish_submitting()

    async def _gallery_files(self) -> None:
        """Input copies and thumbnails while the run goes on; never after a stop (nor after the end)."""
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._gallery.run)
            await self._control.submitting_closed.wait()
            tg.cancel_scope.cancel()

    async def _resume_submitted(self) -> None:
        now = time.monotonic()
        for record in self._journal.records({ItemState.SUBMITTED}):
            await self._resume(record, now)

    async def _resume(self, record: ItemRecord, now: float) -> None:
        """Poll an accepted prediction a run before this one (or a dead worker) sent."""
        self._gallery.expect(record)
        self._gallery.sending(record.item_id)
        slot = await self._control.take_slot()
        submitted_at = record.submitted_at or time.time()
        deadline = submitted_at + self._settings.timeout
        tracked = Tracked(record.item_id, record.prediction_id or "", submitted_at, deadline, slot=slot)
        self._queue.later(tracked, now=now, delay=0.0)

    async def _feed(self, send: MemoryObjectSendStream[ItemRecord]) -> None:
        async with send:
            for record in self._journal.records({ItemState.PENDING}):
                self._gallery.expect(record)
                await send.send(record)

    async def _feed_shared(self, send: MemoryObjectSendStream[ItemRecord]) -> None:
        """Claim pending items while in-flight places are free; done once no item of the run is left that
        this worker does not hold (a worker that dies later leaves items only a live worker can take)."""
        crew, control = self._crew, self._control
        assert crew is not None
        async with send:
            while True:
                await control.wait_for_free_slot()
                records = await crew.claim(control.free_slots)
                for record in records:
                    self._gallery.expect(record)
                    await send.send(record)
                if records:
                    continue
                if crew.others_left() == 0:
                    return
                await crew.wait_for_change()

    async def _cancel_when_closed(self, scope: anyio.CancelScope) -> None:
        await self._control.submitting_closed.wait()
        scope.cancel()

    async def _close_when_settled(self) -> None:
        await self._control.settled.wait()
        self._queue.due.close()

    async def _tick(self) -> None:
        while True:
            self._view.update(self._snapshot())
            if self._ledger is not None:
                self._ledger.flush_results()
            await anyio.sleep(TICK_SECONDS)

    async def _signals(self, outer: anyio.abc.TaskGroup) -> None:
        with anyio.open_signal_receiver(*_STOP_SIGNALS) as signals:
            count = 0
            async for signum in signals:
                count += 1
                name = signal.Signals(signum).name
                if count == 1:
                    grace = self._settings.grace
                    self._view.message(
                        f"{name}: no new submits; waiting up to {grace:.0f} s for predictions in flight "
                        "(again to stop at once)"
                    )
                    self._control.stop_submitting(StopReason.INTERRUPTED)
                    outer.start_soon(self._grace_then_stop)
                elif count == 2:
                    self._view.message(
                        f"{name} again: stopping now and writing the reports from the journal as it stands "
                        f"(once more skips them; 'batch-engine report {self._options.out_dir}' writes them)"
                    )
                    self._control.stop_now(StopReason.INTERRUPTED)

    async def _grace_then_stop(self) -> None:
        await anyio.sleep(self._settings.grace)
        self._control.stop_now(StopReason.INTERRUPTED)

    def _staging(self) -> S3Inputs | None:
        inputs = self._manifest.inputs
        if inputs is None or not inputs.upload:
            return None
        return S3Inputs(
            open_store(inputs.upload),
            ttl=inputs.ttl(self._settings.timeout),
            public_base_url=inputs.public_base_url,
            concurrency=inputs.upload_concurrency,
            retry=self._options.retry,
            sleep=self._options.sleep,
            sign=self._options.sign_inputs,
        )

    def _route(self) -> Route:
        manifest, spec = self._manifest, spec_for(self._manifest.model)
        if manifest.inputs is not None and manifest.inputs.route == ROUTE_OPENAI_IMAGES:
            return ImagesRoute(spec, timeout=self._settings.timeout)
        return PredictionsRoute(submit_path(manifest.model, manifest.task), spec, inputs=self._inputs)

    def _submit_plan(self) -> SubmitPlan:
        return SubmitPlan(
            route=self._route(),
            timeout=self._settings.timeout,
            resubmit_ambiguous=self._settings.resubmit_ambiguous,
            gate=self._crew.journal.gate() if self._crew is not None else None,
        )

    def _context(self) -> StageContext:
        assert self._ledger is not None
        return StageContext(
            client=self._client,
            ledger=self._ledger,
            control=self._control,
            retry=self._options.retry,
            sleep=self._options.sleep,
        )

    def _submitter(self) -> Submitter:
        queue = self._queue
        return Submitter(
            self._context(),
            pacer=self._pacer,
            plan=self._plan,
            track=lambda tracked: queue.track(tracked, now=time.monotonic()),
            sample=self._planner.observe_sync,
        )

    def _poller(self) -> Poller:
        return Poller(self._context(), budget=self._poll_budget, queue=self._queue)

    def _sink(self) -> Sink:
        assert self._ledger is not None
        timeout = max(self._settings.timeout, self._options.client.download_timeout)
        plan = SinkPlan(
            timeout=timeout,
            wanted=self._outputs_wanted,
            outputs=self._outputs,
            meta=self._ledger.meta_of,
            keep=self._store,
        )
        return Sink(self._context(), out_dir=self._options.out_dir, plan=plan)

    def _outputs_wanted(self, item_id: str) -> int:
        record = self._journal.get(item_id)
        return int(record.request.get("n", 1)) if record is not None else 1

    def _snapshot(self) -> Snapshot:
        ledger = self._ledger
        assert ledger is not None
        succeeded, failed = ledger.succeeded - self._before[0], ledger.failed - self._before[1]
        return Snapshot(
            total=self._manifest.count,
            done_before=sum(self._before),
            submitted=ledger.submits,
            in_flight=self._control.predictions,
            succeeded=succeeded,
            failed=failed,
            rate=self._pacer.rate,
            rate_ceiling=self._pacer.ceiling,
            rate_limited=ledger.rate_limited,
            polls=ledger.polls,
            elapsed=time.time() - self._started,
            images=ledger.images,
            finish_rate=self._finish_rate.update(time.monotonic(), succeeded + failed),
        )

    def _stats(self) -> RunStats:
        ledger = self._ledger
        assert ledger is not None
        journal = self._journal
        return RunStats(
            total=self._manifest.count,
            by_state={state.value: n for state, n in journal.counts().items()},
            by_error_kind=journal.error_kind_counts(),
            images=ledger.images,
            elapsed=time.time() - self._started,
            submits=ledger.submits,
            submit_attempts=ledger.submit_attempts,
            rate_limited=ledger.rate_limited,
            polls=ledger.polls,
            predictions_resolved=self._control.resolved,
            rate_final=self._pacer.rate,
            rate_ceiling=self._pacer.ceiling,
            possible_duplicates=journal.possible_duplicate_count(),
            stopped_reason=None if self._control.reason is None else self._control.reason.value,
            stop_detail=self._control.detail,
            timeline=ledger.timeline.series,
            timeline_step=ledger.timeline.step,
            run_succeeded=ledger.succeeded - self._before[0],
            run_failed=ledger.failed - self._before[1],
            submit_rate=ledger.submit_rate,
            in_flight_cap=self._control.max_in_flight,
            in_flight_auto=self._control.auto is not None,
            in_flight_max=self._control.most_in_flight,
            waited=dict(self._control.waited),
        )

    async def _write_reports(self, meta: RunMeta) -> dict[str, Path | str]:
        """Write the reports into the out dir; with an object store, into the work dir, then upload them
        (the page's input copies and thumbnails are listed from the store: every worker uploaded its own)."""
        out_dir, store, records = self._options.out_dir, self._store, self._journal.records
        if store is None:
            files = page_files(out_dir, records(), dict(meta.inputs_not_copied))
            return dict(write_reports(out_dir, meta, records, files=files))
        listed = {} if store.refused else await page_listings(store, out_dir)
        files = page_files(
            out_dir, records(), dict(meta.inputs_not_copied), listing=lambda f: listed.get(f, frozenset())
        )
        paths = write_reports(out_dir, meta, records, files=files)
        return dict(await store.put_reports(out_dir, paths))


async def page_listings(store: OutStore, out_dir: Path) -> dict[str, frozenset[str]]:
    """The page's folders in an object store, once the files the work dir holds and the store lacks (the
    last thumbnails of a run, cut short by its end) are uploaded too."""
    listed = {}
    for folder in (INPUTS_DIR, THUMBS_DIR):
        there = await anyio.to_thread.run_sync(store.listing, folder)
        here = await anyio.to_thread.run_sync(folder_listing, out_dir, folder)
        uploaded = await store.put_files(out_dir, sorted(here - there))
        listed[folder] = there | frozenset(uploaded)
        if folder == THUMBS_DIR:  # a thumbnail in the store needs no local copy (a cut-short batch's)
            await anyio.to_thread.run_sync(unlink_copies, out_dir, sorted(here & listed[folder]))
    return listed



def plan_counts(
    manifest: Manifest,
    journal: Journal | None,
    *,
    retry_failed: bool = False,
    resubmit_ambiguous: bool = True,
) -> dict[str, Any]:
    """What a run would do, for ``--dry-run``: nothing is sent and nothing is written.

    ``journal`` is the out dir's (None when there is none yet); the items are looked up in it a chunk at
    a time, archived versions included (an item that returns unchanged is not paid again). The options
    are the run's: ``retry_failed`` sends failed items again, and ambiguous submits are billed again only
    when ``resubmit_ambiguous`` (else the run fails them).
    """
    counts = {"done": 0, "failed": 0, "to_poll": 0, "ambiguous": 0, "to_submit": 0, "images_billed": 0}
    for chunk in sync.chunks(manifest.iter_items()):
        known = journal.versions(chunk) if journal is not None else {}
        for item in chunk:
            _plan_item(counts, item, known.get(item.id), retry_failed, resubmit_ambiguous)
    return counts


def _plan_item(
    counts: dict[str, Any],
    item: Item,
    record: ItemRecord | None,
    retry_failed: bool,
    resubmit_ambiguous: bool,
) -> None:
    state = record.state if record and record.fingerprint == item.fingerprint else ItemState.PENDING
    if state is ItemState.FAILED and retry_failed:
        state = ItemState.PENDING
    key = {
        ItemState.SUCCEEDED: "done",
        ItemState.FAILED: "failed",
        ItemState.SUBMITTED: "to_poll",
        ItemState.SUBMITTING: "ambiguous",
    }.get(state, "to_submit")
    counts[key] += 1
    if key == "to_submit" or (key == "ambiguous" and resubmit_ambiguous):
        counts["images_billed"] += int(item.request.get("n", 1))
