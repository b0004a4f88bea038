"""report.yaml's small YAML writer reads back, through PyYAML's own safe loader, as exactly what it wrote."""

from __future__ import annotations

import math
from typing import Any

import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from batch_engine.report.block_yaml import block_yaml

#: Any text, lone surrogates and control characters included (a prompt or a server's message can hold them).
TEXT = st.text(st.characters(codec=None, exclude_categories=()), max_size=40)
KEYS = st.text(st.characters(codec=None, exclude_categories=()), min_size=1, max_size=12)
SCALARS = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | TEXT
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(KEYS, inner, max_size=4),
    max_leaves=20,
)


def read_back(value: Any) -> Any:
    return yaml.safe_load("".join(block_yaml([value])))[0]


@settings(max_examples=400, deadline=None)
@given(VALUES)
def test_any_json_like_value_reads_back_unchanged(value: Any) -> None:
    """Strings, numbers, booleans, nulls, lists and mappings, nested, read back equal and of the same type."""
    back = read_back(value)
    assert back == value
    assert type(back) is type(value)


@given(st.floats(allow_nan=False))
def test_every_float_reads_back_as_that_float(value: float) -> None:
    """Floats come back as floats, huge and tiny ones too (``1e+300`` alone is a string to YAML 1.1)."""
    assert read_back(value) == value
    assert isinstance(read_back(value), float)


def test_not_a_number_reads_back_as_not_a_number() -> None:
    """NaN is written as YAML's .nan."""
    assert math.isnan(read_back(float("nan")))


def test_line_breaks_yaml_folds_are_kept() -> None:
    """NEL, LINE SEPARATOR and PARAGRAPH SEPARATOR survive inside a string instead of becoming spaces."""
    for text in ("a\x85b", "a\u2028b", "a\u2029b", "tab\tand\nnewline"):
        assert read_back(text) == text
