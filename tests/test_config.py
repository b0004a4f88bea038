"""Run settings: built from the manifest and the flags, validated once, with errors that name the key."""

from __future__ import annotations

import pytest

from batch_engine.errors import UsageError
from batch_engine.settings import RunSettings


def test_flags_override_the_manifest_and_unset_flags_do_not() -> None:
    """A flag given on the command line wins; a flag left unset keeps the manifest's value."""
    settings = RunSettings.build({"rate": 2, "max_in_flight": 7}, {"rate": 5.0, "max_in_flight": None})
    assert (settings.rate, settings.max_in_flight) == (5.0, 7)


def test_poll_budget_keeps_up_with_a_high_submit_rate() -> None:
    """Unset, the poll budget is 10/s or twice the submit rate, whichever is higher; set, it is as set."""
    assert RunSettings(rate=2).polls_per_second == 10
    assert RunSettings(rate=40).polls_per_second == 80
    assert RunSettings(rate=40, poll_rate=3).polls_per_second == 3


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"rate": 0}, "rate"),
        ({"poll_rate": -1.0}, "poll_rate"),
        ({"max_in_flight": 0}, "max_in_flight"),
        ({"rate": 1, "rate_min": 2}, "rate_min"),
        ({"poll_interval": 5, "poll_interval_max": 1}, "poll_interval_max"),
        ({"max_submits": -1}, "max_submits"),
    ],
)
def test_bad_values_are_refused_naming_the_setting(changes: dict[str, float], named: str) -> None:
    """A value out of range is refused with a message that names the setting."""
    with pytest.raises(UsageError, match=named):
        RunSettings(**changes)  # type: ignore[arg-type]


def test_unknown_setting_is_refused_by_name() -> None:
    """A setting the engine does not know is refused, naming it."""
    with pytest.raises(UsageError, match="max_inflight"):
        RunSettings.build({"max_inflight": 3}, {})
