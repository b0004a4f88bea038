"""The engine end to end, in-process, over real sockets against the built-in simulator."""

from __future__ import annotations

import io
from typing import Any

import pytest

from batch_engine.engine import exit_code
from batch_engine.manifest import load_manifest
from batch_engine.sim import Simulator
from batch_engine.sim.config import PredictionRecord
from batch_engine.sim.drawing import render_output
from batch_engine.ui.progress import QuietView
from batch_engine.values import Snapshot
from tests.helpers import (
    KEY,
    Harness,
    check_outputs,
    check_settled,
    edit_item,
    edit_items,
    expected_size,
    fast_settings,
)

pytest_plugins = ("tests.helpers",)
pytestmark = pytest.mark.anyio


def pred_ids(sim: Simulator) -> dict[str, str]:
    """Prompt → prediction id, for every prediction the simulator accepted."""
    return {pred.prompt: pred.id for pred in sim.stats.predictions.values()}


# ---- the happy path -----------------------------------------------------------------------------------


async def test_happy_path_writes_every_output_and_report_field(harness: Harness) -> None:
    """Several items (one with n=2, one b64_json, one 1536x1024) all succeed: each output named
    <id>-<k>.<ext>, on disk with its sha256 and size, and every report field filled in."""
    sim = await harness.sim()
    items = [
        edit_item(sim, "sku-1"),
        edit_item(sim, "sku-2", n=2),
        edit_item(sim, "sku-3", response_format="b64_json"),
        edit_item(sim, "sku-4", size="1536x1024"),
    ]
    outcome = await harness.run(harness.manifest(items), sim, copy_inputs=True)

    assert outcome.exit_code == 0
    check_settled(outcome, ["sku-1", "sku-2", "sku-3", "sku-4"], {"sku-4": expected_size("1536x1024")})
    assert [o["path"] for o in outcome.entry("sku-2")["outputs"]] == [
        "images/sku-2-1.png",
        "images/sku-2-2.png",
    ]
    assert outcome.entry("sku-1")["outputs"][0]["path"] == "images/sku-1-1.png"
    ids = pred_ids(sim)
    for entry in outcome.entries:
        assert entry["prediction_id"] == ids[f"edit {entry['id']}"]
        assert entry["error"] is None
        assert entry["attempts"] == 1
        assert entry["possible_duplicate"] is False
        assert entry["timings"]["submitted"]
        assert entry["timings"]["completed"]
        assert entry["timings"]["inference_ms"] > 0
        assert all(o["nsfw"] is False for o in entry["outputs"])
    b64 = outcome.entry("sku-3")["outputs"][0]
    assert b64["url"] is None
    assert outcome.entry("sku-1")["outputs"][0]["url"].startswith(sim.base_url + "/_sim/outputs/")
    header = outcome.report
    assert header["counts"] == {"total": 4, "succeeded": 4, "failed": 0, "unfinished": 0}
    assert header["stopped_reason"] is None
    assert header["images"] == 5
    assert outcome.failures is None
    assert list((outcome.out_dir / "inputs").iterdir()), "the input image was copied for index.html"
    assert (outcome.out_dir / "index.html").exists()
    assert sim.stats.accepted == 4
    assert sim.stats.duplicate_bodies == 0
    assert sim.stats.key_leaks == 0


@pytest.mark.parametrize("prefix", [True, False], ids=["data-prefix", "bare-base64"])
async def test_b64_outputs_are_decoded_with_or_without_a_data_prefix(harness: Harness, prefix: bool) -> None:
    """b64_json outputs are saved as the exact image bytes the server encoded, data: prefix or not."""
    sim = await harness.sim(b64_data_prefix=prefix)
    items = [edit_item(sim, "b64", response_format="b64_json", n=2)]
    outcome = await harness.run(harness.manifest(items), sim)

    check_settled(outcome, ["b64"])
    for k, output in enumerate(outcome.entry("b64")["outputs"]):
        assert output["path"] == f"images/b64-{k + 1}.png"
        drawn = render_output(*expected_size(), prompt="edit b64", index=k, seed=0)
        assert (outcome.out_dir / output["path"]).read_bytes() == drawn


