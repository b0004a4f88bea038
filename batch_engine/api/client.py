"""The one boundary with the HTTP API: send one request, return a `Prediction` or bytes, or raise an ApiError.

Every aiohttp exception and every HTTP status is mapped to the project's own errors here, in
`ApiClient._exchange` and `read_prediction`, and nowhere else (see `batch_engine.errors` for the tree).
Foreign input is made safe here too, once: bodies are capped as they stream in (after decompression),
JSON is parsed defensively (`envelope`), every string is scrubbed of the key before anything else sees it,
and downloads reach only the hosts `targets.OutputTargets` allows.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import TracebackType
from typing import IO, Any
from urllib.parse import quote, urljoin, urlsplit, urlunsplit

import aiohttp
import anyio.to_thread

from batch_engine.api import envelope
from batch_engine.api.envelope import NOT_JSON, Scrub
from batch_engine.api.targets import CheckedResolver, OutputTargets, RefusedTarget
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
from batch_engine.settings import DEFAULT_BASE_URL
from batch_engine.timing.backoff import parse_retry_after
from batch_engine.values import ErrorKind, Prediction

log = logging.getLogger(__name__)

DEFAULT_SUBMIT_TIMEOUT = 120.0
DEFAULT_POLL_TIMEOUT = 30.0
DEFAULT_DOWNLOAD_TIMEOUT = 300.0
DEFAULT_CONNECTIONS = 100
MAX_DOWNLOAD_BYTES = 200 * 1024 * 1024
#: A url-format answer is a few hundred bytes, but a b64_json one carries the pictures themselves: n up
#: to 10, each a PNG of 2-15 MB, a third more in base64. The cap admits ten 1536x1024 outputs (~7 MB each in
#: base64) several times over, and bounds what one hostile answer can take (a gzip body inflating to 1 GB).
MAX_ANSWER_BYTES = 128 * 1024 * 1024
#: Of an answer that is not 2xx only the start is read: the message is in it, and the rest may be endless.
MAX_ERROR_BODY_BYTES = 64 * 1024
MAX_REDIRECTS = 5
#: Answers larger than this are parsed in a worker thread: a b64 answer's JSON takes milliseconds per MB.
THREAD_PARSE_BYTES = 1024 * 1024

_POLICY_WORDS = ("content policy", "content_policy", "safety", "moderation", "nsfw", "violat")
#: The query of a presigned URL (SigV4 and the older SigV2) quoted in an answer: it names the access key
#: and grants a read, so messages keep the URL's path only.
_SIGNED_QUERY = re.compile(
    r"\?[^\s\"'<>]*(?:X-Amz-(?:Signature|Credential)|Signature=|AWSAccessKeyId=)[^\s\"'<>]*", re.IGNORECASE
)


@dataclass(frozen=True, kw_only=True)
class ClientConfig:
    """Where the API is and how to talk to it. The key is never shown by ``repr``."""

    base_url: str = DEFAULT_BASE_URL
    api_key: str = field(repr=False)
    bearer: bool = True  #: send ``Bearer <key>``; False sends the raw key as the vendor page does
    submit_timeout: float = DEFAULT_SUBMIT_TIMEOUT
    poll_timeout: float = DEFAULT_POLL_TIMEOUT
    download_timeout: float = DEFAULT_DOWNLOAD_TIMEOUT
    connections: int = DEFAULT_CONNECTIONS
    max_answer_bytes: int = MAX_ANSWER_BYTES  #: a 2xx submit or poll answer, decompressed
    max_download_bytes: int = MAX_DOWNLOAD_BYTES  #: one output or input image, decompressed
    #: fetch outputs from private, loopback and link-local addresses; None: only when the API's host is one
    allow_private_outputs: bool | None = None

    def __post_init__(self) -> None:
        parts = urlsplit(self.base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise UsageError(
                f"base URL must be http(s)://host[:port][/path], got {public_url(self.base_url)!r}"
            )
        if parts.username or parts.password or parts.query or parts.fragment:
            raise UsageError(
                "base URL must not carry credentials, a query or a fragment (the key comes from "
                f"GPTPROTO_API_KEY): got {public_url(self.base_url)!r}"
            )
        if not self.api_key:
            raise UsageError("the API key is empty: set GPTPROTO_API_KEY (or use --simulate)")
        for name in ("max_answer_bytes", "max_download_bytes"):
            if getattr(self, name) < 1:
                raise UsageError(f"{name} must be at least 1, got {getattr(self, name)}")

    @property
    def api_root(self) -> str:
        """What API paths are appended to: the origin and the base URL's path (a gateway's prefix), if any."""
        parts = urlsplit(self.base_url)
        return urlunsplit((parts.scheme, parts.netloc, parts.path.rstrip("/"), "", ""))


def public_url(url: str) -> str:
    """A URL fit for logs and reports: no user-info, query or fragment (where secrets hide)."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:  # a foreign URL with a bad port or bracket
        return "(an unreadable URL)"
    netloc = (parts.hostname or "") + (f":{port}" if port else "")
    return urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))


