"""Every command meets bad paths, unusable out dirs, busy ports and closed pipes with one line, an exit code.

These run the command line as a subprocess, as a scheduler would: a traceback, an "Exception ignored" at the
interpreter's exit or an exit code of 1 (which means "finished with failed items") are what they look for.
Tests run as root here, so "cannot be written" is made without permissions: a path under ``/sys``, a file
where a folder must be, a folder where a file must be.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import anyio
import pytest
import yaml

from batch_engine.sim import Simulator
from tests.procs import (
    ENGINE,
    WAIT_TIMEOUT,
    engine_env,
    items,
    run_args,
    run_engine,
    write_manifest,
)

pytestmark = pytest.mark.slow

EXIT_USAGE = 2
OK_MANIFEST = "version: 1\nitems: [{id: a, prompt: p, images: [https://example.com/a.png]}]\n"


@dataclass(frozen=True)
class Place:
    """A tmp dir with the bad paths of every kind, and an out dir holding a journal."""

    root: Path

    def __getitem__(self, name: str) -> str:
        return str(self.root / name)


@pytest.fixture(scope="module")
def place(tmp_path_factory: pytest.TempPathFactory) -> Place:
    """Bad paths of every kind, and ``journal/``: an out dir a one-item simulated run left behind."""
    root = tmp_path_factory.mktemp("bad-paths")
    (root / "afile").write_text("x", encoding="utf-8")
    (root / "folder").mkdir()
    (root / "ok.yaml").write_text(OK_MANIFEST, encoding="utf-8")
    (root / "tabs.yaml").write_text("version: 1\nitems:\n\t- id: a\n", encoding="utf-8")
    for name in ("journal", "html-is-a-folder", "lock-is-a-folder"):
        made = subprocess.run(
            [*ENGINE, "run", str(root / "ok.yaml"), "--simulate", "--out", str(root / name), "-q"],
            env=engine_env(key=None),
            capture_output=True,
            timeout=60,
            check=False,
        )
        assert made.returncode == 0, made.stderr
    (root / "html-is-a-folder" / "index.html").unlink()
    (root / "html-is-a-folder" / "index.html").mkdir()
    (root / "lock-is-a-folder" / ".lock").unlink()
    (root / "lock-is-a-folder" / ".lock").mkdir()
    return Place(root)


#: (command line with {names} of the place, what the one line must say)
BAD_PATHS = [
    ("validate {missing.yaml}", "no such file"),
    ("validate {folder}", "not a regular file"),
    ("validate {afile}/x.yaml", "no such file"),
    ("validate {tabs.yaml}", "indented with a tab"),
    ("validate /proc/self/mem", "cannot read the file"),
    ("run {missing.yaml} --simulate", "no such file"),
    ("run {ok.yaml} --simulate --out {afile}", "is a file, not a folder"),
    ("run {ok.yaml} --simulate --out {afile}/sub", "is a file, so no folder can be made under it"),
    ("run {ok.yaml} --simulate --out /sys/batch-engine-out", "the folder cannot be made"),
    ("run {ok.yaml} --simulate --out /proc/self", "nothing can be written there"),
    ("run {ok.yaml} --simulate --out {lock-is-a-folder}", "Is a directory"),
    ("status {missing}", "has no journal"),
    ("status {afile}", "is a file, not an out dir"),
    ("status {afile}/sub", "has no journal"),
    ("status /sys", "has no journal"),
    ("report {missing}", "has no journal"),
    ("report {afile}", "is a file, not an out dir"),
    ("report {afile}/sub", "has no journal"),
    ("report {html-is-a-folder}", "Is a directory"),
    ("report {lock-is-a-folder}", "Is a directory"),
    ("simulate --port 99999", "must be a whole number from 0 to 65535"),
    ("simulate --host 8.8.8.8 --port 0", "cannot listen on 8.8.8.8:0"),
    ("simulate --host no.such.host.invalid --port 0", "cannot listen on no.such.host.invalid:0"),
]


@pytest.mark.anyio
@pytest.mark.parametrize(("line", "says"), BAD_PATHS, ids=[line for line, _ in BAD_PATHS])
async def test_a_bad_path_is_one_line_and_exit_2(place: Place, line: str, says: str) -> None:
    """Each command given a missing path, a file for a folder, a path under a file, a place nothing can be
    written or an address it cannot listen on exits 2 with what is wrong, never a traceback."""
    argv = expand(line, place).split()

    done = await run_engine(argv, env=engine_env(key=None))

    output = done.stdout + done.stderr
    assert "Traceback" not in output
    assert "Exception ignored" not in output
    assert done.code == EXIT_USAGE, output
    assert says in done.stderr


def expand(text: str, place: Place) -> str:
    """``{name}`` in ``text`` replaced by that path of the place."""
    return re.sub(r"\{([^}]+)\}", lambda match: place[match[1]], text)


@pytest.mark.anyio
async def test_a_port_in_use_is_one_line_and_exit_2() -> None:
    """`simulate --port N` on a port another program listens on says so in one line, exit 2."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]

        done = await run_engine(["simulate", "--port", str(port)])

    assert done.code == EXIT_USAGE
    assert "Traceback" not in done.stderr
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in done.stderr


