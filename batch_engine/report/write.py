"""Write the journal's views a program and a person read: results.jsonl, report.yaml and failures.yaml.

Every writer streams: it takes a callable returning a fresh iterator of ``ItemRecord`` in manifest order
(optionally only some states) and never holds more than one record's output at a time, so 100k items cost
the same memory as ten. ``write_reports`` reads the journal three times for all four files: a count, the
failed items alone, and one pass that feeds report.yaml, results.jsonl and the gallery together. Each
file is written to a temporary file in the out dir and moved into place with ``os.replace``: a reader (or
a crash) sees the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import secrets
import shlex
from collections import Counter
from collections.abc import Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, Protocol

import yaml

from batch_engine.values import ItemRecord, ItemState, RunMeta

logger = logging.getLogger(__name__)

REPORT_FILES = ("report.yaml", "results.jsonl", "failures.yaml", "index.html")



class Records(Protocol):
    """A fresh iterator of the journal's records in manifest order, all of them or those in ``states``."""

    def __call__(self, states: Collection[ItemState] | None = None) -> Iterator[ItemRecord]: ...


#: the run summary copied from ``RunStats.as_dict()`` into report.yaml, in this order
SUMMARY_KEYS = (
    "elapsed",
    "images",
    "submits",
    "submit_attempts",
    "rate_limited",
    "polls",
    "predictions_resolved",
    "polls_per_prediction",
    "average_rate",
    "rate_final",
    "rate_ceiling",
)
UNFINISHED_STATES = tuple(state.value for state in ItemState if not state.is_final)

# libyaml's emitter is ~10x faster than the pure-Python one and writes the same YAML.
_Dumper: type[yaml.SafeDumper] = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


class _NothingFailed(Exception):
    """Raised inside the failures writer to discard its temporary file."""


@dataclass(frozen=True)
class Counts:
    """What one pass over the records counts, for the headers of report.yaml and index.html."""

    total: int = 0
    by_state: Mapping[str, int] = field(default_factory=dict)
    by_error_kind: Mapping[str, int] = field(default_factory=dict)  #: failed items only, most common first
    possible_duplicates: int = 0
    images: int = 0  #: output files recorded for all items, across runs

    @property
    def succeeded(self) -> int:
        return self.by_state.get(ItemState.SUCCEEDED.value, 0)

    @property
    def failed(self) -> int:
        return self.by_state.get(ItemState.FAILED.value, 0)

    @property
    def unfinished(self) -> int:
        return self.total - self.succeeded - self.failed


def count_items(records: Iterable[ItemRecord]) -> Counts:
    """Count items by state and by error kind, duplicates and images, in one pass."""
    states: Counter[str] = Counter()
    kinds: Counter[str] = Counter()
    duplicates = images = 0
    for record in records:
        states[record.state.value] += 1
        if record.state is ItemState.FAILED:
            kinds[record.error.kind if record.error else "unknown"] += 1
        duplicates += record.possible_duplicate
        images += len(record.outputs)
    by_kind = dict(sorted(kinds.items(), key=lambda kv: (-kv[1], kv[0])))
    return Counts(sum(states.values()), dict(states), by_kind, duplicates, images)


def iso_utc(timestamp: float | None) -> str | None:
    """Unix seconds as ISO 8601 UTC to the second, e.g. ``2026-01-01T09:30:00Z``; None stays None."""
    if timestamp is None:
        return None
    moment = datetime.fromtimestamp(timestamp, UTC)
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")


def _common(record: ItemRecord) -> dict[str, Any]:
    return {
        "id": record.item_id,
        "status": record.state.value,
        "prediction_id": record.prediction_id,
        "outputs": [output.as_dict() for output in record.outputs],
        "error": record.error.as_dict() if record.error else None,
        "attempts": record.attempts,
        "possible_duplicate": record.possible_duplicate,
    }


def result_line(record: ItemRecord) -> dict[str, Any]:
    """One item's JSON object for results.jsonl: flat timings, for programs."""
    return {
        **_common(record),
        "submitted_at": iso_utc(record.submitted_at),
        "completed_at": iso_utc(record.completed_at),
        "inference_ms": record.inference_ms,
    }


def report_entry(record: ItemRecord) -> dict[str, Any]:
    """One item's entry under report.yaml's ``items:``: timings grouped, for people."""
    timings = {
        "submitted": iso_utc(record.submitted_at),
        "completed": iso_utc(record.completed_at),
        "inference_ms": record.inference_ms,
    }
    return {**_common(record), "timings": timings}


