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
from pathlib import Path
from typing import IO, Any
from urllib.parse import quote

from batch_engine.report.write import Counts, Records, atomic_text, count_items, iso_utc
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
    inputs: Mapping[str, str] | None = None,
    counts: Counts | None = None,
) -> Path:
    """Write ``out_dir/index.html``; ``inputs`` maps input URLs to local copies relative to ``out_dir``.

    ``counts`` saves a pass over the records when the caller already has them.
    """
    counts = counts if counts is not None else count_items(records())
    path = out_dir / "index.html"
    with atomic_text(path) as stream:
        gallery = Gallery(stream, meta, counts, inputs or {})
        for record in failures_first(records):
            gallery.add(record)
        gallery.close()
    return path


class Gallery:
    """Writes index.html to ``stream``: the page head at once, then one card per ``add``, then ``close``."""

    __slots__ = ("_cards", "_inputs", "_stream")

    def __init__(self, stream: IO[str], meta: RunMeta, counts: Counts, inputs: Mapping[str, str]) -> None:
        self._stream = stream
        self._inputs = inputs
        self._cards = 0
        stream.write(_head(meta))
        stream.write(_summary(meta, counts))
        stream.write(_timeline_section(meta.stats.get("timeline") or {}))
        stream.write(_toolbar(counts))
        stream.write('<script type="application/json" id="items-data">[')

    def add(self, record: ItemRecord) -> None:
        text = json.dumps(card_data(record, self._inputs), ensure_ascii=False, separators=(",", ":"))
        self._stream.write(("," if self._cards else "") + "\n" + escape_json_for_script(text))
        self._cards += 1

    def close(self) -> None:
        self._stream.write(f"\n]</script>\n<script>{_SCRIPT}</script>\n</body>\n</html>\n")


def failures_first(records: Records) -> Iterator[ItemRecord]:
    """Failed items in manifest order, then every other item in manifest order: two queries, no list."""
    yield from records({ItemState.FAILED})
    yield from records([state for state in ItemState if state is not ItemState.FAILED])


def card_data(record: ItemRecord, inputs: Mapping[str, str]) -> dict[str, Any]:
    """What the gallery shows of one item, image sources already resolved."""
    error = record.error
    return {
        "id": record.item_id,
        "status": record.state.value,
        "kind": error.kind if error else "",
        "http_status": error.status if error else None,
        "message": error.message if error else "",
        "prompt": str(record.request.get("prompt", "")),
        "size": str(record.request.get("size", "")),
        "inputs": [_input_src(url, inputs) for url in input_urls(record.request)],
        "outputs": [{"src": local_src(out.path), "nsfw": out.nsfw} for out in record.outputs],
        "duplicate": record.possible_duplicate,
        "attempts": record.attempts,
        "prediction_id": record.prediction_id,
        "inference_ms": record.inference_ms,
    }


def input_urls(request: Mapping[str, Any]) -> list[str]:
    """The input image URLs of a request: ``images`` (a list), or ``image`` for models that take that name."""
    value = request.get("images", request.get("image", []))
    values = [value] if isinstance(value, str) else value
    return [str(url) for url in values if url]


def local_src(path: str) -> str:
    """A path relative to the out dir as a relative URL: forward slashes, special characters escaped."""
    return quote(path.replace("\\", "/").lstrip("/"), safe="/")


