"""Request pacing: the adaptive submit pacer and the separate poll budget.

Submits are spaced by GCRA "virtual scheduling" (https://en.wikipedia.org/wiki/Generic_cell_rate_algorithm,
the scheme of aiometer's rate meter): a theoretical arrival time ``tat`` hands out one slot per
``1 / rate`` seconds, in call order, with no opening burst. The slot arithmetic lives here, not in
aiolimiter, because the rate changes on every answer and time must come from an injected clock;
polls, whose rate is fixed, use ``aiolimiter.AsyncLimiter(1, 1 / poll_rate)`` (PollBudget).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Awaitable, Callable

import anyio
from aiolimiter import AsyncLimiter

from batch_engine.timing.backoff import clamp_retry_after, full_jitter

DEFAULT_MAX_PAUSE = 60.0
DEFAULT_PAUSE_INITIAL = 1.0  #: seconds: the jitter range of the first pause when a 429 has no Retry-After

# The adaptation (see SubmitPacer.on_rate_limited / on_success). Plain AIMD halves on every 429 and
# climbs back linearly past the limit again and again: against a strict limit it averages ~75% and, with
# every 429 costing a whole Retry-After of silence, the probing itself is the main loss. So, like TCP
# CUBIC (Ha, Rhee, Xu, "CUBIC: A New TCP-Friendly High-Speed TCP Variant", 2008; RFC 9438), the pacer
# remembers the rate of the last 429 (``known_bad``, CUBIC's W_max), returns quickly to just below it
# (CUT_MAX * known_bad, a concave approach), holds there, and probes above it only slowly and rarely.
# The cut itself is sized from how soon the 429 came, in the spirit of BBR's use of delivery
# measurements (Cardwell et al., "BBR: Congestion-Based Congestion Control", ACM Queue 2016): sending
# at r above a limit R with burst b, a bucket that was drained by the pause refuses after about
# k = 1 + (b - 1) / (1 - R / r) accepted submits, so R ≈ r * (1 - (b - 1) / (k - 1)). With b = 2 that
# is 1 - 1 / (k - 1): a 429 after 2 clean submits means "far too fast", after 20 "a little too fast".
CUT_MIN = 0.5  #: deepest multiplicative cut (a 429 almost at once: the rate was far too high)
CUT_MAX = 0.93  #: gentlest cut, and the plateau: CUT_MAX * known_bad is where the rate settles
CLIMB = 0.1  #: each clean submit closes this fraction of the gap up to the plateau
SNAP = 0.005  #: ... and the rate jumps onto the plateau once within this fraction of it
HOLD_PAUSES = 60.0  #: hold at the plateau for this many times the last pause before probing above it
HOLD_SUBMITS = 50  #: ... and for at least this many clean submits
PROBE = 0.002  #: above the plateau, each clean submit adds this fraction of known_bad (additive)


def cut_factor(clean: int) -> float:
    """The multiplicative cut after a 429 that followed ``clean`` accepted submits (see the note above)."""
    if clean < 2:
        return CUT_MIN
    return min(CUT_MAX, max(CUT_MIN, 1.0 - 1.0 / (clean - 1)))


def pause_after_429(
    retry_after: float | None,
    *,
    streak: int,
    max_pause: float,
    rand: float,
    initial: float = DEFAULT_PAUSE_INITIAL,
) -> float:
    """A 429's pause: its Retry-After clamped to ``max_pause``, else full jitter growing with ``streak``."""
    if retry_after is not None:
        return clamp_retry_after(retry_after, maximum=max_pause)
    return full_jitter(streak, initial=initial, maximum=max_pause, rand=rand)


def climb(rate: float, plateau: float) -> float:
    """One clean submit's step up toward ``plateau``: fast while far below it, gentle near it."""
    if rate >= plateau:
        return rate
    raised = rate + (plateau - rate) * CLIMB
    return plateau if plateau - raised < SNAP * plateau else raised  # the geometric approach never arrives


