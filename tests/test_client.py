"""The client boundary over real sockets: how every answer is classified, and where the key may go."""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import pytest

from batch_engine.api.client import ApiClient, ClientConfig
from batch_engine.errors import (
    ApiError,
    ItemRejected,
    NotAccepted,
    RetryLater,
    SlowDown,
    StopRun,
    StopSubmitting,
    SubmitOutcomeUnknown,
    UsageError,
)
from batch_engine.sim import Simulator
from batch_engine.values import Prediction
from tests.helpers import (
    KEY,
    Harness,
    Reply,
    Scripted,
    ScriptedServer,
)

pytest_plugins = ("tests.helpers",)
pytestmark = pytest.mark.anyio

EDIT_PATH = "/api/v3/openai/gpt-image-2-plus/image-edit"
POLL_PATH = "/api/v3/predictions/p-1/result"
ENVELOPE = {"data": {"id": "p-1", "status": "created", "outputs": [], "error": None}, "code": 200}
NGINX_502 = "<html><head><title>502 Bad Gateway</title></head><body><h1>502 Bad Gateway</h1></body></html>"


@asynccontextmanager
async def api(base_url: str, key: str = KEY, **config: Any) -> AsyncIterator[ApiClient]:
    async with ApiClient(ClientConfig(base_url=base_url, api_key=key, **config)) as client:
        yield client


def edit_body(sim: Simulator, prompt: str = "put a hat on the cat", **fields: Any) -> dict[str, Any]:
    return {"images": [sim.input_url("cat")], "prompt": prompt, **fields}


async def poll_until_final(client: ApiClient, prediction_id: str) -> Prediction:
    for _ in range(50):
        prediction = await client.poll(prediction_id)
        if prediction.status not in ("created", "processing"):
            return prediction
    raise AssertionError(f"{prediction_id} never finished")


async def answer_of(server: ScriptedServer, reply: Reply, *, submit: bool) -> ApiError:
    """The error the client raises when the API answers ``reply`` to a submit (or to a poll)."""
    server.reply(EDIT_PATH if submit else POLL_PATH, reply)
    async with api(server.url) as client:
        answer = client.submit(EDIT_PATH, {"prompt": "x"}) if submit else client.poll("p-1")
        with pytest.raises(ApiError) as caught:
            await answer
    return caught.value


def free_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


# ---- classification by status, then body -----------------------------------------------------------------

