"""What leaves through a connection: header firewall, 8-bit downgrade, envelope parameters.

Pure functions on bytes, message bodies and envelope values, so they are tested without a
network. The ``*_body`` variants are for a spooled body (core/body.py): they read only the
header section or scan in chunks, so their memory does not grow with the message.
"""

from __future__ import annotations

import asyncio
import email
import email.encoders
import email.policy
import re
from collections.abc import Callable
from email.generator import BytesGenerator
from email.message import Message
from io import BytesIO

from hubport.core.body import MessageBody
from hubport.core.headers import (
    HeaderField,
    MessageFormatError,
    ParsedMessage,
    parse_header_section,
    rebuild,
    rewrite_header_section,
)
from hubport.core.model import MailFrom, Notify

_ORG_PREFIXES = ("x-ms-exchange-organization-", "x-ms-exchange-forest-")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_POLICY = email.policy.compat32.clone(linesep="\r\n", max_line_length=0)


# -- header firewall by Usage (docs/exchange.md, "Send connectors") -------------------------


#: the linked connectors' stamp (plugins/smtp_send/linked.py): a send connector strips it,
#: and the linked one writes its own after that
LINK_STAMP = "x-hubport-linked"


def prepend(data: bytes | MessageBody, line: bytes) -> bytes | MessageBody:
    """The message with ``line`` (a whole header field, CRLF included) on top."""
    if isinstance(data, bytes):
        return line + data
    return data.replace_prefix(0, line)


def firewall_predicate(usage: str | None) -> Callable[[HeaderField], bool] | None:
    """Which fields a connector of this Usage strips; None = keep everything.

    Routing headers (Received, Resent-*) are kept for every usage except Custom;
    organization and forest X-headers only for Internal and Partner; the linked
    connectors' stamp by none. ``None`` is the intra-organization relay to another hub,
    which keeps everything.
    """
    if usage is None:
        return None
    strip_routing = usage == "Custom"
    strip_org = usage in ("Custom", "Internet")

    def remove(field: HeaderField) -> bool:
        name = field.lname
        if name == LINK_STAMP:  # hubport's own: never leaves the organization
            return True
        if strip_org and name.startswith(_ORG_PREFIXES):
            return True
        return strip_routing and (name == "received" or name.startswith("resent-"))

    return remove


def _nothing_to_strip(usage: str | None, head: bytes) -> bool:
    """Internal and Partner connectors strip only the linked stamp: no parse (on every
    message they send) when the header section cannot hold one."""
    if usage in ("Custom", "Internet"):
        return False
    section = head.split(b"\r\n\r\n", 1)[0].split(b"\n\n", 1)[0]
    return LINK_STAMP.encode() not in section.lower()


def apply_firewall(data: bytes, usage: str | None) -> bytes:
    remove = firewall_predicate(usage)
    if remove is None or _nothing_to_strip(usage, data):
        return data
    try:
        parsed = parse_header_section(data)
    except MessageFormatError:
        return data
    if not any(remove(f) for f in parsed.fields):
        return data
    return rebuild(parsed, remove=remove)


def apply_firewall_body(body: MessageBody, usage: str | None) -> MessageBody:
    """``apply_firewall`` for a spooled body: only the header section is read and rewritten
    (``rewrite_header_section``), the spool file is not copied. Blocking: run it in a
    thread."""
    remove = firewall_predicate(usage)
    if remove is None or _nothing_to_strip(usage, body.prefix):
        return body

    def rewrite(parsed: ParsedMessage) -> bytes | None:
        if not any(remove(f) for f in parsed.fields):
            return None
        return rebuild(parsed, remove=remove)

    try:
        return rewrite_header_section(body, rewrite)
    except MessageFormatError:
        return body


# -- 8-bit and SMTPUTF8 (RFC 6152, RFC 6531) -----------------------------------------------


def declares_8bit(mail_from: MailFrom) -> bool:
    """The sender's BODY parameter says 8-bit (BINARYMIME goes on as 8BITMIME)."""
    return (mail_from.body or "").upper() in ("8BITMIME", "BINARYMIME")


def is_8bit(data: bytes, mail_from: MailFrom) -> bool:
    return declares_8bit(mail_from) or not data.isascii()


async def body_is_ascii(body: MessageBody) -> bool:
    """Whether every octet of ``body`` is 7-bit, scanned chunk by chunk in a thread (stops
    at the first 8-bit chunk)."""
    def scan() -> bool:
        return all(piece.isascii() for piece in body.chunks())

    return await asyncio.to_thread(scan)


def needs_smtputf8(mail_from: MailFrom, recipients: list[str]) -> bool:
    return mail_from.smtputf8 or not mail_from.address.isascii() or not all(
        r.isascii() for r in recipients)


