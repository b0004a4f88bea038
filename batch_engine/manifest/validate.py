"""Load a manifest file and validate it: a ``Manifest``, or a ``ManifestError`` listing every problem.

Three parts, in reading order:

- the field tables (``request_fields``, ``setting_fields``, ``top_level_fields``, ``ITEM_ID``): what each
  field takes. The validator checks values against them and ``schema.py`` turns them into the JSON Schema, so
  the two cannot disagree;
- ``_Builder``: YAML to plain values, safely. It reads the parser's event stream itself instead of composing a
  node graph first: a node graph costs ~40 bytes of memory per byte of YAML, and building values straight from
  events lets aliases be counted as they are met, so a "billion laughs" document is refused after a few
  events. The line of every value is kept beside it (``_Doc``) for the problem messages;
- ``_Validator``: every rule, each broken rule one ``Problem``, all of them collected before raising.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import gc
import hashlib
import inspect
import json
import math
import re
import sys
import typing
from array import array
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import yaml

from batch_engine.api import catalogue
from batch_engine.errors import ManifestError, Problem, UsageError
from batch_engine.settings import RunSettings
from batch_engine.values import Item, Manifest

MAX_MANIFEST_BYTES = 256 * 1024 * 1024
#: Values in the document once every alias is expanded; a 100,000-item manifest has about 1,200,000.
MAX_NODES = 5_000_000
MAX_PROMPT_CHARS = 32_000
MAX_IMAGES = 16
MAX_N = 10

#: ``http(s)://`` and a host, or a ``data:`` URI (accepted with a warning). Schemes are case-insensitive; the
#: character classes spell that out because JSON Schema patterns (ECMA 262) have no inline flags.
IMAGE_URL_PATTERN = r"^([hH][tT][tT][pP][sS]?://[^\s/]|[dD][aA][tT][aA]:)"
SIZE_PATTERN = r"^(auto|[0-9]+x[0-9]+)$"
NOT_BLANK_PATTERN = r"\S"

CONTAINER_KEYS = ("defaults", "settings", "items")

_LOADER: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


# ---------------------------------------------------------------------------------------------- field tables


class _Marker:
    """A sentinel with a readable repr."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


#: ``FieldDef.default`` of a field that has no default.
NO_DEFAULT: Any = _Marker("<no default>")


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
        "Input images as public http(s) URLs. Required for image-edit, not allowed for text-to-image.",
        min_length=1,
        max_length=MAX_IMAGES,
        pattern=IMAGE_URL_PATTERN,
        pattern_hint=(
            "is not an http(s) URL: local files are not supported yet, the API takes public URLs, "
            "so upload the image somewhere public and give its https:// address"
        ),
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
        pattern_hint="is not 'auto' or WIDTHxHEIGHT (a lower-case x between two whole numbers)",
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
        "provider/model to run, e.g. " + ", ".join(catalogue.MODELS) + ". Other well-formed names are sent "
        "as given, with the gpt-image-2 family's rules assumed.",
        pattern=catalogue.MODEL_NAME_PATTERN,
        pattern_hint="is not provider/model: write it like openai/gpt-image-2-plus",
        default=catalogue.DEFAULT_MODEL,
        example=catalogue.DEFAULT_MODEL,
    ),
    FieldDef(
        "task",
        "string",
        "What the model does: image-edit (input images required) or text-to-image (no input images).",
        enum=tuple(catalogue.TASK_TAKES_IMAGES),
        default=catalogue.DEFAULT_TASK,
        example=catalogue.DEFAULT_TASK,
    ),
)

#: How far each run setting may go; the types come from ``RunSettings``' annotations.
_SETTING_BOUNDS: Mapping[str, Mapping[str, float]] = {
    "rate": {"exclusive_minimum": 0},
    "rate_min": {"exclusive_minimum": 0},
    "max_in_flight": {"minimum": 1},
    "timeout": {"exclusive_minimum": 0},
    "poll_after": {"minimum": 0},
    "poll_interval": {"exclusive_minimum": 0},
    "poll_interval_max": {"exclusive_minimum": 0},
    "poll_rate": {"exclusive_minimum": 0},
    "max_submits": {"minimum": 0},
    "grace": {"minimum": 0},
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
}
_TYPE_NAMES = {
    "string": "a string",
    "integer": "a whole number",
    "number": "a number",
    "boolean": "true or false",
    "array": "a list",
}


