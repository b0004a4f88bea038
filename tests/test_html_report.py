"""index.html: the summary, the chart and the gallery data, checked as text (the browser test runs the JS)."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import shutil
from pathlib import Path
from typing import Any

from batch_engine.report.html import (
    PAGE_SIZE,
    escape_json_for_script,
    input_urls,
    local_src,
    timeline_svg,
    write_html_report,
)
from batch_engine.values import ItemError, ItemRecord, ItemState, OutputFile
from tests.test_report import make_meta, make_record, sample_records, source, write_pngs

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
    assert failed["inputs"] == ["https://img.example/1.png"]
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


def test_local_input_copies_replace_urls(tmp_path: Path) -> None:
    """An input with a local copy in ``inputs`` is shown from it; others keep their URL."""
    record = make_record(
        0, request={"images": ["https://img.example/a.png", "https://img.example/b.png"], "prompt": "p"}
    )
    page = render(tmp_path, [record], inputs={"https://img.example/a.png": "inputs/a.png"})
    assert items_data(page)[0]["inputs"] == ["inputs/a.png", "https://img.example/b.png"]


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
    assert items_data(page)[0]["inputs"] == [""]
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


def test_summary_shows_counts_kinds_and_run_figures(tmp_path: Path) -> None:
    """The header names the run and shows counts by status and kind, images, time, rate, 429s, polls."""
    page = render(tmp_path, sample_records())
    summary = page.split('id="summary"')[1].split("</dl>")[0]
    for label, value in [
        ("Items", "5"),
        ("Succeeded", "2"),
        ("Failed", "2"),
        ("Unfinished", "1"),
        ("Images", "3"),
        ("Time", "2m 05s"),
        ("429s", "2"),
        ("Polls per prediction", "10.0"),
        ("Possible duplicates", "1"),
    ]:
        assert f"<dt>{label}</dt><dd>{value}</dd>" in summary, label
    assert "<dt>Average rate</dt><dd>0.04/s (2/min)</dd>" in summary
    kinds = page.split('id="error-kinds"')[1].split("</ul>")[0]
    assert "content_policy" in kinds
    assert "timeout" in kinds
    assert "<h1>spring-catalog</h1>" in page
    assert 'id="stopped-reason"' not in page


def test_a_stopped_run_says_why(tmp_path: Path) -> None:
    """A run that stopped early shows its reason in a banner."""
    page = render(tmp_path, sample_records(), meta=make_meta(stopped_reason="balance"))
    assert "<strong>balance</strong>" in page.split('id="stopped-reason"')[1]


def test_header_text_is_escaped(tmp_path: Path) -> None:
    """Names and paths from the manifest are HTML-escaped in the static part of the page."""
    meta = make_meta(name="<b>cats</b> & dogs", manifest_path="jobs/<x>.yaml")
    page = render(tmp_path, sample_records(), meta=meta)
    assert "<h1>&lt;b&gt;cats&lt;/b&gt; &amp; dogs</h1>" in page
    assert "jobs/&lt;x&gt;.yaml" in page
    assert "<b>cats" not in page


def test_timeline_is_an_inline_svg_line_per_series() -> None:
    """The per-minute timeline becomes one polyline per series, scaled to the busiest minute."""
    svg = timeline_svg({"submitted": [3, 2, 4], "finished": [1, 3, 4], "rate_limited": [2, 0, 0]})
    assert svg.startswith('<svg id="timeline"')
    assert svg.count("<polyline") == 3
    assert ">4</text>" in svg
    assert ">3 min</text>" in svg
    assert "http" not in svg


def test_timeline_of_one_minute_draws_points_and_none_draws_nothing() -> None:
    """A single minute is drawn as dots; an empty timeline yields no chart."""
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
    assert data[0]["outputs"] == [{"src": "images/sku-0-1.png", "nsfw": True}]


def test_failed_card_data_without_http_status(tmp_path: Path) -> None:
    """A failure with no HTTP status carries null there and its kind and message."""
    record = make_record(0, ItemState.FAILED, error=ItemError("timeout", "no answer"))
    item = items_data(render(tmp_path, [record]))[0]
    assert (item["kind"], item["http_status"], item["message"]) == ("timeout", None, "no answer")


def test_html_report_leaves_no_temp_files(tmp_path: Path) -> None:
    """Writing the page leaves only index.html (and the images) in the out dir."""
    render(tmp_path, sample_records())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images", "index.html"]
