"""Progress views (plain, JSON, rich, quiet) and the end-of-run summary."""

from __future__ import annotations

import io
import json
import logging
import re
import sys
from collections.abc import Iterator
from dataclasses import replace
from datetime import datetime
from pathlib import Path

import pytest
from rich.console import Console

from batch_engine.errors import UsageError
from batch_engine.ui.logs import reset_logging, setup_logging
from batch_engine.ui.progress import (
    JsonView,
    PlainView,
    ProgressView,
    RecentRate,
    RichView,
    eta_seconds,
    format_duration,
    make_view,
)
from batch_engine.ui.summary import format_summary, summary_json
from batch_engine.values import ItemError, RunStats, Snapshot

KEY = "sk-live-0123456789abcdef"
HIDE_CURSOR = "\x1b[?25l"
SHOW_CURSOR = "\x1b[?25h"
SNAP = Snapshot(
    total=1000,
    done_before=0,
    submitted=160,
    in_flight=40,
    succeeded=117,
    failed=3,
    rate=2.0,
    rate_ceiling=2.0,
    rate_limited=0,
    polls=311,
    elapsed=60.0,
    images=117,
    finish_rate=2.0,
)
POLICY = ItemError("content_policy", "the prompt was\nflagged", 400)
STATS = RunStats(
    total=1000,
    by_state={"succeeded": 990, "failed": 8, "pending": 2, "submitted": 0},
    by_error_kind={"content_policy": 5, "timeout": 3},
    images=990,
    elapsed=492.0,
    submits=1000,
    submit_attempts=1004,
    rate_limited=4,
    polls=3110,
    predictions_resolved=998,
    rate_final=1.5,
    rate_ceiling=2.0,
    possible_duplicates=2,
    stopped_reason="balance",
    timeline={"submitted": [120, 120]},
    run_succeeded=900,
    run_failed=6,
    submit_rate=2.03,
)
REPORTS = {
    "report.yaml": Path("out/demo/report.yaml"),
    "results.jsonl": Path("out/demo/results.jsonl"),
    "failures.yaml": Path("out/demo/failures.yaml"),
    "index.html": Path("out/demo/index.html"),
}


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class TtyStream(io.StringIO):
    def isatty(self) -> bool:
        return True


def _plain(clock: FakeClock, mode: str = "plain") -> tuple[io.StringIO, PlainView | JsonView]:
    stream = io.StringIO()
    view = make_view(mode=mode, stream=stream, log_every=30.0, clock=clock, secrets=[KEY])
    assert isinstance(view, PlainView | JsonView)
    return stream, view


def _console() -> tuple[io.StringIO, Console]:
    out = io.StringIO()
    return out, Console(file=out, force_terminal=True, width=100)


def _text(out: io.StringIO) -> str:
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out.getvalue())


def _cursor_visible(out: io.StringIO) -> bool:
    raw = out.getvalue()
    return raw.rfind(SHOW_CURSOR) > raw.rfind(HIDE_CURSOR)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def _no_logging() -> Iterator[None]:
    yield
    reset_logging()


# --- numbers ---------------------------------------------------------------------------------------


def test_eta_unknown_until_a_finish_rate_is_known() -> None:
    """Without a recent finish rate (nothing finished lately, or a resume that just began) the ETA is
    unknown; once every item is final it is 0."""
    resumed = replace(SNAP, done_before=120, succeeded=0, failed=0, finish_rate=None)
    assert eta_seconds(resumed) is None
    assert format_duration(eta_seconds(resumed)) == "—"
    assert eta_seconds(replace(SNAP, done_before=880)) == 0.0


def test_eta_from_the_recent_finish_rate() -> None:
    """880 items left at 2 finished a second is 440 s, however long the run took to get there."""
    assert eta_seconds(SNAP) == pytest.approx(440.0)
    assert eta_seconds(replace(SNAP, elapsed=6000.0)) == pytest.approx(440.0)
    assert eta_seconds(replace(SNAP, finish_rate=4.0)) == pytest.approx(220.0)


