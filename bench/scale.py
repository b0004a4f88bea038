"""Figure 4, scale: peak memory and time of runs over 10,000 and 100,000 generated items.

Each size runs in a child process of its own (``python -m bench.scale '<job as JSON>'``), so that its
memory figures are its own. The child measures, from ``/proc/self/status``, after each phase:

- ``imports``: resident memory once batch_engine is imported;
- ``manifest``: resident memory holding the loaded manifest (after a collection), and load's peak;
- ``sync``: the peak while the journal takes in every item (``sync_manifest`` of a new journal);
- ``run``: the peak of `run_manifest` itself (the journal already synced), and within it, from RSS
  sampled every 20 ms, the peak while it syncs the journal again (every item unchanged), while the stages
  run (submit, poll, download: the part that must not grow with the item count) and while it writes the
  reports (which read every item).

The peak (VmHWM) is reset between phases by writing 5 to ``/proc/self/clear_refs``, so each phase's
peak is its own; where the kernel refuses, the lifetime peak is reported and flagged (``peak_reset``).
Every size submits the same number of predictions (10,000 by default: ``--max-submits`` on the larger
manifests), so the difference between sizes is the item count, not the work done per prediction. A full
100,000-item run is not the default: at the 300-400 items/s these 2-core machines reach it takes over five
minutes (``python -m bench --only scale --scale-submits 100000`` runs one). What the 100,000-item
figure does cover: loading and validating all of them, syncing all of them into a new journal, the run's
own sync of all of them, 10,000 predictions end to end, and reports over all 100,000.
"""

from __future__ import annotations

import gc
import json
import logging
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar
from unittest import mock

import anyio

from batch_engine import engine
from batch_engine.manifest import load_manifest
from batch_engine.report import write as report
from batch_engine.settings import RunSettings
from batch_engine.store.journal import SyncResult
from batch_engine.store.sqlite import SqliteJournal
from batch_engine.values import Manifest
from bench.common import TINY_SCALE, UNLIMITED, Figure, Row, run_engine, write_manifest
from bench.simproc import ROOT, SimProcess

MB = 1024.0  #: /proc reports kB
SAMPLE_SECONDS = 0.02
_T = TypeVar("_T")
#: A run's peak beyond the manifest may grow this much between sizes, as a share of the growth of the
#: manifest's own memory: more would mean the engine holds something per item besides the manifest.
TARGET_GROWTH = 0.25


def measure(*, sizes: list[int], submits: int, work: Path) -> Figure:
    """One child per size; each submits ``min(size, submits)`` predictions."""
    results = [_child(size, min(size, submits), work / f"scale-{size}") for size in sizes]
    return _figure(results)


def _figure(results: list[dict[str, Any]]) -> Figure:
    figure = Figure("scale")
    for r in results:
        figure.rows += [
            Row(
                f"4 scale: {r['items']:,} items ({r['submits']:,} submitted), MB",
                f"manifest {r['manifest_mb']:.0f}; run peak over it +{r['run_extra_mb']:.0f}"
                f" (sync +{r['run_sync_extra_mb']:.0f}, stages +{r['run_stages_extra_mb']:.0f},"
                f" reports +{r['run_reports_extra_mb']:.0f})",
            ),
            Row(
                "  seconds: load, run (reports in it); submits/s",
                f"{r['load_seconds']:.1f}, {r['run_seconds']:.1f} ({r['run_reports_seconds']:.1f});"
                f" {r['submits'] / r['run_seconds']:.0f}/s",
            ),
        ]
    if len(results) >= 2:
        figure.rows.append(_growth_row(results[0], results[-1]))
    figure.data = {"runs": results, "target_growth": TARGET_GROWTH}
    return figure


def _growth_row(small: dict[str, Any], large: dict[str, Any]) -> Row:
    """Does the run's peak beyond the manifest grow with the item count, compared with the manifest?"""
    manifest_growth = large["manifest_mb"] - small["manifest_mb"]
    run_growth = large["run_extra_mb"] - small["run_extra_mb"]
    share = run_growth / manifest_growth if manifest_growth > 0 else float("nan")
    return Row(
        f"  run peak beyond the manifest, {small['items']:,} -> {large['items']:,} items",
        f"{run_growth:+.0f} MB vs manifest {manifest_growth:+.0f} MB ({share:.2f})",
        f"< {TARGET_GROWTH} of manifest",
        share < TARGET_GROWTH,
    )


def _child(items: int, submits: int, work: Path) -> dict[str, Any]:
    with SimProcess(inference_polls=1, image_scale=TINY_SCALE) as sim:
        manifest = write_manifest(work / "bench.yaml", count=items, base_url=sim.base_url)
        job: dict[str, Any] = {"manifest": str(manifest), "out": str(work / "out")}
        job |= {"base_url": sim.base_url, "submits": submits}
        cmd = [sys.executable, "-m", "bench.scale", json.dumps(job)]
        done = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    result: dict[str, Any] = json.loads(done.stdout.splitlines()[-1])
    return result


