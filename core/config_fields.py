"""Typed, error-collecting access to the tables of the organization TOML.

Exchange validates a cmdlet's parameters one object at a time; hubport validates a whole
organization file at once, so an administrator sees every problem in one run. That is why
`FieldReader` records an error and returns the default instead of raising: the loader keeps
going and raises one `ConfigErrors` at the end. Keys are case-insensitive because Exchange
parameter names are; messages use the canonical (cmdlet) spelling.
"""

from __future__ import annotations

import builtins
import difflib
import ipaddress
import math
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, overload

from hubport.core.addresses import AddressError, normalize_address

if TYPE_CHECKING:
    from hubport.core.address_space import AddressSpace
    from hubport.core.config import TransportServer

__all__ = [
    "EMBEDDED_SOURCE",
    "ConfigContext",
    "ConfigError",
    "ConfigErrors",
    "FieldReader",
    "check_name",
    "describe_object",
    "format_duration",
    "format_size",
    "parse_duration",
    "parse_endpoint",
    "parse_size",
    "suggest",
]

#: the file name shown in messages about the embedded default organization
EMBEDDED_SOURCE = "<embedded default>"

MAX_NAME_LENGTH = 64
_MISSING: Any = object()

# ---------------------------------------------------------------------------------------------
# errors


class ConfigError(Exception):
    """One problem in the organization: `<file>: <object>: <field>: <reason>`."""

    def __init__(
        self,
        file: str = "",
        object: str = "",
        field: str | None = None,
        reason: str = "",
        *,
        line: int | None = None,
    ) -> None:
        self.file = file
        self.object = object
        self.field = field
        self.reason = reason
        self.line = line
        super().__init__(str(self))

    def __str__(self) -> str:
        return ": ".join(p for p in (self.file, self.object, self.field, self.reason) if p)

    def __reduce__(self) -> Any:  # keep pickling (multiprocessing, logging) working
        return (_rebuild_error, (self.file, self.object, self.field, self.reason, self.line))


def _rebuild_error(
    file: str, object: str, field: str | None, reason: str, line: int | None
) -> ConfigError:
    return ConfigError(file, object, field, reason, line=line)


class ConfigErrors(ConfigError):
    """Every problem found in one validation run; str() lists them one per line."""

    def __init__(self, errors: Iterable[ConfigError]) -> None:
        self.errors: tuple[ConfigError, ...] = tuple(_flatten(errors))
        first = self.errors[0] if self.errors else ConfigError()
        count = len(self.errors)
        super().__init__(
            first.file, "", None, f"{count} configuration error{'s' * (count != 1)}",
            line=first.line,
        )

    def __str__(self) -> str:
        return "\n".join(str(e) for e in self.errors)

    def __iter__(self) -> Iterator[ConfigError]:
        return iter(self.errors)

    def __len__(self) -> int:
        return len(self.errors)

    def __reduce__(self) -> Any:
        return (ConfigErrors, (self.errors,))


def _flatten(errors: Iterable[ConfigError]) -> Iterator[ConfigError]:
    for error in errors:
        if isinstance(error, ConfigErrors):
            yield from error.errors
        else:
            yield error


# ---------------------------------------------------------------------------------------------
# context


