"""results.jsonl, report.yaml and failures.yaml, written from hand-built journal records."""

from __future__ import annotations

import json
import tracemalloc
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from PIL import Image

from batch_engine.report.block_yaml import block_yaml
from batch_engine.report.entries import Records, count_items, iso_utc, result_line
from batch_engine.report.html import write_html_report
from batch_engine.report.write import (
    REPORT_FILES,
    write_failures_manifest,
    write_report_yaml,
    write_reports,
    write_results_jsonl,
)
from batch_engine.values import ItemError, ItemRecord, ItemState, OutputFile, RunMeta

T0 = 1_767_225_600.0  # 2026-01-01T00:00:00Z

SETTINGS = {"rate": 1.5, "max_in_flight": 20, "timeout": 300}
DEFAULTS = {"size": "1024x1024", "quality": "high"}
STATS: dict[str, Any] = {
    "total": 5,
    "by_state": {"succeeded": 2, "failed": 2, "pending": 1},
    "by_error_kind": {"content_policy": 1, "timeout": 1},
    "images": 3,
    "elapsed": 125.5,
    "submits": 5,
    "submit_attempts": 7,
    "rate_limited": 2,
    "polls": 40,
    "predictions_resolved": 4,
    "polls_per_prediction": 10.0,
    "submit_rate": 0.04,
    "run_succeeded": 1,
    "run_failed": 2,
    "rate_final": 1.2,
    "rate_ceiling": 1.5,
    "possible_duplicates": 1,
    "stopped_reason": None,
    "timeline": {"submitted": [3, 2], "finished": [1, 3], "rate_limited": [2, 0]},
    "timeline_step": 60.0,
}


def make_meta(**changes: Any) -> RunMeta:
    fields: dict[str, Any] = {
        "name": "spring-catalog",
        "manifest_path": "jobs/spring.yaml",
        "model": "openai/gpt-image-2-plus",
        "task": "image-edit",
        "base_url": "http://127.0.0.1:8123",
        "defaults": DEFAULTS,
        "settings": SETTINGS,
        "started_at": T0,
        "finished_at": T0 + 125.5,
        "stats": STATS,
    }
    fields.update(changes)
    return RunMeta(**fields)


def make_record(index: int, state: ItemState = ItemState.SUCCEEDED, **changes: Any) -> ItemRecord:
    item_id = changes.pop("item_id", f"sku-{index}")
    spec = changes.pop(
        "spec", {"id": item_id, "images": [f"https://img.example/{index}.png"], "prompt": "blue"}
    )
    fields: dict[str, Any] = {
        "index": index,
        "item_id": item_id,
        "fingerprint": f"fp{index}",
        "spec": spec,
        "request": {**DEFAULTS, **spec},
        "state": state,
        "attempts": 1 if state is not ItemState.PENDING else 0,
    }
    if state.is_final or state is ItemState.SUBMITTED:
        fields.update(prediction_id=f"pred-{index}", submitted_at=T0 + index)
    if state is ItemState.SUCCEEDED:
        fields.update(
            outputs=(
                OutputFile(f"images/{item_id}-1.png", "a" * 64, f"https://cdn.example/{index}.png", False),
            ),
            completed_at=T0 + index + 30,
            inference_ms=23_000,
        )
    if state is ItemState.FAILED:
        fields.update(error=ItemError("content_policy", "blocked: unsafe content", 400), completed_at=T0 + 40)
    fields.update(changes)
    return ItemRecord(**fields)


def sample_records() -> list[ItemRecord]:
    """Five items covering every outcome: two succeeded, two failed, one never submitted."""
    return [
        make_record(0),
        make_record(1, ItemState.FAILED),
        make_record(2, ItemState.PENDING),
        make_record(
            3,
            ItemState.FAILED,
            error=ItemError("timeout", "no answer after 300 s"),
            possible_duplicate=True,
            attempts=2,
        ),
        make_record(
            4,
            outputs=(
                OutputFile("images/sku-4-1.png", "b" * 64, None, None),
                OutputFile("images/sku-4-2.png", "c" * 64, None, True),
            ),
        ),
    ]


def source(records: list[ItemRecord]) -> Records:
    """The records as a journal would serve them: all, or those in the states asked for."""

    def serve(states: Collection[ItemState] | None = None) -> Iterator[ItemRecord]:
        return iter([r for r in records if states is None or r.state in states])

    return serve


def write_pngs(out_dir: Path, records: list[ItemRecord]) -> None:
    for record in records:
        for output in record.outputs:
            target = out_dir / output.path
            target.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (8, 8), (30, 90, 200)).save(target)


