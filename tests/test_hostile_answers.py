"""Hostile answers at the client boundary, over real sockets: whatever a server sends, the client returns a
Prediction or bytes, or raises an ApiError; the key never comes back out; bodies are capped as they stream;
prediction ids stay one path segment; downloads reach public addresses only."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batch_engine.api.client import Answer, ApiClient, ClientConfig, read_prediction
from batch_engine.api.envelope import MAX_MESSAGE_CHARS, scrubber
from batch_engine.api.targets import is_public
from batch_engine.errors import ApiError, ItemRejected, RetryLater, SubmitOutcomeUnknown
from batch_engine.values import Prediction
from tests.helpers import KEY
from tests.hostile import (
    EDIT_PATH,
    HostileServer,
    echo_auth,
    endless,
    envelope,
    gzip_bomb,
    png,
    raw,
)

pytest_plugins = ("tests.hostile",)
pytestmark = pytest.mark.anyio

POLL_PATH = "/api/v3/predictions/p-1/result"
MiB = 1024 * 1024
Hostile = Callable[[], Awaitable[HostileServer]]


@asynccontextmanager
async def api(server: HostileServer, **config: Any) -> AsyncIterator[ApiClient]:
    async with ApiClient(ClientConfig(base_url=server.url, api_key=KEY, **config)) as client:
        yield client


async def poll_answer(server: HostileServer, body: bytes, **config: Any) -> Prediction:
    server.route(POLL_PATH, raw(body))
    async with api(server, **config) as client:
        return await client.poll("p-1")


# ---- JSON that is not what it seems (issue 9, item 7) ---------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [b"[" * 200_000, b'{"data": ' * 100_000, b'{"code": 1e999}', b'{"code": -1e999, "data": []}'],
    ids=["200k-brackets", "100k-objects", "code-inf", "code-minus-inf"],
)
async def test_a_poll_answer_too_deep_or_with_an_infinite_code_is_retried(
    hostile: Hostile, body: bytes
) -> None:
    """A 200 nested 200,000 deep (RecursionError) or with code 1e999 (OverflowError) is a poll to retry."""
    server = await hostile()
    with pytest.raises(RetryLater):
        await poll_answer(server, body)


async def test_a_submit_answered_200_with_deep_nesting_is_ambiguous(hostile: Hostile) -> None:
    """A 200 submit answer that cannot be read may still be an accepted submit: it is ambiguous."""
    server = await hostile()
    server.route(EDIT_PATH, raw(b"[" * 200_000))
    async with api(server) as client:
        with pytest.raises(SubmitOutcomeUnknown, match="not JSON"):
            await client.submit(EDIT_PATH, {"prompt": "x"})


@pytest.mark.parametrize("value", ["1e999", "1e30", "-5", "true", '"12"', "NaN"])
async def test_an_absurd_execution_time_is_dropped(hostile: Hostile, value: str) -> None:
    """executionTime of 1e999 (OverflowError), 1e30 (past SQLite's INTEGER), negative or not a number
    is no inference time: the prediction is read, its inference_ms None."""
    server = await hostile()
    body = f'{{"data": {{"id": "p-1", "status": "completed", "executionTime": {value}}}}}'.encode()
    prediction = await poll_answer(server, body)
    assert (prediction.status, prediction.inference_ms) == ("completed", None)


async def test_a_sane_execution_time_is_kept(hostile: Hostile) -> None:
    """An executionTime within reason (milliseconds) is the prediction's inference time."""
    server = await hostile()
    body = b'{"data": {"id": "p-1", "status": "completed", "executionTime": 23456.7}}'
    assert (await poll_answer(server, body)).inference_ms == 23456


@pytest.mark.parametrize(
    "data",
    [
        {"status": [[["deep"]]], "model": {"a": 1}, "created_at": [1]},
        {"status": 7, "error": {"code": 5}, "outputs": {"not": "a list"}},
        {"status": "FAILED", "error": [1, 2, 3]},
    ],
)
async def test_fields_of_the_wrong_type_are_read_safely(hostile: Hostile, data: dict[str, Any]) -> None:
    """A status, model or error of the wrong type becomes a safe value (unknown status keeps polling)."""
    server = await hostile()
    prediction = await poll_answer(server, json.dumps({"data": {"id": "p-1", **data}}).encode())
    assert prediction.id == "p-1"
    assert isinstance(prediction.status, str)
    assert prediction.model is None or isinstance(prediction.model, str)


# ---- the key echoed back (item 5) ---------------------------------------------------------------------


@pytest.mark.parametrize("bearer", [True, False], ids=["bearer", "raw"])
async def test_a_key_echoed_in_a_200_answer_is_scrubbed_from_every_field(
    hostile: Hostile, bearer: bool
) -> None:
    """A failed prediction whose error, model and created_at echo the Authorization header comes back
    with ``***`` where the key was, in every field."""
    server = await hostile()
    server.route(POLL_PATH, echo_auth(server, "error"))
    async with api(server, bearer=bearer) as client:
        prediction = await client.poll("p-1")

    assert server.auth_seen == [f"Bearer {KEY}" if bearer else KEY]
    assert KEY not in repr(prediction)
    assert prediction.error is not None
    assert prediction.error.endswith("***")
    assert prediction.model is not None
    assert prediction.model.endswith("***")


async def test_a_key_echoed_as_the_prediction_id_is_not_accepted_as_one(hostile: Hostile) -> None:
    """A submit answered with the key as its prediction id: the id (scrubbed) is unusable, so the answer
    is ambiguous, and its message does not carry the key."""
    server = await hostile()
    server.route(EDIT_PATH, echo_auth(server, "id"))
    async with api(server) as client:
        with pytest.raises(SubmitOutcomeUnknown) as caught:
            await client.submit(EDIT_PATH, {"prompt": "x"})
    assert "'***' is not usable" in caught.value.message
    assert KEY not in str(caught.value)


async def test_a_key_echoed_in_an_output_url_is_scrubbed(hostile: Hostile) -> None:
    """An output URL carrying the key comes back with ``***`` in its place (so it is never fetched, and
    never sent to the output host)."""
    server = await hostile()
    server.route(POLL_PATH, echo_auth(server, "url"))
    async with api(server) as client:
        prediction = await client.poll("p-1")
    assert prediction.outputs == (f"{server.url}/out/***.png",)


async def test_a_key_percent_encoded_in_an_answer_is_scrubbed_too(hostile: Hostile) -> None:
    """The key in its URL-encoded form (as a redirecting gateway might echo it) is scrubbed as well."""
    key = KEY + "/+="
    server = await hostile()
    url = "https://cdn.example.com/o.png?auth=" + quote(key, safe="")
    server.route(POLL_PATH, envelope(id="p-1", status="completed", outputs=[url]))
    async with ApiClient(ClientConfig(base_url=server.url, api_key=key)) as client:
        prediction = await client.poll("p-1")
    assert prediction.outputs == ("https://cdn.example.com/o.png?auth=***",)


# ---- prediction ids (item 10) -------------------------------------------------------------------------


@pytest.mark.parametrize("bad_id", ["..", ".", "a/b", "x" * 129, "p 1", "p-1?x=1", "é", ""])
async def test_a_submit_answered_with_an_unusable_id_is_ambiguous(hostile: Hostile, bad_id: str) -> None:
    """An id that is not one safe path segment (``..``, a slash, 129 characters, ...) is no prediction id:
    the submit's outcome is unknown, and nothing is polled with it."""
    server = await hostile()
    server.route(EDIT_PATH, envelope(id=bad_id, status="created"))
    async with api(server) as client:
        with pytest.raises(SubmitOutcomeUnknown, match="prediction id"):
            await client.submit(EDIT_PATH, {"prompt": "x"})


async def test_polling_an_unusable_id_sends_nothing(hostile: Hostile) -> None:
    """Polling ``..`` (from an older journal) fails that item without a request: ``/api/v3/result``
    is never asked for."""
    server = await hostile()
    async with api(server) as client:
        with pytest.raises(ItemRejected, match="cannot be polled"):
            await client.poll("..")
    assert sum(server.hits.values()) == 0


async def test_a_good_id_with_every_allowed_character_is_polled_as_one_segment(hostile: Hostile) -> None:
    """An id of letters, digits and ``. _ : -`` is polled at /api/v3/predictions/<id>/result."""
    server = await hostile()
    pid = "Ab9._:-z"
    server.route(f"/api/v3/predictions/{pid}/result", envelope(id=pid, status="processing"))
    async with api(server) as client:
        assert (await client.poll(pid)).status == "processing"


# ---- bytes capped as they stream (item 8, 15) ---------------------------------------------------------


async def test_a_chunked_download_is_cut_off_at_the_cap(hostile: Hostile) -> None:
    """A download without Content-Length is stopped once it passes max_download_bytes: the output fails
    (kind download) and the host never gets to send all of it."""
    server = await hostile()
    server.route("/big.png", endless(server, 256 * MiB))
    async with api(server, max_download_bytes=MiB) as client:
        with pytest.raises(ItemRejected, match="more than the 1,048,576 bytes") as caught:
            await client.download(server.url + "/big.png")
    assert caught.value.kind == "download"
    assert server.sent["/big.png"] < 64 * MiB


@pytest.mark.parametrize("answer", [False, True], ids=["download", "poll"])
async def test_a_gzip_bomb_is_cut_off_after_inflating_past_the_cap(hostile: Hostile, answer: bool) -> None:
    """A small gzip body inflating to 16 MiB is refused once its inflated bytes pass the cap: a download
    fails as download, a poll answer is retried."""
    server = await hostile()
    server.route("/bomb", gzip_bomb(16 * MiB, answer=answer))
    server.route(POLL_PATH, gzip_bomb(16 * MiB, answer=answer))
    async with api(server, max_download_bytes=MiB, max_answer_bytes=MiB) as client:
        if answer:
            with pytest.raises(RetryLater, match="more than the 1,048,576 bytes"):
                await client.poll("p-1")
        else:
            with pytest.raises(ItemRejected, match="more than the 1,048,576 bytes"):
                await client.download(server.url + "/bomb")


async def test_a_declared_length_over_the_cap_is_refused_unread(hostile: Hostile) -> None:
    """A Content-Length above the cap fails the download before its body is read."""
    server = await hostile()
    server.route("/o.png", png(256, 256))
    async with api(server, max_download_bytes=100) as client:
        with pytest.raises(ItemRejected, match="more than the 100 allowed"):
            await client.download(server.url + "/o.png")


async def test_only_the_start_of_an_error_body_is_read(hostile: Hostile) -> None:
    """A 404 download whose body goes on for 256 MiB gives a short message after reading its start."""
    server = await hostile()
    server.route("/gone.png", endless(server, 256 * MiB, status=404))
    async with api(server) as client:
        with pytest.raises(ItemRejected, match="answered 404") as caught:
            await client.download(server.url + "/gone.png")
    assert len(caught.value.message) < 2 * MAX_MESSAGE_CHARS
    assert server.sent["/gone.png"] < 64 * MiB


async def test_a_huge_failure_message_is_kept_cut_with_its_length(hostile: Hostile) -> None:
    """A failed prediction's 5 MB error message is cut to MAX_MESSAGE_CHARS, its length noted."""
    server = await hostile()
    message = "the model failed " + "because " * 640_000
    prediction = await poll_answer(
        server, json.dumps({"data": {"id": "p-1", "status": "failed", "error": message}}).encode()
    )
    assert prediction.error is not None
    assert prediction.error.startswith("the model failed because")
    assert f"(cut: {len(message):,} characters in all)" in prediction.error
    assert len(prediction.error) < MAX_MESSAGE_CHARS + 50


# ---- where downloads may go (item 15) -----------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    ["http://169.254.169.254/latest/meta-data/", "http://[::ffff:169.254.169.254]/", "http://10.0.0.7/o.png"],
)
async def test_an_output_on_a_metadata_or_private_address_is_refused(hostile: Hostile, url: str) -> None:
    """With the API on a public address, an output URL on a link-local, metadata or private address is
    refused at once (kind download), never fetched."""
    server = await hostile()
    async with api(server, allow_private_outputs=False) as client:
        with pytest.raises(ItemRejected, match="not a public address") as caught:
            await client.download(url)
    assert caught.value.kind == "download"


