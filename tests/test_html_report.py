"""index.html: the summary, the chart and the gallery data, checked as text (the browser test runs the JS)."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import shutil
from pathlib import Path
from typing import Any

from batch_engine.report.gallery_files import PageFiles, input_urls
from batch_engine.report.html import (
    PAGE_SIZE,
    escape_json_for_script,
    local_src,
    timeline_svg,
    write_html_report,
)
from batch_engine.values import ItemError, ItemRecord, ItemState, OutputFile, run_entry
from tests.test_report import STATS, T0, make_meta, make_record, sample_records, source, write_pngs

SCRIPT = re.compile(r"<script>(.*?)</script>", re.DOTALL)


def render(out_dir: Path, records: list[ItemRecord], **kwargs: Any) -> str:
    write_pngs(out_dir, records)
    meta = kwargs.pop("meta", make_meta())
    return write_html_report(out_dir, meta, source(records), **kwargs).read_text(encoding="utf-8")


def items_data(page: str) -> list[dict[str, Any]]:
    match = re.search(r'<script type="application/json" id="items-data">(.*?)</script>', page, re.DOTALL)
    assert match is not None
    data: list[dict[str, Any]] = json.loads(match.group(1))
    return data


def test_page_embeds_every_item_once_as_json(tmp_path: Path) -> None:
    """The items-data script holds one JSON object per item with what a gallery card shows."""
    data = items_data(render(tmp_path, sample_records()))
    assert sorted(item["id"] for item in data) == [f"sku-{i}" for i in range(5)]
    failed = next(item for item in data if item["id"] == "sku-1")
    assert failed["status"] == "failed"
    assert failed["kind"] == "content_policy"
    assert failed["http_status"] == 400
    assert failed["message"] == "blocked: unsafe content"
    assert failed["prompt"] == "blue"
    assert failed["size"] == "1024x1024"
    assert [picture["src"] for picture in failed["inputs"]] == ["https://img.example/1.png"]
    duplicate = next(item for item in data if item["id"] == "sku-3")
    assert duplicate["duplicate"] is True


def test_failures_come_first_then_manifest_order(tmp_path: Path) -> None:
    """The gallery data lists failed items first, each group in manifest order."""
    data = items_data(render(tmp_path, sample_records()))
    assert [item["id"] for item in data] == ["sku-1", "sku-3", "sku-0", "sku-2", "sku-4"]


def test_a_prompt_cannot_close_the_script(tmp_path: Path) -> None:
    """A prompt containing ``</script>`` and markup is escaped in the page and decodes back unchanged."""
    prompt = '</script><script>alert("x")</script><!-- & <img src=x onerror=alert(1)>'
    record = make_record(0, request={"images": ["https://img.example/0.png"], "prompt": prompt})
    page = render(tmp_path, [record])
    assert page.count("</script>") == 2  # the data block's and the code's own
    data_block = page.split('id="items-data">')[1].split("</script>")[0]
    assert "<" not in data_block
    assert "<img src=x" not in page
    assert items_data(page)[0]["prompt"] == prompt


def test_escape_json_for_script_leaves_valid_json() -> None:
    """Escaping <, > and & keeps the JSON text meaning the same."""
    value = {"p": "</script> <!-- a & b >"}
    escaped = escape_json_for_script(json.dumps(value))
    assert "<" not in escaped
    assert ">" not in escaped
    assert "&" not in escaped
    assert json.loads(escaped) == value


def test_image_paths_are_relative_and_survive_a_copy(tmp_path: Path) -> None:
    """Output sources are relative paths that resolve to the written files, also after the out dir moves."""
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    data = items_data(render(out_dir, sample_records()))
    copied = shutil.copytree(out_dir, tmp_path / "elsewhere")
    sources = [output["src"] for item in data for output in item["outputs"]]
    assert sources == ["images/sku-0-1.png", "images/sku-4-1.png", "images/sku-4-2.png"]
    assert all((copied / src).is_file() for src in sources)
    assert str(tmp_path) not in (copied / "index.html").read_text()


def test_local_src_escapes_what_a_url_cannot_hold() -> None:
    """Spaces, # and ? in a file name are percent-encoded and Windows separators become slashes."""
    assert local_src("images/a b#1?.png") == "images/a%20b%231%3F.png"
    assert local_src("inputs\\x.png") == "inputs/x.png"


