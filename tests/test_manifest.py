"""Manifest loading and validation: one test per rule, plus the model table the rules read."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest
import yaml

from batch_engine.api import catalogue
from batch_engine.errors import ManifestError, Problem
from batch_engine.manifest import fields, fingerprint, load_manifest, reader
from batch_engine.manifest.items import generated_id
from batch_engine.sim.drawing import render_output
from batch_engine.values import Manifest

URL = "https://example.com/cat.png"


def write(tmp_path: Path, text: str, name: str = "job.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return path


def load(tmp_path: Path, text: str) -> Manifest:
    return load_manifest(write(tmp_path, text))


def problems(tmp_path: Path, text: str) -> list[Problem]:
    with pytest.raises(ManifestError) as caught:
        load(tmp_path, text)
    return caught.value.problems


def one(tmp_path: Path, text: str) -> Problem:
    found = problems(tmp_path, text)
    assert len(found) == 1, "\n".join(map(str, found))
    return found[0]


def with_items(items: str, head: str = "") -> str:
    """A manifest with ``version: 1`` on line 1, then ``head``, then ``items:`` and the given items."""
    return "version: 1\n" + textwrap.dedent(head) + "items:\n" + textwrap.indent(textwrap.dedent(items), "  ")


# ------------------------------------------------------------------------------------------ the result


def test_valid_manifest_loads_with_defaults_applied(tmp_path: Path) -> None:
    """A minimal manifest gets the default name, model, task and item ids."""
    manifest = load(tmp_path, with_items(f"- prompt: a\n  images: [{URL}]\n"))
    assert manifest.name == "job"
    assert manifest.model == "openai/gpt-image-2-plus"
    assert manifest.task == "image-edit"
    assert manifest.path == str(tmp_path / "job.yaml")
    [item] = manifest.iter_items()
    assert item.id.startswith("auto-")
    assert manifest.notes == (
        "1 of 1 item(s) have no id: each was given one made from its request (auto-<hash>), so editing an "
        "item gives it a new id",
    )
    assert manifest.warnings == ()


def test_defaults_merge_into_request_but_not_into_spec(tmp_path: Path) -> None:
    """Item fields override defaults in ``request``; ``spec`` is the item as written, id included."""
    text = with_items(
        "- id: a\n  prompt: one\n  size: 1536x1024\n- prompt: two\n",
        head=f"defaults:\n  size: 1024x1024\n  images: [{URL}]\n",
    )
    first, second = load(tmp_path, text).iter_items()
    assert first.spec == {"id": "a", "prompt": "one", "size": "1536x1024"}
    assert first.request == {"size": "1536x1024", "images": [URL], "prompt": "one"}
    assert second.request == {"size": "1024x1024", "images": [URL], "prompt": "two"}
    assert (second.index, second.id) == (1, generated_id({"prompt": "two"}))


def test_fingerprint_is_the_canonical_hash_of_model_task_and_request(tmp_path: Path) -> None:
    """Each item's fingerprint is ``fingerprint(model, task, request)``."""
    manifest = load(tmp_path, with_items(f"- prompt: a\n  images: [{URL}]\n"))
    item = next(manifest.iter_items())
    assert item.fingerprint == fingerprint(manifest.model, manifest.task, item.request)
    assert len(item.fingerprint) == 64


def test_fingerprint_is_stable_across_key_order_and_defaults(tmp_path: Path) -> None:
    """The same request, written in another order or through defaults, has the same fingerprint."""
    inline = next(load(tmp_path, with_items(f"- prompt: a\n  images: [{URL}]\n  n: 2\n")).iter_items())
    via_defaults = load(tmp_path, with_items("- n: 2\n  prompt: a\n", head=f"defaults:\n  images: [{URL}]\n"))
    assert next(via_defaults.iter_items()).fingerprint == inline.fingerprint


def test_fingerprint_changes_with_model_task_and_every_field() -> None:
    """Changing the model, the task or any request value changes the fingerprint."""
    base = fingerprint("openai/gpt-image-2", "image-edit", {"prompt": "a", "images": [URL]})
    assert base == fingerprint("openai/gpt-image-2", "image-edit", {"images": [URL], "prompt": "a"})
    others = {
        fingerprint("openai/gpt-image-1", "image-edit", {"prompt": "a", "images": [URL]}),
        fingerprint("openai/gpt-image-2", "text-to-image", {"prompt": "a", "images": [URL]}),
        fingerprint("openai/gpt-image-2", "image-edit", {"prompt": "b", "images": [URL]}),
        fingerprint("openai/gpt-image-2", "image-edit", {"prompt": "a", "images": [URL], "n": 1}),
    }
    assert base not in others
    assert len(others) == 4