def test_iso_utc_writes_utc_to_the_second() -> None:
    """Unix seconds become ISO 8601 UTC with a Z, and None stays None."""
    assert iso_utc(T0 + 61.7) == "2026-01-01T00:01:01Z"
    assert iso_utc(None) is None


def test_result_line_has_every_field() -> None:
    """A result line carries id, status, prediction, outputs, error, attempts, duplicate flag, the request's
    fingerprint (a lost journal is rebuilt from it) and timings."""
    line = result_line(sample_records()[3])
    assert line == {
        "id": "sku-3",
        "status": "failed",
        "prediction_id": "pred-3",
        "outputs": [],
        "error": {"kind": "timeout", "status": None, "message": "no answer after 300 s"},
        "attempts": 2,
        "possible_duplicate": True,
        "fingerprint": "fp3",
        "submitted_at": "2026-01-01T00:00:03Z",
        "completed_at": "2026-01-01T00:00:40Z",
        "inference_ms": None,
    }
    assert result_line(sample_records()[0])["outputs"] == [
        {"path": "images/sku-0-1.png", "url": "https://cdn.example/0.png", "sha256": "a" * 64, "nsfw": False}
    ]


def test_results_jsonl_lists_only_final_items_in_manifest_order(tmp_path: Path) -> None:
    """results.jsonl has one valid JSON object per final item, in manifest order, and no unfinished item."""
    path = write_results_jsonl(tmp_path, source(sample_records()))
    lines = path.read_text(encoding="utf-8").splitlines()
    parsed = [json.loads(line) for line in lines]
    assert [entry["id"] for entry in parsed] == ["sku-0", "sku-1", "sku-3", "sku-4"]
    assert parsed[1]["error"] == {
        "kind": "content_policy",
        "status": 400,
        "message": "blocked: unsafe content",
    }


def test_report_yaml_lists_every_item_in_manifest_order(tmp_path: Path) -> None:
    """report.yaml loads with safe_load and lists every manifest item, unfinished ones with their state."""
    report = yaml.safe_load(write_report_yaml(tmp_path, make_meta(), source(sample_records())).read_text())
    assert [(item["id"], item["status"]) for item in report["items"]] == [
        ("sku-0", "succeeded"),
        ("sku-1", "failed"),
        ("sku-2", "pending"),
        ("sku-3", "failed"),
        ("sku-4", "succeeded"),
    ]


def test_report_yaml_entry_has_every_field(tmp_path: Path) -> None:
    """Each report entry has id, status, prediction, outputs, error, attempts, duplicate flag and timings."""
    report = yaml.safe_load(write_report_yaml(tmp_path, make_meta(), source(sample_records())).read_text())
    assert report["items"][0] == {
        "id": "sku-0",
        "status": "succeeded",
        "prediction_id": "pred-0",
        "outputs": [
            {
                "path": "images/sku-0-1.png",
                "url": "https://cdn.example/0.png",
                "sha256": "a" * 64,
                "nsfw": False,
            }
        ],
        "error": None,
        "attempts": 1,
        "possible_duplicate": False,
        "fingerprint": "fp0",
        "timings": {
            "submitted": "2026-01-01T00:00:00Z",
            "completed": "2026-01-01T00:00:30Z",
            "inference_ms": 23000,
        },
    }
    pending = report["items"][2]
    assert pending["prediction_id"] is None
    assert pending["timings"] == {"submitted": None, "completed": None, "inference_ms": None}
    assert report["items"][3]["possible_duplicate"] is True


def test_report_yaml_header_counts_and_summary(tmp_path: Path) -> None:
    """The header names the run and counts items by status and error kind beside the run's own summary."""
    report = yaml.safe_load(write_report_yaml(tmp_path, make_meta(), source(sample_records())).read_text())
    assert report["name"] == "spring-catalog"
    assert report["manifest"] == "jobs/spring.yaml"
    assert report["model"] == "openai/gpt-image-2-plus"
    assert report["task"] == "image-edit"
    assert report["base_url"] == "http://127.0.0.1:8123"
    assert report["started"] == "2026-01-01T00:00:00Z"
    assert report["finished"] == "2026-01-01T00:02:05Z"
    assert report["stopped_reason"] is None
    assert report["counts"] == {"total": 5, "succeeded": 2, "failed": 2, "unfinished": 1}
    assert report["unfinished_by_state"] == {"pending": 1, "submitting": 0, "submitted": 0}
    assert report["errors_by_kind"] == {"content_policy": 1, "timeout": 1}
    assert report["possible_duplicates"] == 1
    assert report["images"] == 3
    assert report["run"]["submits"] == 5
    assert report["run"]["rate_limited"] == 2
    assert report["run"]["polls_per_prediction"] == 10.0
    assert report["run"]["submit_rate"] == 0.04
    assert (report["run"]["run_succeeded"], report["run"]["run_failed"]) == (1, 2)
    assert report["run"]["rate_final"] == 1.2
    assert report["run"]["elapsed"] == 125.5
    assert list(report)[-1] == "items"


