"""Whole runs against a hostile server: whatever it answers, every item ends succeeded or failed with its
reason (or stays resumable), the run never crashes, never waits without bound, keeps what it was asked for
and no more, and writes the key nowhere."""

from __future__ import annotations

import io
import logging
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from batch_engine.stages.submit import RATE_LIMITED_ATTEMPTS, RUN_REFUSALS, RefusalWatch
from tests.helpers import FAST_RETRY, KEY, Harness, check_settled, fast_settings
from tests.hostile import (
    EDIT_PATH,
    HostileServer,
    accepted,
    by_prompt,
    delayed,
    echo_auth,
    envelope,
    png,
    rate_limited,
    raw,
    trickle,
)

pytest_plugins = ("tests.helpers", "tests.hostile")
pytestmark = pytest.mark.anyio

Hostile = Callable[[], Awaitable[HostileServer]]


def items(*ids: str, **fields: Any) -> list[dict[str, Any]]:
    """Items whose prompt is their id (so a server can tell them apart), each with one input URL."""
    return [{"id": i, "prompt": i, "images": ["https://example.com/in.png"], **fields} for i in ids]


def posts(server: HostileServer) -> int:
    return server.hits[EDIT_PATH]


def every_file(out_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out_dir)): p.read_bytes() for p in out_dir.rglob("*") if p.is_file()}


# ---- the key (issue 9, item 5) -------------------------------------------------------------------------


async def test_a_key_echoed_by_the_server_reaches_no_file_and_no_log_line(
    harness: Harness, hostile: Hostile, caplog: pytest.LogCaptureFixture
) -> None:
    """The key echoed in a failed prediction's error and model, as a prediction id, or in an output URL
    ends up in no report, journal or log line (each item fails with its reason, ``***`` in its place)."""
    caplog.set_level(logging.DEBUG, logger="batch_engine")
    server = await hostile()
    choices = {where: echo_auth(server, where) for where in ("error", "id", "url")}
    server.route(EDIT_PATH, by_prompt(choices, raw(b"{}", 500)))
    outcome = await harness.run(harness.manifest(items("error", "id", "url")), server)

    check_settled(outcome, ["error", "id", "url"])
    assert outcome.kinds == {"error": "inference_failed", "id": "network", "url": "download"}
    assert "invalid token: Bearer ***" in outcome.entry("error")["error"]["message"]
    assert "'***' is not usable" in outcome.entry("id")["error"]["message"]
    assert "/out/***.png answered 404" in outcome.entry("url")["error"]["message"]
    leaks = [name for name, data in every_file(outcome.out_dir).items() if KEY.encode() in data]
    assert leaks == []
    assert KEY not in caplog.text
    assert all(KEY not in s.path for s in server.seen)


# ---- numbers and formats that crashed the run (item 7) ------------------------------------------------


async def test_an_execution_time_past_sqlite_integer_is_not_stored(
    harness: Harness, hostile: Hostile
) -> None:
    """A completed prediction claiming executionTime 1e30 ms (too large for SQLite's INTEGER) succeeds,
    with no inference time recorded."""
    server = await hostile()
    server.route(EDIT_PATH, accepted(server, "/o.png", executionTime=1e30))
    server.route("/o.png", png())
    outcome = await harness.run(harness.manifest(items("a")), server)

    check_settled(outcome, ["a"], {"a": (64, 64)})
    assert outcome.entry("a")["timings"]["inference_ms"] is None


def corrupt_dds() -> bytes:
    """A DDS output whose pixel format no decoder knows (Pillow raised NotImplementedError on it)."""
    picture = Image.new("RGBA", (32, 32), (200, 10, 10, 255))
    buffer = io.BytesIO()
    picture.save(buffer, format="DDS")
    data = buffer.getvalue()
    return data[:80] + struct.pack("<I", 4) + b"XXXX" + data[88:]


async def test_a_corrupt_output_in_a_foreign_format_fails_its_item_not_the_run(
    harness: Harness, hostile: Hostile
) -> None:
    """An output that is a corrupt DDS fails its item as download; the other item succeeds."""
    server = await hostile()
    choices = {"dds": accepted(server, "/o.dds")}
    server.route(EDIT_PATH, by_prompt(choices, accepted(server, "/o.png")))
    server.route("/o.dds", raw(corrupt_dds(), headers={"Content-Type": "image/vnd-ms.dds"}))
    server.route("/o.png", png())
    outcome = await harness.run(harness.manifest(items("dds", "ok")), server)

    check_settled(outcome, ["dds", "ok"], {"ok": (64, 64)})
    assert outcome.kinds == {"dds": "download", "ok": None}
    assert "only PNG, JPEG, WebP and GIF" in outcome.entry("dds")["error"]["message"]
    assert outcome.exit_code == 1


# ---- what is kept, and how much (item 9) --------------------------------------------------------------


