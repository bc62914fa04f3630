"""Tests for hubport.core.dsn: RFC 3464 reports as parsed by the stdlib, originals byte-exact."""

from __future__ import annotations

import email
import email.policy
import re
import uuid
from email.message import EmailMessage, Message
from email.utils import parsedate_to_datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hubport.core import dsn as dsn_module
from hubport.core.dsn import DsnRecipient, build_dsn
from hubport.core.model import MailFrom
from support import CORPUS_DIR

CORPUS = CORPUS_DIR
ARRIVAL = 1_700_000_000.0
NOW = ARRIVAL + 3600

ORIGINAL = (
    b"From: Alice <alice@example.com>\r\n"
    b"To: bob@remote.example\r\n"
    b"Subject: Quarterly report\r\n"
    b"Message-ID: <orig-1@example.com>\r\n"
    b"Date: Tue, 14 Nov 2023 22:13:20 +0000\r\n"
    b"\r\n"
    b"BODY-MARKER line one\r\n"
    b"line two\r\n"
)

NOT_FOUND = DsnRecipient(
    final_recipient="bob@remote.example",
    original_recipient=None,
    action="failed",
    status="5.1.1",
    diagnostic="550 5.1.1 RESOLVER.ADR.RecipNotFound; not found",
    remote_mta="mx.remote.example",
    last_attempt=NOW,
)
DELAYED = DsnRecipient(
    final_recipient="carol@slow.example",
    original_recipient=None,
    action="delayed",
    status="4.4.7",
    diagnostic="451 4.4.0 try later",
    last_attempt=NOW,
    will_retry_until=ARRIVAL + 2 * 86400,
)
DELIVERED = DsnRecipient("dave@example.com", None, "delivered", "2.0.0")


def make(
    recipients: list[DsnRecipient] | None = None,
    original: bytes = ORIGINAL,
    **overrides: object,
) -> tuple[bytes, str]:
    kwargs: dict[str, object] = {
        "original": original,
        "mail_from": MailFrom("alice@example.com"),
        "recipients": recipients or [NOT_FOUND],
        "reporting_mta": "hub1.example.com",
        "postmaster": "postmaster@example.com",
        "arrival_date": ARRIVAL,
        "message_id_domain": "example.com",
        "now": NOW,
    }
    kwargs.update(overrides)
    return build_dsn(**kwargs)  # type: ignore[arg-type]


def parse(data: bytes) -> EmailMessage:
    msg = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


def parts(msg: EmailMessage) -> list[Message]:
    payload = msg.get_payload()
    assert isinstance(payload, list)
    return payload


def status_blocks(msg: EmailMessage) -> list[Message]:
    """[per-message block, per-recipient block, ...] of the delivery-status part."""
    report = parts(msg)[1]
    assert report.get_content_type() == "message/delivery-status"
    blocks = report.get_payload()
    assert isinstance(blocks, list)
    return blocks


def human_text(msg: EmailMessage) -> str:
    text = parts(msg)[0]
    assert isinstance(text, EmailMessage)
    return text.get_content()


def generated_bytes(data: bytes, original: bytes) -> bytes:
    """The DSN with the embedded original cut out: everything hubport wrote itself.

    Only the copy that follows the message/rfc822 part's headers is cut: a short original
    (a lone CR, say) also occurs inside generated text and must stay there.
    """
    marker = data.find(b"Content-Type: message/rfc822")
    if not original or marker < 0:
        return data
    start = data.index(b"\r\n\r\n", marker) + 4
    assert data[start : start + len(original)] == original
    return data[:start] + data[start + len(original) :]


# ------------------------------------------------------------------ structure


def test_multipart_report_with_three_parts() -> None:
    data, message_id = make()
    msg = parse(data)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert [p.get_content_type() for p in parts(msg)] == [
        "text/plain",
        "message/delivery-status",
        "message/rfc822",
    ]
    assert msg["Message-ID"] == message_id
    assert re.fullmatch(r"<[0-9a-f]{32}@example\.com>", message_id)
    assert msg["MIME-Version"] == "1.0"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg.defects == []


