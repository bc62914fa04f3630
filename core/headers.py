"""Raw RFC 5322 header handling on bytes.

The message bytes are never re-serialized: we split the header section ourselves, decode only
the few values routing needs, and rebuild a message by removing whole fields, prepending or
appending new ones or replacing one field. Every other byte (body, other fields and their
folding, 8-bit bytes) reaches the output unchanged. Parsing the whole message with the
`email` package would be slower and would not round-trip odd real-world messages.
"""

from __future__ import annotations

import functools
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from email.header import decode_header, make_header
from email.utils import format_datetime, getaddresses

from hubport.core.body import MessageBody

CRLF = b"\r\n"
MAX_LINE = 78  # RFC 5322 2.1.1: lines SHOULD be no longer than 78 characters

# One field: a name of printable ASCII except ':' (33-126), optional WSP before the colon
# (RFC 5322 obs-optional), the rest of the line, then any continuation lines (starting with
# WSP). The last field of a headers-only message may end at the end of the data.
_FIELD_RE = re.compile(
    rb"([\x21-\x39\x3b-\x7e]+)[ \t]*:[^\r\n]*(?:\r\n|\Z)(?:[ \t][^\r\n]*(?:\r\n|\Z))*"
)
_FIELD_NAME_RE = re.compile(r"[\x21-\x39\x3b-\x7e]+\Z")
_BARE_CR_RE = re.compile(rb"\r(?!\n)")
_FORBIDDEN_IN_VALUE_RE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_ENCODED_WORD_RE = re.compile(r"=\?[^?\s]+\?[qQbB]\?[^?\s]*\?=")
_FOLD_TOKEN_RE = re.compile(r"[ \t]*[^ \t]+|[ \t]+")


class MessageFormatError(ValueError):
    """The data is not a message we can accept; `reason` goes into the `.bad` reason file."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def canonicalize_line_endings(data: bytes) -> bytes:
    """Turn LF-only or mixed line endings into CRLF; refuse NUL bytes and bare CRs.

    Files written on Unix use LF, which is normal and not an error. A bare CR is never
    ambiguous-safe (SMTP smuggling), so it is refused rather than guessed at.
    """
    nul = data.find(b"\x00")
    if nul >= 0:
        raise MessageFormatError(f"NUL byte at offset {nul}")
    crs = data.count(b"\r")
    if crs == 0:
        return data.replace(b"\n", CRLF)
    crlfs = data.count(CRLF)
    if crs != crlfs:
        match = _BARE_CR_RE.search(data)
        assert match is not None
        line = data.count(b"\n", 0, match.start()) + 1
        raise MessageFormatError(f"bare CR in line {line}")
    if data.count(b"\n") == crlfs:
        return data  # fast path: already CRLF only
    return data.replace(CRLF, b"\n").replace(b"\n", CRLF)


def decode_8bit(raw: bytes) -> str:
    """Decode header bytes: UTF-8 (RFC 6532) if valid, else latin-1 (never fails)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def decode_rfc2047(text: str) -> str:
    """Decode RFC 2047 encoded words; on any trouble keep the text as it is (never raises)."""
    if "=?" not in text:
        return text
    if text.isascii():
        try:
            return str(make_header(decode_header(text)))
        except Exception:
            return _decode_words_one_by_one(text)
    # decode_header cannot mix raw 8-bit text with encoded words; do it word by word.
    return _decode_words_one_by_one(text)


def _decode_words_one_by_one(text: str) -> str:
    """Decode each encoded word alone, dropping whitespace between adjacent ones (RFC 2047 6.2)."""
    out: list[str] = []
    last = 0
    previous_was_word = False
    for match in _ENCODED_WORD_RE.finditer(text):
        between = text[last : match.start()]
        if not (previous_was_word and between.strip(" \t") == ""):
            out.append(between)
        try:
            out.append(str(make_header(decode_header(match.group()))))
        except Exception:
            out.append(match.group())
        last = match.end()
        previous_was_word = True
    out.append(text[last:])
    return "".join(out)