async def test_outputs_beyond_what_the_item_asked_for_are_ignored_with_a_warning(
    harness: Harness, hostile: Hostile, caplog: pytest.LogCaptureFixture
) -> None:
    """A prediction with 300 outputs for an item of n: 1 (or n: 2) keeps 1 (or 2); the rest are not
    downloaded, and a warning says so."""
    server = await hostile()
    outputs = [f"/o/{k}.png" for k in range(300)]
    server.route(EDIT_PATH, accepted(server, *outputs))
    for path in outputs:
        server.route(path, png())
    manifest = harness.manifest([*items("one"), *items("two", n=2)])
    outcome = await harness.run(manifest, server)

    check_settled(outcome, ["one", "two"], {"one": (64, 64), "two": (64, 64)})
    assert [len(outcome.entry(i)["outputs"]) for i in ("one", "two")] == [1, 2]
    assert sum(server.hits[path] for path in outputs) == 3
    assert "item one asked for 1 output(s) and the prediction has 300" in caplog.text
    saved = sorted(p.name for p in (outcome.out_dir / "images").iterdir())
    assert saved == ["one-1.png", "two-1.png", "two-2.png"]


async def test_a_huge_failure_message_is_stored_cut_everywhere(harness: Harness, hostile: Hostile) -> None:
    """A failed prediction's 8 MB message is kept cut, with its length, in the report and results; no file
    of the run grows by megabytes."""
    server = await hostile()
    message = "inference failed: " + "x" * 8_000_000
    server.route(EDIT_PATH, accepted(server, status="failed", error=message))
    outcome = await harness.run(harness.manifest(items("a")), server)

    stored = outcome.entry("a")["error"]["message"]
    assert stored.startswith("inference failed: xxx")
    assert stored.endswith(f"(cut: {len(message):,} characters in all)")
    assert outcome.results[0]["error"]["message"] == stored
    assert max(len(data) for data in every_file(outcome.out_dir).values()) < 1_000_000


# ---- prediction ids (item 10) -------------------------------------------------------------------------


async def test_a_prediction_id_of_dot_dot_is_never_polled(harness: Harness, hostile: Hostile) -> None:
    """A submit answered with id ``..`` is an unusable answer (ambiguous, resent within the retry
    policy, then failed): nothing is ever polled, so ``/api/v3/result`` is never asked for."""
    server = await hostile()
    server.route(EDIT_PATH, envelope(id="..", status="created"))
    outcome = await harness.run(harness.manifest(items("a")), server)

    check_settled(outcome, ["a"])
    assert outcome.kinds == {"a": "network"}
    assert [s.method for s in server.seen] == ["POST"] * FAST_RETRY.attempts
    assert outcome.entry("a")["possible_duplicate"]


# ---- bounded waits (item 11) --------------------------------------------------------------------------


async def test_an_item_rate_limited_over_and_over_fails_and_the_rest_go_on(
    harness: Harness, hostile: Hostile
) -> None:
    """An item whose every submit is answered 429 fails as rate_limited after its attempt budget; the
    other items succeed and the run finishes (exit 1)."""
    server = await hostile()
    server.route(EDIT_PATH, by_prompt({"throttled": rate_limited("0")}, accepted(server, "/o.png")))
    server.route("/o.png", png())
    settings = fast_settings(adapt=False)
    outcome = await harness.run(harness.manifest(items("throttled", "a", "b")), server, settings=settings)

    check_settled(outcome, ["throttled", "a", "b"], {"a": (64, 64), "b": (64, 64)})
    error = outcome.entry("throttled")["error"]
    assert (error["kind"], error["status"]) == ("rate_limited", 429)
    assert f"rate limited (429) {RATE_LIMITED_ATTEMPTS} times" in error["message"]
    assert posts(server) == RATE_LIMITED_ATTEMPTS + 2
    assert (outcome.exit_code, outcome.report["stopped_reason"]) == (1, None)


async def test_an_item_rate_limited_past_its_timeout_fails_as_rate_limited(
    harness: Harness, hostile: Hostile
) -> None:
    """An item answered 429 (each after 20 ms) for longer than its timeout, while other items keep being
    accepted, fails as rate_limited well before its attempt budget; the others succeed."""
    server = await hostile()
    refuse = delayed(rate_limited("0"), 0.02)
    server.route(EDIT_PATH, by_prompt({"throttled": refuse}, accepted(server, "/o.png")))
    server.route("/o.png", png())
    others = [f"ok-{k}" for k in range(8)]
    settings = fast_settings(adapt=False, timeout=0.3)
    outcome = await harness.run(harness.manifest(items("throttled", *others)), server, settings=settings)

    check_settled(outcome, ["throttled", *others], dict.fromkeys(others, (64, 64)))
    message = outcome.entry("throttled")["error"]["message"]
    assert outcome.kinds["throttled"] == "rate_limited"
    assert "past the item's 0.3 s timeout" in message
    assert posts(server) < RATE_LIMITED_ATTEMPTS


