"""The gallery's own files: input copies made while items are in flight, and thumbnails of big pictures."""

from __future__ import annotations

import io
import json
import logging
import re
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from batch_engine.report.gallery_files import THUMB_EDGE, _ThumbBatch, make_thumb
from batch_engine.sim.drawing import render_output
from tests.helpers import Harness, Outcome, edit_item, fast_settings
from tests.procs import run_engine

pytest_plugins = ("tests.helpers",)
pytestmark = pytest.mark.anyio


def page_items(outcome: Outcome) -> list[dict[str, Any]]:
    page = (outcome.out_dir / "index.html").read_text(encoding="utf-8")
    match = re.search(r'<script type="application/json" id="items-data">(.*?)</script>', page, re.DOTALL)
    assert match is not None
    data: list[dict[str, Any]] = json.loads(match.group(1))
    return data


async def test_each_distinct_input_is_copied_once_while_the_run_goes_on(harness: Harness) -> None:
    """Ten items sharing three input images: each image is fetched once, before the last prediction is
    done (not after the run), and every card shows its input from the local copy."""
    sim = await harness.sim(inference_polls=6)
    items = [
        {**edit_item(sim, f"item-{k}"), "images": [sim.input_url(f"photo-{k % 3}")]} for k in range(10)
    ]

    outcome = await harness.run(harness.manifest(items), sim, copy_inputs=True)

    assert outcome.exit_code == 0
    assert sim.stats.inputs == {"photo-0": 1, "photo-1": 1, "photo-2": 1}
    assert len(list((outcome.out_dir / "inputs").iterdir())) == 3
    sources = {picture["src"] for item in page_items(outcome) for picture in item["inputs"]}
    assert len(sources) == 3
    assert all(src.startswith("inputs/") for src in sources)


async def test_inputs_are_copied_before_the_run_ends(harness: Harness) -> None:
    """The copies are made while predictions run: every input was fetched before the simulator reported
    the last prediction done, so the end of a run is report writing only."""
    sim = await harness.sim(inference_polls=8)
    items = [{**edit_item(sim, f"item-{k}"), "images": [sim.input_url(f"photo-{k}")]} for k in range(6)]

    await harness.run(harness.manifest(items), sim, copy_inputs=True)

    last_done = max(pred.first_done_seen_at or 0.0 for pred in sim.stats.predictions.values())
    assert len(sim.stats.input_times) == 6
    assert max(sim.stats.input_times) < last_done


async def test_a_quick_run_ends_after_the_input_copies_it_queued(harness: Harness) -> None:
    """Predictions that finish at their first poll outrun the copiers (the image host is slow): the run
    still ends with every card's input copied, so the page works offline (it used to link the last
    inputs by URL)."""
    sim = await harness.sim(inference_polls=1, input_delay=0.2)
    items = [{**edit_item(sim, f"item-{k}"), "images": [sim.input_url(f"photo-{k}")]} for k in range(12)]

    outcome = await harness.run(harness.manifest(items), sim, copy_inputs=True)

    assert outcome.exit_code == 0
    sources = [picture["src"] for item in page_items(outcome) for picture in item["inputs"]]
    assert len(sources) == 12
    assert all(src.startswith("inputs/") for src in sources), sources
    assert len(list((outcome.out_dir / "inputs").iterdir())) == 12


