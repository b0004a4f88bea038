"""Read a manifest's YAML into plain values, safely, keeping the line of every value for the problem messages.

It reads the parser's event stream itself instead of composing a node graph first: a node graph costs ~40
bytes of memory per byte of YAML, and building values straight from events lets aliases be counted as they
are met, so a "billion laughs" document is refused after a few events. The line of every value is kept beside
it (``Doc``) for the problem messages.
"""

from __future__ import annotations

import gc
import sys
from array import array
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from batch_engine.manifest.fields import MAX_MANIFEST_BYTES, MAX_NODES, Marker

_LOADER: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


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


_NO_KEY = Marker("<no key yet>")
_MERGE = Marker("<<")
_BAD_KEY = Marker("<unusable key>")


class Doc:
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
    lines: array[int]  #: its ``Doc.lines`` entry
    anchor: str | None
    size: int = 1  #: values inside it once aliases are expanded, itself included
    key: Any = _NO_KEY  #: a mapping's key waiting for its value
    key_line: int = 0
    merges: list[dict[Any, Any]] | None = None  #: mappings named by ``<<``


class _Builder:
    """Builds a ``Doc`` from YAML parser events: plain values only, aliases counted as they are met."""

    def __init__(self, doc: Doc, complain: Callable[[str, int | None], None]) -> None:
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
                f"the manifest's aliases (*name) expand to more than {MAX_NODES:,} values: "
                "refused, as a 'billion laughs' document would be. Use fewer aliases, or split the job",
                _line(event),
            )

    def _scalar(self, event: yaml.ScalarEvent) -> None:
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
        except (yaml.YAMLError, ValueError, LookupError, ArithmeticError) as exc:  # !!bool maybe: KeyError
            shown = event.value if len(event.value) <= 40 else event.value[:40] + "…"
            why = "" if isinstance(exc, LookupError) else f": {exc!s:.100}"
            self.complain(f"{shown!r} cannot be read as {tag.rpartition(':')[2]}{why}", _line(event))
            return event.value

    def _expecting_key(self) -> bool:
        return bool(self.stack) and isinstance(self.stack[-1].value, dict) and self.stack[-1].key is _NO_KEY

    def _open(self, event: yaml.SequenceStartEvent | yaml.MappingStartEvent) -> None:
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
def gc_paused() -> Iterator[None]:
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


def read_document(path: Path, complain: Callable[[str, int | None], None]) -> Doc | None:
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


def _parse(stream: Any, complain: Callable[[str, int | None], None]) -> Doc | None:
    doc = Doc()
    loader = _LOADER(stream)
    try:
        _Builder(doc, complain).build(loader)
    except yaml.MarkedYAMLError as exc:
        line = _mark_line(exc)
        complain(_tab_message(stream, line) or _yaml_error_message(exc), line)
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


def _tab_message(stream: Any, line: int | None) -> str:
    """The problem said plainly when the line the parser stopped at is indented with a tab ('' if not):
    the parser's own words ("cannot start any token") do not mention tabs."""
    if line is None:
        return ""
    stream.seek(0)
    text = next((raw for number, raw in enumerate(stream, 1) if number == line), b"")
    indent = text[: len(text) - len(text.lstrip(b" \t"))]
    if b"\t" not in indent:
        return ""
    return "invalid YAML: this line is indented with a tab; YAML indents with spaces only: replace the tabs"


def _mark_line(exc: yaml.MarkedYAMLError) -> int | None:
    mark = exc.problem_mark or exc.context_mark
    return None if mark is None else int(mark.line) + 1
