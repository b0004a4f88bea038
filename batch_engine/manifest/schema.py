"""The manifest's JSON Schema (draft 2020-12), generated from the field tables the validator itself uses.

The schema carries every rule a field table states (types, enums, ranges, lengths, patterns, unknown keys).
Rules that depend on the model or on other fields (size per model, a prompt given by the item or by defaults,
images by task, unique ids, settings that bound each other) are the validator's alone; the descriptions
mention them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import yaml

from batch_engine.api import catalogue
from batch_engine.manifest.fields import (
    INPUTS_FIELDS,
    ITEM_ID,
    ITEM_META,
    ITEMS_FROM_GLOB,
    NO_DEFAULT,
    FieldDef,
    request_fields,
    setting_fields,
    top_level_fields,
)

SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"
SCHEMA_ID = "urn:batch-engine:manifest:1"


def manifest_schema() -> dict[str, Any]:
    """The JSON Schema of a manifest, as a JSON-ready dict."""
    return {
        "$schema": SCHEMA_DIALECT,
        "$id": SCHEMA_ID,
        "title": "batch-engine manifest",
        "description": "A batch of image requests for GPTProto's prediction API, run by batch-engine.",
        "type": "object",
        "required": ["version"],
        "oneOf": [{"required": ["items"]}, {"required": ["items_from"]}],
        "additionalProperties": False,
        "properties": {
            **{spec.name: field_schema(spec) for spec in top_level_fields()},
            "defaults": _object(
                request_fields(), "Request fields applied to every item that does not set them itself."
            ),
            "settings": _settings(),
            "items": {
                "description": "The work: one request per item.",
                "type": "array",
                "minItems": 1,
                "items": {"$ref": "#/$defs/item"},
            },
            "items_from": _items_from(),
        },
        "$defs": {"item": _object((ITEM_ID, ITEM_META, *request_fields()), _ITEM_DESCRIPTION)},
    }


def _settings() -> dict[str, Any]:
    schema = _object(setting_fields(), "Run settings; command-line flags override them.")
    inputs = _object(INPUTS_FIELDS, "How local input files reach the API: upload: or route: openai-images.")
    schema["properties"]["inputs"] = inputs
    return schema


def _items_from() -> dict[str, Any]:
    folder = _object((ITEMS_FROM_GLOB, *request_fields()), _FOLDER_DESCRIPTION)
    folder["required"] = [ITEMS_FROM_GLOB.name]
    return {
        "description": "Items from a file or a folder instead of items: (defaults apply, items override).",
        "oneOf": [
            {"type": "string", "description": _FILE_DESCRIPTION, "pattern": r"\\.(csv|jsonl|ndjson)$"},
            folder,
        ],
    }


_FILE_DESCRIPTION = (
    "A CSV file with a header row (id, prompt, images separated by |, or image_1 ... image_N, and any "
    "request field as a column; other columns are the item's metadata) or a JSONL file of one item object "
    "per line; relative to the manifest's folder."
)
_FOLDER_DESCRIPTION = (
    "One item per file the glob matches, the file as its image, its id the path below the folder without the "
    "extension; {stem}, {name} and {relpath} in the prompt are the file's."
)


_ITEM_DESCRIPTION = (
    "One request: the defaults, overridden by the item's own fields. ids must be unique. "
    f"prompt is required here or in defaults; images is required for {catalogue.IMAGE_EDIT} and not allowed "
    f"for {catalogue.TEXT_TO_IMAGE}. size must also satisfy the model's rules."
)


def _object(specs: Iterable[FieldDef], description: str) -> dict[str, Any]:
    return {
        "description": description,
        "type": "object",
        "additionalProperties": False,
        "properties": {spec.name: field_schema(spec) for spec in specs},
    }


def field_schema(spec: FieldDef) -> dict[str, Any]:
    """One field's schema: its type, then every bound its ``FieldDef`` states."""
    schema: dict[str, Any] = {
        "description": spec.description,
        "type": [spec.type, "null"] if spec.nullable else spec.type,
    }
    schema.update(_bounds(spec) if spec.type != "array" else _array_bounds(spec))
    if spec.words:  # a number, or one of the words that mean "pick it for me"
        number = {key: schema.pop(key) for key in list(schema) if key != "description"}
        schema["anyOf"] = [number, {"enum": list(spec.words)}]
    if spec.default is not NO_DEFAULT:
        schema["default"] = spec.default
    if spec.example:
        schema["examples"] = [yaml.safe_load(spec.example)]
    return schema


def _bounds(spec: FieldDef) -> dict[str, Any]:
    keywords = {
        "enum": list(spec.enum) or None,
        "minimum": spec.minimum,
        "exclusiveMinimum": spec.exclusive_minimum,
        "maximum": spec.maximum,
        "minLength": spec.min_length,
        "maxLength": spec.max_length,
        "pattern": spec.pattern,
    }
    return {keyword: value for keyword, value in keywords.items() if value is not None}


def _array_bounds(spec: FieldDef) -> dict[str, Any]:
    entries: dict[str, Any] = {"type": "string"}
    if spec.pattern is not None:
        entries["pattern"] = spec.pattern
    keywords = {"minItems": spec.min_length, "maxItems": spec.max_length, "items": entries}
    return {keyword: value for keyword, value in keywords.items() if value is not None}