def test_an_unwritable_stdout_is_said_in_one_line(place: Place) -> None:
    """`schema > /dev/full` cannot write its output: one line on stderr and exit 2, no traceback."""
    with open("/dev/full", "w") as full:
        done = subprocess.run(
            [*ENGINE, "schema"], stdout=full, stderr=subprocess.PIPE, text=True, timeout=60, check=False
        )

    assert done.returncode == EXIT_USAGE
    assert done.stderr == "batch-engine: could not write the output: No space left on device\n"


@pytest.mark.parametrize(
    ("argv", "code"),
    [(["schema"], 0), (["status", "{journal}"], 0), (["validate", "{tabs.yaml}"], EXIT_USAGE)],
    ids=["schema", "status", "validate-invalid"],
)
def test_a_closed_pipe_ends_a_short_command_quietly_with_its_own_exit_code(
    place: Place, argv: list[str], code: int
) -> None:
    """A reader gone before the output is written (`batch-engine schema | head`) changes nothing: no
    BrokenPipeError traceback, and the exit code is the command's own."""
    command = [*ENGINE, *(expand(arg, place) for arg in argv)]
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the command writes anything
    try:
        done = subprocess.run(command, stdout=write, stderr=write, timeout=60, check=False)
    finally:
        os.close(write)

    assert done.returncode == code


@pytest.mark.anyio
async def test_a_run_whose_output_pipe_closes_keeps_going_to_the_end(tmp_path: Path) -> None:
    """`batch-engine run ... 2>&1 | head -3`: the run outlives its reader and finishes every item, its
    files the record (no stop reason, nothing pending), with the exit code of its outcome."""
    async with Simulator() as sim:
        manifest = write_manifest(tmp_path / "job.yaml", items(30), sim=sim)
        out = tmp_path / "out"
        argv = [*ENGINE, *run_args(manifest, out, sim, "--rate", "20")]
        read, write = os.pipe()
        try:
            process = await anyio.open_process(
                argv, stdin=subprocess.DEVNULL, stdout=write, stderr=write, env=engine_env()
            )
        finally:
            os.close(write)
        async with process:
            with anyio.fail_after(WAIT_TIMEOUT):
                await anyio.to_thread.run_sync(os.read, read, 100)  # the first lines are out
            os.close(read)  # and the reader goes away, as `| head -3` does
            with anyio.fail_after(60):
                code = await process.wait()

    report = yaml.safe_load((out / "report.yaml").read_text(encoding="utf-8"))
    assert report["stopped_reason"] is None
    assert report["counts"]["unfinished"] == 0
    assert report["counts"]["succeeded"] == 30
    assert code == 0
    assert sim.stats.accepted == 30


@pytest.fixture
def read_only(place: Place, tmp_path: Path) -> Iterator[Path]:
    """``place``'s journal out dir seen through a read-only bind mount (skipped where none can be made)."""
    mount = tmp_path / "read-only"
    mount.mkdir()
    made = subprocess.run(
        ["mount", "--bind", "-o", "ro", place["journal"], str(mount)], capture_output=True, check=False
    )
    if made.returncode != 0:
        pytest.skip(f"no read-only bind mount here: {made.stderr.decode(errors='replace').strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("command", "says"),
    [
        (["status"], "the journal cannot be opened: Read-only file system; copy the out dir"),
        (["report"], "the reports cannot be written there: Read-only file system; copy the out dir"),
        (["run", "{ok.yaml}", "--simulate", "--out"], "nothing can be written there: Read-only file system"),
    ],
    ids=["status", "report", "run"],
)
async def test_an_out_dir_on_a_read_only_mount_is_one_line_and_exit_2(
    place: Place, read_only: Path, command: list[str], says: str
) -> None:
    """`status`, `report` and `run` of an out dir on a read-only mount say so in one line, exit 2."""
    argv = [expand(arg, place) for arg in command] + [str(read_only)]

    done = await run_engine(argv, env=engine_env(key=None))

    assert done.code == EXIT_USAGE
    assert "Traceback" not in done.stderr
    assert says in done.stderr