def test_report_yaml_shows_why_a_run_stopped(tmp_path: Path) -> None:
    """An interrupted run's report says why it stopped, and a run without stats still writes its header."""
    meta = make_meta(stopped_reason="interrupted", finished_at=None, stats={})
    report = yaml.safe_load(write_report_yaml(tmp_path, meta, source(sample_records())).read_text())
    assert report["stopped_reason"] == "interrupted"
    assert report["finished"] is None
    assert report["run"]["submits"] is None


def test_report_yaml_round_trips_awkward_text(tmp_path: Path) -> None:
    """Error messages with YAML syntax, newlines and non-ASCII text load back exactly as written."""
    message = "key: value # not a comment\n- \"quoted\" 'single'\nünïcødé ✓ </script> " + "x" * 200
    records = [
        make_record(0, ItemState.FAILED, error=ItemError("invalid_request", message, 400), item_id="yes")
    ]
    report = yaml.safe_load(write_report_yaml(tmp_path, make_meta(), source(records)).read_text())
    assert report["items"][0]["error"]["message"] == message
    assert report["items"][0]["id"] == "yes"


def test_report_yaml_of_no_items_has_an_empty_list(tmp_path: Path) -> None:
    """With no records, ``items`` is an empty list, not null."""
    report = yaml.safe_load(write_report_yaml(tmp_path, make_meta(), source([])).read_text())
    assert report["items"] == []
    assert report["counts"]["total"] == 0


def test_report_yaml_is_block_style_in_insertion_order(tmp_path: Path) -> None:
    """report.yaml is readable: keys in the documented order, block style, items as a top-level list."""
    text = write_report_yaml(tmp_path, make_meta(), source(sample_records())).read_text()
    assert text.index("name:") < text.index("counts:") < text.index("items:")
    assert "\nitems:\n- id: sku-0\n  status: succeeded\n" in text
    assert "{" not in text.split("items:")[1]


def test_failures_manifest_holds_only_failed_specs_with_the_same_settings(tmp_path: Path) -> None:
    """failures.yaml is a version-1 manifest of the failed specs with the run's model, defaults, settings."""
    records = sample_records()
    path = write_failures_manifest(tmp_path, make_meta(), source(records))
    assert path == tmp_path / "failures.yaml"
    assert path is not None
    manifest = yaml.safe_load(path.read_text())
    assert list(manifest) == ["version", "name", "model", "task", "defaults", "settings", "items"]
    assert manifest["version"] == 1
    assert manifest["name"] == "spring-catalog-failures"
    assert manifest["model"] == "openai/gpt-image-2-plus"
    assert manifest["task"] == "image-edit"
    assert manifest["defaults"] == DEFAULTS
    assert manifest["settings"] == SETTINGS
    assert manifest["items"] == [dict(records[1].spec), dict(records[3].spec)]


def test_failures_manifest_says_where_it_came_from(tmp_path: Path) -> None:
    """A comment header names the run and shows the command that retries the failures."""
    path = write_failures_manifest(tmp_path, make_meta(), source(sample_records()))
    assert path is not None
    text = path.read_text()
    header = [line for line in text.splitlines() if line.startswith("#")]
    assert "spring-catalog" in header[0]
    assert "jobs/spring.yaml" in header[0]
    assert any(f"batch-engine run {tmp_path / 'failures.yaml'}" in line for line in header)


def test_failures_manifest_writes_the_id_of_an_item_that_had_none(tmp_path: Path) -> None:
    """An item known as ``item-<index>`` keeps that id in the shorter failures manifest."""
    spec = {"images": ["https://img.example/7.png"], "prompt": "red"}
    records = [make_record(0), make_record(7, ItemState.FAILED, item_id="item-7", spec=spec)]
    path = write_failures_manifest(tmp_path, make_meta(), source(records))
    assert path is not None
    manifest = yaml.safe_load(path.read_text())
    assert manifest["items"] == [{"id": "item-7", **spec}]


def test_no_failures_means_no_failures_manifest_and_a_stale_one_removed(tmp_path: Path) -> None:
    """With nothing failed, no failures.yaml is written, an old one is removed and no temp file is left."""
    stale = tmp_path / "failures.yaml"
    stale.write_text("version: 1\n")
    records = [make_record(0), make_record(1, ItemState.PENDING)]
    assert write_failures_manifest(tmp_path, make_meta(), source(records)) is None
    assert list(tmp_path.iterdir()) == []


