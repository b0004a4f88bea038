"""Poll timing (the learned first delay, the growing cadence) and the due-time queue."""

from __future__ import annotations

import heapq
import math
import random
import statistics
import time

import anyio
import pytest

from batch_engine.timing.due_queue import DueQueue
from batch_engine.timing.poll_plan import DEFAULT_MIN_FIRST, DEFAULT_WARMUP, PollPlanner, done_by

pytestmark = pytest.mark.anyio

Z_40 = -0.2533  # the standard normal's 40% quantile


class FakeClock:
    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make_planner(*, poll_after: float | None = None, prior: float = 60.0) -> PollPlanner:
    return PollPlanner(poll_after=poll_after, prior=prior, interval=3.0, interval_max=15.0)


# --- PollPlanner ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"prior": 0.0}, "prior"),
        ({"interval": -1.0}, "interval"),
        ({"interval_max": 1.0}, "interval_max"),
        ({"growth": 0.5}, "growth"),
        ({"poll_after": -2.0}, "poll_after"),
        ({"quantile": 1.0}, "quantile"),
    ],
)
def test_planner_rejects_bad_settings(kwargs: dict[str, float], name: str) -> None:
    """A bad setting raises ValueError naming it."""
    settings = {"poll_after": None, "prior": 60.0, "interval": 3.0, "interval_max": 15.0} | kwargs
    with pytest.raises(ValueError, match=rf"^{name}"):
        PollPlanner(**settings)  # type: ignore[arg-type]


def test_next_delay_grows_by_the_factor_up_to_the_cap() -> None:
    """After poll 1, 2, 3, ... the delays are 3, 4.5, 6.75, 10.125, then the 15 s cap."""
    planner = make_planner()
    assert [planner.next_delay(n) for n in range(1, 7)] == [3.0, 4.5, 6.75, 10.125, 15.0, 15.0]


def test_next_delay_never_overflows() -> None:
    """A huge poll count gives the cap, not an OverflowError."""
    planner = PollPlanner(poll_after=None, prior=60.0, interval=1.0, interval_max=10.0, growth=1e10)
    assert planner.next_delay(10_000) == 10.0


def test_next_delay_with_growth_one_is_a_steady_cadence() -> None:
    """With growth 1 every later poll comes ``interval`` after the previous."""
    planner = PollPlanner(poll_after=None, prior=60.0, interval=2.0, interval_max=15.0, growth=1.0)
    assert {planner.next_delay(n) for n in range(1, 50)} == {2.0}


def test_first_delay_is_the_prior_until_warmed_up_then_the_estimate() -> None:
    """Without poll_after the first delay is the prior for the first observations, then the learned one."""
    planner = make_planner(prior=60.0)
    for _ in range(DEFAULT_WARMUP - 1):
        planner.observe(20.0)
        assert planner.first_delay() == 60.0
    planner.observe(20.0)
    assert planner.first_delay() == planner.estimate < 60.0


def test_poll_after_is_where_learning_starts() -> None:
    """A user's poll_after replaces the prior as the first delay, and learning moves on from it."""
    planner = make_planner(poll_after=30.0, prior=60.0)
    assert planner.first_delay() == 30.0
    for _ in range(100):
        planner.observe(5.0)
    assert planner.first_delay() == planner.estimate < 30.0


@pytest.mark.parametrize(
    ("t", "duration", "not_done_at", "expected"),
    [
        (30.0, 25.0, 0.0, 1.0),  # seen done before t
        (30.0, 60.0, 40.0, 0.0),  # still running after t
        (30.0, 40.0, 20.0, 0.5),  # t halfway through (running at 20, done at 40]
        (30.0, 60.0, 0.0, 0.5),  # done at a first poll later than t: (0, 60], uniform guess
    ],
)
def test_done_by_answers_from_the_poll_bounds(
    t: float, duration: float, not_done_at: float, expected: float
) -> None:
    """done_by is 1 or 0 when the polls decide, else the share of the censoring interval before t."""
    assert done_by(t, duration=duration, not_done_at=not_done_at) == expected


