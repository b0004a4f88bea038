"""The simulator over real sockets: what it answers, what it counts, and that it is deterministic."""

from __future__ import annotations

import base64
import json
import socket
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp
import anyio
import pytest

from batch_engine.images import decode_b64_output, sniff_extension, verify_image
from batch_engine.sim import SimConfig, Simulator, serve
from batch_engine.sim.drawing import render_output
from batch_engine.sim.server import _Gcra

pytestmark = pytest.mark.anyio

KEY = "sk-test"
AUTH = {"Authorization": KEY}
EDIT = "openai/gpt-image-2-plus"
POLL_LIMIT = 500


@dataclass(frozen=True)
class Answer:
    """One HTTP answer, read whole."""

    status: int
    headers: Mapping[str, str]
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def data(self) -> dict[str, Any]:
        data: dict[str, Any] = self.json["data"]
        return data


class Api:
    """A thin client of the simulator for these tests."""

    def __init__(self, sim: Simulator, session: aiohttp.ClientSession) -> None:
        self.sim = sim
        self.session = session

    def body(self, prompt: str = "make the cat wear a hat", **fields: Any) -> dict[str, Any]:
        return {"images": [self.sim.input_url("cat")], "prompt": prompt, "size": "1024x1024", **fields}

    async def submit(
        self,
        body: Any,
        *,
        model: str = EDIT,
        task: str = "image-edit",
        headers: Mapping[str, str] = AUTH,
    ) -> Answer:
        url = f"{self.sim.base_url}/api/v3/{model}/{task}"
        async with self.session.post(url, json=body, headers=headers) as resp:
            return Answer(resp.status, resp.headers, await resp.read())

    async def get(self, url: str, *, headers: Mapping[str, str] | None = None) -> Answer:
        async with self.session.get(url, headers=headers) as resp:
            return Answer(resp.status, resp.headers, await resp.read())

    async def poll(self, pred_id: str, *, headers: Mapping[str, str] = AUTH) -> Answer:
        return await self.get(f"{self.sim.base_url}/api/v3/predictions/{pred_id}/result", headers=headers)

    async def until_final(self, pred_id: str) -> dict[str, Any]:
        """Poll until the status is final, at most POLL_LIMIT times, a few ms apart."""
        for _ in range(POLL_LIMIT):
            data = (await self.poll(pred_id)).data
            if data["status"] not in ("created", "processing"):
                return data
            await anyio.sleep(0.005)
        raise AssertionError(f"{pred_id} still not final after {POLL_LIMIT} polls")


@asynccontextmanager
async def running(**knobs: Any) -> AsyncIterator[Api]:
    """A started simulator with these knobs (api_key=KEY unless given) and a session against it."""
    config = SimConfig(**{"api_key": KEY, **knobs})
    async with Simulator(config) as sim, aiohttp.ClientSession() as session:
        yield Api(sim, session)


async def submitted(api: Api, **fields: Any) -> dict[str, Any]:
    answer = await api.submit(api.body(**fields))
    assert answer.status == 200, answer.body
    return answer.data


# ---- the happy path ------------------------------------------------------------------------------


async def test_prediction_goes_created_processing_completed_with_a_png_of_the_requested_size() -> None:
    """A submit answers created; polls say processing until the Nth, which says completed with a real PNG."""
    async with running(inference_polls=3) as api:
        data = await submitted(api, size="1536x1024")
        assert (data["status"], data["outputs"], data["error"]) == ("created", [], None)
        statuses = [(await api.poll(data["id"])).data["status"] for _ in range(3)]
        assert statuses == ["processing", "processing", "completed"]
        final = (await api.poll(data["id"])).data
        png = (await api.get(final["outputs"][0])).body
    assert verify_image(png) == (1536, 1024)
    assert sniff_extension(png) == "png"
    assert final["has_nsfw_contents"] == [False]
    assert final["executionTime"] == final["timings"]["inference"]
    assert final["urls"] == {"get": f"{api.sim.base_url}/api/v3/predictions/{data['id']}/result"}