def test_top_level_addressing_and_threading() -> None:
    msg = parse(make()[0])
    sender = msg["From"].addresses[0]
    assert (sender.display_name, sender.addr_spec) == (
        "Mail Delivery System",
        "postmaster@example.com",
    )
    assert msg["To"].addresses[0].addr_spec == "alice@example.com"
    assert msg["In-Reply-To"] == "<orig-1@example.com>"
    assert msg["References"] == "<orig-1@example.com>"
    assert parsedate_to_datetime(msg["Date"]).timestamp() == NOW


def test_no_threading_headers_without_original_message_id() -> None:
    original = b"Subject: hi\r\n\r\nbody\r\n"
    msg = parse(make(original=original)[0])
    assert msg["In-Reply-To"] is None
    assert msg["References"] is None


def test_every_generated_line_is_crlf_terminated_and_short() -> None:
    data, _ = make([NOT_FOUND, DELAYED])
    own = generated_bytes(data, ORIGINAL)
    assert own.endswith(b"\r\n")
    assert re.search(rb"(?<!\r)\n", own) is None
    assert all(len(line) <= 998 for line in own.split(b"\r\n"))


# ----------------------------------------------------------- delivery-status


def test_per_message_fields() -> None:
    msg = parse(make()[0])
    per_message = status_blocks(msg)[0]
    assert per_message["Reporting-MTA"] == "dns; hub1.example.com"
    assert parsedate_to_datetime(per_message["Arrival-Date"]).timestamp() == ARRIVAL
    assert per_message["Original-Envelope-Id"] is None


def test_envid_is_echoed_as_given() -> None:
    mail_from = MailFrom("alice@example.com", envid="QQ+2B314159")
    per_message = status_blocks(parse(make(mail_from=mail_from)[0]))[0]
    assert per_message["Original-Envelope-Id"] == "QQ+2B314159"


def test_per_recipient_fields_for_a_failure() -> None:
    blocks = status_blocks(parse(make()[0]))
    assert len(blocks) == 2
    rcpt = blocks[1]
    assert rcpt["Original-Recipient"] is None
    assert rcpt["Final-Recipient"] == "rfc822;bob@remote.example"
    assert rcpt["Action"] == "failed"
    assert rcpt["Status"] == "5.1.1"
    assert rcpt["Remote-MTA"] == "dns; mx.remote.example"
    assert rcpt["Diagnostic-Code"] == (
        "smtp; 550 5.1.1 RESOLVER.ADR.RecipNotFound; not found"
    )
    assert parsedate_to_datetime(rcpt["Last-Attempt-Date"]).timestamp() == NOW
    assert rcpt["Will-Retry-Until"] is None


def test_optional_recipient_fields_are_omitted() -> None:
    bare = DsnRecipient("x@example.net", None, "failed", "5.4.4")
    rcpt = status_blocks(parse(make([bare])[0]))[1]
    for name in ("Remote-MTA", "Diagnostic-Code", "Last-Attempt-Date"):
        assert rcpt[name] is None


@pytest.mark.parametrize(
    ("orcpt", "expected"),
    [
        ("rfc822;Bob@Remote.example", "rfc822;Bob@Remote.example"),
        ("Bob@Remote.example", "rfc822;Bob@Remote.example"),
        ("x400;C=US;A=X;P=Y;S=Bob", "x400;C=US;A=X;P=Y;S=Bob"),
    ],
)
def test_orcpt_is_echoed(orcpt: str, expected: str) -> None:
    rcpt = DsnRecipient("bob@remote.example", orcpt, "failed", "5.1.1")
    block = status_blocks(parse(make([rcpt])[0]))[1]
    assert block["Original-Recipient"] == expected
    assert block["Final-Recipient"] == "rfc822;bob@remote.example"


