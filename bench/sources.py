"""Figure 5, items from files at any size: CSV and JSONL files of 100,000 and 1,000,000 items, via the CLI.

For each file format and size, three commands run as child processes, each measured on its own (peak RSS
from ``wait4``, wall time from its start, events from its JSON log lines):

- ``validate``: reading and checking every item;
- ``run --max-submits 1000``: the start-up of a real run (checking the items, taking all of them into a new
  journal) and then a thousand predictions end to end, reports over every item at the end; from its log,
  the seconds to its first accepted submit and the journal's items per second;
- the same ``run`` again (``--max-submits 1``): a resume of the now full journal, and the seconds until
  its first new submit.

Targets (issue 12): peak RSS at most 300 MB, and no more than 50 MB growth from 100k to 1M items. The
largest YAML manifest under 300 MB is estimated from two YAML sizes' peaks (YAML items are held in memory
with their document; a file source is streamed).
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from bench.common import DISTINCT_INPUTS, Figure, Row
from bench.simproc import ROOT, SimProcess

PEAK_TARGET_MB = 300.0
GROWTH_TARGET_MB = 50.0
RUN_SUBMITS = 1000
ENGINE = (sys.executable, "-m", "batch_engine")
FAST = (
    "--poll-after",
    "0.05",
    "--poll-interval",
    "0.05",
    "--poll-interval-max",
    "0.5",
    "--poll-rate",
    "2000",
)


@dataclass(frozen=True)
class Child:
    """One command's figures: its wall time, its peak RSS and its log events."""

    seconds: float
    peak_mb: float
    events: list[dict[str, Any]]
    started: float  #: unix seconds when it was started

    def after(self, words: str) -> float | None:
        """Seconds from the start to the first log line containing ``words``, or None."""
        for event in self.events:
            text = str(event.get("message") or event.get("text") or "")
            if words in text and "ts" in event:
                return datetime.fromisoformat(str(event["ts"])).timestamp() - self.started
        return None

    def message(self, words: str) -> str:
        return next(
            (str(e.get("message", "")) for e in self.events if words in str(e.get("message", ""))), ""
        )


def measure(*, sizes: list[int], work: Path, yaml_sizes: tuple[int, int] = (20_000, 80_000)) -> Figure:
    figure = Figure("sources")
    with SimProcess(inference_polls=1, image_scale=1 / 16) as sim:
        for kind in ("csv", "jsonl"):
            peaks = [_one(figure, kind, size, sim.base_url, work) for size in sizes]
            if len(peaks) > 1:
                growth = peaks[-1] - peaks[0]
                figure.rows.append(
                    Row(
                        f"5. {kind}: run peak growth {sizes[0]:,} → {sizes[-1]:,} items",
                        f"{growth:+.0f} MB",
                        f"≤ {GROWTH_TARGET_MB:.0f} MB",
                        growth <= GROWTH_TARGET_MB,
                    )
                )
    figure.rows.append(_largest_yaml(figure, yaml_sizes, work))
    return figure


