"""The HTTP delivery agent (DeliveryProtocol ``HTTP``): POST each mail item as JSON.

Connector fields: ``Url`` (http:// or https://, required), ``Timeout`` (per request, 30s),
``Headers`` (a table of extra request headers, e.g. an API key). The body is
``{"sender", "recipients", "message_id", "internal_id", "next_hop", "message_base64"}``.
Answers: 2xx delivers, 408/429 and 5xx defer (honouring ``Retry-After``), other 4xx fail
with 550 5.6.0, a timeout or connection error defers. Built on asyncio streams: no
dependency beyond the standard library.

A large (spooled) message is never held in memory: the same JSON document is sent in pieces,
the text before the message's value, its base64 one chunk at a time, then the closing text,
with a ``Content-Length`` computed beforehand (so the gateway sees the very same request).
"""

from __future__ import annotations

import asyncio
import base64
import json
import ssl
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from hubport.core.api import DeliveryAgent, ItemResult, MailItem, MessageBody
from hubport.core.model import SmtpResponse

if TYPE_CHECKING:
    from hubport.core.config_fields import FieldReader

MAX_RESPONSE_HEAD = 64 * 1024
TRANSIENT_4XX = (408, 429)


@dataclass(frozen=True)
class HttpSettings:
    url: str
    host: str
    port: int
    path: str
    tls: bool
    timeout: float
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class HttpAnswer:
    status: int
    reason: str
    headers: dict[str, str]


def retry_after(value: str | None, now: float) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date), or None."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - now)
    except (TypeError, ValueError):
        return None


@dataclass(frozen=True)
class StreamedJson:
    """A request body of ``length`` octets sent piece by piece (a large message)."""

    length: int
    pieces: AsyncIterator[bytes]


def _envelope(item: MailItem, message_base64: str) -> bytes:
    return json.dumps({
        "sender": item.message.mail_from.address,
        "recipients": [r.address for r in item.recipients],
        "message_id": item.message.message_id,
        "internal_id": item.message.id,
        "next_hop": item.next_hop.domain,
        "message_base64": message_base64,  # last: a streamed document ends with it
    }).encode()


def envelope_json(item: MailItem) -> bytes:
    return _envelope(item, base64.b64encode(item.data).decode("ascii"))