def test_one_block_per_recipient_in_order() -> None:
    blocks = status_blocks(parse(make([NOT_FOUND, DELAYED, DELIVERED])[0]))
    assert [b["Final-Recipient"] for b in blocks[1:]] == [
        "rfc822;bob@remote.example",
        "rfc822;carol@slow.example",
        "rfc822;dave@example.com",
    ]
    assert [b["Action"] for b in blocks[1:]] == ["failed", "delayed", "delivered"]


def test_recipients_listed_are_capped_and_the_rest_counted() -> None:
    """A 10,000-recipient NDR was 3.9 MB (issue 10, finding 11): one cap for every DSN."""
    many = [DsnRecipient(f"user{i}@remote.example", None, "failed", "5.5.3",
                         "550 5.5.3 RESOLVER.ADR.RecipLimit; too many recipients")
            for i in range(10_000)]
    data, _ = make(many)
    msg = parse(data)
    blocks = status_blocks(msg)[1:]
    assert dsn_module.MAX_LISTED_RECIPIENTS == 100
    assert [b["Final-Recipient"] for b in blocks] == [
        f"rfc822;user{i}@remote.example" for i in range(100)]
    text = " ".join(human_text(msg).split())
    assert ("This report is about 10,000 recipients and lists the first 100; the other 9,900"
            " are in the message tracking log of hub1.example.com.") in text
    assert "user100@remote.example" not in data.decode()
    assert len(data) < 60_000
    assert msg["Subject"] == "Undeliverable: Quarterly report"


def test_at_the_cap_nothing_is_left_out() -> None:
    exact = [DsnRecipient(f"u{i}@remote.example", None, "failed", "5.1.1") for i in range(100)]
    msg = parse(make(exact)[0])
    assert len(status_blocks(msg)) == 101
    assert "lists the first" not in human_text(msg)


def test_subject_reflects_recipients_beyond_the_cap() -> None:
    mixed = [DELIVERED] * 100 + [NOT_FOUND]
    msg = parse(make(mixed)[0])
    assert msg["Subject"].startswith("Undeliverable:")
    assert len(status_blocks(msg)) == 101  # the per-message block and the first 100


def test_delayed_dsn_has_will_retry_until() -> None:
    msg = parse(make([DELAYED])[0])
    rcpt = status_blocks(msg)[1]
    assert rcpt["Action"] == "delayed"
    assert rcpt["Status"] == "4.4.7"
    until = parsedate_to_datetime(rcpt["Will-Retry-Until"]).timestamp()
    assert until == ARRIVAL + 2 * 86400
    text = " ".join(human_text(msg).split())  # undo the word wrapping
    assert "Delivery is delayed to these recipients or groups:" in text
    # retry until two days after arrival, one hour after arrival now
    assert "for the next 1 day and 23 hours (until Thu, 16 Nov 2023" in text


def test_will_retry_until_only_for_delayed() -> None:
    odd = DsnRecipient("x@example.net", None, "failed", "5.0.0", will_retry_until=NOW)
    assert status_blocks(parse(make([odd])[0]))[1]["Will-Retry-Until"] is None


def test_non_ascii_recipient_uses_utf8_address_type() -> None:
    rcpt = DsnRecipient("pelé@exämple.com", None, "failed", "5.1.1")
    data, _ = make([rcpt])
    block = status_blocks(parse(data))[1]
    assert block["Final-Recipient"] == "utf-8;pel\\x{E9}@ex\\x{E4}mple.com"


def test_garbled_status_falls_back_to_the_action_class() -> None:
    rcpt = DsnRecipient("x@example.net", None, "failed", "550 oops")
    assert status_blocks(parse(make([rcpt])[0]))[1]["Status"] == "5.0.0"


# ------------------------------------------------------------ returned content


@pytest.mark.parametrize("ret", [None, "FULL", "full"])
def test_full_original_is_embedded_byte_identical(ret: str | None) -> None:
    mail_from = MailFrom("alice@example.com", ret=ret)
    data, _ = make(mail_from=mail_from)
    assert ORIGINAL in data
    returned = parts(parse(data))[2]
    assert returned.get_content_type() == "message/rfc822"
    inner = returned.get_payload()[0]
    assert inner["Subject"] == "Quarterly report"


