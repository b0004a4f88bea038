"""The fault suite: whatever the API does, each item ends succeeded or failed with a reason, nothing is
lost, and nothing is resubmitted except as the ambiguous-submit policy says."""

from __future__ import annotations

import io
import itertools
import random
from collections import Counter
from typing import Any

import pytest
from PIL import Image

from batch_engine import engine
from batch_engine.api.client import ApiClient
from batch_engine.sim import Simulator
from batch_engine.sim.config import PredictionRecord
from batch_engine.sim.drawing import render_output
from batch_engine.stages.sink import INLINE_BYTES
from batch_engine.timing.backoff import clamp_retry_after
from batch_engine.timing.pacing import PollBudget
from batch_engine.values import Prediction
from tests.helpers import (
    Harness,
    Outcome,
    Reply,
    Scripted,
    check_settled,
    edit_items,
    fast_settings,
)

pytest_plugins = ("tests.helpers",)
pytestmark = pytest.mark.anyio

ITEMS = 6
IDS = [f"item-{k}" for k in range(ITEMS)]


def billed(sim: Simulator) -> Counter[str]:
    """Item id → submits the server accepted (billed) for it; prompts are ``edit <id>``."""
    return Counter(pred.prompt.removeprefix("edit ") for pred in sim.stats.predictions.values())


def check_no_silent_duplicates(outcome: Outcome, sim: Simulator) -> None:
    """No item is billed more often than it was sent, and every item billed more than once is marked
    possible_duplicate in the report. (An item whose answer was lost twice may be billed three times,
    so the server's duplicate count is bounded by the marked items' extra attempts, not their number.)"""
    counts = billed(sim)
    for entry in outcome.entries:
        assert counts[entry["id"]] <= entry["attempts"], entry
        if counts[entry["id"]] > 1:
            assert entry["possible_duplicate"], entry
    extra_attempts = sum(e["attempts"] - 1 for e in outcome.entries if e["possible_duplicate"])
    assert sim.stats.duplicate_bodies == sum(count - 1 for count in counts.values()) <= extra_attempts


async def run_items(harness: Harness, sim: Simulator, **run: Any) -> Outcome:
    outcome = await harness.run(harness.manifest(edit_items(sim, ITEMS)), sim, **run)
    check_settled(outcome, IDS)
    check_no_silent_duplicates(outcome, sim)
    return outcome


# ---- server errors ------------------------------------------------------------------------------------