#: (reply, error class on a submit, on a poll, kind (none for a stop), words the message must carry)
CLASSIFICATION: list[tuple[str, Reply, type[ApiError], type[ApiError], str, str]] = [
    (
        "400-openai",
        Reply.json({"error": {"message": "Invalid 'size': 5x5", "type": "invalid_request_error"}}, 400),
        ItemRejected,
        ItemRejected,
        "invalid_request",
        "Invalid 'size': 5x5",
    ),
    (
        "400-policy",
        Reply.json({"error": {"message": "rejected by our safety system", "code": "content_policy"}}, 400),
        ItemRejected,
        ItemRejected,
        "content_policy",
        "rejected by our safety system",
    ),
    (
        "400-flat",
        Reply.json({"code": 400, "message": "prompt is too long"}, 400),
        ItemRejected,
        ItemRejected,
        "invalid_request",
        "prompt is too long",
    ),
    (
        "400-text",
        Reply.text("bad request: images[0] is not a URL", 400, "text/plain"),
        ItemRejected,
        ItemRejected,
        "invalid_request",
        "bad request: images[0] is not a URL",
    ),
    (
        "401",
        Reply.json({"error": {"message": "invalid API key", "type": "authentication_error"}}, 401),
        StopRun,
        StopRun,
        "",
        "invalid API key",
    ),
    (
        "403-flat",
        Reply.json({"code": 403, "message": "insufficient balance"}, 403),
        StopSubmitting,
        StopSubmitting,
        "",
        "insufficient balance",
    ),
    (
        "404",
        Reply.json({"error": {"message": "prediction not found"}}, 404),
        ItemRejected,
        RetryLater,  # a new prediction id may take a moment to become visible: polled again, bounded
        "",
        "prediction not found",
    ),
    (
        "408",
        Reply.text("request timeout", 408, "text/plain"),
        SubmitOutcomeUnknown,
        RetryLater,
        "",
        "request timeout",
    ),
    (
        "429-html",
        Reply.text("<html><body><h1>429 Too Many Requests</h1><hr>nginx</body></html>", 429),
        SlowDown,
        SlowDown,
        "rate_limited",
        "429 Too Many Requests nginx",
    ),
    (
        "500-openai",
        Reply.json({"error": {"message": "internal server error", "type": "server_error"}}, 500),
        SubmitOutcomeUnknown,
        RetryLater,
        "",
        "internal server error",
    ),
    (
        "502-html",
        Reply.text(NGINX_502, 502),
        SubmitOutcomeUnknown,
        RetryLater,
        "",
        "502 Bad Gateway 502 Bad Gateway",
    ),
    (
        "503-flat",
        Reply.json({"code": 503, "message": "service unavailable"}, 503),
        SubmitOutcomeUnknown,
        RetryLater,
        "",
        "service unavailable",
    ),
    ("504-empty", Reply(504), SubmitOutcomeUnknown, RetryLater, "", "(empty body)"),
    (
        "200-not-json",
        Reply.text("<html>maintenance</html>", 200),
        SubmitOutcomeUnknown,
        RetryLater,
        "",
        "not JSON: maintenance",
    ),
    (
        "200-no-id",
        Reply.json({"data": {"status": "created"}, "code": 200}),
        SubmitOutcomeUnknown,
        RetryLater,
        "",
        "no prediction id",
    ),
    (
        "200-code-429",
        Reply.json({"code": 429, "message": "too many concurrent tasks"}),
        SlowDown,
        SlowDown,
        "rate_limited",
        "too many concurrent tasks",
    ),
    (
        "200-code-401",
        Reply.json({"code": 401, "message": "key expired"}),
        StopRun,
        StopRun,
        "",
        "key expired",
    ),
]


@pytest.mark.parametrize("submit", [True, False], ids=["submit", "poll"])
@pytest.mark.parametrize(
    ("reply", "on_submit", "on_poll", "kind", "words"),
    [case[1:] for case in CLASSIFICATION],
    ids=[case[0] for case in CLASSIFICATION],
)
async def test_every_status_and_body_shape_is_classified(
    scripted: Scripted,
    submit: bool,
    reply: Reply,
    on_submit: type[ApiError],
    on_poll: type[ApiError],
    kind: str,
    words: str,
) -> None:
    """The HTTP status picks the error class (a 5xx on a submit is an ambiguous submit, on a poll a retry);
    the message is error.message, else message, else the body's text without its tags."""
    error = await answer_of(await scripted(), reply, submit=submit)

    assert type(error) is (on_submit if submit else on_poll)
    if kind:
        assert error.kind == kind
    assert words in error.message
    if reply.status != 200:
        assert error.status == reply.status


@pytest.mark.parametrize(
    ("header", "seconds"),
    [("3", 3.0), ("0.5", 0.5), ("soon", None), ("-1", None), (None, None)],
)
async def test_retry_after_is_read_from_the_header(
    scripted: Scripted, header: str | None, seconds: float | None
) -> None:
    """A 429's Retry-After header, in delta-seconds, is handed on; an unusable or absent one is None."""
    headers = {"Retry-After": header} if header is not None else {}
    error = await answer_of(
        await scripted(), Reply.json({"message": "slow down"}, 429, **headers), submit=True
    )

    assert isinstance(error, SlowDown)
    assert error.retry_after == seconds


async def test_retry_after_as_an_http_date(scripted: Scripted) -> None:
    """A Retry-After given as an HTTP-date becomes the seconds until then."""
    when = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    error = await answer_of(await scripted(), Reply.json({}, 429, **{"Retry-After": when}), submit=False)

    assert isinstance(error, SlowDown)
    assert error.retry_after is not None
    assert 20 < error.retry_after <= 30


