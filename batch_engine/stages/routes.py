"""How an item's request reaches the API: the prediction route (URLs; local files staged first, sent as
URLs signed for each POST) or the OpenAI-format images route (the files themselves, answered when done).

A route is what the submit stage asks, in this order: `Route.stage` an item's inputs (before it takes an
in-flight slot or a pacing turn, so uploads spend neither), then for each attempt `Route.request`, which
gets everything ready that may fail without sending anything (signing URLs, opening files) and hands back
the one call that sends. So the intent to submit is journaled only once a request is ready to go, and an
input that cannot be read fails its item as ``input`` with nothing sent.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import anyio.to_thread

from batch_engine.api.catalogue import (
    OPENAI_IMAGES_PATH,
    ModelSpec,
    openai_images_fields,
    wire_body,
)
from batch_engine.api.client import ApiClient, FormFile
from batch_engine.errors import InputFailed
from batch_engine.images import sniff_extension
from batch_engine.manifest.local_files import is_local
from batch_engine.staging.s3 import CONTENT_TYPES, S3Inputs
from batch_engine.values import ItemRecord, Prediction

#: Sends one prepared request with the client; what `Route.request` hands back.
Send = Callable[[ApiClient], Awaitable[Prediction]]


class Route(Protocol):
    """One way of sending an item's request."""

    @property
    def synchronous(self) -> bool:
        """True: the answer carries the outputs and has no prediction id (nothing to poll)."""

    async def stage(self, record: ItemRecord) -> None:
        """Make the item's inputs reachable; InputFailed or StagingRefused when they cannot be."""

    def request(self, record: ItemRecord) -> AbstractAsyncContextManager[Send]:
        """One attempt, ready to send; entering it raises InputFailed or StagingRefused, sending nothing."""


def local_images(request: Mapping[str, Any]) -> list[str]:
    """The local file paths among a request's ``images`` (absolute, as the manifest resolved them)."""
    images = request.get("images")
    if not isinstance(images, list):
        return []
    return [image for image in images if isinstance(image, str) and is_local(image)]


@dataclass(frozen=True)
class PredictionsRoute:
    """The prediction API: a JSON body POSTed to ``path``; local files staged by ``inputs`` first."""

    path: str  #: e.g. ``/api/v3/openai/gpt-image-2-plus/image-edit``
    spec: ModelSpec
    inputs: S3Inputs | None = None  #: None: the manifest has no local files (validation made sure)

    @property
    def synchronous(self) -> bool:
        return False

    async def stage(self, record: ItemRecord) -> None:
        local = local_images(record.request)
        if local and self.inputs is None:  # validation refuses this manifest: a journal of another one
            raise InputFailed("the item has local files and settings.inputs names no upload: add one")
        if local and self.inputs is not None:
            await self.inputs.stage(local)

    @contextlib.asynccontextmanager
    async def request(self, record: ItemRecord) -> AsyncIterator[Send]:
        body = wire_body(self.spec, record.request)
        local = local_images(record.request)
        if local and self.inputs is not None:
            urls = iter(await self.inputs.urls(local))  # signed now, for this POST only
            images = record.request["images"]
            body[self.spec.image_field] = [next(urls) if image in local else image for image in images]
        path = self.path

        async def send(client: ApiClient) -> Prediction:
            return await client.submit(path, body)

        yield send


@dataclass(frozen=True)
class ImagesRoute:
    """The OpenAI-format endpoint: a multipart form with the files, answered with the pictures."""

    spec: ModelSpec  #: a model with an ``openai_images_model`` (validation made sure)
    timeout: float  #: seconds one request may stay open: the item's timeout (edits take minutes)

    @property
    def synchronous(self) -> bool:
        return True

    async def stage(self, record: ItemRecord) -> None:
        """Nothing to stage: the files are read as they are sent."""

    @contextlib.asynccontextmanager
    async def request(self, record: ItemRecord) -> AsyncIterator[Send]:
        try:
            fields = openai_images_fields(self.spec, record.request)
        except ValueError as exc:
            raise InputFailed(str(exc)) from exc
        paths = [Path(image) for image in local_images(record.request)]
        with ExitStack() as files:
            parts = await anyio.to_thread.run_sync(_open_parts, paths, files)
            timeout = self.timeout

            async def send(client: ApiClient) -> Prediction:
                return await client.images_edit(OPENAI_IMAGES_PATH, fields, parts, seconds=timeout)

            yield send


def _open_parts(paths: Sequence[Path], files: ExitStack) -> list[FormFile]:
    """Each file opened for streaming, named by its position and its type; InputFailed if one cannot be."""
    parts = []
    for k, path in enumerate(paths):
        try:
            stream = files.enter_context(path.open("rb"))
            ext = sniff_extension(stream.read(16))
            stream.seek(0)
        except OSError as exc:
            raise InputFailed(f"{path} cannot be read: {exc.strerror or exc}") from exc
        if ext is None or ext not in CONTENT_TYPES:
            raise InputFailed(f"{path} is no longer a PNG, JPEG, WebP or GIF image")
        # The part is named by position, not by the file's own name: nothing of the user's folders is sent.
        parts.append(FormFile(f"image-{k + 1}.{ext}", stream, CONTENT_TYPES[ext]))
    return parts