def _one(figure: Figure, kind: str, size: int, base_url: str, work: Path) -> float:
    folder = work / f"sources-{kind}-{size}"
    manifest = _write(folder, kind, size, base_url)
    checked = _child(["validate", str(manifest)])
    out = folder / "out"
    run_args = ["run", str(manifest), "--out", str(out), "--base-url", base_url, "--rate", "1000"]
    run_args += ["--max-in-flight", "200", *FAST, "--json-logs", "-v", "--fresh", "--yes"]
    first = _child([*run_args, "--max-submits", str(RUN_SUBMITS)])
    resumed = _child([*run_args[:-2], "--max-submits", "1"])
    startup = first.after("submitted as")
    synced = first.after("journal:")
    loaded = first.after("checked in")
    per_second = size / (synced - loaded) if synced and loaded and synced > loaded else float("nan")
    resume = resumed.after("submitted as")
    peak = max(checked.peak_mb, first.peak_mb, resumed.peak_mb)
    label = f"5. {kind}, {size:,} items"
    figure.rows += [
        Row(
            f"{label}: validate, seconds; peak RSS",
            f"{checked.seconds:.1f} s; {checked.peak_mb:.0f} MB",
            f"≤ {PEAK_TARGET_MB:.0f} MB",
            checked.peak_mb <= PEAK_TARGET_MB,
        ),
        Row(
            f"{label}: run start-up to first submit; items/s into the journal; peak RSS",
            f"{_seconds(startup)}; {per_second:,.0f}/s; {first.peak_mb:.0f} MB",
            f"≤ {PEAK_TARGET_MB:.0f} MB",
            first.peak_mb <= PEAK_TARGET_MB,
        ),
        Row(
            f"{label}: resume of the full journal to first new submit; peak RSS",
            f"{_seconds(resume)}; {resumed.peak_mb:.0f} MB",
            f"≤ {PEAK_TARGET_MB:.0f} MB",
            resumed.peak_mb <= PEAK_TARGET_MB,
        ),
    ]
    figure.data[f"{kind}-{size}"] = {
        "validate_seconds": checked.seconds, "validate_peak_mb": checked.peak_mb,
        "run_seconds": first.seconds, "run_peak_mb": first.peak_mb, "startup_seconds": startup,
        "journal_items_per_second": per_second, "resume_seconds": resume, "resume_peak_mb": resumed.peak_mb,
    }  # fmt: skip
    return peak


def _largest_yaml(figure: Figure, sizes: tuple[int, int], work: Path) -> Row:
    peaks = []
    for size in sizes:
        path = work / f"sources-yaml-{size}.yaml"
        _write_yaml(path, size)
        peaks.append(_child(["validate", str(path)]).peak_mb)
    per_item = (peaks[1] - peaks[0]) / (sizes[1] - sizes[0])
    largest = sizes[0] + (PEAK_TARGET_MB - peaks[0]) / per_item if per_item > 0 else float("inf")
    figure.data["yaml"] = {"sizes": list(sizes), "peaks_mb": peaks, "kb_per_item": per_item * 1024}
    return Row(
        "5. YAML manifest: memory per inline item; largest that validates under 300 MB (estimated)",
        f"{per_item * 1024:.2f} kB; about {largest:,.0f} items",
    )


def _child(args: list[str]) -> Child:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPTPROTO_")} | {
        "GPTPROTO_API_KEY": "bench"
    }
    started = time.time()
    clock = time.perf_counter()
    proc = subprocess.Popen([*ENGINE, *args], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    assert proc.stderr is not None
    lines = proc.stderr.readlines()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - clock
    events = [json.loads(line) for line in lines if line.startswith("{")]
    if proc.returncode not in (0, 1, 3):
        tail = "".join(lines[-5:])
        raise RuntimeError(f"batch-engine {' '.join(args[:2])} exited {proc.returncode}: {tail}")
    return Child(seconds, usage.ru_maxrss / 1024.0, events, started)


def _write(folder: Path, kind: str, size: int, base_url: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    items = folder / f"items.{kind}"
    rows = (
        {"id": f"sku-{i:07d}", "prompt": f"Place product {i} on a sunlit marble counter",
         "images": f"{base_url}/_sim/inputs/input-{i % DISTINCT_INPUTS}.png", "title": f"Product {i}",
         "category": f"cat-{i % 50}"}
        for i in range(size)
    )  # fmt: skip
    with items.open("w", encoding="utf-8", newline="") as out:
        if kind == "csv":
            writer = csv.DictWriter(out, ["id", "prompt", "images", "title", "category"])
            writer.writeheader()
            writer.writerows(rows)
        else:
            out.writelines(json.dumps({**row, "images": [row["images"]]}) + "\n" for row in rows)
    manifest = folder / "job.yaml"
    manifest.write_text(
        f"version: 1\nname: sources-{kind}-{size}\nitems_from: items.{kind}\n", encoding="utf-8"
    )
    return manifest


def _write_yaml(path: Path, size: int) -> None:
    with path.open("w", encoding="utf-8") as out:
        out.write("version: 1\nname: yaml\nitems:\n")
        for i in range(size):
            out.write(f"  - id: sku-{i:07d}\n    prompt: Place product {i} on a marble counter\n")
            out.write(f"    images: [https://example.com/{i % DISTINCT_INPUTS}.png]\n")


def _seconds(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f} s"
