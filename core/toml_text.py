"""Canonical TOML text for organization data (what ``tomllib`` reads back unchanged).

The organization store (core/org_store.py) keeps each object as a small TOML table and
``hubport pull-organization`` writes a whole file; both come from here, so the same data
always gives the same bytes. Only what an organization holds is written: strings, booleans,
integers, floats, dates and times, lists, and tables (top-level tables, arrays of tables,
and inline tables inside them).
"""

from __future__ import annotations

import datetime
import json
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["dumps", "table_body"]

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def dumps(data: Mapping[str, Any], order: Sequence[str] = ()) -> str:
    """A document: top-level values first, then ``[table]`` and ``[[array]]`` sections, in
    ``order`` for the keys it names, then the others sorted."""
    known = [k for k in order if k in data]
    keys = known + sorted(k for k in data if k not in known)
    lines = [f"{_key(k)} = {_value(data[k])}" for k in keys if not _is_section(data[k])]
    for k in keys:
        value = data[k]
        if isinstance(value, Mapping):
            lines += ["", f"[{_key(k)}]", *table_body(value).splitlines()]
        elif _is_array_of_tables(value):
            for table in value:
                lines += ["", f"[[{_key(k)}]]", *table_body(table).splitlines()]
    return "\n".join(lines).lstrip("\n") + "\n"


def table_body(table: Mapping[str, Any]) -> str:
    """The ``key = value`` lines of one table, in its own key order."""
    return "".join(f"{_key(k)} = {_value(v)}\n" for k, v in table.items())


def _is_section(value: Any) -> bool:
    return isinstance(value, Mapping) or _is_array_of_tables(value)


def _is_array_of_tables(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and \
        all(isinstance(v, Mapping) for v in value)


def _key(key: str) -> str:
    return key if _BARE_KEY.fullmatch(key) else _string(key)


def _string(text: str) -> str:
    # JSON's escapes are TOML's basic-string escapes; \u007f and the other controls too
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return _string(value)
    if isinstance(value, (datetime.datetime, datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{_key(k)} = {_value(v)}" for k, v in value.items()) + " }" \
            if value else "{}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    raise TypeError(f"no TOML form for {type(value).__name__}")
