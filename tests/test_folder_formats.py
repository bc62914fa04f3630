"""Tests for hubport.core.folder_formats: the Pickup and Replay file formats and the Replay writer."""

from __future__ import annotations

import string
from collections.abc import Callable
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hubport.core.folder_formats import (
    ContentRejected,
    display_name,
    format_replay,
    notice_envelope,
    parse_pickup,
    parse_replay,
    repair_header_section,
)
from hubport.core.headers import (
    HeaderField,
    MessageFormatError,
    canonicalize_line_endings,
    parse_header_section,
)
from hubport.core.model import Envelope, EnvelopeRecipient, MailFrom, Notify
from support import CORPUS_DIR as SHARED_CORPUS

CORPUS_DIR = SHARED_CORPUS
CORPUS = sorted(CORPUS_DIR.glob("*.eml"))
NOW = 1_700_000_000.0
DOMAIN = "contoso.example"
SERVER = "HUB01"


def pickup(data: bytes, **kwargs: Any) -> tuple[Envelope, bytes]:
    return parse_pickup(data, default_domain=DOMAIN, server_name=SERVER, now=NOW, **kwargs)


def replay(data: bytes, **kwargs: Any) -> tuple[Envelope, bytes]:
    return parse_replay(data, default_domain=DOMAIN, server_name=SERVER, now=NOW, **kwargs)


def names(data: bytes) -> list[str]:
    return [f.lname for f in parse_header_section(data).fields]


def header(data: bytes, name: str) -> str:
    found = parse_header_section(data).get(name)
    assert found is not None, name
    return found.text


def body(data: bytes) -> bytes:
    parsed = parse_header_section(data)
    return data[parsed.body_offset :]


def rcpts(envelope: Envelope) -> list[str]:
    return [r.address for r in envelope.recipients]


def reason_of(
    func: Callable[..., tuple[Envelope, bytes]], data: bytes, **kwargs: Any
) -> MessageFormatError:
    with pytest.raises(MessageFormatError) as info:
        func(data, **kwargs)
    return info.value


SIMPLE = (
    b"Received: from old.example by mx.example; Mon, 1 Jan 2001 00:00:00 +0000\n"
    b"From: Alice <alice@Fabrikam.EXAMPLE>\n"
    b'To: bob@contoso.example, "Carol, C." <carol@contoso.example>\n'
    b"Cc: dave@contoso.example\n"
    b"Bcc: eve@contoso.example\n"
    b"Resent-From: someone@else.example\n"
    b"X-MS-Exchange-Organization-SCL: -1\n"
    b"x-ms-exchange-forest-RulesExecuted: HUB\n"
    b"X-Mailer: test\n"
    b"Subject: hello\n"
    b"Date: Tue, 14 Nov 2023 22:13:20 +0000\n"
    b"Message-ID: <orig@fabrikam.example>\n"
    b"\n"
    b"Body line\n.\nlast line \xe9\n"
)


# --------------------------------------------------------------------------------------------
# Pickup: envelope


def test_pickup_envelope_from_headers() -> None:
    envelope, _ = pickup(SIMPLE)
    assert envelope.mail_from.address == "alice@fabrikam.example"
    assert rcpts(envelope) == [
        "bob@contoso.example",
        "carol@contoso.example",
        "dave@contoso.example",
        "eve@contoso.example",
    ]
    assert envelope.mail_from.body == "8BITMIME"  # the body has an 8-bit byte
    assert all(r.notify == frozenset() and r.orcpt is None for r in envelope.recipients)


def test_pickup_header_changes() -> None:
    _, stored = pickup(SIMPLE)
    assert names(stored) == [
        "received",
        "from",
        "to",
        "cc",
        "x-mailer",
        "subject",
        "date",
        "message-id",
    ]
    received = header(stored, "received")
    assert received.startswith(f"from localhost by {SERVER} with hubport Pickup; ")
    assert parsedate_to_datetime(received.partition("; ")[2]).timestamp() == NOW
    assert header(stored, "message-id") == "<orig@fabrikam.example>"
    assert header(stored, "date") == "Tue, 14 Nov 2023 22:13:20 +0000"
    assert body(stored) == b"Body line\r\n.\r\nlast line \xe9\r\n"
    assert b"\n" not in stored.replace(b"\r\n", b"")


def test_pickup_keeps_unchanged_fields_byte_for_byte() -> None:
    data = (
        b"From: a@x.example\r\nSubject: =?utf-8?q?x?=\r\n\t folded  \xff\r\n"
        b"To: b@x.example\r\nDate: Tue, 14 Nov 2023 22:13:20 +0000\r\nMessage-ID: <1@x>\r\n\r\nB"
    )
    _, stored = pickup(data)
    assert stored[len(parse_header_section(stored).fields[0].raw) :] == data


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        (b"From: a@x.example\nSender: s@x.example\n", "a@x.example"),  # From wins
        (b"From: a@x.example, b@x.example\nSender: s@x.example\n", "s@x.example"),
        (b"Sender: s@x.example\n", "s@x.example"),
        (b"From: MAILER DAEMON <>\nSender: s@x.example\n", "s@x.example"),
        (b"From: a@x.example\nFrom: b@x.example\nSender: s@x.example\n", "s@x.example"),
    ],
)
def test_pickup_sender_rules(headers: bytes, expected: str) -> None:
    envelope, _ = pickup(headers + b"To: r@y.example\n\nbody\n")
    assert envelope.mail_from.address == expected


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        (b"Subject: x\n", "no sender: From or Sender required"),
        (b"From: <>\n", "no sender: From or Sender required"),
        (b"From: a@x.example, b@x.example\n", "From holds several addresses"),
        (b"From: a@x.example\nSender: s@x.example, t@x.example\n", "Sender may hold only one"),
        (b"From: not-an-address\n", "bad sender address 'not-an-address'"),
    ],
)
def test_pickup_sender_errors(headers: bytes, reason: str) -> None:
    error = reason_of(pickup, headers + b"To: r@y.example\n\nbody\n")
    assert type(error) is MessageFormatError
    assert error.reason.startswith(reason)