async def test_report_lists_items_in_manifest_order(harness: Harness) -> None:
    """report.yaml and results.jsonl list items in manifest order, whatever order they finished in."""
    sim = await harness.sim(inference_polls=None, inference_median=0.05, inference_spread=1.0)
    ids = [f"z{k}" for k in range(7, 0, -1)]
    outcome = await harness.run(harness.manifest([edit_item(sim, i) for i in ids]), sim)

    check_settled(outcome, ids)
    assert [line["id"] for line in outcome.results] == ids


# ---- sync mode ----------------------------------------------------------------------------------------


async def test_sync_mode_completed_answer_needs_no_poll(harness: Harness) -> None:
    """With enable_sync_mode, a submit answered "completed" is downloaded with no poll at all."""
    sim = await harness.sim()
    items = [*edit_items(sim, 3, "sync", enable_sync_mode=True), edit_item(sim, "async")]
    outcome = await harness.run(harness.manifest(items), sim)

    check_settled(outcome, ["sync-0", "sync-1", "sync-2", "async"])
    polls = sim.stats.poll_counts
    for item_id in ("sync-0", "sync-1", "sync-2"):
        assert polls.get(outcome.entry(item_id)["prediction_id"], 0) == 0
    assert polls[outcome.entry("async")["prediction_id"]] == 2
    assert outcome.report["run"]["polls"] == 2
    assert outcome.report["run"]["predictions_resolved"] == 4


async def test_sync_mode_failed_answer_fails_the_item_without_a_poll(harness: Harness) -> None:
    """A sync-mode answer that says the prediction failed fails the item at once, with the server's text."""
    sim = await harness.sim(p_failed=1.0, failed_status="error")
    outcome = await harness.run(harness.manifest(edit_items(sim, 2, enable_sync_mode=True)), sim)

    assert outcome.exit_code == 1
    check_settled(outcome, ["item-0", "item-1"])
    assert set(outcome.kinds.values()) == {"inference_failed"}
    assert all("could not process" in e["error"]["message"] for e in outcome.entries)
    assert sim.stats.polls == 0
    assert outcome.report["run"]["predictions_resolved"] == 2


async def test_sync_mode_early_answer_is_still_polled(harness: Harness) -> None:
    """A sync-mode answer that comes while still processing is polled until it completes."""
    sim = await harness.sim(sync_early=True)
    outcome = await harness.run(harness.manifest(edit_items(sim, 2, enable_sync_mode=True)), sim)

    check_settled(outcome, ["item-0", "item-1"])
    for entry in outcome.entries:
        assert sim.stats.poll_counts[entry["prediction_id"]] == 2


# ---- envelope variants --------------------------------------------------------------------------------

ENVELOPES: list[dict[str, Any]] = [
    {"urls_as_list": True},
    {"camel_case": True},
    {"error_empty_string": True},
    {"nsfw_null": True},
    {"rfc3339_times": True},
    {"processing_status": "running"},
    {"processing_status": "pending"},
    {"processing_status": "in_progress"},
    {"error_body_style": "flat", "urls_as_list": True, "camel_case": True, "nsfw_null": True},
]


@pytest.mark.parametrize("knobs", ENVELOPES, ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()))
async def test_every_envelope_variant_succeeds(harness: Harness, knobs: dict[str, Any]) -> None:
    """Each envelope variant the API is known to send (key spelling, list urls, status words) works."""
    sim = await harness.sim(processing_after=0.5, inference_polls=3, **knobs)
    items = [edit_item(sim, "url"), edit_item(sim, "b64", response_format="b64_json")]
    outcome = await harness.run(harness.manifest(items), sim)

    assert outcome.exit_code == 0
    check_settled(outcome, ["url", "b64"])
    nsfw = None if knobs.get("nsfw_null") else False
    assert all(o["nsfw"] is nsfw for e in outcome.entries for o in e["outputs"])
    assert all(sim.stats.poll_counts[e["prediction_id"]] == 3 for e in outcome.entries)


@pytest.mark.parametrize("failed_status", ["failed", "cancelled", "timeout", "expired", "error"])
async def test_every_failed_status_fails_the_item_with_the_servers_message(
    harness: Harness, failed_status: str
) -> None:
    """Each terminal failure word fails the item as inference_failed, carrying the server's error text."""
    sim = await harness.sim(p_failed=1.0, failed_status=failed_status, processing_status="running")
    outcome = await harness.run(harness.manifest(edit_items(sim, 2)), sim)

    assert outcome.exit_code == 1
    check_settled(outcome, ["item-0", "item-1"])
    for entry in outcome.entries:
        assert entry["error"]["kind"] == "inference_failed"
        assert "the model could not process the input image" in entry["error"]["message"]
        assert entry["prediction_id"] in sim.stats.predictions
        assert entry["outputs"] == []
    assert outcome.failures is not None
    assert [i["id"] for i in outcome.failures["items"]] == ["item-0", "item-1"]


