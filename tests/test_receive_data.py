"""DATA framing: only <CRLF>.<CRLF> ends a message, at any block boundary (docs/reliability.md cases 1–4)."""

from __future__ import annotations

import pytest

from hubport.plugins.smtp_receive.data import DataReader, normalize_line_endings

SMUGGLED = (b"MAIL FROM:<spoof@victim.example>\r\nRCPT TO:<alice@contoso.test>\r\nDATA\r\n"
            b"Subject: spoofed\r\n\r\nspoof\r\n")
VECTORS = {
    "lflf": b"\n.\n",
    "crcr": b"\r.\r",
    "crlf-reversed": b"\r.\n",
    "lfcr": b"\n.\r",
    "lfcrlf": b"\n.\r\n",
    "crlflf": b"\r\n.\n",
    "crcrlf": b"\r.\r\n",
    "crlfcr": b"\r\n.\r",
    "nullbefore": b"\r\n\x00.\r\n",
    "nullafter": b"\r\n.\x00\r\n",
    "cr-run": b"\r\r\n.\r\r\n",
}


def feed_split(data: bytes, cut: int | None, *, max_size: int | None = None,
               max_line: int = 998) -> DataReader:
    reader = DataReader(max_size=max_size, max_line=max_line)
    parts = [data] if cut is None else [data[:cut], data[cut:]]
    for part in parts:
        if part and not reader.done:
            reader.feed(part)
    return reader


def test_plain_message_and_dot_unstuffing() -> None:
    reader = feed_split(b"Subject: x\r\n\r\n..hello\r\n.\r\nQUIT\r\n", None)
    assert reader.outcome is not None
    assert reader.outcome.content == b"Subject: x\r\n\r\n.hello\r\n"
    assert reader.outcome.rest == b"QUIT\r\n"
    assert not reader.outcome.bare_line_ending


def test_empty_message() -> None:
    reader = feed_split(b".\r\n", None)
    assert reader.outcome is not None and reader.outcome.content == b""


@pytest.mark.parametrize("name", sorted(VECTORS))
def test_a_smuggling_vector_never_ends_the_message(name: str) -> None:
    stream = b"Subject: a\r\n\r\nfirst" + VECTORS[name] + SMUGGLED + b".\r\n"
    for cut in range(len(stream) + 1):
        reader = feed_split(stream, cut)
        outcome = reader.outcome
        assert outcome is not None, (name, cut)
        assert outcome.rest == b"", (name, cut)  # nothing left over for a second message
        assert b"spoof@victim.example" in outcome.content
        assert outcome.bare_line_ending or outcome.nul, (name, cut)


def test_terminator_split_across_every_boundary() -> None:
    stream = b"Subject: a\r\n\r\nbody line\r\n.\r\nRSET\r\n"
    for cut in range(len(stream) + 1):
        outcome = feed_split(stream, cut).outcome
        assert outcome is not None
        assert outcome.content == b"Subject: a\r\n\r\nbody line\r\n"
        unfed = stream[cut:] if cut > stream.index(b"\r\n.\r\n") + 4 else b""
        assert outcome.rest + unfed == b"RSET\r\n"


def test_oversize_is_discarded_but_read_to_the_end() -> None:
    reader = DataReader(max_size=1000, max_line=998)
    for _ in range(100):
        reader.feed(b"x" * 500 + b"\r\n")
        assert not reader.done
        assert len(reader._buffer) < 2000  # memory stays bounded while discarding
    reader.feed(b".\r\nNOOP\r\n")
    assert reader.outcome is not None
    assert reader.outcome.too_big and reader.outcome.content == b""
    assert reader.outcome.rest == b"NOOP\r\n"


def test_long_line_is_noticed_across_blocks() -> None:
    reader = DataReader(max_size=None, max_line=998)
    reader.feed(b"a" * 600)
    reader.feed(b"a" * 600 + b"\r\n.\r\n")
    assert reader.outcome is not None and reader.outcome.line_too_long
    ok = feed_split(b"a" * 998 + b"\r\n" + b"." + b"b" * 998 + b"\r\n.\r\n", None)
    assert ok.outcome is not None and not ok.outcome.line_too_long


def test_normalize_mode_turns_lone_newlines_into_crlf() -> None:
    assert normalize_line_endings(b"a\nb\rc\r\nd") == b"a\r\nb\r\nc\r\nd"