async def test_time_driven_prediction_completes_and_records_when() -> None:
    """Without inference_polls a prediction completes after its inference time, which the stats record."""
    async with running(inference_median=0.01, inference_spread=0.0, image_scale=0.125) as api:
        data = await submitted(api, n=2)
        final = await api.until_final(data["id"])
        record = api.sim.stats.predictions[data["id"]]
        pngs = [(await api.get(url)).body for url in final["outputs"]]
    assert final["status"] == "completed"
    assert [verify_image(png) for png in pngs] == [(128, 128), (128, 128)]
    assert record.completed_at is not None
    assert record.first_done_seen_at is not None
    assert record.completed_at == pytest.approx(record.created_at + 0.01)
    assert record.first_done_seen_at >= record.completed_at
    assert final["executionTime"] == 10


async def test_processing_after_keeps_created_for_the_first_polls() -> None:
    """With processing_after=0.5 and 4 polls to complete, the first poll still says created."""
    async with running(inference_polls=4, processing_after=0.5) as api:
        pred_id = (await submitted(api))["id"]
        statuses = [(await api.poll(pred_id)).data["status"] for _ in range(4)]
    assert statuses == ["created", "processing", "processing", "completed"]


async def test_failed_prediction_carries_an_error_string() -> None:
    """p_failed=1 ends every prediction failed (HTTP 200) with an error string and no outputs."""
    async with running(inference_polls=1, p_failed=1.0) as api:
        answer = await api.poll((await submitted(api))["id"])
    assert answer.status == 200
    assert answer.data["status"] == "failed"
    assert answer.data["outputs"] == []
    assert "could not process" in answer.data["error"]


@pytest.mark.parametrize(("sync_early", "status"), [(True, "processing"), (False, "completed")])
async def test_sync_mode_answers_early_or_when_done(sync_early: bool, status: str) -> None:
    """enable_sync_mode answers while still processing with sync_early, else once completed."""
    async with running(inference_median=0.01, inference_spread=0.0, sync_early=sync_early) as api:
        data = await submitted(api, enable_sync_mode=True)
    assert data["status"] == status
    assert bool(data["outputs"]) is (status == "completed")
    seen = api.sim.stats.predictions[data["id"]].first_done_seen_at
    assert (seen is not None) is (status == "completed")


# ---- envelope variants ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("knobs", "check"),
    [
        ({"urls_as_list": True}, lambda d: d["urls"][0]["get"].endswith(f"/predictions/{d['id']}/result")),
        ({"camel_case": True}, lambda d: {"hasNsfwContents", "createdAt"} <= d.keys() - {"created_at"}),
        ({"error_empty_string": True}, lambda d: d["error"] == ""),
        ({"nsfw_null": True}, lambda d: d["has_nsfw_contents"] is None),
        ({"rfc3339_times": True}, lambda d: d["created_at"].endswith("Z") and "T" in d["created_at"]),
        ({}, lambda d: len(d["created_at"]) == 19 and d["created_at"][10] == " "),
        ({"processing_status": "running"}, lambda d: d["status"] == "completed"),
        ({"failed_status": "expired", "p_failed": 1.0}, lambda d: d["status"] == "expired" and d["error"]),
    ],
)
async def test_envelope_variant(knobs: dict[str, Any], check: Any) -> None:
    """Each envelope knob changes the completed envelope the way the API is known to vary."""
    async with running(inference_polls=1, **knobs) as api:
        data = (await api.poll((await submitted(api))["id"])).data
    assert check(data), data


async def test_in_progress_status_name_is_configurable() -> None:
    """processing_status renames the in-progress status (e.g. running), which the engine must keep polling."""
    async with running(inference_polls=2, processing_status="in_progress") as api:
        data = (await api.poll((await submitted(api))["id"])).data
    assert data["status"] == "in_progress"


@pytest.mark.parametrize("prefix", [True, False])
async def test_b64_outputs_with_and_without_data_prefix(prefix: bool) -> None:
    """b64_json outputs decode to the PNG; the data: prefix is there only when b64_data_prefix is on."""
    async with running(inference_polls=1, b64_data_prefix=prefix, image_scale=0.0625) as api:
        data = (await api.poll((await submitted(api, response_format="b64_json"))["id"])).data
    output = data["outputs"][0]
    assert output.startswith("data:image/png;base64,") is prefix
    assert verify_image(decode_b64_output(output)) == (64, 64)


