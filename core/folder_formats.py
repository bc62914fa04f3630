"""The Pickup and Replay file formats (Exchange 2010's) and the Replay writer.

Both readers work on raw bytes (hubport.core.headers): they take the envelope from the
file, remove or add whole header fields and leave every other byte as it was. The Replay
format is also the interchange format of the Drop directory and Export-Message, so
`format_replay` and `parse_replay` must round-trip: same envelope, same message bytes plus
one Received field.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Iterable
from email.utils import parsedate_to_datetime

from hubport.core.addresses import AddressError, normalize_address
from hubport.core.headers import (
    CRLF,
    HeaderField,
    MessageFormatError,
    ParsedMessage,
    canonicalize_line_endings,
    extract_addresses,
    field_end,
    format_date,
    make_field,
    make_received,
    parse_header_section,
    rebuild,
)
from hubport.core.model import Envelope, EnvelopeRecipient, MailFrom, Notify

__all__ = [
    "REPLAY_ENVELOPE_HEADERS",
    "ContentRejected",
    "LineEndings",
    "MessageFormatError",
    "display_name",
    "format_replay",
    "notice_envelope",
    "parse_pickup",
    "parse_replay",
    "repair_header_section",
]

_UNPRINTABLE_RE = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def display_name(value: bytes | str) -> str:
    """A file name or a value taken from a file, as text for logs and ``.bad.reason`` files:
    UTF-8 shown as it is, other bytes (also when kept as surrogate escapes in ``str``) and
    control characters as ``\\xNN`` (readable, one line, never a Python repr)."""
    if isinstance(value, str):
        try:
            raw = value.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:  # a lone surrogate that was never a byte
            raw = value.encode("utf-8", "backslashreplace")
    else:
        raw = value
    text = raw.decode("utf-8", "backslashreplace")
    return _UNPRINTABLE_RE.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


DEFAULT_MAX_HEADER_SIZE = 65536
DEFAULT_MAX_RECIPIENTS = 100
MAX_REPLAY_RECIPIENTS = 10_000

# The X-headers a Replay/Drop file carries for the envelope; they never reach the stored message.
REPLAY_ENVELOPE_HEADERS = frozenset(
    {
        "x-sender",
        "x-receiver",
        "x-createdby",
        "x-endofinjectedxheaders",
        "x-extendedmessageprops",
        "x-helodomain",
        "x-source",
        "x-sourceipaddress",
    }
)
_FIREWALL_PREFIXES = ("x-ms-exchange-organization-", "x-ms-exchange-forest-")
_BODY_VALUES = frozenset({"7BIT", "8BITMIME", "BINARYMIME"})
_RET_VALUES = frozenset({"HDRS", "FULL"})
_NOTIFY_ORDER = (Notify.SUCCESS, Notify.FAILURE, Notify.DELAY)
_UNDISCLOSED_TO = "Undisclosed recipients:;"

_CONTROL_BYTES_RE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
_XTEXT_RE = re.compile(r"(?:[\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-Fa-f]{2})+\Z")
_PARAM_RE = re.compile(r"([A-Za-z0-9][A-Za-z0-9-]*)(?:=(.*))?\Z", re.DOTALL)
_TOKEN_RE = re.compile(r"[^\s\x00-\x1f\x7f]+\Z")
_HELO_RE = re.compile(r"[A-Za-z0-9.\-_:\[\]]{1,255}\Z")
# an mbox separator line ("From sender date"), or one quoted by ">" (what Postfix's sendmail
# drops from the top of its input)
_MBOX_FROM_RE = re.compile(rb">*From ")
_UNSAFE_IN_HEAD_RE = re.compile(rb"\x00|\r(?!\n)")
_BARE_CR_RE = re.compile(rb"\r(?!\n)")


class ContentRejected(MessageFormatError):
    """A well-formed file with a valid sender that breaks a limit: NDR the sender, no `.bad`.

    `enhanced` is the RFC 3463 status code the NDR should carry.
    """

    def __init__(self, reason: str, *, sender: str, enhanced: str = "5.6.0",
                 code: int = 550) -> None:
        super().__init__(reason)
        self.sender = sender
        self.enhanced = enhanced
        self.code = code  # 552 for a size limit (RFC 1870), else 550


# --------------------------------------------------------------------------------------------
# Shared pieces


class LineEndings:
    """``canonicalize_line_endings`` for a file read in pieces (a large folder file is
    never held whole): LF-only or mixed line endings become CRLF, and a NUL or a bare CR
    refuses the file with the very reason the whole-file check gives.

    A CR that ends a piece is held back until the next piece shows whether an LF follows,
    so a CRLF split between two reads is neither doubled nor taken for a bare CR. The whole-
    file check reports the first NUL anywhere before any bare CR, so after a bare CR the
    pieces are still looked at for a NUL (``feed`` then returns nothing) and ``end`` reports
    the bare CR.
    """

    def __init__(self) -> None:
        self.offset = 0  # octets of the file seen so far
        self._lines = 0  # LFs seen so far (the line number of a bare CR)
        self._carry = b""
        self._bare_cr: int | None = None  # the line of the first bare CR

    def feed(self, raw: bytes) -> bytes:
        """The CRLF form of the next piece of the file (less a CR held back)."""
        nul = raw.find(b"\x00")
        if nul >= 0:
            raise MessageFormatError(f"NUL byte at offset {self.offset + nul}")
        self.offset += len(raw)
        if self._bare_cr is not None:
            return b""
        piece = self._carry + raw
        self._carry = b""
        if piece.endswith(b"\r"):
            piece, self._carry = piece[:-1], b"\r"
        crs = piece.count(b"\r")
        if crs == 0:
            self._lines += piece.count(b"\n")
            return piece.replace(b"\n", CRLF)
        if crs != piece.count(CRLF):
            bare = _BARE_CR_RE.search(piece)
            assert bare is not None
            self._bare_cr = self._lines + piece.count(b"\n", 0, bare.start()) + 1
            self._carry = b""
            return b""
        lfs = piece.count(b"\n")
        self._lines += lfs
        if lfs == crs:
            return piece  # already CRLF only
        return piece.replace(CRLF, b"\n").replace(b"\n", CRLF)

    def end(self) -> None:
        """The file has ended: raises for a bare CR (also a CR that was its last octet)."""
        if self._bare_cr is None and self._carry:
            self._bare_cr = self._lines + 1
        if self._bare_cr is not None:
            raise MessageFormatError(f"bare CR in line {self._bare_cr}")


def _drop_mbox_from_lines(data: bytes, pos: int) -> tuple[bytes, int]:
    """Remove the run of mbox `From ` / `>From ` lines that starts at `pos`."""
    end = pos
    count = 0
    while _MBOX_FROM_RE.match(data, end):
        newline = data.find(CRLF, end)
        end = len(data) if newline < 0 else newline + 2
        count += 1
    return (data if count == 0 else data[:pos] + data[end:]), count


def _injected_end(data: bytes) -> int:
    """Where a Replay file's leading run of X- fields ends (just after the
    X-EndOfInjectedXHeaders marker when there is one): the message's own header starts there."""
    pos = 0
    while data[pos : pos + 2].lower() == b"x-":
        end = field_end(data, pos)
        if end < 0:
            break
        name = data[pos:end].split(b":", 1)[0].strip(b" \t").lower()
        pos = end
        if name == b"x-endofinjectedxheaders":
            break
    return pos


