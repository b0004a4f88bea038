"""This worker's part in a run that several workers share through a PostgreSQL journal.

Every worker started with the same manifest and journal works the same run. The first (no other alive)
syncs the manifest under the run's database lock and records the manifest's digest; the others wait for
that lock, check the digest (a different manifest or settings is refused while workers are alive) and join
without syncing. Then each worker:

- claims pending items a few at a time (`claim`) and sends only those it holds (the journal refuses the
  rest: `LeaseLost`);
- renews its lease every few seconds (`Crew.keep_alive`); a worker that cannot, for a whole lease, stops:
  the others have taken its items by then;
- takes over the rows of workers that died (`take_orphans`): their accepted predictions are polled, never
  paid again; their interrupted submits follow the ambiguous-submit policy and are marked;
- stays until no item of the run is left to anyone but itself (so no dead worker's items go unclaimed),
  then leaves; the last one to leave writes the reports, with every worker's figures added up.

No scheduler and no queue server: the user's scheduler starts the workers, the database is the queue.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import socket
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

import anyio

from batch_engine.errors import JournalError, UsageError
from batch_engine.store.journal import dumps
from batch_engine.store.postgres import PostgresJournal, Worker
from batch_engine.timeline import Timeline
from batch_engine.values import ItemRecord, Manifest

log = logging.getLogger(__name__)

CLAIM_BATCH = 16  #: pending items claimed per query
LOCK_WAIT_LOG = 5.0  #: seconds between "waiting for the run's lock" lines
#: seconds between two looks at whether the run still waits for other workers' items (a count of the
#: unsettled rows, on an index): at the end of a run, how long a worker may stay after the last item
WAIT_FOR_OTHERS = 0.5

#: The figures of a worker that add up over the run's workers (the others come from the journal, or are
#: the last worker's: the rate it ended at).
SUMMED = (
    "images",
    "submits",
    "submit_attempts",
    "rate_limited",
    "polls",
    "predictions_resolved",
    "run_succeeded",
    "run_failed",
)


def manifest_digest(manifest: Manifest, settings: Mapping[str, Any]) -> str:
    """What makes two workers' runs the same run: the model, the task, the defaults, the output template,
    the settings in force, and every item's id and fingerprint in order (read once, streaming)."""
    digest = hashlib.sha256()
    head = {
        "model": manifest.model,
        "task": manifest.task,
        "defaults": dict(manifest.defaults),
        "output": manifest.output,
        "settings": dict(settings),
    }
    digest.update(dumps(head).encode())
    for item in manifest.iter_items():
        digest.update(f"\n{item.id}\0{item.fingerprint}".encode())
    return digest.hexdigest()