def test_a_first_poll_hit_lowers_the_estimate_and_a_miss_raises_it() -> None:
    """Done by the estimate moves it down; still running at the estimate moves it up."""
    planner = make_planner(prior=60.0)
    planner.observe(55.0, not_done_at=0.0)
    lowered = planner.estimate
    assert lowered < 60.0
    planner.observe(lowered + 10.0, not_done_at=lowered + 1.0)
    assert planner.estimate > lowered


def test_the_estimate_never_goes_below_the_minimum() -> None:
    """However fast predictions finish, the first poll is not planned sooner than DEFAULT_MIN_FIRST."""
    planner = make_planner(prior=5.0)
    for _ in range(1000):
        planner.observe(0.01)
    assert planner.estimate == pytest.approx(DEFAULT_MIN_FIRST)


def simulate_run(
    planner: PollPlanner, *, median: float, sigma: float, count: int, seed: int, tell: bool
) -> tuple[float, float]:
    """Submit ``count`` predictions one per second with log-normal durations and poll them as planned,
    each poll up to 2 s late (a busy poll budget); ``tell``: pass ``not_done_at`` to ``observe``.

    Returns, over the second half of the predictions, the share done at their first poll and the
    median first delay they were given.
    """
    rng = random.Random(seed)
    events = [(float(i), i, "submit") for i in range(count)]  # a heap of (clock time, id, what)
    done_at: dict[int, float] = {}
    missed_at: dict[int, float] = {}  # seconds from submit to the last poll that found it running
    polls: dict[int, int] = {}
    hits: list[bool] = []
    first_delays: list[float] = []
    while events:
        now, ident, what = heapq.heappop(events)
        if what == "submit":
            done_at[ident] = now + median * math.exp(sigma * rng.gauss(0.0, 1.0))
            missed_at[ident], polls[ident] = 0.0, 0
            first_delays.append(planner.first_delay())
            heapq.heappush(events, (now + first_delays[-1] + 2 * rng.random(), ident, "poll"))
            continue
        polls[ident] += 1
        if now < done_at[ident]:
            missed_at[ident] = now - ident
            heapq.heappush(events, (now + planner.next_delay(polls[ident]) + 2 * rng.random(), ident, "poll"))
            continue
        planner.observe(now - ident, not_done_at=missed_at[ident] if tell else None)
        if ident >= count // 2:
            hits.append(polls[ident] == 1)
    return sum(hits) / len(hits), statistics.median(first_delays[count // 2 :])


@pytest.mark.parametrize("tell", [True, False], ids=["not_done_at", "guessed"])
@pytest.mark.parametrize("prior", [10.0, 50.0, 150.0])
@pytest.mark.parametrize(("median", "sigma"), [(50.0, 0.35), (25.0, 0.1), (100.0, 0.6)])
def test_the_first_delay_learns_the_target_quantile_from_any_prior(
    prior: float, median: float, sigma: float, tell: bool
) -> None:
    """Whatever the prior, the learned first poll finds about 40% of predictions done, at a delay near the
    durations' real 40% quantile rather than drifting up with detection delays."""
    planner = make_planner(prior=prior)
    hit_share, first_delay = simulate_run(planner, median=median, sigma=sigma, count=1000, seed=7, tell=tell)
    assert 0.25 <= hit_share <= 0.55
    assert first_delay == pytest.approx(median * math.exp(sigma * Z_40), rel=0.15)


def test_planner_repr_shows_live_state() -> None:
    """The repr shows the first delay, the estimate and how many completions were observed."""
    planner = make_planner(prior=60.0)
    planner.observe(30.0)
    text = repr(planner)
    assert "first=60s" in text
    assert "observed=1" in text


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


def test_a_start_below_the_floor_is_honoured_after_warmup() -> None:
    """With poll_after 0 and instant predictions, learning keeps the first poll near 0, not at a 1 s floor."""
    planner = make_planner(poll_after=0.0)
    for _ in range(50):
        planner.observe(0.01, not_done_at=0.0)
    assert planner.first_delay() < 0.01
