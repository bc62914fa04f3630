"""RFC 3464 delivery status notifications (NDRs, delay DSNs, success DSNs).

The DSN is assembled as bytes so the returned original can be embedded verbatim: a
message/rfc822 part that re-serializes the original would break signatures and hide
what was really sent. Every string that reaches a header comes from somewhere we do
not control (remote replies, envelope parameters, the original's subject), so all of
them pass through one sanitizer that removes CR, LF and other control characters.
"""

from __future__ import annotations

import quopri
import re
import textwrap
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.header import Header, decode_header, make_header
from email.utils import format_datetime

from hubport.core.model import MailFrom

__all__ = ["ACTIONS", "MAX_LISTED_RECIPIENTS", "DsnRecipient", "build_dsn"]

ACTIONS = ("failed", "delayed", "delivered", "relayed", "expanded")
#: a DSN lists at most this many recipients, whatever produced it (a Pickup file over its
#: recipient limit, a 10,000-recipient Replay file the categorizer refuses): the sender
#: learns what happened and to whom in the first ones; the tracking log has every one
MAX_LISTED_RECIPIENTS = 100

CRLF = "\r\n"
_FOLD_WIDTH = 78
_MAX_TOKEN = 900  # keeps every generated line under the 998-octet limit
_MAX_VALUE = 4000  # a runaway multi-line remote reply must not bloat the DSN
_MAX_SUBJECT = 500
_MAX_TEXT_LINE = 998
_FIELD_SCAN_LIMIT = 1024 * 1024  # Subject and Message-ID are looked for this far

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]+")
_STATUS = re.compile(r"^[245]\.\d{1,3}\.\d{1,3}$")
_TYPED_ADDRESS = re.compile(r"^([A-Za-z0-9][A-Za-z0-9-]*);(.*)$", re.DOTALL)
_FIELD_LINE = re.compile(rb"[!-9;-~]+[ \t]*:")
_MSG_ID = re.compile(r"<[^<>\s]+>")
# anchored at line starts so the scan stays linear; a bare CR does not end a line
_LONG_LINE = re.compile(rb"^[^\n]{%d}[^\r\n]" % _MAX_TEXT_LINE, re.MULTILINE)
_LINE_ENDING = re.compile(rb"\r\n|\r|\n")


@dataclass(frozen=True)
class DsnRecipient:
    """One per-recipient block of the report: what happened to one address."""

    final_recipient: str  # the address the action applies to (rfc822)
    original_recipient: str | None  # the ORCPT as given ('rfc822;a@b' or 'a@b')
    action: str  # 'failed' | 'delayed' | 'delivered' | 'relayed' | 'expanded'
    status: str  # enhanced status code, e.g. '5.1.1', '4.4.7'
    diagnostic: str | None = None  # the SMTP reply, e.g. '550 5.1.1 ...; not found'
    remote_mta: str | None = None  # dns name of the remote MTA that gave the reply
    last_attempt: float | None = None
    will_retry_until: float | None = None  # for 'delayed'


@dataclass(frozen=True)
class _Part:
    """A generated MIME body part: its header lines and its body bytes."""

    headers: tuple[str, ...]
    body: bytes
    cte: str  # the transfer-encoding domain: 7bit, 8bit or binary


# --------------------------------------------------------------------------- public


