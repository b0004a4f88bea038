"""The OpenAI-format route (``inputs: {route: openai-images}``): local files sent as a multipart form to
``/v1/images/edits``, answered with the pictures; the client's mapping, the simulator's view, whole runs, a
kill -9 in the middle of a request."""

from __future__ import annotations

import base64
import hashlib
import io
import signal
import sqlite3
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import pytest
import yaml

from batch_engine.api.catalogue import OPENAI_IMAGES_PATH
from batch_engine.api.client import ApiClient, ClientConfig, FormFile
from batch_engine.errors import (
    ApiError,
    ItemRejected,
    ManifestError,
    SlowDown,
    StopRun,
    StopSubmitting,
    SubmitOutcomeUnknown,
)
from batch_engine.images import verify_image
from batch_engine.manifest import load_manifest
from batch_engine.sim import SimConfig, Simulator
from batch_engine.sim.drawing import render_output
from tests.helpers import KEY, SCALE, Harness, Outcome, Reply, Scripted, fast_settings
from tests.procs import TEST_KEY, engine, run_args, run_engine, wait_until

pytest_plugins = ("tests.helpers",)
pytestmark = pytest.mark.anyio

PNG = render_output(48, 32, prompt="input", index=0)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_inputs(folder: Path, count: int) -> list[bytes]:
    """``in-<k>.png`` files, each of its own bytes."""
    made = []
    for k in range(count):
        data = render_output(40 + k, 24, prompt=f"input {k}", index=k)
        (folder / f"in-{k}.png").write_bytes(data)
        made.append(data)
    return made


def images_manifest(
    folder: Path,
    items: Sequence[Mapping[str, Any]],
    *,
    model: str = "openai/gpt-image-2-plus",
    task: str = "image-edit",
    settings: Mapping[str, Any] | None = None,
    name: str = "job.yaml",
) -> Path:
    doc: dict[str, Any] = {
        "version": 1,
        "name": "images-route",
        "model": model,
        "task": task,
        "settings": {"inputs": {"route": "openai-images"}, **(settings or {})},
        "items": [dict(item) for item in items],
    }
    path = folder / name
    path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return path


def items(count: int, **fields: Any) -> list[dict[str, Any]]:
    return [{"id": f"i{k}", "prompt": f"edit {k}", "images": [f"in-{k}.png"], **fields} for k in range(count)]


def journal_states(out: Path) -> Counter[str]:
    """Items per state in the out dir's journal, read as it was left."""
    conn = sqlite3.connect(out / "journal.sqlite")
    try:
        return Counter(state for (state,) in conn.execute("SELECT state FROM items"))
    finally:
        conn.close()


def scaled(size: str) -> tuple[int, int]:
    width, height = (1024, 1024) if size == "auto" else map(int, size.split("x"))
    return max(16, round(width * SCALE)), max(16, round(height * SCALE))


# -- the client: one form out, one answer in, mapped as a submit -----------------------------------------


async def images_edit(base_url: str, data: bytes = PNG, *, key: str = KEY) -> Any:
    async with ApiClient(ClientConfig(base_url=base_url, api_key=key)) as client:
        part = FormFile("image-1.png", io.BytesIO(data), "image/png")
        fields = {"model": "gpt-image-2-plus", "prompt": "a hat"}
        return await client.images_edit(OPENAI_IMAGES_PATH, fields, [part], seconds=10.0)


async def test_the_answer_is_a_completed_prediction_without_an_id(scripted: Scripted) -> None:
    """A 200 answer's b64_json pictures (and url ones) become the outputs of a completed prediction that
    has no id to poll."""
    server = await scripted()
    answer = {"data": [{"b64_json": "data:image/png;base64,AAAA"}, {"url": "https://x.test/2.png"}, 7]}
    server.reply(OPENAI_IMAGES_PATH, Reply.json({**answer, "created": 1700000000}))

    prediction = await images_edit(server.url)

    assert (prediction.id, prediction.status) == ("", "completed")
    assert prediction.outputs == ("data:image/png;base64,AAAA", "https://x.test/2.png")
    assert prediction.created_at == "1700000000"
    [seen] = server.seen
    assert (seen.method, seen.headers["Authorization"]) == ("POST", f"Bearer {KEY}")
    assert seen.headers["Content-Type"].startswith("multipart/form-data")