def test_write_reports_writes_every_file_and_leaves_no_temp_files(tmp_path: Path) -> None:
    """write_reports returns name → path for all four files, each in the out dir, with nothing else left."""
    records = sample_records()
    write_pngs(tmp_path, records)
    written = write_reports(tmp_path, make_meta(), source(records))
    assert list(written) == list(REPORT_FILES)
    assert all(path == tmp_path / name and path.is_file() for name, path in written.items())
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*REPORT_FILES, "images"])


@pytest.mark.parametrize("count", [5, 0], ids=["sample", "empty"])
def test_write_reports_in_one_pass_writes_what_each_writer_writes_alone(tmp_path: Path, count: int) -> None:
    """The single pass that feeds report.yaml, results.jsonl and index.html together writes byte for byte
    what each file's own writer does (the gallery still lists failures first), with items or none."""
    records = sample_records()[:count]
    together, alone = tmp_path / "together", tmp_path / "alone"
    for folder in (together, alone):
        folder.mkdir()
        write_pngs(folder, records)
    meta = make_meta()
    write_reports(together, meta, source(records))
    write_report_yaml(alone, meta, source(records))
    write_results_jsonl(alone, source(records))
    write_failures_manifest(alone, meta, source(records))
    write_html_report(alone, meta, source(records))
    for name in REPORT_FILES:  # failures.yaml's retry command names its own out dir
        assert (together / name).exists() == (alone / name).exists() == (name != "failures.yaml" or count > 0)
        if (alone / name).exists():
            text = (together / name).read_text(encoding="utf-8").replace(str(together), str(alone))
            assert text == (alone / name).read_text(encoding="utf-8"), name


def test_write_reports_leaves_out_failures_when_nothing_failed(tmp_path: Path) -> None:
    """Without failures the result names three files and failures.yaml does not exist."""
    written = write_reports(tmp_path, make_meta(), source([make_record(0)]))
    assert list(written) == ["report.yaml", "results.jsonl", "index.html"]
    assert not (tmp_path / "failures.yaml").exists()


def test_a_failed_write_keeps_the_old_file_and_no_temp_file(tmp_path: Path) -> None:
    """When the records break mid-write, the previous report stays whole and the temp file is deleted."""
    old = write_results_jsonl(tmp_path, source(sample_records())).read_text()

    def broken(states: Collection[ItemState] | None = None) -> Iterator[ItemRecord]:
        yield make_record(0)
        raise RuntimeError("journal went away")

    with pytest.raises(RuntimeError, match="journal went away"):
        write_results_jsonl(tmp_path, broken)
    assert (tmp_path / "results.jsonl").read_text() == old
    assert [p.name for p in tmp_path.iterdir()] == ["results.jsonl"]


def test_count_items_counts_states_kinds_duplicates_and_images() -> None:
    """count_items tallies states, failed items' kinds (most common first), duplicates and output files."""
    counts = count_items(sample_records())
    assert (counts.total, counts.succeeded, counts.failed, counts.unfinished) == (5, 2, 2, 1)
    assert counts.by_error_kind == {"content_policy": 1, "timeout": 1}
    assert (counts.possible_duplicates, counts.images) == (1, 3)


def test_results_stream_100k_records_in_bounded_memory(tmp_path: Path) -> None:
    """100,000 records stream into results.jsonl without ever being held in memory together."""
    template = make_record(0)

    def many(states: Collection[ItemState] | None = None) -> Iterator[ItemRecord]:
        for index in range(100_000):
            yield ItemRecord(
                index, f"sku-{index}", "fp", template.spec, template.request, ItemState.SUCCEEDED
            )

    tracemalloc.start()
    try:
        path = write_results_jsonl(tmp_path, many)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 5_000_000  # a list of 100k records alone would take well over 10 MB
    with path.open(encoding="utf-8") as lines:
        assert sum(1 for _ in lines) == 100_000


@pytest.mark.parametrize(
    "value",
    [
        [{"id": "sku-1", "outputs": [{"path": "images/a.png", "url": "https://x/y?z=1", "nsfw": None}]}],
        [{"id": "yes", "n": "no", "on": "off", "empty": "", "null": "null", "t": "~"}],
        [{"date": "2026-01-01", "num": "1e3", "oct": "0o17", "neg": "-1", "colon": "a: b", "hash": "x #y"}],
        [{"quotes": "'single' \"double\"", "newline": "a\nb", "unicode": "ünï ✓", "tab": "a\tb"}],
        [{"nested": [[1, 2], [], {}], "deep": {"a": {"b": [True, False, 0, 1.5]}}}],
        [],
        {},
    ],
)
def test_block_yaml_reads_back_as_written(value: Any) -> None:
    """The report's YAML writer round-trips through yaml.safe_load, whatever the strings look like."""
    assert yaml.safe_load("".join(block_yaml(value))) == value