def test_pickup_recipients_from_all_occurrences_deduplicated() -> None:
    data = (
        b"From: a@x.example\nTo: one@y.example\nCc: Two@Y.example\nTo: ONE@y.example\n"
        b"Bcc: two@y.example, three@y.example\nBcc: undisclosed:;\n\nbody\n"
    )
    envelope, stored = pickup(data)
    assert rcpts(envelope) == ["one@y.example", "Two@y.example", "three@y.example"]
    assert "bcc" not in names(stored)


def test_pickup_only_bcc_recipients_gets_undisclosed_to() -> None:
    envelope, stored = pickup(b"From: a@x.example\nBcc: secret@y.example\n\nbody\n")
    assert rcpts(envelope) == ["secret@y.example"]
    assert header(stored, "to") == "Undisclosed recipients:;"
    assert b"secret" not in stored


def test_pickup_no_recipient() -> None:
    error = reason_of(pickup, b"From: a@x.example\nTo: undisclosed-recipients:;\n\nbody\n")
    assert type(error) is MessageFormatError
    assert error.reason.startswith("no recipient")


def test_pickup_recipient_limit_is_content_rejected() -> None:
    to = ", ".join(f"r{i}@y.example" for i in range(101)).encode()
    with pytest.raises(ContentRejected) as info:
        pickup(b"From: Alice <alice@x.example>\nTo: " + to + b"\n\nbody\n")
    assert info.value.sender == "alice@x.example"
    assert "limit of 100" in info.value.reason
    assert info.value.enhanced == "5.5.3"
    envelope, _ = pickup(b"From: alice@x.example\nTo: " + to + b"\n\nbody\n", max_recipients=101)
    assert len(envelope.recipients) == 101


def test_pickup_bad_recipient_is_named() -> None:
    error = reason_of(pickup, b"From: a@x.example\nTo: ok@y.example, bad@y..example\n\nb\n")
    assert error.reason.startswith("bad recipient address 'bad@y..example'")


def test_pickup_invalid_utf8_address_is_refused() -> None:
    error = reason_of(pickup, b"From: a@x.example\nTo: \xb4google@example.com\n\nb\n")
    assert error.reason.startswith("bad recipient address '\\xb4google@example.com'")


def test_pickup_utf8_address_sets_smtputf8() -> None:
    envelope, _ = pickup("From: a@x.example\nTo: dänk@y.example\n\nb\n".encode())
    assert rcpts(envelope) == ["dänk@y.example"]
    assert envelope.mail_from.smtputf8


def test_pickup_ascii_message_has_no_body_parameter() -> None:
    envelope, _ = pickup(b"From: a@x.example\nTo: b@y.example\n\nbody\n")
    assert envelope.mail_from.body is None
    assert not envelope.mail_from.smtputf8


# --------------------------------------------------------------------------------------------
# Pickup: Message-ID and Date


def test_pickup_adds_message_id_and_date() -> None:
    _, stored = pickup(b"From: a@x.example\nTo: b@y.example\n\nbody\n")
    message_id = header(stored, "message-id")
    assert message_id.startswith("<") and message_id.endswith(f"@{DOMAIN}>")
    assert len(message_id) == len(f"<{'0' * 32}@{DOMAIN}>")
    assert parsedate_to_datetime(header(stored, "date")).timestamp() == NOW
    assert body(stored) == b"body\r\n"


def test_pickup_message_ids_are_unique() -> None:
    data = b"From: a@x.example\nTo: b@y.example\n\nbody\n"
    assert header(pickup(data)[1], "message-id") != header(pickup(data)[1], "message-id")


def test_pickup_replaces_empty_message_id_in_place() -> None:
    _, stored = pickup(b"Message-ID: \nFrom: a@x.example\nTo: b@y.example\n\nbody\n")
    assert names(stored).count("message-id") == 1
    assert names(stored)[1] == "message-id"
    assert header(stored, "message-id").endswith(f"@{DOMAIN}>")


@pytest.mark.parametrize(
    "date", [b"Tue, 06 Jun 2017 27:39:33 +0600", b"yesterday", b"", b"\xff\xfe"]
)
def test_pickup_replaces_malformed_date(date: bytes) -> None:
    data = b"From: a@x.example\nDate: " + date + b"\nTo: b@y.example\n\nbody\n"
    _, stored = pickup(data)
    assert names(stored) == ["received", "from", "date", "to", "message-id"]
    assert parsedate_to_datetime(header(stored, "date")).timestamp() == NOW


def test_pickup_keeps_short_but_valid_date() -> None:
    data = b"From: a@x.example\nDate: 01 Jan 2001 00:01+0000\nTo: b@y.example\n\nbody\n"
    assert header(pickup(data)[1], "date") == "01 Jan 2001 00:01+0000"