@pytest.mark.parametrize(
    ("reply", "error", "kind"),
    [
        (Reply.json({"error": {"message": "slow down"}}, 429, **{"Retry-After": "3"}), SlowDown, None),
        (Reply.json({"error": {"message": "bad size"}}, 400), ItemRejected, "invalid_request"),
        (Reply.json({"error": {"message": "safety system refused"}}, 400), ItemRejected, "content_policy"),
        (Reply.json({"error": {"message": "no key"}}, 401), StopRun, None),
        (Reply.json({"error": {"message": "insufficient balance"}}, 403), StopSubmitting, None),
        (Reply.json({"error": {"message": "oops"}}, 500), SubmitOutcomeUnknown, None),
        (Reply.text("<html>502</html>", 502), SubmitOutcomeUnknown, None),
        (Reply.text("not json", 200, "text/plain"), SubmitOutcomeUnknown, None),
    ],
)
async def test_errors_mean_what_they_mean_on_the_prediction_route(
    scripted: Scripted, reply: Reply, error: type[ApiError], kind: str | None
) -> None:
    """429 slows down, 400 fails the item (content policy by its words), 401 and 403 stop, and a 5xx or
    an unreadable 200 is a lost answer: the request may have been billed."""
    server = await scripted()
    server.reply(OPENAI_IMAGES_PATH, reply)
    with pytest.raises(error) as caught:
        await images_edit(server.url)
    if kind is not None:
        assert caught.value.kind == kind
    if isinstance(caught.value, SlowDown):
        assert caught.value.retry_after == 3.0


async def test_a_presigned_url_quoted_in_an_error_loses_its_signature(scripted: Scripted) -> None:
    """An error message quoting a presigned URL keeps its path, never its query (the access key id and a
    valid signature): it ends up in reports."""
    server = await scripted()
    url = "https://b.s3.test/in/x.png?X-Amz-Algorithm=AWS4&X-Amz-Credential=AKIA123%2F&X-Amz-Signature=ab12"
    server.reply(OPENAI_IMAGES_PATH, Reply.json({"error": {"message": f"cannot fetch {url}: 403"}}, 400))
    with pytest.raises(ItemRejected) as caught:
        await images_edit(server.url)
    assert caught.value.message == "cannot fetch https://b.s3.test/in/x.png?(signature removed) 403"
    assert "AKIA123" not in caught.value.message


# -- the simulator's side of the route ---------------------------------------------------------------------


async def post_form(sim: Simulator, fields: Mapping[str, str], files: Sequence[bytes]) -> tuple[int, Any]:
    form = aiohttp.FormData(default_to_multipart=True)
    for name, value in fields.items():
        form.add_field(name, value)
    for k, data in enumerate(files):
        form.add_field("image[]", data, filename=f"f{k}.png", content_type="image/png")
    async with aiohttp.ClientSession() as session, session.post(
        sim.base_url + OPENAI_IMAGES_PATH, data=form, headers={"Authorization": KEY}
    ) as answer:
        return answer.status, await answer.json(content_type=None)


@pytest.mark.parametrize(
    ("fields", "files", "says"),
    [
        ({"model": "gpt-image-2-plus", "prompt": "p"}, [], "expected 1 to 16 image files"),
        ({"model": "gpt-image-2", "prompt": "p"}, [PNG], "Invalid 'model'"),
        ({"model": "gpt-image-2-plus", "prompt": "p", "size": "1024x1024"}, [PNG], "Invalid 'size'"),
        ({"model": "gpt-image-2-plus"}, [PNG], "'prompt'"),
        ({"model": "gpt-image-2-plus", "prompt": "p"}, [b"GIF? no"], "Invalid 'image[0]'"),
    ],
)
async def test_the_simulator_checks_the_form_as_the_route_does(
    harness: Harness, fields: Mapping[str, str], files: Sequence[bytes], says: str
) -> None:
    """Each broken form is a 400 naming the field, and nothing is billed."""
    sim = await harness.sim()
    status, body = await post_form(sim, fields, files)
    assert status == 400
    assert says in body["error"]["message"]
    assert (sim.stats.images_requests, sim.stats.accepted) == (1, 0)


