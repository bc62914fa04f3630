"""DATA framing: only <CRLF>.<CRLF> ends a message, at any block boundary (docs/reliability.md cases 1–4).

The reader hands the content on in pieces as blocks arrive; the tests below check that any
split of the stream into blocks, with pieces cut as often as possible, gives exactly what
judging the whole message at once gives (``whole`` is that reference).
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hubport.plugins.smtp_receive.data import (
    TERMINATOR,
    DataOutcome,
    DataReader,
    normalize_line_endings,
)

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


@dataclass
class Fed:
    """What a reader made of a stream: the content it handed on and its outcome."""

    content: bytes
    outcome: DataOutcome
    unfed: bytes  # blocks never given to the reader (it was done before)


def feed_blocks(blocks: list[bytes], *, max_size: int | None = None, max_line: int = 998,
                normalize: bool = False, emit_size: int = 1) -> Fed:
    """Feed ``blocks`` in order until the reader is done; ``emit_size=1`` cuts a piece at
    every CRLF a block completes (the most boundaries there can be)."""
    reader = DataReader(max_size=max_size, max_line=max_line, normalize=normalize,
                        emit_size=emit_size)
    content = bytearray()
    for index, block in enumerate(blocks):
        if reader.done:
            return Fed(bytes(content), reader.outcome, b"".join(blocks[index:]))
        if block:
            content += reader.feed(block)
    assert reader.outcome is not None, "no terminator"
    return Fed(bytes(content), reader.outcome, b"")


def feed_split(data: bytes, cut: int | None) -> Fed:
    return feed_blocks([data] if cut is None else [data[:cut], data[cut:]])


def whole(stream: bytes, *, max_line: int = 998) -> tuple[bytes, bool, bool, bool, bytes]:
    """The reference: (content, bare CR/LF, NUL, line too long, rest) judged on the whole
    message at once, as the reader did before it streamed."""
    buffered = b"\r\n" + stream
    end = buffered.find(TERMINATOR)
    raw = buffered[:end + 2]
    crlf = raw.count(b"\r\n")
    bare = raw.count(b"\r") != crlf or raw.count(b"\n") != crlf
    long = any(len(line) > max_line + 2 for line in raw[2:].split(b"\n"))
    return (raw.replace(b"\r\n.", b"\r\n")[2:], bare, b"\x00" in raw, long,
            buffered[end + len(TERMINATOR):])


def assert_like_whole(fed: Fed, stream: bytes, *, max_line: int = 998,
                      normalize: bool = False) -> None:
    content, bare, nul, long, rest = whole(stream, max_line=max_line)
    outcome = fed.outcome
    assert outcome.line_too_long == long
    assert outcome.rest + fed.unfed == rest
    if long:
        return  # refused: nothing more is judged or handed on
    assert (outcome.bare_line_ending, outcome.nul) == (bare, nul)
    assert fed.content == (normalize_line_endings(content) if bare and normalize else content)


def test_plain_message_and_dot_unstuffing() -> None:
    fed = feed_split(b"Subject: x\r\n\r\n..hello\r\n.\r\nQUIT\r\n", None)
    assert fed.content == b"Subject: x\r\n\r\n.hello\r\n"
    assert fed.outcome.rest == b"QUIT\r\n"
    assert not fed.outcome.bare_line_ending


def test_empty_message() -> None:
    fed = feed_split(b".\r\n", None)
    assert fed.content == b"" and fed.outcome.size == 0


@pytest.mark.parametrize("name", sorted(VECTORS))
def test_a_smuggling_vector_never_ends_the_message(name: str) -> None:
    stream = b"Subject: a\r\n\r\nfirst" + VECTORS[name] + SMUGGLED + b".\r\n"
    for cut in range(len(stream) + 1):
        fed = feed_split(stream, cut)
        outcome = fed.outcome
        assert outcome.rest == b"", (name, cut)  # nothing left over for a second message
        assert b"spoof@victim.example" in fed.content
        assert outcome.bare_line_ending or outcome.nul, (name, cut)
        assert_like_whole(fed, stream)


def test_terminator_split_across_every_boundary() -> None:
    stream = b"Subject: a\r\n\r\nbody line\r\n.\r\nRSET\r\n"
    for cut in range(len(stream) + 1):
        fed = feed_split(stream, cut)
        assert fed.content == b"Subject: a\r\n\r\nbody line\r\n"
        assert fed.outcome.rest + fed.unfed == b"RSET\r\n"


def test_oversize_is_discarded_but_read_to_the_end() -> None:
    reader = DataReader(max_size=1000, max_line=998)
    for _ in range(100):
        reader.feed(b"x" * 500 + b"\r\n")
        assert not reader.done
        assert len(reader._buffer) < 2000  # memory stays bounded while discarding
    assert reader.feed(b".\r\nNOOP\r\n") == b""  # nothing is handed on once too big
    assert reader.outcome is not None
    assert reader.outcome.too_big and reader.outcome.size == 100 * 502
    assert reader.outcome.rest == b"NOOP\r\n"


def test_long_line_is_noticed_across_blocks() -> None:
    reader = DataReader(max_size=None, max_line=998)
    reader.feed(b"a" * 600)
    reader.feed(b"a" * 600 + b"\r\n.\r\n")
    assert reader.outcome is not None and reader.outcome.line_too_long
    ok = feed_split(b"a" * 998 + b"\r\n" + b"." + b"b" * 998 + b"\r\n.\r\n", None)
    assert not ok.outcome.line_too_long


def test_normalize_mode_turns_lone_newlines_into_crlf() -> None:
    assert normalize_line_endings(b"a\nb\rc\r\nd") == b"a\r\nb\r\nc\r\nd"


# -- streaming: pieces cut at CRLFs judge exactly like the whole message ----------------------


AWKWARD = (b"Subject: a\r\n\r\n.lead\r\n..two\r\nbare\nlf\r\nlone\rcr\r\r\n\x00nul\r\n"
           b"\r\n.\r\r\n.\n.x\r\n.\r\nNOOP\r\n")


def test_every_three_way_split_of_an_awkward_stream() -> None:
    for normalize in (False, True):
        for i in range(len(AWKWARD) + 1):
            for j in range(i, len(AWKWARD) + 1):
                blocks = [AWKWARD[:i], AWKWARD[i:j], AWKWARD[j:]]
                assert_like_whole(feed_blocks(blocks, normalize=normalize), AWKWARD,
                                  normalize=normalize)


@pytest.mark.parametrize("blocks, content", [
    # a stuffing dot that starts a block still starts a line
    ([b"Subject: a\r\n\r\nx\r\n", b"..dot\r\n", b".\r\n"], b"Subject: a\r\n\r\nx\r\n.dot\r\n"),
    # the dot of the terminator alone in a block, and its CRLF split
    ([b"Subject: a\r\n\r\nx\r\n", b".", b"\r", b"\nQUIT\r\n"], b"Subject: a\r\n\r\nx\r\n"),
    ([b"Subject: a\r\n\r\nx\r", b"\n.\r\n"], b"Subject: a\r\n\r\nx\r\n"),
    # ".." after a block boundary that split the CRLF before it
    ([b"Subject: a\r\n\r\nx\r", b"\n..y\r\n.\r\n"], b"Subject: a\r\n\r\nx\r\n.y\r\n"),
])
def test_boundaries_inside_lines(blocks: list[bytes], content: bytes) -> None:
    fed = feed_blocks(blocks)
    assert fed.content == content
    assert not fed.outcome.bare_line_ending and not fed.outcome.nul


def test_cr_and_lf_of_one_line_ending_in_different_blocks_are_not_bare() -> None:
    blocks = [b"Subject: a\r", b"\n\r", b"\nline\r", b"\n.\r", b"\n"]
    fed = feed_blocks(blocks)
    assert fed.content == b"Subject: a\r\n\r\nline\r\n" and not fed.outcome.bare_line_ending


@pytest.mark.parametrize("blocks", [
    [b"Subject: a\r\n\r\nx\n", b"y\r\n.\r\n"],  # a bare LF ending a block
    [b"Subject: a\r\n\r\nx\r\n", b"\ny\r\n.\r\n"],  # a bare LF starting a block
    [b"Subject: a\r\n\r\nx\r", b"\r\ny\r\n.\r\n"],  # a lone CR ending a block
    [b"Subject: a\r\n\r\nx\r\n", b"y\r", b"", b"z\r\n.\r\n"],  # a lone CR between blocks
])
def test_lone_cr_or_lf_is_seen_across_blocks(blocks: list[bytes]) -> None:
    stream = b"".join(blocks)
    for normalize in (False, True):
        fed = feed_blocks(blocks, normalize=normalize)
        assert fed.outcome.bare_line_ending
        assert_like_whole(fed, stream, normalize=normalize)
    assert b"\r\r" not in feed_blocks(blocks, normalize=True).content


def test_content_is_handed_on_before_the_terminator() -> None:
    reader = DataReader(max_size=None, max_line=998, emit_size=64)
    pieces = [reader.feed(b"Subject: a\r\n\r\n" + b"x" * 60 + b"\r\npart")]
    assert pieces[0] == b"Subject: a\r\n\r\n" + b"x" * 60 + b"\r\n"  # cut after the CRLF
    pieces.append(reader.feed(b"ial\r\n.\r\n"))
    assert pieces[1] == b"partial\r\n" and reader.done


def test_memory_stays_bounded_while_streaming() -> None:
    reader = DataReader(max_size=None, max_line=998, emit_size=4096)
    handed = 0
    for _ in range(2000):
        handed += len(reader.feed(b"y" * 500 + b"\r\n"))
        assert len(reader._buffer) <= 4096 + 502
    handed += len(reader.feed(b".\r\n"))
    assert handed == 2000 * 502 and reader.outcome is not None


def test_a_line_without_end_is_not_kept() -> None:
    reader = DataReader(max_size=None, max_line=998)
    for _ in range(1000):
        assert reader.feed(b"z" * 1000) == b""
        assert len(reader._buffer) <= 1000 + 4  # refused: only the terminator is looked for
    assert reader.feed(b"\r\n.\r\n") == b""
    assert reader.outcome is not None and reader.outcome.line_too_long
    assert not reader.outcome.too_big and reader.outcome.size == 1000 * 1000 + 2


TOKENS = [b"a", b"Subject: b", b".", b"..", b"\r", b"\n", b"\r\n", b"\r\n.", b"\x00",
          b"\r\n\r\n", b"\r\n.\r"]


@given(st.lists(st.sampled_from(TOKENS), max_size=40),
       st.lists(st.integers(min_value=0, max_value=200), max_size=6),
       st.sampled_from([1, 3, 16, 1 << 20]), st.booleans(), st.sampled_from([4, 998]))
def test_any_split_judges_like_the_whole(tokens: list[bytes], cuts: list[int], emit_size: int,
                                         normalize: bool, max_line: int) -> None:
    stream = b"".join(tokens) + TERMINATOR + b"RSET\r\n"
    points = sorted({min(c, len(stream)) for c in cuts})
    blocks = [stream[a:b] for a, b in zip([0, *points], [*points, len(stream)], strict=True)]
    fed = feed_blocks(blocks, max_line=max_line, normalize=normalize, emit_size=emit_size)
    assert_like_whole(fed, stream, max_line=max_line, normalize=normalize)
