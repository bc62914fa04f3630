"""The stages after a Get- cmdlet that work on its objects, and how objects are printed.

``Get-SendConnector | Where-Object {$_.Cost -lt 5} | Sort-Object Name | Select-Object
Name,AddressSpaces -First 3 | Format-Table`` reads as in PowerShell: the objects a Get-
cmdlet returns pass through ``Where-Object`` (``where``, ``?``; core/opath.py reads the
condition), ``Sort-Object`` (``sort``; ``-Descending``), ``Select-Object`` (``select``;
properties, ``-First``, ``-Last``, ``-Unique``, ``-ExpandProperty``), then one of
``Format-List`` (``fl``), ``Format-Table`` (``ft``), each with an optional property list, or
``ConvertTo-Json``. Property names are Exchange's, compared without case.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from hubport.core.cmdlet_line import (
    CmdletError,
    Parameter,
    Token,
    bind,
    boolean,
    text_list,
    tokenize,
)
from hubport.core.opath import FilterError, parse_filter

__all__ = ["Stages", "apply", "display", "read_stages", "render"]

WHERE = ("where-object", "where", "?")
SELECT = ("select-object", "select")
SORT = ("sort-object", "sort")
FORMATS = {"format-list": "list", "fl": "list", "format-table": "table", "ft": "table",
           "convertto-json": "json"}
_TABLE_CELL_MAX = 48


@dataclass
class Step:
    """One object stage: where (a condition), sort or select."""

    kind: str
    condition: str = ""
    properties: list[str] = field(default_factory=list)
    descending: bool = False
    first: int | None = None
    last: int | None = None
    unique: bool = False
    expand: str | None = None


@dataclass
class Stages:
    steps: list[Step] = field(default_factory=list)
    output: str | None = None  # list, table, json; None: the cmdlet's own
    columns: list[str] = field(default_factory=list)  # Format-List/Table's properties

    @property
    def works_on_objects(self) -> bool:
        return bool(self.steps or self.columns)


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError("expects a whole number, 0 or more")
    return value


_SELECT_PARAMETERS = (
    Parameter("Property", text_list, default=[], positional=True),
    Parameter("First", _count), Parameter("Last", _count),
    Parameter("Unique", switch=True, default=False), Parameter("ExpandProperty"),
    Parameter("Skip", _count, default=0))
_SORT_PARAMETERS = (Parameter("Property", text_list, default=[], positional=True),
                    Parameter("Descending", lambda t: boolean(t, "Descending"),
                              default=False, switch=True),
                    Parameter("Unique", switch=True, default=False))
_FORMAT_PARAMETERS = (Parameter("Property", text_list, default=[], positional=True),
                      Parameter("AutoSize", switch=True, default=False),
                      Parameter("Wrap", switch=True, default=False))
_JSON_PARAMETERS = (Parameter("Depth", _count), Parameter("Compress", switch=True,
                                                           default=False))


def is_object_stage(stage: str) -> bool:
    words = tokenize(stage)
    verb = words[0].text.lower() if words and not words[0].parameter else ""
    return verb in WHERE + SELECT + SORT or verb in FORMATS


def read_stages(stages: Sequence[str], extra: Sequence[str] = ()) -> Stages:
    """The stages after the cmdlet (``--json`` beside the line asks for JSON)."""
    result = Stages()
    for stage in stages:
        words = tokenize(stage)
        verb = words[0].text.lower() if words and not words[0].parameter else ""
        name = words[0].text if words else stage
        if result.output is not None:
            raise CmdletError(f"| {stage}: put Format-List, Format-Table or ConvertTo-Json"
                              " last (the objects are text after it)")
        if verb in WHERE:
            result.steps.append(Step("where", condition=_condition(words)))
        elif verb in SORT:
            bound = bind("Sort-Object", words[1:], _SORT_PARAMETERS)
            result.steps.append(Step("sort", properties=bound.values["Property"],
                                     descending=bound.values["Descending"],
                                     unique=bound.values["Unique"]))
        elif verb in SELECT:
            bound = bind("Select-Object", words[1:], _SELECT_PARAMETERS)
            v = bound.values
            if v["Property"] == ["*"]:
                v["Property"] = []
            if v["First"] is not None and v["Skip"]:
                v["First"] += v["Skip"]
            result.steps.append(Step("select", properties=v["Property"], first=v["First"],
                                     last=v["Last"], unique=v["Unique"],
                                     expand=v["ExpandProperty"]))
            if v["Skip"]:
                result.steps.append(Step("skip", first=v["Skip"]))
        elif verb in FORMATS:
            bound = bind(name, words[1:], _JSON_PARAMETERS if verb == "convertto-json"
                         else _FORMAT_PARAMETERS)
            result.output = FORMATS[verb]
            columns = bound.values.get("Property") or []
            result.columns = [] if columns == ["*"] else columns
        else:
            raise CmdletError(f"| {stage}: after a cmdlet hubport takes Where-Object,"
                              " Sort-Object, Select-Object, Format-List (fl), Format-Table"
                              " (ft) or ConvertTo-Json")
    if "--json" in extra:
        result.output = "json"
    return result


def _condition(words: Sequence[Token]) -> str:
    """``{$_.Status -eq 'Retry'}`` or the short form ``Where-Object Status -eq Retry``."""
    block = next((w.text for w in words[1:] if w.block), None)
    if block is not None:
        return block
    rest = words[1:]
    if len(rest) >= 2 and rest[1].parameter and not rest[0].parameter:
        value = rest[2].text if len(rest) > 2 else "$true"
        return f"{rest[0].text} -{rest[1].text} '{value}'"
    raise CmdletError("| Where-Object needs a condition: Where-Object {$_.Status -eq"
                      " 'Retry'} (or Where-Object Status -eq Retry)")


def where_condition(stage: str) -> str | None:
    """The condition of a Where-Object stage with ``$_.`` removed; None: another stage."""
    words = tokenize(stage)
    if not words or words[0].parameter or words[0].text.lower() not in WHERE:
        return None
    return _condition(words).replace("$_.", "")


def apply(rows: Sequence[Mapping[str, Any]], stages: Stages) -> list[Any]:
    """The objects after the stages (a list of dicts, or of values after -ExpandProperty)."""
    out: list[Any] = [dict(r) for r in rows]
    for step in stages.steps:
        if step.kind == "where":
            try:
                test = parse_filter(step.condition, _fields(out))
            except FilterError as exc:
                raise CmdletError(f"| Where-Object: {exc}") from None
            out = [r for r in out if isinstance(r, Mapping) and test(r)]
        elif step.kind == "sort":
            keys = step.properties or (list(out[0])[:1] if out and isinstance(out[0], Mapping)
                                       else [])
            names = [_property(out, k) for k in keys]
            out.sort(key=lambda r: [_sort_key(_get(r, n)) for n in names],
                     reverse=step.descending)
            if step.unique:
                out = _unique(out)
        elif step.kind == "skip":
            out = out[step.first or 0:]
        else:
            out = _select(out, step)
    return out


def _select(rows: list[Any], step: Step) -> list[Any]:
    if step.expand:
        name = _property(rows, step.expand)
        values: list[Any] = []
        for row in rows:
            value = _get(row, name)
            values.extend(value if isinstance(value, (list, tuple)) else [value])
        rows = values
    elif step.properties:
        names = [_property(rows, p) for p in step.properties]
        rows = [{n: _get(r, n) for n in names} for r in rows]
    if step.unique:
        rows = _unique(rows)
    if step.first is not None:
        rows = rows[:step.first]
    if step.last is not None:
        rows = rows[-step.last:] if step.last else []
    return rows


def _fields(rows: Sequence[Any]) -> dict[str, str]:
    fields: dict[str, str] = {}
    for row in rows:
        if isinstance(row, Mapping):
            for key in row:
                fields.setdefault(str(key).lower(), str(key))
    return fields


def _property(rows: Sequence[Any], name: str) -> str:
    """A property's spelling in the rows; one no row has is an error naming the closest."""
    fields = _fields(rows)
    if not rows or name.lower() in fields:
        return fields.get(name.lower(), name)
    from hubport.core.config_fields import suggest

    raise CmdletError(f"no property {name!r}{suggest(name, fields.values())} (properties:"
                      f" {', '.join(fields.values())})")


