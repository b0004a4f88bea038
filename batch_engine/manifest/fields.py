"""What each manifest field takes, in tables, and the checks of one value against its field.

The validator checks values against these tables and ``schema.py`` turns them into the JSON Schema, so the two
cannot disagree: ``request_fields`` (an item's, or ``defaults:``), ``setting_fields`` (``settings:``, one per
``RunSettings`` field), ``top_level_fields`` and ``ITEM_ID``.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import inspect
import math
import re
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from batch_engine.api import catalogue
from batch_engine.settings import SETTING_RANGES, SETTING_WORDS, Range, RunSettings, bound_text, shown
from batch_engine.store.files import DEFAULT_OUTPUT

MAX_MANIFEST_BYTES = 256 * 1024 * 1024
#: Values that aliases (``*name``) may add to the document once expanded. Values written out are bounded by
#: the file size alone (a million written items are fine); only expansion can multiply them unseen.
MAX_NODES = 5_000_000
MAX_PROMPT_CHARS = 32_000
MAX_IMAGES = 16
MAX_N = 10

#: ``http(s)://`` and a host, or a ``data:`` URI (accepted with a warning). Schemes are case-insensitive; the
#: character classes spell that out because JSON Schema patterns (ECMA 262) have no inline flags.
IMAGE_URL_PATTERN = r"^([hH][tT][tT][pP][sS]?://[^\s/]|[dD][aA][tT][aA]:)"
#: Five digits an edge: far past any model's largest (3840), short enough to read as numbers.
SIZE_PATTERN = r"^(auto|[0-9]{1,5}x[0-9]{1,5})$"
NOT_BLANK_PATTERN = r"\S"

CONTAINER_KEYS = ("defaults", "settings", "items", "items_from")


class Marker:
    """A sentinel with a readable repr."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


#: ``FieldDef.default`` of a field that has no default.
NO_DEFAULT: Any = Marker("<no default>")
#: What ``dict.get`` returns for a key the document does not have (a key present with value null is None).
ABSENT: Any = Marker("<absent>")


@dataclass(frozen=True)
class FieldDef:
    """One manifest field: what the validator accepts and what the JSON Schema says, from one place."""

    name: str
    type: str  #: JSON Schema type: ``string``, ``integer``, ``number``, ``boolean`` or ``array`` (of strings)
    description: str
    enum: tuple[Any, ...] = ()
    minimum: float | None = None
    exclusive_minimum: float | None = None
    maximum: float | None = None
    min_length: int | None = None  #: characters of a string, or entries of an array
    max_length: int | None = None
    pattern: str | None = None  #: searched in a string, or in each entry of an array; anchor it with ^ and $
    pattern_hint: str = ""  #: what is said when ``pattern`` does not match: how to fix the value
    nullable: bool = False
    words: tuple[str, ...] = ()  #: strings also taken, meaning the same as null (``max_in_flight: auto``)
    default: Any = NO_DEFAULT  #: for the schema's documentation only; the validator never fills it
    example: str = ""  #: a valid value as written in YAML, for messages and the schema


