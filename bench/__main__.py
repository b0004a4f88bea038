"""``python -m bench``: run the four figures, print the table, write ``bench/results.json``."""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from bench import in_flight, overhead, pacing, polling, scale, sources, workers
from bench.common import Figure, Row

RESULTS = Path(__file__).parent / "results.json"
FIGURES = ("overhead", "pacing", "polling", "in_flight", "scale", "sources", "workers")


@dataclass(frozen=True)
class Sizes:
    """How big each figure's runs are; ``--quick`` picks the small set."""

    items: int  #: overhead: items per run
    repeat: int  #: overhead: runs of each client, best one compared
    fixed_submits: int  #: pacing (a)
    adaptive_submits: int  #: pacing (b)
    poll_items: int  #: polling
    scale_sizes: tuple[int, ...]  #: scale: manifest sizes
    scale_submits: int  #: scale: predictions submitted per size
    source_sizes: tuple[int, ...]  #: sources: items in the CSV and JSONL files
    worker_items: int  #: workers (a): items of each run
    paced_items: int  #: workers (b) and (c): items of each run against the limited key


FULL = Sizes(2000, 3, 300, 250, 300, (10_000, 100_000), 10_000, (100_000, 1_000_000), 2000, 400)
QUICK = Sizes(500, 1, 100, 300, 100, (2_000, 20_000), 2_000, (10_000, 50_000), 400, 200)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.ERROR, format="%(name)s: %(message)s")
    sizes = _sizes(args)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        figures = [_measure(name, args, sizes, Path(tmp)) for name in args.only]
    elapsed = time.perf_counter() - started
    rows = [row for figure in figures for row in figure.rows]
    print(format_table(rows))
    print(f"\n{len(rows)} rows in {elapsed:.0f} s; results in {_shown(args.out)}")
    _write_results(args, sizes, figures, rows, elapsed)
    failed = any(row.passed is False for row in rows)
    return 1 if failed and args.strict else 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--quick", action="store_true", help="small sizes: a check that everything runs (~1 min)")
    p.add_argument("--only", type=_figure_list, default=list(FIGURES), help=f"comma list of {FIGURES}")
    p.add_argument("--items", type=int, help="overhead: items per run (default 2000; quick 500)")
    p.add_argument("--repeat", type=int, help="overhead: runs of each client (default 3; quick 1)")
    p.add_argument("--concurrency", type=int, default=50, help="overhead: predictions in flight (50)")
    p.add_argument("--rate", type=float, default=20.0, help="pacing: the simulated key's limit R (20/s)")
    p.add_argument("--poll-items", type=int, help="polling: items (default 300; quick 100)")
    p.add_argument(
        "--scale-sizes", type=_int_list, help="scale: comma list of item counts (default 10000,100000)"
    )
    p.add_argument("--scale-submits", type=int, help="scale: predictions per size (default 10000)")
    p.add_argument(
        "--source-sizes", type=_int_list, help="sources: CSV/JSONL item counts (default 100000,1000000)"
    )
    p.add_argument("--out", type=Path, default=RESULTS, help=f"results file (default {_shown(RESULTS)})")
    p.add_argument("--strict", action="store_true", help="exit 1 when any figure misses its target")
    return p


def _figure_list(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = sorted(set(names) - set(FIGURES))
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown figure(s) {', '.join(unknown)}; choose from {FIGURES}")
    return names


def _int_list(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(","))


def _sizes(args: argparse.Namespace) -> Sizes:
    base = QUICK if args.quick else FULL
    return Sizes(
        items=args.items or base.items,
        repeat=args.repeat or base.repeat,
        fixed_submits=base.fixed_submits,
        adaptive_submits=base.adaptive_submits,
        poll_items=args.poll_items or base.poll_items,
        scale_sizes=args.scale_sizes or base.scale_sizes,
        scale_submits=args.scale_submits or base.scale_submits,
        source_sizes=args.source_sizes or base.source_sizes,
        worker_items=base.worker_items,
        paced_items=base.paced_items,
    )


def _measure(name: str, args: argparse.Namespace, sizes: Sizes, work: Path) -> Figure:
    runners: dict[str, Callable[[], Figure]] = {
        "overhead": lambda: overhead.measure(
            items=sizes.items, concurrency=args.concurrency, repeat=sizes.repeat, work=work
        ),
        "pacing": lambda: pacing.measure(
            rate=args.rate, fixed_items=sizes.fixed_submits, adaptive_items=sizes.adaptive_submits
        ),
        "polling": lambda: polling.measure(items=sizes.poll_items),
        "in_flight": lambda: in_flight.measure(runs=2),
        "scale": lambda: scale.measure(sizes=list(sizes.scale_sizes), submits=sizes.scale_submits, work=work),
        "sources": lambda: sources.measure(sizes=list(sizes.source_sizes), work=work),
        "workers": lambda: workers.measure(
            items=sizes.worker_items,
            paced_items=sizes.paced_items,
            rate=args.rate,
            repeat=sizes.repeat,
            work=work,
        ),
    }
    print(f"bench: {name}...", file=sys.stderr, flush=True)
    started = time.perf_counter()
    figure = runners[name]()
    figure.data["seconds"] = time.perf_counter() - started
    return figure


def format_table(rows: Sequence[Row]) -> str:
    """The rows as an aligned text table: figure, value, target, pass/FAIL."""
    header = Row("figure", "value", "target")
    widths = [max(len(getattr(row, col)) for row in (header, *rows)) for col in ("figure", "value", "target")]
    lines = []
    for row in (header, *rows):
        cells = (row.figure, row.value, row.target)
        text = "  ".join(cell.ljust(width) for cell, width in zip(cells, widths, strict=True))
        lines.append(f"{text}  {'result' if row is header else row.verdict}".rstrip())
    lines.insert(1, "-" * len(max(lines, key=len)))
    return "\n".join(lines)


def _write_results(
    args: argparse.Namespace, sizes: Sizes, figures: list[Figure], rows: list[Row], elapsed: float
) -> None:
    results = {
        "command": " ".join(["python -m bench", *sys.argv[1:]]),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds": elapsed,
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "system": platform.platform(),
        },
        "sizes": asdict(sizes),
        "passed": not any(row.passed is False for row in rows),
        "table": [asdict(row) | {"result": row.verdict} for row in rows],
        "figures": {figure.name: figure.data for figure in figures},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")


def _shown(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


if __name__ == "__main__":
    sys.exit(main())
