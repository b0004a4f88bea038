"""Where items come from besides inline ``items:``: a CSV file, a JSONL file, or a folder of images.

Each source yields `RawItem` values one at a time, in a fixed order, and can be read again from the start:
nothing here holds a list of all items, so a million-row CSV costs the memory of one row. A raw item is the
item as the source states it (field name → value) plus where it stands, for problem messages:
``catalog.csv:12:3`` (line, column), ``items.jsonl:7``, or the file a folder item is made from.

- **CSV**: a header row; ``id``, ``prompt``, ``images`` (several separated by ``|``) or ``image_1`` …
  ``image_N``, and any request field as a column (numbers and booleans as text). An empty cell is no
  value (defaults apply). Any other column is the item's metadata (``meta``).
- **JSONL**: one JSON object per line, as in OpenAI's Batch input; keys that are not item fields are its
  metadata, as is an explicit ``meta`` object.
- **Folder**: ``{glob: "photos/**/*.jpg", prompt: "Place {stem} on a marble counter", ...}``: one item per
  matching file, in sorted order, the file as its image, its id the path relative to the folder without the
  extension; ``{stem}``, ``{name}`` and ``{relpath}`` in the prompt are the file's.
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

#: Columns and keys that name an item's own fields; the request fields come from the field table.
ID, META, IMAGES = "id", "meta", "images"
_IMAGE_COLUMN = re.compile(r"image_([1-9][0-9]?)")
_CSV_FIELD_LIMIT = 1024 * 1024  #: characters in one CSV cell (a 32,000-character prompt fits easily)
_GLOB_SPECIAL = re.compile(r"[*?\[]")
FOLDER_PLACEHOLDERS = ("stem", "name", "relpath")


@dataclass(frozen=True)
class Where:
    """Where a raw item stands in its source, for problem messages."""

    file: str
    line: int | None = None  #: 1-based line of the item (a CSV row's first line)
    columns: Mapping[str, int] = field(default_factory=dict)  #: CSV: field name → 1-based column

    def column(self, name: str) -> int | None:
        return self.columns.get(name)


@dataclass(frozen=True)
class RawItem:
    """One item as its source states it: field name → value (``meta`` a mapping), and where it is."""

    position: int  #: 0-based, in the source's order
    fields: Mapping[str, Any]
    where: Where
    problems: tuple[tuple[str | None, str], ...] = ()  #: (field or None, message) the reader found itself


class SourceError(Exception):
    """The source as a whole cannot be read (missing file, no header row, not text)."""


# -- CSV ----------------------------------------------------------------------------------------------


def read_csv(path: Path, request_fields: Sequence[str]) -> Iterator[RawItem]:
    """Rows of a CSV file with a header row, as raw items (see the module docstring)."""
    csv.field_size_limit(_CSV_FIELD_LIMIT)
    try:
        stream = path.open(encoding="utf-8-sig", newline="")
    except OSError as exc:
        raise SourceError(f"cannot read {path}: {exc.strerror or exc}") from exc
    with stream:
        reader = csv.reader(stream)
        try:
            header = next(reader)
        except StopIteration:
            raise SourceError(f"{path} is empty: it needs a header row (id, prompt, images, ...)") from None
        except (csv.Error, UnicodeDecodeError) as exc:
            raise SourceError(f"{path} is not readable as UTF-8 CSV: {exc}") from exc
        columns = _csv_columns(path, header)
        yield from _csv_rows(path, reader, columns, set(request_fields))


def _csv_columns(path: Path, header: Sequence[str]) -> dict[str, int]:
    names = [name.strip() for name in header]
    seen: dict[str, int] = {}
    for number, name in enumerate(names, 1):
        if not name:
            raise SourceError(f"{path}:1:{number}: the header has an empty column name")
        if name in seen:
            raise SourceError(f"{path}:1:{number}: column {name!r} appears twice (also column {seen[name]})")
        seen[name] = number
    if IMAGES in seen and any(_IMAGE_COLUMN.fullmatch(name) for name in seen):
        raise SourceError(f"{path}:1: use either an 'images' column or image_1, image_2, ..., not both")
    return seen


def _csv_rows(path: Path, reader: Any, columns: dict[str, int], request: set[str]) -> Iterator[RawItem]:
    position = 0
    while True:
        line = reader.line_num + 1
        try:
            row = next(reader)
        except StopIteration:
            return
        except (csv.Error, UnicodeDecodeError) as exc:
            yield RawItem(position, {}, Where(str(path), line), ((None, f"not a readable CSV row: {exc}"),))
            position += 1
            continue
        if not any(cell.strip() for cell in row):
            continue  # a blank line is not an item
        yield _csv_item(path, row, line, position, columns, request)
        position += 1


def _csv_item(
    path: Path, row: Sequence[str], line: int, position: int, columns: dict[str, int], request: set[str]
) -> RawItem:
    problems: list[tuple[str | None, str]] = []
    if len(row) > len(columns):
        problems.append((None, f"the row has {len(row)} cells; the header names {len(columns)} columns"))
    fields: dict[str, Any] = {}
    meta: dict[str, Any] = {}
    images: list[tuple[int, str]] = []
    where_of = dict(columns)
    for name, number in columns.items():
        cell = row[number - 1].strip() if number <= len(row) else ""
        if not cell:
            continue
        numbered = _IMAGE_COLUMN.fullmatch(name)
        if numbered:
            images.append((int(numbered[1]), cell))
        elif name == IMAGES:
            fields[IMAGES] = [part.strip() for part in cell.split("|") if part.strip()]
        elif name == ID or name in request:
            fields[name] = _cell_value(cell)
        elif name == META:
            problems.append((META, "metadata comes from the other columns; a column may not be named 'meta'"))
        else:
            meta[name] = cell
    if images:
        fields[IMAGES] = [cell for _, cell in sorted(images)]
        where_of[IMAGES] = min(columns[f"image_{k}"] for k, _ in images)
    if meta:
        fields[META] = meta
    if ID in fields:
        fields[ID] = row[columns[ID] - 1].strip()  # an id is text, even when it looks like a number
    return RawItem(position, fields, Where(str(path), line, where_of), tuple(problems))


def _cell_value(cell: str) -> Any:
    """A cell as the value it spells: whole numbers, true/false; anything else stays text."""
    lowered = cell.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if re.fullmatch(r"-?[0-9]{1,18}", cell):
        return int(cell)
    return cell


# -- JSONL --------------------------------------------------------------------------------------------


def read_jsonl(path: Path, item_fields: Sequence[str]) -> Iterator[RawItem]:
    """One JSON object per line; keys that are not item fields go to ``meta``."""
    try:
        stream = path.open(encoding="utf-8", errors="strict")
    except OSError as exc:
        raise SourceError(f"cannot read {path}: {exc.strerror or exc}") from exc
    known = set(item_fields) | {META}
    position = 0
    with stream:
        for line_number, line in enumerate(_lines(path, stream), 1):
            if not line.strip():
                continue
            yield _jsonl_item(path, line, line_number, position, known)
            position += 1


def _lines(path: Path, stream: Any) -> Iterator[str]:
    try:
        yield from stream
    except UnicodeDecodeError as exc:
        raise SourceError(f"{path} is not UTF-8 text: {exc}") from exc


def _jsonl_item(path: Path, line: str, number: int, position: int, known: set[str]) -> RawItem:
    where = Where(str(path), number)
    try:
        value = json.loads(line)
    except (ValueError, RecursionError) as exc:
        return RawItem(position, {}, where, ((None, f"not a JSON object: {_short(str(exc))}"),))
    if not isinstance(value, dict):
        return RawItem(position, {}, where, ((None, "each line must be one JSON object {...}"),))
    fields = {key: item for key, item in value.items() if key in known}
    extra = {key: item for key, item in value.items() if key not in known}
    if extra:
        meta = fields.get(META)
        fields[META] = {**extra, **meta} if isinstance(meta, dict) else extra
    return RawItem(position, fields, where)


# -- folders ------------------------------------------------------------------------------------------


def read_folder(base: Path, pattern: str, item_fields: Mapping[str, Any]) -> Iterator[RawItem]:
    """One item per file under ``base`` matching ``pattern`` (``**`` spans folders), sorted by path."""
    root, relative = split_glob(base, pattern)
    matches = glob_regex(relative)
    if not root.is_dir():
        raise SourceError(f"{root} is not a folder (from items_from.glob {pattern!r})")
    for position, path in enumerate(_walk(root, "", matches)):
        relpath = path.relative_to(root).as_posix()
        names = {"stem": path.stem, "name": path.name, "relpath": relpath}
        fields = {**item_fields, ID: str(PurePosixPath(relpath).with_suffix("")), IMAGES: [str(path)]}
        if isinstance(fields.get("prompt"), str):
            fields["prompt"] = fill_placeholders(fields["prompt"], names)
        yield RawItem(position, fields, Where(str(path)))


def split_glob(base: Path, pattern: str) -> tuple[Path, str]:
    """The folder a glob walks (its leading parts free of wildcards) and the pattern below it."""
    parts = PurePosixPath(pattern).parts
    fixed = []
    for part in parts[:-1]:
        if _GLOB_SPECIAL.search(part):
            break
        fixed.append(part)
    root = Path(os.path.normpath(base / Path(*fixed).expanduser())) if fixed else base
    return root, "/".join(parts[len(fixed) :])


def glob_regex(pattern: str) -> re.Pattern[str]:
    """A regex for a glob over ``/``-separated relative paths: ``**/`` any folders, ``*`` and ``?`` within
    one name, ``[...]`` a class."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:[^/]+/)*")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        elif pattern[i] == "[" and (end := pattern.find("]", i + 1)) > i:
            body = pattern[i + 1 : end]
            out.append("[" + ("^" + body[1:] if body.startswith("!") else body).replace("\\", "\\\\") + "]")
            i = end + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out))


