"""Write index.html, the morning-after page: the run's summary, a progress chart and a paged gallery.

The page is one self-contained file: inline CSS, an inline SVG chart, inline JS and no network of its own
(a Content-Security-Policy forbids fetches and any script but the page's own). Images are referenced by
paths relative to the out dir, so the page keeps working when the out dir is copied elsewhere; only input
images with no local copy point at their URLs. The item data is embedded once as JSON and the JS renders
one page of cards at a time with ``textContent``: prompts are user text and never reach ``innerHTML``.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import re
from collections.abc import Iterator, Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import IO, Any
from urllib.parse import quote

from batch_engine.control import stop_message
from batch_engine.report.entries import Counts, Records, count_items, iso_utc
from batch_engine.report.gallery_files import MAX_INPUTS, PageFiles, input_thumb, input_urls, output_thumb
from batch_engine.store.files import replace_atomically
from batch_engine.timeline import LEGACY_STEP
from batch_engine.values import ItemRecord, ItemState, RunMeta

PAGE_SIZE = 100
TIMELINE_SERIES = (("submitted", "Submitted"), ("finished", "Finished"), ("rate_limited", "429s"))

_URL_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
_SAFE_URL = re.compile(r"^(https?:|data:image/)", re.IGNORECASE)


def write_html_report(
    out_dir: Path,
    meta: RunMeta,
    records: Records,
    *,
    files: PageFiles | None = None,
    counts: Counts | None = None,
) -> Path:
    """Write ``out_dir/index.html``; ``files`` says which input copies and thumbnails it can show.

    ``counts`` saves a pass over the records when the caller already has them.
    """
    counts = counts if counts is not None else count_items(records())
    path = out_dir / "index.html"
    with replace_atomically(path) as stream:
        gallery = Gallery(stream, meta, counts, files or PageFiles())
        for record in failures_first(records):
            gallery.add(record)
        gallery.close()
    return path


class Gallery:
    """Writes index.html to ``stream``: the page head at once, then one card per ``add``, then ``close``."""

    __slots__ = ("_cards", "_files", "_stream")

    def __init__(self, stream: IO[str], meta: RunMeta, counts: Counts, files: PageFiles) -> None:
        self._stream = stream
        self._files = files
        self._cards = 0
        stream.write(_head(meta))
        stream.write(_summary(meta, counts))
        stream.write(_timeline_section(meta.stats))
        stream.write(_toolbar(counts))
        stream.write('<script type="application/json" id="items-data">[')

    def add(self, record: ItemRecord) -> None:
        text = json.dumps(card_data(record, self._files), ensure_ascii=False, separators=(",", ":"))
        self._stream.write(("," if self._cards else "") + "\n" + escape_json_for_script(text))
        self._cards += 1

    def close(self) -> None:
        self._stream.write(f"\n]</script>\n<script>{_SCRIPT}</script>\n</body>\n</html>\n")


def failures_first(records: Records) -> Iterator[ItemRecord]:
    """Failed items in manifest order, then every other item in manifest order: two queries, no list."""
    yield from records({ItemState.FAILED})
    yield from records([state for state in ItemState if state is not ItemState.FAILED])


def card_data(record: ItemRecord, files: PageFiles) -> dict[str, Any]:
    """What the gallery shows of one item, image sources already resolved.

    Each picture has its ``src`` (the full image, which a click opens) and a ``thumb`` to show in the card
    when there is one; an input without a local copy says why in its ``note``.
    """
    error = record.error
    return {
        "id": record.item_id,
        "status": record.state.value,
        "kind": error.kind if error else "",
        "http_status": error.status if error else None,
        "message": error.message if error else "",
        "prompt": str(record.request.get("prompt", "")),
        "size": str(record.request.get("size", "")),
        "inputs": [_input(url, record, files) for url in input_urls(record.request)],
        "outputs": [
            {"src": local_src(out.path), "thumb": _thumb(output_thumb(out), files), "nsfw": out.nsfw}
            for out in record.outputs
        ],
        "duplicate": record.possible_duplicate,
        "attempts": record.attempts,
        "prediction_id": record.prediction_id,
        "inference_ms": record.inference_ms,
        "meta": _meta_text(record),
    }


def _meta_text(record: ItemRecord) -> str:
    """The item's metadata as one searchable line, ``key: value`` pairs."""
    meta = record.spec.get("meta")
    if not isinstance(meta, Mapping):
        return ""
    return " · ".join(f"{key}: {value}" for key, value in meta.items())


