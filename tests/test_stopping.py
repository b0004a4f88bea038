"""Stopping a run by hand: the second Ctrl-C, and one more while the reports are written (a subprocess).

The engine runs as a scheduler or a person would start it; the simulator in the test's loop counts what it
was asked, input images included.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import pytest
import yaml

from batch_engine.sim import SimConfig, Simulator
from tests.procs import TEST_KEY, engine, items, run_args, wait_until, write_manifest

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

EXIT_STOPPED = 3


def read_report(out: Path) -> dict[str, Any]:
    report: dict[str, Any] = yaml.safe_load((out / "report.yaml").read_text(encoding="utf-8"))
    return report


async def test_a_second_ctrl_c_writes_the_reports_at_once_and_fetches_no_input_after_the_stop(
    tmp_path: Path,
) -> None:
    """Ctrl-C twice: the summary and every report come at once, from the journal as it stands; the input
    of an item never submitted is never fetched, not even for the page."""
    specs = items(40)
    # Predictions take long, so the second signal surely lands while they are in flight, not after.
    config = SimConfig(api_key=TEST_KEY, image_scale=0.05, inference_median=30.0, inference_spread=0.0)
    async with Simulator(config) as sim:
        manifest = write_manifest(tmp_path / "job.yaml", specs, sim=sim)
        out = tmp_path / "out"
        async with engine(run_args(manifest, out, sim, "--rate", "10")) as proc:
            await wait_until(lambda: sim.stats.accepted >= 3, what="3 accepted submits", proc=proc)
            proc.send(signal.SIGINT)
            await proc.wait_for_line("no new submits")
            proc.send(signal.SIGINT)
            code = await proc.wait()

    assert code == EXIT_STOPPED, proc.tail()
    assert proc.stdout.startswith("Run stopped after"), proc.stdout
    assert f"index.html     {out / 'index.html'}" in proc.stdout
    report = read_report(out)
    assert report["stopped_reason"] == "interrupted"
    never_sent = [entry["id"] for entry in report["items"] if entry["attempts"] == 0]
    assert len(never_sent) > 20
    fetched = [item_id for item_id in never_sent if sim.stats.inputs.get(item_id)]
    assert not fetched, f"inputs of items never submitted were fetched: {fetched}"


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
async def test_a_signal_while_the_reports_are_written_ends_in_one_line_naming_report(
    tmp_path: Path, signum: signal.Signals
) -> None:
    """A signal that lands while the reports are being written ends the run at once, exit 3, and the last
    word is how to get the reports ('batch-engine report OUT_DIR'), or the summary if they were done."""
    specs = items(4000)
    async with Simulator(SimConfig(api_key=TEST_KEY, image_scale=0.05)) as sim:
        manifest = write_manifest(tmp_path / "job.yaml", specs, sim=sim)
        out = tmp_path / "out"
        async with engine(run_args(manifest, out, sim, "--rate", "20", "--grace", "5")) as proc:
            await wait_until(lambda: sim.stats.accepted >= 3, what="3 accepted submits", proc=proc)
            proc.send(signal.SIGINT)
            await proc.wait_for_line("writing the reports")
            proc.send(signum)
            code = await proc.wait()

    assert code == EXIT_STOPPED, proc.tail()
    assert "Traceback" not in proc.stderr
    named = f"'batch-engine report {out}' writes them" in proc.stderr
    summarised = proc.stdout.startswith("Run stopped after") and (out / "report.yaml").exists()
    assert named or summarised, proc.tail()
