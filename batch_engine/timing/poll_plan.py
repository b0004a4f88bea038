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
- **sync answers**: a submit that comes back already finished is an (almost exact) free sample.

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
from dataclasses import dataclass
from statistics import NormalDist

DEFAULT_GROWTH = 1.5  #: the cadence after a user's first poll (--poll-after): interval * growth**k, capped
DEFAULT_BUDGET = 2.8  #: target polls per prediction over the run (probes and the first wave included)
PROBES = 4  #: predictions polled at geometric times from a small start, before anything is learned
PROBE_DIVISOR = 64.0  #: the probes start at the prior / this
PROBE_GROWTH = 2.0  #: each probe poll comes this many times later than the last
BLIND_GROWTH = 2.0  #: before learning, a prediction still running at its prior is polled at ages x this
WAKE_GROWTH = 1.25  #: a waiting prediction is woken (no request) at least this often, in age ratio
MIN_LEARNED = 3  #: completions before the fit replaces the prior
WINDOW = 512  #: the completions the fit remembers (the newest)
REFIT_EVERY = 8  #: past 4 * this many completions, the fit is redone every this many
_SIGMA_MIN, _SIGMA_MAX = 0.1, 1.5  #: the fitted spread (log seconds) is kept within these
_SIGMA_FEW = 0.5  #: with few completions the spread is taken at least this (a narrow fit of 3 is luck)
_TINY = 1e-3  #: seconds: the smallest time anything is planned at
_NORMAL = NormalDist()


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
        "_prior",
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
            return self._first(probe)
        if self._fixed_steps or (self._fixed_first is not None and self._fit is None):
            return running_at + self.next_delay(polls)
        if self._fit is None:
            growth = PROBE_GROWTH if probe else BLIND_GROWTH
            return max(running_at * growth, running_at + _TINY)
        first, step = self._learned_schedule()
        if running_at < first:
            return first
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
        if due <= age:
            return 0.0
        if self._fit is not None:  # learned: the schedule moves little from here on
            return due - age
        return min(due - age, max(age * (WAKE_GROWTH - 1.0), self._prior / PROBE_DIVISOR))

    def next_delay(self, polls_done: int) -> float:
        """The user's cadence: seconds after poll ``polls_done`` (1-based): interval * growth**k, capped."""
        k = max(0, polls_done - 1)
        room = math.log(self._interval_max / self._interval)
        if k * math.log(self._growth) >= room:  # compared in logs: growth**k may overflow
            return self._interval_max
        return self._interval * self._growth**k

    # --- what the poll and submit stages tell -------------------------------------------------------

    def observe(self, duration: float, *, not_done_at: float | None = None, polls: int | None = None) -> None:
        """A prediction seen done at age ``duration``, last seen running at age ``not_done_at`` (0.0 or
        None: its first poll found it done), after ``polls`` polls (counted against the budget)."""
        if polls is not None:
            self._spent += polls
            self._spent_count += 1
        lo = 0.0 if not_done_at is None else max(0.0, min(not_done_at, duration))
        self._add(lo, max(duration, _TINY))

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

        The probes, the first wave planned on the prior and polls made late (a busy loop) spend more or
        less than planned; the schedule for new predictions makes up for it (a ratio, rounded so the
        schedule cache stays small).
        """
        if self._spent_count < 10:
            return self._budget
        mean = self._spent / self._spent_count
        ratio = min(max(self._budget / mean, 0.6), 1.4)
        return round(self._budget * ratio * 20) / 20

    # --- inside -------------------------------------------------------------------------------------

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
        if self.observed < MIN_LEARNED:
            return
        if self.observed <= 4 * REFIT_EVERY or self._since_fit >= REFIT_EVERY:
            self._fit = fit_lognormal(list(self._intervals), few=self.observed < 4 * REFIT_EVERY)
            self._since_fit = 0

    def __repr__(self) -> str:
        fit = "prior"
        if self._fit is not None:
            fit = f"median={math.exp(self._fit[0]):.3g}s sigma={self._fit[1]:.2f}"
        return f"<PollPlanner first={self.first_delay():.3g}s {fit} observed={self.observed}>"


def fit_lognormal(intervals: list[tuple[float, float]], *, few: bool = False) -> tuple[float, float]:
    """(mu, sigma) of log seconds, by EM over interval-censored completions ``(lo, hi]`` (lo 0: before
    the first poll)."""
    bounds = [(math.log(lo) if lo > 0 else -math.inf, math.log(hi)) for lo, hi in intervals]
    mids = [(a + b) / 2 if math.isfinite(a) else b for a, b in bounds]
    mu = sum(mids) / len(mids)
    var = sum((m - mu) ** 2 for m in mids) / len(mids)
    sigma = min(max(math.sqrt(var), _SIGMA_FEW), _SIGMA_MAX)
    for _ in range(40):
        first = second = 0.0
        for a, b in bounds:
            m, v = _truncated_moments(mu, sigma, a, b)
            first += m
            second += v + m * m
        new_mu = first / len(bounds)
        new_sigma = math.sqrt(max(second / len(bounds) - new_mu * new_mu, 0.0))
        new_sigma = min(max(new_sigma, _SIGMA_MIN), _SIGMA_MAX)
        done = abs(new_mu - mu) < 1e-4 and abs(new_sigma - sigma) < 1e-4
        mu, sigma = new_mu, new_sigma
        if done:
            break
    return mu, max(sigma, _SIGMA_FEW) if few else sigma


def _truncated_moments(mu: float, sigma: float, a: float, b: float) -> tuple[float, float]:
    """Mean and variance of N(mu, sigma) restricted to (a, b]."""
    alpha = (a - mu) / sigma if math.isfinite(a) else -math.inf
    beta = (b - mu) / sigma
    mass = _NORMAL.cdf(beta) - (_NORMAL.cdf(alpha) if math.isfinite(alpha) else 0.0)
    if mass < 1e-12:  # the fit puts no weight there: take the nearer end
        x = b if beta < 0 else (a if math.isfinite(a) else b)
        return x, 0.0
    pa = _NORMAL.pdf(alpha) if math.isfinite(alpha) else 0.0
    pb = _NORMAL.pdf(beta)
    shift = (pa - pb) / mass
    tail = ((alpha * pa) if math.isfinite(alpha) else 0.0) - beta * pb
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
    lo, hi = 1e-3, 10.0
    if mean_polls(sigma, first, hi) > budget:
        return None
    for _ in range(30):
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
    while k < 100_000:
        survive = 1.0 - _NORMAL.cdf(math.log(first + k * step) / sigma)
        if survive < 1e-7:
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


def _check_positive(name: str, value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
