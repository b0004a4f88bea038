"""Set up the ``batch_engine`` logger: plain or JSON lines, with every secret redacted.

The redaction is a filter on the handler (a logger's own filters skip records from child loggers),
so it covers every ``batch_engine.*`` module, their exception tracebacks and stack text alike.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any, TextIO, cast

LOGGER_NAME = "batch_engine"
REDACTED = "***"
PLAIN_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
PLAIN_DATE_FORMAT = "%H:%M:%S"
#: other libraries' loggers that would say too much at INFO (one line per simulator request)
QUIET_LOGGERS = ("aiohttp.access",)


def setup_logging(
    *,
    verbose: bool,
    json_lines: bool,
    stream: TextIO,
    secrets: Sequence[str] = (),
    quiet: bool = False,
) -> None:
    """Send ``batch_engine`` records to ``stream`` as plain or JSON lines; calling again replaces it."""
    reset_logging()
    handler = LineHandler(stream, secrets=secrets)
    handler.setFormatter(JsonFormatter() if json_lines else _plain_formatter())
    logger = logging.getLogger(LOGGER_NAME)
    logger.addHandler(handler)
    logger.setLevel(_level(verbose=verbose, quiet=quiet))
    logger.propagate = False  # the root logger's handlers would print each line again, unredacted
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def reset_logging() -> None:
    """Undo ``setup_logging``: remove its handler and give the loggers it touched their defaults back."""
    logger = logging.getLogger(LOGGER_NAME)
    for handler in [h for h in logger.handlers if isinstance(h, LineHandler)]:
        logger.removeHandler(handler)
        handler.close()
    logger.setLevel(logging.NOTSET)
    logger.propagate = True
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.NOTSET)


def redact(text: str, secrets: Iterable[str]) -> str:
    """``text`` with every non-empty secret replaced by ``***``."""
    for secret in _variants(secrets):
        text = text.replace(secret, REDACTED)
    return text


def iso_timestamp(unix_seconds: float) -> str:
    """ISO 8601 in UTC with milliseconds, e.g. ``2026-05-09T07:35:25.123+00:00``."""
    return datetime.fromtimestamp(unix_seconds, tz=UTC).isoformat(timespec="milliseconds")


def _variants(secrets: Iterable[str]) -> list[str]:
    # Longest first, so a secret that contains another leaves no tail behind; a key read from a file
    # may carry a newline that never reaches the wire, so its stripped form counts too.
    found = {form for secret in secrets for form in (secret, secret.strip()) if form}
    return sorted(found, key=len, reverse=True)


def _level(*, verbose: bool, quiet: bool) -> int:
    if verbose:
        return logging.DEBUG
    return logging.WARNING if quiet else logging.INFO


def _plain_formatter() -> logging.Formatter:
    return logging.Formatter(PLAIN_FORMAT, datefmt=PLAIN_DATE_FORMAT)


class RedactFilter(logging.Filter):
    """Replaces every secret in a record's message, exception and stack text by ``***``; drops nothing."""

    def __init__(self, secrets: Sequence[str]) -> None:
        super().__init__()
        self.secrets = tuple(secrets)  #: the strings that must never reach a log line

    def filter(self, record: logging.LogRecord) -> bool:
        self._redact_message(record)
        if record.exc_info and not record.exc_text:
            record.exc_text = _plain_formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text, self.secrets)
        if record.stack_info:
            record.stack_info = redact(record.stack_info, self.secrets)
        return True

    def _redact_message(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except Exception:  # a malformed call: leave it to the handler's handleError, never raise here
            return
        record.msg = redact(message, self.secrets)
        record.args = None


class LineHandler(logging.Handler):
    """Writes each record as one line to a stream, every secret redacted.

    Given ``sys.stdout`` or ``sys.stderr`` it writes to whatever that is at the time of each record,
    so a live progress display that redirects them prints log lines above itself.
    """

    def __init__(self, stream: TextIO, *, secrets: Sequence[str] = ()) -> None:
        super().__init__()
        self._stream = stream
        self._std_name = _std_name(stream)
        self._secrets = tuple(secrets)
        self.addFilter(RedactFilter(self._secrets))

    @property
    def stream(self) -> TextIO:
        if self._std_name is not None:
            return cast(TextIO, getattr(sys, self._std_name))
        return self._stream

    def format(self, record: logging.LogRecord) -> str:
        # The filter already redacted the record; this catches whatever the formatter itself adds.
        return redact(super().format(record), self._secrets)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            stream = self.stream
            stream.write(self.format(record) + "\n")
            stream.flush()
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)


def _std_name(stream: TextIO) -> str | None:
    for name in ("stdout", "stderr"):
        if stream is getattr(sys, name) or stream is getattr(sys, f"__{name}__"):
            return name
    return None


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ``ts``, ``level``, ``logger``, ``message``, and exception/stack text."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": iso_timestamp(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            entry["exc_info"] = record.exc_text
        if record.stack_info:
            entry["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(entry)