# --------------------------------------------------------------------------------------------
# Pickup: hostile inputs


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "no header section"),
        (b"\n\nbody only\n", "no header section"),
        (b"\x7fELF\x02\x01\x01\xff\xfe\n\x01\x02", "not an RFC 5322 header line: line 1"),
        (b"From: a@x.example\nTo: b@y.example\n\nbo\x00dy\n", "NUL byte at offset 37"),
        (b"From: a@x.example\rTo: b@y.example\n\nbody\n", "bare CR in line 1"),
        # repaired (the mbox line dropped), then refused for what is left
        (b"From a@x.example Mon Jan  1 00:00:00 2001\nFrom: a@x.example\n\n", "no recipient"),
        (b" folded first\nFrom: a@x.example\nTo: b@y.example\n\n",
         "not an RFC 5322 header line: line 1"),
    ],
)
def test_pickup_hostile_inputs(data: bytes, reason: str) -> None:
    error = reason_of(pickup, data)
    assert type(error) is MessageFormatError
    assert error.reason.startswith(reason)


def test_pickup_header_over_limit_is_content_rejected() -> None:
    data = b"From: a@x.example\nTo: b@y.example\nX-Big: " + b"x" * 70000 + b"\n\nbody\n"
    with pytest.raises(ContentRejected) as info:
        pickup(data)
    assert info.value.sender == "a@x.example"
    assert "65536" in info.value.reason
    assert pickup(data, max_header_size=80000)[0].mail_from.address == "a@x.example"


def test_pickup_header_over_limit_without_sender_is_bad() -> None:
    data = b"To: b@y.example\nX-Big: " + b"x" * 70000 + b"\n\nbody\n"
    assert type(reason_of(pickup, data)) is MessageFormatError


def test_pickup_rejects_flanker_long_header() -> None:
    data = (CORPUS_DIR / "flanker__long-header.eml").read_bytes()
    with pytest.raises(ContentRejected) as info:
        pickup(data)
    assert "65536" in info.value.reason
    assert info.value.sender == "bob@example.com"


@given(st.binary(max_size=300))
@settings(max_examples=300, deadline=None, derandomize=True)
def test_pickup_random_bytes_only_raise_message_format_error(data: bytes) -> None:
    try:
        pickup(data)
    except MessageFormatError:
        pass


@given(
    st.lists(
        st.sampled_from(
            [
                b"From: a@x.example",
                b"To: b@y.example",
                b"Bcc: c@z.example",
                b"Sender: s@x.example",
                b"Subject: \xff\xfe",
                b" folded",
                b"",
                b"From a@x",
                b"Date: x",
                b"Message-ID:",
                b'To: "q\\"x" <q@y.example>',
                b"Cc: g: ;",
                b"X-Sender: <a@b.example>",
            ]
        ),
        max_size=12,
    ),
    st.sampled_from([b"\n", b"\r\n"]),
)
@settings(max_examples=300, deadline=None, derandomize=True)
def test_pickup_shuffled_lines_only_raise_message_format_error(
    lines: list[bytes], eol: bytes
) -> None:
    data = eol.join(lines) + eol + b"body"
    try:
        envelope, stored = pickup(data)
    except MessageFormatError:
        return
    canonical, _ = repair_header_section(canonicalize_line_endings(data))
    assert body(stored) == canonical[parse_header_section(canonical).body_offset :]
    assert envelope.recipients


@pytest.mark.parametrize("path", CORPUS, ids=lambda p: p.name)
def test_pickup_corpus_succeeds_or_is_bad_and_keeps_body(path: Path) -> None:
    data = path.read_bytes()
    try:
        envelope, stored = pickup(data)
    except MessageFormatError as exc:
        assert exc.reason
        return
    canonical, _ = repair_header_section(canonicalize_line_endings(data))
    original = parse_header_section(canonical)
    result = parse_header_section(stored)
    assert stored[result.body_offset :] == canonical[original.body_offset :]
    prefixes = ("resent-", "x-ms-exchange-organization-", "x-ms-exchange-forest-")
    fixed_up = ("date", "message-id", "to")  # may be added or replaced

    def unchanged(fields: list[HeaderField]) -> list[bytes]:
        return [
            f.raw
            for f in fields
            if f.lname not in ("received", "bcc", *fixed_up) and not f.lname.startswith(prefixes)
        ]

    assert unchanged(result.fields) == unchanged(original.fields)
    assert [f.raw for f in result.fields if f.lname in fixed_up and f.raw in canonical] == [
        f.raw for f in original.fields if f.lname in fixed_up and f.raw in stored
    ]
    assert envelope.recipients
    assert result.fields[0].lname == "received"


@pytest.mark.parametrize(
    ("name", "outcome"),
    [
        ("cpython__msg_47.eml", "ok"),  # Date with hour 27 is replaced
        ("php-imap__bcc.eml", "ok"),
        ("php-imap__undisclosed_recipients.eml", "no recipient"),
        ("haraka__base64-root-part.eml", "no sender"),
        ("rustpython__msg_25.eml", "ok"),  # a leading mbox "From " line is dropped
        ("cpython__msg_35.eml", "ok"),  # the missing blank line after the header is added
        ("flanker__enclosed-bad-encoding.eml", "not an RFC 5322 header line: line 1"),
        ("flanker__mailformed-headers.eml", "bad recipient address"),
    ],
)
def test_pickup_corpus_outcomes(name: str, outcome: str) -> None:
    data = (CORPUS_DIR / name).read_bytes()
    if outcome != "ok":
        assert reason_of(pickup, data).reason.startswith(outcome)
        return
    _, stored = pickup(data)
    assert "bcc" not in names(stored)
    assert parsedate_to_datetime(header(stored, "date"))


def test_pickup_bcc_corpus_file() -> None:
    envelope, stored = pickup((CORPUS_DIR / "php-imap__bcc.eml").read_bytes())
    assert envelope.mail_from.address == "from@there.com"  # From wins over Sender
    assert rcpts(envelope) == ["to@here.com", "bcc@here.com"]
    assert b"bcc@here.com" not in stored