def build_dsn(
    *,
    original: bytes,
    mail_from: MailFrom,
    recipients: Sequence[DsnRecipient],
    reporting_mta: str,
    postmaster: str,
    arrival_date: float,
    message_id_domain: str,
    now: float | None = None,
    max_return_size: int = 10 * 1024 * 1024,
    max_listed: int = MAX_LISTED_RECIPIENTS,
    original_size: int | None = None,
) -> tuple[bytes, str]:
    """Returns (the DSN message as CRLF bytes, its Message-ID header value '<...>').

    Only the first `max_listed` recipients get their lines and per-recipient blocks; the
    text says how many more there were. Raises ValueError only for caller mistakes (null
    sender, no recipients, unknown action); a malformed original always still yields a DSN.
    ``original_size`` is the original's real size when ``original`` holds only its first
    octets (a large spooled message: only its header section can be returned).
    """
    if _clean(mail_from.address) in ("", "<>"):
        raise ValueError("a DSN is never sent to the null sender")
    if not recipients:
        raise ValueError("a DSN needs at least one recipient")
    all_actions = [_action(r.action) for r in recipients]
    total = len(recipients)
    recipients = recipients[: max(1, max_listed)]
    actions = all_actions[: len(recipients)]
    now = time.time() if now is None else now

    header_section = _header_section(original, max_return_size)
    fields = _header_fields(header_section[:_FIELD_SCAN_LIMIT])
    subject = _original_subject(fields)
    message_id = f"<{uuid.uuid4().hex}@{_token(message_id_domain) or 'localhost'}>"

    parts = [
        _text_part(recipients, actions, reporting_mta, subject, now, total),
        _status_part(recipients, actions, mail_from, reporting_mta, arrival_date),
        _returned_part(original, header_section, mail_from, all_actions, max_return_size,
                       len(original) if original_size is None else original_size),
    ]
    boundary = _boundary(parts)
    headers = _top_headers(
        mail_from,
        postmaster,
        subject,
        all_actions,
        fields,
        message_id,
        now,
        boundary,
        _widest_cte(p.cte for p in parts),
    )
    return _assemble(headers, parts, boundary), message_id


# ------------------------------------------------------------------ sanitizing


def _clean(value: str | None) -> str:
    """One line of text: control characters (CR, LF, NUL ...) become single spaces."""
    if not value:
        return ""
    return " ".join(_CONTROL.sub(" ", value).split())


def _ascii(value: str | None) -> str:
    """Clean text for the 7-bit delivery-status part."""
    return _clean(value).encode("ascii", "replace").decode("ascii")


def _token(value: str | None) -> str:
    """A host name or similar: no whitespace, no angle brackets, ASCII."""
    return re.sub(r"[\s<>]+", "", _ascii(value))


def _utf8(value: str) -> bytes:
    """Encode without ever raising (lone surrogates become '?')."""
    return value.encode("utf-8", "replace")


def _action(action: str) -> str:
    normalized = (action or "").strip().lower()
    if normalized not in ACTIONS:
        raise ValueError(f"unknown DSN action: {action!r}")
    return normalized


def _status(status: str, action: str) -> str:
    """The enhanced code; a garbled one falls back to the class the action implies."""
    cleaned = _clean(status)
    if _STATUS.match(cleaned):
        return cleaned
    return {"failed": "5.0.0", "delayed": "4.0.0"}.get(action, "2.0.0")


def _utf8_xtext(address: str) -> str:
    """RFC 6533 utf-8-addr-xtext: non-ASCII and '\\', '+', '=' as \\x{HEX}."""
    out = []
    for ch in address:
        code = ord(ch)
        if 0x21 <= code <= 0x7E and ch not in "\\+=":
            out.append(ch)
        else:
            out.append(f"\\x{{{code:02X}}}")
    return "".join(out)


def _typed_address(value: str) -> str:
    """'type;address' for Original-/Final-Recipient; bare addresses are rfc822."""
    cleaned = _clean(value)
    match = _TYPED_ADDRESS.match(cleaned)
    addr_type, address = (match[1], match[2]) if match else ("rfc822", cleaned)
    if address.isascii():
        return f"{addr_type};{address}"
    return f"utf-8;{_utf8_xtext(address)}"


def _fold(name: str, value: str) -> str:
    """'Name: value' folded at spaces; cleaned values contain no other whitespace."""
    value = value[:_MAX_VALUE]
    line = f"{name}:"
    lines = []
    for word in value.split(" ") if value else []:
        word = word[:_MAX_TOKEN]
        if len(line) + 1 + len(word) > _FOLD_WIDTH and line.strip() != f"{name}:":
            lines.append(line)
            line = ""
        line += " " + word
    lines.append(line)
    return CRLF.join(lines)


