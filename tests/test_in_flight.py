"""The in-flight cap: on auto it follows rate x latency (Little's law), a user's cap holds, and an API's
concurrency limit is met by cutting the cap, not the rate; the summary says which limit held a run back."""

from __future__ import annotations

import math
from pathlib import Path

import anyio
import pytest
import yaml

from batch_engine.cli import main
from batch_engine.control import RunControl, Slot
from batch_engine.errors import UsageError
from batch_engine.manifest import load_manifest
from batch_engine.settings import RunSettings
from batch_engine.timing.in_flight import CEILING, FLOOR, HOLD_LEVELS, AutoCap, little_cap, p90, same_level
from batch_engine.ui.summary import format_summary
from tests.helpers import Harness, edit_items, fast_settings
from tests.procs import engine_env, run_engine

pytest_plugins = ("tests.helpers",)
pytestmark = pytest.mark.anyio

#: Predictions that take a fixed 0.15 s of (simulated) inference: at 600 submits/s that is ~90 in flight.
TIMED = {"inference_polls": None, "inference_median": 0.15, "inference_spread": 0.0}


def test_little_cap_is_rate_times_hold_times_margin_within_bounds() -> None:
    assert little_cap(20.0, 3.0, margin=1.5) == 90
    assert little_cap(2.0, 60.0) == math.ceil(2 * 60 * 1.4)  # the case: 168, not 50
    assert little_cap(0.01, 1.0) == FLOOR
    assert little_cap(10_000.0, 600.0) == CEILING
    assert little_cap(0.0, 5.0) == FLOOR
    assert little_cap(5.0, 0.0) == FLOOR
    assert little_cap(5.0, math.inf) == CEILING


def test_p90_and_same_level() -> None:
    assert p90([1.0]) == 1.0
    assert p90([float(n) for n in range(1, 11)]) == 9.0
    assert p90([float(n) for n in range(1, 101)]) == 90.0
    assert same_level(40, 42)
    assert not same_level(40, 60)
    assert same_level(1, 2)


def test_auto_cap_starts_from_the_prior_then_follows_the_hold_times_seen() -> None:
    cap = AutoCap(rate=10.0, prior=60.0)
    assert cap.cap == 840
    for _ in range(100):
        cap.resolved(2.0)
    assert cap.cap == 28
    small = AutoCap(rate=100.0, prior=0.1)
    assert small.cap == 14
    for _ in range(50):
        small.resolved(1.0)
    assert small.cap == 140  # grows past its small start when latency x rate needs it


def test_auto_cap_reads_429s_at_one_level_as_concurrency_and_grows_back_slowly() -> None:
    cap = AutoCap(rate=100.0, prior=10.0)
    assert not cap.rate_limited(40, 100.0)  # a first 429: the rate's, as far as anyone knows
    assert not cap.rate_limited(200, 100.0)  # another level: still the rate
    assert not cap.rate_limited(205, 95.0)  # the same level at about the same rate: a rate limit
    assert cap.rate_limited(205, 50.0)  # the same level though the rate was halved: concurrency
    assert cap.concurrency_limited
    assert cap.cap == math.floor(205 * 0.9)
    assert cap.rate_limited(200, 50.0)  # sent while more were in flight than the cap: an echo, no cut
    assert cap.cap == math.floor(205 * 0.9)
    assert cap.rate_limited(150, 50.0)  # within the cut cap: concurrency at once, cut again
    assert cap.cap == 135
    for _ in range(2 * (149 - 135)):
        cap.resolved(10.0)
    assert cap.cap == 149  # quickly back to one under the level refused (a slot per 2 completions)...
    for _ in range(HOLD_LEVELS * 150 - 1):
        cap.resolved(10.0)
    assert cap.cap == 149  # ... held there ...
    cap.resolved(10.0)
    assert cap.cap == 150  # ... then one slot higher, a probe