@dataclass
class HeaderField:
    """One header field exactly as it appears in the message."""

    name: str  # as written
    raw: bytes  # the complete field with continuation lines and its CRLF

    @property
    def lname(self) -> str:
        return self.name.lower()

    @property
    def value_bytes(self) -> bytes:
        """The unfolded value without name, colon and surrounding whitespace."""
        value = self.raw[self.raw.index(b":") + 1 :]
        return value.replace(CRLF, b"").strip(b" \t")

    @property
    def text(self) -> str:
        """The unfolded value, encoded words left alone: what address parsing needs.

        Lossless: invalid UTF-8 bytes become lone surrogates (surrogateescape), which
        `normalize_address` refuses, so a broken 8-bit address is rejected, never guessed
        at. Decoding encoded words first could turn an encoded comma or '<' into syntax.
        """
        return self.value_bytes.decode("utf-8", "surrogateescape")

    def value(self) -> str:
        """The value for display and logging: encoded words decoded. Never raises."""
        return decode_rfc2047(decode_8bit(self.value_bytes))


@dataclass
class ParsedMessage:
    """The header fields of a message plus where its body starts.

    `data[header_bytes_size:]` is the rest (the blank line and the body), kept byte for byte;
    `body_offset` is the first byte after the blank line (len(data) if there is none).
    """

    fields: list[HeaderField]
    body_offset: int
    data: bytes

    def get(self, name: str) -> HeaderField | None:
        lname = name.lower()
        for field in self.fields:
            if field.lname == lname:
                return field
        return None

    def get_all(self, name: str) -> list[HeaderField]:
        lname = name.lower()
        return [field for field in self.fields if field.lname == lname]

    @property
    def header_bytes_size(self) -> int:
        """Size of the header fields (without the blank line); fields start at offset 0."""
        return sum(len(field.raw) for field in self.fields)


def parse_header_section(data: bytes, max_header_size: int | None = None) -> ParsedMessage:
    """Split CRLF data into header fields and the rest, refusing anything that is not a message.

    The section ends at the first empty line. Without one the message is accepted only if
    every line is a header field (a headers-only message).
    """
    if not data or data.startswith(CRLF):
        raise MessageFormatError("no header section")
    limit = len(data) if max_header_size is None else max_header_size + 4
    blank = data.find(b"\r\n\r\n", 0, limit)
    if blank >= 0:
        header_end = blank + 2
        body_offset = blank + 4
    else:
        header_end = body_offset = len(data)
    if max_header_size is not None and header_end > max_header_size:
        raise MessageFormatError(f"header section exceeds {max_header_size} bytes")
    fields: list[HeaderField] = []
    pos = 0
    match_field = _FIELD_RE.match
    while pos < header_end:
        match = match_field(data, pos, header_end)
        if match is None:
            line = data.count(CRLF, 0, pos) + 1
            raise MessageFormatError(f"not an RFC 5322 header line: line {line}")
        fields.append(HeaderField(match.group(1).decode("ascii"), match.group()))
        pos = match.end()
    return ParsedMessage(fields, body_offset, data)


def field_end(data: bytes, pos: int) -> int:
    """The offset after the header field (with its continuation lines) starting at `pos`
    in CRLF data, or -1 when the line at `pos` does not start a field."""
    match = _FIELD_RE.match(data, pos)
    return -1 if match is None else match.end()


def rebuild(
    parsed: ParsedMessage,
    *,
    remove: Callable[[HeaderField], bool] | None = None,
    prepend: Sequence[bytes] = (),
    replace: dict[str, bytes] | None = None,
    append: Sequence[bytes] = (),
) -> bytes:
    """Prepend + kept original fields (raw, in order) + append + the original rest, unchanged.

    `replace` maps a lower-case name to a raw field that takes the place of the first field
    of that name (if there is none, nothing is replaced).
    """
    pending = dict(replace or {})
    out: list[bytes] = list(prepend)
    for field in parsed.fields:
        if remove is not None and remove(field):
            continue
        substitute = pending.pop(field.lname, None)
        out.append(field.raw if substitute is None else substitute)
    out.extend(append)
    for index in range(len(out) - 1):
        if not out[index].endswith(CRLF):
            # only the last field of a headers-only message without final newline
            out[index] += CRLF
    out.append(parsed.data[parsed.header_bytes_size :])
    return b"".join(out)


def _check_field_name(name: str) -> None:
    if not _FIELD_NAME_RE.match(name):
        raise ValueError(f"bad header field name {name!r}")


