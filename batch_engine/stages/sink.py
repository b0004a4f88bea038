"""The sink stage: fetches or decodes each completed prediction's outputs, verifies and saves them."""

from __future__ import annotations

import errno
import functools
import hashlib
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import anyio
from anyio.abc import ObjectReceiveStream

from batch_engine.control import StopReason
from batch_engine.errors import (
    ItemRejected,
    JournalError,
    LeaseLost,
    OutputNotSaved,
    RetryLater,
    SlowDown,
    StagingRefused,
)
from batch_engine.images import check_complete, decode_b64_output, is_png
from batch_engine.stages.context import StageContext
from batch_engine.store.files import DEFAULT_OUTPUTS, OutputTemplate, write_atomic
from batch_engine.store.transitions import TransitionRefused
from batch_engine.timing.backoff import clamp_retry_after
from batch_engine.values import ErrorKind, ItemError, OutputFile, Prediction, Resolved

log = logging.getLogger(__name__)

_DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EIO})
#: PNG outputs up to this size are checked and written on the event loop: a worker-thread hop costs
#: more than the work (a CRC walk in microseconds, a write to the page cache). Larger outputs, base64
#: ones and other formats (which are decoded in full, and a small file may hold a huge picture) go to
#: a worker thread.
INLINE_BYTES = 64 * 1024
#: An output URL longer than this is no real one (and would be kept in four files): the output fails.
MAX_URL_CHARS = 8192
#: Below this many seconds left in an item's deadline, no new download is started.
MIN_DOWNLOAD_SECONDS = 0.05


class OutputFailed(Exception):
    """An output could not be fetched or verified after every retry (internal to this stage)."""


class Keeper(Protocol):
    """Where outputs must be before their success is recorded, when the out dir is an object store
    (`staging.out_store.OutStore`): the local files are then only a work copy."""

    async def put_outputs(self, out_dir: Path, outputs: Sequence[OutputFile]) -> None:
        """Upload them; OutputNotSaved after the retries, StagingRefused when the store refuses."""


@dataclass(frozen=True, kw_only=True)
class SinkPlan:
    """What the sink needs to know of the job: how long an item's downloads may take, how many to keep."""

    #: seconds for all of one item's downloads, retries included: the run's ``timeout``, or the client's
    #: download timeout when that is longer (one whole download always fits)
    timeout: float
    wanted: Callable[[str], int]  #: item id → outputs it asked for (``n``): more are ignored
    outputs: OutputTemplate = DEFAULT_OUTPUTS  #: where an item's output files go
    meta: Callable[[str], Mapping[str, Any]] = lambda item_id: {}  #: item id → its metadata, for the template
    keep: Keeper | None = None  #: the object store outputs go to; None: the out dir is where they stay


