"""Items as people have them: a CSV export, a JSONL file, a folder of photos; metadata carried through;
ids that do not move; output paths from a template; problems pointing at file:row:column."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from batch_engine.errors import ManifestError
from batch_engine.manifest import load_manifest, reader
from batch_engine.sim.drawing import render_output
from tests.helpers import Harness, check_settled

pytest_plugins = ("tests.helpers",)
pytestmark = pytest.mark.anyio


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as stream:
        writer = csv.writer(stream)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def write_yaml(path: Path, doc: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return path


def problems_of(path: Path) -> list[str]:
    with pytest.raises(ManifestError) as caught:
        load_manifest(path)
    return [str(problem) for problem in caught.value.problems]


async def test_a_csv_catalogue_runs_with_its_columns_as_fields_and_metadata(harness: Harness) -> None:
    """A CSV export runs as it is: id, prompt and images (|-separated) columns, request fields as columns
    (empty cells take the defaults), and every other column kept as the item's metadata in results.jsonl,
    report.yaml and the page."""
    sim = await harness.sim()
    cat, dog = sim.input_url("cat"), sim.input_url("dog")
    items = write_csv(
        harness.tmp_path / "catalog.csv",
        ["id", "prompt", "images", "n", "title", "category"],
        [
            ["sku-1", "a cat on marble", f"{cat}|{dog}", "2", "Cat", "pets"],
            ["sku-2", "a dog", dog, "", "", "pets"],
        ],
    )
    manifest = write_yaml(
        harness.tmp_path / "job.yaml", {"version": 1, "name": "job", "items_from": "catalog.csv"}
    )
    outcome = await harness.run(manifest, sim)
    check_settled(outcome, ["sku-1", "sku-2"])
    assert len(outcome.entry("sku-1")["outputs"]) == 2
    assert len(outcome.entry("sku-2")["outputs"]) == 1
    assert outcome.entry("sku-1")["meta"] == {"title": "Cat", "category": "pets"}
    assert outcome.entry("sku-2")["meta"] == {"category": "pets"}
    lines = {line["id"]: line for line in outcome.results}
    assert lines["sku-1"]["meta"] == {"title": "Cat", "category": "pets"}
    assert '"meta":"title: Cat · category: pets"' in (outcome.out_dir / "index.html").read_text()
    assert items.exists()


def test_csv_problems_point_at_file_row_and_column(tmp_path: Path) -> None:
    """A bad cell is named by the CSV file, its line and column, the item and the field; a row with too many
    cells and a missing prompt are named too; nothing else is refused."""
    write_csv(
        tmp_path / "catalog.csv",
        ["id", "prompt", "images", "size"],
        [
            ["ok", "fine", "https://e.x/a.png", "1024x1024"],
            ["bad-size", "p", "https://e.x/b.png", "17x17"],
            ["no-prompt", "", "https://e.x/c.png", ""],
            ["extra", "p", "https://e.x/d.png", "auto", "surplus"],
        ],
    )
    found = problems_of(write_yaml(tmp_path / "job.yaml", {"version": 1, "items_from": "catalog.csv"}))
    csv_path = tmp_path / "catalog.csv"
    assert found[0].startswith(f"{csv_path}:3:4: item 1 ('bad-size'): size: ")
    assert found[1].startswith(f"{csv_path}:4:2: item 2 ('no-prompt'): prompt: is missing: give the item a")
    assert found[2].startswith(f"{csv_path}:5: item 3: the row has 5 cells; the header names 4 columns")
    assert len(found) == 3


def test_image_columns_are_taken_in_their_number_order(tmp_path: Path) -> None:
    """image_1 ... image_N columns make the item's images list, in number order, empty ones skipped."""
    write_csv(
        tmp_path / "c.csv",
        ["id", "prompt", "image_2", "image_1", "image_3"],
        [["a", "p", "https://e.x/2.png", "https://e.x/1.png", ""]],
    )
    manifest = load_manifest(write_yaml(tmp_path / "job.yaml", {"version": 1, "items_from": "c.csv"}))
    [item] = manifest.iter_items()
    assert item.request["images"] == ["https://e.x/1.png", "https://e.x/2.png"]


def test_jsonl_lines_are_items_and_unknown_keys_their_metadata(tmp_path: Path) -> None:
    """Each JSONL line is an item; keys that are not item fields become its metadata; a line that is not
    JSON is named by file and line."""
    lines = [
        {"id": "a", "prompt": "p", "images": ["https://e.x/a.png"], "supplier": "acme"},
        {"id": "b", "prompt": "q", "images": ["https://e.x/b.png"], "meta": {"shelf": 3}},
    ]
    good = tmp_path / "items.jsonl"
    good.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    manifest = load_manifest(write_yaml(tmp_path / "job.yaml", {"version": 1, "items_from": "items.jsonl"}))
    first, second = manifest.iter_items()
    assert first.spec["meta"] == {"supplier": "acme"}
    assert second.spec["meta"] == {"shelf": 3}
    assert "supplier" not in first.request
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(lines[0]) + "\n{not json\n", encoding="utf-8")
    [problem] = problems_of(write_yaml(tmp_path / "job2.yaml", {"version": 1, "items_from": "bad.jsonl"}))
    assert problem.startswith(f"{bad}:2: item 1: not a JSON object")