def repair_header_section(data: bytes, *, replay: bool = False) -> tuple[bytes, list[str]]:
    """Repair the two faults real message files have that Postfix's sendmail and cleanup accept.

    - Leading mbox `From ` lines (and `>From ` ones) are dropped: at the top of the file and,
      in a Replay file, at the top of the message after the injected X-headers.
    - When the header has no blank line after it, the first line that is neither a header
      field nor a continuation line starts the body: the missing blank line is inserted there.
      A file whose very first line is not a field is not repaired (it has no header at all).

    `data` must have CRLF line endings. Returns the repaired data (every other byte kept)
    and what was repaired, in words for the tracking log; no repair gives `(data, [])`.
    """
    repairs: list[str] = []
    data, dropped = _drop_mbox_from_lines(data, 0)
    if replay:
        start = _injected_end(data)
        if start:
            data, more = _drop_mbox_from_lines(data, start)
            dropped += more
    if dropped:
        repairs.append(f'removed {dropped} mbox "From " line{"s" if dropped > 1 else ""}')
    pos = 0
    while pos < len(data) and not data.startswith(CRLF, pos):
        end = field_end(data, pos)
        if end < 0:
            if pos > 0:
                line = data.count(CRLF, 0, pos) + 1 + dropped  # as numbered in the file
                data = data[:pos] + CRLF + data[pos:]
                repairs.append(f"inserted the missing blank line after the header "
                               f"(before line {line})")
            break
        pos = end
    return data, repairs