# ---- auth ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({}, 401),
        ({"Authorization": "sk-wrong"}, 401),
        ({"Authorization": KEY}, 200),
        ({"Authorization": f"Bearer {KEY}"}, 200),
    ],
)
async def test_auth_takes_raw_key_or_bearer(headers: dict[str, str], status: int) -> None:
    """A missing or wrong key gets 401; the raw key and ``Bearer <key>`` are both accepted."""
    async with running() as api:
        answer = await api.submit(api.body(), headers=headers)
        poll = await api.poll("nope", headers=headers)
    assert answer.status == status
    assert poll.status == (401 if status == 401 else 404)
    assert api.sim.stats.accepted == (status == 200)


async def test_without_a_configured_key_any_non_empty_authorization_passes() -> None:
    """With api_key None any non-empty Authorization is accepted and a missing one is still 401."""
    async with running(api_key=None) as api:
        ok = await api.submit(api.body(), headers={"Authorization": "anything"})
        missing = await api.submit(api.body(), headers={})
    assert (ok.status, missing.status) == (200, 401)


# ---- validation and errors -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"prompt": None}, "'prompt'"),
        ({"prompt": ""}, "'prompt'"),
        ({"prompt": "x" * 32001}, "'prompt'"),
        ({"images": []}, "'images'"),
        ({"images": ["data:image/png;base64,AAAA"]}, "'images[0]'"),
        ({"images": ["https://x/a.png"] * 17}, "'images'"),
        ({"n": 11}, "'n'"),
        ({"size": "1000x1000"}, "multiples of 16"),
        ({"size": "4096x2048"}, "3840"),
        ({"size": "3072x1008"}, "3:1"),
        ({"size": "512x512"}, "655,360"),
        ({"size": "big"}, "'size'"),
        ({"quality": "ultra"}, "'quality'"),
        ({"background": "clear"}, "'background'"),
        ({"response_format": "png"}, "'response_format'"),
    ],
)
async def test_invalid_request_gets_400_naming_the_field(fields: dict[str, Any], named: str) -> None:
    """Each invalid field gets a 400 whose openai-style message names it, and nothing is billed."""
    async with running() as api:
        body = {k: v for k, v in {**api.body(), **fields}.items() if v is not None}
        answer = await api.submit(body)
    assert answer.status == 400
    error = answer.json["error"]
    assert named in error["message"]
    assert error["type"] == "invalid_request_error"
    assert api.sim.stats.accepted == 0


@pytest.mark.parametrize("size", ["auto", "3840x2160", "2160x3840", "1024x640", "2048x1152"])
async def test_valid_custom_sizes_are_accepted(size: str) -> None:
    """Sizes within every gpt-image-2 rule (including the edges of each rule) are accepted."""
    async with running() as api:
        answer = await api.submit(api.body(size=size))
    assert answer.status == 200, answer.body


async def test_transparent_background_is_refused_when_the_knob_says_so() -> None:
    """refuse_transparent makes gpt-image-2 models answer 400 to background=transparent."""
    async with running(refuse_transparent=True) as api:
        refused = await api.submit(api.body(background="transparent"))
        opaque = await api.submit(api.body(background="opaque"))
    assert (refused.status, opaque.status) == (400, 200)
    assert "'background'" in refused.json["error"]["message"]


async def test_data_uris_are_accepted_when_the_knob_says_so() -> None:
    """accept_data_uris lets data: URIs through as input images."""
    async with running(accept_data_uris=True) as api:
        answer = await api.submit(api.body(images=["data:image/png;base64,AAAA"]))
    assert answer.status == 200


@pytest.mark.parametrize(
    ("style", "read"),
    [
        ("openai", lambda a: a.json["error"]["message"]),
        ("flat", lambda a: a.json["message"] if a.json["code"] == 400 else ""),
        ("text", lambda a: a.body.decode()),
    ],
)
async def test_error_body_styles(style: str, read: Any) -> None:
    """Error bodies come openai-style, flat ``{code, message}`` or as plain text, per error_body_style."""
    async with running(error_body_style=style) as api:
        answer = await api.submit(api.body(n=0))
    assert answer.status == 400
    assert "'n'" in read(answer)


