"""Run control shared by the stages: the in-flight cap, why the run is stopping, and how hard."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import anyio

log = logging.getLogger(__name__)

#: Why a run stopped early (``RunStats.stopped_reason``), as the log, the summary and the report say it.
#: Each makes the exit code 3.
STOP_MESSAGES = {
    "auth": "stopped early: API key refused (401) — nothing else can succeed; fix the key and run again",
    "balance": (
        "stopped submitting: balance ran out or no permission (403); run again after a top-up to resume"
    ),
    "interrupted": "stopped early: interrupted; run again with the same out dir to resume",
    "budget": "stopped submitting: the --max-submits budget was reached; run again to submit the rest",
    "disk": "stopped early: an output or the journal could not be written (disk full?); free space and rerun",
}


class RunControl:
    """What every stage may ask: may I still submit? Is the run over? Take or give back an in-flight slot.

    Invariant: ``in_flight`` counts the slots held: predictions submitted (or resumed) and not yet
    resolved, and submits on their way; it never exceeds ``max_in_flight`` because a slot is taken
    before a submit and given back on resolution. ``predictions`` is what a person wants to see: the
    slots held, less those of submitters still waiting for their pacing turn.
    """

    __slots__ = (
        "_critical",
        "_hard_scopes",
        "_slots",
        "in_flight",
        "pacing",
        "reason",
        "settled",
        "submitters_done",
        "submitting_closed",
    )

    def __init__(self, *, max_in_flight: int) -> None:
        self._slots = anyio.Semaphore(max_in_flight)
        self.in_flight = 0  #: slots held
        self.pacing = 0  #: slots held by submitters still waiting for their pacing turn
        self.reason: str | None = None  #: why the run stops early, a key of STOP_MESSAGES
        self.submitting_closed = anyio.Event()  #: set when no new submit may start
        self.submitters_done = anyio.Event()  #: set when the submit stage has ended
        self.settled = anyio.Event()  #: set when submitters are done and nothing is in flight
        self._hard_scopes: list[anyio.CancelScope] = []
        self._critical: set[anyio.CancelScope] = set()

    def __repr__(self) -> str:
        return f"RunControl(in_flight={self.in_flight}, reason={self.reason!r})"

    async def take_slot(self) -> None:
        await self._slots.acquire()
        self.in_flight += 1

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

    def give_slot(self) -> None:
        self.in_flight -= 1
        self._slots.release()
        self._check_settled()

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

    def stop_submitting(self, reason: str) -> None:
        """No new submits; what is in flight is still polled and downloaded."""
        if self.reason is None:
            self.reason = reason
            log.warning("%s", STOP_MESSAGES.get(reason, f"stopped early: {reason}"))
        self.submitting_closed.set()

    def watch(self, scope: anyio.CancelScope) -> None:
        """Register a scope that `stop_now` cancels (the engine's task group)."""
        self._hard_scopes.append(scope)

    def stop_now(self, reason: str) -> None:
        """Stop everything at once; whatever was in flight is resumable from the journal."""
        self.stop_submitting(reason)
        for scope in [*self._hard_scopes, *self._critical]:
            scope.cancel()