def _parse_repaired(data: bytes, replay: bool,
                    repairs: list[str] | None) -> tuple[bytes, ParsedMessage]:
    """The header section of CRLF `data`, repaired as Postfix would when it does not parse.

    Fast path: a well-formed file is parsed once and never copied.
    """
    try:
        return data, parse_header_section(data)
    except MessageFormatError:
        fixed, done = repair_header_section(data, replay=replay)
        if not done:
            raise
    try:
        parsed = parse_header_section(fixed)
    except MessageFormatError as exc:
        raise MessageFormatError(f"{exc.reason} (after it {'; '.join(done)})") from None
    if repairs is not None:
        repairs.extend(done)
    return fixed, parsed


def _is_firewalled(field: HeaderField) -> bool:
    """Organization and forest X-headers are trusted only from our own servers."""
    return field.lname.startswith(_FIREWALL_PREFIXES)


def _normalize(address: str, what: str, *, allow_null: bool = False, smtputf8: bool) -> str:
    try:
        return normalize_address(address, allow_null=allow_null, smtputf8=smtputf8)
    except AddressError as exc:
        raise MessageFormatError(f"bad {what} address '{display_name(address)}': {exc}") from exc


def _date_is_valid(field: HeaderField) -> bool:
    try:
        return parsedate_to_datetime(field.text) is not None
    except Exception:
        return False


def _fix_id_and_date(
    parsed: ParsedMessage, default_domain: str, now: float, append: list[bytes]
) -> dict[str, bytes]:
    """Add a Message-ID if missing or empty and a Date if missing or malformed (as Exchange)."""
    replace: dict[str, bytes] = {}
    message_id = parsed.get("message-id")
    if message_id is None or not message_id.value_bytes:
        new_id = make_field("Message-ID", f"<{uuid.uuid4().hex}@{default_domain}>")
        if message_id is None:
            append.append(new_id)
        else:
            replace["message-id"] = new_id
    date = parsed.get("date")
    if date is None:
        append.append(make_field("Date", format_date(now)))
    elif not _date_is_valid(date):
        replace["date"] = make_field("Date", format_date(now))
    return replace


def _dedupe(addresses: Iterable[str]) -> list[str]:
    """Keep the first of addresses equal ignoring case, in order."""
    seen: set[str] = set()
    unique = []
    for address in addresses:
        key = address.lower()
        if key not in seen:
            seen.add(key)
            unique.append(address)
    return unique


# --------------------------------------------------------------------------------------------
# Pickup