@dataclass(frozen=True, slots=True)
class FormFile:
    """One file part of a multipart request: streamed from ``stream`` as it is sent."""

    name: str  #: the part's file name, e.g. ``image-1.png``
    stream: IO[bytes]
    content_type: str  #: e.g. ``image/png``


@dataclass(frozen=True, slots=True)
class Answer:
    """One HTTP answer as read: its status, its body (capped) and the headers the engine acts on."""

    status: int
    body: bytes
    retry_after: str | None = None
    location: str | None = None


class _TooLarge(Exception):
    """A 2xx body went past its cap (internal: `_exchange` maps it)."""


class ApiClient:
    """Submits, polls and downloads. Only `submit` and `poll` carry the key, and only to ``base_url``."""

    __slots__ = ("_config", "_scrub", "_session", "_targets")

    def __init__(self, config: ClientConfig) -> None:
        self._config = config
        self._session: aiohttp.ClientSession | None = None
        self._scrub: Scrub = envelope.scrubber(config.api_key)
        self._targets = OutputTargets(config.base_url, allow_private=config.allow_private_outputs)

    def __repr__(self) -> str:
        return f"ApiClient(base_url={public_url(self._config.base_url)!r})"

    async def __aenter__(self) -> ApiClient:
        connector = aiohttp.TCPConnector(
            limit=self._config.connections, limit_per_host=0, resolver=CheckedResolver(self._targets)
        )
        self._session = aiohttp.ClientSession(connector=connector, trust_env=False)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def submit(self, path: str, body: Mapping[str, Any]) -> Prediction:
        """POST one edit. The server may have accepted it unless this raises NotAccepted/SlowDown."""
        url = self._config.api_root + path
        with self._scrubbed():
            answer = await self._exchange("POST", url, body=body, submit=True)
            return await self._prediction(answer, submit=True, url=url)

    async def images_edit(
        self, path: str, fields: Mapping[str, str], files: Sequence[FormFile], *, seconds: float
    ) -> Prediction:
        """POST one edit to the OpenAI-format route as a multipart form, one ``image[]`` part per file,
        and wait up to ``seconds`` for its answer, which carries the pictures: a completed `Prediction`
        with no id. Mapped exactly as `submit`: unless this raises NotAccepted or SlowDown, the server may
        have accepted (billed) it."""
        url = self._config.api_root + path
        form = aiohttp.FormData()
        for name, value in fields.items():
            form.add_field(name, value)
        for part in files:
            form.add_field("image[]", part.stream, filename=part.name, content_type=part.content_type)
        with self._scrubbed():
            answer = await self._exchange("POST", url, body=None, form=form, submit=True, seconds=seconds)
            if len(answer.body) <= THREAD_PARSE_BYTES:
                return read_images_answer(answer, where=_Shown(url), scrub=self._scrub)
            return await anyio.to_thread.run_sync(
                lambda: read_images_answer(answer, where=_Shown(url), scrub=self._scrub)
            )

    async def poll(self, prediction_id: str) -> Prediction:
        """GET a prediction's result; the URL is always built on the configured base URL."""
        if not envelope.usable_id(prediction_id):  # e.g. from a journal an older version wrote
            message = f"the prediction id {envelope.shown_id(prediction_id)} cannot be polled"
            raise ItemRejected(self._scrub(message), kind=ErrorKind.SERVER_ERROR)
        url = f"{self._config.api_root}/api/v3/predictions/{quote(prediction_id, safe='')}/result"
        with self._scrubbed():
            answer = await self._exchange("GET", url, body=None, submit=False)
            return await self._prediction(answer, submit=False, url=url)

    async def download(self, url: str, *, time_left: float | None = None) -> bytes:
        """Fetch an output or input image, following redirects to allowed hosts only; never sends the key.

        ``time_left`` (seconds, for every redirect together) shortens the configured download timeout.
        """
        total = self._config.download_timeout
        if time_left is not None:
            total = min(total, time_left)
        deadline = anyio.current_time() + total
        with self._scrubbed():
            for _ in range(MAX_REDIRECTS + 1):
                self._check_target(url)
                left = max(deadline - anyio.current_time(), 0.001)
                answer = await self._exchange("GET", url, body=None, submit=False, auth=False, seconds=left)
                if not (300 <= answer.status < 400 and answer.location):
                    return _download_body(answer, where=_Shown(url))
                url = urljoin(url, answer.location)
            message = f"more than {MAX_REDIRECTS} redirects, the last to {_Shown(url)}"
            raise ItemRejected(message, kind=ErrorKind.DOWNLOAD)

    def _check_target(self, url: str) -> None:
        refusal = self._targets.refusal(url)
        if refusal is not None:
            raise ItemRejected(f"refused to fetch {_Shown(url)}: {refusal}", kind=ErrorKind.DOWNLOAD)

    async def _prediction(self, answer: Answer, *, submit: bool, url: str) -> Prediction:
        if len(answer.body) <= THREAD_PARSE_BYTES:
            return read_prediction(answer, submit=submit, where=_Shown(url), scrub=self._scrub)
        return await anyio.to_thread.run_sync(
            lambda: read_prediction(answer, submit=submit, where=_Shown(url), scrub=self._scrub)
        )

    @contextmanager
    def _scrubbed(self) -> Iterator[None]:
        """Error messages quote bodies and URLs, which end up in reports: scrub the key, then bound them."""
        try:
            yield
        except ApiError as exc:
            exc.message = envelope.bounded(without_signatures(self._scrub(exc.message)))
            exc.args = (exc.message,)
            raise

    def _headers(self, auth: bool) -> dict[str, str]:
        if not auth:
            return {}
        key = self._config.api_key
        return {"Authorization": f"Bearer {key}" if self._config.bearer else key}

    def _timeout(self, method: str, auth: bool, seconds: float | None) -> aiohttp.ClientTimeout:
        if seconds is not None:
            total = seconds
        elif not auth:
            total = self._config.download_timeout
        else:
            total = self._config.submit_timeout if method == "POST" else self._config.poll_timeout
        return aiohttp.ClientTimeout(total=total, sock_connect=min(total, 30.0))

    async def _exchange(
        self,
        method: str,
        url: str,
        *,
        body: Mapping[str, Any] | None,
        submit: bool,
        auth: bool = True,
        seconds: float | None = None,
        form: aiohttp.FormData | None = None,
    ) -> Answer:
        """Send one request and read its answer (redirects are never followed here); map every failure."""
        session = self._session
        assert session is not None, "use ApiClient as an async context manager"
        where = _Shown(url)
        limit = self._config.max_answer_bytes if auth else self._config.max_download_bytes
        log.debug("%s %s", method, where)
        try:
            async with session.request(
                method,
                url,
                json=body,
                data=form,
                headers=self._headers(auth),
                timeout=self._timeout(method, auth, seconds),
                allow_redirects=False,  # an API redirect must never carry the key elsewhere
            ) as resp:
                raw = await _read_body(resp, limit)
                headers = resp.headers
                answer = Answer(resp.status, raw, headers.get("Retry-After"), headers.get("Location"))
        except _TooLarge as exc:
            raise _too_large(auth=auth, submit=submit, message=f"{where} sent {exc}") from exc
        except aiohttp.ClientConnectorError as exc:  # never connected: nothing was sent
            if isinstance(exc.os_error, RefusedTarget):
                message = f"refused to fetch {where}: {exc.os_error}"
                raise ItemRejected(message, kind=ErrorKind.DOWNLOAD) from exc
            raise _unsent(submit, f"cannot connect to {where}: {exc.strerror or exc}") from exc
        except aiohttp.ConnectionTimeoutError as exc:
            raise _unsent(submit, f"timed out connecting to {where}") from exc
        # ValueError: a URL aiohttp refuses; OSError: a file part that could not be read while it was sent
        except (TimeoutError, aiohttp.ClientError, ValueError, OSError) as exc:
            raise _lost(submit, f"{type(exc).__name__} from {where}: {exc}") from exc
        log.debug("%s %s -> %s", method, where, answer.status)
        return answer