class Sink:
    """One of a pool of download workers reading the resolved-predictions stream."""

    def __init__(self, ctx: StageContext, *, out_dir: Path, plan: SinkPlan) -> None:
        self._ctx = ctx
        self._out_dir = out_dir
        self._plan = plan

    async def run(self, resolved: ObjectReceiveStream[Resolved]) -> None:
        async with resolved:
            async for item in resolved:
                try:
                    await self._deliver(item)
                except (JournalError, OSError):
                    # The item stays "submitted" in the journal: a later run polls and saves it again.
                    log.exception("could not save the outputs of item %s", item.item_id)
                    self._ctx.control.stop_now(StopReason.DISK)
                except (OutputNotSaved, StagingRefused) as exc:
                    self._not_kept(item.item_id, exc)
                except LeaseLost as exc:  # taken for dead: another worker saves it (the same prediction)
                    log.warning("%s", exc)
                except TransitionRefused as exc:
                    log.error("%s", exc)
                    self._ctx.control.stop_now(StopReason.INTERNAL)

    def _not_kept(self, item_id: str, exc: OutputNotSaved | StagingRefused) -> None:
        """The object store did not take an output: the item stays submitted (its prediction is paid; the
        next run saves it). A refusal stops the run at once (nothing more can be kept); a store that
        kept failing stops submitting, and what is in flight is still tried."""
        log.error("%s; item %s stays submitted: the next run saves it without paying again", exc, item_id)
        if isinstance(exc, StagingRefused):
            self._ctx.control.stop_now(StopReason.OUT_STORE)
        else:
            self._ctx.control.stop_submitting(StopReason.OUT_STORE)

    async def _deliver(self, item: Resolved) -> None:
        prediction = item.prediction
        prediction_id = prediction.id or None  #: none for a synchronous route's answer
        if not prediction.outputs:
            error = ItemError(ErrorKind.INFERENCE_FAILED, "the prediction completed without any output")
            await self._ctx.ledger.fail(item.item_id, error, prediction_id=prediction_id)
            return
        deadline = self._ctx.clock() + self._plan.timeout
        name = self._names(item.item_id)
        try:
            outputs = [
                await self._save(prediction, k, deadline, name)
                for k in range(self._kept(item.item_id, prediction))
            ]
        except OutputFailed as exc:
            error = ItemError(ErrorKind.DOWNLOAD, str(exc))
            await self._ctx.ledger.fail(item.item_id, error, prediction_id=prediction_id)
            return
        # The files are written but not yet fsynced: the journal's writer fsyncs them, in a group with
        # other items' outputs, before the commit that records this success. In an object store, the
        # success is recorded only once the objects are there, which makes them durable: nothing to fsync.
        files = [self._out_dir / output.path for output in outputs]
        if self._plan.keep is not None:
            await self._plan.keep.put_outputs(self._out_dir, outputs)
            files = []
        await self._ctx.ledger.succeed(
            item.item_id, outputs, prediction.inference_ms, durable=files, answered=item.answered
        )

    def _names(self, item_id: str) -> Callable[[int, str], str]:
        """Output number k (0-based) with extension ext → its path in the out dir, for this item."""
        outputs = self._plan.outputs
        meta = self._plan.meta(item_id) if outputs.meta_keys else {}
        return functools.partial(outputs.path, item_id, meta)

    def _kept(self, item_id: str, prediction: Prediction) -> int:
        """How many outputs to save: all that came, up to the ``n`` the item asked for."""
        count = len(prediction.outputs)
        if count == 1:  # the common case needs no look-up
            return 1
        wanted = self._plan.wanted(item_id)
        if count > wanted:
            log.warning(
                "item %s asked for %d output(s) and the prediction has %d: the extra ones are ignored",
                item_id,
                wanted,
                count,
            )
        return min(count, wanted)

    async def _save(
        self, prediction: Prediction, k: int, deadline: float, name: Callable[[int, str], str]
    ) -> OutputFile:
        """Fetch (or decode) one output, verify it and write it; a bad download is fetched again, within
        the attempts of the retry policy and the item's deadline."""
        source = prediction.outputs[k]
        is_url = source.startswith(("http://", "https://"))
        if is_url and len(source) > MAX_URL_CHARS:
            raise OutputFailed(f"output {k + 1}'s URL is {len(source):,} characters long: no real URL is")
        attempt = 0
        while True:
            attempt += 1
            try:
                data = await self._fetch(source, is_url, deadline)
                if isinstance(data, bytes) and len(data) <= INLINE_BYTES and is_png(data):
                    relpath, digest = _store(self._out_dir, name, k, data)
                else:
                    relpath, digest = await anyio.to_thread.run_sync(_store, self._out_dir, name, k, data)
                break
            except ItemRejected as exc:
                raise OutputFailed(exc.message) from exc
            except (RetryLater, SlowDown, ValueError) as exc:
                if not is_url:
                    raise OutputFailed(f"a b64_json output is not a valid image: {exc}") from exc
                await self._before_retry(attempt, exc, deadline, source)
        nsfw = prediction.nsfw[k] if k < len(prediction.nsfw) else None
        return OutputFile(path=relpath, sha256=digest, url=source if is_url else None, nsfw=nsfw)

    async def _fetch(self, source: str, is_url: bool, deadline: float) -> bytes | str:
        if not is_url:
            return source
        left = deadline - self._ctx.clock()
        if left < MIN_DOWNLOAD_SECONDS:
            raise OutputFailed(f"no complete download within the {self._plan.timeout:g} s timeout")
        return await self._ctx.client.download(source, time_left=left)

    async def _before_retry(self, attempt: int, exc: Exception, deadline: float, source: str) -> None:
        """Wait before fetching again; OutputFailed when the attempts or the item's time are used up."""
        if attempt >= self._ctx.retry.attempts:
            raise OutputFailed(f"gave up after {attempt} attempts: {exc}") from exc
        left = deadline - self._ctx.clock()
        delay = self._delay(attempt, exc)
        if delay >= left:
            spent = f"out of the {self._plan.timeout:g} s timeout"
            raise OutputFailed(f"gave up after {attempt} attempt(s), {spent}: {exc}") from exc
        log.debug("download of %s failed (%s); retrying in %.2fs", source, exc, delay)
        await self._ctx.sleep(delay)

    def _delay(self, attempt: int, exc: Exception) -> float:
        hint = exc.retry_after if isinstance(exc, SlowDown) else None
        if hint:  # a host's Retry-After is honoured within reason, as the pacers do: never a day's stall
            return clamp_retry_after(hint)
        return self._ctx.backoff(attempt)


def _store(out_dir: Path, name: Callable[[int, str], str], k: int, data: bytes | str) -> tuple[str, str]:
    """Decode, check, write (atomically, not yet fsynced) and hash one output.

    ValueError: not a complete image (the caller fetches it again). OSError: a disk error, which stops
    the run; any other write error fails the item.
    """
    raw = decode_b64_output(data) if isinstance(data, str) else data
    relpath = name(k, check_complete(raw))
    try:
        write_atomic(out_dir, relpath, raw, durable=False)
    except OSError as exc:
        if exc.errno in _DISK_ERRNOS:
            raise
        raise OutputFailed(f"cannot write {relpath}: {exc}") from exc
    return relpath, hashlib.sha256(raw).hexdigest()