class ConfigContext:
    """What a reader needs beyond its own table: file, base folder, servers, the error list."""

    def __init__(
        self, file: str, base_dir: Path, servers: Mapping[str, str] | None = None
    ) -> None:
        self.file = file
        self.base_dir = Path(os.path.abspath(base_dir))
        #: transport server name -> its site, in declaration order
        self.servers: dict[str, str] = dict(servers or {})
        #: declared name -> the transport server read, for connector checks against its settings
        self.transport_servers: dict[str, TransportServer] = {}
        self.errors: list[ConfigError] = []
        #: DeliveryProtocol (upper case) -> agent class, for Delivery Agent connectors
        self.delivery_agents: dict[str, type] = {}
        #: legacy routing groups by lower-case name, for Routing Group connectors
        self.routing_groups: dict[str, Any] = {}

    # -- errors

    def error(self, object: str, field: str | None, reason: str) -> None:
        """Record a problem; the loader raises them all together at the end."""
        self.errors.append(ConfigError(self.file, object, field, reason))

    def add(self, error: ConfigError) -> None:
        """Record an error raised by a connector type (fills in the file if it left it out)."""
        for one in _flatten([error]):
            if not one.file:
                one = ConfigError(self.file, one.object, one.field, one.reason, line=one.line)
            self.errors.append(one)

    def raise_if_errors(self) -> None:
        if self.errors:
            raise ConfigErrors(self.errors)

    # -- servers

    def add_server(self, name: str, site: str, server: TransportServer | None = None) -> None:
        self.servers[name] = site
        if server is not None:
            self.transport_servers[name] = server

    def server_name(self, name: str) -> str | None:
        """The declared spelling of a transport server name (names are case-insensitive)."""
        wanted = name.lower()
        return next((s for s in self.servers if s.lower() == wanted), None)

    def site_of(self, server: str) -> str | None:
        canonical = self.server_name(server)
        return self.servers[canonical] if canonical is not None else None

    def default_source_servers(self) -> tuple[str, ...]:
        """Exchange's "the server where it was created": the first transport server."""
        return tuple(self.servers)[:1]

    # -- paths and readers

    def resolve(self, path: str | Path) -> Path:
        """An absolute path; a relative one is taken from the config file's folder."""
        return Path(os.path.normpath(self.base_dir / Path(path)))

    def reader(self, table: Mapping[str, Any], object: str) -> FieldReader:
        return FieldReader(table, object, self)


def describe_object(section: str, table: Mapping[str, Any], index: int) -> str:
    """`foreign_connector "Fax Gateway"`, or `foreign_connector #2` before a Name is known."""
    name = next((v for k, v in table.items() if k.lower() == "name"), None)
    if isinstance(name, str) and name.strip():
        return f'{section} "{name}"'
    return f"{section} #{index + 1}"


# ---------------------------------------------------------------------------------------------
# the reader


#: section -> {lower-case field: its spelling}, every field a load has asked for: the
#: organization cmdlets complete abbreviated parameter names from it
KNOWN_FIELDS: dict[str, dict[str, str]] = {}
#: section -> {field's spelling: the values it takes}, for tab completion and Get-Help
KNOWN_CHOICES: dict[str, dict[str, tuple[str, ...]]] = {}


