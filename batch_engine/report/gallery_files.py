"""The files index.html shows besides the outputs, made in the background while a run goes on.

Two kinds: a local copy of each distinct input image (so the page works offline), taken while its item is
in flight, and a small thumbnail of each output and input that is big (so a page of 100 cards of 1024 to
3840 px pictures costs a few megabytes, not hundreds). Neither may ever delay a submit or the end of a run:

- the submit stage's ledger says when an item's submit is sent (`GalleryFiles.sending`), and only then are
  its inputs queued (so an item refused at its submit, for its content say, shows its input too); each
  distinct input once, at most ``MAX_INPUTS`` a run, so the queue (of URLs) never fills and queueing
  never waits; ``COPIERS`` workers copy them;
- saved outputs are collected, and a worker thread makes their thumbnails in one batch, then pauses
  ``THUMB_PAUSE`` seconds: one thread hop a batch, however many outputs a second a run saves. An output of at
  most ``THUMB_MIN_BYTES`` is shown as it is, decided from its size alone, so small outputs cost a stat;
- when the run's stages end with no stop, the engine lets the copies already queued finish
  (`finish_copies`, at most ``COPIES_GRACE`` seconds): the copiers trail the submits, and a quick run's
  last hundred inputs would otherwise be shown only from their URLs, which a page opened offline (or after
  the links expire) cannot load;
- the engine cancels the whole worker at the first stop, and after that grace: what is not done by then is
  not done (the page shows the input from its URL and the full output instead; ``batch-engine report``
  makes the missing thumbnails).

Thumbnails are WebP files in ``thumbs/``, named by content (an output's sha256) or by the input copy's
name, so a thumbnail never outlives the picture it shows.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path, PurePosixPath
from typing import Any

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from PIL import Image

from batch_engine.api.client import ApiClient
from batch_engine.errors import ApiError
from batch_engine.images import sniff_extension, verify_image
from batch_engine.store.files import INPUTS_DIR, write_atomic
from batch_engine.values import ItemRecord, OutputFile

log = logging.getLogger(__name__)

THUMBS_DIR = "thumbs"
THUMB_EDGE = 384  #: longest edge of a thumbnail, in pixels: a card shows outputs ~220 CSS px wide
THUMB_MIN_BYTES = 16 * 1024  #: a picture of at most this many bytes is its own thumbnail
THUMB_QUALITY = 75
THUMB_PAUSE = 0.5  #: seconds between two batches of thumbnails
THUMB_WAIT = 10.0  #: seconds a cancelled batch's thread is waited for at most (it ends after one picture)
THUMBS_WAITING = 10_000  #: thumbnails waiting for a batch at most; beyond, `batch-engine report` makes them
MAX_INPUTS = 1000  #: distinct inputs copied per run at most; the page links the rest by URL
COPIERS = 4  #: input copies at once
COPIES_GRACE = 30.0  #: seconds a run that ended with no stop waits at most for the input copies queued
WAITING = 1024  #: items remembered between being fed to the submit stage and being sent
_EXTS = ("png", "jpg", "webp", "gif")


@dataclass(frozen=True)
class PageFiles:
    """What the page can show from disk: input copies, thumbnails, and why an input has no copy."""

    inputs: dict[str, str] = field(default_factory=dict)  #: input URL → copy, relative to the out dir
    thumbs: frozenset[str] = frozenset()  #: thumbnail files present, relative to the out dir
    not_copied: dict[str, str] = field(default_factory=dict)  #: input URL → why it has no copy


#: The files in one folder of the out dir (``thumbs``, ``inputs``), as paths relative to it.
Listing = Callable[[str], frozenset[str]]


def page_files(
    out_dir: Path,
    records: Iterable[ItemRecord],
    not_copied: dict[str, str],
    *,
    listing: Listing | None = None,
) -> PageFiles:
    """The gallery's files as they are now (two listings: of ``out_dir``'s folders, or ``listing``'s, an
    object store's), for the inputs of ``records``; ``not_copied`` keeps only inputs that still have no
    copy."""
    listed = listing or partial(folder_listing, out_dir)
    inputs = local_inputs(out_dir, distinct_inputs(records), names=listed(INPUTS_DIR))
    missing = {url: why for url, why in not_copied.items() if url not in inputs}
    return PageFiles(inputs=inputs, thumbs=listed(THUMBS_DIR), not_copied=missing)


def input_urls(request: Mapping[str, Any]) -> list[str]:
    """The input image URLs of a request: ``images`` (a list), or ``image`` for models that take that name."""
    value = request.get("images", request.get("image", []))
    values = [value] if isinstance(value, str) else value
    return [str(url) for url in values if url]


def distinct_inputs(records: Iterable[ItemRecord], limit: int = MAX_INPUTS) -> list[str]:
    """The first ``limit`` distinct http(s) input URLs of ``records``, in order."""
    seen: dict[str, None] = {}
    for record in records:
        for url in input_urls(record.request):
            if url.startswith(("http://", "https://")):
                seen.setdefault(url)
        if len(seen) >= limit:
            break
    return list(seen)[:limit]


def local_inputs(
    out_dir: Path, urls: Iterable[str], *, names: frozenset[str] | None = None
) -> dict[str, str]:
    """Input URL → path of its copy relative to the out dir, for the inputs already copied (``names``: the
    copies there, when not listed from ``out_dir``)."""
    names = folder_listing(out_dir, INPUTS_DIR) if names is None else names
    found: dict[str, str] = {}
    for url in urls:
        stem = input_stem(url)
        copies = (f"{INPUTS_DIR}/{stem}.{ext}" for ext in _EXTS)
        relpath = next((copy for copy in copies if copy in names), None)
        if relpath is not None:
            found[url] = relpath
    return found


def folder_listing(out_dir: Path, folder: str) -> frozenset[str]:
    """The files in ``out_dir/folder``, as paths relative to ``out_dir``."""
    try:
        return frozenset(f"{folder}/{entry.name}" for entry in os.scandir(out_dir / folder))
    except OSError:  # not made yet, or unreadable: nothing there to show
        return frozenset()


def input_stem(url: str) -> str:
    """The name of an input's copy, without extension: a hash of its URL."""
    return hashlib.sha256(url.encode()).hexdigest()[:20]


