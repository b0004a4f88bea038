"""A simulator in its own process: `SimProcess` starts one, hands out its URL and stats, and stops it.

The child (``python -m bench.simproc '<SimConfig as JSON>'``) prints its base URL on one line and serves
until its stdin closes, so it also ends when the benchmark dies.
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any

import anyio
import anyio.to_thread

from batch_engine.sim import SimConfig, Simulator

STATS_TIMEOUT = 120.0
ROOT = Path(__file__).resolve().parent.parent  #: where ``python -m bench.*`` children are started


class SimProcess:
    """``with SimProcess(inference_polls=1) as sim:`` — a simulator child serving at ``sim.base_url``."""

    def __init__(self, **knobs: Any) -> None:
        SimConfig(**knobs)  # fail here, with SimConfig's own message, rather than in the child
        self._knobs = knobs
        self._proc: subprocess.Popen[str] | None = None
        self.base_url = ""

    def __enter__(self) -> SimProcess:
        cmd = [sys.executable, "-m", "bench.simproc", json.dumps(self._knobs)]
        proc = self._proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT
        )
        assert proc.stdout is not None
        self.base_url = proc.stdout.readline().strip()
        if not self.base_url.startswith("http://"):
            self.close()
            raise RuntimeError(f"the simulator process did not start (exit code {proc.returncode})")
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def stats(self) -> dict[str, Any]:
        """The simulator's `SimStats` as JSON (``GET /_sim/stats``), predictions included."""
        with urllib.request.urlopen(f"{self.base_url}/_sim/stats", timeout=STATS_TIMEOUT) as resp:
            data: dict[str, Any] = json.load(resp)
        return data

    def close(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        assert proc.stdin is not None
        proc.stdin.close()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def _serve(config: SimConfig) -> None:
    async with Simulator(config) as sim:
        print(sim.base_url, flush=True)
        await anyio.to_thread.run_sync(sys.stdin.read)  # returns at EOF: the parent closed our stdin


if __name__ == "__main__":
    anyio.run(_serve, SimConfig(**json.loads(sys.argv[1])))