def test_pickup_msg47_gets_a_new_date() -> None:
    _, stored = pickup((CORPUS_DIR / "cpython__msg_47.eml").read_bytes())
    assert parsedate_to_datetime(header(stored, "date")).timestamp() == NOW


# --------------------------------------------------------------------------------------------
# Repairs Postfix's sendmail and cleanup make (issue 10, finding 7)


MBOX = b"From alice@x.example  Mon Mar 18 11:39:41 2013\n"
HEADER = b"From: a@x.example\nTo: b@y.example\nSubject: s\n"


@pytest.mark.parametrize("prefix", [MBOX, MBOX + b">From old\n>>From older\n", b">From x\n"])
def test_leading_mbox_from_lines_are_dropped(prefix: bytes) -> None:
    repairs: list[str] = []
    envelope, stored = pickup(prefix + HEADER + b"\nFrom here on, a body line.\n",
                              repairs=repairs)
    assert envelope.mail_from.address == "a@x.example" and rcpts(envelope) == ["b@y.example"]
    assert body(stored) == b"From here on, a body line.\r\n"  # never a body's From line
    assert names(stored)[:4] == ["received", "from", "to", "subject"]
    count = prefix.count(b"\n")
    assert repairs == [f'removed {count} mbox "From " line{"s" if count > 1 else ""}']


def test_missing_blank_line_after_the_header_is_inserted() -> None:
    repairs: list[str] = []
    data = HEADER + b"X-Folded: one\n two\ncounter to RFC 5322, no blank line\nmore: body\n"
    envelope, stored = pickup(data, repairs=repairs)
    assert body(stored) == b"counter to RFC 5322, no blank line\r\nmore: body\r\n"
    assert header(stored, "x-folded") == "one two"  # a continuation line stays a header line
    assert repairs == ["inserted the missing blank line after the header (before line 6)"]
    assert rcpts(envelope) == ["b@y.example"]


def test_both_repairs_count_lines_as_in_the_file() -> None:
    data, repairs = repair_header_section(b"From x\r\nFrom: a@x\r\nbody\r\n")
    assert data == b"From: a@x\r\n\r\nbody\r\n"
    assert repairs == ['removed 1 mbox "From " line',
                       "inserted the missing blank line after the header (before line 3)"]


@pytest.mark.parametrize(
    "data",
    [
        b"From: a@x\r\nTo: b@y\r\n\r\nbody\r\n",  # well formed
        b"From: a@x\r\nTo: b@y\r\n",  # headers only
        b"From: a@x\r\nTo: b@y",  # headers only, no final line break
        b"not a header\r\nFrom: a@x\r\n\r\n",  # no header at all: nothing to repair
        b" continuation first\r\nFrom: a@x\r\n\r\n",
        b"",
    ],
)
def test_nothing_to_repair(data: bytes) -> None:
    assert repair_header_section(data) == (data, [])


def test_well_formed_file_is_not_copied_or_reported() -> None:
    repairs: list[str] = []
    _, stored = pickup(SIMPLE, repairs=repairs)
    assert repairs == []
    assert body(stored) == canonicalize_line_endings(SIMPLE).split(b"\r\n\r\n", 1)[1]


def test_replay_mbox_line_after_the_envelope_lines_is_dropped() -> None:
    message = MBOX + HEADER + b"\nbody\n"
    for head in (b"X-Sender: <s@x.example>\nX-Receiver: <r@y.example>\n",
                 b"X-Sender: <s@x.example>\nX-Receiver: <r@y.example>\n"
                 b"X-EndOfInjectedXHeaders: 60\n"):
        for data in (head + message, MBOX + head + message):
            repairs: list[str] = []
            envelope, stored = replay(data, repairs=repairs)
            assert envelope.mail_from.address == "s@x.example"
            assert rcpts(envelope) == ["r@y.example"]
            assert names(stored)[:4] == ["received", "from", "to", "subject"]
            assert body(stored) == b"body\r\n"
            dropped = data.count(b"From alice")
            assert repairs == [f'removed {dropped} mbox "From " line'
                               f'{"s" if dropped > 1 else ""}']


def test_replay_missing_blank_line() -> None:
    repairs: list[str] = []
    data = b"X-Sender: <s@x.example>\nX-Receiver: <r@y.example>\n" + HEADER + b"body\n"
    _, stored = replay(data, repairs=repairs)
    assert body(stored) == b"body\r\n"
    assert repairs == ["inserted the missing blank line after the header (before line 6)"]


def test_an_error_after_a_repair_says_so() -> None:
    error = reason_of(pickup, MBOX + b"\n\nbody\n")
    assert error.reason.startswith("no header section")
    error = reason_of(pickup, MBOX + b"Subject: no sender\n\nbody\n")
    assert error.reason == "no sender: From or Sender required"


@pytest.mark.parametrize("path", CORPUS, ids=lambda p: p.name)
def test_every_corpus_file_is_taken_by_replay(path: Path) -> None:
    data = b"X-Sender: <s@x.example>\nX-Receiver: <r@y.example>\n" + path.read_bytes()
    repairs: list[str] = []
    envelope, stored = replay(data, repairs=repairs)
    assert rcpts(envelope) == ["r@y.example"]
    original = canonicalize_line_endings(path.read_bytes())
    if repairs:  # the five mbox files and the one without a blank line
        assert path.name in {
            "flanker__torture-part.eml", "mailman2__newmailru_01.eml", "mailman2__qmail_08.eml",
            "rustpython__msg_25.eml", "rustpython__msg_43.eml", "cpython__msg_35.eml"}
        original = repair_header_section(original)[0]
    assert body(stored) == original.split(b"\r\n\r\n", 1)[1]