def _pickup_sender(parsed: ParsedMessage) -> str:
    """The envelope sender by the Exchange Pickup rules (Exchange 2010)."""
    from_addresses = extract_addresses(f.text for f in parsed.get_all("from"))
    sender_addresses = extract_addresses(f.text for f in parsed.get_all("sender"))
    if len(sender_addresses) > 1:
        raise MessageFormatError("Sender may hold only one address")
    if len(from_addresses) == 1:
        return from_addresses[0]
    if len(from_addresses) > 1:
        if not sender_addresses:
            raise MessageFormatError("From holds several addresses: a single Sender is required")
        return sender_addresses[0]
    if sender_addresses:
        return sender_addresses[0]
    raise MessageFormatError("no sender: From or Sender required")


def _pickup_remove(field: HeaderField) -> bool:
    lname = field.lname
    return (
        lname == "bcc"
        or lname == "received"
        or lname.startswith("resent-")
        or _is_firewalled(field)
    )


def parse_pickup(
    data: bytes,
    *,
    default_domain: str,
    server_name: str,
    max_header_size: int = DEFAULT_MAX_HEADER_SIZE,
    max_recipients: int = DEFAULT_MAX_RECIPIENTS,
    now: float | None = None,
    repairs: list[str] | None = None,
    rest_is_8bit: bool = False,
) -> tuple[Envelope, bytes]:
    """Read a Pickup file: the envelope comes from From/Sender and To/Cc/Bcc.

    Raises MessageFormatError (→ `.bad`) or its subclass ContentRejected (→ NDR to
    `exc.sender`) for limits broken by a file whose sender is known and valid. What
    `repair_header_section` had to repair is appended to `repairs` when it is given.

    `data` may be only the start of the file, up to the end of its header section (a large
    file whose rest is streamed to a spool file): the result is then that start rewritten,
    and `rest_is_8bit` says whether the rest holds 8-bit octets (BODY=8BITMIME).
    """
    now = time.time() if now is None else now
    data = canonicalize_line_endings(data)
    # the size limit is checked once the sender is known
    data, parsed = _parse_repaired(data, False, repairs)
    raw_sender = _pickup_sender(parsed)
    sender = _normalize(raw_sender, "sender", smtputf8=not raw_sender.isascii())
    if parsed.header_bytes_size > max_header_size:
        raise ContentRejected(
            f"header section of {parsed.header_bytes_size} bytes exceeds the limit of "
            f"{max_header_size} bytes",
            sender=sender,
            enhanced="5.3.4",
        )

    visible = extract_addresses(f.text for f in parsed.fields if f.lname in ("to", "cc"))
    hidden = extract_addresses(f.text for f in parsed.get_all("bcc"))
    raw_recipients = _dedupe(visible + hidden)
    if not raw_recipients:
        raise MessageFormatError("no recipient: To, Cc or Bcc required")
    if len(raw_recipients) > max_recipients:
        raise ContentRejected(
            f"{len(raw_recipients)} recipients exceed the limit of {max_recipients}",
            sender=sender,
            enhanced="5.5.3",
        )
    recipients = _dedupe(
        _normalize(address, "recipient", smtputf8=not address.isascii())
        for address in raw_recipients
    )

    append: list[bytes] = []
    if not visible and parsed.get("to") is None:
        append.append(make_field("To", _UNDISCLOSED_TO))
    replace = _fix_id_and_date(parsed, default_domain, now, append)
    received = make_received(
        from_="localhost", by=server_name, with_="hubport Pickup", when=now
    )
    stored = rebuild(
        parsed, remove=_pickup_remove, prepend=[received], replace=replace, append=append
    )
    smtputf8 = not sender.isascii() or any(not r.isascii() for r in recipients)
    mail_from = MailFrom(
        address=sender,
        body=None if data.isascii() and not rest_is_8bit else "8BITMIME",
        smtputf8=smtputf8,
    )
    envelope = Envelope(mail_from, [EnvelopeRecipient(address) for address in recipients])
    return envelope, stored


# --------------------------------------------------------------------------------------------
# Replay: reading


