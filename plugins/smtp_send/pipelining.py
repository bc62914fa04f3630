"""RFC 2920 command pipelining for Send connectors: every reply read, however it arrives.

A pipelined transaction writes MAIL, every RCPT and DATA in one go and then reads their
replies in order. aiosmtplib's protocol keeps one reply per command it awaits and ignores
bytes that arrive while no command waits, so a server that answers the group in several
writes loses replies there, and one that answers in a single write leaves the rest
unparsed. For the transaction the session therefore lends the connection to ``ReplyReader``
(``transport.set_protocol``): it buffers every byte and hands the replies out one at a
time, in order, whatever the server's write pattern. The connection goes back to aiosmtplib
afterwards with nothing outstanding.

A large (spooled) message is sent the same way, lent connection and all: ``send_body``
writes it chunk by chunk through a ``DotStuffer`` and waits for the transport to drain
between chunks (the reader does the flow control aiosmtplib's protocol would), so only about
one chunk is ever in memory, however large the message.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from aiosmtplib import (
    SMTPReadTimeoutError,
    SMTPResponse,
    SMTPResponseException,
    SMTPServerDisconnected,
    SMTPTimeoutError,
)

from hubport.core import body as message_body
from hubport.core.body import MessageBody

#: RFC 5321 §4.5.3.1.5: a reply line is at most 512 octets; be lenient, stay bounded
MAX_REPLY_LINE = 4096
MAX_REPLY = 64 * 1024
#: unread input kept at most (a group's replies are far less): a peer that floods is cut off
MAX_BUFFERED = 4 * MAX_REPLY
_LEADING_DOT = re.compile(rb"^\.", re.M)
_BARE_LINE_END = re.compile(rb"\r\n|\r|\n")
_DOT_AFTER_LINE_END = re.compile(rb"\n\.")


class ReplyReader(asyncio.Protocol):
    """Buffers a connection's input and parses SMTP replies from it, one per ``read``."""

    def __init__(self, transport: asyncio.WriteTransport) -> None:
        self._transport = transport
        self._buffer = bytearray()
        self._wakeup = asyncio.Event()
        self._lost: BaseException | None = None
        self._closed = False
        self._flooded = False
        self._writable = asyncio.Event()  # cleared while the transport asks us to pause
        self._writable.set()
        #: connection_lost ran while the connection was lent (aiosmtplib must hear of it)
        self.disconnected = False

    # -- asyncio.Protocol --------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self._flooded:
            return
        self._buffer.extend(data)
        if len(self._buffer) > MAX_BUFFERED:  # never a reply: a broken or hostile peer
            self._flooded = True
            self._buffer.clear()
            self._transport.close()
        self._wakeup.set()

    def eof_received(self) -> bool:
        self._closed = True
        self._wakeup.set()
        return False  # the transport closes itself

    def connection_lost(self, exc: Exception | None) -> None:
        self.disconnected = True
        self._closed = True
        self._lost = exc
        self._wakeup.set()
        self._writable.set()

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    # -- for the session ---------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def lost(self) -> BaseException | None:
        return self._lost

    def write(self, data: bytes) -> None:
        """Queue ``data`` on the connection. The transport buffers what the peer has not
        taken yet (as aiosmtplib does); the reply that follows is read within the session's
        timeout, so a peer that stops reading cannot hold the session forever."""
        if self._closed or self._transport.is_closing():
            raise SMTPServerDisconnected("Connection lost")
        self._transport.write(data)

    async def drain(self, timeout: float | None) -> None:
        """Wait until the transport's buffer is below its low-water mark again (it paused
        us above the high-water mark): the backpressure that bounds a streamed message's
        memory. A peer that takes nothing for ``timeout`` seconds times the session out."""
        if not self._writable.is_set():
            try:
                await asyncio.wait_for(self._writable.wait(), timeout)
            except TimeoutError as exc:
                raise SMTPTimeoutError("Timed out sending the message") from exc
        if self._closed:
            raise SMTPServerDisconnected("Connection lost")

    async def read(self, timeout: float | None) -> SMTPResponse:
        """The next complete reply (multi-line replies joined with newlines)."""
        async def next_reply() -> SMTPResponse:
            while True:
                reply = self._parse()
                if reply is not None:
                    return reply
                if self._closed:
                    raise SMTPServerDisconnected("Connection lost")
                self._wakeup.clear()
                await self._wakeup.wait()
        try:
            return await asyncio.wait_for(next_reply(), timeout)
        except TimeoutError as exc:
            raise SMTPReadTimeoutError("Timed out waiting for server response") from exc

    def _parse(self) -> SMTPResponse | None:
        if self._flooded:
            raise SMTPResponseException(-1, "Reply too long")
        code = -1
        lines: list[bytes] = []
        offset = 0
        while True:
            end = self._buffer.find(b"\n", offset)
            if end == -1:
                if len(self._buffer) - offset > MAX_REPLY_LINE or len(self._buffer) > MAX_REPLY:
                    raise SMTPResponseException(-1, "Reply too long")
                return None
            line = bytes(self._buffer[offset:end + 1])
            if len(line) > MAX_REPLY_LINE or end + 1 > MAX_REPLY:
                raise SMTPResponseException(-1, "Reply too long")
            try:
                line_code = int(line[:3])
            except ValueError:
                raise SMTPResponseException(-1, f"Malformed reply line: {line!r}") from None
            if code not in (-1, line_code):
                raise SMTPResponseException(-1, f"Reply code changed mid-reply: {line!r}")
            code = line_code
            offset = end + 1
            lines.append(line[4:].strip(b" \t\r\n"))
            if line[3:4] != b"-":
                del self._buffer[:offset]
                return SMTPResponse(code, b"\n".join(lines).decode("utf-8", "surrogateescape"))