async def test_a_200_envelope_is_parsed(scripted: Scripted) -> None:
    """A 200 success envelope becomes a Prediction, status lower-cased and an empty error as None."""
    server = await scripted()
    data = {
        "id": "p-1",
        "status": "COMPLETED",
        "outputs": ["https://x/1.png"],
        "error": "",
        "hasNsfwContents": [None],
        "timings": {"inference": 1234},
        "createdAt": "2026-01-01T00:00:00Z",
    }
    server.reply(POLL_PATH, Reply.json({"data": data, "message": "success", "code": 200}))
    async with api(server.url) as client:
        prediction = await client.poll("p-1")

    assert prediction == Prediction(
        id="p-1",
        status="completed",
        outputs=("https://x/1.png",),
        error=None,
        nsfw=(None,),
        inference_ms=1234,
        created_at="2026-01-01T00:00:00Z",
    )


# ---- classification against the simulator ----------------------------------------------------------------


async def test_simulator_answers_are_classified(harness: Harness) -> None:
    """What the simulator sends for a refused key, a bad body, a policy hit, an empty balance and a
    rate limit maps to the error the engine acts on."""
    sim = await harness.sim(api_key=KEY, submit_rate=1.0, submit_burst=2, retry_after=2.0, balance=1)
    async with api(sim.base_url, key="wrong") as client:
        with pytest.raises(StopRun, match="invalid API key"):
            await client.submit(EDIT_PATH, edit_body(sim))
    async with api(sim.base_url) as client:
        with pytest.raises(ItemRejected, match="Invalid 'n'") as invalid:
            await client.submit(EDIT_PATH, edit_body(sim, n=11))
        assert invalid.value.kind == "invalid_request"
        accepted = await client.submit(EDIT_PATH, edit_body(sim))
        assert accepted.status == "created"
        with pytest.raises(SlowDown) as limited:
            await client.submit(EDIT_PATH, edit_body(sim, "again"))
        assert limited.value.retry_after == 2.0
    sim.configure(submit_rate=None)
    async with api(sim.base_url) as client:
        with pytest.raises(StopSubmitting, match="insufficient balance"):
            await client.submit(EDIT_PATH, edit_body(sim, "one more"))
        sim.configure(balance=None)
        with pytest.raises(ItemRejected) as policy:
            await client.submit(EDIT_PATH, edit_body(sim, "a FORBIDDEN picture"))
        assert policy.value.kind == "content_policy"
        with pytest.raises(RetryLater, match="prediction not found"):
            await client.poll("no-such-prediction")
    assert sim.stats.accepted == 1


@pytest.mark.parametrize("style", ["openai", "flat", "text"])
async def test_simulator_error_body_styles_give_the_same_message(harness: Harness, style: str) -> None:
    """Whatever the error body's shape, the message the client reports is the server's sentence."""
    sim = await harness.sim(error_body_style=style)
    async with api(sim.base_url) as client:
        with pytest.raises(ItemRejected) as caught:
            await client.submit(EDIT_PATH, edit_body(sim, size="100x100"))

    assert caught.value.message.startswith("Invalid 'size': 100x100;")


async def test_simulator_5xx_and_lost_answers(harness: Harness) -> None:
    """A 5xx or a dropped connection on a submit is an ambiguous submit; on a poll, a retry."""
    sim = await harness.sim(p_500=1.0)
    async with api(sim.base_url) as client:
        with pytest.raises(SubmitOutcomeUnknown) as lost:
            await client.submit(EDIT_PATH, edit_body(sim))
        assert lost.value.status == 500
        with pytest.raises(RetryLater):
            await client.poll("anything")
        sim.configure(p_500=0.0, p_drop_before_accept=1.0)
        with pytest.raises(SubmitOutcomeUnknown, match="may have accepted it"):
            await client.submit(EDIT_PATH, edit_body(sim))
    assert sim.stats.dropped == 1


async def test_a_slow_answer_past_the_timeout_is_ambiguous(harness: Harness) -> None:
    """A submit answered after submit_timeout may have been billed: SubmitOutcomeUnknown; a slow poll
    is just retried later."""
    sim = await harness.sim(p_slow=1.0, slow_seconds=0.3)
    async with api(sim.base_url, submit_timeout=0.05, poll_timeout=0.05) as client:
        with pytest.raises(SubmitOutcomeUnknown):
            await client.submit(EDIT_PATH, edit_body(sim))
        with pytest.raises(RetryLater) as poll:
            await client.poll(next(iter(sim.stats.predictions)))
    assert poll.value.kind == "network"
    assert sim.stats.accepted == 1