_REQUEST_FIELDS = (
    FieldDef(
        "prompt",
        "string",
        "What the model should draw or change. Required, on the item or in defaults.",
        min_length=1,
        max_length=MAX_PROMPT_CHARS,
        pattern=NOT_BLANK_PATTERN,
        pattern_hint="is blank: write what the model should do",
        example="Girl holding cat",
    ),
    FieldDef(
        "images",
        "array",
        "Input images: public http(s) URLs, or local files (paths relative to the manifest's folder, ~ "
        "expanded; settings.inputs names how they reach the API). Required for image-edit, not allowed for "
        "text-to-image.",
        min_length=1,
        max_length=MAX_IMAGES,
        pattern=NOT_BLANK_PATTERN,
        pattern_hint="is blank: give a URL or a file path",
        example="[https://example.com/cat.png]",
    ),
    FieldDef(
        "n", "integer", "Images to generate per item (API default 1).", minimum=1, maximum=MAX_N, example="1"
    ),
    FieldDef(
        "size",
        "string",
        "Output size: auto or WIDTHxHEIGHT. gpt-image-2 family: edges multiples of 16, longest edge at "
        "most 3840, ratio at most 3:1, 655,360 to 8,294,400 pixels. gpt-image-1: 1024x1024, 1536x1024 or "
        "1024x1536. API default 1024x1024.",
        pattern=SIZE_PATTERN,
        pattern_hint="is not 'auto' or WIDTHxHEIGHT (a lower-case x between two whole numbers of 1-5 digits)",
        example="1024x1024",
    ),
    FieldDef(
        "quality",
        "string",
        "Rendering quality (API default auto). Ignored by the -plus models.",
        enum=("auto", "low", "medium", "high"),
        example="medium",
    ),
    FieldDef(
        "background",
        "string",
        "Background of the output (API default auto); transparent is doubtful on gpt-image-2.",
        enum=("auto", "opaque", "transparent"),
        example="auto",
    ),
    FieldDef(
        "response_format",
        "string",
        "How outputs come back: url, or b64_json (base64 in the answer). Default: the model's.",
        enum=("url", "b64_json"),
        example="url",
    ),
    FieldDef(
        "enable_sync_mode",
        "boolean",
        "Ask the server to answer when done; the engine polls the prediction either way.",
        example="false",
    ),
)

ITEM_META = FieldDef(
    "meta",
    "object",
    "The item's metadata (title, category, supplier...): not sent, carried unchanged into results.jsonl, "
    "report.yaml, failures.yaml and the page's search; usable as {meta.NAME} in the output template.",
    example="{category: shoes}",
)

#: ``items_from:`` as a mapping, for a folder of images: the glob, then any request field for every item.
ITEMS_FROM_GLOB = FieldDef(
    "glob",
    "string",
    "Files to make items of, relative to the manifest's folder; ** spans folders, e.g. photos/**/*.jpg. "
    "One item per file, its id the path below the folder without the extension.",
    min_length=1,
    pattern=NOT_BLANK_PATTERN,
    pattern_hint="is blank: e.g. photos/*.jpg",
    example='"photos/**/*.jpg"',
)

#: ``settings.inputs``: how local input files reach the API (see ``settings.InputsSettings``).
INPUTS_FIELDS = (
    FieldDef(
        "upload",
        "string",
        "Stage local files in your object store, keyed by sha256: s3://bucket/prefix/ (any S3-compatible "
        "store; credentials, region and endpoint from the standard AWS environment, never the manifest).",
        pattern=r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/.*)?$",
        pattern_hint="is not s3://bucket/prefix/ (a bucket name in lower case, then an optional prefix)",
        example="s3://my-bucket/batch-inputs/",
    ),
    FieldDef(
        "url_ttl",
        "number",
        "Seconds a presigned URL of a staged file stays valid. Default: the prediction timeout + 15 minutes.",
        minimum=60,
        maximum=7 * 24 * 3600,
        example="3600",
    ),
    FieldDef(
        "public_base_url",
        "string",
        "The bucket is public: the API gets this URL + the object key, unsigned.",
        pattern=IMAGE_URL_PATTERN,
        pattern_hint="is not an http(s) URL",
        example='"https://my-bucket.s3.amazonaws.com/"',
    ),
    FieldDef(
        "route",
        "string",
        "predictions (the default: files staged by upload, sent as URLs) or openai-images (files sent to "
        "the vendor's OpenAI-format endpoint, which answers when the image is done).",
        enum=("predictions", "openai-images"),
        default="predictions",
        example="openai-images",
    ),
    FieldDef(
        "upload_concurrency",
        "integer",
        "Uploads at once.",
        minimum=1,
        maximum=64,
        default=8,
        example="8",
    ),
)

ITEM_ID = FieldDef(
    "id",
    "string",
    "Unique name of the item, used in outputs and the report. Default: item-<index> (0-based).",
    min_length=1,
    pattern=NOT_BLANK_PATTERN,
    pattern_hint="is blank: give the item a name, or leave id out",
    example='"sku-1001"',
)