def streamed_envelope(item: MailItem) -> StreamedJson:
    """``envelope_json`` octet for octet, without the whole message in memory.

    With an empty ``message_base64`` the document ends in ``""}``: the base64 text (which
    JSON never escapes) goes between that opening quote and the closing ``"}``.
    """
    text = _envelope(item, "")
    head, tail = text[:-2], text[-2:]
    length = len(head) + 4 * ((item.body.size + 2) // 3) + len(tail)
    return StreamedJson(length, _pieces(head, item.body, tail))


async def _pieces(head: bytes, body: MessageBody, tail: bytes) -> AsyncIterator[bytes]:
    yield head
    async for encoded in base64_chunks(body):
        yield encoded
    yield tail


async def base64_chunks(body: MessageBody) -> AsyncIterator[bytes]:
    """Base64 of ``body`` in pieces whose concatenation is ``b64encode`` of the whole: each
    piece encodes a multiple of 3 octets, the remainder is carried into the next one."""
    carry = b""
    async for piece in body.achunks():
        chunk = memoryview(carry + piece)
        cut = len(chunk) - len(chunk) % 3
        carry = bytes(chunk[cut:])
        if cut:
            yield base64.b64encode(chunk[:cut])
    if carry:
        yield base64.b64encode(carry)


class HttpAgent(DeliveryAgent):
    """POSTs each item to the connector's ``Url``; one request per item."""

    protocol = "HTTP"

    @classmethod
    def read_settings(cls, reader: FieldReader) -> HttpSettings | None:
        url = reader.string("Url", required=True) or ""
        timeout = reader.duration("Timeout", "30s", "1s", "1h") or 30.0
        headers = reader.raw("Headers", {})
        parts = urlsplit(url)
        if url and (parts.scheme not in ("http", "https") or not parts.hostname):
            reader.error("Url", f"{url!r} is not an http:// or https:// URL")
            return None
        if not isinstance(headers, dict) or not all(
                isinstance(k, str) and isinstance(v, str) and "\n" not in k + v
                and "\r" not in k + v for k, v in headers.items()):
            reader.error("Headers", "must be a table of single-line strings")
            headers = {}
        if not url:
            return None
        tls = parts.scheme == "https"
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        return HttpSettings(url, parts.hostname or "", parts.port or (443 if tls else 80), path,
                            tls, timeout, tuple(headers.items()))

    async def deliver(self, item: MailItem) -> ItemResult:
        settings: HttpSettings = self.settings
        try:
            async with asyncio.timeout(settings.timeout):
                body = streamed_envelope(item) if item.body.spooled else envelope_json(item)
                answer = await post(settings, body)
        except (TimeoutError, OSError, ValueError) as exc:
            reason = ("timed out" if isinstance(exc, TimeoutError)
                      else str(exc) or type(exc).__name__)
            return ItemResult.defer(item, SmtpResponse(
                451, "4.4.1", f"HTTP gateway {settings.host} unreachable: {reason}"))
        return self.result_for(item, answer)

    def result_for(self, item: MailItem, answer: HttpAnswer) -> ItemResult:
        text = f"HTTP {answer.status} {answer.reason}".strip()
        if 200 <= answer.status < 300:
            return ItemResult.success(item, SmtpResponse(250, "2.0.0", text), detail=text)
        if answer.status >= 500 or answer.status in TRANSIENT_4XX:
            wait = retry_after(answer.headers.get("retry-after"), time.time())
            return ItemResult.defer(item, SmtpResponse(451, "4.4.0", text), wait)
        return ItemResult.fail(item, SmtpResponse(550, "5.6.0", text))


async def post(settings: HttpSettings, body: bytes | StreamedJson) -> HttpAnswer:
    """One HTTP/1.1 POST with ``Connection: close``; reads the status line and headers.

    A ``StreamedJson`` body is written piece by piece, draining after each, so at most
    about one piece is buffered whatever the message's size."""
    context = ssl.create_default_context() if settings.tls else None
    reader, writer = await asyncio.open_connection(settings.host, settings.port, ssl=context,
                                                   limit=MAX_RESPONSE_HEAD)
    try:
        length = len(body) if isinstance(body, bytes) else body.length
        head = [f"POST {settings.path} HTTP/1.1", f"Host: {settings.host}:{settings.port}",
                "Content-Type: application/json", f"Content-Length: {length}",
                "Connection: close", "User-Agent: hubport-http-agent"]
        head += [f"{k}: {v}" for k, v in settings.headers]
        request_head = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1")
        if isinstance(body, bytes):
            writer.write(request_head + body)
        else:
            writer.write(request_head)
            async for piece in body.pieces:
                writer.write(piece)
                await writer.drain()
        await writer.drain()
        answer = parse_head(await reader.readuntil(b"\r\n\r\n"))
        while 100 <= answer.status < 200:  # interim (100 Continue ...): the real one follows
            answer = parse_head(await reader.readuntil(b"\r\n\r\n"))
        return answer
    except asyncio.IncompleteReadError as exc:
        raise ValueError("the gateway closed the connection without an answer") from exc
    except asyncio.LimitOverrunError as exc:
        raise ValueError("the gateway's response header is too large") from exc
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except (OSError, ssl.SSLError):
            pass


def parse_head(raw: bytes) -> HttpAnswer:
    lines = raw.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        raise ValueError(f"not an HTTP response: {lines[0][:80]!r}")
    headers: dict[str, Any] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return HttpAnswer(int(parts[1]), parts[2] if len(parts) > 2 else "", headers)
