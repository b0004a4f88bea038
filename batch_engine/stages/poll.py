"""The poll stage: resolves predictions by due time, within the poll budget, until done, failed or late."""

from __future__ import annotations

import dataclasses
import logging
import random
import time
from collections.abc import Callable

import anyio
from anyio.abc import ObjectSendStream

from batch_engine.api.client import ApiClient
from batch_engine.api.envelope import Phase, phase
from batch_engine.control import RunControl
from batch_engine.errors import ItemRejected, JournalError, RetryLater, SlowDown, StopRun, StopSubmitting
from batch_engine.ledger import Ledger
from batch_engine.timing.backoff import DEFAULT_POLICY, RetryPolicy, full_jitter
from batch_engine.timing.due_queue import DueQueue
from batch_engine.timing.pacing import PollBudget
from batch_engine.timing.poll_plan import PollPlanner
from batch_engine.values import ErrorKind, ItemError, Prediction, Resolved, Tracked

log = logging.getLogger(__name__)


class Poller:
    """One of a pool of workers; all share one due queue, one poll budget and one planner."""

    def __init__(
        self,
        *,
        client: ApiClient,
        ledger: Ledger,
        control: RunControl,
        budget: PollBudget,
        planner: PollPlanner,
        due: DueQueue[Tracked],
        retry: RetryPolicy = DEFAULT_POLICY,
        rand: Callable[[], float] = random.random,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._client = client
        self._ledger = ledger
        self._control = control
        self._budget = budget
        self._planner = planner
        self._due = due
        self._retry = retry
        self._rand = rand
        self._clock = clock
        self._monotonic = monotonic

    async def run(self, done: ObjectSendStream[Resolved]) -> None:
        async with done:
            while True:
                try:
                    tracked = await self._due.pop()
                except anyio.EndOfStream:
                    return
                try:
                    await self._poll(tracked, done)
                except JournalError:
                    log.exception("the journal could not record item %s", tracked.item_id)
                    self._control.stop_now("disk")

    async def _poll(self, tracked: Tracked, done: ObjectSendStream[Resolved]) -> None:
        await self._budget.acquire()
        self._ledger.polls += 1
        try:
            prediction = await self._client.poll(tracked.prediction_id)
        except SlowDown as exc:
            self._ledger.saw_rate_limit()
            await self._again(tracked, self._budget.on_rate_limited(exc.retry_after))
        except RetryLater as exc:
            await self._trouble(tracked, exc)
        except StopSubmitting as exc:
            # The prediction is paid for: never fail it. It stays "submitted"; the next run polls it.
            self._control.stop_submitting("balance")
            log.error("%s; item %s is left to the next run to poll", exc.message, tracked.item_id)
            self._control.give_slot()
        except ItemRejected as exc:
            await self._fail(tracked, ItemError(exc.kind, exc.message, exc.status))
        except StopRun as exc:
            log.error("%s", exc.message)
            self._control.stop_now("auth")
        else:
            self._budget.on_success()  # the next 429 starts the backoff afresh
            await self._resolve(tracked, prediction, done)

    async def _resolve(
        self, tracked: Tracked, prediction: Prediction, done: ObjectSendStream[Resolved]
    ) -> None:
        where = phase(prediction.status)
        age = self._clock() - tracked.submitted_at
        if where is Phase.PENDING:
            polls = tracked.polls + 1
            seen = dataclasses.replace(tracked, polls=polls, errors=0, running_at=age)
            await self._again(seen, self._planner.next_delay(polls))
            return
        if where is Phase.FAILED:
            message = prediction.error or f"the prediction ended as {prediction.status!r}"
            await self._fail(tracked, ItemError(ErrorKind.INFERENCE_FAILED, message))
            return
        # Done somewhere between the last "still running" answer and now: the planner needs both ends.
        self._planner.observe(age, not_done_at=tracked.running_at)
        self._ledger.resolved += 1
        self._control.give_slot()
        await done.send(Resolved(tracked.item_id, prediction))

    async def _trouble(self, tracked: Tracked, exc: RetryLater) -> None:
        errors = tracked.errors + 1
        if errors >= self._retry.attempts:
            message = f"polling failed {errors} times in a row: {exc.message}"
            await self._fail(tracked, ItemError(exc.kind, message, exc.status))
            return
        delay = full_jitter(
            errors, initial=self._retry.initial, maximum=self._retry.maximum, rand=self._rand()
        )
        await self._again(dataclasses.replace(tracked, errors=errors), delay)

    async def _again(self, tracked: Tracked, delay: float) -> None:
        """Poll again after ``delay``; past the deadline, time the item out instead.

        Checked after a poll, never before one: a paid prediction fails as timeout only once a poll after
        its deadline found it unfinished (a run resumed the next night may find it long completed).
        """
        if self._clock() <= tracked.deadline:
            self._later(tracked, delay)
            return
        message = f"no result within the {tracked.deadline - tracked.submitted_at:.0f} s timeout"
        await self._fail(tracked, ItemError(ErrorKind.TIMEOUT, message))

    def _later(self, tracked: Tracked, delay: float) -> None:
        self._due.push(tracked, self._monotonic() + delay)

    async def _fail(self, tracked: Tracked, error: ItemError) -> None:
        self._ledger.resolved += 1
        self._control.give_slot()
        await self._ledger.fail(tracked.item_id, error, prediction_id=tracked.prediction_id)