@contextlib.contextmanager
def atomic_text(path: Path) -> Iterator[IO[str]]:
    """Open a temporary file beside ``path`` for writing; on success move it over ``path``, else delete it."""
    temp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    # os.open with 0o666 lets the umask decide, as for any file the user writes (mkstemp would force 0600).
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with open(fd, "w", encoding="utf-8", newline="\n") as stream:
            yield stream
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def write_results_jsonl(out_dir: Path, records: Records) -> Path:
    """Write results.jsonl: one JSON object per final item (succeeded or failed), in manifest order."""
    path = out_dir / "results.jsonl"
    with atomic_text(path) as stream:
        for record in records():
            _write_result(stream, record)
    return path


def _write_result(stream: IO[str], record: ItemRecord) -> None:
    if record.state.is_final:
        stream.write(json.dumps(result_line(record), ensure_ascii=False) + "\n")


def write_report_yaml(
    out_dir: Path, meta: RunMeta, records: Records, *, counts: Counts | None = None
) -> Path:
    """Write report.yaml: the run's header and summary, then one entry per manifest item, in manifest order.

    ``counts`` saves a pass over the records when the caller already has them.
    """
    counts = counts if counts is not None else count_items(records())
    path = out_dir / "report.yaml"
    with atomic_text(path) as stream:
        _write_report_head(stream, meta, counts)
        _write_items(stream, (report_entry(record) for record in records()))
    return path


def _write_report_head(stream: IO[str], meta: RunMeta, counts: Counts) -> None:
    stream.write(f"# batch-engine report of {_one_line(meta.name)}; results.jsonl has the same items.\n")
    stream.write(_dump(report_header(meta, counts)))


def report_header(meta: RunMeta, counts: Counts) -> dict[str, Any]:
    """Everything in report.yaml above ``items:``."""
    return {
        "name": meta.name,
        "manifest": meta.manifest_path,
        "model": meta.model,
        "task": meta.task,
        "base_url": meta.base_url,
        "started": iso_utc(meta.started_at),
        "finished": iso_utc(meta.finished_at),
        "stopped_reason": meta.stopped_reason,
        "counts": {
            "total": counts.total,
            "succeeded": counts.succeeded,
            "failed": counts.failed,
            "unfinished": counts.unfinished,
        },
        "unfinished_by_state": {state: counts.by_state.get(state, 0) for state in UNFINISHED_STATES},
        "errors_by_kind": dict(counts.by_error_kind),
        "possible_duplicates": counts.possible_duplicates,
        "images": counts.images,
        "run": {key: _plain(meta.stats.get(key)) for key in SUMMARY_KEYS},
    }


def write_failures_manifest(out_dir: Path, meta: RunMeta, records: Records) -> Path | None:
    """Write failures.yaml, a manifest of the failed items alone; None (and no file) when nothing failed.

    A manifest must list at least one item, so with no failures a stale failures.yaml is removed instead.
    """
    path = out_dir / "failures.yaml"
    try:
        with atomic_text(path) as stream:
            stream.write(_failures_comment(out_dir, meta))
            stream.write(_dump(failures_header(meta)))
            failed = (failed_spec(r) for r in records({ItemState.FAILED}))
            if not _write_items(stream, failed):
                raise _NothingFailed
    except _NothingFailed:
        path.unlink(missing_ok=True)
        return None
    return path


def failures_header(meta: RunMeta) -> dict[str, Any]:
    """failures.yaml's keys above ``items:``: the original manifest's, under a new name."""
    return {
        "version": 1,
        "name": f"{meta.name}-failures",
        "model": meta.model,
        "task": meta.task,
        "defaults": _plain(meta.defaults),
        "settings": _plain(meta.settings),
    }


def failed_spec(record: ItemRecord) -> dict[str, Any]:
    """The item as written in the manifest, with its id made explicit.

    An item without an ``id`` is called ``item-<index>``; in the shorter failures manifest its index
    changes, so the id is written out to keep outputs and reports under the same name as the first run.
    """
    spec: dict[str, Any] = _plain(record.spec)
    return spec if "id" in spec else {"id": record.item_id, **spec}


def write_reports(
    out_dir: Path, meta: RunMeta, records: Records, *, inputs: Mapping[str, str] | None = None
) -> dict[str, Path]:
    """Write every report into ``out_dir``; return file name → path of those written, in REPORT_FILES order.

    failures.yaml is absent from the result when nothing failed. ``inputs`` goes to index.html.
    """
    # Imported here because html_report uses this module's helpers: a top-level import would be circular.
    from batch_engine.report.html import Gallery

    counts = count_items(records())
    failures = write_failures_manifest(out_dir, meta, records)
    # One pass over the records feeds three files; the gallery shows failed items first, which it takes
    # from a query of its own before the pass, and then skips them in it.
    report, results, page = out_dir / "report.yaml", out_dir / "results.jsonl", out_dir / "index.html"
    with atomic_text(report) as yaml_out, atomic_text(results) as jsonl_out, atomic_text(page) as html_out:
        _write_report_head(yaml_out, meta, counts)
        gallery = Gallery(html_out, meta, counts, inputs or {})
        for record in records({ItemState.FAILED}):
            gallery.add(record)

        def entries() -> Iterator[dict[str, Any]]:
            """report.yaml's entries; each record goes to results.jsonl and the gallery on its way."""
            for record in records():
                _write_result(jsonl_out, record)
                if record.state is not ItemState.FAILED:
                    gallery.add(record)
                yield report_entry(record)

        _write_items(yaml_out, entries())
        gallery.close()
    paths = {"report.yaml": report, "results.jsonl": results}
    if failures is not None:
        paths["failures.yaml"] = failures
    paths["index.html"] = page
    logger.debug("reports written to %s: %s", out_dir, ", ".join(paths))
    return paths