async def test_the_simulator_answers_with_the_pictures_and_counts_the_same_edit_twice(
    harness: Harness,
) -> None:
    """A good form is billed and answered with n pictures of the size asked; the same prompt and image
    bytes sent again are a duplicate body in the counts."""
    sim = await harness.sim()
    fields = {"model": "gpt-image-2-plus", "prompt": "a hat", "size": "1672x941", "n": "2"}
    for _ in range(2):
        status, body = await post_form(sim, fields, [PNG])
        assert status == 200
    assert isinstance(body["created"], int)
    encoded = [entry["b64_json"].removeprefix("data:image/png;base64,") for entry in body["data"]]
    pictures = [base64.b64decode(text) for text in encoded]
    assert [verify_image(picture) for picture in pictures] == [scaled("1672x941")] * 2
    assert (sim.stats.accepted, sim.stats.duplicate_bodies) == (2, 1)
    assert {pred.inputs_sha256 for pred in sim.stats.predictions.values()} == {(sha(PNG),)}


# -- whole runs ----------------------------------------------------------------------------------------------


async def test_local_files_are_sent_and_the_pictures_saved(harness: Harness) -> None:
    """Each item's files reach the endpoint as they are on disk, its pictures are saved at the size asked,
    and the report shows a success with no prediction id; nothing is polled."""
    inputs = write_inputs(harness.tmp_path, 3)
    sim = await harness.sim()
    specs = items(3)
    specs[1]["size"] = "1536x1024"
    specs[2] = {**specs[2], "images": ["in-2.png", "in-0.png"], "n": 2}
    outcome = await harness.run(images_manifest(harness.tmp_path, specs), sim)

    assert outcome.exit_code == 0, outcome.report
    assert [e["prediction_id"] for e in outcome.entries] == [None, None, None]
    assert [len(e["outputs"]) for e in outcome.entries] == [1, 1, 2]
    sizes = [scaled("auto"), scaled("1536x1024"), scaled("auto")]
    for entry, size in zip(outcome.entries, sizes, strict=True):
        for output in entry["outputs"]:
            assert verify_image((outcome.out_dir / output["path"]).read_bytes()) == size
    seen = {pred.prompt: pred.inputs_sha256 for pred in sim.stats.predictions.values()}
    assert seen == {
        "edit 0": (sha(inputs[0]),),
        "edit 1": (sha(inputs[1]),),
        "edit 2": (sha(inputs[2]), sha(inputs[0])),
    }
    assert (sim.stats.images_requests, sim.stats.polls, sim.stats.duplicate_bodies) == (3, 0, 0)
    assert outcome.report["possible_duplicates"] == 0


async def test_a_content_policy_refusal_fails_only_its_item(harness: Harness) -> None:
    """A prompt the route refuses fails as content_policy; the others succeed."""
    write_inputs(harness.tmp_path, 3)
    sim = await harness.sim()
    specs = items(3)
    specs[1]["prompt"] = "edit FORBIDDEN"
    outcome = await harness.run(images_manifest(harness.tmp_path, specs), sim)

    assert outcome.kinds == {"i0": None, "i1": "content_policy", "i2": None}
    assert outcome.entry("i1")["error"]["status"] == 400
    assert sim.stats.accepted == 2


async def test_429s_slow_the_run_down_and_nothing_is_paid_twice(harness: Harness) -> None:
    """Requests refused with 429 are sent again once the pause is over; every item succeeds, each billed
    once."""
    write_inputs(harness.tmp_path, 6)
    sim = await harness.sim(submit_rate=20.0, submit_burst=1, retry_after=0.05)
    outcome = await harness.run(images_manifest(harness.tmp_path, items(6)), sim)

    assert outcome.exit_code == 0, outcome.report
    assert sim.stats.rate_limited_submits > 0
    assert outcome.report["run"]["rate_limited"] == sim.stats.rate_limited_submits
    assert outcome.report["run"]["submits"] == 6  # answered requests count as accepted submits
    assert (sim.stats.accepted, sim.stats.duplicate_bodies) == (6, 0)
    assert outcome.report["possible_duplicates"] == 0


