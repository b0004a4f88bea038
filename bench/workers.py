"""Figure 6, several workers on one run through a PostgreSQL journal (issue 14), via the CLI.

(a) Throughput: the same manifest worked by 1, 2 and 4 worker processes sharing a PostgreSQL journal,
against an unlimited simulator in a process of its own (predictions done on their first poll, tiny
outputs): items per second from the first worker's start to the last one's exit. Beside it, the best known
point: one process with the default SQLite journal on the same manifest. Each configuration runs
``repeat`` times; the worst and the spread are printed, never the best alone. On a machine with fewer
cores than processes (the workers, the simulator, PostgreSQL) the workers compete for the CPU: the ratio to
one SQLite process says what sharing costs there, not what more machines would gain.

(b) Pacing: four workers against a key limited to L submits/s (a strict GCRA with a burst of two), each
configured at L: the combined accepted rate over the span of the accepted submits, over L, and the share
of submit requests answered 429 (targets: at least 0.9 L, at most 3 % 429s: what one process reaches).
(c) The same four configured at 5 L with adaptation: the steady rate (second half of the span) over L and
the 429 share, beside one process's figure 2b.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from bench.common import TINY_SCALE, UNLIMITED, Figure, Row, write_manifest
from bench.simproc import ROOT, SimProcess

TARGET_RATE = 0.9
TARGET_429_SHARE = 0.03
ENGINE = (sys.executable, "-m", "batch_engine")
FAST = ("--poll-after", "0.05", "--poll-interval", "0.05", "--poll-interval-max", "0.5", "-q")


def measure(*, items: int, paced_items: int, rate: float, repeat: int, work: Path) -> Figure:
    from tests.pg import database  # the machine's PostgreSQL, else one from pgserver

    figure = Figure("workers")
    with database() as url:
        throughput = _throughput(figure, url, items=items, repeat=repeat, work=work)
        fixed = _paced(url, rate=rate, configured=rate, items=paced_items, work=work)
        adaptive = _paced(url, rate=rate, configured=5 * rate, items=paced_items, work=work)
    fixed_ratio = _overall(fixed["accepted_times"]) / rate
    fixed_share = _share(fixed)
    figure.rows += [
        Row(
            f"6b 4 workers at L={rate:g}/s: accepted rate / L",
            f"{fixed_ratio:.3f} ({fixed['accepted']} submits)",
            f">= {TARGET_RATE}",
            fixed_ratio >= TARGET_RATE,
        ),
        Row(
            "6b   429s / submit requests",
            f"{fixed_share:.3f} ({fixed['rate_limited_submits']} of {fixed['submit_requests']})",
            f"<= {TARGET_429_SHARE}",
            fixed_share <= TARGET_429_SHARE,
        ),
        Row(
            "6c 4 workers at 5L, adapting: steady rate / L (2nd half)",
            f"{_second_half(adaptive['accepted_times']) / rate:.3f} ({adaptive['accepted']} submits)",
            "one process (2b): >= 0.85",
        ),
        Row(
            "6c   429s / submit requests",
            f"{_share(adaptive):.3f} ({adaptive['rate_limited_submits']} of {adaptive['submit_requests']})",
            "one process (2b): < 0.05",
        ),
    ]
    figure.data = {
        "throughput": throughput,
        "fixed": {k: v for k, v in fixed.items() if k != "accepted_times"} | {"ratio": fixed_ratio},
        "adaptive": {k: v for k, v in adaptive.items() if k != "accepted_times"},
        "cpus": os.cpu_count(),
    }
    return figure


def _throughput(figure: Figure, url: str, *, items: int, repeat: int, work: Path) -> dict[str, Any]:
    found: dict[str, list[float]] = {}
    with SimProcess(inference_polls=1, image_scale=TINY_SCALE) as sim:
        for label, workers, shared in (("sqlite", 1, False), ("1", 1, True), ("2", 2, True), ("4", 4, True)):
            found[label] = [
                _items_per_second(sim.base_url, url if shared else None, workers, items, work)
                for _ in range(repeat)
            ]
    best_known = min(found["sqlite"])
    figure.rows.append(
        Row(
            f"6a one process, SQLite journal, {items} items: items/s (worst; spread)",
            f"{best_known:.0f} ({_spread(found['sqlite'])})",
            "the best known point",
        )
    )
    for label in ("1", "2", "4"):
        worst = min(found[label])
        figure.rows.append(
            Row(
                f"6a {label} worker(s), PostgreSQL journal: items/s (worst; spread)",
                f"{worst:.0f} ({_spread(found[label])}); {worst / best_known:.2f} x SQLite",
            )
        )
    return found


def _items_per_second(base_url: str, url: str | None, workers: int, items: int, work: Path) -> float:
    name = f"bench-{uuid.uuid4().hex[:8]}"
    folder = work / name
    manifest = write_manifest(folder / "job.yaml", count=items, base_url=base_url, name=name)
    args = ["run", str(manifest), "--out", str(folder / "out"), "--base-url", base_url, *FAST]
    args += ["--rate", str(UNLIMITED), "--max-in-flight", "200", "--poll-rate", str(UNLIMITED)]
    if url is not None:
        args += ["--journal", url]
    started = time.perf_counter()
    procs = [_start(args) for _ in range(workers)]
    codes = [proc.wait() for proc in procs]
    seconds = time.perf_counter() - started
    if any(code != 0 for code in codes):
        raise RuntimeError(f"a worker failed ({codes}) in {folder}")
    return items / seconds


def _paced(url: str, *, rate: float, configured: float, items: int, work: Path) -> dict[str, Any]:
    knobs = {"submit_rate": rate, "submit_burst": 2, "retry_after": 1.0, "image_scale": TINY_SCALE}
    name = f"bench-paced-{uuid.uuid4().hex[:8]}"
    folder = work / name
    with SimProcess(inference_median=0.05, **knobs) as sim:
        manifest = write_manifest(folder / "job.yaml", count=items, base_url=sim.base_url, name=name)
        args = ["run", str(manifest), "--out", str(folder / "out"), "--base-url", sim.base_url, *FAST]
        args += ["--rate", str(configured), "--max-in-flight", "1000", "--journal", url]
        procs = [_start(args) for _ in range(4)]
        codes = [proc.wait() for proc in procs]
        if any(code != 0 for code in codes):
            raise RuntimeError(f"a worker failed ({codes}) in {folder}")
        return sim.stats()


def _start(args: list[str]) -> subprocess.Popen[bytes]:
    env = {**os.environ, "GPTPROTO_API_KEY": "bench-key", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([*ENGINE, *args], cwd=ROOT, env=env, stdout=subprocess.DEVNULL)


def _share(stats: dict[str, Any]) -> float:
    return float(stats["rate_limited_submits"]) / max(1, int(stats["submit_requests"]))


def _overall(times: list[float]) -> float:
    return (len(times) - 1) / (times[-1] - times[0])


def _second_half(times: list[float]) -> float:
    middle = (times[0] + times[-1]) / 2
    return sum(t >= middle for t in times) / (times[-1] - middle)


def _spread(values: list[float]) -> str:
    return f"{min(values):.0f}-{max(values):.0f}" if len(values) > 1 else "one run"
