"""DATA framing: only <CRLF>.<CRLF> ends a message, at any block boundary (docs/reliability.md cases 1–4).

The reader hands the content on in pieces as blocks arrive; the tests below check that any
split of the stream into blocks, with pieces cut as often as possible, gives exactly what
judging the whole message at once gives (``whole`` is that reference), and that its buffer
stays small whatever the line endings (LF only, CR only, none at all).
"""

from __future__ import annotations

import random
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
    pieces: list[bytes]  # what each block's feed returned
    peak: int  # the longest the reader's buffer was between two blocks


def feed_blocks(blocks: list[bytes], *, max_size: int | None = None, max_line: int = 998,
                normalize: bool = False, emit_size: int = 1) -> Fed:
    """Feed ``blocks`` in order until the reader is done; ``emit_size=1`` cuts a piece at
    every line ending a block completes (the most boundaries there can be)."""
    reader = DataReader(max_size=max_size, max_line=max_line, normalize=normalize,
                        emit_size=emit_size)
    pieces: list[bytes] = []
    peak = fed = 0
    while fed < len(blocks) and not reader.done:
        if blocks[fed]:
            pieces.append(reader.feed(blocks[fed]))
            peak = max(peak, len(reader._buffer))
        fed += 1
    assert reader.outcome is not None, "no terminator"
    return Fed(b"".join(pieces), reader.outcome, b"".join(blocks[fed:]), pieces, peak)


def feed_split(data: bytes, cut: int | None, *, normalize: bool = False) -> Fed:
    return feed_blocks([data] if cut is None else [data[:cut], data[cut:]],
                       normalize=normalize)


@dataclass
class Judged:
    """The reference: a message judged whole, as the reader did before it streamed."""

    content: bytes  # dot-unstuffed, normalized when asked and needed
    size: int
    bare: bool
    nul: bool
    long: bool
    rest: bytes


def whole(stream: bytes, *, max_line: int = 998, normalize: bool = False) -> Judged:
    buffered = b"\r\n" + stream
    end = buffered.find(TERMINATOR)
    raw = buffered[:end + 2]
    crlf = raw.count(b"\r\n")
    bare = raw.count(b"\r") != crlf or raw.count(b"\n") != crlf
    long = any(len(line) > max_line + 2 for line in raw[2:].split(b"\n"))
    content = raw.replace(b"\r\n.", b"\r\n")[2:]
    if bare and normalize:
        content = normalize_line_endings(content)
    return Judged(content, end, bare, b"\x00" in raw, long, buffered[end + len(TERMINATOR):])


def assert_like_whole(fed: Fed, stream: bytes, *, max_line: int = 998,
                      normalize: bool = False, max_size: int | None = None) -> None:
    """Same outcome as the whole message, and, for a message not refused, the same content
    (of a refused one the caller drops whatever was handed on)."""
    ref = whole(stream, max_line=max_line, normalize=normalize)
    too_big = max_size is not None and ref.size > max_size
    outcome = fed.outcome
    assert (outcome.size, outcome.too_big, outcome.line_too_long, outcome.nul,
            outcome.bare_line_ending) == (ref.size, too_big, ref.long, ref.nul, ref.bare)
    assert outcome.rest + fed.unfed == ref.rest
    if not (too_big or ref.long or (ref.bare and not normalize)):
        assert fed.content == ref.content


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
    for normalize in (False, True):
        for cut in range(len(stream) + 1):
            fed = feed_split(stream, cut, normalize=normalize)
            outcome = fed.outcome
            assert outcome.rest == b"", (name, cut)  # nothing left over for a second message
            assert outcome.bare_line_ending or outcome.nul, (name, cut)
            if normalize:  # (refused otherwise, and no longer handed on)
                assert b"spoof@victim.example" in fed.content
            assert_like_whole(fed, stream, normalize=normalize)


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
# lines ended by a lone LF, dots after it (not stuffing) and a lone LF before ".\r\n"
LF_TOKENS = [b"x\n", b"\n.", b"\n..", b"\n.\r\n", b"\n\n", b".\n", b"\r\r\n"]


@given(st.lists(st.sampled_from(TOKENS + LF_TOKENS), max_size=40),
       st.lists(st.integers(min_value=0, max_value=200), max_size=6),
       st.sampled_from([1, 3, 16, 1 << 20]), st.booleans(), st.sampled_from([4, 998]),
       st.sampled_from([None, 10, 60]))
def test_any_split_judges_like_the_whole(tokens: list[bytes], cuts: list[int], emit_size: int,
                                         normalize: bool, max_line: int,
                                         max_size: int | None) -> None:
    stream = b"".join(tokens) + TERMINATOR + b"RSET\r\n"
    points = sorted({min(c, len(stream)) for c in cuts})
    blocks = [stream[a:b] for a, b in zip([0, *points], [*points, len(stream)], strict=True)]
    fed = feed_blocks(blocks, max_line=max_line, normalize=normalize, emit_size=emit_size,
                      max_size=max_size)
    assert_like_whole(fed, stream, max_line=max_line, normalize=normalize, max_size=max_size)


# -- lone line endings: bounded memory, the same content and outcome ----------------------------