async def test_content_policy_gets_400_mentioning_the_policy() -> None:
    """A prompt with the marker gets 400 whose message mentions the content policy, and is not billed."""
    async with running() as api:
        answer = await api.submit(api.body(prompt="please FORBIDDEN things"))
    assert answer.status == 400
    assert "content policy" in answer.json["error"]["message"]
    assert answer.json["error"]["code"] == "content_policy_violation"
    assert api.sim.stats.accepted == 0


async def test_unknown_model_task_and_prediction_get_404() -> None:
    """An unknown model, an unknown task and an unknown prediction id each get a JSON 404."""
    async with running() as api:
        model = await api.submit(api.body(), model="openai/dall-e-9")
        task = await api.submit(api.body(), model="openai/gpt-image-2-plus", task="text-to-image")
        pred = await api.poll("0" * 32)
    assert [a.status for a in (model, task, pred)] == [404, 404, 404]
    assert "model not found" in model.json["error"]["message"]
    assert api.sim.stats.status_counts[404] == 3


async def test_text_to_image_needs_no_images() -> None:
    """gpt-image-2's text-to-image task takes a prompt alone."""
    async with running() as api:
        body = {"prompt": "a lighthouse"}
        answer = await api.submit(body, model="openai/gpt-image-2", task="text-to-image")
    assert answer.status == 200


async def test_gpt_image_1_takes_image_and_defaults_to_b64() -> None:
    """gpt-image-1 takes ``image`` (not ``images``), fixed sizes only, and answers b64_json by default."""
    model = "openai/gpt-image-1"
    async with running(inference_polls=1, image_scale=0.0625) as api:
        url = api.sim.input_url("cat")
        wrong_field = await api.submit({"images": [url], "prompt": "p"}, model=model)
        wrong_size = await api.submit({"image": [url], "prompt": "p", "size": "2048x2048"}, model=model)
        ok = await api.submit({"image": [url], "prompt": "p", "size": "1536x1024"}, model=model)
        data = (await api.poll(ok.data["id"])).data
    assert (wrong_field.status, wrong_size.status, ok.status) == (400, 400, 200)
    assert "'image'" in wrong_field.json["error"]["message"]
    assert verify_image(decode_b64_output(data["outputs"][0])) == (96, 64)


# ---- pacing: 429, concurrency, balance -----------------------------------------------------------


async def test_submit_rate_refuses_beyond_the_burst_with_json_429() -> None:
    """With submit_rate and burst 2, a third submit at once gets a JSON 429 (no Retry-After), unbilled."""
    async with running(submit_rate=0.5, submit_burst=2) as api:
        answers = [await api.submit(api.body(prompt=f"p{i}")) for i in range(3)]
    assert [a.status for a in answers] == [200, 200, 429]
    assert "Retry-After" not in answers[2].headers
    assert answers[2].json["error"]["type"] == "rate_limit_error"
    stats = api.sim.stats
    assert (stats.accepted, stats.rate_limited, stats.rate_limited_submits) == (2, 1, 1)


@pytest.mark.parametrize(("retry_after", "header"), [(2.0, "2"), (1.5, "1.5")])
async def test_429_carries_retry_after_when_configured(retry_after: float, header: str) -> None:
    """retry_after puts a Retry-After header on 429s, in whole seconds when it is whole."""
    async with running(submit_rate=0.5, submit_burst=1, retry_after=retry_after) as api:
        await api.submit(api.body())
        answer = await api.submit(api.body())
    assert answer.status == 429
    assert answer.headers["Retry-After"] == header


async def test_html_429_is_a_proxy_page() -> None:
    """html_429 makes 429 bodies an HTML page rather than JSON."""
    async with running(submit_rate=0.5, submit_burst=1, html_429=True) as api:
        await api.submit(api.body())
        answer = await api.submit(api.body())
    assert answer.status == 429
    assert answer.headers["Content-Type"].startswith("text/html")
    assert b"429 Too Many Requests" in answer.body