def output_thumb(output: OutputFile) -> str:
    """Where an output's thumbnail is, relative to the out dir: named by the output's content."""
    return f"{THUMBS_DIR}/{output.sha256[:32]}.webp"


def input_thumb(copy: str) -> str:
    """Where the thumbnail of an input copy (``inputs/<stem>.<ext>``) is, relative to the out dir."""
    return f"{THUMBS_DIR}/{PurePosixPath(copy).stem}.webp"


# ---- thumbnails (synchronous: worker threads) ------------------------------------------------------


def make_thumb(out_dir: Path, source: str, target: str) -> bool:
    """Write ``target``, a thumbnail of the picture at ``source`` (both relative to ``out_dir``), unless
    the picture is small enough to be its own or the thumbnail exists; True when one was written.
    OSError, ValueError: it could not be made."""
    path = out_dir / source
    if path.stat().st_size <= THUMB_MIN_BYTES or (out_dir / target).exists():
        return False
    return _thumbnail(out_dir, path.read_bytes(), target)


def _thumbnail(out_dir: Path, data: bytes, target: str) -> bool:
    try:
        with Image.open(io.BytesIO(data)) as image:
            if max(image.size) <= THUMB_EDGE:
                return False
            image.draft("RGB", (THUMB_EDGE, THUMB_EDGE))  # JPEG: decode at a fraction of the size
            image.thumbnail((THUMB_EDGE, THUMB_EDGE))
            small = image if image.mode in ("RGB", "RGBA") else image.convert("RGBA")
            buffer = io.BytesIO()
            small.save(buffer, "WEBP", quality=THUMB_QUALITY)
    except (OSError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ValueError(f"no thumbnail of {target}: {exc}") from exc
    write_atomic(out_dir, target, buffer.getvalue(), durable=False)  # made again when lost: no fsync
    return True


def make_thumbs(
    out_dir: Path,
    jobs: Iterable[tuple[str, str]],
    stop: threading.Event | None = None,
    made: list[str] | None = None,
) -> int:
    """Make the thumbnail of each ``(source, target)`` not made yet; how many were written (and each
    target appended to ``made``). A picture that cannot be read is skipped (logged), and ``stop`` ends the
    batch between two pictures."""
    count = 0
    for source, target in jobs:
        if stop is not None and stop.is_set():
            break
        try:
            if make_thumb(out_dir, source, target):
                count += 1
                if made is not None:
                    made.append(target)
        except (OSError, ValueError) as exc:
            log.debug("no thumbnail of %s: %s", source, exc)
    return count


def thumb_jobs(records: Iterable[ItemRecord], inputs: Collection[str]) -> Iterable[tuple[str, str]]:
    """``(source, target)`` of every thumbnail the page could use: each output of ``records`` and each
    input copy in ``inputs`` (paths relative to the out dir)."""
    for record in records:
        for output in record.outputs:
            yield output.path, output_thumb(output)
    for copy in inputs:
        yield copy, input_thumb(copy)


# ---- the background worker -------------------------------------------------------------------------


class GalleryFiles:
    """Copies inputs and makes thumbnails while a run goes on; told by the engine and the ledger.

    ``expect`` (the feeder), ``sending`` and ``succeeded`` (the ledger) never wait: they remember or queue.
    Invariant: a URL is in ``_claimed`` once it is queued for a copy and stays there, so each distinct input
    is tried once a run, and the queue never holds more than ``MAX_INPUTS`` URLs: its capacity, so
    ``send_nowait`` never finds it full.

    When the out dir is an object store, the files made are handed to ``publish`` (which uploads them),
    and with ``discard_outputs`` each output's local copy is deleted once its thumbnail is made (or none is
    needed, or it cannot be queued): an output is in ``_discard_due`` or ``_discarding`` until then, and
    `discard_left` deletes what a stop left there.
    """

    def __init__(
        self,
        client: ApiClient,
        out_dir: Path,
        *,
        resolve: Callable[[str], str] = str,
        copy_inputs: bool = True,
        copiers: int = COPIERS,
        pause: float = THUMB_PAUSE,
        publish: Callable[[Sequence[str]], Awaitable[object]] | None = None,
        discard_outputs: bool = False,
    ) -> None:
        self._client = client
        self._out_dir = out_dir
        self._resolve = resolve
        self._copy_inputs = copy_inputs
        self._copiers = copiers
        self._pause = pause
        self._waiting: OrderedDict[str, list[str]] = OrderedDict()  #: item id → its inputs, until sent
        self._claimed: set[str] = set()
        self._send: MemoryObjectSendStream[str] | None = None  #: open while `run` runs
        self._thumbs_due: list[tuple[str, str]] = []  #: thumbnails to make, (source, target), inputs too
        self._thumbs_ready = anyio.Event()
        self._publish = publish  #: hands files made (relative paths) to the object store; None: local
        self._discard = discard_outputs
        self._discard_due: list[str] = []  #: outputs to delete once the batch holding them is done
        self._discarding: list[str] = []  #: ... and those of the batch being made now
        self.not_copied: dict[str, str] = {}  #: input URL → why its copy failed in this run
        self._copied: set[str] = set()  #: input URLs copied in this run
        self._queued = 0  #: input URLs queued for a copy and not done yet (being copied included)
        self._copiers_done = anyio.Event()  #: set when every copier has ended (`finish_copies`)
        self.thumbs = 0  #: thumbnails made in this run

    def __repr__(self) -> str:
        return (
            f"<GalleryFiles copied={len(self._copied)} thumbs={self.thumbs} waiting={len(self._waiting)} "
            f"claimed={len(self._claimed)}>"
        )

    def expect(self, record: ItemRecord) -> None:
        """``record`` is on its way to the submit stage: remember its inputs not copied yet."""
        if not self._copy_inputs or len(self._claimed) >= MAX_INPUTS:
            return
        urls = [url for url in input_urls(record.request) if url not in self._claimed]
        if urls:
            self._waiting[record.item_id] = urls
            if len(self._waiting) > WAITING:  # items that never got sent (a stop)
                self._waiting.popitem(last=False)

    def sending(self, item_id: str) -> None:
        """The item's submit is on its way: queue its inputs for a copy, each distinct one once."""
        urls = self._waiting.pop(item_id, None)
        for url in urls or ():
            if url in self._claimed or not url.startswith(("http://", "https://")):
                continue
            if len(self._claimed) >= MAX_INPUTS or self._send is None:
                return
            self._send.send_nowait(url)
            self._claimed.add(url)
            self._queued += 1

    @property
    def copies_left(self) -> int:
        """Input copies queued and not done yet."""
        return self._queued

    async def finish_copies(self) -> None:
        """Queue no more inputs, and return once the copies queued are done (`run` must be running; the
        thumbnailer goes on). Cancel it to give up on the rest."""
        send, self._send = self._send, None
        if send is None:
            return
        send.close()  # the copiers end once the queue is empty
        await self._copiers_done.wait()

    def not_copied_since(self, before: Mapping[str, str]) -> dict[str, str]:
        """``before`` (the out dir's inputs without a copy) brought up to date with this run's copies."""
        merged = {url: why for url, why in before.items() if url not in self._copied}
        merged.update(self.not_copied)
        return dict(list(merged.items())[-MAX_INPUTS:])

    def succeeded(self, outputs: Sequence[OutputFile]) -> None:
        """Outputs were saved: their thumbnails go into the next batch (the local copies, with
        ``discard_outputs``, are deleted after it, or now when it cannot take them)."""
        for output in outputs:
            if self._thumb_due(output.path, output_thumb(output)):
                if self._discard:
                    self._discard_due.append(output.path)
            elif self._discard:
                unlink_copies(self._out_dir, [output.path])

    def discard_left(self) -> None:
        """Delete the local copies of outputs still waiting for a thumbnail (after a stop, or the end)."""
        if self._discard:
            left, self._discard_due, self._discarding = self._discard_due + self._discarding, [], []
            unlink_copies(self._out_dir, left)

    def _thumb_due(self, source: str, target: str) -> bool:
        if self._send is not None and len(self._thumbs_due) < THUMBS_WAITING:
            self._thumbs_due.append((source, target))
            self._thumbs_ready.set()
            return True
        return False

    async def run(self) -> None:
        """Copy and make thumbnails until cancelled (the engine cancels at a stop and at the end)."""
        send, receive = anyio.create_memory_object_stream[str](MAX_INPUTS)
        self._send = send
        try:
            with send, receive:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._copy_all, receive)
                    tg.start_soon(self._thumbnailer)
        finally:
            self._send = None

    async def _copy_all(self, receive: MemoryObjectReceiveStream[str]) -> None:
        """The copiers, until the queue is closed (`finish_copies`) and empty, or cancelled."""
        async with anyio.create_task_group() as tg:
            for _ in range(self._copiers if self._copy_inputs else 0):
                tg.start_soon(self._copier, receive)
        self._copiers_done.set()

    async def _copier(self, receive: MemoryObjectReceiveStream[str]) -> None:
        async for url in receive:
            try:
                why = await self._copy(url)
            finally:
                self._queued -= 1
            if why is None:
                self._copied.add(url)
            else:
                self.not_copied[url] = why
                log.debug("input %s not copied: %s", url, why)

    async def _copy(self, url: str) -> str | None:
        """Fetch, check and write one input copy (its thumbnail is due then); None, or why it failed."""
        try:
            data = await self._client.download(self._resolve(url))
            copy = await anyio.to_thread.run_sync(_store_input, self._out_dir, url, data)
        except ApiError as exc:
            return exc.message
        except ValueError as exc:
            return str(exc)
        except OSError as exc:
            return f"cannot be written: {exc.strerror or exc}"
        if self._publish is not None:
            await self._publish([copy])
        if len(data) > THUMB_MIN_BYTES:
            self._thumb_due(copy, input_thumb(copy))
        return None

    async def _thumbnailer(self) -> None:
        while True:
            await self._thumbs_ready.wait()
            self._thumbs_ready = anyio.Event()
            batch, self._thumbs_due = self._thumbs_due, []
            self._discarding, self._discard_due = self._discard_due, []
            thumbs = _ThumbBatch(self._out_dir, batch)
            try:
                self.thumbs += await anyio.to_thread.run_sync(thumbs.run, abandon_on_cancel=True)
            finally:
                # Cancelled: the thread ends after the picture it is on, and is waited for, so that no
                # thumbnail is written after the engine lists the folder.
                if thumbs.stop():
                    with anyio.CancelScope(shield=True):
                        await anyio.to_thread.run_sync(thumbs.ended.wait, THUMB_WAIT)
            made = thumbs.made
            done, self._discarding = self._discarding, []
            await anyio.to_thread.run_sync(unlink_copies, self._out_dir, done)
            if self._publish is not None and made:
                await self._publish(made)
                if self._discard:  # in the object store now, where the page finds them
                    await anyio.to_thread.run_sync(unlink_copies, self._out_dir, made)
            await anyio.sleep(self._pause)


