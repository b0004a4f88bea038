"""The poll stage: resolves predictions by due time, within the poll budget, until done, failed or late."""

from __future__ import annotations

import dataclasses
import logging

import anyio
from anyio.abc import ObjectSendStream

from batch_engine.api.envelope import Phase, phase
from batch_engine.control import StopReason
from batch_engine.errors import (
    ItemRejected,
    JournalError,
    LeaseLost,
    RetryLater,
    SlowDown,
    StopRun,
    StopSubmitting,
)
from batch_engine.stages.context import StageContext
from batch_engine.store.transitions import TransitionRefused
from batch_engine.timing.due_queue import DueQueue
from batch_engine.timing.pacing import PollBudget
from batch_engine.timing.poll_plan import PollPlanner
from batch_engine.values import ErrorKind, ItemError, Prediction, Resolved, Tracked

log = logging.getLogger(__name__)


class PollQueue:
    """Where predictions wait for their polls: one due queue, wakes and polls placed by the planner.

    A prediction popped from the queue is polled only if the planner says its poll is due; otherwise it
    goes back (a heap entry, no request). So predictions planned on the prior move to the learned
    schedule as soon as there is one.
    """

    __slots__ = ("due", "planner")

    def __init__(self, planner: PollPlanner, due: DueQueue[Tracked]) -> None:
        self.planner = planner
        self.due = due

    def track(self, tracked: Tracked, *, now: float, age: float) -> None:
        """A prediction just accepted ``age`` seconds ago (its submit, on the stage context's clock:
        recording it in the journal takes a while): woken when the planner wants to look at it first;
        ``now`` is the due queue's clock."""
        if self.planner.track():
            tracked = dataclasses.replace(tracked, probe=True)
        age = max(0.0, age)
        wait = self.planner.wake_in(age=age, polls=0, running_at=0.0, probe=tracked.probe)
        self.due.push(tracked, now + wait)

    def wait(self, tracked: Tracked, *, age: float) -> float:
        """Seconds until this prediction's next look; 0.0: poll it now."""
        return self.planner.wake_in(
            age=age, polls=tracked.polls, running_at=tracked.running_at, probe=tracked.probe
        )

    def later(self, tracked: Tracked, *, now: float, delay: float) -> None:
        self.due.push(tracked, now + delay)

    def forget(self, tracked: Tracked) -> None:
        """The prediction is resolved (or given up): the planner no longer counts it as running."""
        self.planner.resolved(tracked.prediction_id)


class Poller:
    """One of a pool of workers; all share one poll queue and one poll budget."""

    def __init__(self, ctx: StageContext, *, budget: PollBudget, queue: PollQueue) -> None:
        self._ctx = ctx
        self._budget = budget
        self._queue = queue

    async def run(self, done: ObjectSendStream[Resolved]) -> None:
        async with done:
            while True:
                try:
                    tracked = await self._queue.due.pop()
                except anyio.EndOfStream:
                    return
                wait = self._queue.wait(tracked, age=self._ctx.clock() - tracked.submitted_at)
                if wait > 0.0:  # not due yet under the planner's current schedule: look again later
                    self._queue.later(tracked, now=self._ctx.monotonic(), delay=wait)
                    continue
                try:
                    await self._poll(tracked, done)
                except JournalError:
                    log.exception("the journal could not record item %s", tracked.item_id)
                    self._ctx.control.stop_now(StopReason.DISK)
                except LeaseLost as exc:  # taken for dead: another worker polls it now
                    log.warning("%s", exc)
                    self._queue.forget(tracked)  # (not in flight here any more: the planner's budget)
                    if tracked.slot.held:
                        tracked.slot.release()
                except TransitionRefused as exc:
                    log.error("%s", exc)
                    self._ctx.control.stop_now(StopReason.INTERNAL)

    async def _poll(self, tracked: Tracked, done: ObjectSendStream[Resolved]) -> None:
        ctx = self._ctx
        started = ctx.monotonic()
        await self._budget.acquire()
        ctx.control.waited_for("polls", ctx.monotonic() - started)  # the summary's "held back by"
        ctx.ledger.polls += 1
        try:
            prediction = await ctx.client.poll(tracked.prediction_id)
        except SlowDown as exc:
            ctx.ledger.saw_rate_limit()
            await self._again(tracked, self._budget.on_rate_limited(exc.retry_after))
        except RetryLater as exc:
            await self._trouble(tracked, exc)
        except StopSubmitting as exc:
            # The prediction is paid for: never fail it. It stays "submitted"; the next run polls it.
            ctx.control.stop_submitting(StopReason.BALANCE)
            log.error("%s; item %s is left to the next run to poll", exc.message, tracked.item_id)
            self._queue.forget(tracked)
            tracked.slot.release()
        except ItemRejected as exc:
            await self._fail(tracked, ItemError(exc.kind, exc.message, exc.status))
        except StopRun as exc:
            log.error("%s", exc.message)
            ctx.control.stop_now(StopReason.AUTH)
        else:
            self._budget.on_success()  # the next 429 starts the backoff afresh
            await self._resolve(tracked, prediction, done)

    async def _resolve(
        self, tracked: Tracked, prediction: Prediction, done: ObjectSendStream[Resolved]
    ) -> None:
        where = phase(prediction.status)
        age = self._ctx.clock() - tracked.submitted_at
        if where is Phase.PENDING:
            polls = tracked.polls + 1
            seen = dataclasses.replace(tracked, polls=polls, errors=0, running_at=age)
            self._queue.planner.running(tracked.prediction_id, age)
            await self._again(seen, self._queue.wait(seen, age=age))
            return
        if where is Phase.FAILED:
            message = prediction.error or f"the prediction ended as {prediction.status!r}"
            await self._fail(tracked, ItemError(ErrorKind.INFERENCE_FAILED, message))
            return
        # Done somewhere between the last "still running" answer and now: the planner needs both ends.
        self._queue.planner.observe(
            age, not_done_at=tracked.running_at, polls=tracked.polls + 1, key=tracked.prediction_id
        )
        self._queue.forget(tracked)
        tracked.slot.resolve()
        await done.send(Resolved(tracked.item_id, prediction))

    async def _trouble(self, tracked: Tracked, exc: RetryLater) -> None:
        errors = tracked.errors + 1
        if errors >= self._ctx.retry.attempts:
            message = f"polling failed {errors} times in a row: {exc.message}"
            await self._fail(tracked, ItemError(exc.kind, message, exc.status))
            return
        await self._again(dataclasses.replace(tracked, errors=errors), self._ctx.backoff(errors))

    async def _again(self, tracked: Tracked, delay: float) -> None:
        """Poll again after ``delay``; past the deadline, time the item out instead.

        Checked after a poll, never before one: a paid prediction fails as timeout only once a poll after
        its deadline found it unfinished (a run resumed the next night may find it long completed).
        """
        if self._ctx.clock() <= tracked.deadline:
            self._queue.later(tracked, now=self._ctx.monotonic(), delay=delay)
            return
        message = f"no result within the {tracked.deadline - tracked.submitted_at:.0f} s timeout"
        await self._fail(tracked, ItemError(ErrorKind.TIMEOUT, message))

    async def _fail(self, tracked: Tracked, error: ItemError) -> None:
        self._queue.forget(tracked)
        tracked.slot.resolve()
        await self._ctx.ledger.fail(tracked.item_id, error, prediction_id=tracked.prediction_id)