class Crew:
    """One worker of a shared run: joining, claims, the lease, orphans, leaving."""

    def __init__(self, journal: PostgresJournal, *, resubmit_ambiguous: bool) -> None:
        self.journal = journal
        self._resubmit_ambiguous = resubmit_ambiguous
        self.starting = False  #: this worker began the run's round (it synced the manifest)
        self.took_over = 0  #: predictions of dead workers this worker polled
        self.resent = 0  #: interrupted submits of dead workers sent again (possible_duplicate)
        self.lapsed = anyio.Event()  #: set when the lease could not be renewed: stop at once
        self.changed = anyio.Event()  #: set when a sweep released rows: the feed looks again
        self._renewed = time.monotonic()

    @property
    def lease(self) -> float:
        return self.journal.lease

    def taken_for_dead(self) -> bool:
        """No renewal for longer than a lease: the run has given this worker's items to others (a journal
        error now is that, not a full disk: its session was ended while it was frozen or cut off)."""
        return self.lapsed.is_set() or time.monotonic() - self._renewed > self.lease

    @contextlib.asynccontextmanager
    async def entering(self, digest: str, *, fresh: bool) -> AsyncIterator[bool]:
        """Hold the run's lock while this worker enters; yields True when it starts the round (it must sync
        the manifest before the block ends), False when it joins live workers. UsageError when it may not
        join them: another manifest, or ``--fresh`` while they work."""
        journal = self.journal
        async with _run_lock(journal):
            live = [w for w in journal.live_workers() if w.id != journal.worker]
            dead = [w for w in live if _died_here(w)]
            if dead:  # restarted on the same machine: no need to wait for the old lease to lapse
                await journal.expire([w.id for w in dead])
                log.info(
                    "worker(s) %s of this machine are no longer running: their items are taken over now",
                    ", ".join(f"pid {w.pid}" for w in dead),
                )
                live = [w for w in live if w not in dead]
            if live:
                names = ", ".join(f"{w.host} pid {w.pid}" for w in live[:5])
                if journal.digest() != digest:
                    raise UsageError(
                        f"run {journal.run!r} in {journal.where} is being worked by {len(live)} worker(s) "
                        f"({names}) with a different manifest or settings; start this one with the same "
                        "manifest and flags, wait for them to finish, or give this manifest another name"
                    )
                if fresh:
                    raise UsageError(
                        f"--fresh would forget run {journal.run!r} while {len(live)} worker(s) work it "
                        f"({names}); stop them first"
                    )
                await journal.register(digest=digest, starting=False)
                log.info("joined run %r: %d other worker(s) alive (%s)", journal.run, len(live), names)
                yield False
                return
            self.starting = True
            yield True
            await journal.register(digest=digest, starting=True)
        self._renewed = time.monotonic()

    async def keep_alive(self, on_orphans: Any) -> None:
        """Renew the lease a few times per lease and take over dead workers' rows; set `lapsed` (and
        return) when the lease could not be renewed for most of its length."""
        interval = max(0.2, self.lease / 4)
        await on_orphans()  # a new round: what the last one left is taken up at once
        while True:
            await anyio.sleep(interval)
            try:
                await self.journal.heartbeat()
            except JournalError as exc:
                if time.monotonic() - self._renewed > self.lease * 0.75:
                    log.error("%s", exc)
                    self.lapsed.set()
                    return
                log.warning("could not renew this worker's lease (will retry): %s", exc)
                continue
            self._renewed = time.monotonic()
            await on_orphans()

    async def claim(self, limit: int) -> list[ItemRecord]:
        return await self.journal.claim_pending(max(1, min(CLAIM_BATCH, limit)))

    async def orphans(self, limit: int) -> list[ItemRecord]:
        """Take over dead workers' rows; returns their accepted predictions (up to ``limit``) to poll."""
        found = await self.journal.take_orphans(limit=limit, resubmit_ambiguous=self._resubmit_ambiguous)
        if found.dead:
            log.warning(
                "worker(s) %s stopped renewing their lease: taking over their items", ", ".join(found.dead)
            )
        if found.resent:
            self.resent += len(found.resent)
            log.warning(
                "%d submit(s) of a dead worker may have been billed: sending them again, marked "
                "possible_duplicate (%s)",
                len(found.resent),
                ", ".join(found.resent[:10]),
            )
        if found.failed:
            log.warning(
                "%d submit(s) of a dead worker may have been billed: failed as ambiguous_submit (%s)",
                len(found.failed),
                ", ".join(found.failed[:10]),
            )
        if found.to_poll:
            self.took_over += len(found.to_poll)
            log.info("polling %d prediction(s) a dead or stopped worker left", len(found.to_poll))
        if found.resent or found.released or found.to_poll:
            self.changed.set()
        return found.to_poll

    def others_left(self) -> int:
        """Items not settled that this worker does not hold: the run waits for them."""
        return self.journal.unfinished(besides_mine=True)

    async def wait_for_change(self) -> None:
        """Until a sweep has released rows, or a while has passed (another worker may have finished)."""
        with anyio.move_on_after(min(WAIT_FOR_OTHERS, self.lease / 4)):
            await self.changed.wait()
        self.changed = anyio.Event()

    @contextlib.asynccontextmanager
    async def leaving(self, stats: dict[str, Any]) -> AsyncIterator[dict[str, Any] | None]:
        """Give back what this worker holds and leave; yields the run's figures (every worker's added up)
        when this was the last worker alive, else None. The last one writes the reports inside the block,
        which holds the run's lock: a worker starting the next round (it deletes the out dir's half-written
        files, and the reports' are among them) waits for the block to end."""
        journal = self.journal
        released = await journal.release()
        if released:
            log.info("gave back %d item(s) this worker held, for the workers still alive", released)
        async with _run_lock(journal):
            everyone = await journal.leave(stats)
            yield combine(everyone, stats) if everyone else None


