"""Run control shared by the stages: in-flight slots, the submit budget, why the run stops, and how hard."""

from __future__ import annotations

import enum
import logging
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import anyio
import anyio.lowlevel

from batch_engine.stages.breaker import Breaker
from batch_engine.timing.in_flight import AutoCap

log = logging.getLogger(__name__)


class StopReason(enum.StrEnum):
    """Why a run stopped early (``RunStats.stopped_reason``); each makes the exit code 3."""

    AUTH = "auth"
    BALANCE = "balance"
    INTERRUPTED = "interrupted"
    BUDGET = "budget"
    DISK = "disk"
    INTERNAL = "internal"
    THROTTLED = "throttled"
    REFUSED = "refused"  #: submit after submit refused alike, for a reason no item can fix (`Breaker`)
    LEASE = "lease"  #: a worker of a shared run could not renew its lease: the others took its items
    STAGING = "staging"
    #: the object store of ``--out s3://...`` refused the outputs, or kept failing to take one
    OUT_STORE = "out_store"


#: What each stop means, as the log, the summary and the report say it; ``{detail}`` is what the run
#: knows of it (for ``refused``, the refusal quoted).
STOP_MESSAGES: dict[str, str] = {
    StopReason.AUTH: (
        "stopped early: API key refused (401) — nothing else can succeed; fix the key and run again"
    ),
    StopReason.BALANCE: (
        "stopped submitting: balance ran out or no permission (403); run again after a top-up to resume"
    ),
    StopReason.INTERRUPTED: "stopped early: interrupted; run again with the same out dir to resume",
    StopReason.BUDGET: (
        "stopped submitting: the --max-submits budget was reached; run again to submit the rest"
    ),
    StopReason.DISK: (
        "stopped early: an output or the journal could not be written (disk full?); free space and rerun"
    ),
    StopReason.LEASE: (
        "stopped early: this worker could not renew its lease on the shared journal (database unreachable?) "
        "and the other workers took its items; start it again to rejoin the run"
    ),
    StopReason.THROTTLED: (
        "stopped submitting: every submit was refused with 429 (rate limited) for minutes on end, so the key "
        "is throttled or over its concurrency limit; run again later to resume"
    ),
    StopReason.STAGING: (
        "stopped submitting: the object store refused to stage input files (credentials, permission or a "
        "missing bucket; see the log line above); fix the AWS_* settings and run again to resume"
    ),
    StopReason.OUT_STORE: (
        "stopped: outputs could not be saved in the object store of --out (see the log line above: "
        "credentials, permission, a missing bucket, or a store failing); the items whose outputs are not "
        "there stay submitted, and the next run saves them without paying again: run again to resume"
    ),
    StopReason.INTERNAL: (
        "stopped early: an internal error (a bug in batch-engine; the log line above names it); the journal "
        "is intact, so run again to resume, and please report it"
    ),
    StopReason.REFUSED: (
        "stopped submitting: the API refused submit after submit with the same error, which no item can "
        "fix ({detail}); check the model, the fields every item shares and the account, then run again to "
        "resume (the items refused before the stop failed: add --retry-failed to send them again)"
    ),
}


def stop_message(reason: str | None, detail: str | None = None) -> str | None:
    """What a ``stopped_reason`` code means for a person, or None when the run finished."""
    if reason is None:
        return None
    template = STOP_MESSAGES.get(reason, f"stopped early: {reason}")
    return template.replace("{detail}", detail or "no detail recorded")


#: What a run's stages wait for (`RunControl.waited`): a pacing turn at the rate, a free in-flight slot,
#: the pause after a 429, a poll turn within the poll budget.
WAIT_KINDS = ("rate", "in_flight", "rate_limits", "polls")

#: How the summary names each (`RunControl.held_back`).
WAIT_NAMES = {
    "rate": "the rate (submits waited for their pacing turn)",
    "in_flight": "the in-flight cap (submits waited for a free slot)",
    "rate_limits": "429s (submits paused after rate limits)",
    "polls": "the poll budget (polls waited for the poll rate)",
}


class Slot:
    """One in-flight place: taken before a submit, given back exactly once.

    ``release()`` gives it back when no prediction came of it (the submit was refused, rate limited or
    lost); ``resolve()`` when the prediction's final status was seen, which also counts it as resolved.
    A second give-back is a bug and raises RuntimeError.
    """

    __slots__ = ("_control", "_held", "taken_at")

    def __init__(self, control: RunControl, taken_at: float) -> None:
        self._control = control
        self._held = True
        self.taken_at = taken_at  #: clock time it was taken: the hold time an auto cap is sized from

    def __repr__(self) -> str:
        return f"<Slot {'held' if self._held else 'given back'}>"

    @property
    def held(self) -> bool:
        return self._held

    def release(self) -> None:
        """Give the slot back: nothing is in flight for it any more, and nothing was resolved."""
        self._give_back()

    def resolve(self) -> None:
        """Give the slot back because its prediction's final status was seen (done, failed or timed out)."""
        self._give_back()
        self._control.resolved += 1
        self._control.held_for(self._control.clock() - self.taken_at)

    def _give_back(self) -> None:
        if not self._held:
            raise RuntimeError("this in-flight slot was already given back")
        self._held = False
        self._control.slot_given_back()