def make_field(name: str, value: str) -> bytes:
    """Build `Name: value\\r\\n`, folded at existing whitespace to keep lines under 78.

    CR, LF, NUL and other control characters (except TAB) are refused, so no caller can
    inject a header line. Folding only inserts CRLF before existing whitespace, so the
    unfolded value is exactly `value`. Non-ASCII text is written as UTF-8 (RFC 6532).
    """
    _check_field_name(name)
    bad = _FORBIDDEN_IN_VALUE_RE.search(value)
    if bad is not None:
        raise ValueError(f"control character {bad.group()!r} in header value of {name}")
    lines: list[str] = []
    current = f"{name}:"
    has_content = False
    first = True
    for token in _FOLD_TOKEN_RE.findall(value):
        if first:
            token = " " + token  # a value never starts a continuation line
            first = False
        starts_with_space = token[0] in " \t"
        whitespace_only = token.strip(" \t") == ""
        if (
            has_content
            and starts_with_space
            and not whitespace_only
            and len(current) + len(token) > MAX_LINE - 1
        ):
            lines.append(current)
            current = token
        else:
            current += token
        has_content = True
    if first:
        current += " "
    lines.append(current)
    return ("\r\n".join(lines) + "\r\n").encode("utf-8")


def format_date(when: float | None = None) -> str:
    """An RFC 5322 date in local time (what MTAs write in Received and Date)."""
    moment = time.time() if when is None else when
    return _format_second(int(moment))


@functools.lru_cache(maxsize=4)
def _format_second(second: int) -> str:
    """Dates have one-second resolution: a burst of messages formats each second once."""
    return format_datetime(datetime.fromtimestamp(second).astimezone())


def make_received(
    *,
    from_: str,
    by: str,
    with_: str,
    id_: str | None = None,
    for_: str | None = None,
    when: float | None = None,
) -> bytes:
    """A trace field `Received: from X by Y with Z [id I] [for <F>]; date`."""
    parts = [f"from {from_}", f"by {by}", f"with {with_}"]
    if id_:
        parts.append(f"id {id_}")
    if for_:
        parts.append(f"for <{for_}>")
    return make_field("Received", " ".join(parts) + "; " + format_date(when))


def extract_addresses(field_values: Iterable[str]) -> list[str]:
    """Addresses from address-list values; empty ones (`<>`, empty groups) are dropped."""
    addresses = []
    for _display, address in getaddresses(list(field_values)):
        address = address.strip()
        if address:
            addresses.append(address)
    return addresses


def message_id_of(parsed: ParsedMessage) -> str:
    """The Message-ID value stripped ('' if none)."""
    field = parsed.get("message-id")
    return decode_8bit(field.value_bytes) if field is not None else ""


def subject_of(parsed: ParsedMessage) -> str:
    """The decoded Subject ('' if none)."""
    field = parsed.get("subject")
    return field.value().strip() if field is not None else ""


#: how much of a large body is read to find its header section (receive limits keep a
#: header section far smaller)
HEADER_SCAN = 1024 * 1024


def rewrite_header_section(body: MessageBody,
                           rewrite: Callable[[ParsedMessage], bytes | None],
                           limit: int = HEADER_SCAN) -> MessageBody:
    """``body`` with its header section rewritten, without reading the rest of it.

    ``rewrite`` gets the parsed first ``limit`` octets and returns them rewritten (``rebuild``
    returns exactly that) or None for no change. Blocking when the body is spooled: call it
    in a thread from the event loop. Raises ``MessageFormatError`` as ``parse_header_section``.
    """
    head = body.read_prefix(limit)
    parsed = parse_header_section(head)
    new = rewrite(parsed)
    return body if new is None else replace_header_section(body, parsed, new)


def replace_header_section(body: MessageBody, parsed: ParsedMessage, rebuilt: bytes
                           ) -> MessageBody:
    """``body`` with the header section ``parsed`` (of its first octets) replaced by the
    header part of ``rebuilt`` (what ``rebuild(parsed, ...)`` returned): only the header
    octets are replaced, so the body's in-memory prefix stays the size of a header."""
    tail = len(parsed.data) - parsed.header_bytes_size  # the octets rebuild copied after it
    return body.replace_prefix(parsed.header_bytes_size, rebuilt[:len(rebuilt) - tail])