class FieldReader:
    """Typed access to one object's table; bad values become recorded errors, not exceptions."""

    def __init__(self, table: Mapping[str, Any], object: str, ctx: ConfigContext) -> None:
        self.object = object
        self.ctx = ctx
        self._values: dict[str, tuple[str, Any]] = {}
        self._read: set[str] = set()
        self._known: dict[str, str] = {}
        self._choices: dict[str, tuple[str, ...]] = {}
        for key, value in table.items():
            low = key.lower()
            if low in self._values:
                first = self._values[low][0]
                ctx.error(object, key, f"duplicate field ({first} and {key} are the same field)")
                continue
            self._values[low] = (key, value)

    @classmethod
    def for_table(
        cls, section: str, table: Mapping[str, Any], index: int, ctx: ConfigContext
    ) -> FieldReader:
        return cls(table, describe_object(section, table, index), ctx)

    # -- raw access

    def error(self, field: str | None, reason: str) -> None:
        self.ctx.error(self.object, field, reason)

    def has(self, key: str) -> bool:
        return key.lower() in self._values

    def known(self, *keys: str) -> None:
        """Declare keys a type accepts but did not read, for did-you-mean suggestions."""
        for key in keys:
            self._known.setdefault(key.lower(), key)

    def offer(self, key: str, choices: Sequence[str]) -> None:
        """Declare the values a field takes (completion, Get-Help)."""
        self._choices[key] = tuple(choices)

    def not_one_of(self, key: str, value: Any, choices: Sequence[str]) -> None:
        """A value outside ``choices``: the error names them and the closest one."""
        self.error(key, f"{_show(value)} is not one of {', '.join(choices)}"
                   + suggest(str(value).strip(), choices))

    def raw(self, key: str, default: Any = None) -> Any:
        """The untyped value (marks the key as read), for types with their own syntax."""
        value = self._take(key)
        return default if value is _MISSING else value

    def _take(self, key: str) -> Any:
        low = key.lower()
        self._known.setdefault(low, key)
        self._read.add(low)
        entry = self._values.get(low)
        return _MISSING if entry is None else entry[1]

    def _wrong_type(self, key: str, expected: str, value: Any) -> None:
        self.error(key, f"expected {expected}, got {_describe(value)}")

    # -- typed fields

    def name(self, key: str = "Name") -> str:
        """The object's Name: required, and a valid Exchange object name."""
        value = self._take(key)
        if value is _MISSING:
            self.error(key, "required")
            return ""
        if not isinstance(value, str):
            self._wrong_type(key, "a string", value)
            return ""
        problem = check_name(value)
        if problem:
            self.error(key, problem)
        return value

    @overload
    def string(
        self, key: str, default: str, required: bool = ..., choices: Sequence[str] | None = ...
    ) -> str: ...
    @overload
    def string(
        self,
        key: str,
        default: str | None = ...,
        required: bool = ...,
        choices: Sequence[str] | None = ...,
    ) -> str | None: ...
    def string(
        self,
        key: str,
        default: str | None = None,
        required: bool = False,
        choices: Sequence[str] | None = None,
    ) -> str | None:
        """A string; a bad or missing value gives `default` (so a str default gives a str)."""
        if choices is not None:
            self.offer(key, choices)
        value = self._take(key)
        if value is _MISSING:
            if required:
                self.error(key, "required")
            return default
        if not isinstance(value, str):
            self._wrong_type(key, "a string", value)
            return default
        if required and not value.strip():
            self.error(key, "must not be empty")
            return default
        if choices is None:
            return value
        for choice in choices:
            if choice.lower() == value.strip().lower():
                return choice
        self.not_one_of(key, value, choices)
        return default

    def bool(self, key: str, default: bool) -> bool:
        self.offer(key, ("$true", "$false"))
        value = self._take(key)
        if value is _MISSING:
            return default
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _BOOL_WORDS:
            return _BOOL_WORDS[value.strip().lower()]
        self._wrong_type(key, "true or false", value)
        return default

    @overload
    def int(
        self,
        key: str,
        default: builtins.int,
        min: builtins.int | None = ...,
        max: builtins.int | None = ...,
        *,
        unlimited: Literal[False] = ...,
    ) -> builtins.int: ...
    @overload
    def int(
        self,
        key: str,
        default: builtins.int | None,
        min: builtins.int | None = ...,
        max: builtins.int | None = ...,
        *,
        unlimited: builtins.bool = ...,
    ) -> builtins.int | None: ...
    def int(
        self,
        key: str,
        default: builtins.int | None,
        min: builtins.int | None = None,
        max: builtins.int | None = None,
        *,
        unlimited: builtins.bool = False,
    ) -> builtins.int | None:
        """An integer; with `unlimited`, the word `unlimited` gives None."""
        value = self._take(key)
        if value is _MISSING:
            return default
        if isinstance(value, str) and value.strip().lower() == "unlimited":
            if unlimited:
                return None
            self.error(key, "cannot be unlimited")
            return default
        number = _as_int(value)
        if number is None:
            self._wrong_type(key, "an integer" + (" or unlimited" if unlimited else ""), value)
            return default
        problem = _range_problem(number, min, max, str)
        if problem:
            self.error(key, problem)
            return default
        return number

    def percent(self, key: str, default: float, *, min: float = 0.0,
                max: float = 100.0) -> float:
        """A percentage: a number (`90`, `97.5`) or the same as a string, `%` allowed."""
        value = self._take(key)
        if value is _MISSING:
            return default
        number: float | None = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str) and re.fullmatch(r"\s*\d+(?:\.\d+)?\s*%?\s*", value):
            number = float(value.strip().rstrip("%"))
        if number is None or number != number:  # NaN
            self._wrong_type(key, "a percentage (a number from 0 to 100)", value)
            return default
        problem = _range_problem(number, min, max, _num)
        if problem:
            self.error(key, problem)
            return default
        return number

    @overload
    def size(
        self,
        key: str,
        default: builtins.int,
        *,
        min: builtins.int | None = ...,
        max: builtins.int | None = ...,
        unlimited: Literal[False],
    ) -> builtins.int: ...
    @overload
    def size(
        self,
        key: str,
        default: builtins.int | None,
        *,
        min: builtins.int | None = ...,
        max: builtins.int | None = ...,
        unlimited: builtins.bool = ...,
    ) -> builtins.int | None: ...
    def size(
        self,
        key: str,
        default: builtins.int | None,
        *,
        min: builtins.int | None = None,
        max: builtins.int | None = None,
        unlimited: builtins.bool = True,
    ) -> builtins.int | None:
        """A byte count: an integer, `10MB`, `10 MB (10,485,760 bytes)`, or `unlimited` (None)."""
        value = self._take(key)
        if value is _MISSING:
            return default
        try:
            size = parse_size(value)
        except (TypeError, ValueError) as exc:
            self.error(key, str(exc))
            return default
        if size is None:
            if unlimited:
                return None
            self.error(key, "cannot be unlimited")
            return default
        problem = _range_problem(size, min, max, format_size)
        if problem:
            self.error(key, problem)
            return default
        return size

    @overload
    def duration(
        self,
        key: str,
        default: float | str,
        min: float | str | None = ...,
        max: float | str | None = ...,
    ) -> float: ...
    @overload
    def duration(
        self,
        key: str,
        default: None,
        min: float | str | None = ...,
        max: float | str | None = ...,
    ) -> float | None: ...
    def duration(
        self,
        key: str,
        default: float | str | None,
        min: float | str | None = None,
        max: float | str | None = None,
    ) -> float | None:
        """Seconds, from a number of seconds, a TimeSpan (`1.00:00:00`) or shorthand (`4h`)."""
        fallback = None if default is None else parse_duration(default)
        value = self._take(key)
        if value is _MISSING:
            return fallback
        try:
            seconds = parse_duration(value)
        except (TypeError, ValueError) as exc:
            self.error(key, str(exc))
            return fallback
        low = None if min is None else parse_duration(min)
        high = None if max is None else parse_duration(max)
        problem = _range_problem(seconds, low, high, format_duration)
        if problem:
            self.error(key, problem)
            return fallback
        return seconds

    @overload
    def path(
        self, key: str, default: str | Path, *, nullable: Literal[False] = ...
    ) -> Path: ...
    @overload
    def path(
        self, key: str, default: str | Path | None, *, nullable: builtins.bool = ...
    ) -> Path | None: ...
    def path(
        self, key: str, default: str | Path | None, *, nullable: builtins.bool = False
    ) -> Path | None:
        """An absolute path (relative ones from the config file's folder).

        `""` gives None (the feature is off, like Exchange's `$null`) where `nullable` is set
        or the default itself is None.
        """
        value = self._take(key)
        raw: Any = default
        if value is not _MISSING:
            if isinstance(value, str):
                raw = value
            else:
                self._wrong_type(key, "a path string", value)
        if raw is None or (isinstance(raw, str) and not raw.strip()):
            if nullable or default is None:
                return None
            self.error(key, "must not be empty")
            raw = default
        if isinstance(raw, str) and ("\0" in raw or any(ord(ch) < 32 for ch in raw)):
            self.error(key, "contains a control character")
            raw = default
        return None if raw is None else self.ctx.resolve(raw)

    def string_list(self, key: str, default: Sequence[str] = ()) -> tuple[str, ...]:
        """A list of strings; a single string counts as a list of one (as in PowerShell)."""
        items = self._list(key)
        return tuple(default) if items is None else items

    def _list(self, key: str) -> tuple[str, ...] | None:
        value = self._take(key)
        if value is _MISSING:
            return None
        if isinstance(value, str):
            return (value,)
        if not isinstance(value, list):
            self._wrong_type(key, "a list of strings", value)
            return None
        good = []
        for index, item in enumerate(value):
            if isinstance(item, str):
                good.append(item)
            else:
                self.error(key, f"entry {index + 1}: expected a string, got {_describe(item)}")
        return tuple(good)

    def address_spaces(
        self, key: str, required: builtins.bool = False
    ) -> tuple[AddressSpace, ...]:
        """Exchange address spaces (`contoso.com`, `*.contoso.com;5`, `FAX:*;1`)."""
        from hubport.core.address_space import AddressSpace, AddressSpaceError

        items = self._list(key)
        if not items:
            if required:
                self.error(key, "required: at least one address space")
            return ()
        spaces = []
        for item in items:
            try:
                spaces.append(AddressSpace.parse(item))
            except AddressSpaceError as exc:
                self.error(key, f"{_show(item)}: {exc}")
        return tuple(spaces)

    def server_list(self, key: str, default: Sequence[str]) -> tuple[str, ...]:
        """Names of transport servers declared in this organization (declared spelling)."""
        items = self._list(key)
        if items is None:
            return tuple(default)
        if not items:
            self.error(key, "must name at least one transport server")
            return tuple(default)
        names: list[str] = []
        for item in items:
            name = self._server(key, item)
            if name is not None and name not in names:
                names.append(name)
        return tuple(names)

    @overload
    def server(self, key: str, default: str) -> str: ...
    @overload
    def server(self, key: str, default: str | None) -> str | None: ...
    def server(self, key: str, default: str | None) -> str | None:
        """One transport server name (for example a mailbox's `Server`)."""
        value = self._take(key)
        if value is _MISSING:
            return default
        if not isinstance(value, str):
            self._wrong_type(key, "a transport server name", value)
            return default
        found = self._server(key, value)
        return default if found is None else found

    def _server(self, key: str, name: str) -> str | None:
        found = self.ctx.server_name(name.strip())
        if found is None:
            known = ", ".join(self.ctx.servers) or "none"
            self.error(
                key,
                f"{_show(name)} is not a transport server of this organization"
                f"{suggest(name, self.ctx.servers)} (servers: {known})",
            )
        return found

    @overload
    def smtp_address(self, key: str, required: builtins.bool = ..., *, default: str) -> str: ...
    @overload
    def smtp_address(
        self, key: str, required: builtins.bool = ..., default: str | None = ...
    ) -> str | None: ...
    def smtp_address(
        self, key: str, required: builtins.bool = False, default: str | None = None
    ) -> str | None:
        """An SMTP address in hubport's canonical form (`local@domain`, domain lower-cased)."""
        value = self._take(key)
        if value is _MISSING:
            if required:
                self.error(key, "required")
            return default
        if not isinstance(value, str):
            self._wrong_type(key, "an SMTP address", value)
            return default
        try:
            return normalize_address(value)
        except AddressError as exc:
            self.error(key, f"{_show(value)}: {exc}")
            return default

    def endpoints(
        self,
        key: str,
        default: Sequence[tuple[str, builtins.int]] = (),
        *,
        port: builtins.int = 53,
    ) -> tuple[tuple[str, builtins.int], ...]:
        """IP endpoints: `192.0.2.1`, `192.0.2.1:5353`, `2001:db8::1`, `[2001:db8::1]:5353`."""
        items = self._list(key)
        if items is None:
            return tuple(default)
        result = []
        for item in items:
            try:
                result.append(parse_endpoint(item, port))
            except ValueError as exc:
                self.error(key, f"{_show(item)}: {exc}")
        return tuple(result)

    # -- end of an object

    def finish(self) -> None:
        """Report every key nobody read: a typo must not be silently ignored."""
        if "[" not in self.object:  # the fields each section knows, for the cmdlets
            section = self.object.split(" ", 1)[0]
            KNOWN_FIELDS.setdefault(section, {}).update(self._known)
            KNOWN_CHOICES.setdefault(section, {}).update(self._choices)
        for low, (spelling, _value) in self._values.items():
            if low not in self._read:
                self.error(spelling, "unknown field" + suggest(spelling, self._known.values()))