def test_settings_are_kept_as_written(tmp_path: Path) -> None:
    """Valid settings come back as written, unconverted."""
    text = with_items(f"- prompt: a\n  images: [{URL}]\n", head="settings:\n  rate: 2\n  poll_after: null\n")
    assert load(tmp_path, text).settings == {"rate": 2, "poll_after": None}


# --------------------------------------------------------------------------------------------- reading


def test_problem_names_file_item_id_field_and_line(tmp_path: Path) -> None:
    """A problem in an item names the file, the item's index and id, the dotted field and the line."""
    problem = one(tmp_path, with_items(f"- id: sku-1\n  prompt: a\n  images: [{URL}]\n  n: 11\n"))
    assert (problem.item_index, problem.item_id, problem.field, problem.line) == (0, "sku-1", "items[0].n", 6)
    assert problem.file == str(tmp_path / "job.yaml")
    assert str(problem).startswith(f"{tmp_path / 'job.yaml'}:6: item 0 ('sku-1'): items[0].n: ")


def test_missing_file_is_one_problem(tmp_path: Path) -> None:
    """A path that does not exist is reported, not raised as OSError."""
    with pytest.raises(ManifestError) as caught:
        load_manifest(tmp_path / "nope.yaml")
    assert "no such file" in caught.value.problems[0].message


def test_malformed_yaml_reports_line_and_column(tmp_path: Path) -> None:
    """Broken YAML is one problem located at the parser's mark."""
    problem = one(tmp_path, "version: 1\nitems:\n  - prompt: [unclosed\n  - x: y\nz: : :\n")
    assert problem.message.startswith("invalid YAML:")
    assert "column" in problem.message
    assert problem.line is not None
    assert problem.line >= 3


@pytest.mark.parametrize(
    "tagged",
    [
        "!!python/object/apply:os.system ['touch pwned']",
        "!!python/name:os.system",
        "!!binary aGVsbG8=",
        "!custom value",
        "!!set {a, b}",
    ],
)
def test_tags_are_refused(tmp_path: Path, tagged: str) -> None:
    """Tags that would build anything but plain values are a problem on their line; nothing is built."""
    found = problems(tmp_path, f"version: 1\nname: {tagged}\nitems: [{{prompt: a, images: [{URL}]}}]\n")
    assert any("tag" in p.message and p.line == 2 for p in found), found
    assert not (tmp_path / "pwned").exists()


def test_file_over_the_size_limit_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file larger than MAX_MANIFEST_BYTES is refused before it is parsed."""
    monkeypatch.setattr(reader, "MAX_MANIFEST_BYTES", 64)
    problem = one(tmp_path, with_items(f"- prompt: {'a' * 100}\n  images: [{URL}]\n"))
    assert "bytes" in problem.message
    assert "refused" in problem.message


def test_billion_laughs_is_refused(tmp_path: Path) -> None:
    """Nine levels of nine aliases (10^9 values) are refused, naming the limit, before they are expanded."""
    levels = ['a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for prev, name in zip("abcdefgh", "bcdefghi", strict=True):
        levels.append(f"{name}: &{name} [{', '.join([f'*{prev}'] * 9)}]")
    path = write(tmp_path, "version: 1\n" + "\n".join(levels) + "\nitems: *i\n")
    with pytest.raises(ManifestError) as caught:
        load_manifest(path)
    [problem] = caught.value.problems
    assert "billion laughs" in problem.message
    assert f"{fields.MAX_NODES:,}" in problem.message


def test_aliases_under_the_limit_are_expanded(tmp_path: Path) -> None:
    """Anchors, aliases and merge keys work as in SafeLoader; explicit keys win over merged ones."""
    text = with_items(
        "- &first {prompt: a, images: &imgs ["
        + URL
        + "], n: 2}\n- {<<: *first, prompt: b}\n- {prompt: c, images: *imgs}\n"
    )
    first, second, third = load(tmp_path, text).iter_items()
    assert second.request == {"prompt": "b", "images": [URL], "n": 2}
    assert third.request["images"] == first.request["images"] == [URL]


def test_recursive_alias_is_refused(tmp_path: Path) -> None:
    """An alias inside the value it names is a problem, not an infinite structure."""
    found = problems(tmp_path, with_items(f"- &loop {{prompt: a, images: [{URL}], n: *loop}}\n"))
    assert any("recursive" in p.message and p.line == 3 for p in found), found


def test_undefined_alias_is_refused(tmp_path: Path) -> None:
    """An alias to no anchor is a problem on its line."""
    found = problems(tmp_path, with_items("- {prompt: *nowhere, images: [" + URL + "]}\n"))
    assert any("*nowhere" in p.message and p.line == 3 for p in found), found


def test_duplicate_yaml_keys_are_refused(tmp_path: Path) -> None:
    """A key written twice in one mapping is a problem naming both lines."""
    problem = one(tmp_path, with_items(f"- prompt: a\n  images: [{URL}]\n  prompt: b\n"))
    assert problem.line == 5
    assert "'prompt' appears twice" in problem.message
    assert "line 3" in problem.message


def test_more_than_one_document_is_refused(tmp_path: Path) -> None:
    """A second YAML document in the file is a problem."""
    problem = one(tmp_path, with_items(f"- prompt: a\n  images: [{URL}]\n") + "---\nversion: 1\n")
    assert "more than one YAML document" in problem.message


def test_pure_python_loader_gives_the_same_result(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without libyaml the pure-Python SafeLoader reads the same values and lines."""
    text = with_items(f"- id: x\n  prompt: a\n  images: [{URL}]\n  n: 0\n")
    fast = problems(tmp_path, text)
    monkeypatch.setattr(reader, "_LOADER", yaml.SafeLoader)
    assert problems(tmp_path, text) == fast
    assert fast[0].line == 6