_TOP_LEVEL_FIELDS = (
    FieldDef("version", "integer", "Manifest format version; must be 1.", enum=(1,), example="1"),
    FieldDef(
        "name",
        "string",
        "Name of the job. Default: the manifest file's name without its extension.",
        min_length=1,
        pattern=NOT_BLANK_PATTERN,
        pattern_hint="is blank: give the job a name, or leave name out",
        example="spring-catalog",
    ),
    FieldDef(
        "model",
        "string",
        "provider/model to run: one of " + ", ".join(catalogue.MODELS) + ". Another name is refused "
        "unless model_unlisted is true.",
        pattern=catalogue.MODEL_NAME_PATTERN,
        pattern_hint="is not provider/model: write it like openai/gpt-image-2-plus",
        default=catalogue.DEFAULT_MODEL,
        example=catalogue.DEFAULT_MODEL,
    ),
    FieldDef(
        "model_unlisted",
        "boolean",
        "true sends a model batch-engine's catalogue does not list yet, as given, under the gpt-image-2 "
        "family's rules (sizes, fields); without it an unknown model is an error, as a typo would be.",
        default=False,
        example="true",
    ),
    FieldDef(
        "task",
        "string",
        "What the model does: image-edit (input images required) or text-to-image (no input images).",
        enum=tuple(catalogue.TASK_TAKES_IMAGES),
        default=catalogue.DEFAULT_TASK,
        example=catalogue.DEFAULT_TASK,
    ),
    FieldDef(
        "output",
        "string",
        "Where each item's outputs go, relative to the out dir: {id} (the id made safe), {k} (1, 2, ...), "
        "{ext} (from the bytes) and {meta.NAME}, e.g. {meta.category}/{id}-{k}.{ext}.",
        min_length=1,
        pattern=NOT_BLANK_PATTERN,
        pattern_hint="is blank: leave output out for images/{id}-{k}.{ext}",
        default=DEFAULT_OUTPUT,
        example='"{meta.category}/{id}-{k}.{ext}"',
    ),
)

def _bounds(allowed: Range) -> dict[str, float]:
    low = "exclusive_minimum" if allowed.open_low else "minimum"
    return {low: allowed.low, "maximum": allowed.high}


#: How far each run setting may go (``settings.SETTING_RANGES``); the types come from ``RunSettings``.
_SETTING_BOUNDS: Mapping[str, Mapping[str, float]] = {
    name: _bounds(allowed) for name, allowed in SETTING_RANGES.items()
}

_JSON_TYPES: Mapping[Any, str] = {bool: "boolean", int: "integer", float: "number", str: "string"}


def _setting_docs() -> dict[str, str]:
    """Each ``RunSettings`` field's ``#:`` comment: the one place settings are described."""
    try:
        source = inspect.getsource(RunSettings)
    except (OSError, TypeError):  # no source shipped: the names alone will do
        return {}
    comments = re.findall(r"^\s+(\w+):[^\n]*#:\s*(.+)$", source, re.MULTILINE)
    return {name: _sentence(text) for name, text in comments}


def _sentence(comment: str) -> str:
    text = comment.replace("``", "").strip().rstrip(".")
    return text[:1].upper() + text[1:] + "."


def _setting_field(spec: dataclasses.Field[Any], hint: Any, doc: str | None) -> FieldDef:
    args = typing.get_args(hint) or (hint,)
    base = next(arg for arg in args if arg is not type(None))
    if base not in _JSON_TYPES:
        raise TypeError(f"RunSettings.{spec.name}: no manifest type for {hint}; add one to _JSON_TYPES")
    return FieldDef(
        spec.name,
        _JSON_TYPES[base],
        doc or f"Run setting {spec.name}.",
        nullable=type(None) in args,
        words=SETTING_WORDS.get(spec.name, ()),
        default=NO_DEFAULT if spec.default is dataclasses.MISSING else spec.default,
        **_SETTING_BOUNDS.get(spec.name, {}),  # type: ignore[arg-type]
    )


def _build_setting_fields() -> tuple[FieldDef, ...]:
    hints = typing.get_type_hints(RunSettings)
    docs = _setting_docs()
    return tuple(_setting_field(f, hints[f.name], docs.get(f.name)) for f in dataclasses.fields(RunSettings))


