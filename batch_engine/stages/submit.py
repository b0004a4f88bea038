"""The submit stage: takes pending items, paces and sends their submits, hands predictions on to polling."""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from anyio.abc import ObjectReceiveStream, ObjectSendStream

from batch_engine.api.envelope import Phase, phase
from batch_engine.control import Slot, StopReason
from batch_engine.errors import (
    ItemRejected,
    JournalError,
    NotAccepted,
    SlowDown,
    StopRun,
    StopSubmitting,
    SubmitOutcomeUnknown,
)
from batch_engine.stages.context import StageContext
from batch_engine.store.transitions import TransitionRefused
from batch_engine.timing.pacing import SubmitPacer
from batch_engine.values import ErrorKind, ItemError, ItemRecord, Prediction, Resolved, Tracked

log = logging.getLogger(__name__)


class _Next(enum.Enum):
    DONE = "done"  #: the item left the submit stage (submitted, failed, or the run stops)
    AGAIN = "again"  #: not accepted: send it again


@dataclass(frozen=True, kw_only=True)
class SubmitPlan:
    """What the stage needs to know of the job: where to send, what to send, how long to wait."""

    path: str  #: e.g. ``/api/v3/openai/gpt-image-2-plus/image-edit``
    body: Callable[[ItemRecord], dict[str, Any]]  #: the wire body of an item
    timeout: float  #: seconds a prediction may take
    resubmit_ambiguous: bool


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
    ) -> None:
        self._ctx = ctx
        self._pacer = pacer
        self._plan = plan
        self._track = track

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
        state = _Attempts(possible_duplicate=record.possible_duplicate)
        while True:
            slot = await control.take_slot()
            try:
                with control.pacing_turn():
                    await self._pacer.acquire()
            except BaseException:  # a graceful stop cancels waiting submitters: the slot must go back
                slot.release()
                raise
            if control.submitting_closed.is_set() or not control.reserve_submit():
                slot.release()
                return
            with control.critical():
                prediction, step = await self._exchange(record, state)
                if prediction is not None:  # routed under the shield too: an accepted item is never dropped
                    await self._route(record, prediction, slot, done, state.submitted_at)
                    return
            slot.release()
            if step is _Next.DONE:
                return
            await self._ctx.sleep(state.delay)

    async def _exchange(self, record: ItemRecord, state: _Attempts) -> tuple[Prediction | None, _Next]:
        """Intent, POST, outcome: each outcome recorded before anything else happens to the item."""
        ledger, item_id = self._ctx.ledger, record.item_id
        await ledger.submitting(item_id)
        try:
            prediction = await self._ctx.client.submit(self._plan.path, self._plan.body(record))
        except SlowDown as exc:
            return None, await self._rate_limited(item_id, state, exc)
        except NotAccepted as exc:
            return None, await self._refused(item_id, state, exc)
        except SubmitOutcomeUnknown as exc:
            return None, await self._lost(item_id, state, exc)
        except ItemRejected as exc:
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
        self._pacer.on_success()
        try:
            state.submitted_at = await ledger.submitted(item_id, prediction.id)
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

    async def _rate_limited(self, item_id: str, state: _Attempts, exc: SlowDown) -> _Next:
        await self._unpaid(item_id, state)
        self._ctx.ledger.saw_rate_limit()
        pause = self._pacer.on_rate_limited(exc.retry_after)
        log.debug("submit of %s rate limited; all submitters pause %.2fs", item_id, pause)
        state.delay = 0.0  # the pacer's shared pause already holds every submitter back
        return _Next.AGAIN

    async def _refused(self, item_id: str, state: _Attempts, exc: NotAccepted) -> _Next:
        await self._unpaid(item_id, state)
        state.refused += 1
        if state.refused >= self._ctx.retry.attempts:
            await self._ctx.ledger.fail(item_id, ItemError(ErrorKind.NETWORK, exc.message))
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
        if state.lost >= self._ctx.retry.attempts:
            message = f"{exc.message}; the answer was lost {state.lost} times, each may have been billed"
            await ledger.fail(item_id, ItemError(exc.kind, message, exc.status))
            return _Next.DONE
        state.possible_duplicate = True
        await ledger.not_accepted(item_id, possible_duplicate=True)
        log.warning("submit of %s: %s; sending it again (marked possible_duplicate)", item_id, exc.message)
        state.delay = self._ctx.backoff(state.lost)
        return _Next.AGAIN

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
        slot.resolve()  # its final status came with the submit's answer (sync mode)
        if where is Phase.FAILED:
            error = ItemError(
                ErrorKind.INFERENCE_FAILED, prediction.error or f"prediction {prediction.status}"
            )
            await self._ctx.ledger.fail(record.item_id, error, prediction_id=prediction.id)
            return
        await done.send(Resolved(record.item_id, prediction))


class _Attempts:
    """How one item's submits went so far (mutable, private to one `Submitter._submit` call)."""

    __slots__ = ("delay", "lost", "possible_duplicate", "refused", "submitted_at")

    def __init__(self, *, possible_duplicate: bool) -> None:
        self.possible_duplicate = possible_duplicate
        self.lost = 0
        self.refused = 0
        self.delay = 0.0
        self.submitted_at = 0.0
