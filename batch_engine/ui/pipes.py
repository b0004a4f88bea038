"""Standard streams that outlive their reader: a closed pipe sends the rest of the output nowhere.

``batch-engine run ... | head -3`` closes the pipe after three lines. A write to it then raises
BrokenPipeError, which must not end a run: its files are the record, so the run carries on and its
output goes to ``/dev/null`` (the stream's descriptor is pointed there, so buffered text and the
interpreter's last flush go nowhere too, quietly). Short commands end with the exit code they would
have had. Any other write error (a full disk behind ``> file``) is remembered for the CLI to report.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
from collections.abc import Iterator
from typing import Any, TextIO, cast


class PipeSafe:
    """A text stream (duck-typed) that swallows a closed reader; everything else is the wrapped stream's."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self.reader_gone = False  #: the reader closed the pipe: output goes to /dev/null since
        self.error: OSError | None = None  #: the first other write error, for the CLI to report

    def __repr__(self) -> str:
        return f"<PipeSafe {self._stream!r} reader_gone={self.reader_gone}>"

    def write(self, text: str) -> int:
        if not self.reader_gone:
            try:
                self._stream.write(text)
            except OSError as exc:
                self._failed(exc)
        return len(text)

    def flush(self) -> None:
        if not self.reader_gone:
            try:
                self._stream.flush()
            except OSError as exc:
                self._failed(exc)

    def isatty(self) -> bool:
        return not self.reader_gone and self._stream.isatty()

    def fileno(self) -> int:
        return self._stream.fileno()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)

    def _failed(self, exc: OSError) -> None:
        if not isinstance(exc, BrokenPipeError):
            self.error = self.error or exc
        self.reader_gone = True
        with contextlib.suppress(OSError, ValueError, io.UnsupportedOperation):
            devnull = os.open(os.devnull, os.O_WRONLY)
            try:
                os.dup2(devnull, self._stream.fileno())
            finally:
                os.close(devnull)


@contextlib.contextmanager
def pipe_safe_std() -> Iterator[tuple[PipeSafe, PipeSafe]]:
    """Wrap sys.stdout and sys.stderr for the block, flushed at its end; the originals come back after."""
    saved = sys.stdout, sys.stderr
    out, err = PipeSafe(sys.stdout), PipeSafe(sys.stderr)
    sys.stdout, sys.stderr = cast(TextIO, out), cast(TextIO, err)
    try:
        yield out, err
    finally:
        out.flush()
        err.flush()
        sys.stdout, sys.stderr = saved
