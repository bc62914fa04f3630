"""Reading the DATA phase: framing that one DATA can never turn into two messages.

The message ends only at ``<CRLF>.<CRLF>`` (RFC 5321 §4.1.1.4); every other newline-dot
variant of the smuggling vectors (docs/reliability.md 1–4) stays inside the content, and a content
holding a lone CR or LF is then refused as a whole (or normalized where the connector says
so). The reader works on blocks, not lines, and hands the content on as it arrives
(``feed`` returns it, dot-unstuffed), so a message of any size costs bounded memory: it
keeps only what follows the last CRLF, and past ``max_size`` (or past an over-long line,
refused anyway) only looks for the terminator.

Content is cut only right after a CRLF and the reader keeps that CRLF in front of the rest:
the terminator is still found across blocks, every piece starts a line (a leading '.' is a
stuffing dot), and no CRLF pair straddles a cut, so counting CR, LF and CRLF per piece and
normalizing per piece give exactly what the whole message would.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

TERMINATOR = b"\r\n.\r\n"
_BARE_NEWLINE = re.compile(rb"\r\n|\r|\n")
READ_SIZE = 256 * 1024


@dataclass(slots=True)
class DataOutcome:
    """What arrived between the 354 and the terminator, and what is wrong with it."""

    size: int  # octets received before the terminator
    too_big: bool = False
    line_too_long: bool = False
    bare_line_ending: bool = False
    nul: bool = False
    #: bytes the client sent after the terminator (pipelined commands)
    rest: bytes = b""


class DataReader:
    """Frames one message from blocks handed to ``feed``; ``done`` once terminated.

    ``feed`` returns the content that block completed (dot-unstuffed; with lone CR/LF made
    CRLF when ``normalize``), in pieces of about ``emit_size`` octets: a message smaller
    than that comes out whole, in one piece, with the final block. Nothing more comes out
    once the message is refused for its size or a line length (the caller drops what it
    has then; ``outcome`` says why).
    """

    def __init__(self, *, max_size: int | None, max_line: int, normalize: bool = False,
                 emit_size: int = READ_SIZE) -> None:
        self.max_size = max_size
        self.max_segment = max_line + 2  # + the stuffing dot and the CR before LF
        self.normalize = normalize
        self.emit_size = emit_size
        # a virtual CRLF before the first line: ".\r\n" at once is an empty message
        self._buffer = bytearray(b"\r\n")
        self._run = 0  # length of the current (unterminated) line segment
        self._long = False
        self._bare = False
        self._nul = False
        self.size = 0
        self._discarding = False
        self.outcome: DataOutcome | None = None

    @property
    def done(self) -> bool:
        return self.outcome is not None

    def feed(self, block: bytes) -> bytes:
        """Take the next block; returns the content it completed (often b"") and sets
        ``outcome`` when the terminator is in it."""
        buffer = self._buffer
        start = max(0, len(buffer) - 4)
        buffer += block
        end = buffer.find(TERMINATOR, start)
        if end < 0:
            self._account(bytes(block))
            if not self._discarding and (self._long or self._over()):
                self._discarding = True  # refused whatever follows: keep nothing
            if self._discarding:
                del buffer[:-4]  # enough to find a terminator that straddles blocks
                return b""
            if len(buffer) < self.emit_size:
                return b""
            cut = buffer.rfind(b"\r\n")
            if cut <= 0:  # no line ended since the last piece
                return b""
            piece = self._judge(bytes(buffer[:cut + 2]))
            del buffer[:cut]  # keep the CRLF: the next piece starts a line
            return piece
        # the part of this block that belongs to the message (up to the CRLF before ".")
        consumed_before = len(buffer) - len(block)
        in_message = max(0, end + 2 - consumed_before)
        self._account(bytes(block[:in_message]))
        rest = bytes(buffer[end + len(TERMINATOR):])
        refused = self._discarding or self._long or self._over()
        piece = b"" if refused else self._judge(bytes(buffer[:end + 2]))
        self.outcome = DataOutcome(self.size, too_big=self._over(), line_too_long=self._long,
                                   bare_line_ending=self._bare, nul=self._nul, rest=rest)
        buffer.clear()
        return piece

    def _over(self) -> bool:
        return self.max_size is not None and self.size > self.max_size

    def _account(self, part: bytes) -> None:
        """Count octets and track the longest line across block boundaries."""
        self.size += len(part)
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

    def _judge(self, raw: bytes) -> bytes:
        """One piece, from the CRLF before its first line to the CRLF after its last:
        note lone CR/LF and NUL, and return its content."""
        crlf = raw.count(b"\r\n")
        bare = raw.count(b"\r") != crlf or raw.count(b"\n") != crlf
        self._bare = self._bare or bare
        self._nul = self._nul or b"\x00" in raw
        content = raw.replace(b"\r\n.", b"\r\n")[2:]
        if bare and self.normalize:
            content = normalize_line_endings(content)
        return content


def normalize_line_endings(content: bytes) -> bytes:
    """Every lone CR or LF becomes CRLF (the connector's Normalize mode)."""
    return _BARE_NEWLINE.sub(b"\r\n", content)