# ------------------------------------------------------------------------------------------- top level


@pytest.mark.parametrize(
    ("text", "words"),
    [("", "empty"), ("- a\n- b\n", "must be a mapping"), ("just text\n", "must be a mapping")],
)
def test_top_level_must_be_a_mapping(tmp_path: Path, text: str, words: str) -> None:
    """An empty file, a list or a string at the top level is one problem."""
    assert words in one(tmp_path, text).message


def test_unknown_top_level_key_suggests_the_close_one(tmp_path: Path) -> None:
    """A misspelt top-level key gets a "did you mean" suggestion."""
    problem = one(tmp_path, with_items(f"- prompt: a\n  images: [{URL}]\n", head="modle: x/y\n"))
    assert (problem.field, problem.line) == ("modle", 2)
    assert "did you mean 'model'?" in problem.message


def test_request_field_at_top_level_says_where_it_belongs(tmp_path: Path) -> None:
    """A request field at the top level is pointed to items or defaults."""
    problem = problems(tmp_path, with_items(f"- images: [{URL}]\n", head="prompt: a\n"))[0]
    assert (problem.field, problem.line) == ("prompt", 2)
    assert "under defaults:" in problem.message


def test_version_missing(tmp_path: Path) -> None:
    """A manifest without version is told to add 'version: 1'."""
    problem = one(tmp_path, f"items: [{{prompt: a, images: [{URL}]}}]\n")
    assert problem.field == "version"
    assert "version: 1" in problem.message


@pytest.mark.parametrize(
    ("value", "words"), [("2", "must be 1"), ('"1"', "without quotes"), ("true", "boolean")]
)
def test_version_must_be_1(tmp_path: Path, value: str, words: str) -> None:
    """version is the integer 1: not 2, not a string, not a boolean."""
    problem = one(tmp_path, f"version: {value}\nitems: [{{prompt: a, images: [{URL}]}}]\n")
    assert (problem.field, problem.line) == ("version", 1)
    assert words in problem.message


@pytest.mark.parametrize(
    ("tail", "words"),
    [("", "is missing"), ("items: {prompt: a}\n", "non-empty list"), ("items: []\n", "empty list")],
)
def test_items_must_be_a_non_empty_list(tmp_path: Path, tail: str, words: str) -> None:
    """items missing, not a list, or empty is a problem on items."""
    problem = one(tmp_path, "version: 1\n" + tail)
    assert problem.field == "items"
    assert words in problem.message


def test_item_must_be_a_mapping(tmp_path: Path) -> None:
    """An item that is a plain string is a problem naming its index and line."""
    problem = one(tmp_path, with_items(f"- {{prompt: a, images: [{URL}]}}\n- just a prompt\n"))
    assert (problem.field, problem.item_index, problem.line) == ("items[1]", 1, 4)


# ---------------------------------------------------------------------------------------------- fields


def test_unknown_item_field_suggests_the_close_one(tmp_path: Path) -> None:
    """A misspelt item field gets a suggestion, with the item named."""
    found = problems(tmp_path, with_items(f"- id: s1\n  promt: a\n  images: [{URL}]\n"))
    typo = next(p for p in found if p.field == "items[0].promt")
    assert "did you mean 'prompt'?" in typo.message
    assert (typo.item_index, typo.item_id, typo.line) == (0, "s1", 4)