class Complaint(NamedTuple):
    """One broken rule of a value; ``entry`` is the index in an array when one entry broke it."""

    message: str
    entry: int | None = None


def value_problems(spec: FieldDef, value: Any) -> list[Complaint]:
    """Every rule of ``spec`` that ``value`` breaks (type first: a value of the wrong type gets only that)."""
    if value is None:
        return [] if spec.nullable else [Complaint(_type_message(spec, value))]
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
    return f"must be {_TYPE_NAMES[spec.type]}, got {_describe(value)}{_type_hint(spec, value)}"


def _type_hint(spec: FieldDef, value: Any) -> str:
    if spec.type == "string" and isinstance(value, bool):
        return "; quote it (YAML reads yes, no, on, off, true and false as booleans)"
    if spec.type == "string" and (isinstance(value, int | float) or _is_date(value)):
        return f'; quote it to make it a string: {spec.name}: "{value}"'
    if spec.type in ("integer", "number") and isinstance(value, str) and _is_number(value):
        return f"; write it without quotes: {spec.name}: {value}"
    if spec.type == "array" and isinstance(value, str):
        return f"; write a list, e.g. {spec.name}: {spec.example}"
    return f"; e.g. {spec.name}: {spec.example}" if spec.example else ""


def _is_date(value: Any) -> bool:
    return type(value).__name__ in ("date", "datetime")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _describe(value: Any) -> str:
    if value is None:
        return "null (nothing)"
    if isinstance(value, bool):
        return f"{str(value).lower()} (a boolean)"
    if isinstance(value, int | float):
        return f"{value!r} (a number)"
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
    return [] if low_ok and high_ok else [f"must be {_range_text(spec)}, got {value}"]


def _range_text(spec: FieldDef) -> str:
    kind = "a whole number" if spec.type == "integer" else "a number"
    low = spec.minimum if spec.minimum is not None else spec.exclusive_minimum
    if low is not None and spec.maximum is not None:
        return f"{kind} from {_num(low)} to {_num(spec.maximum)}"
    if spec.exclusive_minimum is not None:
        return f"{kind} greater than {_num(spec.exclusive_minimum)}"
    if spec.minimum is not None:
        return f"{kind} of at least {_num(spec.minimum)}"
    return f"{kind} of at most {_num(spec.maximum or 0)}"


def _num(bound: float) -> str:
    return f"{bound:g}"


def _enum_message(spec: FieldDef, value: Any) -> str:
    choices = [str(choice) for choice in spec.enum]
    which = choices[0] if len(choices) == 1 else "one of " + ", ".join(choices)
    return f"must be {which}, got {value!r}" + _suggestion(str(value), choices)


