"""Where things live in an out dir, and file names that are safe whatever an item's id says."""

from __future__ import annotations

import hashlib
import os
import re
import secrets
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any, Literal, overload

JOURNAL_NAME = "journal.sqlite"
IMAGES_DIR = "images"
INPUTS_DIR = "inputs"
RESULTS_NAME = "results.jsonl"
TEMP_PREFIX = ".tmp-"  #: replace_atomically's temporary files; a run deletes leftovers of a killed one

#: The temporary report files older versions wrote (``.report.yaml.<8 hex>.tmp``): removed like the rest.
_LEGACY_TEMP = re.compile(r"\.[a-z]+\.(yaml|jsonl|html)\.[0-9a-f]{8}\.tmp")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_KEPT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_MAX_STEM = 80


def safe_stem(item_id: str) -> str:
    """A file-name stem for an id: ``sku-1`` stays ``sku-1``; ``../a b`` becomes ``a_b~<hash>``.

    An id made of letters, digits, ``.``, ``_`` and ``-`` (not starting with a dot) is kept as it is.
    Any other id is cleaned and gets ``~`` and a hash of the original: ``~`` never occurs in a kept id, so
    a kept id and a cleaned one never share a stem (``a b`` and ``a_b-c8687a08`` once did), and two ids
    that clean up alike (``a/b`` and ``a b``) differ by their hashes. Ids that differ only in case keep
    both spellings, which a case-insensitive file system (macOS, Windows) would merge: `stem_key` is what
    the validator and the journal keep unique.
    """
    if _KEPT.fullmatch(item_id) and len(item_id) <= _MAX_STEM:
        return item_id
    cleaned = _UNSAFE.sub("_", item_id).strip("._-")[:_MAX_STEM] or "item"
    return f"{cleaned}~{hashlib.sha256(item_id.encode()).hexdigest()[:10]}"


def stem_key(item_id: str) -> str:
    """What two ids must not share: their stems as a case-insensitive file system compares them."""
    return safe_stem(item_id).casefold()


def output_relpath(item_id: str, index: int, ext: str) -> str:
    """``images/<safe id>-<k>.<ext>``, k counting from 1, relative to the out dir: the default template."""
    return DEFAULT_OUTPUTS.path(item_id, {}, index, ext)


DEFAULT_OUTPUT = "images/{id}-{k}.{ext}"
_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")
_META = "meta."


@dataclass(frozen=True)
class OutputTemplate:
    """Where an item's outputs go, e.g. ``{meta.category}/{id}-{k}.{ext}``, relative to the out dir.

    ``{id}`` is the id's safe stem, ``{k}`` the output's number (from 1), ``{ext}`` the extension its bytes
    say, ``{meta.NAME}`` a metadata value with anything but letters, digits, ``.``, ``_`` and ``-`` made
    ``_`` (so a value never adds a folder, nor climbs out of the out dir).
    """

    text: str = DEFAULT_OUTPUT

    def problems(self) -> list[str]:
        """What is wrong with the template itself (an empty list when it can be used)."""
        names = _PLACEHOLDER.findall(self.text)
        found = [f"unknown placeholder {{{name}}}" for name in names if not _known(name)]
        found += [f"{{{name}}} is missing" for name in ("id", "k", "ext") if name not in names]
        if not self.text.endswith(".{ext}"):
            found.append("it must end with .{ext} (the extension of each output's bytes)")
        parts = PurePosixPath(self.text).parts
        if self.text.startswith(("/", "\\", "~")) or "\\" in self.text or ".." in parts:
            found.append("it must be a relative path inside the out dir (no leading /, ~, \\ or ..)")
        if "{id}" in self.text and not _stands_alone(self.text, "{id}"):
            found.append(
                "{id} must stand between separators (/, -, _ or .), so two ids never meet in one name"
            )
        return found

    @property
    def meta_keys(self) -> tuple[str, ...]:
        return tuple(name[len(_META) :] for name in _PLACEHOLDER.findall(self.text) if name.startswith(_META))

    def path(self, item_id: str, meta: Mapping[str, Any], index: int, ext: str) -> str:
        """The relative path of output number ``index`` (0-based) of an item."""
        values = {"id": safe_stem(item_id), "k": str(index + 1), "ext": ext}
        return _PLACEHOLDER.sub(lambda m: values.get(m[1]) or _meta_value(meta, m[1]), self.text)


