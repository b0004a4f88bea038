"""Validate a manifest: a ``Manifest``, or a ``ManifestError`` listing every problem, each with its place.

The header (version, name, model, task, defaults, settings, output) is checked here; the items, inline under
``items:`` or from ``items_from:`` (a CSV or JSONL file, or a folder of images), by `items.ItemRules`, in one
streaming pass that also keeps ids and output files unique (`unique.UniqueKeys`). Each broken rule is one
``Problem``; all of them are collected (the first ``MAX_LISTED`` listed, the rest counted) before raising.
The manifest returned reads its items again from their source whenever they are asked for.
"""

from __future__ import annotations

import difflib
import functools
from collections.abc import Collection, Iterator, Mapping
from pathlib import Path
from typing import Any

from batch_engine.api import catalogue
from batch_engine.errors import ManifestError, Problem, UsageError
from batch_engine.manifest import sources
from batch_engine.manifest.fields import (
    ABSENT,
    CONTAINER_KEYS,
    INPUTS_FIELDS,
    ITEMS_FROM_GLOB,
    FieldDef,
    describe,
    request_fields,
    setting_fields,
    top_level_fields,
    unknown_message,
    value_problems,
)
from batch_engine.manifest.items import GENERATED_PREFIX, ItemRules, Place, fingerprint, generated_id
from batch_engine.manifest.reader import Doc, gc_paused, read_document
from batch_engine.manifest.sources import RawItem, SourceError, Where
from batch_engine.manifest.unique import UniqueKeys
from batch_engine.settings import InputsSettings, RunSettings
from batch_engine.store.files import DEFAULT_OUTPUT, OutputTemplate
from batch_engine.values import Item, Manifest

MAX_LISTED = 200  #: problems listed in full; beyond, they are counted

_REQUEST = {spec.name: spec for spec in request_fields()}
_SETTINGS = {spec.name: spec for spec in setting_fields()}
_INPUTS = {spec.name: spec for spec in INPUTS_FIELDS}
_TOP = {spec.name: spec for spec in top_level_fields()}
_FOLDER = {ITEMS_FROM_GLOB.name: ITEMS_FROM_GLOB, **_REQUEST}
_TOP_KEYS = (*_TOP, *CONTAINER_KEYS)
_ITEM_FIELDS = ("id", "meta", *_REQUEST)
_ITEMS_FILES = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}

__all__ = ["fingerprint", "generated_id", "load_manifest"]


