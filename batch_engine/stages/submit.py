"""The submit stage: takes pending items, paces and sends their submits, hands predictions on to polling.

Each item's inputs are staged first (`routes.Route.stage`: local files uploaded to the user's object store),
before the item takes an in-flight slot or a pacing turn: the first submit does not wait for the last
upload, and uploads spend no rate. A synchronous route's answer carries the outputs and goes straight to
the sink.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from anyio.abc import ObjectReceiveStream, ObjectSendStream

from batch_engine.api.envelope import Phase, phase
from batch_engine.control import Slot, StopReason
from batch_engine.errors import (
    InputFailed,
    ItemRejected,
    JournalError,
    LeaseLost,
    NotAccepted,
    SlowDown,
    StagingRefused,
    StopRun,
    StopSubmitting,
    SubmitOutcomeUnknown,
)
from batch_engine.stages.context import StageContext
from batch_engine.stages.routes import Route, Send
from batch_engine.store.transitions import TransitionRefused
from batch_engine.timing.pacing import SubmitPacer
from batch_engine.timing.shared_pace import SharedGate
from batch_engine.values import ErrorKind, ItemError, ItemRecord, Prediction, Resolved, Tracked

log = logging.getLogger(__name__)

#: 429s one item may get before it fails as rate_limited. Generous: the pacer slows every submitter down
#: after a 429, so an item meets a few at most while the key's limit is learnt.
RATE_LIMITED_ATTEMPTS = 50
#: A run stops submitting (resumable, StopReason.THROTTLED) once this many 429s came in a row ...
RUN_REFUSALS = 20
#: ... over at least this many seconds (or half the item timeout, if shorter) with nothing accepted, or
#: once an item runs out of attempts or time with nothing accepted since its first 429.
REFUSAL_WINDOW = 300.0


class RefusalWatch:
    """Whether the server refuses (429) every submit: then the run stops submitting, every item resumable.

    A 429 now and then is pacing at work, and an item refused while others get through fails on its own
    (its attempt budget or its timeout). But when nothing at all was accepted since an item's first 429,
    or for the refusal window across many 429s in a row, the key is throttled or over its concurrency
    limit: waiting on would only fail every item as rate_limited, one by one, where stopping leaves them
    all pending for the next run.
    """

    __slots__ = ("_count", "_since")

    def __init__(self) -> None:
        self._count = 0  #: 429s since the last submit answered otherwise
        self._since: float | None = None  #: clock time of the first of them

    def __repr__(self) -> str:
        return f"RefusalWatch(count={self._count}, since={self._since})"

    def answered(self) -> None:
        """A submit was accepted or refused for a reason of its own (400): the server is not throttling."""
        self._count, self._since = 0, None

    def refused(self, now: float, *, window: float) -> bool:
        """Count one 429; True when the 429s in a row span the window: the run should stop submitting."""
        self._since = now if self._since is None else self._since
        self._count += 1
        return self._count >= RUN_REFUSALS and now - self._since >= window

    def nothing_accepted_since(self, when: float) -> bool:
        """True when every submit answered since ``when`` was a 429."""
        return self._since is not None and self._since <= when


class _Next(enum.Enum):
    DONE = "done"  #: the item left the submit stage (submitted, failed, or the run stops)
    AGAIN = "again"  #: not accepted: send it again


@dataclass(frozen=True, kw_only=True)
class SubmitPlan:
    """What the stage needs to know of the job: how to send, how long to wait."""

    route: Route  #: the prediction API (inputs staged first), or the synchronous OpenAI-format endpoint
    timeout: float  #: seconds a prediction may take; also how long one item may keep trying to be accepted
    resubmit_ambiguous: bool
    #: a shared run's one submit schedule for every worker (`timing.shared_pace`); None: this process alone
    gate: SharedGate | None = None
    #: shared, like the plan itself, by every submitter of the run
    refusals: RefusalWatch = field(default_factory=RefusalWatch, compare=False)

    @property
    def refusal_window(self) -> float:
        return min(REFUSAL_WINDOW, self.timeout / 2)


class Submitter:
    """One of several concurrent submit workers sharing one pacer and the run's control.

    An accepted prediction still running is handed to ``track`` (the poll stage's queue); one that sync
    mode already finished goes straight to the sink through ``done``.
    """

    def __init__(
        self,
        ctx: StageContext,
        *,
        pacer: SubmitPacer,
        plan: SubmitPlan,
        track: Callable[[Tracked], None],
        sample: Callable[[float], None] | None = None,
    ) -> None:
        self._ctx = ctx
        self._pacer = pacer
        self._plan = plan
        self._track = track
        self._sample = sample  #: told the inference seconds of an answer that came back finished (sync mode)

    async def run(self, items: ObjectReceiveStream[ItemRecord], done: ObjectSendStream[Resolved]) -> None:
        async with items, done:
            async for record in items:
                try:
                    await self._submit(record, done)
                except JournalError:
                    log.exception("the journal could not record item %s", record.item_id)
                    self._ctx.control.stop_now(StopReason.DISK)
                except TransitionRefused as exc:
                    log.error("%s", exc)
                    self._ctx.control.stop_now(StopReason.INTERNAL)

    async def _submit(self, record: ItemRecord, done: ObjectSendStream[Resolved]) -> None:
        control = self._ctx.control
        if not await self._staged(record):
            return
        state = _Attempts(possible_duplicate=record.possible_duplicate, started=self._ctx.clock())
        while True:
            slot = await control.take_slot()
            try:
                with control.pacing_turn():
                    await self._paced()
            except BaseException:  # a graceful stop cancels waiting submitters: the slot must go back
                slot.release()
                raise
            if control.over_cap():  # a slot taken before the cap was cut: wait for a place again
                self._pacer.give_back_turn()
                slot.release()
                continue
            if control.submitting_closed.is_set() or not control.reserve_submit():
                slot.release()
                return
            # A stop_now may cut the block below short (its cancel ends the block): the item is then done
            # here, its row left submitting (an ambiguous submit for the next run, which it is), and its
            # slot maybe already given back by `_route`.
            step = _Next.DONE
            with control.critical():
                try:
                    prediction, step = await self._attempt(record, state)
                except LeaseLost as exc:  # taken for dead: the item is another worker's now
                    log.warning("%s", exc)
                    prediction, step = None, _Next.DONE
                if prediction is not None:  # routed under the shield too: an accepted item is never dropped
                    await self._route(record, prediction, slot, done, state.submitted_at)
                    return
            if slot.held:
                slot.release()
            if step is _Next.DONE:
                return
            await self._ctx.sleep(state.delay)

    async def _paced(self) -> None:
        """Wait for this submit's pacing turn; the time counts as the rate's, or as 429s' while paused."""
        control, started = self._ctx.control, self._ctx.clock()
        paused = max(0.0, self._pacer.paused_until - started)
        try:
            await self._pacer.acquire()
            if self._plan.gate is not None:
                await self._plan.gate.turn(self._pacer)
        finally:
            waited = self._ctx.clock() - started
            control.waited_for("rate_limits", min(paused, waited))
            control.waited_for("rate", max(0.0, waited - paused))

    async def _staged(self, record: ItemRecord) -> bool:
        """Stage the item's inputs; False when it cannot go on (failed as ``input``, or the run stops)."""
        try:
            await self._plan.route.stage(record)
        except InputFailed as exc:
            await self._ctx.ledger.fail(record.item_id, ItemError(ErrorKind.INPUT, str(exc)))
            return False
        except StagingRefused as exc:
            log.error("%s", exc)
            self._ctx.control.stop_submitting(StopReason.STAGING)  # the item stays pending
            return False
        return True

    async def _attempt(self, record: ItemRecord, state: _Attempts) -> tuple[Prediction | None, _Next]:
        """One request, made ready (URLs signed, files opened) before its intent is journaled."""
        try:
            async with self._plan.route.request(record) as send:
                return await self._exchange(record, state, send)
        except InputFailed as exc:  # raised before anything was sent: nothing to pay
            self._ctx.control.refund_submit()
            await self._ctx.ledger.fail(record.item_id, ItemError(ErrorKind.INPUT, str(exc)))
        except StagingRefused as exc:
            self._ctx.control.refund_submit()
            log.error("%s", exc)
            self._ctx.control.stop_submitting(StopReason.STAGING)
        return None, _Next.DONE

    async def _exchange(
        self, record: ItemRecord, state: _Attempts, send: Send
    ) -> tuple[Prediction | None, _Next]:
        """Intent, POST, outcome: each outcome recorded before anything else happens to the item."""
        ledger, item_id = self._ctx.ledger, record.item_id
        try:
            await ledger.submitting(item_id)
        except LeaseLost as exc:  # a shared run gave the item to another worker: it sends it, not this one
            log.warning("%s", exc)
            self._ctx.control.refund_submit()
            return None, _Next.DONE
        sent_at = await self._pacer.send_turn()
        if sent_at is None:  # a 429's pause began after this submit's slot: nothing sent, queue again
            await self._unpaid(item_id, state)
            state.delay = 0.0
            return None, _Next.AGAIN
        try:
            prediction = await send(self._ctx.client)
        except SlowDown as exc:
            return None, await self._rate_limited(item_id, state, exc, sent_at)
        except NotAccepted as exc:
            return None, await self._refused(item_id, state, exc)
        except SubmitOutcomeUnknown as exc:
            return None, await self._lost(item_id, state, exc)
        except ItemRejected as exc:
            self._plan.refusals.answered()
            if self._ctx.control.refused_alike(exc.kind, exc.status, exc.message, accepted=ledger.submits):
                await self._unpaid(item_id, state)  # the run is at fault, not the item: it stays pending
                return None, _Next.DONE
            self._ctx.control.refund_submit()
            await ledger.fail(item_id, ItemError(exc.kind, exc.message, exc.status))
            return None, _Next.DONE
        except StopRun as exc:
            await self._unpaid(item_id, state)
            self._ctx.control.stop_now(StopReason.AUTH)
            log.error("%s", exc.message)
            return None, _Next.DONE
        except StopSubmitting as exc:
            await self._unpaid(item_id, state)
            self._ctx.control.stop_submitting(StopReason.BALANCE)
            log.error("%s", exc.message)
            return None, _Next.DONE
        self._pacer.on_success(sent_at)
        self._plan.refusals.answered()
        if self._plan.route.synchronous:  # no id: the row stays submitting until the sink saves the outputs
            ledger.answered()
            return prediction, _Next.DONE
        try:
            state.submitted_at = await ledger.submitted(item_id, prediction.id)
        except LeaseLost:
            log.error(
                "item %s was accepted as prediction %s after this worker was taken for dead; the worker "
                "that holds the item now has resent it (marked possible_duplicate) or failed it as an "
                "ambiguous submit",
                item_id,
                prediction.id,
            )
            raise
        except JournalError:
            # The one place a paid prediction id exists only in memory: say it where a person will see
            # it, so it can be recovered by hand; the row stays "submitting" (ambiguous next run).
            log.error(
                "item %s was accepted as prediction %s, but the journal could not record it",
                item_id,
                prediction.id,
            )
            raise
        return prediction, _Next.DONE

    async def _unpaid(self, item_id: str, state: _Attempts) -> None:
        self._ctx.control.refund_submit()
        await self._ctx.ledger.not_accepted(item_id, possible_duplicate=state.possible_duplicate)

    async def _rate_limited(self, item_id: str, state: _Attempts, exc: SlowDown, sent_at: float) -> _Next:
        await self._unpaid(item_id, state)
        self._ctx.ledger.saw_rate_limit()
        # 429s at the same in-flight level are the API's concurrency limit, not the rate: the auto cap
        # was cut below it, the rate stays, and the item waits for a slot like any other.
        pause = 0.0
        if not self._ctx.control.concurrency_limited(self._pacer.rate):
            rate_before = self._pacer.rate
            pause = self._pacer.on_rate_limited(exc.retry_after, sent_at=sent_at)
            if self._plan.gate is not None:  # the key is every worker's: they all pause, and adopt a cut
                await self._plan.gate.rate_limited(self._pacer, rate_before, pause)
        if self._run_throttled(state):
            self._ctx.control.stop_submitting(StopReason.THROTTLED)  # the item stays pending
            return _Next.DONE
        spent = self._spent(state)
        if state.rate_limited < RATE_LIMITED_ATTEMPTS and spent is None:
            log.debug("submit of %s rate limited; all submitters pause %.2fs", item_id, pause)
            state.delay = 0.0  # the pacer's shared pause already holds every submitter back
            return _Next.AGAIN
        message = f"rate limited (429) {state.rate_limited} times{spent or ''}: {exc.message}"
        await self._ctx.ledger.fail(item_id, ItemError(ErrorKind.RATE_LIMITED, message, exc.status))
        return _Next.DONE

    def _run_throttled(self, state: _Attempts) -> bool:
        """Count a 429 against the item and the run; True when it shows the key is refused, not the item."""
        now, watch = self._ctx.clock(), self._plan.refusals
        state.rate_limited += 1
        state.first_refused = now if state.first_refused is None else state.first_refused
        if watch.refused(now, window=self._plan.refusal_window):
            return True
        out = state.rate_limited >= RATE_LIMITED_ATTEMPTS or self._spent(state) is not None
        return out and watch.nothing_accepted_since(state.first_refused)

    async def _refused(self, item_id: str, state: _Attempts, exc: NotAccepted) -> _Next:
        await self._unpaid(item_id, state)
        state.refused += 1
        spent = self._spent(state)
        if state.refused >= self._ctx.retry.attempts or spent is not None:
            message = f"{exc.message} (refused {state.refused} times{spent or ''})"
            await self._ctx.ledger.fail(item_id, ItemError(ErrorKind.NETWORK, message))
            return _Next.DONE
        state.delay = self._ctx.backoff(state.refused)
        return _Next.AGAIN

    async def _lost(self, item_id: str, state: _Attempts, exc: SubmitOutcomeUnknown) -> _Next:
        ledger = self._ctx.ledger
        state.lost += 1
        if not self._plan.resubmit_ambiguous:
            message = f"{exc.message}; not resent because of --no-resubmit-ambiguous"
            await ledger.fail(item_id, ItemError(ErrorKind.AMBIGUOUS_SUBMIT, message, exc.status))
            return _Next.DONE
        spent = self._spent(state)
        if state.lost >= self._ctx.retry.attempts or spent is not None:
            lost = f"the answer was lost {state.lost} times{spent or ''}"
            message = f"{exc.message}; {lost}, each may have been billed"
            await ledger.fail(item_id, ItemError(exc.kind, message, exc.status))
            return _Next.DONE
        state.possible_duplicate = True
        await ledger.not_accepted(item_id, possible_duplicate=True)
        log.warning("submit of %s: %s; sending it again (marked possible_duplicate)", item_id, exc.message)
        state.delay = self._ctx.backoff(state.lost)
        return _Next.AGAIN

    def _spent(self, state: _Attempts) -> str | None:
        """Past the item's deadline (its timeout, from its first submit): how that reads in a message."""
        elapsed = self._ctx.clock() - state.started
        if elapsed < self._plan.timeout:
            return None
        return f" over {elapsed:.1f} s, past the item's {self._plan.timeout:g} s timeout"

    async def _route(
        self,
        record: ItemRecord,
        prediction: Prediction,
        slot: Slot,
        done: ObjectSendStream[Resolved],
        submitted_at: float,
    ) -> None:
        """An accepted prediction: to the sink if sync mode already finished it, else to polling."""
        where = phase(prediction.status)
        if where is Phase.PENDING:
            deadline = submitted_at + self._plan.timeout
            self._track(Tracked(record.item_id, prediction.id, submitted_at, deadline, slot=slot))
            return
        slot.resolve()  # its final status came with the submit's answer (sync mode, a synchronous route)
        if self._sample is not None and prediction.inference_ms is not None and where is not Phase.FAILED:
            self._sample(prediction.inference_ms / 1000)  # a free sample for the poll planner
        if where is Phase.FAILED:
            error = ItemError(
                ErrorKind.INFERENCE_FAILED, prediction.error or f"prediction {prediction.status}"
            )
            await self._ctx.ledger.fail(record.item_id, error, prediction_id=prediction.id or None)
            return
        await done.send(Resolved(record.item_id, prediction, answered=self._plan.route.synchronous))


class _Attempts:
    """How one item's submits went so far (mutable, private to one `Submitter._submit` call)."""

    __slots__ = (
        "delay",
        "first_refused",
        "lost",
        "possible_duplicate",
        "rate_limited",
        "refused",
        "started",
        "submitted_at",
    )

    def __init__(self, *, possible_duplicate: bool, started: float) -> None:
        self.possible_duplicate = possible_duplicate
        self.started = started  #: clock time of the first submit attempt: the item's deadline counts from it
        self.lost = 0
        self.refused = 0
        self.rate_limited = 0
        self.first_refused: float | None = None  #: clock time of the first 429
        self.delay = 0.0
        self.submitted_at = 0.0
