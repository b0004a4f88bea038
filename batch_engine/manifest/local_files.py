"""Input images given as local files: where a path points, whether it is a usable image, what it holds.

A path in ``images:`` is relative to the manifest's folder (or the items file's, for ``items_from``), with
``~`` expanded. The API takes only URLs, so a run sends a local file by the route ``settings.inputs`` names
(staged to the user's object store, or the OpenAI-format endpoint). An item's fingerprint holds the file's
content hash, not its path: an edited photo is edited again, a moved folder is not paid again.
"""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from batch_engine.images import sniff_extension

#: Input files larger than this are refused (the API's own limits are undocumented; 50 MB is generous for a
#: photo and keeps a typo pointing at a video from being read whole).
MAX_INPUT_BYTES = 50 * 1024 * 1024
_SCHEMES = ("http://", "https://", "data:")
_CHUNK = 1024 * 1024
#: What a local file is named by in an item's fingerprint: its content, as ``file:sha256:<hex>``.
CONTENT_PREFIX = "file:sha256:"


def is_local(image: str) -> bool:
    """True for a file path, False for an ``http(s)://`` URL or a ``data:`` URI."""
    return not image[:8].lower().startswith(_SCHEMES)


def resolve(image: str, base: Path) -> Path:
    """The absolute path ``image`` names: ``~`` expanded, relative to ``base``; ``..`` kept as written."""
    path = Path(image).expanduser()
    return Path(os.path.normpath(path if path.is_absolute() else base / path))


def problem(path: Path) -> str | None:
    """Why ``path`` cannot be sent as an input image, or None: a readable PNG, JPEG, WebP or GIF."""
    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):
            return f"{path} is not a regular file"
        if info.st_size > MAX_INPUT_BYTES:
            return f"{path} is {info.st_size:,} bytes; input files over {MAX_INPUT_BYTES:,} are refused"
        with path.open("rb") as stream:
            head = stream.read(16)
    except FileNotFoundError:
        return f"{path} does not exist"
    except OSError as exc:
        return f"{path} cannot be read: {exc.strerror or exc}"
    if sniff_extension(head) is None:
        return f"{path} is not a PNG, JPEG, WebP or GIF image"
    return None


@dataclass(frozen=True)
class _Seen:
    size: int
    mtime_ns: int
    digest: str


class ContentHashes:
    """The sha256 of local files, each read once per process while it stays the same size and age."""

    __slots__ = ("_seen",)

    def __init__(self) -> None:
        self._seen: dict[Path, _Seen] = {}

    def __repr__(self) -> str:
        return f"<ContentHashes files={len(self._seen)}>"

    def digest(self, path: Path) -> str:
        """The hex sha256 of the file's bytes; OSError if it cannot be read."""
        info = path.stat()
        seen = self._seen.get(path)
        if seen is not None and (seen.size, seen.mtime_ns) == (info.st_size, info.st_mtime_ns):
            return seen.digest
        digest = file_sha256(path)
        self._seen[path] = _Seen(info.st_size, info.st_mtime_ns, digest)
        return digest


def file_sha256(path: Path) -> str:
    hasher = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(_CHUNK):
            hasher.update(chunk)
    return hasher.hexdigest()