def _input(url: str, record: ItemRecord, files: PageFiles) -> dict[str, str]:
    copy = files.inputs.get(url)
    if copy is not None:
        return {"src": local_src(copy), "thumb": _thumb(input_thumb(copy), files), "note": ""}
    return {"src": _remote_src(url), "thumb": "", "note": _why_not_copied(url, record, files)}


def _why_not_copied(url: str, record: ItemRecord, files: PageFiles) -> str:
    """What the page says where an input without a local copy does not load (offline, or gone)."""
    if not url.startswith(("http://", "https://")):
        return "not copied: not an http(s) URL"
    if url in files.not_copied:
        return f"not copied: {files.not_copied[url]}"
    if record.attempts == 0:
        return "not copied: its item was not submitted yet"
    return f"not copied (the run stopped first, or over {MAX_INPUTS:,} inputs): shown from its URL"


def _thumb(relpath: str, files: PageFiles) -> str:
    return local_src(relpath) if relpath in files.thumbs else ""


def local_src(path: str) -> str:
    """A path relative to the out dir as a relative URL: forward slashes, special characters escaped."""
    return quote(path.replace("\\", "/").lstrip("/"), safe="/")


def escape_json_for_script(text: str) -> str:
    """Make JSON text safe inside ``<script>``: no ``</script>``, ``<!--`` or ``&`` survives literally.

    The three characters only occur inside JSON strings, where ``\\u003c``-style escapes mean the same.
    """
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def timeline_svg(
    timeline: Mapping[str, Sequence[int]], *, step: float = LEGACY_STEP, width: int = 720, height: int = 180
) -> str:
    """Counts per ``step`` seconds as an inline SVG line chart, one polyline per series; '' without data.

    The chart holds lines only: its labels are HTML beside it (`_timeline_section`), so they stay legible
    however narrow the screen the SVG shrinks to.
    """
    buckets = max((len(timeline.get(key, ())) for key, _ in TIMELINE_SERIES), default=0)
    if buckets == 0:
        return ""
    peak = _peak(timeline)
    left, right, top, bottom = 8, 8, 8, 8
    plot_w, plot_h = width - left - right, height - top - bottom

    def point(k: int, value: int) -> str:
        x = left + (plot_w * k / (buckets - 1) if buckets > 1 else plot_w / 2)
        return f"{x:.1f},{top + plot_h - plot_h * value / peak:.1f}"

    parts = [
        f'<svg id="timeline" class="chart" viewBox="0 0 {width} {height}" role="img" '
        f'data-buckets="{buckets}" data-step="{step:g}" aria-labelledby="timeline-title">'
        f'<title id="timeline-title">Items per {_e(_step_text(step))}</title>',
        f'<line class="axis" x1="{left}" y1="{top + plot_h}" x2="{width - right}" y2="{top + plot_h}"/>',
        f'<line class="axis" x1="{left}" y1="{top}" x2="{left}" y2="{top + plot_h}"/>',
        f'<line class="grid" x1="{left}" y1="{top}" x2="{width - right}" y2="{top}"/>',
    ]
    for key, _label in TIMELINE_SERIES:
        values = list(timeline.get(key, ()))
        points = " ".join(point(k, value) for k, value in enumerate(values))
        if len(values) == 1:
            x, y = point(0, values[0]).split(",")
            parts.append(f'<circle class="series series-{key}" cx="{x}" cy="{y}" r="3"/>')
        elif values:
            parts.append(f'<polyline class="series series-{key}" points="{points}"/>')
    parts.append("</svg>")
    return "".join(parts)


def _peak(timeline: Mapping[str, Sequence[int]]) -> int:
    return max(max(timeline.get(key, ()), default=0) for key, _ in TIMELINE_SERIES) or 1


def _step_text(step: float) -> str:
    """``second``, ``4 s``, ``minute``, ``17 min``: what one bucket of the chart spans."""
    if step == 1:
        return "second"
    if step == 60:
        return "minute"
    return f"{step:g} s" if step < 120 else f"{step / 60:.0f} min"


def _remote_src(url: str) -> str:
    if _SAFE_URL.match(url) or not _URL_SCHEME.match(url):
        return url
    return ""  # javascript:, file: and the like are never linked


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _head(meta: RunMeta) -> str:
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">\n'
        '<meta name="generator" content="batch-engine">\n'
        f"<title>{_e(meta.name)} · batch-engine report</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n"
    )


