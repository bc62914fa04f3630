"""Cmdlet lines as Exchange administrators type them (the management shell's syntax).

``Get-Message -Queue 'HUB01\\Unreachable' -ResultSize 10 | Format-List`` is split here into
pipeline stages, each a cmdlet name with its arguments, then bound to the cmdlet's declared
parameters the way PowerShell binds them:

- names of cmdlets and parameters are case-insensitive; a parameter may be shortened to any
  unique prefix (an ambiguous one names the candidates, an unknown one the closest match);
- ``-Name value``, ``-Name:value``, a switch alone (``-Resubmit``) or ``-Switch:$false``;
- the first positional argument is ``-Identity``;
- ``$true``, ``$false``, ``$null``; comma lists (``a,b,"c d"``);
- single, double and typographic quotes (‘ ’ “ ” « »), also mismatched pairs as printed
  documents have them, and typographic quotes inside ASCII ones (``'‘HUB01\\4’'``);
- ``{ ... }`` script blocks (Where-Object) kept whole.

A parameter that is given no value (``-WithNDR`` when bash ate ``$false``) is an error that
says to put the line in single quotes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from hubport.core.config_fields import suggest

__all__ = ["Bound", "CmdletError", "Parameter", "bind", "split_pipeline", "tokenize"]

_SINGLE, _DOUBLE, _GUILLEMETS = "'‘’‚‛", '"“”„', "«»"
_ANY = _SINGLE + _DOUBLE + _GUILLEMETS
#: opening quote -> what closes it. As in PowerShell, typographic single and double quotes
#: count as ' and "; a typographic opener is closed by any quote, since printed documents
#: pair them loosely (“HUB01\4')
QUOTES = {"'": _SINGLE, '"': _DOUBLE, **dict.fromkeys(_SINGLE[1:] + _DOUBLE[1:] + _GUILLEMETS,
                                                     _ANY)}
_TYPOGRAPHIC = "‘’‚‛“”„«»"


class CmdletError(Exception):
    """A line that cannot run; ``str()`` says what is wrong and, where it can, the fix."""


@dataclass(frozen=True)
class Token:
    text: str
    quoted: bool = False
    parameter: bool = False  # -Name (text is the name without the dash)
    attached: str | None = None  # -Name:value
    block: bool = False  # { ... }
    tables: tuple[dict[str, Any], ...] = ()  # @{Name='X'; Port=25}, @{...}: hash tables


def split_pipeline(line: str) -> list[str]:
    """The stages of ``a | b | c``; a ``|`` inside quotes or braces belongs to its stage."""
    stages: list[str] = []
    current: list[str] = []
    quote: str | None = None
    depth = 0
    for ch in line:
        if quote is not None:
            current.append(ch)
            if ch in QUOTES[quote]:
                quote = None
            continue
        if ch in QUOTES:
            quote = ch
        elif ch == "{":
            depth += 1
        elif ch == "}":
            depth = max(0, depth - 1)
        elif ch == "|" and depth == 0:
            stages.append("".join(current).strip())
            current = []
            continue
        current.append(ch)
    if quote is not None:
        raise CmdletError(f"a quote {quote} is never closed")
    stages.append("".join(current).strip())
    if any(not stage for stage in stages):
        raise CmdletError("an empty stage in the pipeline (two | in a row, or one at an end)")
    return stages


def tokenize(stage: str) -> list[Token]:
    """The words of one stage: parameters, values (quoted or not), script blocks."""
    tokens: list[Token] = []
    i, n = 0, len(stage)
    while i < n:
        ch = stage[i]
        if ch.isspace():
            i += 1
            continue
        if stage.startswith("@{", i):
            tables: list[dict[str, Any]] = []
            while stage.startswith("@{", i):
                end = _block_end(stage, i + 1)
                tables.append(hash_table(stage[i + 2:end]))
                i = end + 1
                while i < n and stage[i].isspace():
                    i += 1
                if i < n and stage[i] == "," and stage[i + 1:].lstrip().startswith("@{"):
                    i = stage.index("@{", i)
            tokens.append(Token(stage, tables=tuple(tables)))
            continue
        if ch == "{":
            end = _block_end(stage, i)
            tokens.append(Token(stage[i + 1:end].strip(), block=True))
            i = end + 1
            continue
        if ch == "-" and i + 1 < n and (stage[i + 1].isalpha() or stage[i + 1] == "-"):
            j = i + 1
            while j < n and (stage[j].isalnum() or stage[j] in "_-"):
                j += 1
            name = stage[i + 1:j].lstrip("-")
            attached = None
            if j < n and stage[j] == ":":
                value, j = _word(stage, j + 1)
                attached = value
            tokens.append(Token(name, parameter=True, attached=attached))
            i = j
            continue
        value, i = _word(stage, i)
        tokens.append(Token(value, quoted=True))
    return tokens


def hash_table(body: str) -> dict[str, Any]:
    """The body of ``@{Name='EX2003BH1'; Port=2525; Enabled=$true}``: keys and values
    separated by ``;`` or new lines; quoted values are text, bare ones numbers, $true,
    $false or text."""
    table: dict[str, Any] = {}
    for entry in _split_entries(body):
        key, sep, raw = entry.partition("=")
        if not sep or not key.strip():
            raise CmdletError(f"@{{{body}}}: {entry.strip()!r} is not Key = Value")
        value, end = _word(raw.strip(), 0) if raw.strip() else ("", 0)
        if raw.strip()[end:].strip():
            raise CmdletError(f"@{{{body}}}: {entry.strip()!r}: quote a value with spaces")
        bare = raw.strip()[:1] not in QUOTES
        table[key.strip()] = _scalar(value) if bare else value
    return table


def _split_entries(body: str) -> list[str]:
    entries: list[str] = []
    current: list[str] = []
    quote: str | None = None
    for ch in body:
        if quote is not None:
            if ch in QUOTES[quote]:
                quote = None
        elif ch in QUOTES:
            quote = ch
        elif ch in ";\n":
            entries.append("".join(current))
            current = []
            continue
        current.append(ch)
    entries.append("".join(current))
    return [e for e in entries if e.strip()]


def _scalar(text: str) -> Any:
    low = text.lower()
    if low in ("$true", "$false"):
        return low == "$true"
    if low == "$null":
        return None
    try:
        return int(text)
    except ValueError:
        return text


def _block_end(text: str, start: int) -> int:
    depth = 0
    quote: str | None = None
    for j in range(start, len(text)):
        ch = text[j]
        if quote is not None:
            if ch in QUOTES[quote]:
                quote = None
        elif ch in QUOTES:
            quote = ch
        elif ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return j
    raise CmdletError("a { is never closed")


def _word(text: str, i: int) -> tuple[str, int]:
    """One value from ``i``: quoted pieces and bare pieces up to a space (a comma list
    stays one word, as PowerShell reads it); quotes removed."""
    out: list[str] = []
    n = len(text)
    while i < n and (not text[i].isspace() or _list_goes_on(text, i, out)):
        if text[i].isspace():  # "a", "b": a comma list may have spaces after its commas
            i += 1
            continue
        ch = text[i]
        if ch in QUOTES:
            closers = QUOTES[ch]
            j = i + 1
            while j < n and text[j] not in closers:
                j += 1
            if j >= n:
                raise CmdletError(f"a quote {ch} is never closed")
            piece = text[i + 1:j]
            # « French » spacing inside typographic quotes is typography, not data
            out.append(piece.strip() if ch in _TYPOGRAPHIC else piece)
            i = j + 1
            continue
        out.append(ch)
        i += 1
    return _strip_typographic("".join(out)), i


def _list_goes_on(text: str, i: int, out: Sequence[str]) -> bool:
    """At a space after a list's comma, with another item (not a parameter) to come."""
    if not out or out[-1] != ",":
        return False
    rest = text[i:].lstrip()
    return bool(rest) and not rest.startswith(("-", "|"))