def _date(timestamp: float) -> str:
    """RFC 5322 date in UTC (deterministic for a given timestamp)."""
    return format_datetime(datetime.fromtimestamp(timestamp, tz=UTC))


# ----------------------------------------------------------- the original message


def _header_section(original: bytes, limit: int) -> bytes:
    """The original's header lines, up to the blank line or the first non-header line.

    Works on any bytes: no blank line means the header section ends where lines stop
    looking like fields; a huge section is cut at a line boundary within `limit`.
    """
    pos = 0
    size = len(original)
    while pos < size:
        newline = original.find(b"\n", pos)
        end = size if newline < 0 else newline + 1
        content = original[pos:end].rstrip(b"\r\n")
        if not content:
            break
        is_unix_from = pos == 0 and content.startswith(b"From ")
        is_continuation = content[:1] in (b" ", b"\t") and pos > 0
        if not (is_unix_from or is_continuation or _FIELD_LINE.match(content)):
            break
        if end > limit:
            break
        pos = end
    return original[:pos]


def _header_fields(section: bytes) -> list[tuple[str, str]]:
    """(lower-case name, unfolded value) pairs, decoded leniently as UTF-8."""
    fields: list[tuple[str, str]] = []
    for raw_line in _LINE_ENDING.split(section):
        line = raw_line.decode("utf-8", "replace")
        if line[:1] in (" ", "\t") and fields:
            name, value = fields[-1]
            fields[-1] = (name, value + line)
        elif ":" in line:
            name, _, value = line.partition(":")
            fields.append((name.strip().lower(), value))
    return fields


def _first(fields: list[tuple[str, str]], name: str) -> str | None:
    return next((value for field, value in fields if field == name), None)


def _original_subject(fields: list[tuple[str, str]]) -> str:
    """The original subject with RFC 2047 words decoded, as one clean line."""
    raw = _first(fields, "subject")
    if raw is None:
        return ""
    try:
        decoded = str(make_header(decode_header(_clean(raw))))
    except Exception:
        decoded = raw
    subject = _clean(decoded)
    return subject if len(subject) <= _MAX_SUBJECT else subject[:_MAX_SUBJECT] + "..."


def _original_message_id(fields: list[tuple[str, str]]) -> str | None:
    raw = _first(fields, "message-id")
    match = _MSG_ID.search(_ascii(raw)) if raw else None
    return match[0][:_MAX_TOKEN] if match else None


# --------------------------------------------------------------- human readable


