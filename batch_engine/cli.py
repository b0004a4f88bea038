"""The command line: validate, run, status, report, schema and simulate; exit codes a scheduler understands.

Exit codes: 0 every item succeeded; 1 the run finished with failed items; 2 invalid manifest or usage;
3 the run stopped early (401, 403, interrupted, budget, disk) and can be resumed.

Every failure a person can cause or meet (a bad flag, a manifest, an out dir that is a file or cannot be
written, a port in use, a closed pipe) ends in one line and an exit code, never a traceback; ``-v`` adds the
traceback of an internal error, which is a bug.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import errno
import json
import logging
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AsyncExitStack
from functools import partial
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, TextIO
from urllib.parse import urlsplit

import anyio

from batch_engine import __version__
from batch_engine.api.client import ClientConfig
from batch_engine.engine import RunOptions, RunResult, page_listings, plan_counts, run_manifest
from batch_engine.errors import (
    BatchEngineError,
    JournalError,
    ManifestError,
    OutputNotSaved,
    StagingRefused,
    UsageError,
)
from batch_engine.manifest import load_manifest
from batch_engine.manifest.schema import manifest_schema
from batch_engine.report.gallery_files import (
    distinct_inputs,
    local_inputs,
    make_thumbs,
    page_files,
    thumb_jobs,
)
from batch_engine.report.write import write_reports
from batch_engine.settings import DEFAULT_BASE_URL, RunSettings
from batch_engine.staging.out_store import OutStore, is_store_url
from batch_engine.staging.s3 import open_store
from batch_engine.store import open_journal
from batch_engine.store.files import JOURNAL_NAME, safe_stem
from batch_engine.store.journal import Journal
from batch_engine.store.lock import OutDirLock
from batch_engine.store.postgres import (
    DEFAULT_LEASE,
    JOURNAL_ENV,
    PostgresJournal,
    Worker,
    check_url,
    journal_password,
    public_dsn,
    run_names,
)
from batch_engine.ui.logs import setup_logging
from batch_engine.ui.pipes import pipe_safe_std
from batch_engine.ui.progress import ProgressView, make_view
from batch_engine.ui.summary import format_summary, summary_json
from batch_engine.values import ItemState, Manifest, RunStats

if TYPE_CHECKING:  # the simulator (and aiohttp's server) is imported only by the commands that use it
    from batch_engine.sim import SimConfig, Simulator

log = logging.getLogger(__name__)

EXIT_OK, EXIT_FAILED_ITEMS, EXIT_USAGE, EXIT_STOPPED = 0, 1, 2, 3
KEY_ENV = "GPTPROTO_API_KEY"
BASE_URL_ENV = "GPTPROTO_BASE_URL"
SIMULATOR_KEY = "sim-key"  #: the key --simulate uses against its own in-process simulator
#: Poll timing for --simulate, whose predictions take a fraction of a second (real ones take 20 s or more).
SIMULATE_POLL = {"poll_after": 0.3, "poll_interval": 0.2, "poll_interval_max": 1.0}

RUN_HELP = "Run a manifest (or resume it: the journal in the out dir remembers every item)."
#: The top-level help and `run --help` end with how a run is configured; the other commands say only
#: what their own exit codes mean.
CONFIG_HELP = """\
Configuring a run (every flag in 'batch-engine run --help'):
  GPTPROTO_API_KEY   the API key (required unless --simulate); never printed or written anywhere
  GPTPROTO_BASE_URL  the API origin (default https://gptproto.com); --base-url overrides it
  --out DIR, --base-url URL, --rate N, --max-in-flight N, --timeout S, --poll-after S,
  --poll-interval S, -v/--verbose, --simulate (the built-in simulator: no key, no network)

Exit codes: 0 all items succeeded, 1 some failed, 2 invalid manifest or usage (nothing sent),
3 stopped early (resumable: run the same command again).
"""
VALIDATE_EXITS = "Exit codes: 0 the manifest is valid (warnings may be printed), 2 it is not (all listed)."
STATUS_EXITS = "Exit codes: 0 the counts were printed, 2 OUT_DIR holds no journal or cannot be read."
REPORT_EXITS = (
    "Exit codes: 0 the reports were written, 2 OUT_DIR holds no journal, is in use by a run, or cannot be "
    "written to."
)
SIMULATE_HELP = (
    "Serve the built-in simulator of GPTProto's prediction API on HOST:PORT, to rehearse a manifest "
    "without a key or a bill: it accepts any key unless --key is given, answers like the real API (its "
    "prediction states, errors and envelopes), and draws each output with its prompt written on it."
)
SIMULATE_EPILOG = """\
Rehearse a manifest against it from another terminal:
  GPTPROTO_API_KEY=any batch-engine run MANIFEST --base-url http://127.0.0.1:PORT
Its counters are at http://HOST:PORT/_sim/stats. Ctrl-C stops it.

Exit codes: 0 stopped with Ctrl-C, 2 it cannot listen on HOST:PORT.
"""
PORT_MAX = 65535


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; a closed output pipe never changes its exit code, a failed write says so."""
    started = time.time()  #: "finished in" counts from here: the process's real time, start-up included
    with pipe_safe_std() as (out, err):
        args = _parse(argv)
        code = _run_command(args, started)
    failed = out.error or err.error
    if failed is not None:
        with contextlib.suppress(OSError):
            print(f"batch-engine: could not write the output: {_reason(failed)}", file=sys.__stderr__)
        if code == EXIT_OK and args.func is not cmd_run:  # the output was the command's whole job
            code = EXIT_USAGE
    return code


def entry() -> None:
    """The ``batch-engine`` command (and ``python -m batch_engine``): `main`, then the process ends.

    A process that loaded obstore (the object-store client, which runs a Rust runtime in threads of its
    own) ends without the interpreter's finalization, after flushing the logs and the output: that
    runtime's teardown there aborted the process (SIGABRT, no Python frame) in about 1 exit in 8, after
    the command had finished and said what it had to, so a scheduler saw a crash instead of its exit code.
    Every file the engine keeps is closed and synced before `main` returns."""
    try:
        code = main()
    except SystemExit as exc:  # argparse: --help, --version, a usage error
        if not isinstance(exc.code, int):
            raise
        code = exc.code
    if "obstore" not in sys.modules:
        sys.exit(code)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        with contextlib.suppress(Exception):
            if stream is not None:
                stream.flush()
    os._exit(code)


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = _parser()
    args, extras = parser.parse_known_args(argv)
    if extras:
        command: argparse.ArgumentParser = args.parser
        command.error(_unknown_arguments(extras, command))
    return args


def _run_command(args: argparse.Namespace, started: float) -> int:
    args.started = started
    try:
        code: int = args.func(args)
        return code
    except BaseException as exc:  # every way out becomes one line and an exit code
        return _failure(args, _unwrap(exc))


def _failure(args: argparse.Namespace, exc: BaseException) -> int:
    if isinstance(exc, SystemExit):
        raise exc
    if isinstance(exc, ManifestError):
        print(str(exc), file=sys.stderr)
        return EXIT_USAGE
    if isinstance(exc, StagingRefused | OutputNotSaved):  # the object store of --out, before any submit
        again = "run again to resume (nothing was sent)" if args.func is cmd_run else "then run this again"
        print(f"batch-engine: {exc}; check the store and the AWS_* settings, {again}", file=sys.stderr)
        return EXIT_STOPPED if args.func is cmd_run else EXIT_USAGE
    if isinstance(exc, BatchEngineError):
        print(f"batch-engine: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if isinstance(exc, KeyboardInterrupt):
        print("batch-engine: interrupted", file=sys.stderr)
        return EXIT_STOPPED
    if isinstance(exc, OSError):
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"batch-engine: {where}{_reason(exc)}", file=sys.stderr)
        return EXIT_USAGE
    if getattr(args, "verbose", False):
        traceback.print_exception(exc, file=sys.stderr)
    hint = "" if getattr(args, "verbose", False) else "; run with -v to see where"
    print(
        f"batch-engine: internal error (a bug: please report it): {type(exc).__name__}: {exc}{hint}",
        file=sys.stderr,
    )
    return EXIT_STOPPED if args.func is cmd_run else EXIT_USAGE


def _unwrap(exc: BaseException) -> BaseException:
    """The one error inside task-group wrappers, so it gets the message of its own kind."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def _reason(exc: OSError) -> str:
    """``Permission denied``: the system's words for an error, without the errno and file name."""
    if exc.errno is not None and exc.errno > 0:
        return os.strerror(exc.errno)
    return exc.strerror or str(exc)  # a name lookup's error (socket.gaierror) has its own words


def _unknown_arguments(extras: Sequence[str], parser: argparse.ArgumentParser) -> str:
    """``unrecognized arguments: --dry_run (did you mean --dry-run?)``."""
    options = [name for action in parser._actions for name in action.option_strings]
    words = []
    for extra in extras:
        flag = extra.split("=", 1)[0]
        close = difflib.get_close_matches(flag.replace("_", "-"), options, n=1) if flag[:1] == "-" else []
        words.append(f"{extra} (did you mean {close[0]}?)" if close else extra)
    return "unrecognized arguments: " + " ".join(words)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="batch-engine",
        description="Bulk image edits from a YAML manifest against GPTProto's prediction API: "
        "paced to the key's rate limit, resumable after any crash, reported. "
        "See 'batch-engine COMMAND --help'.",
        epilog=CONFIG_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"batch-engine {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = _command(
        sub, "validate", help="check a manifest and list every problem; sends nothing", epilog=VALIDATE_EXITS
    )
    p.add_argument("manifest", help="path to the YAML manifest")
    p.set_defaults(func=cmd_validate)

    p = _command(sub, "run", help="run or resume a manifest", description=RUN_HELP, epilog=CONFIG_HELP)
    p.add_argument("manifest", help="path to the YAML manifest")
    _run_arguments(p)
    p.set_defaults(func=cmd_run)

    p = _command(
        sub,
        "status",
        help="counts by state from an out dir's journal, or a shared journal's run; calls no API",
        epilog=STATUS_EXITS,
    )
    p.add_argument(
        "target",
        nargs="?",
        metavar="OUT_DIR|NAME",
        help="the out dir; with --journal, the run's name (the manifest's name; none: list the runs)",
    )
    _journal_argument(p)
    p.add_argument("--json", action="store_true", help="print the counts as JSON")
    p.set_defaults(func=cmd_status)

    p = _command(
        sub,
        "report",
        help="rebuild report.yaml, results.jsonl, failures.yaml, index.html (and missing thumbnails)",
        epilog=REPORT_EXITS,
    )
    p.add_argument(
        "target", metavar="OUT_DIR|NAME", help="the out dir; with --journal, the run's name (its manifest's)"
    )
    _journal_argument(p)
    p.add_argument(
        "--out",
        type=_out_argument,
        help="where to write them: with --journal, a folder or s3://bucket/prefix/; without, an s3:// URL "
        "(default: the out the run used)",
    )
    _work_dir_argument(p)
    p.set_defaults(func=cmd_report)

    p = _command(sub, "schema", help="print the manifest's JSON Schema")
    p.set_defaults(func=cmd_schema)

    p = _command(
        sub,
        "simulate",
        help="serve the built-in API simulator for rehearsals",
        description=SIMULATE_HELP,
        epilog=SIMULATE_EPILOG,
    )
    p.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)"
    )
    p.add_argument(
        "--port", type=_port, default=8080, help="port to listen on, 0 to 65535 (default 8080; 0: any free)"
    )
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the simulator's choices: the same seed gives the same failures and timings (default 0)",
    )
    p.add_argument(
        "--advertise",
        metavar="HOST",
        help="the host name its output URLs carry (default: --host; set it when listening on 0.0.0.0, e.g. "
        "the service name in docker compose)",
    )
    p.add_argument("--key", help="the key the simulator accepts (default: any non-empty key)")
    p.add_argument("--inference", type=float, default=2.0, metavar="S", help="median inference seconds")
    p.add_argument("--submit-rate", type=float, metavar="R", help="submits/s the simulated key allows")
    p.set_defaults(func=cmd_simulate)
    return parser