def _write_items(stream: IO[str], entries: Iterable[Mapping[str, Any]]) -> int:
    """Write ``items:`` and each entry as a one-element block list under it; return how many."""
    written = 0
    for written, entry in enumerate(entries, 1):
        if written == 1:
            stream.write("items:\n")
        stream.write("".join(block_yaml([entry])))
    if not written:
        stream.write("items: []\n")
    return written


def block_yaml(value: Any, indent: str = "") -> list[str]:
    """Lines of block-style YAML for JSON-like data, as PyYAML would lay it out, many times faster.

    Strings are always written JSON-quoted, which YAML reads as double-quoted scalars: no value can
    turn into a date, a bool or a number on the way back. Used for report.yaml's item entries, where
    PyYAML's pure-Python representer cost more than the rest of the run's bookkeeping.
    """
    out: list[str] = []
    _emit(out, value, indent)
    return out


def _emit(out: list[str], value: Any, indent: str) -> None:
    if isinstance(value, Mapping):
        if not value:
            out.append("{}\n")
            return
        lead = ""  # the first key shares the line its parent started ("- key:" or "key:\n  key:")
        for key, item in value.items():
            _emit_child(out, f"{lead}{_scalar(str(key))}:", item, indent, in_list=False)
            lead = indent
    elif isinstance(value, list | tuple):
        if not value:
            out.append("[]\n")
            return
        lead = ""
        for item in value:
            _emit_child(out, f"{lead}-", item, indent, in_list=True)
            lead = indent
    else:
        out.append(_scalar(value) + "\n")


def _emit_child(out: list[str], head: str, item: Any, indent: str, *, in_list: bool) -> None:
    if type(item) is str or item is None or not isinstance(item, Mapping | list | tuple):
        out.append(f"{head} {_scalar(item)}\n")
    elif not item:
        out.append(f"{head} {{}}\n" if isinstance(item, Mapping) else f"{head} []\n")
    elif in_list:
        out.append(head + " ")  # "- key: value" (or "- - x"): the first line shares the dash's line
        _emit(out, item, indent + "  ")
    else:
        step = "  " if isinstance(item, Mapping) else ""
        out.append(f"{head}\n{indent}{step}")
        _emit(out, item, indent + step)


def _scalar(value: Any) -> str:
    if type(value) is str:
        if _PLAIN_SAFE.fullmatch(value) and value.lower() not in _YAML_WORDS:
            return value
        return json.dumps(value, ensure_ascii=False)
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value) if math.isfinite(value) else json.dumps(str(value))
    text = str(value)
    if _PLAIN_SAFE.fullmatch(text) and text.lower() not in _YAML_WORDS:
        return text
    return json.dumps(text, ensure_ascii=False)


#: Strings written unquoted: they start with a letter (so no number or date) and hold no YAML syntax.
_PLAIN_SAFE = re.compile(r"[A-Za-z][A-Za-z0-9_./-]*")
#: Words YAML 1.1 would read as bools or null.
_YAML_WORDS = frozenset({"y", "n", "yes", "no", "true", "false", "on", "off", "null"})


def _dump(data: Any) -> str:
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, allow_unicode=True, default_flow_style=False)


def _plain(value: Any) -> Any:
    """Mappings and sequences as dicts and lists, so safe_dump can write whatever the journal returned."""
    if isinstance(value, Mapping):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    return value


def _failures_comment(out_dir: Path, meta: RunMeta) -> str:
    finished = iso_utc(meta.finished_at) or "not finished"
    manifest, retry_out = shlex.quote(str(out_dir / "failures.yaml")), shlex.quote(f"{out_dir}-failures")
    return (
        f"# The failed items of run {_one_line(meta.name)!r} (manifest {_one_line(meta.manifest_path)},"
        f" finished {finished}),\n"
        "# with the same model, defaults and settings. Retry them, and nothing else, with:\n"
        f"#   batch-engine run {manifest} --out {retry_out}\n"
    )


def _one_line(text: str) -> str:
    return " ".join(text.split())