_EXPIRED = (
    "The message couldn't be delivered in time: the server kept trying until the "
    "message expired. The destination server may be down or unreachable."
)
_TOO_BIG = (
    "Your message is too large to be delivered to this recipient. Try sending a "
    "smaller message or removing attachments."
)
_LOOP = (
    "A mail loop or a mail server configuration problem was detected, so the message "
    "was stopped. Please contact your e-mail admin."
)
_EXPLANATIONS = {
    "5.1.0": "The message was rejected because of a problem with the sender's e-mail "
    "address. Please contact your e-mail admin.",
    "5.1.1": "The e-mail address you entered couldn't be found. Please check the "
    "recipient's e-mail address and try to resend the message. If the problem "
    "continues, please contact your helpdesk.",
    "5.1.3": "The format of the e-mail address isn't correct. A correctly formatted "
    "address looks like this: someone@example.com. Please check the recipient's "
    "e-mail address and try to resend the message.",
    "5.1.8": "The receiving server refused the sender's e-mail address. Please "
    "contact your e-mail admin.",
    "5.2.2": "The recipient's mailbox is full and can't accept messages now. Please "
    "try resending your message later, or contact the recipient directly.",
    "5.2.3": _TOO_BIG,
    "5.3.4": _TOO_BIG,
    "5.3.0": "The message couldn't be processed by the mail server. Please contact "
    "your e-mail admin.",
    "5.3.5": _LOOP,
    "5.4.4": "The destination domain couldn't be found, or there is no route to it. "
    "Check the spelling of the domain in the recipient's e-mail address.",
    "5.4.6": _LOOP,
    "4.4.1": _EXPIRED,
    "4.4.2": _EXPIRED,
    "4.4.7": _EXPIRED,
    "5.4.7": _EXPIRED,
    "5.5.3": "Your message has too many recipients. Please split the recipient list "
    "and send the message again.",
    "5.7.1": "You don't have permission to send to this recipient, or the message was "
    "rejected by a policy. For assistance, contact your e-mail admin.",
    "5.7.3": "The mail servers couldn't authenticate to each other. Please contact "
    "your e-mail admin.",
}
_CLASS_EXPLANATIONS = {
    "4": "A temporary problem kept the message from being delivered, and it didn't "
    "clear up in time.",
    "5": "The message couldn't be delivered. The diagnostic information below tells "
    "your e-mail admin why.",
}
_HEADINGS = {
    "failed": "Delivery has failed to these recipients or groups:",
    "delayed": "Delivery is delayed to these recipients or groups:",
    "delivered": "Your message was delivered to these recipients or groups:",
    "relayed": "Delivery to these recipients or groups is complete, but no delivery "
    "notification was sent by the destination server:",
    "expanded": "Your message was delivered to these groups, which passed it on to "
    "their members:",
}


_NOT_LISTED = (
    "This report is about {total:,} recipients and lists the first {listed:,}; the other "
    "{more:,} are in the message tracking log of {server}."
)
_STILL_TRYING = (
    "This message hasn't been delivered yet. Delivery will continue to be attempted."
)
_RETRY_UNTIL = (
    "The server will keep trying to deliver this message for the next {} (until {}). "
    "You'll be notified if the message can't be delivered by that time."
)


def _wrap(paragraph: str) -> str:
    return textwrap.fill(paragraph, 76, break_long_words=False, break_on_hyphens=False)


def _explanation(status: str) -> str:
    return _EXPLANATIONS.get(status) or _CLASS_EXPLANATIONS.get(status[:1], "")