async def test_5xx_bursts_on_polls_are_retried(harness: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    """Polls answered 500/503 most of the time are retried until every item succeeds; nothing resent."""
    sim = await harness.sim(seed=11, inference_polls=3)
    accept = sim._accept

    def accept_then_break(*args: Any) -> PredictionRecord:  # every submit is in: from now on, 5xx bursts
        pred = accept(*args)
        if sim.stats.accepted == ITEMS:
            sim.configure(p_500=0.35, p_503=0.35)
        return pred

    monkeypatch.setattr(sim, "_accept", accept_then_break)
    outcome = await run_items(harness, sim)

    assert outcome.exit_code == 0
    assert sim.stats.status_counts.get(500, 0) > 0
    assert sim.stats.status_counts.get(503, 0) > 0
    assert sim.stats.polls > sum(sim.stats.poll_counts.values())
    assert sim.stats.submit_requests == sim.stats.accepted == ITEMS


async def test_5xx_on_submits_are_resent_as_possible_duplicates(harness: Harness) -> None:
    """A 5xx on a submit is an ambiguous submit: resent (default policy) and marked possible_duplicate;
    the server, which never accepted those, bills no duplicate."""
    sim = await harness.sim(p_500=0.4, p_503=0.2, seed=5)
    outcome = await run_items(harness, sim)

    refused = sim.stats.status_counts.get(500, 0) + sim.stats.status_counts.get(503, 0)
    assert refused > 0
    assert outcome.duplicates(), "some submit got a 5xx and was resent"
    assert sim.stats.duplicate_bodies == 0
    for item_id in outcome.duplicates():
        assert outcome.entry(item_id)["attempts"] > 1
    for item_id in set(IDS) - set(outcome.duplicates()):
        assert outcome.entry(item_id)["attempts"] == 1
    assert sim.stats.submit_requests == sum(e["attempts"] for e in outcome.entries)
    for entry in outcome.entries:
        if entry["status"] == "failed":  # lost three times in a row: given up, each may have been billed
            assert entry["possible_duplicate"]
            assert entry["attempts"] == 3


async def test_5xx_on_submits_with_resubmit_off_fail_as_ambiguous(harness: Harness) -> None:
    """With resubmit_ambiguous off, a submit answered 5xx fails as ambiguous_submit and is never resent."""
    sim = await harness.sim(p_500=0.5, seed=5)
    outcome = await run_items(harness, sim, settings=fast_settings(resubmit_ambiguous=False))

    failed = outcome.ids("failed")
    assert failed
    assert {outcome.kinds[i] for i in failed} == {"ambiguous_submit"}
    assert all(outcome.entry(i)["error"]["status"] == 500 for i in failed)
    assert sim.stats.submit_requests == ITEMS
    assert sim.stats.accepted == ITEMS - len(failed)
    assert outcome.duplicates() == []
    assert outcome.exit_code == 1


# ---- lost answers -------------------------------------------------------------------------------------


@pytest.mark.parametrize("knob", ["p_drop_before_accept", "p_drop_after_accept"])
async def test_dropped_connections_are_ambiguous_and_marked(harness: Harness, knob: str) -> None:
    """A connection dropped before or after the server accepted looks the same to the client: resent,
    marked possible_duplicate; the server bills a duplicate only for items so marked."""
    sim = await harness.sim(seed=2, **{knob: 0.4})
    outcome = await run_items(harness, sim)

    assert sim.stats.dropped > 0
    assert outcome.duplicates()
    if knob == "p_drop_before_accept":
        assert sim.stats.duplicate_bodies == 0
    else:
        assert sim.stats.duplicate_bodies > 0


async def test_slow_answers_past_the_client_timeout_are_ambiguous(harness: Harness) -> None:
    """A submit whose answer is slower than submit_timeout counts as lost (it was billed): resent and
    marked; slow polls past poll_timeout are simply polled again."""
    sim = await harness.sim(p_slow=0.4, slow_seconds=0.4, seed=4)
    client = {"submit_timeout": 0.1, "poll_timeout": 0.1}
    outcome = await run_items(harness, sim, client=client)

    assert outcome.duplicates()
    assert sim.stats.duplicate_bodies > 0


async def test_resubmit_off_never_resends_a_lost_answer(harness: Harness) -> None:
    """With resubmit_ambiguous off, a dropped answer fails as ambiguous_submit and is sent exactly once."""
    sim = await harness.sim(p_drop_after_accept=0.5, seed=2)
    outcome = await run_items(harness, sim, settings=fast_settings(resubmit_ambiguous=False))

    failed = outcome.ids("failed")
    assert failed
    assert {outcome.kinds[i] for i in failed} == {"ambiguous_submit"}
    assert sim.stats.submit_requests == ITEMS
    assert sim.stats.duplicate_bodies == 0
    assert all(outcome.entry(i)["attempts"] == 1 for i in IDS)


# ---- predictions that fail ----------------------------------------------------------------------------


async def test_failed_predictions_fail_their_items_only(harness: Harness) -> None:
    """Predictions that end failed fail their items as inference_failed; the rest succeed; none resent."""
    sim = await harness.sim(p_failed=0.5, seed=8)
    outcome = await run_items(harness, sim)

    failed = outcome.ids("failed")
    assert 0 < len(failed) < ITEMS
    assert {outcome.kinds[i] for i in failed} == {"inference_failed"}
    assert sim.stats.accepted == ITEMS
    assert outcome.exit_code == 1


# ---- rate limits --------------------------------------------------------------------------------------


async def test_html_429_without_retry_after_on_submits(harness: Harness) -> None:
    """A proxy's HTML 429 with no Retry-After slows the submits down; all succeed, each billed once."""
    sim = await harness.sim(submit_rate=40.0, submit_burst=1, html_429=True)
    outcome = await run_items(harness, sim)

    assert outcome.exit_code == 0
    assert sim.stats.rate_limited_submits > 0
    assert outcome.result.stats.rate_limited > 0
    assert sim.stats.accepted == ITEMS
    assert sim.stats.duplicate_bodies == 0
    assert outcome.duplicates() == []


async def test_429_with_retry_after_on_submits(harness: Harness) -> None:
    """A JSON 429 carrying Retry-After is honoured; all succeed, each billed once."""
    sim = await harness.sim(submit_rate=40.0, submit_burst=1, retry_after=0.05)
    outcome = await run_items(harness, sim)

    assert outcome.exit_code == 0
    assert sim.stats.rate_limited_submits > 0
    assert sim.stats.accepted == ITEMS
    assert outcome.duplicates() == []


async def test_poll_rate_limit_429s(harness: Harness) -> None:
    """Polls refused with 429 are paused and polled again; all succeed, nothing resubmitted."""
    sim = await harness.sim(poll_rate=40.0, poll_burst=1, inference_polls=3)
    outcome = await run_items(harness, sim)

    assert outcome.exit_code == 0
    assert sim.stats.rate_limited > 0
    assert sim.stats.rate_limited_submits == 0
    assert sim.stats.accepted == ITEMS


async def test_poll_429_backoff_starts_afresh_after_an_answered_poll(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first poll 429 after an answered poll pauses for a first backoff step, not for one that has
    doubled with every 429 since the run began."""
    seen: list[str | int] = []  #: "ok" for each answered poll, the backoff streak at each poll 429

    class SpyClient(ApiClient):
        async def poll(self, prediction_id: str) -> Prediction:
            prediction = await super().poll(prediction_id)
            seen.append("ok")
            return prediction

    class SpyBudget(PollBudget):
        def on_rate_limited(self, retry_after: float | None) -> float:
            if seen and seen[-1] == "ok":
                assert self._streak == 0, f"the backoff kept growing across answered polls: {seen}"
            seen.append(self._streak)
            return super().on_rate_limited(retry_after)

    monkeypatch.setattr(engine, "ApiClient", SpyClient)
    monkeypatch.setattr(engine, "PollBudget", SpyBudget)
    sim = await harness.sim(poll_rate=40.0, poll_burst=1, inference_polls=4)
    outcome = await run_items(harness, sim)

    assert outcome.exit_code == 0
    firsts = [later for earlier, later in itertools.pairwise(seen) if earlier == "ok" and later != "ok"]
    assert firsts, "some poll 429 came after an answered poll"
    assert set(firsts) == {0}


async def test_concurrency_cap_429s_are_handled_like_a_rate_limit(harness: Harness) -> None:
    """A server capping concurrent tasks below max_in_flight answers 429 "too many concurrent tasks":
    the engine slows down, all succeed, none billed twice."""
    sim = await harness.sim(max_concurrent=2, inference_polls=3)
    outcome = await run_items(harness, sim, settings=fast_settings(max_in_flight=ITEMS))

    assert outcome.exit_code == 0
    assert sim.stats.rate_limited_submits > 0
    assert sim.stats.max_concurrent_seen <= 2
    assert sim.stats.accepted == ITEMS
    assert outcome.duplicates() == []


# ---- downloads ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "knobs",
    [
        {"p_download_500": 0.5},
        {"p_download_truncated": 0.5},
        {"p_download_corrupt": 0.5},
        {"p_download_500": 0.3, "p_download_truncated": 0.3, "p_download_corrupt": 0.3},
    ],
    ids=["500", "truncated", "corrupt", "all"],
)
async def test_failed_downloads_are_retried_not_the_edit(harness: Harness, knobs: dict[str, float]) -> None:
    """An output download that fails (500, cut short, or whole but with a changed byte) is fetched
    again; the edit is not resubmitted and the file on disk is complete."""
    sim = await harness.sim(seed=9, **knobs)
    outcome = await run_items(harness, sim)

    assert outcome.exit_code == 0
    assert sim.stats.accepted == ITEMS
    assert sim.stats.downloads > ITEMS
    if "p_download_truncated" in knobs:
        assert sim.stats.truncated_downloads > 0
    if "p_download_corrupt" in knobs:
        assert sim.stats.corrupt_downloads > 0


async def test_an_output_hosts_retry_after_is_bounded(harness: Harness, scripted: Scripted) -> None:
    """A download answered 429 "Retry-After: 86400" is retried after at most a minute, not a day (within
    an item timeout longer than that minute)."""
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    server = await scripted()
    done = {"id": "p-1", "status": "completed", "outputs": [server.url + "/o.png"], "error": None}
    server.reply("/api/v3/openai/gpt-image-2-plus/image-edit", Reply.json({"data": done, "code": 200}))
    png = render_output(64, 64, prompt="edit a", index=0)
    busy = Reply.text("come back tomorrow", 429, "text/plain", **{"Retry-After": "86400"})
    server.reply("/o.png", busy, Reply(200, png, {"Content-Type": "image/png"}))
    items = [{"id": "a", "prompt": "edit a", "images": ["https://example.com/a.png"]}]
    outcome = await harness.run(
        harness.manifest(items), server, sleep=sleep, settings=fast_settings(timeout=120.0)
    )

    check_settled(outcome, ["a"], {"a": (64, 64)})
    assert [s.path for s in server.seen].count("/o.png") == 2
    assert slept == [clamp_retry_after(86400.0)]
    assert slept[0] <= 60.0


async def test_a_large_output_changed_on_the_way_is_fetched_again(
    harness: Harness, scripted: Scripted
) -> None:
    """An output over INLINE_BYTES (checked and written in a worker thread) that arrives whole in length
    but with one byte changed fails its check and is fetched again; the file saved is the good one."""
    server = await scripted()
    done = {"id": "p-1", "status": "completed", "outputs": [server.url + "/o.png"], "error": None}
    server.reply("/api/v3/openai/gpt-image-2-plus/image-edit", Reply.json({"data": done, "code": 200}))
    noise = Image.frombytes("RGB", (200, 200), random.Random(7).randbytes(200 * 200 * 3))
    buffer = io.BytesIO()
    noise.save(buffer, format="PNG")
    png = buffer.getvalue()
    assert len(png) > INLINE_BYTES
    changed = png[: len(png) // 2] + bytes([png[len(png) // 2] ^ 0xFF]) + png[len(png) // 2 + 1 :]
    headers = {"Content-Type": "image/png"}
    server.reply("/o.png", Reply(200, changed, headers), Reply(200, png, headers))
    items = [{"id": "a", "prompt": "edit a", "images": ["https://example.com/a.png"]}]
    outcome = await harness.run(harness.manifest(items), server)

    check_settled(outcome, ["a"], {"a": (200, 200)})
    assert [s.path for s in server.seen].count("/o.png") == 2
    assert (outcome.out_dir / "images" / "a-1.png").read_bytes() == png


async def test_a_poll_refused_403_leaves_the_paid_prediction_to_the_next_run(
    harness: Harness, scripted: Scripted
) -> None:
    """A 403 on a poll stops submitting and leaves the accepted prediction "submitted", never failed;
    the next run polls it (no new submit) and saves its output."""
    server = await scripted()
    created: dict[str, Any] = {"id": "p-1", "status": "created", "outputs": [], "error": None}
    server.reply("/api/v3/openai/gpt-image-2-plus/image-edit", Reply.json({"data": created, "code": 200}))
    server.reply(
        "/api/v3/predictions/p-1/result", Reply.json({"error": {"message": "insufficient balance"}}, 403)
    )
    manifest = harness.manifest([{"id": "a", "prompt": "edit a", "images": ["https://example.com/a.png"]}])

    stopped = await harness.run(manifest, server)

    assert stopped.exit_code == 3
    assert stopped.report["stopped_reason"] == "balance"
    assert (stopped.entry("a")["status"], stopped.entry("a")["prediction_id"]) == ("submitted", "p-1")

    done = {"id": "p-1", "status": "completed", "outputs": [server.url + "/o.png"], "error": None}
    server.reply("/api/v3/predictions/p-1/result", Reply.json({"data": done, "code": 200}))
    server.reply(
        "/o.png", Reply(200, render_output(64, 64, prompt="edit a", index=0), {"Content-Type": "image/png"})
    )
    resumed = await harness.run(manifest, server)

    check_settled(resumed, ["a"], {"a": (64, 64)})
    assert [s.method for s in server.seen].count("POST") == 1


# ---- everything at once -------------------------------------------------------------------------------


async def test_everything_at_once_loses_nothing(harness: Harness) -> None:
    """Every fault at a moderate rate together: each item still ends succeeded or failed with a reason."""
    sim = await harness.sim(
        seed=13,
        p_500=0.15,
        p_503=0.1,
        p_drop_before_accept=0.1,
        p_drop_after_accept=0.1,
        p_failed=0.15,
        p_slow=0.1,
        slow_seconds=0.3,
        p_download_500=0.2,
        p_download_truncated=0.2,
        submit_rate=60.0,
        poll_rate=80.0,
        max_concurrent=4,
    )
    outcome = await run_items(harness, sim, client={"submit_timeout": 0.15, "poll_timeout": 0.15})

    assert outcome.exit_code in (0, 1)
    assert len(outcome.results) == ITEMS