def _split_address(text: str, header: str) -> tuple[str, str]:
    """Split `<addr> params` or `addr params` into the address and the parameter text.

    Inside angle brackets a quoted local part may hold spaces and '>'.
    """
    if not text.startswith("<"):
        address, _, rest = text.replace("\t", " ").partition(" ")
        if "," in address and '"' not in address:
            raise MessageFormatError(
                f"{header} must hold exactly one address: '{display_name(text)}'")
        return address, rest
    in_quote = False
    index = 1
    while index < len(text):
        char = text[index]
        if in_quote:
            if char == "\\":
                index += 2
                continue
            if char == '"':
                in_quote = False
        elif char == '"':
            in_quote = True
        elif char == ">":
            rest = text[index + 1 :]
            if rest and rest[0] not in " \t":
                raise MessageFormatError(
                    f"{header} must hold exactly one address: '{display_name(text)}'"
                )
            return text[1:index], rest
        index += 1
    raise MessageFormatError(f"{header}: unterminated address '{display_name(text)}'")


def _parse_params(text: str, header: str, flags: frozenset[str] = frozenset()) -> dict[str, str]:
    """`KEY=VALUE` parameters, keys case-insensitive (returned upper-case), no duplicates."""
    params: dict[str, str] = {}
    for token in text.split():
        match = _PARAM_RE.match(token)
        if match is None:
            raise MessageFormatError(
                f"{header} must hold exactly one address then KEY=VALUE parameters: "
                f"'{display_name(token)}'"
            )
        key, value = match.group(1).upper(), match.group(2)
        if key in params:
            raise MessageFormatError(f"{header}: duplicate parameter {key}")
        if value is None and key not in flags:
            raise MessageFormatError(f"{header}: parameter {key} needs a value")
        params[key] = "" if value is None else value
    return params


def _envelope_text(field: HeaderField) -> str:
    """The unfolded value of an envelope X-header; control characters and bad UTF-8 are refused."""
    raw = field.value_bytes
    if _CONTROL_BYTES_RE.search(raw):
        raise MessageFormatError(f"control character in {field.name}")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise MessageFormatError(f"invalid UTF-8 in {field.name}") from None


def _parse_x_sender(field: HeaderField) -> MailFrom:
    text = _envelope_text(field)
    if not text:
        raise MessageFormatError("X-Sender holds no address")
    address, rest = _split_address(text, "X-Sender")
    params = _parse_params(rest, "X-Sender", flags=frozenset({"SMTPUTF8"}))
    unknown = set(params) - {"BODY", "RET", "ENVID", "AUTH", "SMTPUTF8"}
    if unknown:
        raise MessageFormatError(f"X-Sender: unknown parameter '{display_name(min(unknown))}'")
    if params.get("SMTPUTF8"):
        raise MessageFormatError("X-Sender: SMTPUTF8 takes no value")
    smtputf8 = "SMTPUTF8" in params
    body = params.get("BODY")
    if body is not None:
        body = body.upper()
        if body not in _BODY_VALUES:
            raise MessageFormatError(f"X-Sender: bad BODY value '{display_name(body)}'")
    ret = params.get("RET")
    if ret is not None:
        ret = ret.upper()
        if ret not in _RET_VALUES:
            raise MessageFormatError(f"X-Sender: bad RET value '{display_name(ret)}'")
    for key in ("ENVID", "AUTH"):
        if key in params and not _XTEXT_RE.match(params[key]):
            raise MessageFormatError(f"X-Sender: {key} is not xtext: '{display_name(params[key])}'")
    sender = "" if address == "" else _normalize(
        address, "X-Sender", allow_null=True, smtputf8=smtputf8
    )
    return MailFrom(
        address=sender,
        body=body,
        ret=ret,
        envid=params.get("ENVID"),
        auth=params.get("AUTH"),
        smtputf8=smtputf8,
    )