def _suggestion(word: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def _string_problems(spec: FieldDef, value: str) -> list[str]:
    if spec.enum:
        return [] if value in spec.enum else [_enum_message(spec, value)]
    if spec.max_length is not None and len(value) > spec.max_length:
        return [f"is {len(value):,} characters long; at most {spec.max_length:,} are allowed"]
    if spec.pattern is not None and _regex(spec.pattern).search(value) is None:
        return [f"{_describe(value)} {spec.pattern_hint}"]
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
            found.append(Complaint(f"must be a string, got {_describe(entry)}", index))
        elif spec.pattern is not None and _regex(spec.pattern).search(entry) is None:
            found.append(Complaint(f"{_describe(entry)} {spec.pattern_hint}", index))
    return found


# ---------------------------------------------------------------------------------------------- YAML reading

_STR_TAG = "tag:yaml.org,2002:str"
_MERGE_TAG = "tag:yaml.org,2002:merge"
_SCALAR_TAGS = frozenset(f"tag:yaml.org,2002:{t}" for t in ("str", "int", "float", "bool", "null"))
_COLLECTION_TAGS = frozenset({"tag:yaml.org,2002:seq", "tag:yaml.org,2002:map"})


class _Refused(Exception):
    """The document cannot be read any further; ``line`` and ``message`` say why."""

    def __init__(self, message: str, line: int | None) -> None:
        super().__init__(message)
        self.message = message
        self.line = line


_NO_KEY = _Marker("<no key yet>")
_MERGE = _Marker("<<")
_BAD_KEY = _Marker("<unusable key>")
_ABSENT = _Marker("<absent>")


class _Doc:
    """A YAML document as plain values; beside it, the 1-based line of every value, by container."""

    def __init__(self) -> None:
        self.root: Any = None
        #: id(container) -> its first line, then the line of each entry (a list) or key (a mapping), in order.
        #: Keyed by id(): every container stays alive in ``root``, so no id is reused while this lives.
        #: Arrays, not lists of ints: at ~1M values that is the difference between ~30 and ~85 MB.
        self.lines: dict[int, array[int]] = {}

    def line(self, container: Any, key: Any = None) -> int | None:
        """The line of ``container[key]``, or of ``container`` itself when key is None or unknown."""
        lines = self.lines.get(id(container))
        if lines is None:
            return None
        position = _position(container, key)
        return lines[0] if position is None else lines[position + 1]


def _position(container: Any, key: Any) -> int | None:
    if type(container) is list and type(key) is int and 0 <= key < len(container):
        return key
    if type(container) is dict and key is not None and key in container:
        return list(container).index(key)  # only ever asked for a problem's line: O(n) is fine
    return None


@dataclass(slots=True)
class _Open:
    """A list or mapping whose end event has not come yet."""

    value: Any  #: the list or dict being filled
    lines: array[int]  #: its ``_Doc.lines`` entry
    anchor: str | None
    size: int = 1  #: values inside it once aliases are expanded, itself included
    key: Any = _NO_KEY  #: a mapping's key waiting for its value
    key_line: int = 0
    merges: list[dict[Any, Any]] | None = None  #: mappings named by ``<<``


class _Builder:
    """Builds a ``_Doc`` from YAML parser events: plain values only, aliases counted as they are met."""

    def __init__(self, doc: _Doc, complain: Callable[[str, int | None], None]) -> None:
        self.doc = doc
        self.complain = complain
        self.stack: list[_Open] = []
        self.anchors: dict[str, tuple[Any, int] | None] = {}  #: None while the anchored value is being built
        self.expanded = 0
        self.documents = 0
        #: the implicit tag of a plain scalar (int, bool, null, ...), by YAML 1.1's rules, as SafeLoader's
        resolver = yaml.resolver.Resolver()
        self.resolve: Callable[[type, str, Any], str] = resolver.resolve
        #: first characters (or "" for an empty value) that some implicit type can start with
        self.resolvable = frozenset(resolver.yaml_implicit_resolvers)
        self.constructor = yaml.constructor.SafeConstructor()
        self.handlers: dict[type, Callable[[Any], None]] = {
            yaml.DocumentStartEvent: self._document,
            yaml.ScalarEvent: self._scalar,
            yaml.SequenceStartEvent: self._open,
            yaml.MappingStartEvent: self._open,
            yaml.SequenceEndEvent: self._close,
            yaml.MappingEndEvent: self._close,
            yaml.AliasEvent: self._alias,
        }

    def build(self, loader: Any) -> None:
        """Consume every event; raise ``_Refused`` when the document must not be read further."""
        while True:
            event = loader.get_event()
            if isinstance(event, yaml.StreamEndEvent):
                return
            handler = self.handlers.get(type(event))
            if handler is not None:
                handler(event)

    def _document(self, event: yaml.DocumentStartEvent) -> None:
        self.documents += 1
        if self.documents > 1:
            raise _Refused("the file holds more than one YAML document ('---'); keep one", _line(event))

    def _count(self, size: int, event: yaml.Event) -> None:
        self.expanded += size
        if self.expanded > MAX_NODES:
            raise _Refused(
                f"the manifest holds more than {MAX_NODES:,} values once its aliases (*name) are expanded: "
                "refused, as a 'billion laughs' document would be. Use fewer aliases, or split the job",
                _line(event),
            )

    def _scalar(self, event: yaml.ScalarEvent) -> None:
        self._count(1, event)
        if event.tag is None and not (event.implicit[0] and event.value[:1] in self.resolvable):
            value: Any = event.value  # a string no implicit type can match: most scalars, kept fast
        else:
            value = self._scalar_value(event)
        if event.anchor is not None:
            self.anchors[event.anchor] = (value, 1)
        self._attach(value, _line(event), 1)

    def _scalar_value(self, event: yaml.ScalarEvent) -> Any:
        explicit = event.tag not in (None, "!")
        tag = str(event.tag) if explicit else self.resolve(yaml.ScalarNode, event.value, event.implicit)
        if tag == _STR_TAG:
            return event.value
        if tag == _MERGE_TAG:
            return _MERGE if self._expecting_key() else event.value
        if tag not in self.constructor.yaml_constructors or (explicit and tag not in _SCALAR_TAGS):
            if explicit:
                self.complain(_tag_message(tag), _line(event))
            return event.value
        return self._construct(tag, event)

    def _construct(self, tag: str, event: yaml.ScalarEvent) -> Any:
        node = yaml.ScalarNode(tag, event.value, None, None, event.style)
        try:  # the constructor's own function: construct_object() would remember every node it saw
            return self.constructor.yaml_constructors[tag](self.constructor, node)
        except (yaml.YAMLError, ValueError) as exc:
            self.complain(f"{event.value!r} cannot be read as {tag.rpartition(':')[2]}: {exc}", _line(event))
            return event.value

    def _expecting_key(self) -> bool:
        return bool(self.stack) and isinstance(self.stack[-1].value, dict) and self.stack[-1].key is _NO_KEY

    def _open(self, event: yaml.SequenceStartEvent | yaml.MappingStartEvent) -> None:
        self._count(1, event)
        if event.tag not in (None, "!") and event.tag not in _COLLECTION_TAGS:
            self.complain(_tag_message(str(event.tag)), _line(event))
        value: Any = {} if isinstance(event, yaml.MappingStartEvent) else []
        self.stack.append(_Open(value, array("i", (_line(event),)), event.anchor))
        if event.anchor is not None:
            self.anchors[event.anchor] = None

    def _close(self, event: yaml.Event) -> None:
        done = self.stack.pop()
        if done.merges:
            self._apply_merges(done)
        self.doc.lines[id(done.value)] = done.lines
        if done.anchor is not None:
            self.anchors[done.anchor] = (done.value, done.size)
        self._attach(done.value, done.lines[0], done.size)

    def _alias(self, event: yaml.AliasEvent) -> None:
        name = str(event.anchor)
        if name not in self.anchors:
            self.complain(f"alias *{name} names no anchor &{name} defined before it", _line(event))
            return self._attach(None, _line(event), 1)
        target = self.anchors[name]
        if target is None:
            self.complain(
                f"alias *{name} sits inside the value it names: recursive data is refused", _line(event)
            )
            return self._attach(None, _line(event), 1)
        self._count(target[1], event)
        return self._attach(target[0], _line(event), target[1])

    def _attach(self, value: Any, line: int, size: int) -> None:
        if not self.stack:
            self.doc.root = value
            return
        top = self.stack[-1]
        top.size += size
        if type(top.value) is list:
            top.value.append(value)
            top.lines.append(line)
        elif top.key is _NO_KEY:
            self._take_key(top, value, line)
        else:
            self._take_value(top, value)

    def _take_key(self, top: _Open, key: Any, line: int) -> None:
        if isinstance(key, list | dict):
            self.complain("a mapping key must be a plain value, not a list or a mapping", line)
            key = _BAD_KEY
        elif type(key) is str:
            key = sys.intern(key)  # the same few field names, 100,000 times over
        top.key, top.key_line = key, line

    def _take_value(self, top: _Open, value: Any) -> None:
        key, top.key = top.key, _NO_KEY
        if key is _MERGE:
            self._take_merge(top, value)
        elif key in top.value:
            self._duplicate_key(top, key)
            top.value[key] = value
        elif key is not _BAD_KEY:
            top.value[key] = value
            top.lines.append(top.key_line)

    def _duplicate_key(self, top: _Open, key: Any) -> None:
        position = list(top.value).index(key) + 1
        first, top.lines[position] = top.lines[position], top.key_line
        message = f"key {key!r} appears twice in one mapping (also on line {first}); YAML keeps only the last"
        self.complain(message + ": remove one", top.key_line)

    def _take_merge(self, top: _Open, value: Any) -> None:
        sources = value if isinstance(value, list) else [value]
        if not all(isinstance(source, dict) for source in sources):
            self.complain("the merge key '<<' takes a mapping or a list of mappings", top.key_line)
            return
        top.merges = (top.merges or []) + sources

    def _apply_merges(self, done: _Open) -> None:
        """YAML merge keys: explicit keys win, then earlier sources over later ones (as SafeLoader does)."""
        sources = done.merges or []
        own_lines = dict(zip(done.value, done.lines[1:], strict=True))
        merged: dict[Any, Any] = {}
        for source in reversed(sources):
            merged.update(source)
        merged.update(done.value)
        lines = array("i", (done.lines[0],))
        for key in merged:
            origin = next((source for source in sources if key in source), None)
            line = own_lines[key] if key in own_lines else self.doc.line(origin, key)
            lines.append(line or done.lines[0])
        done.value.clear()  # in place: the dict's id() may already be known (an anchor being built)
        done.value.update(merged)
        done.lines = lines


def _line(event: yaml.Event) -> int:
    return 1 if event.start_mark is None else int(event.start_mark.line) + 1


def _tag_message(tag: str) -> str:
    return (
        f"the tag {tag!r} is not allowed: a manifest is read safely, as plain values only "
        "(strings, numbers, booleans, lists, mappings); remove the tag"
    )


@contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector: building ~1M containers otherwise triggers full collections
    over every object built so far again and again, which made a 100,000-item manifest ~10 s slower.
    Nothing built here forms a reference cycle, so there is nothing for it to collect meanwhile."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _read(path: Path, complain: Callable[[str, int | None], None]) -> _Doc | None:
    """The document at ``path``, or None after complaining why it cannot be read."""
    try:
        if not path.is_file():
            complain("no such file" if not path.exists() else "not a regular file", None)
            return None
        size = path.stat().st_size
        if size > MAX_MANIFEST_BYTES:
            complain(f"the file is {size:,} bytes; manifests over {MAX_MANIFEST_BYTES:,} are refused", None)
            return None
        with path.open("rb") as stream:
            return _parse(stream, complain)
    except OSError as exc:
        complain(f"cannot read the file: {exc.strerror or exc}", None)
        return None


def _parse(stream: Any, complain: Callable[[str, int | None], None]) -> _Doc | None:
    doc = _Doc()
    loader = _LOADER(stream)
    try:
        _Builder(doc, complain).build(loader)
    except yaml.MarkedYAMLError as exc:
        complain(_yaml_error_message(exc), _mark_line(exc))
        return None
    except yaml.YAMLError as exc:  # a reader error: not text in a known encoding
        complain(f"the file is not readable as YAML text: {exc}", None)
        return None
    except _Refused as exc:
        complain(exc.message, exc.line)
        return None
    finally:
        loader.dispose()
    return doc


def _yaml_error_message(exc: yaml.MarkedYAMLError) -> str:
    mark = exc.problem_mark or exc.context_mark
    column = f" (column {mark.column + 1})" if mark is not None else ""
    what = " ".join(part for part in (exc.context, exc.problem) if part)
    return f"invalid YAML: {what}{column}"


def _mark_line(exc: yaml.MarkedYAMLError) -> int | None:
    mark = exc.problem_mark or exc.context_mark
    return None if mark is None else int(mark.line) + 1


# ---------------------------------------------------------------------------------------------- validation


class _Entry(NamedTuple):
    """An item that passed its own checks, waiting for the whole manifest to pass."""

    position: int
    item_id: str
    spec: dict[Any, Any]
    request: dict[Any, Any]


class _Place(NamedTuple):
    """Where a group of fields sits: its path prefix, its mapping (for lines) and its item, if any."""

    prefix: str  #: "" (top level), "defaults", "settings" or "items[3]"
    container: Any
    item_index: int | None = None
    item_id: str | None = None


_REQUEST = {spec.name: spec for spec in _REQUEST_FIELDS}
_SETTINGS = {spec.name: spec for spec in _SETTING_FIELDS}
_TOP = {spec.name: spec for spec in _TOP_LEVEL_FIELDS}
_ITEM = {ITEM_ID.name: ITEM_ID, **_REQUEST}
_TOP_KEYS = (*_TOP, *CONTAINER_KEYS)
_DATA_URI_WARNING = "is a data: URI, which the API may refuse: prefer a public https:// URL"

#: Where each known key belongs, for "unknown field" messages about a key put in the wrong place.
_HOMES = {
    **{name: "at the top level" for name in (*_TOP, *CONTAINER_KEYS)},
    **{name: "under settings:" for name in _SETTINGS},
    **{name: "on an item, or under defaults: for every item" for name in _REQUEST},
    "id": "on an item (ids are per item)",
}


class _Validator:
    """Checks one document against every rule, collecting problems and warnings as it goes."""

    def __init__(self, file: str) -> None:
        self.file = file
        self.doc = _Doc()
        self.problems: list[tuple[int, int, Problem]] = []
        self.warnings: list[tuple[int, int, str]] = []
        self.item_warnings: dict[tuple[str, str], list[Problem]] = {}  #: (field, message) -> where
        self.spec = catalogue.spec_for(catalogue.DEFAULT_MODEL)
        self.task_takes_images: bool | None = True  #: None when the task is unknown
        self.ids: dict[str, int] = {}  #: item id -> index of the first item with it

    # -- reporting

    def complain_at(self, message: str, line: int | None) -> None:
        """A problem of the file as a whole, or of the line given."""
        self.problems.append((line or 0, len(self.problems), Problem(self.file, message, line=line)))

    def complain(self, place: _Place, key: Any, message: str, *, entry: int | None = None) -> None:
        path = _path(place.prefix, key, entry)
        line = self._line(place.container, key, entry)
        problem = Problem(self.file, message, path or None, place.item_index, place.item_id, line)
        self.problems.append((line or 0, len(self.problems), problem))

    def warn(self, place: _Place, key: Any, message: str, *, entry: int | None = None) -> None:
        line = self._line(place.container, key, entry)
        path = _path(place.prefix, key, entry) or None
        where = Problem(self.file, message, path, place.item_index, place.item_id, line)
        if place.item_index is None:
            self.warnings.append((line or 0, len(self.warnings), str(where)))
        else:  # the same warning on many items is said once, with a count
            self.item_warnings.setdefault((_path("", key, entry), message), []).append(where)

    def _line(self, container: Any, key: Any, entry: int | None) -> int | None:
        if entry is not None and isinstance(container, dict) and key in container:
            return self.doc.line(container[key], entry)
        return self.doc.line(container, key)

    # -- the document

    def run(self, doc: _Doc, default_name: str) -> Manifest | None:
        """The manifest, or None when any problem was found (reading problems included)."""
        self.doc = doc
        root = doc.root
        top = _Place("", root)
        if not isinstance(root, dict):
            self.complain(top, None, _root_message(root))
            return None
        self._check_keys(root, top, _TOP_KEYS)
        self._check_fields(root, top, _TOP)
        self._check_top(root, top)
        defaults = self._mapping(root, "defaults", top)
        self._check_fields(defaults, _Place("defaults", defaults), _REQUEST, request=True)
        settings = self._mapping(root, "settings", top)
        self._check_settings(settings, _Place("settings", settings))
        entries = self._items(root, top, defaults)
        if self.problems:
            return None
        return self._manifest(root, default_name, defaults, settings, entries)

    def _check_top(self, root: dict[Any, Any], top: _Place) -> None:
        if "version" not in root:
            self.complain(top, "version", "is missing: write 'version: 1' at the top of the manifest")
        model = root.get("model", catalogue.DEFAULT_MODEL)
        if isinstance(model, str) and catalogue.is_model_name(model):
            self._use_model(model, top)
        task = root.get("task", catalogue.DEFAULT_TASK)
        self.task_takes_images = catalogue.TASK_TAKES_IMAGES.get(task) if isinstance(task, str) else None
        if isinstance(task, str) and task in catalogue.TASK_TAKES_IMAGES and task not in self.spec.tasks:
            tasks = ", ".join(sorted(self.spec.tasks))
            self.complain(top, "task", f"{self.spec.name} does not do {task}; it does: {tasks}")

    def _use_model(self, model: str, top: _Place) -> None:
        self.spec = catalogue.spec_for(model)
        if catalogue.model_spec(model) is None:
            known = ", ".join(catalogue.MODELS)
            self.warn(
                top,
                "model",
                f"{model!r} is not a model batch-engine knows ({known}); it is sent as given, "
                "with the gpt-image-2 family's rules assumed (sizes, fields)",
            )

    def _mapping(self, root: dict[Any, Any], key: str, top: _Place) -> dict[Any, Any]:
        value = root.get(key)
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.complain(top, key, f"must be a mapping of field: value, got {_describe(value)}")
            return {}
        return value

    # -- fields

    def _check_keys(self, values: dict[Any, Any], place: _Place, allowed: Collection[str]) -> None:
        for key in values:
            if key not in allowed:
                self.complain(place, key, _unknown_message(key, list(allowed)))

    def _check_fields(
        self, values: dict[Any, Any], place: _Place, specs: Mapping[str, FieldDef], *, request: bool = False
    ) -> None:
        if request:
            self._check_keys(values, place, specs.keys())
        for key, value in values.items():
            spec = specs.get(key)
            if spec is None:
                continue
            complaints = value_problems(spec, value)
            for complaint in complaints:
                self.complain(place, key, complaint.message, entry=complaint.entry)
            if request and not complaints:
                self._check_for_model(place, key, value)

    def _check_for_model(self, place: _Place, key: str, value: Any) -> None:
        if key == "size":
            broken = catalogue.size_problem(self.spec, value)
            if broken is not None:
                self.complain(place, key, broken)
        elif key == "images":
            self._check_images(place, value)
        elif key == "quality" and not self.spec.supports_quality:
            name = self.spec.short_name
            self.warn(place, key, f"ignored by -plus models: {name} does not take quality, so it is not sent")
        elif key == "background" and value == "transparent" and self.spec.transparent_doubtful:
            self.warn(
                place, key, f"transparent backgrounds are reported not to work on {self.spec.short_name}"
            )

    def _check_images(self, place: _Place, urls: list[str]) -> None:
        if self.task_takes_images is False:
            self.complain(
                place, "images", "text-to-image takes no input images: remove them, or use image-edit"
            )
            return
        for entry, url in enumerate(urls):
            if url[:5].lower() == "data:":
                self.warn(place, "images", _DATA_URI_WARNING, entry=entry)

    def _check_settings(self, settings: dict[Any, Any], place: _Place) -> None:
        before = len(self.problems)
        self._check_keys(settings, place, _SETTINGS)
        self._check_fields(settings, place, _SETTINGS)
        if len(self.problems) > before or not settings:
            return
        try:
            RunSettings(**settings)
        except (UsageError, TypeError) as exc:  # rules across settings, e.g. rate_min <= rate
            self.complain(_Place("", self.doc.root), "settings", str(exc))

    # -- items

    def _items(self, root: dict[Any, Any], top: _Place, defaults: dict[Any, Any]) -> list[_Entry]:
        items = root.get("items", _ABSENT)
        if items is _ABSENT:
            self.complain(top, "items", "is missing: list the work under items:, e.g. items: [{prompt: ...}]")
            return []
        if not isinstance(items, list) or not items:
            got = "an empty list" if items == [] else _describe(items)
            self.complain(top, "items", f"must be a non-empty list of items, got {got}")
            return []
        entries = (self._item(index, value, items, defaults) for index, value in enumerate(items))
        return [entry for entry in entries if entry is not None]

    def _item(self, index: int, value: Any, items: list[Any], defaults: dict[Any, Any]) -> _Entry | None:
        if not isinstance(value, dict):
            message = f"must be a mapping of fields (prompt: ..., images: ...), got {_describe(value)}"
            self.complain(_Place("items", items, index), index, message)
            return None
        item_id = self._item_id(index, value)
        place = _Place(f"items[{index}]", value, index, item_id)
        self._check_fields(value, place, _ITEM, request=True)
        request = {**defaults, **value}
        request.pop("id", None)
        self._check_required(place, request)
        return None if item_id is None else _Entry(index, item_id, value, request)

    def _item_id(self, index: int, item: dict[Any, Any]) -> str | None:
        given = item.get("id", _ABSENT)
        item_id = f"item-{index}" if given is _ABSENT else given
        if not isinstance(item_id, str) or value_problems(ITEM_ID, item_id):
            return None  # the field check reports it
        first = self.ids.setdefault(item_id, index)
        if first != index:
            place = _Place(f"items[{index}]", item, index, item_id)
            self.complain(place, "id", self._duplicate_message(item_id, first, given))
        return item_id

    def _duplicate_message(self, item_id: str, first: int, given: Any) -> str:
        items = self.doc.root["items"]
        whose = "its default id" if given is _ABSENT else "id"
        return (
            f"{whose} {item_id!r} is already used by item {first} (line {self.doc.line(items, first)}); "
            "ids must be unique: rename one"
        )

    def _check_required(self, place: _Place, request: dict[Any, Any]) -> None:
        if "prompt" not in request:
            self.complain(place, "prompt", "is missing: give the item a prompt, or set one under defaults:")
        if self.task_takes_images and "images" not in request:
            self.complain(
                place, "images", "is missing: image-edit needs 1 to 16 public http(s) URLs of input images"
            )

    # -- the result

    def _manifest(
        self,
        root: dict[Any, Any],
        default_name: str,
        defaults: dict[Any, Any],
        settings: dict[Any, Any],
        entries: list[_Entry],
    ) -> Manifest:
        model = root.get("model", catalogue.DEFAULT_MODEL)
        task = root.get("task", catalogue.DEFAULT_TASK)
        items = tuple(
            Item(index, item_id, spec, request, fingerprint(model, task, request))
            for index, item_id, spec, request in entries
        )
        return Manifest(
            path=self.file,
            name=root.get("name", default_name),
            model=model,
            task=task,
            defaults=defaults,
            settings=settings,
            items=items,
            warnings=self.collected_warnings(),
        )

    def collected_warnings(self) -> tuple[str, ...]:
        found = list(self.warnings)
        for wheres in self.item_warnings.values():
            more = f" (and {len(wheres) - 1:,} more items)" if len(wheres) > 1 else ""
            found.append((wheres[0].line or 0, len(found), str(wheres[0]) + more))
        return tuple(text for _, _, text in sorted(found))

    def sorted_problems(self) -> list[Problem]:
        return [problem for _, _, problem in sorted(self.problems, key=lambda p: p[:2])]


def _path(prefix: str, key: Any, entry: int | None) -> str:
    if key is None:
        return prefix
    step = f"[{key}]" if isinstance(key, int) and prefix == "items" else str(key)
    path = prefix + step if step.startswith("[") else ".".join(p for p in (prefix, step) if p)
    return path + (f"[{entry}]" if entry is not None else "")


def _root_message(root: Any) -> str:
    if root is None:
        return "the manifest is empty: it needs at least 'version: 1' and 'items:'"
    return f"the manifest must be a mapping (version:, items:, ...), got {_describe(root)}"


def _unknown_message(key: Any, allowed: Sequence[str]) -> str:
    text = f"unknown field {key!r}"
    home = _HOMES.get(key) if isinstance(key, str) else None
    if home is not None:
        return f"{text} here: {key} belongs {home}"
    hint = _suggestion(str(key), allowed)
    return text + (hint if hint else f"; the fields here are: {', '.join(allowed)}")


# ---------------------------------------------------------------------------------------------- public API


def load_manifest(path: str | Path) -> Manifest:
    """Read and validate the manifest at ``path``; raise ``ManifestError`` listing every problem found."""
    validator = _Validator(str(path))
    with _gc_paused():
        doc = _read(Path(path), validator.complain_at)
        manifest = validator.run(doc, Path(path).stem) if doc is not None else None
    if manifest is None:
        raise ManifestError(validator.sorted_problems())
    return manifest


def fingerprint(model: str, task: str, request: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of model, task and request as canonical JSON: equal requests, equal fingerprints."""
    canonical = json.dumps(
        {"model": model, "task": task, "request": request},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
        allow_nan=False,
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()
