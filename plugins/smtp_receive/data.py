"""Reading the DATA phase: framing that one DATA can never turn into two messages.

The message ends only at ``<CRLF>.<CRLF>`` (RFC 5321 §4.1.1.4); every other newline-dot
variant of the smuggling vectors (docs/reliability.md 1–4) stays inside the content, and a content
holding a lone CR or LF is then refused as a whole (or normalized where the connector says
so). The reader works on blocks, not lines: it keeps at most ``max_size`` bytes, and past
that only looks for the terminator, so an oversized upload costs no memory.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

TERMINATOR = b"\r\n.\r\n"
_BARE_NEWLINE = re.compile(rb"\r\n|\r|\n")
READ_SIZE = 256 * 1024


@dataclass(slots=True)
class DataOutcome:
    """What arrived between the 354 and the terminator, and what is wrong with it."""

    content: bytes  # dot-unstuffed (empty when discarded)
    size: int  # octets received before the terminator
    too_big: bool = False
    line_too_long: bool = False
    bare_line_ending: bool = False
    nul: bool = False
    #: bytes the client sent after the terminator (pipelined commands)
    rest: bytes = b""


class DataReader:
    """Collects one message from blocks handed to ``feed``; ``done`` once terminated."""

    def __init__(self, *, max_size: int | None, max_line: int) -> None:
        self.max_size = max_size
        self.max_segment = max_line + 2  # + the stuffing dot and the CR before LF
        # a virtual CRLF before the first line: ".\r\n" at once is an empty message
        self._buffer = bytearray(b"\r\n")
        self._scanned = 0
        self._run = 0  # length of the current (unterminated) line segment
        self._long = False
        self._size = 0
        self._discarding = False
        self.outcome: DataOutcome | None = None

    @property
    def done(self) -> bool:
        return self.outcome is not None

    def feed(self, block: bytes) -> None:
        """Take the next block; sets ``outcome`` when the terminator is in it."""
        buffer = self._buffer
        start = max(0, len(buffer) - 4)
        buffer += block
        end = buffer.find(TERMINATOR, start)
        if end < 0:
            self._account(bytes(block))
            if self._discarding:
                del buffer[:-4]
            elif self.max_size is not None and self._size > self.max_size:
                self._discarding = True
                del buffer[:-4]
            return
        # the part of this block that belongs to the message (up to the CRLF before ".")
        consumed_before = len(buffer) - len(block)
        in_message = max(0, end + 2 - consumed_before)
        self._account(bytes(block[:in_message]))
        rest = bytes(buffer[end + len(TERMINATOR):])
        if self._discarding or (self.max_size is not None and self._size > self.max_size):
            self.outcome = DataOutcome(b"", self._size, too_big=True,
                                       line_too_long=self._long, rest=rest)
            return
        raw = bytes(buffer[: end + 2])  # with the virtual CRLF in front
        self.outcome = self._judge(raw, rest)

    def _account(self, part: bytes) -> None:
        """Count octets and track the longest line across block boundaries."""
        self._size += len(part)
        if self._long or not part:
            return
        segments = part.split(b"\n")
        if len(segments) == 1:
            self._run += len(part)
        else:
            self._run += len(segments[0])
            if self._run > self.max_segment:
                self._long = True
            longest = max(len(s) for s in segments[1:-1]) if len(segments) > 2 else 0
            if longest > self.max_segment:
                self._long = True
            self._run = len(segments[-1])
        if self._run > self.max_segment:
            self._long = True

    def _judge(self, raw: bytes, rest: bytes) -> DataOutcome:
        crlf = raw.count(b"\r\n")
        bare = raw.count(b"\r") != crlf or raw.count(b"\n") != crlf
        content = raw.replace(b"\r\n.", b"\r\n")[2:]
        return DataOutcome(content, self._size, line_too_long=self._long,
                           bare_line_ending=bare, nul=b"\x00" in raw, rest=rest)


def normalize_line_endings(content: bytes) -> bytes:
    """Every lone CR or LF becomes CRLF (the connector's Normalize mode)."""
    return _BARE_NEWLINE.sub(b"\r\n", content)


async def read_message(read: Callable[[], Awaitable[bytes]], reader: DataReader) -> DataOutcome:
    """Feed ``reader`` from ``read`` until the terminator; EOFError when the client left."""
    while not reader.done:
        block = await read()
        if not block:
            raise EOFError("connection closed during DATA")
        reader.feed(block)
    assert reader.outcome is not None
    return reader.outcome
