"""The submit stage: takes pending items, paces and sends their submits, hands predictions to polling."""

from __future__ import annotations

import enum
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import anyio
from anyio.abc import ObjectReceiveStream, ObjectSendStream

from batch_engine.api.client import ApiClient
from batch_engine.api.envelope import Phase, phase
from batch_engine.control import RunControl
from batch_engine.errors import (
    ItemRejected,
    JournalError,
    NotAccepted,
    SlowDown,
    StopRun,
    StopSubmitting,
    SubmitOutcomeUnknown,
)
from batch_engine.ledger import Ledger
from batch_engine.timing.backoff import DEFAULT_POLICY, RetryPolicy, full_jitter
from batch_engine.timing.due_queue import DueQueue
from batch_engine.timing.pacing import SubmitPacer
from batch_engine.timing.poll_plan import PollPlanner
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
    max_submits: int | None


class Submitter:
    """One of several concurrent submit workers sharing one pacer, one control and one budget."""

    def __init__(
        self,
        *,
        client: ApiClient,
        ledger: Ledger,
        control: RunControl,
        pacer: SubmitPacer,
        planner: PollPlanner,
        due: DueQueue[Tracked],
        plan: SubmitPlan,
        budget: list[int],
        retry: RetryPolicy = DEFAULT_POLICY,
        sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
        rand: Callable[[], float] = random.random,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._client = client
        self._ledger = ledger
        self._control = control
        self._pacer = pacer
        self._planner = planner
        self._due = due
        self._plan = plan
        self._budget = budget  #: one shared cell: paid (or maybe-paid) submits reserved in this run
        self._retry = retry
        self._sleep = sleep
        self._rand = rand
        self._monotonic = monotonic

    async def run(self, items: ObjectReceiveStream[ItemRecord], done: ObjectSendStream[Resolved]) -> None:
        async with items, done:
            async for record in items:
                try:
                    await self._submit(record, done)
                except JournalError:
                    log.exception("the journal could not record item %s", record.item_id)
                    self._control.stop_now("disk")

    async def _submit(self, record: ItemRecord, done: ObjectSendStream[Resolved]) -> None:
        state = _Attempts(possible_duplicate=record.possible_duplicate)
        while True:
            await self._control.take_slot()
            try:
                with self._control.pacing_turn():
                    await self._pacer.acquire()
            except BaseException:  # a graceful stop cancels waiting submitters: the slot must go back
                self._control.give_slot()
                raise
            if self._control.submitting_closed.is_set() or not self._reserve():
                self._control.give_slot()
                return
            with self._control.critical():
                prediction, step = await self._exchange(record, state)
                if prediction is not None:  # routed under the shield too: an accepted item is never dropped
                    await self._route(record, prediction, done, state.submitted_at)
                    return
            self._control.give_slot()
            if step is _Next.DONE:
                return
            await self._sleep(state.delay)

    def _reserve(self) -> bool:
        limit = self._plan.max_submits
        if limit is not None and self._budget[0] >= limit:
            self._control.stop_submitting("budget")
            return False
        self._budget[0] += 1
        return True

    async def _exchange(self, record: ItemRecord, state: _Attempts) -> tuple[Prediction | None, _Next]:
        """Intent, POST, outcome: each outcome recorded before anything else happens to the item."""
        item_id = record.item_id
        await self._ledger.submitting(item_id)
        try:
            prediction = await self._client.submit(self._plan.path, self._plan.body(record))
        except SlowDown as exc:
            return None, await self._rate_limited(item_id, state, exc)
        except NotAccepted as exc:
            return None, await self._refused(item_id, state, exc)
        except SubmitOutcomeUnknown as exc:
            return None, await self._lost(item_id, state, exc)
        except ItemRejected as exc:
            self._budget[0] -= 1
            await self._ledger.fail(item_id, ItemError(exc.kind, exc.message, exc.status))
            return None, _Next.DONE
        except StopRun as exc:
            await self._unpaid(item_id, state)
            self._control.stop_now("auth")
            log.error("%s", exc.message)
            return None, _Next.DONE
        except StopSubmitting as exc:
            await self._unpaid(item_id, state)
            self._control.stop_submitting("balance")
            log.error("%s", exc.message)
            return None, _Next.DONE
        self._pacer.on_success()
        try:
            state.submitted_at = await self._ledger.submitted(item_id, prediction.id)
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
        self._budget[0] -= 1
        await self._ledger.not_accepted(item_id, possible_duplicate=state.possible_duplicate)

    async def _rate_limited(self, item_id: str, state: _Attempts, exc: SlowDown) -> _Next:
        await self._unpaid(item_id, state)
        self._ledger.saw_rate_limit()
        pause = self._pacer.on_rate_limited(exc.retry_after)
        log.debug("submit of %s rate limited; all submitters pause %.2fs", item_id, pause)
        state.delay = 0.0  # the pacer's shared pause already holds every submitter back
        return _Next.AGAIN

    async def _refused(self, item_id: str, state: _Attempts, exc: NotAccepted) -> _Next:
        await self._unpaid(item_id, state)
        state.refused += 1
        if state.refused >= self._retry.attempts:
            await self._ledger.fail(item_id, ItemError(ErrorKind.NETWORK, exc.message))
            return _Next.DONE
        state.delay = self._jitter(state.refused)
        return _Next.AGAIN

    async def _lost(self, item_id: str, state: _Attempts, exc: SubmitOutcomeUnknown) -> _Next:
        state.lost += 1
        if not self._plan.resubmit_ambiguous:
            message = f"{exc.message}; not resent because of --no-resubmit-ambiguous"
            await self._ledger.fail(item_id, ItemError(ErrorKind.AMBIGUOUS_SUBMIT, message, exc.status))
            return _Next.DONE
        if state.lost >= self._retry.attempts:
            message = f"{exc.message}; the answer was lost {state.lost} times, each may have been billed"
            await self._ledger.fail(item_id, ItemError(exc.kind, message, exc.status))
            return _Next.DONE
        state.possible_duplicate = True
        await self._ledger.not_accepted(item_id, possible_duplicate=True)
        log.warning("submit of %s: %s; sending it again (marked possible_duplicate)", item_id, exc.message)
        state.delay = self._jitter(state.lost)
        return _Next.AGAIN

    def _jitter(self, attempt: int) -> float:
        return full_jitter(
            attempt, initial=self._retry.initial, maximum=self._retry.maximum, rand=self._rand()
        )

    async def _route(
        self,
        record: ItemRecord,
        prediction: Prediction,
        done: ObjectSendStream[Resolved],
        submitted_at: float,
    ) -> None:
        """An accepted prediction: to the sink if sync mode already finished it, else to polling."""
        where = phase(prediction.status)
        if where is Phase.PENDING:
            tracked = Tracked(record.item_id, prediction.id, submitted_at, submitted_at + self._plan.timeout)
            self._due.push(tracked, self._monotonic() + self._planner.first_delay())
            return
        self._control.give_slot()
        self._ledger.resolved += 1  # its final status came with the submit's answer (sync mode)
        if where is Phase.FAILED:
            error = ItemError(
                ErrorKind.INFERENCE_FAILED, prediction.error or f"prediction {prediction.status}"
            )
            await self._ledger.fail(record.item_id, error, prediction_id=prediction.id)
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