async def test_a_name_resolving_to_loopback_is_refused(hostile: Hostile) -> None:
    """``localhost`` is checked by what it resolves to (127.0.0.1): refused, and the host sees nothing."""
    server, output_host = await hostile(), await hostile()
    output_host.route("/o.png", png())
    port = output_host.url.rsplit(":", 1)[1]
    async with api(server, allow_private_outputs=False) as client:
        with pytest.raises(ItemRejected, match=r"resolves to .*not a public address"):
            await client.download(f"http://localhost:{port}/o.png")
    assert sum(output_host.hits.values()) == 0


@pytest.mark.parametrize("target", ["http://169.254.169.254/x", "http://localhost:{port}/o.png"])
async def test_a_redirect_to_a_private_address_is_refused(hostile: Hostile, target: str) -> None:
    """A redirect from an allowed host to a private one is refused at the hop, not followed."""
    server, output_host = await hostile(), await hostile()
    output_host.route("/o.png", png())
    location = target.format(port=output_host.url.rsplit(":", 1)[1])
    server.route("/moved.png", raw(b"", 302, {"Location": location}))
    async with api(server, allow_private_outputs=False) as client:
        with pytest.raises(ItemRejected, match="not a public address"):
            await client.download(server.url + "/moved.png")
    assert server.hits["/moved.png"] == 1
    assert sum(output_host.hits.values()) == 0