# ---- models and tasks ---------------------------------------------------------------------------------


async def test_gpt_image_1_sends_its_inputs_as_image(harness: Harness) -> None:
    """A gpt-image-1 manifest sends the input list as wire field `image` (the simulator, like the API,
    refuses `images` for that model) and gets its b64_json default."""
    sim = await harness.sim()
    items = [edit_item(sim, "one"), edit_item(sim, "two", size="1536x1024")]
    outcome = await harness.run(harness.manifest(items, model="openai/gpt-image-1"), sim)

    assert outcome.exit_code == 0
    check_settled(outcome, ["one", "two"], {"two": expected_size("1536x1024")})
    assert all(o["url"] is None for e in outcome.entries for o in e["outputs"])  # b64_json by default
    assert {p.model for p in sim.stats.predictions.values()} == {"openai/gpt-image-1"}
    assert sim.stats.submit_requests == sim.stats.accepted == 2


async def test_text_to_image_needs_no_input(harness: Harness) -> None:
    """A text-to-image manifest (no images) runs against the text-to-image route."""
    sim = await harness.sim()
    items = [{"id": "t1", "prompt": "a red bicycle"}, {"id": "t2", "prompt": "a blue kite", "size": "auto"}]
    outcome = await harness.run(
        harness.manifest(items, model="openai/gpt-image-2", task="text-to-image"), sim
    )

    assert outcome.exit_code == 0
    check_settled(outcome, ["t1", "t2"])
    assert {p.task for p in sim.stats.predictions.values()} == {"text-to-image"}


# ---- items that fail ----------------------------------------------------------------------------------


async def test_request_the_server_refuses_fails_invalid_request_without_retry(harness: Harness) -> None:
    """A data: URI input passes the manifest check (a warning) but the API refuses it: failed
    invalid_request with the server's words, never sent twice, never billed."""
    sim = await harness.sim(accept_data_uris=False)
    items = [{"id": "inline", "prompt": "edit it", "images": ["data:image/png;base64,iVBORw0KGgo="]}]
    outcome = await harness.run(harness.manifest(items), sim)

    assert outcome.exit_code == 1
    check_settled(outcome, ["inline"])
    error = outcome.entry("inline")["error"]
    assert error["kind"] == "invalid_request"
    assert error["status"] == 400
    assert "expected a public http(s) URL" in error["message"]
    assert outcome.entry("inline")["prediction_id"] is None
    assert sim.stats.accepted == 0
    assert sim.stats.submit_requests == 1


async def test_content_policy_refusal_fails_the_item_as_content_policy(harness: Harness) -> None:
    """A prompt refused by the safety system fails as content_policy; the other items still succeed."""
    sim = await harness.sim()
    items = [edit_item(sim, "ok"), edit_item(sim, "bad", prompt="draw something FORBIDDEN")]
    outcome = await harness.run(harness.manifest(items), sim)

    assert outcome.exit_code == 1
    check_settled(outcome, ["ok", "bad"])
    assert outcome.kinds == {"ok": None, "bad": "content_policy"}
    assert outcome.entry("bad")["error"]["status"] == 400
    assert sim.stats.submit_requests == 2
    assert outcome.failures is not None
    assert outcome.failures["items"] == [
        {"id": "bad", "prompt": "draw something FORBIDDEN", "images": [sim.input_url("cat")]}
    ]
    rerun = load_manifest(outcome.out_dir / "failures.yaml")  # a manifest of the failed items alone
    assert [item.id for item in rerun.iter_items()] == ["bad"]


async def test_prediction_that_never_finishes_times_out(harness: Harness) -> None:
    """A prediction still running at the per-prediction timeout fails with kind timeout."""
    sim = await harness.sim(inference_polls=10_000)
    outcome = await harness.run(
        harness.manifest(edit_items(sim, 2)), sim, settings=fast_settings(timeout=0.3)
    )

    assert outcome.exit_code == 1
    check_settled(outcome, ["item-0", "item-1"])
    assert set(outcome.kinds.values()) == {"timeout"}
    assert all(sim.stats.poll_counts[e["prediction_id"]] > 0 for e in outcome.entries)
    assert sim.stats.accepted == 2


