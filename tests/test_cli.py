"""The command line: validate, run, status, report, schema, dry runs, exit codes, help, a key kept secret.

Commands that only parse and print run in-process through ``cli.main``; anything that runs the engine runs
as a subprocess, as a user or a scheduler would start it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from batch_engine.cli import main
from batch_engine.sim import SimConfig, Simulator
from batch_engine.store.lock import OutDirLock
from tests.procs import engine_env, items, run_args, run_engine, write_manifest

EXIT_OK, EXIT_FAILED_ITEMS, EXIT_USAGE = 0, 1, 2
JOBS = Path(__file__).resolve().parents[1] / "jobs"
REPORT_NAMES = ("report.yaml", "results.jsonl", "failures.yaml", "index.html")
#: Everything the engine issue's "Configuration" section names; every help text must mention each.
CONFIGURATION = (
    "GPTPROTO_API_KEY",
    "GPTPROTO_BASE_URL",
    "--base-url",
    "--rate",
    "--max-in-flight",
    "--out",
    "--timeout",
    "--poll-after",
    "--poll-interval",
    "-v",
    "--verbose",
    "--simulate",
)
COMMANDS = ("validate", "run", "status", "report", "schema", "simulate")
#: A key distinctive enough that finding it anywhere means it leaked.
SECRET = "sk-cli-test-Zq8Wm3Vr7Tn2Kp5Yx9"

BAD_MANIFEST = """\
version: 1
items:
  - id: a
    prompt: hello
    images: [https://example.com/a.png]
    size: 1000x1000
  - id: a
    promt: hello
    images: [https://example.com/b.png]
  - id: c
    prompt: 5
    images: [https://example.com/c.png]
    n: two
"""


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """Run ``batch-engine ARGV`` in-process: exit code, stdout, stderr (``--help`` ends in SystemExit)."""
    try:
        code = main(list(argv))
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def demo_items(*ids: str) -> list[dict[str, Any]]:
    """Items of jobs/demo.yaml, as written there."""
    demo = yaml.safe_load((JOBS / "demo.yaml").read_text(encoding="utf-8"))
    chosen: list[dict[str, Any]] = [item for item in demo["items"] if item["id"] in ids]
    return chosen


# -- validate, schema, help: in-process ---------------------------------------------------------------------


def test_validate_a_valid_manifest_exits_0_and_counts_its_items(capsys: pytest.CaptureFixture[str]) -> None:
    """`validate` of a valid manifest exits 0 and says how many items it holds."""
    code, out, _ = cli(capsys, "validate", str(JOBS / "demo.yaml"))

    assert code == EXIT_OK
    assert "valid, 40 item(s)" in out


def test_validate_lists_every_problem_with_file_item_and_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`validate` of an invalid manifest exits 2 and lists every problem, each naming file, item and field."""
    manifest = tmp_path / "bad.yaml"
    manifest.write_text(BAD_MANIFEST, encoding="utf-8")

    code, out, err = cli(capsys, "validate", str(manifest))

    assert code == EXIT_USAGE
    assert out == ""
    problems = [line.strip() for line in err.splitlines()[1:]]
    assert err.startswith(f"{len(problems)} problems in the manifest")
    expected = [
        ("item 0 ('a')", "items[0].size", "multiple of 16"),
        ("item 1 ('a')", "items[1].id", "already used"),
        ("item 1 ('a')", "items[1].prompt", "missing"),
        ("item 1 ('a')", "items[1].promt", "did you mean 'prompt'"),
        ("item 2 ('c')", "items[2].prompt", "must be a string"),
        ("item 2 ('c')", "items[2].n", "whole number"),
    ]
    assert len(problems) == len(expected)
    for problem, (item, field, says) in zip(problems, expected, strict=True):
        assert problem.startswith(f"{manifest}:")
        assert f": {item}: {field}: " in problem
        assert says in problem


def test_schema_prints_json_that_parses(capsys: pytest.CaptureFixture[str]) -> None:
    """`schema` prints the manifest's JSON Schema as JSON."""
    code, out, _ = cli(capsys, "schema")

    assert code == EXIT_OK
    schema = json.loads(out)
    assert "items" in schema["properties"]
    assert {"required": ["items"]} in schema["oneOf"]


@pytest.mark.parametrize("command", [None, "run"])
def test_the_top_help_and_run_help_name_the_whole_configuration(
    command: str | None, capsys: pytest.CaptureFixture[str]
) -> None:
    """`batch-engine --help` and `run --help` mention every setting of the Configuration, and exit codes."""
    code, out, _ = cli(capsys, *([command] if command else []), "--help")

    assert code == EXIT_OK
    missing = [name for name in CONFIGURATION if name not in out]
    assert not missing, f"{command or 'batch-engine'} --help does not mention {missing}"
    assert "Exit codes" in out


@pytest.mark.parametrize("command", [c for c in COMMANDS if c != "run"])
def test_other_commands_help_says_their_own_exit_codes_not_the_run_settings(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`validate`, `status`, `report`, `schema` and `simulate` help do not repeat the run's settings; each
    that can fail says what its exit codes mean."""
    code, out, _ = cli(capsys, command, "--help")

    assert code == EXIT_OK
    assert "--max-in-flight" not in out
    assert "GPTPROTO_BASE_URL" not in out
    if command != "schema":
        assert "Exit codes: 0 " in out


def test_simulate_help_describes_itself_and_each_option(capsys: pytest.CaptureFixture[str]) -> None:
    """`simulate --help` says what the simulator is for and what --host, --port and --seed do."""
    _, out, _ = cli(capsys, "simulate", "--help")

    assert "simulator of GPTProto's prediction API" in out
    assert "--base-url http://127.0.0.1:PORT" in out
    options = {line.split()[0]: line for line in out.splitlines() if line.startswith("  --")}
    explained = {"--host": "address to listen on", "--port": "port to listen on", "--seed": "the same seed"}
    for flag, says in explained.items():
        assert says in options[flag], options[flag]


def test_run_help_files_out_dir_and_api_under_plain_titles(capsys: pytest.CaptureFixture[str]) -> None:
    """`run --help` files --out under the out dir and --base-url under the API, and has no 'where:' group."""
    _, out, _ = cli(capsys, "run", "--help")

    assert "where:" not in out
    api = out.index("\nthe API:")
    out_dir = out.index("\nthe out dir")
    assert api < out.index("  --base-url", api) < out_dir < out.index("  --out ", out_dir)
    assert out.index("  --out ", out_dir) < out.index("\npacing and polling")


def test_a_misspelt_flag_gets_a_suggestion(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`run M --dry_run` exits 2 and suggests --dry-run."""
    manifest = write_manifest(tmp_path / "job.yaml", items(1))

    code, _, err = cli(capsys, "run", str(manifest), "--dry_run")

    assert code == EXIT_USAGE
    assert "unrecognized arguments: --dry_run (did you mean --dry-run?)" in err


def test_run_help_documents_every_configuration_flag_as_an_option(capsys: pytest.CaptureFixture[str]) -> None:
    """`run --help` lists each configuration flag as an option of its own, not only in the epilog."""
    _, out, _ = cli(capsys, "run", "--help")

    options: set[str] = set()
    for line in out.splitlines():
        if line.startswith("  -"):  # "  -v, --verbose      debug logging ...": the names before the text
            names = line.strip().split("  ")[0]
            options.update(name.split()[0] for name in names.split(", "))
    flags = {name for name in CONFIGURATION if name.startswith("-")}
    assert flags <= options, sorted(flags - options)


def test_a_bad_setting_exits_2_naming_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A run flag with an impossible value exits 2 before anything is sent, saying which flag and why."""
    manifest = write_manifest(tmp_path / "job.yaml", items(1))

    code, _, err = cli(capsys, "run", str(manifest), "--out", str(tmp_path / "out"), "--rate", "-1")

    assert code == EXIT_USAGE
    assert "rate must be a number from 0.001 to 10,000, got -1.0" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["status", "report"])
def test_status_and_report_of_a_dir_without_journal_exit_2(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`status` and `report` of an out dir no run has used exit 2 and say there is no journal."""
    code, _, err = cli(capsys, command, str(tmp_path))

    assert code == EXIT_USAGE
    assert f"{tmp_path} has no journal" in err


def test_report_refuses_while_a_run_holds_the_out_dir(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`report` on an out dir a run is using exits 2 naming that run, instead of racing its writes."""
    (tmp_path / "journal.sqlite").touch()
    with OutDirLock(tmp_path):
        code, _, err = cli(capsys, "report", str(tmp_path))

    assert code == EXIT_USAGE
    assert "is in use by another batch-engine run" in err


# -- run: as a subprocess -----------------------------------------------------------------------------------

@pytest.mark.anyio
@pytest.mark.slow
async def test_run_without_a_key_exits_2_and_points_at_simulate(tmp_path: Path) -> None:
    """`run` with no GPTPROTO_API_KEY and no --simulate exits 2, naming the variable and --simulate."""
    manifest = write_manifest(tmp_path / "job.yaml", items(2))
    out = tmp_path / "out"

    run = await run_engine(["run", str(manifest), "--out", str(out)], env=engine_env(key=None))

    assert run.code == EXIT_USAGE
    assert "GPTPROTO_API_KEY is not set" in run.stderr
    assert "--simulate" in run.stderr
    assert not out.exists()


@pytest.mark.anyio
@pytest.mark.slow
async def test_dry_run_needs_no_key(tmp_path: Path) -> None:
    """`run --dry-run` sends nothing, so it works without GPTPROTO_API_KEY."""
    specs = items(3)
    specs[0]["n"] = 2
    manifest = write_manifest(tmp_path / "job.yaml", specs)

    dry = await run_engine(
        ["run", str(manifest), "--out", str(tmp_path / "out"), "--dry-run"], env=engine_env(key=None)
    )

    assert dry.code == EXIT_OK, dry.stderr
    assert "to submit: 3" in dry.stdout
    assert "images billed: 4" in dry.stdout


@pytest.mark.anyio
@pytest.mark.slow
async def test_run_simulate_exits_by_outcome_and_names_the_reports(tmp_path: Path) -> None:
    """`run --simulate` on a few demo items needs no key, exits 1 when an item failed, and its summary names
    every report's path."""
    manifest = tmp_path / "few.yaml"
    chosen = demo_items("sku-1001", "sku-1005", "sku-1006", "sku-1014")
    manifest.write_text(yaml.safe_dump({"version": 1, "name": "few", "items": chosen}), encoding="utf-8")
    out = tmp_path / "out"

    run = await run_engine(["run", str(manifest), "--simulate", "--out", str(out)], env=engine_env(key=None))

    report = yaml.safe_load((out / "report.yaml").read_text(encoding="utf-8"))
    failed = [entry["id"] for entry in report["items"] if entry["status"] == "failed"]
    assert failed == ["sku-1014"]  # its prompt breaks the content policy
    assert run.code == EXIT_FAILED_ITEMS, run.stderr
    assert run.stdout.startswith("Run finished in")
    assert "3 succeeded, 1 failed" in run.stdout
    for name in REPORT_NAMES:
        assert f"{out / name}" in run.stdout


@pytest.mark.anyio
async def test_a_run_no_limit_held_back_says_so(tmp_path: Path) -> None:
    """One simulated item waits only for its prediction: the summary names no limit as holding it back
    (it said "the poll budget" for its probe polls' moments of pacing, and a user would raise it)."""
    manifest = tmp_path / "one.yaml"
    manifest.write_text(yaml.safe_dump({"version": 1, "items": demo_items("sku-1001")}), encoding="utf-8")
    out = tmp_path / "out"

    run = await run_engine(["run", str(manifest), "--simulate", "--out", str(out)], env=engine_env(key=None))

    assert run.code == 0, run.stderr
    assert "held back by: none of the limits" in run.stdout
    report = yaml.safe_load((out / "report.yaml").read_text(encoding="utf-8"))
    assert report["run"]["held_back_by"] is None


@pytest.mark.anyio
@pytest.mark.slow
async def test_the_key_never_reaches_the_terminal_or_the_out_dir(tmp_path: Path) -> None:
    """At -v, with failures and retried downloads, the API key appears in no output line and no file."""
    async with Simulator(SimConfig(api_key=SECRET, image_scale=0.05, p_download_500=0.3, seed=3)) as sim:
        manifest = write_manifest(tmp_path / "job.yaml", items(4, failing=1), sim=sim)
        out = tmp_path / "out"

        run = await run_engine(run_args(manifest, out, sim), env=engine_env(key=SECRET))

        assert run.code == EXIT_FAILED_ITEMS, run.stderr
        assert sim.stats.accepted == 3
        assert "Authorization" not in run.stderr
        assert SECRET not in run.stdout
        assert SECRET not in run.stderr
        files = [path for path in out.rglob("*") if path.is_file()]
        assert {"journal.sqlite", "report.yaml", "index.html", ".lock"} <= {path.name for path in files}
        leaked = [str(path) for path in files if SECRET.encode() in path.read_bytes()]
        assert not leaked