def test_the_finish_rate_looks_at_the_last_minute_only() -> None:
    """A run that waited 5 minutes for its first finishes, then finished 2 a second, has a rate of 2/s
    (not 120 items over 6 minutes): the ETA does not climb as the end nears."""
    rate = RecentRate(window=60.0)
    assert rate.update(0.0, 0) is None
    assert rate.update(300.0, 0) is None  # nothing finished yet
    finished = 0
    for second in range(301, 361):
        finished += 2
        last = rate.update(float(second), finished)
    assert last == pytest.approx(2.0, rel=0.05)


def test_the_finish_rate_needs_a_few_seconds_of_samples() -> None:
    """A rate from samples a moment apart would swing wildly: none is given under two seconds."""
    rate = RecentRate()
    assert rate.update(10.0, 0) is None
    assert rate.update(10.5, 3) is None
    assert rate.update(12.5, 5) == pytest.approx(2.0)


@pytest.mark.parametrize(("seconds", "text"), [(4.25, "4.2s"), (45, "45s"), (440, "7m20s"), (7500, "2h05m")])
def test_format_duration(seconds: float, text: str) -> None:
    """Durations read as seconds, minutes and seconds, or hours and minutes."""
    assert format_duration(seconds) == text


# --- plain and JSON --------------------------------------------------------------------------------


def test_plain_line_only_after_log_every(clock: FakeClock) -> None:
    """No progress line until log_every has passed since start, then one per interval."""
    stream, view = _plain(clock)
    view.start()
    clock.now += 29.9
    view.update(SNAP)
    assert stream.getvalue() == ""
    clock.now += 0.1
    view.update(SNAP)
    view.update(SNAP)
    assert stream.getvalue().count("progress:") == 1
    clock.now += 30.0
    view.update(SNAP)
    assert stream.getvalue().count("progress:") == 2


def test_plain_line_has_the_counts(clock: FakeClock) -> None:
    """The progress line names finished/total, ok, failed, in flight, rate and ceiling, 429s, polls, ETA."""
    stream, view = _plain(clock)
    view.start()
    clock.now += 30.0
    view.update(SNAP)
    assert stream.getvalue() == (
        "progress: 120/1000 finished; this run: 117 ok, 3 failed, 160 submitted, 40 in flight, "
        "rate 2.00/s (ceiling 2.00), 429s 0, polls 311, images 117, elapsed 1m00s, eta 7m20s\n"
    )


def test_a_resumed_runs_line_keeps_the_two_scopes_apart(clock: FakeClock) -> None:
    """On a resume the line says how many were final before, and every other count is this run's alone."""
    stream, view = _plain(clock)
    view.start()
    clock.now += 30.0
    view.update(replace(SNAP, done_before=30, submitted=17, succeeded=13, failed=1))
    assert stream.getvalue().startswith(
        "progress: 44/1000 finished (30 before this run); this run: 13 ok, 1 failed, 17 submitted,"
    )


def test_plain_update_before_start_starts_the_interval(clock: FakeClock) -> None:
    """Without start(), the first update() starts the interval instead of printing."""
    stream, view = _plain(clock)
    view.update(SNAP)
    clock.now += 30.0
    view.update(SNAP)
    assert stream.getvalue().count("progress:") == 1


def test_plain_failure_and_message_lines(clock: FakeClock) -> None:
    """A failure is one line with id, kind, status and message; message() prints its text; keys redacted."""
    stream, view = _plain(clock)
    view.item_failed("sku-12", POLICY)
    view.message(f"balance ran out: stopped submitting ({KEY})")
    view.stop()
    assert stream.getvalue().splitlines() == [
        "failed: sku-12 content_policy (400): the prompt was flagged",
        "balance ran out: stopped submitting (***)",
    ]