async def test_max_in_flight_bounds_the_open_requests(harness: Harness) -> None:
    """No more requests are open at once than max_in_flight, each held until its answer comes."""
    write_inputs(harness.tmp_path, 6)
    sim = await harness.sim(inference_median=0.1, inference_spread=0.0)
    manifest = images_manifest(harness.tmp_path, items(6))
    outcome = await harness.run(manifest, sim, settings=fast_settings(max_in_flight=2))

    assert outcome.exit_code == 0, outcome.report
    assert sim.stats.max_concurrent_seen == 2


async def test_a_dropped_connection_after_sending_is_resent_and_marked(harness: Harness) -> None:
    """A request whose connection drops after it was accepted is billed; it is sent again and the item is
    marked possible_duplicate (or, with resubmit_ambiguous off, fails as ambiguous_submit, sent once)."""
    write_inputs(harness.tmp_path, 2)
    sim = await harness.sim(p_drop_after_accept=1.0)
    specs = items(2)

    async def fault_over(delay: float) -> None:  # the engine's wait before resending: the fault is over
        sim.configure(p_drop_after_accept=0.0)

    resent = await harness.run(images_manifest(harness.tmp_path, specs[:1]), sim, sleep=fault_over)

    assert resent.statuses == {"i0": "succeeded"}
    assert resent.duplicates() == ["i0"]
    assert (sim.stats.accepted, sim.stats.duplicate_bodies, sim.stats.dropped) == (2, 1, 1)

    sim.configure(p_drop_after_accept=1.0)
    manifest = images_manifest(harness.tmp_path, specs[1:], name="strict.yaml")
    strict = await harness.run(manifest, sim, out="strict", settings=fast_settings(resubmit_ambiguous=False))

    assert strict.kinds == {"i1": "ambiguous_submit"}
    assert not strict.duplicates()
    assert (sim.stats.accepted, sim.stats.duplicate_bodies) == (3, 1)


async def test_a_refused_key_stops_the_run_and_leaves_every_item_to_resume(harness: Harness) -> None:
    """A 401 stops the run (exit 3, 'auth') with every item still to do and nothing billed; with the right
    key the same run finishes, nothing marked a possible duplicate."""
    write_inputs(harness.tmp_path, 2)
    sim = await harness.sim(api_key="another-key")
    manifest = images_manifest(harness.tmp_path, items(2))
    one_at_a_time = fast_settings(max_in_flight=1)  # no second request open when the first is refused
    outcome = await harness.run(manifest, sim, settings=one_at_a_time)

    assert outcome.exit_code == 3
    assert outcome.report["stopped_reason"] == "auth"
    assert set(outcome.statuses.values()) == {"pending"}
    assert sim.stats.accepted == 0
    sim.configure(api_key=KEY)
    resumed = await harness.run(manifest, sim, settings=one_at_a_time)
    assert resumed.exit_code == 0, resumed.report
    assert resumed.report["possible_duplicates"] == 0


async def test_a_refused_key_while_other_requests_are_open_stops_cleanly(harness: Harness) -> None:
    """A 401 while other requests are open stops the run at once (exit 3), those left to the next run's
    ambiguity policy; the rerun with the right key finishes, marking only those as possible duplicates."""
    write_inputs(harness.tmp_path, 6)
    sim = await harness.sim(api_key="another-key")
    manifest = images_manifest(harness.tmp_path, items(6))
    stopped = await harness.run(manifest, sim)

    assert stopped.exit_code == 3
    assert stopped.report["stopped_reason"] == "auth"
    assert set(stopped.statuses.values()) <= {"pending", "submitting"}
    cut_short = set(stopped.ids("submitting"))
    sim.configure(api_key=KEY)
    resumed = await harness.run(manifest, sim)
    assert resumed.exit_code == 0, resumed.report
    assert set(resumed.duplicates()) == cut_short
    assert sim.stats.duplicate_bodies == 0


