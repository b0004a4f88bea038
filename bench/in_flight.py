"""Figure: in-flight defaults that do not throttle (issue 13), against the simulator in its own process.

Row (a): only ``--rate R`` set, inference lognormal around M with M >> 1 / R, so the run needs about
R x M predictions in flight. The auto cap (rate x p90 slot hold x margin) should keep the steady accepted
rate (the second half of the submits) at >= 0.9 R; beside it, what the old fixed default of 50 allows
(50 / mean slot hold) and the physical limit R.

Row (b): a server that caps concurrent predictions at C (``max_concurrent``, 429 beyond it) and a generous
rate: the engine's in-flight cap should settle near C, with few 429s, and its throughput near Little's
limit C / mean inference.
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path
from typing import Any

from batch_engine.manifest import load_manifest
from batch_engine.settings import RunSettings
from bench.common import TINY_SCALE, Figure, Row, run_engine, write_manifest
from bench.simproc import SimProcess

RATE = 20.0  #: (a) submits/s
MEDIAN = 3.0  #: (a) seconds of inference, lognormal median (60 s real / 20)
SPREAD = 0.4
ITEMS = 240  #: (a) 12 s of submits at RATE
OLD_DEFAULT = 50
LIMIT = 40  #: (b) the server's concurrency cap
LIMIT_MEDIAN = 1.0  #: (b) seconds of inference
LIMIT_RATE = 150.0  #: (b) a rate far above C / M = 40/s
LIMIT_ITEMS = 320


def measure(*, runs: int = 2) -> Figure:
    figure = Figure("in_flight")
    auto = [_auto_run() for _ in range(runs)]
    limited = [_limited_run() for _ in range(runs)]
    figure.rows = [*_auto_rows(auto), *_limited_rows(limited)]
    figure.data = {"auto": auto, "limited": limited}
    return figure


def _settings(rate: float, median: float) -> RunSettings:
    return RunSettings(rate=rate, poll_after=median, poll_interval=median / 10, poll_rate=20 * rate)


def _run(knobs: dict[str, Any], items: int, settings: RunSettings) -> tuple[dict[str, Any], Any]:
    knobs = {"inference_spread": SPREAD, "image_scale": TINY_SCALE, **knobs}
    with tempfile.TemporaryDirectory() as tmp, SimProcess(**knobs) as sim:
        manifest = load_manifest(write_manifest(Path(tmp) / "bench.yaml", count=items, base_url=sim.base_url))
        run = run_engine(manifest, Path(tmp) / "out", sim.base_url, settings)
        return sim.stats(), run.result.stats


def _steady_rate(times: list[float]) -> float:
    """Accepted submits per second over the second half of the submitting time."""
    ordered = sorted(times)
    if len(ordered) < 4:
        return 0.0
    middle = (ordered[0] + ordered[-1]) / 2
    late = [t for t in ordered if t >= middle]
    return (len(late) - 1) / max(1e-9, late[-1] - late[0])


def _hold(sim: dict[str, Any]) -> float:
    """Mean time from accepted to the engine seeing it done: a slot's hold, short of the download."""
    preds = [p for p in sim["predictions"].values() if p["first_done_seen_at"]]
    return statistics.fmean(p["first_done_seen_at"] - p["created_at"] for p in preds)


def _auto_run() -> dict[str, Any]:
    sim, stats = _run({"inference_median": MEDIAN}, ITEMS, _settings(RATE, MEDIAN))
    hold = _hold(sim)
    return {
        "steady": _steady_rate(sim["accepted_times"]),
        "hold": hold,
        "old_default_limit": OLD_DEFAULT / hold,
        "max_concurrent_seen": sim["max_concurrent_seen"],
        "cap": stats.in_flight_cap,
        "held_back_by": None if stats.held_back is None else stats.held_back[0],
    }


def _limited_run() -> dict[str, Any]:
    knobs = {"inference_median": LIMIT_MEDIAN, "max_concurrent": LIMIT}
    sim, stats = _run(knobs, LIMIT_ITEMS, _settings(LIMIT_RATE, LIMIT_MEDIAN))
    inference = statistics.fmean(p["inference_seconds"] for p in sim["predictions"].values())
    return {
        "steady": _steady_rate(sim["accepted_times"]),
        "little": LIMIT / inference,
        "share_429": stats.rate_limited / max(1, stats.submit_attempts),
        "cap": stats.in_flight_cap,
        "max_concurrent_seen": sim["max_concurrent_seen"],
        "rate_final": stats.rate_final,
        "accepted": sim["accepted"],
        "held_back_by": None if stats.held_back is None else stats.held_back[0],
    }


def _auto_rows(runs: list[dict[str, Any]]) -> list[Row]:
    steady = [r["steady"] / RATE for r in runs]
    worst = min(steady)
    old = statistics.fmean(r["old_default_limit"] for r in runs)
    caps = ", ".join(f"{r['cap']}" for r in runs)
    return [
        Row(
            f"in-flight auto (a): --rate {RATE:g} only, inference ~{MEDIAN:g} s: steady accepted rate",
            f"worst {worst:.2f} R, spread {max(steady) - worst:.2f} over {len(runs)} runs "
            f"(physical limit R = {RATE:g}/s; the old fixed 50 allows {old:.1f}/s = {old / RATE:.2f} R)",
            ">= 0.9 R",
            worst >= 0.9,
        ),
        Row(
            "  auto cap at the end / most in flight at the server",
            f"cap {caps}; seen {', '.join(str(r['max_concurrent_seen']) for r in runs)}; "
            f"held back by {', '.join(str(r['held_back_by']) for r in runs)}",
        ),
    ]


def _limited_rows(runs: list[dict[str, Any]]) -> list[Row]:
    share = [r["steady"] / r["little"] for r in runs]
    worst = min(share)
    return [
        Row(
            f"in-flight auto (b): server max_concurrent {LIMIT}, --rate {LIMIT_RATE:g}: throughput",
            f"worst {worst:.2f} of C/M, spread {max(share) - worst:.2f} "
            f"(C/M = {statistics.fmean(r['little'] for r in runs):.1f}/s); 429s "
            f"{max(r['share_429'] for r in runs):.1%} worst",
        ),
        Row(
            "  cap at the end / most in flight at the server / final rate",
            "; ".join(
                f"cap {r['cap']}, seen {r['max_concurrent_seen']}, rate {r['rate_final']:.0f}/s" for r in runs
            ),
        ),
    ]