def test_a_folder_glob_makes_one_item_per_photo(tmp_path: Path) -> None:
    """items_from {glob, prompt} makes one item per matching file, in sorted order, its id the path below
    the folder without the extension and {stem} in the prompt the file's; hidden files are skipped."""
    for name in ("shoes/red.png", "shoes/blue.png", "bags/tote.png", "notes.txt", "shoes/.hidden.png"):
        path = tmp_path / "photos" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(render_output(32, 32, prompt=name, index=0))
    doc = {
        "version": 1,
        "items_from": {"glob": "photos/**/*.png", "prompt": "Place {stem} on marble"},
        "settings": {"inputs": {"route": "openai-images"}},
        "defaults": {"size": "auto"},
    }
    manifest = load_manifest(write_yaml(tmp_path / "job.yaml", doc))
    items = list(manifest.iter_items())
    assert [item.id for item in items] == ["bags/tote", "shoes/blue", "shoes/red"]
    assert items[2].request["prompt"] == "Place red on marble"
    assert items[2].request["images"] == [str(tmp_path / "photos" / "shoes" / "red.png")]
    assert manifest.count == 3


def test_a_folder_prompt_with_an_unknown_placeholder_is_refused(tmp_path: Path) -> None:
    """{colour} is not a placeholder of a folder's items: validate names it and the ones there are."""
    (tmp_path / "photos").mkdir()
    doc = {"version": 1, "items_from": {"glob": "photos/*.png", "prompt": "a {colour} {stem}"}}
    [problem] = problems_of(write_yaml(tmp_path / "job.yaml", doc))
    assert "items_from.prompt: {colour} is not a placeholder" in problem
    assert "{stem}, {name}, {relpath}" in problem


async def test_an_edited_csv_pays_only_for_new_and_changed_rows(harness: Harness) -> None:
    """Between runs a row is added, one changed and one removed: only the new and the changed one are
    submitted; the others keep their outputs."""
    sim = await harness.sim()
    urls = [sim.input_url(f"p{k}") for k in range(4)]
    header = ["id", "prompt", "images"]
    rows = [[f"r{k}", f"edit {k}", urls[k]] for k in range(3)]
    write_csv(harness.tmp_path / "c.csv", header, rows)
    manifest = write_yaml(harness.tmp_path / "job.yaml", {"version": 1, "name": "job", "items_from": "c.csv"})
    await harness.run(manifest, sim)
    assert sim.stats.accepted == 3
    edited = [rows[0], ["r1", "edit 1, in blue", urls[1]], ["r3", "edit 3", urls[3]]]
    write_csv(harness.tmp_path / "c.csv", header, edited)
    again = await harness.run(manifest, sim)
    assert sim.stats.accepted == 5
    check_settled(again, ["r0", "r1", "r3"])


async def test_an_item_inserted_at_the_top_of_an_id_less_manifest_pays_for_one(harness: Harness) -> None:
    """Ids made from content do not move: inserting an item above five finished ones costs one submit."""
    sim = await harness.sim()
    items = [{"prompt": f"edit {k}", "images": [sim.input_url(f"i{k}")]} for k in range(5)]
    path = harness.tmp_path / "job.yaml"
    write_yaml(path, {"version": 1, "name": "job", "items": items})
    await harness.run(path, sim)
    write_yaml(
        path,
        {"version": 1, "name": "job", "items": [{"prompt": "new", "images": [sim.input_url("n")]}, *items]},
    )
    again = await harness.run(path, sim)
    assert sim.stats.accepted == 6
    assert set(again.statuses.values()) == {"succeeded"}


async def test_items_once_named_by_position_keep_their_results(harness: Harness) -> None:
    """A journal from before ids came from content calls id-less items item-<position>: the same requests
    under their new ids are recognised, not paid again."""
    sim = await harness.sim()
    items = [{"prompt": f"edit {k}", "images": [sim.input_url(f"i{k}")]} for k in range(3)]
    path = harness.tmp_path / "job.yaml"
    write_yaml(
        path,
        {"version": 1, "name": "job", "items": [{"id": f"item-{k}", **item} for k, item in enumerate(items)]},
    )
    first = await harness.run(path, sim)
    write_yaml(path, {"version": 1, "name": "job", "items": items})
    again = await harness.run(path, sim)
    assert sim.stats.accepted == 3
    assert [e["outputs"] for e in again.entries] == [e["outputs"] for e in first.entries]