# ---- the child --------------------------------------------------------------------------------------------


def _memory() -> dict[str, float]:
    """VmRSS and VmHWM of this process, in MB."""
    found: dict[str, float] = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            found[key] = int(value.split()[0]) / MB
    return found


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux 4.0+); False when the kernel does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


class _Sampler:
    """VmRSS every ``every`` seconds from a thread, to split a run's peak by what it was doing."""

    def __init__(self, every: float = SAMPLE_SECONDS) -> None:
        self._every = every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self.samples: list[tuple[float, float]] = []  #: (perf_counter, MB)

    def __enter__(self) -> _Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        while not self._stop.wait(self._every):
            self.samples.append((time.perf_counter(), _memory()["VmRSS"]))

    def peak(self, start: float, end: float) -> float:
        """The highest sample in [start, end], or the first one after ``start`` if none fell inside."""
        inside = [mb for t, mb in self.samples if start <= t <= end]
        return max(inside) if inside else next((mb for t, mb in self.samples if t >= start), 0.0)


@contextmanager
def _windows() -> Iterator[dict[str, list[float]]]:
    """Note when the journal sync and the report writing run (start, end; perf_counter seconds)."""
    windows: dict[str, list[float]] = {"sync": [], "reports": []}
    sync, reports = SqliteJournal.sync_manifest, report.write_reports  # the engine's write_reports

    async def timed_sync(self: SqliteJournal, manifest: Manifest, **kwargs: Any) -> SyncResult:
        windows["sync"].append(time.perf_counter())
        try:
            return await sync(self, manifest, **kwargs)
        finally:
            windows["sync"].append(time.perf_counter())

    def timed_reports(*args: Any, **kwargs: Any) -> dict[str, Path]:
        windows["reports"].append(time.perf_counter())
        try:
            return reports(*args, **kwargs)
        finally:
            windows["reports"].append(time.perf_counter())

    with (
        mock.patch.object(SqliteJournal, "sync_manifest", timed_sync),
        mock.patch.object(engine, "write_reports", timed_reports),
    ):
        yield windows


async def _sync(manifest: Manifest, out_dir: Path) -> None:
    async with await SqliteJournal.open(out_dir) as journal:
        await journal.sync_manifest(manifest)


def _phase(work: Callable[[], _T]) -> tuple[_T, float, float]:
    """Run ``work()``; return its value, its seconds and its peak RSS in MB."""
    _reset_peak()
    started = time.perf_counter()
    value = work()
    seconds = time.perf_counter() - started
    return value, seconds, _memory()["VmHWM"]


def child(job: dict[str, Any]) -> dict[str, Any]:
    """Load, sync and run one manifest, measuring each phase (see the module docstring)."""
    imports_mb = _memory()["VmRSS"]
    path, out_dir = Path(job["manifest"]), Path(job["out"])
    manifest, load_seconds, load_peak = _phase(lambda: load_manifest(path))
    gc.collect()
    held_mb = _memory()["VmRSS"]
    _, sync_seconds, sync_peak = _phase(lambda: anyio.run(_sync, manifest, out_dir))
    settings = RunSettings(rate=UNLIMITED, poll_rate=UNLIMITED, poll_after=0.0, max_submits=job["submits"])
    with _Sampler() as sampler, _windows() as windows:
        run, run_seconds, run_peak = _phase(
            lambda: run_engine(manifest, out_dir, job["base_url"], settings, fresh=False)
        )
    (sync_start, sync_end), (reports_start, reports_end) = windows["sync"], windows["reports"]
    return {
        "items": manifest.count,
        "submits": run.result.stats.submits,
        "succeeded": run.result.stats.by_state.get("succeeded", 0),
        "peak_reset": _reset_peak(),
        "imports_mb": imports_mb,
        "manifest_mb": held_mb - imports_mb,
        "load_peak_mb": load_peak - imports_mb,
        "sync_extra_mb": sync_peak - held_mb,
        "run_extra_mb": run_peak - held_mb,
        "run_sync_extra_mb": sampler.peak(sync_start, sync_end) - held_mb,
        "run_stages_extra_mb": sampler.peak(sync_end, reports_start) - held_mb,
        "run_stages_start_extra_mb": sampler.peak(sync_end, sync_end) - held_mb,
        "run_reports_extra_mb": sampler.peak(reports_start, reports_end) - held_mb,
        "load_seconds": load_seconds,
        "sync_seconds": sync_seconds,
        "run_seconds": run_seconds,
        "run_sync_seconds": sync_end - sync_start,
        "run_reports_seconds": reports_end - reports_start,
    }


if __name__ == "__main__":
    logging.basicConfig(level=logging.ERROR)  # the budget stop's warning is expected here
    print(json.dumps(child(json.loads(sys.argv[1]))))
