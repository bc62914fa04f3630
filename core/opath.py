"""Filters as Exchange administrators write them: ``Status -eq 'Retry' -and MessageCount -gt 5``.

One reader serves every place a filter is typed: Get-Queue's and Get-Message's ``-Filter``
(applied by the daemon), and ``| Where-Object {$_.Name -like 'To*'}`` after any Get- cmdlet
(applied to the objects it printed). Terms are ``Field -op Value`` joined by ``-and`` and
``-or`` (``-and`` binds tighter, as in PowerShell). Operators: ``-eq -ne -gt -ge -lt -le``,
``-like -notlike`` (``*`` and ``?`` wildcards), ``-match -notmatch`` (regular expressions),
``-contains -notcontains``. Text compares without case, numbers as numbers, ``$true``,
``$false`` and ``$null`` as themselves; a field holding a list matches when one of its
items does, as PowerShell compares arrays.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["FilterError", "Predicate", "parse_filter"]

Predicate = Callable[[Mapping[str, Any]], bool]

_OPERATORS = ("eq", "ne", "gt", "ge", "lt", "le", "like", "notlike", "match", "notmatch",
              "contains", "notcontains")
_TERM = re.compile(
    r"""\s*\(?\s*(?:\$_\.)?(?P<field>[A-Za-z][A-Za-z0-9]*)\s+-(?P<op>"""
    + "|".join(sorted(_OPERATORS, key=len, reverse=True))
    + r""")\s+(?:'(?P<sq>[^']*)'|"(?P<dq>[^"]*)"|(?P<bare>[^\s'"()]+))\s*\)?\s*""",
    re.IGNORECASE)
_OR = re.compile(r"\s+-or\s+", re.IGNORECASE)
_AND = re.compile(r"\s+-and\s+", re.IGNORECASE)
_CONSTANTS = {"$true": True, "$false": False, "$null": None}


class FilterError(ValueError):
    """A filter that cannot be read; the text says which term and what is expected."""


def parse_filter(text: str, fields: Mapping[str, str]) -> Predicate:
    """A predicate over rows. ``fields`` maps each filterable name, lower-case, to the key
    of the row that holds it (an unknown name is an error that lists the known ones)."""
    alternatives = []
    for alternative in _OR.split(text.strip()):
        terms = [_parse_term(part, fields) for part in _AND.split(alternative)]
        alternatives.append(terms)

    def test(row: Mapping[str, Any]) -> bool:
        return any(all(term(row) for term in terms) for terms in alternatives)
    return test


def _parse_term(part: str, fields: Mapping[str, str]) -> Predicate:
    match = _TERM.fullmatch(part)
    if match is None:
        raise FilterError(f"cannot read filter term {part.strip()!r}: expected Field -op Value"
                          f" (-op one of {', '.join('-' + o for o in _OPERATORS)})")
    key = fields.get(match["field"].lower())
    if key is None:
        from hubport.core.config_fields import suggest

        raise FilterError(f"unknown filter field {match['field']!r}"
                          f"{suggest(match['field'], sorted(fields.values()))} (known: "
                          + ", ".join(sorted(fields.values(), key=str.lower)) + ")")
    quoted = match["sq"] if match["sq"] is not None else match["dq"]
    value: Any = quoted if quoted is not None else _CONSTANTS.get(
        match["bare"].lower(), match["bare"])
    return _term(key, match["op"].lower(), value)


def _term(key: str, op: str, value: Any) -> Predicate:
    if op in ("match", "notmatch"):
        try:
            pattern = re.compile(str(value), re.IGNORECASE)
        except re.error as exc:
            raise FilterError(f"-{op} {value!r}: not a regular expression ({exc})") from None

    def one(actual: Any) -> bool:
        if op == "like":
            return fnmatch.fnmatchcase(_text(actual).lower(), str(value).lower())
        if op == "match":
            return pattern.search(_text(actual)) is not None
        if value is None or isinstance(value, bool) or actual is None \
                or isinstance(actual, bool):
            same = _constant(actual) == _constant(value)
            if op in ("eq", "ne"):
                return same if op == "eq" else not same
            return False
        left, right = _comparable(actual, value, op)
        return {"eq": left == right, "ne": left != right, "gt": left > right,
                "ge": left >= right, "lt": left < right, "le": left <= right}[op]

    def test(row: Mapping[str, Any]) -> bool:
        actual = row.get(key)
        items = actual if isinstance(actual, (list, tuple)) else [actual]
        if op in ("contains", "notcontains"):
            found = any(_text(item).lower() == str(value).lower() for item in items)
            return found if op == "contains" else not found
        if op in ("ne", "notlike", "notmatch"):  # none of the items matches
            positive = {"ne": "eq", "notlike": "like", "notmatch": "match"}[op]
            return not _term(key, positive, value)(row)
        return any(one(item) for item in items)
    return test


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "True" if value else "False"
    return "" if value is None else str(value)


def _constant(value: Any) -> Any:
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    return None if value in ("", None) else value


def _comparable(actual: Any, value: Any, op: str) -> tuple[Any, Any]:
    if isinstance(actual, (int, float)):
        try:
            return actual, float(value)
        except ValueError:
            raise FilterError(f"-{op} {value!r}: the field holds a number") from None
    return str(actual).lower(), str(value).lower()