# --------------------------------------------------------------------------------------------
# The envelope of a refused file (its NDR)


def test_notice_envelope_of_a_pickup_head_cut_mid_line() -> None:
    head = MBOX + b"From: A <a@x.example>\nTo: b@y.example, bad@@y, c@y.example\nBcc: d@y\n"
    head += b"Subject: big\n\n" + b"body " * 100
    envelope, header_block = notice_envelope(head[:-7], replay=False)
    assert envelope.mail_from == MailFrom("a@x.example", smtputf8=False)
    assert rcpts(envelope) == ["b@y.example", "c@y.example", "d@y"]  # bad@@y left out
    assert header_block == b"From: A <a@x.example>\r\nTo: b@y.example, bad@@y, c@y.example\r\n" \
        b"Subject: big\r\n\r\n"  # no Bcc, no body


def test_notice_envelope_ignores_bad_bytes_after_the_header() -> None:
    head = b"From: a@x.example\nTo: b@y.example\n\nbinary \x00 and \r bare\n"
    envelope, _ = notice_envelope(head, replay=False)
    assert rcpts(envelope) == ["b@y.example"]


def test_notice_envelope_of_a_replay_head() -> None:
    head = (b"X-Sender: <s@x.example> RET=FULL\nX-Receiver: <r1@y.example> NOTIFY=NEVER\n"
            b"X-Receiver: <@@>\nX-Receiver: <r2@y.example>\nFrom: v@x.example\n\nbody")
    envelope, header_block = notice_envelope(head, replay=True)
    assert envelope.mail_from.address == "s@x.example"
    assert envelope.recipients == [
        EnvelopeRecipient("r1@y.example", frozenset({Notify.NEVER})),
        EnvelopeRecipient("r2@y.example")]
    assert header_block == b"From: v@x.example\r\n\r\n"


@pytest.mark.parametrize(
    ("head", "replay_format", "reason"),
    [
        (b"X-Sender: <>\nX-Receiver: <r@y.example>\n\n", True, "null sender"),
        (b"X-Receiver: <r@y.example>\n\n", True, "no X-Sender"),
        (b"To: r@y.example\n\n", False, "no sender"),
        (b"From: <>\nTo: r@y.example\n\n", False, "no sender"),
        (b"\x00\x01\x02", False, "no header section"),
    ],
)
def test_notice_envelope_without_a_sender_to_notify(
        head: bytes, replay_format: bool, reason: str) -> None:
    with pytest.raises(MessageFormatError) as info:
        notice_envelope(head, replay=replay_format)
    assert reason in info.value.reason


def test_notice_envelope_without_recipients_reports_on_the_sender() -> None:
    envelope, _ = notice_envelope(b"From: a@x.example\nSubject: s\n\n", replay=False)
    assert rcpts(envelope) == ["a@x.example"]


# --------------------------------------------------------------------------------------------
# Replay: reading


REPLAY = (
    b"X-Sender: <bob@fabrikam.example> BODY=7bit RET=HDRS ENVID=12345ABCD auth=<someAuth>\r\n"
    b"X-Receiver: <mary@contoso.example> NOTIFY=NEVER ORcpt=mary@contoso.example\r\n"
    b"X-Receiver: <Joe@Contoso.Example> notify=success,Failure ORCPT=rfc822;joe@contoso.example\r\n"
    b"X-Receiver: plain@contoso.example\r\n"
    b"X-CreatedBy: MSExchange14\r\n"
    b"X-HeloDomain: mail.fabrikam.example\r\n"
    b"X-Source: Replay\r\n"
    b"X-SourceIPAddress: 0.0.0.0\r\n"
    b"X-Mailer: kept\r\n"
    b"Received: from a by b; Mon, 1 Jan 2001 00:00:00 +0000\r\n"
    b"From: spoofed@elsewhere.example\r\n"
    b"To: visible@elsewhere.example\r\n"
    b"Bcc: hidden@elsewhere.example\r\n"
    b"X-MS-Exchange-Organization-SCL: -1\r\n"
    b"Date: Tue, 14 Nov 2023 22:13:20 +0000\r\n"
    b"Message-ID: <r@fabrikam.example>\r\n"
    b"\r\n"
    b"body\r\n"
)


def test_replay_envelope() -> None:
    envelope, _ = replay(REPLAY)
    assert envelope.mail_from == MailFrom(
        "bob@fabrikam.example", body="7BIT", ret="HDRS", envid="12345ABCD", auth="<someAuth>"
    )
    assert envelope.recipients == [
        EnvelopeRecipient(
            "mary@contoso.example", frozenset({Notify.NEVER}), "mary@contoso.example"
        ),
        EnvelopeRecipient(
            "Joe@contoso.example",
            frozenset({Notify.SUCCESS, Notify.FAILURE}),
            "rfc822;joe@contoso.example",
        ),
        EnvelopeRecipient("plain@contoso.example"),
    ]


def test_replay_header_changes() -> None:
    _, stored = replay(REPLAY)
    assert names(stored) == [
        "received",
        "x-mailer",
        "received",
        "from",
        "to",
        "date",
        "message-id",
    ]
    assert header(stored, "received").startswith(
        f"from mail.fabrikam.example by {SERVER} with hubport Replay; "
    )
    assert body(stored) == b"body\r\n"


def test_replay_firewall_trusts_local_stamp_only() -> None:
    _, stored = replay(REPLAY, local_stamp="MSExchange14")
    assert "x-ms-exchange-organization-scl" in names(stored)
    unstamped = REPLAY.replace(b"X-CreatedBy: MSExchange14\r\n", b"")
    _, stored = replay(unstamped, local_stamp="MSExchange14")
    assert "x-ms-exchange-organization-scl" not in names(stored)


