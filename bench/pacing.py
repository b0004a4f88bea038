"""Figure 2, pacing: the engine against a simulated key limit of R submits/s.

(a) Configured at R with adaptation off, against a token bucket with a burst of two, the engine should
reach R (accepted submits over the span from the first to the last) and never see a 429.
(b) Configured at 5 R with adaptation on (the default), against the same bucket with 429s carrying
``Retry-After: 1``, it starts five times too fast and should settle near R, every time: five runs, and
the figure is the worst of them, with the spread.
(c) The same five times behind a strict limiter: nginx ``limit_req`` with no burst (a submit sooner than
1 / R after the last accepted one is refused), no ``Retry-After``, a 429 with nginx's HTML page.
A run's steady rate is the accepted submits in the second half of its time span, per second of that half;
its 429 share is 429s over submit attempts. Both come from the simulator (``accepted_times``,
``rate_limited_submits``, ``submit_requests``).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from batch_engine.manifest import load_manifest
from batch_engine.settings import RunSettings
from bench.common import TINY_SCALE, UNLIMITED, Figure, Row, run_engine, write_manifest
from bench.simproc import SimProcess

TARGET_FIXED = 0.95
TARGET_ADAPTIVE = 0.9  #: every run's steady rate, not their mean
TARGET_429_SHARE = 0.03  #: every run's 429s / submit attempts
OVERSHOOT = 5.0  #: (b) and (c) are configured at this multiple of the limit
RUNS = 5  #: adaptive runs per limiter

#: The two limiters the adaptive runs meet: the simulator's knobs for each.
LIMITERS: dict[str, dict[str, Any]] = {
    "2b token bucket, burst 2, Retry-After: 1": {"submit_burst": 2, "retry_after": 1.0},
    "2c nginx limit_req, no burst, no Retry-After, HTML 429": {"submit_burst": 1, "html_429": True},
}


def measure(*, rate: float, fixed_items: int, adaptive_items: int) -> Figure:
    fixed = _run(
        rate=rate, configured=rate, adapt=False, items=fixed_items, limiter=next(iter(LIMITERS.values()))
    )
    fixed_ratio = _overall_rate(fixed["accepted_times"]) / rate
    figure = Figure("pacing")
    figure.rows = [
        Row(
            f"2a pacing at R={rate:g}/s, no adapt: accepted rate / R",
            f"{fixed_ratio:.3f} ({fixed['accepted']} submits)",
            f">= {TARGET_FIXED}",
            fixed_ratio >= TARGET_FIXED,
        ),
        Row("2a   429s", str(fixed["rate_limited_submits"]), "0", fixed["rate_limited_submits"] == 0),
    ]
    figure.data = {"limit": rate, "fixed": _summary(fixed) | {"ratio": fixed_ratio}}
    for name, knobs in LIMITERS.items():
        runs = [
            _run(rate=rate, configured=OVERSHOOT * rate, adapt=True, items=adaptive_items, limiter=knobs)
            for _ in range(RUNS)
        ]
        rows, data = _adaptive_rows(name, runs, rate=rate)
        figure.rows += rows
        figure.data[name[:2]] = data
    figure.data["passed"] = all(row.passed for row in figure.rows if row.passed is not None)
    return figure


def _adaptive_rows(name: str, runs: list[dict[str, Any]], *, rate: float) -> tuple[list[Row], dict[str, Any]]:
    """The worst of the runs against its target, with the spread: a figure that holds every time."""
    steady = [_second_half_rate(run["accepted_times"]) / rate for run in runs]
    shares = [run["rate_limited_submits"] / max(1, run["submit_requests"]) for run in runs]
    counts = [run["rate_limited_submits"] for run in runs]
    late = [_second_half_share(run) for run in runs]
    tag = name[:2]
    rows = [
        Row(f"{name}: at {OVERSHOOT:g}R, adapt, {len(runs)} runs", ""),
        Row(
            f"{tag}   steady rate / R (2nd half), worst [spread]",
            f"{min(steady):.3f} [{min(steady):.3f}-{max(steady):.3f}]",
            f">= {TARGET_ADAPTIVE}",
            min(steady) >= TARGET_ADAPTIVE,
        ),
        Row(
            f"{tag}   429s / submit attempts, worst [spread]",
            f"{max(shares):.3f} [{min(shares):.3f}-{max(shares):.3f}]",
            f"<= {TARGET_429_SHARE}",
            max(shares) <= TARGET_429_SHARE,
        ),
        Row(
            f"{tag}   429s per run; 429s / attempts in the 2nd half (after the search), worst",
            f"{' '.join(str(n) for n in counts)}; {max(late):.3f}",
        ),
        Row(
            f"{tag}   engine's final rate / R, per run",
            " ".join(f"{run['rate_final'] / rate:.2f}" for run in runs),
        ),
    ]
    data = {
        "steady_ratios": steady,
        "rate_limited_shares": shares,
        "second_half_429_shares": late,
        "runs": [_summary(run) for run in runs],
    }
    return rows, data


def _run(
    *, rate: float, configured: float, adapt: bool, items: int, limiter: dict[str, Any]
) -> dict[str, Any]:
    knobs = {"submit_rate": rate, "image_scale": TINY_SCALE} | limiter
    settings = RunSettings(
        rate=configured,
        adapt=adapt,
        max_in_flight=1000,
        poll_after=0.1,
        poll_interval=0.1,
        poll_interval_max=0.5,
        poll_rate=UNLIMITED,
    )
    with tempfile.TemporaryDirectory() as tmp, SimProcess(inference_median=0.05, **knobs) as sim:
        manifest = load_manifest(write_manifest(Path(tmp) / "bench.yaml", count=items, base_url=sim.base_url))
        run = run_engine(manifest, Path(tmp) / "out", sim.base_url, settings)
        stats = sim.stats()
    stats["rate_final"] = run.result.stats.rate_final
    return stats


def _summary(stats: dict[str, Any]) -> dict[str, Any]:
    keys = ("accepted", "submit_requests", "rate_limited_submits", "rate_final")
    times = {key: stats[key] for key in ("accepted_times", "rate_limited_times")}
    return {key: stats[key] for key in keys} | times


def _overall_rate(times: list[float]) -> float:
    """Accepted submits per second over the span they cover: (n - 1) gaps in (last - first) seconds."""
    return (len(times) - 1) / (times[-1] - times[0])


def _second_half_share(stats: dict[str, Any]) -> float:
    """429s over submit attempts (accepted or refused) in the second half of the accepted span: what the
    limiter costs once the search is over (the first half holds the search from 5x)."""
    accepted: list[float] = stats["accepted_times"]
    middle = (accepted[0] + accepted[-1]) / 2
    refused: int = sum(t >= middle for t in stats["rate_limited_times"])
    return refused / max(1, refused + sum(t >= middle for t in accepted))


def _second_half_rate(times: list[float]) -> float:
    """Accepted submits per second in the second half of the span from the first to the last (pauses in)."""
    middle = (times[0] + times[-1]) / 2
    return sum(t >= middle for t in times) / (times[-1] - middle)
