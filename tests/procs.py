"""Test helpers that run the command line as a subprocess: start it, stream its output, wait on conditions.

Every wait is a bounded polling loop on an observable condition (a simulator counter, a log line, a
file): no test sleeps for a fixed time and hopes. A wait that runs out fails with what it waited for and
the tail of the engine's log, so a failure says where the run stood.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import yaml
from anyio.abc import ByteReceiveStream, Process

from batch_engine.sim import Simulator

ENGINE = (sys.executable, "-m", "batch_engine")
TEST_KEY = "test-key"
WAIT_TIMEOUT = 20.0  #: seconds any single wait may take before the test fails
EXIT_TIMEOUT = 60.0  #: seconds a run may take to exit once started or signalled
POLL_EVERY = 0.005  #: seconds between two looks at a condition
#: Timings that make a run against the simulator take a fraction of a second.
FAST = (
    "--poll-after", "0.05",
    "--poll-interval", "0.05",
    "--poll-interval-max", "0.2",
    "--rate", "50",
    "--poll-rate", "200",
    "--progress", "plain",
    "--log-every", "0.2",
    "-v",
)  # fmt: skip


def engine_env(key: str | None = TEST_KEY, **extra: str) -> dict[str, str]:
    """The environment for a subprocess: this one, with ``GPTPROTO_API_KEY`` set (or unset when None)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPTPROTO_")}
    if key is not None:
        env["GPTPROTO_API_KEY"] = key
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def run_args(manifest: Path, out: Path, sim: Simulator, *extra: str) -> list[str]:
    """``run MANIFEST --out OUT`` against ``sim``, polling fast, logging at debug; ``extra`` comes last."""
    return ["run", str(manifest), "--out", str(out), "--base-url", sim.base_url, *FAST, *extra]


def write_manifest(
    path: Path,
    items: Sequence[Mapping[str, Any]],
    *,
    sim: Simulator | None = None,
    name: str = "resume-test",
    settings: Mapping[str, Any] | None = None,
) -> Path:
    """Write a manifest of ``items`` (each at least ``id`` and ``prompt``); images come from ``sim``."""
    def with_images(item: Mapping[str, Any]) -> dict[str, Any]:
        images = [sim.input_url(str(item["id"])) if sim else f"https://example.com/{item['id']}.png"]
        return {"images": images, **item}

    manifest: dict[str, Any] = {
        "version": 1,
        "name": name,
        "defaults": {"size": "1024x1024"},
        "items": [with_images(item) for item in items],
    }
    if settings:
        manifest["settings"] = dict(settings)
    path.write_text(yaml.safe_dump(manifest, sort_keys=False), encoding="utf-8")
    return path


def items(count: int, *, prefix: str = "item", failing: int = 0) -> list[dict[str, Any]]:
    """``count`` items with distinct prompts; the last ``failing`` of them break the content policy."""
    made = []
    for k in range(count):
        marker = " FORBIDDEN" if k >= count - failing else ""
        made.append({"id": f"{prefix}-{k:02d}", "prompt": f"edit number {k} of {prefix}{marker}"})
    return made