def _command(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], name: str, *, epilog: str = "", **kwargs: Any
) -> argparse.ArgumentParser:
    """A subcommand; ``args.parser`` is it, so an unknown flag is answered with its own options."""
    parser = sub.add_parser(
        name, epilog=epilog or None, formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs
    )
    parser.set_defaults(parser=parser)
    return parser


def _journal_argument(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    p.add_argument(
        "--journal",
        metavar="URL",
        help=f"a PostgreSQL journal shared by several workers, postgresql://user@host/db (default "
        f"${JOURNAL_ENV}; password from the URL, PGPASSWORD or ~/.pgpass, never printed)",
    )


def _work_dir_argument(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    p.add_argument(
        "--work-dir",
        type=Path,
        metavar="DIR",
        help="with --out s3://...: the local folder the run works in (the SQLite journal, files on their "
        "way to the store); default $XDG_CACHE_HOME/batch-engine/<name>, else ~/.cache/batch-engine/<name>",
    )


def _in_flight_argument(text: str) -> int | str:
    """``--max-in-flight``: a whole number, or ``auto`` (as when left out; it overrides the manifest's)."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number or auto, got {text!r}") from None


def _out_argument(text: str) -> Path | str:
    """``--out``: a folder, or an ``s3://bucket/prefix/`` URL (kept as a string)."""
    if is_store_url(text):
        return text
    if "://" in text:
        raise argparse.ArgumentTypeError(
            f"{text!r}: an out is a folder or an s3://bucket/prefix/ URL (any S3-compatible store)"
        )
    return Path(text)


def default_work_dir(name: str) -> Path:
    """Where a run into an object store works: the user's cache dir, a folder named after the run."""
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "batch-engine" / safe_stem(name)


def _out_and_work_dir(out: Path | str | None, work_dir: Path | None, name: str) -> tuple[Path, str | None]:
    """The local folder a run writes in, and the object store URL when the out is one (checked now:
    the s3 extra, a URL obstore can read); UsageError for --work-dir without an object store."""
    if isinstance(out, str):
        open_store(out, setting="--out")
        return work_dir or default_work_dir(name), out
    if work_dir is not None:
        raise UsageError("--work-dir goes with --out s3://...: a local out dir is its own work dir")
    return out or Path("out") / name, None


def _journal_url(args: argparse.Namespace) -> str | None:
    """The shared journal asked for (``--journal``, else $BATCH_ENGINE_JOURNAL), checked; None: SQLite."""
    if args.journal:
        return check_url(args.journal, "--journal")
    found = os.environ.get(JOURNAL_ENV, "").strip()
    return check_url(found, f"${JOURNAL_ENV}") if found else None


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= PORT_MAX:
        raise argparse.ArgumentTypeError(f"must be a whole number from 0 to {PORT_MAX}, got {text!r}")
    return port


def _run_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("the API")
    g.add_argument("--base-url", help=f"API origin (default ${BASE_URL_ENV} or {DEFAULT_BASE_URL})")
    g.add_argument(
        "--raw-auth",
        action="store_true",
        help="send the key as the raw Authorization value instead of 'Bearer <key>'",
    )
    g.add_argument(
        "--simulate",
        action="store_true",
        help="run against the built-in simulator in this process: no key, no network",
    )
    g.add_argument("--sim-seed", type=int, default=0, help="seed of the --simulate simulator (default 0)")

    g = p.add_argument_group("the out dir: results, and what to do again")
    g.add_argument(
        "--out",
        type=_out_argument,
        metavar="DIR|s3://BUCKET/PREFIX/",
        help="out dir (default out/<manifest name>; made when missing), or a prefix in an S3-compatible "
        "object store (credentials from the AWS_* environment; needs the s3 extra)",
    )
    _work_dir_argument(g)
    _journal_argument(g)
    g.add_argument(
        "--lease",
        type=float,
        default=DEFAULT_LEASE,
        metavar="S",
        help=f"with --journal: seconds without a heartbeat before a worker's items go to the others "
        f"(default {DEFAULT_LEASE:g})",
    )
    g.add_argument("--fresh", action="store_true", help="forget the out dir's journal and outputs first")
    g.add_argument("--yes", action="store_true", help="do not ask before --fresh")
    g.add_argument("--retry-failed", action="store_true", help="send items that failed before again")
    g.add_argument(
        "--take-over",
        action="store_true",
        help="let this manifest use an out dir that holds another manifest's run (its items are retired "
        "to the journal's archive, not forgotten)",
    )
    g.add_argument(
        "--dry-run",
        action="store_true",
        help="print what a run would do (done, to poll, to submit, images billed); send nothing",
    )

    g = p.add_argument_group("pacing and polling (override the manifest's settings)")
    g.add_argument("--rate", type=float, help="submits per second; the ceiling when adapting (default 2)")
    g.add_argument("--rate-min", type=float, help="the floor adaptation never goes below (default 0.05)")
    g.add_argument(
        "--no-adapt",
        dest="adapt",
        action="store_const",
        const=False,
        help="keep the rate fixed instead of slowing down on 429 and speeding up again",
    )
    g.add_argument(
        "--max-in-flight",
        type=_in_flight_argument,
        metavar="N|auto",
        help="predictions submitted and not yet finished (default auto: rate x p90 latency seen x 1.4)",
    )
    g.add_argument("--timeout", type=float, help="seconds one prediction may take (default 600)")
    g.add_argument(
        "--poll-after",
        type=float,
        help="seconds from submit to the first poll (default: learned, from the model's prior)",
    )
    g.add_argument("--poll-interval", type=float, help="seconds between later polls, at first (default 3)")
    g.add_argument("--poll-interval-max", type=float, help="the cap later polls slow to (default 15)")
    g.add_argument(
        "--poll-rate",
        type=float,
        help="polls per second, a budget apart from submits (default 10, or 2 x --rate when higher)",
    )

    g = p.add_argument_group("safety (override the manifest's settings)")
    g.add_argument("--max-submits", type=int, help="stop submitting after N paid submits in this run")
    g.add_argument(
        "--no-resubmit-ambiguous",
        dest="resubmit_ambiguous",
        action="store_const",
        const=False,
        help="fail (kind ambiguous_submit) a submit whose answer was lost instead of resending it",
    )
    g.add_argument("--grace", type=float, help="seconds to keep polling after Ctrl-C/SIGTERM (default 30)")

    g = p.add_argument_group("what it prints")
    g.add_argument("-v", "--verbose", action="store_true", help="debug logging of requests and state changes")
    g.add_argument("-q", "--quiet", action="store_true", help="print only the final summary")
    g.add_argument("--json-logs", action="store_true", help="every line a JSON object, for log collectors")
    g.add_argument(
        "--log-every",
        type=float,
        default=10.0,
        metavar="S",
        help="seconds between progress lines when not on a terminal (default 10)",
    )
    g.add_argument(
        "--progress",
        choices=("auto", "rich", "plain"),
        default="auto",
        help="progress display: a live bar on a terminal (auto), or plain lines",
    )


def cmd_validate(args: argparse.Namespace) -> int:
    manifest = load_manifest(args.manifest)
    for warning in manifest.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    for note in manifest.notes:
        print(f"note: {note}", file=sys.stderr)
    print(
        f"{args.manifest}: valid, {manifest.count} item(s), model {manifest.model}, task {manifest.task}"
    )
    return EXIT_OK


def cmd_schema(args: argparse.Namespace) -> int:
    print(json.dumps(manifest_schema(), indent=2))
    return EXIT_OK


def _local_target(args: argparse.Namespace) -> bool:
    """``status``/``report`` named an out dir holding a journal of its own, and no --journal: the exported
    $BATCH_ENGINE_JOURNAL is for runs, not for reading that out dir."""
    target = args.target
    return not args.journal and target is not None and (Path(target) / JOURNAL_NAME).is_file()


def cmd_status(args: argparse.Namespace) -> int:
    url = None if _local_target(args) else _journal_url(args)
    if url is not None:
        return _shared_status(url, args.target, as_json=args.json)
    if args.target is None:
        raise UsageError("name the out dir (or --journal URL and a run's name)")
    if is_store_url(args.target):
        raise UsageError(
            f"{args.target} holds no journal: name the run's work dir (--work-dir; default "
            f"{default_work_dir('NAME')}), or --journal URL and the run's name"
        )
    args.out_dir = Path(args.target)
    _journal_dir(args.out_dir, "no run has used it yet")
    try:
        counts, meta = anyio.run(_read_status, args.out_dir)
    except JournalError:  # SQLite writes beside its file even to read it: a read-only out dir says why
        _check_writable(args.out_dir, f"{args.out_dir}: the journal cannot be opened", copy_hint="status")
        raise
    if args.json:
        print(json.dumps({"name": meta.name if meta else None, "counts": counts}))
    else:
        print(f"{meta.name if meta else args.out_dir}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return EXIT_OK


async def _read_status(out_dir: Path) -> tuple[dict[str, int], Any]:
    async with await open_journal(out_dir) as journal:
        return _counts(journal), journal.meta()


def _counts(journal: Journal) -> dict[str, int]:
    shown = journal.counts().items()  # a damaged row is counted (and named by run), never dropped
    counts = {s.value: n for s, n in shown if n or s is not ItemState.DAMAGED}
    counts["total"] = sum(counts.values())
    return counts


def _shared_status(url: str, run: str | None, *, as_json: bool) -> int:
    if run is None:
        names = run_names(url)
        if as_json:
            print(json.dumps({"runs": names}))
        else:
            print(f"{public_dsn(url)}: " + (", ".join(names) if names else "no runs yet"))
        return EXIT_OK
    counts, workers = anyio.run(_read_shared_status, url, run)
    if as_json:
        alive = [{"host": w.host, "pid": w.pid, "alive_for": round(w.alive_for, 1)} for w in workers]
        print(json.dumps({"name": run, "counts": counts, "workers": alive}))
        return EXIT_OK
    print(f"{run}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    shown = ", ".join(f"{w.host} pid {w.pid}" for w in workers)
    print(f"workers alive: {len(workers)}" + (f" ({shown})" if workers else ""))
    return EXIT_OK


async def _read_shared_status(url: str, run: str) -> tuple[dict[str, int], list[Worker]]:
    journal = await PostgresJournal.open(url, run, out_dir=Path("."), create=False)
    async with journal:
        return _counts(journal), journal.live_workers()


def cmd_report(args: argparse.Namespace) -> int:
    url = None if _local_target(args) else _journal_url(args)
    if url is not None:
        return _shared_report(url, args.target, args.out, args.work_dir)
    if args.out is not None and not isinstance(args.out, str):
        raise UsageError(
            "--out DIR goes with --journal; without it the reports go into the out dir named (or to the "
            "object store given as --out s3://...)"
        )
    if args.work_dir is not None:
        raise UsageError("--work-dir goes with --journal: without it, the folder named is the work dir")
    args.out_dir = Path(args.target)
    _journal_dir(args.out_dir, "nothing to report")
    _check_writable(args.out_dir, f"{args.out_dir}: the reports cannot be written there", copy_hint="report")
    with OutDirLock(args.out_dir):  # a running run rewrites these files itself: never race it
        paths, thumbs = anyio.run(partial(_rebuild_reports, args.out_dir, store_url=args.out))
    _print_rebuilt(paths, thumbs)
    return EXIT_OK


def _print_rebuilt(paths: dict[str, Path | str], thumbs: int | None) -> None:
    for name, path in paths.items():
        print(f"{name}: {path}")
    if thumbs is None:
        print(
            "thumbnails: none made here (the outputs are in the object store, not on this machine); "
            "the page opens the full picture where one is missing"
        )
    elif thumbs:
        print(f"thumbnails made: {thumbs}")


def _shared_report(url: str, run: str, out: Path | str | None, work_dir: Path | None) -> int:
    paths, thumbs = anyio.run(_rebuild_shared_reports, url, run, out, work_dir)
    _print_rebuilt(paths, thumbs)
    return EXIT_OK


async def _rebuild_shared_reports(
    url: str, run: str, out: Path | str | None, work_dir: Path | None
) -> tuple[dict[str, Path | str], int | None]:
    probe = await PostgresJournal.open(url, run, out_dir=Path("."), create=False)
    async with probe:
        meta, workers = probe.meta(), probe.live_workers()
    if workers:
        raise UsageError(
            f"run {run!r} is still being worked by {len(workers)} worker(s); the last to finish writes the "
            "reports (run this once they have)"
        )
    recorded = meta.out if meta is not None and meta.out else None
    out = out or (recorded if recorded is None or is_store_url(recorded) else Path(recorded))
    if out is None:
        raise UsageError(f"run {run!r} has no out dir recorded yet: name one with --out")
    out_dir, store_url = _out_and_work_dir(out, work_dir, run)
    if store_url is None:
        _journal_target(out_dir)
    else:
        out_dir.mkdir(parents=True, exist_ok=True)
    _check_writable(out_dir, f"{out_dir}: the reports cannot be written there")
    reopen = partial(PostgresJournal.open, url, run, out_dir=out_dir, create=False)
    return await _rebuild_reports(out_dir, reopen, store_url=store_url)


def _journal_target(out_dir: Path) -> None:
    if not out_dir.is_dir():
        raise UsageError(f"{out_dir} is not a folder: the run's out dir (its images) must be there to report")


async def _rebuild_reports(
    out_dir: Path,
    opener: Callable[[], Awaitable[Journal]] | None = None,
    *,
    store_url: str | None = None,
) -> tuple[dict[str, Path | str], int | None]:
    """Write the reports from the journal, after the thumbnails the page lacks; and how many were made.

    Into an object store (``store_url``, else the one the run recorded, if any): written in ``out_dir``,
    then uploaded; no thumbnail is made (the outputs are not here), and None says so."""
    journal = await (opener() if opener is not None else open_journal(out_dir))
    async with journal:
        meta = journal.meta()
        if meta is None:
            raise UsageError(f"{out_dir}'s journal has no run recorded yet")
        store_url = store_url or (meta.out if is_store_url(meta.out or "") else None)
        if store_url is not None:
            store = OutStore(store_url)
            listed = await page_listings(store, out_dir)
            not_copied = dict(meta.inputs_not_copied)
            files = page_files(out_dir, journal.records(), not_copied, listing=listed.__getitem__)
            written = write_reports(out_dir, meta, journal.records, files=files)
            return dict(await store.put_reports(out_dir, written)), None
        copies = local_inputs(out_dir, distinct_inputs(journal.records())).values()
        jobs = list(thumb_jobs(journal.records({ItemState.SUCCEEDED}), copies))
        made = await anyio.to_thread.run_sync(make_thumbs, out_dir, jobs)
        files = page_files(out_dir, journal.records(), dict(meta.inputs_not_copied))
        return dict(write_reports(out_dir, meta, journal.records, files=files)), made


def _journal_dir(out_dir: Path, none_yet: str) -> None:
    """UsageError unless ``out_dir`` is a folder holding a journal."""
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"{out_dir} is a file, not an out dir (the folder a run writes into)")
    if not (out_dir / JOURNAL_NAME).is_file():
        raise UsageError(f"{out_dir} has no journal ({JOURNAL_NAME}): {none_yet}")


def _usable_out_dir(out_dir: Path, option: str = "--out") -> None:
    """Make the out dir when it is missing and check it takes files; UsageError saying why it cannot."""
    flag = f"{option} {out_dir}"
    blocker = next((p for p in (out_dir, *out_dir.parents) if p.exists() and not p.is_dir()), None)
    if blocker == out_dir:
        raise UsageError(f"{flag}: is a file, not a folder; name a folder (it is made when missing)")
    if blocker is not None:
        raise UsageError(f"{flag}: {blocker} is a file, so no folder can be made under it")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"{flag}: the folder cannot be made: {_reason(exc)}") from exc
    _check_writable(out_dir, f"{flag}: nothing can be written there")


def _check_writable(folder: Path, what: str, *, copy_hint: str = "") -> None:
    """UsageError(``what: reason``) unless a file can be made in ``folder`` (a nameless one, gone at once);
    ``copy_hint`` names the command to run on a writable copy when the folder is read-only."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        hint = ""
        if copy_hint and exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            hint = f"; copy the out dir somewhere writable and run 'batch-engine {copy_hint} COPY'"
        raise UsageError(f"{what}: {_reason(exc)}{hint}") from exc


def cmd_simulate(args: argparse.Namespace) -> int:
    from batch_engine.sim import SimConfig, serve

    setup_logging(verbose=False, json_lines=False, stream=sys.stderr)
    config = SimConfig(
        seed=args.seed, api_key=args.key, inference_median=args.inference, submit_rate=args.submit_rate
    )
    try:
        with contextlib.suppress(KeyboardInterrupt):
            anyio.run(serve, config, args.host, args.port, args.advertise)
    except OSError as exc:  # the address is taken, not this machine's, or not an address at all
        raise UsageError(f"cannot listen on {args.host}:{args.port}: {_reason(exc)}") from exc
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    started = time.monotonic()
    manifest = load_manifest(args.manifest)
    checked = time.monotonic() - started
    out_dir, args.out_url = _out_and_work_dir(args.out, args.work_dir, manifest.name)
    shown = args.out_url or out_dir  #: the out as the user named it
    settings = _settings(manifest, args)
    args.journal_url = _journal_url(args)
    if args.journal_url is not None and not 1.0 <= args.lease <= 3600:
        raise UsageError(f"--lease must be from 1 to 3600 seconds, not {args.lease:g}")
    secret = "" if args.simulate or args.dry_run else _api_key()  # a dry run sends nothing
    found = (secret, journal_password(args.journal_url or ""), *_aws_secrets())
    secrets = [value for value in found if value]
    setup_logging(
        verbose=args.verbose,
        json_lines=args.json_logs,
        stream=sys.stderr,
        secrets=secrets,
        quiet=args.quiet,
    )
    log.info("manifest %s: %d item(s), checked in %.1f s", manifest.path, manifest.count, checked)
    for warning in manifest.warnings:
        log.warning("%s", warning)
    if args.dry_run:
        return _dry_run(manifest, out_dir, settings, args)
    _usable_out_dir(out_dir, "--work-dir" if args.out_url else "--out")
    shared = args.journal_url is not None
    if args.fresh and not _confirm_fresh(out_dir, args.yes, shared=shared, shown=args.out_url):
        print("not starting over; nothing changed", file=sys.stderr)
        return EXIT_USAGE
    stream = sys.stderr
    mode = "quiet" if args.quiet else "json" if args.json_logs else args.progress
    view = make_view(mode=mode, stream=stream, log_every=args.log_every)
    try:
        result: RunResult = anyio.run(_run, manifest, out_dir, settings, args, secret, view)
    except KeyboardInterrupt:  # Ctrl-C once more while the reports were being written
        print(
            f"batch-engine: stopped before the reports were written; the journal holds every result: "
            f"'batch-engine report {out_dir}' writes them",
            file=sys.stderr,
        )
        return EXIT_STOPPED
    stats = dataclasses.replace(result.stats, elapsed=time.time() - args.started)  # the process's time
    _print_summary(stats, result.report_paths, shown, json_lines=args.json_logs)
    return result.exit_code


def _aws_secrets() -> list[str]:
    """The AWS secrets in the environment: never logged anyway (obstore reads them itself), and redacted
    from every line should one ever be quoted."""
    return [os.environ.get(name, "").strip() for name in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")]


async def _run(
    manifest: Manifest,
    out_dir: Path,
    settings: RunSettings,
    args: argparse.Namespace,
    secret: str,
    view: ProgressView,
) -> RunResult:
    async with AsyncExitStack() as stack:
        input_source: Callable[[str], str] = str
        if args.simulate:
            from batch_engine.sim import Simulator

            sim = await stack.enter_async_context(Simulator(simulate_config(args.sim_seed)))
            base_url, secret = sim.base_url, SIMULATOR_KEY
            input_source = partial(_simulated_input, sim)
        else:
            base_url = args.base_url or os.environ.get(BASE_URL_ENV) or DEFAULT_BASE_URL
        client = ClientConfig(
            base_url=base_url,
            api_key=secret,
            bearer=not args.raw_auth,
            submit_timeout=_submit_timeout(manifest, settings),
        )
        options = RunOptions(
            out_dir=out_dir,
            settings=settings,
            client=client,
            fresh=args.fresh,
            retry_failed=args.retry_failed,
            take_over=args.take_over,
            handle_signals=True,
            input_source=input_source,
            started_at=args.started,
            journal_url=args.journal_url,
            lease=args.lease,
            out_url=args.out_url,
        )
        return await run_manifest(manifest, options, view=view)


def simulate_config(seed: int) -> SimConfig:
    """What --simulate runs against: edits of about a second, a few failed predictions, a strict key."""
    from batch_engine.sim import SimConfig

    return SimConfig(
        seed=seed, api_key=SIMULATOR_KEY, inference_median=1.0, inference_spread=0.4, p_failed=0.03
    )


def _simulated_input(sim: Simulator, url: str) -> str:
    """Under --simulate there is no network: the simulator draws a stand-in for each input image."""
    return sim.input_url(PurePosixPath(urlsplit(url).path).stem or "input")


def _submit_timeout(manifest: Manifest, settings: RunSettings) -> float:
    """Sync mode holds the submit open until the edit is done: give it the prediction's whole timeout."""
    return max(120.0, settings.timeout) if manifest.sync_mode else 120.0


def _settings(manifest: Manifest, args: argparse.Namespace) -> RunSettings:
    names = RunSettings.field_names()
    overrides = {name: getattr(args, name, None) for name in names}
    # settings.inputs is the manifest's route for local files (Manifest.inputs), not a knob of the run
    base = {key: value for key, value in manifest.settings.items() if key != "inputs"}
    if args.simulate:  # the simulator answers in a fraction of a second: poll it that fast too
        base = {**SIMULATE_POLL, **base}
    return RunSettings.build(base, overrides)


def _api_key() -> str:
    key = os.environ.get(KEY_ENV, "").strip()
    if not key:
        raise UsageError(
            f"{KEY_ENV} is not set: export your API key, or add --simulate to rehearse the "
            "manifest against the built-in simulator"
        )
    return key


def _confirm_fresh(out_dir: Path, yes: bool, *, shared: bool = False, shown: str | None = None) -> bool:
    """Whether to go on with --fresh; ``shown``: an object store's URL, whose outputs it deletes too."""
    if yes or not (shared or shown or (out_dir / JOURNAL_NAME).exists()):
        return True
    where = f"{out_dir} and {shown}" if shown else str(out_dir)
    if not sys.stdin.isatty():
        raise UsageError(
            f"--fresh would forget every result in {where}; add --yes to confirm when not on a terminal"
        )
    answer = input(f"Forget every result and output in {where} and start over? [y/N] ")
    return answer.strip().lower() in ("y", "yes")


def _dry_run(manifest: Manifest, out_dir: Path, settings: RunSettings, args: argparse.Namespace) -> int:
    use_journal = (args.journal_url is not None or (out_dir / JOURNAL_NAME).exists()) and not args.fresh
    counts = anyio.run(_plan, manifest, out_dir if use_journal else None, settings, args)
    where = {"out_dir": args.out_url, "work_dir": str(out_dir)} if args.out_url else {"out_dir": str(out_dir)}
    if args.json_logs:
        print(json.dumps({"event": "dry_run", **where, **counts}))
    else:
        shown = f"{args.out_url} (work dir {out_dir})" if args.out_url else out_dir
        print(f"dry run of {manifest.path} into {shown} (nothing sent):")
        for key, value in counts.items():
            print(f"  {key.replace('_', ' ')}: {value}")
    return EXIT_OK


async def _plan(
    manifest: Manifest, out_dir: Path | None, settings: RunSettings, args: argparse.Namespace
) -> dict[str, Any]:
    options = {"retry_failed": args.retry_failed, "resubmit_ambiguous": settings.resubmit_ambiguous}
    if out_dir is None:
        return plan_counts(manifest, None, **options)
    url = args.journal_url
    if url is not None:
        if manifest.name not in await anyio.to_thread.run_sync(run_names, url):
            return plan_counts(manifest, None, **options)
        shared = await PostgresJournal.open(url, manifest.name, out_dir=out_dir, create=False)
        async with shared:
            return plan_counts(manifest, shared, **options)
    async with await open_journal(out_dir) as journal:
        return plan_counts(manifest, journal, **options)


def _print_summary(
    stats: RunStats, paths: dict[str, Path | str], out_dir: Path | str, *, json_lines: bool
) -> None:
    out: TextIO = sys.stdout
    if json_lines:
        out.write(summary_json(stats, report_paths=paths) + "\n")
    else:
        out.write(format_summary(stats, report_paths=paths, out_dir=out_dir) + "\n")


if __name__ == "__main__":
    sys.exit(main())
