"""One item's rules: its fields, id, input images and outputs; a raw item in, an `Item` or problems out.

The same `ItemRules` checks every item of a manifest once (`check`, collecting problems and claiming each
item's unique keys), and builds them again whenever the manifest is read (`build`), so no list of items is
ever held. An item's id is given, or made from its content (never from its position: an item inserted at the
top must not make every other look new). Its request is the defaults, then its own fields; local image
paths in it become absolute, and its fingerprint names each local file by its content.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Protocol

from batch_engine.api import catalogue
from batch_engine.manifest import local_files
from batch_engine.manifest.fields import (
    ABSENT,
    ITEM_ID,
    ITEM_META,
    MAX_N,
    describe,
    request_fields,
    unknown_message,
    value_problems,
)
from batch_engine.manifest.sources import ID, IMAGES, META, RawItem, Where
from batch_engine.manifest.unique import Owner, UniqueKeys
from batch_engine.settings import ROUTE_OPENAI_IMAGES, InputsSettings
from batch_engine.store.files import OutputTemplate, safe_stem, stem_key
from batch_engine.values import GENERATED_ID_PREFIX, Item

GENERATED_PREFIX = GENERATED_ID_PREFIX
#: Sizes the OpenAI-format route takes (api-facts.md, "The OpenAI-format route").
OPENAI_IMAGES_SIZES = catalogue.OPENAI_IMAGES_SIZES
_REQUEST = {spec.name: spec for spec in request_fields()}
_ITEM = {ITEM_ID.name: ITEM_ID, ITEM_META.name: ITEM_META, **_REQUEST}
_DATA_URI_WARNING = "is a data: URI, which the API may refuse: prefer a public https:// URL"
_ROUTES_HINT = (
    "settings: {inputs: {upload: s3://bucket/prefix/}} stages them in your object store and sends URLs, or "
    "settings: {inputs: {route: openai-images}} sends the files to the OpenAI-format endpoint"
)


class Place(NamedTuple):
    """Where a group of fields sits, for problem messages: a YAML mapping (lines from the document) or a
    place in an items file."""

    prefix: str  #: "" (top level), "defaults", "settings" or "items[3]"; "" in an items file
    container: Any  #: the YAML mapping, for its lines; None in an items file
    item_index: int | None = None
    item_id: str | None = None
    where: Where | None = None  #: in an items file: its path, the item's line, its columns


class Reporter(Protocol):
    """Where the item rules report to: the validator, which places and counts what they say."""

    problem_count: int

    def complain(self, place: Place, key: Any, message: str, *, entry: int | None = None) -> None: ...
    def warn(self, place: Place, key: Any, message: str, *, entry: int | None = None) -> None: ...
    def item_line(self, position: int) -> int | None: ...


@dataclass
class ItemRules:
    """Everything an item is checked against, fixed once the manifest's header is read."""

    model: str
    task: str
    spec: catalogue.ModelSpec
    takes_images: bool | None  #: None when the task is unknown
    defaults: Mapping[str, Any]
    base: Path  #: local image paths are relative to this folder
    inputs: InputsSettings | None
    output: OutputTemplate
    report: Reporter
    yaml_items: Any = None  #: the inline ``items:`` list (YAML places), or None for an items file
    hashes: local_files.ContentHashes = field(default_factory=local_files.ContentHashes)
    generated: int = 0  #: ids made from the items' contents (counted by `check`)
    sync_mode: bool = False  #: some item asks for enable_sync_mode
    _local_said: bool = False
    _route_said: bool = False

    # -- the two passes

    def check(self, raw: RawItem, keys: UniqueKeys) -> bool:
        """Check one item and claim its keys (id, output files); False when it has a problem (already
        complained of). Every rule is checked, so all of an item's problems are listed at once."""
        return self._build(raw, keys) is not None

    def build(self, raw: RawItem) -> Item:
        """The item again, as `check` saw it, without checking its fields again (half the cost of a
        million-item sync); ValueError if it cannot be built any more (its source changed meanwhile)."""
        item = self._build(raw, None, checked=True)
        if item is None:
            raise ValueError(f"item {raw.position} no longer passes validation (its source changed?)")
        return item

    def _build(self, raw: RawItem, keys: UniqueKeys | None, *, checked: bool = False) -> Item | None:
        fields = raw.fields
        if self.yaml_items is not None and not isinstance(fields, dict):
            place = Place("items", self.yaml_items, raw.position)
            message = f"must be a mapping of fields (prompt: ..., images: ...), got {describe(fields)}"
            self.report.complain(place, raw.position, message)
            return None
        for key, message in raw.problems:
            self.report.complain(self._place(raw, None), key, message)
        if raw.problems:
            return None
        before = self.report.problem_count
        item_id, generated = self._item_id(fields)
        place = self._place(raw, item_id)
        if keys is not None and item_id is not None:
            self._claim_id(item_id, raw, place, keys, generated)
        request = {**self.defaults, **{k: v for k, v in fields.items() if k not in (ID, META)}}
        if not checked:
            self._check_fields(fields, place)
            self._check_required(place, request)
            self._check_output_meta(place, fields)
        fits = self.report.problem_count == before and self._route_fits(place)
        images = self._images(place, request.get(IMAGES)) if fits else None
        if item_id is None or images is None:
            return None
        if images:
            request[IMAGES] = [str(image) for image in images]
        try:
            item = Item(raw.position, item_id, fields, request, self._fingerprint(request, images))
        except ValueError as exc:  # e.g. a 5,000-digit number from the defaults, which their check named
            if not self.report.problem_count:
                self.report.complain(place, None, f"holds a value that cannot be written as JSON: {exc}")
            return None
        if keys is not None and not self._claim_outputs(item, raw, place, keys):
            return None
        if keys is not None:
            self.generated += generated
            self.sync_mode = self.sync_mode or request.get("enable_sync_mode") is True
        return item

    # -- places

    def _place(self, raw: RawItem, item_id: str | None) -> Place:
        if self.yaml_items is not None:
            return Place(f"items[{raw.position}]", raw.fields, raw.position, item_id)
        return Place("", None, raw.position, item_id, raw.where)

    def _where(self, raw: RawItem) -> str:
        if self.yaml_items is None:
            suffix = f":{raw.where.line}" if raw.where.line is not None else ""
            return f"{raw.where.file}{suffix}"
        line = self.report.item_line(raw.position)
        return f"line {line}" if line is not None else f"item {raw.position}"

    # -- fields

    def _check_fields(self, own: Mapping[str, Any], place: Place) -> None:
        for key, value in own.items():
            spec = _ITEM.get(key) if isinstance(key, str) else None
            if spec is None:
                self.report.complain(place, key, unknown_message(key, list(_ITEM)))
                continue
            complaints = value_problems(spec, value)
            for complaint in complaints:
                self.report.complain(place, key, complaint.message, entry=complaint.entry)
            if not complaints:
                self.check_for_model(place, key, value)

    def check_for_model(self, place: Place, key: str, value: Any) -> None:
        """The rules of this model and route for one request field (the defaults' too)."""
        if key == "size":
            self._check_size(place, value)
        elif key == IMAGES and self.takes_images is False:
            self.report.complain(
                place, IMAGES, "text-to-image takes no input images: remove them, or use image-edit"
            )
        elif key == IMAGES:
            for entry, image in enumerate(value):
                if image[:5].lower() == "data:":
                    self.report.warn(place, IMAGES, _DATA_URI_WARNING, entry=entry)
        elif key == "quality" and not self.spec.supports_quality:
            name = self.spec.short_name
            self.report.warn(
                place, key, f"ignored by -plus models: {name} does not take quality, so it is not sent"
            )
        elif key == "background" and value == "transparent" and self.spec.transparent_doubtful:
            self.report.warn(
                place, key, f"transparent backgrounds are reported not to work on {self.spec.short_name}"
            )

    def _check_size(self, place: Place, size: str) -> None:
        if self.inputs is not None and self.inputs.route == ROUTE_OPENAI_IMAGES:
            if size not in OPENAI_IMAGES_SIZES:
                allowed = ", ".join(OPENAI_IMAGES_SIZES)
                self.report.complain(
                    place, "size", f"the openai-images route takes only {allowed}, not {size!r}"
                )
            return
        broken = catalogue.size_problem(self.spec, size)
        if broken is not None:
            self.report.complain(place, "size", broken)

    def _check_required(self, place: Place, request: Mapping[str, Any]) -> None:
        if "prompt" not in request:
            self.report.complain(
                place, "prompt", "is missing: give the item a prompt, or set one under defaults:"
            )
        if self.takes_images and IMAGES not in request:
            self.report.complain(
                place, IMAGES, "is missing: image-edit needs 1 to 16 input images (URLs or local files)"
            )

    def _check_output_meta(self, place: Place, own: Mapping[str, Any]) -> None:
        found = own.get(META)
        meta: Mapping[str, Any] = found if isinstance(found, Mapping) else {}
        for name in self.output.meta_keys:
            value = meta.get(name)
            if value is None or value == "" or isinstance(value, Mapping | list):
                self.report.complain(
                    place, META, f"the output template uses {{meta.{name}}}, which this item has no value for"
                )

    # -- ids

    def _item_id(self, own: Mapping[str, Any]) -> tuple[str | None, bool]:
        given = own.get(ID, ABSENT)
        if given is ABSENT:
            try:
                return generated_id(own), True
            except ValueError:  # a value JSON cannot spell (a 5,000-digit number): the field check says so
                return None, False
        if not isinstance(given, str) or value_problems(ITEM_ID, given):
            return None, False  # the field check reports it
        return given, False

    def _claim_id(self, item_id: str, raw: RawItem, place: Place, keys: UniqueKeys, generated: bool) -> None:
        where = self._where(raw)
        owner = keys.claim("id", stem_key(item_id), position=raw.position, item_id=item_id, where=where)
        if owner is not None:
            self.report.complain(place, ID, self._clash_message(item_id, owner, generated))

    def _claim_outputs(self, item: Item, raw: RawItem, place: Place, keys: UniqueKeys) -> bool:
        where = self._where(raw)
        n = item.request.get("n", 1)
        for k in range(n if isinstance(n, int) and 1 <= n <= MAX_N else 1):  # a bad n is a problem already
            path = self.output.path(item.id, _meta(item), k, "*").casefold()
            owner = keys.claim("output", path, position=item.index, item_id=item.id, where=where)
            if owner is not None and owner.item_id != item.id:
                message = f"writes {path} like item {owner.position} ({owner.item_id!r}, {owner.where}): "
                self.report.complain(
                    place, META, message + "the output template must give each item its own files"
                )
                return False
        return True

    def _clash_message(self, item_id: str, owner: Owner, generated: bool) -> str:
        if owner.item_id == item_id and generated:
            return (
                f"is the same request as item {owner.position} ({owner.where}), and neither has an id: give "
                "them ids (or ask one item for n: 2 images)"
            )
        if owner.item_id == item_id:
            first = f"item {owner.position} ({owner.where})"
            return f"id {item_id!r} is already used by {first}; ids must be unique: rename one"
        return (
            f"id {item_id!r} would write the same output files as item {owner.position} ({owner.item_id!r}, "
            f"{owner.where}) on a case-insensitive file system (macOS, Windows), "
            f"images/{safe_stem(item_id)}-1...; rename one"
        )

    # -- images

    def _images(self, place: Place, images: Any) -> list[str | Path] | None:
        """The request's images with local paths resolved and checked; None after a problem."""
        if not isinstance(images, list):
            return []
        found: list[str | Path] = []
        ok = True
        for entry, image in enumerate(images):
            if not local_files.is_local(image):
                if self.inputs is not None and self.inputs.route == ROUTE_OPENAI_IMAGES:
                    message = "is a URL; the openai-images route sends local files: give a file path"
                    self.report.complain(place, IMAGES, message, entry=entry)
                    ok = False
                found.append(image)
                continue
            path = local_files.resolve(image, self.base)
            problem = local_files.problem(path)
            if problem is None and self.inputs is None:
                ok = False
                self._local_without_route(place, entry)
            elif problem is not None:
                self.report.complain(place, IMAGES, problem, entry=entry)
                ok = False
            found.append(path)
        return found if ok else None

    def _route_fits(self, place: Place) -> bool:
        """Whether the route named for local files serves this model and task; said once, not per item."""
        if self.inputs is None or self.inputs.route != ROUTE_OPENAI_IMAGES:
            return True
        problem = catalogue.openai_images_problem(self.spec, self.task)
        if problem is not None and not self._route_said:
            self._route_said = True
            self.report.complain(place, IMAGES, problem)
        return problem is None

    def _local_without_route(self, place: Place, entry: int) -> None:
        if self._local_said:
            return
        self._local_said = True
        message = (
            f"is a local file, and the API takes only URLs: name a route for local files, {_ROUTES_HINT}"
        )
        self.report.complain(place, IMAGES, message, entry=entry)

    def _fingerprint(self, request: Mapping[str, Any], images: list[str | Path]) -> str:
        if not any(isinstance(image, Path) for image in images):
            return fingerprint(self.model, self.task, request)
        named = [self._content(image) if isinstance(image, Path) else image for image in images]
        return fingerprint(self.model, self.task, {**request, IMAGES: named})

    def _content(self, path: Path) -> str:
        return local_files.CONTENT_PREFIX + self.hashes.digest(path)


def generated_id(own: Mapping[str, Any]) -> str:
    """``auto-`` and 12 hex digits of the item's own request fields (its id and metadata aside)."""
    fields = {key: value for key, value in own.items() if key not in (ID, META)}
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return GENERATED_PREFIX + hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:12]


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


def _meta(item: Item) -> Mapping[str, Any]:
    meta = item.spec.get(META)
    return meta if isinstance(meta, Mapping) else {}