def _parse_notify(value: str) -> frozenset[Notify]:
    items = value.upper().split(",")
    try:
        notify = frozenset(Notify(item) for item in items)
    except ValueError:
        raise MessageFormatError(f"X-Receiver: bad NOTIFY value '{display_name(value)}'") from None
    if Notify.NEVER in notify and len(items) > 1:
        raise MessageFormatError("X-Receiver: NOTIFY=NEVER cannot be combined with others")
    return notify


def _parse_x_receiver(field: HeaderField, smtputf8: bool) -> EnvelopeRecipient:
    text = _envelope_text(field)
    if not text:
        raise MessageFormatError("X-Receiver holds no address")
    address, rest = _split_address(text, "X-Receiver")
    params = _parse_params(rest, "X-Receiver")
    unknown = set(params) - {"NOTIFY", "ORCPT"}
    if unknown:
        raise MessageFormatError(f"X-Receiver: unknown parameter '{display_name(min(unknown))}'")
    notify = _parse_notify(params["NOTIFY"]) if "NOTIFY" in params else frozenset()
    orcpt = params.get("ORCPT")
    if orcpt is not None and not orcpt:
        raise MessageFormatError("X-Receiver: empty ORCPT")
    if not address:
        raise MessageFormatError("X-Receiver: the null address is not a recipient")
    recipient = _normalize(address, "X-Receiver", smtputf8=smtputf8)
    return EnvelopeRecipient(recipient, notify=notify, orcpt=orcpt)


def _split_injected(parsed: ParsedMessage) -> list[HeaderField]:
    """The envelope X-headers at the top of a Replay file.

    They are the leading run of X- fields, up to and including X-EndOfInjectedXHeaders when
    present (after that marker every field belongs to the message, so a message whose own
    headers start with an X-Sender still round-trips). Without the marker an X-Sender or
    X-Receiver after a normal header is an error.
    """
    leading = 0
    marker = False
    for field in parsed.fields:
        if not field.lname.startswith("x-"):
            break
        leading += 1
        if field.lname == "x-endofinjectedxheaders":
            marker = True
            break
    if not marker:
        for field in parsed.fields[leading:]:
            if field.lname in ("x-sender", "x-receiver"):
                raise MessageFormatError("replay X-headers must precede normal headers")
    return [f for f in parsed.fields[:leading] if f.lname in REPLAY_ENVELOPE_HEADERS]


def _created_by(injected: list[HeaderField]) -> str | None:
    stamps = [f for f in injected if f.lname == "x-createdby"]
    if not stamps:
        return None
    if len(stamps) > 1:
        raise MessageFormatError("duplicate X-CreatedBy")
    value = _envelope_text(stamps[0])
    if not value:
        raise MessageFormatError("X-CreatedBy must not be blank")
    return value


def _helo_domain(injected: list[HeaderField]) -> str:
    """The X-HeloDomain for our Received field, if it is a plain host token."""
    for field in injected:
        if field.lname == "x-helodomain":
            value = field.text
            if _HELO_RE.match(value):
                return value
    return "localhost"


def parse_replay(
    data: bytes,
    *,
    default_domain: str,
    server_name: str,
    local_stamp: str = "hubport",
    now: float | None = None,
    repairs: list[str] | None = None,
) -> tuple[Envelope, bytes]:
    """Read a Replay file: the envelope comes from X-Sender/X-Receiver; the Pickup limits do
    not apply. `repairs`, and `data` being only the start of the file, as for
    `parse_pickup`."""
    now = time.time() if now is None else now
    data = canonicalize_line_endings(data)
    data, parsed = _parse_repaired(data, True, repairs)
    injected = _split_injected(parsed)

    senders = [f for f in injected if f.lname == "x-sender"]
    if not senders:
        raise MessageFormatError("no X-Sender")
    if len(senders) > 1:
        raise MessageFormatError("duplicate X-Sender")
    mail_from = _parse_x_sender(senders[0])
    receivers = [f for f in injected if f.lname == "x-receiver"]
    if not receivers:
        raise MessageFormatError("no X-Receiver")
    if len(receivers) > MAX_REPLAY_RECIPIENTS:
        raise MessageFormatError(
            f"{len(receivers)} X-Receiver lines exceed the limit of {MAX_REPLAY_RECIPIENTS}"
        )
    recipients = [_parse_x_receiver(f, mail_from.smtputf8) for f in receivers]
    trusted = _created_by(injected) == local_stamp

    dropped = {id(f) for f in injected}

    def remove(field: HeaderField) -> bool:
        return (
            id(field) in dropped
            or field.lname == "bcc"
            or (not trusted and _is_firewalled(field))
        )

    append: list[bytes] = []
    replace = _fix_id_and_date(parsed, default_domain, now, append)
    received = make_received(
        from_=_helo_domain(injected), by=server_name, with_="hubport Replay", when=now
    )
    stored = rebuild(parsed, remove=remove, prepend=[received], replace=replace, append=append)
    return Envelope(mail_from, recipients), stored