def _strip_typographic(value: str) -> str:
    """Typographic quotes left inside ASCII ones ('‘HUB01\\4’') are quoting, not data."""
    while len(value) >= 2 and value[0] in _TYPOGRAPHIC and value[-1] in _TYPOGRAPHIC:
        value = value[1:-1]
    return value


# -- binding -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Parameter:
    """A cmdlet's parameter: its Exchange name, how its text becomes a value, its default,
    and whether it is a switch (present: true)."""

    name: str
    convert: Callable[[str], Any] = str
    default: Any = None
    switch: bool = False
    positional: bool = False
    help: str = ""


@dataclass
class Bound:
    cmdlet: str
    values: dict[str, Any] = field(default_factory=dict)
    given: set[str] = field(default_factory=set)


def bind(cmdlet: str, tokens: Sequence[Token], parameters: Sequence[Parameter]) -> Bound:
    """Match the tokens to ``parameters`` (prefixes, positional Identity, switches)."""
    by_name = {p.name.lower(): p for p in parameters}
    bound = Bound(cmdlet, {p.name: p.default for p in parameters})
    positional = [p for p in parameters if p.positional]
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if token.parameter:
            parameter = _match(cmdlet, token.text, by_name)
            if parameter.switch:
                value: Any = True if token.attached is None else \
                    boolean(token.attached, parameter.name)
            elif token.attached is not None:
                value = _convert(cmdlet, parameter, token.attached)
            else:
                if i + 1 >= len(tokens) or tokens[i + 1].parameter:
                    raise CmdletError(
                        f"{cmdlet}: -{parameter.name} needs a value. From bash, put the whole"
                        f" line in single quotes ('{cmdlet} -{parameter.name} $false'): in"
                        " double quotes or none, bash removes $true, $false and $_")
                i += 1
                value = _convert(cmdlet, parameter, tokens[i].text)
            bound.values[parameter.name] = value
            bound.given.add(parameter.name)
        else:
            if not positional:
                raise CmdletError(f"{cmdlet}: {token.text!r} is not a parameter value this"
                                  " cmdlet takes by position")
            parameter = positional.pop(0)
            bound.values[parameter.name] = _convert(cmdlet, parameter, token.text)
            bound.given.add(parameter.name)
        i += 1
    return bound


