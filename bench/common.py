"""What every figure shares: generated manifests, an in-process engine run, the rows of the table."""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio

from batch_engine.api.client import ClientConfig
from batch_engine.engine import RunOptions, RunResult, run_manifest
from batch_engine.settings import SETTING_RANGES, RunSettings
from batch_engine.ui.progress import QuietView
from batch_engine.values import Manifest

MODEL = "openai/gpt-image-2-plus"
SIZE = "1024x1024"
TINY_SCALE = 1 / 16  #: simulator image_scale: 1024x1024 outputs are rendered at 64x64
API_KEY = "bench-key"  #: the simulator accepts any non-empty key
DISTINCT_INPUTS = 8  #: input images shared by the items (index.html copies each distinct one at the end)
#: a rate (per second) no run comes near: "no limit" where a limit must be finite (the most a setting takes)
UNLIMITED = SETTING_RANGES["rate"].high


@dataclass(frozen=True)
class Row:
    """One line of the table: a figure's value next to its target."""

    figure: str
    value: str
    target: str = ""
    passed: bool | None = None  #: None: reported for information, no target

    @property
    def verdict(self) -> str:
        return "" if self.passed is None else "pass" if self.passed else "FAIL"


@dataclass
class Figure:
    """One figure's rows for the table and its numbers for results.json."""

    name: str
    rows: list[Row] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)


def write_manifest(path: Path, *, count: int, base_url: str, name: str = "bench") -> Path:
    """A valid image-edit manifest of ``count`` items whose inputs the simulator at ``base_url`` serves."""
    path.parent.mkdir(parents=True, exist_ok=True)
    head = f"version: 1\nname: {name}\nmodel: {MODEL}\ntask: image-edit\n"
    head += f"defaults:\n  size: {SIZE}\n  response_format: url\nitems:\n"
    with path.open("w", encoding="utf-8") as out:
        out.write(head)
        for i in range(count):
            out.write(
                f"  - id: item-{i:06d}\n"
                f"    prompt: Place product {i} on a sunlit marble counter, keep the product unchanged\n"
                f"    images: [{base_url}/_sim/inputs/input-{i % DISTINCT_INPUTS}.png]\n"
            )
    return path


@dataclass(frozen=True)
class EngineRun:
    """An in-process engine run: its result and how long `run_manifest` took (manifest load excluded)."""

    result: RunResult
    seconds: float
    user: float  #: process CPU seconds (every thread) spent in `run_manifest`, in user mode
    system: float  #: ... and in the kernel


def run_engine(
    manifest: Manifest, out_dir: Path, base_url: str, settings: RunSettings, *, fresh: bool = True
) -> EngineRun:
    """Time one `run_manifest` (fresh unless told otherwise) with the quiet view."""
    options = RunOptions(
        out_dir=out_dir,
        settings=settings,
        client=ClientConfig(base_url=base_url, api_key=API_KEY),
        fresh=fresh,
    )
    before = resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()
    result = anyio.run(_run, manifest, options)
    seconds = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_SELF)
    return EngineRun(result, seconds, after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime)


async def _run(manifest: Manifest, options: RunOptions) -> RunResult:
    return await run_manifest(manifest, options, view=QuietView())


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``values``, by linear interpolation between order statistics."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)