def test_unknown_default_and_setting_fields(tmp_path: Path) -> None:
    """Unknown keys in defaults and settings are problems too, with suggestions."""
    head = "defaults:\n  sise: 1024x1024\nsettings:\n  max_inflight: 3\n"
    found = problems(tmp_path, with_items(f"- prompt: a\n  images: [{URL}]\n", head=head))
    assert [(p.field, p.line) for p in found] == [("defaults.sise", 3), ("settings.max_inflight", 5)]
    assert "did you mean 'size'?" in found[0].message
    assert "did you mean 'max_in_flight'?" in found[1].message


def test_setting_on_an_item_says_where_it_belongs(tmp_path: Path) -> None:
    """A run setting written on an item is pointed to settings:."""
    problem = one(tmp_path, with_items(f"- prompt: a\n  images: [{URL}]\n  rate: 3\n"))
    assert problem.field == "items[0].rate"
    assert "under settings:" in problem.message


def test_bool_is_not_an_integer(tmp_path: Path) -> None:
    """n: true is refused although Python treats True as 1."""
    problem = one(tmp_path, with_items(f"- prompt: a\n  images: [{URL}]\n  n: true\n"))
    assert problem.field == "items[0].n"
    assert "whole number" in problem.message
    assert "boolean" in problem.message


def test_quoted_number_is_told_to_drop_the_quotes(tmp_path: Path) -> None:
    """n: "2" is a string; the message says to write it without quotes."""
    problem = one(tmp_path, with_items(f'- prompt: a\n  images: [{URL}]\n  n: "2"\n'))
    assert "without quotes" in problem.message


def test_string_where_a_list_is_needed(tmp_path: Path) -> None:
    """images given as one string is told to be a list, with an example."""
    problem = one(tmp_path, with_items(f"- prompt: a\n  images: {URL}\n"))
    assert problem.field == "items[0].images"
    assert "must be a list" in problem.message
    assert "images: [" in problem.message


def test_number_where_a_string_is_needed(tmp_path: Path) -> None:
    """A prompt that YAML reads as a number is told to be quoted."""
    problem = one(tmp_path, with_items(f"- prompt: 42\n  images: [{URL}]\n"))
    assert "quote it" in problem.message


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("quality", "hgh", "did you mean 'high'?"),
        ("background", "clear", "one of auto, opaque, transparent"),
        ("response_format", "json", "one of url, b64_json"),
        ("enable_sync_mode", '"yes"', "true or false"),
    ],
)
def test_enums_and_booleans(tmp_path: Path, field: str, value: str, words: str) -> None:
    """Enumerated fields list their values (and suggest a close one); booleans must be true or false."""
    problem = one(tmp_path, with_items(f"- prompt: a\n  images: [{URL}]\n  {field}: {value}\n"))
    assert problem.field == f"items[0].{field}"
    assert words in problem.message


@pytest.mark.parametrize("n", [0, 11, -1])
def test_n_range(tmp_path: Path, n: int) -> None:
    """n is 1 to 10."""
    problem = one(tmp_path, with_items(f"- prompt: a\n  images: [{URL}]\n  n: {n}\n"))
    assert "from 1 to 10" in problem.message


def test_prompt_length(tmp_path: Path) -> None:
    """A prompt over 32,000 characters is refused with its length."""
    problem = one(tmp_path, with_items(f"- prompt: {'x' * 32_001}\n  images: [{URL}]\n"))
    assert "32,001 characters" in problem.message


@pytest.mark.parametrize("prompt", ['""', '"   "'])
def test_blank_prompt(tmp_path: Path, prompt: str) -> None:
    """An empty or blank prompt is refused."""
    assert "blank" in one(tmp_path, with_items(f"- prompt: {prompt}\n  images: [{URL}]\n")).message


@pytest.mark.parametrize(("count", "words"), [(0, "has 0 entries"), (17, "has 17 entries")])
def test_images_count(tmp_path: Path, count: int, words: str) -> None:
    """images holds 1 to 16 URLs."""
    problem = one(tmp_path, with_items(f"- prompt: a\n  images: [{', '.join([URL] * count)}]\n"))
    assert words in problem.message
    assert "1 to 16" in problem.message


@pytest.mark.parametrize("local", ["./cat.png", "/tmp/no-such-x.png", "C:\\x.png", "cat.png"])
def test_a_missing_local_image_is_named_with_its_resolved_path(tmp_path: Path, local: str) -> None:
    """A local path that names no file is a problem at its entry, saying where it was looked for (relative
    paths are relative to the manifest's folder)."""
    problem = one(tmp_path, with_items(f"- prompt: a\n  images:\n    - {URL}\n    - '{local}'\n"))
    assert (problem.field, problem.line) == ("items[0].images[1]", 6)
    expected = Path(local) if local.startswith("/") else tmp_path / local
    assert problem.message == f"{os.path.normpath(expected)} does not exist"