async def test_a_prediction_done_by_its_first_poll_after_the_deadline_is_saved(harness: Harness) -> None:
    """The timeout is decided by asking: a prediction found completed by the first poll after its
    deadline is saved, not failed as timeout unasked (a paid edit)."""
    sim = await harness.sim(inference_polls=None, inference_median=0.1, inference_spread=0.0)
    settings = fast_settings(timeout=0.05, poll_after=0.3)
    outcome = await harness.run(harness.manifest(edit_items(sim, 2)), sim, settings=settings)

    assert outcome.exit_code == 0
    check_settled(outcome, ["item-0", "item-1"])
    assert all(sim.stats.poll_counts[e["prediction_id"]] == 1 for e in outcome.entries)


# ---- runs that stop early ------------------------------------------------------------------------------


async def test_wrong_key_stops_the_run_at_once(harness: Harness) -> None:
    """A 401 stops the whole run (exit 3, reason auth): nothing is accepted, every item stays pending."""
    sim = await harness.sim(api_key="the-right-key")
    outcome = await harness.run(
        harness.manifest(edit_items(sim, 5)), sim, settings=fast_settings(rate=1, rate_min=0.5)
    )

    assert outcome.exit_code == 3
    assert outcome.result.stats.stopped_reason == "auth"
    assert outcome.report["stopped_reason"] == "auth"
    assert set(outcome.statuses.values()) == {"pending"}
    assert outcome.results == []
    assert sim.stats.accepted == 0
    assert sim.stats.submit_requests == 1
    assert sim.stats.status_counts == {401: 1}


async def test_raw_key_authorization_is_accepted(harness: Harness) -> None:
    """The raw key (as the vendor page sends it, bearer=False) works as well as Bearer."""
    sim = await harness.sim(api_key=KEY)
    outcome = await harness.run(harness.manifest(edit_items(sim, 2)), sim, client={"bearer": False})

    assert outcome.exit_code == 0
    check_settled(outcome, ["item-0", "item-1"])


async def test_balance_running_out_stops_submitting_and_finishes_what_was_accepted(harness: Harness) -> None:
    """After N accepted submits the API answers 403: exactly N are billed, those are finished and
    downloaded, the rest stay pending for a resume, and the exit code is 3."""
    sim = await harness.sim(balance=3)
    outcome = await harness.run(
        harness.manifest(edit_items(sim, 8)), sim, settings=fast_settings(rate=50, rate_min=5)
    )

    assert outcome.exit_code == 3
    assert outcome.report["stopped_reason"] == "balance"
    assert sim.stats.accepted == 3
    done = outcome.ids("succeeded")
    assert len(done) == 3
    for item_id in done:
        check_outputs(outcome, outcome.entry(item_id), expected_size())
    assert len(outcome.ids("pending")) == 5
    assert all(e["prediction_id"] is None for e in outcome.entries if e["status"] == "pending")
    assert sorted(line["id"] for line in outcome.results) == sorted(done)


async def test_sync_answers_arriving_after_the_balance_ran_out_are_still_saved(harness: Harness) -> None:
    """Sync-mode submits accepted before a 403 and answered after it are still downloaded, not dropped."""
    sim = await harness.sim(balance=3, inference_polls=None, inference_median=0.2, inference_spread=0.0)
    items = edit_items(sim, 6, enable_sync_mode=True)
    outcome = await harness.run(harness.manifest(items), sim)

    assert outcome.exit_code == 3
    assert sim.stats.accepted == 3
    assert len(outcome.ids("succeeded")) == 3
    assert len(outcome.ids("pending")) == 3
    assert outcome.report["unfinished_by_state"]["submitted"] == 0
    for item_id in outcome.ids("succeeded"):
        check_outputs(outcome, outcome.entry(item_id), expected_size())


async def test_max_submits_budget_is_exact(harness: Harness) -> None:
    """--max-submits 3 bills exactly 3 submits, finishes them and stops with exit 3 (reason budget)."""
    sim = await harness.sim()
    outcome = await harness.run(
        harness.manifest(edit_items(sim, 7)), sim, settings=fast_settings(max_submits=3)
    )

    assert outcome.exit_code == 3
    assert outcome.report["stopped_reason"] == "budget"
    assert sim.stats.accepted == 3
    assert len(outcome.ids("succeeded")) == 3
    assert len(outcome.ids("pending")) == 4
    assert exit_code(outcome.result.stats) == 3