async def test_poll_rate_has_its_own_bucket() -> None:
    """poll_rate limits polls separately: polls beyond the burst get 429 while submits still pass."""
    async with running(poll_rate=0.5, poll_burst=2, inference_polls=10) as api:
        pred_id = (await submitted(api))["id"]
        polls = [(await api.poll(pred_id)).status for _ in range(3)]
        after = await api.submit(api.body(prompt="another"))
    assert polls == [200, 200, 429]
    assert after.status == 200
    assert (api.sim.stats.rate_limited, api.sim.stats.rate_limited_submits) == (1, 0)


async def test_max_concurrent_refuses_with_429_until_a_prediction_finishes() -> None:
    """Beyond max_concurrent running predictions a submit gets 429 'too many concurrent tasks', unbilled."""
    async with running(max_concurrent=1, inference_polls=1) as api:
        first = await submitted(api)
        refused = await api.submit(api.body(prompt="second"))
        await api.poll(first["id"])
        later = await api.submit(api.body(prompt="second"))
    assert refused.status == 429
    assert "too many concurrent tasks" in refused.json["error"]["message"]
    assert later.status == 200
    assert (api.sim.stats.accepted, api.sim.stats.max_concurrent_seen) == (2, 1)


async def test_balance_runs_out_with_403() -> None:
    """After ``balance`` accepted submits every further submit gets 403 insufficient balance."""
    async with running(balance=2) as api:
        answers = [await api.submit(api.body(prompt=f"p{i}")) for i in range(4)]
    assert [a.status for a in answers] == [200, 200, 403, 403]
    assert "insufficient balance" in answers[2].json["error"]["message"]
    assert api.sim.stats.accepted == 2


# ---- faults --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("knob", "accepted"), [("p_drop_before_accept", 0), ("p_drop_after_accept", 1)])
async def test_dropped_submit_disconnects_and_bills_only_after_accept(knob: str, accepted: int) -> None:
    """A dropped submit closes the connection unanswered; only a drop after accept bills a prediction."""
    async with running(**{knob: 1.0}) as api:
        with pytest.raises(aiohttp.ServerDisconnectedError):
            await api.submit(api.body())
        stats = api.sim.stats
        assert (stats.submit_requests, stats.accepted, stats.dropped) == (1, accepted, 1)
        assert len(stats.predictions) == accepted


@pytest.mark.parametrize(("knob", "status"), [("p_500", 500), ("p_503", 503)])
async def test_server_errors_on_submit_and_poll(knob: str, status: int) -> None:
    """p_500 / p_503 answer submits (unbilled) and polls with that status."""
    async with running(inference_polls=1) as api:
        pred_id = (await submitted(api))["id"]
        api.sim.configure(**{knob: 1.0})
        submit = await api.submit(api.body(prompt="other"))
        poll = await api.poll(pred_id)
    assert (submit.status, poll.status) == (status, status)
    assert api.sim.stats.accepted == 1
    assert api.sim.stats.status_counts == {status: 2}


async def test_slow_answers_are_delayed() -> None:
    """p_slow delays submit and poll answers by slow_seconds."""
    async with running(p_slow=1.0, slow_seconds=0.1) as api:
        started = time.monotonic()
        pred_id = (await submitted(api))["id"]
        await api.poll(pred_id)
    assert time.monotonic() - started >= 0.2


async def test_slow_answer_in_flight_does_not_hold_up_close() -> None:
    """Closing while a slow answer is pending ends promptly and cleanly."""
    sim = Simulator(SimConfig(p_slow=1.0, slow_seconds=30.0))
    await sim.start()
    async with aiohttp.ClientSession() as session:
        api = Api(sim, session)
        with anyio.move_on_after(0.1):
            await api.submit(api.body(), headers={"Authorization": "k"})
        assert sim.stats.accepted == 1
        with anyio.fail_after(10):  # far less than the 30 s the slow answer would take
            await sim.close()


