"""Local input files staged once each in the user's S3-compatible object store, keyed by their content.

A file goes to ``<prefix>/<sha256>.<ext>``: HEAD first, and only if it is not there a PUT with
``mode="create"`` (a race with another run is harmless: same key, same bytes). What is known to be there is
kept per run, so a file shared by many items is staged once, and tomorrow's run finds it with one HEAD.
The API gets, for each POST, a GET URL presigned just before it (so a resubmit never carries an old one),
valid for ``InputsSettings.ttl``, or ``public_base_url`` + the key when the bucket is public.

obstore (the ``s3`` extra) is the client, imported only when a manifest stages files. Its errors are mapped
here and nowhere else:

    FileNotFoundError on HEAD                   not there yet: upload it
    AlreadyExistsError on PUT                   someone uploaded the same bytes meanwhile: done
    PermissionDeniedError, UnauthenticatedError,
    FileNotFoundError on PUT (no such bucket)   StagingRefused: every upload would fail alike
    any other obstore error                     retried with the run's backoff, then InputFailed
    OSError reading the file, not an image      InputFailed at once

Credentials, region and endpoint come from the environment only (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_REGION``, ``AWS_ENDPOINT_URL``, ``AWS_ALLOW_HTTP``;
instance and container roles), which obstore reads itself; obstore ignores ``AWS_PROFILE`` and ``~/.aws``,
so a profile is read through boto3 when boto3 is installed. None of it is logged. A presigned URL names the
access key id (that is SigV4), so it is built for one POST and never logged, journaled or reported.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import quote

import anyio
import anyio.to_thread

from batch_engine.errors import BatchEngineError, InputFailed, StagingRefused, UsageError
from batch_engine.images import sniff_extension
from batch_engine.manifest.local_files import MAX_INPUT_BYTES
from batch_engine.timing.backoff import DEFAULT_POLICY, RetryPolicy, full_jitter

if TYPE_CHECKING:
    from obstore.store import S3Store

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'batch-engine[s3]'"
#: One request to the store may take this long: a 50 MB PUT over a slow uplink, not a hung connection.
REQUEST_TIMEOUT = "300s"
CONNECT_TIMEOUT = "10s"
CONTENT_TYPES = {"png": "image/png", "jpg": "image/jpeg", "webp": "image/webp", "gif": "image/gif"}

#: Presigns GET URLs of keys for a lifetime: `sign_get` (obstore's), a parameter so tests can watch it.
Signer = Callable[["S3Store", Sequence[str], timedelta], Awaitable[Sequence[str]]]
_T = TypeVar("_T")


def open_store(url: str, *, setting: str = "settings.inputs.upload") -> S3Store:
    """The store ``s3://bucket/prefix/`` names, configured from the environment; UsageError (naming
    ``setting``, where the URL came from) when the ``s3`` extra is missing or the environment cannot
    configure it."""
    try:
        from obstore.exceptions import BaseError
        from obstore.store import S3Store
    except ImportError as exc:
        raise UsageError(
            f"{setting} needs obstore to reach an object store, and it is not installed: {INSTALL_HINT}"
        ) from exc
    options = {"timeout": REQUEST_TIMEOUT, "connect_timeout": CONNECT_TIMEOUT}
    if "AWS_ALLOW_HTTP" in os.environ:  # client options given here replace those obstore reads itself
        options["allow_http"] = os.environ["AWS_ALLOW_HTTP"]
    try:
        return S3Store.from_url(
            url,
            client_options=options,  # type: ignore[arg-type]  # a TypedDict, built from the environment
            retry_config={"max_retries": 0},  # the run's own backoff retries, bounded as every request is
            **_profile(),
        )
    except (BaseError, ValueError) as exc:
        raise UsageError(f"{setting} {url}: {first_line(exc)}") from exc


def location(store: S3Store) -> str:
    """``s3://bucket/prefix``, as logs and messages name a store (never with credentials: it has none)."""
    return f"s3://{store.config.get('bucket', '?')}/{store.prefix or ''}".rstrip("/")