async def test_max_in_flight_is_honoured_and_reached(harness: Harness) -> None:
    """The server never sees more than max_in_flight predictions running at once, and does see that many."""
    sim = await harness.sim(inference_polls=4)
    settings = fast_settings(max_in_flight=3)
    outcome = await harness.run(harness.manifest(edit_items(sim, 7)), sim, settings=settings)

    assert outcome.exit_code == 0
    check_settled(outcome, [f"item-{k}" for k in range(7)])
    assert sim.stats.max_concurrent_seen == 3


async def test_a_foreign_get_url_is_never_sent_the_key(harness: Harness) -> None:
    """When data.urls.get points at another origin, the engine still polls its own API origin only."""
    sim = await harness.sim(foreign_get_url=True)
    outcome = await harness.run(harness.manifest(edit_items(sim, 3)), sim)

    assert outcome.exit_code == 0
    check_settled(outcome, ["item-0", "item-1", "item-2"])
    assert sim.stats.key_leaks == 0


# ---- files and secrets --------------------------------------------------------------------------------

HOSTILE_IDS = ["../../etc/passwd", "a/b", "a_b", "a b", "ünï", "CON", ".hidden", "..", "x" * 200]


async def test_hostile_ids_get_safe_distinct_file_names_inside_images(harness: Harness) -> None:
    """Ids with slashes, dots, spaces, non-ASCII or reserved names produce distinct files in <out>/images."""
    sim = await harness.sim()
    outcome = await harness.run(harness.manifest([edit_item(sim, i) for i in HOSTILE_IDS]), sim)

    assert outcome.exit_code == 0
    check_settled(outcome, HOSTILE_IDS)
    images = (outcome.out_dir / "images").resolve()
    files = sorted(p for p in outcome.out_dir.rglob("*") if p.is_file() and p.suffix == ".png")
    paths = [(outcome.out_dir / e["outputs"][0]["path"]).resolve() for e in outcome.entries]
    assert len(set(paths)) == len(HOSTILE_IDS)
    assert sorted(paths) == files
    assert all(p.parent == images for p in paths)
    assert all(len(p.name) < 120 for p in paths)
    assert not (harness.tmp_path / "etc").exists()
    assert sorted(p for p in harness.tmp_path.rglob("*") if p.is_file() and p.suffix == ".png") == files


async def test_the_key_is_never_written_or_logged(harness: Harness, debug_log: io.StringIO) -> None:
    """Nothing under the out dir and nothing logged at DEBUG contains the API key, in any form."""
    sim = await harness.sim(api_key=KEY, p_failed=0.3, seed=3)
    items = [*edit_items(sim, 6), edit_item(sim, "bad", prompt="FORBIDDEN"), edit_item(sim, "b", n=2)]
    outcome = await harness.run(harness.manifest(items), sim, copy_inputs=True)

    check_settled(outcome, [*(f"item-{k}" for k in range(6)), "bad", "b"])
    log = debug_log.getvalue()
    assert "submitted as" in log, "DEBUG logging was on"
    assert KEY not in log
    assert "***" not in log, "the key never even reached a log line to be redacted"
    files = [p for p in outcome.out_dir.rglob("*") if p.is_file()]
    assert len(files) > 5
    for path in files:
        assert KEY.encode() not in path.read_bytes(), path


# ---- resume -------------------------------------------------------------------------------------------


async def test_resume_after_a_budget_stop_submits_only_the_rest(harness: Harness) -> None:
    """A run stopped by --max-submits resumes in the same out dir: the rest are submitted, none twice."""
    sim = await harness.sim()
    manifest = harness.manifest(edit_items(sim, 7))
    first = await harness.run(manifest, sim, settings=fast_settings(max_submits=3))
    assert first.exit_code == 3
    done_first = {e["id"]: e["prediction_id"] for e in first.entries if e["status"] == "succeeded"}
    assert len(done_first) == 3

    second = await harness.run(manifest, sim)

    assert second.exit_code == 0
    check_settled(second, [f"item-{k}" for k in range(7)])
    assert sim.stats.accepted == 7
    assert sim.stats.duplicate_bodies == 0
    assert second.result.stats.submits == 4
    for item_id, prediction_id in done_first.items():
        assert second.entry(item_id)["prediction_id"] == prediction_id
        assert second.entry(item_id)["attempts"] == 1