async def test_download_faults_500_and_truncated() -> None:
    """Output downloads may get 500, or a body shorter than its Content-Length that the client notices."""
    async with running(inference_polls=1, image_scale=0.0625) as api:
        url = (await api.poll((await submitted(api))["id"])).data["outputs"][0]
        api.sim.configure(p_download_500=1.0)
        failed = await api.get(url)
        api.sim.configure(p_download_500=0.0, p_download_truncated=1.0)
        with pytest.raises(aiohttp.ClientPayloadError):
            await api.get(url)
        api.sim.configure(p_download_truncated=0.0)
        ok = await api.get(url)
    assert failed.status == 500
    assert verify_image(ok.body) == (64, 64)
    assert (api.sim.stats.downloads, api.sim.stats.truncated_downloads) == (3, 1)


# ---- counting ------------------------------------------------------------------------------------


async def test_duplicate_bodies_are_counted_whatever_the_key_order() -> None:
    """The same JSON body accepted twice (keys in any order) counts one duplicate; each has its own id."""
    async with running() as api:
        body = api.body()
        first = await submitted(api, **body)
        second = (await api.submit(dict(reversed(list(body.items()))))).data
        await submitted(api, prompt="something else")
    stats = api.sim.stats
    assert first["id"] != second["id"]
    assert (stats.accepted, stats.duplicate_bodies) == (3, 1)
    assert sorted(stats.body_counts.values()) == [1, 2]
    assert len(stats.accepted_times) == 3


async def test_foreign_get_url_counts_key_leaks() -> None:
    """With foreign_get_url, urls.get is on the foreign origin; polling it or an output with the key leaks."""
    async with running(foreign_get_url=True, inference_polls=1, image_scale=0.0625) as api:
        data = await submitted(api)
        assert data["urls"]["get"].startswith(api.sim.foreign_url)
        assert api.sim.foreign_url != api.sim.base_url
        followed = await api.get(data["urls"]["get"], headers=AUTH)
        assert api.sim.stats.key_leaks == 1
        output = followed.data["outputs"][0]
        await api.get(output)
        assert api.sim.stats.key_leaks == 1
        await api.get(output, headers=AUTH)
    assert followed.status == 200
    assert api.sim.stats.key_leaks == 2


async def test_stats_are_served_as_json() -> None:
    """GET /_sim/stats returns the counters as JSON, predictions included."""
    async with running(inference_polls=1) as api:
        pred_id = (await submitted(api))["id"]
        await api.poll(pred_id)
        stats = (await api.get(f"{api.sim.base_url}/_sim/stats")).json
    assert (stats["submit_requests"], stats["accepted"], stats["polls"]) == (1, 1, 1)
    assert stats["poll_counts"] == {pred_id: 1}
    assert stats["predictions"][pred_id]["completed_at"] is not None


async def test_input_images_are_served() -> None:
    """input_url serves a decodable sample PNG."""
    async with running() as api:
        answer = await api.get(api.sim.input_url("cat"))
    assert answer.status == 200
    assert verify_image(answer.body) == (512, 512)


# ---- determinism ---------------------------------------------------------------------------------


async def fault_pattern(seed: int, order: list[int]) -> dict[int, int]:
    """Status per prompt number for submits sent in ``order`` to a fresh simulator with faults."""
    async with running(seed=seed, p_500=0.3, p_503=0.2, p_drop_before_accept=0.1) as api:
        result: dict[int, int] = {}
        for i in order:
            try:
                result[i] = (await api.submit(api.body(prompt=f"item {i}"))).status
            except aiohttp.ServerDisconnectedError:
                result[i] = 0
        return result


async def test_same_seed_same_fault_decisions_whatever_the_order() -> None:
    """The same seed gives every request the same fault in any order; another seed gives another pattern."""
    order = list(range(30))
    forward = await fault_pattern(7, order)
    backward = await fault_pattern(7, order[::-1])
    other = await fault_pattern(8, order)
    assert forward == backward
    assert forward != other
    assert {0, 200, 500, 503} <= set(forward.values())


