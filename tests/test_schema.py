"""The manifest's JSON Schema: built from the validator's own field tables, and agreeing with it."""

from __future__ import annotations

import dataclasses
import json
import re
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml

from batch_engine.errors import ManifestError
from batch_engine.manifest import load_manifest
from batch_engine.manifest.fields import (
    CONTAINER_KEYS,
    ITEM_ID,
    NO_DEFAULT,
    FieldDef,
    request_fields,
    setting_fields,
    top_level_fields,
    value_problems,
)
from batch_engine.manifest.schema import SCHEMA_DIALECT, field_schema, manifest_schema
from batch_engine.settings import InputsSettings, RunSettings

URL = "https://example.com/cat.png"
ITEMS = f"items: [{{prompt: a, images: [{URL}]}}]\n"


def schema() -> dict[str, Any]:
    return manifest_schema()


def test_schema_is_json_with_id_and_title() -> None:
    """The schema survives a JSON round trip and declares its dialect, id and title."""
    built = schema()
    assert json.loads(json.dumps(built)) == built
    assert built["$schema"] == SCHEMA_DIALECT
    assert built["$id"]
    assert built["title"]


def test_top_level_properties_are_the_validators() -> None:
    """The top level lists the plain fields and the containers, and requires version and one of items and
    items_from."""
    built = schema()
    expected = [spec.name for spec in top_level_fields()] + list(CONTAINER_KEYS)
    assert list(built["properties"]) == expected
    assert built["required"] == ["version"]
    assert built["oneOf"] == [{"required": ["items"]}, {"required": ["items_from"]}]


def test_every_request_field_appears_in_defaults_and_items() -> None:
    """defaults holds every request field; an item holds id, meta and every request field."""
    built = schema()
    names = [spec.name for spec in request_fields()]
    assert list(built["properties"]["defaults"]["properties"]) == names
    assert list(built["$defs"]["item"]["properties"]) == ["id", "meta", *names]


def test_every_run_setting_appears() -> None:
    """settings lists every RunSettings field, with its dataclass default, then inputs with every
    InputsSettings field."""
    properties = schema()["properties"]["settings"]["properties"]
    assert list(properties) == [*RunSettings.field_names(), "inputs"]
    assert list(properties["inputs"]["properties"]) == list(InputsSettings.field_names())
    for spec in dataclasses.fields(RunSettings):
        assert properties[spec.name]["default"] == spec.default
        assert properties[spec.name]["description"]


def test_every_object_refuses_unknown_keys() -> None:
    """Each object in the schema has additionalProperties: false."""
    built = schema()
    objects = [
        built,
        built["properties"]["defaults"],
        built["properties"]["settings"],
        built["$defs"]["item"],
    ]
    assert all(obj["additionalProperties"] is False for obj in objects)


def all_fields() -> list[FieldDef]:
    return [*top_level_fields(), *request_fields(), ITEM_ID, *setting_fields()]


@pytest.mark.parametrize("spec", all_fields(), ids=lambda spec: spec.name)
def test_field_keywords_equal_the_table(spec: FieldDef) -> None:
    """Each field's type, enum, bounds and pattern are exactly its FieldDef's."""
    built = field_schema(spec)
    if spec.words:  # a number within the bounds, or one of the words (max_in_flight: auto)
        number, words = built.pop("anyOf")
        assert words == {"enum": list(spec.words)}
        built.update(number)
    assert built["type"] == ([spec.type, "null"] if spec.nullable else spec.type)
    assert built.get("enum", []) == list(spec.enum)
    assert built.get("minimum") == spec.minimum
    assert built.get("exclusiveMinimum") == spec.exclusive_minimum
    assert built.get("maximum") == spec.maximum
    length = ("minItems", "maxItems") if spec.type == "array" else ("minLength", "maxLength")
    assert (built.get(length[0]), built.get(length[1])) == (spec.min_length, spec.max_length)
    pattern = built["items"].get("pattern") if spec.type == "array" else built.get("pattern")
    assert pattern == spec.pattern
    assert built.get("default", NO_DEFAULT) == spec.default


@pytest.mark.parametrize("spec", all_fields(), ids=lambda spec: spec.name)
def test_field_examples_pass_the_validator(spec: FieldDef) -> None:
    """Every example the schema shows is a value the validator accepts."""
    for example in field_schema(spec).get("examples", []):
        assert value_problems(spec, example) == []


# A tiny checker for the keywords the schema uses (there is no jsonschema dependency): enough to show that
# the schema and the validator accept and refuse the same manifests, for every rule a field table states.


def schema_errors(node: dict[str, Any], value: Any, root: dict[str, Any]) -> list[str]:
    if "$ref" in node:
        return schema_errors(root["$defs"][node["$ref"].rpartition("/")[2]], value, root)
    if "anyOf" in node:  # max_in_flight: a number in its bounds, or auto
        fits = any(not schema_errors(sub, value, root) for sub in node["anyOf"])
        return [] if fits else [f"anyOf: {value!r}"]
    kinds = node.get("type", [])
    if kinds and not any(is_kind(kind, value) for kind in ([kinds] if isinstance(kinds, str) else kinds)):
        return [f"type {kinds}: {value!r}"]
    if value is None:
        return []
    errors = [f"bound {key}" for key, test in BOUNDS.items() if key in node and not test(node[key], value)]
    return errors + nested_errors(node, value, root)


