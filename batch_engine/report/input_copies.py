"""Local copies of the input images, so ``index.html`` shows them offline and after the inputs move."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterable
from pathlib import Path

import anyio

from batch_engine.api.client import ApiClient
from batch_engine.errors import ApiError
from batch_engine.images import sniff_extension, verify_image
from batch_engine.report.html import input_urls
from batch_engine.store.files import INPUTS_DIR, write_atomic
from batch_engine.values import ItemRecord

log = logging.getLogger(__name__)

#: At most this many distinct inputs are copied per run; the report links the rest by URL.
MAX_INPUTS = 1000
#: Copying inputs must never hold up the end of a run for long.
TIME_BUDGET = 30.0
_CONCURRENCY = 8
_EXTS = ("png", "jpg", "webp", "gif")


def _stem(url: str) -> str:
    return hashlib.sha256(url.encode()).hexdigest()[:20]


def distinct_inputs(records: Iterable[ItemRecord], limit: int = MAX_INPUTS) -> list[str]:
    seen: dict[str, None] = {}
    for record in records:
        for url in input_urls(record.request):
            if url.startswith(("http://", "https://")):
                seen.setdefault(url)
        if len(seen) >= limit:
            break
    return list(seen)[:limit]


def local_inputs(out_dir: Path, urls: Iterable[str]) -> dict[str, str]:
    """Input URL → path relative to the out dir, for the inputs already copied."""
    found: dict[str, str] = {}
    for url in urls:
        for ext in _EXTS:
            relpath = f"{INPUTS_DIR}/{_stem(url)}.{ext}"
            if (out_dir / relpath).exists():
                found[url] = relpath
                break
    return found


async def cache_inputs(
    client: ApiClient, out_dir: Path, urls: list[str], *, resolve: Callable[[str], str] = str
) -> dict[str, str]:
    """Copy the inputs not copied yet (best effort, bounded in time); return what is on disk.

    ``resolve`` maps an input URL to where it is fetched from: under ``--simulate`` the simulator
    stands in for the image hosts, as there is no network.
    """
    have = local_inputs(out_dir, urls)
    missing = [url for url in urls if url not in have]
    limiter = anyio.CapacityLimiter(_CONCURRENCY)

    async def copy(url: str) -> None:
        async with limiter:
            try:
                data = await client.download(resolve(url))
                await anyio.to_thread.run_sync(verify_image, data)
            except (ApiError, ValueError) as exc:
                log.debug("input %s not copied: %s", url, exc)
                return
            relpath = f"{INPUTS_DIR}/{_stem(url)}.{sniff_extension(data) or 'png'}"
            await anyio.to_thread.run_sync(write_atomic, out_dir, relpath, data)

    with anyio.move_on_after(TIME_BUDGET):
        async with anyio.create_task_group() as tg:
            for url in missing:
                tg.start_soon(copy, url)
    return local_inputs(out_dir, urls)