class SubmitPacer:
    """Even spacing at the current rate, adaptive (AIMD-like) on 429, a shared pause for all submitters.

    One pacer is shared by every submitter task. :meth:`reserve` is the pure half of :meth:`acquire`:
    it claims the next slot and returns its time, so a simulation can drive the pacer with no event loop.
    """

    __slots__ = (
        "_adapt",
        "_ceiling",
        "_clean",
        "_clock",
        "_epoch_started",
        "_floor",
        "_generation",
        "_hold",
        "_known_bad",
        "_max_pause",
        "_pause_initial",
        "_paused_until",
        "_rand",
        "_rate",
        "_sleep",
        "_streak",
        "_tat",
        "rate_limited",
    )

    rate_limited: int  #: 429s reported, in-flight echoes included

    def __init__(
        self,
        *,
        rate: float,
        rate_min: float,
        adapt: bool = True,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
        rand: Callable[[], float] = random.random,
        max_pause: float = DEFAULT_MAX_PAUSE,
        pause_initial: float = DEFAULT_PAUSE_INITIAL,
    ) -> None:
        _check_positive("rate", rate)
        _check_positive("rate_min", rate_min)
        _check_positive("max_pause", max_pause)
        _check_positive("pause_initial", pause_initial)
        if rate_min > rate:
            raise ValueError(f"rate_min ({rate_min}) must not exceed rate ({rate})")
        self._ceiling = self._rate = float(rate)
        self._floor = float(rate_min)
        self._adapt = adapt
        self._clock, self._sleep, self._rand = clock, sleep, rand
        self._max_pause = max_pause
        self._pause_initial = pause_initial  #: first pause after a 429 without Retry-After (jitter range)
        self._tat = -math.inf  #: the next free slot; invariant: slots before it are handed out
        self._paused_until = -math.inf
        self._generation = 0  #: bumped by each pause: slots handed out before it are void
        self._known_bad: float | None = None  #: the rate in force at the last cutting 429
        self._clean = 0  #: accepted submits since the last cut
        self._epoch_started = -math.inf  #: when the last cut happened
        self._hold = 0.0  #: seconds to stay at the plateau after a cut before probing above it
        self._streak = 0  #: cuts in a row with no accepted submit between them
        self.rate_limited = 0

    @property
    def rate(self) -> float:
        """Submits per second now."""
        return self._rate

    @property
    def ceiling(self) -> float:
        """The configured rate: adaptation never goes above it."""
        return self._ceiling

    @property
    def floor(self) -> float:
        """``rate_min``: adaptation never goes below it."""
        return self._floor

    @property
    def known_bad(self) -> float | None:
        """The rate at which the last cutting 429 came, or None before any."""
        return self._known_bad

    @property
    def paused_until(self) -> float:
        """Clock time before which no submit may start (-inf when never paused)."""
        return self._paused_until

    def reserve(self) -> float:
        """Claim the next slot and return its clock time; the caller must not submit before it."""
        slot = max(self._clock(), self._tat, self._paused_until)
        self._tat = slot + 1.0 / self._rate
        return slot

    async def acquire(self) -> None:
        """Wait for any pause, then for this caller's evenly spaced slot."""
        while True:
            generation = self._generation
            delay = self.reserve() - self._clock()
            if delay > 0:
                await self._sleep(delay)
            if generation == self._generation:  # else a pause began meanwhile: queue again after it
                return

    def on_success(self) -> None:
        """A submit was accepted: after enough of them, raise the rate back toward the ceiling.

        Successes during a pause answer requests sent before it, at the rate just cut: they prove
        nothing about the new rate, so they neither count as clean nor raise it.
        """
        if self._clock() < self._paused_until:
            return
        self._streak = 0
        self._clean += 1
        if self._adapt and self._known_bad is not None:
            self._rate = min(self._ceiling, self._raised(self._known_bad))

    def _raised(self, known_bad: float) -> float:
        plateau = CUT_MAX * known_bad
        if self._rate < plateau:
            return climb(self._rate, plateau)
        held = self._clock() - self._epoch_started >= self._hold and self._clean >= HOLD_SUBMITS
        return self._rate + PROBE * known_bad if held else self._rate

    def on_rate_limited(self, retry_after: float | None) -> float:
        """A submit got a 429: pause every submitter and, once per pause, cut the rate.

        Returns the pause now in force, in seconds. 429s arriving during a pause answer requests sent
        before it (in flight): they do not cut the rate again, and lengthen the pause only when their
        own Retry-After asks for longer.
        """
        self.rate_limited += 1
        now = self._clock()
        if now >= self._paused_until:
            self._start_epoch(now, retry_after)
        elif retry_after is not None:
            self._pause(max(self._paused_until, now + self._pause_for(retry_after)))
        return self._paused_until - now

    def _start_epoch(self, now: float, retry_after: float | None) -> None:
        if self._adapt:
            self._known_bad = self._rate
            self._rate = max(self._floor, self._rate * cut_factor(self._clean))
        pause = self._pause_for(retry_after)
        self._streak += 1
        self._clean = 0
        self._epoch_started = now
        self._hold = HOLD_PAUSES * max(pause, self._pause_initial)
        self._pause(now + pause)

    def _pause_for(self, retry_after: float | None) -> float:
        streak, rand = self._streak, self._rand()
        pause = pause_after_429(
            retry_after, streak=streak, max_pause=self._max_pause, rand=rand, initial=self._pause_initial
        )
        if retry_after is None:  # a guess: make it at least one slot of the new rate
            pause = max(pause, 1.0 / self._rate)
        return pause

    def _pause(self, until: float) -> None:
        self._paused_until = until
        self._tat = until
        self._generation += 1

    def adopt_cut(self, rate: float, pause: float) -> None:
        """Another worker sharing the key cut the rate to ``rate`` and paused for ``pause`` seconds: take
        both as if this pacer had seen the 429 itself (a shared run adapts once, not once per worker), so
        the 429s this worker still gets for requests sent before the pause do not cut again."""
        now = self._clock()
        if self._adapt and rate < self._rate:
            self._known_bad = self._rate
            self._rate = max(self._floor, rate)
            self._clean = 0
            self._epoch_started = now
            self._hold = HOLD_PAUSES * max(pause, self._pause_initial)
        if now + pause > self._paused_until:
            self._pause(now + pause)

    def __repr__(self) -> str:
        bad = f"{self._known_bad:.4g}/s" if self._known_bad is not None else "none"
        paused = max(0.0, self._paused_until - self._clock())
        return (
            f"<SubmitPacer rate={self._rate:.4g}/s ceiling={self._ceiling:.4g}/s floor={self._floor:.4g}/s"
            f" adapt={self._adapt} known_bad={bad} clean={self._clean}"
            f" rate_limited={self.rate_limited} paused={paused:.3f}s>"
        )


