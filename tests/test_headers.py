"""Tests for hubport.core.headers: raw header handling that never re-serializes message bytes."""

from __future__ import annotations

import time
from email.utils import parsedate_to_datetime
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hubport.core.headers import (
    HeaderField,
    MessageFormatError,
    ParsedMessage,
    canonicalize_line_endings,
    extract_addresses,
    make_field,
    make_received,
    message_id_of,
    parse_header_section,
    rebuild,
    subject_of,
)
from support import CORPUS_DIR

CORPUS = sorted(CORPUS_DIR.glob("*.eml"))


def corpus_id(path: Path) -> str:
    return path.name


def field(raw: bytes) -> HeaderField:
    parsed = parse_header_section(raw + b"\r\n")
    assert len(parsed.fields) == 1
    return parsed.fields[0]


def test_corpus_is_there() -> None:
    assert len(CORPUS) == 50


# --------------------------------------------------------------------------------------------
# canonicalize_line_endings


def test_lf_only_becomes_crlf() -> None:
    assert canonicalize_line_endings(b"A: b\n\nbody\n") == b"A: b\r\n\r\nbody\r\n"


def test_crlf_only_is_returned_unchanged() -> None:
    data = b"A: b\r\n\r\nbody\r\n"
    assert canonicalize_line_endings(data) is data


def test_mixed_line_endings_become_crlf() -> None:
    assert canonicalize_line_endings(b"A: b\r\nC: d\n\nx\r\ny") == b"A: b\r\nC: d\r\n\r\nx\r\ny"


def test_no_final_newline_is_kept() -> None:
    assert canonicalize_line_endings(b"A: b\n\nbody") == b"A: b\r\n\r\nbody"


@pytest.mark.parametrize(
    ("data", "line"),
    [(b"A: b\rC: d\r\n", 1), (b"A: b\n\nbo\rdy\n", 3), (b"A: b\r\n\r\nbody\r", 3)],
)
def test_bare_cr_is_refused_with_its_line(data: bytes, line: int) -> None:
    with pytest.raises(MessageFormatError) as info:
        canonicalize_line_endings(data)
    assert info.value.reason == f"bare CR in line {line}"


def test_nul_byte_is_refused_with_its_offset() -> None:
    with pytest.raises(MessageFormatError) as info:
        canonicalize_line_endings(b"A: b\r\n\r\nbo\x00dy")
    assert info.value.reason == "NUL byte at offset 10"


@pytest.mark.parametrize("path", CORPUS, ids=corpus_id)
def test_corpus_canonicalizes_to_crlf_only(path: Path) -> None:
    data = path.read_bytes()
    out = canonicalize_line_endings(data)
    assert out.count(b"\n") == out.count(b"\r\n") == out.count(b"\r")
    assert out.replace(b"\r\n", b"\n") == data.replace(b"\r\n", b"\n")


# --------------------------------------------------------------------------------------------
# parse_header_section


def test_parse_simple_message() -> None:
    data = b"From: a@b.example\r\nSubject: hi\r\n there\r\n\r\nbody\r\n"
    parsed = parse_header_section(data)
    assert [f.name for f in parsed.fields] == ["From", "Subject"]
    assert parsed.fields[1].raw == b"Subject: hi\r\n there\r\n"
    assert parsed.header_bytes_size == data.index(b"\r\n\r\n") + 2
    assert parsed.body_offset == data.index(b"body")
    assert data[parsed.body_offset :] == b"body\r\n"


def test_parse_keeps_name_as_written_and_lookup_ignores_case() -> None:
    parsed = parse_header_section(b"SUBJECT: x\r\nsubject: y\r\nTo: t@x.example\r\n\r\n")
    assert parsed.get("Subject") is parsed.fields[0]
    assert [f.name for f in parsed.get_all("subject")] == ["SUBJECT", "subject"]
    assert parsed.get("cc") is None
    assert parsed.fields[0].lname == "subject"


def test_whitespace_before_colon_is_accepted() -> None:
    parsed = parse_header_section(b"Subject : x\r\n\r\n")
    assert parsed.fields[0].name == "Subject"
    assert parsed.fields[0].value_bytes == b"x"


def test_headers_only_message_without_blank_line() -> None:
    data = b"From: a@b.example\r\nTo: c@d.example\r\n"
    parsed = parse_header_section(data)
    assert len(parsed.fields) == 2
    assert parsed.body_offset == len(data)


def test_headers_only_message_without_final_newline() -> None:
    data = b"From: a@b.example\r\nTo: c@d.example"
    parsed = parse_header_section(data)
    assert parsed.fields[1].raw == b"To: c@d.example"
    assert parsed.get("to") is not None and parsed.get("to").value_bytes == b"c@d.example"


