"""SMTP address syntax, IMCEA encapsulation and Exchange proxy addresses.

Every address that enters hubport (SMTP command, pickup/replay file, plugin, config) goes
through `normalize_address`, so the rest of the pipeline can rely on one canonical form
(`local@domain`, domain lower-cased) that cannot smuggle a CR/LF, a second `@` or a source
route past the relay check (docs/reliability.md cases 37–45).
"""

from __future__ import annotations

import ipaddress
import re
import string
import unicodedata

__all__ = [
    "MAX_ADDRESS",
    "MAX_DOMAIN",
    "MAX_LOCAL_PART",
    "AddressError",
    "check_hostname",
    "domain_of",
    "domain_to_ascii",
    "imcea_decode",
    "imcea_encode",
    "normalize_address",
    "parse_proxy_address",
    "split_address",
]

# Exchange's maxima (Exchange 2010), counted in characters; RFC 5321's 64-octet local part
# is too strict for what Exchange accepts and emits.
MAX_LOCAL_PART = 315
MAX_DOMAIN = 255
MAX_ADDRESS = 571
MAX_LABEL = 63

# RFC 5321 atext (plus '.' for the dot-string); anything else must be quoted.
_ATEXT = frozenset(string.ascii_letters + string.digits + "!#$%&'*+-/=?^_`{|}~.")
_LDH_LABEL = re.compile(r"[a-z0-9-]+", re.ASCII)
_TYPE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*", re.ASCII)
_IMCEA_TYPE = re.compile(r"[A-Za-z0-9]+", re.ASCII)
# Characters IMCEA keeps as they are; '+' and '_' are the escape characters and '/' maps to '_'.
_IMCEA_SAFE = frozenset(string.ascii_letters + string.digits + "!#$%&'*-=?^`{|}~.")
_HEX = frozenset(string.hexdigits)
# Unicode categories never allowed anywhere: controls, lone surrogates (from surrogateescape
# decoding; they crash any later UTF-8 encode), line and paragraph separators.
_FORBIDDEN_CATEGORIES = frozenset({"Cc", "Cs", "Zl", "Zp"})


class AddressError(ValueError):
    """An address that is syntactically unacceptable; str() is the human-readable reason."""


# ---------------------------------------------------------------------------------------------
# normalization


def normalize_address(
    text: str, *, smtputf8: bool = False, allow_null: bool = False
) -> str:
    """Return the canonical `local@domain` form of an envelope address, or raise AddressError.

    Accepts `addr`, `<addr>`, `<@route,@route:addr>` (the source route is validated and dropped,
    as RFC 5321 §3.3 allows) and surrounding spaces/tabs.  The local part is kept exactly as
    given (quoted or not); the domain is lower-cased, IDN domains are put into IDNA canonical
    U-label form and address literals into canonical `[1.2.3.4]` / `[IPv6:...]` form.
    `""` and `<>` (the null sender) give `""` when `allow_null` is set.
    """
    stripped = text.strip(" \t")
    _check_characters(stripped, smtputf8)
    inner = _strip_brackets(stripped)
    if inner == "":
        if allow_null:
            return ""
        raise AddressError("null address not allowed here")
    mailbox = _drop_source_route(inner, smtputf8)
    local, domain = _split_mailbox(mailbox)
    _check_local_part(local)
    domain = _normalize_domain(domain, smtputf8)
    if len(local) > MAX_LOCAL_PART:
        raise AddressError(
            f"local part too long (more than {MAX_LOCAL_PART} characters)"
        )
    if len(local) + 1 + len(domain) > MAX_ADDRESS:
        raise AddressError(f"address too long (more than {MAX_ADDRESS} characters)")
    return f"{local}@{domain}"


def _check_characters(text: str, smtputf8: bool) -> None:
    """Reject control characters everywhere (also inside quotes) and non-ASCII without SMTPUTF8."""
    for ch in text:
        if ch < " " or ch == "\x7f":
            raise AddressError("control character in address")
        if ch.isascii():
            continue
        if unicodedata.category(ch) in _FORBIDDEN_CATEGORIES:
            raise AddressError("control or invalid character in address")
        if not smtputf8:
            raise AddressError("non-ASCII address requires SMTPUTF8")


def _strip_brackets(text: str) -> str:
    if text.startswith("<"):
        if not text.endswith(">") or len(text) < 2:
            raise AddressError("unbalanced angle brackets")
        text = text[1:-1]
    elif text.endswith(">"):
        raise AddressError("unbalanced angle brackets")
    for bracket in "<>":
        if bracket in text and not _inside_quotes_only(text, bracket):
            raise AddressError("unexpected angle bracket in address")
    return text


def _inside_quotes_only(text: str, char: str) -> bool:
    """True when every occurrence of `char` lies inside a quoted string."""
    quoted = escaped = False
    for ch in text:
        if escaped:
            escaped = False
        elif quoted and ch == "\\":
            escaped = True
        elif ch == '"':
            quoted = not quoted
        elif ch == char and not quoted:
            return False
    return True