async def test_nothing_listening_is_not_accepted() -> None:
    """A refused connection never reached the server: a submit is NotAccepted (safe to resend)."""
    async with api(f"http://127.0.0.1:{free_port()}") as client:
        with pytest.raises(NotAccepted, match="cannot connect"):
            await client.submit(EDIT_PATH, {"prompt": "x"})
        with pytest.raises(RetryLater) as poll:
            await client.poll("p-1")
        with pytest.raises(RetryLater):
            await client.download(f"http://127.0.0.1:{free_port()}/a.png")
    assert poll.value.kind == "network"


async def test_a_base_url_path_prefix_is_kept(scripted: Scripted) -> None:
    """A base URL with a path (an API gateway or proxy) prefixes every API request, not just its host."""
    server = await scripted()
    server.reply("/gw/v1" + EDIT_PATH, Reply.json(ENVELOPE))
    server.reply("/gw/v1" + POLL_PATH, Reply.json(ENVELOPE))
    async with api(server.url + "/gw/v1/") as client:
        await client.submit(EDIT_PATH, {"prompt": "x"})
        await client.poll("p-1")

    assert [s.path for s in server.seen] == ["/gw/v1" + EDIT_PATH, "/gw/v1" + POLL_PATH]


# ---- the key -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bearer", [True, False], ids=["bearer", "raw"])
async def test_raw_and_bearer_keys_are_both_accepted(
    harness: Harness, scripted: Scripted, bearer: bool
) -> None:
    """The client sends `Bearer <key>` or the raw key as configured; the simulator takes either."""
    sim = await harness.sim(api_key=KEY)
    async with api(sim.base_url, bearer=bearer) as client:
        prediction = await client.submit(EDIT_PATH, edit_body(sim))
        assert (await client.poll(prediction.id)).id == prediction.id

    server = await scripted()
    server.reply(EDIT_PATH, Reply.json(ENVELOPE))
    async with api(server.url, bearer=bearer) as client:
        await client.submit(EDIT_PATH, {"prompt": "x"})
    assert server.seen[0].headers["Authorization"] == (f"Bearer {KEY}" if bearer else KEY)


async def test_a_download_never_carries_the_key(harness: Harness, scripted: Scripted) -> None:
    """Output downloads go without Authorization: to the simulator's output URLs and to any other host,
    redirects included."""
    sim = await harness.sim(inference_polls=1)
    async with api(sim.base_url) as client:
        prediction = await poll_until_final(client, (await client.submit(EDIT_PATH, edit_body(sim, n=2))).id)
        images = [await client.download(url) for url in prediction.outputs]
        host = await scripted()
        elsewhere = await scripted()
        host.reply("/out.png", Reply(200, images[0], {"Content-Type": "image/png"}))
        host.reply("/moved.png", Reply(302, b"", {"Location": elsewhere.url + "/final.png"}))
        elsewhere.reply("/final.png", Reply(200, images[1], {"Content-Type": "image/png"}))
        assert await client.download(host.url + "/out.png") == images[0]
        assert await client.download(host.url + "/moved.png") == images[1]

    assert len(images) == 2
    assert sim.stats.downloads == 2
    assert sim.stats.key_leaks == 0
    seen = host.seen + elsewhere.seen
    assert [s.path for s in seen] == ["/out.png", "/moved.png", "/final.png"]
    assert all("Authorization" not in s.headers for s in seen)


@pytest.mark.parametrize(("path", "submit"), [(EDIT_PATH, True), (POLL_PATH, False)], ids=["submit", "poll"])
async def test_a_redirect_from_the_api_is_not_followed_with_the_key(
    scripted: Scripted, path: str, submit: bool
) -> None:
    """An API redirect is not followed, so the other host never sees the key; a redirected submit may
    have been accepted, so it counts as ambiguous, and a redirected poll is tried again later."""
    api_server, elsewhere = await scripted(), await scripted()
    elsewhere.reply(path, Reply.json(ENVELOPE))
    error = await answer_of(api_server, Reply(307, b"", {"Location": elsewhere.url + path}), submit=submit)

    assert error.status == 307
    assert isinstance(error, SubmitOutcomeUnknown if submit else RetryLater)
    assert elsewhere.seen == []
    assert len(api_server.seen) == 1


