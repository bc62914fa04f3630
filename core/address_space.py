"""Exchange address spaces (`[Type:]Space[;Cost]`) and most-specific matching (Exchange 2010).

Send, Foreign and Delivery Agent connectors all route by address space: the connector whose
space matches a recipient most specifically wins, and only ties go on to cost.  Keeping the
specificity score here, next to the syntax, means every connector kind ranks the same way.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TypeVar

from hubport.core.addresses import AddressError, check_hostname, domain_to_ascii

__all__ = ["MAX_COST", "MIN_COST", "AddressSpace", "AddressSpaceError", "best_matches"]

MIN_COST = 1
MAX_COST = 100
_TYPE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*", re.ASCII)
_COST = re.compile(r"-?[0-9]+", re.ASCII)
_WILDCARDS = frozenset("*?")

T = TypeVar("T")


class AddressSpaceError(ValueError):
    """An address space that Exchange would refuse; str() is the reason."""


@dataclass(frozen=True)
class AddressSpace:
    """One connector address space.  Constructing it validates and canonicalizes it.

    Canonical form: type upper-cased; SMTP spaces lower-cased; free-text spaces stripped;
    X400 spaces kept byte for byte (a blank value such as `a= ` is meaningful in X.400).
    """

    type: str
    space: str
    cost: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.type, str) or not _TYPE_NAME.fullmatch(self.type):
            raise AddressSpaceError(f"invalid address space type {_show(self.type)}")
        if isinstance(self.cost, bool) or not isinstance(self.cost, int):
            raise AddressSpaceError(
                f"address space cost must be an integer, not {self.cost!r}"
            )
        if not MIN_COST <= self.cost <= MAX_COST:
            raise AddressSpaceError(
                f"address space cost {self.cost} is out of range {MIN_COST}-{MAX_COST}"
            )
        addr_type = self.type.upper()
        object.__setattr__(self, "type", addr_type)
        object.__setattr__(self, "space", _canonical_space(addr_type, self.space))

    @classmethod
    def parse(cls, text: str) -> AddressSpace:
        """Parse `[Type:]Space[;Cost]`; type defaults to SMTP, cost to 1."""
        text = text.strip()
        _check_no_controls(text)
        addr_type, rest = _split_type(text)
        space, cost = _split_cost(addr_type, rest)
        return cls(addr_type, space, cost)

    def __str__(self) -> str:
        return f"{self.type}:{self.space};{self.cost}"

    def match(self, addr_type: str, address: str) -> int | None:
        """None when the recipient is outside this space, else a score (higher = more specific)."""
        if addr_type.strip().upper() != self.type:
            return None
        if self.type == "SMTP":
            return _match_smtp(self.space, address)
        if self.type == "X400":
            return _match_x400(self.space, address)
        if _glob_match(self.space, address):
            return sum(1 for ch in self.space if ch not in _WILDCARDS)
        return None


def best_matches(
    spaces: Iterable[tuple[T, AddressSpace]], addr_type: str, address: str
) -> list[tuple[T, AddressSpace, int]]:
    """Every (owner, space, score) with the highest score, in input order; ties are kept so the
    caller can go on to aggregate cost, proximity and name (Exchange's selection steps 4-6)."""
    best: list[tuple[T, AddressSpace, int]] = []
    for owner, space in spaces:
        score = space.match(addr_type, address)
        if score is None:
            continue
        if best and score < best[0][2]:
            continue
        if best and score > best[0][2]:
            best = []
        best.append((owner, space, score))
    return best


# ---------------------------------------------------------------------------------------------
# parsing


def _show(value: object) -> str:
    """Quote a user value for an error message without echoing megabytes of it."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _check_no_controls(text: str) -> None:
    if any(ch < " " or ch == "\x7f" for ch in text):
        raise AddressSpaceError("control character in address space")


def _split_type(text: str) -> tuple[str, str]:
    """Split off `Type:`; SMTP spaces never contain ':', so a colon always ends a type."""
    prefix, colon, rest = text.partition(":")
    if not colon:
        return "SMTP", text
    if not _TYPE_NAME.fullmatch(prefix):
        raise AddressSpaceError(f"invalid address space type {_show(prefix)}")
    return prefix.upper(), rest


def _split_cost(addr_type: str, rest: str) -> tuple[str, int]:
    """Take the cost from after the LAST ';' (X400 spaces contain ';' themselves)."""
    space, semicolon, tail = rest.rpartition(";")
    if not semicolon:
        return rest, MIN_COST
    tail = tail.strip()
    if _COST.fullmatch(tail):
        return space, _cost_value(tail)
    if addr_type == "SMTP":
        raise AddressSpaceError(f"invalid address space cost {_show(tail)}")
    raise AddressSpaceError(
        "a non-SMTP address space that contains ';' must end with an explicit cost"
    )


def _cost_value(digits: str) -> int:
    # Long digit strings are out of range anyway; never hand them to int() (str->int limit).
    value = int(digits) if len(digits) <= 4 else MAX_COST + 1
    if not MIN_COST <= value <= MAX_COST:
        raise AddressSpaceError(
            f"address space cost {_show(digits)} is out of range {MIN_COST}-{MAX_COST}"
        )
    return value


def _canonical_space(addr_type: str, space: object) -> str:
    if not isinstance(space, str):
        raise AddressSpaceError(
            f"address space must be text, not {type(space).__name__}"
        )
    _check_no_controls(space)
    if addr_type == "SMTP":
        return _canonical_smtp(space)
    if addr_type == "X400":
        _x400_attributes(space)
        return space
    if space.strip() == "":
        raise AddressSpaceError(f"empty {addr_type} address space")
    return space.strip()


def _canonical_smtp(space: str) -> str:
    """`*`, `domain` or `*.domain`, RFC 1035, lower-cased."""
    space = space.strip().lower()
    if space == "":
        raise AddressSpaceError("empty address space")
    if space == "--":
        raise AddressSpaceError("'--' is valid only on Edge Send connectors")
    if space == "*":
        return space
    domain = space.removeprefix("*.")
    if "*" in domain:
        raise AddressSpaceError(
            f"invalid SMTP address space {_show(space)}: a wildcard must be '*' alone "
            "or a leading '*.'"
        )
    try:
        check_hostname(domain)
    except AddressError as exc:
        raise AddressSpaceError(
            f"invalid SMTP address space {_show(space)}: {exc}"
        ) from None
    return space


def _x400_attributes(text: str) -> list[tuple[str, str]]:
    """Loose RFC 1685 check: `name=value` pairs separated by ';' (empty elements ignored).

    Names are lower-cased and values stripped and case-folded, for comparison only.
    """
    attributes = []
    for element in text.split(";"):
        if element.strip() == "":
            continue
        name, equals, value = element.partition("=")
        if not equals or name.strip() == "":
            raise AddressSpaceError(
                f"invalid X400 address space element {_show(element)}: expected name=value"
            )
        attributes.append((name.strip().lower(), value.strip().casefold()))
    if not attributes:
        raise AddressSpaceError("empty X400 address space")
    return attributes


# ---------------------------------------------------------------------------------------------
# matching


def _match_smtp(space: str, address: str) -> int | None:
    """`*` = 0, `*.d` = 2 x labels(d), exact `d` = 2 x labels(d) + 1."""
    if "@" not in address:
        return None
    if space == "*":
        return 0
    try:
        domain = domain_to_ascii(address.rpartition("@")[2])
    except AddressError:
        return None
    if space.startswith("*."):
        base = space[2:]
        if domain == base or domain.endswith("." + base):
            return 2 * _labels(base)
        return None
    return 2 * _labels(space) + 1 if domain == space else None


def _labels(domain: str) -> int:
    return domain.count(".") + 1


def _match_x400(space: str, address: str) -> int | None:
    """Every attribute of the space must occur in the recipient with an equal value (`*` = any).

    Score = number of attributes in the space.  (How Exchange matches X400 spaces is
    unconfirmed; this is the "leading attributes" choice Exchange leaves open, order-free.)
    """
    wanted = _x400_attributes(space)
    try:
        have = _x400_attributes(_x400_recipient_text(address))
    except AddressSpaceError:
        return None
    for name, value in wanted:
        if not any(n == name and (value == "*" or v == value) for n, v in have):
            return None
    return len(wanted)


def _x400_recipient_text(address: str) -> str:
    """Recipient X400 addresses come as `c=US;a= ;...` or RFC 1685 style `/c=US/a= /...`."""
    if address.startswith("/") and ";" not in address:
        return address.replace("/", ";")
    return address


def _glob_match(pattern: str, text: str) -> bool:
    """Case-insensitive glob with `*` (any run) and `?` (one character), nothing else.

    Iterative with single-star backtracking, so hostile patterns cannot blow up like a regex.
    """
    p = [ch.casefold() for ch in pattern]
    t = [ch.casefold() for ch in text]
    pi = ti = 0
    star = -1
    mark = 0
    while ti < len(t):
        if pi < len(p) and p[pi] == "*":
            star, mark = pi, ti
            pi += 1
        elif pi < len(p) and (p[pi] == "?" or p[pi] == t[ti]):
            pi += 1
            ti += 1
        elif star >= 0:
            pi = star + 1
            mark += 1
            ti = mark
        else:
            return False
    while pi < len(p) and p[pi] == "*":
        pi += 1
    return pi == len(p)