def downgrade_to_7bit(data: bytes) -> bytes | None:
    """The message with every 8-bit leaf re-encoded (QP for text, base64 otherwise).

    None when that cannot be done faithfully: 8-bit bytes in a header (only SMTPUTF8 could
    carry them) or anything the email package cannot round-trip.
    """
    if data.isascii():
        return data
    try:
        head_end = data.find(b"\r\n\r\n")
        if head_end < 0 or not data[:head_end].isascii():
            return None
        msg = email.message_from_bytes(data, policy=_POLICY)
        if not _downgrade_part(msg):
            return None
        out = BytesIO()
        BytesGenerator(out, mangle_from_=False, policy=_POLICY).flatten(msg)
        result = out.getvalue()
    except Exception:  # the email package on hostile input: refuse rather than guess
        return None
    return result if result.isascii() else None


def _downgrade_part(part: Message) -> bool:
    for name, value in part.items():
        if not str(value).isascii() or not name.isascii():
            return False
    if part.is_multipart():
        payload = part.get_payload()
        ok = isinstance(payload, list) and all(
            isinstance(p, Message) and _downgrade_part(p) for p in payload)
        _set_7bit_container(part)
        return ok
    if part.get_content_maintype() == "message":  # message/rfc822 parsed as a container
        payload = part.get_payload()
        if isinstance(payload, list):
            ok = all(isinstance(p, Message) and _downgrade_part(p) for p in payload)
            _set_7bit_container(part)
            return ok
    cte = str(part.get("Content-Transfer-Encoding", "7bit")).strip().lower()
    if cte in ("base64", "quoted-printable"):
        raw = part.get_payload()
        return isinstance(raw, str) and raw.encode("ascii", "surrogateescape").isascii()
    body = part.get_payload(decode=True)
    if not isinstance(body, bytes):
        return False
    if body.isascii():
        if cte not in ("7bit", ""):
            del part["Content-Transfer-Encoding"]
            part["Content-Transfer-Encoding"] = "7bit"
        return True
    del part["Content-Transfer-Encoding"]
    if part.get_content_maintype() == "text":
        part.set_payload(body.replace(b"\r\n", b"\n"))
        email.encoders.encode_quopri(part)
    else:
        part.set_payload(body)
        email.encoders.encode_base64(part)
    return True


def _set_7bit_container(part: Message) -> None:
    if "Content-Transfer-Encoding" in part:
        del part["Content-Transfer-Encoding"]
        part["Content-Transfer-Encoding"] = "7bit"


# -- envelope values ---------------------------------------------------------------------


def has_control(value: str) -> bool:
    """A CR, LF or other control character: it must never reach the wire."""
    return bool(_CONTROL.search(value))


def xtext(value: str) -> str:
    """RFC 3461 xtext, applied to a decoded value (idempotent through ``unxtext``)."""
    out = []
    for ch in value:
        if 33 <= ord(ch) <= 126 and ch not in "+=":
            out.append(ch)
        else:
            out.extend(f"+{b:02X}" for b in ch.encode("utf-8"))
    return "".join(out)


def unxtext(value: str) -> str:
    return re.sub(r"\+([0-9A-Fa-f]{2})", lambda m: chr(int(m.group(1), 16)), value)


def mail_options(mail_from: MailFrom, size: int, *, body: str | None, smtputf8: bool,
                 dsn: bool, size_ext: bool) -> list[str]:
    """MAIL FROM parameters the peer understands."""
    options = []
    if size_ext:
        options.append(f"SIZE={size}")
    if body:
        options.append(f"BODY={body}")
    if smtputf8:
        options.append("SMTPUTF8")
    if dsn:
        if mail_from.ret and mail_from.ret.upper() in ("FULL", "HDRS"):
            options.append(f"RET={mail_from.ret.upper()}")
        if mail_from.envid and not has_control(mail_from.envid):
            options.append(f"ENVID={xtext(unxtext(mail_from.envid))}")
    return options


def rcpt_options(notify: frozenset[Notify], orcpt: str | None, *, dsn: bool) -> list[str]:
    if not dsn:
        return []
    options = []
    if notify:
        if Notify.NEVER in notify:
            options.append("NOTIFY=NEVER")
        else:
            order = (Notify.SUCCESS, Notify.FAILURE, Notify.DELAY)
            options.append("NOTIFY=" + ",".join(n.value for n in order if n in notify))
    if orcpt and not has_control(orcpt):
        kind, sep, address = orcpt.partition(";")
        if not sep:
            kind, address = "rfc822", orcpt
        decoded = unxtext(address.strip())
        if kind.strip().isascii() and decoded.isascii() and decoded:
            options.append(f"ORCPT={kind.strip()};{xtext(decoded)}")
    return options