def test_local_input_copies_replace_urls_and_others_say_why_they_have_none(tmp_path: Path) -> None:
    """An input with a local copy is shown from it; one without keeps its URL, and the reason it has no
    copy is there for the page to show if it does not load (not 'missing')."""
    urls = ["https://img.example/a.png", "https://img.example/b.png", "https://img.example/c.png"]
    files = PageFiles(
        inputs={urls[0]: "inputs/a.png"}, not_copied={urls[1]: "download answered 404: no such image"}
    )
    record = make_record(0, request={"images": urls, "prompt": "p"}, attempts=1)
    page = render(tmp_path, [record], files=files)
    copied, failed, later = items_data(page)[0]["inputs"]
    assert (copied["src"], copied["note"]) == ("inputs/a.png", "")
    assert (failed["src"], failed["note"]) == (urls[1], "not copied: download answered 404: no such image")
    assert later["src"] == urls[2]
    assert "the run stopped first" in later["note"]


def test_an_input_of_an_item_never_submitted_says_so(tmp_path: Path) -> None:
    """The input of an item not submitted yet was never copied, and its card says that."""
    request = {"images": ["https://img.example/a.png"], "prompt": "p"}
    record = make_record(0, ItemState.PENDING, request=request)
    [picture] = items_data(render(tmp_path, [record]))[0]["inputs"]
    assert picture["note"] == "not copied: its item was not submitted yet"


def test_pictures_with_a_thumbnail_show_it_and_link_the_full_image(tmp_path: Path) -> None:
    """An output or an input copy whose thumbnail is on disk is shown by it; the full image is its link."""
    output = OutputFile("images/sku-0-1.png", "ab" * 32, None, False)
    request = {"images": ["https://img.example/a.png"], "prompt": "p"}
    record = make_record(0, outputs=(output,), request=request)
    files = PageFiles(
        inputs={"https://img.example/a.png": "inputs/0123.png"},
        thumbs=frozenset({f"thumbs/{'ab' * 16}.webp", "thumbs/0123.webp"}),
    )
    item = items_data(render(tmp_path, [record], files=files))[0]
    assert item["outputs"][0] | {"nsfw": None} == {
        "src": "images/sku-0-1.png", "thumb": f"thumbs/{'ab' * 16}.webp", "nsfw": None
    }
    assert (item["inputs"][0]["src"], item["inputs"][0]["thumb"]) == ("inputs/0123.png", "thumbs/0123.webp")


def test_input_urls_accept_either_field_name() -> None:
    """Inputs come from ``images`` (a list) or ``image`` (a string or list)."""
    assert input_urls({"images": ["https://a/1.png", "https://a/2.png"]}) == [
        "https://a/1.png",
        "https://a/2.png",
    ]
    assert input_urls({"image": "https://a/1.png"}) == ["https://a/1.png"]
    assert input_urls({"prompt": "text only"}) == []


def test_script_urls_are_never_linked(tmp_path: Path) -> None:
    """An input given as a javascript: URL is dropped from the page data."""
    record = make_record(0, request={"images": ["javascript:alert(1)"], "prompt": "p"})
    page = render(tmp_path, [record])
    assert [picture["src"] for picture in items_data(page)[0]["inputs"]] == [""]
    assert "javascript:" not in page


def test_no_network_references_but_item_urls(tmp_path: Path) -> None:
    """Every http(s) URL in the page is an item's input URL: no CDN, fonts or scripts from elsewhere."""
    records = sample_records()
    page = render(tmp_path, records)
    item_urls = {url for record in records for url in input_urls(record.request)}
    found = set(re.findall(r"https?://[^\s\"'<>\\]+", page))
    assert found <= item_urls
    assert found  # the inputs without local copies are there