def test_a_local_image_with_no_route_names_both_routes(tmp_path: Path) -> None:
    """A local file is accepted only with a route for local files; without one, validate says so once,
    showing both routes, and sends nothing."""
    (tmp_path / "cat.png").write_bytes(render_output(32, 32, prompt="cat", index=0))
    text = with_items("- {prompt: a, images: [cat.png]}\n- {prompt: b, images: [cat.png]}\n")
    problem = one(tmp_path, text)
    assert (problem.field, problem.item_index) == ("items[0].images[0]", 0)
    assert "upload: s3://bucket/prefix/" in problem.message
    assert "route: openai-images" in problem.message


def test_a_local_image_is_resolved_and_fingerprinted_by_its_content(tmp_path: Path) -> None:
    """With a route, a local path becomes absolute in the request, and the fingerprint follows the file's
    bytes, not its name: an edited photo is a changed item, a moved folder is not."""
    head = "settings:\n  inputs: {route: openai-images}\ndefaults:\n  size: auto\n"
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "cat.png").write_bytes(render_output(32, 32, prompt="cat", index=0))
    item = next(
        load(tmp_path, with_items("- {id: x, prompt: p, images: [a/cat.png]}\n", head=head)).iter_items()
    )
    assert item.request["images"] == [str(tmp_path / "a" / "cat.png")]
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "cat.png").rename(tmp_path / "b" / "cat.png")
    moved = next(
        load(tmp_path, with_items("- {id: x, prompt: p, images: [b/cat.png]}\n", head=head)).iter_items()
    )
    assert moved.fingerprint == item.fingerprint
    (tmp_path / "b" / "cat.png").write_bytes(render_output(32, 32, prompt="dog", index=0))
    edited = next(
        load(tmp_path, with_items("- {id: x, prompt: p, images: [b/cat.png]}\n", head=head)).iter_items()
    )
    assert edited.fingerprint != item.fingerprint


def test_data_uri_is_a_warning(tmp_path: Path) -> None:
    """A data: URI is accepted with a warning naming the file, item and field."""
    manifest = load(tmp_path, with_items("- prompt: a\n  images: ['data:image/png;base64,AAAA']\n"))
    [warning] = manifest.warnings
    assert warning.startswith(f"{tmp_path / 'job.yaml'}:4: item 0 ('auto-")
    assert ": items[0].images[0]: " in warning
    assert "data: URI" in warning


# ------------------------------------------------------------------------------------------------- ids


def test_duplicate_ids_name_both_positions(tmp_path: Path) -> None:
    """A repeated id is reported on the later item, naming the earlier one and its line."""
    problem = one(
        tmp_path,
        with_items(f"- {{id: a, prompt: x, images: [{URL}]}}\n- {{id: a, prompt: y, images: [{URL}]}}\n"),
    )
    assert (problem.item_index, problem.field, problem.line) == (1, "items[1].id", 4)
    assert "already used by item 0 (line 3)" in problem.message


def test_two_identical_items_without_ids_are_named(tmp_path: Path) -> None:
    """Ids are made from the items' contents, so two identical items without ids would share one: the
    second is a problem naming the first and how to fix it."""
    problem = one(
        tmp_path, with_items(f"- {{prompt: x, images: [{URL}]}}\n- {{prompt: x, images: [{URL}]}}\n")
    )
    assert (problem.item_index, problem.field, problem.line) == (1, "items[1].id", 4)
    assert "is the same request as item 0 (line 3), and neither has an id" in problem.message


def test_generated_ids_do_not_move_when_an_item_is_inserted(tmp_path: Path) -> None:
    """An item without an id keeps its id when another is inserted above it (ids come from content)."""
    before = [
        item.id for item in load(tmp_path, with_items(f"- {{prompt: b, images: [{URL}]}}\n")).iter_items()
    ]
    text = with_items(f"- {{prompt: a, images: [{URL}]}}\n- {{prompt: b, images: [{URL}]}}\n")
    after = [item.id for item in load(tmp_path, text).iter_items()]
    assert after[1] == before[0]


def test_integer_id_is_refused_with_a_quoting_hint(tmp_path: Path) -> None:
    """id: 1001 is a number; the message says ids are strings and to quote it."""
    problem = one(tmp_path, with_items(f"- id: 1001\n  prompt: a\n  images: [{URL}]\n"))
    assert (problem.field, problem.item_id) == ("items[0].id", None)
    assert "must be a string" in problem.message
    assert 'id: "1001"' in problem.message