def _drop_source_route(inner: str, smtputf8: bool) -> str:
    """Validate and drop an RFC 5321 A-d-l (`@a,@b:`); the route must never steer relaying."""
    if not inner.startswith("@"):
        return inner
    route, colon, mailbox = inner.partition(":")
    if not colon:
        raise AddressError("empty local part (or a source route without ':')")
    for hop in route.split(","):
        if not hop.startswith("@") or len(hop) < 2:
            raise AddressError("malformed source route")
        try:
            _normalize_domain(hop[1:], smtputf8)
        except AddressError as exc:
            raise AddressError(f"malformed source route: {exc}") from None
    if not mailbox:
        raise AddressError("source route without a mailbox")
    return mailbox


def _split_mailbox(mailbox: str) -> tuple[str, str]:
    """Split at the single unquoted '@'; a quoted local part may itself contain '@'."""
    if mailbox.startswith('"'):
        end = _closing_quote(mailbox)
        local, rest = mailbox[: end + 1], mailbox[end + 1 :]
        if rest == "":
            raise AddressError("missing @ (no domain)")
        if not rest.startswith("@"):
            raise AddressError("unexpected character after quoted local part")
        domain = rest[1:]
    else:
        local, at, domain = mailbox.partition("@")
        if not at:
            raise AddressError("missing @ (no domain)")
    if "@" in domain:
        raise AddressError("more than one @ in address")
    if local in ("", '""'):
        raise AddressError("empty local part")
    if domain == "":
        raise AddressError("empty domain")
    return local, domain


def _closing_quote(text: str) -> int:
    """Index of the DQUOTE that closes the quoted string starting at text[0]."""
    i = 1
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        if ch == '"':
            return i
        i += 1
    raise AddressError("unterminated quoted local part")


def _check_local_part(local: str) -> None:
    """An unquoted local part may hold only atext and dots (and UTF-8 under SMTPUTF8).

    Leading, trailing and doubled dots are tolerated: real senders use them and they cannot
    break SMTP framing.  Quoted local parts were already checked for control characters.
    """
    if local.startswith('"'):
        return
    for ch in local:
        if ch in _ATEXT:
            continue
        if not ch.isascii() and not ch.isspace():
            continue  # UTF-8 local part, only reachable with smtputf8=True
        raise AddressError(f"invalid character {ch!r} in unquoted local part")


def _normalize_domain(domain: str, smtputf8: bool) -> str:
    if domain.startswith("["):
        return _normalize_literal(domain)
    if domain.isascii():
        return check_hostname(domain)
    if not smtputf8:
        raise AddressError("non-ASCII address requires SMTPUTF8")
    ascii_form = check_hostname(domain_to_ascii(domain))
    try:
        unicode_form = ascii_form.encode("ascii").decode("idna")
    except (UnicodeError, ValueError):
        raise AddressError("invalid internationalized domain") from None
    if len(unicode_form) > MAX_DOMAIN:
        raise AddressError(f"domain too long (more than {MAX_DOMAIN} characters)")
    return unicode_form


def _normalize_literal(domain: str) -> str:
    """Validate `[IPv4]` or `[IPv6:...]` with ipaddress and return its canonical spelling."""
    if not domain.endswith("]") or len(domain) < 3:
        raise AddressError("unterminated address literal")
    body = domain[1:-1]
    if body[:5].lower() == "ipv6:":
        value = body[5:]
        if "%" in value:
            raise AddressError("scoped IPv6 address literal not allowed")
        try:
            return f"[IPv6:{ipaddress.IPv6Address(value).compressed}]"
        except ValueError:
            raise AddressError("invalid IPv6 address literal") from None
    if ":" in body:
        raise AddressError(
            "unsupported address literal (only IPv4 and IPv6: are known)"
        )
    try:
        return f"[{ipaddress.IPv4Address(body)}]"
    except ValueError:
        raise AddressError("invalid IPv4 address literal") from None


def check_hostname(domain: str) -> str:
    """Validate an ASCII RFC 1035/1123 host name and return it lower-cased.

    Single labels (`localhost`) are allowed; an all-numeric last label is not, so a bare IP
    address cannot pose as a domain (it must be written as the literal `[192.0.2.1]`).
    """
    d = domain.lower()
    if d == "":
        raise AddressError("empty domain")
    if not d.isascii():
        raise AddressError("non-ASCII domain (use the xn-- form)")
    if len(d) > MAX_DOMAIN:
        raise AddressError(f"domain too long (more than {MAX_DOMAIN} characters)")
    labels = d.split(".")
    for label in labels:
        if label == "":
            raise AddressError("empty domain label")
        if len(label) > MAX_LABEL:
            raise AddressError(
                f"domain label too long (more than {MAX_LABEL} characters)"
            )
        if not _LDH_LABEL.fullmatch(label):
            raise AddressError("invalid character in domain")
        if label.startswith("-") or label.endswith("-"):
            raise AddressError("domain label starts or ends with a hyphen")
    if labels[-1].isdigit():
        raise AddressError(
            "all-numeric top-level domain label (write IP addresses as [literal])"
        )
    return d