def _summary(meta: RunMeta, counts: Counts) -> str:
    """The header, then what the out dir holds (every run's items) apart from what the latest run did."""
    stats = meta.stats
    sentence = stop_message(meta.stopped_reason, stats.get("stop_detail"))
    stopped = (
        f'<p class="banner" id="stopped-reason">Stopped before the end (<code>{_e(meta.stopped_reason)}'
        f"</code>): {_e(sentence)}</p>\n"
        if meta.stopped_reason
        else ""
    )
    duplicates = "duplicate" if counts.possible_duplicates else ""
    held = [
        ("Items", f"{counts.total:,}", ""),
        ("Succeeded", f"{counts.succeeded:,}", "succeeded"),
        ("Failed", f"{counts.failed:,}", "failed"),
        ("Unfinished", f"{counts.unfinished:,}", "unfinished"),
        ("Images", f"{counts.images:,}", ""),
        ("Possible duplicates", f"{counts.possible_duplicates:,}", duplicates),
    ]
    latest = [
        ("Time", _duration(stats.get("elapsed")), ""),
        ("Submitted", _number(stats.get("submits")), ""),
        ("Succeeded", _number(stats.get("run_succeeded")), "succeeded"),
        ("Failed", _number(stats.get("run_failed")), "failed"),
        ("Submit rate while submitting", _rate(stats.get("submit_rate")), ""),
        ("429s", _number(stats.get("rate_limited")), ""),
        ("Polls per prediction", _number(stats.get("polls_per_prediction")), ""),
    ]
    return (
        f'<header class="page-header">\n<h1>{_e(meta.name)}</h1>\n<p class="subtitle">'
        f"{_e(meta.model)} · {_e(meta.task)} · manifest <code>{_e(meta.manifest_path)}</code></p>\n"
        f"{stopped}</header>\n<main>\n"
        '<section class="summary" aria-label="Summary">\n'
        '<h2>Items in this out dir <span class="scope">all runs</span></h2>\n'
        f'<dl class="stats" id="summary">{_tiles(held)}</dl>\n{_error_kinds(counts)}'
        f'<h2>The latest run <span class="scope">{_e(_span(meta.started_at, meta.finished_at))}</span></h2>\n'
        f'<dl class="stats" id="last-run">{_tiles(latest)}</dl>\n</section>\n'
        f"{_runs_section(meta)}"
    )


def _tiles(facts: Sequence[tuple[str, str, str]]) -> str:
    return "".join(
        f'<div class="stat {cls}"><dt>{_e(label)}</dt><dd>{_e(value)}</dd></div>'
        for label, value, cls in facts
    )


def _span(started: object, finished: object) -> str:
    start = iso_utc(started) if isinstance(started, int | float) else None
    end = iso_utc(finished) if isinstance(finished, int | float) else None
    return f"{start or 'not started'} → {end or 'not finished'}"


def _runs_section(meta: RunMeta) -> str:
    """Every run of the out dir, the latest first: when, how long, what it did, how it ended."""
    runs = meta.history()
    if not runs:
        return ""
    rows = []
    for number, run in reversed(list(enumerate(runs, 1))):
        cells = [
            str(number),
            iso_utc(run.get("started_at")) or "–",
            _duration(run.get("elapsed")),
            _number(run.get("submits")),
            _number(run.get("succeeded")),
            _number(run.get("failed")),
            _number(run.get("images")),
            _ending(run, latest=number == len(runs)),
        ]
        rows.append("<tr>" + "".join(f"<td>{_e(cell)}</td>" for cell in cells) + "</tr>")
    head = "".join(
        f"<th>{name}</th>"
        for name in ("#", "Started (UTC)", "Took", "Submitted", "Succeeded", "Failed", "Images", "Ended")
    )
    return (
        f'<section class="runs" aria-label="Runs"><h2>Runs <span class="scope">{len(runs):,}</span></h2>'
        f'<div class="table-wrap"><table id="runs"><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table></div></section>\n"
    )


def _ending(run: Mapping[str, Any], *, latest: bool) -> str:
    if run.get("finished_at") is None:
        return "still running, or killed" if latest else "killed (did not finish)"
    reason = run.get("stopped_reason")
    return f"stopped: {reason}" if reason else "finished"