async def test_a_file_gone_before_its_request_fails_only_its_item(harness: Harness) -> None:
    """A file that cannot be opened when its request is made fails its item as input, with nothing sent
    and no intent journaled; the items around it succeed."""
    write_inputs(harness.tmp_path, 3)
    sim = await harness.sim(p_slow=1.0, slow_seconds=1.0)
    manifest = images_manifest(harness.tmp_path, items(3))
    outcomes: list[Outcome] = []

    async def run() -> None:  # one submitter: i1's request is made only once i0's slow answer is back
        outcomes.append(await harness.run(manifest, sim, submit_workers=1))

    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
        await wait_until(lambda: sim.stats.accepted == 1, what="i0 accepted")
        (harness.tmp_path / "in-1.png").unlink()
        sim.configure(p_slow=0.0)

    [outcome] = outcomes
    assert outcome.statuses == {"i0": "succeeded", "i1": "failed", "i2": "succeeded"}
    assert outcome.entry("i1")["error"]["kind"] == "input"
    assert "in-1.png cannot be read" in outcome.entry("i1")["error"]["message"]
    assert (outcome.entry("i1")["attempts"], outcome.entry("i1")["possible_duplicate"]) == (0, False)
    assert sim.stats.images_requests == 2


# -- the manifest's rules for the route ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "task", "says"),
    [
        ("openai/gpt-image-2", "image-edit", "no endpoint for openai/gpt-image-2"),
        ("openai/gpt-image-1", "image-edit", "openai/gpt-image-2-plus, openai/gpt-image-1.5-plus"),
        ("openai/gpt-image-2", "text-to-image", "text-to-image has no such route"),
    ],
)
def test_the_route_is_refused_for_a_model_or_task_it_does_not_serve(
    tmp_path: Path, model: str, task: str, says: str
) -> None:
    """validate refuses the openai-images route for a model the endpoint does not know, or a task that is
    no edit, once for the manifest rather than once per item."""
    write_inputs(tmp_path, 2)
    specs: list[dict[str, Any]] = items(2)
    if task == "text-to-image":
        specs = [{"id": spec["id"], "prompt": spec["prompt"]} for spec in specs]
    with pytest.raises(ManifestError) as caught:
        load_manifest(images_manifest(tmp_path, specs, model=model, task=task))
    assert [says in problem.message for problem in caught.value.problems] == [True]


def test_gpt_image_1_5_plus_takes_the_route(tmp_path: Path) -> None:
    """gpt-image-1.5-plus, the route's other model, is accepted with it."""
    write_inputs(tmp_path, 1)
    manifest = load_manifest(images_manifest(tmp_path, items(1), model="openai/gpt-image-1.5-plus"))
    assert manifest.count == 1


# -- kill -9 in the middle of a request, then resume (the command line) --------------------------------------


@pytest.mark.slow
async def test_sigkill_mid_request_then_resume_resends_marked_and_loses_nothing(tmp_path: Path) -> None:
    """Killed while requests were open (accepted, billed, answers not yet back), a rerun finds them
    'submitting' and sends them again, marked possible_duplicate; every item ends with its pictures, and
    nothing answered before the kill is paid again."""
    write_inputs(tmp_path, 6)
    manifest = images_manifest(tmp_path, items(6), settings={"max_in_flight": 3})
    out = tmp_path / "out"
    config = SimConfig(api_key=TEST_KEY, image_scale=0.05, inference_median=30.0, inference_spread=0.0)
    async with Simulator(config) as sim:
        args = run_args(manifest, out, sim)
        async with engine(args) as proc:
            await wait_until(lambda: sim.stats.accepted >= 3, what="3 requests open", proc=proc)
            proc.send(signal.SIGKILL)
            assert await proc.wait() == -signal.SIGKILL
        assert journal_states(out).get("submitting") == 3
        sim.configure(inference_median=0.05)

        rerun = await run_engine(args)

        assert rerun.code == 0, rerun.stderr
        report = yaml.safe_load((out / "report.yaml").read_text(encoding="utf-8"))
        entries = {entry["id"]: entry for entry in report["items"]}
        assert {entry["status"] for entry in entries.values()} == {"succeeded"}
        for entry in entries.values():
            [output] = entry["outputs"]
            data = (out / output["path"]).read_bytes()
            assert hashlib.sha256(data).hexdigest() == output["sha256"]
            verify_image(data)
        marked = {item for item, entry in entries.items() if entry["possible_duplicate"]}
        billed = Counter(pred.prompt.removeprefix("edit ") for pred in sim.stats.predictions.values())
        assert len(marked) == 3
        assert {f"i{k}" for k, times in billed.items() if times == 2} == marked
        assert sorted(billed.values()) == [1, 1, 1, 2, 2, 2]
        assert "possible duplicate" in rerun.stdout