class _Shown:
    """A URL as logs and errors show it, worked out only when a message really uses it (hot path)."""

    __slots__ = ("url",)

    def __init__(self, url: str) -> None:
        self.url = url

    def __str__(self) -> str:
        return public_url(self.url)


async def _read_body(resp: aiohttp.ClientResponse, limit: int) -> bytes:
    """The body, decompressed; past ``limit`` bytes a 2xx body raises _TooLarge, others are cut short.

    Counted as the bytes stream in, so the cap holds without a Content-Length and for a gzip body,
    whose Content-Length says nothing of what it inflates to.
    """
    if not 200 <= resp.status < 300:
        return await _read_start(resp, MAX_ERROR_BODY_BYTES)
    declared = resp.content_length
    if declared is not None and declared > limit:
        raise _TooLarge(f"a body of {declared:,} bytes (more than the {limit:,} allowed)")
    if declared is not None and "Content-Encoding" not in resp.headers:
        return await resp.read()  # exactly the declared length: no more can come (the hot path)
    body = bytearray()
    async for chunk in resp.content.iter_any():
        body += chunk
        if len(body) > limit:
            raise _TooLarge(f"more than the {limit:,} bytes allowed")
    return bytes(body)


async def _read_start(resp: aiohttp.ClientResponse, limit: int) -> bytes:
    start = bytearray()
    while len(start) < limit:
        chunk = await resp.content.read(limit - len(start))
        if not chunk:
            break
        start += chunk
    return bytes(start)


