"""Figure 1, overhead: the engine's items per second next to a minimal aiohttp loop doing the same requests.

Rows 1b: the simulator costs more CPU than either client, which hides the client's cost; so the CLI and a
bare loop, each in a process of its own, also run against `bench.light_server` (answers at once, tiny
outputs), interleaved A/B, with the worst and the spread of the ratio and each child's CPU ms per item.

Each run (the loop, the loop saving outputs, the engine in-process, the engine through the CLI) gets a
fresh simulator process of its own with the same knobs: inference done at the first poll, 64x64 outputs,
no limits. Runs are interleaved ``repeat`` times and the best of each kind is compared, so a noisy moment
hurts one run, not the ratio. Nothing is pinned to a CPU: on these VMs pinning made file creation and
fsync cost several times more CPU, which would charge the engine (it writes files) and not the loop.

The second loop ("loop + files") also saves each output with the engine's own `write_atomic` in a worker
thread: the gap between it and the plain loop is the price of durable outputs; the gap between it and the
engine is the engine's own machinery (journal, pacing, poll queue, results.jsonl, reports).
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import anyio.to_thread

from batch_engine.api.catalogue import spec_for, submit_path, wire_body
from batch_engine.api.client import DEFAULT_CONNECTIONS
from batch_engine.manifest import load_manifest
from batch_engine.settings import RunSettings
from batch_engine.store.files import output_relpath, write_atomic
from bench.common import API_KEY, MODEL, TINY_SCALE, UNLIMITED, Figure, Row, run_engine, write_manifest
from bench.simproc import SimProcess

TARGET = 0.8
SIM_KNOBS: Mapping[str, Any] = {"inference_polls": 1, "image_scale": TINY_SCALE}
FINAL = ("completed", "failed")
KINDS = ("loop", "loop_files", "engine", "cli")


@dataclass(frozen=True)
class Timing:
    """One run of one client: items finished, wall seconds, CPU seconds (user, system; every thread)."""

    items: int
    seconds: float
    user: float
    system: float

    @property
    def rate(self) -> float:
        return self.items / self.seconds

    def cpu_ms(self) -> float:
        """Client CPU per item, in milliseconds."""
        return 1000 * (self.user + self.system) / self.items


def measure(*, items: int, concurrency: int, repeat: int, work: Path) -> Figure:
    """Run every kind of client ``repeat`` times, interleaved; compare the best run of each."""
    runs: dict[str, list[Timing]] = {kind: [] for kind in KINDS}
    for round_ in range(repeat):
        runs["loop"].append(_loop_run(items, concurrency, save_to=None))
        runs["loop_files"].append(_loop_run(items, concurrency, save_to=work / f"loop-{round_}"))
        runs["engine"].append(_engine_run(items, concurrency, work / f"engine-{round_}"))
        runs["cli"].append(_cli_run(items, concurrency, work / f"cli-{round_}"))
    figure = _figure(runs, items=items, concurrency=concurrency, startup=_startup_seconds())
    light = measure_light(items=items, concurrency=concurrency, repeat=repeat, work=work / "light")
    figure.rows += light_rows(light)
    figure.data["light"] = {kind: [asdict(t) for t in timings] for kind, timings in light.items()}
    return figure


def _figure(runs: dict[str, list[Timing]], *, items: int, concurrency: int, startup: float) -> Figure:
    best = {kind: max(timings, key=lambda t: t.rate) for kind, timings in runs.items()}
    loop, files, engine, cli = (best[kind] for kind in KINDS)
    ratio = engine.rate / loop.rate
    figure = Figure("overhead")
    figure.rows = [
        Row(
            f"1 overhead: engine / loop items/s ({items} items, {concurrency} in flight)",
            f"{ratio:.2f} ({engine.rate:.0f} vs {loop.rate:.0f}/s)",
            f">= {TARGET}",
            ratio >= TARGET,
        ),
        Row(
            "  engine / loop that also saves outputs",
            f"{engine.rate / files.rate:.2f} ({files.rate:.0f}/s)",
        ),
        Row(
            "  client CPU/item: engine, loop + files, loop",
            f"{engine.cpu_ms():.2f} / {files.cpu_ms():.2f} / {loop.cpu_ms():.2f} ms",
        ),
        Row(
            "  CLI subprocess / loop items/s (start-up in; wall: CLI vs in-process)",
            f"{cli.rate / loop.rate:.2f} ({cli.rate:.0f}/s;"
            f" wall {cli.seconds:.2f} s vs {engine.seconds:.2f} s)",
        ),
        Row("  CLI start-up (batch-engine --version)", f"{startup:.2f} s"),
    ]
    figure.data = {
        "items": items,
        "concurrency": concurrency,
        "ratio": ratio,
        "ratio_vs_loop_with_files": engine.rate / files.rate,
        "cli_ratio": cli.rate / loop.rate,
        "startup_seconds": startup,
        "cpu_ms_per_item": {kind: best[kind].cpu_ms() for kind in KINDS},
        "target": TARGET,
        "passed": ratio >= TARGET,
        "runs": {kind: [asdict(t) for t in timings] for kind, timings in runs.items()},
    }
    return figure


def _settings(concurrency: int) -> RunSettings:
    return RunSettings(rate=UNLIMITED, poll_rate=UNLIMITED, poll_after=0.0, max_in_flight=concurrency)


def _engine_run(items: int, concurrency: int, work: Path) -> Timing:
    with SimProcess(**SIM_KNOBS) as sim:
        manifest = write_manifest(work / "bench.yaml", count=items, base_url=sim.base_url)
        run = run_engine(load_manifest(manifest), work / "out", sim.base_url, _settings(concurrency))
    succeeded = run.result.stats.by_state.get("succeeded", 0)
    if succeeded != items:
        raise RuntimeError(f"the engine run ended with {succeeded} of {items} items succeeded")
    return Timing(items, run.seconds, run.user, run.system)


def _cli_run(items: int, concurrency: int, work: Path) -> Timing:
    with SimProcess(**SIM_KNOBS) as sim:
        manifest = write_manifest(work / "bench.yaml", count=items, base_url=sim.base_url)
        flags = ["--rate", str(UNLIMITED), "--poll-rate", str(UNLIMITED), "--poll-after", "0"]
        flags += ["--max-in-flight", str(concurrency), "--fresh", "--yes", "-q"]
        cmd = [*_cli(), "run", str(manifest), "--base-url", sim.base_url, "--out", str(work / "out"), *flags]
        return _timed(cmd, items)


def _startup_seconds(tries: int = 3) -> float:
    return min(_timed([*_cli(), "--version"], 1).seconds for _ in range(tries))


def _timed(cmd: list[str], items: int) -> Timing:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPTPROTO_")}
    env["GPTPROTO_API_KEY"] = API_KEY
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - started
    return Timing(items, seconds, *_cpu_since(before, resource.RUSAGE_CHILDREN))


def _cpu_since(before: resource.struct_rusage, who: int) -> tuple[float, float]:
    after = resource.getrusage(who)
    return after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime


def _cli() -> list[str]:
    script = Path(sys.executable).parent / "batch-engine"
    return [str(script)] if script.exists() else [sys.executable, "-m", "batch_engine"]


# ---- the minimal loop -----------------------------------------------------------------------------------


def _loop_run(items: int, concurrency: int, *, save_to: Path | None) -> Timing:
    with tempfile.TemporaryDirectory() as tmp, SimProcess(**SIM_KNOBS) as sim:
        manifest = load_manifest(write_manifest(Path(tmp) / "bench.yaml", count=items, base_url=sim.base_url))
        spec = spec_for(MODEL)
        bodies = [(item.id, wire_body(spec, item.request)) for item in manifest.iter_items()]
        before = resource.getrusage(resource.RUSAGE_SELF)
        started = time.perf_counter()
        done = anyio.run(minimal_loop, sim.base_url, bodies, concurrency, save_to)
        seconds = time.perf_counter() - started
        user, system = _cpu_since(before, resource.RUSAGE_SELF)
    if done != items:
        raise RuntimeError(f"the loop finished {done} of {items} items")
    return Timing(items, seconds, user, system)


async def minimal_loop(
    base_url: str, bodies: list[tuple[str, dict[str, Any]]], concurrency: int, save_to: Path | None = None
) -> int:
    """Submit, poll until done, download (and save, given ``save_to``) per item, ``concurrency`` at a time.

    Returns how many items completed.
    """
    connector = aiohttp.TCPConnector(limit=DEFAULT_CONNECTIONS, limit_per_host=0)
    queue = iter(bodies)
    finished = [0]
    async with aiohttp.ClientSession(connector=connector) as session, anyio.create_task_group() as tg:
        for _ in range(concurrency):
            tg.start_soon(_loop_worker, session, base_url, queue, finished, save_to)
    return finished[0]


async def _loop_worker(
    session: aiohttp.ClientSession,
    base_url: str,
    queue: Iterator[tuple[str, dict[str, Any]]],
    finished: list[int],
    save_to: Path | None,
) -> None:
    headers = {"Authorization": f"Bearer {API_KEY}"}
    submit_url = base_url + submit_path(MODEL, "image-edit")
    for item_id, body in queue:
        async with session.post(submit_url, json=body, headers=headers) as resp:
            data = (await resp.json())["data"]
        poll_url = f"{base_url}/api/v3/predictions/{data['id']}/result"
        while data["status"] not in FINAL:
            async with session.get(poll_url, headers=headers) as resp:
                data = (await resp.json())["data"]
        for k, url in enumerate(data["outputs"]):
            async with session.get(url) as resp:
                png = await resp.read()
            if save_to is not None:
                await anyio.to_thread.run_sync(write_atomic, save_to, output_relpath(item_id, k, "png"), png)
        finished[0] += data["status"] == "completed"


# ---- against a light server, both clients in their own process ---------------------------------------

LIGHT_KINDS = ("light_loop", "light_cli")


def measure_light(*, items: int, concurrency: int, repeat: int, work: Path) -> dict[str, list[Timing]]:
    """The CLI and a bare loop process against `bench.light_server`, interleaved A/B ``repeat`` times.

    Why: the simulator costs more CPU than either client, so against it the ratio hides the client's
    cost. Each run gets a fresh light server; CPU is the child's own (``RUSAGE_CHILDREN``), not wall.
    """
    from bench.light_server import LightServerProcess

    runs: dict[str, list[Timing]] = {kind: [] for kind in LIGHT_KINDS}
    for round_ in range(repeat):
        for kind in LIGHT_KINDS:
            with LightServerProcess() as server:
                manifest = write_manifest(
                    work / f"{kind}-{round_}" / "bench.yaml", count=items, base_url=server.base_url
                )
                out = work / f"{kind}-{round_}" / "out"
                if kind == "light_loop":
                    cmd = [
                        sys.executable,
                        "-m",
                        "bench.overhead",
                        "loop",
                        server.base_url,
                        str(manifest),
                        str(concurrency),
                        str(out),
                    ]
                else:
                    flags = ["--rate", str(UNLIMITED), "--poll-rate", str(UNLIMITED), "--poll-after", "0"]
                    flags += ["--max-in-flight", str(concurrency), "--fresh", "--yes", "-q"]
                    cmd = [
                        *_cli(),
                        "run",
                        str(manifest),
                        "--base-url",
                        server.base_url,
                        "--out",
                        str(out),
                        *flags,
                    ]
                runs[kind].append(_timed(cmd, items))
    return runs


def light_rows(runs: dict[str, list[Timing]]) -> list[Row]:
    """Worst and spread of the CLI / loop ratio over the interleaved pairs, and CPU ms per item."""
    pairs = list(zip(runs["light_loop"], runs["light_cli"], strict=True))
    ratios = [cli.rate / loop.rate for loop, cli in pairs]
    cpu = [cli.cpu_ms() / loop.cpu_ms() for loop, cli in pairs]
    loop_ms = [loop.cpu_ms() for loop, _ in pairs]
    cli_ms = [cli.cpu_ms() for _, cli in pairs]
    return [
        Row(
            "1b CLI / bare loop process items/s, light server (worst, spread)",
            f"{min(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})",
            f">= {TARGET}",
            min(ratios) >= TARGET,
        ),
        Row(
            "  client CPU ms/item: CLI vs loop (worst; CLI/loop worst)",
            f"{max(cli_ms):.2f} ({min(cli_ms):.2f}-{max(cli_ms):.2f}) vs {max(loop_ms):.2f}"
            f" ({min(loop_ms):.2f}-{max(loop_ms):.2f}); x{max(cpu):.2f}",
            "<= x2",
            max(cpu) <= 2,
        ),
    ]


def _loop_main(base_url: str, manifest_path: str, concurrency: int, out: str) -> None:
    """The bare loop as its own process: submit, poll until done, download, write the file; nothing more."""
    manifest = load_manifest(Path(manifest_path))
    spec = spec_for(MODEL)
    bodies = [(item.id, wire_body(spec, item.request)) for item in manifest.iter_items()]
    Path(out).mkdir(parents=True, exist_ok=True)
    done = anyio.run(_bare_loop, base_url, bodies, concurrency, Path(out))
    if done != len(bodies):
        raise SystemExit(f"the loop finished {done} of {len(bodies)} items")


async def _bare_loop(
    base_url: str, bodies: list[tuple[str, dict[str, Any]]], concurrency: int, out: Path
) -> int:
    connector = aiohttp.TCPConnector(limit=DEFAULT_CONNECTIONS, limit_per_host=0)
    queue = iter(bodies)
    finished = [0]
    async with aiohttp.ClientSession(connector=connector) as session, anyio.create_task_group() as tg:
        for _ in range(concurrency):
            tg.start_soon(_bare_worker, session, base_url, queue, finished, out)
    return finished[0]


async def _bare_worker(
    session: aiohttp.ClientSession,
    base_url: str,
    queue: Iterator[tuple[str, dict[str, Any]]],
    finished: list[int],
    out: Path,
) -> None:
    headers = {"Authorization": f"Bearer {API_KEY}"}
    submit_url = base_url + submit_path(MODEL, "image-edit")
    for item_id, body in queue:
        async with session.post(submit_url, json=body, headers=headers) as resp:
            data = (await resp.json())["data"]
        poll_url = f"{base_url}/api/v3/predictions/{data['id']}/result"
        while data["status"] not in FINAL:
            async with session.get(poll_url, headers=headers) as resp:
                data = (await resp.json())["data"]
        for k, url in enumerate(data["outputs"]):
            async with session.get(url) as resp:
                png = await resp.read()
            # a tiny file written in place, as the plainest script would: no thread hop, no fsync
            (out / f"{item_id}-{k}.png").write_bytes(png)
        finished[0] += data["status"] == "completed"


if __name__ == "__main__":
    if sys.argv[1:2] == ["loop"]:
        _loop_main(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5])
    elif sys.argv[1:2] == ["light"]:
        n, c, r = (int(a) for a in sys.argv[2:5])
        with tempfile.TemporaryDirectory() as tmp:
            light = measure_light(items=n, concurrency=c, repeat=r, work=Path(tmp))
        for kind, timings in light.items():
            for t in timings:
                print(kind, f"{t.rate:.0f}/s", f"{t.cpu_ms():.3f} ms/item", f"wall {t.seconds:.2f}")
        for row in light_rows(light):
            print(row)