async def test_outputs_on_the_local_network_are_fetched_when_the_api_is_there_too(hostile: Hostile) -> None:
    """With the API itself on 127.0.0.1 (the simulator, a test server), outputs on loopback are fetched."""
    server, output_host = await hostile(), await hostile()
    output_host.route("/o.png", png())
    port = output_host.url.rsplit(":", 1)[1]
    async with api(server) as client:
        data = await client.download(f"http://localhost:{port}/o.png")
    assert data.startswith(b"\x89PNG")


async def test_redirects_are_followed_a_few_times_only(hostile: Hostile) -> None:
    """A download redirecting to itself fails (kind download) after a few hops."""
    server = await hostile()
    server.route("/loop.png", raw(b"", 302, {"Location": "/loop.png"}))
    async with api(server) as client:
        with pytest.raises(ItemRejected, match="redirects"):
            await client.download(server.url + "/loop.png")
    assert server.hits["/loop.png"] == 6


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("8.8.8.8", True),
        ("2606:4700::1111", True),
        ("169.254.169.254", False),
        ("127.0.0.1", False),
        ("10.1.2.3", False),
        ("192.168.0.1", False),
        ("100.100.100.200", False),  # shared address space: Alibaba's metadata service
        ("224.0.0.1", False),
        ("0.0.0.0", False),
        ("::1", False),
        ("fd00:ec2::254", False),  # AWS's IPv6 metadata service
        ("::ffff:127.0.0.1", False),
        ("fe80::1%eth0", False),
        ("not an address", False),
    ],
)
def test_which_addresses_are_public(address: str, public: bool) -> None:
    """Only public unicast addresses count as public; mapped IPv4 is judged as the IPv4 it carries."""
    assert is_public(address) is public