def escape_json_for_script(text: str) -> str:
    """Make JSON text safe inside ``<script>``: no ``</script>``, ``<!--`` or ``&`` survives literally.

    The three characters only occur inside JSON strings, where ``\\u003c``-style escapes mean the same.
    """
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def timeline_svg(timeline: Mapping[str, Sequence[int]], *, width: int = 720, height: int = 200) -> str:
    """Per-minute counts as an inline SVG line chart, one polyline per series; '' when there is no data."""
    minutes = max((len(timeline.get(key, ())) for key, _ in TIMELINE_SERIES), default=0)
    if minutes == 0:
        return ""
    peak = max(max(timeline.get(key, ()), default=0) for key, _ in TIMELINE_SERIES) or 1
    left, right, top, bottom = 44, 12, 12, 28
    plot_w, plot_h = width - left - right, height - top - bottom

    def point(minute: int, value: int) -> str:
        x = left + (plot_w * minute / (minutes - 1) if minutes > 1 else plot_w / 2)
        return f"{x:.1f},{top + plot_h - plot_h * value / peak:.1f}"

    parts = [
        f'<svg id="timeline" class="chart" viewBox="0 0 {width} {height}" role="img" '
        f'aria-labelledby="timeline-title"><title id="timeline-title">Items per minute</title>',
        f'<line class="axis" x1="{left}" y1="{top + plot_h}" x2="{width - right}" y2="{top + plot_h}"/>',
        f'<line class="axis" x1="{left}" y1="{top}" x2="{left}" y2="{top + plot_h}"/>',
        f'<line class="grid" x1="{left}" y1="{top}" x2="{width - right}" y2="{top}"/>',
        f'<text class="tick" x="{left - 6}" y="{top + 4}" text-anchor="end">{peak}</text>',
        f'<text class="tick" x="{left - 6}" y="{top + plot_h + 4}" text-anchor="end">0</text>',
        f'<text class="tick" x="{left}" y="{height - 8}">0 min</text>',
        f'<text class="tick" x="{width - right}" y="{height - 8}" text-anchor="end">{minutes} min</text>',
    ]
    for key, _label in TIMELINE_SERIES:
        values = list(timeline.get(key, ()))
        points = " ".join(point(minute, value) for minute, value in enumerate(values))
        if len(values) == 1:
            x, y = point(0, values[0]).split(",")
            parts.append(f'<circle class="series series-{key}" cx="{x}" cy="{y}" r="3"/>')
        elif values:
            parts.append(f'<polyline class="series series-{key}" points="{points}"/>')
    parts.append("</svg>")
    return "".join(parts)


def _input_src(url: str, inputs: Mapping[str, str]) -> str:
    local = inputs.get(url)
    if local is not None:
        return local_src(local)
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
    stats = meta.stats
    stopped = (
        f'<p class="banner" id="stopped-reason">Stopped before the end: <strong>{_e(meta.stopped_reason)}'
        "</strong>. Run the same command again to resume.</p>\n"
        if meta.stopped_reason
        else ""
    )
    duplicates = "duplicate" if counts.possible_duplicates else ""
    facts = [
        ("Items", f"{counts.total:,}", ""),
        ("Succeeded", f"{counts.succeeded:,}", "succeeded"),
        ("Failed", f"{counts.failed:,}", "failed"),
        ("Unfinished", f"{counts.unfinished:,}", "unfinished"),
        ("Images", f"{counts.images:,}", ""),
        ("Time", _duration(stats.get("elapsed")), ""),
        ("Average rate", _rate(stats.get("average_rate")), ""),
        ("429s", _number(stats.get("rate_limited")), ""),
        ("Polls per prediction", _number(stats.get("polls_per_prediction")), ""),
        ("Possible duplicates", f"{counts.possible_duplicates:,}", duplicates),
    ]
    tiles = "".join(
        f'<div class="stat {cls}"><dt>{_e(label)}</dt><dd>{_e(value)}</dd></div>'
        for label, value, cls in facts
    )
    return (
        f'<header class="page-header">\n<h1>{_e(meta.name)}</h1>\n<p class="subtitle">'
        f"{_e(meta.model)} · {_e(meta.task)} · manifest <code>{_e(meta.manifest_path)}</code><br>"
        f"{_e(iso_utc(meta.started_at) or 'not started')} → {_e(iso_utc(meta.finished_at) or 'not finished')}"
        f"</p>\n{stopped}</header>\n<main>\n"
        f'<section class="summary" aria-label="Summary">\n<dl class="stats" id="summary">{tiles}</dl>\n'
        f"{_error_kinds(counts)}</section>\n"
    )


def _error_kinds(counts: Counts) -> str:
    if not counts.by_error_kind:
        return ""
    rows = "".join(
        f'<li><span class="kind">{_e(kind)}</span> <span class="count">{number:,}</span></li>'
        for kind, number in counts.by_error_kind.items()
    )
    return f'<h2>Failures by kind</h2>\n<ul class="kinds" id="error-kinds">{rows}</ul>\n'