class EngineProcess:
    """A running ``batch-engine`` subprocess; its stdout and stderr are collected line by line as they come.
    """

    def __init__(self, process: Process, argv: Sequence[str]) -> None:
        self.process = process
        self.argv = list(argv)
        self.stdout_lines: list[str] = []
        self.stderr_lines: list[str] = []
        self._drained = [anyio.Event(), anyio.Event()]  #: set when stdout / stderr reached end of file

    def __repr__(self) -> str:
        return f"<EngineProcess pid={self.pid} returncode={self.process.returncode} {self.argv[:2]}>"

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def stdout(self) -> str:
        return "".join(self.stdout_lines)

    @property
    def stderr(self) -> str:
        return "".join(self.stderr_lines)

    @property
    def running(self) -> bool:
        return self.process.returncode is None

    def send(self, signum: int = signal.SIGKILL) -> None:
        """Send ``signum`` (SIGKILL by default) to the engine, at once."""
        os.kill(self.pid, signum)

    async def wait_for_line(self, needle: str, *, within: float = WAIT_TIMEOUT) -> str:
        """The first stderr line containing ``needle``, waiting for it to be written if need be."""
        found: list[str] = []

        def seen() -> bool:
            found.extend(line for line in self.stderr_lines if needle in line)
            return bool(found)

        await wait_until(seen, within=within, what=f"a log line with {needle!r}", proc=self)
        return found[0]

    def count(self, needle: str) -> int:
        """How many stderr lines so far contain ``needle``."""
        return sum(needle in line for line in self.stderr_lines)

    async def wait_for_count(self, needle: str, count: int, *, within: float = WAIT_TIMEOUT) -> None:
        """Wait until ``count`` stderr lines contain ``needle``."""
        what = f"{count} log lines with {needle!r}"
        await wait_until(lambda: self.count(needle) >= count, within=within, what=what, proc=self)

    async def wait(self, *, within: float = EXIT_TIMEOUT) -> int:
        """Wait for the engine to exit and its output to be read to the end; return its exit code."""
        with anyio.move_on_after(within):
            code = await self.process.wait()
            await self.drained()
            return code
        raise AssertionError(f"the engine did not exit within {within:.0f} s:\n{self.tail()}")

    async def drained(self) -> None:
        """Wait until stdout and stderr were read to their end."""
        for drained in self._drained:
            await drained.wait()

    async def _pump(self, stream: ByteReceiveStream | None, lines: list[str], which: int) -> None:
        buffer = b""
        try:
            if stream is None:
                return
            async for chunk in stream:
                buffer += chunk
                *complete, buffer = buffer.split(b"\n")
                lines.extend(line.decode("utf-8", "replace") + "\n" for line in complete)
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            pass
        finally:
            if buffer:
                lines.append(buffer.decode("utf-8", "replace"))
            self._drained[which].set()

    def tail(self, lines: int = 25) -> str:
        """The last lines of stderr, for failure messages."""
        return "".join(self.stderr_lines[-lines:])


@asynccontextmanager
async def engine(
    args: Sequence[str], *, env: Mapping[str, str] | None = None
) -> AsyncIterator[EngineProcess]:
    """Start ``batch-engine ARGS``; on leaving the block, kill it if it still runs."""
    argv = [*ENGINE, *args]
    process = await anyio.open_process(
        argv, stdin=subprocess.DEVNULL, env=dict(env if env is not None else engine_env())
    )
    try:
        async with process, anyio.create_task_group() as tg:
            proc = EngineProcess(process, args)
            tg.start_soon(proc._pump, process.stdout, proc.stdout_lines, 0)
            tg.start_soon(proc._pump, process.stderr, proc.stderr_lines, 1)
            try:
                yield proc
            finally:
                if process.returncode is None:
                    process.kill()
                with anyio.CancelScope(shield=True), anyio.move_on_after(EXIT_TIMEOUT):
                    await process.wait()
    except BaseExceptionGroup as group:  # the test's own failure, as itself rather than in a group
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise


@dataclass(frozen=True)
class Finished:
    """A finished command: exit code and everything it wrote."""

    code: int
    stdout: str
    stderr: str
    seconds: float


async def run_engine(
    args: Sequence[str], *, env: Mapping[str, str] | None = None, within: float = EXIT_TIMEOUT
) -> Finished:
    """Run ``batch-engine ARGS`` to the end."""
    started = time.monotonic()
    async with engine(args, env=env) as proc:
        code = await proc.wait(within=within)
    return Finished(code, proc.stdout, proc.stderr, time.monotonic() - started)


async def wait_until(
    condition: Callable[[], bool],
    *,
    within: float = WAIT_TIMEOUT,
    what: str = "the condition",
    proc: EngineProcess | None = None,
) -> None:
    """Look at ``condition`` every few milliseconds until it holds; fail after ``within`` seconds, or as
    soon as ``proc`` exits without it holding."""
    deadline = time.monotonic() + within
    while not condition():
        if proc is not None and not proc.running:
            with anyio.move_on_after(1.0):  # the last lines may still be in the pipe
                await proc.drained()
            if condition():
                return
            raise AssertionError(
                f"the engine exited ({proc.process.returncode}) before {what}:\n{proc.tail()}"
            )
        if time.monotonic() > deadline:
            log = proc.tail() if proc is not None else ""
            raise AssertionError(f"waited {within:.0f} s for {what} in vain\n{log}")
        await anyio.sleep(POLL_EVERY)