@dataclass(frozen=True, kw_only=True)
class Retrying:
    """How calls to a store are tried again, and what a call that never succeeds raises.

    Errors are mapped here and nowhere else (see the module's table): refused credentials or permission
    raise StagingRefused at once; any other store error is retried with the run's backoff, then raises
    ``gave_up(message)``.
    """

    where: str  #: the store, as messages name it (`location`)
    retry: RetryPolicy = DEFAULT_POLICY
    sleep: Callable[[float], Awaitable[None]] = anyio.sleep
    rand: Callable[[], float] = random.random
    gave_up: Callable[[str], BatchEngineError] = InputFailed

    async def __call__(self, call: Callable[[], Awaitable[_T]], what: str) -> _T:
        """``call()``, tried again after transient store errors; StagingRefused on refused credentials."""
        from obstore.exceptions import BaseError, PermissionDeniedError, UnauthenticatedError

        attempt = 0
        while True:
            attempt += 1
            try:
                return await call()
            except (PermissionDeniedError, UnauthenticatedError) as exc:
                raise StagingRefused(f"{self.where} refused to {what}: {first_line(exc)}") from exc
            except (BaseError, ValueError, OSError) as exc:  # OSError: what obstore leaves to the builtins
                if attempt >= self.retry.attempts:
                    message = f"could not {what} in {self.where} ({attempt} attempts): {first_line(exc)}"
                    raise self.gave_up(message) from exc
                delay = full_jitter(
                    attempt, initial=self.retry.initial, maximum=self.retry.maximum, rand=self.rand()
                )
                log.debug("could not %s in %s (%s); again in %.2fs", what, self.where, exc, delay)
                await self.sleep(delay)


def no_bucket(where: str, exc: FileNotFoundError) -> StagingRefused:
    """A PUT answered "not found": the bucket does not exist, and no PUT will do better."""
    return StagingRefused(f"{where}: the bucket does not exist ({first_line(exc)})")


async def sign_get(store: S3Store, keys: Sequence[str], expires_in: timedelta) -> Sequence[str]:
    """Presigned GET URLs of ``keys``, valid for ``expires_in`` from now (computed locally: no request)."""
    from obstore import sign_async

    return await sign_async(store, "GET", keys, expires_in)


def _profile() -> dict[str, Any]:
    """A named AWS profile's credentials (and region), read through boto3; nothing when no profile is
    named or keys are set in the environment, which then win, as in the AWS tools."""
    name = os.environ.get("AWS_PROFILE")
    if not name or os.environ.get("AWS_ACCESS_KEY_ID"):
        return {}
    try:
        import boto3
        from obstore.auth.boto3 import Boto3CredentialProvider
    except ImportError as exc:
        raise UsageError(
            f"AWS_PROFILE={name} is set, but obstore reads only the AWS_* variables: pip install boto3 to "
            "read profiles, or export AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
        ) from exc
    session = boto3.Session(profile_name=name)
    found: dict[str, Any] = {"credential_provider": Boto3CredentialProvider(session)}
    if session.region_name and not os.environ.get("AWS_REGION"):
        found["region"] = session.region_name
    return found


@dataclass(frozen=True)
class Staged:
    """A local file known to be in the store."""

    key: str  #: relative to the store's prefix: ``<sha256>.<ext>``
    size: int


