"""Absurd flags, settings and manifests: every number has a sane range, and whatever a manifest or a flag
holds, the answer is a Manifest, or a ManifestError / UsageError naming the field, never a traceback or a
run that hangs."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from batch_engine.cli import main
from batch_engine.errors import ManifestError, UsageError
from batch_engine.manifest import load_manifest
from batch_engine.settings import SETTING_RANGES, RunSettings
from batch_engine.values import Manifest

EXIT_USAGE = 2
ITEM = "items:\n  - {prompt: a cat, images: [https://example.com/a.png]}\n"


def problems_of(tmp_path: Path, text: str) -> list[str]:
    """The problems ``load_manifest`` lists for a manifest of ``text`` (which must not load)."""
    path = tmp_path / "job.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ManifestError) as caught:
        load_manifest(path)
    return [str(problem) for problem in caught.value.problems]


# ---- run settings: every number in a sane range (issue 9, item 12) ------------------------------------


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"poll_after": 1e300}, "poll_after must be a number from 0 to 604,800, got 1e+300"),
        ({"poll_rate": 1e-300}, "poll_rate must be a number from 0.01 to 10,000, got 1e-300"),
        ({"rate": 10**400}, "rate must be a number from 0.001 to 10,000, got a whole number of about 401"),
        ({"rate": float("inf")}, "rate must be a number from 0.001 to 10,000, got inf"),
        ({"rate_min": float("nan")}, "rate_min must be a number from 0.001 to 10,000, got nan"),
        ({"timeout": 1e30}, "timeout must be a number greater than 0 and at most 604,800, got 1e+30"),
        ({"max_in_flight": 16**4000}, "max_in_flight must be a whole number from 1 to 10,000, got a whole"),
        ({"max_in_flight": 2.5}, "max_in_flight must be a whole number"),
        ({"max_submits": True}, "max_submits must be a whole number"),
        ({"poll_interval": 1e300, "poll_interval_max": 1e300}, "poll_interval must be a number from 0.01"),
        ({"grace": -1.0}, "grace must be a number from 0 to 86,400, got -1.0"),
        ({"adapt": "maybe"}, "adapt must be true or false, got 'maybe'"),
        ({"rate": "fast"}, "rate must be a number from 0.001 to 10,000, got 'fast'"),
    ],
)
def test_an_absurd_setting_is_refused_with_its_range(changes: dict[str, Any], words: str) -> None:
    """A value that would hang the run (a first poll in 1e300 s) or end it in a traceback (OverflowError,
    ValueError) is refused as a UsageError giving the setting's range, in one short line."""
    with pytest.raises(UsageError) as caught:
        RunSettings(**changes)
    message = str(caught.value)
    assert message.startswith(words)
    assert "\n" not in message
    assert len(message) < 200


def test_every_number_setting_has_a_range_and_defaults_inside_it() -> None:
    """Each number setting has a range, and its default (when it has one) lies within it."""
    defaults = RunSettings()
    numbers = {"rate", "rate_min", "max_in_flight", "timeout", "poll_after", "poll_interval"}
    numbers |= {"poll_interval_max", "poll_rate", "max_submits", "grace"}
    assert set(SETTING_RANGES) == numbers
    for name, allowed in SETTING_RANGES.items():
        value = getattr(defaults, name)
        assert value is None or value in allowed, name


@pytest.mark.parametrize(
    ("flag", "value", "words"),
    [
        ("--poll-after", "1e300", "poll_after must be a number from 0 to 604,800"),
        ("--poll-rate", "1e-300", "poll_rate must be a number from 0.01 to 10,000"),
        ("--rate", "inf", "rate must be a number from 0.001 to 10,000, got inf"),
        ("--timeout", "nan", "timeout must be a number greater than 0"),
        ("--max-in-flight", "1" + "0" * 400, "max_in_flight must be a whole number from 1 to 10,000"),
    ],
)
def test_an_absurd_flag_exits_2_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flag: str, value: str, words: str
) -> None:
    """A run flag out of its range exits 2 before anything is sent, with one line naming it and why."""
    manifest = tmp_path / "job.yaml"
    manifest.write_text("version: 1\n" + ITEM, encoding="utf-8")
    code = main(["run", str(manifest), "--out", str(tmp_path / "out"), "--dry-run", flag, value])
    err = capsys.readouterr().err
    assert code == EXIT_USAGE
    assert err.count("\n") == 1
    assert words in err


# ---- manifests: the same ranges, and YAML that used to end in a traceback -------------------------------