_SETTING_FIELDS = _build_setting_fields()


def request_fields() -> tuple[FieldDef, ...]:
    """The request fields an item (or ``defaults``) may set, in the order the schema lists them."""
    return _REQUEST_FIELDS


def setting_fields() -> tuple[FieldDef, ...]:
    """The ``settings:`` keys: one per ``RunSettings`` field, typed by its annotation, bounded by a table."""
    return _SETTING_FIELDS


def top_level_fields() -> tuple[FieldDef, ...]:
    """The top level's plain fields; ``defaults``, ``settings`` and ``items`` (``CONTAINER_KEYS``) aside."""
    return _TOP_LEVEL_FIELDS


# ---------------------------------------------------------------------------------------------- value checks

_PY_TYPES: Mapping[str, type | tuple[type, ...]] = {
    "string": str,
    "integer": int,
    "number": (int, float),
    "boolean": bool,
    "array": list,
    "object": dict,
}
_TYPE_NAMES = {
    "string": "a string",
    "integer": "a whole number",
    "number": "a number",
    "boolean": "true or false",
    "array": "a list",
    "object": "a mapping of name: value",
}


class Complaint(NamedTuple):
    """One broken rule of a value; ``entry`` is the index in an array when one entry broke it."""

    message: str
    entry: int | None = None


def value_problems(spec: FieldDef, value: Any) -> list[Complaint]:
    """Every rule of ``spec`` that ``value`` breaks (type first: a value of the wrong type gets only that)."""
    if value is None or (isinstance(value, str) and value in spec.words):
        return [] if spec.nullable or value is not None else [Complaint(_type_message(spec, value))]
    if not _has_type(spec.type, value):
        return [Complaint(_type_message(spec, value))]
    if spec.type == "array":
        return _array_problems(spec, value)
    if spec.type == "string":
        return [Complaint(m) for m in _string_problems(spec, value)]
    return [Complaint(m) for m in _scalar_problems(spec, value)]


def _has_type(kind: str, value: Any) -> bool:
    if isinstance(value, bool):  # bool is an int to Python, not to a manifest
        return kind == "boolean"
    return isinstance(value, _PY_TYPES[kind])


def _type_message(spec: FieldDef, value: Any) -> str:
    words = "".join(f" or {word}" for word in spec.words)
    return f"must be {_TYPE_NAMES[spec.type]}{words}, got {describe(value)}{_type_hint(spec, value)}"


def _type_hint(spec: FieldDef, value: Any) -> str:
    if spec.type == "string" and isinstance(value, bool):
        return "; quote it (YAML reads yes, no, on, off, true and false as booleans)"
    if spec.type == "string" and (isinstance(value, int | float) or _is_date(value)):
        text = shown(value)
        return f'; quote it to make it a string: {spec.name}: "{text}"' if len(text) <= 40 else ""
    if spec.type in ("integer", "number") and isinstance(value, str) and _is_short_number(value):
        return f"; write it without quotes: {spec.name}: {value}"
    if spec.type == "array" and isinstance(value, str):
        return f"; write a list, e.g. {spec.name}: {spec.example}"
    return f"; e.g. {spec.name}: {spec.example}" if spec.example else ""


def _is_date(value: Any) -> bool:
    return type(value).__name__ in ("date", "datetime")


def _is_short_number(text: str) -> bool:
    """A number written as a string, short enough to quote back in a hint."""
    if len(text) > 40:
        return False
    try:
        float(text)
    except ValueError:
        return False
    return True


def describe(value: Any) -> str:
    if value is None:
        return "null (nothing)"
    if isinstance(value, bool):
        return f"{str(value).lower()} (a boolean)"
    if isinstance(value, int | float):
        return f"{shown(value)} (a number)"
    if isinstance(value, str):
        return repr(value if len(value) <= 60 else value[:57] + "...") + " (a string)"
    if isinstance(value, list):
        return f"a list of {len(value)} entries"
    if isinstance(value, dict):
        return "a mapping"
    return f"{value} (a {type(value).__name__})"