def test_empty_body_after_blank_line() -> None:
    parsed = parse_header_section(b"A: b\r\n\r\n")
    assert parsed.body_offset == 8
    assert parsed.header_bytes_size == 6


@pytest.mark.parametrize("data", [b"", b"\r\n", b"\r\nbody\r\n", b"\r\n\r\n"])
def test_no_header_section(data: bytes) -> None:
    with pytest.raises(MessageFormatError) as info:
        parse_header_section(data)
    assert info.value.reason == "no header section"


@pytest.mark.parametrize(
    ("data", "line"),
    [
        (b"From someone@example.com Mon Jan  1 00:00:00 2001\r\nFrom: a@b\r\n\r\n", 1),
        (b" continuation first\r\nA: b\r\n\r\n", 1),
        (b"A: b\r\nnot a header\r\n", 2),
        (b"A: b\r\nC: d\r\nno colon here\r\n\r\nbody", 3),
        (b"A: b\r\n: empty name\r\n\r\n", 2),
        (b"A: b\r\nbad\x80name: x\r\n\r\n", 2),
        (b"A: b\r\nspace name: x\r\n\r\n", 2),
        (b"A: b\nC: d\n\n", 1),  # not canonicalized: LF alone is not a line end here
        (b"\x89PNG\r\n\x1a\n\x00\x00", 1),
    ],
)
def test_non_header_lines_are_refused(data: bytes, line: int) -> None:
    with pytest.raises(MessageFormatError) as info:
        parse_header_section(data)
    assert info.value.reason == f"not an RFC 5322 header line: line {line}"


def test_header_size_limit_is_inclusive() -> None:
    data = b"Subject: " + b"x" * 89 + b"\r\n\r\nbody"  # header section of exactly 100 bytes
    assert parse_header_section(data, max_header_size=100).header_bytes_size == 100
    with pytest.raises(MessageFormatError) as info:
        parse_header_section(data, max_header_size=99)
    assert info.value.reason == "header section exceeds 99 bytes"


def test_header_size_limit_applies_to_headers_only_messages() -> None:
    data = b"Subject: " + b"x" * 200
    with pytest.raises(MessageFormatError):
        parse_header_section(data, max_header_size=100)


def test_header_size_limit_when_blank_line_is_far_away() -> None:
    data = b"A: b\r\n" + b"C: d\r\n" * 1000 + b"\r\nbody"
    with pytest.raises(MessageFormatError):
        parse_header_section(data, max_header_size=1000)


@pytest.mark.parametrize("path", CORPUS, ids=corpus_id)
def test_corpus_fields_and_rest_reassemble_exactly(path: Path) -> None:
    try:
        data = canonicalize_line_endings(path.read_bytes())
        parsed = parse_header_section(data)
    except MessageFormatError:
        return
    assert parsed.fields
    rest = data[parsed.header_bytes_size :]
    assert b"".join(f.raw for f in parsed.fields) + rest == data
    assert rebuild(parsed) == data


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("cpython__msg_35.eml", "not an RFC 5322 header line: line 4"),
        ("rustpython__msg_25.eml", "not an RFC 5322 header line: line 1"),  # mbox From_
        ("flanker__enclosed-bad-encoding.eml", "not an RFC 5322 header line: line 1"),
    ],
)
def test_corpus_files_that_are_not_messages(name: str, reason: str) -> None:
    data = canonicalize_line_endings((CORPUS[0].parent / name).read_bytes())
    with pytest.raises(MessageFormatError) as info:
        parse_header_section(data)
    assert info.value.reason == reason


def test_long_header_corpus_file_is_one_field() -> None:
    data = canonicalize_line_endings((CORPUS[0].parent / "flanker__long-header.eml").read_bytes())
    parsed = parse_header_section(data)
    subject = parsed.get("subject")
    assert subject is not None and len(subject.raw) > 200_000
    with pytest.raises(MessageFormatError):
        parse_header_section(data, max_header_size=65536)


# --------------------------------------------------------------------------------------------
# HeaderField values


def test_value_bytes_unfolds_and_strips() -> None:
    assert field(b"Subject:  a\r\n\tb\r\n  c  ").value_bytes == b"a\tb  c"


def test_value_decodes_encoded_words() -> None:
    subject = field(b"Subject: =?utf-8?q?caf=C3=A9?= =?utf-8?b?w6k=?= ok")
    assert subject.value() == "caféé ok"  # RFC 2047 6.2: space between words dropped


def test_value_decodes_raw_utf8_and_falls_back_to_latin1() -> None:
    assert field("Subject: Grüße".encode()).value() == "Grüße"
    assert field(b"Subject: Gr\xfc\xdfe").value() == "Grüße"


