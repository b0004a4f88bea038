"""Show a person how a run is going while it runs, and sum it up at its end.

Four views share one protocol: ``rich`` (a live region on a terminal), ``plain`` (a line every
``log_every`` seconds, for cron, CI and pipes), ``json`` (the same events as JSON lines) and ``quiet``.
None of them starts a thread or a task: the plain and JSON views decide from ``update()`` and the
injected clock whether a line is due, and the rich view redraws from ``update()`` at most
``REFRESH_PER_SECOND`` times a second.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TextIO

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from batch_engine.errors import UsageError
from batch_engine.ui.logs import iso_timestamp, redact
from batch_engine.values import ItemError, Snapshot

MODES = ("auto", "rich", "plain", "json", "quiet")
REFRESH_PER_SECOND = 4.0
BAR_WIDTH = 40
MESSAGE_MAX = 300  #: a failure's message is cut to this many characters, on one line


Clock = Callable[[], float]


class ProgressView(Protocol):
    """What the engine tells the person watching a run."""

    def start(self) -> None: ...

    def update(self, snapshot: Snapshot) -> None: ...

    def item_failed(self, item_id: str, error: ItemError) -> None: ...

    def message(self, text: str) -> None: ...

    def stop(self) -> None: ...


def make_view(
    *,
    mode: str,
    stream: TextIO,
    log_every: float,
    clock: Clock = time.monotonic,
    console: Console | None = None,
    secrets: Sequence[str] = (),
) -> ProgressView:
    """The view for ``mode``; ``auto`` is the live display on a terminal and plain lines anywhere else."""
    _check_options(mode, log_every)
    if mode == "auto":
        mode = "rich" if _is_terminal(stream) else "plain"
    if mode == "rich":
        return RichView(console or Console(file=stream), clock=clock, secrets=secrets)
    if mode == "plain":
        return PlainView(stream, log_every=log_every, clock=clock, secrets=secrets)
    if mode == "json":
        return JsonView(stream, log_every=log_every, clock=clock, secrets=secrets)
    return QuietView()


def _check_options(mode: str, log_every: float) -> None:
    if mode not in MODES:
        raise UsageError(f"progress mode must be one of {', '.join(MODES)}; got {mode!r}")
    if not log_every >= 0:
        raise UsageError(f"log_every must be 0 or more seconds, got {log_every}")


def _is_terminal(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


# --- the numbers every view shows ---------------------------------------------------------------


RATE_WINDOW = 60.0  #: seconds of finishes the ETA's rate looks back on
RATE_MIN_SPAN = 2.0  #: seconds of samples needed before a rate is given


class RecentRate:
    """Events per second over the last ``window`` seconds, from a running count sampled now and then.

    Invariant: ``_samples`` holds (time, count) in time order, the oldest at most one sample older than
    ``window``, so the rate spans the whole window once the run is that old.
    """

    __slots__ = ("_samples", "window")

    def __init__(self, window: float = RATE_WINDOW) -> None:
        self.window = window
        self._samples: deque[tuple[float, int]] = deque()

    def __repr__(self) -> str:
        return f"<RecentRate {len(self._samples)} samples over {self.window:g}s>"

    def update(self, now: float, count: int) -> float | None:
        """Record ``count`` at ``now`` (a monotonic clock); the rate since the window's start, or None
        while the samples span less than ``RATE_MIN_SPAN`` seconds or nothing was counted yet."""
        samples = self._samples
        samples.append((now, count))
        while len(samples) > 2 and samples[1][0] <= now - self.window:
            samples.popleft()
        then, before = samples[0]
        if count == 0 or now - then < RATE_MIN_SPAN:
            return None
        return (count - before) / (now - then)


def eta_seconds(snapshot: Snapshot) -> float | None:
    """Seconds left at the recent finish rate (the last minute's); None until known, 0 when done."""
    remaining = snapshot.total - snapshot.finished
    if remaining <= 0:
        return 0.0
    rate = snapshot.finish_rate
    if not rate:
        return None
    return remaining / rate


def format_duration(seconds: float | None, *, unknown: str = "—") -> str:
    """``4.2s``, ``45s``, ``7m20s``, ``2h05m``; ``unknown`` for None."""
    if seconds is None:
        return unknown
    if seconds < 10:
        return f"{seconds:.1f}s"
    whole = round(seconds)
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s" if whole >= 60 else f"{whole}s"
    return f"{whole // 3600}h{whole % 3600 // 60:02d}m"


def progress_line(s: Snapshot) -> str:
    """The plain progress line: the job's position, then this run's counts, pace and clock, e.g.
    ``progress: 120/1000 finished; this run: 117 ok, 3 failed, 160 submitted, 40 in flight, ...``."""
    eta = format_duration(eta_seconds(s), unknown="unknown")
    return (
        f"progress: {s.finished}/{s.total} finished{_before(s)}; "
        f"this run: {s.succeeded} ok, {s.failed} failed, {s.submitted} submitted, {s.in_flight} in flight, "
        f"rate {s.rate:.2f}/s (ceiling {s.rate_ceiling:.2f}), 429s {s.rate_limited}, polls {s.polls}, "
        f"images {s.images}, elapsed {format_duration(s.elapsed)}, eta {eta}"
    )


def _before(s: Snapshot) -> str:
    return f" ({s.done_before} before this run)" if s.done_before else ""


def failure_text(item_id: str, error: ItemError) -> str:
    """``sku-12 content_policy (400): the message``, on one line whatever the server sent.

    A message that opens with its own kind (``inference failed: ...`` of kind ``inference_failed``) is
    not made to say it twice.
    """
    status = f" ({error.status})" if error.status is not None else ""
    message = _one_line(error.message)
    said = error.kind.replace("_", " ") + ":"
    if message.lower().startswith(said):
        message = message[len(said) :].lstrip()
    return f"{item_id} {error.kind}{status}: {message}"


def _one_line(text: str) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= MESSAGE_MAX else flat[: MESSAGE_MAX - 1] + "…"


# --- views ---------------------------------------------------------------------------------------


class QuietView:
    """Prints nothing; the caller prints the final summary."""

    def start(self) -> None:
        pass

    def update(self, snapshot: Snapshot) -> None:
        pass

    def item_failed(self, item_id: str, error: ItemError) -> None:
        pass

    def message(self, text: str) -> None:
        pass

    def stop(self) -> None:
        pass


class _LineView:
    """A line per failure and per message, and a progress line when ``log_every`` has passed."""

    def __init__(self, stream: TextIO, *, log_every: float, clock: Clock, secrets: Sequence[str]) -> None:
        self._stream = stream
        self._log_every = log_every
        self._clock = clock
        self._secrets = tuple(secrets)
        self._last_line: float | None = None  #: clock time of the last progress line, or of start()

    def start(self) -> None:
        self._last_line = self._clock()

    def update(self, snapshot: Snapshot) -> None:
        if self._line_due():
            self._write(self._progress(snapshot))

    def item_failed(self, item_id: str, error: ItemError) -> None:
        self._write(self._failure(item_id, error))

    def message(self, text: str) -> None:
        self._write(self._message(text))

    def stop(self) -> None:
        self._stream.flush()

    def _line_due(self) -> bool:
        now = self._clock()
        if self._last_line is None:  # update() before start(): the interval starts now
            self._last_line = now
            return False
        if now - self._last_line < self._log_every:
            return False
        self._last_line = now
        return True

    def _write(self, line: str) -> None:
        self._stream.write(line + "\n")
        self._stream.flush()

    def _progress(self, snapshot: Snapshot) -> str:
        raise NotImplementedError

    def _failure(self, item_id: str, error: ItemError) -> str:
        raise NotImplementedError

    def _message(self, text: str) -> str:
        raise NotImplementedError


class PlainView(_LineView):
    """Plain text lines for logs: cron, CI, a pipe."""

    def _progress(self, snapshot: Snapshot) -> str:
        return progress_line(snapshot)

    def _failure(self, item_id: str, error: ItemError) -> str:
        return redact("failed: " + failure_text(item_id, error), self._secrets)

    def _message(self, text: str) -> str:
        return redact(text, self._secrets)


class JsonView(_LineView):
    """The plain view's events as JSON lines: ``{"ts", "event": "progress"|"item_failed"|"message", ...}``."""

    def _progress(self, snapshot: Snapshot) -> str:
        eta = eta_seconds(snapshot)
        fields = dataclasses.asdict(snapshot) | {
            "finished": snapshot.finished,
            "eta_seconds": None if eta is None else round(eta, 1),
        }
        return event_line("progress", **fields)

    def _failure(self, item_id: str, error: ItemError) -> str:
        fields = error.as_dict() | {"message": redact(error.message, self._secrets)}
        return event_line("item_failed", item_id=item_id, **fields)

    def _message(self, text: str) -> str:
        return event_line("message", text=redact(text, self._secrets))


def event_line(event: str, **fields: Any) -> str:
    return json.dumps({"ts": iso_timestamp(time.time()), "event": event, **fields})


class RichView:
    """A live region on a terminal, redrawn from ``update()``; failures and messages print above it."""

    def __init__(self, console: Console, *, clock: Clock, secrets: Sequence[str] = ()) -> None:
        self._console = console
        self._clock = clock
        self._secrets = tuple(secrets)
        self._snapshot: Snapshot | None = None
        self._last_refresh = float("-inf")
        # No refresh thread: update() is called often enough, and one thread keeps Ctrl-C simple.
        self._live = Live(
            console=console,
            auto_refresh=False,
            transient=False,
            redirect_stdout=True,
            redirect_stderr=True,
            get_renderable=self._render,
        )

    def start(self) -> None:
        self._live.start(refresh=True)

    def update(self, snapshot: Snapshot) -> None:
        self._snapshot = snapshot
        now = self._clock()
        if self._live.is_started and now - self._last_refresh >= 1 / REFRESH_PER_SECOND:
            self._last_refresh = now
            self._live.refresh()

    def item_failed(self, item_id: str, error: ItemError) -> None:
        self._print("✗ " + failure_text(item_id, error), style="red")

    def message(self, text: str) -> None:
        self._print(text, style="bold yellow")

    def stop(self) -> None:
        """Draw the last state, show the cursor and give sys.stdout/sys.stderr back; safe to call twice."""
        self._live.stop()

    def _print(self, line: str, *, style: str) -> None:
        # Text, not a markup string: an item id like "[red]" must print as written. While the live
        # region runs, the console prints this above it.
        self._console.print(Text(redact(line, self._secrets), style=style))

    def _render(self) -> RenderableType:
        if self._snapshot is None:
            return Text("starting…", style="dim")
        return render_snapshot(self._snapshot)


def render_snapshot(s: Snapshot) -> RenderableType:
    """The live region: a bar of the job's finished/total, this run's counts, then the pace and the clock."""
    head = Table.grid(padding=(0, 1))
    head.add_row(
        ProgressBar(total=max(s.total, 1), completed=s.finished, width=BAR_WIDTH),
        Text(f"{s.finished}/{s.total} finished{_before(s)}", style="bold"),
    )
    counts = Text.assemble(
        f"this run: submitted {s.submitted} · in flight {s.in_flight} · ",
        (f"ok {s.succeeded}", "green"),
        " · ",
        (f"failed {s.failed}", "red" if s.failed else ""),
    )
    pace = Text(
        f"rate {s.rate:.2f}/s (ceiling {s.rate_ceiling:.2f}) · 429s {s.rate_limited} · polls {s.polls}"
        f" · images {s.images} · elapsed {format_duration(s.elapsed)} · eta {format_duration(eta_seconds(s))}"
    )
    return Group(head, counts, pace)
