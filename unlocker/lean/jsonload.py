"""`loads`: json.loads for the boot path, without importing the json package.

The parsing is the same: json.loads with its defaults runs the C scanner of `_json`, and so does this.
What is skipped is the Python package around it, whose import compiles regular expressions and
builds enums (`re`, `enum`, `functools`: start-up time a boot pays under emulation, docs/performance.md).
Whatever the scanner refuses goes to json.loads itself, which raises the error it always raises (a
ValueError), so callers see json's behaviour in every case but one: a document nested deeper than
the interpreter's recursion limit is a ValueError too (json raises RecursionError), so that a
hostile LUKS header is a malformed document like any other, never a crash.
"""

from __future__ import annotations

import _json

from unlocker import TYPE_CHECKING

if TYPE_CHECKING:
    from typing import Any

_WHITESPACE = " \t\n\r"  # JSON's insignificant whitespace, as json.decoder's WHITESPACE pattern
_CONSTANTS = {"-Infinity": float("-inf"), "Infinity": float("inf"), "NaN": float("nan")}


class _Defaults:
    """What json.JSONDecoder() hands the C scanner when json.loads is called without options."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    parse_constant = _CONSTANTS.__getitem__


_scan = _json.make_scanner(_Defaults())  # type: ignore[arg-type]  # typeshed: a JSONDecoder; any object with its attributes


def loads(data: str | bytes | bytearray) -> Any:
    """json.loads(data): the document, or the ValueError json raises for it."""
    try:
        return _loads(data)
    except RecursionError:
        raise ValueError("the JSON document is nested too deeply") from None


def _loads(data: str | bytes | bytearray) -> Any:
    try:
        text = data.decode("utf-8") if isinstance(data, (bytes, bytearray)) else data
        value, end = _scan(text, len(text) - len(text.lstrip(_WHITESPACE)))
        if not text[end:].strip(_WHITESPACE):
            return value
    except (StopIteration, ValueError):  # ValueError: bad UTF-8, or an error the scanner reports
        pass
    import json  # only for a document the fast path refused: its error message (or another encoding)

    return json.loads(data)