async def test_a_run_that_stops_does_not_wait_for_input_copies(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    """A run stopped early (the balance ran out) writes its reports without waiting for the copies still
    queued (the gallery stops at the stop, and the end's grace is not entered): those inputs are linked
    by URL."""
    caplog.set_level(logging.INFO, logger="batch_engine.engine")
    # Each input takes 5 s to serve: a run that waited for them would have them all well within its
    # 30 s grace; one that does not ends long before the first arrives.
    sim = await harness.sim(inference_polls=1, input_delay=5.0, balance=3)
    items = [{**edit_item(sim, f"item-{k}"), "images": [sim.input_url(f"photo-{k}")]} for k in range(6)]

    outcome = await harness.run(harness.manifest(items), sim, copy_inputs=True)

    assert outcome.report["stopped_reason"] == "balance"
    assert outcome.report["counts"]["succeeded"] == 3
    sources = [picture["src"] for item in page_items(outcome) for picture in item["inputs"]]
    assert len(sources) == 6
    assert not any(src.startswith("inputs/") for src in sources), sources
    assert "input copies for the report's page" not in caplog.text


async def test_an_input_that_cannot_be_copied_says_why_on_its_card(harness: Harness) -> None:
    """An input the host answers 404 for is linked by its URL, and its card says why it has no copy."""
    sim = await harness.sim()
    missing = f"{sim.base_url}/_sim/nothing/here.png"
    outcome = await harness.run(
        harness.manifest([{**edit_item(sim, "a"), "images": [missing]}]), sim, copy_inputs=True
    )

    [picture] = page_items(outcome)[0]["inputs"]
    assert picture["src"] == missing
    assert picture["note"].startswith("not copied: download of")
    assert "404" in picture["note"]


@pytest.mark.slow
async def test_big_outputs_get_small_thumbnails_and_the_page_links_the_full_image(harness: Harness) -> None:
    """Outputs of 1024x1024 get WebP thumbnails of at most THUMB_EDGE pixels, made as they are saved;
    `batch-engine report` makes any the run had no time for; each card shows the thumbnail and links the
    full picture."""
    sim = await harness.sim(image_scale=1.0)
    items = [edit_item(sim, f"item-{k}") for k in range(6)]
    slow = fast_settings(rate=5.0, rate_min=1.0)  # outputs saved over a second: the first batch is done
    outcome = await harness.run(harness.manifest(items), sim, settings=slow)
    made_in_run = [o["thumb"] for item in page_items(outcome) for o in item["outputs"] if o["thumb"]]

    report = await run_engine(["report", str(outcome.out_dir)])
    assert report.code == 0, report.stderr

    thumbs = sorted((outcome.out_dir / "thumbs").glob("*.webp"))
    assert made_in_run
    assert len(thumbs) == 6
    for thumb in thumbs:
        with Image.open(thumb) as image:
            assert image.format == "WEBP"
            assert max(image.size) == THUMB_EDGE
    for item in page_items(outcome):
        [output] = item["outputs"]
        assert output["thumb"].startswith("thumbs/")
        assert (outcome.out_dir / output["thumb"]).is_file()
        assert output["src"].startswith("images/")
    full = sum((outcome.out_dir / o["src"]).stat().st_size for i in page_items(outcome) for o in i["outputs"])
    small = sum(thumb.stat().st_size for thumb in thumbs)
    assert small < full / 4


async def test_small_outputs_are_their_own_thumbnails(harness: Harness) -> None:
    """Outputs already thumbnail-sized (64x64) get no thumbnail file: the page shows them as they are."""
    sim = await harness.sim()
    outcome = await harness.run(harness.manifest([edit_item(sim, f"item-{k}") for k in range(4)]), sim)

    thumbs = outcome.out_dir / "thumbs"
    assert not thumbs.exists() or not any(thumbs.iterdir())
    assert all(output["thumb"] == "" for item in page_items(outcome) for output in item["outputs"])


def test_a_small_file_is_not_decoded(tmp_path: Path) -> None:
    """A picture of a few kilobytes is left as it is, whatever its pixel size claims."""
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.png").write_bytes(render_output(64, 64, prompt="p", index=0, seed=0))
    assert make_thumb(tmp_path, "images/a.png", "thumbs/a.webp") is False
    assert not (tmp_path / "thumbs").exists()


def test_a_big_picture_becomes_a_thumbnail_of_the_same_shape(tmp_path: Path) -> None:
    """A 1536x1024 picture becomes a 384x256 WebP."""
    buffer = io.BytesIO()
    Image.effect_noise((1536, 1024), 64).convert("RGB").save(buffer, "PNG")
    (tmp_path / "big.png").write_bytes(buffer.getvalue())
    assert make_thumb(tmp_path, "big.png", "thumbs/big.webp") is True
    with Image.open(tmp_path / "thumbs" / "big.webp") as image:
        assert image.size == (384, 256)


def big_picture(path: Path) -> None:
    buffer = io.BytesIO()
    Image.effect_noise((1024, 1024), 64).convert("RGB").save(buffer, "PNG")
    path.write_bytes(buffer.getvalue())


def test_a_thumbnail_batch_stopped_before_its_thread_began_writes_nothing_and_is_not_waited_for(
    tmp_path: Path,
) -> None:
    """The end of a run stops the batch in flight: one whose thread has not begun (anyio may never run it)
    is not waited for (the end of every run waited 10 s for it) and writes nothing if it begins later."""
    big_picture(tmp_path / "a.png")
    batch = _ThumbBatch(tmp_path, [("a.png", "thumbs/a.webp")])
    assert batch.stop() is False
    assert batch.run() == 0
    assert not (tmp_path / "thumbs").exists()