def _timeline_section(timeline: Mapping[str, Sequence[int]]) -> str:
    chart = timeline_svg(timeline)
    if not chart:
        return (
            '<section class="progress"><h2>Progress</h2><p class="muted">No timeline recorded.</p>'
            "</section>\n"
        )
    legend = "".join(
        f'<li><span class="swatch series-{key}"></span>{_e(label)} '
        f'<span class="muted">({sum(timeline.get(key, ())):,})</span></li>'
        for key, label in TIMELINE_SERIES
    )
    return (
        f'<section class="progress"><h2>Progress, per minute</h2>{chart}'
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
        'placeholder="Search id or prompt"></label>\n'
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


_STYLE = """
:root{--bg:#f6f7f9;--card:#fff;--fg:#1b1f24;--muted:#5f6b7a;--line:#dde2e8;--accent:#2563eb;
--ok:#15803d;--ok-bg:#dcfce7;--bad:#b91c1c;--bad-bg:#fee2e2;--wait:#a16207;--wait-bg:#fef3c7;
--dup:#7c3aed;--dup-bg:#ede9fe;--s-submitted:#2563eb;--s-finished:#16a34a;--s-rate_limited:#dc2626;
color-scheme:light dark}
@media (prefers-color-scheme:dark){:root{--bg:#0f1216;--card:#181c22;--fg:#e6e9ee;--muted:#97a3b3;
--line:#2a313a;--accent:#60a5fa;--ok:#4ade80;--ok-bg:#14301f;--bad:#f87171;--bad-bg:#3a1719;
--wait:#fbbf24;--wait-bg:#3a2e0f;--dup:#c4b5fd;--dup-bg:#2b2145;--s-submitted:#60a5fa;
--s-finished:#4ade80;--s-rate_limited:#f87171}}
*{box-sizing:border-box}
body{margin:0;background:var(--bg);color:var(--fg);font:15px/1.5 system-ui,-apple-system,"Segoe UI",
Roboto,"Helvetica Neue",Arial,sans-serif}
code{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:.9em}
h1{font-size:1.6rem;margin:0 0 .25rem}
h2{font-size:1rem;margin:1.25rem 0 .5rem;color:var(--muted);font-weight:600;text-transform:uppercase;
letter-spacing:.04em}
.page-header,main{max-width:1400px;margin:0 auto;padding:1.25rem 1.5rem 0}
.subtitle,.muted{color:var(--muted)}
.subtitle{margin:0}
.banner{background:var(--wait-bg);color:var(--wait);border-radius:8px;padding:.6rem .9rem}
.stats{display:grid;grid-template-columns:repeat(auto-fill,minmax(150px,1fr));gap:.6rem;margin:0}
.stat{background:var(--card);border:1px solid var(--line);border-radius:10px;padding:.6rem .8rem}
.stat dt{font-size:.78rem;color:var(--muted)}
.stat dd{margin:0;font-size:1.25rem;font-weight:600;font-variant-numeric:tabular-nums}
.stat.succeeded dd{color:var(--ok)}.stat.failed dd{color:var(--bad)}.stat.unfinished dd{color:var(--wait)}
.stat.duplicate dd{color:var(--dup)}
.kinds,.legend{list-style:none;padding:0;margin:0;display:flex;flex-wrap:wrap;gap:.4rem .9rem}
.kinds li{background:var(--bad-bg);color:var(--bad);border-radius:999px;padding:.15rem .7rem}
.kinds .count{font-weight:600}
/* The SVG scales with its width: capped so it is never letterboxed, floored so its ticks stay legible on a
phone (which scrolls it sideways instead). */
.progress{overflow-x:auto}
.chart{display:block;width:100%;min-width:540px;max-width:864px;height:auto;background:var(--card);
border:1px solid var(--line);border-radius:10px}
.chart .axis{stroke:var(--muted);stroke-width:1}.chart .grid{stroke:var(--line);stroke-dasharray:4 4}
.chart .tick{fill:var(--muted);font-size:11px}
.chart .series{fill:none;stroke-width:2;stroke-linejoin:round}
.chart circle.series{stroke:none}
.series-submitted{stroke:var(--s-submitted)}.series-finished{stroke:var(--s-finished)}
.series-rate_limited{stroke:var(--s-rate_limited)}
.chart circle.series-submitted{fill:var(--s-submitted)}.chart circle.series-finished{fill:var(--s-finished)}
.chart circle.series-rate_limited{fill:var(--s-rate_limited)}
.legend{margin-top:.4rem}.swatch{display:inline-block;width:.9rem;height:0;margin-right:.35rem;
vertical-align:middle;border-top:3px solid}
.swatch.series-submitted{border-color:var(--s-submitted)}.swatch.series-finished{border-color:var(--s-finished)}
.swatch.series-rate_limited{border-color:var(--s-rate_limited)}
.toolbar{position:sticky;top:0;z-index:2;display:flex;flex-wrap:wrap;align-items:center;gap:.5rem 1rem;
background:var(--bg);padding:.75rem 0;margin-top:1rem;border-bottom:1px solid var(--line)}
.toolbar label{display:flex;align-items:center;gap:.35rem;color:var(--muted)}
.toolbar .grow{flex:1 1 12rem}.toolbar .grow input{width:100%}
select,input[type=search],button{font:inherit;color:var(--fg);background:var(--card);
border:1px solid var(--line);border-radius:6px;padding:.25rem .5rem}
button{cursor:pointer}button:disabled{opacity:.45;cursor:default}
.pager{display:flex;align-items:center;gap:.5rem;font-variant-numeric:tabular-nums}
.gallery{display:grid;grid-template-columns:repeat(auto-fill,minmax(340px,1fr));gap:1rem;padding:1rem 0 2rem}
.card{background:var(--card);border:1px solid var(--line);border-radius:12px;overflow:hidden;
display:flex;flex-direction:column;border-top:4px solid var(--wait)}
.card[data-status=succeeded]{border-top-color:var(--ok)}.card[data-status=failed]{border-top-color:var(--bad)}
.card-head{display:flex;flex-wrap:wrap;align-items:center;gap:.4rem;padding:.6rem .8rem}
.card-id{font-weight:600;overflow-wrap:anywhere;margin-right:auto}
.badge{font-size:.72rem;font-weight:600;border-radius:999px;padding:.1rem .55rem;text-transform:uppercase;
letter-spacing:.03em;background:var(--wait-bg);color:var(--wait)}
.badge.status-succeeded{background:var(--ok-bg);color:var(--ok)}
.badge.status-failed{background:var(--bad-bg);color:var(--bad)}
.badge.duplicate,.badge.nsfw{background:var(--dup-bg);color:var(--dup)}
.pair{display:grid;grid-template-columns:1fr 2fr;gap:.5rem;padding:0 .8rem}
.pair h3{margin:0 0 .25rem;font-size:.7rem;color:var(--muted);text-transform:uppercase;letter-spacing:.05em}
.thumbs{display:grid;grid-template-columns:repeat(auto-fill,minmax(64px,1fr));gap:.3rem}
.outputs .thumbs{grid-template-columns:repeat(auto-fill,minmax(120px,1fr))}
.thumbs a{display:block;position:relative;border-radius:6px;overflow:hidden;background:var(--bg);
aspect-ratio:1}
.thumbs img{width:100%;height:100%;object-fit:contain;display:block}
.thumbs a.broken::after{content:"missing";position:absolute;inset:0;display:grid;place-items:center;
font-size:.75rem;color:var(--muted)}
.thumbs a.broken img{visibility:hidden}
.thumbs .nsfw{position:absolute;top:.3rem;left:.3rem}
.thumbs .none{color:var(--muted);font-size:.8rem}
.prompt{margin:.6rem .8rem 0;white-space:pre-wrap;overflow-wrap:anywhere;display:-webkit-box;
-webkit-line-clamp:4;-webkit-box-orient:vertical;overflow:hidden;cursor:pointer}
.prompt.expanded{display:block}
.facts{display:flex;flex-wrap:wrap;gap:.2rem .9rem;margin:.5rem .8rem;font-size:.8rem;color:var(--muted)}
.error{margin:.2rem .8rem .8rem;padding:.5rem .65rem;border-radius:8px;background:var(--bad-bg);
color:var(--bad);font-size:.85rem;overflow-wrap:anywhere}
.error .kind{font-weight:600;margin-right:.4rem}
.card>:last-child{margin-bottom:.8rem}
"""

_SCRIPT = """
(function () {
  "use strict";
  var $ = function (id) { return document.getElementById(id); };
  var items = JSON.parse($("items-data").textContent);
  var gallery = $("gallery");
  var pageSize = Number(gallery.dataset.pageSize) || 100;
  var status = $("filter-status"), kind = $("filter-kind"), dup = $("filter-duplicate");
  var search = $("filter-search"), prev = $("page-prev"), next = $("page-next");
  var matches = items, page = 0;

  function el(tag, cls, text) {
    var node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  function safe(src) {
    return /^(https?:|data:image\\/)/i.test(src) || !/^[a-z][a-z0-9+.-]*:/i.test(src) ? src : "";
  }

  function thumb(src, cls, alt) {
    var link = el("a");
    var img = el("img", cls);
    img.loading = "lazy";
    img.decoding = "async";
    img.alt = alt;
    img.addEventListener("error", function () { link.classList.add("broken"); });
    src = safe(src || "");
    if (src) { link.href = src; link.target = "_blank"; link.rel = "noopener"; img.src = src; }
    else link.classList.add("broken");
    link.appendChild(img);
    return link;
  }

  function column(title, cls, sources) {
    var box = el("div", cls);
    box.appendChild(el("h3", null, title));
    var grid = box.appendChild(el("div", "thumbs"));
    sources.forEach(function (node) { grid.appendChild(node); });
    if (!sources.length) grid.appendChild(el("span", "none", "none"));
    return box;
  }

  function card(it) {
    var node = el("article", "card");
    node.dataset.status = it.status;
    node.dataset.kind = it.kind;
    node.dataset.id = it.id;
    var head = node.appendChild(el("div", "card-head"));
    head.appendChild(el("span", "card-id", it.id));
    head.appendChild(el("span", "badge status status-" + it.status, it.status));
    if (it.duplicate) {
      var badge = head.appendChild(el("span", "badge duplicate", "possible duplicate"));
      badge.title = "Resubmitted after an answer was lost: may have been billed twice";
    }
    var pair = node.appendChild(el("div", "pair"));
    pair.appendChild(column("Input", "inputs", it.inputs.map(function (src, i) {
      return thumb(src, "input", "input " + (i + 1) + " of " + it.id);
    })));
    pair.appendChild(column("Output", "outputs", it.outputs.map(function (out, i) {
      var link = thumb(out.src, "output", "output " + (i + 1) + " of " + it.id);
      if (out.nsfw) link.appendChild(el("span", "badge nsfw", "nsfw"));
      return link;
    })));
    var prompt = node.appendChild(el("p", "prompt", it.prompt));
    prompt.title = "Click to expand";
    prompt.addEventListener("click", function () { prompt.classList.toggle("expanded"); });
    var facts = node.appendChild(el("div", "facts"));
    if (it.size) facts.appendChild(el("span", "size", "size " + it.size));
    facts.appendChild(el("span", "attempts", it.attempts + (it.attempts === 1 ? " submit" : " submits")));
    if (it.inference_ms !== null) {
      facts.appendChild(el("span", "inference", (it.inference_ms / 1000).toFixed(1) + " s"));
    }
    if (it.prediction_id) facts.appendChild(el("span", "prediction", it.prediction_id));
    if (it.status === "failed") {
      var error = node.appendChild(el("div", "error"));
      error.appendChild(el("span", "kind", it.kind || "unknown"));
      if (it.http_status) error.appendChild(el("span", "http-status", "HTTP " + it.http_status + " · "));
      error.appendChild(el("span", "message", it.message));
    }
    return node;
  }

  function wanted(it) {
    var text = search.value.trim().toLowerCase();
    return (!status.value || it.status === status.value)
      && (!kind.value || it.kind === kind.value)
      && (!dup.checked || it.duplicate)
      && (!text || it.id.toLowerCase().indexOf(text) >= 0 || it.prompt.toLowerCase().indexOf(text) >= 0);
  }

  function render() {
    var pages = Math.max(1, Math.ceil(matches.length / pageSize));
    page = Math.min(Math.max(page, 0), pages - 1);
    var fragment = document.createDocumentFragment();
    matches.slice(page * pageSize, (page + 1) * pageSize).forEach(function (it) {
      fragment.appendChild(card(it));
    });
    gallery.replaceChildren(fragment);
    $("page-info").textContent = "Page " + (page + 1) + " of " + pages;
    $("match-count").textContent =
      matches.length.toLocaleString() + " of " + items.length.toLocaleString() + " items";
    $("empty").hidden = matches.length > 0;
    prev.disabled = page === 0;
    next.disabled = page >= pages - 1;
  }

  function filter() {
    matches = items.filter(wanted);
    page = 0;
    render();
  }

  function turn(delta) {
    page += delta;
    render();
    $("toolbar").scrollIntoView({ block: "start" });
  }

  [status, kind, dup].forEach(function (control) { control.addEventListener("change", filter); });
  search.addEventListener("input", filter);
  prev.addEventListener("click", function () { turn(-1); });
  next.addEventListener("click", function () { turn(1); });
  document.addEventListener("keydown", function (event) {
    if (event.target instanceof HTMLInputElement || event.target instanceof HTMLSelectElement) return;
    if (event.key === "ArrowLeft" && !prev.disabled) turn(-1);
    if (event.key === "ArrowRight" && !next.disabled) turn(1);
  });
  filter();
})();
"""

# Only the page's own script may run (pinned by its hash) and nothing may be fetched but images:
# the page stays offline, and a prompt that somehow escaped its JSON could not execute.
_SCRIPT_HASH = base64.b64encode(hashlib.sha256(_SCRIPT.encode("utf-8")).digest()).decode("ascii")
_CSP = (
    "default-src 'none'; img-src * data: blob: file:; style-src 'unsafe-inline'; "
    f"script-src 'sha256-{_SCRIPT_HASH}'; base-uri 'none'; form-action 'none'"
)
