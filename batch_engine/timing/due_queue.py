"""A queue of predictions by the time their next poll is due: one heap, not thousands of sleeping tasks."""

from __future__ import annotations

import heapq
import itertools
import time
from collections.abc import Callable
from typing import Generic, TypeVar

import anyio

T = TypeVar("T")


class DueQueue(Generic[T]):
    """Predictions waiting for their next poll, ordered by due time.

    Thousands in flight cost one heap, not thousands of sleeping tasks. Any number of consumer tasks
    may wait in :meth:`pop` at once; a pop cancelled while waiting loses no item. ``clock`` decides
    when an item is due and must tick in the event loop's seconds (``time.monotonic`` does, on asyncio).
    """

    __slots__ = ("_clock", "_closed", "_counter", "_heap", "_wakeup")

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        # Invariant: a min-heap of (due, order, item); ``order`` keeps equal due times first-in first-out
        # and spares items from ever being compared.
        self._heap: list[tuple[float, int, T]] = []
        self._counter = itertools.count()
        self._wakeup: anyio.Event | None = None  #: set to wake every waiting pop; None when no one waits
        self._closed = False

    def push(self, item: T, due: float) -> None:
        """Queue ``item`` for clock time ``due``; wakes waiting pops if it is now the earliest."""
        if self._closed:
            raise anyio.ClosedResourceError
        order = next(self._counter)
        heapq.heappush(self._heap, (due, order, item))
        if self._heap[0][1] == order:
            self._wake()

    async def pop(self) -> T:
        """Wait until the earliest item is due and return it; once closed and empty, raise EndOfStream."""
        while True:
            if self._heap and self._heap[0][0] <= self._clock():
                return heapq.heappop(self._heap)[2]  # no await between the check and the pop
            if self._closed and not self._heap:
                raise anyio.EndOfStream
            await self._wait_for_change()

    async def _wait_for_change(self) -> None:
        if self._wakeup is None:
            self._wakeup = anyio.Event()
        wakeup = self._wakeup
        timeout = self._heap[0][0] - self._clock() if self._heap else None
        with anyio.move_on_after(timeout):
            await wakeup.wait()

    def _wake(self) -> None:
        if self._wakeup is not None:
            self._wakeup.set()
            self._wakeup = None

    def close(self) -> None:
        """No more pushes: waiting pops wake, drain what is left when due, then raise EndOfStream."""
        self._closed = True
        self._wake()

    @property
    def next_due(self) -> float | None:
        """Clock time of the earliest item, or None when empty."""
        return self._heap[0][0] if self._heap else None

    def __len__(self) -> int:
        return len(self._heap)

    def __repr__(self) -> str:
        due = f"{self._heap[0][0] - self._clock():.3f}s" if self._heap else "none"
        state = "closed" if self._closed else "open"
        return f"<DueQueue {state} items={len(self._heap)} next_due_in={due}>"
