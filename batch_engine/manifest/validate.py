"""Validate a manifest: a ``Manifest``, or a ``ManifestError`` listing every problem, each with its place.

``_Validator`` holds every rule; each broken rule is one ``Problem``, and all of them are collected before
raising.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from batch_engine.api import catalogue
from batch_engine.errors import ManifestError, Problem, UsageError
from batch_engine.manifest.fields import (
    ABSENT,
    CONTAINER_KEYS,
    ITEM_ID,
    FieldDef,
    describe,
    request_fields,
    setting_fields,
    suggestion,
    top_level_fields,
    value_problems,
)
from batch_engine.manifest.reader import Doc, gc_paused, read_document
from batch_engine.settings import RunSettings
from batch_engine.values import Item, Manifest


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


_REQUEST = {spec.name: spec for spec in request_fields()}
_SETTINGS = {spec.name: spec for spec in setting_fields()}
_TOP = {spec.name: spec for spec in top_level_fields()}
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
        self.doc = Doc()
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

    def run(self, doc: Doc, default_name: str) -> Manifest | None:
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
            self._use_model(model, top, unlisted=root.get("model_unlisted") is True)
        task = root.get("task", catalogue.DEFAULT_TASK)
        self.task_takes_images = catalogue.TASK_TAKES_IMAGES.get(task) if isinstance(task, str) else None
        if isinstance(task, str) and task in catalogue.TASK_TAKES_IMAGES and task not in self.spec.tasks:
            tasks = ", ".join(sorted(self.spec.tasks))
            self.complain(top, "task", f"{self.spec.name} does not do {task}; it does: {tasks}")

    def _use_model(self, model: str, top: _Place, *, unlisted: bool) -> None:
        self.spec = catalogue.spec_for(model)
        known = catalogue.model_spec(model) is not None
        if known and unlisted:
            self.warn(top, "model_unlisted", f"has no effect: {model} is in batch-engine's catalogue")
        elif not known and unlisted:
            self.warn(
                top,
                "model",
                f"{model!r} is not in batch-engine's catalogue; as model_unlisted asks, it is sent as "
                "given, with the gpt-image-2 family's rules assumed (sizes, fields)",
            )
        elif not known:
            self.complain(top, "model", _unknown_model_message(model))

    def _mapping(self, root: dict[Any, Any], key: str, top: _Place) -> dict[Any, Any]:
        value = root.get(key)
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.complain(top, key, f"must be a mapping of field: value, got {describe(value)}")
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
        items = root.get("items", ABSENT)
        if items is ABSENT:
            self.complain(top, "items", "is missing: list the work under items:, e.g. items: [{prompt: ...}]")
            return []
        if not isinstance(items, list) or not items:
            got = "an empty list" if items == [] else describe(items)
            self.complain(top, "items", f"must be a non-empty list of items, got {got}")
            return []
        entries = (self._item(index, value, items, defaults) for index, value in enumerate(items))
        return [entry for entry in entries if entry is not None]

    def _item(self, index: int, value: Any, items: list[Any], defaults: dict[Any, Any]) -> _Entry | None:
        if not isinstance(value, dict):
            message = f"must be a mapping of fields (prompt: ..., images: ...), got {describe(value)}"
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
        given = item.get("id", ABSENT)
        item_id = f"item-{index}" if given is ABSENT else given
        if not isinstance(item_id, str) or value_problems(ITEM_ID, item_id):
            return None  # the field check reports it
        first = self.ids.setdefault(item_id, index)
        if first != index:
            place = _Place(f"items[{index}]", item, index, item_id)
            self.complain(place, "id", self._duplicate_message(item_id, first, given))
        return item_id

    def _duplicate_message(self, item_id: str, first: int, given: Any) -> str:
        items = self.doc.root["items"]
        whose = "its default id" if given is ABSENT else "id"
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
    return f"the manifest must be a mapping (version:, items:, ...), got {describe(root)}"


def _unknown_model_message(model: str) -> str:
    """Every item would be refused (404 model not found): an error, with the catalogue's closest name."""
    known = list(catalogue.MODELS)
    close = difflib.get_close_matches(model, known, n=1)
    hint = f"did you mean {close[0]!r}?" if close else f"the models it knows are {', '.join(known)}."
    return (
        f"{model!r} is not a model batch-engine knows; {hint} To send a model its catalogue does not "
        "list yet, add 'model_unlisted: true' at the top level"
    )


def _unknown_message(key: Any, allowed: Sequence[str]) -> str:
    text = f"unknown field {key!r}"
    home = _HOMES.get(key) if isinstance(key, str) else None
    if home is not None:
        return f"{text} here: {key} belongs {home}"
    hint = suggestion(str(key), allowed)
    return text + (hint if hint else f"; the fields here are: {', '.join(allowed)}")


# ---------------------------------------------------------------------------------------------- public API


def load_manifest(path: str | Path) -> Manifest:
    """Read and validate the manifest at ``path``; raise ``ManifestError`` listing every problem found."""
    validator = _Validator(str(path))
    with gc_paused():
        doc = read_document(Path(path), validator.complain_at)
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