def _scalar_problems(spec: FieldDef, value: Any) -> list[str]:
    if spec.enum:
        return [] if value in spec.enum else [_enum_message(spec, value)]
    if isinstance(value, float) and not math.isfinite(value):
        return [f"must be a finite number, got {value}"]
    low_ok = (spec.minimum is None or value >= spec.minimum) and (
        spec.exclusive_minimum is None or value > spec.exclusive_minimum
    )
    high_ok = spec.maximum is None or value <= spec.maximum
    return [] if low_ok and high_ok else [f"must be {_range_text(spec)}, got {shown(value)}"]


def _range_text(spec: FieldDef) -> str:
    kind = "a whole number" if spec.type == "integer" else "a number"
    if spec.minimum is not None and spec.maximum is not None:
        return f"{kind} from {_num(spec.minimum)} to {_num(spec.maximum)}"
    parts = []
    if spec.exclusive_minimum is not None:
        parts.append(f"greater than {_num(spec.exclusive_minimum)}")
    if spec.minimum is not None:
        parts.append(f"at least {_num(spec.minimum)}")
    if spec.maximum is not None:
        parts.append(f"at most {_num(spec.maximum)}")
    return f"{kind} {' and '.join(parts)}"


def _num(bound: float) -> str:
    return bound_text(bound)


def _enum_message(spec: FieldDef, value: Any) -> str:
    choices = [str(choice) for choice in spec.enum]
    which = choices[0] if len(choices) == 1 else "one of " + ", ".join(choices)
    word = value if isinstance(value, str) and len(value) <= 100 else ""
    return f"must be {which}, got {shown(value)}" + suggestion(word, choices)


def suggestion(word: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def _string_problems(spec: FieldDef, value: str) -> list[str]:
    if spec.enum:
        return [] if value in spec.enum else [_enum_message(spec, value)]
    if spec.max_length is not None and len(value) > spec.max_length:
        return [f"is {len(value):,} characters long; at most {spec.max_length:,} are allowed"]
    if spec.pattern is not None and _regex(spec.pattern).search(value) is None:
        return [f"{describe(value)} {spec.pattern_hint}"]
    if spec.min_length is not None and len(value) < spec.min_length:
        return [f"is shorter than {spec.min_length} characters"]
    return []


@functools.cache
def _regex(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)


def _array_problems(spec: FieldDef, value: list[Any]) -> list[Complaint]:
    count_ok = (spec.min_length is None or len(value) >= spec.min_length) and (
        spec.max_length is None or len(value) <= spec.max_length
    )
    allowed = f"{spec.min_length} to {spec.max_length} are allowed"
    found = [] if count_ok else [Complaint(f"has {len(value)} entries; {allowed}")]
    for index, entry in enumerate(value):
        if not isinstance(entry, str):
            found.append(Complaint(f"must be a string, got {describe(entry)}", index))
        elif spec.pattern is not None and _regex(spec.pattern).search(entry) is None:
            found.append(Complaint(f"{describe(entry)} {spec.pattern_hint}", index))
    return found


# ---------------------------------------------------------------------------------------------- field names

#: Where each known key belongs, for "unknown field" messages about a key put in the wrong place.
_HOMES = {
    **{spec.name: "at the top level" for spec in _TOP_LEVEL_FIELDS},
    **{name: "at the top level" for name in CONTAINER_KEYS},
    **{spec.name: "under settings:" for spec in _SETTING_FIELDS},
    "inputs": "under settings:",
    **{spec.name: "on an item, or under defaults: for every item" for spec in _REQUEST_FIELDS},
    "id": "on an item (ids are per item)",
    "meta": "on an item (its metadata)",
}


def unknown_message(key: Any, allowed: Sequence[str]) -> str:
    """``unknown field 'x'``, and where it belongs if elsewhere, or the nearest allowed name."""
    text = f"unknown field {key!r}"
    home = _HOMES.get(key) if isinstance(key, str) else None
    if home is not None:
        return f"{text} here: {key} belongs {home}"
    hint = suggestion(str(key), allowed)
    return text + (hint if hint else f"; the fields here are: {', '.join(allowed)}")