def test_empty_id_is_refused(tmp_path: Path) -> None:
    """An empty id is refused."""
    problem = one(tmp_path, with_items(f"- id: ''\n  prompt: a\n  images: [{URL}]\n"))
    assert problem.field == "items[0].id"


# ----------------------------------------------------------------------------------------- model rules


@pytest.mark.parametrize(
    ("model", "size", "words"),
    [
        ("openai/gpt-image-2-plus", "1000x1024", "width 1000 is not a multiple of 16"),
        ("openai/gpt-image-2-plus", "3840x1024", "aspect ratio 3.8:1 exceeds 3:1"),
        ("openai/gpt-image-2-plus", "4096x2048", "longest edge 4096 exceeds 3840"),
        ("openai/gpt-image-2", "512x512", "262,144 pixels"),
        ("openai/gpt-image-2", "1024*1024", "is not 'auto' or WIDTHxHEIGHT"),
        (
            "openai/gpt-image-1",
            "2048x2048",
            "gpt-image-1 accepts only 1024x1024, 1024x1536, 1536x1024 or auto",
        ),
    ],
)
def test_size_rules_per_model(tmp_path: Path, model: str, size: str, words: str) -> None:
    """A size the model refuses names the rule it breaks."""
    problem = one(
        tmp_path, with_items(f"- prompt: a\n  images: [{URL}]\n  size: {size}\n", head=f"model: {model}\n")
    )
    assert problem.field == "items[0].size"
    assert words in problem.message


def test_size_in_defaults_is_reported_once(tmp_path: Path) -> None:
    """A bad size in defaults is one problem on defaults.size, not one per item."""
    items = "".join(f"- {{prompt: p{i}, images: [{URL}]}}\n" for i in range(5))
    problem = one(tmp_path, with_items(items, head="defaults:\n  size: 100x100\n"))
    assert (problem.field, problem.line, problem.item_index) == ("defaults.size", 3, None)


def test_text_to_image_refuses_images(tmp_path: Path) -> None:
    """text-to-image with images is a problem."""
    head = "model: openai/gpt-image-2\ntask: text-to-image\n"
    problem = one(tmp_path, with_items(f"- prompt: a\n  images: [{URL}]\n", head=head))
    assert problem.field == "items[0].images"
    assert "takes no input images" in problem.message


def test_text_to_image_without_images_loads(tmp_path: Path) -> None:
    """text-to-image needs no images."""
    manifest = load(
        tmp_path, with_items("- prompt: a\n", head="model: openai/gpt-image-2\ntask: text-to-image\n")
    )
    assert manifest.task == "text-to-image"


def test_image_edit_requires_images_and_prompt(tmp_path: Path) -> None:
    """An image-edit item with neither images nor prompt (nor defaults) gets both problems."""
    found = problems(tmp_path, with_items("- id: bare\n  n: 1\n"))
    assert [(p.field, p.line) for p in found] == [("items[0].prompt", 3), ("items[0].images", 3)]
    assert "under defaults" in found[0].message


def test_task_not_served_by_the_model_lists_its_tasks(tmp_path: Path) -> None:
    """A known model asked for a task it does not do is told which tasks it does."""
    problem = one(tmp_path, with_items("- prompt: a\n", head="task: text-to-image\n"))
    assert problem.field == "task"
    assert "does not do text-to-image; it does: image-edit" in problem.message


def test_unknown_task_is_refused(tmp_path: Path) -> None:
    """A task the engine does not know is refused, listing the known ones."""
    problem = one(tmp_path, with_items(f"- prompt: a\n  images: [{URL}]\n", head="task: image-to-video\n"))
    assert "one of image-edit, text-to-image" in problem.message


def test_a_typo_in_the_model_is_an_error_with_a_suggestion(tmp_path: Path) -> None:
    """A model the catalogue does not know is an error (every submit would get 404) naming the closest
    known model and the opt-in for one the catalogue does not list yet."""
    head = "model: openai/gpt-image-2-pluss\n"
    problem = one(tmp_path, with_items(f"- prompt: a\n  images: [{URL}]\n", head=head))
    assert (problem.field, problem.line) == ("model", 2)
    assert "did you mean 'openai/gpt-image-2-plus'?" in problem.message
    assert "model_unlisted: true" in problem.message


def test_an_unknown_model_without_a_close_name_lists_the_known_ones(tmp_path: Path) -> None:
    """An unknown model nothing in the catalogue resembles is an error listing every known model."""
    problem = one(tmp_path, with_items(f"- prompt: a\n  images: [{URL}]\n", head="model: acme/painter-3\n"))
    assert "openai/gpt-image-1" in problem.message
    assert "did you mean" not in problem.message


