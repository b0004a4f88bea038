"""When to poll each prediction: where this run's completion times say completions are.

The planner learns the completion-time distribution of the run itself and places polls on the
efficient frontier of that distribution: a first poll at a learned time, then even steps, the pair
chosen to minimise the detection lag (completion to the poll that sees it done) under a budget of polls
per prediction.

Three sources of completion times:

- **probes**: the first few predictions are polled at geometric times from a small start (a 64th of
  the prior, doubling), so a prior 10x too high costs a few cheap polls, not a minute of waiting;
- **completions**, interval-censored: a prediction seen done at age ``hi`` and last seen running at age
  ``lo`` finished somewhere in ``(lo, hi]``. A quantile of the ``hi`` alone only ratchets up (whenever the
  first poll grows, every early finisher reports that later time), so the fit uses the intervals;
- **sync answers**: a submit that comes back already finished is an (almost exact) free sample;
- **the running ones**, right-censored, while the run is young (``CENSORED_UNTIL`` completions): a
  prediction last seen running at age ``a`` finishes after ``a``. Without them the first completions
  (the quickest predictions) say the model is faster than it is, the first schedules are too dense, and
  the predictions after them are starved to pay the polls back. (They still bias the fit after that:
  in a replay of the bench's pattern at sigma 0.4, the fit said 0.35-0.36 from the 64th to the 200th
  completion, 0.385-0.39 with the running ones counted until 512; counting them that long is left
  undone: it also changed how the auto in-flight cap met an API's concurrency limit, not yet understood.)

Before any prediction finished, a prediction that is not a probe is not polled at an age the probes
were already seen running at (`PollPlanner._blind`): with a prior far too low, the first wave would
otherwise spend a poll at every doubling.

The fit is a lognormal by maximum likelihood over the censoring intervals (EM on the log times: each
interval's conditional mean and variance under the current fit, then the moments). Completion times
of image models are close to lognormal; the fit needs two numbers and a few observations.

A prediction is woken (a heap entry, no request) at times the planner picks, and only polled when its
planned poll is due: a prediction scheduled on the prior before anything was learned moves to the learned
schedule at its next wake.
"""

from __future__ import annotations

import functools
import math
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from statistics import NormalDist

DEFAULT_GROWTH = 1.5  #: the cadence after a user's first poll (--poll-after): interval * growth**k, capped
DEFAULT_BUDGET = 2.7  #: target polls per prediction over the run (probes and the first wave included)
BUDGET_GAIN = 1.5  #: how hard the schedule makes up for polls spent over the budget (see `budget_now`)
BUDGET_AFTER = 64  #: completions before `budget_now` looks at what was spent (the first are probes, quick)
PROBES = 8  #: predictions polled at geometric times from a small start, before anything is learned
PROBE_DIVISOR = 64.0  #: the probes start at the prior / this
PROBE_GROWTH = 2.0  #: each probe poll comes this many times later than the last
BLIND_GROWTH = 2.0  #: before learning, a prediction still running at its prior is polled at ages x this
# Past the fitted p99 a prediction is a straggler (or stuck): the even steps that suit the body of the
# distribution would poll it every step for as long as it runs (a stuck edit at 10x the median: 56
# polls). There the polls spread out geometrically instead, each TAIL_GROWTH times the age of the last.
TAIL_Z = 2.326  #: the standard normal's 99th percentile
TAIL_GROWTH = 1.25
HOLD_LIMIT = 16.0  #: before learning, a prediction is held back (see `_blind`) up to this times the prior
WAKE_GROWTH = 1.25  #: a waiting prediction is woken (no request) at least this often, in age ratio
#: completions before the fit replaces the prior; one is enough when the fit also has predictions seen
#: running (``MIN_KNOWN`` in all): the probes still running bound it from above
MIN_LEARNED = 3
MIN_KNOWN = 4
WINDOW = 512  #: the completions the fit remembers (the newest)
REFIT_EVERY = 8  #: past 4 * this many completions, the fit is redone every this many
#: ... or every this share of the completions seen, when more: a refit costs O(WINDOW) on the event loop
#: (every 8 of 4,000 completions was 1 ms of CPU per item), and a long run's fit moves little
REFIT_SHARE = 16
CENSORED_UNTIL = 64  #: completions until which predictions still running count in the fit (right-censored)
CENSORED_BINS = 32  #: the running ones enter the fit as this many weighted ages at most (the fit stays cheap)
_SIGMA_MIN, _SIGMA_MAX = 0.1, 1.5  #: the fitted spread (log seconds) is kept within these
_SIGMA_FEW = 0.5  #: with few completions the spread is taken at least this (a narrow fit of 3 is luck)
_TINY = 1e-3  #: seconds: the smallest time anything is planned at
_NORMAL = NormalDist()
_SQRT2 = math.sqrt(2.0)  #: as `NormalDist.cdf` divides by it (sigma 1)
_SQRT_TAU = math.sqrt(math.tau)  #: as `NormalDist.pdf` divides by it (sigma 1)