def _died_here(worker: Worker) -> bool:
    """A worker that ran on this machine and whose process is gone (or is this process: a reused pid)."""
    if worker.host != socket.gethostname()[:200]:
        return False
    if worker.pid == os.getpid():
        return True
    try:
        os.kill(worker.pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, someone else's
        return False
    return False


def combine(everyone: list[dict[str, Any]], last: dict[str, Any]) -> dict[str, Any]:
    """The run's figures: the last worker's, with what every worker counted added up (a worker that died
    took its counts with it), the span from the first worker's start, and one timeline of them all."""
    combined = dict(last)
    alive = [s for s in everyone if not s.get("died")] or [last]
    for key in SUMMED:
        combined[key] = int(sum(_number(s.get(key)) for s in alive))
    started = min(_number(s.get("started_at")) or time.time() for s in alive)
    combined["elapsed"] = round(max(0.0, time.time() - started), 3)
    resolved = combined["predictions_resolved"]
    combined["polls_per_prediction"] = round(combined["polls"] / resolved, 2) if resolved else 0.0
    firsts = [_number(s["first_submit_at"]) for s in alive if s.get("first_submit_at")]
    lasts = [_number(s["last_submit_at"]) for s in alive if s.get("last_submit_at")]
    span = max(lasts) - min(firsts) if firsts and lasts else 0.0
    combined["submit_rate"] = round((combined["submits"] - 1) / span, 3) if span > 0 else None
    timeline = Timeline(min(_number(s.get("timeline_start")) or started for s in alive))
    for figures in alive:
        _add_timeline(timeline, figures)
    combined["timeline"] = {name: list(counts) for name, counts in timeline.series.items()}
    combined["timeline_step"] = timeline.step
    combined["workers"] = len(alive)
    combined["workers_died"] = len(everyone) - len([s for s in everyone if not s.get("died")])
    return combined


def _add_timeline(timeline: Timeline, figures: Mapping[str, Any]) -> None:
    """A worker's timeline into the run's: each bucket's events at its middle."""
    start, step = _number(figures.get("timeline_start")), _number(figures.get("timeline_step")) or 60.0
    series = figures.get("timeline")
    if not isinstance(series, Mapping) or not start:
        return
    for name, counts in series.items():
        if name not in timeline.series or not isinstance(counts, list):
            continue
        for index, count in enumerate(counts):
            for _ in range(int(_number(count))):
                timeline.count(name, start + (index + 0.5) * step)


def _number(value: Any) -> float:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0.0


@contextlib.asynccontextmanager
async def _run_lock(journal: PostgresJournal) -> AsyncIterator[None]:
    """The run's database lock (a session advisory lock, on a connection of its own: a worker killed while
    holding it lets go with its connection)."""
    from batch_engine.store.postgres import connect

    conn = await anyio.to_thread.run_sync(connect, journal.url, journal.schema)
    key = f"batch-engine-run:{journal.schema}"
    try:
        waited = 0.0
        while not conn.execute("SELECT pg_try_advisory_lock(hashtext(%s))", (key,)).fetchone()[0]:
            if waited % LOCK_WAIT_LOG < 0.25:
                log.info("waiting for another worker to sync run %r or write its reports ...", journal.run)
            await anyio.sleep(0.25)
            waited += 0.25
        try:
            yield
        finally:
            conn.execute("SELECT pg_advisory_unlock(hashtext(%s))", (key,))
    finally:
        conn.close()
