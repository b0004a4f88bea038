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
# every 429 costing a whole Retry-After of silence, the probing itself is the main loss. So the pacer
# searches for the limit between two remembered rates, the way bisection does: ``known_bad``, the rate
# at the last 429 (CUBIC's W_max: Ha, Rhee, Xu, "CUBIC: A New TCP-Friendly High-Speed TCP Variant",
# 2008; RFC 9438), and ``known_good``, the highest rate PROVE submits in a row were accepted at. A 429
# above a rate proven good cuts the rate, but not below that one (going back to it costs no further
# 429); PROVE clean submits at a rate prove it and, while it is more than SETTLE below the rate
# that was refused, move it halfway there. Once within SETTLE it holds, and probes above only slowly.
# The cut itself is sized from how soon the 429 came, in the spirit of BBR's use of delivery
# measurements (Cardwell et al., "BBR: Congestion-Based Congestion Control", ACM Queue 2016): sending
# at r above a limit R with burst b, a bucket that was drained by the pause refuses after about
# k = 1 + (b - 1) / (1 - R / r) accepted submits, so R ≈ r * (1 - (b - 1) / (k - 1)). With b = 2 that
# is 1 - 1 / (k - 1): a 429 after 2 clean submits means "far too fast", after 20 "a little too fast".
# That estimate holds only behind a limiter with a burst, refilled by the pause: then the top of the
# range it gives is remembered as known_bad and the search is over at once. Against a limiter with no
# burst any rate above it is refused at once, k = 1: the cuts halve, and the bisection finds the limit
# from below. There a 429 after a run of clean submits (or one at a proven rate) is the jitter of the
# request's way to the limiter: one in ISOLATED submits does not cut, more cut gently.
CUT_MIN = 0.5  #: deepest multiplicative cut (a 429 almost at once: the rate was far too high)
CUT_MAX = 0.97  #: gentlest cut
ESTIMATE_MARGIN = 0.98  #: the limit estimated from a 429 is taken this much lower (k counts whole submits)
PROVE = 20  #: clean submits in a row at one rate that prove it good, at the least
# ... and more the nearer the rate is to the refused one: a bucket with burst b passes a rate (1 + e)
# times its limit for about (b - 1) / e submits before refusing, so a short run of clean submits just
# under known_bad proves little. PROOF_SPAN / (1 - rate / known_bad) submits tell apart bursts up to 4.
PROOF_SPAN = 3.0
SETTLE = 0.92  #: a proven rate within this fraction of known_bad holds there: the search is over
SETTLE_BURSTLESS = 0.95  #: ... behind a limiter with no burst (its 429s cost a short pause, no Retry-After)
JITTER_RUN = 4  #: behind a limiter with no burst, a 429 after this many clean submits is read as jitter
ISOLATED = 40  #: a jitter 429 after this many clean submits does not cut the rate (a share <= 2.5%)
HOLD_PAUSES = 60.0  #: hold for this many times the last pause before probing above the settled rate
HOLD_SUBMITS = 50  #: ... and for at least this many clean submits
PROBE = 0.002  #: once held, each clean submit adds this fraction of known_bad (additive)
# A 429 without Retry-After says only "too soon". Against a strict limiter (nginx limit_req with no
# burst) that means one request came a little under the interval early, and a pause of the configured
# initial range (1 s) would cost twenty slots at 20/s for a refusal that a slot's wait cures. So the
# first pause of a streak spans at most PAUSE_SLOTS slots of the cut rate; it doubles with each 429 in
# a row (a quota window that is really exhausted still gets the long pauses after a few tries).
PAUSE_SLOTS = 4.0
CATCH_UP = 0.04  #: of an interval: lateness of a send that the next send makes up (see send_turn)


def cut_factor(clean: int) -> float:
    """The multiplicative cut after a 429 that followed ``clean`` accepted submits (see the note above)."""
    if clean < 2:
        return CUT_MIN
    return min(CUT_MAX, max(CUT_MIN, ESTIMATE_MARGIN * (1.0 - 1.0 / (clean - 1))))


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