EMIT = 64 * 1024
BLOCK = 64 * 1024
BOUND = 4 * EMIT + BLOCK  # the most the reader may keep between two blocks


def lone_ending_message(ending: bytes, size: int = 3 * 1024 * 1024, *, crlf: float = 0,
                        seed: int = 5) -> bytes:
    """A stream of about ``size`` octets whose lines end in ``ending`` (b"\n", b"\r" or
    none), some starting with one or two dots; at the rate ``crlf`` a line ends in CRLF
    instead or is followed by ".\r\n" (no terminator: a lone LF or CR before it); then
    the real terminator and a command."""
    rng = random.Random(seed)
    lines = [b"Subject: lone endings" + ending + ending]
    total = 0
    while total < size:
        line = rng.choice([b"", b".", b".."]) + b"y" * rng.randrange(0, 200)
        if rng.random() < crlf:
            line += b"y\r\n"  # (never "\r\n" right before ".\r\n")
        else:
            line += ending + (b".\r\n" if ending and rng.random() < crlf else b"")
        lines.append(line)
        total += len(line)
    body = b"".join(lines) + b"last"
    assert TERMINATOR not in b"\r\n" + body + b"\r\n"
    return body + TERMINATOR + b"QUIT\r\n"


def random_blocks(stream: bytes, *, seed: int = 7) -> list[bytes]:
    rng = random.Random(seed)
    blocks, at = [], 0
    while at < len(stream):
        step = rng.randrange(1, BLOCK + 1)
        blocks.append(stream[at:at + step])
        at += step
    return blocks


@pytest.mark.parametrize("crlf", [0, 0.01])  # LF only, or a CRLF now and then
@pytest.mark.parametrize("max_size", [None, 1024 * 1024])  # the bypass right, or a limit
@pytest.mark.parametrize("normalize", [True, False])
def test_a_large_lf_only_message(normalize: bool, max_size: int | None, crlf: float) -> None:
    stream = lone_ending_message(b"\n", crlf=crlf)
    fed = feed_blocks(random_blocks(stream), normalize=normalize, emit_size=EMIT,
                      max_size=max_size)
    assert fed.outcome.bare_line_ending and not fed.outcome.line_too_long
    assert_like_whole(fed, stream, normalize=normalize, max_size=max_size)
    assert fed.peak <= BOUND
    assert fed.outcome.too_big == (max_size is not None)
    if not normalize:  # refused at once: nothing kept but what finds the terminator
        assert fed.peak <= 4
    elif max_size is None:  # accepted: handed on in pieces as it came
        assert len(fed.content) > 3 * 1024 * 1024 and len(fed.pieces) > 20
        assert max(map(len, fed.pieces)) <= BOUND


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("ending", [b"\r", b""])
def test_a_large_message_without_lf_is_not_kept(normalize: bool, ending: bytes) -> None:
    stream = lone_ending_message(ending)  # one line of megabytes: refused as too long
    fed = feed_blocks(random_blocks(stream), normalize=normalize, emit_size=EMIT)
    assert fed.outcome.line_too_long
    assert_like_whole(fed, stream, normalize=normalize)
    assert fed.peak <= BOUND


def test_a_lone_lf_before_a_cut_keeps_the_dot_after_it() -> None:
    blocks = [b"a\n", b".b\n", b"..c\n.\r\n", b"d\r\n", b"..e\r\n.\r\n"]
    fed = feed_blocks(blocks, normalize=True)
    assert fed.pieces == [b"a\r\n", b".b\r\n", b"..c\r\n.\r\n", b"d\r\n", b".e\r\n"]
    assert_like_whole(fed, b"".join(blocks), normalize=True)


@pytest.mark.parametrize("blocks", [
    [b"a\n", b"b\r", b"\n.", b"\r\n"],  # a CR ending a block: never cut before its LF
    [b"a\n", b"b\r", b"\n", b".\r\n"],
    [b"a\n\r", b"\n.\r\nNOOP\r\n"],
])
def test_a_crlf_after_a_lone_lf_still_ends_the_message(blocks: list[bytes]) -> None:
    fed = feed_blocks(blocks, normalize=True)
    assert fed.content.endswith(b"\r\n") and fed.outcome.rest + fed.unfed in (b"", b"NOOP\r\n")
    assert_like_whole(fed, b"".join(blocks), normalize=True)


@pytest.mark.parametrize("blocks", [
    [b"Subject: a\r\n\r\nx\ny\r\n", b"z" * 5000 + b"\r\n", b"\x00\r\n.\r\n"],
    [b"Subject: a\r\n\r\nx\ny\x00\r\n", b".\r\n"],
    [b"Subject: a\r\n\r\nx\ny\r\n" + b"z\r\n" * 1000, b"\x00", b"\r\n.\r\n"],
])
def test_a_nul_after_the_first_lone_lf_is_still_reported(blocks: list[bytes]) -> None:
    fed = feed_blocks(blocks, emit_size=16)
    assert fed.outcome.nul and fed.outcome.bare_line_ending  # the NUL reply comes first
    assert fed.peak <= 4 + 2 and fed.content == b""
    assert_like_whole(fed, b"".join(blocks))