def test_value_with_raw_8bit_and_encoded_words_never_raises() -> None:
    assert field(b"Subject: \xfc =?utf-8?q?caf=C3=A9?=").value() == "ü café"


@pytest.mark.parametrize(
    "raw",
    [
        b"Subject: =?x-unknown?q?abc?=",
        b"Subject: =?utf-8?b?!!!not base64?=",
        b"Subject: =?utf-8?b?w6?=",
        b"Subject: =?utf-8?q?=FF=FE?=",
        b"Subject: =?",
        b"Subject: =??q??=",
    ],
)
def test_value_never_raises_on_broken_encoded_words(raw: bytes) -> None:
    assert isinstance(field(raw).value(), str)


def test_text_keeps_encoded_words_and_marks_invalid_utf8() -> None:
    to = field(b"To: =?utf-8?q?a=2C_b?= <x@y.example>, \xb4bad@y.example")
    assert to.text.startswith("=?utf-8?q?a=2C_b?=")
    assert "\udcb4" in to.text  # lossless: never silently turned into another character


@given(st.binary(max_size=200))
@settings(max_examples=200, deadline=None, derandomize=True)
def test_value_never_raises_on_any_bytes(value: bytes) -> None:
    raw = b"Subject: " + value.replace(b"\r", b"").replace(b"\n", b"")
    f = HeaderField("Subject", raw + b"\r\n")
    assert isinstance(f.value(), str)
    assert isinstance(f.text, str)


# --------------------------------------------------------------------------------------------
# rebuild


MESSAGE = (
    b"Received: from a\r\n\tby b; Mon, 1 Jan 2001 00:00:00 +0000\r\n"
    b"From: x@y.example\r\n"
    b"Bcc: hidden@y.example\r\n"
    b"Subject: \xe9t\xe9\r\n"
    b"Date: garbage\r\n"
    b"\r\n"
    b"Body \xff\r\n.\r\n"
)


def test_rebuild_without_changes_is_identity() -> None:
    assert rebuild(parse_header_section(MESSAGE)) == MESSAGE


def test_rebuild_removes_prepends_replaces_and_appends() -> None:
    parsed = parse_header_section(MESSAGE)
    out = rebuild(
        parsed,
        remove=lambda f: f.lname in ("bcc", "received"),
        prepend=[b"Received: new\r\n"],
        replace={"date": b"Date: fixed\r\n"},
        append=[b"Message-ID: <1@x>\r\n"],
    )
    assert out == (
        b"Received: new\r\n"
        b"From: x@y.example\r\n"
        b"Subject: \xe9t\xe9\r\n"
        b"Date: fixed\r\n"
        b"Message-ID: <1@x>\r\n"
        b"\r\n"
        b"Body \xff\r\n.\r\n"
    )


def test_replace_only_touches_the_first_field_of_that_name() -> None:
    parsed = parse_header_section(b"A: 1\r\nA: 2\r\n\r\nx")
    assert rebuild(parsed, replace={"a": b"A: new\r\n"}) == b"A: new\r\nA: 2\r\n\r\nx"


def test_rebuild_headers_only_message_without_final_newline() -> None:
    parsed = parse_header_section(b"From: a@b.example\r\nTo: c@d.example")
    assert (
        rebuild(parsed, append=[b"X: y\r\n"]) == b"From: a@b.example\r\nTo: c@d.example\r\nX: y\r\n"
    )
    assert rebuild(parsed, prepend=[b"X: y\r\n"]) == b"X: y\r\nFrom: a@b.example\r\nTo: c@d.example"


# --------------------------------------------------------------------------------------------
# make_field, make_received


def test_make_field_short_value() -> None:
    assert make_field("Subject", "hello") == b"Subject: hello\r\n"


def test_make_field_folds_long_values_at_whitespace() -> None:
    value = " ".join(f"word{i}" for i in range(60))
    raw = make_field("Subject", value)
    lines = raw.split(b"\r\n")
    assert lines[-1] == b""
    assert len(lines) > 3
    assert all(len(line) < 78 for line in lines)
    assert all(line.startswith(b" ") for line in lines[1:-1])
    assert field(raw.removesuffix(b"\r\n")).value_bytes == value.encode()


def test_make_field_cannot_fold_a_long_word() -> None:
    value = "x" * 200
    assert make_field("Subject", value) == b"Subject: " + value.encode() + b"\r\n"


def test_make_field_writes_utf8() -> None:
    assert make_field("Subject", "café") == "Subject: café\r\n".encode()


@pytest.mark.parametrize("value", ["a\r\nBcc: x@y", "a\nb", "a\rb", "a\x00b", "a\x1bb", "a\x7f"])
def test_make_field_refuses_injection(value: str) -> None:
    with pytest.raises(ValueError):
        make_field("Subject", value)


