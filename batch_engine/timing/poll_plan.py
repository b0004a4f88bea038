"""When to poll each prediction: first near its expected completion, learned from this run, then a cadence."""

from __future__ import annotations

import math
from typing import TypeVar

T = TypeVar("T")

DEFAULT_GROWTH = 1.5
DEFAULT_QUANTILE = 0.4  #: aim the first poll where this share of predictions is already done
DEFAULT_WARMUP = 8  #: observations before the learned first delay replaces the prior
DEFAULT_MIN_FIRST = 1.0  #: seconds: the learned first delay never goes below this, or the start if lower
_TINY_FIRST = 1e-3  #: the floor for a start of 0 (log space needs one)
_STEP_MIN = 0.05  #: the smallest learning step, in log-seconds, so the estimate keeps tracking drift
_FORGET = 1 / 128  #: per observation, how fast a first delay no longer in use is forgotten
_DRIFT = 0.1  #: how far the estimate may have moved since an observed prediction's first poll was planned


class PollPlanner:
    """When to poll a prediction: first near its expected completion (learned), then a cadence that
    grows to a cap.

    The first delay aims at the ``quantile`` of completion times: with 0.4, about 40% of predictions
    are done at their first poll, and the rest are caught by the cadence that follows, soon after.

    Why not a quantile of the observed durations: an observed duration is the time of the poll that
    saw the prediction done, an upper bound of its real completion. A quantile of upper bounds only
    ratchets up: whenever the first delay grows, every early finisher then reports that larger delay.
    Instead the estimate is a stochastic-approximation quantile (Robbins & Monro 1951; the same
    one-number update as "frugal streaming", Ma, Muthukrishnan & Sandler 2013): each observation asks
    only "was it done by the current estimate t?" and moves log(t) by ``step * (quantile - done)``.
    That question is what the polls do answer: done at its first poll (at about t) means yes; still
    running at a poll at or after t (``not_done_at``) means no. Between the two bounds it counts as the
    share of its censoring interval that lies before t. The fixed point is P(done by t) = quantile, up
    or down, and the memory is one number. A caller that does not say when the prediction was last
    seen running gets a guess from the cadence (see :meth:`observe`).
    """

    __slots__ = (
        "_growth",
        "_interval",
        "_interval_max",
        "_log_estimate",
        "_log_floor",
        "_quantile",
        "_recent_first",
        "_start",
        "observed",
    )

    observed: int  #: completions observed so far

    def __init__(
        self,
        *,
        poll_after: float | None,
        prior: float,
        interval: float,
        interval_max: float,
        growth: float = DEFAULT_GROWTH,
        quantile: float = DEFAULT_QUANTILE,
    ) -> None:
        for name, value in (("prior", prior), ("interval", interval), ("interval_max", interval_max)):
            _check_positive(name, value)
        if poll_after is not None and not (math.isfinite(poll_after) and poll_after >= 0):
            raise ValueError(f"poll_after must be None or a finite number >= 0, got {poll_after!r}")
        if interval_max < interval:
            raise ValueError(f"interval_max ({interval_max}) must be at least interval ({interval})")
        if not (math.isfinite(growth) and growth >= 1.0):
            raise ValueError(f"growth must be a finite number >= 1, got {growth!r}")
        if not 0.0 < quantile < 1.0:
            raise ValueError(f"quantile must be between 0 and 1, got {quantile!r}")
        #: where learning starts: the user's poll_after, else the model's prior (the issue: "learned from the
        #: predictions that already finished in this run, starting from --poll-after")
        self._start = poll_after if poll_after is not None else prior
        self._interval, self._interval_max, self._growth = interval, interval_max, growth
        self._quantile = quantile
        # A user who asks for a first poll sooner than the floor gets it: the floor follows the start.
        self._log_floor = math.log(max(_TINY_FIRST, min(DEFAULT_MIN_FIRST, self._start)))
        self._log_estimate = max(math.log(max(self._start, _TINY_FIRST)), self._log_floor)
        self._recent_first = self._start  #: a decaying maximum of the first delays in use lately
        self.observed = 0

    @property
    def estimate(self) -> float:
        """The learned first delay: about ``quantile`` of predictions are done by then."""
        return math.exp(self._log_estimate)

    def first_delay(self) -> float:
        """Submit to first poll, in seconds: the start (poll_after, else the prior), later the estimate."""
        return self._start if self.observed < DEFAULT_WARMUP else self.estimate

    def next_delay(self, polls_done: int) -> float:
        """Seconds after poll number ``polls_done`` (1-based) until the next: interval * growth**k, capped."""
        k = max(0, polls_done - 1)
        room = math.log(self._interval_max / self._interval)
        if k * math.log(self._growth) >= room:  # compared in logs: growth**k may overflow
            return self._interval_max
        return self._interval * self._growth**k

    def observe(self, duration: float, *, not_done_at: float | None = None) -> None:
        """Learn from one prediction's submit-to-detection time ``duration``.

        ``not_done_at``: seconds from submit to the last poll that found it still running; 0.0 when
        its first poll already found it done. Passing it makes the update exact; left out, whether the
        first poll found it done is guessed from ``duration`` (see :meth:`_guess_done`).
        """
        self.observed += 1
        t = self.estimate
        self._recent_first = max(self.first_delay(), self._recent_first * (1.0 - _FORGET))
        if not_done_at is None:
            done = self._guess_done(duration)
        else:
            done = done_by(t, duration=duration, not_done_at=not_done_at)
        step = max(_STEP_MIN, 1.0 / math.sqrt(self.observed))
        self._log_estimate = max(self._log_estimate + step * (self._quantile - done), self._log_floor)

    def _guess_done(self, duration: float) -> float:
        # A prediction caught by a later poll was seen at least ``interval`` after its first poll; so a
        # detection within that (or the estimate's drift) of a first delay in recent use counts as done
        # at its first poll, and a later one as not. In simulation this lands within ~8% of the exact
        # update; the recent maximum keeps first polls planned at a higher, older estimate (or the
        # prior) from being misread as misses, which would ratchet the estimate up.
        first = max(self.estimate, self._recent_first)
        return 1.0 if duration <= first + max(self._interval, _DRIFT * first) else 0.0

    def __repr__(self) -> str:
        return (
            f"<PollPlanner first={self.first_delay():.3g}s estimate={self.estimate:.3g}s"
            f" observed={self.observed} start={self._start:g}s"
            f" interval={self._interval:g}..{self._interval_max:g}s x{self._growth:g}>"
        )


def done_by(t: float, *, duration: float, not_done_at: float) -> float:
    """How surely a prediction seen done at ``duration`` and running at ``not_done_at`` was done by ``t``.

    1 or 0 when the polls decide it; otherwise the share of its interval (last running, seen done]
    that lies before ``t``, i.e. a uniform guess within the interval.
    """
    if duration <= t:
        return 1.0
    if not_done_at >= t:
        return 0.0
    return (t - not_done_at) / (duration - not_done_at)


def _check_positive(name: str, value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
