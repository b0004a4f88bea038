"""The out-dir lock, exercised across real processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from batch_engine.errors import OutDirLocked
from batch_engine.store.lock import OutDirLock

ROOT = Path(__file__).resolve().parents[1]

#: holds the lock, says so on stdout, and releases it when its stdin closes
HOLDER = """
import sys
from batch_engine.store.lock import OutDirLock
with OutDirLock(sys.argv[1]):
    print("locked", flush=True)
    sys.stdin.read()
print("released", flush=True)
"""

#: tries the lock once and reports what happened
PROBE = """
import sys
from batch_engine.errors import OutDirLocked
from batch_engine.store.lock import OutDirLock
try:
    with OutDirLock(sys.argv[1]):
        print("acquired", flush=True)
except OutDirLocked as exc:
    print("refused", exc, flush=True)
"""


def _spawn(script: str, out_dir: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-c", script, str(out_dir)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
    )


@pytest.fixture
def holder(tmp_path: Path) -> Iterator[subprocess.Popen[str]]:
    proc = _spawn(HOLDER, tmp_path)
    assert proc.stdout is not None
    assert proc.stdout.readline() == "locked\n"
    yield proc
    proc.kill()
    proc.communicate()


def _probe(out_dir: Path) -> str:
    proc = _spawn(PROBE, out_dir)
    out, _ = proc.communicate()
    return out


def test_another_process_holding_the_lock_is_named_in_the_refusal(
    tmp_path: Path, holder: subprocess.Popen[str]
) -> None:
    """Acquiring while another live process holds the lock raises OutDirLocked naming its pid and host."""
    with pytest.raises(OutDirLocked) as caught:
        OutDirLock(tmp_path).acquire()
    message = str(caught.value)
    assert f"pid {holder.pid} on host " in message
    assert message.startswith(f"{tmp_path} is in use by another batch-engine run (")
    assert message.endswith("; wait for it to finish or stop it")


def test_our_lock_refuses_another_process(tmp_path: Path) -> None:
    """While this process holds the lock, a second process is refused with a message naming our pid."""
    with OutDirLock(tmp_path):
        refusal = _probe(tmp_path)
    assert refusal.startswith(f"refused {tmp_path} is in use by another batch-engine run (pid {os.getpid()} ")


def test_lock_file_names_the_holder(tmp_path: Path) -> None:
    """The held lock file records pid, host, ISO start time and argv."""
    with OutDirLock(tmp_path) as lock:
        info = json.loads(lock.path.read_text())
    assert info["pid"] == os.getpid()
    assert set(info) == {"pid", "host", "started_at", "argv"}
    assert "T" in info["started_at"]
    assert info["argv"] == sys.argv


def test_lock_is_free_again_once_the_holder_releases_it(
    tmp_path: Path, holder: subprocess.Popen[str]
) -> None:
    """When the holder leaves its ``with`` block the lock is free and not reported stale."""
    out, _ = holder.communicate("")  # closing its stdin makes it release and exit
    assert out == "released\n"
    with OutDirLock(tmp_path) as lock:
        assert lock.stale_owner is None


def test_lock_of_a_killed_process_is_taken_over_and_reported_stale(
    tmp_path: Path, holder: subprocess.Popen[str]
) -> None:
    """A lock left by a SIGKILLed run is acquired and ``stale_owner`` names the dead pid."""
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    with OutDirLock(tmp_path) as lock:
        assert lock.stale_owner is not None
        assert lock.stale_owner["pid"] == holder.pid
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()


def test_release_on_exit_even_after_an_exception(tmp_path: Path) -> None:
    """Leaving the ``with`` block by an exception releases the lock and empties the file."""
    lock = OutDirLock(tmp_path)
    with pytest.raises(KeyError), lock:
        raise KeyError("boom")
    assert not lock.held
    assert lock.path.read_text() == ""
    assert _probe(tmp_path) == "acquired\n"


def test_a_second_lock_in_the_same_process_is_refused(tmp_path: Path) -> None:
    """flock locks belong to open files, so a second OutDirLock in one process is refused too."""
    with OutDirLock(tmp_path), pytest.raises(OutDirLocked):
        OutDirLock(tmp_path).acquire()


def test_release_is_idempotent_and_the_lock_reusable(tmp_path: Path) -> None:
    """Releasing twice is harmless, and a released lock object can be acquired again."""
    lock = OutDirLock(tmp_path)
    lock.acquire()
    lock.release()
    lock.release()
    with lock:
        assert lock.held
        assert lock.stale_owner is None