def _too_large(*, auth: bool, submit: bool, message: str) -> ApiError:
    if not auth:  # the host will send the same again: the output fails, unfetched
        return ItemRejected(message, kind=ErrorKind.DOWNLOAD)
    return _lost(submit, message)


def _unsent(submit: bool, message: str) -> ApiError:
    return NotAccepted(message) if submit else RetryLater(message, kind=ErrorKind.NETWORK)


def _lost(submit: bool, message: str) -> ApiError:
    if submit:
        return SubmitOutcomeUnknown(
            f"the submit's answer was lost ({message}); the server may have accepted it"
        )
    return RetryLater(message, kind=ErrorKind.NETWORK)


def read_prediction(answer: Answer, *, submit: bool, where: object, scrub: Scrub) -> Prediction:
    """An API answer as a Prediction, or the ApiError it means: classified by status, then by the body.

    Pure, and total over its input: whatever the body holds, this returns or raises an ApiError.
    """
    payload = envelope.loads(answer.body)
    success = 200 <= answer.status < 300
    code = envelope.body_code(payload) if success else None
    if success and code in (None, 200):
        if payload is NOT_JSON:
            message = f"{where} answered 200 with a body that is not JSON: {_message(payload, answer, scrub)}"
            raise SubmitOutcomeUnknown(message, status=200) if submit else RetryLater(message, status=200)
        return _parsed(payload, submit=submit, scrub=scrub)
    status = code if code is not None else answer.status
    message = _message(payload, answer, scrub)
    raise _classify(status, message, retry_after=answer.retry_after, submit=submit, where=where)