async def test_resume_polls_submitted_predictions_instead_of_resubmitting(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run stopped by a 401 on polls leaves items submitted; the next run polls those predictions to the
    end and downloads them, billing nothing again."""
    sim = await harness.sim(api_key=KEY)
    accept = sim._accept

    def accept_then_rotate(*args: Any) -> PredictionRecord:  # every submit is in: the key is revoked
        pred = accept(*args)
        if sim.stats.accepted == 4:
            sim.configure(api_key="rotated-key")
        return pred

    monkeypatch.setattr(sim, "_accept", accept_then_rotate)
    manifest = harness.manifest(edit_items(sim, 4))
    first = await harness.run(manifest, sim)
    assert first.exit_code == 3
    assert first.report["stopped_reason"] == "auth"
    assert set(first.statuses.values()) == {"submitted"}
    submitted = {e["id"]: e["prediction_id"] for e in first.entries}

    second = await harness.run(manifest, sim, key="rotated-key")

    assert second.exit_code == 0
    check_settled(second, list(submitted))
    assert {e["id"]: e["prediction_id"] for e in second.entries} == submitted
    assert sim.stats.accepted == sim.stats.submit_requests == 4
    assert second.result.stats.submits == 0


async def test_a_run_over_a_finished_out_dir_sends_nothing(harness: Harness) -> None:
    """Running a finished manifest again submits nothing and reports the same outputs."""
    sim = await harness.sim()
    manifest = harness.manifest(edit_items(sim, 3))
    first = await harness.run(manifest, sim)
    before = (sim.stats.submit_requests, sim.stats.polls, sim.stats.downloads)

    second = await harness.run(manifest, sim)

    assert second.exit_code == 0
    assert (sim.stats.submit_requests, sim.stats.polls, sim.stats.downloads) == before
    assert second.entries == first.entries
    check_settled(second, ["item-0", "item-1", "item-2"])


# ---- what the progress view is told -------------------------------------------------------------------


class SnapshotRecorder(QuietView):
    """A view that keeps every snapshot the engine sends."""

    def __init__(self) -> None:
        self.snapshots: list[Snapshot] = []

    def update(self, snapshot: Snapshot) -> None:
        self.snapshots.append(snapshot)


async def test_in_flight_counts_sent_predictions_not_submitters_waiting_for_their_turn(
    harness: Harness,
) -> None:
    """With a slow pace and a wide cap, "in flight" never exceeds the submits accepted and not finished
    (plus the one POST that may be on its way): submitters waiting for their pacing turn hold a slot,
    but they are not shown as predictions in flight."""
    sim = await harness.sim(inference_polls=2)
    view = SnapshotRecorder()
    settings = fast_settings(rate=4.0, rate_min=4.0, adapt=False, max_in_flight=8)
    outcome = await harness.run(harness.manifest(edit_items(sim, 6)), sim, settings=settings, view=view)

    check_settled(outcome, [f"item-{n}" for n in range(6)])
    assert len(view.snapshots) > 2
    for snap in view.snapshots:
        finished = snap.succeeded + snap.failed - snap.done_before
        assert snap.in_flight <= snap.submitted - finished + 1, snap


async def test_an_output_that_cannot_be_written_fails_its_item_and_not_the_run(harness: Harness) -> None:
    """An output whose path is taken by a folder cannot be written (not a disk error): its item fails
    as a download, named with the path, and the run goes on; the other item's output is on disk."""
    sim = await harness.sim()
    (harness.tmp_path / "out" / "images" / "sku-2-1.png").mkdir(parents=True)
    outcome = await harness.run(harness.manifest([edit_item(sim, "sku-1"), edit_item(sim, "sku-2")]), sim)

    assert outcome.exit_code == 1
    assert outcome.statuses == {"sku-1": "succeeded", "sku-2": "failed"}
    error = outcome.entry("sku-2")["error"]
    assert error["kind"] == "download"
    assert "cannot write images/sku-2-1.png" in error["message"]
    assert (outcome.out_dir / "images" / "sku-1-1.png").stat().st_size > 0
    assert outcome.report["stopped_reason"] is None
