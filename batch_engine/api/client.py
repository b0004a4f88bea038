"""The one boundary with the HTTP API: send one request, return a `Prediction` or bytes, or raise an ApiError.

Every aiohttp exception and every HTTP status is mapped to the project's own errors here, in
`ApiClient._exchange`, and nowhere else (see `batch_engine.errors` for the tree).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import aiohttp

from batch_engine.api.envelope import body_code, error_message, parse_prediction
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

_POLICY_WORDS = ("content policy", "content_policy", "safety", "moderation", "nsfw", "violat")


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

    @property
    def api_root(self) -> str:
        """What API paths are appended to: the origin and the base URL's path (a gateway's prefix), if any."""
        parts = urlsplit(self.base_url)
        return urlunsplit((parts.scheme, parts.netloc, parts.path.rstrip("/"), "", ""))


def public_url(url: str) -> str:
    """A URL fit for logs and reports: no user-info, query or fragment (where secrets hide)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = host + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))


class ApiClient:
    """Submits, polls and downloads. Only `submit` and `poll` carry the key, and only to ``base_url``."""

    __slots__ = ("_config", "_session")

    def __init__(self, config: ClientConfig) -> None:
        self._config = config
        self._session: aiohttp.ClientSession | None = None

    def __repr__(self) -> str:
        return f"ApiClient(base_url={public_url(self._config.base_url)!r})"

    async def __aenter__(self) -> ApiClient:
        connector = aiohttp.TCPConnector(limit=self._config.connections, limit_per_host=0)
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
        payload = await self._exchange("POST", url, body=body, submit=True)
        return _prediction(payload, submit=True)

    async def poll(self, prediction_id: str) -> Prediction:
        """GET a prediction's result; the URL is always built on the configured base URL."""
        url = f"{self._config.api_root}/api/v3/predictions/{quote(prediction_id, safe='')}/result"
        payload = await self._exchange("GET", url, body=None, submit=False)
        return _prediction(payload, submit=False)

    async def download(self, url: str) -> bytes:
        """Fetch an output or input image. Never sends the key: output URLs may be on any host."""
        data: bytes = await self._exchange("GET", url, body=None, submit=False, auth=False)
        return data

    def _headers(self, auth: bool) -> dict[str, str]:
        if not auth:
            return {}
        key = self._config.api_key
        return {"Authorization": f"Bearer {key}" if self._config.bearer else key}

    def _timeout(self, method: str, auth: bool) -> aiohttp.ClientTimeout:
        if not auth:
            total = self._config.download_timeout
        else:
            total = self._config.submit_timeout if method == "POST" else self._config.poll_timeout
        return aiohttp.ClientTimeout(total=total, sock_connect=min(total, 30.0))

    async def _exchange(
        self, method: str, url: str, *, body: Mapping[str, Any] | None, submit: bool, auth: bool = True
    ) -> Any:
        """Send one request; return the JSON (API) or bytes (download); map every failure to an ApiError.

        Error messages quote response bodies, which end up in reports: a server or gateway that echoes
        the key back must not put it there, so every message is scrubbed of it here.
        """
        try:
            return await self._send(method, url, body=body, submit=submit, auth=auth)
        except ApiError as exc:
            key = self._config.api_key
            if key in exc.message:
                exc.message = exc.message.replace(key, "***")
                exc.args = (exc.message,)
            raise

    async def _send(
        self, method: str, url: str, *, body: Mapping[str, Any] | None, submit: bool, auth: bool
    ) -> Any:
        session = self._session
        assert session is not None, "use ApiClient as an async context manager"
        where = _Shown(url)
        log.debug("%s %s", method, where)
        try:
            async with session.request(
                method,
                url,
                json=body,
                headers=self._headers(auth),
                timeout=self._timeout(method, auth),
                allow_redirects=not auth,  # a redirect must never carry the key elsewhere
            ) as resp:
                raw = await _read(resp)
                status = resp.status
                retry_after = resp.headers.get("Retry-After")
        except aiohttp.ClientConnectorError as exc:  # never connected: nothing was sent
            raise _unsent(submit, f"cannot connect to {where}: {exc.strerror or exc}") from exc
        except aiohttp.ConnectionTimeoutError as exc:
            raise _unsent(submit, f"timed out connecting to {where}") from exc
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise _lost(submit, f"{type(exc).__name__} from {where}: {exc}") from exc
        log.debug("%s %s -> %s", method, where, status)
        success = 200 <= status < 300
        if success and not (auth and body_code(raw) not in (None, 200)):
            return raw if not auth else _json(raw, submit=submit, where=where)
        if not auth:
            raise _download_error(status, raw, retry_after=retry_after, where=where)
        code = status if not success else (body_code(raw) or status)
        raise _classify(code, raw, retry_after=retry_after, submit=submit, where=where)


class _Shown:
    """A URL as logs and errors show it, worked out only when a message really uses it (hot path)."""

    __slots__ = ("url",)

    def __init__(self, url: str) -> None:
        self.url = url

    def __str__(self) -> str:
        return public_url(self.url)


async def _read(resp: aiohttp.ClientResponse) -> bytes:
    declared = resp.content_length
    if declared is not None and declared > MAX_DOWNLOAD_BYTES:
        raise aiohttp.ClientPayloadError(f"answer too large ({declared} bytes)")
    return await resp.read()


def _unsent(submit: bool, message: str) -> ApiError:
    return NotAccepted(message) if submit else RetryLater(message, kind=ErrorKind.NETWORK)


def _lost(submit: bool, message: str) -> ApiError:
    if submit:
        return SubmitOutcomeUnknown(
            f"the submit's answer was lost ({message}); the server may have accepted it"
        )
    return RetryLater(message, kind=ErrorKind.NETWORK)


def _json(raw: bytes, *, submit: bool, where: _Shown) -> Any:
    try:
        return json.loads(raw)
    except ValueError as exc:
        message = f"{where} answered 200 with a body that is not JSON: {error_message(raw)}"
        if submit:
            raise SubmitOutcomeUnknown(message, status=200) from exc
        raise RetryLater(message, status=200) from exc


def _prediction(payload: Any, *, submit: bool) -> Prediction:
    try:
        return parse_prediction(payload)
    except ValueError as exc:
        message = f"unexpected answer: {exc}"
        if submit:  # a 200 without an id: accepted or not, we cannot tell
            raise SubmitOutcomeUnknown(message, status=200) from exc
        raise RetryLater(message, status=200) from exc


def _download_error(status: int, raw: bytes, *, retry_after: str | None, where: _Shown) -> ApiError:
    """Output hosts are not the API: a 403 there is an expired link, not an empty balance."""
    message = f"download of {where} answered {status}: {error_message(raw)}"
    if status == 429:
        return SlowDown(message, retry_after=parse_retry_after(retry_after))
    if status >= 500 or status in (408, 425):
        return RetryLater(message, status=status)
    return ItemRejected(message, status=status, kind=ErrorKind.DOWNLOAD)


def _classify(status: int, raw: bytes, *, retry_after: str | None, submit: bool, where: _Shown) -> ApiError:
    """HTTP status → error class, as the API facts' error table says; the body only adds detail."""
    message = error_message(raw)
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