@pytest.mark.parametrize(
    ("fragment", "words"),
    [
        ("settings:\n  rate: 1" + "0" * 400 + "\n", "settings.rate: must be a number from 0.001 to 10,000"),
        ("settings:\n  rate: 1.0e+400\n", "settings.rate: must be a finite number, got inf"),
        ("settings:\n  poll_after: 1.0e+300\n", "settings.poll_after: must be a number from 0 to 604,800"),
        ("settings:\n  adapt: !!bool maybe\n", "'maybe' cannot be read as bool"),
        ("settings:\n  grace: !!int ''\n", "'' cannot be read as int"),
        ("settings:\n  timeout: !!float ''\n", "'' cannot be read as float"),
        ("defaults:\n  n: 0x" + "f" * 4000 + "\n", "defaults.n: must be a whole number from 1 to 10, got a"),
        ("defaults:\n  size: 1024x" + "1" * 5000 + "\n", "whole numbers of 1-5 digits"),
        ("defaults:\n  n: " + "9" * 5000 + "\n", "cannot be read as int"),
    ],
    ids=["rate-400-zeros", "rate-inf", "poll-after", "bool-maybe", "int-empty", "float-empty", "n-hex",
         "size-5000-digits", "n-5000-digits"],
)
def test_an_absurd_manifest_value_is_a_clean_problem(tmp_path: Path, fragment: str, words: str) -> None:
    """``rate: 1<400 zeros>``, ``n: 0x<4000 f's>``, ``size: 1024x<5000 digits>``, ``adapt: !!bool maybe``
    and their kind are each a problem naming the place (OverflowError, ValueError, KeyError before)."""
    problems = problems_of(tmp_path, "version: 1\n" + fragment + ITEM)
    assert any(words in problem for problem in problems), problems
    assert all(len(problem) < 400 for problem in problems), problems


# ---- the fuzzer: any manifest loads or is a ManifestError --------------------------------------------

VALID = {
    "version": ["1"],
    "name": ["job", "'spring catalog'"],
    "model": ["openai/gpt-image-2-plus", "openai/gpt-image-1"],
    "task": ["image-edit", "text-to-image"],
    "size": ["1024x1024", "auto", "1536x1024"],
    "n": ["1", "3"],
    "rate": ["2", "0.5"],
    "rate_min": ["0.05"],
    "adapt": ["true", "false"],
    "max_in_flight": ["50"],
    "timeout": ["600"],
    "poll_after": ["null", "30"],
    "poll_rate": ["10"],
    "grace": ["30"],
    "id": ["sku-1", "'007'"],
    "prompt": ["a cat", "'Girl holding cat'"],
    "image": ["https://example.com/a.png", "data:image/png;base64,AAAA"],
    "quality": ["auto", "high"],
}
HOSTILE = [
    "1" + "0" * 400, "0x" + "f" * 4000, "9" * 5000, "1.0e+400", "-.inf", ".nan", "-1", "0", "1e300",
    "!!bool maybe", "!!int ''", "!!float ''", "!!int 0x", "!!float 1:2:3.x", "!!null x", "!!binary AAAA",
    "!!python/object:os.system x", "!custom x", "~", "[]", "{}", "[[[[[]]]]]", "*nowhere", "&a [*a]",
    "1024x" + "1" * 5000, "'" + "x" * 40_000 + "'", "yes", "2026-01-01", "0o777", "0b101", "1_000",
    "1:20", "'\\u0000'", '"\\ud800"', "|\n  block", ">-\n  folded", "? complex\n  : key",
]
SCALAR = st.sampled_from(HOSTILE) | st.text(
    st.characters(codec="utf-8"), max_size=12
).map(lambda text: repr(text))
TEMPLATE = """\
version: {version}
name: {name}
model: {model}
task: {task}
defaults:
  size: {size}
  n: {n}
settings:
  rate: {rate}
  rate_min: {rate_min}
  adapt: {adapt}
  max_in_flight: {max_in_flight}
  timeout: {timeout}
  poll_after: {poll_after}
  poll_rate: {poll_rate}
  grace: {grace}
items:
  - id: {id}
    prompt: {prompt}
    images: [{image}]
    quality: {quality}
"""
YAML_CHARS = st.sampled_from([*"ab01:-[]{}&*!|>'\"#%@`,.? \n\t\\", "!!int ", "!!bool ", "<<: ", "---\n"])
RANDOM_DOCUMENTS = st.lists(YAML_CHARS, max_size=80).map("".join)


@st.composite
def manifests(draw: st.DrawFn) -> str:
    """A valid manifest with some of its values replaced by hostile ones, or a random YAML-ish text."""
    if draw(st.booleans()):
        return draw(RANDOM_DOCUMENTS)
    values = {key: draw(st.sampled_from(choices) | SCALAR) for key, choices in VALID.items()}
    return TEMPLATE.format(**values)


FUZZ_DIR = Path(tempfile.mkdtemp(prefix="manifest-fuzz-"))


@settings(max_examples=200, deadline=None)
@given(manifests())
def test_any_manifest_loads_or_is_a_manifest_error(text: str) -> None:
    """Whatever a manifest holds, load_manifest returns a Manifest or raises ManifestError, never else."""
    path = FUZZ_DIR / "job.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    assert isinstance(outcome_of(lambda: load_manifest(path), ManifestError), Manifest | ManifestError)


def outcome_of(build: Callable[[], Any], expected: type[Exception]) -> Any:
    """What ``build()`` returns, or the ``expected`` exception it raised (any other one escapes)."""
    try:
        return build()
    except expected as exc:
        return exc


SETTING_VALUES = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(16**4000), max_value=16**4000)
    | st.floats()
    | st.text(max_size=5)
)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(RunSettings.field_names()), SETTING_VALUES, max_size=4))
def test_any_settings_build_or_are_a_usage_error(values: dict[str, Any]) -> None:
    """Whatever values the settings get (from a manifest or flags), building them gives RunSettings or
    raises UsageError, never another exception."""
    built = outcome_of(lambda: RunSettings.build(values, {}), UsageError)
    if isinstance(built, UsageError):
        assert "\n" not in str(built)
    else:
        assert built.rate_min <= built.rate