async def test_outputs_follow_the_template_with_metadata(harness: Harness) -> None:
    """output: "{meta.category}/{id}-{k}.{ext}" puts each item's files in its category's folder, a value
    that tries to climb out of the out dir made harmless."""
    sim = await harness.sim()
    items = [
        {"id": "a", "prompt": "p", "images": [sim.input_url("a")], "meta": {"category": "shoes"}},
        {"id": "b", "prompt": "q", "images": [sim.input_url("b")], "meta": {"category": "../../etc"}},
    ]
    doc = {"version": 1, "name": "job", "output": "{meta.category}/{id}-{k}.{ext}", "items": items}
    outcome = await harness.run(write_yaml(harness.tmp_path / "job.yaml", doc), sim)
    assert outcome.entry("a")["outputs"][0]["path"] == "shoes/a-1.png"
    assert outcome.entry("b")["outputs"][0]["path"] == "_.._etc/b-1.png"
    assert (outcome.out_dir / "shoes" / "a-1.png").is_file()


@pytest.mark.parametrize(
    ("template", "words"),
    [
        ("{meta.category}/{k}.{ext}", "{id} is missing"),
        ("../{id}-{k}.{ext}", "inside the out dir"),
        ("{id}{k}.{ext}", "must stand between separators"),
        ("{id}-{k}.png", "must end with .{ext}"),
        ("{id}-{k}-{colour}.{ext}", "unknown placeholder {colour}"),
    ],
)
def test_an_output_template_that_could_collide_or_escape_is_refused(
    tmp_path: Path, template: str, words: str
) -> None:
    """validate refuses a template that would let two items share files or write outside the out dir."""
    doc = {
        "version": 1,
        "output": template,
        "items": [{"id": "a", "prompt": "p", "images": ["https://e.x/a.png"]}],
    }
    assert any(words in problem for problem in problems_of(write_yaml(tmp_path / "job.yaml", doc)))


def test_an_item_missing_a_metadata_value_the_template_needs_is_named(tmp_path: Path) -> None:
    """A template using {meta.category} needs a category on every item: the one without is named."""
    items = [
        {"id": "a", "prompt": "p", "images": ["https://e.x/a.png"], "meta": {"category": "x"}},
        {"id": "b", "prompt": "q", "images": ["https://e.x/b.png"]},
    ]
    doc = {"version": 1, "output": "{meta.category}/{id}-{k}.{ext}", "items": items}
    [problem] = problems_of(write_yaml(tmp_path / "job.yaml", doc))
    assert "item 1 ('b'): items[1].meta: the output template uses {meta.category}" in problem


async def test_failures_of_a_csv_run_rerun_as_a_manifest_with_their_metadata(harness: Harness) -> None:
    """failures.yaml of a CSV run is a manifest of the failed rows, metadata kept, that runs as it is."""
    sim = await harness.sim()
    write_csv(
        harness.tmp_path / "c.csv",
        ["id", "prompt", "images", "title"],
        [["ok", "fine", sim.input_url("a"), "A"], ["bad", "FORBIDDEN thing", sim.input_url("b"), "B"]],
    )
    manifest = write_yaml(harness.tmp_path / "job.yaml", {"version": 1, "name": "job", "items_from": "c.csv"})
    outcome = await harness.run(manifest, sim)
    assert outcome.failures is not None
    assert outcome.failures["items"] == [
        {"id": "bad", "prompt": "FORBIDDEN thing", "images": [sim.input_url("b")], "meta": {"title": "B"}}
    ]
    rerun = load_manifest(outcome.out_dir / "failures.yaml")
    assert [item.id for item in rerun.iter_items()] == ["bad"]


def test_problems_past_the_listed_ones_are_counted(tmp_path: Path) -> None:
    """A file of a million bad rows does not print a million lines: 200 are listed, the rest counted."""
    rows = [[f"r{k}", "p", "https://e.x/a.png", "17x17"] for k in range(250)]
    write_csv(tmp_path / "c.csv", ["id", "prompt", "images", "size"], rows)
    with pytest.raises(ManifestError) as caught:
        load_manifest(write_yaml(tmp_path / "job.yaml", {"version": 1, "items_from": "c.csv"}))
    assert len(caught.value.problems) == 200
    assert "... and 50 more" in str(caught.value)


def test_only_expanded_aliases_count_against_the_alias_guard(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Values written out never trip the alias guard (a big manifest has millions); values that aliases
    expand to still do."""
    monkeypatch.setattr(reader, "MAX_NODES", 50)
    items = "".join(f"  - {{id: i{k}, prompt: p, images: [https://e.x/{k}.png]}}\n" for k in range(40))
    plain = tmp_path / "plain.yaml"
    plain.write_text("version: 1\nitems:\n" + items, encoding="utf-8")
    assert load_manifest(plain).count == 40
    aliased = tmp_path / "aliased.yaml"
    many = ", ".join(["*u"] * 60)
    aliased.write_text(f"version: 1\nx: &u [a, b]\ny: [{many}]\nitems:\n" + items, encoding="utf-8")
    [problem] = problems_of(aliased)
    assert "aliases (*name) expand to more than 50 values" in problem
