"""The key's one submit schedule, shared by every worker of a run through its PostgreSQL journal.

The rate limit belongs to the API key, not to a worker: four workers each pacing themselves at the key's
rate would send four times too fast, and four at a quarter of it would still bunch up (their slots drift
into each other, and a strict limiter refuses two requests closer than one slot). So in a shared run every
submit, right before its POST, takes the next slot of one schedule kept in the database: a row holding the
next free time (``tat``, the database's clock) and a pause until which no slot is given. One atomic UPDATE
hands out a slot ``1 / rate`` after the previous one, whoever took it; the worker sleeps until it. A 429
seen by any worker pauses every worker; a 429 that makes a worker's pacer cut its rate is published with
the cut rate, and every other worker's pacer adopts it at its next turn (`SubmitPacer.adopt_cut`), so the
workers adapt as one pacer would: one cut per overload, not one per worker. Each then climbs back on its
own accepted submits, and takes its slots at its own rate.

Every call is one short statement on a connection of the gate's own, in a thread (the event loop never
waits on the network), committed without waiting for the disk: a schedule lost in a crash costs nothing.
If the database cannot be reached the gate says so once and lets the worker's own pacing go on; the journal
stops the run soon enough if the database is really gone.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import anyio

from batch_engine.timing.pacing import SubmitPacer

log = logging.getLogger(__name__)

#: A slot ``1 / rate`` after the last one handed out, never before now or the shared pause; returns how
#: long the caller waits for it (by the database's clock, so the workers' clocks never matter).
RESERVE = """UPDATE pacer SET tat = greatest(tat, {now}, paused_until) + 1.0 / %s WHERE id = 1
RETURNING tat - 1.0 / %s - {now}, cuts, cut_rate, greatest(0, paused_until - {now})"""
#: A 429 that cut a worker's rate: every worker pauses, and adopts the cut rate at its next turn.
CUT = """UPDATE pacer SET paused_until = greatest(paused_until, {now} + %s), tat = greatest(tat, {now} + %s),
cuts = cuts + 1, cut_rate = %s WHERE id = 1 RETURNING cuts"""
#: One that did not (it answered a request sent before the pause): the pause grows if it asks for longer.
PAUSE = """UPDATE pacer SET paused_until = greatest(paused_until, {now} + %s),
tat = greatest(tat, {now} + %s) WHERE id = 1 RETURNING cuts"""


class SharedGate:
    """The run's submit schedule: ``await gate.turn(pacer)`` before each submit, ``await
    gate.rate_limited(...)`` after a 429."""

    def __init__(self, connect: Callable[[], Any], *, now_sql: str) -> None:
        self._connect = connect  #: opens the gate's connection (in the gate's thread)
        self._conn: Any = None
        self._lock = threading.Lock()  #: one statement at a time on the connection
        self._limiter = anyio.CapacityLimiter(1)
        self._reserve = RESERVE.format(now=now_sql)
        self._cut = CUT.format(now=now_sql)
        self._pause = PAUSE.format(now=now_sql)
        self._cuts_seen = 0  #: the schedule's cuts this worker has adopted (or made)
        self._warned = False
        self.turns = 0  #: slots taken
        self.waited = 0.0  #: seconds spent waiting for them

    async def turn(self, pacer: SubmitPacer) -> None:
        """Wait for this worker's next slot of the shared schedule at ``pacer``'s rate, after adopting the
        cuts other workers made since the last turn."""
        rate = pacer.rate
        row = await anyio.to_thread.run_sync(self._call, self._reserve, (rate, rate), limiter=self._limiter)
        if row is None:
            return
        delay, cuts, cut_rate, paused_for = row
        if cuts > self._cuts_seen:
            self._cuts_seen = int(cuts)
            pacer.adopt_cut(float(cut_rate), float(paused_for))
        self.turns += 1
        if delay > 0:
            self.waited += float(delay)
            await anyio.sleep(float(delay))

    async def rate_limited(self, pacer: SubmitPacer, rate_before: float, pause: float) -> None:
        """A 429 this worker's ``pacer`` has just taken (its rate was ``rate_before``): every worker pauses
        for ``pause`` seconds; if the pacer cut its rate, the others adopt the cut."""
        if pause <= 0:
            return
        cut = pacer.rate < rate_before
        sql, params = (self._cut, (pause, pause, pacer.rate)) if cut else (self._pause, (pause, pause))
        row = await anyio.to_thread.run_sync(self._call, sql, params, limiter=self._limiter)
        if row is not None and cut:
            self._cuts_seen = max(self._cuts_seen, int(row[0]))

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def _call(self, sql: str, params: tuple[float, ...]) -> tuple[Any, ...] | None:
        with self._lock:
            try:
                if self._conn is None:
                    self._conn = self._connect()
                row = self._conn.execute(sql, params).fetchone()
            except Exception as exc:  # the database is unreachable: pace alone meanwhile
                self._drop()
                if not self._warned:
                    self._warned = True
                    log.warning("the shared submit schedule is unreachable (%s); pacing alone meanwhile", exc)
                return None
            self._warned = False
            return None if row is None else tuple(row)

    def _drop(self) -> None:
        try:
            if self._conn is not None:
                self._conn.close()
        except Exception:
            log.debug("closing the schedule's connection failed", exc_info=True)
        self._conn = None