def _walk(folder: Path, prefix: str, matches: re.Pattern[str]) -> Iterator[Path]:
    """Files under ``folder`` whose relative path ``matches``, depth first in sorted order; hidden files and
    folders (a leading dot) are skipped, links to folders are not followed."""
    try:
        with os.scandir(folder) as listing:
            entries = sorted(listing, key=lambda entry: entry.name)
    except OSError as exc:
        raise SourceError(f"cannot list the folder {folder}: {exc.strerror or exc}") from exc
    for entry in entries:
        if entry.name.startswith("."):
            continue
        relpath = prefix + entry.name
        if entry.is_dir(follow_symlinks=False):
            yield from _walk(Path(entry.path), relpath + "/", matches)
        elif entry.is_file() and matches.fullmatch(relpath):
            yield Path(entry.path)


_PLACEHOLDER = re.compile(r"\{([a-z]+)\}")


def fill_placeholders(text: str, values: Mapping[str, str]) -> str:
    """``{stem}`` and the like replaced by their values; any other ``{...}`` is left as written."""
    return _PLACEHOLDER.sub(lambda m: values.get(m[1], m[0]), text)


def unknown_placeholders(text: str, known: Sequence[str]) -> list[str]:
    return [name for name in _PLACEHOLDER.findall(text) if name not in known]


def _short(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


Reader = Callable[[], Iterator[RawItem]]