# ---- the fuzzer: any answer is a Prediction or an ApiError ----------------------------------------------

SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**400), max_value=10**400)
    | st.floats()
    | st.text(max_size=20)
    | st.sampled_from(["completed", "failed", "..", KEY, f"Bearer {KEY}", "data:image/png;base64,AAAA"])
)
JSON_VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
FIELDS = st.sampled_from(
    [
        "id", "status", "outputs", "error", "executionTime", "execution_time", "timings",
        "has_nsfw_contents", "hasNsfwContents", "model", "created_at", "createdAt",
    ]
)
DATA = st.dictionaries(FIELDS, JSON_VALUES, max_size=9)
DOCUMENTS = st.one_of(
    st.builds(lambda data, code: {"data": data, "code": code}, DATA, JSON_VALUES),
    st.builds(lambda message, code: {"code": code, "message": message}, JSON_VALUES, JSON_VALUES),
    st.builds(lambda err: {"error": err}, JSON_VALUES),
    JSON_VALUES,
)


def encoded(document: Any) -> bytes:
    return json.dumps(document, allow_nan=True).encode()


BODIES = st.one_of(
    DOCUMENTS.map(encoded),
    st.binary(max_size=64),
    st.integers(1, 300_000).map(lambda depth: b"[" * depth),
    st.integers(1, 3000).map(lambda depth: b'{"data": ' * depth + b"1" + b"}" * depth),
    st.sampled_from([b'{"code": 1e999}', b'{"data": {"id": "p", "executionTime": 1e999}}', b"\xff\xfe"]),
)
STATUSES = st.sampled_from([200, 201, 202, 204, 301, 400, 401, 403, 404, 408, 429, 500, 502, 503, 599])
RETRY_AFTERS = st.none() | st.sampled_from(["1", "0.5", "-1", "1" * 400, "Mon, 01 Jan 99999 00:00:00 GMT"])


@settings(max_examples=400, deadline=None)
@given(status=STATUSES, body=BODIES, retry_after=RETRY_AFTERS, submit=st.booleans())
def test_any_answer_reads_as_a_prediction_or_an_api_error(
    status: int, body: bytes, retry_after: str | None, submit: bool
) -> None:
    """Whatever status, body and Retry-After a server sends, reading it gives a Prediction (with a usable
    id and no key in it) or raises an ApiError subclass, never any other exception."""
    read = read_or_error(Answer(status, body, retry_after), submit=submit)
    assert KEY not in (read.message if isinstance(read, ApiError) else repr(read))
    assert isinstance(read, ApiError) or 1 <= len(read.id) <= 128


def read_or_error(answer: Answer, *, submit: bool) -> Prediction | ApiError:
    """What reading ``answer`` gives: the Prediction, or the ApiError raised (anything else escapes)."""
    try:
        return read_prediction(answer, submit=submit, where="test", scrub=scrubber(KEY))
    except ApiError as exc:
        return exc


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(status=STATUSES, body=BODIES, submit=st.booleans())
async def test_any_answer_over_a_socket_is_a_prediction_or_an_api_error(
    hostile: Hostile, status: int, body: bytes, submit: bool
) -> None:
    """The same over a real socket, through submit and poll: a Prediction or an ApiError, nothing else."""
    server = await hostile()
    server.route(EDIT_PATH, raw(body, status))
    server.route(POLL_PATH, raw(body, status))
    try:
        async with api(server) as client:
            await (client.submit(EDIT_PATH, {"prompt": "x"}) if submit else client.poll("p-1"))
    except ApiError:
        pass