def _get(row: Any, name: str) -> Any:
    if not isinstance(row, Mapping):
        return None
    return next((v for k, v in row.items() if str(k).lower() == name.lower()), None)


def _sort_key(value: Any) -> tuple[int, Any]:
    if value is None:
        return (0, "")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (1, value)
    return (2, display(value).lower())


def _unique(rows: list[Any]) -> list[Any]:
    seen: set[str] = set()
    out = []
    for row in rows:
        key = json.dumps(row, sort_keys=True, default=str)
        if key not in seen:
            seen.add(key)
            out.append(row)
    return out


# -- printing ---------------------------------------------------------------------------


def render(rows: Sequence[Any], output: str, columns: Sequence[str] = ()) -> str:
    """Objects as Format-List, Format-Table or JSON (PowerShell's layouts); no objects
    print nothing, as in PowerShell (JSON: an empty list)."""
    if not rows:
        return "[]\n" if output == "json" else ""
    if columns:
        names = [_property(rows, c) for c in columns]
        rows = [{n: _get(r, n) for n in names} for r in rows]
    if output == "json":
        return json.dumps(list(rows), indent=2, default=str) + "\n"
    if any(not isinstance(r, Mapping) for r in rows):  # values (-ExpandProperty)
        return "".join(display(r) + "\n" for r in rows)
    if output == "list":
        blocks = []
        for row in rows:
            width = max((len(str(k)) for k in row), default=0)
            blocks.append("\n".join(f"{k!s:<{width}} : {display(v)}" for k, v in row.items()))
        return "\n\n".join(blocks) + ("\n" if blocks else "")
    names = list(_fields(rows).values())
    cells = [[_cell(display(_get(r, n))) for n in names] for r in rows]
    widths = [max([len(n), *(len(row[i]) for row in cells)]) for i, n in enumerate(names)]
    lines = [_line(names, widths), _line(["-" * len(n) for n in names], widths)]
    lines += [_line(row, widths) for row in cells]
    return "\n".join(lines) + "\n" if names else ""


def _line(cells: Sequence[str], widths: Sequence[int]) -> str:
    return " ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()


def _cell(text: str) -> str:
    return text if len(text) <= _TABLE_CELL_MAX else text[:_TABLE_CELL_MAX - 3] + "..."


def display(value: Any) -> str:
    """One printable line: lists as PowerShell's {a, b}, control characters escaped."""
    if isinstance(value, bool):
        text = "True" if value else "False"
    elif isinstance(value, (list, tuple)):
        text = "{" + ", ".join(display(v) for v in value) + "}"
    elif isinstance(value, Mapping):
        text = "@{" + "; ".join(f"{k}={display(v)}" for k, v in value.items()) + "}"
    elif value is None:
        text = ""
    else:
        text = str(value)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)