def test_replay_null_sender_and_defaults() -> None:
    envelope, stored = replay(b"X-Sender: <>\nX-Receiver: <a@b.example>\n\nbody\n")
    assert envelope.mail_from == MailFrom("")
    assert rcpts(envelope) == ["a@b.example"]
    assert header(stored, "received").startswith(f"from localhost by {SERVER} with hubport Replay")
    assert header(stored, "message-id").endswith(f"@{DOMAIN}>")
    assert parsedate_to_datetime(header(stored, "date")).timestamp() == NOW


def test_replay_folded_x_sender_and_smtputf8() -> None:
    data = "X-Sender: <ä@b.example>\n\tSMTPUTF8\nX-Receiver: <ö@c.example>\n\nb\n".encode()
    envelope, _ = replay(data)
    assert envelope.mail_from == MailFrom("ä@b.example", smtputf8=True)
    assert rcpts(envelope) == ["ö@c.example"]


def test_replay_utf8_address_needs_smtputf8() -> None:
    data = "X-Sender: <a@b.example>\nX-Receiver: <ö@c.example>\n\nb\n".encode()
    assert "X-Receiver" in reason_of(replay, data).reason


def test_replay_keeps_duplicate_recipients_as_given() -> None:
    data = b"X-Sender: <a@b.example>\nX-Receiver: <r@c.example>\nX-Receiver: <r@c.example>\n\nb\n"
    assert rcpts(replay(data)[0]) == ["r@c.example", "r@c.example"]


def test_replay_accepts_flanker_long_header() -> None:
    data = (
        b"X-Sender: <a@b.example>\nX-Receiver: <r@c.example>\n"
        + (CORPUS_DIR / "flanker__long-header.eml").read_bytes()
    )
    envelope, stored = replay(data)
    assert rcpts(envelope) == ["r@c.example"]
    assert len(stored) > 200_000


def test_replay_helo_domain_must_be_a_plain_token() -> None:
    data = b"X-Sender: <a@b.example>\nX-Receiver: <r@c.example>\nX-HeloDomain: x by y; z\n\nb\n"
    assert header(replay(data)[1], "received").startswith("from localhost by ")


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"From: a@b.example\nTo: r@c.example\n\nb\n", "no X-Sender"),
        (b"X-Sender: <a@b.example>\nTo: r@c.example\n\nb\n", "no X-Receiver"),
        (
            b"X-Sender: <a@b.example>\nFrom: a@b.example\nX-Receiver: <r@c.example>\n\nb\n",
            "replay X-headers must precede normal headers",
        ),
        (
            b"From: a@b.example\nX-Sender: <a@b.example>\nX-Receiver: <r@c.example>\n\nb\n",
            "replay X-headers must precede normal headers",
        ),
        (
            b"X-Sender: <a@b.example>\nX-Sender: <z@b.example>\nX-Receiver: <r@c.example>\n\nb\n",
            "duplicate X-Sender",
        ),
        (
            b"X-Sender: <a@b.example> <z@b.example>\nX-Receiver: <r@c.example>\n\nb\n",
            "X-Sender must",
        ),
        (
            b"X-Sender: <a@b.example>, <z@b.example>\nX-Receiver: <r@c.example>\n\nb\n",
            "X-Sender must",
        ),
        (b"X-Sender: a@b.example, z@b.example\nX-Receiver: <r@c.example>\n\nb\n", "X-Sender must"),
        (b"X-Sender:\nX-Receiver: <r@c.example>\n\nb\n", "X-Sender holds no address"),
        (b"X-Sender: <a@b.example\nX-Receiver: <r@c.example>\n\nb\n", "X-Sender: unterminated"),
        (b"X-Sender: <a@b.example>\nX-Receiver: <r@@c.example>\n\nb\n", "bad X-Receiver address"),
        (b"X-Sender: <a@b.example>\nX-Receiver: <>\n\nb\n", "X-Receiver: the null address"),
        (
            b"X-Sender: <a@b.example>\nX-Receiver: <r@c.example> <s@c.example>\n\nb\n",
            "X-Receiver must",
        ),
        (b"X-Sender: <a b@b.example>\nX-Receiver: <r@c.example>\n\nb\n", "bad X-Sender address"),
        (b"X-Sender: <a@b.example>\nX-Receiver: <r@c.example\x01>\n\nb\n", "control character"),
        (b"X-Sender: <a@b.example\x7f>\nX-Receiver: <r@c.example>\n\nb\n", "control character"),
        (b"X-Sender: <a@b.example>\nX-Receiver: <r\xff@c.example>\n\nb\n", "invalid UTF-8"),
        (
            b"X-Sender: <a@b.example> BODY=9BIT\nX-Receiver: <r@c.example>\n\nb\n",
            "X-Sender: bad BODY",
        ),
        (b"X-Sender: <a@b.example> RET=ALL\nX-Receiver: <r@c.example>\n\nb\n", "X-Sender: bad RET"),
        (b"X-Sender: <a@b.example> ENVID=a+b\nX-Receiver: <r@c.example>\n\nb\n", "X-Sender: ENVID"),
        (b"X-Sender: <a@b.example> SIZE=1\nX-Receiver: <r@c.example>\n\nb\n", "X-Sender: unknown"),
        (
            b"X-Sender: <a@b.example> RET=HDRS ret=FULL\nX-Receiver: <r@c.example>\n\nb\n",
            "duplicate",
        ),
        (b"X-Sender: <a@b.example> BODY\nX-Receiver: <r@c.example>\n\nb\n", "needs a value"),
        (
            b"X-Sender: <a@b.example>\nX-Receiver: <r@c.example> NOTIFY=NEVER,FAILURE\n\nb\n",
            "X-Receiver: NOTIFY=NEVER cannot be combined",
        ),
        (
            b"X-Sender: <a@b.example>\nX-Receiver: <r@c.example> NOTIFY=SOMETIMES\n\nb\n",
            "bad NOTIFY",
        ),
        (b"X-Sender: <a@b.example>\nX-Receiver: <r@c.example> NOTIFY=\n\nb\n", "bad NOTIFY"),
        (b"X-Sender: <a@b.example>\nX-Receiver: <r@c.example> ORCPT=\n\nb\n", "empty ORCPT"),
        (b"X-Sender: <a@b.example>\nX-Receiver: <r@c.example> FOO=1\n\nb\n", "X-Receiver: unknown"),
        (
            b"X-Sender: <a@b.example>\nX-Receiver: <r@c.example>\nX-CreatedBy:\n\nb\n",
            "X-CreatedBy must",
        ),
        (
            b"X-Sender: <a@b.example>\nX-Receiver: <r@c.example>\n"
            + b"X-CreatedBy: a\n" * 2
            + b"\nb\n",
            "duplicate X-CreatedBy",
        ),
        (b"X-Sender: <a@b.example>\nX-Receiver: <r@c.example>\r\rX: y\n\nb\n", "bare CR"),
        (b"X-Sender: <a@b.example>\nX-Receiver: <r@c.example>\n\nb\x00\n", "NUL byte"),
        (b"\xff\xd8\xff\xe0\x00\x10JFIF", "NUL byte"),
        (b"garbage without colon\n\n", "not an RFC 5322 header line"),
    ],
)
def test_replay_hostile_inputs(data: bytes, reason: str) -> None:
    error = reason_of(replay, data)
    assert type(error) is MessageFormatError
    assert reason in error.reason


