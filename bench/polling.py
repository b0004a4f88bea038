"""Figure 3, polling: polls per prediction and detection lag (completion to the poll that sees it done),
beside the frontier: the best fixed schedule for the true distribution at the same polls per prediction.

Real edits take 2 s to a few minutes. Each row divides every time by its own scale so that the scaled
median inference is ``SCALED_MEDIAN``: the model's prior (its ``expected_seconds``, put in place of the
catalogue's for the run) and the poll settings the planner falls back on are divided the same way, so
polls per prediction and lag as a share of the median are what a real run with default settings would
see. The submit rate and the poll budget are set high enough not to bind: this figure is about where the
polls go, not about pacing. The engine is told nothing else (no --poll-after, no --poll-interval).

The frontier: over a grid of first polls and even steps (``poll_plan.best_schedule``, with many samples of
the true lognormal), the least median lag at no more than the engine's measured polls per prediction.

Completion and detection times come from the simulator: ``completed_at`` and ``first_done_seen_at`` of
each prediction (both on the simulator's clock).
"""

from __future__ import annotations

import contextlib
import dataclasses
import statistics
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from batch_engine import engine
from batch_engine.api import catalogue
from batch_engine.manifest import load_manifest
from batch_engine.settings import DEFAULT_POLL_INTERVAL, DEFAULT_POLL_INTERVAL_MAX, RunSettings
from batch_engine.timing.poll_plan import best_schedule
from bench.common import TINY_SCALE, Figure, Row, percentile, run_engine, write_manifest
from bench.simproc import SimProcess

SCALED_MEDIAN = 2.0  #: seconds: every row's median inference after scaling
MAX_POLLS = 3.0  #: target: polls per prediction
MAX_LAG = 0.12  #: target: median detection lag, as a share of the median inference
IN_FLIGHT = 50

#: (what the row shows, real median inference s, lognormal sigma, the model's prior s)
CASES: tuple[tuple[str, float, float, float], ...] = (
    ("M 2 s, prior 60 s (the simulator)", 2.0, 0.5, 60.0),
    ("M 6 s, prior 60 s (10x high)", 6.0, 0.45, 60.0),
    ("M 60 s, prior 60 s (right)", 60.0, 0.4, 60.0),
    ("M 300 s, prior 60 s", 300.0, 0.5, 60.0),
    ("M 300 s, prior 30 s (10x low)", 300.0, 0.45, 30.0),
)


def measure(*, items: int) -> Figure:
    figure = Figure("polling")
    results = []
    for label, median, sigma, prior in CASES:
        result = _run(items=items, median=median, sigma=sigma, prior=prior)
        result["label"] = label
        results.append(result)
        figure.rows.extend(_rows(label, result, items))
    figure.data = {"scaled_median": SCALED_MEDIAN, "cases": results}
    return figure


def _rows(label: str, result: dict[str, Any], items: int) -> list[Row]:
    polls, p50, p90 = result["polls_per_prediction"], result["lag_p50"], result["lag_p90"]
    best = result["frontier"]
    ok = polls <= MAX_POLLS and p50 <= MAX_LAG
    return [
        Row(
            f"3 polling {label}, {items} items: polls / lag p50 / p90 (of M)",
            f"{polls:.2f} / {p50:.3f} / {p90:.2f}   frontier at {polls:.2f} polls: "
            f"{best['lag_p50']:.3f} / {best['lag_p90']:.2f}",
            f"<= {MAX_POLLS:g} polls, p50 <= {MAX_LAG:g} M",
            ok,
        )
    ]


@contextlib.contextmanager
def _prior(seconds: float) -> Iterator[None]:
    """Run the engine with this prior in place of the catalogue's (the scaled model's typical time)."""
    original = engine.spec_for  # type: ignore[attr-defined]

    def scaled(name: str) -> catalogue.ModelSpec:
        return dataclasses.replace(original(name), expected_seconds=seconds)

    engine.spec_for = scaled  # type: ignore[attr-defined]
    try:
        yield
    finally:
        engine.spec_for = original  # type: ignore[attr-defined]


def _settings() -> RunSettings:
    return RunSettings(
        rate=4.0 * IN_FLIGHT / SCALED_MEDIAN,
        poll_rate=40.0 * IN_FLIGHT / SCALED_MEDIAN,
        max_in_flight=IN_FLIGHT,
        # left at the defaults, so not set by the user: the planner learns the steps (unused otherwise)
        poll_interval=DEFAULT_POLL_INTERVAL,
        poll_interval_max=DEFAULT_POLL_INTERVAL_MAX,
    )


def _run(*, items: int, median: float, sigma: float, prior: float) -> dict[str, Any]:
    scale = median / SCALED_MEDIAN
    knobs = {"inference_median": SCALED_MEDIAN, "inference_spread": sigma, "image_scale": TINY_SCALE}
    with tempfile.TemporaryDirectory() as tmp, SimProcess(**knobs) as sim, _prior(prior / scale):
        manifest = load_manifest(write_manifest(Path(tmp) / "bench.yaml", count=items, base_url=sim.base_url))
        run_engine(manifest, Path(tmp) / "out", sim.base_url, _settings())
        stats = sim.stats()
    return _summary(stats, sigma)


def _summary(stats: dict[str, Any], sigma: float) -> dict[str, Any]:
    predictions = list(stats["predictions"].values())
    lags = [p["first_done_seen_at"] - p["completed_at"] for p in predictions if p["first_done_seen_at"]]
    polls = stats["polls"] / max(1, len(predictions))
    frontier = best_schedule(sigma, max(polls, 1.0), samples=1000)
    return {
        "predictions": len(predictions),
        "detected": len(lags),
        "polls_per_prediction": polls,
        "inference_median": statistics.median(p["inference_seconds"] for p in predictions) / SCALED_MEDIAN,
        "lag_p50": percentile(lags, 0.5) / SCALED_MEDIAN,
        "lag_p90": percentile(lags, 0.9) / SCALED_MEDIAN,
        "frontier": dataclasses.asdict(frontier),
    }
