"""Figure 3, polling: polls per prediction, and the delay from a prediction finishing to the engine noticing.

Real edits take 20 s to a few minutes (the model prior is 60 s). Here every time is divided by
``SCALE`` = 30: inference is lognormal with a median of 2 s (spread 0.5), and the run settings are the
defaults divided the same way (rate, poll rate, poll interval and its cap). Polls per prediction and the
delay as a share of the median inference are then what a real run would see.

The first poll: ``poll_after`` is set to the model's prior divided by ``SCALE``, which is exactly where
the planner would start on a real run; it then learns from the predictions that finish.

Completion and detection times come from the simulator: ``completed_at`` and ``first_done_seen_at`` of
each prediction (both on the simulator's clock).
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path
from typing import Any

from batch_engine import settings
from batch_engine.api import catalogue
from batch_engine.manifest import load_manifest
from batch_engine.settings import RunSettings
from bench.common import MODEL, TINY_SCALE, Figure, Row, percentile, run_engine, write_manifest
from bench.simproc import SimProcess

SCALE = 30.0  #: real seconds per bench second
MEDIAN = 2.0  #: seconds: the scaled inference median (60 s real)
SPREAD = 0.5  #: lognormal sigma of inference times


def measure(*, items: int) -> Figure:
    learned = _run(items=items, poll_after=_scaled_prior())
    figure = Figure("polling")
    figure.rows = _rows(f"3 polling ({items} items, times /{SCALE:g}), learned first poll", learned)
    figure.data = {"scale": SCALE, "median": MEDIAN, "spread": SPREAD, "learned": learned}
    return figure


def _rows(label: str, result: dict[str, Any]) -> list[Row]:
    median = result["inference_median"]
    return [
        Row(f"{label}: polls/prediction", f"{result['polls_per_prediction']:.2f}"),
        Row(
            "  completion-to-detection delay p50 / p90",
            f"{result['delay_p50']:.2f} / {result['delay_p90']:.2f} s"
            f" ({result['delay_p50'] / median:.2f} / {result['delay_p90'] / median:.2f} of median inference)",
        ),
    ]


def _scaled_prior() -> float:
    return catalogue.spec_for(MODEL).expected_seconds / SCALE


def _settings(poll_after: float | None) -> RunSettings:
    return RunSettings(
        rate=settings.DEFAULT_RATE * SCALE,
        poll_rate=settings.DEFAULT_POLL_RATE * SCALE,
        poll_interval=settings.DEFAULT_POLL_INTERVAL / SCALE,
        poll_interval_max=settings.DEFAULT_POLL_INTERVAL_MAX / SCALE,
        poll_after=poll_after,
    )


def _run(*, items: int, poll_after: float | None) -> dict[str, Any]:
    knobs = {"inference_median": MEDIAN, "inference_spread": SPREAD, "image_scale": TINY_SCALE}
    with tempfile.TemporaryDirectory() as tmp, SimProcess(**knobs) as sim:
        manifest = load_manifest(write_manifest(Path(tmp) / "bench.yaml", count=items, base_url=sim.base_url))
        run_engine(manifest, Path(tmp) / "out", sim.base_url, _settings(poll_after))
        stats = sim.stats()
    return _summary(stats)


def _summary(stats: dict[str, Any]) -> dict[str, Any]:
    predictions = list(stats["predictions"].values())
    delays = [p["first_done_seen_at"] - p["completed_at"] for p in predictions if p["first_done_seen_at"]]
    return {
        "predictions": len(predictions),
        "detected": len(delays),
        "polls": stats["polls"],
        "polls_per_prediction": stats["polls"] / max(1, len(predictions)),
        "inference_median": statistics.median(p["inference_seconds"] for p in predictions),
        "delay_p50": percentile(delays, 0.5),
        "delay_p90": percentile(delays, 0.9),
        "delay_max": max(delays, default=float("nan")),
    }