# --------------------------------------------------------------------------------------------
# The envelope of a refused file, for its NDR


def _head_section(head: bytes, replay: bool) -> ParsedMessage:
    """The header fields in the first bytes of a file (the rest may not have been read)."""
    bad = _UNSAFE_IN_HEAD_RE.search(head)
    if bad is not None:  # a NUL or bare CR past the header must not spoil the notice
        head = head[: head.rfind(b"\n", 0, bad.start()) + 1]
    data, _ = repair_header_section(canonicalize_line_endings(head), replay=replay)
    blank = data.find(CRLF + CRLF)
    if blank >= 0:
        data = data[: blank + 4]  # the header and the blank line that ends it
    return parse_header_section(data)


def notice_envelope(head: bytes, *, replay: bool,
                    truncated: bool = True) -> tuple[Envelope, bytes]:
    """The envelope an NDR for a refused folder file reports on, and the header it returns.

    `head` is the start of the file (`truncated`) or all of it: for a file over the size
    limit only a bounded first part is read, so a cut-off last line is ignored. Addresses
    are taken best effort (a malformed recipient is left out; with none left the sender
    stands in, as a DSN needs one). The sender is what the file's own format names (Pickup:
    From/Sender; Replay: X-Sender). Raises MessageFormatError when there is no sender to
    notify: none, an invalid one, or the null sender (RFC 5321 §4.5.5: never a notification
    to it); such a file goes to `.bad`.
    """
    if truncated and b"\n" in head and not head.endswith(b"\n"):
        head = head[: head.rfind(b"\n") + 1]
    parsed = _head_section(head, replay)
    if replay:
        injected = _split_injected(parsed)
        senders = [f for f in injected if f.lname == "x-sender"]
        if len(senders) != 1:
            raise MessageFormatError("no X-Sender" if not senders else "duplicate X-Sender")
        mail_from = _parse_x_sender(senders[0])
        recipients = []
        for field in injected:
            if field.lname == "x-receiver":
                try:
                    recipients.append(_parse_x_receiver(field, mail_from.smtputf8))
                except MessageFormatError:
                    continue
        dropped = {id(f) for f in injected}
        header = rebuild(parsed, remove=lambda f: id(f) in dropped or f.lname == "bcc")
    else:
        raw_sender = _pickup_sender(parsed)
        sender = _normalize(raw_sender, "sender", smtputf8=not raw_sender.isascii())
        mail_from = MailFrom(sender, smtputf8=not sender.isascii())
        recipients = []
        for raw in _dedupe(extract_addresses(
                f.text for f in parsed.fields if f.lname in ("to", "cc", "bcc"))):
            try:
                recipients.append(EnvelopeRecipient(normalize_address(raw, smtputf8=True)))
            except AddressError:
                continue
        header = rebuild(parsed, remove=lambda f: f.lname == "bcc")
    if not mail_from.address:
        raise MessageFormatError("the null sender cannot be notified")
    if not recipients:
        recipients = [EnvelopeRecipient(mail_from.address)]
    return Envelope(mail_from, recipients), header


