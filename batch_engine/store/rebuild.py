"""Rebuild a lost journal from the out dir's own record of it, before anything is submitted.

A journal that is missing or empty (deleted, truncated to 0 bytes) beside outputs of an earlier run would
make every item look new and be paid for again. The out dir keeps a second record: ``results.jsonl`` (every
finished item, with its outputs, its prediction id and its request's fingerprint) and ``report.yaml``
(every item of the last run's end, the unfinished ones with their prediction ids). What they say is taken
back into the journal, item by item, and the manifest sync then decides as always: an item whose
fingerprint matches keeps its state; one that changed is done again. When the out dir holds outputs but
no record with fingerprints (files of a version that wrote none), nothing is guessed: the run is refused.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

import yaml

from batch_engine.errors import JournalError
from batch_engine.store.files import IMAGES_DIR, RESULTS_NAME
from batch_engine.values import ItemError, ItemRecord, ItemState, OutputFile

log = logging.getLogger(__name__)

REPORT_NAME = "report.yaml"
_ADOPTED_STATES = {
    state.value: state for state in (ItemState.SUCCEEDED, ItemState.FAILED, ItemState.SUBMITTED)
}
_LOADER: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@dataclass(frozen=True)
class Evidence:
    """What an out dir shows of earlier runs, journal aside."""

    outputs: int  #: files under images/
    results_lines: int  #: lines of results.jsonl
    report: bool  #: report.yaml exists

    @property
    def any(self) -> bool:
        return bool(self.outputs or self.results_lines or self.report)

    def describe(self, out_dir: Path) -> str:
        found = [f"{self.outputs:,} output file(s) in {out_dir / IMAGES_DIR}"] if self.outputs else []
        if self.results_lines:
            found.append(f"{self.results_lines:,} line(s) in {out_dir / RESULTS_NAME}")
        if self.report:
            found.append(str(out_dir / REPORT_NAME))
        return ", ".join(found)


def evidence(out_dir: Path) -> Evidence:
    images = out_dir / IMAGES_DIR
    outputs = sum(1 for p in images.iterdir() if p.is_file()) if images.is_dir() else 0
    results = out_dir / RESULTS_NAME
    lines = _count_lines(results) if results.is_file() else 0
    return Evidence(outputs, lines, (out_dir / REPORT_NAME).is_file())


#: Which of these output paths are still where the run keeps its outputs (the out dir, or an object store).
Found = Callable[[Collection[str]], Collection[str]]


def recovered_records(out_dir: Path, *, found: Found | None = None) -> list[ItemRecord]:
    """Every item the out dir's results.jsonl and report.yaml can vouch for (newest word wins: a
    results.jsonl line over report.yaml, a later line over an earlier one); JournalError when the out dir
    holds outputs or reports but none of them carries a request fingerprint. A success keeps its state
    only when ``found`` (default: files in the out dir) still finds every output of it."""
    records: dict[str, ItemRecord] = {}
    for record in _from_report(out_dir / REPORT_NAME):
        records[record.item_id] = record
    for record in _from_results(out_dir / RESULTS_NAME):
        records[record.item_id] = record
    if not records:
        raise JournalError(
            f"the journal of {out_dir} is missing or empty, but the out dir holds "
            f"{evidence(out_dir).describe(out_dir)} from an earlier run, with no record of which request "
            "each answers (written by an older batch-engine). Running now would pay for every item again. "
            "Restore journal.sqlite from a backup, or run with --fresh to start over on purpose"
        )
    wanted = {o.path for r in records.values() if r.state is ItemState.SUCCEEDED for o in r.outputs}
    there = set((found or partial(_files_found, out_dir))(wanted))
    return [_checked(record, there) for record in records.values()]


def _files_found(out_dir: Path, relpaths: Collection[str]) -> set[str]:
    return {path for path in relpaths if (out_dir / path).is_file()}


def _checked(record: ItemRecord, there: Collection[str]) -> ItemRecord:
    """A success whose files are gone is taken back as accepted: its prediction is polled again."""
    if record.state is not ItemState.SUCCEEDED:
        return record
    if record.outputs and all(output.path in there for output in record.outputs):
        return record
    if record.prediction_id:
        return dataclasses.replace(record, state=ItemState.SUBMITTED, outputs=())
    return dataclasses.replace(record, state=ItemState.SUBMITTING, outputs=())


def _from_results(path: Path) -> Iterator[ItemRecord]:
    if not path.is_file():
        return
    with path.open(encoding="utf-8", errors="replace") as stream:
        for number, line in enumerate(stream, 1):
            try:
                entry = json.loads(line)
            except ValueError:
                log.warning("%s:%d is not a JSON line; skipped while rebuilding the journal", path, number)
                continue
            record = _record(entry, submitted="submitted_at", completed="completed_at")
            if record is not None:
                yield record


def _from_report(path: Path) -> Iterator[ItemRecord]:
    if not path.is_file():
        return
    try:
        with path.open("rb") as stream:
            report = yaml.load(stream, Loader=_LOADER)  # a safe loader: plain values only
    except (OSError, yaml.YAMLError) as exc:
        log.warning("%s cannot be read (%s); skipped while rebuilding the journal", path, exc)
        return
    entries = report.get("items") if isinstance(report, Mapping) else None
    for entry in entries if isinstance(entries, list) else []:
        timings = entry.get("timings") if isinstance(entry, Mapping) else None
        flat = (
            {**entry, **(timings if isinstance(timings, Mapping) else {})}
            if isinstance(entry, Mapping)
            else {}
        )
        record = _record(flat, submitted="submitted", completed="completed")
        if record is not None:
            yield record


def _record(entry: Any, *, submitted: str, completed: str) -> ItemRecord | None:
    """An entry that names its item, its state and the fingerprint of its request; else None."""
    if not isinstance(entry, Mapping):
        return None
    item_id, fingerprint = entry.get("id"), entry.get("fingerprint")
    state = _ADOPTED_STATES.get(str(entry.get("status")))
    if not isinstance(item_id, str) or not isinstance(fingerprint, str) or state is None:
        return None
    prediction_id = entry.get("prediction_id") if isinstance(entry.get("prediction_id"), str) else None
    if state is ItemState.SUBMITTED and prediction_id is None:
        return None
    return ItemRecord(
        index=-1,
        item_id=item_id,
        fingerprint=fingerprint,
        spec={},
        request={},
        state=state,
        prediction_id=prediction_id,
        attempts=_int(entry.get("attempts")),
        possible_duplicate=entry.get("possible_duplicate") is True,
        outputs=_outputs(entry.get("outputs")),
        error=_error(entry.get("error")),
        submitted_at=_unix(entry.get(submitted)),
        completed_at=_unix(entry.get(completed)),
        inference_ms=entry.get("inference_ms") if isinstance(entry.get("inference_ms"), int) else None,
    )


def _outputs(value: Any) -> tuple[OutputFile, ...]:
    listed = value if isinstance(value, list) else []
    return tuple(
        OutputFile(str(o["path"]), str(o["sha256"]), o.get("url"), o.get("nsfw"))
        for o in listed
        if isinstance(o, Mapping) and isinstance(o.get("path"), str) and isinstance(o.get("sha256"), str)
    )


def _error(value: Any) -> ItemError | None:
    if not isinstance(value, Mapping):
        return None
    status = value.get("status")
    return ItemError(
        str(value.get("kind") or "unknown"),
        str(value.get("message") or ""),
        status if isinstance(status, int) and not isinstance(status, bool) else None,
    )


def _unix(value: Any) -> float | None:
    if isinstance(value, datetime):
        return value.timestamp()
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def _count_lines(path: Path) -> int:
    with path.open("rb") as stream:
        return sum(1 for line in stream if line.strip())