def test_ret_hdrs_returns_only_the_header_section() -> None:
    data, _ = make(mail_from=MailFrom("alice@example.com", ret="HDRS"))
    assert b"BODY-MARKER" not in data
    returned = parts(parse(data))[2]
    assert returned.get_content_type() == "text/rfc822-headers"
    headers = returned.get_payload(decode=True)
    assert headers == ORIGINAL.split(b"\r\n\r\n")[0] + b"\r\n"


def test_too_big_original_falls_back_to_headers() -> None:
    data, _ = make(max_return_size=len(ORIGINAL) - 1)
    assert b"BODY-MARKER" not in data
    assert parts(parse(data))[2].get_content_type() == "text/rfc822-headers"
    data, _ = make(max_return_size=len(ORIGINAL))
    assert ORIGINAL in data


def test_huge_header_section_is_cut_at_a_line_boundary() -> None:
    original = (
        b"Subject: big\r\n"
        + b"X-Filler: "
        + b"y" * 60
        + b"\r\n" * 1
        + (b"X-More: zzzzzzzzzz\r\n" * 5000)
        + b"\r\nbody\r\n"
    )
    data, _ = make(original=original, max_return_size=10_000)
    returned = parts(parse(data))[2]
    headers = returned.get_payload(decode=True)
    assert isinstance(headers, bytes)
    assert 0 < len(headers) <= 10_000
    assert headers.endswith(b"\r\n")
    assert headers.startswith(b"Subject: big\r\n")


@pytest.mark.parametrize("recipient", [DELAYED, DELIVERED])
def test_reports_without_failure_return_headers_only(recipient: DsnRecipient) -> None:
    # RFC 3461 4.3: with no failure in the DSN, only the headers SHOULD be returned.
    data, _ = make([recipient], mail_from=MailFrom("alice@example.com", ret="FULL"))
    assert b"BODY-MARKER" not in data
    assert parts(parse(data))[2].get_content_type() == "text/rfc822-headers"