def test_replay_too_many_receivers() -> None:
    lines = b"".join(b"X-Receiver: <r%d@c.example>\n" % i for i in range(10_001))
    error = reason_of(replay, b"X-Sender: <a@b.example>\n" + lines + b"\nbody\n")
    assert "10000" in error.reason
    envelope, _ = replay(b"X-Sender: <a@b.example>\n" + lines.split(b"\n", 1)[1] + b"\nbody\n")
    assert len(envelope.recipients) == 10_000


@given(st.binary(max_size=300))
@settings(max_examples=300, deadline=None, derandomize=True)
def test_replay_random_bytes_only_raise_message_format_error(data: bytes) -> None:
    try:
        replay(b"X-Sender: <a@b.example>\nX-Receiver: " + data)
    except MessageFormatError:
        pass


# --------------------------------------------------------------------------------------------
# Replay: writing and the round trip


def test_format_replay_layout() -> None:
    envelope = Envelope(
        MailFrom("a@b.example", body="8BITMIME", ret="FULL", envid="id+2B1", auth="<>"),
        [
            EnvelopeRecipient(
                "r@c.example", frozenset({Notify.DELAY, Notify.SUCCESS}), "rfc822;r@c.example"
            ),
            EnvelopeRecipient("s@c.example"),
        ],
    )
    out = format_replay(envelope, b"From: a@b.example\r\n\r\nbody")
    head = (
        b"X-Sender: <a@b.example> BODY=8BITMIME RET=FULL ENVID=id+2B1 AUTH=<>\r\n"
        b"X-Receiver: <r@c.example> NOTIFY=SUCCESS,DELAY ORCPT=rfc822;r@c.example\r\n"
        b"X-Receiver: <s@c.example>\r\n"
        b"X-CreatedBy: hubport\r\n"
    )
    assert (
        out
        == head + b"X-EndOfInjectedXHeaders: %d\r\n" % len(head) + b"From: a@b.example\r\n\r\nbody"
    )


@pytest.mark.parametrize(
    "envelope",
    [
        Envelope(
            MailFrom("a@b.example\r\nX-Receiver: <evil@x>"), [EnvelopeRecipient("r@c.example")]
        ),
        Envelope(MailFrom("a@b.example"), [EnvelopeRecipient("r@c.example\n")]),
        Envelope(MailFrom("a@b.example"), [EnvelopeRecipient("r@c.example", orcpt="x\r\nBcc: y")]),
        Envelope(MailFrom("a@b.example"), [EnvelopeRecipient("r@c.example", orcpt="a b")]),
        Envelope(MailFrom("a@b.example", envid="x\x00"), [EnvelopeRecipient("r@c.example")]),
        Envelope(MailFrom("a@b.example", auth="a\tb"), [EnvelopeRecipient("r@c.example")]),
        Envelope(MailFrom("a@b.example", body="8BIT\r\n"), [EnvelopeRecipient("r@c.example")]),
        Envelope(MailFrom("a@b.example", ret="X"), [EnvelopeRecipient("r@c.example")]),
        Envelope(MailFrom("a@b.example"), [EnvelopeRecipient("")]),
        Envelope(MailFrom("a@b.example"), []),
        Envelope(MailFrom("a>b@b.example"), [EnvelopeRecipient("r@c.example")]),
        Envelope(MailFrom("a@b.example"), [EnvelopeRecipient("ö@c.example")]),
        Envelope(
            MailFrom("a@b.example"),
            [EnvelopeRecipient("r@c.example", frozenset({Notify.NEVER, Notify.DELAY}))],
        ),
    ],
)
def test_format_replay_refuses_injection_and_bad_values(envelope: Envelope) -> None:
    with pytest.raises(ValueError):
        format_replay(envelope, b"From: a@b.example\r\n\r\nbody")


