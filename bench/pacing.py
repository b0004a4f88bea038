"""Figure 2, pacing: the engine against a simulated key limit of R submits/s with a burst of two.

(a) Configured at R with adaptation off, the engine should reach R (accepted submits over the span from
the first to the last) and never see a 429. (b) Configured at 5 R with adaptation on, it starts five times
too fast, is cut by 429s that each carry ``Retry-After: 1``, and should settle near R: its steady rate
is the accepted submits in the second half of the run's time span, per second of that half.
Both rates come from the simulator's ``accepted_times``; 429s from its ``rate_limited_submits``.
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
TARGET_ADAPTIVE = 0.85
TARGET_429_SHARE = 0.05
OVERSHOOT = 5.0  #: (b) is configured at this multiple of the limit


def measure(*, rate: float, fixed_items: int, adaptive_items: int) -> Figure:
    fixed = _run(rate=rate, configured=rate, adapt=False, items=fixed_items)
    adaptive = _run(rate=rate, configured=OVERSHOOT * rate, adapt=True, items=adaptive_items)
    fixed_ratio = _overall_rate(fixed["accepted_times"]) / rate
    steady_ratio = _second_half_rate(adaptive["accepted_times"]) / rate
    share = adaptive["rate_limited_submits"] / max(1, adaptive["submit_requests"])
    figure = Figure("pacing")
    figure.rows = [
        Row(
            f"2a pacing at R={rate:g}/s, no adapt: accepted rate / R",
            f"{fixed_ratio:.3f} ({fixed['accepted']} submits)",
            f">= {TARGET_FIXED}",
            fixed_ratio >= TARGET_FIXED,
        ),
        Row("2a   429s", str(fixed["rate_limited_submits"]), "0", fixed["rate_limited_submits"] == 0),
        Row(
            f"2b pacing at {OVERSHOOT:g}R, adapt: steady rate / R (2nd half)",
            f"{steady_ratio:.3f} ({adaptive['accepted']} submits)",
            f">= {TARGET_ADAPTIVE}",
            steady_ratio >= TARGET_ADAPTIVE,
        ),
        Row(
            "2b   429s / submit attempts",
            f"{share:.3f} ({adaptive['rate_limited_submits']} of {adaptive['submit_requests']})",
            f"< {TARGET_429_SHARE}",
            share < TARGET_429_SHARE,
        ),
        Row("2b   engine's final rate / R", f"{adaptive['rate_final'] / rate:.3f}"),
    ]
    figure.data = {
        "limit": rate,
        "fixed": _summary(fixed) | {"ratio": fixed_ratio},
        "adaptive": _summary(adaptive) | {"steady_ratio": steady_ratio, "rate_limited_share": share},
        "passed": all(row.passed for row in figure.rows if row.passed is not None),
    }
    return figure


def _run(*, rate: float, configured: float, adapt: bool, items: int) -> dict[str, Any]:
    knobs = {"submit_rate": rate, "submit_burst": 2, "retry_after": 1.0, "image_scale": TINY_SCALE}
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
    return {key: stats[key] for key in keys} | {"accepted_times": stats["accepted_times"]}


def _overall_rate(times: list[float]) -> float:
    """Accepted submits per second over the span they cover: (n - 1) gaps in (last - first) seconds."""
    return (len(times) - 1) / (times[-1] - times[0])


def _second_half_rate(times: list[float]) -> float:
    """Accepted submits per second in the second half of the span from the first to the last (pauses in)."""
    middle = (times[0] + times[-1]) / 2
    return sum(t >= middle for t in times) / (times[-1] - middle)
