"""Reading the DATA phase: framing that one DATA can never turn into two messages.

The message ends only at ``<CRLF>.<CRLF>`` (RFC 5321 §4.1.1.4); every other newline-dot
variant of the smuggling vectors (docs/reliability.md 1–4) stays inside the content, and a content
holding a lone CR or LF is then refused as a whole (or normalized where the connector says
so). The reader works on blocks, not lines, and hands the content on as it arrives
(``feed`` returns it, dot-unstuffed), so a message of any size costs bounded memory: it
keeps only what follows the last line ending, and once the message is refused anyway (past
``max_size``, an over-long line, or a lone CR or LF when not normalizing) only looks for the
terminator.

The octets are judged as they arrive (size, longest line, NUL, lone CR or LF, with a CR
that ends a block waiting for the next one), so the outcome is the whole message's even for
the part that was not kept. Content is cut only right after an LF (of a CRLF, or a lone one
in Normalize mode), and the reader keeps the two octets before the cut in front of the rest:
the terminator is still found across blocks (a lone LF before ".\\r\\n" is no terminator),
a leading '.' is a stuffing dot only after a CRLF, and no CRLF pair straddles a cut, so
unstuffing and normalizing per piece give exactly what the whole message would.
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
    once the message is refused for its size, a line length or (unless ``normalize``) a
    lone CR or LF: the caller drops what it has then; ``outcome`` says why.
    """

    def __init__(self, *, max_size: int | None, max_line: int, normalize: bool = False,
                 emit_size: int = READ_SIZE) -> None:
        self.max_size = max_size
        self.max_segment = max_line + 2  # + the stuffing dot and the CR before LF
        self.normalize = normalize
        self.emit_size = emit_size
        # the two octets before the content not yet handed on; at first a virtual CRLF
        # before the first line: ".\r\n" at once is an empty message
        self._buffer = bytearray(b"\r\n")
        self._run = 0  # length of the current (unterminated) line segment
        self._cr = False  # the last octet so far is a CR (its LF may open the next block)
        self._held = 0  # octets at the end of the buffer not judged yet (see ``feed``)
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
        unjudged = bytes(buffer[len(buffer) - self._held:]) + block if self._held else block
        buffer += block
        end = buffer.find(TERMINATOR, start)
        if end < 0:
            # the "." or ".\r" after a CRLF at the end may be the terminator's: judged (and
            # counted in the size) once the next octet says they are content
            self._held = (1 if buffer.endswith(b"\r\n.") else
                          2 if buffer.endswith(b"\r\n.\r") else 0)
            self._account(unjudged[:len(unjudged) - self._held])
            if not self._discarding and self._refused():
                self._discarding = True  # refused whatever follows: keep nothing
            if self._discarding:
                del buffer[:-4]  # enough to find a terminator that straddles blocks
                return b""
            if len(buffer) < self.emit_size:
                return b""
            # after the last LF: a CRLF's, or a lone one (only kept when normalizing); a CR
            # at the end stays, its LF may come next. The current line is at most
            # max_segment long (or refused), so the buffer stays below emit_size + that.
            cut = buffer.rfind(b"\n") + 1
            if cut <= 2:  # no line ended since the last piece
                return b""
            piece = self._content(bytes(buffer[:cut]))
            del buffer[:cut - 2]  # keep the two octets before the rest
            return piece
        # what belongs to the message of the octets not judged yet (up to the CRLF before
        # "."; they start at or before it, since a "." after a CRLF is held back)
        self._account(unjudged[:end + 2 - (len(buffer) - len(unjudged))])
        rest = bytes(buffer[end + len(TERMINATOR):])
        refused = self._discarding or self._refused()
        piece = b"" if refused else self._content(bytes(buffer[:end + 2]))
        self.outcome = DataOutcome(self.size, too_big=self._over(), line_too_long=self._long,
                                   bare_line_ending=self._bare, nul=self._nul, rest=rest)
        buffer.clear()
        return piece

    def _over(self) -> bool:
        return self.max_size is not None and self.size > self.max_size

    def _refused(self) -> bool:
        """The message will be refused whatever follows (too big comes first, then a long
        line, then NUL, then a lone CR or LF; so a NUL still found later changes only which
        refusal, and the scan goes on)."""
        return self._long or self._over() or (self._bare and not self.normalize)

    def _account(self, part: bytes) -> None:
        """Count octets, look for NUL and lone CR or LF, and track the longest line,
        across block boundaries."""
        if not part:
            return
        self.size += len(part)
        self._nul = self._nul or b"\x00" in part
        if not self._bare:
            crlf = part.count(b"\r\n")
            joined = self._cr and part[:1] == b"\n"  # a CRLF split between two blocks
            waiting = part[-1:] == b"\r"  # a CR whose LF may come with the next block
            self._bare = ((self._cr and not joined) or part.count(b"\r") - waiting != crlf
                          or part.count(b"\n") - joined != crlf)
        self._cr = part[-1:] == b"\r"
        if self._long:
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

    def _content(self, raw: bytes) -> bytes:
        """One piece, from the two octets before its first line to the LF after its last:
        its content, dot-unstuffed (a '.' after a CRLF only) and normalized if need be."""
        content = raw.replace(b"\r\n.", b"\r\n")[2:]
        if self._bare and self.normalize and _lone_line_ending(content):
            content = normalize_line_endings(content)
        return content


def _lone_line_ending(content: bytes) -> bool:
    """A CR or LF not in a CRLF (counting is much cheaper than normalizing every piece of
    a message that had one lone LF somewhere)."""
    crlf = content.count(b"\r\n")
    return content.count(b"\r") != crlf or content.count(b"\n") != crlf


def normalize_line_endings(content: bytes) -> bytes:
    """Every lone CR or LF becomes CRLF (the connector's Normalize mode)."""
    return _BARE_NEWLINE.sub(b"\r\n", content)