@pytest.mark.parametrize("created_by", ["", "two words", "a\r\nb"])
def test_format_replay_refuses_bad_created_by(created_by: str) -> None:
    envelope = Envelope(MailFrom("a@b.example"), [EnvelopeRecipient("r@c.example")])
    with pytest.raises(ValueError):
        format_replay(envelope, b"From: a@b.example\r\n\r\nbody", created_by=created_by)


def assert_round_trip(envelope: Envelope, message: bytes) -> None:
    back, stored = replay(format_replay(envelope, message))
    assert back == envelope
    _, _, rest = stored.partition(b"\r\n")
    while rest[:1] in (b" ", b"\t"):  # the new Received field may be folded
        _, _, rest = rest.partition(b"\r\n")
    assert rest == message
    assert parse_header_section(stored).fields[0].lname == "received"


PICKED_UP = []
for _path in CORPUS:
    try:
        PICKED_UP.append((_path.name, *pickup(_path.read_bytes())))
    except MessageFormatError:
        pass


def test_most_corpus_files_are_picked_up() -> None:
    assert len(PICKED_UP) >= 35


@pytest.mark.parametrize(("name", "envelope", "message"), PICKED_UP, ids=[p[0] for p in PICKED_UP])
def test_round_trip_corpus(name: str, envelope: Envelope, message: bytes) -> None:
    assert_round_trip(envelope, message)


def test_round_trip_long_header_file() -> None:
    data = (CORPUS_DIR / "flanker__long-header.eml").read_bytes()
    envelope, message = pickup(data, max_header_size=1_000_000)
    assert_round_trip(envelope, message)


DATE_AND_ID = b"Date: Tue, 14 Nov 2023 22:13:20 +0000\r\nMessage-ID: <1@x>\r\n"


@pytest.mark.parametrize(
    "message",
    [
        (
            b"X-Sender: <own@header.example>\r\nX-Receiver: <x@y.example>\r\n"
            b"From: a@b.example\r\n" + DATE_AND_ID + b"\r\nbody"
        ),
        b"X-Mailer: Eudora\r\nX-Source: cpanel\r\nFrom: a@b.example\r\n"
        + DATE_AND_ID
        + b"\r\nbody",
        b"X-MS-Exchange-Organization-SCL: 1\r\n" + DATE_AND_ID + b"\r\n",
    ],
)
def test_round_trip_message_starting_with_x_headers(message: bytes) -> None:
    assert_round_trip(
        Envelope(MailFrom("a@b.example"), [EnvelopeRecipient("r@c.example")]), message
    )


_ATEXT = string.ascii_letters + string.digits + "!#$%&'*+-/=?^_`{|}~"
_local_ascii = st.text(alphabet=_ATEXT, min_size=1, max_size=20)
_local_quoted = st.text(alphabet=_ATEXT + " .,<>@()[]:;", min_size=1, max_size=15).map(
    lambda s: f'"{s}"'
)
_label = st.text(alphabet=string.ascii_lowercase + string.digits, min_size=1, max_size=12)
_domain = st.lists(_label, min_size=1, max_size=3).map(
    lambda labels: ".".join([*labels, "example"])
)
_xtext = st.text(alphabet=string.ascii_letters + string.digits + "<>/.-", min_size=1, max_size=20)


@st.composite
def envelopes(draw: st.DrawFn) -> Envelope:
    smtputf8 = draw(st.booleans())
    locals_ = st.one_of(_local_ascii, _local_quoted)
    if smtputf8:
        utf8 = "äöüßéñ" + string.ascii_lowercase
        locals_ = st.one_of(locals_, st.text(alphabet=utf8, min_size=1, max_size=9))

    def address() -> str:
        return f"{draw(locals_)}@{draw(_domain)}"

    mail_from = MailFrom(
        address=draw(st.sampled_from(["", None])) or address(),
        body=draw(st.sampled_from([None, "7BIT", "8BITMIME", "BINARYMIME"])),
        ret=draw(st.sampled_from([None, "HDRS", "FULL"])),
        envid=draw(st.none() | _xtext),
        auth=draw(st.none() | _xtext),
        smtputf8=smtputf8,
    )
    notify_choices = st.one_of(
        st.just(frozenset({Notify.NEVER})),
        st.sets(st.sampled_from([Notify.SUCCESS, Notify.FAILURE, Notify.DELAY])).map(frozenset),
    )
    recipients = [
        EnvelopeRecipient(
            address(),
            notify=draw(notify_choices),
            orcpt=draw(st.none() | _xtext.map(lambda s: "rfc822;" + s) | _xtext),
        )
        for _ in range(draw(st.integers(min_value=1, max_value=5)))
    ]
    return Envelope(mail_from, recipients)


@given(envelopes(), st.sampled_from(PICKED_UP[:8]))
@settings(
    max_examples=200, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
def test_round_trip_any_envelope(envelope: Envelope, picked: tuple[str, Envelope, bytes]) -> None:
    assert_round_trip(envelope, picked[2])


def test_display_name_shows_raw_bytes_as_escapes_never_surrogates() -> None:
    """One readable form for file names (bytes) and values decoded with surrogateescape."""
    raw = b"\xff\xfe@contoso.test"
    assert display_name(raw) == display_name(raw.decode("utf-8", "surrogateescape")) \
        == "\\xff\\xfe@contoso.test"
    assert display_name("dänk\tx\x85") == "dänk\\x09x\\x85"  # UTF-8 kept, controls escaped
    assert display_name("\ud800") == "\\ud800"  # a lone surrogate that never was a byte
