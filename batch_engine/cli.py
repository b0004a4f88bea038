"""The command line: validate, run, status, report, schema and simulate; exit codes a scheduler understands.

Exit codes: 0 every item succeeded; 1 the run finished with failed items; 2 invalid manifest or usage;
3 the run stopped early (401, 403, interrupted, budget, disk) and can be resumed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from contextlib import AsyncExitStack
from functools import partial
from pathlib import Path, PurePosixPath
from typing import Any, TextIO
from urllib.parse import urlsplit

import anyio

from batch_engine import __version__
from batch_engine.api.client import ClientConfig
from batch_engine.engine import RunOptions, RunResult, plan_counts, run_manifest
from batch_engine.errors import BatchEngineError, ManifestError, UsageError
from batch_engine.manifest import load_manifest
from batch_engine.manifest.schema import manifest_schema
from batch_engine.report.input_copies import distinct_inputs, local_inputs
from batch_engine.report.write import write_reports
from batch_engine.settings import DEFAULT_BASE_URL, RunSettings
from batch_engine.sim import SimConfig, Simulator, serve
from batch_engine.store import open_journal
from batch_engine.store.files import JOURNAL_NAME
from batch_engine.store.lock import OutDirLock
from batch_engine.ui.logs import setup_logging
from batch_engine.ui.progress import ProgressView, make_view
from batch_engine.ui.summary import format_summary, summary_json
from batch_engine.values import ItemState, Manifest, RunStats

log = logging.getLogger(__name__)

EXIT_OK, EXIT_FAILED_ITEMS, EXIT_USAGE, EXIT_STOPPED = 0, 1, 2, 3
KEY_ENV = "GPTPROTO_API_KEY"
BASE_URL_ENV = "GPTPROTO_BASE_URL"
SIMULATOR_KEY = "sim-key"  #: the key --simulate uses against its own in-process simulator
#: Poll timing for --simulate, whose predictions take a fraction of a second (real ones take 20 s or more).
SIMULATE_POLL = {"poll_after": 0.3, "poll_interval": 0.2, "poll_interval_max": 1.0}

RUN_HELP = "Run a manifest (or resume it: the journal in the out dir remembers every item)."
#: Every help text ends with how a run is configured, as the engine issue asks of each of them.
CONFIG_HELP = """\
Configuring a run (every flag in 'batch-engine run --help'):
  GPTPROTO_API_KEY   the API key (required unless --simulate); never printed or written anywhere
  GPTPROTO_BASE_URL  the API origin (default https://gptproto.com); --base-url overrides it
  --out DIR, --base-url URL, --rate N, --max-in-flight N, --timeout S, --poll-after S,
  --poll-interval S, -v/--verbose, --simulate (the built-in simulator: no key, no network)

Exit codes: 0 all items succeeded, 1 some failed, 2 invalid manifest or usage,
3 stopped early (resumable).
"""


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.func(args)
        return code
    except ManifestError as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_USAGE
    except BatchEngineError as exc:
        print(f"batch-engine: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_STOPPED


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

    p = _command(sub, "validate", help="check a manifest and list every problem; sends nothing")
    p.add_argument("manifest", help="path to the YAML manifest")
    p.set_defaults(func=cmd_validate)

    p = _command(sub, "run", help="run or resume a manifest", description=RUN_HELP)
    p.add_argument("manifest", help="path to the YAML manifest")
    _run_arguments(p)
    p.set_defaults(func=cmd_run)

    p = _command(sub, "status", help="counts by state from an out dir's journal; no network")
    p.add_argument("out_dir", type=Path)
    p.add_argument("--json", action="store_true", help="print the counts as JSON")
    p.set_defaults(func=cmd_status)

    p = _command(sub, "report", help="rebuild report.yaml, results.jsonl, failures.yaml, index.html")
    p.add_argument("out_dir", type=Path)
    p.set_defaults(func=cmd_report)

    p = _command(sub, "schema", help="print the manifest's JSON Schema")
    p.set_defaults(func=cmd_schema)

    p = _command(sub, "simulate", help="serve the built-in API simulator for rehearsals")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--key", help="the key the simulator accepts (default: any non-empty key)")
    p.add_argument("--inference", type=float, default=2.0, metavar="S", help="median inference seconds")
    p.add_argument("--submit-rate", type=float, metavar="R", help="submits/s the simulated key allows")
    p.set_defaults(func=cmd_simulate)
    return parser


def _command(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], name: str, **kwargs: Any
) -> argparse.ArgumentParser:
    """A subcommand whose help ends, like every help text here, with how a run is configured."""
    return sub.add_parser(
        name, epilog=CONFIG_HELP, formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs
    )


def _run_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("where")
    g.add_argument("--out", type=Path, help="out dir (default out/<manifest name>)")
    g.add_argument("--base-url", help=f"API origin (default ${BASE_URL_ENV} or {DEFAULT_BASE_URL})")
    g.add_argument(
        "--simulate",
        action="store_true",
        help="run against the built-in simulator in this process: no key, no network",
    )
    g.add_argument("--sim-seed", type=int, default=0, help="seed of the --simulate simulator (default 0)")
    g.add_argument(
        "--raw-auth",
        action="store_true",
        help="send the key as the raw Authorization value instead of 'Bearer <key>'",
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
        "--max-in-flight", type=int, help="predictions submitted and not yet finished (default 50)"
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

    g = p.add_argument_group("safety and resume")
    g.add_argument("--max-submits", type=int, help="stop submitting after N paid submits in this run")
    g.add_argument(
        "--no-resubmit-ambiguous",
        dest="resubmit_ambiguous",
        action="store_const",
        const=False,
        help="fail (kind ambiguous_submit) a submit whose answer was lost instead of resending it",
    )
    g.add_argument("--grace", type=float, help="seconds to keep polling after Ctrl-C/SIGTERM (default 30)")
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

    g = p.add_argument_group("output")
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


def cmd_status(args: argparse.Namespace) -> int:
    journal_path = args.out_dir / JOURNAL_NAME
    if not journal_path.exists():
        raise UsageError(f"{args.out_dir} has no journal ({JOURNAL_NAME}): no run has used it yet")
    counts, meta = anyio.run(_read_status, args.out_dir)
    if args.json:
        print(json.dumps({"name": meta.name if meta else None, "counts": counts}))
    else:
        print(f"{meta.name if meta else args.out_dir}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return EXIT_OK


async def _read_status(out_dir: Path) -> tuple[dict[str, int], Any]:
    async with await open_journal(out_dir) as journal:
        shown = journal.counts().items()  # a damaged row is counted (and named by run), never dropped
        counts = {s.value: n for s, n in shown if n or s is not ItemState.DAMAGED}
        counts["total"] = sum(counts.values())
        return counts, journal.meta()


def cmd_report(args: argparse.Namespace) -> int:
    if not (args.out_dir / JOURNAL_NAME).exists():
        raise UsageError(f"{args.out_dir} has no journal ({JOURNAL_NAME}): nothing to report")
    with OutDirLock(args.out_dir):  # a running run rewrites these files itself: never race it
        paths = anyio.run(_rebuild_reports, args.out_dir)
    for name, path in paths.items():
        print(f"{name}: {path}")
    return EXIT_OK


async def _rebuild_reports(out_dir: Path) -> dict[str, Path]:
    async with await open_journal(out_dir) as journal:
        meta = journal.meta()
        if meta is None:
            raise UsageError(f"{out_dir}'s journal has no run recorded yet")
        inputs = local_inputs(out_dir, distinct_inputs(journal.records()))
        return write_reports(out_dir, meta, journal.records, inputs=inputs)


def cmd_simulate(args: argparse.Namespace) -> int:
    setup_logging(verbose=False, json_lines=False, stream=sys.stderr)
    config = SimConfig(
        seed=args.seed, api_key=args.key, inference_median=args.inference, submit_rate=args.submit_rate
    )
    with contextlib.suppress(KeyboardInterrupt):
        anyio.run(serve, config, args.host, args.port)
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    manifest = load_manifest(args.manifest)
    out_dir: Path = args.out or Path("out") / manifest.name
    settings = _settings(manifest, args)
    secret = "" if args.simulate or args.dry_run else _api_key()  # a dry run sends nothing
    setup_logging(
        verbose=args.verbose,
        json_lines=args.json_logs,
        stream=sys.stderr,
        secrets=[secret] if secret else [],
        quiet=args.quiet,
    )
    for warning in manifest.warnings:
        log.warning("%s", warning)
    if args.dry_run:
        return _dry_run(manifest, out_dir, settings, args)
    if args.fresh and not _confirm_fresh(out_dir, args.yes):
        print("not starting over; nothing changed", file=sys.stderr)
        return EXIT_USAGE
    stream = sys.stderr
    mode = "quiet" if args.quiet else "json" if args.json_logs else args.progress
    view = make_view(mode=mode, stream=stream, log_every=args.log_every)
    result: RunResult = anyio.run(_run, manifest, out_dir, settings, args, secret, view)
    _print_summary(result.stats, result.report_paths, out_dir, json_lines=args.json_logs)
    return result.exit_code


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
        )
        return await run_manifest(manifest, options, view=view)


def simulate_config(seed: int) -> SimConfig:
    """What --simulate runs against: edits of about a second, a few failed predictions, a strict key."""
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


def _confirm_fresh(out_dir: Path, yes: bool) -> bool:
    if yes or not (out_dir / JOURNAL_NAME).exists():
        return True
    if not sys.stdin.isatty():
        raise UsageError(
            f"--fresh would forget every result in {out_dir}; add --yes to confirm when not on a terminal"
        )
    answer = input(f"Forget every result and output in {out_dir} and start over? [y/N] ")
    return answer.strip().lower() in ("y", "yes")


def _dry_run(manifest: Manifest, out_dir: Path, settings: RunSettings, args: argparse.Namespace) -> int:
    use_journal = (out_dir / JOURNAL_NAME).exists() and not args.fresh
    counts = anyio.run(_plan, manifest, out_dir if use_journal else None, settings, args)
    if args.json_logs:
        print(json.dumps({"event": "dry_run", "out_dir": str(out_dir), **counts}))
    else:
        print(f"dry run of {manifest.path} into {out_dir} (nothing sent):")
        for key, value in counts.items():
            print(f"  {key.replace('_', ' ')}: {value}")
    return EXIT_OK


async def _plan(
    manifest: Manifest, out_dir: Path | None, settings: RunSettings, args: argparse.Namespace
) -> dict[str, Any]:
    options = {"retry_failed": args.retry_failed, "resubmit_ambiguous": settings.resubmit_ambiguous}
    if out_dir is None:
        return plan_counts(manifest, None, **options)
    async with await open_journal(out_dir) as journal:
        return plan_counts(manifest, journal, **options)


def _print_summary(stats: RunStats, paths: dict[str, Path], out_dir: Path, *, json_lines: bool) -> None:
    out: TextIO = sys.stdout
    if json_lines:
        out.write(summary_json(stats, report_paths=paths) + "\n")
    else:
        out.write(format_summary(stats, report_paths=paths, out_dir=out_dir) + "\n")


if __name__ == "__main__":
    sys.exit(main())