async def test_a_run_whose_every_submit_is_refused_stops_resumable(
    harness: Harness, hostile: Hostile
) -> None:
    """When every submit is answered 429, the run stops submitting (stopped_reason throttled, exit 3)
    with every item still pending, none failed; run again once the key is let through, all succeed."""
    server = await hostile()
    server.route(EDIT_PATH, rate_limited("0"))
    server.route("/o.png", png())
    manifest = harness.manifest(items("a", "b", "c"))
    settings = fast_settings(adapt=False, timeout=0.4)
    stopped = await harness.run(manifest, server, settings=settings)

    assert (stopped.exit_code, stopped.report["stopped_reason"]) == (3, "throttled")
    assert set(stopped.statuses.values()) == {"pending"}
    assert posts(server) < 3 * RATE_LIMITED_ATTEMPTS

    server.route(EDIT_PATH, accepted(server, "/o.png"))
    resumed = await harness.run(manifest, server, settings=settings)
    check_settled(resumed, ["a", "b", "c"], dict.fromkeys("abc", (64, 64)))


async def test_a_trickling_download_is_bounded_by_the_items_timeout(
    harness: Harness, hostile: Hostile
) -> None:
    """An output sent one byte every 50 ms is given up on (kind download) within the item's timeout,
    after a couple of tries, not download_timeout times eight."""
    server = await hostile()
    server.route(EDIT_PATH, accepted(server, "/slow.png"))
    server.route("/slow.png", trickle(server))
    outcome = await harness.run(
        harness.manifest(items("a")), server, settings=fast_settings(timeout=0.6),
        client={"download_timeout": 0.25},
    )

    check_settled(outcome, ["a"])
    assert outcome.kinds == {"a": "download"}
    assert "timeout" in outcome.entry("a")["error"]["message"]
    assert 1 <= server.hits["/slow.png"] <= 3


async def test_a_trickling_submit_is_resent_only_until_the_items_timeout(
    harness: Harness, hostile: Hostile
) -> None:
    """A submit whose answer trickles past submit_timeout is lost (maybe billed): it is resent, marked
    possible_duplicate, only until the item's timeout, far fewer times than the retry policy allows."""
    server = await hostile()
    server.route(EDIT_PATH, trickle(server, drain=True))
    outcome = await harness.run(
        harness.manifest(items("a")), server, settings=fast_settings(timeout=0.6),
        client={"submit_timeout": 0.15},
    )

    check_settled(outcome, ["a"])
    entry = outcome.entry("a")
    assert (entry["error"]["kind"], entry["possible_duplicate"]) == ("network", True)
    assert "past the item's 0.6 s timeout" in entry["error"]["message"]
    assert 2 <= posts(server) < FAST_RETRY.attempts


def test_many_429s_in_a_row_over_the_window_stop_the_run() -> None:
    """RUN_REFUSALS 429s in a row stop the run once they span the refusal window, not before; a few 429s
    far apart never do; an accepted submit (or a 400) in between starts the count afresh."""
    watch = RefusalWatch()
    assert not any(watch.refused(float(t), window=300.0) for t in range(RUN_REFUSALS))
    assert watch.refused(300.0, window=300.0)
    watch.answered()
    assert not watch.refused(301.0, window=300.0)
    sparse = RefusalWatch()
    assert not any(sparse.refused(1000.0 * t, window=300.0) for t in range(RUN_REFUSALS - 1))


def test_an_item_is_blamed_only_if_something_else_got_through() -> None:
    """Nothing accepted since an item's first 429 means the key is refused; an acceptance after it means
    the item alone is."""
    watch = RefusalWatch()
    watch.refused(10.0, window=300.0)
    assert watch.nothing_accepted_since(10.0)
    watch.answered()
    watch.refused(12.0, window=300.0)
    assert not watch.nothing_accepted_since(10.0)
    assert watch.nothing_accepted_since(12.0)


# ---- where outputs may come from (item 15) ------------------------------------------------------------


async def test_an_output_on_the_metadata_address_fails_its_item_unfetched(
    harness: Harness, hostile: Hostile
) -> None:
    """With the API on a public address, an output URL on 169.254.169.254 fails its item as download at
    once (no retries); an output on the API's own host is fetched."""
    server = await hostile()
    metadata = "http://169.254.169.254/latest/meta-data/iam/security-credentials/"
    server.route(EDIT_PATH, by_prompt({"meta": accepted(server, metadata)}, accepted(server, "/o.png")))
    server.route("/o.png", png())
    outcome = await harness.run(
        harness.manifest(items("meta", "ok")), server, client={"allow_private_outputs": False}
    )

    check_settled(outcome, ["meta", "ok"], {"ok": (64, 64)})
    assert outcome.kinds == {"meta": "download", "ok": None}
    assert "169.254.169.254 is not a public address" in outcome.entry("meta")["error"]["message"]