def read_images_answer(answer: Answer, *, where: object, scrub: Scrub) -> Prediction:
    """An OpenAI-format images answer (``{"data": [{"b64_json": ...}], "created": ...}``) as a completed
    `Prediction` with no id, or the ApiError it means, classified exactly as a submit's.

    Pure, and total over its input, as `read_prediction`. A 2xx answer without pictures is still an
    answer (billed): it completes without outputs, which the sink fails as ``inference_failed``.
    """
    payload = envelope.loads(answer.body)
    if not 200 <= answer.status < 300:
        message = _message(payload, answer, scrub)
        raise _classify(answer.status, message, retry_after=answer.retry_after, submit=True, where=where)
    if not isinstance(payload, Mapping):
        message = f"{where} answered {answer.status} with a body that is not a JSON object"
        raise SubmitOutcomeUnknown(f"{message}: {_message(payload, answer, scrub)}", status=answer.status)
    created = payload.get("created")
    return Prediction(
        id="",
        status="completed",
        outputs=_image_outputs(payload.get("data"), scrub),
        created_at=str(created) if isinstance(created, int) and not isinstance(created, bool) else None,
    )


def _image_outputs(data: Any, scrub: Scrub) -> tuple[str, ...]:
    """Each picture of an images answer: its ``b64_json``, else its ``url``; anything else is skipped."""
    found = []
    for entry in data if isinstance(data, list) else ():
        if not isinstance(entry, Mapping):
            continue
        value = entry.get("b64_json") or entry.get("url")
        if isinstance(value, str) and value:
            found.append(scrub(value))
    return tuple(found)


def without_signatures(text: str) -> str:
    """``text`` with the query of each presigned URL in it cut (it names the access key and grants a read)."""
    return _SIGNED_QUERY.sub("?(signature removed)", text)


def _message(payload: Any, answer: Answer, scrub: Scrub) -> str:
    return envelope.error_message(payload, answer.body, scrub=scrub)


def _parsed(payload: Any, *, submit: bool, scrub: Scrub) -> Prediction:
    try:
        return envelope.parse_prediction(payload, scrub=scrub)
    except ValueError as exc:
        message = f"unexpected answer: {exc}"
        if submit:  # a 200 without a usable id: accepted or not, we cannot tell
            raise SubmitOutcomeUnknown(message, status=200) from exc
        raise RetryLater(message, status=200) from exc


def _download_body(answer: Answer, *, where: _Shown) -> bytes:
    """A 2xx download's bytes, else the error it means."""
    if 200 <= answer.status < 300:
        return answer.body
    raise _download_error(answer, where=where)


def _download_error(answer: Answer, *, where: _Shown) -> ApiError:
    """Output hosts are not the API: a 403 there is an expired link, not an empty balance."""
    status = answer.status
    detail = envelope.error_message(envelope.loads(answer.body), answer.body)
    message = f"download of {where} answered {status}: {detail}"
    if status == 429:
        return SlowDown(message, retry_after=parse_retry_after(answer.retry_after))
    if status >= 500 or status in (408, 425):
        return RetryLater(message, status=status)
    return ItemRejected(message, status=status, kind=ErrorKind.DOWNLOAD)


def _classify(status: int, message: str, *, retry_after: str | None, submit: bool, where: object) -> ApiError:
    """HTTP status → error class, as the API facts' error table says; the body only adds detail."""
    if status == 429:
        return SlowDown(message, retry_after=parse_retry_after(retry_after))
    if status == 401:
        return StopRun(f"the API key was refused (401): {message}", status=status)
    if status == 403:
        return StopSubmitting(
            f"forbidden (403), no permission or insufficient balance: {message}", status=status
        )
    policy = any(word in message.lower() for word in _POLICY_WORDS)
    if status == 503 and policy:  # the vendor documents content-policy refusals as "503"
        return ItemRejected(message, status=status, kind=ErrorKind.CONTENT_POLICY)
    if status >= 500 or status in (408, 425) or 300 <= status < 400:
        if submit:  # a gateway's 5xx, or a redirect we do not follow: the POST may have been accepted
            return SubmitOutcomeUnknown(f"server answered {status}: {message}", status=status)
        return RetryLater(f"server answered {status} from {where}: {message}", status=status)
    if status == 404 and not submit:  # a new prediction id may take a moment to become visible
        return RetryLater(f"prediction not found (404) at {where}: {message}", status=status)
    kind = ErrorKind.CONTENT_POLICY if policy else ErrorKind.INVALID_REQUEST
    return ItemRejected(message, status=status, kind=kind)