def test_boundary_that_occurs_in_the_original_is_not_used(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    taken = uuid.UUID(int=1)
    fresh = uuid.UUID(int=2)
    original = ORIGINAL + b"--=_hubport-dsn_" + taken.hex.encode() + b"\r\n"
    uuids = iter([uuid.UUID(int=99), taken, fresh])
    monkeypatch.setattr(dsn_module.uuid, "uuid4", lambda: next(uuids))
    data, _ = make(original=original)
    msg = parse(data)
    assert msg.get_boundary() == f"=_hubport-dsn_{fresh.hex}"
    assert len(parts(msg)) == 3
    assert original in data


# --------------------------------------------------------------------- subject


def test_subject_forms() -> None:
    assert parse(make([NOT_FOUND])[0])["Subject"] == "Undeliverable: Quarterly report"
    assert parse(make([DELAYED])[0])["Subject"] == "Delivery delayed: Quarterly report"
    assert parse(make([DELIVERED])[0])["Subject"] == "Delivered: Quarterly report"
    relayed = DsnRecipient("r@example.net", None, "relayed", "2.0.0")
    assert parse(make([relayed])[0])["Subject"] == "Delivered: Quarterly report"


def test_mixed_actions_take_the_most_severe_subject() -> None:
    subject = parse(make([DELIVERED, DELAYED, NOT_FOUND])[0])["Subject"]
    assert subject == "Undeliverable: Quarterly report"
    assert parse(make([DELIVERED, DELAYED])[0])["Subject"].startswith(
        "Delivery delayed:"
    )


def test_ndr_marker_only_on_failures() -> None:
    assert parse(make([NOT_FOUND])[0])["X-MS-Exchange-Message-Is-Ndr"] == ""
    assert parse(make([DELAYED])[0])["X-MS-Exchange-Message-Is-Ndr"] is None
    assert parse(make([DELIVERED])[0])["X-MS-Exchange-Message-Is-Ndr"] is None


def test_encoded_non_ascii_subject_is_decoded_and_reencoded() -> None:
    original = b"Subject: =?utf-8?b?0J/RgNC40LLQtdGC?= world\r\n\r\nx\r\n"
    data, _ = make(original=original)
    assert parse(data)["Subject"] == "Undeliverable: Привет world"
    top = data.split(b"\r\n\r\n")[0]
    assert top.isascii()


def test_missing_subject() -> None:
    data, _ = make(original=b"From: a@b\r\n\r\nbody\r\n")
    assert parse(data)["Subject"] == "Undeliverable:"


def test_literal_encoded_word_text_stays_literal() -> None:
    original = b"Subject: =?utf-8?q?=3D=3Fus-ascii=3Fq=3Fx=3F=3D?=\r\n\r\nx\r\n"
    assert parse(make(original=original)[0])["Subject"] == (
        "Undeliverable: =?us-ascii?q?x?="
    )


# ------------------------------------------------------------ human readable


def test_human_readable_failure_text() -> None:
    msg = parse(make()[0])
    text_part = parts(msg)[0]
    assert text_part.get_content_charset() == "utf-8"
    text = human_text(msg)
    assert "Delivery has failed to these recipients or groups:" in text
    assert "bob@remote.example" in text
    assert "couldn't be found" in text
    assert "Generating server: hub1.example.com" in text
    assert "550 5.1.1 RESOLVER.ADR.RecipNotFound; not found" in text
    assert "Traceback" not in text and "None" not in text


def test_human_readable_success_text() -> None:
    text = human_text(parse(make([DELIVERED])[0]))
    assert "Your message was delivered to these recipients or groups:" in text
    assert "dave@example.com" in text


def test_non_ascii_diagnostic_keeps_report_seven_bit() -> None:
    rcpt = DsnRecipient("x@example.net", None, "failed", "5.7.1", "550 5.7.1 refusé")
    data, _ = make([rcpt])
    msg = parse(data)
    assert "refusé" in human_text(msg)
    assert status_blocks(msg)[1]["Diagnostic-Code"] == "smtp; 550 5.7.1 refus?"
    assert generated_bytes(data, ORIGINAL).isascii()


# ------------------------------------------------------------------ injection


def test_header_injection_in_diagnostic_is_neutralized() -> None:
    evil = DsnRecipient(
        final_recipient="bob@remote.example",
        original_recipient="rfc822;bob@remote.example\r\nX-Evil: 1",
        action="failed",
        status="5.1.1",
        diagnostic=(
            "550 5.1.1 no\r\nBcc: victim@example.org\r\n\r\nAction: delivered"
            "\x00\x1b[31m\u2028"
        ),
        remote_mta="mx.remote.example\r\nX-Evil: 2",
    )
    data, _ = make(
        [evil],
        reporting_mta="hub\r\nX-Evil: 3",
        postmaster="postmaster@example.com>\r\nX-Evil: 4",
        mail_from=MailFrom("alice@example.com\r\nBcc: x@y", envid="E\r\nX-Evil: 5"),
    )
    msg = parse(data)
    assert msg["Bcc"] is None and msg["X-Evil"] is None
    assert msg.defects == []
    blocks = status_blocks(msg)
    assert len(blocks) == 2
    for block in blocks:
        assert block["Bcc"] is None and block["X-Evil"] is None
    rcpt = blocks[1]
    assert rcpt["Action"] == "failed"
    assert rcpt["Diagnostic-Code"] == (
        "smtp; 550 5.1.1 no Bcc: victim@example.org Action: delivered [31m"
    )
    assert b"\r\nBcc:" not in data and b"\r\nX-Evil" not in data
    own = generated_bytes(data, ORIGINAL)
    assert re.search(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]", own) is None


def test_encoded_crlf_in_original_subject_is_neutralized() -> None:
    original = b"Subject: =?utf-8?q?hi=0D=0ABcc:_victim@example.org?=\r\n\r\nx\r\n"
    data, _ = make(original=original)
    msg = parse(data)
    assert msg["Bcc"] is None
    assert msg["Subject"] == "Undeliverable: hi Bcc: victim@example.org"


# ------------------------------------------------------------------ corpus


def test_corpus_8bit_original_is_embedded_verbatim() -> None:
    original = (CORPUS / "flanker__8bitmime.eml").read_bytes()
    data, _ = make(original=original)
    assert original in data
    msg = parse(data)
    assert msg["Content-Transfer-Encoding"] == "8bit"
    returned = parts(msg)[2]
    assert returned["Content-Transfer-Encoding"] == "8bit"
    assert msg["Subject"] == "Undeliverable: 2 RCPT MIME"
    assert msg["In-Reply-To"] == "<1275447987.2063.842.camel@pony>"
    assert generated_bytes(data, original).isascii()


def test_corpus_malformed_headers_still_give_a_dsn() -> None:
    original = (CORPUS / "flanker__mailformed-headers.eml").read_bytes()
    data, _ = make(original=original)
    assert original in data
    msg = parse(data)
    assert msg["Subject"].startswith("Undeliverable:")
    assert len(parts(msg)) == 3
    data, _ = make(original=original, mail_from=MailFrom("a@b.example", ret="HDRS"))
    returned = parts(parse(data))[2]
    assert returned.get_content_type() == "text/rfc822-headers"
    assert returned["Content-Transfer-Encoding"] == "8bit"
    assert b"Hello" not in data


def test_seven_bit_original_keeps_a_seven_bit_report() -> None:
    msg = parse(make()[0])
    assert msg["Content-Transfer-Encoding"] == "7bit"
    assert parts(msg)[2]["Content-Transfer-Encoding"] == "7bit"


# ------------------------------------------------------------ weird originals


@pytest.mark.parametrize(
    "original",
    [
        b"",
        b"no headers at all, just text\r\nand more\r\n",
        b"Subject: no blank line\r\nFrom: a@b",
        b"Subject: bare lf\nFrom: a@b\n\nbody\n",
        b"Subject: \xff\xfe junk \x00 bytes\r\n\r\n\x00\x01",
        b"Subject: =?x-unknown?q?abc?= =?utf-8?b?!!!?=\r\n\r\n",
        b"\r\n\r\nbody only",
        b"From sender@example.com Mon Jan  1 00:00:00 2024\nSubject: mbox\n\nx\n",
        b" continuation first\r\nSubject: x\r\n\r\n",
    ],
)
def test_weird_originals_still_produce_a_dsn(original: bytes) -> None:
    data, _ = make(original=original)
    msg = parse(data)
    assert msg["Subject"].startswith("Undeliverable:")
    assert len(parts(msg)) == 3
    assert original in data


@settings(max_examples=60, deadline=None, derandomize=True)
@given(st.binary(max_size=400), st.sampled_from([None, "HDRS", "FULL"]))
def test_arbitrary_bytes_never_raise(original: bytes, ret: str | None) -> None:
    data, _ = make(
        [NOT_FOUND, DELAYED],
        original=original,
        mail_from=MailFrom("alice@example.com", ret=ret),
    )
    msg = parse(data)
    assert msg.get_content_type() == "multipart/report"
    assert len(parts(msg)) == 3
    assert re.search(rb"(?<!\r)\n", generated_bytes(data, original)) is None


# ------------------------------------------------------------ caller errors


@pytest.mark.parametrize("address", ["", "<>", "  "])
def test_null_sender_raises(address: str) -> None:
    with pytest.raises(ValueError):
        make(mail_from=MailFrom(address))


def test_no_recipients_raises() -> None:
    with pytest.raises(ValueError):
        build_dsn(
            original=ORIGINAL,
            mail_from=MailFrom("alice@example.com"),
            recipients=[],
            reporting_mta="hub1.example.com",
            postmaster="postmaster@example.com",
            arrival_date=ARRIVAL,
            message_id_domain="example.com",
        )


def test_unknown_action_raises() -> None:
    with pytest.raises(ValueError):
        make([DsnRecipient("x@example.net", None, "bounced", "5.0.0")])
