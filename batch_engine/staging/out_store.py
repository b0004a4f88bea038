"""The out dir in an object store (``--out s3://bucket/prefix/``): every file a run would leave in a local out
dir is PUT under the prefix, at the same relative path.

The run works in a local work dir: the files are written there as they would be in an out dir (and the
journal too, when it is SQLite), then PUT. An output counts as saved only once its object is in the store:
the sink calls `put_outputs` before the journal records the success, so no output is ever recorded that is
not there. S3 writes an object whole or not at all, so nothing needs an fsync; the local copy is deleted
once the gallery has made its thumbnail (`report.gallery_files`).

Each output object carries its sha256 as user metadata (``x-amz-meta-sha256``): `intact` checks an
archived success with one HEAD per file, and hashes the bytes only on a store that drops the metadata.

The opener, the retries and the error mapping are staging's (`s3.open_store`, `s3.Retrying`): refused
credentials, permission or a missing bucket raise StagingRefused (the run stops, resumable); a PUT that
fails after the run's retries raises OutputNotSaved (its item stays submitted: the next run polls and saves
it, never paying again). obstore's messages name the request's URL, which holds no secret (SigV4 signs a
header, not the URL); nothing here logs credentials.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping, Sequence
from functools import partial
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, TypeVar

import anyio
import anyio.to_thread

from batch_engine.errors import BatchEngineError, OutputNotSaved, StagingRefused, UsageError
from batch_engine.report.gallery_files import THUMBS_DIR
from batch_engine.report.write import REPORT_FILES
from batch_engine.staging import s3
from batch_engine.store.files import IMAGES_DIR, write_atomic
from batch_engine.timing.backoff import DEFAULT_POLICY, RetryPolicy
from batch_engine.values import OutputFile

if TYPE_CHECKING:
    from obstore.store import S3Store

log = logging.getLogger(__name__)
_T = TypeVar("_T")

SCHEME = "s3://"
SHA256_KEY = "sha256"  #: the user metadata an output object carries (``x-amz-meta-sha256``)
#: The empty object a run PUTs first: a store that refuses it stops the run before anything is sent.
PROBE_NAME = ".batch-engine"
#: What `forget` deletes (``--fresh``), as a local out dir forgets its outputs: these folders, the reports.
FORGOTTEN_DIRS = (IMAGES_DIR, THUMBS_DIR)
CONTENT_TYPES = {
    **s3.CONTENT_TYPES,
    "yaml": "application/yaml",
    "jsonl": "application/x-ndjson",
    "html": "text/html; charset=utf-8",
}


def is_store_url(text: str) -> bool:
    return text.startswith(SCHEME)


def content_type(relpath: str) -> str:
    return CONTENT_TYPES.get(PurePosixPath(relpath).suffix[1:].lower(), "application/octet-stream")


class OutStore:
    """The prefix ``url`` names, as the run's out dir: PUTs, checks, listings and deletes, relative keys.

    The async methods are the run's (retried as `s3.Retrying` says); `intact`, `listing` and `found` are
    synchronous, for worker threads (the journal's writer checking an archived success, the reports).
    """

    __slots__ = ("_retrying", "_store", "location", "put_bytes", "puts", "refused")

    def __init__(
        self,
        url: str,
        *,
        retry: RetryPolicy = DEFAULT_POLICY,
        sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
    ) -> None:
        self._store: S3Store = s3.open_store(url, setting="--out")
        self.location = s3.location(self._store)  #: ``s3://bucket/prefix``, as messages name it
        self._retrying = s3.Retrying(where=self.location, retry=retry, sleep=sleep, gave_up=OutputNotSaved)
        self.puts = 0  #: objects this process PUT
        self.put_bytes = 0
        self.refused: str | None = None  #: why the store refused a request of this run, once it has

    def __repr__(self) -> str:
        return f"<OutStore {self.location} puts={self.puts}>"

    def url_of(self, relpath: str) -> str:
        return f"{self.location}/{relpath}"

    async def _call(self, call: Callable[[], Awaitable[_T]], what: str) -> _T:
        """``call()`` retried (`s3.Retrying`); a refusal is remembered, so what follows it (the reports)
        is not tried in vain."""
        try:
            return await self._retrying(call, what)
        except StagingRefused as exc:
            self.refused = str(exc)
            raise

    async def probe(self, name: str, *, take_over: bool = False) -> None:
        """Claim the prefix for run ``name``: PUT `PROBE_NAME` naming it; StagingRefused when the store will
        not take the outputs, so a run stops before it pays for anything it could not keep. UsageError
        when the prefix holds another manifest's run (its reports would be overwritten), unless
        ``take_over``, as a local out dir refuses it."""
        import obstore

        async def get() -> bytes | None:
            try:
                return bytes(await (await obstore.get_async(self._store, PROBE_NAME)).bytes_async())
            except FileNotFoundError:
                return None

        held = await self._call(get, f"read {PROBE_NAME}")
        owner = _probe_owner(held)
        if owner is not None and owner != name and not take_over:
            raise UsageError(
                f"{self.location} holds the run of manifest {owner!r}, not {name!r}: its reports would be "
                "overwritten; choose another prefix, or add --take-over"
            )

        async def put() -> None:
            try:
                body = json.dumps({"name": name}).encode()
                await obstore.put_async(self._store, PROBE_NAME, body, use_multipart=False)
            except FileNotFoundError as exc:
                raise s3.no_bucket(self.location, exc) from exc

        await self._call(put, f"write {PROBE_NAME}")

    async def put_outputs(self, out_dir: Path, outputs: Sequence[OutputFile]) -> None:
        """PUT an item's outputs from the work dir, each with its sha256; OutputNotSaved, StagingRefused."""
        for output in outputs:
            await self.put_file(out_dir, output.path, sha256=output.sha256)

    async def put_file(self, out_dir: Path, relpath: str, *, sha256: str | None = None) -> None:
        """PUT ``out_dir/relpath`` as ``relpath``, retried; OutputNotSaved, StagingRefused."""
        import obstore

        path = out_dir / relpath
        if not path.is_file():  # obstore would say "not found" as it says of a missing bucket
            raise OutputNotSaved(f"{relpath} is not in the work dir {out_dir} any more")
        attributes = {"Content-Type": content_type(relpath)}
        if sha256 is not None:
            attributes[SHA256_KEY] = sha256

        async def put() -> None:
            try:
                await obstore.put_async(self._store, relpath, path, attributes=attributes)
            except FileNotFoundError as exc:
                raise s3.no_bucket(self.location, exc) from exc

        await self._call(put, f"upload {relpath}")
        self.puts += 1
        self.put_bytes += path.stat().st_size
        log.debug("%s uploaded to %s", relpath, self.location)

    async def put_files(self, out_dir: Path, relpaths: Iterable[str]) -> list[str]:
        """PUT files the page shows besides the outputs (thumbnails, input copies): views, so one that
        cannot be uploaded is logged and skipped; returns those that were."""
        done: list[str] = []
        for relpath in relpaths:
            if self.refused is not None:
                break  # said once, by whoever met the refusal
            try:
                await self.put_file(out_dir, relpath)
            except StagingRefused as exc:
                log.warning("%s; the page's pictures are not uploaded", exc)
                break
            except BatchEngineError as exc:
                log.warning("%s was not uploaded (the page shows the full picture instead): %s", relpath, exc)
                continue
            done.append(relpath)
        return done

    async def put_reports(self, out_dir: Path, paths: Mapping[str, Path]) -> dict[str, str]:
        """PUT the reports just written in the work dir; a failures.yaml left from an earlier run is
        deleted (nothing failed now). Returns file name → its URL. OutputNotSaved, StagingRefused (at
        once when the store refused this run before)."""
        if self.refused is not None:
            raise StagingRefused(f"{self.location} refused this run's outputs before")
        for name in paths:
            await self.put_file(out_dir, name)
        stale = [name for name in REPORT_FILES if name not in paths]
        if stale:
            await self.delete(stale)
        return {name: self.url_of(name) for name in paths}

    async def delete(self, relpaths: Sequence[str]) -> None:
        """Delete these objects (those not there are no error)."""
        import obstore

        async def delete() -> None:
            await obstore.delete_async(self._store, list(relpaths))

        if relpaths:
            await self._call(delete, f"delete {len(relpaths)} object(s)")

    async def forget(self) -> int:
        """``--fresh``: delete the outputs (``images/``), the thumbnails and the reports, as a local out
        dir forgets them; returns how many objects were deleted. Outputs that ``output:`` puts elsewhere
        stay, as they do in a local out dir (they are overwritten as items are done again)."""
        listed: list[str] = []
        for folder in FORGOTTEN_DIRS:
            listing = partial(anyio.to_thread.run_sync, self._list, folder)
            listed += sorted(await self._call(listing, f"list {folder}/"))
        await self.delete([*listed, *REPORT_FILES])
        return len(listed)

    async def fetch(self, relpath: str, out_dir: Path) -> bool:
        """Copy an object into the work dir, at the same relative path; False when it is not there."""
        import obstore

        async def get() -> bytes | None:
            try:
                got = await obstore.get_async(self._store, relpath)
                return bytes(await got.bytes_async())
            except FileNotFoundError:
                return None

        data = await self._call(get, f"read {relpath}")
        if data is None:
            return False
        await anyio.to_thread.run_sync(write_atomic, out_dir, relpath, data)
        return True

    # -- synchronous: for worker threads ------------------------------------------------------------

    def intact(self, outputs: Sequence[OutputFile]) -> bool:
        """Whether every output is in the store with its sha256 (one HEAD each); any failure to tell is a
        no, so the item's paid prediction is fetched again rather than trusted."""
        return bool(outputs) and all(self._intact(output) for output in outputs)

    def _intact(self, output: OutputFile) -> bool:
        import obstore

        try:
            found = obstore.get(self._store, output.path, options={"head": True})
            said = found.attributes.get(SHA256_KEY)
            if said is None:  # a store that keeps no user metadata: hash the bytes
                data = bytes(obstore.get(self._store, output.path).bytes())
                said = hashlib.sha256(data).hexdigest()
        except Exception as exc:  # obstore's errors, a broken connection: not known to be intact
            log.debug("%s is not known to be intact in %s: %s", output.path, self.location, exc)
            return False
        return said == output.sha256

    def listing(self, folder: str) -> frozenset[str]:
        """The objects under ``folder/``, relative to the prefix (one LIST per 1,000); empty when the
        store cannot be listed (the page then shows full pictures, as a local out dir without them)."""
        try:
            return self._list(folder)
        except Exception as exc:  # obstore's errors, a broken connection
            log.warning("%s/%s/ cannot be listed: %s", self.location, folder, s3.first_line(exc))
            return frozenset()

    def _list(self, folder: str) -> frozenset[str]:
        import obstore

        return frozenset(meta["path"] for chunk in obstore.list(self._store, f"{folder}/") for meta in chunk)

    def found(self, relpaths: Collection[str]) -> set[str]:
        """Which of ``relpaths`` are in the store: a listing per top folder among them, a HEAD for a file
        at the top (a lost journal's outputs are checked this way, thousands at a time)."""
        import obstore

        folders = {PurePosixPath(path).parts[0] for path in relpaths if "/" in path}
        present: set[str] = set()
        for folder in folders:
            present |= self.listing(folder)
        for path in (path for path in relpaths if "/" not in path):
            try:
                obstore.head(self._store, path)
            except Exception:
                continue
            present.add(path)
        return present & set(relpaths)


def _probe_owner(body: bytes | None) -> str | None:
    """The run named by a probe object; None for none, or one written before probes named their run."""
    try:
        found = json.loads(body) if body else None
    except ValueError:
        return None
    name = found.get("name") if isinstance(found, dict) else None
    return name if isinstance(name, str) else None
