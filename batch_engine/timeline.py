"""A run's events over time, in buckets that fit the run's length, for the chart of index.html.

Counts start in buckets of ``FIRST_STEP`` seconds; whenever an event would need more than ``MAX_BUCKETS``
buckets, neighbouring buckets are added together two by two and the step doubles. So a 10-second run is
drawn from 10 points and a 10-hour one from 141 (256 s each), and memory stays bounded whatever the length.
"""

from __future__ import annotations

SERIES = ("submitted", "finished", "rate_limited")
FIRST_STEP = 1.0  #: seconds per bucket at first
MAX_BUCKETS = 240
LEGACY_STEP = 60.0  #: journals written before buckets fitted the run counted per minute


class Timeline:
    """Counts per series and bucket since ``start``; ``count(series, at)`` adds one event.

    Invariant: every series holds the same number of buckets, at most ``MAX_BUCKETS``, each ``step``
    seconds long, bucket k covering ``[start + k * step, start + (k + 1) * step)``.
    """

    __slots__ = ("series", "start", "step")

    def __init__(self, start: float, *, step: float = FIRST_STEP) -> None:
        self.start = start
        self.step = step
        self.series: dict[str, list[int]] = {name: [] for name in SERIES}

    def __repr__(self) -> str:
        return f"<Timeline {len(self.series[SERIES[0]])} buckets of {self.step:g}s>"

    def count(self, series: str, at: float) -> None:
        """One event of ``series`` (one of `SERIES`) at unix time ``at``."""
        index = int(max(0.0, at - self.start) // self.step)
        while index >= MAX_BUCKETS:
            self._halve()
            index //= 2
        if index >= len(self.series[series]):
            for counts in self.series.values():
                counts.extend([0] * (index + 1 - len(counts)))
        self.series[series][index] += 1

    def _halve(self) -> None:
        """Twice the step: each pair of buckets becomes one."""
        for name, counts in self.series.items():
            self.series[name] = [sum(counts[k : k + 2]) for k in range(0, len(counts), 2)]
        self.step *= 2