DEFAULT_OUTPUTS = OutputTemplate()


def _known(name: str) -> bool:
    return name in ("id", "k", "ext") or (name.startswith(_META) and len(name) > len(_META))


def _stands_alone(text: str, placeholder: str) -> bool:
    start = text.index(placeholder)
    before, after = text[start - 1 : start], text[start + len(placeholder) : start + len(placeholder) + 1]
    return before in ("", "/", "-", "_", ".") and after in ("/", "-", "_", ".")


def _meta_value(meta: Mapping[str, Any], name: str) -> str:
    value = meta.get(name[len(_META) :]) if name.startswith(_META) else None
    text = "" if value is None or isinstance(value, Mapping | list) else str(value)
    return _UNSAFE.sub("_", text).strip(".")[:_MAX_STEM] or "_"


def write_atomic(out_dir: Path, relpath: str, data: bytes, *, durable: bool = True) -> Path:
    """Write ``data`` to ``out_dir/relpath`` with `replace_atomically`; the folder is made when missing.

    ``durable=False`` leaves the fsync to the caller: the sink has the journal writer fsync a whole group
    of outputs (`fsync_path`) just before the commit that records them, which costs far less per file.
    ``relpath`` must be relative and free of ``..`` (checked on the string: resolving both paths per
    file cost more than the write itself in the benchmark).
    """
    parts = PurePosixPath(relpath).parts
    if not parts or relpath.startswith(("/", "\\")) or ".." in parts or "\\" in relpath:
        raise ValueError(f"refusing to write outside the out dir: {relpath}")
    target = out_dir / relpath
    try:
        created = _create_temp(target)
    except FileNotFoundError:  # the first file of its folder (a mkdir per file cost 50 µs for nothing)
        target.parent.mkdir(parents=True, exist_ok=True)
        created = _create_temp(target)
    with _replace(target, created, binary=True, durable=durable) as stream:
        stream.write(data)
    return target


@overload
def replace_atomically(
    path: Path, *, binary: Literal[False] = False, durable: bool = True
) -> AbstractContextManager[IO[str]]: ...
@overload
def replace_atomically(
    path: Path, *, binary: Literal[True], durable: bool = True
) -> AbstractContextManager[IO[bytes]]: ...
def replace_atomically(
    path: Path, *, binary: bool = False, durable: bool = True
) -> AbstractContextManager[Any]:
    """Write a new ``path``: a temporary file beside it, moved over it only once complete.

    A reader (or a crash) sees the old file or the new one, never half of one; an error (or a kill) leaves
    the old file and at most a ``TEMP_PREFIX`` file, which the next run deletes. The file is created with
    mode 0666 less the umask, as any file the user writes (people serve these folders), and never through
    a symlink; the rename replaces a symlink at ``path`` itself, never its target. ``durable``: fsync the
    file before the rename and its folder after it, so it survives a power loss once the block ends.
    Text streams are UTF-8 with ``\\n`` line ends.
    """
    return _replace(path, _create_temp(path), binary=binary, durable=durable)


@contextmanager
def _replace(path: Path, created: tuple[int, Path], *, binary: bool, durable: bool) -> Iterator[IO[Any]]:
    fd, temp = created
    try:
        with open(fd, "wb") if binary else open(fd, "w", encoding="utf-8", newline="\n") as stream:
            yield stream
            if durable:
                stream.flush()
                os.fdatasync(stream.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_path(path.parent, folder=True)  # the rename itself must survive a power loss


def _create_temp(path: Path) -> tuple[int, Path]:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    while True:
        temp = path.with_name(f"{TEMP_PREFIX}{path.name}.{secrets.token_hex(4)}")
        try:
            return os.open(temp, flags, 0o666), temp
        except FileExistsError:  # 32 random bits taken already: draw again
            continue


def remove_temp_files(folder: Path) -> int:
    """Delete the temporary files a killed write left in ``folder`` (not below it); returns how many.

    Only regular files are removed, and only in a real folder: a symlinked folder is not entered.
    """
    if not folder.is_dir() or folder.is_symlink():
        return 0
    removed = 0
    for entry in os.scandir(folder):
        temporary = entry.name.startswith(TEMP_PREFIX) or _LEGACY_TEMP.fullmatch(entry.name)
        if temporary and entry.is_file(follow_symlinks=False):
            Path(entry.path).unlink(missing_ok=True)
            removed += 1
    return removed


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