@pytest.mark.parametrize("name", ["", "Sub ject", "Sub:ject", "Süb", "A\r\nB"])
def test_make_field_refuses_bad_names(name: str) -> None:
    with pytest.raises(ValueError):
        make_field(name, "x")


@given(
    st.text(
        alphabet=st.characters(blacklist_categories=("Cc", "Cs"), blacklist_characters="\r\n"),
        max_size=300,
    ).map(lambda s: s + " tail")
)
@settings(max_examples=200, deadline=None, derandomize=True)
def test_make_field_unfolds_to_the_same_value(value: str) -> None:
    raw = make_field("X-Test", value)
    parsed = parse_header_section(raw + b"\r\n")
    assert len(parsed.fields) == 1
    assert parsed.fields[0].value_bytes == value.encode().strip(b" \t")
    for line in raw.split(b"\r\n")[1:-1]:
        assert line[:1] in (b" ", b"\t") and line.strip(b" \t")


def test_make_received() -> None:
    when = 1_700_000_000.0
    raw = make_received(
        from_="localhost",
        by="HUB01",
        with_="hubport Pickup",
        id_="abc",
        for_="a@b.example",
        when=when,
    )
    value = field(raw.removesuffix(b"\r\n")).text
    head, _, date = value.partition("; ")
    assert head == "from localhost by HUB01 with hubport Pickup id abc for <a@b.example>"
    assert parsedate_to_datetime(date).timestamp() == when
    assert raw.startswith(b"Received: from localhost")


def test_make_received_defaults_to_now() -> None:
    raw = make_received(from_="a", by="b", with_="c")
    date = field(raw.removesuffix(b"\r\n")).text.partition("; ")[2]
    assert abs(parsedate_to_datetime(date).timestamp() - time.time()) < 5


def test_make_received_refuses_injection() -> None:
    with pytest.raises(ValueError):
        make_received(from_="x\r\nBcc: y", by="b", with_="c")


# --------------------------------------------------------------------------------------------
# addresses, Message-ID, Subject


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        (["a@b.example"], ["a@b.example"]),
        (['"Doe, John" <j@x.example>, k@x.example'], ["j@x.example", "k@x.example"]),
        (["a@x.example", "b@x.example"], ["a@x.example", "b@x.example"]),
        (['"Undisclosed Recipients" <>'], []),
        (["undisclosed-recipients:;"], []),
        (["Friends: a@x.example, b@x.example;"], ["a@x.example", "b@x.example"]),
        (["MAILER DAEMON <>"], []),
        ([""], []),
        ([], []),
    ],
)
def test_extract_addresses(values: list[str], expected: list[str]) -> None:
    assert extract_addresses(values) == expected


def test_message_id_and_subject() -> None:
    parsed = parse_header_section(
        b"Message-ID:\r\n  <1@x.example> \r\nSubject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=\r\n\r\n"
    )
    assert message_id_of(parsed) == "<1@x.example>"
    assert subject_of(parsed) == "Grüße"


def test_message_id_and_subject_missing() -> None:
    parsed = parse_header_section(b"From: a@b.example\r\n\r\n")
    assert message_id_of(parsed) == ""
    assert subject_of(parsed) == ""


def test_message_id_with_8bit_bytes_is_encodable() -> None:
    parsed = parse_header_section(b"Message-ID: <\xff@x>\r\n\r\n")
    assert message_id_of(parsed).encode("utf-8")


@pytest.mark.parametrize("path", CORPUS, ids=corpus_id)
def test_corpus_values_decode(path: Path) -> None:
    try:
        parsed = parse_header_section(canonicalize_line_endings(path.read_bytes()))
    except MessageFormatError:
        return
    assert isinstance(parsed, ParsedMessage)
    for f in parsed.fields:
        assert isinstance(f.value(), str)
    subject_of(parsed).encode("utf-8")
    message_id_of(parsed).encode("utf-8")


def test_parsing_is_fast() -> None:
    """Thousands of files per second: the whole corpus (730 KB) many times over."""
    datas = [canonicalize_line_endings(p.read_bytes()) for p in CORPUS]
    good = []
    for data in datas:
        try:
            parse_header_section(data)
            good.append(data)
        except MessageFormatError:
            pass
    start = time.perf_counter()
    rounds = 20
    for _ in range(rounds):
        for data in good:
            parsed = parse_header_section(canonicalize_line_endings(data))
            rebuild(parsed, prepend=[b"X: y\r\n"])
    per_message = (time.perf_counter() - start) / (rounds * len(good))
    assert per_message < 0.005  # generous: a few hundred microseconds is typical