class _Validator:
    """Checks one manifest against every rule, collecting problems and warnings as it goes."""

    def __init__(self, file: str) -> None:
        self.file = file
        self.doc = Doc()
        self.problems: list[tuple[str, int, int, Problem]] = []
        self.problem_count = 0  #: every problem found, listed or not
        self.warnings: list[tuple[int, int, str]] = []
        self.item_warnings: dict[tuple[str, str], tuple[Problem, int]] = {}  #: first place, and how many
        self.spec = catalogue.spec_for(catalogue.DEFAULT_MODEL)
        self.takes_images: bool | None = True  #: None when the task is unknown

    # -- reporting

    def complain_at(self, message: str, line: int | None) -> None:
        """A problem of the file as a whole, or of the line given."""
        self._add(Problem(self.file, message, line=line))

    def complain(self, place: Place, key: Any, message: str, *, entry: int | None = None) -> None:
        self._add(self._problem(place, key, message, entry))

    def warn(self, place: Place, key: Any, message: str, *, entry: int | None = None) -> None:
        where = self._problem(place, key, message, entry)
        if place.item_index is None:
            self.warnings.append((where.line or 0, len(self.warnings), str(where)))
            return
        said = (_path("", key, entry), message)  # the same warning on many items is said once, with a count
        first, count = self.item_warnings.get(said, (where, 0))
        self.item_warnings[said] = (first, count + 1)

    def item_line(self, position: int) -> int | None:
        items = self.doc.root.get("items") if isinstance(self.doc.root, dict) else None
        return self.doc.line(items, position) if isinstance(items, list) else None

    def _add(self, problem: Problem) -> None:
        self.problem_count += 1
        if len(self.problems) < MAX_LISTED:
            self.problems.append((problem.file, problem.line or 0, len(self.problems), problem))

    def _problem(self, place: Place, key: Any, message: str, entry: int | None) -> Problem:
        if place.where is not None:  # an items file: its own path, the item's line, the field's column
            column = place.where.column(key) if isinstance(key, str) else None
            field = _path("", key, entry) or None
            return Problem(
                place.where.file, message, field, place.item_index, place.item_id, place.where.line, column
            )
        path = _path(place.prefix, key, entry)
        line = self._line(place.container, key, entry)
        return Problem(self.file, message, path or None, place.item_index, place.item_id, line)

    def _line(self, container: Any, key: Any, entry: int | None) -> int | None:
        if entry is not None and isinstance(container, dict) and key in container:
            return self.doc.line(container[key], entry)
        return self.doc.line(container, key)

    # -- the document

    def run(self, doc: Doc, path: Path) -> Manifest | None:
        """The manifest, or None when any problem was found (reading problems included)."""
        self.doc = doc
        root = doc.root
        top = Place("", root)
        if not isinstance(root, dict):
            self.complain(top, None, _root_message(root))
            return None
        self._check_keys(root, top, _TOP_KEYS)
        self._check_fields(root, top, _TOP)
        self._check_top(root, top)
        defaults = self._mapping(root, "defaults", top)
        settings = self._mapping(root, "settings", top)
        inputs = self._check_settings(settings, Place("settings", settings))
        output = self._check_output(root, top)
        rules = self._rules(root, path, defaults, inputs, output)
        self._check_defaults(defaults, rules)
        reader = self._reader(root, top, path, rules)
        if reader is None:
            return None
        count = self._check_items(reader, rules)
        if self.problem_count:
            return None
        return self._manifest(root, path, defaults, settings, reader, rules, count)

    def _check_top(self, root: dict[Any, Any], top: Place) -> None:
        if "version" not in root:
            self.complain(top, "version", "is missing: write 'version: 1' at the top of the manifest")
        model = root.get("model", catalogue.DEFAULT_MODEL)
        if isinstance(model, str) and catalogue.is_model_name(model):
            self._use_model(model, top, unlisted=root.get("model_unlisted") is True)
        task = root.get("task", catalogue.DEFAULT_TASK)
        self.takes_images = catalogue.TASK_TAKES_IMAGES.get(task) if isinstance(task, str) else None
        if isinstance(task, str) and task in catalogue.TASK_TAKES_IMAGES and task not in self.spec.tasks:
            tasks = ", ".join(sorted(self.spec.tasks))
            self.complain(top, "task", f"{self.spec.name} does not do {task}; it does: {tasks}")

    def _use_model(self, model: str, top: Place, *, unlisted: bool) -> None:
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

    def _mapping(self, root: dict[Any, Any], key: str, top: Place) -> dict[Any, Any]:
        value = root.get(key)
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.complain(top, key, f"must be a mapping of field: value, got {describe(value)}")
            return {}
        return value

    def _check_output(self, root: dict[Any, Any], top: Place) -> OutputTemplate:
        text = root.get("output", DEFAULT_OUTPUT)
        if not isinstance(text, str):
            return OutputTemplate()  # the field check reports it
        template = OutputTemplate(text)
        for problem in template.problems():
            self.complain(top, "output", f'{problem}; e.g. output: "{{meta.category}}/{{id}}-{{k}}.{{ext}}"')
        return template

    # -- fields

    def _check_keys(self, values: dict[Any, Any], place: Place, allowed: Collection[str]) -> None:
        for key in values:
            if key not in allowed:
                self.complain(place, key, unknown_message(key, list(allowed)))

    def _check_fields(self, values: dict[Any, Any], place: Place, specs: Mapping[str, FieldDef]) -> bool:
        before = self.problem_count
        for key, value in values.items():
            spec = specs.get(key)
            if spec is None:
                continue
            for complaint in value_problems(spec, value):
                self.complain(place, key, complaint.message, entry=complaint.entry)
        return self.problem_count == before

    def _check_defaults(self, defaults: dict[Any, Any], rules: ItemRules) -> None:
        place = Place("defaults", defaults)
        self._check_keys(defaults, place, _REQUEST)
        for key, value in defaults.items():
            spec = _REQUEST.get(key)
            if spec is not None and self._check_fields({key: value}, place, _REQUEST):
                rules.check_for_model(place, key, value)

    def _check_settings(self, settings: dict[Any, Any], place: Place) -> InputsSettings | None:
        before = self.problem_count
        self._check_keys(settings, place, (*_SETTINGS, "inputs"))
        plain = {key: value for key, value in settings.items() if key != "inputs"}
        self._check_fields(plain, place, _SETTINGS)
        inputs = self._check_inputs(settings.get("inputs"), place)
        if self.problem_count > before or not plain:
            return inputs
        try:
            RunSettings.build(plain, {})  # build: ``max_in_flight: auto`` reads as absent
        except (UsageError, TypeError) as exc:  # rules across settings, e.g. rate_min <= rate
            self.complain(Place("", self.doc.root), "settings", str(exc))
        return inputs

    def _check_inputs(self, value: Any, settings: Place) -> InputsSettings | None:
        if value is None:
            return None
        if not isinstance(value, dict):
            self.complain(
                settings,
                "inputs",
                f"must be a mapping (upload: s3://..., or route: ...), got {describe(value)}",
            )
            return None
        place = Place("settings.inputs", value)
        self._check_keys(value, place, _INPUTS)
        if not self._check_fields(value, place, _INPUTS) or set(value) - set(_INPUTS):
            return None
        try:
            return InputsSettings(**value)
        except UsageError as exc:
            self.complain(settings, "inputs", str(exc).removeprefix("inputs: "))
            return None

    # -- items

    def _rules(
        self,
        root: dict[Any, Any],
        path: Path,
        defaults: dict[Any, Any],
        inputs: InputsSettings | None,
        output: OutputTemplate,
    ) -> ItemRules:
        model = root.get("model", catalogue.DEFAULT_MODEL)
        task = root.get("task", catalogue.DEFAULT_TASK)
        return ItemRules(
            model=model if isinstance(model, str) else catalogue.DEFAULT_MODEL,
            task=task if isinstance(task, str) else catalogue.DEFAULT_TASK,
            spec=self.spec,
            takes_images=self.takes_images,
            defaults=defaults,
            base=path.resolve().parent,
            inputs=inputs,
            output=output,
            report=self,
        )

    def _reader(
        self, root: dict[Any, Any], top: Place, path: Path, rules: ItemRules
    ) -> sources.Reader | None:
        """How to read the items again and again: from the document, or from the source items_from names."""
        inline, source = root.get("items", ABSENT), root.get("items_from", ABSENT)
        if inline is not ABSENT and source is not ABSENT:
            self.complain(
                top, "items_from", "give the items either under items: or with items_from:, not both"
            )
            return None
        if source is not ABSENT:
            return self._source(source, top, rules)
        if inline is ABSENT:
            self.complain(
                top,
                "items",
                "is missing: list the work under items:, or name a file or folder in items_from:",
            )
            return None
        if not isinstance(inline, list) or not inline:
            got = "an empty list" if inline == [] else describe(inline)
            self.complain(top, "items", f"must be a non-empty list of items, got {got}")
            return None
        rules.yaml_items = inline
        where = Where(self.file)
        return lambda: (RawItem(position, item, where) for position, item in enumerate(inline))

    def _source(self, value: Any, top: Place, rules: ItemRules) -> sources.Reader | None:
        if isinstance(value, str) and value.strip():
            return self._items_file(value, top, rules)
        if not isinstance(value, dict):
            got = describe(value)
            self.complain(
                top, "items_from", f"must name a CSV or JSONL file, or be {{glob: ..., ...}}, got {got}"
            )
            return None
        return self._folder(value, rules)

    def _items_file(self, text: str, top: Place, rules: ItemRules) -> sources.Reader | None:
        path = Path(text).expanduser()
        path = path if path.is_absolute() else rules.base / path
        kind = _ITEMS_FILES.get(path.suffix.lower())
        if path.is_dir():
            self.complain(
                top, "items_from", f'{path} is a folder: write items_from: {{glob: "{text}/*.jpg"}}'
            )
            return None
        if kind is None:
            self.complain(top, "items_from", f"{path.name} is not a .csv or .jsonl file")
            return None
        if not path.is_file():
            self.complain(top, "items_from", f"{path} does not exist")
            return None
        rules.base = path.parent
        if kind == "csv":
            return functools.partial(sources.read_csv, path, tuple(_REQUEST))
        return functools.partial(sources.read_jsonl, path, _ITEM_FIELDS)

    def _folder(self, value: dict[Any, Any], rules: ItemRules) -> sources.Reader | None:
        place = Place("items_from", value)
        self._check_keys(value, place, _FOLDER)
        if "glob" not in value:
            self.complain(place, "glob", 'is missing: e.g. items_from: {glob: "photos/*.jpg", prompt: ...}')
        if not self._check_fields(value, place, _FOLDER) or "glob" not in value:
            return None
        prompt = value.get("prompt")
        unknown = (
            sources.unknown_placeholders(prompt, sources.FOLDER_PLACEHOLDERS)
            if isinstance(prompt, str)
            else []
        )
        for name in unknown:
            known = ", ".join(f"{{{n}}}" for n in sources.FOLDER_PLACEHOLDERS)
            self.complain(
                place, "prompt", f"{{{name}}} is not a placeholder of a folder's items: use {known}"
            )
        fixed = {key: item for key, item in value.items() if key != "glob"}
        return functools.partial(sources.read_folder, rules.base, value["glob"], fixed)

    def _check_items(self, reader: sources.Reader, rules: ItemRules) -> int:
        count = 0
        try:
            with UniqueKeys() as keys:
                for raw in reader():
                    rules.check(raw, keys)
                    count += 1
        except SourceError as exc:
            self.complain(Place("", self.doc.root), "items_from", str(exc))
        if count == 0 and not self.problem_count:
            self.complain(Place("", self.doc.root), "items_from", "holds no items")
        return count

    # -- the result

    def _manifest(
        self,
        root: dict[Any, Any],
        path: Path,
        defaults: dict[Any, Any],
        settings: dict[Any, Any],
        reader: sources.Reader,
        rules: ItemRules,
        count: int,
    ) -> Manifest:
        notes = []
        if rules.generated:
            notes.append(
                f"{rules.generated:,} of {count:,} item(s) have no id: each was given one made from its "
                f"request ({GENERATED_PREFIX}<hash>), so editing an item gives it a new id"
            )
        return Manifest(
            path=self.file,
            name=root.get("name", path.stem),
            model=rules.model,
            task=rules.task,
            defaults=defaults,
            settings=settings,
            item_source=functools.partial(_items, reader, rules),
            count=count,
            warnings=self.collected_warnings(),
            notes=tuple(notes),
            output=rules.output.text,
            inputs=rules.inputs,
            sync_mode=rules.sync_mode,
        )

    def collected_warnings(self) -> tuple[str, ...]:
        found = list(self.warnings)
        for first, count in self.item_warnings.values():
            more = f" (and {count - 1:,} more items)" if count > 1 else ""
            found.append((first.line or 0, len(found), str(first) + more))
        return tuple(text for _, _, text in sorted(found))

    def error(self) -> ManifestError:
        listed = [problem for *_, problem in sorted(self.problems, key=lambda p: p[:3])]
        return ManifestError(listed, more=self.problem_count - len(listed))


def _items(reader: sources.Reader, rules: ItemRules) -> Iterator[Item]:
    for raw in reader():
        try:
            yield rules.build(raw)
        except ValueError as exc:
            raise ManifestError([Problem(raw.where.file, str(exc), line=raw.where.line)]) from exc


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


# ---------------------------------------------------------------------------------------------- public API


def load_manifest(path: str | Path) -> Manifest:
    """Read and validate the manifest at ``path``; raise ``ManifestError`` listing every problem found."""
    validator = _Validator(str(path))
    with gc_paused():
        doc = read_document(Path(path), validator.complain_at)
        manifest = validator.run(doc, Path(path)) if doc is not None else None
    if manifest is None:
        raise validator.error()
    return manifest