def test_model_unlisted_sends_an_unknown_model_with_a_warning(tmp_path: Path) -> None:
    """With model_unlisted: true an unknown provider/model loads, under the gpt-image-2 rules, warned."""
    head = "model: acme/painter-3\nmodel_unlisted: true\n"
    manifest = load(tmp_path, with_items(f"- prompt: a\n  images: [{URL}]\n", head=head))
    assert manifest.model == "acme/painter-3"
    [warning] = manifest.warnings
    assert "model_unlisted" in warning
    assert "gpt-image-2 family" in warning


def test_model_unlisted_on_a_known_model_is_a_warning(tmp_path: Path) -> None:
    """model_unlisted on a catalogued model changes nothing, and a warning says so."""
    head = "model: openai/gpt-image-2\nmodel_unlisted: true\n"
    manifest = load(tmp_path, with_items(f"- prompt: a\n  images: [{URL}]\n", head=head))
    [warning] = manifest.warnings
    assert "model_unlisted: has no effect" in warning


def test_model_unlisted_must_be_a_boolean(tmp_path: Path) -> None:
    """model_unlisted takes true or false, nothing else."""
    head = "model: acme/painter-3\nmodel_unlisted: yes please\n"
    found = problems(tmp_path, with_items(f"- prompt: a\n  images: [{URL}]\n", head=head))
    assert [p.field for p in found] == ["model", "model_unlisted"]


def test_a_tab_indented_manifest_is_told_about_tabs(tmp_path: Path) -> None:
    """A tab-indented manifest gets a problem that says so, not the parser's 'cannot start any token'."""
    problem = one(tmp_path, "version: 1\nitems:\n\t- id: a\n")
    assert problem.line == 3
    assert "indented with a tab" in problem.message
    assert "spaces" in problem.message
    assert "cannot start any token" not in problem.message


@pytest.mark.parametrize("model", ["gpt-image-2", "openai/", "a/b/c", "open ai/x"])
def test_malformed_model_is_an_error(tmp_path: Path, model: str) -> None:
    """A model that is not provider/model is refused."""
    problem = one(tmp_path, with_items(f"- prompt: a\n  images: [{URL}]\n", head=f"model: '{model}'\n"))
    assert problem.field == "model"
    assert "provider/model" in problem.message


def test_quality_on_a_plus_model_is_one_counted_warning(tmp_path: Path) -> None:
    """quality on -plus items warns once, naming the first item and counting the others."""
    items = "".join(f"- {{id: i{k}, prompt: p, images: [{URL}], quality: high}}\n" for k in range(3))
    [warning] = load(tmp_path, with_items(items)).warnings
    assert "item 0 ('i0'): items[0].quality: ignored by -plus models" in warning
    assert warning.startswith(f"{tmp_path / 'job.yaml'}:3:")
    assert warning.endswith("(and 2 more items)")


def test_quality_on_a_model_that_takes_it_is_silent(tmp_path: Path) -> None:
    """gpt-image-2 takes quality: no warning."""
    text = with_items(
        f"- {{prompt: p, images: [{URL}], quality: high}}\n", head="model: openai/gpt-image-2\n"
    )
    assert load(tmp_path, text).warnings == ()


def test_transparent_background_on_gpt_image_2_warns(tmp_path: Path) -> None:
    """background: transparent warns on gpt-image-2, where it is doubtful."""
    head = "model: openai/gpt-image-2\ndefaults:\n  background: transparent\n"
    [warning] = load(tmp_path, with_items(f"- {{prompt: p, images: [{URL}]}}\n", head=head)).warnings
    assert "defaults.background" in warning


# -------------------------------------------------------------------------------------------- settings


@pytest.mark.parametrize(
    ("setting", "words"),
    [
        ("rate: 0", "from 0.001 to 10,000"),
        ("rate: fast", "must be a number"),
        ("rate: .nan", "finite"),
        ("max_in_flight: 0", "from 1 to 10,000"),
        ("max_in_flight: 2.5", "whole number"),
        ("max_in_flight: true", "whole number"),
        ("timeout: -1", "greater than 0"),
        ("max_submits: -1", "from 0 to 1,000,000,000"),
        ("adapt: 1", "true or false"),
        ("resubmit_ambiguous: 'no'", "true or false"),
        ("grace: null", "null"),
    ],
)
def test_settings_types_and_ranges(tmp_path: Path, setting: str, words: str) -> None:
    """Each setting is checked against RunSettings' type and its range."""
    problem = one(tmp_path, with_items(f"- prompt: a\n  images: [{URL}]\n", head=f"settings:\n  {setting}\n"))
    assert (problem.field, problem.line) == (f"settings.{setting.split(':')[0]}", 3)
    assert words in problem.message