@pytest.mark.parametrize(
    ("reply", "error_class"),
    [
        (Reply.text("link expired", 403, "text/plain"), ItemRejected),
        (Reply.text("gone", 404, "text/plain"), ItemRejected),
        (Reply.text("busy", 429, "text/plain", **{"Retry-After": "1"}), SlowDown),
        (Reply.text("oops", 500, "text/plain"), RetryLater),
        (Reply.text("oops", 503, "text/plain"), RetryLater),
    ],
    ids=["403", "404", "429", "500", "503"],
)
async def test_download_errors_are_classified_as_output_host_errors(
    scripted: Scripted, reply: Reply, error_class: type[ApiError]
) -> None:
    """An output host's 403 is an expired link (this output fails), never a balance stop; 5xx retry."""
    server = await scripted()
    server.reply("/o.png", reply)
    async with api(server.url) as client:
        with pytest.raises(ApiError) as caught:
            await client.download(server.url + "/o.png")

    assert type(caught.value) is error_class
    if error_class is ItemRejected:
        assert caught.value.kind == "download"


async def test_a_truncated_download_is_retryable(harness: Harness) -> None:
    """An output cut short (declared length not reached) is a retryable fault, not a short file."""
    sim = await harness.sim(inference_polls=1, p_download_truncated=1.0)
    async with api(sim.base_url) as client:
        prediction = await poll_until_final(client, (await client.submit(EDIT_PATH, edit_body(sim))).id)
        with pytest.raises(RetryLater):
            await client.download(prediction.outputs[0])
    assert sim.stats.truncated_downloads == 1


def test_the_key_is_not_in_the_config_repr() -> None:
    """ClientConfig's repr, which may reach a log or a traceback, does not show the key."""
    config = ClientConfig(base_url="https://api.example.com/x", api_key=KEY)
    assert KEY not in repr(config)
    assert KEY not in repr(ApiClient(config))


@pytest.mark.parametrize("url", ["https://user:pw@api.example.com", "https://api.example.com/?token=t"])
def test_a_base_url_carrying_credentials_is_refused(url: str) -> None:
    """A base URL with user-info or a query is refused (without echoing it): the key has one source."""
    with pytest.raises(UsageError, match="must not carry credentials") as refused:
        ClientConfig(base_url=url, api_key=KEY)
    assert "pw" not in str(refused.value)
    assert "token" not in str(refused.value)


async def test_a_key_echoed_in_an_error_body_is_scrubbed(scripted: Scripted) -> None:
    """A gateway that echoes the key in its error body does not get it into the message (and reports)."""
    api_server = await scripted()
    body = {"error": {"message": f"bad token Bearer {KEY}"}}
    error = await answer_of(api_server, Reply.json(body, 400), submit=True)
    assert KEY not in error.message
    assert KEY not in str(error)
    assert "bad token Bearer ***" in error.message


async def test_a_202_submit_answer_is_an_accepted_prediction(scripted: Scripted) -> None:
    """Any 2xx carrying the envelope is an accepted submit, its prediction id kept."""
    api_server = await scripted()
    headers = {"Content-Type": "application/json"}
    api_server.reply(EDIT_PATH, Reply(202, json.dumps(ENVELOPE).encode(), headers))
    async with api(api_server.url) as client:
        prediction = await client.submit(EDIT_PATH, {"prompt": "x"})
    assert prediction.id == "p-1"


async def test_a_503_naming_the_content_policy_fails_the_item_as_content_policy(scripted: Scripted) -> None:
    """The vendor documents content-policy refusals as 503: one that says so is not retried."""
    api_server = await scripted()
    body = {"error": {"message": "Content blocked due to safety concerns"}}
    error = await answer_of(api_server, Reply.json(body, 503), submit=True)
    assert isinstance(error, ItemRejected)
    assert error.kind == "content_policy"
