"""The out-dir lock: one live batch-engine run per out dir, held with ``flock`` on ``<out_dir>/.lock``.

The kernel drops an ``flock`` when its holder dies, even on ``kill -9``, so a lock that is free is
never held by a live run. The file also names its holder (pid, host, start time, argv): a free
lock whose file still names someone else was left by a run that died, and is reported as stale.
A clean release empties the file (it is never deleted: a process blocked on the old inode would
otherwise lock a file nobody else sees).
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket
import sys
from pathlib import Path
from types import TracebackType
from typing import Any

from batch_engine.errors import OutDirLocked, UsageError

LOCK_NAME = ".lock"


class OutDirLock:
    """An exclusive, non-blocking lock on an out dir; ``with OutDirLock(out_dir):`` holds it."""

    __slots__ = ("_fd", "out_dir", "path", "stale_owner")

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / LOCK_NAME  #: the lock file
        #: the info of a dead run whose lock we took over, else None
        self.stale_owner: dict[str, Any] | None = None
        self._fd: int | None = None  #: open (and flocked) while held

    def __repr__(self) -> str:
        return f"<OutDirLock {str(self.path)!r} {'held' if self.held else 'free'}>"

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> OutDirLock:
        """Take the lock now or raise ``OutDirLocked`` naming the live run that holds it."""
        if self._fd is not None:
            raise RuntimeError(f"{self.path} is already held by this OutDirLock")
        self.out_dir.mkdir(parents=True, exist_ok=True)
        try:  # never through a symlink: a planted link would have us truncate its target
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            if exc.errno != errno.ELOOP:
                raise
            raise UsageError(
                f"{self.path} is a symlink; batch-engine never writes through one: remove it"
            ) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = _read_owner(fd)
            os.close(fd)
            raise OutDirLocked(_locked_message(self.out_dir, owner)) from None
        except BaseException:
            os.close(fd)
            raise
        previous = _read_owner(fd)
        self.stale_owner = previous or None
        _write_owner(fd, _owner_info())
        self._fd = fd
        return self

    def release(self) -> None:
        """Empty the file and drop the lock; does nothing when not held."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            os.ftruncate(fd, 0)
        finally:
            os.close(fd)  # closing the last descriptor releases the flock

    def __enter__(self) -> OutDirLock:
        return self.acquire()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


def _owner_info() -> dict[str, Any]:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "argv": list(sys.argv),
    }


def _read_owner(fd: int) -> dict[str, Any]:
    """The holder info in the lock file; empty when the file is empty or not ours."""
    data = os.pread(fd, 64 * 1024, 0)
    with contextlib.suppress(ValueError):
        info = json.loads(data)
        if isinstance(info, dict):
            return info
    return {}


def _write_owner(fd: int, info: dict[str, Any]) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode(), 0)


def _locked_message(out_dir: Path, owner: dict[str, Any]) -> str:
    if owner:
        who = (
            f"pid {owner.get('pid', '?')} on host {owner.get('host', '?')}, "
            f"started {owner.get('started_at', '?')}"
        )
    else:
        who = "its details are not written yet"
    return f"{out_dir} is in use by another batch-engine run ({who}); wait for it to finish or stop it"