@dataclass(frozen=True, slots=True)
class Schedule:
    """A fixed schedule in units of the median completion time M: first poll at ``first`` M, then every
    ``step`` M; with what it costs (mean polls) and gives (detection lag quantiles, in M)."""

    first: float
    step: float
    polls: float
    lag_p50: float
    lag_p90: float


class PollPlanner:
    """When to poll each prediction: probes first, then the schedule the learned distribution calls for.

    ``poll_after`` (the user's --poll-after) fixes the first poll; ``fixed_steps`` (the user set
    --poll-interval) keeps the cadence ``interval * growth**k`` capped at ``interval_max`` for later polls.
    Left to the planner, both are learned.
    """

    __slots__ = (
        "_budget",
        "_fit",
        "_fixed_first",
        "_fixed_steps",
        "_growth",
        "_interval",
        "_interval_max",
        "_intervals",
        "_live",
        "_live_polls",
        "_prior",
        "_running",
        "_running_max",
        "_since_fit",
        "_spent",
        "_spent_count",
        "_tracked",
        "observed",
    )

    observed: int  #: completions (and sync samples) observed so far

    def __init__(
        self,
        *,
        poll_after: float | None,
        prior: float,
        interval: float,
        interval_max: float,
        growth: float = DEFAULT_GROWTH,
        fixed_steps: bool = False,
        budget: float = DEFAULT_BUDGET,
    ) -> None:
        for name, value in (("prior", prior), ("interval", interval), ("interval_max", interval_max)):
            _check_positive(name, value)
        if poll_after is not None and not (math.isfinite(poll_after) and poll_after >= 0):
            raise ValueError(f"poll_after must be None or a finite number >= 0, got {poll_after!r}")
        if interval_max < interval:
            raise ValueError(f"interval_max ({interval_max}) must be at least interval ({interval})")
        if not (math.isfinite(growth) and growth >= 1.0):
            raise ValueError(f"growth must be a finite number >= 1, got {growth!r}")
        if not (math.isfinite(budget) and budget >= 1.0):
            raise ValueError(f"budget must be a finite number >= 1, got {budget!r}")
        self._fixed_first = poll_after
        self._fixed_steps = fixed_steps
        self._prior = prior
        self._interval, self._interval_max, self._growth = interval, interval_max, growth
        self._budget = budget
        self._intervals: deque[tuple[float, float]] = deque(maxlen=WINDOW)
        self._fit: tuple[float, float] | None = None  #: (mu, sigma) of log seconds
        self._since_fit = 0
        self._spent = 0  #: polls the observed predictions took, all told
        self._spent_count = 0  #: predictions whose polls were told
        self._tracked = 0
        #: prediction id -> age it was last seen running at, while the fit still counts the running ones
        self._running: dict[str, float] = {}
        #: prediction id -> polls that found it running, for every prediction in flight (the budget's count)
        self._live: dict[str, int] = {}
        self._live_polls = 0  #: their sum
        self._running_max = 0.0  #: the oldest age any prediction was seen running at
        self.observed = 0

    # --- what the poll stage asks -------------------------------------------------------------------

    def track(self) -> bool:
        """A prediction was just accepted: True if it is one of the probes (polled early, geometrically)."""
        self._tracked += 1
        return self._fixed_first is None and self._fit is None and self._tracked <= PROBES

    def next_poll(self, *, polls: int, running_at: float, probe: bool = False) -> float:
        """The age (seconds since submit) at which a prediction should next be polled.

        ``polls``: polls so far that found it running; ``running_at``: the age of the last of them.
        """
        if polls == 0:
            return self._blind(self._first(probe), probe)
        if self._fixed_steps or (self._fixed_first is not None and self._fit is None):
            return running_at + self.next_delay(polls)
        if self._fit is None:
            growth = PROBE_GROWTH if probe else BLIND_GROWTH
            return self._blind(max(running_at * growth, running_at + _TINY), probe)
        first, step = self._learned_schedule()
        mu, sigma = self._fit
        if running_at >= math.exp(mu + TAIL_Z * sigma):  # past the fitted tail: a straggler, or stuck
            return max(running_at * TAIL_GROWTH, running_at + step)
        if running_at < first:  # (a poll just before a first poll that has since moved a little later:
            return max(first, running_at + 0.5 * step)  # not polled again at once)
        # the small slack: a poll made at first + k * step (rounded) must count as poll k, not k - 1
        k = math.floor((running_at - first) / step + 1e-6) + 1
        return max(first + k * step, running_at + 0.5 * step)

    def wake_in(self, *, age: float, polls: int, running_at: float, probe: bool = False) -> float:
        """Seconds until this prediction should be looked at again; 0.0: poll it now.

        A look that is not a poll costs nothing but a heap entry; before anything is learned, waking at
        least every ``WAKE_GROWTH`` in age (and every probe start) lets a prediction planned on the prior
        move to the learned schedule soon after it exists. Once learned, it is woken when its poll is due.
        """
        due = self.next_poll(polls=polls, running_at=running_at, probe=probe)
        if due - age <= 1e-6:  # due (a microsecond short of it is no reason to look again)
            return 0.0
        if self._fit is not None and self.observed >= 4 * REFIT_EVERY:  # the schedule moves little now
            return due - age
        scale = self._prior if self._fit is None else math.exp(self._fit[0])
        return min(due - age, max(age * (WAKE_GROWTH - 1.0), scale / PROBE_DIVISOR))

    def next_delay(self, polls_done: int) -> float:
        """The user's cadence: seconds after poll ``polls_done`` (1-based): interval * growth**k, capped."""
        k = max(0, polls_done - 1)
        room = math.log(self._interval_max / self._interval)
        if k * math.log(self._growth) >= room:  # compared in logs: growth**k may overflow
            return self._interval_max
        return self._interval * self._growth**k

    # --- what the poll and submit stages tell -------------------------------------------------------

    def observe(
        self,
        duration: float,
        *,
        not_done_at: float | None = None,
        polls: int | None = None,
        key: str | None = None,
    ) -> None:
        """A prediction (``key``, if it was told as `running`) seen done at age ``duration``, last seen
        running at age ``not_done_at`` (0.0 or None: its first poll found it done), after ``polls`` polls
        (counted against the budget)."""
        if key is not None:
            self._forget(key)
        if polls is not None:
            self._spent += polls
            self._spent_count += 1
        lo = 0.0 if not_done_at is None else max(0.0, min(not_done_at, duration))
        self._add(lo, max(duration, _TINY))

    def running(self, key: str, age: float) -> None:
        """Prediction ``key`` was seen running at age ``age`` (a poll that found it unfinished)."""
        if self._fixed_first is None:
            self._live[key] = self._live.get(key, 0) + 1
            self._live_polls += 1
            if self.observed < CENSORED_UNTIL:
                self._running[key] = age
        self._running_max = max(self._running_max, age)

    def resolved(self, key: str) -> None:
        """Prediction ``key`` is no longer running (done, failed or given up): tell it after `observe`."""
        self._forget(key)

    def _forget(self, key: str) -> None:
        self._running.pop(key, None)
        self._live_polls -= self._live.pop(key, 0)

    def observe_sync(self, duration: float) -> None:
        """A submit answered already finished after ``duration`` seconds: a free, almost exact sample."""
        hi = max(duration, _TINY)
        self._add(hi * 0.9, hi)

    # --- what the planner learned -------------------------------------------------------------------

    def quantile(self, q: float) -> float | None:
        """The learned ``q`` quantile of completion times (seconds), or None before anything is learned."""
        if self._fit is None or not 0.0 < q < 1.0:
            return None
        mu, sigma = self._fit
        return math.exp(mu + sigma * _NORMAL.inv_cdf(q))

    @property
    def estimate(self) -> float:
        """The first delay new predictions get now (seconds)."""
        return self._first(probe=False)

    def first_delay(self) -> float:
        """Submit to first poll for a prediction that is not a probe (seconds)."""
        return self._first(probe=False)

    def schedule(self) -> Schedule | None:
        """The learned schedule in units of the learned median, or None before anything is learned."""
        if self._fit is None:
            return None
        return best_schedule(_round_sigma(self._fit[1]), self.budget_now())

    def budget_now(self) -> float:
        """Polls per prediction the schedule may spend now, so the run's mean lands on the budget.

        The probes, the first wave and a fit a little off (a schedule's cost hangs on the tail: a spread
        of 0.38 fitted for a true 0.4 costs 0.2 polls more than planned) spend more than planned; the
        schedule for new predictions makes up for it, ``BUDGET_GAIN`` times the excess, never below 0.8
        of the budget. The spend counts the predictions in flight too, each with the polls it took and
        one more (the least it will take): the ones finished so far are the quick ones, and their mean
        alone understated the run's by ~0.2 polls (at a budget of 2.7 the bench's runs spent 2.86-2.97).
        Never above the budget: the in-flight ones' one more poll is a floor. Rounded, so the schedule
        cache stays small.
        """
        if self._spent_count < BUDGET_AFTER:
            return self._budget
        # the ones in flight (the slow ones, and those with their polls still ahead) count with the polls
        # they took and one more each (the least they will take): the finished ones alone are the quick
        spent = self._spent + self._live_polls + len(self._live)
        excess = spent / (self._spent_count + len(self._live)) - self._budget
        now = min(max(self._budget - BUDGET_GAIN * excess, 0.8 * self._budget), self._budget)
        return round(now * 20) / 20

    # --- inside -------------------------------------------------------------------------------------

    def _blind(self, due: float, probe: bool) -> float:
        """Before any prediction finished, one that is not a probe is not polled at an age some prediction
        was already seen running at (it would most likely find it running too): it waits for the probes,
        up to ``HOLD_LIMIT`` times the prior (a prior far too low must not cost every prediction of the
        first wave a poll at each doubling)."""
        if probe or self.observed or self._fit is not None or self._fixed_first is not None:
            return due
        held = min(self._running_max * BLIND_GROWTH, self._prior * HOLD_LIMIT)
        return max(due, held)

    def _first(self, probe: bool) -> float:
        if self._fixed_first is not None:
            return self._fixed_first
        if self._fit is not None:
            return self._learned_schedule()[0]
        return self._prior / PROBE_DIVISOR if probe else self._prior

    def _learned_schedule(self) -> tuple[float, float]:
        assert self._fit is not None
        mu, sigma = self._fit
        median = math.exp(mu)
        plan = best_schedule(_round_sigma(sigma), self.budget_now())
        first = self._fixed_first if self._fixed_first is not None else max(plan.first * median, _TINY)
        return first, max(plan.step * median, _TINY)

    def _add(self, lo: float, hi: float) -> None:
        self._intervals.append((lo, hi))
        self.observed += 1
        self._since_fit += 1
        if self.observed < MIN_LEARNED and self.observed + len(self._running) < MIN_KNOWN:
            return
        every = max(REFIT_EVERY, self.observed // REFIT_SHARE)
        if self.observed <= 4 * REFIT_EVERY or self._since_fit >= every:
            self._fit = fit_lognormal(
                list(self._intervals),
                few=self.observed < 4 * REFIT_EVERY,
                censored=self._censored(),
                start=self._fit,
            )
            self._since_fit = 0
        if self.observed >= CENSORED_UNTIL:
            self._running.clear()  # enough completions: the window of completions alone is unbiased

    def _censored(self) -> list[tuple[float, float]]:
        """The predictions still running, as at most ``CENSORED_BINS`` (age, weight): each bin of ages in
        order at its youngest age (what is known of all of them), weighted by how many it holds."""
        ages = sorted(age for age in self._running.values() if age > 0)
        if len(ages) <= CENSORED_BINS:
            return [(age, 1.0) for age in ages]
        size = len(ages) / CENSORED_BINS
        bins = []
        for i in range(CENSORED_BINS):
            lo, hi = round(i * size), round((i + 1) * size)
            if hi > lo:
                bins.append((ages[lo], float(hi - lo)))
        return bins

    def __repr__(self) -> str:
        fit = "prior"
        if self._fit is not None:
            fit = f"median={math.exp(self._fit[0]):.3g}s sigma={self._fit[1]:.2f}"
        return f"<PollPlanner first={self.first_delay():.3g}s {fit} observed={self.observed}>"


def fit_lognormal(
    intervals: list[tuple[float, float]],
    *,
    few: bool = False,
    censored: Sequence[tuple[float, float]] = (),
    start: tuple[float, float] | None = None,
) -> tuple[float, float]:
    """(mu, sigma) of log seconds, by EM over interval-censored completions ``(lo, hi]`` (lo 0: before
    the first poll) and right-censored predictions still running: ``censored`` holds ``(age, weight)``,
    a prediction last seen running at ``age`` (``weight`` of them). Without the running ones, the first
    completions of a run are its fastest predictions and the fit says the model is quicker than it is.
    ``start``: an earlier fit to start from (fewer iterations)."""
    bounds = [(math.log(lo) if lo > 0 else -math.inf, math.log(hi)) for lo, hi in intervals]
    weights = [1.0] * len(bounds)
    for age, weight in censored:
        if age > 0 and weight > 0:
            bounds.append((math.log(age), math.inf))
            weights.append(weight)
    total = sum(weights)
    if start is not None:
        mu, sigma = start
    else:
        mids = [(a + b) / 2 if math.isfinite(a) else b for a, b in bounds[: len(intervals)]]
        mu = sum(mids) / len(mids)
        var = sum((m - mu) ** 2 for m in mids) / len(mids)
        sigma = min(max(math.sqrt(var), _SIGMA_FEW), _SIGMA_MAX)
    for _ in range(60):
        first, second = _em_sums(bounds, weights, mu, sigma)
        new_mu = first / total
        new_sigma = math.sqrt(max(second / total - new_mu * new_mu, 0.0))
        new_sigma = min(max(new_sigma, _SIGMA_MIN), _SIGMA_MAX)
        done = abs(new_mu - mu) < 1e-4 and abs(new_sigma - sigma) < 1e-4
        mu, sigma = new_mu, new_sigma
        if done:
            break
    return mu, max(sigma, _SIGMA_FEW) if few else sigma


def _em_sums(
    bounds: list[tuple[float, float]], weights: list[float], mu: float, sigma: float
) -> tuple[float, float]:
    """One E step: the weighted sums of the mean and of the second moment of each interval under
    N(mu, sigma), as `_truncated_moments` gives them, with the same numbers in the same order (so the
    fit is the same to the last bit) but inlined: a refit runs this over up to ``WINDOW`` intervals on
    the event loop, and the function calls (four of `NormalDist` per interval) were most of its cost."""
    erf, exp, isfinite, inf = math.erf, math.exp, math.isfinite, math.inf
    root2, root_tau = _SQRT2, _SQRT_TAU
    var = sigma * sigma
    first = second = 0.0
    for (a, b), w in zip(bounds, weights, strict=True):
        if a == -inf:  # (0, hi]: done at its first poll, the common case, with alpha -inf worked out
            beta = (b - mu) / sigma
            if -inf < beta < inf:
                mass = 0.5 * (1.0 + erf(beta / root2))
                if mass < 1e-12:
                    first += w * b
                    second += w * (0.0 + b * b)
                    continue
                pb = exp(beta * beta / -2.0) / root_tau
                shift = (0.0 - pb) / mass
                spread = 1.0 + (0.0 - beta * pb) / mass - shift * shift
                v = var * (0.0 if spread < 0.0 else spread)  # max(spread, 0.0), as written there
                m = mu + sigma * shift
                first += w * m
                second += w * (v + m * m)
                continue
        alpha = (a - mu) / sigma if isfinite(a) else -inf
        beta = (b - mu) / sigma if isfinite(b) else inf
        finite_alpha, finite_beta = isfinite(alpha), isfinite(beta)
        low = 0.5 * (1.0 + erf(alpha / root2)) if finite_alpha else 0.0
        high = 0.5 * (1.0 + erf(beta / root2)) if finite_beta else 1.0
        mass = high - low
        if mass < 1e-12:  # as in _truncated_moments: the nearer end, no variance
            m = a if not isfinite(b) else (b if beta < 0 else (a if isfinite(a) else b))
            first += w * m
            second += w * (0.0 + m * m)
            continue
        pa = exp(alpha * alpha / -2.0) / root_tau if finite_alpha else 0.0
        pb = exp(beta * beta / -2.0) / root_tau if finite_beta else 0.0
        shift = (pa - pb) / mass
        tail = (alpha * pa if finite_alpha else 0.0) - (beta * pb if finite_beta else 0.0)
        v = var * max(1.0 + tail / mass - shift * shift, 0.0)
        m = mu + sigma * shift
        first += w * m
        second += w * (v + m * m)
    return first, second


def _truncated_moments(mu: float, sigma: float, a: float, b: float) -> tuple[float, float]:
    """Mean and variance of N(mu, sigma) restricted to (a, b] (a may be -inf, b +inf)."""
    alpha = (a - mu) / sigma if math.isfinite(a) else -math.inf
    beta = (b - mu) / sigma if math.isfinite(b) else math.inf
    low = _NORMAL.cdf(alpha) if math.isfinite(alpha) else 0.0
    high = _NORMAL.cdf(beta) if math.isfinite(beta) else 1.0
    mass = high - low
    if mass < 1e-12:  # the fit puts no weight there: take the nearer end
        if not math.isfinite(b):
            return a, 0.0
        x = b if beta < 0 else (a if math.isfinite(a) else b)
        return x, 0.0
    pa = _NORMAL.pdf(alpha) if math.isfinite(alpha) else 0.0
    pb = _NORMAL.pdf(beta) if math.isfinite(beta) else 0.0
    shift = (pa - pb) / mass
    tail = (alpha * pa if math.isfinite(alpha) else 0.0) - (beta * pb if math.isfinite(beta) else 0.0)
    var = sigma * sigma * max(1.0 + tail / mass - shift * shift, 0.0)
    return mu + sigma * shift, var


def _round_sigma(sigma: float) -> float:
    return round(sigma * 40) / 40  # steps of 0.025: the schedule table stays small


@functools.lru_cache(maxsize=128)
def best_schedule(sigma: float, budget: float, samples: int = 400) -> Schedule:
    """The fixed schedule (first poll, then even steps) with the least median detection lag at no more
    than ``budget`` polls per prediction, for a lognormal of spread ``sigma``; in units of its median.

    Numerical: for each first poll on a grid, the smallest step within the budget (mean polls is exact,
    from the CDF, and falls as the step grows: a bisection), then its lags from ``samples`` quantiles.
    Cached, so a run computes it once per spread it meets (a few milliseconds).
    """
    times = [math.exp(sigma * _NORMAL.inv_cdf((i + 0.5) / samples)) for i in range(samples)]
    best: Schedule | None = None
    for i in range(31):
        first = math.exp(sigma * (-2.0 + 0.08 * i))
        step = _smallest_step(sigma, first, budget)
        if step is None:
            continue
        plan = evaluate(times, first, step)
        if best is None or _score(plan) < _score(best):
            best = plan
    if best is None:  # not even one poll each fits: the cheapest there is
        best = evaluate(times, math.exp(2.0 * sigma), 10.0)
    return best


def _score(plan: Schedule) -> float:
    return plan.lag_p50 + 0.05 * plan.lag_p90  # the p90 breaks near-ties toward a tighter tail


def _smallest_step(sigma: float, first: float, budget: float) -> float | None:
    """The least step whose mean polls stay within ``budget`` (to 0.1%: a bisection in logs)."""
    lo, hi = 1e-3, 10.0
    if mean_polls(sigma, first, hi) > budget:
        return None
    while hi / lo > 1.001:
        mid = math.sqrt(lo * hi)
        if mean_polls(sigma, first, mid) > budget:
            lo = mid
        else:
            hi = mid
    return hi


def mean_polls(sigma: float, first: float, step: float) -> float:
    """Polls per prediction of ``first, first + step, ...`` for a lognormal (median 1, spread sigma):
    one, plus one for every poll time it is still running at."""
    total, k = 1.0, 0
    scale = 1.0 / (sigma * math.sqrt(2.0))
    log, erfc = math.log, math.erfc
    while k < 100_000:
        survive = 0.5 * erfc(log(first + k * step) * scale)
        if survive < 1e-6:
            break
        total += survive
        k += 1
    return total


def evaluate(times: list[float], first: float, step: float) -> Schedule:
    """What the schedule ``first, first + step, ...`` costs and gives for completions at ``times``."""
    polls = 0
    lags: list[float] = []
    for t in times:
        k = 0 if t <= first else math.ceil((t - first) / step)
        polls += 1 + k
        lags.append(first + k * step - t)
    lags.sort()
    n = len(lags)
    return Schedule(first, step, polls / n, lags[n // 2], lags[min(n - 1, int(0.9 * n))])


def least_polls(
    cdf: Callable[[float], float], lag: float, horizon: float, *, share: float = 0.5, per_lag: int = 12
) -> float:
    """The least mean polls per prediction that any polling policy needs for ``share`` of completions
    (0.5: the median) to be seen within ``lag`` of finishing, for completion times of distribution ``cdf``
    on ``[0, horizon]``: the floor under every schedule, even steps or not.

    A poll reveals only "still running", so a policy is a fixed list of poll times per prediction,
    ``t_1 < t_2 < ...``, possibly drawn at random per prediction. It costs ``1 + S(t_1) + ... + S(t_n)``
    polls (S = 1 - cdf: the ones still running at a poll are polled again, at least once more) and sees
    within ``lag`` the completions in ``(max(t_{k-1}, t_k - lag), t_k]``. Both are sums over consecutive
    pairs of poll times, so for a price ``lam`` per unit of that share the best list is a shortest path
    over a grid of times (``per_lag`` points per ``lag``; a step of ``lag`` or more counts the same
    whichever earlier poll it comes from, so a running minimum covers those). The price is bisected to
    reach ``share``, and the two lists either side of it are mixed across predictions (cost and share
    are both means over predictions, so mixing reaches every point between): the answer is the lower
    convex hull at ``share``, exact up to the grid. O(grid * per_lag) per price."""
    if not (0.0 < share < 1.0) or lag <= 0 or horizon <= lag or per_lag < 1:
        raise ValueError("need 0 < share < 1, 0 < lag < horizon and per_lag >= 1")
    h = lag / per_lag
    size = math.ceil(horizon / h) + 1
    done = [min(max(cdf(i * h), 0.0), 1.0) for i in range(size)]
    left = [1.0 - f for f in done]

    def solve(price: float) -> tuple[float, float]:
        """(polls, share seen within lag) of the best list at this price per unit of share."""
        value = [0.0] * size  #: index 0: no poll yet (time 0)
        cost = [0.0] * size
        seen = [0.0] * size
        far, far_at = math.inf, -1  #: the least value of a list ending at least ``lag`` before
        for i in range(1, size):
            if i - per_lag >= 0 and value[i - per_lag] < far:
                far, far_at = value[i - per_lag], i - per_lag
            best, at, got = math.inf, -1, 0.0
            if far_at >= 0:
                got = done[i] - done[i - per_lag]
                best, at = far + left[i] - price * got, far_at
            for j in range(max(0, i - per_lag + 1), i):
                gain = done[i] - done[j]
                v = value[j] + left[i] - price * gain
                if v < best:
                    best, at, got = v, j, gain
            value[i], cost[i], seen[i] = best, cost[at] + left[i], seen[at] + got
        end = min(range(1, size), key=value.__getitem__)
        return 1.0 + cost[end], seen[end]

    low, high = 0.0, 1.0
    while solve(high)[1] < share:
        high *= 2.0
        if high > 1e9:
            return math.inf  # the grid cannot see that share within lag (a horizon too short)
    for _ in range(40):
        mid = (low + high) / 2
        if solve(mid)[1] >= share:
            high = mid
        else:
            low = mid
    (cost_low, seen_low), (cost_high, seen_high) = solve(low), solve(high)
    if seen_high - seen_low < 1e-12:
        return cost_high
    mix = min(max((share - seen_low) / (seen_high - seen_low), 0.0), 1.0)
    return cost_low + mix * (cost_high - cost_low)


@functools.lru_cache(maxsize=32)
def least_polls_lognormal(sigma: float, lag: float, share: float = 0.5) -> float:
    """`least_polls` for a lognormal of spread ``sigma`` (median 1; ``lag`` in units of the median),
    up to its 1 - 1e-6 quantile. At a lag of 0.12: 2.51 polls at sigma 0.4, 2.80 at 0.45, 3.12 at 0.5."""
    _check_positive("sigma", sigma)
    scale = 1.0 / (sigma * _SQRT2)

    def cdf(t: float) -> float:
        return 0.0 if t <= 0 else 0.5 * math.erfc(-math.log(t) * scale)

    return least_polls(cdf, lag, max(math.exp(4.75 * sigma), 4.0 * lag), share=share)


def _check_positive(name: str, value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
