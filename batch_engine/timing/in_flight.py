"""The in-flight cap when the user sets none: Little's law from the rate and the slot hold time seen.

A run at ``rate`` submits/s whose slots are each held ``hold`` seconds (submit, inference, the lag before
the engine notices, the download) keeps ``rate * hold`` slots busy on average (Little's law, L = λW). A
fixed cap below that throttles the run to ``cap / hold`` whatever the rate; so the cap follows
``rate * p90(hold) * MARGIN``, bounded by ``FLOOR`` and ``CEILING``. Before anything has finished, the
model's typical inference time (``catalogue.ModelSpec.expected_seconds``) stands in for the hold time.

An API that caps concurrent predictions answers a submit beyond its cap with 429, like a rate limit. The
first 429 goes to the pacer (its rate is cut). Under a rate limit the level in flight follows the rate
down (Little's law) and the 429s stop; a 429 that comes again at the same level although the rate was cut
well below the rate of the previous one points at concurrency: then the cap is cut below that level
(a multiplicative cut, growing back quickly to one below the level refused, holding there, then probing
one slot at a time) and the pacer's rate is left alone. Once cut, a 429 near the cut cap is the
concurrency limit's at once; one at a level above the cut cap is an echo of what was sent before it.
"""

from __future__ import annotations

import math
from collections import deque

MARGIN = 1.4  #: headroom over rate x p90 hold: bursts and a tail the p90 does not see
FLOOR = 4  #: never fewer slots than this on auto
CEILING = 10_000  #: the largest concurrency tier known (settings.SETTING_RANGES)
WINDOW = 512  #: hold times the p90 is taken over (the most recent)
CUT = 0.9  #: a concurrency 429 sets the cap to this fraction of the level where it came
GROW_EVERY = 8  #: after a concurrency cut, one more slot per this many clean completions, at least
# Like the rate (timing.pacing), the cap returns quickly to just under the level where the API refused
# and holds there before probing: growing one slot per 8 completions right back into the limit made a
# 429 every few dozen submits (12.8% of them in the bench's figure against a server capping at 40).
GROW_FAST = 2  #: completions per slot while the cap is more than one below the refused level
HOLD_LEVELS = 8  #: at one below it, probe one slot higher after this many times that level in completions
SAME_LEVEL = 0.25  #: 429s at in-flight levels within this fraction of each other are "the same level"
RATE_DROP = 0.8  #: ... while the rate fell to at most this fraction of the first 429's there: concurrency


def little_cap(
    rate: float, hold: float, *, margin: float = MARGIN, floor: int = FLOOR, ceiling: int = CEILING
) -> int:
    """Slots a run at ``rate``/s needs when each is held ``hold`` s, with ``margin``, within the bounds."""
    if not (rate > 0 and hold > 0) or math.isinf(rate * hold):
        return ceiling if rate > 0 and (math.isinf(rate) or math.isinf(hold)) else floor
    return max(floor, min(ceiling, math.ceil(rate * hold * margin)))


def p90(samples: list[float]) -> float:
    """The 90th percentile (nearest rank) of a non-empty list."""
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, math.ceil(0.9 * len(ordered)) - 1)]


def same_level(a: int, b: int) -> bool:
    """Whether two in-flight levels are close enough to be one concurrency limit."""
    return abs(a - b) <= max(1, SAME_LEVEL * max(a, b))


class AutoCap:
    """The cap of an auto run: Little's law from hold times, cut to below a concurrency limit it meets.

    ``cap`` is read by `control.RunControl` after every event that may change it.
    """

    __slots__ = (
        "_bad_level",
        "_cap_limit",
        "_clean",
        "_holds",
        "_last_429",
        "ceiling",
        "floor",
        "prior",
        "rate",
    )

    def __init__(self, *, rate: float, prior: float, floor: int = FLOOR, ceiling: int = CEILING) -> None:
        self.rate = rate
        self.prior = prior
        self.floor = floor
        self.ceiling = ceiling
        self._holds: deque[float] = deque(maxlen=WINDOW)
        self._cap_limit: int | None = None  #: learned concurrency limit (cut after 429s), grows slowly
        self._last_429: tuple[int, float] | None = None  #: (level, rate) at the first 429 at a level
        self._clean = 0
        self._bad_level: int | None = None  #: the in-flight level of the last concurrency 429

    def __repr__(self) -> str:
        return f"AutoCap(cap={self.cap}, limit={self._cap_limit}, holds={len(self._holds)})"

    @property
    def hold(self) -> float:
        """The hold time the cap is sized for: p90 of those seen, the prior before any."""
        return p90(list(self._holds)) if self._holds else self.prior

    @property
    def cap(self) -> int:
        little = little_cap(self.rate, self.hold, floor=self.floor, ceiling=self.ceiling)
        return little if self._cap_limit is None else max(1, min(little, self._cap_limit))

    @property
    def concurrency_limited(self) -> bool:
        return self._cap_limit is not None

    def resolved(self, hold: float) -> None:
        """A slot's prediction resolved after ``hold`` s; after a cut, every few grow the cap back by one."""
        self._holds.append(hold)
        if self._cap_limit is not None:
            self._clean += 1
            bad = self._bad_level or 0
            every = GROW_FAST if self._cap_limit < bad - 1 else max(GROW_EVERY, HOLD_LEVELS * bad)
            if self._clean >= every:
                self._clean = 0
                self._cap_limit += 1

    def rate_limited(self, level: int, rate: float) -> bool:
        """A 429 came with ``level`` predictions in flight, submits paced at ``rate``; True when it is read
        as the concurrency limit (the cap is cut), False when the rate should be cut instead."""
        # Compared with the first 429 at this level, not the last: a pacer that dips a little per 429 (a
        # stray one reads as jitter) never cuts RATE_DROP at once, yet the level stays where the API caps it.
        first = self._last_429
        if first is None or not same_level(first[0], level):
            first = self._last_429 = (level, rate)
        at_cap = self._cap_limit is not None and level >= (1.0 - SAME_LEVEL) * self._cap_limit
        stuck = same_level(first[0], level) and rate <= RATE_DROP * first[1]
        if not (at_cap or stuck):
            return False
        if self._cap_limit is not None and level > self._cap_limit:
            # Sent while more were in flight than the cap now allows: an echo of the storm that cut it,
            # as a pacer's 429s during its pause are (cutting per echo took a cap of 44 down to 36).
            return True
        self._cap_limit = max(1, min(self._cap_limit or level, math.floor(level * CUT)))
        self._bad_level = level
        self._clean = 0
        return True
