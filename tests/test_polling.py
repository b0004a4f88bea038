"""The due-time queue (the planner itself: tests/test_poll_plan.py)."""

from __future__ import annotations

import time
from pathlib import Path

import anyio
import pytest

from batch_engine.sim import SimConfig, Simulator
from batch_engine.timing.due_queue import DueQueue
from tests.procs import engine_env, items, run_engine, write_manifest

pytestmark = pytest.mark.anyio


class FakeClock:
    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# --- DueQueue ----------------------------------------------------------------------------------


async def test_due_items_come_out_in_due_order_and_fifo_on_ties() -> None:
    """Items already due pop earliest first; equal due times keep push order."""
    queue: DueQueue[str] = DueQueue(clock=FakeClock(100.0))
    for item, due in [("c", 3.0), ("a", 1.0), ("b1", 2.0), ("b2", 2.0)]:
        queue.push(item, due)
    assert len(queue) == 4
    assert queue.next_due == 1.0
    with anyio.fail_after(5):
        assert [await queue.pop() for _ in range(4)] == ["a", "b1", "b2", "c"]
    assert len(queue) == 0
    assert queue.next_due is None


async def test_pop_does_not_return_an_item_before_it_is_due() -> None:
    """A pop for an item due shortly waits until the clock reaches its due time."""
    queue: DueQueue[str] = DueQueue()
    due = time.monotonic() + 0.02
    queue.push("x", due)
    with anyio.fail_after(5):
        assert await queue.pop() == "x"
    assert time.monotonic() >= due


async def test_an_earlier_item_pushed_while_waiting_comes_out_first() -> None:
    """A waiting pop honours a later push of an item due sooner than the one it was waiting for."""
    queue: DueQueue[str] = DueQueue()
    queue.push("later", time.monotonic() + 3600.0)
    got: list[str] = []

    async def consume() -> None:
        got.append(await queue.pop())

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(consume)
            await anyio.wait_all_tasks_blocked()
            queue.push("sooner", time.monotonic())
    assert got == ["sooner"]
    assert len(queue) == 1


async def test_many_consumers_each_get_one_item() -> None:
    """Several waiting pops share the items pushed, each item going to exactly one of them."""
    queue: DueQueue[int] = DueQueue()
    got: list[int] = []

    async def consume() -> None:
        got.append(await queue.pop())

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            for _ in range(3):
                tg.start_soon(consume)
            await anyio.wait_all_tasks_blocked()
            now = time.monotonic()
            for n in range(3):
                queue.push(n, now)
    assert sorted(got) == [0, 1, 2]


async def test_a_cancelled_pop_loses_no_item() -> None:
    """Cancelling a waiting pop leaves every item in the queue for the next pop."""
    clock = FakeClock(0.0)
    queue: DueQueue[str] = DueQueue(clock=clock)
    queue.push("x", 3600.0)
    with anyio.move_on_after(0.01):
        await queue.pop()
    assert len(queue) == 1
    clock.now = 3600.0
    with anyio.fail_after(5):
        assert await queue.pop() == "x"


async def test_close_wakes_waiters_with_end_of_stream() -> None:
    """Closing an empty queue makes every waiting pop raise EndOfStream."""
    queue: DueQueue[str] = DueQueue()
    ended: list[bool] = []

    async def consume() -> None:
        with pytest.raises(anyio.EndOfStream):
            await queue.pop()
        ended.append(True)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(consume)
            tg.start_soon(consume)
            await anyio.wait_all_tasks_blocked()
            queue.close()
    assert ended == [True, True]


async def test_a_closed_queue_drains_what_is_left_then_ends() -> None:
    """After close the remaining items still come out, then pop raises EndOfStream; push is refused."""
    queue: DueQueue[str] = DueQueue(clock=FakeClock(10.0))
    queue.push("x", 1.0)
    queue.close()
    with pytest.raises(anyio.ClosedResourceError):
        queue.push("y", 1.0)
    with anyio.fail_after(5):
        assert await queue.pop() == "x"
        with pytest.raises(anyio.EndOfStream):
            await queue.pop()


def test_due_queue_repr_shows_live_state() -> None:
    """The repr shows open/closed, the item count and when the next one is due."""
    queue: DueQueue[str] = DueQueue(clock=FakeClock(10.0))
    queue.push("x", 12.5)
    assert repr(queue) == "<DueQueue open items=1 next_due_in=2.500s>"


# --- through the CLI -------------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.timeout(30)  # the guard: waiting for the real model's 60 s prior would overrun it
async def test_a_rehearsal_with_no_poll_flags_does_not_wait_for_the_real_models_prior(tmp_path: Path) -> None:
    """`batch-engine run` with no poll flags against the simulator (predictions of ~0.2 s, the real model's
    prior 60 s): the first predictions are probes, polled early, so 3 items finish succeeded after a poll
    or two each instead of showing `polls 0` for a minute."""
    async with Simulator(SimConfig(image_scale=0.05, seed=5)) as sim:
        manifest = write_manifest(tmp_path / "job.yaml", items(3), sim=sim)
        out = tmp_path / "out"
        argv = ["run", str(manifest), "--out", str(out), "--base-url", sim.base_url, "--progress", "plain"]

        run = await run_engine(argv, env=engine_env())

        assert run.code == 0, run.stderr
        assert "3 succeeded" in run.stdout
        counts = sim.stats.poll_counts
        assert len(counts) == 3
        assert all(1 <= polls <= 3 for polls in counts.values()), counts


@pytest.mark.anyio
@pytest.mark.timeout(60)
async def test_a_first_wave_against_the_simulator_is_polled_on_what_the_probes_learn(tmp_path: Path) -> None:
    """40 predictions in flight at once against the simulator (~0.2 s each), no poll flags, the real
    model's 60 s prior: the first wave is all submitted before anything finished, yet every prediction is
    found done within a few polls (the probes' early polls, the running ones counted in the fit), none
    waits for the prior, and the run spends about 3 polls per prediction."""
    async with Simulator(SimConfig(image_scale=0.05, seed=11)) as sim:
        manifest = write_manifest(tmp_path / "job.yaml", items(80), sim=sim)
        out = tmp_path / "out"
        argv = [
            "run", str(manifest), "--out", str(out), "--base-url", sim.base_url, "--progress", "plain",
            "--rate", "200", "--max-in-flight", "40", "--poll-rate", "2000",
        ]  # fmt: skip

        run = await run_engine(argv, env=engine_env())

        assert run.code == 0, run.stderr
        assert "80 succeeded" in run.stdout
        counts = sim.stats.poll_counts
        assert len(counts) == 80
        assert sum(counts.values()) / len(counts) <= 3.5, counts
        assert max(counts.values()) <= 12, counts  # a probe polled from 60 s / 64 on, doubling, at most