class SubmitPacer:
    """Even spacing at the current rate, adaptive (AIMD-like) on 429, a shared pause for all submitters.

    One pacer is shared by every submitter task. :meth:`reserve` is the pure half of :meth:`acquire`:
    it claims the next slot and returns its time, so a simulation can drive the pacer with no event loop.
    """

    __slots__ = (
        "_acquire_lock",
        "_adapt",
        "_at_rate",
        "_burstless",
        "_ceiling",
        "_clean",
        "_clock",
        "_epoch_started",
        "_floor",
        "_generation",
        "_hold",
        "_known_bad",
        "_known_good",
        "_last_sent",
        "_max_pause",
        "_pause_initial",
        "_paused_until",
        "_proving",
        "_rand",
        "_rate",
        "_send_lock",
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
        self._known_good: float | None = None  #: the highest rate proven since (PROVE clean submits)
        self._proving = 0  #: clean submits in a row at the current rate
        self._clean = 0  #: accepted submits since the last cut
        self._at_rate = 0  #: accepted submits since the rate was last set (a probe's steps do not reset it)
        self._burstless = False  #: a 429 was the first or second answer since the last one (or the start)
        self._epoch_started = -math.inf  #: when the last cut happened
        self._hold = 0.0  #: seconds to hold the settled rate after a cut before probing above it
        self._streak = 0  #: cuts in a row with no accepted submit between them
        self._last_sent = -math.inf  #: when the last request passed :meth:`send_turn`
        self._send_lock = anyio.Lock()
        self._acquire_lock = anyio.Lock()
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
        """Wait for any pause, then for this caller's evenly spaced slot.

        Callers queue in order and only the first of them holds a slot (at most one interval away):
        slots booked ahead by every waiting submitter would keep the old spacing for seconds after the
        rate was raised (64 submitters at 12.5/s book five seconds ahead).
        """
        async with self._acquire_lock:
            while True:
                generation = self._generation
                delay = self.reserve() - self._clock()
                if delay > 0:
                    await self._sleep(delay)
                if generation == self._generation:  # else a pause began meanwhile: queue again after it
                    return

    async def send_turn(self) -> float | None:
        """Just before a request goes out: one interval of the current rate since the last one went out.

        :meth:`acquire` spaces the slots; between a slot and its request come the journal's commit of the
        intent and the event loop's other work, whose delays vary by milliseconds and would bunch
        requests together. A limiter with no burst refuses the second of two requests closer than its
        interval, so the spacing is enforced again here, on the times requests actually leave.

        Returns the send time, to hand back with the answer (`on_success`, `on_rate_limited`), or None
        when a pause is in force (it began after this caller's slot): then nothing may be sent, and the
        caller queues again in :meth:`acquire`, which waits the pause out. This never waits for a pause
        itself: the caller has recorded its intent to send, and a pause of up to a minute would hold the
        item as "submitting" (ambiguous if the run stopped meanwhile) for a request never sent.
        """
        async with self._send_lock:
            while True:
                now = self._clock()
                if now < self._paused_until:
                    return None
                slot = self._last_sent + 1.0 / self._rate
                if slot <= now:
                    break
                await self._sleep(slot - now)
            # A wake-up a little late (the event loop's latency) is made up on the next one, or every
            # late wake-up would cost the rate a few percent; one later than that starts afresh. Not
            # behind a limiter with no burst: it counts each interval from the last request's arrival,
            # so a late request earns nothing and the one after it, sent early, is refused.
            now = self._clock()
            catch_up = 0.0 if self._burstless else CATCH_UP / self._rate
            self._last_sent = slot if now - slot <= catch_up else now
            return now

    def give_back_turn(self) -> None:
        """The caller of the last :meth:`acquire` sends nothing after all: its slot goes to the next one."""
        self._tat = max(self._clock(), self._tat - 1.0 / self._rate)

    def on_success(self, sent_at: float | None = None) -> None:
        """A submit was accepted: PROVE of them in a row prove the rate, and move it up (see the note above).

        Successes during a pause, or for requests sent (``sent_at``, from `send_turn`) before the last
        429's pause began, answer requests sent at the rate just cut: they prove nothing about the new
        rate, so they neither count as clean nor raise it.
        """
        if self._clock() < self._paused_until or (sent_at is not None and sent_at < self._epoch_started):
            return
        self._streak = 0
        self._clean += 1
        self._at_rate += 1
        if not self._adapt or self._known_bad is None:
            return
        self._proving += 1
        if self._proving >= self._proof_needed():
            self._proving = 0
            self._known_good = max(self._known_good or 0.0, self._rate)
            if self._rate < self._settle * self._known_bad:  # the search goes on: halfway to the refused rate
                self._set_rate((self._rate + self._known_bad) / 2)
                return
        held = self._clock() - self._epoch_started >= self._hold and self._clean >= HOLD_SUBMITS
        if held and self._rate >= self._settle * self._known_bad:
            self._rate = min(self._ceiling, self._rate + PROBE * self._known_bad)
            self._proving = 0  # a rising rate proves nothing: the settled one stays the rate known good

    @property
    def _settle(self) -> float:
        return SETTLE_BURSTLESS if self._burstless else SETTLE

    def _proof_needed(self) -> float:
        gap = 1.0 - self._rate / self._known_bad if self._known_bad else 1.0
        return PROVE if gap <= 0 else max(PROVE, PROOF_SPAN / gap)

    def _set_rate(self, rate: float) -> None:
        self._rate = min(self._ceiling, max(self._floor, rate))
        self._proving = self._at_rate = 0

    def on_rate_limited(self, retry_after: float | None, sent_at: float | None = None) -> float:
        """A submit got a 429: pause every submitter and, once per pause, cut the rate.

        Returns the pause now in force, in seconds. 429s arriving during a pause, or for requests sent
        (``sent_at``, from `send_turn`) before it began, answer requests sent at the old rate (in flight:
        with pauses of a few slots, many such answers come after the pause is over): they do not cut the
        rate again, and lengthen the pause only when their own Retry-After asks for longer.
        """
        self.rate_limited += 1
        now = self._clock()
        echo = sent_at is not None and sent_at < self._epoch_started
        if now >= self._paused_until and not echo:
            self._start_epoch(now, retry_after)
        elif retry_after is not None:
            self._pause(max(self._paused_until, now + self._pause_for(retry_after)))
        return self._paused_until - now

    def _start_epoch(self, now: float, retry_after: float | None) -> None:
        if self._adapt:
            self._adapt_to_429()
        pause = self._pause_for(retry_after)
        self._streak += 1
        self._clean = 0
        self._epoch_started = now
        self._hold = HOLD_PAUSES * max(pause, self._pause_initial)
        self._pause(now + pause)

    def _adapt_to_429(self) -> None:
        """A fresh 429 at the current rate: cut it, or not (see the note above the constants)."""
        refused, k = self._rate, min(self._clean, self._at_rate)  # clean submits at this rate since the pause
        # A limiter that refuses the second submit after a pause has no burst: above its limit it refuses
        # at once (or, within its jitter of the limit, soon), so a 429 after a run of clean submits
        # there, or one at a rate proven good, is its jitter, not the limit.
        self._burstless = self._burstless or self._clean <= 1
        proven = self._known_good is not None and refused <= self._known_good
        if proven or (self._burstless and k >= JITTER_RUN):
            if self._clean >= ISOLATED:  # one in ISOLATED: pause, but cutting would ratchet down for good
                return
            # Cut gently, and keep searching above unless the refused rate is near the old bound.
            self._known_good = None
            self._known_bad = max(refused, self._settle * (self._known_bad or refused))
            self._set_rate(refused * CUT_MAX)
            return
        factor = cut_factor(k)
        # Within its clamps the factor is an estimate of the limit (see the note above), and the search
        # goes on below it, not below the refused rate; but only where the estimate's premise holds: a
        # limiter with a burst, refilled by the pause, and one rate since (no step of the search). Then
        # k clean submits put the limit between r (1 - 1 / (k - 1)) and r (1 - 1 / k): the top of that
        # is the rate known too fast.
        informed = CUT_MIN < factor < CUT_MAX and not self._burstless and self._at_rate == self._clean
        self._known_bad = refused * (1.0 - 1.0 / k) if informed else refused
        self._set_rate(max(refused * factor, self._known_good or 0.0))

    def _cut_to(self, rate: float) -> None:
        """Another worker's cut to ``rate``: the current rate is remembered as too fast."""
        refused = self._known_bad = self._rate
        if self._known_good is not None and self._known_good >= refused:
            self._known_good = None
        self._set_rate(max(rate, self._known_good or 0.0))

    def _pause_for(self, retry_after: float | None) -> float:
        streak, rand = self._streak, self._rand()
        initial = min(self._pause_initial, PAUSE_SLOTS / self._rate)
        pause = pause_after_429(
            retry_after, streak=streak, max_pause=self._max_pause, rand=rand, initial=initial
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
            self._cut_to(rate)
            self._clean = 0
            self._epoch_started = now
            self._hold = HOLD_PAUSES * max(pause, self._pause_initial)
        if now + pause > self._paused_until:
            self._pause(now + pause)

    def __repr__(self) -> str:
        bad = f"{self._known_bad:.4g}/s" if self._known_bad is not None else "none"
        good = f"{self._known_good:.4g}/s" if self._known_good is not None else "none"
        paused = max(0.0, self._paused_until - self._clock())
        return (
            f"<SubmitPacer rate={self._rate:.4g}/s ceiling={self._ceiling:.4g}/s floor={self._floor:.4g}/s"
            f" adapt={self._adapt} known_bad={bad} known_good={good} clean={self._clean}"
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