def test_json_lines_parse_with_the_expected_fields(clock: FakeClock) -> None:
    """Each JSON view line is an object with an ISO ts and an event of progress, item_failed or message."""
    stream, view = _plain(clock, mode="json")
    view.start()
    clock.now += 30.0
    view.update(SNAP)
    view.item_failed("sku-12", replace(POLICY, message=f"bad key {KEY}"))
    view.message("stopped")
    progress, failed, message = [json.loads(line) for line in stream.getvalue().splitlines()]
    for line in (progress, failed, message):
        datetime.fromisoformat(line["ts"])
    assert progress["event"] == "progress"
    assert [progress[k] for k in ("finished", "total", "in_flight", "eta_seconds")] == [120, 1000, 40, 440.0]
    assert [failed[k] for k in ("event", "item_id", "kind", "status")] == [
        "item_failed",
        "sku-12",
        POLICY.kind,
        400,
    ]
    assert failed["message"] == "bad key ***"
    assert message["event"] == "message"
    assert message["text"] == "stopped"


def test_quiet_view_prints_nothing(clock: FakeClock) -> None:
    """The quiet view writes nothing at all."""
    stream = io.StringIO()
    view = make_view(mode="quiet", stream=stream, log_every=0, clock=clock)
    view.start()
    view.update(SNAP)
    view.item_failed("sku-12", POLICY)
    view.message("hello")
    view.stop()
    assert stream.getvalue() == ""


def test_auto_is_plain_off_a_terminal_and_rich_on_one(clock: FakeClock) -> None:
    """auto picks plain lines for a pipe and the live display for a terminal."""
    assert isinstance(make_view(mode="auto", stream=io.StringIO(), log_every=1, clock=clock), PlainView)
    assert isinstance(make_view(mode="auto", stream=TtyStream(), log_every=1, clock=clock), RichView)


def test_unknown_mode_names_the_choices() -> None:
    """An unknown mode is a usage error that lists the valid ones."""
    with pytest.raises(UsageError, match="auto, rich, plain, json, quiet"):
        make_view(mode="fancy", stream=io.StringIO(), log_every=1)


# --- rich ------------------------------------------------------------------------------------------


def test_rich_view_shows_the_counts_and_restores_the_cursor(clock: FakeClock) -> None:
    """The live display shows counts, rate, ceiling, ETA, a line per failure, and the cursor after stop."""
    out, console = _console()
    view = make_view(mode="rich", stream=out, log_every=30, clock=clock, console=console)
    view.start()
    view.update(SNAP)
    view.item_failed("sku-12", POLICY)
    view.stop()
    text = _text(out)
    assert "120/1000 finished" in text
    assert "this run: submitted 160 · in flight 40 · ok 117 · failed 3" in text
    assert "rate 2.00/s (ceiling 2.00) · 429s 0 · polls 311 · images 117" in text
    assert "eta 7m20s" in text
    assert "✗ sku-12 content_policy (400): the prompt was flagged" in text
    assert HIDE_CURSOR in out.getvalue()
    assert _cursor_visible(out)


def test_rich_stop_from_finally_after_ctrl_c(clock: FakeClock) -> None:
    """stop() in a finally after Ctrl-C shows the cursor, gives back stdout and stderr, and may repeat."""
    out, console = _console()
    stdout, stderr = sys.stdout, sys.stderr
    view = make_view(mode="rich", stream=out, log_every=30, clock=clock, console=console)
    with pytest.raises(KeyboardInterrupt):
        _interrupted_run(view)
    view.stop()
    assert (sys.stdout, sys.stderr) == (stdout, stderr)
    assert _cursor_visible(out)


def _interrupted_run(view: ProgressView) -> None:
    try:
        view.start()
        view.update(SNAP)
        raise KeyboardInterrupt
    finally:
        view.stop()


def test_rich_view_redraws_at_most_four_times_a_second(clock: FakeClock) -> None:
    """Updates 0.1 s apart redraw the region only once a quarter second has passed."""
    out, console = _console()
    view = make_view(mode="rich", stream=out, log_every=30, clock=clock, console=console)
    view.start()
    for _ in range(6):
        view.update(SNAP)
        clock.now += 0.1
    draws = _text(out).count("120/1000 finished")
    view.stop()
    assert draws == 2


