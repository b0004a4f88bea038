"""The end-of-run summary: what a run did, for a person (lines) or a program (one JSON line)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from batch_engine.control import WAIT_NAMES, stop_message
from batch_engine.ui.progress import event_line, format_duration
from batch_engine.values import ItemState, RunStats


def stop_sentence(stats: RunStats) -> str | None:
    """Why the run stopped, for the person, or None when it finished."""
    return stop_message(stats.stopped_reason, stats.stop_detail)


def format_summary(
    stats: RunStats, *, report_paths: Mapping[str, Path | str], out_dir: Path | str
) -> str:
    """The end-of-run summary for humans: counts, pace, warnings, why it stopped, where the reports are."""
    lines = [_headline(stats), *_count_lines(stats), *_pace_lines(stats), *_warning_lines(stats)]
    lines.append(f"Output in {out_dir}")
    width = max((len(name) for name in report_paths), default=0)
    lines.extend(f"  {name:<{width}}  {path}" for name, path in report_paths.items())
    return "\n".join(lines)


def summary_json(stats: RunStats, *, report_paths: Mapping[str, Path | str]) -> str:
    """The summary as one JSON line ``{"ts", "event": "summary", ...}``, without the timeline."""
    fields = stats.as_dict()
    fields.pop("timeline", None)
    fields.pop("timeline_step", None)
    fields["stopped"] = stop_sentence(stats)
    fields["reports"] = {name: str(path) for name, path in report_paths.items()}
    return event_line("summary", **fields)


def _headline(stats: RunStats) -> str:
    verb = "finished in" if stats.stopped_reason is None else "stopped after"
    return f"Run {verb} {format_duration(stats.elapsed)}: {plural(stats.total, 'item')}"


def plural(count: int, noun: str) -> str:
    """``1 item``, ``2 items``."""
    return f"{count} {noun}" + ("" if count == 1 else "s")


def _count_lines(stats: RunStats) -> list[str]:
    """This run's counts, then the out dir's (every run's, as the journal holds them): each says which."""
    here = (
        f"  this run: {stats.submits} submitted, {stats.run_succeeded} succeeded, {stats.run_failed} failed,"
        f" {plural(stats.images, 'image')} written"
    )
    counts = ", ".join(f"{stats.by_state.get(state, 0)} {state}" for state in _states_to_show(stats.by_state))
    lines = [here, f"  in this out dir (all runs): {counts}"]
    kinds = sorted(stats.by_error_kind.items(), key=lambda kv: (-kv[1], kv[0]))
    if kinds:
        lines.append("  failures by kind (all runs): " + ", ".join(f"{kind} {n}" for kind, n in kinds))
    return lines


def _states_to_show(by_state: Mapping[str, int]) -> list[str]:
    """succeeded and failed always, then any other state that has items, in ``ItemState`` order."""
    always = [ItemState.SUCCEEDED.value, ItemState.FAILED.value]
    others = [state.value for state in ItemState] + list(by_state)
    return always + [s for s in dict.fromkeys(others) if s not in always and by_state.get(s)]


def _pace_lines(stats: RunStats) -> list[str]:
    rate = "" if stats.submit_rate is None else f", {stats.submit_rate:.2f}/s while submitting"
    return [
        f"  submits: {stats.submits}{rate} (final rate {stats.rate_final:.2f}/s, "
        f"ceiling {stats.rate_ceiling:.2f})",
        f"  429s: {stats.rate_limited}",
        f"  polls: {stats.polls} ({stats.polls_per_prediction:.1f} per prediction)",
        *_limit_lines(stats),
    ]


def _limit_lines(stats: RunStats) -> list[str]:
    """The in-flight cap, and which limit held the run back most (where the stages waited longest)."""
    if not stats.in_flight_cap:
        return []
    how = "auto: rate x p90 latency seen" if stats.in_flight_auto else "max_in_flight"
    lines = [f"  in flight: at most {stats.in_flight_max} (cap {stats.in_flight_cap}, {how})"]
    held = stats.held_back
    if held is not None:
        kind, share = held
        lines.append(f"  held back by: {WAIT_NAMES.get(kind, kind)}, {share:.0%} of the time waited")
    else:
        lines.append("  held back by: none of the limits (the predictions' own time)")
    return lines


def _warning_lines(stats: RunStats) -> list[str]:
    lines = []
    if stats.possible_duplicates:
        count = stats.possible_duplicates
        lines.append(f"  warning: {count} possible duplicate(s) may have been billed twice")
        lines.append("    (resubmitted after an answer was lost; see possible_duplicate in results.jsonl)")
    stopped = stop_sentence(stats)
    if stopped:
        lines.append("  " + stopped)
    return lines