def nested_errors(node: dict[str, Any], value: Any, root: dict[str, Any]) -> list[str]:
    errors: list[str] = []
    if isinstance(value, list) and "items" in node:
        errors += [e for entry in value for e in schema_errors(node["items"], entry, root)]
    if isinstance(value, dict):
        properties = node.get("properties", {})
        errors += [f"required {key}" for key in node.get("required", []) if key not in value]
        if node.get("additionalProperties") is False:
            errors += [f"unknown {key}" for key in value if key not in properties]
        errors += [
            e for key in value if key in properties for e in schema_errors(properties[key], value[key], root)
        ]
    return errors


def is_kind(kind: str, value: Any) -> bool:
    if isinstance(value, bool):
        return kind == "boolean"
    python: dict[str, type | tuple[type, ...]] = {
        "string": str,
        "integer": int,
        "number": (int, float),
        "array": list,
        "object": dict,
        "null": type(None),
    }
    return kind in python and isinstance(value, python[kind])


BOUNDS: dict[str, Any] = {
    "enum": lambda enum, v: v in enum,
    "minimum": lambda low, v: v >= low,
    "exclusiveMinimum": lambda low, v: v > low,
    "maximum": lambda high, v: v <= high,
    "minLength": lambda low, v: len(v) >= low,
    "maxLength": lambda high, v: len(v) <= high,
    "minItems": lambda low, v: len(v) >= low,
    "maxItems": lambda high, v: len(v) <= high,
    "pattern": lambda pattern, v: re.search(pattern, v) is not None,
}

VALID = {
    "max_in_flight auto": f"version: 1\nsettings: {{max_in_flight: auto}}\n{ITEMS}",
    "minimal": f"version: 1\nitems: [{{prompt: a, images: [{URL}]}}]\n",
    "full": f"""
        version: 1
        name: spring
        model: openai/gpt-image-2
        task: image-edit
        defaults: {{size: 1536x1024, quality: low, background: opaque, response_format: url, n: 2}}
        settings: {{rate: 0.5, max_in_flight: 3, timeout: 60, poll_after: null, adapt: false, max_submits: 0}}
        items:
          - {{id: a, prompt: x, images: [{URL}, "data:image/png;base64,AA"], enable_sync_mode: true}}
    """,
    "text-to-image": "version: 1\nmodel: openai/gpt-image-2\ntask: text-to-image\nitems: [{prompt: a}]\n",
}

INVALID = {
    "unknown top-level key": f"version: 1\nmodle: x\nitems: [{{prompt: a, images: [{URL}]}}]\n",
    "version 2": f"version: 2\nitems: [{{prompt: a, images: [{URL}]}}]\n",
    "version missing": f"items: [{{prompt: a, images: [{URL}]}}]\n",
    "items empty": "version: 1\nitems: []\n",
    "n too big": f"version: 1\nitems: [{{prompt: a, images: [{URL}], n: 11}}]\n",
    "n boolean": f"version: 1\nitems: [{{prompt: a, images: [{URL}], n: true}}]\n",
    "bad quality": f"version: 1\nitems: [{{prompt: a, images: [{URL}], quality: best}}]\n",
    "images string": f"version: 1\nitems: [{{prompt: a, images: {URL}}}]\n",
    "blank image": "version: 1\nitems: [{prompt: a, images: [' ']}]\n",
    "blank prompt": f"version: 1\nitems: [{{prompt: ' ', images: [{URL}]}}]\n",
    "malformed size": f"version: 1\nitems: [{{prompt: a, images: [{URL}], size: big}}]\n",
    "integer id": f"version: 1\nitems: [{{id: 7, prompt: a, images: [{URL}]}}]\n",
    "malformed model": f"version: 1\nmodel: gpt\nitems: [{{prompt: a, images: [{URL}]}}]\n",
    "unknown default": f"version: 1\ndefaults: {{sise: auto}}\nitems: [{{prompt: a, images: [{URL}]}}]\n",
    "unknown setting": f"version: 1\nsettings: {{speed: 1}}\n{ITEMS}",
    "rate zero": f"version: 1\nsettings: {{rate: 0}}\n{ITEMS}",
    "fractional max_in_flight": f"version: 1\nsettings: {{max_in_flight: 2.5}}\n{ITEMS}",
    "max_in_flight a word not auto": f"version: 1\nsettings: {{max_in_flight: many}}\n{ITEMS}",
}


def validator_accepts(tmp_path: Path, text: str) -> bool:
    path = tmp_path / "example.yaml"
    path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    try:
        load_manifest(path)
    except ManifestError:
        return False
    return True


@pytest.mark.parametrize(("name", "text"), [*VALID.items(), *INVALID.items()], ids=[*VALID, *INVALID])
def test_schema_and_validator_agree(tmp_path: Path, name: str, text: str) -> None:
    """For manifests that break (or keep) field-table rules, the schema and the validator give one verdict."""
    built = schema()
    errors = schema_errors(built, yaml.safe_load(textwrap.dedent(text)), built)
    expected_valid = name in VALID
    assert validator_accepts(tmp_path, text) is expected_valid
    assert (errors == []) is expected_valid, errors


JOBS = sorted((Path(__file__).parent.parent / "jobs").glob("*.yaml"))


@pytest.mark.skipif(not JOBS, reason="no example manifests in jobs/")
@pytest.mark.parametrize("path", JOBS, ids=[path.name for path in JOBS])
def test_example_jobs_pass_the_validator_and_the_schema(path: Path) -> None:
    """Every example manifest shipped in jobs/ is valid to both the validator and the schema."""
    load_manifest(path)
    built = schema()
    assert schema_errors(built, yaml.safe_load(path.read_text(encoding="utf-8")), built) == []
