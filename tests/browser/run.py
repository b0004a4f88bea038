"""The browser test of index.html: simulated runs' reports, copied away, opened from file:// in Chromium.

``make test-browser`` runs it (``python -m tests.browser.run``); pytest never collects it, so ``make test``
runs anywhere. It writes two reports with ``batch-engine run --simulate``: the demo job (the page people look
at, screenshotted to ``tests/browser/screenshot.png``) and a generated job of 250 items (more than one page).
Each out dir is copied elsewhere and the original deleted, then the page is checked as a person would use it:
images load (thumbnails in the cards, the full picture behind each), failures come first, the filters and the
pager work, the chart has buckets that fit the run's length, the page fits a phone 390 px wide without
scrolling sideways, and nothing is fetched from a network.
Exit code 0 when every check passes, 1 otherwise (or when Chromium is missing).
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tests.browser.cdp import CdpError, Page, open_page

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
REPO = Path(__file__).resolve().parents[2]
SCREENSHOT = Path(__file__).with_name("screenshot.png")
VIEWPORT = {"width": 1280, "height": 1400, "deviceScaleFactor": 1, "mobile": False}
PHONE = {"width": 390, "height": 844, "deviceScaleFactor": 1, "mobile": True}  #: an iPhone 12-14's CSS size
PHONE_SCREENSHOT = Path(__file__).with_name("screenshot-phone.png")
THUMB_EDGE = 384  #: batch_engine.report.gallery_files.THUMB_EDGE: the longest edge of a thumbnail
RUN_TIMEOUT = 120.0  #: seconds one simulated run may take
IMAGE_WAIT_MS = 20_000  #: how long one page's images may take to load, all together
PAGING_ITEMS = 250  #: more than two pages of the report's 100 cards
LOCAL_SCHEMES = ("file:", "data:", "blob:", "about:")
INSTALL_HINT = (
    "Chromium is not installed at {path}. On Debian or Ubuntu: sudo apt-get install -y chromium "
    "(or set CHROMIUM=/path/to/chromium)."
)


@dataclass(frozen=True)
class Report:
    """An out dir copied away from where it was written, and what its report.yaml counts."""

    name: str
    directory: Path
    total: int
    failed: int
    images: int
    duplicates: int
    by_kind: dict[str, int]
    elapsed: float  #: seconds the run took, as report.yaml's run: block says

    @property
    def url(self) -> str:
        return (self.directory / "index.html").as_uri()


class Checks:
    """Failures collected as they are found, so one run tells everything that is wrong."""

    def __init__(self) -> None:
        self.passed = 0
        self.failures: list[str] = []

    def expect(self, ok: bool, message: str) -> bool:
        if ok:
            self.passed += 1
        else:
            self.failures.append(message)
        return ok


def main() -> int:
    if not Path(CHROMIUM).exists():
        print(INSTALL_HINT.format(path=CHROMIUM))
        return 1
    started = time.monotonic()
    checks = Checks()
    with tempfile.TemporaryDirectory(prefix="batch-engine-browser-") as tmp:
        try:
            demo, paging = make_reports(Path(tmp))
            screenshot = asyncio.run(browse(demo, paging, checks, profile=Path(tmp, "profile")))
        except (CdpError, RuntimeError) as exc:
            print(f"browser test FAILED: {exc}")
            return 1
    SCREENSHOT.write_bytes(screenshot)
    print(f"screenshot: {SCREENSHOT}")
    return outcome(checks, demo, paging, time.monotonic() - started)


def outcome(checks: Checks, demo: Report, paging: Report, elapsed: float) -> int:
    """Print the one-line summary (and every failure); return the exit code."""
    if checks.failures:
        print(f"browser test FAILED: {len(checks.failures)} of {checks.passed + len(checks.failures)} checks")
        print("\n".join(f"  - {failure}" for failure in checks.failures))
        return 1
    print(
        f"browser test passed: {checks.passed} checks on the demo report ({demo.total} items) and a "
        f"{paging.total}-item report, opened from copies via file:// in {elapsed:.1f}s"
    )
    return 0


# --- The reports ---------------------------------------------------------------------------------------


def make_reports(tmp: Path) -> tuple[Report, Report]:
    """Run the demo and the paging job side by side; copy both out dirs elsewhere and delete the originals."""
    manifest = tmp / "paging.yaml"
    manifest.write_text(yaml.safe_dump(paging_manifest(PAGING_ITEMS), sort_keys=False), encoding="utf-8")
    runs = {
        "demo": start_run(REPO / "jobs" / "demo.yaml", tmp / "written" / "demo", tmp),
        "paging": start_run(manifest, tmp / "written" / "paging", tmp),
    }
    for name, process in runs.items():
        finish_run(name, process, tmp)
    copies = tmp / "copied elsewhere"
    for name in runs:
        shutil.copytree(tmp / "written" / name, copies / name)
    shutil.rmtree(tmp / "written")
    return read_report("demo", copies / "demo"), read_report("paging", copies / "paging")


def paging_manifest(count: int) -> dict[str, Any]:
    """A job of ``count`` small edits, every 50th refused by the simulator's content policy."""
    items = [
        {
            "id": f"item-{number:04d}",
            "prompt": f"{'A FORBIDDEN' if number % 50 == 7 else 'A studio'} scene, number {number}",
            "images": [f"https://cdn.example.com/paging/{number}.jpg"],
        }
        for number in range(count)
    ]
    settings = {"rate": 100, "max_in_flight": 100, "poll_rate": 200, "timeout": 60}
    return {
        "version": 1,
        "name": "paging",
        "model": "openai/gpt-image-2-plus",
        "task": "image-edit",
        "defaults": {"size": "1024x640"},  # about the fewest pixels the model takes: a quicker run
        "settings": settings,
        "items": items,
    }


