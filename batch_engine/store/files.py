"""Where things live in an out dir, and file names that are safe whatever an item's id says."""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from pathlib import Path, PurePosixPath

JOURNAL_NAME = "journal.sqlite"
IMAGES_DIR = "images"
INPUTS_DIR = "inputs"
RESULTS_NAME = "results.jsonl"
TEMP_PREFIX = ".tmp-"  #: write_atomic's temporary files; a run deletes leftovers of a killed one

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_MAX_STEM = 80


def safe_stem(item_id: str) -> str:
    """A file-name stem for an id: ``sku-1`` stays ``sku-1``; ``../a b`` becomes ``a_b-<hash>``.

    Any id that had to change gets a short hash of the original, so two ids that clean up to the
    same text (``a/b`` and ``a_b``) never share a file.
    """
    cleaned = _UNSAFE.sub("_", item_id).strip("._-")[:_MAX_STEM] or "item"
    if cleaned == item_id:
        return cleaned
    return f"{cleaned}-{hashlib.sha256(item_id.encode()).hexdigest()[:8]}"


def output_relpath(item_id: str, index: int, ext: str) -> str:
    """``images/<safe id>-<k>.<ext>`` with k counting from 1, relative to the out dir."""
    return f"{IMAGES_DIR}/{safe_stem(item_id)}-{index + 1}.{ext}"


def write_atomic(out_dir: Path, relpath: str, data: bytes, *, durable: bool = True) -> Path:
    """Write ``data`` under ``out_dir`` by temp file and rename: a reader never sees half a file.

    ``durable``: fsync the file before the rename and its folder after it, so the file survives a power
    loss once this returns. The sink passes False and has the journal writer fsync a whole group of
    outputs (`fsync_path`) just before the commit that records them, which costs far less per file.
    ``relpath`` must be relative and free of ``..`` (checked on the string: resolving both paths per
    file cost more than the write itself in the benchmark).
    """
    parts = PurePosixPath(relpath).parts
    if not parts or relpath.startswith(("/", "\\")) or ".." in parts or "\\" in relpath:
        raise ValueError(f"refusing to write outside the out dir: {relpath}")
    target = out_dir / relpath
    try:
        fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=target.parent)
    except FileNotFoundError:  # the first file of its folder (a mkdir per file cost 50 µs for nothing)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            if durable:
                fh.flush()
                os.fdatasync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if durable:
        fsync_path(target.parent, folder=True)  # the rename itself must survive a power loss
    return target


def fsync_path(path: Path, *, folder: bool = False) -> None:
    """Flush a file's data, or a ``folder``'s entries, to disk. OSError if it cannot be done."""
    fd = os.open(path, os.O_RDONLY)
    try:
        if folder:
            os.fsync(fd)
        else:
            os.fdatasync(fd)
    finally:
        os.close(fd)