class RunControl:
    """What every stage may ask: may I still submit? Is the run over? Take an in-flight slot.

    Invariant: ``in_flight`` counts the slots held: predictions submitted (or resumed) and not yet
    resolved, and submits on their way; a slot is taken before a submit, only while fewer than
    ``max_in_flight`` are held, and given back (by `Slot`) exactly once. (An auto cap cut below the slots
    already held is exceeded until enough come back; `over_cap` lets a submitter not yet sent give its
    slot back.) ``predictions`` is what a person wants to
    see: the slots held, less those of submitters still waiting for their pacing turn.
    """

    __slots__ = (
        "_changed",
        "_critical",
        "_hard_scopes",
        "_max_submits",
        "_queued",
        "_woken",
        "auto",
        "breaker",
        "clock",
        "detail",
        "fixed",
        "in_flight",
        "max_in_flight",
        "most_in_flight",
        "pacing",
        "reason",
        "resolved",
        "settled",
        "submits_reserved",
        "submitters_done",
        "submitting_closed",
        "waited",
    )

    def __init__(
        self,
        *,
        max_in_flight: int | None = None,
        max_submits: int | None = None,
        auto: AutoCap | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_in_flight is None and auto is None:
            raise ValueError("RunControl needs max_in_flight or an AutoCap")
        self.fixed = max_in_flight  #: the user's cap; None: ``auto`` sizes it (and resizes it while running)
        self.auto = auto if max_in_flight is None else None
        self.clock = clock
        self.max_in_flight = self.auto.cap if self.auto is not None else max(1, max_in_flight or 1)
        self.most_in_flight = 0  #: the highest ``in_flight`` seen
        #: seconds spent waiting, by what was waited for: the summary names the largest (`held_back`)
        self.waited: dict[str, float] = dict.fromkeys(WAIT_KINDS, 0.0)
        self._changed = anyio.Event()  #: set (and replaced) whenever a slot frees or the cap grows
        #: `take_slot` callers waiting for a place, first come first served: a freed place wakes one of
        #: them, not all (64 submitters woken by each resolved prediction, all but one to wait again,
        #: were a tenth of the event loop's steps per item)
        self._queued: deque[anyio.Event] = deque()
        self._woken = 0  #: of those, woken for a free place and not yet run
        self._max_submits = max_submits
        self.in_flight = 0  #: slots held
        self.pacing = 0  #: slots held by submitters still waiting for their pacing turn
        self.resolved = 0  #: predictions whose final status this run saw
        self.submits_reserved = 0  #: submits that were (or may have been) paid for in this run
        self.reason: StopReason | None = None  #: why the run stops early
        self.detail: str | None = None  #: what is known of the reason, e.g. the refusal that tripped
        self.breaker = Breaker()  #: submits refused alike, in a row: see `refused_alike`
        self.submitting_closed = anyio.Event()  #: set when no new submit may start
        self.submitters_done = anyio.Event()  #: set when the submit stage has ended
        self.settled = anyio.Event()  #: set when submitters are done and nothing is in flight
        self._hard_scopes: list[anyio.CancelScope] = []
        self._critical: set[anyio.CancelScope] = set()

    def __repr__(self) -> str:
        return (
            f"RunControl(in_flight={self.in_flight}, resolved={self.resolved}, "
            f"submits_reserved={self.submits_reserved}, reason={self.reason!r})"
        )

    async def take_slot(self) -> Slot:
        """Wait for a free in-flight place; the caller must give it back through the returned `Slot`."""
        # The check and the taking are one step, with no await between them: a checkpoint after the
        # check let every caller of one moment pass it before any took a place (cap 3, 10 callers at
        # once: 10 in flight). A place promised to a woken caller is not free for a newcomer.
        await anyio.lowlevel.checkpoint()
        if self.in_flight + self._woken >= self.max_in_flight or self._queued:
            await self._wait_in_queue()
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        return Slot(self, self.clock())

    @property
    def free_slots(self) -> int:
        """In-flight places nobody holds now (none while a cut cap is below what is held)."""
        return max(0, self.max_in_flight - self.in_flight)

    async def wait_for_free_slot(self) -> None:
        """Until an in-flight place is free (without taking it); the wait counts as the cap's."""
        if self.in_flight < self.max_in_flight:
            await anyio.lowlevel.checkpoint()
            return
        started = self.clock()
        try:
            while self.in_flight >= self.max_in_flight:
                await self._changed.wait()
        finally:
            self.waited["in_flight"] += self.clock() - started

    async def _wait_in_queue(self) -> None:
        """Until this caller is woken for a free place (see `_wake`) and finds it still free."""
        started = self.clock()
        try:
            again = False
            while True:
                turn = anyio.Event()
                if again:  # woken, but the place went (the cap was cut meanwhile): first in line still
                    self._queued.appendleft(turn)
                else:
                    self._queued.append(turn)
                again = True
                self._wake_queued()  # a place free and promised to nobody goes to the front of the queue
                try:
                    await turn.wait()
                except BaseException:  # cancelled: out of the queue, or the wake it got goes to the next
                    if turn.is_set():
                        self._woken -= 1
                        self._wake_queued()
                    else:
                        self._queued.remove(turn)
                    raise
                self._woken -= 1
                if self.in_flight < self.max_in_flight:
                    return
        finally:
            self.waited["in_flight"] += self.clock() - started

    def slot_given_back(self) -> None:
        self.in_flight -= 1
        self._wake()
        self._check_settled()

    def held_for(self, seconds: float) -> None:
        """A slot's prediction resolved after ``seconds``: an auto cap learns from it."""
        if self.auto is not None:
            self.auto.resolved(seconds)
            self._resize()

    def concurrency_limited(self, rate: float) -> bool:
        """A submit got 429: True when an auto cap reads it as the API's concurrency limit (and cut
        itself below it), False when the rate should be cut instead."""
        if self.auto is None or not self.auto.rate_limited(self.predictions, rate):
            return False
        self._resize()
        log.info(
            "429 at %d predictions in flight: read as a concurrency limit; in-flight cap now %d",
            self.predictions,
            self.max_in_flight,
        )
        return True

    def waited_for(self, kind: str, seconds: float) -> None:
        """Count time a stage spent waiting for ``kind`` (one of `WAIT_KINDS`)."""
        self.waited[kind] += seconds

    def _resize(self) -> None:
        if self.auto is None:
            return
        cap, self.max_in_flight = self.max_in_flight, self.auto.cap
        if self.max_in_flight > cap:
            self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()
        self._wake_queued()

    def _wake_queued(self) -> None:
        """Wake as many queued `take_slot` callers as there are free places not promised to one woken."""
        while self._queued and self._woken < self.max_in_flight - self.in_flight:
            self._queued.popleft().set()
            self._woken += 1

    @property
    def predictions(self) -> int:
        """Predictions in flight as the progress view shows them: submits sent and not yet resolved."""
        return self.in_flight - self.pacing

    @contextmanager
    def pacing_turn(self) -> Iterator[None]:
        """Count a slot holder as waiting for its pacing turn for the duration of the block."""
        self.pacing += 1
        try:
            yield
        finally:
            self.pacing -= 1

    def over_cap(self) -> bool:
        """More places held than the cap allows now: it was cut after they were taken (a concurrency 429,
        or an auto cap resized to shorter hold times)."""
        return self.in_flight > self.max_in_flight

    def reserve_submit(self) -> bool:
        """Count one more submit that may be billed; False, and submitting stops, once the budget is spent."""
        if self._max_submits is not None and self.submits_reserved >= self._max_submits:
            self.stop_submitting(StopReason.BUDGET)
            return False
        self.submits_reserved += 1
        return True

    def refund_submit(self) -> None:
        """A reserved submit the server certainly did not bill (refused, rate limited, 400)."""
        self.submits_reserved -= 1

    def finish_submitting(self) -> None:
        self.submitters_done.set()
        self._check_settled()

    def _check_settled(self) -> None:
        if self.submitters_done.is_set() and self.in_flight == 0:
            self.settled.set()

    @contextmanager
    def critical(self) -> Iterator[anyio.CancelScope]:
        """Shield a submit from a graceful stop (its answer must be recorded); `stop_now` still cancels it.

        A submit cancelled here leaves its journal row in ``submitting``: the next run treats it as
        ambiguous, which is exactly what it is.
        """
        with anyio.CancelScope(shield=True) as scope:
            self._critical.add(scope)
            try:
                yield scope
            finally:
                self._critical.discard(scope)

    def refused_alike(self, kind: str, status: int | None, message: str, *, accepted: int) -> bool:
        """A submit was refused; True when it is the run's fault, not its item's (see `Breaker`): the
        item is left pending, and submitting stops the first time."""
        if not self.breaker.refused(kind, status, message, accepted=accepted):
            return False
        self.stop_submitting(StopReason.REFUSED, detail=self.breaker.detail)
        return True

    def stop_submitting(self, reason: StopReason, *, detail: str | None = None) -> None:
        """No new submits; what is in flight is still polled and downloaded."""
        if self.reason is None:
            self.reason, self.detail = reason, detail
            log.warning("%s", stop_message(reason, detail))
        self.submitting_closed.set()

    def watch(self, scope: anyio.CancelScope) -> None:
        """Register a scope that `stop_now` cancels (the engine's task group)."""
        self._hard_scopes.append(scope)

    def stop_now(self, reason: StopReason, *, detail: str | None = None) -> None:
        """Stop everything at once; whatever was in flight is resumable from the journal."""
        self.stop_submitting(reason, detail=detail)
        for scope in [*self._hard_scopes, *self._critical]:
            scope.cancel()