# --------------------------------------------------------------------------------------------
# Replay: writing


def _check_token(value: str, what: str) -> str:
    if not _TOKEN_RE.match(value):
        raise ValueError(f"{what} must be a non-empty token without spaces or controls: "
                         f"'{display_name(value)}'")
    return value


def _bracketed(address: str, what: str) -> str:
    """`<address>`, refusing anything the reader would not give back unchanged."""
    if _CONTROL_RE.search(address):
        raise ValueError(f"control character in {what} address '{display_name(address)}'")
    text = f"<{address}>"
    try:
        parsed, rest = _split_address(text, what)
    except MessageFormatError as exc:
        raise ValueError(exc.reason) from None
    if parsed != address or rest:
        raise ValueError(f"{what} address cannot be written: '{display_name(address)}'")
    return text


def _sender_value(mail_from: MailFrom) -> str:
    parts = [_bracketed(mail_from.address, "X-Sender")]
    if mail_from.body is not None:
        if mail_from.body.upper() not in _BODY_VALUES:
            raise ValueError(f"bad BODY value '{display_name(mail_from.body)}'")
        parts.append(f"BODY={mail_from.body}")
    if mail_from.ret is not None:
        if mail_from.ret.upper() not in _RET_VALUES:
            raise ValueError(f"bad RET value '{display_name(mail_from.ret)}'")
        parts.append(f"RET={mail_from.ret}")
    if mail_from.envid is not None:
        if not _XTEXT_RE.match(mail_from.envid):
            raise ValueError(f"ENVID is not xtext: '{display_name(mail_from.envid)}'")
        parts.append(f"ENVID={mail_from.envid}")
    if mail_from.auth is not None:
        if not _XTEXT_RE.match(mail_from.auth):
            raise ValueError(f"AUTH is not xtext: '{display_name(mail_from.auth)}'")
        parts.append(f"AUTH={mail_from.auth}")
    if mail_from.smtputf8:
        parts.append("SMTPUTF8")
    return " ".join(parts)


def _receiver_value(recipient: EnvelopeRecipient) -> str:
    if not recipient.address:
        raise ValueError("a recipient cannot be the null address")
    parts = [_bracketed(recipient.address, "X-Receiver")]
    if recipient.notify:
        if Notify.NEVER in recipient.notify:
            if len(recipient.notify) > 1:
                raise ValueError("NOTIFY=NEVER cannot be combined with others")
            parts.append("NOTIFY=NEVER")
        else:
            items = [n.value for n in _NOTIFY_ORDER if n in recipient.notify]
            parts.append("NOTIFY=" + ",".join(items))
    if recipient.orcpt is not None:
        parts.append("ORCPT=" + _check_token(recipient.orcpt, "ORCPT"))
    return " ".join(parts)


def format_replay(envelope: Envelope, data: bytes, *, created_by: str = "hubport") -> bytes:
    """The Replay/Drop file for `envelope` and the stored message `data` (kept unchanged).

    Ends the injected block with `X-EndOfInjectedXHeaders: <size of the lines before it>`
    so the reader knows where the message's own headers start.
    """
    if not envelope.recipients:
        raise ValueError("an envelope needs at least one recipient")
    addresses = [envelope.mail_from.address, *(r.address for r in envelope.recipients)]
    if not envelope.mail_from.smtputf8 and not all(a.isascii() for a in addresses):
        raise ValueError("non-ASCII envelope address without SMTPUTF8")
    lines = [make_field("X-Sender", _sender_value(envelope.mail_from))]
    lines.extend(make_field("X-Receiver", _receiver_value(r)) for r in envelope.recipients)
    lines.append(make_field("X-CreatedBy", _check_token(created_by, "X-CreatedBy")))
    size = sum(len(line) for line in lines)
    lines.append(make_field("X-EndOfInjectedXHeaders", str(size)))
    return b"".join(lines) + data
