"""A PostgreSQL for the tests: the machine's own at 127.0.0.1:5432 (database ``test``) when it answers,
else one started from the ``pgserver`` wheel (its binaries ship inside it: nothing is downloaded).

Either way the session gets a database of its own, dropped at the end. ``BATCH_ENGINE_TEST_PG`` names
another server (an admin URL); ``BATCH_ENGINE_TEST_PGSERVER=1`` skips the system's. A pgserver is stopped
by a watchdog process when the test process dies however it dies (its own atexit hook would not run on a
SIGKILL, and the server would outlive the tests).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

SYSTEM_URL = "postgresql://postgres@127.0.0.1:5432/test"

_WATCHDOG = r"""
import os, shutil, subprocess, sys
pg_ctl, data, user = sys.argv[1], sys.argv[2], sys.argv[3] or None
try:
    sys.stdin.buffer.read()  # until the test process closes the pipe, or dies
except BaseException:
    pass
if os.path.exists(os.path.join(data, "postmaster.pid")):
    subprocess.run([pg_ctl, "-D", data, "-m", "immediate", "-w", "stop"], user=user,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
shutil.rmtree(data, ignore_errors=True)
"""


def _answers(url: str) -> bool:
    import psycopg

    try:
        with psycopg.connect(url, connect_timeout=2):
            return True
    except psycopg.OperationalError:
        return False


class _PipServer:
    """A PostgreSQL from pgserver, in a folder of its own, on a Unix socket there."""

    def __init__(self) -> None:
        if not os.environ.get("XDG_RUNTIME_DIR"):  # platformdirs (pgserver's) warns without one
            runtime = Path(tempfile.gettempdir()) / f"pgserver-runtime-{os.getuid()}"
            runtime.mkdir(mode=0o700, exist_ok=True)
            runtime.chmod(0o700)
            os.environ["XDG_RUNTIME_DIR"] = str(runtime)
        from pgserver import get_server  # type: ignore[attr-defined]
        from pgserver._commands import POSTGRES_BIN_PATH

        self.data = tempfile.mkdtemp(prefix="be-pg-")
        os.chmod(self.data, 0o755)  # as root, pgserver runs the server as its own user, who must get in
        self.server = get_server(self.data, cleanup_mode="delete")
        user = "pgserver" if os.geteuid() == 0 else ""
        self.watchdog = subprocess.Popen(
            [sys.executable, "-c", _WATCHDOG, str(POSTGRES_BIN_PATH / "pg_ctl"), self.data, user],
            stdin=subprocess.PIPE,
            start_new_session=True,
        )

    @property
    def url(self) -> str:
        return f"postgresql://postgres@/postgres?host={quote(self.data)}"

    def close(self) -> None:
        self.server.cleanup()
        assert self.watchdog.stdin is not None
        self.watchdog.stdin.close()
        self.watchdog.wait(timeout=30)


def _with_database(url: str, name: str) -> str:
    head, _, tail = url.partition("?")
    base = head.rsplit("/", 1)[0]
    return f"{base}/{name}" + (f"?{tail}" if tail else "")


@contextlib.contextmanager
def database() -> Iterator[str]:
    """The URL of a new, empty database; dropped afterwards (and a pgserver started for it stopped)."""
    import psycopg

    server: _PipServer | None = None
    admin = os.environ.get("BATCH_ENGINE_TEST_PG")
    if admin is None:
        if not os.environ.get("BATCH_ENGINE_TEST_PGSERVER") and _answers(SYSTEM_URL):
            admin = SYSTEM_URL
        else:
            server = _PipServer()
            admin = server.url
    name = f"be_test_{uuid.uuid4().hex[:12]}"
    try:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        try:
            yield _with_database(admin, name)
        finally:
            with psycopg.connect(admin, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        if server is not None:
            server.close()
