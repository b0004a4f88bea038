"""Logging set-up: the line formats, the levels, idempotence, and that the API key never reaches a line."""

from __future__ import annotations

import io
import json
import logging
import re
import sys
from collections.abc import Iterator

import pytest

from batch_engine.ui.logs import LOGGER_NAME, redact, reset_logging, setup_logging

KEY = "sk-live-0123456789abcdef"


@pytest.fixture(autouse=True)
def _reset() -> Iterator[None]:
    yield
    reset_logging()


def _setup(*, verbose: bool = False, json_lines: bool = False, quiet: bool = False) -> io.StringIO:
    stream = io.StringIO()
    setup_logging(verbose=verbose, json_lines=json_lines, stream=stream, secrets=[KEY], quiet=quiet)
    return stream


def _log() -> logging.Logger:
    return logging.getLogger(f"{LOGGER_NAME}.client")


def _raise_with_key() -> None:
    try:
        raise KeyError(f"Bearer {KEY}")
    except KeyError as exc:
        raise RuntimeError(f"request failed with headers {{'Authorization': 'Bearer {KEY}'}}") from exc


def test_redact_replaces_every_secret() -> None:
    """Every occurrence of every secret becomes ***, and empty secrets change nothing."""
    assert redact(f"a {KEY} b {KEY} c other", [KEY, "other", ""]) == "a *** b *** c ***"
    assert redact("plain text", ["", "  "]) == "plain text"


def test_redact_catches_the_stripped_form_of_a_key() -> None:
    """A key read with a trailing newline is still redacted where it appears without it."""
    assert redact(f"Bearer {KEY}", [KEY + "\n"]) == "Bearer ***"


def test_plain_line_format() -> None:
    """A plain line reads "HH:MM:SS LEVEL name: message"."""
    stream = _setup()
    _log().info("submitted %s", "sku-1")
    assert re.fullmatch(r"\d\d:\d\d:\d\d INFO batch_engine\.client: submitted sku-1\n", stream.getvalue())


def test_levels_follow_verbose_and_quiet() -> None:
    """Debug lines show only with verbose, and info lines disappear with quiet."""
    normal = _setup()
    _log().debug("hidden")
    verbose = _setup(verbose=True)
    _log().debug("shown")
    quiet = _setup(quiet=True)
    _log().info("hidden too")
    _log().warning("still shown")
    assert "hidden" not in normal.getvalue()
    assert "shown" in verbose.getvalue()
    assert quiet.getvalue().endswith("WARNING batch_engine.client: still shown\n")


def test_secret_in_message_arguments_is_redacted() -> None:
    """A header dict logged at debug level shows *** instead of the key."""
    stream = _setup(verbose=True)
    _log().debug("headers %s", {"Authorization": f"Bearer {KEY}"})
    assert KEY not in stream.getvalue()
    assert "Bearer ***" in stream.getvalue()


def test_secret_in_traceback_is_redacted() -> None:
    """An exception whose message and cause contain the key is logged with its traceback, key redacted."""
    stream = _setup()
    try:
        _raise_with_key()
    except RuntimeError:
        _log().exception("submit crashed", stack_info=True)
    text = stream.getvalue()
    assert "Traceback" in text
    assert "KeyError" in text
    assert KEY not in text


def test_json_lines_carry_the_fields_and_no_secret() -> None:
    """In JSON mode each line is one object with ts, level, logger, message and exc_info, key redacted."""
    stream = _setup(json_lines=True)
    _log().info("using key %s", KEY)
    try:
        _raise_with_key()
    except RuntimeError:
        _log().exception("submit crashed")
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [line["message"] for line in lines] == ["using key ***", "submit crashed"]
    assert {"ts", "level", "logger", "message"} <= lines[0].keys()
    assert lines[1]["level"] == "ERROR"
    assert "RuntimeError" in lines[1]["exc_info"]
    assert KEY not in stream.getvalue()


def test_setup_twice_does_not_duplicate_lines() -> None:
    """Calling setup_logging twice leaves one handler, so each record prints once."""
    _setup()
    stream = _setup()
    _log().info("once")
    assert stream.getvalue().count("once") == 1
    assert len(logging.getLogger(LOGGER_NAME).handlers) == 1


def test_reset_restores_the_defaults() -> None:
    """reset_logging removes the handler and lets records propagate to the root again."""
    _setup()
    reset_logging()
    logger = logging.getLogger(LOGGER_NAME)
    assert logger.handlers == []
    assert logger.propagate
    assert logger.level == logging.NOTSET


def test_aiohttp_access_log_is_quiet() -> None:
    """aiohttp's per-request access log drops below warning."""
    _setup(verbose=True)
    assert not logging.getLogger("aiohttp.access").isEnabledFor(logging.INFO)


def test_standard_error_is_looked_up_at_each_record(monkeypatch: pytest.MonkeyPatch) -> None:
    """Lines set up on sys.stderr go to whatever sys.stderr is when logged."""
    setup_logging(verbose=False, json_lines=False, stream=sys.stderr)
    replacement = io.StringIO()
    monkeypatch.setattr(sys, "stderr", replacement)
    _log().info("redirected")
    assert "redirected" in replacement.getvalue()


def test_malformed_log_call_does_not_raise(capsys: pytest.CaptureFixture[str]) -> None:
    """A log call whose arguments do not fit its format is reported by logging, not raised to the caller."""
    _setup()
    _log().info("%d items", "not a number")
    assert "Logging error" in capsys.readouterr().err
