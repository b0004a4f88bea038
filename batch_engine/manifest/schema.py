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
    ITEM_ID,
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
        "required": ["version", "items"],
        "additionalProperties": False,
        "properties": {
            **{spec.name: field_schema(spec) for spec in top_level_fields()},
            "defaults": _object(
                request_fields(), "Request fields applied to every item that does not set them itself."
            ),
            "settings": _object(setting_fields(), "Run settings; command-line flags override them."),
            "items": {
                "description": "The work: one request per item.",
                "type": "array",
                "minItems": 1,
                "items": {"$ref": "#/$defs/item"},
            },
        },
        "$defs": {"item": _object((ITEM_ID, *request_fields()), _ITEM_DESCRIPTION)},
    }


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