async def test_auto_cap_keeps_more_in_flight_than_the_old_default(harness: Harness) -> None:
    sim = await harness.sim(**(TIMED | {"inference_median": 0.6}))  # slow enough for a busy machine
    outcome = await harness.run(
        harness.manifest(edit_items(sim, 200)), sim, settings=fast_settings(max_in_flight=None, rate=600.0)
    )
    assert outcome.exit_code == 0
    assert sim.stats.accepted == 200
    assert sim.stats.max_concurrent_seen > 50  # 600/s x 0.6 s needs ~360; the old fixed cap was 50
    assert outcome.result.stats.in_flight_auto


async def test_a_cap_the_user_sets_is_never_exceeded(harness: Harness) -> None:
    sim = await harness.sim(**TIMED)
    outcome = await harness.run(
        harness.manifest(edit_items(sim, 30)), sim, settings=fast_settings(max_in_flight=7)
    )
    assert outcome.exit_code == 0
    assert sim.stats.max_concurrent_seen <= 7
    assert not outcome.result.stats.in_flight_auto
    assert outcome.result.stats.in_flight_cap == 7
    summary = format_summary(outcome.result.stats, report_paths={}, out_dir="out")
    assert "held back by: the in-flight cap (submits waited for a free slot)" in summary  # 7 / 0.15 s < 200/s


async def test_an_api_concurrency_limit_cuts_the_cap_not_the_rate(harness: Harness) -> None:
    sim = await harness.sim(max_concurrent=12, **TIMED)
    settings = fast_settings(max_in_flight=None, rate_min=1.0)
    outcome = await harness.run(harness.manifest(edit_items(sim, 200)), sim, settings=settings)
    stats = outcome.result.stats
    assert outcome.exit_code == 0
    assert set(outcome.statuses.values()) == {"succeeded"}
    assert sim.stats.accepted == 200  # nothing paid twice
    assert stats.rate_limited > 0
    assert stats.in_flight_cap <= 20  # near the API's 12 (Little alone would say ~60), probing slowly
    assert stats.rate_final > settings.rate_min  # the rate was not cut to the floor
    assert stats.held_back is not None
    assert stats.held_back[0] in {"in_flight", "rate"}  # slots, or the one rate cut of the first 429


async def test_the_summary_names_the_rate_when_submits_wait_for_their_turn(harness: Harness) -> None:
    sim = await harness.sim()
    outcome = await harness.run(
        harness.manifest(edit_items(sim, 12)), sim, settings=fast_settings(rate=40.0, rate_min=1.0)
    )
    summary = format_summary(outcome.result.stats, report_paths={}, out_dir="out")
    assert "held back by: the rate (submits waited for their pacing turn)" in summary
    assert outcome.report["run"]["held_back_by"] == "rate"


@pytest.mark.parametrize("value", [0, -3, 10_001, 2.5, "many"])
def test_a_bad_max_in_flight_is_refused_by_name(value: object) -> None:
    with pytest.raises(UsageError, match="max_in_flight"):
        RunSettings.build({"max_in_flight": value}, {})


def _manifest(tmp_path: Path, max_in_flight: object) -> Path:
    path = tmp_path / "run.yaml"
    items = [{"id": f"i{k}", "prompt": f"edit {k}", "images": [f"https://x.test/{k}.png"]} for k in range(2)]
    document = {"version": 1, "settings": {"max_in_flight": max_in_flight}, "items": items}
    path.write_text(yaml.safe_dump(document), encoding="utf-8")
    return path


def test_max_in_flight_auto_in_the_manifest_is_as_if_left_out(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = _manifest(tmp_path, "auto")
    assert main(["validate", str(manifest)]) == 0
    assert "valid, 2 item(s)" in capsys.readouterr().out
    settings = {k: v for k, v in load_manifest(manifest).settings.items() if k != "inputs"}
    assert RunSettings.build(settings, {}).max_in_flight is None


@pytest.mark.parametrize("value", ["many", 0, 2.5])
def test_a_bad_max_in_flight_in_the_manifest_names_file_and_setting(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], value: object
) -> None:
    manifest = _manifest(tmp_path, value)
    assert main(["validate", str(manifest)]) != 0
    out = "".join(capsys.readouterr())
    assert f"{manifest}:" in out
    assert "settings.max_in_flight" in out
    if isinstance(value, str):
        assert "a whole number or auto, got 'many'" in out