def test_only_the_pages_own_script_may_run(tmp_path: Path) -> None:
    """The Content-Security-Policy pins the inline script by hash and allows no fetches."""
    page = render(tmp_path, sample_records())
    scripts = SCRIPT.findall(page)
    assert len(scripts) == 1
    digest = base64.b64encode(hashlib.sha256(scripts[0].encode("utf-8")).digest()).decode()
    csp = re.search(r'http-equiv="Content-Security-Policy" content="([^"]+)"', page)
    assert csp is not None
    assert f"script-src 'sha256-{digest}'" in csp.group(1)
    assert "default-src 'none'" in csp.group(1)


def test_hooks_for_the_browser_test_are_present(tmp_path: Path) -> None:
    """Filters, pager, gallery and data carry the stable ids the browser test relies on."""
    page = render(tmp_path, sample_records())
    for hook in (
        'id="items-data"',
        'id="filter-status"',
        'id="filter-kind"',
        'id="filter-duplicate"',
        'id="filter-search"',
        'id="gallery"',
        'id="page-prev"',
        'id="page-next"',
        'id="page-info"',
        'id="match-count"',
        'id="empty"',
        'id="summary"',
        'id="timeline"',
        f'data-page-size="{PAGE_SIZE}"',
    ):
        assert hook in page, hook
    for option in ('value="succeeded"', 'value="failed"', 'value="pending"', 'value="content_policy"'):
        assert option in page, option
    for js_hook in (
        '"card"',
        '"output"',
        '"input"',
        "dataset.status",
        "dataset.kind",
        '"lazy"',
        "textContent",
    ):
        assert js_hook in page, js_hook
    assert "innerHTML" not in page


def test_summary_shows_the_out_dirs_items_apart_from_the_latest_runs_figures(tmp_path: Path) -> None:
    """The header shows the out dir's items (every run) and, apart and labelled, the latest run's figures:
    its time, submits, its own successes and failures, its submit rate while submitting, 429s, polls."""
    page = render(tmp_path, sample_records())
    held = page.split('id="summary"')[1].split("</dl>")[0]
    for label, value in [
        ("Items", "5"),
        ("Succeeded", "2"),
        ("Failed", "2"),
        ("Unfinished", "1"),
        ("Images", "3"),
        ("Possible duplicates", "1"),
    ]:
        assert f"<dt>{label}</dt><dd>{value}</dd>" in held, label
    latest = page.split('id="last-run"')[1].split("</dl>")[0]
    for label, value in [
        ("Time", "2m 05s"),
        ("Submitted", "5"),
        ("Succeeded", "1"),
        ("Failed", "2"),
        ("Submit rate while submitting", "0.04/s (2/min)"),
        ("429s", "2"),
        ("Polls per prediction", "10.0"),
    ]:
        assert f"<dt>{label}</dt><dd>{value}</dd>" in latest, label
    assert "Average rate" not in page
    assert "Items in this out dir" in page.split('id="summary"')[0]
    kinds = page.split('id="error-kinds"')[1].split("</ul>")[0]
    assert "content_policy" in kinds
    assert "timeout" in kinds
    assert "<h1>spring-catalog</h1>" in page
    assert 'id="stopped-reason"' not in page


def test_the_page_lists_every_run_latest_first(tmp_path: Path) -> None:
    """Each run of the out dir is a row: when it started, how long it took, what it did, how it ended."""
    runs = [
        run_entry(
            T0, T0 + 60, {"elapsed": 60, "submits": 10, "run_succeeded": 8, "run_failed": 2, "images": 8}
        ),
        run_entry(T0 + 3600, None),
        run_entry(T0 + 7200, T0 + 7205, {"elapsed": 5, "submits": 0, "stopped_reason": "interrupted"}),
    ]
    page = render(tmp_path, sample_records(), meta=make_meta(runs=runs))
    table = page.split('id="runs"')[1].split("</table>")[0]
    rows = [re.findall(r"<td>(.*?)</td>", row) for row in table.split("<tr>")[2:]]
    assert [row[0] for row in rows] == ["3", "2", "1"]
    assert rows[2] == ["1", "2026-01-01T00:00:00Z", "1m 00s", "10", "8", "2", "8", "finished"]
    assert rows[1][-1] == "killed (did not finish)"
    assert rows[0][-1] == "stopped: interrupted"


