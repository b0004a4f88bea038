"""A small writer of block-style YAML for JSON-like data, as PyYAML lays it out, many times faster."""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Mapping
from typing import Any

logger = logging.getLogger(__name__)


def block_yaml(value: Any, indent: str = "") -> list[str]:
    """Lines of block-style YAML for JSON-like data, as PyYAML would lay it out, many times faster.

    Strings are always written JSON-quoted, which YAML reads as double-quoted scalars: no value can
    turn into a date, a bool or a number on the way back. Used for report.yaml's item entries, where
    PyYAML's pure-Python representer cost more than the rest of the run's bookkeeping.
    """
    out: list[str] = []
    _emit(out, value, indent)
    return out


def _emit(out: list[str], value: Any, indent: str) -> None:
    if isinstance(value, Mapping):
        if not value:
            out.append("{}\n")
            return
        lead = ""  # the first key shares the line its parent started ("- key:" or "key:\n  key:")
        for key, item in value.items():
            _emit_child(out, f"{lead}{_scalar(str(key))}:", item, indent, in_list=False)
            lead = indent
    elif isinstance(value, list | tuple):
        if not value:
            out.append("[]\n")
            return
        lead = ""
        for item in value:
            _emit_child(out, f"{lead}-", item, indent, in_list=True)
            lead = indent
    else:
        out.append(_scalar(value) + "\n")


def _emit_child(out: list[str], head: str, item: Any, indent: str, *, in_list: bool) -> None:
    if type(item) is str or item is None or not isinstance(item, Mapping | list | tuple):
        out.append(f"{head} {_scalar(item)}\n")
    elif not item:
        out.append(f"{head} {{}}\n" if isinstance(item, Mapping) else f"{head} []\n")
    elif in_list:
        out.append(head + " ")  # "- key: value" (or "- - x"): the first line shares the dash's line
        _emit(out, item, indent + "  ")
    else:
        step = "  " if isinstance(item, Mapping) else ""
        out.append(f"{head}\n{indent}{step}")
        _emit(out, item, indent + step)


def _scalar(value: Any) -> str:
    if type(value) is str:
        return _string(value)
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return repr(int(value))
    if isinstance(value, float):
        return _float(value)
    return _string(str(value))


def _string(text: str) -> str:
    if _PLAIN_SAFE.fullmatch(text) and text.lower() not in _YAML_WORDS:
        return text
    return _UNSAFE_IN_QUOTES.sub(_escape, json.dumps(text, ensure_ascii=False))


def _float(value: float) -> str:
    """A float as YAML 1.1 reads it back: ``.inf``/``.nan``, and always a dot in the mantissa
    (``1e+300`` is a string to YAML 1.1; ``1.0e+300`` a float)."""
    if math.isnan(value):
        return ".nan"
    if math.isinf(value):
        return ".inf" if value > 0 else "-.inf"
    text = repr(value)
    mantissa, e, exponent = text.partition("e")
    return text if "." in mantissa or not e else f"{mantissa}.0e{exponent}"


def _escape(match: re.Match[str]) -> str:
    return f"\\u{ord(match.group()):04x}"


#: What JSON leaves raw but a YAML double-quoted scalar must not hold raw: characters outside YAML's
#: printable set (C1 controls, lone surrogates, U+FFFE/U+FFFF) and the line breaks YAML folds into a
#: space (NEL U+0085, U+2028, U+2029). YAML's ``\uXXXX`` escape means the same as JSON's.
_UNSAFE_IN_QUOTES = re.compile("[\x7f-\x9f\u2028\u2029\ud800-\udfff\ufeff\ufffe\uffff]")


#: Strings written unquoted: they start with a letter (so no number or date) and hold no YAML syntax.
_PLAIN_SAFE = re.compile(r"[A-Za-z][A-Za-z0-9_./-]*")
#: Words YAML 1.1 would read as bools or null.
_YAML_WORDS = frozenset({"y", "n", "yes", "no", "true", "false", "on", "off", "null"})