# ---------------------------------------------------------------------------------------------
# value syntax (public: the management commands reuse it)

_BOOL_WORDS = {"true": True, "$true": True, "false": False, "$false": False}


def check_name(name: str) -> str | None:
    """Why `name` is not a valid Exchange object name, or None when it is."""
    if name == "":
        return "must not be empty"
    if len(name) > MAX_NAME_LENGTH:
        return f"longer than {MAX_NAME_LENGTH} characters ({len(name)})"
    if any(ord(ch) < 32 or 0x7F <= ord(ch) < 0xA0 for ch in name):
        return "contains a control character"
    if "/" in name or "\\" in name:
        return "must not contain / or \\"
    if name in (".", ".."):
        return "must not be . or .."
    if name != name.strip():
        return "must not start or end with a space"
    return None


def suggest(word: str, candidates: Iterable[str]) -> str:
    """`; did you mean "X"?` for the closest candidate (case-insensitive), or ''."""
    by_lower = {c.lower(): c for c in candidates}
    close = difflib.get_close_matches(word.lower(), list(by_lower), n=1, cutoff=0.6)
    return f'; did you mean "{by_lower[close[0]]}"?' if close else ""


_SIZE_UNITS = {"b": 1, "kb": 1 << 10, "mb": 1 << 20, "gb": 1 << 30, "tb": 1 << 40}
_GROUPED = r"(?:\d{1,3}(?:,\d{3})+|\d+)"  # 10485760 or 10,485,760 (never 1,5)
_SIZE = re.compile(
    rf"(?P<number>{_GROUPED}(?:\.\d+)?)\s*(?P<unit>[kmgt]?b)?\s*"
    rf"(?:\(\s*(?P<bytes>{_GROUPED})\s*bytes\s*\))?",
    re.IGNORECASE,
)