def test_rich_view_prints_item_ids_as_written(clock: FakeClock) -> None:
    """Brackets in an item id or message are not taken for rich markup, and secrets are redacted."""
    out, console = _console()
    view = make_view(mode="rich", stream=out, log_every=30, clock=clock, console=console, secrets=[KEY])
    view.item_failed("[bold]sku[/bold]", ItemError("auth", f"key {KEY} [red]refused", 401))
    view.stop()
    assert "✗ [bold]sku[/bold] auth (401): key *** [red]refused" in _text(out)


@pytest.mark.usefixtures("_no_logging")
def test_log_lines_print_above_the_live_region(clock: FakeClock) -> None:
    """A log line sent to stderr while the live display runs lands in its console, above the last redraw."""
    out, console = _console()
    setup_logging(verbose=False, json_lines=False, stream=sys.stderr, secrets=[KEY])
    view = make_view(mode="rich", stream=out, log_every=30, clock=clock, console=console)
    view.start()
    view.update(SNAP)
    logging.getLogger("batch_engine.engine").warning("slowing down with %s", KEY)
    view.stop()
    text = _text(out)
    assert "WARNING batch_engine.engine: slowing down with ***" in text
    assert text.rindex("120/1000 finished") > text.index("slowing down")


# --- summary ---------------------------------------------------------------------------------------


def test_summary_names_every_count_and_report() -> None:
    """The summary gives this run's counts and the out dir's apart, each labelled, then error kinds,
    images, time, the submit rate while submitting, 429s, polls, duplicates, stop, reports."""
    text = format_summary(STATS, report_paths=REPORTS, out_dir=Path("out/demo"))
    for expected in (
        "Run stopped after 8m12s: 1000 items",
        "this run: 1000 submitted, 900 succeeded, 6 failed, 990 images written",
        "in this out dir (all runs): 990 succeeded, 8 failed, 2 pending",
        "failures by kind (all runs): content_policy 5, timeout 3",
        "submits: 1000, 2.03/s while submitting (final rate 1.50/s, ceiling 2.00)",
        "429s: 4",
        "polls: 3110 (3.1 per prediction)",
        "2 possible duplicate(s) may have been billed twice",
        "stopped submitting: balance ran out or no permission (403); run again after a top-up to resume",
        "Output in out/demo",
        *(str(path) for path in REPORTS.values()),
    ):
        assert expected in text
    assert "pending, 0 submitted" not in text  # a state with no items is left out
    assert "average" not in text


def test_summary_of_one_item_and_one_submit_reads_right() -> None:
    """One item is '1 item', and a single submit gives no rate rather than one divided by waiting time."""
    one = replace(STATS, total=1, submits=1, images=1, submit_rate=None)
    text = format_summary(one, report_paths={}, out_dir=Path("out"))
    assert ": 1 item\n" in text
    assert "1 image written" in text
    assert "submits: 1 (final rate" in text


def test_summary_of_a_clean_run_has_no_warnings() -> None:
    """A finished run without duplicates says neither warning nor stop reason."""
    clean = replace(STATS, possible_duplicates=0, stopped_reason=None, by_error_kind={})
    text = format_summary(clean, report_paths={}, out_dir=Path("out"))
    assert text.startswith("Run finished in 8m12s")
    assert "warning" not in text
    assert "stopped" not in text
    assert "failures by kind" not in text


def test_summary_explains_a_refused_key_and_unknown_reasons() -> None:
    """A 401 stop says nothing else can succeed; an unknown reason code is shown as it is."""
    auth = format_summary(replace(STATS, stopped_reason="auth"), report_paths={}, out_dir=Path("out"))
    other = format_summary(replace(STATS, stopped_reason="mystery"), report_paths={}, out_dir=Path("out"))
    assert "stopped early: API key refused (401) — nothing else can succeed" in auth
    assert "stopped early: mystery" in other


def test_summary_json_is_one_line_with_the_stats() -> None:
    """The JSON summary is one parseable line with the stats, the stop sentence and the report paths."""
    line = summary_json(STATS, report_paths=REPORTS)
    assert "\n" not in line
    data = json.loads(line)
    assert data["event"] == "summary"
    assert data["by_state"]["succeeded"] == 990
    assert data["stopped"].startswith("stopped submitting")
    assert data["reports"]["index.html"] == "out/demo/index.html"
    assert "timeline" not in data