async def test_max_in_flight_auto_on_the_command_line_overrides_the_manifest(tmp_path: Path) -> None:
    manifest = _manifest(tmp_path, 3)
    out = tmp_path / "out"
    run = await run_engine(
        ["run", str(manifest), "--simulate", "--out", str(out), "--max-in-flight", "auto"],
        env=engine_env(key=None),
    )
    assert run.code == 0, run.stderr
    assert "auto: rate x p90 latency seen" in run.stdout
    bad = await run_engine(
        ["run", str(manifest), "--simulate", "--max-in-flight", "lots"], env=engine_env(key=None)
    )
    assert bad.code == 2
    assert "--max-in-flight: must be a whole number or auto, got 'lots'" in bad.stderr
    assert "Traceback" not in bad.stderr


async def test_a_freed_place_wakes_one_waiting_submitter_first_come_first_served() -> None:
    """Each freed place goes to the caller that waited longest; the others sleep on (no herd woken only
    to wait again), and one cancelled while it waits leaves the queue without taking a place."""
    control = RunControl(max_in_flight=1)
    held = [await control.take_slot()]
    order: list[int] = []
    scopes = [anyio.CancelScope() for _ in range(4)]

    async def waiter(n: int) -> None:
        with scopes[n]:
            held.append(await control.take_slot())
            order.append(n)

    async with anyio.create_task_group() as tg:
        for n in range(4):
            tg.start_soon(waiter, n)
            await anyio.wait_all_tasks_blocked()
        scopes[1].cancel()  # queued, not woken: it leaves the queue
        await anyio.wait_all_tasks_blocked()
        for expected in ([0], [0, 2], [0, 2, 3]):
            held.pop(0).release()
            await anyio.wait_all_tasks_blocked()
            assert order == expected
            assert control.in_flight == 1
            assert len(held) == 1
        held.pop(0).release()
    assert control.in_flight == 0


async def test_callers_of_one_moment_take_no_more_places_than_the_cap() -> None:
    """Ten submitters asking at once with a cap of 3: three hold places, seven wait (a check and a take
    with a checkpoint between them let all ten in: 10 in flight under a cap of 3)."""
    control = RunControl(max_in_flight=3)
    held: list[Slot] = []

    async def submitter() -> None:
        held.append(await control.take_slot())

    async with anyio.create_task_group() as tg:
        for _ in range(10):
            tg.start_soon(submitter)
        await anyio.wait_all_tasks_blocked()
        assert control.in_flight == len(held) == 3
        while held:
            held.pop(0).release()
            await anyio.wait_all_tasks_blocked()
            assert control.in_flight <= 3
    assert control.most_in_flight == 3


async def test_submitters_holding_a_slot_give_it_back_when_the_cap_is_cut(harness: Harness) -> None:
    """Against an API capping concurrent predictions, submits that took a slot before the cap was cut go
    back to wait for one, rather than sending into the limit: the 429s stay a small share of submits."""
    sim = await harness.sim(max_concurrent=10, **TIMED)
    settings = fast_settings(max_in_flight=None, rate_min=1.0, rate=400.0)
    outcome = await harness.run(harness.manifest(edit_items(sim, 150)), sim, settings=settings)
    assert outcome.exit_code == 0
    assert sim.stats.accepted == 150
    assert sim.stats.max_concurrent_seen <= 10
    # 5-8 of ~155 here; 39-45 of ~190 when such submits were sent anyway
    assert sim.stats.rate_limited_submits <= 0.1 * sim.stats.submit_requests