@contextmanager
def lent_connection(protocol: Any) -> Iterator[ReplyReader]:
    """Lend aiosmtplib's connection to a ``ReplyReader`` for one pipelined exchange.

    ``protocol`` is ``aiosmtplib.SMTP.protocol``. On the way back a connection lost
    meanwhile is reported to aiosmtplib, so the session sees it as closed.
    """
    transport = getattr(protocol, "transport", None)
    if transport is None or transport.is_closing():
        raise SMTPServerDisconnected("Connection lost")
    reader = ReplyReader(transport)
    transport.set_protocol(reader)
    try:
        yield reader
    finally:
        transport.set_protocol(protocol)
        if reader.disconnected:  # else a pending connection_lost reaches aiosmtplib itself
            protocol.connection_lost(reader.lost)


def data_block(message: bytes) -> bytes:
    """The message as it goes on the wire after DATA: CRLF line ends, leading dots doubled
    (RFC 5321 §4.5.2), ending with CRLF and the terminating ``.`` line."""
    wire = _BARE_LINE_END.sub(b"\r\n", message)
    wire = _LEADING_DOT.sub(b"..", wire)
    if not wire.endswith(b"\r\n"):
        wire += b"\r\n"
    return wire + b".\r\n"


class DotStuffer:
    """``data_block`` for a message that comes in pieces: feed every piece in order, then
    ``end``. The concatenated output is exactly ``data_block`` of the whole message.

    Two things straddle a piece boundary and are carried over: a CR ending a piece (the
    next piece may start with its LF, so it is held back until then) and being at the start
    of a line (a piece that begins with ``.`` right after a line end gets its dot doubled).
    """

    def __init__(self) -> None:
        self._held = b""  # a trailing CR not yet known to be a bare one
        self._line_start = True
        self._sent = False

    def feed(self, piece: bytes) -> bytes:
        piece = self._held + piece
        self._held = b""
        if piece.endswith(b"\r"):
            piece, self._held = piece[:-1], b"\r"
        if not piece:
            return b""
        wire = _BARE_LINE_END.sub(b"\r\n", piece)
        wire = _DOT_AFTER_LINE_END.sub(b"\n..", wire)
        if self._line_start and wire.startswith(b"."):
            wire = b"." + wire
        self._line_start = wire.endswith(b"\n")
        self._sent = True
        return wire

    def end(self) -> bytes:
        """The rest: a held CR as a line end, a CRLF if the message lacks its last one (or
        is empty), and the terminating ``.`` line."""
        if self._held or not (self._sent and self._line_start):
            return b"\r\n.\r\n"
        return b".\r\n"


async def send_body(reader: ReplyReader, body: MessageBody, timeout: float | None) -> None:
    """Write ``body`` after a 354 as ``data_block`` would, one chunk at a time (file reads
    in a thread), draining the transport after each chunk so that memory stays bounded."""
    stuffer = DotStuffer()
    async for piece in body.achunks(message_body.CHUNK_SIZE):  # read now: tests patch it
        wire = stuffer.feed(piece)
        if wire:
            reader.write(wire)
            await reader.drain(timeout)
    reader.write(stuffer.end())