def test_a_journal_without_a_run_list_shows_its_last_run(tmp_path: Path) -> None:
    """A journal written before runs were listed shows its one known run."""
    page = render(tmp_path, sample_records(), meta=make_meta(runs=[]))
    table = page.split('id="runs"')[1].split("</table>")[0]
    assert table.count("<tr>") == 2
    assert "2026-01-01T00:00:00Z" in table


def test_a_stopped_run_says_why(tmp_path: Path) -> None:
    """A run that stopped early shows its reason in a banner, in words."""
    page = render(tmp_path, sample_records(), meta=make_meta(stopped_reason="balance"))
    banner = page.split('id="stopped-reason"')[1].split("</p>")[0]
    assert "<code>balance</code>" in banner
    assert "balance ran out or no permission (403)" in banner


def test_header_text_is_escaped(tmp_path: Path) -> None:
    """Names and paths from the manifest are HTML-escaped in the static part of the page."""
    meta = make_meta(name="<b>cats</b> & dogs", manifest_path="jobs/<x>.yaml")
    page = render(tmp_path, sample_records(), meta=meta)
    assert "<h1>&lt;b&gt;cats&lt;/b&gt; &amp; dogs</h1>" in page
    assert "jobs/&lt;x&gt;.yaml" in page
    assert "<b>cats" not in page


def test_timeline_is_an_inline_svg_line_per_series() -> None:
    """The timeline becomes one polyline per series, its bucket count and step on the chart for readers."""
    svg = timeline_svg({"submitted": [3, 2, 4], "finished": [1, 3, 4], "rate_limited": [2, 0, 0]}, step=2.0)
    assert svg.startswith('<svg id="timeline"')
    assert svg.count("<polyline") == 3
    assert 'data-buckets="3" data-step="2"' in svg
    assert "<title id=\"timeline-title\">Items per 2 s</title>" in svg
    assert "http" not in svg


def test_the_charts_labels_are_html_beside_it(tmp_path: Path) -> None:
    """The chart's scale (0, its peak per bucket, the run's length) is text under the SVG, legible at any
    width; an old journal's per-minute timeline is labelled per minute."""
    page = render(tmp_path, sample_records())
    labels = page.split('class="axis-labels">')[1].split("</p>")[0]
    assert re.findall(r"<span>(.*?)</span>", labels) == ["0", "peak 3 per minute", "2m 00s"]
    stats = {**STATS, "timeline_step": 1.0}
    page = render(tmp_path, sample_records(), meta=make_meta(stats=stats))
    assert "The latest run, per second" in page


def test_timeline_of_one_bucket_draws_points_and_none_draws_nothing() -> None:
    """A single bucket is drawn as dots; an empty timeline yields no chart."""
    assert timeline_svg({"submitted": [5], "finished": [2], "rate_limited": [0]}).count("<circle") == 3
    assert timeline_svg({}) == ""


def test_page_without_timeline_says_so(tmp_path: Path) -> None:
    """A run without a timeline gets a note instead of a chart."""
    page = render(tmp_path, sample_records(), meta=make_meta(stats={}))
    assert "No timeline recorded." in page
    assert "<svg" not in page


def test_nsfw_and_b64_outputs_are_carried(tmp_path: Path) -> None:
    """Outputs without a URL still show from their file, and the nsfw flag reaches the card data."""
    record = make_record(
        0,
        outputs=(OutputFile("images/sku-0-1.png", "d" * 64, None, True),),
        error=None,
    )
    data = items_data(render(tmp_path, [record]))
    assert data[0]["outputs"] == [{"src": "images/sku-0-1.png", "thumb": "", "nsfw": True}]


def test_failed_card_data_without_http_status(tmp_path: Path) -> None:
    """A failure with no HTTP status carries null there and its kind and message."""
    record = make_record(0, ItemState.FAILED, error=ItemError("timeout", "no answer"))
    item = items_data(render(tmp_path, [record]))[0]
    assert (item["kind"], item["http_status"], item["message"]) == ("timeout", None, "no answer")


def test_html_report_leaves_no_temp_files(tmp_path: Path) -> None:
    """Writing the page leaves only index.html (and the images) in the out dir."""
    render(tmp_path, sample_records())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images", "index.html"]