class PollBudget:
    """Polls per second, a budget separate from submits (the API counts polls): even spacing, shared pause.

    Spacing is aiolimiter's leaky bucket with capacity 1, which starts empty and so lets the first poll
    through at once and every later one ``1 / rate`` after the previous. Like any AsyncLimiter, a
    budget belongs to one (asyncio) event loop.
    """

    __slots__ = (
        "_clock",
        "_limiter",
        "_max_pause",
        "_pause_initial",
        "_paused_until",
        "_rand",
        "_sleep",
        "_streak",
        "rate_limited",
    )

    rate_limited: int  #: 429s reported on polls

    def __init__(
        self,
        *,
        rate: float,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
        rand: Callable[[], float] = random.random,
        max_pause: float = DEFAULT_MAX_PAUSE,
        pause_initial: float = DEFAULT_PAUSE_INITIAL,
    ) -> None:
        _check_positive("rate", rate)
        _check_positive("max_pause", max_pause)
        _check_positive("pause_initial", pause_initial)
        self._limiter = AsyncLimiter(1, 1.0 / rate)
        self._clock, self._sleep, self._rand = clock, sleep, rand
        self._max_pause = max_pause
        self._pause_initial = pause_initial  #: first pause after a 429 without Retry-After (jitter range)
        self._paused_until = -math.inf
        self._streak = 0  #: pauses in a row with no successful poll between them
        self.rate_limited = 0

    @property
    def rate(self) -> float:
        """Polls per second (the run's ``poll_rate``)."""
        return float(self._limiter.max_rate / self._limiter.time_period)

    @property
    def paused_until(self) -> float:
        """Clock time before which no poll may start (-inf when never paused)."""
        return self._paused_until

    async def acquire(self) -> None:
        """Wait for any pause, then for the next evenly spaced poll slot."""
        while True:
            await self._wait_out_pause()
            await self._limiter.acquire()
            if self._clock() >= self._paused_until:  # else a pause began while queued: queue again
                return

    async def _wait_out_pause(self) -> None:
        while (delay := self._paused_until - self._clock()) > 0:
            await self._sleep(delay)

    def on_success(self) -> None:
        """A poll was answered: the next 429 starts the backoff afresh."""
        self._streak = 0

    def on_rate_limited(self, retry_after: float | None) -> float:
        """A poll got a 429: pause every poller for Retry-After (clamped) or a growing jittered backoff.

        Returns the pause now in force. As for submits, a 429 during a pause answers a poll sent before
        it: it lengthens the pause only by its own Retry-After, and does not grow the backoff.
        """
        self.rate_limited += 1
        now = self._clock()
        fresh = now >= self._paused_until
        if fresh or retry_after is not None:
            self._paused_until = max(self._paused_until, now + self._pause_for(retry_after))
        if fresh:
            self._streak += 1
        return self._paused_until - now

    def _pause_for(self, retry_after: float | None) -> float:
        return pause_after_429(
            retry_after,
            streak=self._streak,
            max_pause=self._max_pause,
            rand=self._rand(),
            initial=self._pause_initial,
        )

    def __repr__(self) -> str:
        paused = max(0.0, self._paused_until - self._clock())
        return (
            f"<PollBudget rate={self.rate:.4g}/s rate_limited={self.rate_limited}"
            f" streak={self._streak} paused={paused:.3f}s>"
        )


def _check_positive(name: str, value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