def parse_size(value: Any) -> int | None:
    """Bytes from an int or an Exchange ByteQuantifiedSize string; `unlimited` gives None.

    Raises ValueError for bad syntax, TypeError for a value of the wrong type; str() of
    either is the reason shown to the administrator.

    In `10 MB (10,485,760 bytes)` (how Exchange displays sizes) the exact byte count wins.
    """
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise TypeError(f"expected a size (bytes, 10MB, unlimited), got {_describe(value)}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"must not be negative, got {value}")
        return value
    text = value.strip()
    if text.lower() == "unlimited":
        return None
    match = _SIZE.fullmatch(text)
    if not match:
        raise ValueError(
            f"{_show(value)} is not a size (examples: 1048576, 64KB, 10 MB, unlimited)")
    if match["bytes"]:
        return int(match["bytes"].replace(",", ""))
    try:
        number = Decimal(match["number"].replace(",", ""))
    except InvalidOperation:  # pragma: no cover - the pattern only lets digits through
        raise ValueError(f"{_show(value)} is not a size") from None
    return int(number * _SIZE_UNITS[(match["unit"] or "b").lower()])


def format_size(size: int | None) -> str:
    """`10MB`, `64KB`, `1000B`, `unlimited`: the shortest exact spelling."""
    if size is None:
        return "unlimited"
    for unit in ("TB", "GB", "MB", "KB"):
        factor = _SIZE_UNITS[unit.lower()]
        if size and size % factor == 0:
            return f"{size // factor}{unit}"
    return f"{size}B"


_TIMESPAN = re.compile(
    r"(?P<sign>-)?(?:(?P<days>\d+)\.)?(?P<hours>\d+):(?P<minutes>\d+)"
    r"(?::(?P<seconds>\d+)(?:\.(?P<fraction>\d{1,7}))?)?"
)
_SHORTHAND_PART = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)\s*", re.IGNORECASE)
_SHORTHAND = re.compile(r"(?:\d+(?:\.\d+)?\s*(?:ms|s|m|h|d|w)\s*)+", re.IGNORECASE)
_UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(value: Any) -> float:
    """Seconds from a number of seconds, a .NET TimeSpan or shorthand (`30s`, `1h30m`, `2d`).

    TimeSpan forms: `hh:mm`, `hh:mm:ss`, `hh:mm:ss.fffffff`, `d.hh:mm:ss[.fffffff]`, with the
    .NET limits (hours < 24, minutes and seconds < 60). A bare digit string is refused: .NET
    reads `"30"` as 30 days, which nobody means.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise TypeError(f"expected a duration (seconds, 00:05:00, 5m), got {_describe(value)}")
    if isinstance(value, (int, float)):
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"must be a non-negative number of seconds, got {value}")
        return float(value)
    text = value.strip()
    if text.isdigit():
        raise ValueError(
            f"{_show(value)} is ambiguous (a TimeSpan reads it as days): "
            f"write {text}s, {text}d or the number {text}"
        )
    match = _TIMESPAN.fullmatch(text)
    if match:
        return _timespan_seconds(match, value)
    if _SHORTHAND.fullmatch(text):
        return sum(
            float(number) * _UNIT_SECONDS[unit.lower()]
            for number, unit in _SHORTHAND_PART.findall(text)
        )
    raise ValueError(
        f"{_show(value)} is not a duration (examples: 30s, 5m, 4h, 2d, 00:05:00, 2.00:00:00)"
    )


def _timespan_seconds(match: re.Match[str], value: str) -> float:
    hours, minutes = int(match["hours"]), int(match["minutes"])
    seconds = int(match["seconds"] or 0)
    if match["sign"]:
        raise ValueError(f"{_show(value)}: must not be negative")
    if hours > 23 or minutes > 59 or seconds > 59:
        raise ValueError(f"{_show(value)}: hours must be < 24, minutes and seconds < 60")
    fraction = float("0." + match["fraction"]) if match["fraction"] else 0.0
    days = int(match["days"] or 0)
    return days * 86400.0 + hours * 3600 + minutes * 60 + seconds + fraction


def format_duration(seconds: float | None) -> str:
    """`2d`, `4h`, `5m`, `30s`, `0.1s`: the largest whole unit."""
    if seconds is None:
        return "unlimited"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


def parse_endpoint(text: str, default_port: int) -> tuple[str, int]:
    """(ip, port) from `IP`, `IPv4:port`, bare IPv6 or `[IPv6]:port`."""
    text = text.strip()
    host, port = text, default_port
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise ValueError("expected [IPv6]:port")
        port = _port(rest[1:]) if rest else default_port
    elif text.count(":") == 1:
        host, _colon, port_text = text.partition(":")
        port = _port(port_text)
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError("not an IP address (write IP, IP:port or [IPv6]:port)") from None
    return address.compressed, port


def _port(text: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError(f"invalid port {text!r}")
    return int(text)


# ---------------------------------------------------------------------------------------------
# helpers


def _as_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and re.fullmatch(rf"-?{_GROUPED}", value.strip()):
        return int(value.strip().replace(",", ""))
    return None


def _range_problem(value: Any, low: Any, high: Any, show: Any) -> str | None:
    if low is not None and high is not None and not low <= value <= high:
        return f"must be between {show(low)} and {show(high)}, got {show(value)}"
    if low is not None and value < low:
        return f"must be at least {show(low)}, got {show(value)}"
    if high is not None and value > high:
        return f"must be at most {show(high)}, got {show(value)}"
    return None


def _show(value: Any) -> str:
    text = value if isinstance(value, str) else repr(value)
    text = text if len(text) <= 60 else text[:57] + "..."
    return '"' + text.encode("unicode_escape").decode("ascii").replace('"', '\\"') + '"'


_TYPE_NAMES = {
    bool: "a boolean", int: "an integer", float: "a number", str: "a string",
    list: "a list", dict: "a table",
}


def _describe(value: Any) -> str:
    kind = _TYPE_NAMES.get(type(value), f"a {type(value).__name__}")
    if isinstance(value, (list, dict)):
        return kind
    if isinstance(value, bool):
        return f"{kind} ({str(value).lower()})"
    return f"{kind} ({_show(value) if isinstance(value, str) else value})"


def _num(value: float) -> str:
    """A number without a useless fraction: 90, 97.5."""
    return f"{value:g}"