async def test_same_seed_same_prediction_ids_and_inference_times() -> None:
    """Prediction ids and inference times depend on the seed and the body only."""

    async def one(seed: int) -> tuple[str, float]:
        async with running(seed=seed) as api:
            pred_id = (await submitted(api))["id"]
            return pred_id, api.sim.stats.predictions[pred_id].inference_seconds

    assert await one(1) == await one(1)
    assert await one(1) != await one(2)


# ---- configuration and serving ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "knobs",
    [{"p_500": 1.5}, {"submit_rate": 0.0}, {"error_body_style": "xml"}, {"inference_polls": 0}],
)
def test_bad_knobs_are_refused_by_name(knobs: dict[str, Any]) -> None:
    """SimConfig refuses an impossible knob value with a ValueError naming it."""
    with pytest.raises(ValueError, match=next(iter(knobs))):
        SimConfig(**knobs)


async def test_serve_runs_until_cancelled() -> None:
    """serve() answers on the given port until its task is cancelled."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    async with anyio.create_task_group() as tg, aiohttp.ClientSession() as session:
        tg.start_soon(serve, SimConfig(), "127.0.0.1", port)
        stats = await _first_answer(session, f"http://127.0.0.1:{port}/_sim/stats")
        tg.cancel_scope.cancel()
    assert stats["accepted"] == 0


async def _first_answer(session: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    for _ in range(POLL_LIMIT):
        try:
            async with session.get(url) as resp:
                answer: dict[str, Any] = await resp.json()
                return answer
        except aiohttp.ClientConnectionError:
            await anyio.sleep(0.005)
    raise AssertionError(f"nothing answered at {url}")


# ---- image helpers the simulator relies on -------------------------------------------------------


def test_render_output_is_a_png_of_exactly_the_size() -> None:
    """render_output draws a PNG of exactly the size asked, different per index."""
    first = render_output(160, 48, prompt="a long prompt " * 40, index=0)
    second = render_output(160, 48, prompt="a long prompt " * 40, index=1)
    assert verify_image(first) == (160, 48)
    assert first != second


def test_verify_image_refuses_truncated_and_non_images() -> None:
    """verify_image raises ValueError for a truncated PNG and for bytes that are no image."""
    png = render_output(64, 64, prompt="p", index=0)
    for bad in (png[: len(png) // 2], b"<html>", b""):
        with pytest.raises(ValueError, match="image"):
            verify_image(bad)


def test_sniff_extension_knows_the_usual_formats() -> None:
    """sniff_extension recognises PNG, JPEG, WebP and GIF by their magic bytes, else None."""
    samples = {
        b"\x89PNG\r\n\x1a\n....": "png",
        b"\xff\xd8\xff\xe0": "jpg",
        b"RIFF\x00\x00\x00\x00WEBPVP8 ": "webp",
        b"GIF89a": "gif",
        b"<html>": None,
    }
    assert {data: sniff_extension(data) for data in samples} == samples


def test_decode_b64_output_takes_raw_or_prefixed_and_refuses_junk() -> None:
    """decode_b64_output accepts raw base64 and data: URIs, and raises ValueError on junk."""
    raw = base64.b64encode(b"\x89PNG data").decode()
    assert decode_b64_output(raw) == decode_b64_output(f"data:image/png;base64,{raw}") == b"\x89PNG data"
    for junk in ("", "not base64 at all!", "data:image/png;base64,"):
        with pytest.raises(ValueError, match="base64"):
            decode_b64_output(junk)


def test_submit_burst_1_is_nginx_limit_req_without_burst() -> None:
    """burst 1 refuses a request sooner than 1 / rate after the last accepted one, and a refused request
    moves nothing (nginx ``limit_req`` with no burst): the limiter figure 2c and its tests rely on it."""
    gcra = _Gcra()
    assert gcra.allow(0.0, rate=10.0, burst=1)
    assert not gcra.allow(0.099, rate=10.0, burst=1)  # 1 ms early
    assert gcra.allow(0.1, rate=10.0, burst=1)  # on time, the refused one notwithstanding
    assert not gcra.allow(0.19, rate=10.0, burst=1)
    assert gcra.allow(0.5, rate=10.0, burst=1)  # idle time banks no burst
    assert not gcra.allow(0.55, rate=10.0, burst=1)