def _match(cmdlet: str, name: str, by_name: Mapping[str, Parameter]) -> Parameter:
    wanted = name.lower()
    if wanted in by_name:
        return by_name[wanted]
    candidates = [p for key, p in by_name.items() if key.startswith(wanted)]
    if len(candidates) == 1:
        return candidates[0]
    if candidates:
        names = ", ".join(f"-{p.name}" for p in candidates)
        raise CmdletError(f"{cmdlet}: -{name} is ambiguous: {names}")
    known = [p.name for p in by_name.values()]
    raise CmdletError(f"{cmdlet}: no parameter -{name}{suggest(name, known)}"
                      f" (parameters: {', '.join('-' + k for k in known)})")


def _convert(cmdlet: str, parameter: Parameter, text: str) -> Any:
    try:
        return parameter.convert(text)
    except (ValueError, TypeError) as exc:
        raise CmdletError(f"{cmdlet}: -{parameter.name} {text!r}: {exc}") from None


def boolean(text: str, name: str = "") -> bool:
    """``$true``/``$false`` (and true/false, 1/0)."""
    value = text.strip().lower().lstrip("$")
    if value in ("true", "1"):
        return True
    if value in ("false", "0"):
        return False
    raise ValueError(f"{'-' + name + ' ' if name else ''}expects $true or $false, not {text!r}")


def text_list(text: str) -> list[str]:
    """A comma list: ``a,b`` or ``"a","b"`` (quotes already removed by the tokenizer)."""
    return [_strip_typographic(part.strip()) for part in text.split(",") if part.strip()]