def test_settings_rules_across_fields(tmp_path: Path) -> None:
    """rate_min above rate is caught by RunSettings itself and reported on settings."""
    head = "settings:\n  rate: 1\n  rate_min: 2\n"
    problem = one(tmp_path, with_items(f"- prompt: a\n  images: [{URL}]\n", head=head))
    assert (problem.field, problem.line) == ("settings", 2)
    assert "rate_min" in problem.message


def test_settings_must_be_a_mapping(tmp_path: Path) -> None:
    """settings given as a list is a problem."""
    problem = one(tmp_path, with_items(f"- prompt: a\n  images: [{URL}]\n", head="settings: [rate]\n"))
    assert problem.field == "settings"


# ------------------------------------------------------------------------------------------ everything


def test_every_problem_is_listed_in_file_order(tmp_path: Path) -> None:
    """Problems in all sections are collected together and ordered by line."""
    text = """\
        version: 2
        modle: x
        defaults:
          n: 0
        settings:
          rate: -1
        items:
          - id: a
            prompt: ok
            images: [./a.png]
          - id: a
            size: 17x17
    """
    found = problems(tmp_path, text)
    assert [p.line for p in found] == sorted(p.line or 0 for p in found)
    fields = [p.field for p in found]
    expected = ["version", "modle", "defaults.n", "settings.rate", "items[0].images[0]", "items[1].id"]
    assert fields[: len(expected)] == expected
    assert {"items[1].size", "items[1].prompt", "items[1].images"} <= set(fields)
    with pytest.raises(ManifestError) as caught:
        load_manifest(tmp_path / "job.yaml")
    assert str(caught.value).startswith(f"{len(found)} problems in the manifest:")


@pytest.mark.slow
def test_a_100k_item_manifest_validates(tmp_path: Path) -> None:
    """100,000 items load and validate (how fast is a figure of make bench, not a test)."""
    lines = ["version: 1", "defaults:", "  size: 1024x1024", "items:"]
    for i in range(100_000):
        lines += [f"  - id: sku-{i}", f"    prompt: Girl holding cat {i}", f"    images: [{URL}]"]
    path = tmp_path / "big.yaml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    manifest = load_manifest(path)
    assert manifest.count == 100_000
    *_, last = manifest.iter_items()
    assert last.id == "sku-99999"


# ------------------------------------------------------------------------------------- the model table


def test_every_model_row_is_consistent() -> None:
    """Each row is keyed by its own name, serves known tasks, and a fixed-size model lists its sizes."""
    for name, spec in catalogue.MODELS.items():
        assert spec.name == name
        assert catalogue.is_model_name(name)
        assert spec.tasks <= set(catalogue.TASK_TAKES_IMAGES)
        assert (spec.size_rule == "fixed") == bool(spec.fixed_sizes)
        assert spec.expected_seconds > 0


def test_unknown_model_gets_the_gpt_image_2_family_rules() -> None:
    """spec_for an unknown sibling keeps its name and uses the free size rule."""
    spec = catalogue.spec_for("acme/painter-3")
    assert catalogue.model_spec("acme/painter-3") is None
    assert (spec.name, spec.size_rule, spec.image_field) == ("acme/painter-3", "free", "images")


@pytest.mark.parametrize("size", ["auto", "1024x1024", "3840x2160", "2160x3840", "1024x3072", "3840x1280"])
def test_free_sizes_accepted(size: str) -> None:
    """Sizes within every gpt-image-2 family rule pass."""
    assert catalogue.size_problem(catalogue.MODELS["openai/gpt-image-2"], size) is None


def test_wire_body_speaks_each_models_dialect() -> None:
    """gpt-image-1 gets ``image`` and b64_json; -plus models drop quality; given formats are kept."""
    request = {"prompt": "a", "images": [URL], "quality": "high"}
    one_body = catalogue.wire_body(catalogue.MODELS["openai/gpt-image-1"], request)
    assert one_body == {"prompt": "a", "image": [URL], "quality": "high", "response_format": "b64_json"}
    plus_body = catalogue.wire_body(
        catalogue.MODELS["openai/gpt-image-2-plus"], {**request, "response_format": "b64_json"}
    )
    assert plus_body == {"prompt": "a", "images": [URL], "response_format": "b64_json"}
    assert request == {"prompt": "a", "images": [URL], "quality": "high"}


def test_submit_path() -> None:
    """The submit path is /api/v3/{provider}/{model}/{task}."""
    assert (
        catalogue.submit_path("openai/gpt-image-2-plus", "image-edit")
        == "/api/v3/openai/gpt-image-2-plus/image-edit"
    )