class _ThumbBatch:
    """One batch of thumbnails for a worker thread (`run`), which the event loop can stop and wait for."""

    def __init__(self, out_dir: Path, jobs: list[tuple[str, str]]) -> None:
        self._out_dir, self._jobs = out_dir, jobs
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._started = False
        self.ended = threading.Event()  #: set once `run` has returned, when it began at all
        self.made: list[str] = []  #: the thumbnails written

    def run(self) -> int:
        """Make the thumbnails (in a worker thread); how many were written."""
        with self._lock:
            if self._stop.is_set():  # stopped before its thread took it (anyio may also skip it then)
                return 0
            self._started = True
        try:
            return make_thumbs(self._out_dir, self._jobs, self._stop, self.made)
        finally:
            self.ended.set()

    def stop(self) -> bool:
        """Stop the batch after the picture it is on; True when its thread is still at one (wait for
        `ended`), False when it is over or will never begin."""
        with self._lock:
            self._stop.set()
            return self._started and not self.ended.is_set()


def unlink_copies(out_dir: Path, relpaths: Iterable[str]) -> None:
    """Delete local copies that are kept elsewhere now (an object store's); one already gone is fine."""
    for relpath in relpaths:
        try:
            (out_dir / relpath).unlink(missing_ok=True)
        except OSError as exc:
            log.debug("%s could not be deleted: %s", relpath, exc)


def _store_input(out_dir: Path, url: str, data: bytes) -> str:
    """Check a downloaded input is a whole picture and write its copy; where the copy is."""
    verify_image(data)
    copy = f"{INPUTS_DIR}/{input_stem(url)}.{sniff_extension(data) or 'png'}"
    write_atomic(out_dir, copy, data)
    return copy