class S3Inputs:
    """Makes sure local files are in the store (`stage`) and names URLs the API can fetch them at (`urls`).

    Invariant: a path is in ``_known`` only once its object was seen in the store (found or uploaded), and
    at most one task stages a path at a time (``_busy``); the others wait for it, then look again.
    """

    __slots__ = (
        "_busy",
        "_known",
        "_limiter",
        "_location",
        "_public",
        "_retrying",
        "_sign",
        "_store",
        "_ttl",
        "found",
        "uploaded",
        "uploaded_bytes",
    )

    def __init__(
        self,
        store: S3Store,
        *,
        ttl: float,
        public_base_url: str | None = None,
        concurrency: int = 8,
        retry: RetryPolicy = DEFAULT_POLICY,
        sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
        rand: Callable[[], float] = random.random,
        sign: Signer = sign_get,
    ) -> None:
        self._store = store
        self._location = location(store)
        self._ttl = timedelta(seconds=ttl)
        self._public = public_base_url.rstrip("/") if public_base_url else None
        self._limiter = anyio.CapacityLimiter(concurrency)
        self._retrying = Retrying(where=self._location, retry=retry, sleep=sleep, rand=rand)
        self._sign: Signer = sign
        self._known: dict[str, Staged] = {}
        self._busy: dict[str, anyio.Event] = {}
        self.uploaded = 0  #: files this run put in the store
        self.uploaded_bytes = 0
        self.found = 0  #: files this run found there already (an earlier run's, or another item's)

    def __repr__(self) -> str:
        return (
            f"<S3Inputs {self._location} known={len(self._known)} busy={len(self._busy)} "
            f"uploaded={self.uploaded} found={self.found}>"
        )

    @property
    def location(self) -> str:
        """``s3://bucket/prefix``, as logs name the store."""
        return self._location

    async def stage(self, paths: Sequence[str]) -> None:
        """Make sure each file is in the store; InputFailed or StagingRefused when one cannot be."""
        for path in paths:
            await self._staged(path)

    async def urls(self, paths: Sequence[str]) -> list[str]:
        """A URL for each staged file, fit to send now: presigned for ``ttl`` from now, or public."""
        keys = [(await self._staged(path)).key for path in paths]
        if self._public is not None:
            prefix = self._store.prefix
            return [f"{self._public}/{quote(f'{prefix}/{key}' if prefix else key)}" for key in keys]
        signed = await self._retrying(lambda: self._sign(self._store, keys, self._ttl), "sign URLs")
        return list(signed)

    async def _staged(self, path: str) -> Staged:
        while True:
            known = self._known.get(path)
            if known is not None:
                return known
            busy = self._busy.get(path)
            if busy is None:
                break
            await busy.wait()  # another item stages it: look again once it is done (or failed)
        self._busy[path] = done = anyio.Event()
        try:
            async with self._limiter:
                staged = self._known[path] = await self._stage_one(Path(path))
            return staged
        finally:
            del self._busy[path]
            done.set()

    async def _stage_one(self, path: Path) -> Staged:
        data, ext = await anyio.to_thread.run_sync(_read_image, path)
        staged = Staged(f"{hashlib.sha256(data).hexdigest()}.{ext}", len(data))
        if await self._exists(staged.key):
            self.found += 1
            log.debug("input %s is already in %s as %s", path, self._location, staged.key)
            return staged
        await self._put(staged.key, data, CONTENT_TYPES[ext])
        self.uploaded += 1
        self.uploaded_bytes += len(data)
        log.debug("input %s uploaded to %s as %s (%d bytes)", path, self._location, staged.key, len(data))
        return staged

    async def _exists(self, key: str) -> bool:
        import obstore

        async def head() -> bool:
            try:
                await obstore.head_async(self._store, key)
            except FileNotFoundError:
                return False
            return True

        return await self._retrying(head, f"look up {key}")

    async def _put(self, key: str, data: bytes, content_type: str) -> None:
        import obstore
        from obstore.exceptions import AlreadyExistsError, NotSupportedError, PreconditionError

        attributes = {"Content-Type": content_type}

        async def put() -> None:
            try:
                await obstore.put_async(
                    self._store, key, data, mode="create", attributes=attributes, use_multipart=False
                )
            except (AlreadyExistsError, PreconditionError):
                pass  # another run put the same bytes under this key meanwhile
            except NotSupportedError:  # a store without conditional writes: the same bytes, overwritten
                await obstore.put_async(self._store, key, data, attributes=attributes, use_multipart=False)
            except FileNotFoundError as exc:
                raise no_bucket(self._location, exc) from exc

        await self._retrying(put, f"upload {key}")

def _read_image(path: Path) -> tuple[bytes, str]:
    """The file's bytes and extension (from its bytes); InputFailed when it is no longer a usable input."""
    try:
        with path.open("rb") as stream:
            data = stream.read(MAX_INPUT_BYTES + 1)
    except OSError as exc:
        raise InputFailed(f"{path} cannot be read: {exc.strerror or exc}") from exc
    if len(data) > MAX_INPUT_BYTES:
        raise InputFailed(f"{path} grew past {MAX_INPUT_BYTES:,} bytes since it was validated")
    ext = sniff_extension(data[:16])
    if ext is None or ext not in CONTENT_TYPES:
        raise InputFailed(f"{path} is no longer a PNG, JPEG, WebP or GIF image")
    return data, ext


def first_line(exc: BaseException) -> str:
    """An obstore message's first line: the rest is a Rust debug dump of the same."""
    text = str(exc).strip().splitlines()
    return text[0][:500] if text else type(exc).__name__