def start_run(manifest: Path, out: Path, tmp: Path) -> subprocess.Popen[bytes]:
    command = [
        str(Path(sys.executable).with_name("batch-engine")),
        "run",
        str(manifest),
        "--simulate",
        "--out",
        str(out),
        "--fresh",
        "--yes",
        "--progress",
        "plain",
    ]
    log = (tmp / f"{out.name}.log").open("wb")
    return subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def finish_run(name: str, process: subprocess.Popen[bytes], tmp: Path) -> None:
    """Wait for one run; exit code 1 only says some items failed, which the report is meant to show."""
    try:
        code = process.wait(RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        code = process.wait()
    log = (tmp / f"{name}.log").read_text(encoding="utf-8", errors="replace")
    if code not in (0, 1) or not (tmp / "written" / name / "index.html").exists():
        raise RuntimeError(f"the simulated {name} run ended with exit code {code}:\n{log[-3000:]}")


def read_report(name: str, directory: Path) -> Report:
    data = yaml.safe_load((directory / "report.yaml").read_text(encoding="utf-8"))
    return Report(
        name=name,
        directory=directory,
        total=data["counts"]["total"],
        failed=data["counts"]["failed"],
        images=data["images"],
        duplicates=data["possible_duplicates"],
        by_kind=dict(data["errors_by_kind"] or {}),
        elapsed=float(data["run"]["elapsed"]),
    )


# --- The browser ---------------------------------------------------------------------------------------


async def browse(demo: Report, paging: Report, checks: Checks, *, profile: Path) -> bytes:
    """Check both reports in one browser and return the screenshot of the demo's first screen."""
    async with open_page(CHROMIUM, user_data_dir=profile) as page:
        await page.send("Emulation.setDeviceMetricsOverride", VIEWPORT)
        await open_report(page, demo, checks)
        await check_gallery(page, demo, checks)
        await check_thumbnails(page, demo, checks)
        await check_chart(page, demo, checks)
        shot = await page.send("Page.captureScreenshot", {"format": "png"})
        await check_filters(page, demo, checks)
        await check_phone(page, demo, checks)
        await page.send("Emulation.setDeviceMetricsOverride", VIEWPORT)
        await open_report(page, paging, checks)
        await check_paging(page, paging, checks)
        check_quiet(page, [demo, paging], checks)
    return base64.b64decode(shot["data"])


async def check_thumbnails(page: Page, report: Report, checks: Checks) -> None:
    """Cards show thumbnails (at most THUMB_EDGE px) of the run's big outputs; each links its full image."""
    state = await page.evaluate(THUMBNAILS_JS)
    thumbs = state["thumbs"]
    checks.expect(bool(thumbs), f"{report.name}: no output is shown by a thumbnail")
    too_big = [t["src"] for t in thumbs if max(t["width"], t["height"]) > THUMB_EDGE]
    checks.expect(not too_big, f"{report.name}: thumbnails over {THUMB_EDGE} px: {too_big[:3]}")
    unlinked = [t["src"] for t in thumbs if not t["href"].startswith("images/")]
    checks.expect(not unlinked, f"{report.name}: thumbnails not linking their full image: {unlinked[:3]}")


async def check_chart(page: Page, report: Report, checks: Checks) -> None:
    """The chart's buckets fit the run: several of them, together spanning the run's time, one point each."""
    chart = await page.evaluate(CHART_JS)
    buckets, step = chart["buckets"], chart["step"]
    checks.expect(buckets >= 3, f"{report.name}: a {report.elapsed:.0f} s run drawn from {buckets} bucket(s)")
    checks.expect(
        buckets * step >= report.elapsed - 2 * step,
        f"{report.name}: {buckets} buckets of {step} s do not span the run's {report.elapsed:.1f} s",
    )
    checks.expect(
        all(points == buckets for points in chart["points"]),
        f"{report.name}: polylines of {chart['points']} points for {buckets} buckets",
    )


async def check_phone(page: Page, report: Report, checks: Checks) -> None:
    """At 390 px wide the page does not scroll sideways, the chart fits the screen, and it is on the first
    screen (not below a screenful of stat cards)."""
    await page.send("Emulation.setDeviceMetricsOverride", PHONE)
    await page.navigate(report.url)
    state = await page.evaluate(PHONE_JS)
    where = f"{report.name} at {PHONE['width']} px"
    checks.expect(
        state["pageWidth"] <= state["viewWidth"],
        f"{where}: the page is {state['pageWidth']} px wide and scrolls sideways",
    )
    checks.expect(
        state["chartRight"] <= state["viewWidth"] and state["chartScrolls"] is False,
        f"{where}: the chart does not fit ({state['chartRight']} px, scrolls: {state['chartScrolls']})",
    )
    checks.expect(
        state["chartTop"] < state["viewHeight"],
        f"{where}: the chart starts at {state['chartTop']} px, below the first screen",
    )
    checks.expect(
        state["cardRight"] <= state["viewWidth"], f"{where}: a card is {state['cardRight']} px wide"
    )
    shot = await page.send("Page.captureScreenshot", {"format": "png"})
    PHONE_SCREENSHOT.write_bytes(base64.b64decode(shot["data"]))


async def open_report(page: Page, report: Report, checks: Checks) -> None:
    await page.navigate(report.url)
    state = await gallery_state(page)
    checks.expect(
        state["items"] == report.total,
        f"{report.name}: #items-data holds {state['items']} items, report.yaml counts {report.total}",
    )


async def check_gallery(page: Page, report: Report, checks: Checks) -> None:
    """The first page: every card, failures first, each with its input and output images loaded."""
    state = await gallery_state(page)
    cards = state["cards"]
    shown = min(report.total, state["pageSize"])
    checks.expect(len(cards) == shown, f"{report.name}: {len(cards)} cards on page 1, expected {shown}")
    check_failures_first(report, [card["status"] for card in cards], checks)
    checks.expect(
        all(card["inputs"] >= 1 for card in cards),
        f"{report.name}: cards without an input image: {[c['id'] for c in cards if not c['inputs']]}",
    )
    checks.expect(
        all(card["outputs"] >= 1 for card in cards if card["status"] == "succeeded"),
        f"{report.name}: succeeded cards without an output image",
    )
    if report.total <= state["pageSize"]:
        outputs = sum(card["outputs"] for card in cards)
        checks.expect(
            outputs == report.images, f"{report.name}: {outputs} outputs shown, {report.images} written"
        )
    await check_images(page, report, checks)


def check_failures_first(report: Report, statuses: list[str], checks: Checks) -> None:
    failed = statuses.count("failed")
    checks.expect(
        statuses[:failed] == ["failed"] * failed,
        f"{report.name}: failed cards are not first: {statuses[: failed + 3]}...",
    )


async def check_images(page: Page, report: Report, checks: Checks) -> None:
    """Scroll every image of the shown page into view and wait (bounded) until each has loaded."""
    result = await page.evaluate(f"({LOAD_IMAGES_JS})({IMAGE_WAIT_MS})")
    checks.expect(result["count"] > 0, f"{report.name}: no images on the page")
    checks.expect(
        result["lazy"] == result["count"],
        f"{report.name}: {result['count'] - result['lazy']} images are not loading=lazy",
    )
    checks.expect(not result["broken"], f"{report.name}: images that did not load: {result['broken'][:5]}")
    checks.expect(
        not result["remote"], f"{report.name}: images not relative to the out dir: {result['remote'][:5]}"
    )


async def check_filters(page: Page, report: Report, checks: Checks) -> None:
    """Status, error kind, duplicates and search, alone and combined, then back to everything."""
    everything = min(report.total, (await gallery_state(page))["pageSize"])
    if checks.expect(report.failed > 0, f"{report.name}: the run had no failures to filter on"):
        failed = {"filter-status": "failed"}
        await expect_filtered(page, report, checks, "status failed", failed, report.failed)
    for kind, count in report.by_kind.items():
        await expect_filtered(page, report, checks, f"kind {kind}", {"filter-kind": kind}, count)
    await expect_filtered(page, report, checks, "all", {"filter-status": "", "filter-kind": ""}, everything)
    if report.by_kind:
        kind = next(iter(report.by_kind))
        filters = {"filter-status": "succeeded", "filter-kind": kind}
        await expect_filtered(page, report, checks, f"succeeded with kind {kind}", filters, 0)
        await set_filters(page, {"filter-status": "", "filter-kind": ""})
    await expect_filtered(page, report, checks, "duplicates", {"filter-duplicate": True}, report.duplicates)
    await set_filters(page, {"filter-duplicate": False})
    cards = (await gallery_state(page))["cards"]
    if cards:
        last = cards[-1]["id"]
        await expect_filtered(page, report, checks, f"search {last}", {"filter-search": last}, 1)
        await expect_filtered(page, report, checks, "no filter", {"filter-search": ""}, everything)


async def expect_filtered(
    page: Page, report: Report, checks: Checks, label: str, filters: Mapping[str, str | bool], count: int
) -> None:
    """Apply ``filters`` as a person would (each fires its change/input event), then check the cards."""
    missing = await set_filters(page, filters)
    if not checks.expect(not missing, f"{report.name}: filter {label}: no option {missing} in the page"):
        return
    state = await gallery_state(page)
    cards = state["cards"]
    where = f"{report.name}: filter {label}"
    checks.expect(len(cards) == count, f"{where}: {len(cards)} cards, expected {count}")
    checks.expect(state["emptyShown"] == (count == 0), f"{where}: 'No items match' is {state['emptyShown']}")
    status, kind = filters.get("filter-status"), filters.get("filter-kind")
    if status:
        checks.expect(all(c["status"] == status for c in cards), f"{where}: cards of other statuses shown")
    if kind:
        checks.expect(all(c["kind"] == kind for c in cards), f"{where}: cards of other kinds shown")
    search = filters.get("filter-search")
    if isinstance(search, str) and search:
        checks.expect(all(c["id"] == search for c in cards), f"{where}: other cards shown")


async def check_paging(page: Page, report: Report, checks: Checks) -> None:
    """More items than a page: lazy images below the fold, failures first, Next/Prev through every page."""
    state = await gallery_state(page)
    size, ids = state["pageSize"], state["itemIds"]
    if not checks.expect(report.total > size, f"{report.name}: {report.total} items fit on one page"):
        return
    pages = math.ceil(report.total / size)
    checks.expect(
        state["loadedImages"] < state["images"],
        f"{report.name}: all {state['images']} images loaded at once: lazy loading is not working",
    )
    check_failures_first(report, state["itemStatuses"], checks)
    failed = state["itemStatuses"].count("failed")
    checks.expect(
        failed == report.failed, f"{report.name}: {failed} failed items in the page, {report.failed} run"
    )
    await expect_page(page, report, checks, 1, pages, ids[:size])
    for number in range(2, pages + 1):
        await page.evaluate('document.getElementById("page-next").click()')
        await expect_page(page, report, checks, number, pages, ids[(number - 1) * size : number * size])
        if number == 2:
            await check_images(page, report, checks)
    await page.evaluate('document.getElementById("page-prev").click()')
    await expect_page(page, report, checks, pages - 1, pages, ids[(pages - 2) * size : (pages - 1) * size])
    await set_filters(page, {"filter-status": "failed"})
    state = await gallery_state(page)
    checks.expect(state["pageInfo"] == "Page 1 of 1", f"{report.name}: a filter left {state['pageInfo']!r}")


async def expect_page(
    page: Page, report: Report, checks: Checks, number: int, pages: int, expected_ids: list[str]
) -> None:
    state = await gallery_state(page)
    where = f"{report.name}: page {number}"
    info = state["pageInfo"]
    checks.expect(info == f"Page {number} of {pages}", f"{where}: page-info says {info!r}")
    checks.expect([c["id"] for c in state["cards"]] == expected_ids, f"{where}: not the expected cards")
    checks.expect(
        state["prevDisabled"] == (number == 1), f"{where}: Prev disabled is {state['prevDisabled']}"
    )
    checks.expect(
        state["nextDisabled"] == (number == pages), f"{where}: Next disabled is {state['nextDisabled']}"
    )


def check_quiet(page: Page, reports: list[Report], checks: Checks) -> None:
    """No script error, no console error, no failed load, and no request leaving the copied out dirs."""
    thrown = [describe_exception(e.params) for e in page.events("Runtime.exceptionThrown")]
    checks.expect(not thrown, f"JavaScript errors: {thrown[:3]}")
    console = [
        " ".join(str(arg.get("value", arg.get("description", ""))) for arg in e.params.get("args", []))
        for e in page.events("Runtime.consoleAPICalled")
        if e.params.get("type") in ("error", "assert")
    ]
    logged = [
        f"{e.params['entry'].get('text')} {e.params['entry'].get('url', '')}".strip()
        for e in page.events("Log.entryAdded")
        if e.params["entry"].get("level") == "error"
    ]
    checks.expect(not console + logged, f"console errors: {(console + logged)[:3]}")
    sent = page.events("Network.requestWillBeSent")
    requests = {e.params["requestId"]: e.params["request"]["url"] for e in sent}
    urls = list(requests.values())
    remote = [url for url in urls if not url.startswith(LOCAL_SCHEMES)]
    checks.expect(not remote, f"network requests: {remote[:5]}")
    roots = tuple(report.directory.as_uri() + "/" for report in reports)
    outside = [url for url in urls if url.startswith("file:") and not url.startswith(roots)]
    checks.expect(not outside, f"files read from outside the copied out dirs: {outside[:5]}")
    checks.expect(any(url.startswith(roots) for url in urls), "no file:// requests seen: is Network on?")
    failed = [
        f"{requests.get(e.params['requestId'], '?')}: {e.params.get('errorText')}"
        for e in page.events("Network.loadingFailed")
        if not e.params.get("canceled")
    ]
    checks.expect(not failed, f"failed loads: {failed[:5]}")


def describe_exception(params: dict[str, Any]) -> str:
    details = params.get("exceptionDetails", {})
    return str(details.get("exception", {}).get("description") or details.get("text"))


# --- What the page is asked -----------------------------------------------------------------------------


async def gallery_state(page: Page) -> dict[str, Any]:
    state: dict[str, Any] = await page.evaluate(GALLERY_STATE_JS)
    return state


async def set_filters(page: Page, filters: Mapping[str, str | bool]) -> list[str]:
    """Set each control and fire the event a person's change fires; return the values no option offers."""
    missing: list[str] = await page.evaluate(f"({SET_FILTERS_JS})({json.dumps(dict(filters))})")
    return missing


GALLERY_STATE_JS = """(() => {
  const $ = (id) => document.getElementById(id);
  // When the data does not parse, the page's own script throws too, and that error is what gets reported.
  const parsed = (() => {
    try { return JSON.parse($("items-data").textContent); } catch (error) { return []; }
  })();
  const items = Array.isArray(parsed) ? parsed : [];
  const images = [...document.querySelectorAll("#gallery img")];
  return {
    items: items.length,
    itemIds: items.map((it) => it.id),
    itemStatuses: items.map((it) => it.status),
    pageSize: Number($("gallery").dataset.pageSize),
    cards: [...document.querySelectorAll("#gallery article.card")].map((card) => ({
      id: card.dataset.id,
      status: card.dataset.status,
      kind: card.dataset.kind,
      inputs: card.querySelectorAll("img.input").length,
      outputs: card.querySelectorAll("img.output").length,
    })),
    images: images.length,
    loadedImages: images.filter((img) => img.complete && img.naturalWidth > 0).length,
    pageInfo: $("page-info").textContent,
    matchCount: $("match-count").textContent,
    prevDisabled: $("page-prev").disabled,
    nextDisabled: $("page-next").disabled,
    emptyShown: !$("empty").hidden,
  };
})()"""

THUMBNAILS_JS = """(() => {
  const thumbs = [...document.querySelectorAll("#gallery img.output")]
    .filter((img) => (img.getAttribute("src") || "").startsWith("thumbs/"))
    .map((img) => ({
      src: img.getAttribute("src"),
      href: img.parentElement.getAttribute("href") || "",
      width: img.naturalWidth,
      height: img.naturalHeight,
    }));
  return { thumbs };
})()"""

CHART_JS = """(() => {
  const svg = document.getElementById("timeline");
  return {
    buckets: Number(svg.dataset.buckets),
    step: Number(svg.dataset.step),
    points: [...svg.querySelectorAll("polyline")].map((line) => line.points.numberOfItems),
  };
})()"""

PHONE_JS = """(() => {
  const chart = document.getElementById("timeline").getBoundingClientRect();
  const progress = document.querySelector("section.progress");
  const cards = [...document.querySelectorAll("#gallery article.card")];
  return {
    viewWidth: window.innerWidth,
    viewHeight: window.innerHeight,
    pageWidth: document.documentElement.scrollWidth,
    chartRight: Math.ceil(chart.right),
    chartTop: Math.round(chart.top + window.scrollY),
    chartScrolls: progress.scrollWidth > progress.clientWidth,
    cardRight: Math.ceil(Math.max(0, ...cards.map((card) => card.getBoundingClientRect().right))),
  };
})()"""

SET_FILTERS_JS = """((filters) => {
  const missing = [];
  for (const [id, value] of Object.entries(filters)) {
    const control = document.getElementById(id);
    if (control.type === "checkbox") control.checked = value;
    else if (control.tagName === "SELECT" && ![...control.options].some((o) => o.value === value)) {
      missing.push(id + "=" + value);
      continue;
    } else control.value = value;
    control.dispatchEvent(new Event(control.type === "search" ? "input" : "change", { bubbles: true }));
  }
  return missing;
})"""

# Lazy images load only near the viewport: bring each into view, then wait until it is loaded or broken.
LOAD_IMAGES_JS = """(async (limitMs) => {
  const images = [...document.querySelectorAll("#gallery img")];
  const deadline = performance.now() + limitMs;
  const pause = () => new Promise((resolve) => setTimeout(resolve, 20));
  for (const img of images) {
    img.scrollIntoView({ block: "center" });
    while (!img.complete && performance.now() < deadline) await pause();
  }
  window.scrollTo(0, 0);
  // Loaded is not yet painted: decode every image, then let two frames pass before anyone looks.
  await Promise.all(images.map((img) => img.decode().catch(() => null)));
  await new Promise((resolve) => requestAnimationFrame(() => requestAnimationFrame(resolve)));
  const shown = (img) => img.complete && img.naturalWidth > 0;
  return {
    count: images.length,
    lazy: images.filter((img) => img.loading === "lazy").length,
    broken: images.filter((img) => !shown(img)).map((img) => img.alt + ": " + img.getAttribute("src")),
    remote: images.map((img) => img.getAttribute("src")).filter((src) => /^[a-z][a-z0-9+.-]*:/i.test(src)),
  };
})"""


if __name__ == "__main__":
    sys.exit(main())