def _remaining(seconds: float) -> str:
    """'1 day, 19 hours and 52 minutes' as Exchange words its delay notices."""
    delta = timedelta(seconds=max(0, int(seconds)))
    hours, rest = divmod(delta.seconds, 3600)
    units = [(delta.days, "day"), (hours, "hour"), (rest // 60, "minute")]
    words = [f"{n} {unit}{'s' if n != 1 else ''}" for n, unit in units if n]
    if not words:
        return "less than a minute"
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def _section(
    action: str, group: list[DsnRecipient], subject: str, now: float
) -> list[str]:
    """One Exchange-style paragraph group for the recipients sharing an action."""
    lines = [_HEADINGS[action], ""]
    for rcpt in group:
        lines.append(_clean(rcpt.final_recipient))
        if action == "failed":
            lines.append(_wrap(_explanation(_status(rcpt.status, action))))
        lines.append("")
    if action == "failed":
        return lines
    lines += [f"Subject: {subject}", ""]
    if action == "delayed":
        lines += [_wrap(_STILL_TRYING), ""]
        until = [r.will_retry_until for r in group if r.will_retry_until is not None]
        if until:
            last = max(until)
            lines += [
                _wrap(_RETRY_UNTIL.format(_remaining(last - now), _date(last))),
                "",
            ]
    return lines


def _text_part(
    recipients: Sequence[DsnRecipient],
    actions: list[str],
    reporting_mta: str,
    subject: str,
    now: float,
    total: int,
) -> _Part:
    lines: list[str] = []
    for action in ACTIONS:
        group = [r for r, a in zip(recipients, actions) if a == action]
        if group:
            lines += _section(action, group, subject, now)
    if total > len(recipients):
        lines += [_wrap(_NOT_LISTED.format(
            more=total - len(recipients), total=total, listed=len(recipients),
            server=_clean(reporting_mta))), ""]
    lines += [
        "",
        "Diagnostic information for administrators:",
        "",
        f"Generating server: {_clean(reporting_mta)}",
        "",
    ]
    for rcpt, action in zip(recipients, actions):
        detail = _clean(rcpt.diagnostic)[:_MAX_VALUE] or _status(rcpt.status, action)
        where = _clean(rcpt.remote_mta)
        lines += [_clean(rcpt.final_recipient), f"{where} #{detail} ##".lstrip(), ""]
    return _text_plain("\n".join(lines))


def _text_plain(text: str) -> _Part:
    """text/plain UTF-8 from LF-separated text: 7bit when it is plain ASCII,
    quoted-printable otherwise (the report itself stays 7-bit clean)."""
    lf_data = _utf8(text)
    data = lf_data.replace(b"\n", b"\r\n")
    headers = [
        'Content-Type: text/plain; charset="utf-8"',
        "Content-Description: Notification",
    ]
    if data.isascii() and not _LONG_LINE.search(data):
        return _Part((*headers, "Content-Transfer-Encoding: 7bit"), data, "7bit")
    encoded = quopri.encodestring(lf_data).replace(b"\n", b"\r\n")
    headers.append("Content-Transfer-Encoding: quoted-printable")
    return _Part(tuple(headers), encoded, "7bit")


# ---------------------------------------------------------------- machine readable


def _status_part(
    recipients: Sequence[DsnRecipient],
    actions: list[str],
    mail_from: MailFrom,
    reporting_mta: str,
    arrival_date: float,
) -> _Part:
    blocks = [_per_message(mail_from, reporting_mta, arrival_date)]
    blocks += [_per_recipient(r, a) for r, a in zip(recipients, actions)]
    body = CRLF.join(CRLF.join(block) + CRLF for block in blocks)
    headers = (
        "Content-Type: message/delivery-status",
        "Content-Description: Delivery report",
        "Content-Transfer-Encoding: 7bit",
    )
    return _Part(headers, body.encode("ascii"), "7bit")


def _per_message(mail_from: MailFrom, reporting_mta: str, arrival: float) -> list[str]:
    block = [_fold("Reporting-MTA", f"dns; {_token(reporting_mta)}")]
    if mail_from.envid:  # echoed as the xtext we were given, decoded nothing
        block.append(_fold("Original-Envelope-Id", _ascii(mail_from.envid)))
    block.append(_fold("Arrival-Date", _date(arrival)))
    return block


def _per_recipient(rcpt: DsnRecipient, action: str) -> list[str]:
    block = []
    if rcpt.original_recipient is not None and _clean(rcpt.original_recipient):
        block.append(
            _fold("Original-Recipient", _typed_address(rcpt.original_recipient))
        )
    block += [
        _fold("Final-Recipient", _typed_address(rcpt.final_recipient)),
        _fold("Action", action),
        _fold("Status", _status(rcpt.status, action)),
    ]
    if rcpt.remote_mta and _token(rcpt.remote_mta):
        block.append(_fold("Remote-MTA", f"dns; {_token(rcpt.remote_mta)}"))
    if rcpt.diagnostic and _ascii(rcpt.diagnostic):
        block.append(_fold("Diagnostic-Code", f"smtp; {_ascii(rcpt.diagnostic)}"))
    if rcpt.last_attempt is not None:
        block.append(_fold("Last-Attempt-Date", _date(rcpt.last_attempt)))
    if action == "delayed" and rcpt.will_retry_until is not None:
        block.append(_fold("Will-Retry-Until", _date(rcpt.will_retry_until)))
    return block


# ---------------------------------------------------------------- returned content


def _transfer_encoding(data: bytes) -> str:
    """The encoding domain of embedded bytes, so the DSN labels them truthfully."""
    if b"\0" in data or _LONG_LINE.search(data):
        return "binary"
    return "7bit" if data.isascii() else "8bit"


def _returned_part(
    original: bytes,
    header_section: bytes,
    mail_from: MailFrom,
    actions: list[str],
    max_return_size: int,
    original_size: int,
) -> _Part:
    """The full original only for failures (RFC 3461 4.3), unless RET=HDRS or too big."""
    wants_full = (mail_from.ret or "").strip().upper() != "HDRS"
    if "failed" in actions and wants_full and original_size <= max_return_size:
        cte = _transfer_encoding(original)
        headers = (
            "Content-Type: message/rfc822",
            "Content-Description: Undelivered Message",
            f"Content-Transfer-Encoding: {cte}",
        )
        return _Part(headers, original, cte)
    data = _LINE_ENDING.sub(b"\r\n", header_section)
    cte = _transfer_encoding(data)
    headers = (
        "Content-Type: text/rfc822-headers",
        "Content-Description: Message Headers",
        f"Content-Transfer-Encoding: {cte}",
    )
    return _Part(headers, data, cte)


# ---------------------------------------------------------------- the envelope


def _widest_cte(ctes: Iterable[str]) -> str:
    order = ("7bit", "8bit", "binary")
    return max(ctes, key=order.index)


def _boundary(parts: list[_Part]) -> str:
    """A uuid boundary that provably occurs in none of the bodies."""
    while True:
        boundary = f"=_hubport-dsn_{uuid.uuid4().hex}"
        marker = b"--" + boundary.encode("ascii")
        if not any(marker in part.body for part in parts):
            return boundary


def _subject_header(subject: str, actions: list[str]) -> str:
    if "failed" in actions:
        prefix = "Undeliverable:"
    elif "delayed" in actions:
        prefix = "Delivery delayed:"
    else:
        prefix = "Delivered:"
    header = Header(prefix, "us-ascii", header_name="Subject")
    if subject:  # literal '=?' text must not turn into an encoded word downstream
        plain = subject.isascii() and "=?" not in subject
        header.append(subject, "us-ascii" if plain else "utf-8")
    return "Subject: " + header.encode(linesep=CRLF)


def _top_headers(
    mail_from: MailFrom,
    postmaster: str,
    subject: str,
    actions: list[str],
    fields: list[tuple[str, str]],
    message_id: str,
    now: float,
    boundary: str,
    cte: str,
) -> list[str]:
    sender = re.sub(r"[\s<>]+", "", _clean(postmaster))
    recipient = _clean(mail_from.address).strip("<>")
    headers = [
        f'From: "Mail Delivery System" <{sender}>',
        f"To: <{recipient}>",
        _subject_header(subject, actions),
        f"Date: {_date(now)}",
        f"Message-ID: {message_id}",
    ]
    original_id = _original_message_id(fields)
    if original_id:
        headers += [f"In-Reply-To: {original_id}", f"References: {original_id}"]
    headers += [
        "MIME-Version: 1.0",
        "Content-Type: multipart/report; report-type=delivery-status;",
        f'\tboundary="{boundary}"',
        f"Content-Transfer-Encoding: {cte}",
        "Auto-Submitted: auto-replied",
    ]
    if "failed" in actions:
        headers.append("X-MS-Exchange-Message-Is-Ndr:")
    return headers


def _assemble(headers: list[str], parts: list[_Part], boundary: str) -> bytes:
    """Header section, preamble, parts; the CRLF before a delimiter belongs to it."""
    delimiter = _utf8(f"--{boundary}")
    out = [_utf8(CRLF.join(headers) + CRLF + CRLF)]
    out.append(b"This is a MIME-encapsulated message.\r\n\r\n")
    for part in parts:
        out += [delimiter, b"\r\n", _utf8(CRLF.join(part.headers)), b"\r\n\r\n"]
        out += [part.body, b"\r\n"]
    out += [delimiter, b"--\r\n"]
    return b"".join(out)
