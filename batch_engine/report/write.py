"""Write the journal's views a program and a person read: results.jsonl, report.yaml and failures.yaml.

Every writer streams: it takes a callable returning a fresh iterator of ``ItemRecord`` in manifest order
(optionally only some states) and never holds more than one record's output at a time, so 100k items cost
the same memory as ten. ``write_reports`` reads the journal three times for all four files: a count, the
failed items alone, and one pass that feeds report.yaml, results.jsonl and the gallery together. Each
file is written to a temporary file in the out dir and moved into place with ``os.replace``: a reader (or
a crash) sees the old file or the new one, never half of one.
"""

from __future__ import annotations

import json
import logging
import shlex
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

import yaml

from batch_engine.api import catalogue
from batch_engine.manifest.local_files import is_local
from batch_engine.report.block_yaml import block_yaml
from batch_engine.report.entries import (
    SUMMARY_KEYS,
    UNFINISHED_STATES,
    Counts,
    Records,
    count_items,
    iso_utc,
    report_entry,
    result_line,
)
from batch_engine.report.gallery_files import PageFiles
from batch_engine.report.html import Gallery
from batch_engine.store.files import DEFAULT_OUTPUT, replace_atomically
from batch_engine.values import ItemRecord, ItemState, RunMeta

logger = logging.getLogger(__name__)


REPORT_FILES = ("report.yaml", "results.jsonl", "failures.yaml", "index.html")


# libyaml's emitter is ~10x faster than the pure-Python one and writes the same YAML.
_Dumper: type[yaml.SafeDumper] = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


class _NothingFailed(Exception):
    """Raised inside the failures writer to discard its temporary file."""


def write_results_jsonl(out_dir: Path, records: Records) -> Path:
    """Write results.jsonl: one JSON object per final item (succeeded or failed), in manifest order."""
    path = out_dir / "results.jsonl"
    with replace_atomically(path) as stream:
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
    with replace_atomically(path) as stream:
        _write_report_head(stream, meta, counts)
        _write_items(stream, (report_entry(record) for record in records()))
    return path


def _write_report_head(stream: IO[str], meta: RunMeta, counts: Counts) -> None:
    finished = counts.succeeded + counts.failed
    stream.write(
        f"# batch-engine report of {_one_line(meta.name)}: every item of the manifest, in its order; "
        f"results.jsonl has a line for each of the {finished:,} finished ones.\n"
        "# counts, errors_by_kind and images are the out dir's (every run); run: is the latest run's.\n"
    )
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
        "unfinished_by_state": _unfinished(counts),
        "errors_by_kind": dict(counts.by_error_kind),
        "possible_duplicates": counts.possible_duplicates,
        "images": counts.images,
        "run": {key: _plain(meta.stats.get(key)) for key in SUMMARY_KEYS if _listed(key, meta.stats)},
        "runs": [_run_row(run) for run in meta.history()],
    }


#: The run's figures report.yaml always lists; a shared run's ``workers`` and ``workers_died`` only there.
_ALWAYS = frozenset(SUMMARY_KEYS) - {"workers", "workers_died"}


def _listed(key: str, stats: Mapping[str, Any]) -> bool:
    return key in _ALWAYS or key in stats


def _unfinished(counts: Counts) -> dict[str, int]:
    found = {state: counts.by_state.get(state, 0) for state in UNFINISHED_STATES}
    damaged = counts.by_state.get(ItemState.DAMAGED.value, 0)
    return {**found, ItemState.DAMAGED.value: damaged} if damaged else found
def _run_row(run: Mapping[str, Any]) -> dict[str, Any]:
    """One run of the out dir's history as report.yaml lists it: times in ISO 8601."""
    times = {"started": iso_utc(run.get("started_at")), "finished": iso_utc(run.get("finished_at"))}
    return times | {key: _plain(value) for key, value in run.items() if not key.endswith("_at")}


def write_failures_manifest(out_dir: Path, meta: RunMeta, records: Records) -> Path | None:
    """Write failures.yaml, a manifest of the failed items alone; None (and no file) when nothing failed.

    A manifest must list at least one item, so with no failures a stale failures.yaml is removed instead.
    """
    path = out_dir / "failures.yaml"
    try:
        with replace_atomically(path) as stream:
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
    """failures.yaml's keys above ``items:``: the original manifest's, under a new name.

    A model the catalogue does not list ran because its manifest said ``model_unlisted: true``; so does
    this one, or it would not run as it is.
    """
    unlisted = {"model_unlisted": True} if catalogue.model_spec(meta.model) is None else {}
    return {
        "version": 1,
        "name": f"{meta.name}-failures",
        "model": meta.model,
        **unlisted,
        "task": meta.task,
        "defaults": _plain(meta.defaults),
        "settings": _plain(meta.settings),
        **({"output": meta.output} if meta.output and meta.output != DEFAULT_OUTPUT else {}),
    }


def failed_spec(record: ItemRecord) -> dict[str, Any]:
    """The item as written in the manifest (its metadata included), with its id made explicit and local
    input files as absolute paths, so failures.yaml runs as it is from the out dir.

    The id is written out so that outputs and reports keep the names of the first run; local paths were
    relative to the manifest's folder, which failures.yaml is not in.
    """
    spec: dict[str, Any] = _plain(record.spec)
    images = record.request.get("images")
    if isinstance(images, list) and any(is_local(str(image)) for image in images):
        spec["images"] = list(images)
    return spec if "id" in spec else {"id": record.item_id, **spec}


def write_reports(
    out_dir: Path, meta: RunMeta, records: Records, *, files: PageFiles | None = None
) -> dict[str, Path]:
    """Write every report into ``out_dir``; return file name → path of those written, in REPORT_FILES order.

    failures.yaml is absent from the result when nothing failed. ``files`` goes to index.html.
    """
    counts = count_items(records())
    failures = write_failures_manifest(out_dir, meta, records)
    # One pass over the records feeds three files; the gallery shows failed items first, which it takes
    # from a query of its own before the pass, and then skips them in it.
    report, results, page = out_dir / "report.yaml", out_dir / "results.jsonl", out_dir / "index.html"
    with (
        replace_atomically(report) as yaml_out,
        replace_atomically(results) as jsonl_out,
        replace_atomically(page) as html_out,
    ):
        _write_report_head(yaml_out, meta, counts)
        gallery = Gallery(html_out, meta, counts, files or PageFiles())
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