def domain_to_ascii(domain: str) -> str:
    """The IDNA (A-label, `xn--`) form of a domain, used wherever domains are compared."""
    if domain.isascii():
        return domain.lower()
    try:
        return domain.encode("idna").decode("ascii").lower()
    except (UnicodeError, ValueError):
        raise AddressError("invalid internationalized domain") from None


# ---------------------------------------------------------------------------------------------
# splitting


def split_address(address: str) -> tuple[str, str]:
    """(local, domain) of a normalized address, split at the last '@' (which is never quoted)."""
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain:
        raise AddressError(f"not a local@domain address: {address[:80]!r}")
    return local, domain


def domain_of(address: str) -> str:
    """The domain of a normalized address."""
    return split_address(address)[1]


# ---------------------------------------------------------------------------------------------
# IMCEA


def imcea_encode(addr_type: str, address: str, domain: str) -> str:
    """Encapsulate a non-SMTP address as `IMCEA<TYPE>-<encoded>@<domain>`.

    Control characters are refused: `imcea_decode` deliberately leaves `+HH` escapes of control
    bytes undecoded, so such an address could not round-trip (and is hostile anyway).  The
    result is not length-checked; run it through `normalize_address` before using it in SMTP.
    """
    if not _IMCEA_TYPE.fullmatch(addr_type):
        raise AddressError(f"invalid IMCEA address type {addr_type[:40]!r}")
    if any(ch < " " or ch == "\x7f" for ch in address):
        raise AddressError("control character in address")
    try:
        raw = address.encode("utf-8")
    except UnicodeError:
        raise AddressError("invalid character in address") from None
    encoded = "".join(_imcea_encode_byte(b) for b in raw)
    return f"IMCEA{addr_type.upper()}-{encoded}@{_normalize_domain(domain, False)}"


def _imcea_encode_byte(byte: int) -> str:
    ch = chr(byte)
    if ch in _IMCEA_SAFE:
        return ch
    if ch == "/":
        return "_"
    return f"+{byte:02X}"


def imcea_decode(address: str) -> tuple[str, str] | None:
    """(TYPE, original address) of an IMCEA address, or None when it is not one.

    Lenient in one documented way: `+HH` is decoded only when HH are two hex digits and the
    byte is not a control character; otherwise the '+' is literal, so the hand-written
    `IMCEAFAX-+15551234@x` gives `+15551234`.  Invalid UTF-8 or a raw control character
    gives None (the address is then treated as plain SMTP rather than mangled).
    """
    local, at, _domain = address.rpartition("@")
    if not at or local[:5].upper() != "IMCEA":
        return None
    addr_type, dash, encoded = local[5:].partition("-")
    if not dash or not _IMCEA_TYPE.fullmatch(addr_type):
        return None
    decoded = _imcea_decode_bytes(encoded)
    if decoded is None:
        return None
    try:
        return addr_type.upper(), decoded.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _imcea_decode_bytes(encoded: str) -> bytes | None:
    out = bytearray()
    i = 0
    while i < len(encoded):
        ch = encoded[i]
        if ch < " " or ch == "\x7f":
            return None
        hexpair = encoded[i + 1 : i + 3]
        if ch == "+" and len(hexpair) == 2 and set(hexpair) <= _HEX:
            value = int(hexpair, 16)
            if value >= 0x20 and value != 0x7F:
                out.append(value)
                i += 3
                continue
        if ch == "_":
            out += b"/"
        else:
            try:
                out += ch.encode("utf-8")
            except UnicodeError:
                return None
        i += 1
    return bytes(out)


# ---------------------------------------------------------------------------------------------
# proxy addresses


def parse_proxy_address(text: str, *, smtputf8: bool = False) -> tuple[str, str, bool]:
    """Parse an Exchange proxy address (`SMTP:a@x`, `smtp:b@x`, `X400:c=US;...`, `FAX:+1...`).

    Returns (TYPE, address, is_primary).  An all-upper-case prefix marks the primary address of
    its type.  Without a prefix the value is SMTP and not primary: which bare address becomes
    primary is a property of the whole address list, decided by the caller.
    """
    stripped = text.strip(" \t")
    prefix, colon, value = stripped.partition(":")
    if not colon or not _TYPE_NAME.fullmatch(prefix):
        return "SMTP", normalize_address(stripped, smtputf8=smtputf8), False
    addr_type = prefix.upper()
    is_primary = prefix.isupper()
    if addr_type == "SMTP":
        return addr_type, normalize_address(value, smtputf8=smtputf8), is_primary
    if value.strip() == "":
        raise AddressError(f"empty {addr_type} proxy address")
    _check_characters(value, smtputf8=True)
    return addr_type, value, is_primary