def _error_kinds(counts: Counts) -> str:
    if not counts.by_error_kind:
        return ""
    rows = "".join(
        f'<li><span class="kind">{_e(kind)}</span> <span class="count">{number:,}</span></li>'
        for kind, number in counts.by_error_kind.items()
    )
    return (
        '<h2>Failures by kind <span class="scope">all runs</span></h2>\n'
        f'<ul class="kinds" id="error-kinds">{rows}</ul>\n'
    )


def _timeline_section(stats: Mapping[str, Any]) -> str:
    timeline: Mapping[str, Sequence[int]] = stats.get("timeline") or {}
    step = float(stats.get("timeline_step") or LEGACY_STEP)
    chart = timeline_svg(timeline, step=step)
    if not chart:
        return (
            '<section class="progress"><h2>Progress</h2><p class="muted">No timeline recorded.</p>'
            "</section>\n"
        )
    buckets = max(len(timeline.get(key, ())) for key, _ in TIMELINE_SERIES)
    legend = "".join(
        f'<li><span class="swatch series-{key}"></span>{_e(label)} '
        f'<span class="muted">({sum(timeline.get(key, ())):,})</span></li>'
        for key, label in TIMELINE_SERIES
    )
    unit = _step_text(step)
    return (
        f'<section class="progress"><h2>The latest run, per {_e(unit)}</h2>{chart}'
        f'<p class="axis-labels"><span>0</span><span>peak {_peak(timeline):,} per {_e(unit)}</span>'
        f"<span>{_e(_duration(buckets * step))}</span></p>"
        f'<ul class="legend">{legend}</ul></section>\n'
    )


def _toolbar(counts: Counts) -> str:
    states = [state.value for state in ItemState if counts.by_state.get(state.value)]
    status_options = "".join(
        f'<option value="{_e(s)}">{_e(s)} ({counts.by_state[s]:,})</option>' for s in states
    )
    kind_options = "".join(
        f'<option value="{_e(k)}">{_e(k)} ({n:,})</option>' for k, n in counts.by_error_kind.items()
    )
    return (
        '<section class="gallery-section" aria-label="Items">\n<div class="toolbar" id="toolbar">\n'
        '<label>Status <select id="filter-status"><option value="">all</option>'
        f"{status_options}</select></label>\n"
        '<label>Error <select id="filter-kind"><option value="">any</option>'
        f"{kind_options}</select></label>\n"
        '<label class="check"><input type="checkbox" id="filter-duplicate"> possible duplicates only'
        '</label>\n<label class="grow"><input type="search" id="filter-search" '
        'placeholder="Search id, prompt or metadata"></label>\n'
        '<span class="pager"><button type="button" id="page-prev">← Prev</button>'
        '<span id="page-info" aria-live="polite">Page 1 of 1</span>'
        '<button type="button" id="page-next">Next →</button></span>\n'
        '<span class="muted" id="match-count"></span>\n</div>\n'
        '<noscript><p class="banner">The gallery needs JavaScript; results.jsonl lists every item.</p>'
        "</noscript>\n"
        f'<div class="gallery" id="gallery" data-page-size="{PAGE_SIZE}"></div>\n'
        '<p class="muted" id="empty" hidden>No items match the filter.</p>\n</section>\n</main>\n'
    )


def _duration(seconds: object) -> str:
    if not isinstance(seconds, int | float):
        return "–"
    whole = int(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h {minutes:02d}m {secs:02d}s" if hours else f"{minutes}m {secs:02d}s"


def _rate(per_second: object) -> str:
    if not isinstance(per_second, int | float):
        return "–"
    return f"{per_second:.2f}/s ({per_second * 60:.0f}/min)"


def _number(value: object) -> str:
    return f"{value:,}" if isinstance(value, int | float) else "–"


def _asset(name: str) -> str:
    return (resources.files("batch_engine.report") / "assets" / name).read_text(encoding="utf-8")


#: The page's style and script live beside this module as plain files (an editor and a linter read them).
_STYLE = _asset("report.css")
_SCRIPT = _asset("report.js")

# Only the page's own script may run (pinned by its hash) and nothing may be fetched but images:
# the page stays offline, and a prompt that somehow escaped its JSON could not execute.
_SCRIPT_HASH = base64.b64encode(hashlib.sha256(_SCRIPT.encode("utf-8")).digest()).decode("ascii")
_CSP = (
    "default-src 'none'; img-src * data: blob: file:; style-src 'unsafe-inline'; "
    f"script-src 'sha256-{_SCRIPT_HASH}'; base-uri 'none'; form-action 'none'"
)
